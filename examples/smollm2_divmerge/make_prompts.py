"""Writes this example's prompt files: for each of Suite L's tasks, 32 unlabelled texts of
its training split (experiments.data, offline; seeded, balanced over the classes), each a ``{"system": instruction, "text": text}``
line, so ``chat_template: true`` renders them as the experts saw them in training
(experiments.suite_l: system turn = the task's instruction, user turn = the text).

    JMERGE_DATA_DIR=~/.cache/jmerge/data .venv/bin/python examples/smollm2_divmerge/make_prompts.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository, for experiments.data

from experiments import data  # noqa: E402
from experiments.suite_l import TASKS, balanced, cut  # noqa: E402
from jmerge._util import atomic_write  # noqa: E402

PER_TASK = 32


def main() -> None:
    out = Path(__file__).parent / "prompts"
    for name, spec in TASKS.items():
        task = data.load(spec.source)
        keep = balanced(task, "train", spec.classes, PER_TASK, 0, name)
        lines = [json.dumps({"system": spec.instruction, "text": cut(task.train.inputs[i])}, ensure_ascii=False) + "\n"
                 for i in keep]
        atomic_write(out / f"{name}.jsonl", lambda tmp: Path(tmp).write_text("".join(lines), encoding="utf-8"),
                     overwrite=True)
        print(f"{name}: {len(lines)} prompts from {spec.source}'s training split")


if __name__ == "__main__":
    main()
