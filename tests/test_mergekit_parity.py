"""jmerge and mergekit 0.1.5 on the same tiny float32 configs (bench/mergekit_methods.py), for
the deterministic methods jmerge added for mergekit; skipped without mergekit's venv."""

import pytest

from bench import mergekit_bench, mergekit_methods

MERGEKIT_YAML = mergekit_bench.VENV / "bin" / "mergekit-yaml"
DETERMINISTIC = ["sce", "nearswap", "karcher", "nuslerp (no base)", "nuslerp (base, row-wise)", "ram", "ramplus_tl",
                 "multislerp (no base)", "linear normalize: false", "ties rescale: true", "slerp with per-model weight"]


@pytest.mark.skipif(not MERGEKIT_YAML.exists(), reason=f"no mergekit venv at {mergekit_bench.VENV} "
                    "(created by `python -m bench.mergekit_bench`)")
def test_new_methods_give_mergekits_tensors():
    cases = [c for c in mergekit_methods.CASES if c[0] in DETERMINISTIC]
    assert len(cases) == len(DETERMINISTIC)
    for name, cmp, outcome, _ in mergekit_methods.run_cases(MERGEKIT_YAML, cases):
        assert cmp is not None, (name, outcome)
        assert cmp["max"] < 1e-6 and not cmp["only"], (name, outcome)
