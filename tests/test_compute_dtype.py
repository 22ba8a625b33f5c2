"""``jmerge.merge(..., compute_dtype=)``, mergekit's arithmetic in its ``dtype`` step by step, bit for
bit against the numpy reference (``reference.mergekit_gta`` with ``dtype``; ``linear``'s fused
multiply-adds, ``reference.mergekit_linear``; ``slerp``'s separately rounded products); and, where
mergekit's venv exists, against torch and mergekit themselves: ``jmerge.thresholds.torch_order``
against torch's CPU sort, ``linear`` and a colinear ``slerp`` against mergekit's kernels, and the
thread-count dependence of mergekit's ``slerp`` that keeps its other coefficients out of reach."""

import subprocess

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import jmerge
import reference as ref
from bench import mergekit_bench
from jmerge.methods import task_arithmetic
from jmerge.thresholds import torch_order

WEIGHTS = (1.0, 0.5, 0.8)
BF16 = ml_dtypes.bfloat16
MERGEKIT_PYTHON = mergekit_bench.VENV / "bin" / "python"
needs_mergekit = pytest.mark.skipif(not MERGEKIT_PYTHON.exists(),
                                    reason=f"no mergekit venv at {mergekit_bench.VENV} (`python -m bench.mergekit_bench`)")


def _models(seed, shape=(16, 24)):
    r = np.random.default_rng(seed)
    base = r.standard_normal(shape).astype(np.float32)
    return base, [base + 0.01 * r.standard_normal(shape).astype(np.float32) for _ in WEIGHTS]


@pytest.mark.parametrize("dtype", [ml_dtypes.bfloat16, np.float16])
@pytest.mark.parametrize("method, hp, gta", [
    ("task_arithmetic", {"scale": 0.7}, dict(lam=0.7, normalize=False, consensus=False, sparsify=False)),
    ("task_arithmetic", {"scale": 0.7, "normalize": True}, dict(lam=0.7, normalize=True, consensus=False, sparsify=False)),
    ("ties", {"density": 0.3, "trim": "tensor", "tie_break": "first", "scale": 0.9},
     dict(lam=0.9, normalize=True, consensus=True, sparsify=True)),
])
def test_low_precision_merge_is_mergekits_arithmetic_bit_for_bit(dtype, method, hp, gta):
    base, experts = _models(0)
    density = hp.get("density", 1.0)
    want = ref.mergekit_gta(base, experts, WEIGHTS, [density] * 3, dtype=dtype, **gta).astype(dtype)
    got = np.asarray(jmerge.merge({"w": base}, [{"w": e} for e in experts], method, compute_dtype=dtype,
                                  weights=WEIGHTS, **hp)["w"])
    assert got.dtype == dtype
    np.testing.assert_array_equal(got.view(np.uint16), want.view(np.uint16))
    plain = np.asarray(jmerge.merge({"w": base}, [{"w": e} for e in experts], method, weights=WEIGHTS, **hp)["w"])
    assert np.count_nonzero(plain.astype(dtype).view(np.uint16) != want.view(np.uint16)) > 0  # rounding once differs


def test_compute_dtype_must_be_a_float_dtype():
    base, experts = _models(1)
    with pytest.raises(jmerge.MergeInputError, match="^compute_dtype must be a float dtype, got int32$"):
        jmerge.merge({"w": base}, [{"w": e} for e in experts], "task_arithmetic", compute_dtype="int32")


def _tied(seed, n):
    """|values| rounded to bf16 in a narrow range: many entries tied at every cut."""
    r = np.random.default_rng(seed)
    return np.abs(r.standard_normal(n)).clip(0.5, 0.6).astype(ml_dtypes.bfloat16).astype(np.float32)


CASES = [(0, 10, 3), (1, 1000, 200), (2, 5000, 1000), (3, 40000, 8000)]


