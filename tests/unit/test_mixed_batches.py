"""Mixed-path batches: one forward of a base serves samples of many reprogram paths, each sample
scored exactly as its own path's module scores it, whatever else shares the batch."""

from __future__ import annotations

import os
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch import nn

from zoo_store.archs import build_arch
from zoo_store.core.cards import InputSpec
from zoo_store.core.device import exact_float32
from zoo_store.core.spec import CompositionSpec
from zoo_store.datasets.tasks import TaskData
from zoo_store.methods import get_method
from zoo_store.methods.base import BuildContext
from zoo_store.methods.reprogram.layers import build_reprogrammed
from zoo_store.training import accuracy

# (architecture, input channels, input size): the demo families and two torchvision classifiers
BASES = [
    ("resnet_s", 1, 28),
    ("vgg_s", 1, 28),
    ("mobilenet_s", 1, 28),
    ("tv_resnet18", 3, 64),
    ("tv_mobilenet_v3_small", 3, 64),
]
DEVICE = os.environ.get("ZOO_TEST_DEVICE", "cpu")  # the GPU lease runs these with cuda
if DEVICE.startswith("cuda"):
    exact_float32()  # as the service does on CUDA


# per-task BatchNorm: module BatchNorms (the demo families, torchvision) and timm's, which its traced
# graph inlines as F.batch_norm calls
BN_BASES = [("resnet_s", 1, 28), ("mobilenet_s", 1, 28), ("timm:tf_efficientnet_lite0", 3, 32)]


def random_base(arch: str, channels: int) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = (
        {"num_classes": 10}
        if channels == 1 or arch.startswith("timm:")
        else {"num_classes": 10, "in_channels": channels}
    )
    net = build_arch(arch, cfg).eval()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):  # eval-mode BatchNorm that is not the identity
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    for p in net.parameters():
        p.requires_grad_(False)
    return net.to(DEVICE)


def random_path(
    base: torch.nn.Module, num_classes: int, seed: int, bn: bool = False
) -> tuple[dict, dict[str, torch.Tensor]]:
    """A reprogram path's config and tensors: identity kernels perturbed, a random head; with ``bn``
    the base's BatchNorms perturbed (running variances scaled, so they stay positive)."""
    gen = torch.Generator().manual_seed(seed)
    model = build_reprogrammed(base, num_classes, bn=bn)
    tensors = {}
    for name, t in model.delta_state().items():
        if name.endswith("running_var"):
            noise = torch.empty(t.shape).uniform_(0.5, 2.0, generator=gen).to(t.device)
            tensors[name] = (t * noise).contiguous()
        else:
            tensors[name] = (t + 0.2 * torch.randn(t.shape, generator=gen).to(t.device)).contiguous()
    config = {"base": "b", "num_classes": num_classes, "kernel": 3}
    return ({**config, "bn": True} if bn else config), tensors


def bank_and_modules(base: nn.Module, paths: list[tuple[dict, dict]]) -> tuple[Any, list[nn.Module]]:
    """The reprogram bank holding ``paths`` in slots 0.., and each path's own materialized module."""
    method = get_method("reprogram")
    bank = method.bank(paths[0][0], {"b": base})
    bank.grow(len(paths))
    for slot, (config, tensors) in enumerate(paths):
        bank.load(slot, config, tensors)
    return bank, [method.materialize(c, t, {"b": base}) for c, t in paths]


@pytest.mark.parametrize(("arch", "channels", "size"), BASES)
def test_mixed_batch_equals_each_paths_module(arch: str, channels: int, size: int) -> None:
    base = random_base(arch, channels)
    paths = [random_path(base, k, seed) for seed, k in enumerate((10, 3, 7, 10))]  # label counts differ
    bank, modules = bank_and_modules(base, paths)
    torch.manual_seed(1)
    x = torch.randn(9, channels, size, size).to(DEVICE)  # (B, C, H, W)
    slots = torch.tensor([0, 1, 2, 3, 1, 0, 3, 2, 1], device=DEVICE)
    with torch.inference_mode():
        mixed = bank.forward(x, slots)  # (B, K_max)
        for i, s in enumerate(slots.tolist()):
            k = paths[s][0]["num_classes"]
            own = modules[s](x[i : i + 1])[0].softmax(-1)  # (K,) the path's own scores
            torch.testing.assert_close(mixed[i].softmax(-1)[:k], own, atol=1e-5, rtol=0)
            assert torch.isinf(mixed[i, k:]).all()  # padding never scores
        # a sample's scores do not depend on its neighbours: alone, or among other paths (within float32
        # sums the conv library orders by batch size: 2.3e-6 seen on a loaded CPU; a neighbour's path
        # leaking in moves scores by orders of magnitude more)
        for i in (0, 4):
            alone = bank.forward(x[i : i + 1], slots[i : i + 1])[0].softmax(-1)
            torch.testing.assert_close(mixed[i].softmax(-1), alone, atol=1e-5, rtol=0)


