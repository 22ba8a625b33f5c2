"""Start-up cost of each ``ml_dtypes`` release: why pyproject.toml pins ``ml_dtypes<0.7``.

Installs each version (``pip install --no-deps --target``) into a temporary directory put
first on ``PYTHONPATH``, then times new processes of ``import numpy, ml_dtypes`` and
``import jax`` (medians, :func:`bench.mergekit_bench.startup_seconds`).

    .venv/bin/python -m bench.startup_bench          # writes bench/results/startup.md
"""

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from bench import table_report
from bench.mergekit_bench import startup_seconds

RESULTS = Path(__file__).parent / "results" / "startup.md"


def row(version: str, runs: int) -> str:
    with tempfile.TemporaryDirectory(prefix="jmerge-ml-dtypes-") as target:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", target,
                        f"ml_dtypes=={version}"], check=True)
        env = {**os.environ, "PYTHONPATH": target}
        times = [startup_seconds([sys.executable, "-c", code], runs, env) for code in ("import numpy, ml_dtypes", "import jax")]
    return f"| {version} | " + " | ".join(f"{t:.2f} s" for t in times) + " |"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--versions", nargs="+", default=["0.6.0", "0.7.0"])
    p.add_argument("--runs", type=int, default=7, help="new processes per cell; medians are reported")
    args = p.parse_args(argv)
    rows = [row(v, args.runs) for v in args.versions]
    about = (f"Wall time of new processes (median of {args.runs}), with the ml_dtypes version under test first "
             f"on `PYTHONPATH`; load average at the end {os.getloadavg()[0]:.1f}. pyproject.toml pins "
             "`ml_dtypes>=0.5,<0.7` (jax 0.10.2 and tensorstore need >=0.5.0): every `jmerge` process pays the "
             "import.")
    table_report(RESULTS, "Start-up by ml_dtypes version", "bench.startup_bench",
                 argv, about, ["ml_dtypes", '`python -c "import numpy, ml_dtypes"`', '`python -c "import jax"`'], rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
