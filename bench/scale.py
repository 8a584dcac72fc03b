"""The scale suite: N reprogram paths of one base under uniform and Zipf(1.1) traffic, through the
inference loop alone and through the real HTTP server (uvicorn on a loopback port, ``.npy``
bodies, a load generator in its own process); the mixed-path executor (``batching=base``) beside
the per-path one (``batching=path``), in the same run. Then memory per registered path and per
resident slot, and cold against warm predicts."""

from __future__ import annotations

import asyncio
import base64
import gc
import io
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import torch

from bench.common import Say, bench_data_dir, demo_store, dir_store
from service.api.state import Services
from service.common.procs import descendants
from zoo_store.archs import build_arch
from zoo_store.core.bundle import PathArtifact, decode_bundle, encode_bundle, make_manifest
from zoo_store.core.cards import CardIn, InputSpec
from zoo_store.core.settings import Settings
from zoo_store.methods.reprogram.layers import build_reprogrammed

TV_BASE = "tv-resnet18-64"  # torchvision resnet18, random weights, 64 x 64 RGB inputs
IMAGENET = InputSpec(channels=3, size=64, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
GiB = 2**30


@dataclass(frozen=True)
class Plan:
    sizes: tuple[int, ...]
    requests: int
    concurrency: int
    imported: int  # paths registered through HTTP (memory per registered path); the rest written directly
    cold: int  # fresh paths for cold / warm predicts
    repeats: int  # closed loops per N and traffic for the mixed executor (the per-path one: one each)


FULL = Plan(sizes=(1, 16, 256, 1024, 4096), requests=4096, concurrency=256, imported=512, cold=200, repeats=5)
QUICK = Plan(sizes=(1, 16, 256), requests=1024, concurrency=64, imported=64, cold=10, repeats=1)


def runs(plan: Plan, executor: str) -> list[tuple[int, str]]:
    """(repeat, traffic) pairs of one N: uniform and Zipf alternate which goes first, each repeat
    draws its own schedule (seeded by the repeat)."""
    order = [("uniform", "zipf"), ("zipf", "uniform")]
    return [(r, t) for r in range(plan.repeats if executor == "mixed" else 1) for t in order[r % 2]]


@dataclass
class Point:
    base: str
    executor: str  # "mixed" (batching=base) or "per-path" (batching=path)
    via: str  # "batcher" or "http"
    n: int
    traffic: str
    per_second: float
    p50_ms: float
    p99_ms: float


def add_tv_base(store) -> None:
    """torchvision resnet18 with seeded random weights at 64 x 64 (the same digest every run)."""
    torch.manual_seed(0)
    weights = build_arch("tv_resnet18", {"num_classes": 1000}).state_dict()
    card = CardIn(
        id=TV_BASE,
        arch="tv_resnet18",
        arch_config={"num_classes": 1000},
        input=IMAGENET,
        labels=tuple(str(i) for i in range(1000)),
        description="torchvision resnet18, random weights",
    )
    store.add_base(card, weights)


def make_paths(store, base_id: str, n: int) -> list[bytes]:
    """n distinct 10-class reprogram paths on ``base_id`` (kernels near identity, random heads):
    each costs the same per forward as a trained one."""
    card = store.card(base_id)
    base = store.load_base(card)
    template = build_reprogrammed(base, 10).delta_state()
    gen = torch.Generator().manual_seed(0)
    bundles = []
    for _ in range(n):
        tensors = {k: (v + 0.05 * torch.randn(v.shape, generator=gen)).contiguous() for k, v in template.items()}
        art = PathArtifact(
            "reprogram",
            [{"id": card.id, "digest": card.digest}],
            [str(i) for i in range(10)],
            card.input,
            {"base": card.id, "num_classes": 10, "kernel": 3},
            tensors,
        )
        bundles.append(encode_bundle(make_manifest(art), tensors, {}))
    return bundles


def schedule(n: int, requests: int, traffic: str, seed: int = 0) -> list[int]:
    """Path indices, one per request: uniform, or Zipf(1.1) over the n paths (ranks shuffled)."""
    rng = np.random.default_rng(seed)
    if traffic == "uniform":
        return rng.integers(0, n, requests).tolist()
    p = np.arange(1, n + 1, dtype=np.float64) ** -1.1
    ranks = rng.permutation(n)
    return ranks[rng.choice(n, requests, p=p / p.sum())].tolist()


def one_image(spec: InputSpec) -> tuple[torch.Tensor, bytes]:
    """One random image as a tensor (1, C, H, W) in [0, 1] and as the uint8 ``.npy`` body."""
    pixels = np.random.default_rng(0).integers(0, 256, (1, spec.channels, spec.size, spec.size), dtype=np.uint8)
    buf = io.BytesIO()
    np.save(buf, pixels)
    return torch.from_numpy(pixels.astype(np.float32) / 255), buf.getvalue()


def rss() -> int:
    return _rss_of(os.getpid())


def on_gpu() -> bool:
    return torch.cuda.is_available()


def slot_memory_now() -> int:
    """Where the slots live: CUDA memory allocated on a GPU, this process's RSS on the CPU."""
    if on_gpu():
        torch.cuda.synchronize()
        return torch.cuda.memory_allocated()
    return rss()


def _rss_of(pid: int) -> int:
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:  # it ended meanwhile
        return 0
    return next((int(line.split()[1]) * 1024 for line in lines if line.startswith("VmRSS:")), 0)


# -- through the inference loop, in process ---------------------------------------------------


def settings_for(data_dir: Path, executor: str) -> Settings:
    return Settings(
        data_dir=data_dir,
        demo_zoo=False,
        job_executor="thread",
        cache_bytes=2 * GiB,
        host_cache_bytes=2 * GiB,
        batching="base" if executor == "mixed" else "path",
    )


async def closed_loop(
    svc, ids: list[str], order: list[int], concurrency: int, x: torch.Tensor
) -> tuple[float, list[float]]:
    """``concurrency`` clients, each sending its next request when the last one is answered."""
    todo = list(reversed(order))
    latencies: list[float] = []

    async def client() -> None:
        while todo:
            path_id = ids[todo.pop()]
            t = time.perf_counter()
            await svc.batcher.submit(svc.cache.get(path_id), x)
            latencies.append(time.perf_counter() - t)

    t = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    return len(order) / (time.perf_counter() - t), latencies


def batcher_points(say: Say, data_dir: Path, base_id: str, ids: list[str], plan: Plan, executor: str) -> list[Point]:
    svc = Services.create(settings_for(data_dir, executor))
    svc.db.migrate()
    svc.zoo.add(svc.store.card(base_id))
    spec = svc.store.card(base_id).input
    x, _ = one_image(spec)
    points = []
    try:
        say(f"scale: {base_id}, {executor} executor, inference loop, warming up")
        asyncio.run(closed_loop(svc, ids, [0] * (plan.requests // 4), plan.concurrency, x))  # untimed
        for n in plan.sizes:
            say(f"scale: {base_id}, {executor} executor, inference loop, {n} paths")
            for p in ids[:n]:
                svc.cache.get(p)  # host tier (mixed) or materialized modules (per-path)
            asyncio.run(closed_loop(svc, ids, list(range(n)), plan.concurrency, x))  # warm: every path once
            for r, traffic in runs(plan, executor):
                rate, lat = asyncio.run(
                    closed_loop(svc, ids, schedule(n, plan.requests, traffic, r), plan.concurrency, x)
                )
                q = statistics.quantiles(lat, n=100)
                points.append(Point(base_id, executor, "batcher", n, traffic, rate, 1e3 * q[49], 1e3 * q[98]))
                say(f"scale: {points[-1]}")  # the raw figure, kept in the log if the run is cut short
    finally:
        svc.stop()
    return points


def slot_memory(data_dir: Path, base_id: str, ids: list[str], max_batch: int) -> dict:
    """RSS per path of the host tier (decoded tensors) and per loaded slot, in a fresh process state:
    every path's tensors read into the host tier, then loaded into slots a batch at a time."""
    svc = Services.create(settings_for(data_dir, "mixed"))
    try:
        svc.zoo.add(svc.store.card(base_id))
        entries = [svc.cache.get(ids[0])]
        table = svc.cache.table(entries[0])
        table.assign(entries)  # the bank exists before the first reading
        gc.collect()
        start = rss()
        entries += [svc.cache.get(p) for p in ids[1:]]
        gc.collect()
        hosted, hosted_slots = rss(), slot_memory_now()
        for i in range(1, len(entries), max_batch):
            table.assign(entries[i : i + max_batch])
        gc.collect()
        loaded, n = slot_memory_now(), len(ids) - 1
        return {
            "tensor_bytes": entries[0].nbytes,
            "slot_bytes": table.bank.nbytes() / table.bank.capacity,
            "rss_per_slot": (loaded - hosted_slots) / n,
            "rss_per_host_entry": (hosted - start) / n,
            "n": n,
            "capacity": table.bank.capacity,
        }
    finally:
        svc.stop()


# -- through the real server --------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_load(url: str, ids: list[str], order: list[int], body: bytes, concurrency: int, key: str | None = None) -> dict:
    """Predicts of ``.npy`` ``body`` to paths ``ids`` in ``order`` over ``concurrency`` keep-alive
    connections to ``url`` with bearer ``key`` (``bench.loadgen`` in a process of its own); its result."""
    host, port = url.removeprefix("http://").split(":")
    job = {
        "host": host,
        "port": int(port),
        "paths": ids,
        "schedule": order,
        "concurrency": concurrency,
        "body_b64": base64.b64encode(body).decode(),
        "content_type": "application/octet-stream",
        "authorization": f"Bearer {key}" if key else None,
    }
    out = subprocess.run(
        [sys.executable, "-m", "bench.loadgen"],
        input=json.dumps(job),
        text=True,
        capture_output=True,
        check=False,
        timeout=900,
    )
    if out.returncode:
        raise RuntimeError(f"the load generator failed ({out.returncode}): {out.stderr[-2000:]}")
    return json.loads(out.stdout)


class Server:
    """``zoo serve`` in a child process on a loopback port, with the bench's settings."""

    def __init__(
        self,
        data_dir: Path,
        executor: str = "mixed",
        workers: int | None = None,
        checkout: Path | None = None,
        ready_s: float = 120,
        **settings: str,
    ):
        """``checkout``: the source tree to serve from (default: this one's ``service``, as installed);
        ``settings``: more of the server's environment (``ZOO_MAX_WAIT_MS="0"``)."""
        self.port, self.data_dir = free_port(), data_dir
        env = {
            **os.environ,
            "ZOO_DATA_DIR": str(data_dir.resolve()),
            "ZOO_DEMO_ZOO": "false",
            "ZOO_CACHE_BYTES": str(2 * GiB),
            "ZOO_HOST_CACHE_BYTES": str(2 * GiB),
            "ZOO_BATCHING": "base" if executor == "mixed" else "path",
            **settings,
        }
        if workers is not None:
            env["ZOO_HTTP_WORKERS"] = str(workers)
        if checkout is not None:  # ahead of the installed one (-m puts the working directory first too)
            env["PYTHONPATH"] = str(checkout.resolve())
        cmd = [sys.executable, "-m", "service.cli", "serve", "--port", str(self.port), "--no-access-log"]
        self.log = (
            data_dir / f"serve-{self.port}.log"
        )  # a file, not a pipe nobody drains: the server never blocks on it
        cwd = checkout.resolve() if checkout is not None else None
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=log, cwd=cwd)
        self.url = f"http://127.0.0.1:{self.port}"
        self.client = httpx.Client(base_url=self.url, timeout=120)
        try:
            if not self.wait_ready(ready_s):
                log = self.log.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"the server was not ready within {ready_s:.0f} s: {log}")
        except RuntimeError:
            self.close()  # nothing left running
            raise
        self.key = (data_dir / "admin.key").read_text().strip()  # written on the data dir's first start
        self.client.headers["Authorization"] = f"Bearer {self.key}"

    def wait_ready(self, timeout: float) -> bool:
        """Until /readyz answers 200 (False after ``timeout``); raises if the server exited."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            try:
                if self.client.get("/readyz").status_code == 200:
                    return True
            except httpx.TransportError:
                pass
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited: {self.log.read_text(errors='replace')[-2000:]}")
            time.sleep(0.1)
        return False

    def rss(self) -> int:
        """The whole server's: the supervisor, its HTTP workers and the inference process."""
        return sum(_rss_of(p) for p in [self.proc.pid, *descendants(self.proc.pid)])

    def load(self, ids: list[str], order: list[int], body: bytes, concurrency: int) -> dict:
        result = run_load(self.url, ids, order, body, concurrency, self.key)
        if result["errors"]:
            raise RuntimeError(f"{result['errors']} requests failed, first: {result['first_error']}")
        return result

    def predict_ms(self, path_id: str, body: bytes) -> float:
        t = time.perf_counter()
        r = self.client.post(
            f"/v1/paths/{path_id}/predict", content=body, headers={"content-type": "application/octet-stream"}
        )
        elapsed = time.perf_counter() - t
        r.raise_for_status()
        return 1e3 * elapsed

    def close(self) -> None:
        self.client.close()
        self.proc.terminate()
        self.proc.wait(30)


def http_points(say: Say, data_dir: Path, base_id: str, ids: list[str], plan: Plan, executor: str) -> list[Point]:
    _, body = one_image(dir_store(data_dir).card(base_id).input)
    server = Server(data_dir, executor)
    points = []
    try:
        say(f"scale: {base_id}, {executor} executor, HTTP, warming up")
        server.load(ids, [0] * (plan.requests // 4), body, plan.concurrency)  # untimed
        for n in plan.sizes:
            say(f"scale: {base_id}, {executor} executor, HTTP, {n} paths")
            server.load(ids, list(range(n)), body, plan.concurrency)  # warm: every path once
            for rep, traffic in runs(plan, executor):
                r = server.load(ids, schedule(n, plan.requests, traffic, rep), body, plan.concurrency)
                points.append(Point(base_id, executor, "http", n, traffic, r["per_second"], r["p50_ms"], r["p99_ms"]))
                say(f"scale: {points[-1]}")
    finally:
        server.close()
    return points


def registered_memory(say: Say, data_dir: Path, base_id: str, bundles: list[bytes], plan: Plan) -> dict:
    """Server RSS growth per path imported over HTTP and left idle; then cold / warm predicts, with
    the default batch wait and again with none (a fresh server: every path cold again)."""
    server = Server(data_dir, "mixed")
    try:
        say(f"scale: {base_id}, importing {plan.imported} paths over HTTP")
        warmup = plan.imported // 8  # the first imports grow the server's allocator pools; not counted
        for b in bundles[:warmup]:
            server.client.post("/v1/paths/import", content=b).raise_for_status()
        before = server.rss()
        for b in bundles[warmup : plan.imported]:
            server.client.post("/v1/paths/import", content=b).raise_for_status()
        grown = (server.rss() - before) / (plan.imported - warmup)
        fresh = [decode_bundle(b).id for b in bundles[plan.imported - plan.cold : plan.imported]]
        memory = {
            "per_path": grown,
            "bundle": statistics.mean(len(b) for b in bundles[: plan.imported]),
            **cold_warm(server, base_id, decode_bundle(bundles[0]).id, fresh),
        }
    finally:
        server.close()
    say(f"scale: {base_id}, cold / warm predicts with no batch wait")
    server = Server(data_dir, "mixed", ZOO_MAX_WAIT_MS="0")
    try:
        unwaited = cold_warm(server, base_id, decode_bundle(bundles[0]).id, fresh)
    finally:
        server.close()
    return {**memory, **{f"nowait_{k}": v for k, v in unwaited.items()}}


def cold_warm(server: Server, base_id: str, first: str, fresh: list[str]) -> dict:
    """Each fresh path's first predict over HTTP (cold), then its second (warm): the medians."""
    _, body = one_image(dir_store(server.data_dir).card(base_id).input)
    server.predict_ms(first, body)  # the base's bank exists before the clock
    colds, warms = [], []
    for pid in fresh:
        colds.append(server.predict_ms(pid, body))
        warms.append(server.predict_ms(pid, body))
    return {
        "cold_ms": statistics.median(colds),
        "warm_ms": statistics.median(warms),
        "cold_n": len(colds),
        "cold_extra_ms": statistics.median(c - w for c, w in zip(colds, warms, strict=True)),
    }


# -- the suite ----------------------------------------------------------------------------------


BASES = ("resnet-mnist", TV_BASE)


def scale_suite(say: Say, quick: bool) -> list[str]:
    """Both bases, or those named in ZOO_BENCH_SCALE_BASES (comma-separated: a GPU lease runs one per call)."""
    plan = QUICK if quick else FULL
    chosen = [b for b in os.environ.get("ZOO_BENCH_SCALE_BASES", ",".join(BASES)).split(",") if b]
    if unknown := set(chosen) - set(BASES):
        raise SystemExit(f"ZOO_BENCH_SCALE_BASES names {sorted(unknown)}; choose among {list(BASES)}")
    store = demo_store(say, quick)
    add_tv_base(store)
    lines = _intro(plan)
    for base_id in chosen:
        say(f"scale: making {max(plan.sizes)} reprogram paths on {base_id}")
        bundles = make_paths(store, base_id, max(plan.sizes))
        ids = [decode_bundle(b).id for b in bundles]
        fresh = fresh_dir(store, base_id)
        memory = registered_memory(say, fresh, base_id, bundles, plan)
        target = dir_store(fresh)
        for b in bundles[plan.imported :]:  # the rest written directly (importing validates each: slow)
            target.save_path(decode_bundle(b))
        say(f"scale: {base_id}, memory per slot")
        memory["slot"] = slot_memory(fresh, base_id, ids, 64)
        say(f"scale: memory {memory}")  # kept in the log if the run is cut short
        points = []
        for executor in ("mixed", "per-path"):
            points += batcher_points(say, fresh, base_id, ids, plan, executor)
            points += http_points(say, fresh, base_id, ids, plan, executor)
        lines += _tables(base_id, points, memory, plan)
    return lines


def fresh_dir(src, base_id: str) -> Path:
    """A data dir holding only ``base_id`` (its card and weights): the servers load that base alone."""
    card = src.card(base_id)
    fresh = Path(tempfile.mkdtemp(prefix=f"zoo-scale-{base_id}-", dir=bench_data_dir()))
    dir_store(fresh).add_base(CardIn(**card.model_dump(include=set(CardIn.model_fields))), src.blobs.get(card.digest))
    return fresh


def _intro(plan: Plan) -> list[str]:
    return [
        (
            f"N reprogram paths (10 labels each, distinct tensors) of one base; a closed loop of {plan.requests:,} "
            f"single-image requests at concurrency {plan.concurrency}, after a warm-up pass that touches every "
            f"path once; uniform or Zipf(1.1) choice of path per request. *Batcher*: the inference loop in "
            f"process (no HTTP). *HTTP*: `zoo serve` on a loopback port, a uint8 `.npy` body per request, the "
            f"load generator (`bench/loadgen.py`) in its own process. *mixed*: `ZOO_BATCHING=base` "
            f"(one forward per batch mixing paths, slots); *per-path*: `ZOO_BATCHING=path` (a module and a "
            f"batch per path). The mixed executor runs each N and traffic {plan.repeats} "
            f"time{'s' if plan.repeats > 1 else ''} (uniform and Zipf "
            f"back to back, alternating which goes first, a schedule drawn per run), the per-path one once: a "
            f"cell is the mean ± the standard deviation of its runs. Ratios are against the same executor and "
            f"route with one path (the mean of all its uniform and Zipf runs, which are the same workload "
            f"there), in this run; an untimed closed loop warms each executor and route up first.\n"
        )
    ]


def _mean_point(runs: list[Point]) -> Point:
    """The mean of several runs (one path's reference: uniform and Zipf traffic are the same
    workload there, so every run of both)."""
    r = runs[0]
    return Point(
        r.base,
        r.executor,
        r.via,
        1,
        "both",
        statistics.mean(p.per_second for p in runs),
        statistics.mean(p.p50_ms for p in runs),
        statistics.mean(p.p99_ms for p in runs),
    )


def _tables(base_id: str, points: list[Point], memory: dict, plan: Plan) -> list[str]:
    gpu = on_gpu()  # absolute figures only from a GPU
    ref = _references(points)
    lines = [f"\n### {base_id}\n", *_ratio_table(points, ref, absolute=gpu), *zipf_against_uniform(points)]
    where = "this GPU" if gpu else "this CPU, for scale only (absolute figures belong to a GPU run)"
    lines.append(
        f"\nOne path (the mean of its runs, the reference of each ratio above), {where}: "
        + "; ".join(f"{via} {ex}: {r.per_second:,.0f} images/s" for (via, ex), r in sorted(ref.items()))
        + ". The mixed executor on one path against the per-path one: "
        + ", ".join(
            f"{via} {ref[(via, 'mixed')].per_second / ref[(via, 'per-path')].per_second:.2f}x"
            for via in sorted({v for v, _ in ref})
        )
        + "."
    )
    m, slot = memory, memory["slot"]
    held = "bytes of CUDA memory" if gpu else "bytes of RSS"
    lines.append(
        f"\nMemory: a registered, idle path costs the server {m['per_path']:,.0f} bytes of RSS "
        f"({m['per_path'] / m['bundle']:.2f}x its {m['bundle']:,.0f}-byte bundle; {plan.imported} imported "
        f"over HTTP after {plan.imported // 8} uncounted ones). A resident slot: {slot['slot_bytes']:,.0f} bytes "
        f"allocated per slot and {slot['rss_per_slot']:,.0f} {held} per slot loaded "
        f"({slot['rss_per_slot'] / slot['tensor_bytes']:.2f}x the path's {slot['tensor_bytes']:,} tensor bytes; "
        f"{slot['n']:,} slots, capacity {slot['capacity']:,}); its decoded tensors in the host tier: "
        f"{slot['rss_per_host_entry']:,.0f} bytes."
    )
    absolute = f" (medians: cold {m['cold_ms']:.2f} ms, warm {m['warm_ms']:.2f} ms)" if gpu else ""
    lines.append(
        f"\nCold / warm predict over HTTP ({m['cold_n']} paths never served before, one image each, then the "
        f"same image again): a cold predict costs **{m['cold_extra_ms']:.2f} ms** more than the warm one after "
        f"it (median of the differences; medians {m['cold_ms'] / m['warm_ms']:.2f}x){absolute}. With no batch "
        f"wait (`ZOO_MAX_WAIT_MS=0`, a fresh server, the same paths cold again): **{m['nowait_cold_extra_ms']:.2f} "
        f"ms** more (medians {m['nowait_cold_ms'] / m['nowait_warm_ms']:.2f}x). The difference is the path's load "
        f"(reading its row, decoding it, copying it into a slot): by default a lone request waits "
        f"{Settings().max_wait_ms:g} ms from its arrival for others to batch with, and a cold path's load is spent "
        "in that "
        f"wait."
    )
    return lines


def points_from_log(text: str) -> list[Point]:
    """The figures a run printed (``scale: Point(...)`` lines, wrapped or not): what is left of a run
    that a GPU lease cut short."""
    flat = " ".join(text.split())
    fields = (
        r"base='([^']+)', executor='([^']+)', via='([^']+)', n=(\d+), traffic='([^']+)', "
        r"per_second=([\d.e+-]+), p50_ms=([\d.e+-]+), p99_ms=([\d.e+-]+)"
    )
    return [
        Point(b, e, v, int(n), t, float(r), float(p50), float(p99))
        for b, e, v, n, t, r, p50, p99 in re.findall(r"Point\(" + fields + r"\)", flat)
    ]


def log_table(text: str) -> list[str]:
    """The ratio and absolute table of a cut-short run's log (the memory and cold figures, logged as
    ``scale: memory {...}``, are left to the reader)."""
    points = points_from_log(text)
    return _ratio_table(points, _references(points), absolute=True) + zipf_against_uniform(points)


def _references(points: list[Point]) -> dict[tuple[str, str], Point]:
    """Per route and executor, the one-path point every ratio is taken against."""
    return {
        key: _mean_point([p for p in points if p.n == 1 and (p.via, p.executor) == key])
        for key in {(p.via, p.executor) for p in points}
    }


def _groups(points: list[Point]) -> dict[tuple[str, str, int, str], list[Point]]:
    """The runs of each (route, executor, N, traffic), in the order they first ran."""
    groups: dict[tuple[str, str, int, str], list[Point]] = {}
    for p in points:
        groups.setdefault((p.via, p.executor, p.n, p.traffic), []).append(p)
    return groups


def _spread(values: list[float]) -> str:
    """The mean of the runs, and their standard deviation where there are several."""
    mean = statistics.mean(values)
    return f"{mean:.2f}x" + (f" ± {statistics.stdev(values):.2f}" if len(values) > 1 else "")


def _ratio_table(points: list[Point], ref: dict[tuple[str, str], Point], absolute: bool) -> list[str]:
    lines = [
        "| route | executor | paths | traffic | runs | throughput / one path | p50 / one path's | p99 / one path's |"
        + (" images/s | p50 ms | p99 ms |" if absolute else ""),
        "|---|---|---:|---|---:|---:|---:|---:|" + ("---:|---:|---:|" if absolute else ""),
    ]
    for (via, executor, n, traffic), group in _groups(points).items():
        r = ref[(via, executor)]
        mean = _mean_point(group)
        figures = f" {mean.per_second:,.0f} | {mean.p50_ms:.2f} | {mean.p99_ms:.2f} |" if absolute else ""
        lines.append(
            f"| {via} | {executor} | {n:,} | {traffic} | {len(group)} | "
            f"**{_spread([p.per_second / r.per_second for p in group])}** | "
            f"{_spread([p.p50_ms / r.p50_ms for p in group])} | {_spread([p.p99_ms / r.p99_ms for p in group])} |"
            f"{figures}"
        )
    return lines


def zipf_against_uniform(points: list[Point]) -> list[str]:
    """Per route and N of the mixed executor: Zipf's throughput over uniform's, paired run by run
    (the two ran back to back, in alternating order)."""
    groups = _groups([p for p in points if p.executor == "mixed" and p.n > 1])
    cells = []
    for (via, _, n, traffic), zipf in groups.items():
        uniform = groups.get((via, "mixed", n, "uniform"))
        if traffic == "zipf" and uniform:  # a cut-short run's log: the runs both have
            cells.append(
                f"{via} {n:,}: {_spread([z.per_second / u.per_second for z, u in zip(zipf, uniform, strict=False)])}"
            )
    return [f"\nZipf against uniform, mixed executor (throughput, paired runs): {'; '.join(cells)}."] if cells else []


if __name__ == "__main__":  # python -m bench.scale LOG: the table of a cut-short run's log
    print("\n".join(log_table(Path(sys.argv[1]).read_text())))
