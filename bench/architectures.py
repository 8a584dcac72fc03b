"""The architectures suite: every torchvision classifier by name (random weights) registered and
either composed into a reprogram path end to end (two training steps) or refused with the reason;
and, per family, what tracing found (taps, channel groups) and what the methods cost there."""

from __future__ import annotations

import gc
import shutil
import tempfile
import time
from pathlib import Path

import torch
import torchvision

from bench.common import Say, dir_store
from zoo_store.archs import build_arch
from zoo_store.archs.families import FAMILIES, TIMM_FAMILIES
from zoo_store.archs.groups import proven_groups
from zoo_store.archs.surgery import tensor_bytes
from zoo_store.core.cards import CardIn, InputSpec
from zoo_store.core.errors import InvalidInput
from zoo_store.core.spec import CompositionSpec
from zoo_store.datasets.tasks import TaskData
from zoo_store.methods import get_method
from zoo_store.methods.base import BuildContext
from zoo_store.methods.reprogram.layers import build_reprogrammed, dense_bytes, reprogram_refusal
from zoo_store.store.store import fits_input

SIZES = (64, 96, 224)  # the input side tried, smallest first: the first the network takes
QUICK_NAMES = ("resnet18", "mobilenet_v3_small", "squeezenet1_0", "vit_b_16")


def architectures_suite(say: Say, quick: bool) -> list[str]:
    names = QUICK_NAMES if quick else tuple(torchvision.models.list_models(module=torchvision.models))
    families = {**FAMILIES, **(TIMM_FAMILIES if _has_timm() else {})}
    intro = (
        "One small member per family, random weights, 10 labels, 3 x 64 x 64 input (for the traced taps and "
        "groups: 224 unless the config names an image size). *Taps*: spatial taps (name@stride) and the head's "
        "input. *Reprogram*: a path's bytes over "
        "the dense network's. *Groups*: traced and proven (in brackets: how many of them a grouped conv splits "
        "into blocks) / residual (kept at full width) / left at full width (opaque: a split or a channel "
        "shuffle, a reshape...). *Resample touches*: the share of parameters "
        "in layers a proven group reads or writes.\n"
    )
    header = (
        "| family | architecture | params | taps | reprogram bytes / dense "
        "| groups proven / residual / full width | resample touches |"
    )
    lines = ["### Families\n", intro, header, "|---|---|---:|---|---:|---|---:|"]
    for family, arch in families.items() if not quick else list(families.items())[:3]:
        say(f"architectures: family {family} ({arch})")
        lines.append(_family_row(family, arch))
    which = "Four names" if quick else f"All {len(names)} names"
    about = (
        f"{which} of `torchvision.models.list_models(module=torchvision.models)`, random weights, registered in a "
        "scratch zoo at the smallest of 64 / 96 / 224 that the network takes, then a reprogram path composed end "
        "to end (16 random images of 2 labels, one epoch of batch 8: two steps) or refused at POST with the "
        "reason given.\n"
    )
    lines += [
        "\n### Every torchvision classifier\n",
        about,
        "| name | input | params | spatial taps | reprogram | seconds |",
        "|---|---:|---:|---:|---|---:|",
    ]
    composed = 0
    for i, name in enumerate(names):
        say(f"architectures: {name} [{i + 1}/{len(names)}]")
        row, ok = _name_row(name)
        composed += ok
        lines.append(row)
        gc.collect()
    lines.append(f"\n{composed} of {len(names)} compose a reprogram path; the rest are refused with the reason above.")
    return lines


def _has_timm() -> bool:
    try:
        import timm  # noqa: F401
    except ImportError:
        return False
    return True


