"""Deep Model Reassembly (DeRy, NeurIPS 2022) as a composition method: docs/methods/reassemble.md.

build: plan (pool, K, budget) -> partition every pool model into K blocks by CKA (cached per pool
and probe set) -> one block per set by a training-free proxy (options.proxy, the ridge probe by
default) within the budget (exact, or a 0-1 program) -> least-squares stitches, then
freeze-tuning of stitches and head. The path holds the block list, the stitches and the head.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from zoo_store.archs import TapNet
from zoo_store.archs.surgery import shared_copy, tensor_bytes
from zoo_store.core.bundle import PathArtifact
from zoo_store.core.cards import Card, InputSpec
from zoo_store.core.errors import InvalidInput
from zoo_store.core.manifest import BaseRef
from zoo_store.core.spec import CompositionSpec
from zoo_store.datasets.tasks import TaskData
from zoo_store.methods.base import BuildContext, ExpectedTensors, Method, no_spatial_tap
from zoo_store.methods.reassemble.config import (
    Budget,
    ReassembleConfig,
    ReassembleOptions,
    check_budget,
    parse_config,
    plan_reassemble,
)
from zoo_store.methods.reassemble.layers import (
    Assembled,
    Shapes,
    Stitch,
    build_assembled,
    fit_stitches,
    shapes_of,
    stitch_params,
)
from zoo_store.methods.reassemble.naswot import rectifiers
from zoo_store.methods.reassemble.partition import (
    SimilarityCache,
    search_partition,
    similarity_matrices,
    tap_features,
)
from zoo_store.methods.reassemble.profile import Block, card_profile, needs_stitch
from zoo_store.methods.reassemble.proxies import PROXIES, ProbeData, Proxy
from zoo_store.methods.reassemble.search import Candidate, exact, feasible, milp_top
from zoo_store.methods.registry import register_method
from zoo_store.training import accuracy, fit, normalize

PROBE_IMAGES = 256  # images the CKA partition and the stitch initialisation see
NASWOT_IMAGES = 64  # the batch NASWOT scores on
RIDGE_IMAGES = 1024  # labelled training images the ridge proxy probes
EXACT_MAX = 256  # enumerate exactly up to this many candidates (a minute or a few on 2 cores); else the 0-1 program
MILP_TOP = 8  # candidates the 0-1 program proposes for re-ranking by the true proxy
STITCH_KEYS = ("bn.weight", "bn.bias", "bn.running_mean", "bn.running_var", "proj.weight", "proj.bias")


@register_method
class Reassemble(Method):
    name = "reassemble"
    required = ("task",)
    fields = ("task", "models", "budget", "blocks", "train", "options")
    budget_model = Budget
    options = ReassembleOptions

    def refusal(self, net: TapNet) -> str | None:
        return no_spatial_tap(net)

    def validate(self, spec: CompositionSpec, cards: dict[str, Card]) -> list[str]:
        plan = plan_reassemble(spec, cards)
        check_budget(plan, cards)
        return list(plan.pool)

    def build(self, spec: CompositionSpec, ctx: BuildContext) -> PathArtifact:
        found = search(spec, ctx)
        best, card, data, tr = found.ranked[0], found.card, found.data, spec.train
        ctx.progress(fraction=0.5, step="stitch and tune", epoch=0)
        model = train_assembly(
            best,
            found.nets,
            card,
            data,
            found.probe,
            tr.epochs,
            tr.lr,
            tr.batch_size,
            tr.seed,
            ctx.device,
            on_epoch=lambda e, loss: ctx.progress(
                fraction=0.5 + 0.5 * (e + 1) / tr.epochs, step="stitch and tune", epoch=e + 1, loss=loss
            ),
        )
        return to_artifact(found, best, model, ctx.device)

    def expected_tensors(self, config: dict[str, Any], bases: dict[str, TapNet]) -> ExpectedTensors:
        cfg, shapes = _checked(config, bases)
        out: ExpectedTensors = {}
        for i, (prev, cur) in enumerate(zip(cfg.blocks, cfg.blocks[1:], strict=False), 1):
            if needs_stitch(prev, cur):
                assert cur.start is not None
                cin, cout = shapes[prev.model][prev.end][0], shapes[cur.model][cur.start][0]
                out |= {f"stitch.{i}.{k}": ("float32", (cin,)) for k in STITCH_KEYS[:4]}
                out[f"stitch.{i}.proj.weight"], out[f"stitch.{i}.proj.bias"] = (
                    ("float32", (cout, cin, 1, 1)),
                    ("float32", (cout,)),
                )
        last = cfg.blocks[-1]
        c = shapes[last.model][last.end][0]
        out["head.weight"], out["head.bias"] = ("float32", (cfg.num_classes, c)), ("float32", (cfg.num_classes,))
        return out

    def check_input(self, config: dict[str, Any], spec: InputSpec) -> None:
        cfg = parse_config(config)
        if (cfg.channels, cfg.size) != (spec.channels, spec.size):
            raise InvalidInput(
                f"reassemble config input {cfg.channels}x{cfg.size}x{cfg.size} differs from the path's "
                f"{spec.channels}x{spec.size}x{spec.size}"
            )

    def materialize(self, config: dict[str, Any], tensors: dict[str, Tensor], bases: dict[str, TapNet]) -> nn.Module:
        cfg, shapes = _checked(config, bases)
        model = build_assembled(list(cfg.blocks), bases, shapes, cfg.num_classes)
        for i, s in enumerate(model.stitches):
            if isinstance(s, Stitch):
                s.load_state_dict({k: tensors[f"stitch.{i}.{k}"] for k in STITCH_KEYS}, strict=False)
        model.head.load_state_dict({"weight": tensors["head.weight"], "bias": tensors["head.bias"]})
        return model.requires_grad_(False).eval()


@dataclass
class Search:
    """Steps 1-2 done: the partition's sets and the feasible candidates ranked by the proxy, best first."""

    cards: dict[str, Card]
    nets: dict[str, TapNet]
    card: Card  # the first pool model's: the input every pool model shares
    data: TaskData
    probe: Tensor  # (P, C, H, W) normalized
    probes: ProbeData  # what the proxies see
    sets: list[list[Block]]
    ranked: list[Candidate]
    metrics: dict[str, Any]