@pytest.mark.parametrize(("arch", "channels", "size"), BN_BASES)
@pytest.mark.parametrize("own_norms", [(False, True, True, False), (True, True, True, True)], ids=["mixed", "all-bn"])
def test_paths_with_their_own_batchnorm_share_the_batch(
    arch: str, channels: int, size: int, own_norms: tuple[bool, ...]
) -> None:
    """Paths with and without per-task BatchNorm in one batch: each sample scored as its own
    path's module scores it; a sample without BatchNorm alone gives what it gives among BN paths."""
    base = random_base(arch, channels)
    sizes = (10, 3, 7, 10)
    paths = [random_path(base, k, seed, bn) for seed, (k, bn) in enumerate(zip(sizes, own_norms, strict=True))]
    bank, modules = bank_and_modules(base, paths)
    torch.manual_seed(1)
    x = torch.randn(8, channels, size, size).to(DEVICE)  # (B, C, H, W)
    slots = torch.tensor([0, 1, 2, 3, 1, 0, 3, 2], device=DEVICE)
    with torch.inference_mode():
        mixed = bank.forward(x, slots)  # (B, K_max)
        for i, s in enumerate(slots.tolist()):
            k = paths[s][0]["num_classes"]
            own = modules[s](x[i : i + 1])[0]  # (K,) the path's own logits
            torch.testing.assert_close(mixed[i, :k], own, atol=1e-4, rtol=1e-5)
            torch.testing.assert_close(mixed[i].softmax(-1)[:k], own.softmax(-1), atol=1e-5, rtol=0)
        alone = bank.forward(x[:1], slots[:1])[0]  # slot 0 without any neighbour
        torch.testing.assert_close(mixed[0].softmax(-1), alone.softmax(-1), atol=1e-5, rtol=0)


def test_a_fresh_batchnorm_path_is_the_base() -> None:
    """Copies of the base's BatchNorms and identity kernels: the base's function, bit for bit, in the
    materialized module and in the bank (where its samples take the per-slot affine)."""
    for arch, channels, size in BN_BASES:
        base = random_base(arch, channels)
        model = build_reprogrammed(base, 10, bn=True).eval()
        assert len(model.norms) == sum(isinstance(m, torch.nn.BatchNorm2d) for m in base.modules())
        with torch.no_grad():
            model.head.load_state_dict(base.head_layer.state_dict())
        x = torch.randn(3, channels, size, size).to(DEVICE)  # (B, C, H, W)
        with torch.inference_mode():
            assert torch.equal(model(x), base(x)), arch
            tensors = {k: v.contiguous() for k, v in model.delta_state().items()}
            bank = get_method("reprogram").bank({"base": "b", "num_classes": 10}, {"b": base})
            bank.grow(1)
            bank.load(0, {"base": "b", "num_classes": 10, "bn": True}, tensors)
            torch.testing.assert_close(bank.forward(x, torch.zeros(3, dtype=torch.long, device=DEVICE)), base(x))


def test_training_moves_only_the_paths_batchnorm() -> None:
    """Training mode: the path's BatchNorms use batch statistics and update their running ones (in
    timm's traced graph too, where the call is inlined); the base's stay as they were."""
    for arch, channels, size in BN_BASES:
        base = random_base(arch, channels)
        before = {k: v.clone() for k, v in base.state_dict().items()}
        model = build_reprogrammed(base, 10, bn=True).train()
        x = torch.randn(4, channels, size, size).to(DEVICE)  # (B, C, H, W)
        model(x).sum().backward()
        norm = next(iter(model.norms.values()))
        assert norm.weight.grad is not None and norm.weight.grad.abs().sum() > 0, arch
        first = arch_bn = next(p for p, m in base.named_modules() if isinstance(m, torch.nn.BatchNorm2d))
        assert not torch.equal(norm.running_mean, before[f"{first}.running_mean"]), arch_bn
        assert all(torch.equal(v, base.state_dict()[k]) for k, v in before.items()), arch


def test_a_built_batchnorm_path_is_measured_and_stored_in_eval_mode() -> None:
    """The build measures its accuracy with the path's running statistics, and the test images it
    measures on leave them as training left them."""
    base = random_base("resnet_s", 1)
    spec = InputSpec(channels=1, size=28, mean=(0.5,), std=(0.5,))
    card = SimpleNamespace(id="b", digest="0" * 64, input=spec, labels=tuple("0123456789"))
    gen = torch.Generator().manual_seed(0)
    x, y = torch.rand(24, 1, 28, 28, generator=gen), torch.arange(24) % 3
    tx, ty = torch.rand(12, 1, 28, 28, generator=gen), torch.arange(12) % 3
    compose = CompositionSpec(
        method="reprogram", base="b", task={"dataset": "d"}, train={"epochs": 1}, options={"bn": True}
    )
    method = get_method("reprogram")
    arts = []
    for test_x in (tx, 4 * tx):  # the same training, test images far apart
        data = TaskData(x, y, test_x, ty, ["a", "b", "c"], x[:6], y[:6])
        arts.append(method.build(compose, BuildContext(bases={"b": (card, base)}, load_task=lambda t, c, d=data: d)))
    assert all(torch.equal(arts[0].tensors[k], arts[1].tensors[k]) for k in arts[0].tensors)
    module = method.materialize(arts[1].config, arts[1].tensors, {"b": base})
    assert accuracy(module, 4 * tx, ty, spec) == arts[1].metrics["accuracy"]
