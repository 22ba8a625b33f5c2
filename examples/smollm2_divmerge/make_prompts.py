"""Writes this example's prompt files: for each of Suite L's four tasks, 32 unlabelled texts of
its training split (experiments.data, offline; seeded, balanced over the classes), each a ``{"system": instruction, "text": text}``
line, so ``chat_template: true`` renders them as the experts saw them in training
(experiments.suite_l: system turn = the task's instruction, user turn = the text).

    JMERGE_DATA_DIR=~/.cache/jmerge/data .venv/bin/python examples/smollm2_divmerge/make_prompts.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository, for experiments.data

from experiments import data  # noqa: E402
from jmerge._util import atomic_write  # noqa: E402

PER_TASK, MAX_BYTES = 32, 96  # byte-level BPE: at most 96 tokens of text, whatever the script
TASKS = {  # name: (experiments.data task, classes kept, instruction), as experiments.suite_l.TASKS
    "sentiment": ("rotten_tomatoes", None, "Is this movie review positive or negative?"),
    "language": ("fortunes_language", ("en", "de", "es", "it", "ru"), "Which language is this: English, German, Spanish, Italian or Russian?"),
    "pos": ("wordnet_pos", None, "This dictionary gloss defines a word. Is the word a noun, verb or adv?"),
    "topic": ("fortunes_topic", ("computers", "science", "food", "medicine", "law", "love", "kids"),
              "Topic: computers, science, food, medicine, law, love or kids?"),
}


def cut(text: str) -> str:
    """Whitespace collapsed, at most MAX_BYTES bytes of UTF-8, cut at a word boundary."""
    text = " ".join(str(text).split())
    if len(text.encode()) <= MAX_BYTES:
        return text
    return text.encode()[:MAX_BYTES].decode(errors="ignore").rsplit(" ", 1)[0]


def main() -> None:
    out = Path(__file__).parent / "prompts"
    for name, (source, classes, instruction) in TASKS.items():
        task = data.load(source)
        split = task.train
        order = np.random.default_rng(0).permutation(len(split))
        by_class = [[i for i in order if task.classes[split.labels[i]] == c] for c in classes or task.classes]
        keep = [i for group in zip(*by_class) for i in group][:PER_TASK]  # round robin over the classes
        lines = [json.dumps({"system": instruction, "text": cut(split.inputs[i])}, ensure_ascii=False) + "\n"
                 for i in keep]
        atomic_write(out / f"{name}.jsonl", lambda tmp: Path(tmp).write_text("".join(lines), encoding="utf-8"),
                     overwrite=True)
        print(f"{name}: {len(lines)} prompts from {source}'s training split")


if __name__ == "__main__":
    main()
