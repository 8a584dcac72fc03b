"""The serving suite: bytes, composed vs base forward, cold vs warm, batching, many paths."""

from __future__ import annotations

import asyncio
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from fastapi.testclient import TestClient

from bench.common import Say, path_variants, reprogram_bytes, timeit
from service.api.app import create_app
from zoo_store.core.settings import Settings
from zoo_store.methods import get_method


def serving_suite(say: Say, quick: bool) -> list[str]:
    """Path vs dense bytes, composed vs base forward, cold vs warm predict, batched vs unbatched,
    many paths vs one, memory per path."""
    lines = []
    tmp = Path(tempfile.mkdtemp(prefix="zoo-bench-"))
    data_dir = Path(os.environ.get("ZOO_DATA_DIR", tmp))
    settings = Settings(data_dir=data_dir, job_executor="thread", demo_samples=2000 if quick else 12000)
    say(f"serving suite: data dir {data_dir} (the demo zoo is trained there if missing)")
    with TestClient(create_app(settings)) as client:
        svc = client.app.state.services
        svc.ready.wait(900)
        spec = {
            "method": "reprogram",
            "base": "resnet-mnist",
            "task": {"dataset": "mnist-rotated", "samples_per_label": 20 if quick else 100},
            "train": {"epochs": 1 if quick else 3},
        }
        job = client.post("/v1/compositions", json=spec).json()
        while (job := client.get(f"/v1/jobs/{job['id']}").json())["state"] not in ("succeeded", "failed"):
            time.sleep(0.2)
        assert job["state"] == "succeeded", job
        pid = job["path_id"]
        path = client.get(f"/v1/paths/{pid}").json()
        lines.append("## Path bytes / dense bytes\n")
        lines.append("| base | path bytes | dense bytes | ratio |\n|---|---:|---:|---:|")
        lines.append(
            f"| resnet-mnist (demo, trained path) | {path['bytes']:,} | {path['dense_bytes']:,} | "
            f"{path['bytes'] / path['dense_bytes']:.2%} |"
        )
        for arch, size, ch in (("tv_resnet18", 224, 3), ("tv_resnet50", 224, 3), ("tv_mobilenet_v3_small", 224, 3)):
            b, d = reprogram_bytes(arch, size, ch)
            lines.append(f"| {arch} (10-class reprogram path) | {b:,} | {d:,} | {b / d:.2%} |")

        # composed forward vs base forward, same batch, same run
        _card, base = svc.zoo.bases["resnet-mnist"]
        entry = svc.cache.get(pid)
        module = get_method("reprogram").materialize(
            entry.manifest.config, entry.tensors, svc.zoo.nets_of(entry.manifest)
        )
        table = svc.cache.table(entry)
        slots = torch.tensor(table.assign([entry]) * 64, device=svc.zoo.device)  # (64,)
        x = torch.rand(64, 1, 28, 28, device=svc.zoo.device)
        with torch.inference_mode():
            t_base = timeit(lambda: base(x))
            t_comp = timeit(lambda: module(x))
            t_bank = timeit(lambda: table.bank.forward(x, slots))
        lines.append("\n## Composed forward / base forward (batch 64)\n")
        lines.append(
            f"reprogram path on resnet-mnist / resnet-mnist: **{t_comp / t_base:.2f}x** the base's time as its own "
            f"module, **{t_bank / t_base:.2f}x** through its base's bank (per-sample kernels from slots)"
        )
        if svc.zoo.device.startswith("cuda"):
            lines.append(
                f"(absolute, {torch.cuda.get_device_name(0)}: base {1e3 * t_base:.3f} ms, composed "
                f"{1e3 * t_comp:.3f} ms)"
            )
        lines += ["", *per_sample_kernels(svc.zoo.device)]

        # cold first predict vs warm predict, over several fresh materializations
        body = {"inputs": [{"tensor": torch.rand(1, 28, 28).tolist()}]}
        colds, warms = [], []
        for _ in range(5 if quick else 15):
            svc.cache.evict(pid)
            t = time.perf_counter()
            client.post(f"/v1/paths/{pid}/predict", json=body)
            colds.append(time.perf_counter() - t)
            t = time.perf_counter()
            client.post(f"/v1/paths/{pid}/predict", json=body)
            warms.append(time.perf_counter() - t)
        cold, warm = statistics.median(colds), statistics.median(warms)
        lines.append("\n## Cold first predict / warm predict (one 28x28 image, over HTTP in-process)\n")
        lines.append(
            f"cold / warm = **{cold / warm:.2f}x**; cold costs {1000 * (cold - warm):.1f} ms more than warm "
            f"(median of {len(colds)} fresh materializations)"
        )
        if svc.zoo.device.startswith("cuda"):
            lines.append(f"(absolute: cold {1e3 * cold:.2f} ms, warm {1e3 * warm:.2f} ms)")

        # batched vs unbatched throughput through the micro-batcher; then the same burst over many paths
        n = 256 if quick else 1024
        one = torch.rand(1, 1, 28, 28)

        async def burst(max_batch: int, paths: list[str]) -> float:
            svc.batcher.max_batch = max_batch
            entries = [svc.cache.get(p) for p in paths]  # (materialized before the clock starts)
            t = time.perf_counter()
            await asyncio.gather(*(svc.batcher.submit(entries[i % len(paths)], one) for i in range(n)))
            return n / (time.perf_counter() - t)

        many = path_variants(client, pid, 8)
        unbatched = asyncio.run(burst(1, [pid]))
        batched = asyncio.run(burst(64, [pid]))
        mixed = asyncio.run(burst(64, many))
        svc.batcher.max_batch = settings.max_batch_size
        lines.append("\n## Batched throughput / batch-size-1 throughput\n")
        lines.append(
            f"{n} concurrent single-image requests to one path: max_batch_size 64 vs 1 = "
            f"**{batched / unbatched:.1f}x** the throughput"
        )
        if svc.zoo.device.startswith("cuda"):
            lines.append(f"(absolute: {batched:,.0f} vs {unbatched:,.0f} images/s)")
        lines.append("\n## Mixed traffic over many paths / one path\n")
        lines.append(
            f"the same {n} requests spread round-robin over {len(many)} reprogram paths of one base "
            f"(one forward per batch mixing the paths, max_batch_size 64): **{mixed / batched:.2f}x** the one-path "
            "throughput"
        )
        tensors = statistics.median(svc.cache.get(p).nbytes for p in many)
        slot = table.bank.nbytes() / table.bank.capacity
        lines.append("\n## Memory per added path\n")
        lines.append(
            f"a reprogram path on resnet-mnist holds its decoded tensors in the host tier ({tensors:,.0f} bytes, "
            f"{tensors / path['dense_bytes']:.2%} of its dense bytes) and, while it is served, one slot of its "
            f"base's bank ({slot:,.0f} bytes); the base's weights are shared, never copied. `zoo bench --suite "
            f"scale` measures both as RSS."
        )
    return lines


