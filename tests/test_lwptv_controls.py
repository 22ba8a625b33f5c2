"""The LwPTV control masks shared by the Suite T v2 and Suite V studies: the score-free controls
keep the requested layers, the keep ratio maps to jmerge's own layer count, the distinct-mask count,
the runs of a fold and the completeness check."""

import re

import numpy as np
import pytest

from experiments import lwptv_controls as lc
from jmerge.lwptv import keep_ratio


def test_first_layers_mask_drops_the_first_layers_of_every_task():
    m = lc.first_layers_mask(3, 7, 5)
    assert m.shape == (3, 7) and m.dtype == bool
    np.testing.assert_array_equal(m, np.tile([False, False, True, True, True, True, True], (3, 1)))
    assert lc.first_layers_mask(2, 7, 7).all() and not lc.first_layers_mask(2, 7, 0).any()


def test_random_mask_keeps_k_layers_per_task_and_varies():
    draws = [lc.random_mask(4, 7, 4, np.random.default_rng(seed)) for seed in range(20)]
    for m in draws:
        assert m.shape == (4, 7) and (m.sum(axis=1) == 4).all()
    np.testing.assert_array_equal(draws[3], lc.random_mask(4, 7, 4, np.random.default_rng(3)))
    assert len({m.tobytes() for m in draws}) == 20
    # Uniform over layers: each layer is kept with probability k / L = 4/7 (80 task rows).
    np.testing.assert_allclose(np.mean([m.mean(axis=0) for m in draws], axis=0), 4 / 7, atol=0.15)


@pytest.mark.parametrize("k", [8, -1, 2.5, True])
def test_control_masks_reject_bad_k(k):
    for fn in (lambda: lc.first_layers_mask(2, 7, k), lambda: lc.random_mask(2, 7, k, np.random.default_rng(0))):
        with pytest.raises(ValueError, match=re.escape(f"kept layers k={k!r} must be an integer in [0, 7]")):
            fn()


def test_distinct_masks_counts_rows_and_uniform_folds():
    a = np.array([[1, 0, 1], [1, 0, 1]], bool)  # uniform fold
    b = np.array([[1, 0, 1], [0, 1, 1]], bool)
    assert lc.distinct_masks([a, b]) == {"task_masks": 4, "distinct": 2, "uniform_folds": 1}
    assert lc.distinct_masks([a, a]) == {"task_masks": 4, "distinct": 1, "uniform_folds": 2}


def test_kept_layers_is_jmerges_keep_ratio_count():
    assert lc.kept_layers(0.85, 19) == 16 and lc.kept_layers(0.85, 7) == 6 and lc.kept_layers(1.0, 19) == 19
    scores = np.random.default_rng(0).normal(size=(3, 19))
    for ratio in (0.0, 0.3, 0.5, 0.6, 0.85, 1.0):
        assert (keep_ratio(scores, ratio).sum(axis=1) == lc.kept_layers(ratio, 19)).all()


def test_control_mask_dispatches_and_seeds_by_fold():
    np.testing.assert_array_equal(lc.control_mask("first_layers", 2, 7, 4, 0, [0, 1]), lc.first_layers_mask(2, 7, 4))
    r = lc.control_mask("random", 2, 7, 4, 1, [0, 2])
    np.testing.assert_array_equal(r, lc.random_mask(2, 7, 4, np.random.default_rng([1, 0, 2])))
    assert not np.array_equal(r, lc.control_mask("random", 2, 7, 4, 1, [1, 2]))  # another fold, another draw
    with pytest.raises(ValueError, match=re.escape("unknown control 'lwptv' (controls: first_layers, random)")):
        lc.control_mask("lwptv", 2, 7, 4, 0, [0, 1])


def test_runs_and_complete():
    assert lc.runs() == [("plain", 0), ("lwptv", 0), ("first_layers", 0), ("random", 0), ("random", 1), ("random", 2)]
    assert lc.runs([5]) == [("plain", 0), ("lwptv", 0), ("first_layers", 0), ("random", 5)]
    folds = [{"method": "ties", "variant": v, "seed": s, "fold": "a"} for v, s in lc.runs()]
    folds += [{"method": "ties", "variant": v, "seed": s, "fold": "b"} for v, s in lc.runs([0])]
    assert lc.complete(folds, "ties", lambda f: f["fold"]) == {"a"}
    assert lc.complete(folds, "ties", lambda f: f["fold"], seeds=[0]) == {"a", "b"}
