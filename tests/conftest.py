"""Test configuration: 8 fake CPU devices (before any JAX op), strict dtype promotion, offline
Hugging Face; the shared fixtures (the helpers they wrap are in ``helpers.py``)."""

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
# The float32-accumulate contract: library code casts explicitly (bf16 inputs are upcast to float32
# before they meet float32 values), so an implicit bf16/float32 promotion is an error in the tests.
jax.config.update("jax_numpy_dtype_promotion", "strict")

import helpers  # noqa: E402

DATA_SKIP = "(`make data` installs it)"  # the tail of every experiments.data.DataUnavailable message


def pytest_configure(config):
    config.addinivalue_line("markers", "standard_promotion(reason): run under jax_numpy_dtype_promotion='standard', "
                            "for third-party code that promotes implicitly (transformers' Flax models mix int32 and bool)")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """Setup, call and teardown of a ``standard_promotion`` test under standard promotion."""
    if item.get_closest_marker("standard_promotion") is None:
        yield
        return
    with jax.numpy_dtype_promotion("standard"):
        yield


@pytest.fixture(scope="session")
def mesh8():
    """The (1, 8) ("data", "model") mesh over the 8 fake CPU devices."""
    assert len(jax.devices()) == 8
    return helpers.mesh8()


@pytest.fixture(scope="module")
def shard_models():
    """The sharding tests' ``(base, [2 experts])`` of :data:`helpers.SHARD_SHAPES`, seed 0."""
    return helpers.random_models(helpers.SHARD_SHAPES, 2, seed=0)


@pytest.fixture(scope="module")
def shard_models_placed(shard_models, mesh8):
    """:func:`shard_models` placed on ``mesh8`` by :func:`helpers.place`."""
    base, experts = shard_models
    return helpers.place(base, mesh8), [helpers.place(e, mesh8) for e in experts]


@pytest.fixture(scope="module")
def stream_ckpts(tmp_path_factory):
    """``(root, base, experts, paths)``: :func:`helpers.stream_models` written as sharded checkpoints with buffers."""
    root = tmp_path_factory.mktemp("ckpts")
    base, experts = helpers.stream_models()
    paths = helpers.write_checkpoints(root, base, experts, shard_size=600, buffers=True)
    assert (paths[0] / helpers.st.INDEX_NAME).exists()
    return root, base, experts, paths


@pytest.fixture
def header_reads(monkeypatch):
    """The safetensors files whose header is read while the test runs, in order (one entry per read)."""
    from pathlib import Path

    from jmerge.io import safetensors_io as st

    reads, real = [], st.read_header
    monkeypatch.setattr(st, "read_header", lambda path: reads.append(Path(path)) or real(path))
    return reads


@pytest.fixture(scope="module")
def gpt2_learn_dirs(tmp_path_factory):
    """The learn CLI tests' root: tiny GPT-2 PT directories ``base``, ``moved`` (an expert that moved),
    ``same`` (equal to the base), and prompt files ``p1.jsonl``, ``p2.jsonl`` (token ids). Its tests are
    ``standard_promotion`` (transformers' Flax GPT-2), which covers this setup."""
    root = tmp_path_factory.mktemp("learn")
    model = helpers.tiny_transformer("gpt2", vocab_size=32, n_positions=24, eos_token_id=0)
    base = jax.tree.map(np.asarray, model.params)
    rng = np.random.default_rng(1)
    moved = jax.tree.map(lambda x: x + 0.5 * rng.standard_normal(x.shape).astype(np.float32), base)
    for name, params in (("base", base), ("moved", moved), ("same", base)):
        helpers.write_pt_dir(root / name, model, params)
    for name in ("p1", "p2"):
        lines = [json.dumps({"ids": rng.integers(1, 32, rng.integers(4, 8)).tolist()}) for _ in range(12)]
        (root / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture(scope="module")
def t2_encoder():
    """``(encoder, base params, prepare)``: the tiny random BERT of :data:`synthetic_suite.CFG` and its tokenizer."""
    from functools import partial

    from experiments.encoders import TextEncoder, tokenize
    from experiments.models.bert import Bert
    from synthetic_suite import CFG, tokenizer

    bert = Bert(CFG)
    return TextEncoder(bert), bert.init(jax.random.key(0)), partial(tokenize, tokenizer)


@pytest.fixture(scope="module")
def t2_suite(t2_encoder, tmp_path_factory):
    """``(suite, logs)``: Suite T2 (:data:`synthetic_suite.T2_CONFIG`) built on :func:`t2_encoder` with the synthetic
    tasks and their class descriptions, experts fine-tuned into a fresh cache. Its users are ``standard_promotion``
    (optax's adam), which covers this setup."""
    from experiments import suite, zeroshot
    from synthetic_suite import DESCRIPTIONS, NAMED, T2_CONFIG

    mp = pytest.MonkeyPatch()
    mp.setenv("JMERGE_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
    for name, d in DESCRIPTIONS.items():
        mp.setitem(zeroshot.CLASS_DESCRIPTIONS, name, d)
    encoder, base, prepare = t2_encoder
    logs = []
    s = suite.build_suite(T2_CONFIG, logs.append, encoder=encoder, base=base, prepare=prepare, loader=NAMED.__getitem__)
    yield s, logs
    mp.undo()


def pytest_terminal_summary(terminalreporter):
    """Count the tests that could not run for want of an offline data set, loudly, by reason."""
    skipped = [r for r in terminalreporter.stats.get("skipped", []) if DATA_SKIP in str(r.longrepr)]
    if skipped:
        terminalreporter.write_sep("=", f"{len(skipped)} data test(s) skipped: offline data sets missing", yellow=True)
        for r in skipped:
            terminalreporter.write_line(f"{r.nodeid}: {r.longrepr[2]}")
