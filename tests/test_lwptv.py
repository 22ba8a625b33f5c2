"""LwPTV: layer presets, saliency scores (against plain numpy), mask rules, the merge stage, plots."""

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jmerge
from helpers import assert_trees_equal, bert_like_models, drop_mask, place
from jmerge import lwptv
from jmerge import tree as jtree
from jmerge._util import OutputError
from jmerge.lwptv import LayerMask, LwPTV
from jmerge.validate import MergeInputError

K = 3  # tasks


# ---------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def models():
    return bert_like_models(K)


@pytest.fixture(scope="module")
def grouping(models):
    return lwptv.group(models[0], "bert")


# ---------------------------------------------------------------------------- presets
def _assign(paths, preset, **kw):
    g = lwptv.group({p: np.zeros(1, np.float32) for p in paths}, preset, **kw)
    return g, {p: g.names[l] for p, l in zip(g.leaf_paths, g.leaf_layer)}


def test_bert_preset_nested(models):
    g = lwptv.group(models[0], "bert")
    assert g.names == ("embeddings", "layer.0", "layer.1", "pooler", "head")
    assert set(g.members("layer.1")) == {p for p in jtree.paths(models[0]) if "/layer/1/" in p}
    assert g.members("head") == ["classifier/bias", "classifier/kernel"]
    assert sorted(g.members("embeddings")) == sorted(p for p in jtree.paths(models[0]) if "embeddings" in p)


MINILM_FLAT = [  # the key layout of all-MiniLM-L6-v2's model.safetensors (torch style)
    "embeddings.LayerNorm.bias", "embeddings.LayerNorm.weight", "embeddings.position_embeddings.weight",
    "embeddings.position_ids", "embeddings.token_type_embeddings.weight", "embeddings.word_embeddings.weight",
    *[f"encoder.layer.{i}.{s}" for i in range(12) for s in (
        "attention.self.query.weight", "attention.self.query.bias", "attention.output.dense.weight",
        "attention.output.LayerNorm.weight", "intermediate.dense.weight", "output.dense.bias", "output.LayerNorm.bias")],
    "pooler.dense.bias", "pooler.dense.weight",
]


def test_bert_preset_flat_torch_names_and_natural_order():
    g, names = _assign(MINILM_FLAT, "bert")
    assert g.names == ("embeddings", *[f"layer.{i}" for i in range(12)], "pooler")
    assert names["encoder.layer.10.output.dense.bias"] == "layer.10"
    assert names["encoder.layer.1.output.dense.bias"] == "layer.1"
    assert names["embeddings.position_ids"] == "embeddings"
    _, named = _assign(["bert." + p for p in MINILM_FLAT] + ["classifier.weight", "cls.predictions.bias"], "bert")
    assert named["bert.encoder.layer.3.attention.self.query.weight"] == "layer.3"
    assert named["classifier.weight"] == named["cls.predictions.bias"] == "head"


def test_gpt2_llama_presets_nested_and_flat():
    gpt2 = ["transformer/wte/embedding", "transformer/wpe/embedding", "transformer/ln_f/scale",
            *[f"transformer/h/{i}/{s}" for i in range(11) for s in ("attn/c_attn/kernel", "ln_1/scale", "mlp/c_proj/bias")]]
    g, names = _assign(gpt2, "gpt2")
    assert g.names == ("embeddings", *[f"layer.{i}" for i in range(11)], "final_norm")
    g, names = _assign(["wte.weight", "wpe.weight", "h.0.attn.bias", "h.0.mlp.c_fc.weight", "h.1.ln_2.weight",
                        "ln_f.weight", "lm_head.weight"], "gpt2")
    assert g.names == ("embeddings", "layer.0", "layer.1", "final_norm", "head")
    llama = ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight",
             *[f"model.layers.{i}.{s}" for i in range(2) for s in ("self_attn.q_proj.weight", "input_layernorm.weight",
                                                                   "post_attention_layernorm.weight", "mlp.down_proj.weight")]]
    g, names = _assign(llama, "llama")
    assert g.names == ("embeddings", "layer.0", "layer.1", "final_norm", "head")
    assert names["model.layers.1.input_layernorm.weight"] == "layer.1"
    g, _ = _assign([p.replace(".", "/").replace("/weight", "/kernel") for p in llama], "llama")
    assert g.names == ("embeddings", "layer.0", "layer.1", "final_norm", "head")


