"""Composable stages on task vectors, in the spirit of optax's transformations.

A merge is a chain ``sparsify -> elect sign -> combine -> apply``:

* a **sparsifier** maps a list of K task vectors (and a PRNG key) to K sparser ones:
  :func:`magnitude_trim`, :func:`dare`, :func:`breadcrumbs`, :func:`della`; :func:`chain`
  composes them;
* :func:`elect_sign` picks one sign per entry (TIES), :func:`agreement_masks` keeps
  the entries that agree with it;
* a **combiner** turns K task vectors into one: :func:`combine` (weighted sum, mean,
  disjoint mean/sum), :func:`magnitude_max` (MagMax), :func:`consensus_mask` (TALL);
* :func:`jmerge.tree.apply` adds the result to the base.

Every function is pure and jit-traceable; hyper-parameters that fix array sizes (densities)
are Python numbers. Under :func:`jmerge.tree.rounding` (mergekit's arithmetic in its ``dtype``)
the weights, products, sums, votes and quotients below are each rounded to that dtype, in
mergekit's order (``generalized_task_arithmetic.py``, ``sparsify.py``). A sparsifier is a ``(query, apply)`` pair (:class:`Sparsifier`): the
thresholds it needs, exact k-th largest magnitudes, are answered by
:func:`jmerge.thresholds.solve` with the backend the inputs call for.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jmerge import thresholds
from jmerge import tree as jtree
from jmerge.thresholds import torch_order
from jmerge.tree import PyTree


def per_task(value, k_tasks: int) -> list[float]:
    """One Python float per task from a scalar or a length-K sequence."""
    values = [float(v) for v in np.atleast_1d(np.asarray(value, dtype=np.float64))]
    if len(values) not in (1, k_tasks):
        raise ValueError(f"expected one value or {k_tasks} (one per task), got {len(values)}")
    return values * k_tasks if len(values) == 1 else values


def _at(value, t: int) -> float:
    """Task ``t``'s value of a scalar or per-task ``value`` (as :func:`per_task`)."""
    values = np.atleast_1d(np.asarray(value, dtype=np.float64))
    return float(values[0] if values.size == 1 else values[t])


def _uniform_per_leaf(key, tvs: Sequence[PyTree], shape_of=lambda x: x.shape, below=None) -> list[list[jax.Array]]:
    """``u = jax.random.uniform(fold_in(k_i, t), shape_of(leaf i))`` for every task ``t`` and
    leaf ``i``, ``k_i`` the leaf's key (:func:`jmerge.tree.keys_like`: ``key`` folded with a
    stable hash of the leaf's path, or given per leaf), or the masks ``u < below[t]`` when
    ``below`` (one value per task) is given (then ``jax.random.bernoulli(fold_in(k_i, t),
    below[t], shape)``). A streamed merge, which passes per-tensor keys, draws what the
    in-memory merge draws.

    Keys and draws of one shape are each a single vmapped call (the same values as separate
    calls): with one ``fold_in`` and one generator per leaf, DARE on a GPT-2-sized model
    took minutes to compile."""
    leaf_keys = jax.tree.leaves(jtree.keys_like(key, tvs[0]))
    groups: dict[tuple[int, ...], list[tuple[int, int]]] = {}
    for t, tv in enumerate(tvs):
        for i, x in enumerate(jax.tree.leaves(tv)):
            groups.setdefault(tuple(shape_of(x)), []).append((t, i))
    out: list[list] = [[None] * len(jax.tree.leaves(tv)) for tv in tvs]
    for shape, members in groups.items():
        tasks = jnp.asarray([t for t, _ in members], jnp.uint32)
        keys = jax.vmap(jax.random.fold_in)(jnp.stack([leaf_keys[i] for _, i in members]), tasks)  # one vectorised hash
        draws = jax.vmap(lambda k, shape=shape: jax.random.uniform(k, shape))(keys)
        if below is not None:
            limits = jnp.asarray([below[t] for t, _ in members], jnp.float32).reshape((-1,) + (1,) * len(shape))
            draws = draws < limits
        for j, (t, i) in enumerate(members):
            out[t][i] = draws[j]
    return out


