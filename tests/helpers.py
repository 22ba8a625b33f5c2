"""What the tests share: random models, placement on the 8-device mesh, checkpoint writers, tiny
Hugging Face models (transformers Flax models, a Llama directory with a tokenizer), tree assertions.

Fixtures wrapping these (``mesh8``) are in ``conftest.py``; tests import the plain functions."""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

import jmerge
from jmerge import shard, stages
from jmerge import tree as jtree
from jmerge.io import flax_io
from jmerge.io import safetensors_io as st
from jmerge.lwptv import LayerMask
from jmerge.thresholds import mesh as tmesh

BF16 = ml_dtypes.bfloat16


# ---------------------------------------------------------------------------- model shapes
def nested_shapes() -> dict:
    """Mixed shapes (0-d to 3-d) and dtypes (float32, bfloat16), nested two levels."""
    return {
        "embed": ((24, 8), np.float32),
        "block": {
            "attn": {"kernel": ((8, 16), np.float32), "bias": ((16,), np.float32)},
            "mlp": {"kernel": ((16, 8), BF16), "bias": ((8,), BF16)},
            "conv": ((3, 2, 4), np.float32),
        },
        "scale": ((), np.float32),
    }


def flat_shapes() -> dict:
    """A flat safetensors-style ``name -> (shape, dtype)`` dict."""
    return {
        "encoder.layer.0.attention.query.weight": ((8, 8), np.float32),
        "encoder.layer.0.attention.query.bias": ((8,), np.float32),
        "encoder.layer.1.output.dense.weight": ((8, 12), BF16),
        "pooler.dense.weight": ((12, 4), np.float32),
    }


# 2-D kernels of three shapes (wide, tall, square-ish), 1-D biases/scales, one 3-D tensor.
METHOD_SHAPES = {
    "block/dense/kernel": (16, 24),
    "block/dense/bias": (24,),
    "block/out/kernel": (32, 8),
    "block/out/bias": (8,),
    "head/kernel": (24, 16),
    "norm/scale": (16,),
    "conv/kernel": (4, 6, 5),
}


def bert_like_shapes(num_layers: int = 2, hidden: int = 8) -> dict:
    """Hugging Face Flax BERT paths (plus a classifier head), as nested shapes."""
    blocks = {
        str(i): {
            "attention": {"self": {"query": {"kernel": (hidden, hidden), "bias": (hidden,)}}},
            "intermediate": {"dense": {"kernel": (hidden, 2 * hidden)}},
            "output": {"dense": {"kernel": (2 * hidden, hidden)}, "LayerNorm": {"scale": (hidden,)}},
        }
        for i in range(num_layers)
    }
    return {
        "bert": {
            "embeddings": {"word_embeddings": {"embedding": (24, hidden)}, "LayerNorm": {"scale": (hidden,)}},
            "encoder": {"layer": blocks},
            "pooler": {"dense": {"kernel": (hidden, hidden)}},
        },
        "classifier": {"kernel": (hidden, 8), "bias": (8,)},
    }


def nest(flat: dict) -> dict:
    """``{"a/b": x}`` -> ``{"a": {"b": x}}``."""
    out: dict = {}
    for path, value in flat.items():
        *parents, name = path.split("/")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
        node[name] = value
    return out


# ---------------------------------------------------------------------------- model factories
def _is_shape(x) -> bool:
    return isinstance(x, tuple) and all(isinstance(d, int) for d in x)


def _is_spec(x) -> bool:
    return _is_shape(x) or (isinstance(x, tuple) and len(x) == 2 and _is_shape(x[0]))


