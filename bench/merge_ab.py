"""TIES and DARE-TIES medians in one process, for A/B runs of two checkouts of jmerge.

Run it alternately from each checkout on a quiet machine (``PYTHONPATH=<checkout>`` makes that
checkout's ``jmerge`` and ``bench`` the ones imported), e.g.::

    OLD=$(mktemp -d) && git worktree add "$OLD" <rev>
    for i in 1 2; do PYTHONPATH=$PWD .venv/bin/python -m bench.merge_ab
                     (cd "$OLD" && PYTHONPATH="$OLD" "$OLDPWD/.venv/bin/python" -m bench.merge_ab); done
"""

import statistics

import jax

import jmerge
from bench.merge_bench import gpt2_shapes, random_models, timed

CASES = (("ties", "ties", {}), ("ties trim=tensor", "ties", {"trim": "tensor"}), ("dare_ties", "dare_ties", {"key": 0}))


def main() -> None:
    base, experts = random_models(gpt2_shapes(), 4)
    medians = {}
    for label, method, hp in CASES:
        hp = {k: jax.random.key(v) if k == "key" else v for k, v in hp.items()}
        medians[label] = statistics.median(timed(lambda: jmerge.merge(base, experts, method, check_finite=False, **hp), 5))
    print(jmerge.__file__, {k: round(v, 3) for k, v in medians.items()}, flush=True)


if __name__ == "__main__":
    main()