# ---------------------------------------------------------------------------- sparsifiers
class Sparsifier(NamedTuple):
    """A map from K task vectors to K sparser ones, split like optax's ``init``/``update``:

    * ``query``: what must be measured before masking (a :class:`jmerge.thresholds.Query`),
      or None for elementwise sparsifiers (DARE, DELLA);
    * ``apply(tvs, answers, key) -> tvs``: the pure, jittable mask, given ``answers =
      jmerge.thresholds.solve(query, tvs)``.

    Calling it, ``s(tvs, key)``, solves the query on ``tvs`` itself (inside ``jit``: the XLA
    search) unless ``answers`` are given; ``mesh``/``spec`` run that search on a mesh.
    """

    query: thresholds.Query | None
    apply: Callable[[list, Any, Any], list]

    def __call__(self, tvs: Sequence[PyTree], key=None, *, answers=None, mesh=None, spec=None) -> list[PyTree]:
        tvs = list(tvs)
        if self.query is not None and answers is None:
            answers = thresholds.solve(self.query, tvs, mesh=mesh, spec=spec)
        return self.apply(tvs, answers, key)


def _per_leaf(tv: PyTree, value) -> list:
    """A pytree of per-tensor values shaped like ``tv``, or one value for every leaf."""
    if jax.tree.structure(value) == jax.tree.structure(tv):
        return jax.tree.leaves(value)
    return [value] * len(jax.tree.leaves(tv))


def _kept(tvs: Sequence[PyTree], lower: Sequence, upper: Sequence | None = None) -> list[PyTree]:
    """``tau_t`` where ``lower[t] <= |tau_t| (< upper[t])`` (:func:`jmerge.thresholds.keep`), else 0."""
    out = []
    for t, tv in enumerate(tvs):
        leaves, treedef = jax.tree.flatten(tv)
        his = [None] * len(leaves) if upper is None else _per_leaf(tv, upper[t])
        out.append(jax.tree.unflatten(
            treedef, [jnp.where(thresholds.keep(x, lo, hi), x, 0.0) for x, lo, hi in zip(leaves, _per_leaf(tv, lower[t]), his)]
        ))
    return out


def magnitude_trim(density: float | Sequence[float], scope: str = "global", tie_break: str = "all") -> Sparsifier:
    """TIES trim (Yadav et al., 2023, arXiv 2306.01708): keep the ``k_t = int(d_t n)`` largest
    ``|tau_t|`` of each unit, zero the rest.

    ``scope="global"`` ranks over the whole flattened task vector (TIES paper, FusionBench);
    ``scope="tensor"`` ranks within each tensor (mergekit, PEFT). ``density`` may be one
    value or one per task. ``tie_break`` settles entries tied with the k-th largest:
    ``"all"`` keeps them all (``|tau_t| >= kth_t``; jmerge's rule, which needs no order);
    ``"first"`` keeps exactly ``k = max(1, int(d n))``, the tied entries first in row-major
    order; ``"torch"`` keeps the same ``k``, the tied entries that mergekit 0.1.5's
    ``torch.argsort`` on CPU puts first (:mod:`jmerge.thresholds.torch_order`, a host replay
    of its sort: mergekit's trim exactly, at the cost of a host pass per tensor). ``"first"``
    and ``"torch"`` need ``scope="tensor"``.
    """
    if scope not in ("global", "tensor"):
        raise ValueError(f"trim scope must be 'global' or 'tensor', got {scope!r}")
    if tie_break not in TIE_BREAKS:
        raise ValueError(f"tie_break must be one of {', '.join(map(repr, TIE_BREAKS))}, got {tie_break!r}")
    if tie_break != "all" and scope != "tensor":
        raise ValueError(f"tie_break={tie_break!r} ranks within each tensor: it needs scope 'tensor'")
    exact = tie_break != "all"

    def count(t: int, n: int) -> int:
        return thresholds.keep_count(_at(density, t), n, at_least_one=exact)

    def apply(tvs, answers, key=None):
        per_task(density, len(tvs))  # one density or one per task
        if tie_break == "torch":
            return [_torch_kept(tv, lambda n, t=t: (0, count(t, n)), descending=True) for t, tv in enumerate(tvs)]
        if not exact:
            return _kept(tvs, [a[0] for a in answers])
        return [_kept_first(tv, kth, cut) for tv, (kth, cut) in zip(tvs, answers)]

    query = None if tie_break == "torch" else thresholds.Query(scope, lambda t, n: (count(t, n),),
                                                               positions=tie_break == "first")
    return Sparsifier(query, apply)


