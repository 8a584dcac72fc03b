"""Step 2, assemble: one block per equivalence set, in depth order, maximising a proxy within budget.

Exact enumeration when the candidates can all be scored within a time limit; otherwise a 0-1 program
(``scipy.optimize.milp``) over a decomposable surrogate (the sum over positions of each block's own
score inside its model) with the budget as exact linear constraints, solved repeatedly with
no-good cuts for its best few assemblies, which are then re-ranked by the true proxy.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp

from zoo_store.methods.reassemble.config import Budget
from zoo_store.methods.reassemble.profile import Block, Profile, assembly_cost, head_cost, join_cost


@dataclass(frozen=True)
class Candidate:
    blocks: tuple[Block, ...]
    params: int
    flops: int
    score: float = float("nan")  # the proxy's, once scored

    def label(self) -> str:
        return " -> ".join(b.label() for b in self.blocks)


def feasible(
    sets: list[list[Block]], profiles: dict[str, Profile], num_labels: int, budget: Budget
) -> tuple[list[Candidate], tuple[int, int]]:
    """Every assembly (one block of each set, in order) within the budget, and the smallest (params,
    flops) of any assembly (what the budget would need when none fits)."""
    out, smallest = [], (None, None)
    for choice in itertools.product(*sets):
        p, f = assembly_cost(list(choice), profiles, num_labels)
        smallest = (
            p if smallest[0] is None else min(p, smallest[0]),
            f if smallest[1] is None else min(f, smallest[1]),
        )
        if budget.admits(p, f):
            out.append(Candidate(tuple(choice), p, f))
    return out, (int(smallest[0] or 0), int(smallest[1] or 0))


def exact(cands: list[Candidate], score: Callable[[Candidate], float]) -> list[Candidate]:
    """Every candidate scored, best first (ties: fewer params, then label order: deterministic)."""
    scored = [Candidate(c.blocks, c.params, c.flops, score(c)) for c in cands]
    return sorted(scored, key=lambda c: (-c.score, c.params, c.label()))


def milp_top(
    sets: list[list[Block]],
    unary: list[list[float]],
    profiles: dict[str, Profile],
    num_labels: int,
    budget: Budget,
    top: int,
) -> list[Candidate]:
    """The ``top`` best assemblies by the surrogate sum of ``unary[k][j]`` (block j of set k), each
    within the budget. Variables: x[k, j] picks block j at position k; y[k, i, j] picks the pair
    (i at k, j at k+1), linearising the stitch between them, so params and FLOPs are exact."""
    k_sets = len(sets)
    xs = [(k, j) for k in range(k_sets) for j in range(len(sets[k]))]
    ys = [(k, i, j) for k in range(k_sets - 1) for i in range(len(sets[k])) for j in range(len(sets[k + 1]))]
    xi = {v: n for n, v in enumerate(xs)}
    yi = {v: len(xs) + n for n, v in enumerate(ys)}
    nvar = len(xs) + len(ys)

    own = {(k, j): _own(sets[k][j], k == k_sets - 1, profiles, num_labels) for k, j in xs}
    rows, lo, hi = [], [], []
    for k in range(k_sets):  # one block per position
        r = np.zeros(nvar)
        for j in range(len(sets[k])):
            r[xi[(k, j)]] = 1
        rows.append(r), lo.append(1), hi.append(1)
    for k, i, j in ys:  # y = x[k, i] AND x[k+1, j]
        for a in (xi[(k, i)], xi[(k + 1, j)]):
            r = np.zeros(nvar)
            r[yi[(k, i, j)]], r[a] = 1, -1
            rows.append(r), lo.append(-np.inf), hi.append(0)
        r = np.zeros(nvar)
        r[yi[(k, i, j)]], r[xi[(k, i)]], r[xi[(k + 1, j)]] = 1, -1, -1
        rows.append(r), lo.append(-1), hi.append(np.inf)
    for limit, which in ((budget.max_params, 0), (budget.max_flops, 1)):
        if limit is None:
            continue
        r = np.zeros(nvar)
        for v, n in xi.items():
            r[n] = own[v][which]
        for v, n in yi.items():
            r[n] = join_cost(sets[v[0]][v[1]], sets[v[0] + 1][v[2]], profiles)[which]
        rows.append(r), lo.append(-np.inf), hi.append(limit)
    finite = [u for row in unary for u in row if np.isfinite(u)]
    floor = min(finite, default=0.0) - 1.0  # a singular kernel (-inf) scores below every finite one
    c = np.zeros(nvar)
    for (k, j), n in xi.items():
        c[n] = -(unary[k][j] if np.isfinite(unary[k][j]) else floor)
    found: list[Candidate] = []
    while len(found) < top:
        res = milp(
            c, constraints=LinearConstraint(np.array(rows), lo, hi), integrality=np.ones(nvar), bounds=Bounds(0, 1)
        )
        if res.x is None:
            break
        pick = [next(j for j in range(len(sets[k])) if res.x[xi[(k, j)]] > 0.5) for k in range(k_sets)]
        blocks = [sets[k][j] for k, j in enumerate(pick)]
        p, f = assembly_cost(blocks, profiles, num_labels)
        found.append(Candidate(tuple(blocks), p, f))
        r = np.zeros(nvar)  # no-good cut: not this assembly again
        for k, j in enumerate(pick):
            r[xi[(k, j)]] = 1
        rows.append(r), lo.append(-np.inf), hi.append(k_sets - 1)
    return found


def _own(b: Block, last: bool, profiles: dict[str, Profile], num_labels: int) -> tuple[int, int]:
    """A block's own (params, flops), plus the head's when it is the last block."""
    p, f = profiles[b.model].block(b.start, b.end)
    hp, hf = head_cost(b, profiles, num_labels) if last else (0, 0)
    return p + hp, f + hf