def test_vit_clip_presets():
    vit = ["vit/embeddings/cls_token", "vit/embeddings/patch_embeddings/projection/kernel", "vit/layernorm/scale",
           "vit/encoder/layer/0/layernorm_before/scale", "vit/encoder/layer/1/attention/attention/query/kernel",
           "classifier/kernel"]
    g, _ = _assign(vit, "vit")
    assert g.names == ("embeddings", "layer.0", "layer.1", "final_norm", "head")
    clip = ["logit_scale", "text_projection.weight", "visual_projection.weight",
            "text_model.embeddings.token_embedding.weight", "text_model.final_layer_norm.weight",
            "vision_model.embeddings.class_embedding", "vision_model.pre_layrnorm.weight",
            "vision_model.post_layernorm.bias",
            *[f"{t}.encoder.layers.{i}.self_attn.q_proj.weight" for t in ("text_model", "vision_model") for i in range(2)]]
    g, names = _assign(clip, "clip")
    assert g.names == (
        "text_model.embeddings", "text_model.layer.0", "text_model.layer.1", "text_model.final_norm",
        "text_model.projection", "vision_model.embeddings", "vision_model.pre_norm", "vision_model.layer.0",
        "vision_model.layer.1", "vision_model.final_norm", "vision_model.projection", "logit_scale")
    # the vision tower alone, as fine-tuned CLIP ViT checkpoints are stored
    g, _ = _assign([p for p in clip if p.startswith("vision_model")], "vit")
    assert g.names == ("vision_model.embeddings", "vision_model.pre_norm", "vision_model.layer.0",
                       "vision_model.layer.1", "vision_model.final_norm")


def test_jmerge_bert_preset_on_the_jmerge_model():
    from experiments.models.bert import Bert, BertConfig

    bert = Bert(BertConfig(vocab_size=16, hidden_size=8, num_layers=3, num_heads=2, intermediate_size=16, max_position=8))
    params = jax.eval_shape(bert.init, jax.random.key(0))
    g = lwptv.group(params, "jmerge_bert")
    assert g.names == ("embeddings", "layer.0", "layer.1", "layer.2")
    assert len(g.members("layer.2")) == len([p for p in jtree.paths(params) if p.startswith("layers/2/")]) > 0
    g = lwptv.group({"encoder": params, "head": {"kernel": jnp.zeros((8, 2))}}, "jmerge_bert")
    assert g.names == ("embeddings", "layer.0", "layer.1", "layer.2", "head")


def test_jmerge_bert_tensor_regex_and_callable_rules():
    paths = ["embeddings/word/embedding", "layers/0/attn/kernel", "layers/10/attn/kernel", "layers/2/mlp/kernel",
             "pooler/kernel", "head/kernel"]
    g, _ = _assign(paths, "jmerge_bert")
    assert g.names == ("embeddings", "layer.0", "layer.2", "layer.10", "pooler", "head")
    g, _ = _assign(paths, "tensor")
    assert g.num_layers == len(paths) and set(g.names) == set(paths)
    g, _ = _assign(paths, r"layers/\d+", unassigned="rest")
    assert g.names == ("layers/0", "layers/2", "layers/10", "rest")
    g, _ = _assign(paths, re.compile(r"^(\w+)/"))
    assert g.names == ("embeddings", "head", "layers", "pooler")
    g, _ = _assign(paths, lambda p: "top" if p.startswith("layers/1") else "other")
    assert g.names == ("other", "top") and g.members("top") == ["layers/10/attn/kernel"]