def search(spec: CompositionSpec, ctx: BuildContext) -> Search:
    """Partition the pool (step 1) and rank the assemblies within budget by the spec's proxy (step 2)."""
    assert spec.task
    proxy_name = ReassembleOptions.model_validate(spec.options).proxy  # checked at POST
    proxy = PROXIES[proxy_name]
    cards = {k: c for k, (c, _) in ctx.bases.items()}
    plan = plan_reassemble(spec, cards)
    card = cards[plan.pool[0]]
    data = ctx.load_task(spec.task, card)
    check_budget(plan, cards, len(data.labels))  # now with the head's real size
    nets = {m: ctx.bases[m][1] for m in plan.pool}
    order = torch.randperm(len(data.train_x), generator=torch.Generator().manual_seed(spec.train.seed))
    probe_raw = data.train_x[order[:PROBE_IMAGES]]  # (P, C, H, W) in [0, 1]
    probe = normalize(probe_raw.to(ctx.device), card.input)
    labelled = order[:RIDGE_IMAGES]
    probes = ProbeData(
        batch=probe[:NASWOT_IMAGES],  # (N, C, H, W)
        images=normalize(data.train_x[labelled].to(ctx.device), card.input),  # (M, C, H, W)
        labels=data.train_y[labelled].to(ctx.device),  # (M,)
    )

    ctx.progress(fraction=0.0, step="partition: features and CKA")
    cache = SimilarityCache(ctx.cache)
    feats: dict[str, list[Tensor]] = {}

    def features(m: str) -> list[Tensor]:  # run the probe through a model only when a matrix is not cached
        if m not in feats:
            feats[m] = tap_features(nets[m], probe_raw, cards[m])
        return feats[m]

    sim = similarity_matrices(
        list(plan.pool), features, {m: cards[m].digest for m in plan.pool}, SimilarityCache.probe_key(probe_raw), cache
    )
    part = search_partition({m: len(nets[m].spatial_taps()) for m in plan.pool}, sim, plan.blocks, seed=spec.train.seed)
    sets = [
        [Block(model=m, start=s, end=e) for m in plan.pool for s, e in [part.blocks(m, nets[m].spatial_taps())[k]]]
        for k in range(plan.blocks)
    ]
    metrics: dict[str, Any] = {
        "pool": list(plan.pool),
        "pool_chosen": plan.chosen,
        "blocks": plan.blocks,
        "partition": [[b.label() for b in s] for s in sets],
        "partition_score": part.score,
        "set_centres": list(part.centres),
        "cka_cache": {"hits": cache.hits, "misses": cache.misses},
    }

    ctx.progress(fraction=0.2, step="assemble: scoring candidates")
    profiles = {m: card_profile(cards[m]) for m in plan.pool}
    cands, smallest = feasible(sets, profiles, len(data.labels), plan.budget)
    if not cands:
        raise InvalidInput(
            f"no assembly of this partition meets the budget {plan.budget.model_dump(exclude_none=True)}; "
            f"the smallest takes max_params={smallest[0]}, max_flops={smallest[1]}"
        )
    scorer = Scorer(nets, card, probe, probes, len(data.labels))
    if len(cands) <= EXACT_MAX:  # a count, not a clock: the same spec and seed always search alike
        ranked = exact(cands, lambda c: scorer(c, proxy))
        metrics |= {"search": "exact", "candidates_scored": len(cands)}
    else:
        unary = [[block_score(proxy, nets[b.model], b, probes) for b in s] for s in sets]
        top = milp_top(sets, unary, profiles, len(data.labels), plan.budget, MILP_TOP)
        ranked = exact(top, lambda c: scorer(c, proxy))
        metrics |= {"search": "milp", "candidates_scored": len(ranked)}
    metrics |= {
        "proxy": proxy_name,
        "candidates_feasible": len(cands),
        "top_candidates": [
            {"blocks": c.label(), "score": c.score, "params": c.params, "flops": c.flops} for c in ranked[:8]
        ],
    }
    return Search(cards, nets, card, data, probe, probes, sets, ranked, metrics)