@pytest.mark.parametrize("seed, n, k", CASES)
def test_torch_order_keeps_k_entries_and_everything_above_the_cut(seed, n, k):
    x = _tied(seed, n)
    top = torch_order.kept(x, 0, k, descending=True)
    assert top.sum() == k
    kth = np.sort(x)[::-1][k - 1]
    assert top[x > kth].all() and not top[x < kth].any()
    mid = torch_order.kept(x, n - k - 2, n - 2, descending=False)
    assert mid.sum() == k


TORCH_SORT = """
import sys, numpy as np, torch
x = torch.from_numpy(np.load(sys.argv[1]))
k, start, stop = map(int, sys.argv[3:6])
top = np.zeros(x.numel(), bool); top[torch.argsort(x, descending=True)[:k].numpy()] = True
mid = np.zeros(x.numel(), bool); mid[torch.sort(x).indices[start:stop].numpy()] = True
np.save(sys.argv[2], np.stack([top, mid]))
"""


@needs_mergekit
@pytest.mark.parametrize("seed, n, k", CASES)
def test_torch_order_is_torchs_cpu_sort(tmp_path, seed, n, k):
    x = _tied(seed, n)
    np.save(tmp_path / "x.npy", x)
    start, stop = n - k - 2, n - 2
    subprocess.run([str(MERGEKIT_PYTHON), "-c", TORCH_SORT, str(tmp_path / "x.npy"),
                    str(tmp_path / "m.npy"), str(k), str(start), str(stop)], check=True)
    top, mid = np.load(tmp_path / "m.npy")
    np.testing.assert_array_equal(torch_order.kept(x, 0, k, descending=True), top)
    np.testing.assert_array_equal(torch_order.kept(x, start, stop, descending=False), mid)


def test_rounding_is_per_thread_and_restored():
    """`jmerge.tree.rounding` is a context variable: another thread sees float32 while one rounds,
    and the setting is restored on leaving the block, even by an exception."""
    import threading

    from jmerge import tree

    x = {"w": np.float32([1.0 + 2.0 ** -10])}  # not representable in bfloat16 (8 bits of mantissa)
    seen = {}
    inside, release = threading.Event(), threading.Event()

    def rounds():
        with tree.rounding("bfloat16"):
            seen["inner"] = float(tree.rounded(x)["w"][0])
            inside.set()
            release.wait(5)

    worker = threading.Thread(target=rounds)
    worker.start()
    inside.wait(5)
    seen["other"] = float(tree.rounded(x)["w"][0])
    release.set()
    worker.join()
    assert seen == {"inner": 1.0, "other": 1.0 + 2.0 ** -10}
    with pytest.raises(RuntimeError, match="inside the block"):
        with tree.rounding("float16"):
            raise RuntimeError("inside the block")
    assert tree.rounding_dtype() is None


# linear's weights: two (mergekit's tests), five and nine, whose sums torch adds in another order than
# left to right (and which are not 1: the division rounds)
LINEAR_WEIGHTS = [(0.6, 0.4), (0.41, 0.23, 0.13, 0.57, 0.32), (0.65, 0.23, 0.9, 0.38, 0.14, 0.62, 0.88, 0.45, 0.91)]


def _close_models(seed, k, shape=(64, 512), spread=0.01):
    """``k`` float32 models ``b + spread N(0, 1)`` around one random ``b ~ 0.02 N(0, 1)``."""
    r = np.random.default_rng(seed)
    base = 0.02 * r.standard_normal(shape)
    return [(base + spread * r.standard_normal(shape)).astype(np.float32) for _ in range(k)]


def _merge(method, models, **hp):
    """``method`` with ``models[0]`` as the base and every model merged (mergekit's base-less
    ``linear``; slerp's base merged as its t = 0)."""
    return np.asarray(jmerge.merge({"w": models[0]}, [{"w": m} for m in models], method, **hp)["w"])


def _bits_differing(x, y):
    return int(np.count_nonzero(np.asarray(x).view(np.uint16) != np.asarray(y).view(np.uint16)))