def test_layer_rule_errors_name_the_parameter():
    params = {p: np.zeros(1) for p in ["encoder.layer.0.w", "encoder.layer.1.w", "mystery.w"]}
    with pytest.raises(MergeInputError, match=r"assigns no layer to parameter 'mystery\.w'"):
        lwptv.group(params, "bert")
    with pytest.raises(MergeInputError, match="matches none of the 3 parameters"):
        lwptv.group(params, r"decoder\.block")
    with pytest.raises(MergeInputError, match="did you mean 'bert'"):
        lwptv.group(params, "brt")
    with pytest.raises(MergeInputError, match="invalid"):
        lwptv.group(params, "layer(")
    assert lwptv.group(params, "bert", unassigned="own").names == ("layer.0", "layer.1", "mystery.w")


def _check_hf(model_cls, config, preset, expected_layers):
    params = model_cls(config, _do_init=False).params_shape_tree  # shapes only, no random init
    g = lwptv.group(params, preset)  # raises if any parameter is unassigned
    assert len(g.leaf_paths) == len(jtree.paths(params)) > 0
    assert g.num_layers == expected_layers, g.names
    return g


@pytest.mark.standard_promotion("transformers' Flax models mix int32 and bool")
def test_presets_on_real_transformers_models():
    tf = pytest.importorskip("transformers")
    bert_cfg = tf.BertConfig(vocab_size=40, hidden_size=8, num_hidden_layers=3, num_attention_heads=2,
                             intermediate_size=16, max_position_embeddings=16)
    g = _check_hf(tf.FlaxBertModel, bert_cfg, "bert", 3 + 2)  # + embeddings, pooler
    assert g.names == ("embeddings", "layer.0", "layer.1", "layer.2", "pooler")
    _check_hf(tf.FlaxBertForSequenceClassification, bert_cfg, "bert", 3 + 3)  # + embeddings, pooler, head
    gpt_cfg = tf.GPT2Config(vocab_size=40, n_embd=8, n_layer=2, n_head=2, n_positions=16)
    g = _check_hf(tf.FlaxGPT2Model, gpt_cfg, "gpt2", 2 + 2)  # + embeddings, ln_f
    assert g.names == ("embeddings", "layer.0", "layer.1", "final_norm")
    llama_cfg = tf.LlamaConfig(vocab_size=40, hidden_size=8, num_hidden_layers=2, num_attention_heads=2,
                               num_key_value_heads=2, intermediate_size=16)
    _check_hf(tf.FlaxLlamaForCausalLM, llama_cfg, "llama", 2 + 3)  # + embeddings, norm, lm_head
    vit_cfg = tf.ViTConfig(hidden_size=8, num_hidden_layers=2, num_attention_heads=2, intermediate_size=16,
                           image_size=8, patch_size=4, num_labels=3)
    _check_hf(tf.FlaxViTForImageClassification, vit_cfg, "vit", 2 + 3)  # + embeddings, layernorm, classifier
    clip_cfg = tf.CLIPConfig(
        text_config=dict(vocab_size=40, hidden_size=8, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=16, max_position_embeddings=16),
        vision_config=dict(hidden_size=8, num_hidden_layers=3, num_attention_heads=2, intermediate_size=16,
                           image_size=8, patch_size=4), projection_dim=8)
    # text: emb, 2 blocks, final norm, projection; vision: emb, pre-norm, 3 blocks, post-norm, projection; logit_scale
    _check_hf(tf.FlaxCLIPModel, clip_cfg, "clip", (1 + 2 + 2) + (2 + 3 + 2) + 1)


