"""Issue 33's scenarios rerun by hand under wrk: a `zoo serve` (2 HTTP workers) on a loopback port,
16 connections of warm `.npy` predicts for each phase, and beside them what one tenant or one
client does that must not fail anyone else's request:

- *specs*: refused and accepted resample specs (each traced with torch.fx in the inference process);
- *no key*: 256 MiB bodies posted to `/v1/zoo/models` with no key (401 before the body is read);
- *disk full* (root only: the data dir on a small tmpfs, filled): dataset uploads and bundle imports.

Each prints wrk's requests and failed answers (non-2xx and socket errors) and what the side traffic
got. `python -m bench.faults` (bounded: 15 s a phase, loopback only)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import numpy as np
from safetensors.torch import save

from bench.common import dir_store
from bench.http import wrk
from bench.scale import Server, _rss_of, make_paths, one_image
from service.common.procs import descendants
from zoo_store.archs import build_arch
from zoo_store.core.bundle import decode_bundle
from zoo_store.core.cards import CardIn, InputSpec

GRAY = InputSpec(channels=1, size=28, mean=(0.5,), std=(0.5,))
SECONDS, CONNECTIONS = 15, 16


def _zoo(data_dir: Path) -> tuple[list[str], bytes]:
    """A tiny random-weight base and 8 reprogram paths in ``data_dir``; their ids and one path's bundle."""
    store = dir_store(data_dir)
    net = build_arch("resnet_s", {"num_classes": 10})
    store.add_base(
        CardIn(id="res", arch="resnet_s", labels=tuple("0123456789"), input=GRAY, arch_config={}),
        save(net.state_dict()),
    )
    bundles = make_paths(store, "res", 8)
    ids = [store.save_path(decode_bundle(b))[0].id for b in bundles]
    store.db.dispose()
    return ids, bundles[0]


def _beside(server: Server, ids: list[str], work: Path, side: Callable[[threading.Event], Counter]) -> dict:
    """wrk's predicts for SECONDS while ``side`` runs on a thread; wrk's figures and what ``side`` got."""
    stop, got = threading.Event(), {}
    thread = threading.Thread(target=lambda: got.update(side(stop)))
    thread.start()
    try:
        result = wrk(
            server.url, ids, one_image(GRAY)[1], "application/octet-stream", CONNECTIONS, SECONDS, work, server.key
        )
    finally:
        stop.set()
        thread.join(120)
    return {"wrk_requests": result["requests"], "wrk_failed": result["errors"], "side": dict(got)}


def _specs(server: Server) -> Callable[[threading.Event], Counter]:
    specs = [
        {"method": "resample", "base": "res", "budget": {"max_params": 10}},  # traced, then refused
        {"method": "resample", "base": "res", "budget": {"width": 0.5}},
    ]

    def side(stop: threading.Event) -> Counter:
        seen: Counter = Counter()
        while not stop.is_set():
            for spec in specs:
                seen[server.client.post("/v1/compositions", json=spec).status_code] += 1
        return seen

    return side


def _no_key(server: Server, workers: list[int], rss: dict) -> Callable[[threading.Event], Counter]:
    def body() -> Iterator[bytes]:
        chunk = b"\0" * 2**20
        for _ in range(256):
            yield chunk

    def side(stop: threading.Event) -> Counter:
        seen: Counter = Counter()
        rss["before_mib"] = [round(_rss_of(p) / 2**20) for p in workers]
        with httpx.Client(base_url=server.url, timeout=60) as anon:
            for _ in range(4):
                try:
                    seen[anon.post("/v1/zoo/models", content=body()).status_code] += 1
                except httpx.HTTPError as e:  # the worker may close before the body is sent: that is the point
                    seen[type(e).__name__] += 1
        rss["after_mib"] = [round(_rss_of(p) / 2**20) for p in workers]
        return seen

    return side


def _full_disk(server: Server, bundle: bytes) -> Callable[[threading.Event], Counter]:
    buf = io.BytesIO()
    np.savez(buf, x=np.zeros((600, 28, 28), np.uint8), y=np.arange(600) % 10)
    upload = {"file": ("d.npz", buf.getvalue())}

    def side(stop: threading.Event) -> Counter:
        seen: Counter = Counter()
        while not stop.is_set():
            seen["upload " + str(server.client.post("/v1/datasets", files=upload).status_code)] += 1
            seen["import " + str(server.client.post("/v1/paths/import", content=bundle).status_code)] += 1
            time.sleep(0.2)
        return seen

    return side


def _workers(server: Server) -> list[int]:
    return [p for p, cmd in descendants(server.proc.pid).items() if "front" in cmd or "multiprocessing" in cmd]


def main() -> None:
    report: dict = {}
    with tempfile.TemporaryDirectory(prefix="zoo-faults-") as tmp:
        root = Path(tmp)
        ids, _ = _zoo(root / "data")
        server = Server(root / "data", workers=2)
        try:
            report["specs"] = _beside(server, ids, root, _specs(server))
            rss: dict = {}
            report["no key"] = {**_beside(server, ids, root, _no_key(server, _workers(server), rss)), **rss}
        finally:
            server.close()
    if os.geteuid() == 0:
        report["disk full"] = _disk_full()
    print(json.dumps(report, indent=1))


def _disk_full() -> dict:
    """The data dir on a 64 MiB tmpfs, filled but for a little, then the same load and writes."""
    with tempfile.TemporaryDirectory(prefix="zoo-faults-full-") as tmp:
        mount = Path(tmp)
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mount)], check=True)
        try:
            ids, bundle = _zoo(mount / "data")
            server = Server(mount / "data", workers=2)
            try:
                server.client.delete(f"/v1/paths/{ids[0]}")  # its import must write again
                free = os.statvfs(mount).f_bavail * os.statvfs(mount).f_frsize
                (mount / "filler").write_bytes(b"\0" * max(0, free - 256 * 1024))
                with tempfile.TemporaryDirectory(prefix="zoo-faults-wrk-") as work:  # not on the full disk
                    result = _beside(server, ids[1:], Path(work), _full_disk(server, bundle))
                result["temporary_files_left"] = [str(p) for p in (mount / "data").rglob(".put-*")]
                return result
            finally:
                server.close()
        finally:
            subprocess.run(["umount", "-l", str(mount)], check=False)


if __name__ == "__main__":
    main()
