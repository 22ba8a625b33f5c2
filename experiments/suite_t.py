"""Suite T: merging fully fine-tuned all-MiniLM-L6-v2 text experts (offline data).

In-domain (ID) tasks, each with an expert (encoder + own linear head on the mean-pooled
output): Rotten Tomatoes sentiment, WordNet noun and verb supersense, fortunes language ID,
fortunes topic-10. Out-of-domain (OOD): WordNet adjective type (no expert), plus the tasks
left out of a merge in :meth:`experiments.suite.Suite.rotation`. Evaluation: see
:mod:`experiments.suite`.

Suite T v2 (``--config v2``): eight ID tasks (the five above plus WordNet part of speech,
fortunes genre and the 2016 debates' party), each scored by a frozen zero-shot head from the
base encoder's class-name embeddings (:mod:`experiments.zeroshot`), shared by base, experts
and merges; the experts fine-tune the encoder only.

Run ``python -m experiments.suite_t [--config full|demo|study|v2]`` to fine-tune (or load) the
experts and print the base, expert and task-arithmetic rows.
"""

from __future__ import annotations

from dataclasses import replace

from experiments.finetune import Recipe
from experiments.suite import SuiteConfig, main

ID_TASKS = ("rotten_tomatoes", "wordnet_noun", "wordnet_verb", "fortunes_language", "fortunes_topic")
OOD_TASKS = ("wordnet_adj",)

FULL = SuiteConfig(name="T", model="minilm", tasks=ID_TASKS, ood_tasks=OOD_TASKS)
# The demo's experts: few steps, so a larger encoder learning rate makes them move away from the
# base (measured, validation: base + expert head / expert, RT 61.0 / 69.7 and WordNet verb
# 42.3 / 50.3 at lr 2e-4; at 5e-5 the five experts averaged 70.6 against 64.6 for the base).
DEMO = replace(FULL, recipe=Recipe(steps=100, batch=16, lr=2e-4, max_len=32, train_size=2000),
               validation_size=300, test_size=500, probe_train=300)
# The studies' setting: FULL's experts with smaller evaluation splits, so that the hundreds of
# merged encoders a study scores fit in a CPU session (paired comparisons on the same examples).
STUDY = replace(FULL, validation_size=200, test_size=600, probe_train=300)
# Suite T v2 (issue 13): frozen zero-shot heads shared by base, experts and merges (experiments.zeroshot),
# eight ID tasks with distinct label spaces, encoder-only fine-tuning; entry criteria in experiments.criteria.
V2_TASKS = ("rotten_tomatoes", "wordnet_noun", "wordnet_verb", "wordnet_pos", "fortunes_language", "fortunes_topic",
            "fortunes_genre", "debates_2016")
V2 = SuiteConfig(name="T2", model="minilm", tasks=V2_TASKS, ood_tasks=OOD_TASKS,
                 recipe=Recipe(steps=100, batch=16, lr=3e-4, max_len=32, train_size=4000),
                 validation_size=200, test_size=200, probe_train=300, head_scale=20.0, require_sizes=True)
# SVD merges (TSV-M, Iso-C/CTS) on MiniLM: factorise every matrix but the embedding tables, which are
# averaged: the 30522 x 384 word embedding's SVD took over 5 minutes per merge on this shared CPU
# (FusionBench also leaves embeddings out).
ISO_SVD_FILTER = r"^(?!embeddings/)"
CONFIGS = {"full": FULL, "demo": DEMO, "study": STUDY, "v2": V2}

if __name__ == "__main__":
    main(CONFIGS, __doc__.split("\n\n")[0])
