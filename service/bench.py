"""``zoo bench``: ratios measured side by side in one run, written to docs/ with the machine."""

from __future__ import annotations

import asyncio
import datetime as dt
import math
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from fastapi.testclient import TestClient
from torch import nn

from zoo_store.archs import build_arch
from zoo_store.archs.surgery import replace_module, state_bytes
from zoo_store.cards import Card
from zoo_store.paths import BaseRef, PathArtifact, encode_bundle, make_manifest

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
    return (f"{platform.machine()} {cpu}, {os.cpu_count()} cores, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads){gpu}, Python {platform.python_version()}")  # fmt: skip


def timeit(fn: Callable[[], object], repeat: int = 20, warmup: int = 3) -> float:
    """Median seconds of ``fn`` (synchronising CUDA when used)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def reprogram_bytes(arch: str, input_size: int, channels: int, num_classes: int = 10) -> tuple[int, int]:
    """(bundle bytes, dense bytes) of a reprogram path on ``arch`` (sizes do not depend on values)."""
    from zoo_store.cards import InputSpec
    from zoo_store.methods.reprogram.layers import build_reprogrammed

    base = build_arch(arch, {"num_classes": 1000 if arch.startswith("tv_") else 10}).eval()
    model = build_reprogrammed(base, num_classes)
    delta = {k: v.contiguous() for k, v in model.delta_state().items()}
    spec = InputSpec(channels=channels, size=input_size, mean=(0.5,) * channels, std=(0.5,) * channels)
    art = PathArtifact("reprogram", [BaseRef(id=arch, digest="0" * 64)], [str(i) for i in range(num_classes)], spec,
                       {"base": arch, "num_classes": num_classes, "kernel": 3}, delta)  # fmt: skip
    delta_bytes = sum(t.numel() * t.element_size() for t in delta.values())
    dense = state_bytes(base) - state_bytes(base.head_layer) + delta_bytes
    return len(encode_bundle(make_manifest(art), delta, {})), dense


def path_variants(client: TestClient, path_id: str, n: int) -> list[str]:
    """``path_id`` and n - 1 imported siblings that differ only in the head's bias (same cost per forward)."""
    from zoo_store.paths import decode_bundle

    b = decode_bundle(client.get(f"/v1/paths/{path_id}/bundle").content)
    m, ids = b.manifest, [path_id]
    for i in range(1, n):
        tensors = {**b.tensors, "head.bias": b.tensors["head.bias"] + 1e-3 * i}
        art = PathArtifact(m.method, list(m.bases), list(m.labels), m.input, m.config, tensors)
        r = client.post("/v1/paths/import", content=encode_bundle(make_manifest(art), tensors, b.metrics))
        assert r.status_code in (200, 201), r.text  # 200: imported by an earlier run on this data dir
        ids.append(r.json()["id"])
    return ids


