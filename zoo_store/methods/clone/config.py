"""The clone plan a spec resolves to: target, sources with the labels each brings, final labels."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from zoo_store.core.cards import Card
from zoo_store.core.errors import InvalidInput
from zoo_store.core.spec import CompositionSpec


class CloneSource(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str
    labels: tuple[str, ...] = Field(min_length=1)  # the labels cloned from this source


class ClonePlan(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    target: str
    sources: tuple[CloneSource, ...] = Field(min_length=1)
    labels: tuple[str, ...]  # the composed network's labels, in order
    chosen: bool = False  # True when the sources were picked from the zoo cards


def plan_clone(spec: CompositionSpec, cards: dict[str, Card]) -> ClonePlan:
    """Resolve a clone spec against the zoo's cards; every inconsistency is an InvalidInput naming it."""
    if not spec.base:
        raise InvalidInput("method 'clone' needs 'base': the id of the target network")
    if spec.base not in cards:
        raise InvalidInput(f"unknown base {spec.base!r}; the zoo has {sorted(cards)}")
    if spec.task is None:
        raise InvalidInput("method 'clone' needs 'task': {'dataset': id} with the correction data")
    if spec.models:
        raise InvalidInput("method 'clone' does not take 'models'; name sources as [{'model', 'labels'}]")
    if spec.blocks:
        raise InvalidInput("method 'clone' does not take 'blocks' (that is for 'reassemble')")
    target = cards[spec.base]
    if spec.sources:
        sources = tuple(_checked_source(s.model, s.labels, target, cards) for s in spec.sources)
        requested = spec.task.labels or [*target.labels, *(x for s in sources for x in s.labels)]
        uncovered = [x for x in requested if x not in target.labels and all(x not in s.labels for s in sources)]
        if uncovered:
            raise InvalidInput(f"labels {uncovered} are known to neither the target {target.id!r} nor the sources")
        return ClonePlan(target=target.id, sources=sources, labels=tuple(dict.fromkeys(requested)))
    if not spec.task.labels:
        raise InvalidInput("nothing to clone: give 'sources' or 'task.labels' with labels the target lacks")
    missing = [x for x in dict.fromkeys(spec.task.labels) if x not in target.labels]
    if not missing:
        raise InvalidInput(f"the target {target.id!r} already knows every requested label; nothing to clone")
    return ClonePlan(
        target=target.id,
        sources=_choose_sources(missing, target, cards),
        labels=tuple(dict.fromkeys(spec.task.labels)),
        chosen=True,
    )


def _checked_source(model: str, labels: list[str], target: Card, cards: dict[str, Card]) -> CloneSource:
    if model not in cards:
        raise InvalidInput(f"unknown source model {model!r}; the zoo has {sorted(cards)}")
    if model == target.id:
        raise InvalidInput(f"source {model!r} is the target itself")
    card = cards[model]
    unknown = [x for x in labels if x not in card.labels]
    if unknown:
        raise InvalidInput(f"source {model!r} does not know labels {unknown}; it knows {list(card.labels)}")
    if card.input != target.input:
        raise InvalidInput(
            f"source {model!r} takes input {card.input.model_dump()}, the target {target.id!r} "
            f"takes {target.input.model_dump()}"
        )
    return CloneSource(model=model, labels=tuple(labels))


def _choose_sources(missing: list[str], target: Card, cards: dict[str, Card]) -> tuple[CloneSource, ...]:
    """Greedy cover: the card that knows most of the still-missing labels first (fewer labels, then
    id, break ties), among those that take the target's input."""
    pool = [c for c in cards.values() if c.id != target.id and c.input == target.input]
    left, chosen = list(missing), []
    while left:
        best = min(pool, key=lambda c: (-sum(x in c.labels for x in left), len(c.labels), c.id), default=None)
        if best is None or not any(x in best.labels for x in left):
            raise InvalidInput(f"labels {left} are known to no base of the zoo that takes the target's input")
        chosen.append(CloneSource(model=best.id, labels=tuple(x for x in left if x in best.labels)))
        left = [x for x in left if x not in best.labels]
        pool.remove(best)
    return tuple(chosen)
