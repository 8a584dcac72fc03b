"""What the suites share: the machine line, timing, doc blocks, the demo store, baselines."""

from __future__ import annotations

import contextlib
import functools
import os
import platform
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from fastapi.testclient import TestClient
from torch import nn

from zoo_store.archs import build_arch
from zoo_store.archs.surgery import replace_module, state_bytes, tensor_bytes
from zoo_store.core.bundle import PathArtifact, decode_bundle, encode_bundle, make_manifest
from zoo_store.core.cards import Card, InputSpec
from zoo_store.core.manifest import BaseRef
from zoo_store.methods.reprogram.layers import build_reprogrammed, dense_bytes
from zoo_store.store.blobs import DirBlobStore
from zoo_store.store.db import Database
from zoo_store.store.demo import ensure_demo_zoo
from zoo_store.store.store import Store
from zoo_store.training import fit, init_head_rows

Say = Callable[[str], None]


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ", no GPU"
    return (
        f"{platform.machine()} {cpu}, {os.cpu_count()} cores, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads){gpu}, Python {platform.python_version()}"
    )


def elapsed(fn: Callable[[], object]) -> float:
    """Seconds one call of ``fn`` takes (synchronising CUDA when used)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t


def timeit(fn: Callable[[], object], repeat: int = 20, warmup: int = 3) -> float:
    """Median seconds of ``fn``."""
    for _ in range(warmup):
        fn()
    return statistics.median(elapsed(fn) for _ in range(repeat))


def time_ratio(fn: Callable[[], object], ref: Callable[[], object], repeat: int = 10, warmup: int = 2) -> float:
    """Median time of ``fn`` over median time of ``ref``, the two run alternately (so a shift in the
    machine's load reaches both)."""
    for _ in range(warmup):
        fn(), ref()
    pairs = [(elapsed(fn), elapsed(ref)) for _ in range(repeat)]
    return statistics.median(a for a, _ in pairs) / statistics.median(b for _, b in pairs)


def reprogram_bytes(arch: str, input_size: int, channels: int, num_classes: int = 10) -> tuple[int, int]:
    """(bundle bytes, dense bytes) of a reprogram path on ``arch`` (sizes do not depend on values)."""
    base = build_arch(arch, {"num_classes": 1000 if arch.startswith("tv_") else 10}).eval()
    model = build_reprogrammed(base, num_classes)
    delta = {k: v.contiguous() for k, v in model.delta_state().items()}
    spec = InputSpec(channels=channels, size=input_size, mean=(0.5,) * channels, std=(0.5,) * channels)
    art = PathArtifact(
        "reprogram",
        [BaseRef(id=arch, digest="0" * 64)],
        [str(i) for i in range(num_classes)],
        spec,
        {"base": arch, "num_classes": num_classes, "kernel": 3},
        delta,
    )
    delta_bytes = tensor_bytes(delta.values())
    dense = dense_bytes(base, delta_bytes)
    return len(encode_bundle(make_manifest(art), delta, {})), dense


def path_variants(client: TestClient, path_id: str, n: int) -> list[str]:
    """``path_id`` and n - 1 imported siblings that differ only in the head's bias (same cost per forward)."""
    b = decode_bundle(client.get(f"/v1/paths/{path_id}/bundle").content)
    m, ids = b.manifest, [path_id]
    for i in range(1, n):
        tensors = {**b.tensors, "head.bias": b.tensors["head.bias"] + 1e-3 * i}
        art = PathArtifact(m.method, list(m.bases), list(m.labels), m.input, m.config, tensors)
        r = client.post("/v1/paths/import", content=encode_bundle(make_manifest(art), tensors, b.metrics))
        assert r.status_code in (200, 201), r.text  # 200: imported by an earlier run on this data dir
        ids.append(r.json()["id"])
    return ids


@contextlib.contextmanager
def scratch_database(admin_url: str, prefix: str = "zoo_bench") -> Iterator[str]:
    """A new, empty PostgreSQL database on ``admin_url``'s server for the block; dropped after it."""
    from sqlalchemy import create_engine, text

    name = f"{prefix}_{uuid.uuid4().hex[:8]}"
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as c:
            c.execute(text(f"CREATE DATABASE {name}"))
        yield admin_url.rsplit("/", 1)[0] + f"/{name}"
        with admin.connect() as c:
            c.execute(text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
    finally:
        admin.dispose()


@functools.cache
def bench_data_dir() -> Path:
    """ZOO_DATA_DIR, or one temporary directory for the whole run."""
    return Path(os.environ.get("ZOO_DATA_DIR") or tempfile.mkdtemp(prefix="zoo-bench-"))


def dir_store(data_dir: Path):
    """The Store of a data directory laid out as the server's (SQLite file and blob directory)."""
    db = Database(f"sqlite:///{(data_dir / 'zoo.db').resolve()}")
    db.migrate()
    return Store(db, DirBlobStore(data_dir / "blobs"))


def demo_store(say: Say, quick: bool):
    """The demo zoo under ZOO_DATA_DIR (trained there if missing) as a Store."""
    store = dir_store(bench_data_dir())
    ensure_demo_zoo(store, 2000 if quick else 12000, say=say)
    return store


SEEDS = (0, 1, 2)  # every cell of a method table: one run per seed (training draw and initialisation)


def mean_std(values: list[float], digits: int = 4) -> str:
    """``mean ± std`` (sample standard deviation) of one cell's seeds."""
    std = statistics.stdev(values) if len(values) > 1 else float("nan")
    return f"{statistics.fmean(values):.{digits}f} ± {std:.{digits}f}"


def t_interval(values: list[float], reference: list[float]) -> tuple[float, float, float]:
    """(mean, low, high): the per-seed differences ``values - reference`` and their 95% t-interval."""
    from scipy import stats

    diffs = [v - r for v, r in zip(values, reference, strict=True)]
    mean = statistics.fmean(diffs)
    if len(diffs) < 2:
        return mean, float("nan"), float("nan")
    half = stats.t.ppf(0.975, len(diffs) - 1) * statistics.stdev(diffs) / len(diffs) ** 0.5
    return mean, mean - half, mean + half


def paired_interval(values: list[float], reference: list[float], digits: int = 4) -> str:
    """``mean [low, high]`` of the per-seed differences ``values - reference`` (95% t-interval)."""
    mean, low, high = t_interval(values, reference)
    return f"{mean:+.{digits}f} [{low:+.{digits}f}, {high:+.{digits}f}]"


def macs(model: nn.Module, x: torch.Tensor) -> int:
    """Multiply-accumulates of one forward of ``model`` on ``x`` (torch's FLOP counter, halved)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        model(x)
    return counter.get_total_flops() // 2


def head_only(
    base: nn.Module, data, card: Card, epochs: int, init_rows: bool = False, seed: int = 0
) -> tuple[nn.Module, int]:
    """A new linear head on the frozen base; returns the model and the head's bytes."""
    torch.manual_seed(seed)
    head = nn.Linear(base.feature_dim, len(data.labels))
    if init_rows:
        init_head_rows(head, base.head_layer, card.labels, data.labels)
    model = nn.Sequential()
    model.forward = lambda x: head(base.embed(x))  # type: ignore[method-assign]
    fit(
        model,
        head.parameters(),
        data.train_x,
        data.train_y,
        card.input,
        epochs=epochs,
        lr=1e-2,
        batch_size=64,
        seed=seed,
    )
    return model, state_bytes(head)


def full_ft(card: Card, store, data, epochs: int, init_rows: bool = False, seed: int = 0) -> nn.Module:
    """A copy of the whole base and a new head, all trained (BatchNorm in train mode)."""
    net = store.load_base(card)
    torch.manual_seed(seed)
    head = nn.Linear(net.feature_dim, len(data.labels))
    if init_rows:
        init_head_rows(head, net.head_layer, card.labels, data.labels)
    replace_module(net, net.head_path, head)
    for p in net.parameters():
        p.requires_grad_(True)
    net.train()
    fit(net, net.parameters(), data.train_x, data.train_y, card.input, epochs=epochs, lr=1e-3, batch_size=64, seed=seed)
    return net.eval()


START, END = "<!-- bench:start -->", "<!-- bench:end -->"


def markers(name: str = "") -> tuple[str, str]:
    """The markers around a generated block: ``bench`` for the first one of a file, ``bench:NAME`` more."""
    if not name:
        return START, END
    return f"<!-- bench:{name}:start -->", f"<!-- bench:{name}:end -->"


def write_block(target: Path, title: str, block: str, name: str = "") -> None:
    """Replace the generated block ``name`` of ``target`` (between its markers), keeping the prose around it."""
    start, end = markers(name)
    text = target.read_text() if target.exists() else f"# {title}\n\n{start}\n{end}\n"
    if start not in text or end not in text:
        text = f"{text.rstrip()}\n\n{start}\n{end}\n"
    head, rest = text.split(start, 1)
    tail = rest.split(end, 1)[1]
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(f"{head}{start}\n{block}\n{end}{tail}")
