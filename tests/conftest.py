"""Test configuration: 8 fake CPU devices (before any JAX op), offline Hugging Face."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)


DATA_SKIP = "(`make data` installs it)"  # the tail of every experiments.data.DataUnavailable message


def pytest_terminal_summary(terminalreporter):
    """Count the tests that could not run for want of an offline data set, loudly, by reason."""
    skipped = [r for r in terminalreporter.stats.get("skipped", []) if DATA_SKIP in str(r.longrepr)]
    if skipped:
        terminalreporter.write_sep("=", f"{len(skipped)} data test(s) skipped: offline data sets missing", yellow=True)
        for r in skipped:
            terminalreporter.write_line(f"{r.nodeid}: {r.longrepr[2]}")
