"""The resample (INN) table: accuracy against parameters removed, and speed-ups."""

from __future__ import annotations

import torch

from bench.common import SEEDS, Say, demo_store, mean_std, timeit
from zoo_store.archs import build_arch
from zoo_store.archs.groups import channel_groups
from zoo_store.core.spec import TaskSpec
from zoo_store.core.weights import digest_of
from zoo_store.datasets.builtin import BUILTINS
from zoo_store.datasets.tasks import make_task
from zoo_store.methods.base import BuildContext
from zoo_store.methods.resample.config import ResampleBudget
from zoo_store.methods.resample.layers import (
    assemble,
    group_size,
    permute_and_resample,
    recalibrate,
    resampled_params,
    select_channels,
    uniform_cells,
)
from zoo_store.methods.resample.method import convert, tune_partition, widths_for
from zoo_store.store.demo import DemoBase, train_base
from zoo_store.training import accuracy, normalize


def resample_suite(say: Say, quick: bool) -> list[str]:
    """Accuracy against parameters removed (uniform, partition-tuned, L1 and random pruning with the
    same rescale, each with and without BatchNorm recalibration, none fine-tuned) and the speed-up
    of the smaller dense network, per base; then resnet18 at 224."""
    store = demo_store(say, quick)
    steps, per_label = (20, 20) if quick else (100, 50)
    lines = [
        (
            f"Test accuracy on each base's own task (10,000 test images) with the given share of parameters "
            f"removed, none fine-tuned; mean ± std over seeds {', '.join(map(str, SEEDS))} where a row depends on a "
            f"seed. Each seed draws {per_label} training images per label ({per_label * 10} images): the images "
            f"partition tuning fits and BatchNorm recalibration measures. Uniform: the channels ordered by the "
            f"2-opt tour, then cubic resampling on a uniform grid (no seed). Tuned: the same with partition tuning "
            f"({steps} Adam steps, lr 1e-2, batches of 64 drawn from those images, matching the base's outputs; "
            f"weights frozen). L1: keep the channels with the largest L1 filter norm (no seed); random: a random "
            f"subset, {RANDOM_DRAWS} draws (draw d recalibrates on the images seed d draws, d = "
            f"0-{RANDOM_DRAWS - 1}). Both pruning baselines "
            f"scale the readers by n/n' exactly as resampling does. + BN recal: every BatchNorm of the base "
            f"re-estimates its statistics on the seed's images, as one train-mode pass does (those folded into "
            "a pruned layer through that layer's scale and bias). Nothing is chosen on test data: widths follow "
            "from the parameter "
            f"budget. Speed-up: base forward time / uniform-resampled forward time, batch 64, in this run.\n"
        ),
        "| base | params removed | params | uniform | tuned | L1 prune | L1 + BN recal | random prune | random + BN "
        "recal | speed-up |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    bases = [
        (base_id, store.card(base_id), store.load_base(store.card(base_id)), "mnist")
        for base_id in ("resnet-mnist", "vgg-mnist")
    ]
    bases.append(_cluttered_base(say, quick))
    for base_id, card, base, dataset in bases:
        lines += _base_rows(say, base_id, card, base, dataset, steps, per_label)
    lines += [
        "",
        (
            "resnet-cluttered: `resnet_s` trained by this bench on mnist-cluttered (the demo zoo's recipe, "
            "seed 0): a base whose own task is the harder one."
        ),
        "",
        *_resnet18_speed(say, RATIOS, quick),
    ]
    return lines


RATIOS = (0.1, 0.2, 0.3, 0.4, 0.5)
RANDOM_DRAWS = 5


def _cluttered_base(say: Say, quick: bool):
    """(id, card, network, dataset) of resnet_s trained here on mnist-cluttered, as the demo zoo trains."""
    say("resample table: training resnet-cluttered (resnet_s on mnist-cluttered)")
    b = DemoBase("resnet-cluttered", "resnet_s", "mnist-cluttered", "small ResNet on MNIST over natural patches")
    card, state = train_base(b, 2000 if quick else 12000, what="resample bench")
    net = build_arch(b.arch, {"num_classes": len(card.labels)})
    net.load_state_dict(state)
    say(f"resample table: resnet-cluttered test accuracy {card.metrics['accuracy']:.4f}")
    return b.id, card, net.eval(), b.dataset


