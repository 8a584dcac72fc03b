"""Architectures: taps chain to the full forward; torchvision adapters keep torchvision's keys."""

from __future__ import annotations

import pytest
import torch
import torchvision

from zoo_store.archs import arch_names, build_arch, register_arch
from zoo_store.core.errors import InvalidInput


def _input(arch: str) -> torch.Tensor:
    return torch.rand(2, 3, 64, 64) if arch.startswith("tv_") else torch.rand(2, 1, 28, 28)


@pytest.mark.parametrize("arch", arch_names())
def test_taps_chain_to_forward(arch: str) -> None:
    net = build_arch(arch, {"num_classes": 7}).eval()
    x = _input(arch)
    with torch.no_grad():
        inter = net.forward_intermediates(x)
        assert [t.name for t in net.taps] == list(inter)
        for tap in net.taps:
            assert inter[tap.name].shape[1] == tap.channels
        h, prev = x, None
        for tap in net.taps:
            h = net.run(h, start=prev, end=tap.name)
            prev = tap.name
        assert torch.equal(h, inter[net.taps[-1].name])
        assert torch.allclose(net.head_layer(h), net(x), atol=1e-6)
        assert net(x).shape == (2, 7) and net.feature_dim == net.taps[-1].channels


# ``block_taps``: a tap after every block (the configs of an earlier reassemble bench's deeper pool)
BLOCK_TAPS = {
    "resnet_s": {"blocks": [2, 2, 2], "block_taps": True},
    "vgg_s": {"block_taps": True},
    "mobilenet_s": {"block_taps": True},
    "convnext_s": {"block_taps": True},
}


@pytest.mark.parametrize("arch", list(BLOCK_TAPS))
def test_block_taps_cut_finer_with_the_same_weights(arch: str) -> None:
    """``block_taps`` changes the plan only: the same state dict and function, a tap after every
    block, at least 6 spatial taps."""
    config = BLOCK_TAPS[arch] | {"num_classes": 7}
    torch.manual_seed(0)
    coarse = build_arch(arch, {**config, "block_taps": False}).eval()
    fine = build_arch(arch, config).eval()
    fine.load_state_dict(coarse.state_dict())
    assert list(fine.state_dict()) == list(coarse.state_dict())
    assert len(fine.spatial_taps()) >= 6 > len(coarse.spatial_taps())
    x = torch.rand(2, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(fine(x), coarse(x))
        shapes = fine.tap_shapes(1, 28)
        for tap in fine.taps:
            assert shapes[tap.name][0] == tap.channels
            if tap.stride:  # the side is the input's over the stride, rounded either way (28 / 8: 3 or 4)
                assert shapes[tap.name][1] in (28 // tap.stride, -(-28 // tap.stride)), tap


@pytest.mark.parametrize(
    ("arch", "ctor"),
    [
        ("tv_resnet18", torchvision.models.resnet18),
        ("tv_resnet50", torchvision.models.resnet50),
        ("tv_mobilenet_v3_small", torchvision.models.mobilenet_v3_small),
    ],
)
def test_torchvision_keys_and_function(arch: str, ctor) -> None:
    ours = build_arch(arch, {"num_classes": 5}).eval()
    ref = ctor(num_classes=5).eval()
    assert list(ours.state_dict()) == list(ref.state_dict())
    ref.load_state_dict(ours.state_dict())
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(ours(x), ref(x), atol=1e-5)


def test_unknown_and_duplicate() -> None:
    with pytest.raises(InvalidInput, match="unknown architecture"):
        build_arch("nope")
    with pytest.raises(InvalidInput, match="bad config"):
        build_arch("resnet_s", {"depth": 3})
    with pytest.raises(InvalidInput, match="block_taps must be true or false, not 'false'"):
        build_arch("convnext_s", {"block_taps": "false"})
    with pytest.raises(InvalidInput, match="bad config for architecture 'resnet_s'"):
        build_arch("resnet_s", {"blocks": [1, 2]})  # one count per width
    with pytest.raises(ValueError, match="already registered"):
        register_arch("resnet_s")(lambda **kw: None)
