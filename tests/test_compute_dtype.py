"""``jmerge.merge(..., compute_dtype=)``, mergekit's arithmetic in its ``dtype`` step by step, bit for
bit against the numpy reference (``reference.mergekit_gta`` with ``dtype``); and
``jmerge.thresholds.torch_order`` against torch's own CPU sort (mergekit's venv, where it exists)."""

import subprocess

import ml_dtypes
import numpy as np
import pytest

import jmerge
import reference as ref
from bench import mergekit_bench
from jmerge.thresholds import torch_order

WEIGHTS = (1.0, 0.5, 0.8)


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


@pytest.mark.skipif(not (mergekit_bench.VENV / "bin" / "python").exists(),
                    reason=f"no mergekit venv at {mergekit_bench.VENV} (`python -m bench.mergekit_bench`)")
@pytest.mark.parametrize("seed, n, k", CASES)
def test_torch_order_is_torchs_cpu_sort(tmp_path, seed, n, k):
    x = _tied(seed, n)
    np.save(tmp_path / "x.npy", x)
    start, stop = n - k - 2, n - 2
    subprocess.run([str(mergekit_bench.VENV / "bin" / "python"), "-c", TORCH_SORT, str(tmp_path / "x.npy"),
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
