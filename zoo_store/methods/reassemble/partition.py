"""Step 1, partition: cut every pool model into K contiguous blocks so that the k-th blocks of all
models (the k-th equivalence set) are functionally alike.

Similarity is linear CKA between the average-pooled features that models compute at their taps on
the same probe images. A block is compared by both its ends: the mean of CKA at its input tap and
at its output tap. The search alternates (as DeRy's reference code): re-centre each set on the
block most like the others, then move each model's cut points one tap at a time while that raises
the similarity of its blocks to the centres; best of several seeded restarts. Blocks stay in depth
order, so the k-th block of a model is always in set k (assignment follows from the cuts).
"""

from __future__ import annotations

import hashlib
import itertools
import random
from collections.abc import Callable
from dataclasses import dataclass

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import Tensor

from zoo_store.archs import TapNet
from zoo_store.core.cards import Card
from zoo_store.core.keystore import KeyStore, MemoryKeyStore
from zoo_store.training import normalize


@torch.no_grad()
def tap_features(net: TapNet, x: Tensor, card: Card, batch: int = 256) -> list[Tensor]:
    """Average-pooled features at each spatial tap: a list of (N, C_t), in tap order."""
    spatial = set(net.spatial_taps())
    chunks: list[list[Tensor]] = []
    dev = net.head_layer.weight.device
    for i in range(0, len(x), batch):
        feats = net.forward_intermediates(normalize(x[i : i + batch].to(dev), card.input))
        chunks.append([f.mean((2, 3)).double().cpu() for t, f in feats.items() if t in spatial])  # (B, C_t) each
    return [torch.cat(col) for col in zip(*chunks, strict=True)]


def linear_cka(a: Tensor, b: Tensor) -> float:
    """Linear CKA (Kornblith et al. 2019) of (N, D1) and (N, D2) features of the same N inputs."""
    a = a - a.mean(0, keepdim=True)
    b = b - b.mean(0, keepdim=True)
    cross = (b.T @ a).norm() ** 2
    den = (a.T @ a).norm() * (b.T @ b).norm()
    return float(cross / den) if den > 0 else 0.0


class SimilarityCache:
    """CKA matrices per (model, model, probe set), keyed by the bases' digests and a hash of the probe
    images, in a KeyStore (a directory in the service, memory in tests)."""

    def __init__(self, store: KeyStore | None = None):
        self.store = MemoryKeyStore() if store is None else store
        self.hits = self.misses = 0

    @staticmethod
    def probe_key(x: Tensor) -> str:
        return hashlib.sha256(x.contiguous().numpy().tobytes()).hexdigest()[:16]

    def matrix(self, d1: str, d2: str, probe: str, compute: Callable[[], Tensor]) -> Tensor:
        key = f"cka-{d1[:16]}-{d2[:16]}-{probe}"
        raw = self.store.get(key)
        if raw is not None:
            self.hits += 1
            return st_load(raw)["cka"]
        self.misses += 1
        m = compute()
        self.store.put(key, st_save({"cka": m.contiguous()}))
        return m


@dataclass(frozen=True)
class Partition:
    cuts: dict[str, tuple[int, ...]]  # model -> indices of the spatial taps its first K-1 blocks end at
    centres: tuple[str, ...]  # per set, the model whose block is the set's centre
    score: float  # total similarity of every block to its set's centre

    def blocks(self, model: str, taps: list[str]) -> list[tuple[str | None, str]]:
        ends = [*self.cuts[model], len(taps) - 1]
        starts = [None, *(taps[c] for c in self.cuts[model])]
        return [(s, taps[e]) for s, e in zip(starts, ends, strict=True)]


def similarity_matrices(
    pool: list[str], feats: Callable[[str], list[Tensor]], digests: dict[str, str], probe: str, cache: SimilarityCache
) -> dict[tuple[str, str], Tensor]:
    """(T_m, T_n) CKA between the taps of every ordered pair of pool models; ``feats(m)`` gives a
    model's pooled tap features and is called only for pairs the cache does not hold."""
    out: dict[tuple[str, str], Tensor] = {}
    for m, n in itertools.combinations(pool, 2):
        mat = cache.matrix(
            digests[m],
            digests[n],
            probe,
            lambda m=m, n=n: torch.tensor(
                [[linear_cka(a, b) for b in feats(n)] for a in feats(m)], dtype=torch.float64
            ),
        )
        out[(m, n)], out[(n, m)] = mat, mat.T
    return out


def search_partition(
    taps: dict[str, int],
    sim: dict[tuple[str, str], Tensor],
    k: int,
    *,
    restarts: int = 8,
    seed: int = 0,
    max_rounds: int = 50,
) -> Partition:
    """The alternating search, best of ``restarts`` (the first starts from evenly spaced cuts)."""
    pool = list(taps)

    def tap_sim(m: str, i: int, n: str, j: int) -> float:
        if i < 0 or j < 0:  # the input: alike only to the input
            return 1.0 if i == j else 0.0
        return 1.0 if m == n else float(sim[(m, n)][i, j])  # within a model: only a block with itself is compared

    def block_sim(m: str, cm: tuple[int, ...], n: str, cn: tuple[int, ...], s: int) -> float:
        em, en = [-1, *cm, taps[m] - 1], [-1, *cn, taps[n] - 1]
        return 0.5 * (tap_sim(m, em[s], n, en[s]) + tap_sim(m, em[s + 1], n, en[s + 1]))

    def fit_of(m: str, cm: tuple[int, ...], cuts: dict[str, tuple[int, ...]], centres: list[str]) -> float:
        return sum(
            1.0 if c == m else block_sim(m, cm, c, cuts[c], s) for s, c in enumerate(centres)
        )  # a centre is its own match

    rng = random.Random(seed)
    best: Partition | None = None
    for r in range(restarts):
        if r == 0:
            cuts = {m: tuple(round((i + 1) * taps[m] / k) - 1 for i in range(k - 1)) for m in pool}
        else:
            cuts = {m: tuple(sorted(rng.sample(range(taps[m] - 1), k - 1))) for m in pool}
        centres: list[str] = []
        for _ in range(max_rounds):
            centres = [
                max(pool, key=lambda c, s=s: (sum(block_sim(c, cuts[c], m, cuts[m], s) for m in pool), c))
                for s in range(k)
            ]
            moved = False
            for m in pool:
                for j in range(k - 1):
                    for step in (-1, 1):
                        cand = list(cuts[m])
                        cand[j] += step
                        lo = cand[j - 1] + 1 if j else 0
                        hi = cand[j + 1] - 1 if j + 1 < k - 1 else taps[m] - 2
                        if not lo <= cand[j] <= hi:
                            continue
                        if fit_of(m, tuple(cand), cuts, centres) > fit_of(m, cuts[m], cuts, centres) + 1e-12:
                            cuts[m], moved = tuple(cand), True
            if not moved:
                break
        score = sum(fit_of(m, cuts[m], cuts, centres) for m in pool)
        if best is None or score > best.score + 1e-12:
            best = Partition(dict(cuts), tuple(centres), score)
    assert best is not None
    return best