def _family_row(family: str, arch: str) -> str:
    try:
        _, net = _fitting(arch)
    except InvalidInput as e:
        return f"| {family} | `{arch}` | | refused: {_short(e)} | | | |"
    params = sum(p.numel() for p in net.parameters())
    taps = ", ".join(f"{t.name}@{t.stride}" for t in net.taps if t.stride) or "none"
    if reprogram_refusal(net) is None:
        delta = build_reprogrammed(net, 10).delta_state()
        delta_bytes = tensor_bytes(delta.values())
        ratio = f"{delta_bytes / dense_bytes(net, delta_bytes):.2%}"
    else:
        ratio = "refused"
    report = proven_groups(net)
    touched = {
        p
        for g in report.groups
        for p in (*(a for a, _ in (*g.producers, *g.depthwise, *g.sliced, *g.carried)), *g.consumers, *g.grouped)
    }
    share = sum(p.numel() for path in touched for p in net.get_submodule(path).parameters()) / params
    blocked = f" ({n} in blocks)" if (n := sum(g.blocks > 1 for g in report.groups)) else ""
    return (
        f"| {family} | `{arch}` | {params / 1e6:.1f} M | {taps} (head reads {net.taps[-1].name}) | {ratio} | "
        f"{len(report.groups)}{blocked} / {len(report.residual)} / {len(report.opaque)} | {share:.0%} |"
    )


def _fitting(arch: str) -> tuple[int, torch.nn.Module]:
    """(input side, the network with random weights) at the first size of SIZES it takes."""
    last: InvalidInput | None = None
    for size in SIZES:
        try:
            fits_input(_card(arch, size))
        except InvalidInput as e:
            last = e
            if "cannot take" not in str(e):
                raise
            continue
        torch.manual_seed(0)
        return size, build_arch(arch, {"num_classes": 10}).eval()
    assert last is not None
    raise last


def _card(arch: str, size: int) -> CardIn:
    spec = InputSpec(channels=3, size=size, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    return CardIn(id="b", arch=arch, labels=tuple(str(i) for i in range(10)), input=spec)


def _name_row(name: str) -> tuple[str, bool]:
    arch, t = f"torchvision:{name}", time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="zoo-archs-"))
    try:
        size, net = _fitting(arch)
        params = sum(p.numel() for p in net.parameters())
        store = dir_store(work)
        card, _ = store.add_base(_card(arch, size), net.state_dict())
        del net
        spec = CompositionSpec.model_validate(
            {
                "method": "reprogram",
                "base": "b",
                "task": {"dataset": "none", "labels": ["a", "b"]},
                "train": {"epochs": 1, "batch_size": 8, "seed": 0},
            }
        )
        method = get_method("reprogram")
        head = f"| `{name}` | {size} | {params / 1e6:.1f} M | {sum(1 for x in card.taps if x.stride)} |"
        try:
            method.check(spec, store.cards())
        except InvalidInput as e:
            return f"{head} refused: {_short(e)} | {time.perf_counter() - t:.1f} |", False
        gen = torch.Generator().manual_seed(0)
        data = TaskData(
            torch.rand(16, 3, size, size, generator=gen),
            torch.arange(16) % 2,
            torch.rand(8, 3, size, size, generator=gen),
            torch.arange(8) % 2,
            ["a", "b"],
            torch.rand(8, 3, size, size, generator=gen),
            torch.arange(8) % 2,
        )
        base = store.load_base(card)
        art = method.build(spec, BuildContext(bases={"b": (card, base)}, load_task=lambda s, c: data))
        kib = art.metrics["tensor_bytes"] / 1024
        return (
            f"{head} composed: {art.metrics['clr_layers']} CLR layers, {kib:,.0f} KiB "
            f"({art.metrics['tensor_bytes'] / art.metrics['dense_bytes']:.2%} of dense) | "
            f"{time.perf_counter() - t:.1f} |"
        ), True
    except InvalidInput as e:
        return f"| `{name}` | | | | refused at registration: {_short(e)} | {time.perf_counter() - t:.1f} |", False
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _short(e: Exception) -> str:
    text = str(e).replace("|", "/").replace("\n", " ")
    return text if len(text) <= 220 else text[:217] + "..."