# ---------------------------------------------------------------------------- scores: numpy references
def _np_layers(tv, grouping):
    """Per layer, the concatenated flat float64 entries of ``tv``."""
    flat = [np.asarray(x, np.float64).ravel() for x in jtree.flatten(tv).values()]
    return [np.concatenate([flat[i] for i, l in enumerate(grouping.leaf_layer) if l == layer])
            for layer in range(grouping.num_layers)]


def _ref(name, tvs, base, g, **kw):
    per = [_np_layers(tv, g) for tv in tvs]
    out = np.zeros((len(tvs), g.num_layers))
    div = lambda a, b: a / b if b > 0 else 0.0
    if name == "trim_survival":
        density, measure = kw.get("density", 0.2), kw.get("measure", "energy")
        for t, layers in enumerate(per):
            allv = np.abs(np.concatenate(layers))
            thr = np.sort(allv)[::-1][int(density * allv.size) - 1]
            for l, x in enumerate(layers):
                keep = np.abs(x) >= thr
                out[t, l] = div((x[keep] ** 2).sum(), (x ** 2).sum()) if measure == "energy" else (keep & (x != 0)).sum() / x.size
    elif name == "relative_update":
        b = _np_layers(base, g)
        out = np.array([[np.linalg.norm(x) / np.linalg.norm(bl) for x, bl in zip(layers, b)] for layers in per])
    elif name == "cross_task_agreement":
        total = [sum(per[t][l] for t in range(len(tvs))) for l in range(g.num_layers)]
        for t, layers in enumerate(per):
            for l, x in enumerate(layers):
                o = total[l] - x
                out[t, l] = div(x @ o, np.linalg.norm(x) * np.linalg.norm(o))
    elif name == "sign_agreement":
        weighting = kw.get("weighting", "magnitude")
        sgn = (lambda v: v) if kw.get("sign", "sum") == "sum" else np.sign
        gamma = [np.where(sum(sgn(per[t][l]) for t in range(len(tvs))) >= 0, 1.0, -1.0) for l in range(g.num_layers)]
        for t, layers in enumerate(per):
            for l, x in enumerate(layers):
                agree = np.sign(x) == gamma[l]
                out[t, l] = div((np.abs(x) * agree).sum(), np.abs(x).sum()) if weighting == "magnitude" else div(agree.sum(), (x != 0).sum())
    elif name == "energy_concentration":
        top = kw.get("top", 0.05)
        for t, layers in enumerate(per):
            for l, x in enumerate(layers):
                k = max(1, int(top * x.size))
                thr = np.sort(np.abs(x))[::-1][k - 1]
                out[t, l] = div((x[np.abs(x) >= thr] ** 2).sum(), (x ** 2).sum())
    return out


SCORE_CASES = [
    ("trim_survival", {}),
    ("trim_survival", {"density": 0.05, "measure": "count"}),
    ("relative_update", {}),
    ("cross_task_agreement", {}),
    ("sign_agreement", {}),
    ("sign_agreement", {"sign": "count", "weighting": "count"}),
    ("energy_concentration", {}),
    ("energy_concentration", {"top": 0.3}),
]


@pytest.mark.parametrize("name,kw", SCORE_CASES)
def test_scores_match_numpy_reference(models, grouping, name, kw):
    base, experts = models
    tvs = jmerge.task_vectors(base, experts)
    got = np.asarray(lwptv.compute_scores(tvs, base, grouping, name, **kw))
    assert got.shape == (K, grouping.num_layers) and got.dtype == np.float32
    np.testing.assert_allclose(got, _ref(name, tvs, base, grouping, **kw), rtol=2e-5, atol=1e-6)
    assert len(np.unique(np.round(got, 6))) > 1  # informative on this data