@pytest.mark.parametrize("n", [*range(1, 41), 100, 300])
def test_linear_sums_its_weights_in_torchs_order(n):
    x = np.random.default_rng(n).uniform(0, 1, n).astype(np.float32)
    assert task_arithmetic._torch_sum(jnp.asarray(x)) == ref.torch_sum(x)


def test_torch_order_sum_refuses_the_sizes_it_does_not_replay():
    with pytest.raises(ValueError, match=r"for fewer than 512 models, got 512$"):
        task_arithmetic._torch_sum(jnp.zeros(512, jnp.float32))


@pytest.mark.parametrize("weights", LINEAR_WEIGHTS)
def test_linear_is_mergekits_fused_multiply_adds_bit_for_bit(weights):
    """``linear`` (jmerge's ``average``) under ``compute_dtype``: ``result = 0``, one fused multiply-add
    per model, a true division by the weights summed in torch's order, bit for bit. On these
    inputs each other arithmetic gives other bits (so the test can fail): jmerge's own (XLA fuses
    the first product into the second and divides by a reciprocal), the products rounded first
    (torch's unvectorised kernel), the weights summed left to right, a reciprocal."""
    models = _close_models(len(weights), len(weights))
    want = ref.mergekit_linear(models, weights, dtype=BF16)
    got = _merge("average", models, weights=weights, compute_dtype=BF16)
    assert got.dtype == BF16
    np.testing.assert_array_equal(got.view(np.uint16), want.view(np.uint16))

    own = _merge("average", [m.astype(BF16) for m in models], weights=weights)  # before: 127 of 56736 in bench
    assert _bits_differing(own, want) > 0
    xs, w = [m.astype(BF16).astype(np.float32) for m in models], np.asarray(weights, np.float32)
    unfused = np.zeros_like(xs[0])
    for x, wt in zip(xs, w):
        unfused = unfused + x * wt
    assert _bits_differing((unfused / ref.torch_sum(w)).astype(BF16), want) > 0
    fused = ref.mergekit_linear(models, weights, dtype=np.float32, normalize=False)
    assert _bits_differing((fused * (np.float32(1) / ref.torch_sum(w))).astype(BF16), want) > 0
    if len(weights) > 4:
        left_to_right = np.float32(0)
        for wt in w:
            left_to_right = np.float32(left_to_right + wt)
        assert left_to_right != ref.torch_sum(w)
        assert _bits_differing((fused / left_to_right).astype(BF16), want) > 0


def _colinear(seed, shape=(64, 512)):
    """Two models whose directions are within mergekit's lerp threshold (cos > 0.9995): slerp's
    coefficients are then ``1 - t`` and ``t`` exactly, and its bits are the combination's alone."""
    return _close_models(seed, 2, shape, spread=0.0002)


def test_slerp_rounds_both_products_as_mergekit():
    """mergekit's ``coef_a * x + coef_b * y`` is three torch ops (each product rounded); under
    ``compute_dtype`` jmerge's slerp rounds them too, where XLA would fuse one into the sum."""
    a, b = (m.astype(BF16).astype(np.float32) for m in _colinear(0))
    t = np.float32(0.35)
    want = ((np.float32(1) - t) * a + t * b).astype(BF16)  # numpy: each product and the sum rounded
    got = _merge("slerp", [a, b], t=0.35, compute_dtype=BF16)
    np.testing.assert_array_equal(got.view(np.uint16), want.view(np.uint16))
    assert _bits_differing(_merge("slerp", [a.astype(BF16), b.astype(BF16)], t=0.35), want) > 0  # fused


MERGEKIT_KERNELS = """
import sys, numpy as np, torch
from mergekit.merge_methods.base import TensorBatch
from mergekit.merge_methods.linear import linear_merge
from mergekit.merge_methods.slerp import slerp_merge_method
data = np.load(sys.argv[1])
models = [torch.from_numpy(data[k]).to(torch.bfloat16)[None] for k in sorted(data) if k.startswith("m")]
if sys.argv[3] == "linear":
    w = torch.tensor([data["weights"].tolist()], dtype=torch.float32)
    out = linear_merge.merge_batch(TensorBatch(models), weight=w, normalize=True)[0]
elif sys.argv[3] == "slerp":
    out = slerp_merge_method.merge_batch(TensorBatch(models, base_index=0), t=torch.tensor([0.35]))[0]
else:  # each row's sum, as linear's denominator (weight.sum(dim=1))
    out = torch.stack([torch.from_numpy(data[k])[None].sum(dim=1)[0] for k in sorted(data)])
print(torch.backends.cpu.get_cpu_capability())
np.save(sys.argv[2], out.float().numpy())
"""