TIE_BREAKS = ("all", "first", "torch")  # magnitude_trim's rules for entries tied at the k-th largest


def _torch_kept(tv: PyTree, bounds: Callable[[int], tuple[int, int]], descending: bool) -> PyTree:
    """Per leaf of ``n`` entries, ``tau`` where torch's CPU sort of ``|tau|`` puts it at positions
    ``bounds(n) = (start, stop)`` (:func:`jmerge.thresholds.torch_order.kept`), else 0."""

    def leaf(x):
        start, stop = bounds(x.size)
        if start <= 0 and stop >= x.size:
            return x
        if start >= stop:
            return jnp.zeros_like(x)
        return jnp.where(torch_order.kept_in_jit(jnp.abs(x), start, stop, descending), x, 0.0)

    return jax.tree.map(leaf, tv)


def _kept_first(tv: PyTree, lower, cut) -> PyTree:
    """Per leaf, ``tau`` where ``|tau| > lower``, or ``|tau| == lower`` at a row-major index at most
    ``cut`` (:func:`jmerge.thresholds.last_tied_kept`), else 0: one elementwise pass, compared
    as float32 bit patterns."""
    leaves, treedef = jax.tree.flatten(tv)
    out = []
    for x, lo, last in zip(leaves, _per_leaf(tv, lower), jax.tree.leaves(cut)):
        b, lb = thresholds.bits(jnp.abs(x.astype(jnp.float32))), thresholds.bits(lo)
        out.append(jnp.where((b > lb) | ((b == lb) & (_row_major_index(x.shape) <= last)), x, 0.0))
    return jax.tree.unflatten(treedef, out)


def _row_major_index(shape: tuple[int, ...]) -> jax.Array:
    """Each entry's index in the flattened array (int32), from iotas: no reshape."""
    index, stride = jnp.zeros(shape, jnp.int32), 1
    for axis in reversed(range(len(shape))):
        index = index + jax.lax.broadcasted_iota(jnp.int32, shape, axis) * stride
        stride *= shape[axis]
    return index


def dare(density: float | Sequence[float], rescale: bool = True) -> Sparsifier:
    """DARE (Yu et al., 2024, arXiv 2311.03099): keep each entry with probability
    ``density = 1 - p``, and divide survivors by ``density`` when ``rescale`` so the
    expectation is unchanged."""

    def apply(tvs, answers, key):
        if key is None:
            raise ValueError("dare needs a PRNG key (jax.random.key(seed))")
        densities = per_task(density, len(tvs))
        masks = _uniform_per_leaf(key, tvs, below=densities)
        out = []
        for tv, keep, d in zip(tvs, masks, densities):
            leaves, treedef = jax.tree.flatten(tv)
            out.append(jax.tree.unflatten(treedef, [jnp.where(m, x / d if rescale else x, 0.0) for x, m in zip(leaves, keep)]))
        return out

    return Sparsifier(None, apply)


def breadcrumbs(density: float | Sequence[float], gamma: float = 0.01, tie_break: str = "all") -> Sparsifier:
    """Model Breadcrumbs (Davari & Belilovsky, 2024, arXiv 2312.06795), per tensor, mergekit's
    parametrisation: drop the ``gamma`` fraction of largest ``|tau|`` (outliers) and enough of
    the smallest that a ``density`` fraction survives: keep ``kth(n_keep + n_top) <= |tau| <
    kth(n_top)``, ``n_keep = int(d n)``, ``n_top = min(int(gamma n), n - n_keep)``.
    ``tie_break="torch"`` keeps exactly ``n_keep``: the entries at ascending positions
    ``[n - n_keep - n_top, n - n_top)`` of torch's CPU sort, ties as it orders them (mergekit's
    ``magnitude_outliers``; :mod:`jmerge.thresholds.torch_order`)."""
    if tie_break not in ("all", "torch"):
        raise ValueError(f"breadcrumbs tie_break must be 'all' or 'torch', got {tie_break!r}")

    def ranks(t, n):
        n_keep = thresholds.keep_count(_at(density, t), n)
        n_top = min(int(gamma * n), n - n_keep)
        return n_keep + n_top, n_top

    def apply(tvs, answers, key=None):
        per_task(density, len(tvs))
        if tie_break == "torch":
            return [_torch_kept(tv, lambda n, t=t: tuple(n - k for k in ranks(t, n)), descending=False)
                    for t, tv in enumerate(tvs)]
        return _kept(tvs, [a[0] for a in answers], [a[1] for a in answers])

    return Sparsifier(None if tie_break == "torch" else thresholds.Query("tensor", ranks), apply)