@pytest.mark.parametrize("name", list(lwptv.SCORES))
def test_scores_invariant_to_task_order_and_sharding(models, grouping, mesh8, name):
    base, experts = models
    perm = [2, 0, 1]
    s = np.asarray(lwptv.compute_scores(jmerge.task_vectors(base, experts), base, grouping, name))
    sp = np.asarray(lwptv.compute_scores(jmerge.task_vectors(base, [experts[i] for i in perm]), base, grouping, name))
    np.testing.assert_allclose(sp, s[perm], rtol=1e-6, atol=1e-7)
    b_s, e_s = place(base, mesh8), place(experts, mesh8)
    sharded = lwptv.scores.compute_from_experts(b_s, e_s, grouping, name)
    np.testing.assert_allclose(np.asarray(sharded), s, rtol=1e-6, atol=1e-7)


def test_score_edge_cases(models, grouping):
    base, experts = models
    tvs = jmerge.task_vectors(base, [experts[0], base, experts[2]])  # a zero task vector scores 0 everywhere
    for name in lwptv.SCORES:
        s = np.asarray(lwptv.compute_scores(tvs, base, grouping, name))
        assert np.all(np.isfinite(s)) and np.all(s[1] == 0), name
    one = np.asarray(lwptv.compute_scores(tvs[:1], base, grouping, "cross_task_agreement"))
    assert np.all(one == 0)  # no other task to agree with


def test_score_bad_input(models, grouping):
    base, experts = models
    tvs = jmerge.task_vectors(base, experts)
    with pytest.raises(MergeInputError, match="did you mean 'trim_survival'"):
        lwptv.compute_scores(tvs, base, grouping, "trim_survivl")
    with pytest.raises(MergeInputError, match="did you mean 'density'"):
        lwptv.compute_scores(tvs, base, grouping, "trim_survival", densty=0.1)
    with pytest.raises(MergeInputError, match="density"):
        lwptv.compute_scores(tvs, base, grouping, "trim_survival", density=1.5)
    with pytest.raises(MergeInputError, match="measure"):
        lwptv.compute_scores(tvs, base, grouping, "trim_survival", measure="mass")
    with pytest.raises(MergeInputError, match="grouping was built for other parameters"):
        lwptv.compute_scores(tvs, base, lwptv.group({"x": jnp.zeros(2)}, "tensor"), "relative_update")
    with pytest.raises(MergeInputError, match="non-empty"):
        lwptv.compute_scores([], base, grouping)


def test_custom_score_callable(models, grouping):
    base, experts = models

    def mean_abs(tvs, base, grouping):  # built from the public helpers
        num = lwptv.layer_sum(lwptv.task_leaf_sums(lambda x: jnp.sum(jnp.abs(x)), tvs), grouping)
        return num / jnp.asarray(jmerge.layers.layer_sizes(base, grouping), jnp.float32)[None]

    scores, mask = lwptv.inspect(base, experts, layers="bert", score=mean_abs, rule="top_k", value=1)
    tvs = jmerge.task_vectors(base, experts)
    ref = np.array([[np.abs(x).mean() for x in _np_layers(tv, grouping)] for tv in tvs])
    np.testing.assert_allclose(scores, ref, rtol=1e-5)
    assert mask.mask.sum(axis=1).tolist() == [1] * K
    with pytest.raises(MergeInputError, match=r"returned shape \(5,\), expected"):
        lwptv.compute_scores(tvs, base, grouping, lambda tvs, base, grouping: jnp.zeros(5))