class Scorer:
    """A proxy's score of a candidate: its network with least-squares stitches, nothing trained.
    Each model's own features of the probe at a tap are computed once for all candidates."""

    def __init__(self, nets: dict[str, TapNet], card: Card, probe: Tensor, probes: ProbeData, num_labels: int):
        self.nets, self.probe, self.probes, self.num_labels = nets, probe, probes, num_labels
        self.memo: dict[tuple[str, str], Tensor] = {}
        self.shapes = shapes_of(nets, list(nets), card.input.channels, card.input.size)

    def assembled(self, cand: Candidate) -> Assembled:
        model = build_assembled(list(cand.blocks), self.nets, self.shapes, self.num_labels)
        fit_stitches(model, list(cand.blocks), self.nets, self.probe, self.memo)
        return model

    def __call__(self, cand: Candidate, proxy: Proxy) -> float:
        model = self.assembled(cand)
        return proxy(model.features, rectifiers(model), self.probes)


def block_score(proxy: Proxy, net: TapNet, block: Block, probes: ProbeData) -> float:
    """The 0-1 program's surrogate term: the proxy of one block inside its own model (the rectifiers
    of the block alone; the model's own features where the block ends)."""
    copy = shared_copy(net).eval()
    units = [r for m in copy.stage_modules(block.start, block.end) for r in rectifiers(m)]
    return proxy(lambda x: copy.run(x, None, block.end), units, probes)