def serving_suite(say: Say, quick: bool) -> list[str]:
    """Path vs dense bytes, composed vs base forward, cold vs warm predict, batched vs unbatched,
    many paths vs one, memory per path."""
    from service.app import create_app
    from zoo_store.settings import Settings

    lines = []
    tmp = Path(tempfile.mkdtemp(prefix="zoo-bench-"))
    data_dir = Path(os.environ.get("ZOO_DATA_DIR", tmp))
    settings = Settings(data_dir=data_dir, job_executor="thread", demo_samples=2000 if quick else 12000)
    say(f"serving suite: data dir {data_dir} (the demo zoo is trained there if missing)")
    with TestClient(create_app(settings)) as client:
        svc = client.app.state.services
        svc.ready.wait(900)
        spec = {"method": "reprogram", "base": "resnet-mnist",
                "task": {"dataset": "mnist-rotated", "samples_per_label": 20 if quick else 100},
                "train": {"epochs": 1 if quick else 3}}  # fmt: skip
        job = client.post("/v1/compositions", json=spec).json()
        while (job := client.get(f"/v1/jobs/{job['id']}").json())["state"] not in ("succeeded", "failed"):
            time.sleep(0.2)
        assert job["state"] == "succeeded", job
        pid = job["path_id"]
        path = client.get(f"/v1/paths/{pid}").json()
        lines.append("## Path bytes / dense bytes\n")
        lines.append("| base | path bytes | dense bytes | ratio |\n|---|---:|---:|---:|")
        lines.append(f"| resnet-mnist (demo, trained path) | {path['bytes']:,} | {path['dense_bytes']:,} | "
                     f"{path['bytes'] / path['dense_bytes']:.2%} |")  # fmt: skip
        for arch, size, ch in (("tv_resnet18", 224, 3), ("tv_resnet50", 224, 3), ("tv_mobilenet_v3_small", 224, 3)):
            b, d = reprogram_bytes(arch, size, ch)
            lines.append(f"| {arch} (10-class reprogram path) | {b:,} | {d:,} | {b / d:.2%} |")

        # composed forward vs base forward, same batch, same run
        _card, base = svc.zoo.bases["resnet-mnist"]
        module = svc.cache.get(pid).module
        x = torch.rand(64, 1, 28, 28, device=svc.zoo.device)
        with torch.inference_mode():
            t_base = timeit(lambda: base(x))
            t_comp = timeit(lambda: module(x))
        lines.append("\n## Composed forward / base forward (batch 64)\n")
        lines.append(f"reprogram path on resnet-mnist / resnet-mnist: **{t_comp / t_base:.2f}x** the base's time")
        if svc.zoo.device.startswith("cuda"):
            lines.append(f"(absolute, {torch.cuda.get_device_name(0)}: base {1e3 * t_base:.3f} ms, composed {1e3 * t_comp:.3f} ms)")

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
        lines.append(f"cold / warm = **{cold / warm:.2f}x**; cold costs {1000 * (cold - warm):.1f} ms more than warm "
                     f"(median of {len(colds)} fresh materializations)")  # fmt: skip
        if svc.zoo.device.startswith("cuda"):
            lines.append(f"(absolute: cold {1e3 * cold:.2f} ms, warm {1e3 * warm:.2f} ms)")

        # batched vs unbatched throughput through the micro-batcher; then the same burst over many paths
        n = 256 if quick else 1024
        one = torch.rand(1, 1, 28, 28)

        async def burst(max_batch: int, paths: list[str]) -> float:
            svc.batcher.max_batch = max_batch
            entries = [svc.cache.get(p) for p in paths]  # (materialized before the clock starts)
            t = time.perf_counter()
            await asyncio.gather(*(svc.batcher.submit(paths[i % len(paths)], entries[i % len(paths)], one)
                                   for i in range(n)))  # fmt: skip
            return n / (time.perf_counter() - t)

        many = path_variants(client, pid, 8)
        unbatched = asyncio.run(burst(1, [pid]))
        batched = asyncio.run(burst(64, [pid]))
        mixed = asyncio.run(burst(64, many))
        svc.batcher.max_batch = settings.max_batch_size
        lines.append("\n## Batched throughput / batch-size-1 throughput\n")
        lines.append(f"{n} concurrent single-image requests to one path: max_batch_size 64 vs 1 = "
                     f"**{batched / unbatched:.1f}x** the throughput")  # fmt: skip
        if svc.zoo.device.startswith("cuda"):
            lines.append(f"(absolute: {batched:,.0f} vs {unbatched:,.0f} images/s)")
        lines.append("\n## Mixed traffic over many paths / one path\n")
        lines.append(f"the same {n} requests spread round-robin over {len(many)} reprogram paths of one base "
                     f"(batched per path, max_batch_size 64): **{mixed / batched:.2f}x** the one-path throughput")  # fmt: skip
        per_path = statistics.median(svc.cache.get(p).nbytes for p in many)
        lines.append("\n## Memory per added path\n")
        lines.append(f"a materialized reprogram path on resnet-mnist adds {per_path:,.0f} bytes to the resident base "
                     f"({per_path / path['dense_bytes']:.2%} of its dense bytes); the base's weights are shared, not copied")  # fmt: skip
    return lines