def random_models(shapes: dict, num_experts: int, seed: int = 0, *, spread: float | tuple[float, float] = 0.1,
                  noise: str = "normal", dtype=np.float32, numpy: bool = False):
    """``(base, experts)`` shaped like ``shapes`` (a pytree whose leaves are shapes, or ``(shape, dtype)``
    pairs overriding ``dtype``): base ~ N(0, 1), expert = base + s * noise, computed in float32 and rounded
    once to the leaf's dtype (so every value is exactly representable). ``noise`` is ``"normal"`` or
    ``"student_t3"`` (heavy tails); ``spread`` is the scale s, or ``(lo, hi)`` for one uniform scale per
    expert and leaf. Leaves are jax arrays, or numpy arrays if ``numpy``."""
    rng = np.random.default_rng(seed)
    specs, treedef = jax.tree.flatten(shapes, is_leaf=_is_spec)
    specs = [(s, dtype) if _is_shape(s) else s for s in specs]
    base = [rng.standard_normal(s).astype(np.float32).astype(d) for s, d in specs]
    draw = {"normal": rng.standard_normal, "student_t3": functools.partial(rng.standard_t, 3)}[noise]
    experts = []
    for _ in range(num_experts):
        scales = rng.uniform(*spread, size=len(base)) if isinstance(spread, tuple) else [spread] * len(base)
        experts.append([(b.astype(np.float32) + np.float32(c) * draw(b.shape).astype(np.float32)).astype(b.dtype)
                        for b, c in zip(base, scales)])
    wrap = (lambda x: x) if numpy else jnp.asarray
    build = lambda leaves: jax.tree.unflatten(treedef, [wrap(x) for x in leaves])  # noqa: E731
    return build(base), [build(e) for e in experts]


def bert_like_models(num_tasks: int = 3, seed: int = 0, num_layers: int = 2):
    """:func:`bert_like_shapes` models whose heavy-tailed task vectors (Student t, 3 degrees of
    freedom) have one scale per task and leaf in [0.001, 0.05]: the LwPTV tests' layers differ."""
    return random_models(bert_like_shapes(num_layers), num_tasks, seed, spread=(0.001, 0.05), noise="student_t3")


def method_models(seed: int, num_experts: int, dtype=jnp.float32, spread: float = 0.3):
    """The method tests' models: :data:`METHOD_SHAPES` nested, experts = base + 0.3 N(0, 1), in ``dtype``."""
    return random_models(nest(METHOD_SHAPES), num_experts, seed, spread=spread, dtype=dtype)


# The sharding tests' model: sharded on its first or last axis, one tensor indivisible by 8
# (replicated), a 4-D kernel; BIG is above jmerge.thresholds.xla's sort cut-off.
SHARD_SHAPES = {"dense": {"kernel": (64, 32), "bias": (5,)}, "proj": {"kernel": (16, 128)}, "odd": (6, 10),
                "conv": (3, 3, 4, 16)}
BIG = {"big": (136, 128)}
REQUIRED = {"nearswap": {"t": 0.05}, "passthrough": {"scale": 0.5}}  # hyper-parameters without a default


def sweep_models(method: str, hparams: dict | None = None):
    """:data:`SHARD_SHAPES` models (plus :data:`BIG` for a method whose sparsifier asks thresholds)
    with two experts (SLERP takes exactly two), or three if the method needs more, or one
    (nearswap, arcee_fusion): the all-methods tests share these, and so their compilations."""
    from jmerge.methods.data_driven import MEASURED, STATISTICS

    m = jmerge.get(method)
    hp = {**REQUIRED.get(method, {}), **(hparams or {}), **({STATISTICS[method]: MEASURED} if method in STATISTICS else {})}
    for k in (2, 3, 1):
        try:
            sparsifier = m.sparsifier(m.resolve(k, hp))
        except jmerge.MergeInputError:
            continue
        shapes = {**SHARD_SHAPES, **(BIG if sparsifier is not None and sparsifier.query is not None else {})}
        return random_models(shapes, k, seed=5)
    raise AssertionError(f"{method} accepts neither 2, 3 nor 1 experts with {hp}")


class TinyNet(nnx.Module):
    """Two linear layers and a layer norm: the smallest nnx module with nested parameters."""

    def __init__(self, rngs: nnx.Rngs):
        self.dense1 = nnx.Linear(6, 5, rngs=rngs)
        self.norm = nnx.LayerNorm(5, rngs=rngs)
        self.dense2 = nnx.Linear(5, 3, rngs=rngs)


def nnx_models(num_experts: int, seed: int = 0):
    """``(base, experts)`` as ``nnx.State`` of :class:`TinyNet` (experts: base + noise)."""
    state = nnx.state(TinyNet(nnx.Rngs(seed)), nnx.Param)
    leaves, treedef = jax.tree.flatten(state)
    rng = np.random.default_rng(seed + 1)
    experts = [
        jax.tree.unflatten(treedef, [x + jnp.asarray(0.1 * rng.standard_normal(x.shape), x.dtype) for x in leaves])
        for _ in range(num_experts)
    ]
    return state, experts