def della(density: float | Sequence[float], epsilon: float = 0.15, rescale: bool = True) -> Sparsifier:
    """DELLA MagPrune (Deep et al., 2024, arXiv 2406.11617): keep entry i with probability
    ``p_i = (d - eps) + 2 eps r_i``, ``r_i`` in [0, 1] its magnitude rank normalised along the
    last axis (mergekit ranks rows the same way); survivors divided by ``p_i`` when ``rescale``
    (the paper; mergekit does not rescale this way)."""
    as_rows = lambda x: x.reshape(1, -1) if x.ndim < 2 else x.reshape(-1, x.shape[-1])

    def apply(tvs, answers, key):
        if key is None:
            raise ValueError("della needs a PRNG key (jax.random.key(seed))")
        draws = _uniform_per_leaf(key, tvs, shape_of=lambda x: as_rows(x).shape)
        out = []
        for tv, u, d in zip(tvs, draws, per_task(density, len(tvs))):
            leaves, treedef = jax.tree.flatten(tv)
            new = []
            for x, ui in zip(leaves, u):
                rows = as_rows(x)
                width = rows.shape[-1]
                ranks = jnp.argsort(jnp.argsort(jnp.abs(rows), axis=-1), axis=-1).astype(jnp.float32)
                p = (d - epsilon) + 2.0 * epsilon * (ranks / max(width - 1, 1))
                new.append(jnp.where(ui < p, rows / p if rescale else rows, 0.0).reshape(x.shape))
            out.append(jax.tree.unflatten(treedef, new))
        return out

    return Sparsifier(None, apply)


def l1_rescale(original: Sequence[PyTree], sparse: Sequence[PyTree], eps: float = 1e-7) -> list[PyTree]:
    """mergekit's ``rescale`` (``sparsify.rescaled_masked_tensor``, L1 norm): each sparsified
    tensor times ``|tau|_1 / |sparse(tau)|_1``, per tensor, unchanged where either norm is
    below ``eps``."""
    r = jtree.rounded

    def leaf(x, kept):
        before, after = r(jnp.sum(jnp.abs(x))), r(jnp.sum(jnp.abs(kept)))
        ok = (before >= eps) & (after >= eps)
        return jnp.where(ok, r(kept * r(before / jnp.where(ok, after, 1.0))), kept)

    return [jax.tree.map(leaf, tv, kept) for tv, kept in zip(original, sparse)]


def chain(*sparsifiers: Sparsifier) -> Sparsifier:
    """Applies sparsifiers in order, each with its own key folded from the given one
    (``fold_in(key, 1000 + i)``). The chain's query is the first one's (it measures the
    chain's inputs); later ones solve theirs on what reaches them."""

    def apply(tvs, answers, key=None):
        for i, s in enumerate(sparsifiers):
            k = None if key is None else jax.tree.map(lambda x, i=i: jax.random.fold_in(x, 1000 + i), key)
            tvs = s.apply(list(tvs), answers, k) if i == 0 and s.query is not None else s(tvs, k)
        return list(tvs)

    return Sparsifier(sparsifiers[0].query if sparsifiers else None, apply)


# ---------------------------------------------------------------------------- sign election
def elect_sign(tvs: Sequence[PyTree], method: str = "sum") -> PyTree:
    """TIES sign election: ``gamma = sign(sum_t tau_t)`` ("sum", the paper's mass election)
    or ``sign(sum_t sign(tau_t))`` ("count"); ties (0) elect +1, as mergekit does."""
    if method not in ("sum", "count"):
        raise ValueError(f"sign election must be 'sum' or 'count', got {method!r}")
    f = (lambda x: x) if method == "sum" else jnp.sign
    return jax.tree.map(lambda *ts: jnp.where(jtree.rounded(sum(f(t) for t in ts)) >= 0, 1.0, -1.0), *tvs)