def _mergekit(tmp_path, what, **arrays):
    """mergekit's ``linear`` or ``slerp`` kernel (inputs rounded to bf16) or torch's row sums, in its
    venv: the result as float32, and torch's CPU capability."""
    np.savez(tmp_path / "in.npz", **arrays)
    p = subprocess.run([str(MERGEKIT_PYTHON), "-c", MERGEKIT_KERNELS, str(tmp_path / "in.npz"), str(tmp_path / "out.npy"),
                        what], check=True, capture_output=True, text=True)
    return np.load(tmp_path / "out.npy"), p.stdout.split()[-1]


@needs_mergekit
def test_torch_sum_reference_is_torchs_cpu_sum(tmp_path):
    r = np.random.default_rng(0)
    rows = [r.uniform(0, 1, n).astype(np.float32) for n in [*range(1, 41), 100, 300] for _ in range(5)]
    got, _ = _mergekit(tmp_path, "sum", **{f"x{i:03d}": row for i, row in enumerate(rows)})
    np.testing.assert_array_equal(got, [ref.torch_sum(row) for row in rows])


@needs_mergekit
@pytest.mark.parametrize("weights", LINEAR_WEIGHTS)
def test_linear_is_mergekits_linear_kernel_bit_for_bit(tmp_path, weights):
    models = _close_models(len(weights), len(weights))
    want, capability = _mergekit(tmp_path, "linear", weights=np.asarray(weights, np.float32),
                                 **{f"m{i}": m for i, m in enumerate(models)})
    if capability not in ("AVX2", "AVX512"):
        pytest.skip(f"torch runs its {capability} kernels here, whose addcmul_ rounds the product first")
    got = _merge("average", models, weights=weights, compute_dtype=BF16)
    np.testing.assert_array_equal(got.view(np.uint16), want.astype(BF16).view(np.uint16))


@needs_mergekit
def test_colinear_slerp_is_mergekits_slerp_kernel_bit_for_bit(tmp_path):
    a, b = _colinear(0)
    want, _ = _mergekit(tmp_path, "slerp", m0=a, m1=b)
    got = _merge("slerp", [a, b], t=0.35, compute_dtype=BF16)
    np.testing.assert_array_equal(got.view(np.uint16), want.astype(BF16).view(np.uint16))


MERGEKIT_SLERP_THREADS = """
import numpy as np, torch
from mergekit.merge_methods.slerp import slerp
r = np.random.default_rng(0)
base = 0.02 * r.standard_normal((1024, 1024))
a, b = (torch.from_numpy((base + 0.01 * r.standard_normal(base.shape)).astype(np.float32)).to(torch.bfloat16)[None]
        for _ in range(2))
out = {}
for threads in (1, 2):
    torch.set_num_threads(threads)
    out[threads] = slerp(torch.tensor([0.35]), a, b).view(torch.int16)
print(int((out[1] != out[2]).sum()))
"""


@needs_mergekit
def test_mergekits_slerp_bits_depend_on_torchs_thread_count():
    """Why jmerge's slerp coefficients are not mergekit's to the bit (docs/mergekit.md): torch splits
    a long row's sum (the dot product, over 32768 entries) between its threads, so mergekit's own
    slerp of two bf16 1024 x 1024 tensors differs between 1 and 2 threads."""
    p = subprocess.run([str(MERGEKIT_PYTHON), "-c", MERGEKIT_SLERP_THREADS], check=True, capture_output=True, text=True)
    assert int(p.stdout.split()[-1]) > 0