# ---------------------------------------------------------------------------- numpy views
def as_np(tree) -> dict[str, np.ndarray]:
    """``{path: float64 array}`` of a pytree (bf16 upcast exactly)."""
    return {p: np.asarray(jnp.asarray(x, jnp.float32), np.float64) for p, x in jtree.flatten(tree).items()}


def np_task_vectors(base, experts):
    """``(base, [tau_t])`` as float64 ``{path: array}`` dicts."""
    b = as_np(base)
    return b, [{p: e[p] - b[p] for p in b} for e in map(as_np, experts)]


def transpose_matrices(tree):
    """Every 2-D leaf transposed (Flax (in, out) <-> torch (out, in)), other leaves unchanged."""
    return jax.tree.map(lambda x: x.T if x.ndim == 2 else x, tree)


# ---------------------------------------------------------------------------- mesh and placement
RULE = functools.partial(shard.spec_for, min_size=0)  # tiny test tensors: shard whatever divides


def mesh8():
    """The ``("data", "model") = (1, 8)`` mesh over the 8 fake CPU devices (conftest sets them up)."""
    return shard.make_mesh(model=8)


def place(tree, mesh):
    """``tree`` on ``mesh``: each leaf split over its largest dimension divisible by the model axis
    (the library's rule with no size floor), else replicated."""
    return shard.shard_params(tree, mesh, RULE)


def all_gathers(text):
    """Result types of the all-gathers in compiled HLO text (tuples when XLA combined some)."""
    return [m.group(1) for line in text.splitlines() if (m := re.search(r" = (.*?) all-gather(?:-start)?\(", line))]


def ties_with_sharded_trim(mesh):
    """TIES (global trim 0.2, sum election, disjoint mean) with the mesh backend's trim."""

    @jax.jit
    def ties(b, es):
        trimmed = tmesh.magnitude_trim(0.2, mesh, RULE)(jtree.task_vectors(b, es))
        masks = stages.agreement_masks(trimmed, stages.elect_sign(trimmed))
        return jtree.apply(b, stages.combine(trimmed, masks=masks, normalize=True))

    return ties


# ---------------------------------------------------------------------------- checkpoints
BUFFERS = {"position_ids": np.arange(4, dtype=np.int64).reshape(1, 4)}  # a non-float buffer, copied from the base


def write_checkpoint(path: Path, tensors: dict, *, config: dict | None = None, shard_size: int | None = None,
                     buffers: bool = False, files: dict[str, str] | None = None) -> Path:
    """An HF-style directory at ``path``: safetensors (sharded above ``shard_size`` bytes), with
    :data:`BUFFERS` added if ``buffers``, ``config.json`` if ``config``, and ``files`` (name -> text)."""
    path.mkdir(parents=True)
    kw = {} if shard_size is None else {"shard_size": shard_size}
    st.save_safetensors(path, {**tensors, **(BUFFERS if buffers else {})}, **kw)
    if config is not None:
        (path / "config.json").write_text(json.dumps(config, indent=1))
    for name, text in (files or {}).items():
        (path / name).write_text(text)
    return path


def write_checkpoints(root: Path, base: dict, experts: list[dict], **kw) -> list[Path]:
    """``root/base`` and ``root/e0``, ``root/e1``, ... written by :func:`write_checkpoint`."""
    return [write_checkpoint(root / name, t, **kw) for name, t in [("base", base), *((f"e{i}", e) for i, e in enumerate(experts))]]


# The streaming tests' checkpoints: four small float32 tensors, three experts (``stream_ckpts`` in conftest).
STREAM_NAMES = ["emb.weight", "l0.w", "l0.b", "l1.w"]


def stream_shape(name):
    return (8,) if name.endswith(".b") else (8, 8)


def stream_models(k=3, seed=0):
    return random_models({n: stream_shape(n) for n in STREAM_NAMES}, k, seed, numpy=True)