def demo_store(say: Say, quick: bool):
    """The demo zoo under ZOO_DATA_DIR (trained there if missing) as a Store."""
    from zoo_store.blobs import DirBlobStore
    from zoo_store.db import Database
    from zoo_store.demo import ensure_demo_zoo
    from zoo_store.store import Store

    data_dir = Path(os.environ.get("ZOO_DATA_DIR", tempfile.mkdtemp(prefix="zoo-bench-")))
    db = Database(f"sqlite:///{(data_dir / 'zoo.db').resolve()}")
    db.migrate()
    store = Store(db, DirBlobStore(data_dir / "blobs"))
    ensure_demo_zoo(store, 2000 if quick else 12000, say=say)
    return store


def resample_suite(say: Say, quick: bool) -> list[str]:
    """Accuracy against parameters removed (uniform, partition-tuned, L1 and random pruning, none
    fine-tuned) and the speed-up of the smaller dense network, per demo base; then resnet18 at 224."""
    from zoo_store.datasets.builtin import BUILTINS
    from zoo_store.datasets.tasks import make_task
    from zoo_store.methods.registry import BuildContext
    from zoo_store.methods.resample.config import ResampleBudget
    from zoo_store.methods.resample.layers import (
        assemble,
        permute_and_resample,
        resampled_params,
        select_channels,
        uniform_cells,
    )  # fmt: skip
    from zoo_store.methods.resample.method import convert, tune_partition, widths_for
    from zoo_store.methods.spec import TaskSpec
    from zoo_store.training import accuracy
    from zoo_store.weights import digest_of

    store = demo_store(say, quick)
    ratios = (0.1, 0.2, 0.3, 0.4, 0.5)
    steps, per_label = (20, 20) if quick else (100, 50)
    lines = [(f"Held-out accuracy on each base's own test split (MNIST, 10,000 images) with the given share of "
             f"parameters removed, none fine-tuned. Uniform: the channels ordered by the 2-opt tour, then cubic "
             f"resampling on a uniform grid. Tuned: the same with partition tuning ({steps} Adam steps on batches "
             f"of {per_label * 10} training images, matching the base's outputs; weights frozen). L1 and random: "
             f"plain structured pruning to the same widths (keep the channels with the largest L1 filter norm, or "
             f"a seeded random subset), no rescaling. Speed-up: base forward time / resampled forward time, "
             f"batch 64, in this run.\n"),
             "| base | params removed | params | uniform | tuned | L1 prune | random prune | speed-up |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for base_id in ("resnet-mnist", "vgg-mnist"):
        card = store.card(base_id)
        base = store.load_base(card)
        digest = digest_of(base)
        data = make_task(BUILTINS["mnist"].make(), TaskSpec(dataset="mnist", samples_per_label=per_label), card.input, 0)
        groups = base.channel_groups()
        say(f"resample table: converting {base_id}")
        layers, perms, _ = convert(base, groups)
        total = sum(p.numel() for p in base.parameters())
        acc = accuracy(base, data.test_x, data.test_y, card.input)
        lines.append(f"| {base_id} | 0% | {total:,} | {acc:.4f} | {acc:.4f} | {acc:.4f} | {acc:.4f} | 1.00x |")
        x = torch.rand(64, 1, 28, 28)
        for r in ratios:
            say(f"resample table: {base_id}, {r:.0%} removed")
            widths = widths_for(base, groups, ResampleBudget(max_params=int((1 - r) * total)))
            params = resampled_params(base, groups, widths)
            uniform = {g: uniform_cells(n) for g, n in widths.items()}
            nets = {"uniform": assemble(base, groups, permute_and_resample(layers, groups, perms, uniform))}
            ctx = BuildContext(bases={}, load_task=lambda t, c, d=data: d)
            tuned, _ = tune_partition(base, nets["uniform"], groups, layers, perms, uniform, data.train_x, card, steps,
                                      1e-2, 64, 0, ctx)  # fmt: skip
            nets["tuned"] = assemble(base, groups, permute_and_resample(layers, groups, perms, tuned))
            gen = torch.Generator().manual_seed(0)
            l1, rand = {}, {}
            for g in groups:
                w = base.get_submodule(g.producers[0][0]).weight.detach()  # (n, ...) the filters
                n, k = w.shape[0], widths[g.name]
                l1[g.name] = torch.sort(w.abs().flatten(1).sum(1).topk(k).indices).values
                rand[g.name] = torch.sort(torch.randperm(n, generator=gen)[:k]).values
            nets["l1"] = assemble(base, groups, select_channels(layers, groups, l1))
            nets["random"] = assemble(base, groups, select_channels(layers, groups, rand))
            accs = {k: accuracy(net, data.test_x, data.test_y, card.input) for k, net in nets.items()}
            with torch.inference_mode():
                speed = timeit(lambda b=base, x=x: b(x)) / timeit(lambda n=nets["uniform"], x=x: n(x))
            lines.append(f"| {base_id} | {1 - params / total:.1%} | {params:,} | {accs['uniform']:.4f} | "
                         f"{accs['tuned']:.4f} | {accs['l1']:.4f} | {accs['random']:.4f} | {speed:.2f}x |")  # fmt: skip
        assert digest_of(base) == digest, "the base changed during the experiment"
    lines += ["", *_resnet18_speed(say, ratios, quick)]
    return lines


def _resnet18_speed(say: Say, ratios: tuple[float, ...], quick: bool) -> list[str]:
    """torchvision resnet18 at 224x224, random weights: exactness of the conversion and speed-ups."""
    from zoo_store.methods.resample.config import ResampleBudget
    from zoo_store.methods.resample.layers import (
        assemble,
        permute_and_resample,
        resampled_params,
        uniform_cells,
    )
    from zoo_store.methods.resample.method import convert, widths_for

    say("resample: torchvision resnet18 at 224x224")
    torch.manual_seed(0)
    net = build_arch("tv_resnet18", {"num_classes": 1000}).eval()
    groups = net.channel_groups()
    layers, perms, _ = convert(net, groups)
    x = torch.rand(2 if quick else 8, 3, 224, 224)
    full = assemble(net, groups, permute_and_resample(layers, groups, perms, {g: uniform_cells(len(p)) for g, p in perms.items()}))
    with torch.inference_mode():
        y = net(x)
        err = ((full(x) - y).abs().max() / y.abs().max()).item()
        lines = [(f"torchvision `resnet18`, random weights, {len(x)} images of 224x224: the converted network (BatchNorm "
                 f"folded, channels reordered, full width) differs from the base by at most {err:.1e} of the largest "
                 f"output. Speed-up of the resampled network (base time / resampled time):\n"),
                 "| params removed | params | speed-up |", "|---:|---:|---:|"]  # fmt: skip
        total = sum(p.numel() for p in net.parameters())
        for r in ratios:
            widths = widths_for(net, groups, ResampleBudget(max_params=int((1 - r) * total)))
            small = assemble(net, groups, permute_and_resample(layers, groups, perms, {g: uniform_cells(n) for g, n in widths.items()}))
            speed = timeit(lambda: net(x), repeat=5, warmup=1) / timeit(lambda s=small: s(x), repeat=5, warmup=1)
            params = resampled_params(net, groups, widths)
            lines.append(f"| {1 - params / total:.1%} | {params:,} | {speed:.2f}x |")
    return lines


def reprogram_suite(say: Say, quick: bool) -> list[str]:
    """CLR vs head-only vs full fine-tuning on built-in tasks: held-out accuracy and stored bytes."""
    from zoo_store.datasets.builtin import BUILTINS
    from zoo_store.datasets.tasks import make_task
    from zoo_store.methods.registry import BuildContext, get_method
    from zoo_store.methods.spec import CompositionSpec, TaskSpec
    from zoo_store.training import accuracy
    from zoo_store.weights import digest_of

    store = demo_store(say, quick)
    spl = 50 if quick else 200
    epochs = 2 if quick else 5
    tasks = ["mnist-rotated", "mnist-inverted", "mnist-parity", "digits"]
    bases = ["resnet-mnist", "vgg-mnist", "mobilenet-mnist"]
    lines = [(f"Each task: {spl} training images per label, {epochs} epochs, Adam, seed 0; accuracy on the task's "
             "held-out test split. Head-only trains a new linear head on the frozen base; full fine-tuning trains a "
             "copy of the whole base (BatchNorm in train mode) plus the head; CLR trains the depthwise 3x3 "
             "reprogramming kernels plus the head, the base frozen. Stored % = bytes the method must keep per task / "
             "dense bytes of the base.\n"),
             "| base | task | CLR acc | head-only acc | full FT acc | CLR stored % | head-only stored % | full FT stored % |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for base_id in bases:
        card: Card = store.card(base_id)
        base = store.load_base(card)
        digest = digest_of(base)
        for task_id in tasks:
            say(f"reprogram table: {base_id} on {task_id}")
            spec = CompositionSpec(method="reprogram", base=base_id,
                                   task=TaskSpec(dataset=task_id, samples_per_label=spl),
                                   train={"epochs": epochs, "seed": 0, "lr": 1e-2})  # fmt: skip
            data = make_task(BUILTINS[task_id].make(), spec.task, card.input, 0)
            ctx = BuildContext(bases={base_id: (card, base)}, load_task=lambda t, c, d=data: d)
            art = get_method("reprogram").build(spec, ctx)
            clr_bytes = len(encode_bundle(make_manifest(art), art.tensors, art.metrics))
            dense = card.bytes
            head_model, head_bytes = _head_only(base, data, card, epochs)
            head_acc = accuracy(head_model, data.test_x, data.test_y, card.input)
            ft_acc = accuracy(_full_ft(card, store, data, epochs), data.test_x, data.test_y, card.input)
            lines.append(f"| {base_id} | {task_id} | {art.metrics['accuracy']:.4f} | {head_acc:.4f} | {ft_acc:.4f} | "
                         f"{clr_bytes / dense:.2%} | {head_bytes / dense:.2%} | 100% |")  # fmt: skip
        assert digest_of(base) == digest, "the base changed during the experiment"
    return lines


def _head_only(base: nn.Module, data, card: Card, epochs: int, init_rows: bool = False) -> tuple[nn.Module, int]:
    """A new linear head on the frozen base; returns the model and the head's bytes."""
    from zoo_store.training import fit, init_head_rows

    torch.manual_seed(0)
    head = nn.Linear(base.feature_dim, len(data.labels))
    if init_rows:
        init_head_rows(head, base.head_layer, card.labels, data.labels)
    model = nn.Sequential()
    model.forward = lambda x: head(base.embed(x))  # type: ignore[method-assign]
    fit(model, head.parameters(), data.train_x, data.train_y, card.input, epochs=epochs, lr=1e-2, batch_size=64, seed=0)
    return model, state_bytes(head)


def _full_ft(card: Card, store, data, epochs: int, init_rows: bool = False) -> nn.Module:
    """A copy of the whole base and a new head, all trained (BatchNorm in train mode)."""
    from zoo_store.training import fit, init_head_rows

    net = store.load_base(card)
    torch.manual_seed(0)
    head = nn.Linear(net.feature_dim, len(data.labels))
    if init_rows:
        init_head_rows(head, net.head_layer, card.labels, data.labels)
    replace_module(net, net.head_path, head)
    for p in net.parameters():
        p.requires_grad_(True)
    net.train()
    fit(net, net.parameters(), data.train_x, data.train_y, card.input, epochs=epochs, lr=1e-3, batch_size=64, seed=0)
    return net.eval()


def clone_suite(say: Say, quick: bool) -> list[str]:
    """Clone paths against head-only tuning and full fine-tuning of the target on the same correction
    data, and the target alone on its own labels; stored bytes against target + sources."""
    from zoo_store.datasets.builtin import BUILTINS
    from zoo_store.datasets.tasks import make_task
    from zoo_store.methods.clone.config import plan_clone
    from zoo_store.methods.registry import BuildContext, get_method
    from zoo_store.methods.spec import CompositionSpec, TaskSpec
    from zoo_store.training import accuracy
    from zoo_store.weights import digest_of

    store = demo_store(say, quick)
    spl, epochs = (30, 2) if quick else (200, 5)
    cases = [
        ("resnet-mnist-0-4", [("resnet-mnist-5-9", "56789")]),
        ("resnet-mnist-5-9", [("resnet-mnist-0-4", "01234")]),
        ("resnet-mnist-0-4", [("vgg-mnist", "56789")]),
        ("resnet-mnist-0-4", [("resnet-mnist-5-9", "567"), ("vgg-mnist", "89")]),
    ]
    lines = [(f"Task: MNIST digits 0-9, correction data {spl} training images per label, {epochs} epochs, seed 0; "
             "accuracy on the 10,000 held-out test images (union), and on those of the target's own labels. "
             "Head-only: a new head on the frozen target; full FT: a copy of the whole target and a new head, "
             "all trained; both heads start from the target's rows for its labels, as the clone's does. "
             "Target alone: the target on its own labels (its own 5-way head). Stored: the clone bundle / "
             "dense bytes of target + sources.\n"),
             ("| target | cloned from | clone | head-only | full FT | clone, target's labels | head-only, target's labels "
             "| full FT, target's labels | target alone | stored |"),
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    method = get_method("clone")
    mnist = BUILTINS["mnist"].make()
    for target_id, sources in cases:
        say(f"clone table: {target_id} <- {sources}")
        spec = CompositionSpec.model_validate({
            "method": "clone", "base": target_id, "sources": [{"model": m, "labels": list(ls)} for m, ls in sources],
            "task": {"dataset": "mnist", "samples_per_label": spl}, "train": {"epochs": epochs, "seed": 0}})  # fmt: skip
        cards = store.cards()
        plan = plan_clone(spec, cards)
        bases = {k: (cards[k], store.load_base(cards[k])) for k in method.validate(spec, cards)}
        t_card, target = bases[target_id]
        digests = {k: digest_of(n) for k, (_, n) in bases.items()}
        data = make_task(mnist, TaskSpec(dataset="mnist", labels=list(plan.labels), samples_per_label=spl), t_card.input, 0)
        art = method.build(spec, BuildContext(bases=bases, load_task=lambda t, c, d=data: d))
        stored = len(encode_bundle(make_manifest(art), art.tensors, art.metrics)) / art.metrics["dense_bytes"]
        own = torch.tensor([data.labels[int(k)] in t_card.labels for k in data.test_y])
        head, _ = _head_only(target, data, t_card, epochs, init_rows=True)
        full = _full_ft(t_card, store, data, epochs, init_rows=True)
        accs = {name: (accuracy(m, data.test_x, data.test_y, t_card.input),
                       accuracy(m, data.test_x[own], data.test_y[own], t_card.input)) for name, m in (("head", head), ("ft", full))}  # fmt: skip
        m = art.metrics
        src = " + ".join(f"{mid} ({','.join(ls)})" for mid, ls in sources)
        lines.append(f"| {target_id} | {src} | {m['accuracy']:.4f} | {accs['head'][0]:.4f} | {accs['ft'][0]:.4f} | "
                     f"{m['accuracy_target_labels']:.4f} | {accs['head'][1]:.4f} | {accs['ft'][1]:.4f} | "
                     f"{m['target_alone_accuracy']:.4f} | {stored:.2%} |")  # fmt: skip
        assert {k: digest_of(n) for k, (_, n) in bases.items()} == digests, "a base changed during the experiment"
    return lines


def reassemble_suite(say: Say, quick: bool) -> list[str]:
    """Reassembled networks against every single pool model given head-only training under the same
    budget, on tasks the pool was not trained on; Kendall's tau between NASWOT and trained accuracy."""
    from scipy.stats import kendalltau

    from zoo_store.datasets.builtin import BUILTINS
    from zoo_store.datasets.tasks import make_task
    from zoo_store.methods.reassemble.method import search, to_artifact, train_assembly
    from zoo_store.methods.reassemble.profile import Block, assembly_cost, card_profile
    from zoo_store.methods.registry import BuildContext
    from zoo_store.methods.spec import CompositionSpec
    from zoo_store.training import accuracy
    from zoo_store.weights import digest_of

    store = demo_store(say, quick)
    spl, epochs, trained = (20, 2, 8) if quick else (100, 5, 12)
    cards = store.cards()
    pool = sorted(cards)
    bases = {k: (cards[k], store.load_base(cards[k])) for k in pool}
    digests = {k: digest_of(n) for k, (_, n) in bases.items()}
    profiles = {k: card_profile(c) for k, c in cards.items()}
    lines = [(f"Pool: the {len(pool)} demo bases ({', '.join(pool)}), K = 3 blocks, budget max_params = the largest "
              f"single pool model with its new head. Each task: {spl} training images per label, {epochs} epochs, "
              "seed 0; accuracy on the task's held-out split. Reassembled: the NASWOT-best assembly, stitches and "
              "head trained (blocks frozen). Single models: a new head on the frozen model (its pooled last "
              "feature map), same data and epochs. Params and FLOPs (one image) of the network as run, heads "
              "included. Per-unit NASWOT (an analysis, not what the method picks by): the log-determinant of "
              "the kernel divided by the number of ReLU units, which does not grow with the network's size. "
              "tau: Kendall's tau between a score and trained accuracy over the candidates trained (the "
              "NASWOT top 4, the per-unit best, and the rest spread evenly over the ranking).\n"),
             "| task | network | blocks | params | MFLOPs | accuracy |", "|---|---|---|---:|---:|---:|"]  # fmt: skip
    taus, stores = [], []
    for task in ("digits", "mnist-rotated"):
        arrays = BUILTINS[task].make()
        say(f"reassemble table: {task}")

        def load(t, c, a=arrays):
            return make_task(a, t, c.input, 0)

        probe_spec = CompositionSpec.model_validate({"method": "reassemble", "models": pool, "task": {"dataset": task, "samples_per_label": spl}})
        num_labels = len(load(probe_spec.task, cards[pool[0]]).labels)
        singles = {m: assembly_cost([Block(model=m, start=None, end=profiles[m].stages[-1].tap)], profiles, num_labels) for m in pool}
        budget = max(p for p, _ in singles.values())
        spec = CompositionSpec.model_validate({**probe_spec.model_dump(), "budget": {"max_params": budget}, "blocks": 3,
                                               "train": {"epochs": epochs, "seed": 0}})  # fmt: skip
        found = search(spec, BuildContext(bases=bases, load_task=load))
        data, card = found.data, found.card
        ranked = found.ranked
        n_img = min(len(data.train_x), 64)
        per_unit = [c.score - n_img * math.log(found.units[c.blocks]) for c in ranked]  # the unit-diagonal kernel's score
        by_unit = max(range(len(ranked)), key=lambda i: (per_unit[i], -i))
        picks = sorted({*range(min(4, len(ranked))), by_unit,
                        *(round(i) for i in torch.linspace(4, len(ranked) - 1, max(0, trained - 5)).tolist())})  # fmt: skip
        accs = {}
        for n, i in enumerate(picks):
            say(f"reassemble table: {task}, training candidate {n + 1}/{len(picks)} (NASWOT rank {i + 1})")
            model = train_assembly(ranked[i], found.nets, card, data, found.probe, epochs, 1e-2, 64, 0, "cpu")
            accs[i] = accuracy(model, data.test_x, data.test_y, card.input)
            if i == 0:
                art = to_artifact(found, ranked[0], model)
                stored = len(encode_bundle(make_manifest(art), art.tensors, art.metrics)) / art.metrics["dense_bytes"]
        best = ranked[0]
        lines.append(f"| {task} | reassembled (NASWOT best) | {best.label()} | {best.params:,} | {best.flops / 1e6:.1f} | {accs[0]:.4f} |")
        c = ranked[by_unit]
        lines.append(f"| {task} | per-unit NASWOT best (rank {by_unit + 1}) | {c.label()} | {c.params:,} | {c.flops / 1e6:.1f} | {accs[by_unit]:.4f} |")
        top_trained = max(accs, key=lambda i: accs[i])
        if top_trained not in (0, by_unit):
            c = ranked[top_trained]
            lines.append(f"| {task} | best trained candidate (rank {top_trained + 1}) | {c.label()} | {c.params:,} | {c.flops / 1e6:.1f} | {accs[top_trained]:.4f} |")
        for m in pool:
            head, _ = _head_only(bases[m][1], data, cards[m], epochs)
            p, f = singles[m]
            lines.append(f"| {task} | {m} (head-only) | whole | {p:,} | {f / 1e6:.1f} | {accuracy(head, data.test_x, data.test_y, card.input):.4f} |")
        tau = kendalltau([ranked[i].score for i in picks], [accs[i] for i in picks])
        tau_unit = kendalltau([per_unit[i] for i in picks], [accs[i] for i in picks])
        stores.append(f"- {task}: the NASWOT-best path's bundle is {stored:.2%} of the assembled network's dense bytes")
        taus.append(f"- {task}: tau = {tau.statistic:.3f} (p = {tau.pvalue:.3f}); per-unit NASWOT: tau = "
                    f"{tau_unit.statistic:.3f} (p = {tau_unit.pvalue:.3f}); over {len(picks)} trained candidates of "
                    f"{len(ranked)} within budget ({budget:,} params); search: {found.metrics['search']}; partition: "
                    f"{'; '.join(' | '.join(s) for s in found.metrics['partition'])}")  # fmt: skip
    assert {k: digest_of(n) for k, (_, n) in bases.items()} == digests, "a base changed during the experiment"
    return [*lines, "\nNASWOT against trained accuracy:\n", *taus, "\nStored bytes:\n", *stores]


START, END = "<!-- bench:start -->", "<!-- bench:end -->"


def write_block(target: Path, title: str, block: str) -> None:
    """Replace the generated block of ``target`` (between the markers), keeping the prose around it."""
    text = target.read_text() if target.exists() else f"# {title}\n\n{START}\n{END}\n"
    if START not in text or END not in text:
        text = f"{text.rstrip()}\n\n{START}\n{END}\n"
    head, rest = text.split(START, 1)
    tail = rest.split(END, 1)[1]
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(f"{head}{START}\n{block}\n{END}{tail}")


def run_bench(out: Path, suite: str, quick: bool, say: Say = print) -> None:
    suites = {
        "serving": (serving_suite, out, "Benchmarks"),
        "reprogram": (reprogram_suite, out.parent / "methods" / "reprogram.md", "Reprogram (CLR)"),
        "resample": (resample_suite, out.parent / "methods" / "resample.md", "Resample (INN)"),
        "clone": (clone_suite, out.parent / "methods" / "clone.md", "Clone (PNC)"),
        "reassemble": (reassemble_suite, out.parent / "methods" / "reassemble.md", "Reassemble (DeRy)"),
    }
    if suite != "all" and suite not in suites:
        raise SystemExit(f"unknown suite {suite!r}; choose one of {[*suites, 'all']}")
    chosen = list(suites) if suite == "all" else [suite]
    for name in chosen:
        fn, target, title = suites[name]
        body = fn(say, quick)
        cmd = f"zoo bench --suite {name}{' --quick' if quick else ''}"
        header = [f"Command: `{cmd}`  ", f"Machine: {machine()}  ", f"Date: {dt.date.today()}\n"]
        write_block(target, title, "\n".join(header + body))
        say(f"wrote {target}")
