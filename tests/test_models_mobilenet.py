"""experiments.models.mobilenet: torchvision MobileNetV2 in JAX (real weights when installed), its preset."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jmerge import lwptv
from jmerge import tree as jtree
from experiments.models.mobilenet import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    SETTINGS,
    MobileNetV2,
    from_torchvision_state_dict,
    load_mobilenet_v2,
    mobilenet_v2_path,
    preprocess,
)


def _weights_path():
    try:
        return mobilenet_v2_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def torchvision_state():
    from experiments.pth import load_pth

    return load_pth(_weights_path())


def _synthetic_state(seed=0):
    """A torchvision ``mobilenet_v2().state_dict()`` look-alike, written out from the table."""
    rng = np.random.default_rng(seed)
    sd = {}

    def conv(name, o, i, k):
        sd[name] = rng.normal(size=(o, i, k, k)).astype(np.float32)

    def bn(prefix, c):
        sd.update({f"{prefix}.weight": rng.normal(size=c), f"{prefix}.bias": rng.normal(size=c),
                   f"{prefix}.running_mean": rng.normal(size=c), f"{prefix}.running_var": rng.uniform(0.5, 2, c),
                   f"{prefix}.num_batches_tracked": np.array(0)})

    conv("features.0.0.weight", 32, 3, 3), bn("features.0.1", 32)
    cin, f = 32, 1
    for t, c, n, _ in SETTINGS:
        for _ in range(n):
            pre, hid, j = f"features.{f}.conv", cin * t, int(t != 1)
            if t != 1:
                conv(f"{pre}.0.0.weight", hid, cin, 1), bn(f"{pre}.0.1", hid)
            conv(f"{pre}.{j}.0.weight", hid, 1, 3), bn(f"{pre}.{j}.1", hid)
            conv(f"{pre}.{j + 1}.weight", c, hid, 1), bn(f"{pre}.{j + 2}", c)
            cin, f = c, f + 1
    conv("features.18.0.weight", 1280, 320, 1), bn("features.18.1", 1280)
    sd["classifier.1.weight"], sd["classifier.1.bias"] = rng.normal(size=(1000, 1280)), rng.normal(size=1000)
    return sd


# ---------------------------------------------------------------- real weights
def test_real_checkpoint_counts(torchvision_state):
    sd = torchvision_state
    assert len(sd) == 314
    assert sum(v.size for v in sd.values() if v.dtype == np.float32) == 3_538_984
    synthetic = _synthetic_state()
    assert {k: v.shape for k, v in sd.items()} == {k: np.shape(v) for k, v in synthetic.items()}
    model, params = from_torchvision_state_dict(sd)
    sizes = {p: x.size for p, x in jtree.flatten(params).items()}
    assert sum(sizes.values()) == 3_504_872
    assert sum(sizes.values()) + sum(x.size for x in jax.tree.leaves(model.stats)) == 3_538_984
    assert len(jtree.paths(params["blocks"])) == 17 * 3 * 2 + 16 * 3  # depthwise + project everywhere, expand in 1..16


def test_china_is_a_palace():
    """torchvision's IMAGENET1K_V1 MobileNetV2 on sklearn's china.jpg, centre-cropped to a square:
    class 698 (palace), p = 0.57."""
    from sklearn.datasets import load_sample_image

    _weights_path()
    model, params = load_mobilenet_v2()
    img = load_sample_image("china.jpg")
    h, w, _ = img.shape
    img = img[:, (w - h) // 2 : (w - h) // 2 + h]
    probs = np.asarray(jax.nn.softmax(jax.jit(model.logits)(params, preprocess(img[None], size=224))))[0]
    assert probs.argmax() == 698 and probs[698] > 0.4


# ---------------------------------------------------------------- mapping, gradients
def test_state_dict_mapping_layouts():
    sd = _synthetic_state()
    model, params = from_torchvision_state_dict(sd)
    np.testing.assert_array_equal(params["stem"]["conv"]["kernel"][1, 2, 0, 5], sd["features.0.0.weight"][5, 0, 1, 2])
    dw = params["blocks"]["3"]["depthwise"]["conv"]["kernel"]
    assert dw.shape == (3, 3, 1, 144)
    np.testing.assert_array_equal(dw[0, 2, 0, 7], sd["features.4.conv.1.0.weight"][7, 0, 0, 2])
    assert "expand" not in params["blocks"]["0"]
    np.testing.assert_array_equal(params["blocks"]["0"]["project"]["norm"]["scale"], np.float32(sd["features.1.conv.2.weight"]))
    np.testing.assert_array_equal(model.stats["blocks"]["16"]["project"]["norm"]["var"], np.float32(sd["features.17.conv.3.running_var"]))
    np.testing.assert_array_equal(params["classifier"]["kernel"], np.float32(sd["classifier.1.weight"].T))
    assert params["head_conv"]["conv"]["kernel"].shape == (1, 1, 320, 1280)
    assert jax.tree.structure(params) == jax.tree.structure(jax.eval_shape(MobileNetV2().init, jax.random.key(0)))


def test_state_dict_errors_name_the_tensor():
    sd = _synthetic_state()
    del sd["features.5.conv.1.1.running_var"]
    with pytest.raises(ValueError, match=r"no tensor 'features\.5\.conv\.1\.1\.running_var'"):
        from_torchvision_state_dict(sd)
    sd = _synthetic_state()
    sd["features.18.0.weight"] = np.zeros((1280, 320, 3, 3), np.float32)
    with pytest.raises(ValueError, match=r"'features\.18\.0\.weight' has shape \(1280, 320, 3, 3\)"):
        from_torchvision_state_dict(sd)
    sd = _synthetic_state()
    sd["features.19.0.weight"] = np.zeros(3)
    with pytest.raises(ValueError, match=r"does not use: \['features\.19\.0\.weight'\]"):
        from_torchvision_state_dict(sd)


def test_gradients_reach_every_param_and_stats_stay_out():
    model = MobileNetV2()  # identity statistics keep random-weight activations finite
    params = model.init(jax.random.key(0))
    stats_before = jax.tree.map(np.asarray, model.stats)
    assert not any(p.endswith(("/mean", "/var")) for p in jtree.paths(params))
    assert {p.rsplit("/", 1)[0] for p in jtree.paths(model.stats)} <= {p.rsplit("/", 1)[0] for p in jtree.paths(params)}
    x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))

    def loss(params):
        return -jax.nn.log_softmax(model.logits(params, x))[:, :10].mean()

    value, grads = jax.jit(jax.value_and_grad(loss))(params)
    assert np.isfinite(value)
    assert jax.tree.structure(grads) == jax.tree.structure(params)
    norms = {p: float(jnp.abs(g).max()) for p, g in jtree.flatten(grads).items()}
    assert all(np.isfinite(v) for v in norms.values())
    assert all(norms[f"blocks/{i}/project/conv/kernel"] > 0 for i in range(17))
    assert norms["stem/conv/kernel"] > 0 and norms["head_conv/norm/scale"] > 0
    jax.tree.map(np.testing.assert_array_equal, model.stats, stats_before)
    assert jax.eval_shape(model.encode, params, x).shape == (2, 1280)


# ---------------------------------------------------------------- preprocessing, preset
def test_preprocess_gray_and_rgb():
    mean, std = np.array(IMAGENET_MEAN, np.float32), np.array(IMAGENET_STD, np.float32)
    gray = np.full((2, 8, 8), 255, np.uint8)
    x = preprocess(gray)
    assert x.shape == (2, 32, 32, 3) and x.dtype == jnp.float32
    np.testing.assert_allclose(x, np.broadcast_to((1 - mean) / std, x.shape), rtol=1e-5)
    digits = np.full((1, 8, 8), 8.0)
    np.testing.assert_allclose(preprocess(digits, size=16, max_value=16)[0, 3, 3], (0.5 - mean) / std, rtol=1e-5)
    rgb = np.zeros((3, 10, 12, 3), np.float32)
    rgb[..., 1] = 1.0  # floats in [0, 1]
    x = preprocess(rgb, size=24)
    assert x.shape == (3, 24, 24, 3)
    np.testing.assert_allclose(x[1, 5, 7], (np.array([0, 1, 0]) - mean) / std, rtol=1e-5)
    with pytest.raises(ValueError, match=r"\[N, H, W, 3\]"):
        preprocess(np.zeros((2, 8, 8, 4)))


def test_jmerge_mobilenet_preset_orders_the_layers():
    params = jax.eval_shape(MobileNetV2().init, jax.random.key(0))
    g = lwptv.group(params, "jmerge_mobilenet")
    assert g.names == ("stem", *[f"block.{i}" for i in range(17)], "head_conv", "head")
    assert g.members("block.0") == [p for p in jtree.paths(params) if p.startswith("blocks/0/")]
    assert len(g.members("block.3")) == 9 and len(g.members("head")) == 2