def streamed(paths, method, n_experts=None, **hp):
    """``{name: array}`` of ``streaming.iter_merged`` over ``paths`` = (base, *experts), the first ``n_experts``."""
    from jmerge import streaming

    base, *experts = paths
    experts = experts[:n_experts] if n_experts else experts
    return dict(streaming.iter_merged(base, experts, method, **hp))


# ---------------------------------------------------------------------------- LwPTV
def drop_mask(grouping, dropped_all=("layer.1", "head"), dropped_some=(("layer.0", 0),), num_tasks=3):
    """A ``LayerMask`` over ``grouping`` (bert preset) dropping ``dropped_all`` for every task and each
    ``(layer, task)`` of ``dropped_some``."""
    m = np.ones((num_tasks, grouping.num_layers), bool)
    for name in dropped_all:
        m[:, grouping.names.index(name)] = False
    for name, t in dropped_some:
        m[t, grouping.names.index(name)] = False
    return LayerMask(m, grouping.names, layers="bert")


# ---------------------------------------------------------------------------- tiny Hugging Face models
def tiny_transformer(kind: str, **config):
    """A tiny random transformers Flax model (``gpt2``, ``bert`` or ``llama``) built from a config
    (offline), seed 0; ``config`` overrides the config's fields."""
    import transformers

    if kind == "gpt2":
        cfg = transformers.GPT2Config(**{"n_layer": 2, "n_embd": 16, "n_head": 2, "vocab_size": 64, "n_positions": 16, **config})
        return transformers.FlaxGPT2LMHeadModel(cfg, seed=0)
    small = {"num_hidden_layers": 2, "hidden_size": 16, "intermediate_size": 32, "num_attention_heads": 2, "vocab_size": 64,
             "max_position_embeddings": 16}
    if kind == "bert":
        return transformers.FlaxBertModel(transformers.BertConfig(**{**small, **config}), seed=0)
    cfg = transformers.LlamaConfig(**{**small, "num_key_value_heads": 1, **config})
    return transformers.FlaxLlamaForCausalLM(cfg, seed=0)


def write_pt_dir(path: Path, model, params, shard_size: int | None = None) -> Path:
    """An HF directory as a PyTorch user has it: PT-layout safetensors of the Flax ``params`` + the config."""
    write_checkpoint(path, flax_io.flax_to_torch(params), shard_size=shard_size)
    model.config.save_pretrained(path)
    return path


LLAMA_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def llama_config(vocab: int, *, layers: int = 2, hidden: int = 64, ffn: int = 128, heads: int = 4, kv_heads: int = 2,
                 tied: bool = False, rope_theta: float = 10000.0) -> dict:
    """A tiny Llama's ``config.json``."""
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": vocab, "hidden_size": hidden,
            "intermediate_size": ffn, "num_hidden_layers": layers, "num_attention_heads": heads,
            "num_key_value_heads": kv_heads, "head_dim": hidden // heads, "hidden_act": "silu",
            "max_position_embeddings": 64, "rms_norm_eps": 1e-05, "rope_theta": rope_theta,
            "tie_word_embeddings": tied, "attention_bias": False, "mlp_bias": False, "bos_token_id": 1,
            "eos_token_id": 2, "pad_token_id": 2}