def _base_rows(say: Say, base_id: str, card, base, dataset: str, steps: int, per_label: int) -> list[str]:
    digest = digest_of(base)
    arrays = BUILTINS[dataset].make()
    data = {
        s: make_task(arrays, TaskSpec(dataset=dataset, samples_per_label=per_label), card.input, s)
        for s in sorted({*SEEDS, *range(RANDOM_DRAWS)})
    }
    test_x, test_y = data[0].test_x, data[0].test_y  # the same test split for every seed

    def acc(net) -> float:
        return accuracy(net, test_x, test_y, card.input)

    groups = channel_groups(base)
    say(f"resample table: converting {base_id}")
    layers, perms, _ = convert(base, groups)
    total = sum(p.numel() for p in base.parameters())
    full = acc(base)
    lines = [
        f"| {base_id} | 0% | {total:,} | {full:.4f} | {full:.4f} | {full:.4f} | {full:.4f} | {full:.4f} | {full:.4f} "
        "| 1.00x |"
    ]
    x = torch.rand(64, 1, 28, 28)
    for r in RATIOS:
        say(f"resample table: {base_id}, {r:.0%} removed")
        widths = widths_for(base, groups, ResampleBudget(max_params=int((1 - r) * total)))
        params = resampled_params(base, groups, widths)
        uniform_cells_ = {g: uniform_cells(n) for g, n in widths.items()}
        uniform = assemble(base, groups, permute_and_resample(layers, groups, perms, uniform_cells_))
        cells: dict[str, list[float]] = {k: [] for k in ("tuned", "l1_recal", "random", "random_recal")}
        l1 = {g.name: _top_l1(base, g, widths[g.name]) for g in groups}
        l1_acc = acc(assemble(base, groups, select_channels(layers, groups, l1)))
        for seed in SEEDS:
            d = data[seed]
            ctx = BuildContext(bases={}, load_task=lambda t, c, d=d: d)
            tuned, _ = tune_partition(
                base, uniform, groups, layers, perms, uniform_cells_, d.train_x, card, steps, 1e-2, 64, seed, ctx
            )
            cells["tuned"].append(acc(assemble(base, groups, permute_and_resample(layers, groups, perms, tuned))))
            cells["l1_recal"].append(acc(_recalibrated(base, groups, layers, l1, normalize(d.train_x, card.input))))
        for draw in range(RANDOM_DRAWS):
            gen = torch.Generator().manual_seed(draw)
            rand = {
                g.name: torch.sort(torch.randperm(group_size(layers, g), generator=gen)[: widths[g.name]]).values
                for g in groups
            }
            cells["random"].append(acc(assemble(base, groups, select_channels(layers, groups, rand))))
            cells["random_recal"].append(
                acc(_recalibrated(base, groups, layers, rand, normalize(data[draw].train_x, card.input)))
            )
        with torch.inference_mode():
            speed = timeit(lambda b=base, x=x: b(x)) / timeit(lambda n=uniform, x=x: n(x))
        lines.append(
            f"| {base_id} | {1 - params / total:.1%} | {params:,} | {acc(uniform):.4f} | {mean_std(cells['tuned'])} | "
            f"{l1_acc:.4f} | {mean_std(cells['l1_recal'])} | {mean_std(cells['random'])} | "
            f"{mean_std(cells['random_recal'])} | {speed:.2f}x |"
        )
    assert digest_of(base) == digest, "the base changed during the experiment"
    return lines


def _top_l1(base, g, k: int) -> torch.Tensor:
    """The k channels of group ``g`` whose first producer's filters have the largest L1 norm, in order."""
    w = base.get_submodule(g.producers[0][0]).weight.detach()  # (n, ...) the filters
    return torch.sort(w.abs().flatten(1).sum(1).topk(k).indices).values


def _recalibrated(base, groups, layers, keep, x: torch.Tensor):
    """The pruned network (rescaled readers) with its folded BatchNorms recalibrated on ``x``."""
    net = assemble(base, groups, select_channels(layers, groups, keep))
    recalibrate(net, base, groups, keep, x)
    return net


def _resnet18_speed(say: Say, ratios: tuple[float, ...], quick: bool) -> list[str]:
    """torchvision resnet18 at 224x224, random weights: exactness of the conversion and speed-ups."""
    say("resample: torchvision resnet18 at 224x224")
    torch.manual_seed(0)
    net = build_arch("tv_resnet18", {"num_classes": 1000}).eval()
    groups = channel_groups(net)
    layers, perms, _ = convert(net, groups)
    x = torch.rand(2 if quick else 8, 3, 224, 224)
    full = assemble(
        net, groups, permute_and_resample(layers, groups, perms, {g: uniform_cells(len(p)) for g, p in perms.items()})
    )
    with torch.inference_mode():
        y = net(x)
        err = ((full(x) - y).abs().max() / y.abs().max()).item()
        lines = [
            (
                f"torchvision `resnet18`, random weights, {len(x)} images of 224x224: the converted network (BatchNorm "
                f"folded, channels reordered, full width) differs from the base by at most {err:.1e} of the largest "
                f"output. Speed-up of the resampled network (base time / resampled time):\n"
            ),
            "| params removed | params | speed-up |",
            "|---:|---:|---:|",
        ]
        total = sum(p.numel() for p in net.parameters())
        for r in ratios:
            widths = widths_for(net, groups, ResampleBudget(max_params=int((1 - r) * total)))
            small = assemble(
                net,
                groups,
                permute_and_resample(layers, groups, perms, {g: uniform_cells(n) for g, n in widths.items()}),
            )
            speed = timeit(lambda: net(x), repeat=5, warmup=1) / timeit(lambda s=small: s(x), repeat=5, warmup=1)
            params = resampled_params(net, groups, widths)
            lines.append(f"| {1 - params / total:.1%} | {params:,} | {speed:.2f}x |")
    return lines
