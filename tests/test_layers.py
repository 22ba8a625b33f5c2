"""jmerge.layers: grouping parameters into layers by rule."""

import jax.numpy as jnp
import numpy as np
import pytest

from helpers import flat_shapes, nnx_models, random_models
from jmerge.layers import group_layers, layer_sizes


def _bert_like():
    return {
        "embeddings": {"word": jnp.zeros((10, 4)), "norm": jnp.zeros(4)},
        "layer": {
            "0": {"attn": jnp.zeros((4, 4)), "ffn": jnp.zeros((4, 8))},
            "1": {"attn": jnp.zeros((4, 4)), "ffn": jnp.zeros((4, 8))},
        },
        "pooler": jnp.zeros((4, 4)),
    }


def test_default_is_one_layer_per_tensor():
    params = _bert_like()
    for rule in (None, "tensor"):
        g = group_layers(params, rule)
        assert g.num_layers == 7 and g.names == g.leaf_paths
        assert g.leaf_layer == tuple(range(7))


def test_regex_groups_blocks_by_match_or_first_group():
    params = _bert_like()
    g = group_layers(params, r"layer/\d+", unassigned="own")
    assert g.names == ("embeddings/norm", "embeddings/word", "layer/0", "layer/1", "pooler")
    assert g.members("layer/1") == ["layer/1/attn", "layer/1/ffn"]
    g2 = group_layers(params, r"layer/(\d+)", unassigned="rest")
    assert g2.names == ("rest", "0", "1")
    assert g2.members(0) == ["embeddings/norm", "embeddings/word", "pooler"]


def test_regex_on_flat_names():
    base, _ = random_models(flat_shapes(), 1)
    g = group_layers(base, r"layer\.(\d+)", unassigned="rest")
    assert set(g.names) == {"0", "1", "rest"}
    assert g.members("0") == ["encoder.layer.0.attention.query.bias", "encoder.layer.0.attention.query.weight"]


def test_callable_rule_and_nnx_state():
    base, _ = nnx_models(1)
    g = group_layers(base, lambda p: p.split("/")[0])
    assert g.names == ("dense1", "dense2", "norm")
    assert all(len(g.members(n)) == 2 for n in g.names)


def test_unassigned_error_names_the_parameters():
    with pytest.raises(ValueError, match=r"assigns no layer to 2 parameter\(s\): embeddings/norm, embeddings/word"):
        group_layers({"embeddings": _bert_like()["embeddings"], "layer": _bert_like()["layer"]}, r"layer/\d+")


def test_bad_arguments():
    with pytest.raises(ValueError, match="unassigned must be"):
        group_layers(_bert_like(), None, unassigned="drop")
    with pytest.raises(TypeError, match="layer rule"):
        group_layers(_bert_like(), 3)
    with pytest.raises(ValueError, match="no leaves"):
        group_layers({}, None)


def test_leaf_values_expands_per_layer_values():
    g = group_layers(_bert_like(), r"layer/\d+", unassigned="rest")
    assert g.names == ("rest", "layer/0", "layer/1")
    assert g.leaf_values([10, 20, 30]) == [10, 10, 20, 20, 30, 30, 10]
    per_task_layer = jnp.arange(6.0).reshape(2, 3)  # (tasks, layers): last axis is the layer
    vals = g.leaf_values(per_task_layer)
    np.testing.assert_array_equal(np.stack(vals, -1), np.asarray(per_task_layer)[:, [0, 0, 1, 1, 2, 2, 0]])


def test_layer_sizes_counts_scalars():
    g = group_layers(_bert_like(), r"layer/\d+", unassigned="rest")
    np.testing.assert_array_equal(layer_sizes(_bert_like(), g), [40 + 4 + 16, 16 + 32, 16 + 32])


def test_layer_sizes_refuses_a_grouping_of_another_tree():
    g = group_layers(_bert_like(), r"layer/\d+", unassigned="rest")
    with pytest.raises(ValueError, match="params has 2 leaves but the grouping was made for 7"):
        layer_sizes({"a": jnp.zeros(2), "b": jnp.zeros(3)}, g)
