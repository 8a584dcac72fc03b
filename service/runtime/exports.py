"""Standalone exports of paths (ONNX, ``torch.export``), built once per path and format and kept as
files: a path's id is its bundle's digest, so ``<path id>.<format>`` names the same bytes for as long
as it exists. One build per file at a time; others asking meanwhile wait for it."""

from __future__ import annotations

import copy
import logging
import os
import tempfile
import threading
from pathlib import Path

from service.runtime.cache import PathCache
from service.runtime.zoo import ResidentZoo
from zoo_store.archs.export import Format, export_path
from zoo_store.core.errors import storage_full
from zoo_store.methods import get_method

log = logging.getLogger("zoo.exports")


class ExportCache:
    def __init__(self, root: Path, cache: PathCache, zoo: ResidentZoo):
        self.root = root
        self.cache = cache
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
                    self._write(target, data)
                except OSError as e:
                    if storage_full(e) is None:
                        raise
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
        entry = self.cache.get(path_id)
        m = entry.path_manifest
        nets = self.zoo.nets_of(m)
        if entry.module is not None:
            module = entry.module
        else:  # a path served from a bank slot: its own module, as an unbatched predict would run it
            module = get_method(m.method).materialize(m.config, entry.tensors, nets)
        # a copy on the CPU: tracing swaps parameters for fake ones, which predicts sharing the
        # resident bases must never see; and the file must not name this server's device
        module = copy.deepcopy(module).cpu().eval()
        family = ", ".join(sorted({self.zoo.bases[b.id][0].arch for b in m.bases}))
        return export_path(module, m.input, m.labels, path_id, fmt, family)

    def _write(self, target: Path, data: bytes) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".building-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, target)
        finally:
            Path(tmp).unlink(missing_ok=True)