def per_sample_kernels(device: str) -> list[str]:
    """How a bank applies each sample's own depthwise kernels: one grouped convolution over
    (1, B*C, H, W) against ``torch.func.vmap`` of the per-sample conv, at two layer shapes."""
    import torch.nn.functional as F

    lines = [
        (
            "Per-sample CLR kernels, one layer, batch 64: `torch.func.vmap` of the per-sample depthwise conv "
            "/ one grouped convolution with B*C groups (what the bank runs):\n"
        ),
        "| layer (C x H x W) | vmap / grouped |",
        "|---|---:|",
    ]
    for c, size in ((32, 14), (64, 32)):  # resnet-mnist's first stage; resnet18's stem at 64 x 64
        h = torch.randn(64, c, size, size, device=device)  # (B, C, H, W)
        w = torch.randn(64, c, 1, 3, 3, device=device)  # (B, C, 1, k, k)

        def grouped(h=h, w=w, c=c, size=size) -> torch.Tensor:
            return F.conv2d(h.reshape(1, -1, size, size), w.reshape(-1, 1, 3, 3), padding=1, groups=64 * c)

        mapped = torch.func.vmap(lambda hh, ww, c=c: F.conv2d(hh[None], ww, padding=1, groups=c)[0])
        with torch.inference_mode():
            t_vmap = timeit(lambda m=mapped, h=h, w=w: m(h, w))
            lines.append(f"| {c} x {size} x {size} | {t_vmap / timeit(grouped):.2f}x |")
    return lines
