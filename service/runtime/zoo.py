"""The resident zoo: every base a worker serves, loaded once on its device, frozen, never written;
and the one check a bundle passes before it is stored or served."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import torch
from torch import nn

from zoo_store.archs import TapNet
from zoo_store.core.bundle import Bundle, check_expected
from zoo_store.core.cards import Card
from zoo_store.core.errors import Conflict, InvalidInput, NotFound, Unavailable
from zoo_store.core.manifest import Manifest
from zoo_store.core.weights import digest_of
from zoo_store.methods import get_method
from zoo_store.store.store import Store

log = logging.getLogger("zoo")


class ResidentZoo:
    """Every base this worker serves, loaded once, frozen, in eval mode; the networks are never
    written to. ``bases`` is replaced, never changed in place, so readers may iterate it unlocked."""

    def __init__(self, store: Store, device: str):
        self.store = store
        self.device = device
        self.bases: dict[str, tuple[Card, TapNet]] = {}
        self._ptrs: dict[str, frozenset[int]] = {}  # per base: the storage of its tensors (bases never change)
        self.unloadable: set[str] = set()  # bases ``follow`` failed to load (e.g. an architecture unknown here)
        self._lock = threading.Lock()

    def load_all(self) -> None:
        for card in self.store.cards().values():
            self.add(card)

    def add(self, card: Card) -> None:
        if card.id in self.bases:
            return
        net = self.store.load_base(card, self.device)  # outside the lock: other bases stay reachable meanwhile
        with self._lock:
            if card.id not in self.bases:
                self.bases = {**self.bases, card.id: (card, net)}

    @property
    def version(self) -> int:
        """The zoo version this process has: the bases it holds (see ``Store.zoo_version``)."""
        return len(self.bases)

    def follow(self) -> list[str]:
        """Load the bases registered (through any process) since this one last looked; the ids of
        those it loaded. One that fails to load is logged and skipped: it cannot hold up the rest."""
        if self.store.zoo_version() == self.version + len(self.unloadable):
            return []
        loaded = []
        for card in self.store.cards().values():
            if card.id in self.bases or card.id in self.unloadable:
                continue
            try:
                self.add(card)
                loaded.append(card.id)
            except Exception:
                self.unloadable.add(card.id)  # said once; a path that needs it gets the error on its request
                log.exception("base %s could not be loaded; skipped", card.id)
        return loaded

    def follow_every(self, seconds: float, stop: threading.Event, also: Callable[[], None] = lambda: None) -> None:
        """``follow`` (then ``also``) every ``seconds`` on a background thread until ``stop`` is set."""

        def loop() -> None:
            while not stop.wait(seconds):
                try:
                    for base_id in self.follow():
                        log.warning("zoo version %d: loaded base %s, registered elsewhere", self.version, base_id)
                    also()
                except Unavailable:  # the database is away for a moment (its Database logs that once); the next look
                    pass
                except Exception:
                    log.warning("could not follow the zoo", exc_info=True)

        threading.Thread(target=loop, name="zoo-follow", daemon=True).start()

    def nets_of(self, manifest: Manifest) -> dict[str, TapNet]:
        """Only the bases a path references (and ``check_refs`` verified): its config may name no other."""
        return {r.id: self.bases[r.id][1] for r in manifest.bases}

    def shared_ptrs(self, manifest: Manifest) -> set[int]:
        """Data pointers of the tensors of the bases a path references: what its module shares, not adds."""
        for r in manifest.bases:
            if r.id not in self._ptrs:
                net = self.bases[r.id][1]
                self._ptrs[r.id] = frozenset(t.data_ptr() for t in [*net.parameters(), *net.buffers()])
        return set().union(*(self._ptrs[r.id] for r in manifest.bases))

    def digests(self) -> dict[str, str]:
        """Recomputed from the resident tensors: proof that nothing wrote to them."""
        return {k: digest_of(net) for k, (_, net) in self.bases.items()}

    def check_refs(self, manifest: Manifest) -> None:
        """Every base a path needs is resident with its digest; one registered since this process
        started (through another replica) is loaded from the store first."""
        for ref in manifest.bases:
            if ref.id not in self.bases:
                try:
                    self.add(self.store.card(ref.id))
                except NotFound:
                    raise Conflict(
                        f"path needs base {ref.id!r} (digest {ref.digest[:12]}…), which this zoo lacks"
                    ) from None
            have = self.bases[ref.id][0].digest
            if have != ref.digest:
                raise Conflict(f"path needs base {ref.id!r} with digest {ref.digest[:12]}…; this zoo has {have[:12]}…")


def validate_bundle(bundle: Bundle, zoo: ResidentZoo) -> nn.Module:
    """Everything an import checks beyond the bundle's own digest; returns the built module."""
    m = bundle.manifest
    method = get_method(m.method)
    zoo.check_refs(m)
    for ref in m.bases:
        card = zoo.bases[ref.id][0]
        if m.input != card.input:
            raise InvalidInput(
                f"path input spec {m.input.model_dump()} differs from base {card.id!r}'s {card.input.model_dump()}"
            )
    method.check_input(m.config, m.input)
    nets = zoo.nets_of(m)
    check_expected(m, method.expected_tensors(m.config, nets))
    module = method.materialize(m.config, bundle.tensors, nets)
    with torch.inference_mode():
        x = torch.zeros(1, m.input.channels, m.input.size, m.input.size, device=zoo.device)
        out = module(x)
    if tuple(out.shape) != (1, len(m.labels)):
        raise InvalidInput(f"path produces {tuple(out.shape[1:])} outputs for {len(m.labels)} labels")
    return module
