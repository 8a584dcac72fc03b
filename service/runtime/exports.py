"""Standalone exports of paths (ONNX, ``torch.export``), built once per path and format and kept as
files: a path's id is its bundle's digest, so ``<path id>.<format>`` names the same bytes for as long
as it exists. One build per file at a time; others asking meanwhile wait for it."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from torch import nn

from service.runtime.zoo import ResidentZoo
from zoo_store.archs import TapNet, build_for
from zoo_store.archs.export import Format, export_path
from zoo_store.core.bundle import decode_stored
from zoo_store.core.cards import Card
from zoo_store.core.errors import InsufficientStorage
from zoo_store.core.keystore import atomic_write
from zoo_store.core.weights import load_into
from zoo_store.methods import get_method
from zoo_store.store.store import Store
from zoo_store.training import freeze

log = logging.getLogger("zoo.exports")


class ExportCache:
    def __init__(self, root: Path, store: Store, zoo: ResidentZoo):
        self.root = root
        self.store = store
        self.zoo = zoo
        self._lock = threading.Lock()
        self._building: dict[str, threading.Lock] = {}

    def file(self, path_id: str, fmt: Format) -> Path | bytes:
        """The export's file, built on first ask (call it off the event loop: that takes seconds); its
        bytes instead where the disk is too full to keep it (the export is served all the same)."""
        target = self.root / f"{path_id}.{fmt}"
        if target.exists():
            return target
        with self._lock:
            building = self._building.setdefault(target.name, threading.Lock())
        try:
            with building:
                if target.exists():
                    return target
                data = self._build(path_id, fmt)
                try:
                    atomic_write(target, data, "the export")
                except InsufficientStorage:
                    log.warning("export of %s not kept (the disk is full); served from memory", path_id)
                    return data
            return target
        finally:
            with self._lock:
                self._building.pop(target.name, None)

    def forget(self, path_id: str) -> None:
        for f in self.root.glob(f"{path_id}.*"):
            f.unlink(missing_ok=True)

    def _build(self, path_id: str, fmt: Format) -> bytes:
        """The path materialized afresh from its bundle on pristine CPU copies of its bases (built from
        their cards, loaded with the resident weights): tracing swaps parameters, which the resident
        bases that predicts share must never see, and a served module carries state of its own (a
        bank's, a device's) that a file must not."""
        bundle = decode_stored(self.store.path_bundle(path_id), path_id)
        m = bundle.manifest
        self.zoo.check_refs(m)
        nets = {ref.id: _pristine(*self.zoo.bases[ref.id]) for ref in m.bases}
        module = get_method(m.method).materialize(m.config, bundle.tensors, nets).eval()
        family = ", ".join(sorted({self.zoo.bases[ref.id][0].arch for ref in m.bases}))
        return export_path(module, m.input, m.labels, path_id, fmt, family)


def _pristine(card: Card, resident: nn.Module) -> TapNet:
    net = build_for(card).eval()
    load_into(net, {k: v.detach().cpu().clone() for k, v in resident.state_dict().items()})
    return freeze(net)