# ---------------------------------------------------------------------------- masks
def test_mask_rules_semantics():
    s = np.array([[0.5, 0.1, 0.9, 0.3, 0.3], [1.0, 2.0, 3.0, 4.0, 5.0]])
    keep = lwptv.keep_ratio(s, 0.6)  # floor(0.6 * 5 + 0.5) = 3 per task
    assert keep.dtype == bool and keep.shape == s.shape
    np.testing.assert_array_equal(keep, [[1, 0, 1, 1, 0], [0, 0, 1, 1, 1]])  # tie 0.3/0.3 -> lower index
    assert lwptv.keep_ratio(s, 1.0).all() and not lwptv.keep_ratio(s, 0.0).any()
    np.testing.assert_array_equal(lwptv.top_k(s, 1), [[0, 0, 1, 0, 0], [0, 0, 0, 0, 1]])
    np.testing.assert_array_equal(lwptv.threshold(s, 0.5), [[1, 0, 1, 0, 0], [1, 1, 1, 1, 1]])
    # per-task normalisation lets one tau serve tasks on different scales
    np.testing.assert_array_equal(lwptv.threshold(s, 0.5, normalize_by="max"), [[1, 0, 1, 0, 0], [0, 0, 1, 1, 1]])
    mm = lwptv.normalize(s, "minmax")
    np.testing.assert_allclose(mm[1], [0, 0.25, 0.5, 0.75, 1])
    assert lwptv.threshold(np.array([[np.nan, 1.0]]), 0.0).tolist() == [[False, True]]
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(MergeInputError, match="keep ratio"):
            lwptv.keep_ratio(s, bad)
    with pytest.raises(MergeInputError, match=r"\[0, 5\]"):
        lwptv.top_k(s, 6)


