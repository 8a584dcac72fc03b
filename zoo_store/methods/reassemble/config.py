"""The reassembly a spec resolves to: the pool, the number of blocks K, the budget; and what a path
stores in its JSON config."""

from __future__ import annotations

import itertools
import math
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from zoo_store.core.cards import Card
from zoo_store.core.errors import InvalidInput
from zoo_store.core.spec import CompositionSpec
from zoo_store.methods.reassemble.profile import Block, Profile, assembly_cost, card_profile, head_cost
from zoo_store.methods.reassemble.proxies import DEFAULT_PROXY, ProxyName

DEFAULT_BLOCKS = 3
EXACT_COMBINATIONS = 20_000  # (choice, partitions) pairs the POST-time budget check enumerates at most


class Budget(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    max_params: int | None = Field(None, ge=1, strict=True, description="the most parameters the assembly has")
    max_flops: int | None = Field(
        None, ge=1, strict=True, description="the most FLOPs of one forward (2 per multiply-add)"
    )

    def admits(self, params: int, flops: int) -> bool:
        return (self.max_params is None or params <= self.max_params) and (
            self.max_flops is None or flops <= self.max_flops
        )


class ReassembleOptions(BaseModel):
    """``spec.options`` of a reassemble spec: which training-free score ranks the assemblies (proxies.py)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    proxy: ProxyName = Field(
        DEFAULT_PROXY,
        description="the score that ranks assemblies before any training: NASWOT, NASWOT corrected for "
        "the number of rectifier units, or a ridge linear probe of the pooled features on training images",
    )


class ReassemblePlan(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    pool: tuple[str, ...]
    blocks: int
    budget: Budget
    chosen: bool  # True when the pool was picked from the zoo (no 'models' in the spec)


class ReassembleConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    blocks: tuple[Block, ...] = Field(min_length=1)
    num_classes: int = Field(ge=2)
    channels: int = Field(ge=1, le=4)  # the input the first block takes (stitch shapes derive from it)
    size: int = Field(ge=4, le=1024)


def plan_reassemble(spec: CompositionSpec, cards: dict[str, Card]) -> ReassemblePlan:
    """Resolve a reassemble spec against the zoo's cards; every inconsistency is an InvalidInput naming it
    (the budget's feasibility is ``check_budget``'s)."""
    if spec.task is None:
        raise InvalidInput("method 'reassemble' needs 'task': {'dataset': id} to assemble a network for")
    unused = [f for f in ("base", "sources") if getattr(spec, f)]
    if unused:
        raise InvalidInput(f"method 'reassemble' does not take {unused}; name the pool in 'models'")
    k = spec.blocks or DEFAULT_BLOCKS
    try:
        budget = Budget.model_validate(spec.budget)
    except ValidationError as e:
        err = e.errors()[0]
        raise InvalidInput(f"bad reassemble budget.{'.'.join(str(x) for x in err['loc'])}: {err['msg']}") from e
    pool = _checked_pool(spec.models, k, cards) if spec.models is not None else _default_pool(k, cards)
    if len(pool) < 2:
        raise InvalidInput(
            f"a reassembly needs a pool of at least two compatible models (with at least {k} "
            f"spatial taps and the same input); found {list(pool)}"
        )
    return ReassemblePlan(pool=pool, blocks=k, budget=budget, chosen=spec.models is None)


def check_budget(plan: ReassemblePlan, cards: dict[str, Card], num_labels: int = 2) -> None:
    """Refuse a budget that no assembly of any partition meets, naming the smallest that would do (for a
    head over ``num_labels``; 2, the fewest a task has, before the task's labels are known)."""
    budget, k = plan.budget, plan.blocks
    if budget.max_params is None and budget.max_flops is None:
        return
    profiles = {m: card_profile(cards[m]) for m in plan.pool}
    if _combinations(profiles, k) <= EXACT_COMBINATIONS:
        (params, flops), says = smallest_assembly(profiles, k, num_labels), "the smallest takes"
    else:  # too many to enumerate in a request: a bound here, the exact check in the job
        (params, flops), says = cheapest_bound(profiles, k, num_labels), "every assembly takes at least"
    if not budget.admits(params, flops):
        raise InvalidInput(
            f"no assembly of {k} blocks from {list(plan.pool)} meets the budget "
            f"{budget.model_dump(exclude_none=True)}; "
            f"{says} max_params={params}, max_flops={flops}"
        )


def _checked_pool(models: list[str], k: int, cards: dict[str, Card]) -> tuple[str, ...]:
    if not models:
        raise InvalidInput(
            "'models' is empty: name at least two pool models, or leave it out for every compatible base"
        )
    unknown = [m for m in models if m not in cards]
    if unknown:
        raise InvalidInput(f"unknown pool models {unknown}; the zoo has {sorted(cards)}")
    short = {m: len(card_profile(cards[m]).stages) for m in models if len(card_profile(cards[m]).stages) < k}
    if short:
        raise InvalidInput(
            f"pool models {short} have fewer spatial taps than blocks={k}: they cannot be cut into {k} blocks"
        )
    first = cards[models[0]].input
    other = [m for m in models if cards[m].input != first]
    if other:
        raise InvalidInput(
            f"pool models {other} take another input than {models[0]!r} ({first.model_dump()}); a pool shares one input"
        )
    return tuple(dict.fromkeys(models))


def _default_pool(k: int, cards: dict[str, Card]) -> tuple[str, ...]:
    """Every base that can be cut into K blocks, among those sharing the most common input."""
    able = [c for c in sorted(cards.values(), key=lambda c: c.id) if len(card_profile(c).stages) >= k]
    groups: dict[str, list[str]] = {}
    for c in able:
        groups.setdefault(c.input.model_dump_json(), []).append(c.id)
    return tuple(max(groups.values(), key=len, default=[]))


def partitions(profile: Profile, k: int) -> list[tuple[Block, ...]]:
    """Every way to cut a network's spatial stages into ``k`` contiguous non-empty blocks (``model`` left empty)."""
    taps = [s.tap for s in profile.stages]
    out = []
    for cuts in itertools.combinations(range(len(taps) - 1), k - 1):
        ends = [*cuts, len(taps) - 1]
        starts = [None, *(taps[c] for c in cuts)]
        out.append(tuple(Block(model="", start=s, end=taps[e]) for s, e in zip(starts, ends, strict=True)))
    return out


def smallest_assembly(profiles: dict[str, Profile], k: int, num_labels: int) -> tuple[int, int]:
    """The fewest parameters (and, separately, FLOPs) of any assembly: any partition of each model,
    one block per position. Exhaustive over partitions and choices (pools here are small)."""
    cuts = {m: partitions(p, k) for m, p in profiles.items()}
    best_p = best_f = None
    for choice in itertools.product(list(profiles), repeat=k):
        used = list(dict.fromkeys(choice))
        for parts in itertools.product(*(cuts[m] for m in used)):
            of = dict(zip(used, parts, strict=True))
            blocks = [of[m][i].model_copy(update={"model": m}) for i, m in enumerate(choice)]
            p, f = assembly_cost(blocks, profiles, num_labels)
            best_p = p if best_p is None else min(best_p, p)
            best_f = f if best_f is None else min(best_f, f)
    assert best_p is not None and best_f is not None
    return best_p, best_f


def _combinations(profiles: dict[str, Profile], k: int) -> int:
    """How many (choice of models, partition of each) pairs ``smallest_assembly`` would visit."""
    parts = {m: len(partitions(p, k)) for m, p in profiles.items()}
    return sum(math.prod(parts[m] for m in set(choice)) for choice in itertools.product(list(profiles), repeat=k))


def cheapest_bound(profiles: dict[str, Profile], k: int, num_labels: int) -> tuple[int, int]:
    """A lower bound on any assembly's (params, flops): the cheapest block any model can put at each
    position, no stitches, the cheapest head."""
    cuts = {m: partitions(p, k) for m, p in profiles.items()}
    own = [[profiles[m].block(part[i].start, part[i].end) for m in profiles for part in cuts[m]] for i in range(k)]
    heads = [
        head_cost(Block(model=m, start=None, end=profiles[m].stages[-1].tap), profiles, num_labels) for m in profiles
    ]
    return (
        sum(min(p for p, _ in row) for row in own) + min(p for p, _ in heads),
        sum(min(f for _, f in row) for row in own) + min(f for _, f in heads),
    )


def parse_config(config: dict[str, Any]) -> ReassembleConfig:
    try:
        return ReassembleConfig.model_validate(config)
    except ValidationError as e:
        raise InvalidInput(f"bad reassemble config: {e.errors()[0]['msg']}") from e
