"""Test configuration: 8 fake CPU devices (before any JAX op), strict dtype promotion, offline
Hugging Face; the shared fixtures (the helpers they wrap are in ``helpers.py``)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import jax  # noqa: E402
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


def pytest_terminal_summary(terminalreporter):
    """Count the tests that could not run for want of an offline data set, loudly, by reason."""
    skipped = [r for r in terminalreporter.stats.get("skipped", []) if DATA_SKIP in str(r.longrepr)]
    if skipped:
        terminalreporter.write_sep("=", f"{len(skipped)} data test(s) skipped: offline data sets missing", yellow=True)
        for r in skipped:
            terminalreporter.write_line(f"{r.nodeid}: {r.longrepr[2]}")
