"""Mixed-path batches: one forward of a base serves samples of many reprogram paths, each sample
scored exactly as its own path's module scores it, whatever else shares the batch."""

from __future__ import annotations

import os

import pytest
import torch

from zoo_store.archs import build_arch
from zoo_store.core.device import exact_float32
from zoo_store.methods import get_method
from zoo_store.methods.reprogram.layers import build_reprogrammed

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


def random_base(arch: str, channels: int) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = {"num_classes": 10} if channels == 1 else {"num_classes": 10, "in_channels": channels}
    net = build_arch(arch, cfg).eval()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):  # eval-mode BatchNorm that is not the identity
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    for p in net.parameters():
        p.requires_grad_(False)
    return net.to(DEVICE)


def random_path(base: torch.nn.Module, num_classes: int, seed: int) -> tuple[dict, dict[str, torch.Tensor]]:
    """A reprogram path's config and tensors: identity kernels perturbed, a random head."""
    gen = torch.Generator().manual_seed(seed)
    model = build_reprogrammed(base, num_classes)
    tensors = {}
    for name, t in model.delta_state().items():
        tensors[name] = (t + 0.2 * torch.randn(t.shape, generator=gen).to(t.device)).contiguous()
    return {"base": "b", "num_classes": num_classes, "kernel": 3}, tensors


@pytest.mark.parametrize(("arch", "channels", "size"), BASES)
def test_mixed_batch_equals_each_paths_module(arch: str, channels: int, size: int) -> None:
    base = random_base(arch, channels)
    method = get_method("reprogram")
    paths = [random_path(base, k, seed) for seed, k in enumerate((10, 3, 7, 10))]  # label counts differ
    bank = method.bank(paths[0][0], {"b": base})
    bank.grow(len(paths))
    for slot, (config, tensors) in enumerate(paths):
        bank.load(slot, config, tensors)
    modules = [method.materialize(c, t, {"b": base}) for c, t in paths]
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