def test_layer_mask_table_json_and_validation(tmp_path):
    m = LayerMask([[True, False, True], [False, False, True]], ("emb", "layer.0", "head"), ("sst2", "mnli"), layers="bert")
    assert m.shape == (2, 3) and m.kept("mnli") == ["head"] and m.dropped_by_all() == ["layer.0"]
    text = str(m)
    assert "sst2" in text and "layer.0" in text and "drop" in text and "2/3" in text
    path = m.save(tmp_path / "mask.json")
    assert json.loads(path.read_text())["mask"] == [[True, False, True], [False, False, True]]
    assert LayerMask.load(path) == m
    with pytest.raises(OutputError, match=re.escape(f"output {path} already exists; pass overwrite=True to replace it")):
        m.save(path)
    m.save(path, overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["mask.json"]  # no temporary left behind
    assert LayerMask(np.ones((1, 2), bool), ["a", "b"]).task_names == ("task_0",)
    with pytest.raises(MergeInputError, match="3 layers but 2 layer names"):
        LayerMask(np.ones((2, 3), bool), ["a", "b"])
    with pytest.raises(MergeInputError, match="duplicate layer names"):
        LayerMask(np.ones((1, 2), bool), ["a", "a"])
    with pytest.raises(MergeInputError, match="booleans"):
        LayerMask(np.full((1, 2), 0.5), ["a", "b"])
    with pytest.raises(MergeInputError, match="num_tasks, num_layers"):
        LayerMask(np.ones(3, bool), ["a", "b", "c"])


# ---------------------------------------------------------------------------- stage
def test_prune_zeroes_exactly_the_masked_layers(models, grouping):
    base, experts = models
    tvs = jmerge.task_vectors(base, experts)
    mask = drop_mask(grouping)
    pruned = lwptv.prune(tvs, mask)  # grouping taken from mask.layers
    for t in range(K):
        for path, x in jtree.flatten(pruned[t]).items():
            layer = grouping.names[grouping.leaf_layer[grouping.leaf_paths.index(path)]]
            want = jtree.flatten(tvs[t])[path] if mask.mask[t, grouping.names.index(layer)] else np.zeros(x.shape)
            np.testing.assert_array_equal(np.asarray(x), np.asarray(want))
    # pure and traceable: a traced mask inside a caller's jit (e.g. before learning coefficients)
    traced = jax.jit(lambda tvs, m: lwptv.prune(tvs, m, grouping))(tvs, jnp.asarray(mask.mask))
    assert_trees_equal(traced, pruned)


def _with_base_layers(expert, base, grouping, dropped):
    """``expert`` with the leaves of the layers where ``dropped`` is True taken from ``base``."""
    leaves = [b if dropped[l] else e for e, b, l in zip(jax.tree.leaves(expert), jax.tree.leaves(base), grouping.leaf_layer)]
    return jax.tree.unflatten(jax.tree.structure(base), leaves)


METHODS = [("task_arithmetic", {}), ("ties", {}), ("dare_ties", {"key": jax.random.key(3)}), ("magmax", {})]


@pytest.mark.parametrize("method,kw", METHODS)
def test_masked_layers_are_base_and_full_mask_is_identity(models, grouping, method, kw):
    base, experts = models
    plain = jmerge.merge(base, experts, method, **kw)
    full = jmerge.merge(base, experts, method, lwptv=LwPTV(layers="bert", rule="keep_ratio", value=1.0), **kw)
    assert_trees_equal(full, plain)  # bitwise
    mask = drop_mask(grouping)
    out = jmerge.merge(base, experts, method, lwptv=mask, **kw)
    # reference: the plain method (same compiled function) on experts whose dropped layers are the base's
    pruned_experts = [_with_base_layers(e, base, grouping, ~mask.mask[t]) for t, e in enumerate(experts)]
    ref = jmerge.merge(base, pruned_experts, method, **kw)
    flat_out, flat_base, flat_ref = jtree.flatten(out), jtree.flatten(base), jtree.flatten(ref)
    dropped = set(mask.dropped_by_all())
    for path in flat_out:
        layer = grouping.names[grouping.leaf_layer[grouping.leaf_paths.index(path)]]
        want = flat_base[path] if layer in dropped else flat_ref[path]
        np.testing.assert_array_equal(np.asarray(flat_out[path]), np.asarray(want), err_msg=path)


def test_prune_composes_with_learned_coefficients(models, grouping):
    from jmerge.learn import layout, merged_params

    base, experts = models
    mask = drop_mask(grouping)
    pruned = lwptv.prune(jmerge.task_vectors(base, experts), mask, grouping)
    lay = layout(base, K, "layer", grouping)
    coeffs = jnp.asarray(np.random.default_rng(0).uniform(0.1, 1.0, lay.shape), jnp.float32)
    merged = jax.jit(merged_params, static_argnums=3)(base, pruned, coeffs, lay)
    dropped = [grouping.names.index(n) for n in mask.dropped_by_all()]
    for path, x in jtree.flatten(merged).items():
        if grouping.leaf_layer[grouping.leaf_paths.index(path)] in dropped:
            np.testing.assert_array_equal(np.asarray(x), np.asarray(jtree.flatten(base)[path]))
    # no gradient flows to the coefficients of dropped task-layers
    loss = lambda c: sum(jnp.sum(x ** 2) for x in jax.tree.leaves(merged_params(base, pruned, c, lay)))
    grad = np.asarray(jax.jit(jax.grad(loss))(coeffs))
    assert np.all(grad[~mask.mask] == 0) and np.all(grad[mask.mask] != 0)


def test_keep_base_restores_base_even_when_a_method_does_not(models, grouping):
    base, _ = models
    off = jax.tree.map(lambda b: b + 1e-3, base)  # a "method" that moves every weight
    out = lwptv.keep_base(off, base, drop_mask(grouping), grouping)
    for path, x in jtree.flatten(out).items():
        layer = grouping.names[grouping.leaf_layer[grouping.leaf_paths.index(path)]]
        want = jtree.flatten(base if layer in ("layer.1", "head") else off)[path]
        np.testing.assert_array_equal(np.asarray(x), np.asarray(want))


def test_lwptv_merge_sharded_equals_unsharded_and_uses_the_scores(models, grouping, mesh8):
    base, experts = models
    cfg = LwPTV(layers="bert", score="relative_update", rule="top_k", value=2)
    scores, mask = lwptv.inspect(base, experts, cfg)
    np.testing.assert_array_equal(mask.mask, lwptv.top_k(scores, 2))
    assert mask.layers == "bert" and mask.layer_names == grouping.names
    _, same = lwptv.inspect(base, experts, cfg, layers=grouping)  # a ready LayerGrouping works too
    assert np.array_equal(same.mask, mask.mask) and same.layers is None
    out = jmerge.merge(base, experts, "ties", lwptv=cfg)
    out_s = jmerge.merge(place(base, mesh8), place(experts, mesh8), "ties", lwptv=cfg)
    assert_trees_equal(out_s, out)
    assert jax.tree.leaves(out_s)[0].sharding.num_devices == 8
    via_mask = jmerge.merge(base, experts, "ties", lwptv=mask)
    assert_trees_equal(via_mask, out)


def test_lwptv_bad_input(models, grouping):
    base, experts = models
    good = np.ones((K, grouping.num_layers), bool)
    with pytest.raises(MergeInputError, match=r"shape \(2, 5\), expected \(num_tasks, num_layers\) = \(3, 5\)"):
        jmerge.merge(base, experts, lwptv=LayerMask(good[:2], grouping.names, layers="bert"))
    wrong = LayerMask(good, [*grouping.names[:-1], "classifier"], layers="bert")
    with pytest.raises(MergeInputError, match=r"missing from the mask \['head'\], not in the grouping \['classifier'\]"):
        jmerge.merge(base, experts, lwptv=wrong)
    with pytest.raises(MergeInputError, match="which layer rule its names come from"):
        jmerge.merge(base, experts, lwptv=LayerMask(good, grouping.names))
    with pytest.raises(MergeInputError, match="keep ratio"):
        jmerge.merge(base, experts, lwptv=LwPTV(layers="bert", value=1.2))
    with pytest.raises(MergeInputError, match="exceeds the 5 layers"):
        jmerge.merge(base, experts, lwptv=LwPTV(layers="bert", rule="top_k", value=6))
    with pytest.raises(MergeInputError, match="did you mean 'relative_update'"):
        jmerge.merge(base, experts, lwptv=LwPTV(layers="bert", score="relative_updates"))
    with pytest.raises(MergeInputError, match="unknown mask rule"):
        jmerge.merge(base, experts, lwptv=LwPTV(layers="bert", rule="ratio"))
    with pytest.raises(MergeInputError, match="rule 'gpt2' assigns no layer to parameter 'bert/embeddings/LayerNorm/scale'"):
        jmerge.merge(base, experts, lwptv=LwPTV(layers="gpt2"))
    with pytest.raises(MergeInputError, match="LwPTV config or a LayerMask"):
        jmerge.merge(base, experts, lwptv=good)
    with pytest.raises(MergeInputError, match="task_names has 2 names for 3 experts"):
        jmerge.merge(base, experts, lwptv=LwPTV(layers="bert", task_names=("a", "b")))


# ---------------------------------------------------------------------------- inspection
def test_plots_write_png_and_table(models, tmp_path):
    base, experts = models
    scores, mask = lwptv.inspect(base, experts, layers="bert", score="trim_survival", value=0.5,
                                 task_names=("a", "b", "c"))
    text = lwptv.table(mask.layer_names, mask.task_names, scores=scores, mask=mask.mask)
    assert text.splitlines()[0].split() == ["layer", "a", "b", "c"] and " x" in text
    for fn, args in ((lwptv.plot_scores, (scores, mask.layer_names, mask.task_names)), (lwptv.plot_mask, (mask,))):
        path = tmp_path / f"{fn.__name__}.png"
        kwargs = {"mask": mask} if fn is lwptv.plot_scores else {}
        assert fn(*args, path, **kwargs) == path
        data = path.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
        with pytest.raises(OutputError, match=re.escape(f"output {path} already exists; pass overwrite=True")):
            fn(*args, path, **kwargs)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plot_mask.png", "plot_scores.png"]
    with pytest.raises(MergeInputError, match="expected"):
        lwptv.plot_scores(scores[:, :2], mask.layer_names, mask.task_names, tmp_path / "x.png")