def train_assembly(
    cand: Candidate,
    nets: dict[str, TapNet],
    card: Card,
    data: TaskData,
    probe: Tensor,
    epochs: int,
    lr: float,
    batch_size: int,
    seed: int,
    device: str,
    on_epoch: Callable[[int, float], None] | None = None,
    stitch_all: bool = False,
) -> Assembled:
    """The candidate's network, stitches fitted by least squares, then stitches and head trained
    (the blocks frozen and in eval mode); ``stitch_all`` as in ``build_assembled``."""
    torch.manual_seed(seed)
    shapes = shapes_of(nets, [b.model for b in cand.blocks], card.input.channels, card.input.size)
    model = build_assembled(list(cand.blocks), nets, shapes, len(data.labels), stitch_all)
    fit_stitches(model, list(cand.blocks), nets, probe)
    model.train()
    fit(
        model,
        stitch_params(model),
        data.train_x,
        data.train_y,
        card.input,
        epochs=epochs,
        lr=lr,
        batch_size=batch_size,
        seed=seed,
        device=device,
        on_epoch=on_epoch,
    )
    return model.eval()


def to_artifact(found: Search, cand: Candidate, model: Assembled, device: str = "cpu") -> PathArtifact:
    """The path of a trained candidate: block list, stitches and head; its held-out accuracy in the metrics."""
    card, data = found.card, found.data
    metrics = found.metrics | {
        "accuracy": accuracy(model, data.test_x, data.test_y, card.input, device=device),
        "proxy_score": cand.score,
        "params": cand.params,
        "flops": cand.flops,
        "dense_bytes": assembled_bytes(model),
        "train_samples": len(data.train_x),
        "test_samples": len(data.test_x),
    }
    cfg = ReassembleConfig(
        blocks=cand.blocks, num_classes=len(data.labels), channels=card.input.channels, size=card.input.size
    )
    used = list(dict.fromkeys(b.model for b in cand.blocks))
    return PathArtifact(
        Reassemble.name,
        [BaseRef(id=m, digest=found.cards[m].digest) for m in used],
        data.labels,
        card.input,
        cfg.model_dump(mode="json"),
        path_tensors(model),
        metrics,
    )


def path_tensors(model: Assembled) -> dict[str, Tensor]:
    out = {
        f"stitch.{i}.{k}": v.detach().cpu().float().contiguous()
        for i, s in enumerate(model.stitches)
        if isinstance(s, Stitch)
        for k, v in s.state_dict().items()
        if k in STITCH_KEYS
    }
    return out | {f"head.{k}": v.detach().cpu().contiguous() for k, v in model.head.state_dict().items()}


def run_modules(model: Assembled) -> list[nn.Module]:
    """The modules the assembled network computes with: its blocks' stages, the stitches, the head."""
    blocks = [
        m for net, (start, end) in zip(model.nets, model.spans, strict=True) for m in net.stage_modules(start, end)
    ]
    return [*blocks, model.stitches, model.head]


def assembled_bytes(model: Assembled) -> int:
    """Bytes of the tensors the assembled network computes with (``run_modules``)."""
    return tensor_bytes(t for m in run_modules(model) for t in [*m.parameters(), *m.buffers()])


def _checked(config: dict[str, Any], bases: dict[str, TapNet]) -> tuple[ReassembleConfig, Shapes]:
    """The config, checked against the bases; and the tap shapes of every model it uses."""
    cfg = parse_config(config)
    for i, b in enumerate(cfg.blocks):
        if b.model not in bases:
            raise InvalidInput(f"reassemble block {i} names base {b.model!r}, which the path does not reference")
        taps = bases[b.model].spatial_taps()
        if b.end not in taps or (b.start is not None and b.start not in taps):
            raise InvalidInput(
                f"reassemble block {i}: {b.label()} names a tap that is not a spatial tap of {b.model!r} ({taps})"
            )
        if (b.start is None) != (i == 0):
            raise InvalidInput(f"reassemble block {i}: only the first block starts at the input")
        if b.start is not None and taps.index(b.start) >= taps.index(b.end):
            raise InvalidInput(f"reassemble block {i}: {b.label()} is empty (start is not before end)")
    try:
        shapes = shapes_of(bases, [b.model for b in cfg.blocks], cfg.channels, cfg.size)
    except RuntimeError as e:
        raise InvalidInput(
            f"reassemble config: the bases do not take a {cfg.channels}x{cfg.size}x{cfg.size} input"
        ) from e
    return cfg, shapes
