"""jmerge's adapters against PEFT itself (tests/_peft_oracle.py in the mergekit venv, which has torch
and PEFT); skipped without that venv."""

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest

from bench.mergekit_bench import VENV
from jmerge import lora
from jmerge.io import peft
from jmerge.io import safetensors_io as st

PYTHON = VENV / "bin" / "python"
ORACLE = Path(__file__).with_name("_peft_oracle.py")
pytestmark = pytest.mark.skipif(not PYTHON.exists(), reason=f"no venv with torch and PEFT at {VENV}")


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    work = tmp_path_factory.mktemp("peft")
    subprocess.run([str(PYTHON), str(ORACLE), str(work)], check=True, capture_output=True, timeout=600)
    return work


def _adapter_dir(work, kind):
    d = work / f"combined-{kind}"
    return d / "mix" if (d / "mix").is_dir() else d


def test_combinations_match_peft(work):
    spec = json.loads((work / "done.json").read_text())
    adapters = [peft.open_adapter(work / "a0"), peft.open_adapter(work / "a1")]
    assert adapters[1].modules[next(iter(adapters[1].modules))].use_rslora
    for kind in spec["types"]:
        ours = lora.combine_adapters(adapters, spec["weights"], kind, density=0.5, svd_rank=6)
        theirs = peft.open_adapter(_adapter_dir(work, kind))
        for module in adapters[0].modules:
            a, b = ours.factors[module]
            np.testing.assert_allclose(b @ a, theirs.product(module), rtol=1e-4, atol=1e-5, err_msg=f"{kind} {module}")


def test_apply_matches_merge_and_unload(work):
    base = st.load(work / "base")
    ours = lora.apply_adapter(base, peft.open_adapter(work / "a0"))
    theirs = st.load(work / "merged-a0")
    for name, x in theirs.items():
        np.testing.assert_allclose(ours[name], x, rtol=1e-5, atol=1e-6, err_msg=name)


def test_peft_loads_an_extracted_adapter(work):
    base, ft = st.load(work / "base"), st.load(work / "merged-a0")
    ex = lora.extract_lora(base, ft, rank=4)
    peft.save_adapter(work / "jmerge-adapter", ex.factors)
    subprocess.run([str(PYTHON), str(ORACLE), str(work), "load"], check=True, capture_output=True, timeout=600)
    merged = st.load(work / "merged-jmerge")
    for name, x in merged.items():
        np.testing.assert_allclose(x, ft[name], rtol=1e-4, atol=1e-5, err_msg=name)
