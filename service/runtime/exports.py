"""Standalone exports of paths (ONNX, ``torch.export``), built once per path and format and kept as
files: a path's id is its bundle's digest, so ``<path id>.<format>`` names the same bytes for as long
as it exists. One build per file at a time; others asking meanwhile wait for it.

Exports are built in a child process of their own (one per server process, started on the first
export, spawned, reused): ``torch.export`` traces by patching ``nn.Module.__call__`` for the whole
process, so a job's training or a predict running in another thread meanwhile would be traced into
the export, and would itself run through the tracer. The child gets the stored bundle and the bases'
cards and weights, and never sees a resident module."""

from __future__ import annotations

import logging
import multiprocessing
import threading
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

from torch import Tensor, nn

from service.runtime.zoo import ResidentZoo
from zoo_store.archs import TapNet, build_for
from zoo_store.archs.export import Format, export_path
from zoo_store.core.bundle import decode_stored
from zoo_store.core.cards import Card
from zoo_store.core.errors import InsufficientStorage, Unavailable
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
        stored = self.store.path_bundle(path_id)
        m = decode_stored(stored, path_id).manifest
        self.zoo.check_refs(m)
        bases = {ref.id: _cpu_copy(*self.zoo.bases[ref.id]) for ref in m.bases}
        family = ", ".join(sorted({card.arch for card, _ in bases.values()}))
        job = (stored, path_id, bases, fmt, family)
        try:
            return _in_child(*job)
        except BrokenProcessPool:  # the child died since the last export (killed for memory...): anew, once
            pass
        try:
            return _in_child(*job)
        except BrokenProcessPool as e:
            raise Unavailable(f"the export process stopped while exporting {path_id} ({e}); ask again") from e


_EXPORTER: ProcessPoolExecutor | None = None
_EXPORTER_LOCK = threading.Lock()


def _exporter() -> ProcessPoolExecutor:
    """This process's export child: one, so exports queue; spawned (a fork would copy threads' locks)."""
    global _EXPORTER
    with _EXPORTER_LOCK:
        if _EXPORTER is None:
            _EXPORTER = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
        return _EXPORTER


def _in_child(*job) -> bytes:
    """``build_export(*job)`` in the export child; a child found dead is dropped (the next call starts one)."""
    global _EXPORTER
    child = _exporter()
    try:
        return child.submit(build_export, *job).result()
    except BrokenProcessPool:
        with _EXPORTER_LOCK:
            if _EXPORTER is child:
                _EXPORTER = None
        child.shutdown(wait=False, cancel_futures=True)
        raise


def _cpu_copy(card: Card, resident: nn.Module) -> tuple[Card, dict[str, Tensor]]:
    return card, {k: v.detach().cpu().clone() for k, v in resident.state_dict().items()}


def build_export(
    stored: bytes, path_id: str, bases: dict[str, tuple[Card, dict[str, Tensor]]], fmt: Format, family: str
) -> bytes:
    """In the export child: the path materialized afresh from its bundle on bases built from their
    cards and loaded with the resident weights (a served module carries state of its own, a bank's or
    a device's, that a file must not), exported."""
    bundle = decode_stored(stored, path_id)
    m = bundle.manifest
    nets = {ref_id: freeze(_loaded(card, weights)) for ref_id, (card, weights) in bases.items()}
    module = get_method(m.method).materialize(m.config, bundle.tensors, nets).eval()
    return export_path(module, m.input, m.labels, path_id, fmt, family)


def _loaded(card: Card, weights: dict[str, Tensor]) -> TapNet:
    net = build_for(card).eval()
    load_into(net, weights)
    return net
