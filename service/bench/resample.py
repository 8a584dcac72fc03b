"""The resample (INN) table: accuracy against parameters removed, and speed-ups."""

from __future__ import annotations

import torch

from service.bench.common import Say, demo_store, timeit
from zoo_store.archs import build_arch


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