def byte_tokenizer():
    """Byte-level BPE: 3 special tokens, the 256 byte symbols, 8 merges."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {t: i for i, t in enumerate([*LLAMA_SPECIALS, *sorted(alphabet)])}
    merges = [("t", "h"), ("th", "e"), ("Ġ", "t"), ("i", "s"), ("a", "n"), ("Ġ", "a"), ("e", "r"), ("o", "n")]
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=None, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in LLAMA_SPECIALS])
    return tok


def llama_weights(cfg: dict, seed: int = 0, scale: float = 0.05) -> dict[str, np.ndarray]:
    """Random float32 weights of a Llama ``cfg``, under PyTorch names."""
    rng = np.random.default_rng(seed)
    d, f, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    hd = cfg["head_dim"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd

    def w(*shape):
        return (scale * rng.standard_normal(shape)).astype(np.float32)

    out = {"model.embed_tokens.weight": w(v, d)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out |= {p + "input_layernorm.weight": 1 + w(d), p + "self_attn.q_proj.weight": w(q, d),
                p + "self_attn.k_proj.weight": w(kv, d), p + "self_attn.v_proj.weight": w(kv, d),
                p + "self_attn.o_proj.weight": w(d, q), p + "post_attention_layernorm.weight": 1 + w(d),
                p + "mlp.gate_proj.weight": w(f, d), p + "mlp.up_proj.weight": w(f, d), p + "mlp.down_proj.weight": w(d, f)}
    out["model.norm.weight"] = 1 + w(d)
    if not cfg["tie_word_embeddings"]:
        out["lm_head.weight"] = w(v, d)
    return out


def write_llama_dir(path: Path, cfg: dict, tensors: dict[str, np.ndarray]) -> Path:
    """A Llama HF directory: safetensors, config.json, tokenizer.json with a chat template."""
    tokenizer_config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|im_start|>", "eos_token": "<|im_end|>",
                        "pad_token": "<|im_end|>", "unk_token": "<|endoftext|>", "add_bos_token": False,
                        "chat_template": CHAT_TEMPLATE}
    write_checkpoint(path, tensors, config=cfg, files={"tokenizer_config.json": json.dumps(tokenizer_config)})
    byte_tokenizer().save(str(path / "tokenizer.json"))
    return path


def tiny_llama(path: Path, *, seed: int = 0, **kw) -> Path:
    """A random tiny Llama HF directory at ``path``; ``kw`` go to :func:`llama_config`."""
    cfg = llama_config(byte_tokenizer().get_vocab_size(), **kw)
    return write_llama_dir(path, cfg, llama_weights(cfg, seed))


# ---------------------------------------------------------------------------- tree assertions
def assert_trees_equal(a, b):
    """Same structure, dtypes and bits (device arrays compared on the host)."""
    chex.assert_trees_all_equal(jax.tree.map(np.asarray, a), jax.tree.map(np.asarray, b))


def assert_matches(out, ref: dict[str, np.ndarray], dtype=None, *, rtol32: float = 1e-5, atol32: float = 2e-5,
                   bf16: tuple[float, float] = (2.0**-8, 1e-5)):
    """``out`` (a pytree) equals the reference ``{path: array}`` leaf by leaf: each leaf in ``dtype``
    (or the reference leaf's dtype), float32 leaves to ``(rtol32, atol32)``, bfloat16 leaves to
    ``bf16`` = (rtol, atol) (by default half a bf16 ulp: a float32 result rounded once)."""
    flat = jtree.flatten(out)
    assert set(flat) == set(ref)
    for path, x in flat.items():
        want = np.asarray(ref[path])
        assert x.dtype == (want.dtype if dtype is None else dtype), path
        got = np.asarray(jnp.asarray(x, jnp.float32), np.float64)
        rtol, atol = bf16 if x.dtype == BF16 else (rtol32, atol32)
        np.testing.assert_allclose(got, want.astype(np.float64), rtol=rtol, atol=atol, err_msg=path)


def data_statistics(method: str, base, num_experts: int, seed: int = 0) -> dict:
    """The statistics hyper-parameter of a data-driven method (``regmean``'s Grams, ``fisher``'s
    Fisher pytrees) for ``base``'s shapes, random but valid; ``{}`` for the other methods."""
    from jmerge.methods.data_driven import Grams

    rng = np.random.default_rng(seed)
    flat = jtree.flatten(base)
    if method == "regmean":
        def spd(n):
            x = rng.normal(size=(3 * n, n)).astype(np.float32)
            return x.T @ x / (3 * n)
        mats = [{p: spd(np.shape(x)[0]) for p, x in flat.items() if np.ndim(x) == 2} for _ in range(num_experts)]
        axes = tuple((p, 0) for p in mats[0])
        return {"grams": tuple(Grams(m, axes) for m in mats)}
    if method == "fisher":
        return {"fishers": tuple(jax.tree.map(lambda x: jnp.asarray(rng.random(np.shape(x)), jnp.float32), base)
                                 for _ in range(num_experts))}
    return {}


def leftovers(parent: Path, name: str) -> list[str]:
    """Temporary or backup entries an atomic write of ``parent / name`` left behind (``.name.*``)."""
    return [p.name for p in parent.iterdir() if p.name.startswith(f".{name}.")]
