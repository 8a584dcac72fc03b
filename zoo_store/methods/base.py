"""What a composition method is: the ``Method`` base class and what a build gets (``BuildContext``).

How to add a method (``reprogram/`` is the reference):

1. A folder ``zoo_store/methods/<name>/`` with ``config.py`` (the method's typed config, parsed from
   the spec), ``layers.py`` (the modules it inserts or builds, with shape comments) and
   ``method.py`` (the ``Method`` subclass), and an ``__init__.py`` that imports it.
2. Subclass ``Method``, set ``name``, decorate the class with
   ``zoo_store.methods.registry.register_method`` (a second method of the same name is an error),
   and override:
   - ``validate(spec, cards)``: check the spec against the zoo's cards (raise ``InvalidInput`` with
     what was received) and return the ids of the bases the build needs;
   - ``build(spec, ctx)``: train only the small parts, bases frozen and in eval mode, reporting
     through ``ctx.progress``; return a ``PathArtifact`` (config JSON + a few tensors);
   - ``expected_tensors(config, bases)``: name -> (dtype, shape) of every tensor a path holds, so
     an imported bundle is checked before anything is written;
   - ``materialize(config, tensors, bases)``: an ``nn.Module`` over the resident bases (sharing
     their weights) from normalized input to logits;
   - optionally ``refusal(net)`` (architectures it cannot apply to), ``check_input`` and
     ``bank_key``/``bank`` (mixed-path batches over one base).
3. Import the folder in ``zoo_store/methods/__init__.py``; the tests parametrized over
   ``method_names()`` then run the contract tests on it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ValidationError
from torch import nn

from zoo_store.archs import TapNet, build_for
from zoo_store.core.bundle import PathArtifact
from zoo_store.core.cards import Card, InputSpec
from zoo_store.core.errors import InvalidInput
from zoo_store.core.keystore import KeyStore, MemoryKeyStore
from zoo_store.core.spec import CompositionSpec, TaskSpec
from zoo_store.datasets.tasks import TaskData
from zoo_store.methods.bank import PathBank

ExpectedTensors = dict[str, tuple[str, tuple[int, ...]]]


class Cancelled(Exception):
    """Raised inside a build when the job was cancelled."""


@dataclass
class BuildContext:
    """What a method's build gets: the resident bases, data loading, progress and cancellation."""

    bases: dict[str, tuple[Card, TapNet]]
    load_task: Callable[[TaskSpec, Card], TaskData]
    device: str = "cpu"
    report: Callable[..., None] = lambda **kw: None  # report(fraction=..., epoch=..., loss=...)
    cancelled: Callable[[], bool] = lambda: False
    log: list[str] = field(default_factory=list)
    cache: KeyStore = field(default_factory=MemoryKeyStore)  # derived data (similarity matrices) jobs may reuse

    def progress(self, **info: Any) -> None:
        if self.cancelled():
            raise Cancelled("job was cancelled")
        self.report(**info)


class Method(ABC):
    name: ClassVar[str]
    standalone: ClassVar[bool] = False  # its materialized paths are plain networks of the base's architecture
    required: ClassVar[tuple[str, ...]] = ()  # spec fields it cannot do without (the OpenAPI union says so)
    fields: ClassVar[tuple[str, ...]] = ()  # every spec field it reads, in the order a form asks for them
    budget_model: ClassVar[type[BaseModel] | None] = None  # what ``spec.budget`` may hold; None: not read
    options: ClassVar[type[BaseModel] | None] = None  # what ``spec.options`` may hold; None: nothing

    @abstractmethod
    def validate(self, spec: CompositionSpec, cards: dict[str, Card]) -> list[str]:
        """Check the spec against the zoo's cards; raise InvalidInput; return the base ids it needs."""

    def refusal(self, net: TapNet) -> str | None:
        """Why this method cannot apply to a base of this architecture, or None when it can."""
        return None

    def check(self, spec: CompositionSpec, cards: dict[str, Card]) -> list[str]:
        """``validate``, then each base's architecture (shapes only) against ``refusal``: a method that
        cannot apply is refused before any work starts."""
        self.parse_options(spec)
        ids = self.validate(spec, cards)
        for base_id in ids:
            if reason := self.refusal(build_for(cards[base_id], meta=True)):
                raise InvalidInput(
                    f"method {self.name!r} cannot apply to base {base_id!r} ({cards[base_id].arch}): {reason}"
                )
        return ids

    def parse_options(self, spec: CompositionSpec) -> BaseModel | None:
        """``spec.options`` as this method's ``options`` model; InvalidInput says what was wrong."""
        if self.options is None:
            if spec.options:
                raise InvalidInput(f"method {self.name!r} takes no options; got {sorted(spec.options)}")
            return None
        try:
            return self.options.model_validate(spec.options)
        except ValidationError as e:
            problems = "; ".join(f"options.{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
            raise InvalidInput(f"bad {self.name} options {spec.options}: {problems}") from e

    @abstractmethod
    def build(self, spec: CompositionSpec, ctx: BuildContext) -> PathArtifact:
        """Train the small parts (bases frozen) and return the path."""

    @abstractmethod
    def expected_tensors(self, config: dict[str, Any], bases: dict[str, TapNet]) -> ExpectedTensors:
        """Name -> (dtype, shape) of every tensor a path of this config must hold."""

    def check_input(self, config: dict[str, Any], spec: InputSpec) -> None:  # noqa: B027 - a hook, not abstract
        """Refuse a config that disagrees with the path's input spec (nothing to check unless overridden)."""

    @abstractmethod
    def materialize(
        self, config: dict[str, Any], tensors: dict[str, torch.Tensor], bases: dict[str, TapNet]
    ) -> nn.Module:
        """A module over the resident bases (sharing their weights) mapping normalized input to logits."""

    def bank_key(self, config: dict[str, Any]) -> str | None:
        """The key of the ``PathBank`` that serves paths of this config in mixed-path batches, or None
        when each path is served by its own module (the default)."""
        return None

    def bank(self, config: dict[str, Any], bases: dict[str, TapNet]) -> PathBank:
        """A new, empty bank for ``bank_key(config)`` over the resident bases (only if that is not None)."""
        raise NotImplementedError(f"method {self.name!r} serves each path with its own module")


def no_spatial_tap(net: TapNet) -> str | None:
    """The refusal of the methods that cut networks at taps or join them there."""
    if net.spatial_taps():
        return None
    return (
        f"it has no spatial tap (a feature map that is the only value the rest of the network reads), so it "
        f"cannot be cut or joined; its taps: {[t.name for t in net.taps]}"
    )


def one_base(method: str, spec: CompositionSpec, cards: dict[str, Card]) -> Card:
    """The card of ``spec.base`` for a method that composes one base (and takes no sources/models)."""
    if not spec.base:
        raise InvalidInput(f"method {method!r} needs 'base': the id of the zoo model it starts from")
    if spec.base not in cards:
        raise InvalidInput(f"unknown base {spec.base!r}; the zoo has {sorted(cards)}")
    unused = [f for f in ("sources", "models", "blocks") if getattr(spec, f)]
    if unused:
        raise InvalidInput(f"method {method!r} does not take {unused}")
    return cards[spec.base]