def agreement_masks(tvs: Sequence[PyTree], sign: PyTree) -> list[PyTree]:
    """``1[sign(tau_t) == gamma]`` per task: zero entries never agree."""
    return [jax.tree.map(lambda t, g: jnp.sign(t) == g, tv, sign) for tv in tvs]


# ---------------------------------------------------------------------------- combiners
def _weight_vector(weights, k: int) -> jax.Array:
    """The K weights as float32 (ones when None), rounded as mergekit's weight tensor in ``dtype``."""
    return jtree.rounded(jnp.ones((k,), jnp.float32) if weights is None else jnp.asarray(weights, jnp.float32))


def weighted(tvs: Sequence[PyTree], weights: Sequence[float] | jax.Array | None = None) -> list[PyTree]:
    """``w_t tau_t`` per task (mergekit's ``deltas * weights``, before its sign election);
    ``weights`` None: the task vectors themselves."""
    if weights is None:
        return list(tvs)
    w = _weight_vector(weights, len(tvs))
    return [jax.tree.map(lambda x, i=i: jtree.rounded(w[i] * x), tv) for i, tv in enumerate(tvs)]


def combine(
    tvs: Sequence[PyTree],
    weights: Sequence[float] | jax.Array | None = None,
    *,
    masks: Sequence[PyTree] | None = None,
    normalize: bool = False,
) -> PyTree:
    """``sum_t w_t m_t tau_t``, divided by ``sum_t w_t m_t`` entrywise when ``normalize``.

    With ``masks`` from :func:`agreement_masks` this is TIES' disjoint mean (``normalize``,
    the paper) or disjoint sum; without masks and with ``normalize`` it is the weighted mean
    (a weight sum below 1e-8 in magnitude divides by 1, as mergekit). Entries where the
    divisor is 0 stay 0. The sums run over the tasks in order from 0 (mergekit's
    ``sum(dim=0)`` on CPU; under :func:`jmerge.tree.rounding` rounded once each).
    """
    k = len(tvs)
    w = _weight_vector(weights, k)
    r = jtree.rounded

    def leaf(*args):
        ts, ms = args[:k], args[k:]
        terms = [r(w[i] * r(ts[i])) for i in range(k)]
        total = r(sum(terms if not ms else [jnp.where(m, x, 0.0) for m, x in zip(ms, terms)]))
        if not normalize:
            return total
        if not ms:
            div = r(sum(w[i] for i in range(k)))
            return r(total / jnp.where(jnp.abs(div) < 1e-8, 1.0, div))
        div = r(sum(w[i] * ms[i].astype(jnp.float32) for i in range(k)))
        nonzero = jnp.abs(div) > 1e-8
        return jnp.where(nonzero, r(total / jnp.where(nonzero, div, 1.0)), 0.0)

    return jax.tree.map(leaf, *tvs, *(masks or ()))


def magnitude_max(tvs: Sequence[PyTree]) -> PyTree:
    """MagMax (Marczak et al., 2024): per entry, the task-vector value of largest ``|tau_t|``
    (first task wins ties)."""

    def leaf(*ts):
        best = ts[0]
        for t in ts[1:]:
            best = jnp.where(jnp.abs(t) > jnp.abs(best), t, best)
        return best

    return jax.tree.map(leaf, *tvs)


def tall_masks(tvs: Sequence[PyTree], lambdas: float | Sequence[float] = 0.6) -> list[PyTree]:
    """TALL masks (Wang et al., 2024): ``m_t = 1[|tau_t| > lambda_t |tau_MTL - tau_t|]``,
    ``tau_MTL = sum_t tau_t`` (since ``theta_0 - theta_t = -tau_t``)."""
    total = jtree.add(*tvs)
    lams = per_task(lambdas, len(tvs))
    return [jax.tree.map(lambda t, s, lam=lam: jnp.abs(t) > lam * jnp.abs(s - t), tv, total) for tv, lam in zip(tvs, lams)]


def consensus_mask(masks: Sequence[PyTree], k: int = 2) -> PyTree:
    """Consensus (Wang et al., 2024): keep entries that at least ``k`` task masks keep."""
    return jax.tree.map(lambda *ms: sum(m.astype(jnp.int32) for m in ms) >= k, *masks)
