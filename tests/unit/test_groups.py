"""Channel groups traced from the graph and proven by permutation: they agree with the groups the
built-in architectures used to declare by hand, the proof can fail, and what cannot be proven is
reported with why."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from tests.conftest import tiny_weights
from zoo_store.archs import build_arch
from zoo_store.archs.groups import ChannelGroup, TracedGroups, _prove, channel_groups, proven_groups, trace_groups


def _cbn(p: str) -> tuple[str, str]:
    return (f"{p}.0", f"{p}.1")


# the groups round one declared by hand (module walks, as the architectures did), per architecture
def _declared_resnet_s(net: nn.Module) -> list[ChannelGroup]:
    from zoo_store.archs.small import BasicBlock

    return [
        ChannelGroup(f"{p}.conv1", (_cbn(f"{p}.conv1"),), (f"{p}.conv2.0",))
        for p, m in net.named_modules()
        if isinstance(m, BasicBlock)
    ]


def _declared_vgg_s(net: nn.Module) -> list[ChannelGroup]:
    convs = [p for p, m in net.named_modules() if isinstance(m, nn.Sequential) and isinstance(m[0], nn.Conv2d)]
    return [
        ChannelGroup(p, (_cbn(p),), (r,)) for p, r in zip(convs, [f"{p}.0" for p in convs[1:]] + ["head"], strict=True)
    ]


def _declared_mobilenet_s(net: nn.Module) -> list[ChannelGroup]:
    from zoo_store.archs.small import InvertedResidual

    groups = [
        ChannelGroup(f"{p}.body", (_cbn(f"{p}.body.0"),), (f"{p}.body.2.0",), (_cbn(f"{p}.body.1"),))
        for p, m in net.named_modules()
        if isinstance(m, InvertedResidual)
    ]
    last = f"stages.stage{len(net.taps) - 2}.2"
    return [*groups, ChannelGroup(last, (_cbn(last),), ("head",))]


def _declared_tv_resnet(net: nn.Module) -> list[ChannelGroup]:
    groups = []
    for p, m in net.named_modules():
        if isinstance(m, torchvision.models.resnet.BasicBlock | torchvision.models.resnet.Bottleneck):
            n = 3 if isinstance(m, torchvision.models.resnet.Bottleneck) else 2
            groups += [
                ChannelGroup(f"{p}.conv{i}", ((f"{p}.conv{i}", f"{p}.bn{i}"),), (f"{p}.conv{i + 1}",))
                for i in range(1, n)
            ]
    return groups


DECLARED = {  # arch -> (round one's groups, whether tracing finds exactly those)
    "resnet_s": (_declared_resnet_s, True),
    "vgg_s": (_declared_vgg_s, True),
    "mobilenet_s": (_declared_mobilenet_s, True),
    "tv_resnet18": (_declared_tv_resnet, True),
    "tv_resnet50": (_declared_tv_resnet, False),  # and the stem's channels (no residual meets them)
}


def _content(groups: list[ChannelGroup]) -> set[tuple]:
    return {(g.producers, g.consumers, g.depthwise) for g in groups}


@pytest.mark.parametrize("arch", list(DECLARED))
def test_traced_groups_agree_with_the_declared_ones(arch: str) -> None:
    net = build_arch(arch, {"num_classes": 10})
    declared, exact = DECLARED[arch]
    traced = _content(channel_groups(net))
    assert _content(declared(net)) <= traced
    assert (_content(declared(net)) == traced) == exact


def test_mobilenet_v3_small_traces_each_blocks_excitation_and_depthwise() -> None:
    """The excitation's fc2 scales the expanded channels (a producer of that group), fc1 reads them."""
    groups = {g.name: g for g in channel_groups(build_arch("tv_mobilenet_v3_small", {"num_classes": 10}))}
    g = groups["features.4.block.0.0"]
    assert g.producers == (("features.4.block.0.0", "features.4.block.0.1"), ("features.4.block.2.fc2", None))
    assert g.depthwise == (("features.4.block.1.0", "features.4.block.1.1"),)
    assert g.consumers == ("features.4.block.2.fc1", "features.4.block.3.0")


def test_a_wrong_group_fails_the_proof() -> None:
    """The proof can fail: a group that forgets one of its consumers changes the outputs."""
    torch.manual_seed(0)
    net = build_arch("resnet_s", {"num_classes": 10}).eval()
    net.load_state_dict(tiny_weights("resnet_s", 10))
    traced = trace_groups(net)
    g0 = traced.groups[0]
    broken = ChannelGroup(g0.name, g0.producers, (), g0.depthwise)  # its reader not shuffled with it
    before = {k: v.clone() for k, v in net.state_dict().items()}
    kept, failed = _prove(net, TracedGroups([broken, *traced.groups[1:]], [], {}, traced.probe), fresh=False)
    assert broken not in kept and set(failed) == {g0.name} and len(kept) == len(traced.groups) - 1
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())  # a network proven on is restored


def test_the_proof_sees_through_zero_initialised_scales() -> None:
    """timm zero-initialises each block's last BatchNorm scale, which hides a shuffle of the channels
    it writes; the proof perturbs every tensor of its throwaway network first."""
    net = build_arch("timm:resnet18", {"num_classes": 10})
    traced = trace_groups(net)
    g = next(g for g in traced.groups if g.name.endswith("conv1"))
    broken = ChannelGroup(g.name, g.producers, (), g.depthwise)
    kept, failed = _prove(
        build_arch("timm:resnet18", {"num_classes": 10}), TracedGroups([broken], [], {}, traced.probe), fresh=True
    )
    assert kept == [] and set(failed) == {g.name}


class _Scaled(nn.Module):
    """conv -> BN -> relu -> x * a per-channel parameter -> conv: the parameter is coupled to the channels."""

    def __init__(self):
        super().__init__()
        self.c1, self.bn, self.c2 = nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Conv2d(8, 4, 1)
        self.scale = nn.Parameter(torch.rand(1, 8, 1, 1) + 0.5)
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.c2(torch.relu(self.bn(self.c1(x))) * self.scale)
        return self.head(h.mean((2, 3)))


def test_a_parameter_that_scales_channels_leaves_them_unproven() -> None:
    traced = trace_groups(_Scaled().eval())
    assert "c1" not in {g.name for g in traced.groups} and "scale" in traced.opaque["c1"]


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("shufflenet_v2_x0_5", "(cat) reads its channels"),  # a concatenation of a split: its channel shuffle
    ],
)
def test_couplings_that_cannot_be_proven_are_reported(name: str, reason: str) -> None:
    report = proven_groups(build_arch(f"torchvision:{name}", {"num_classes": 10}))
    assert report.opaque and any(reason in why for why in report.opaque.values()), report.opaque
    assert not set(report.opaque) & {g.name for g in report.groups}


@pytest.mark.parametrize("arch", ["resnet_s", "vgg_s", "mobilenet_s"])
def test_a_resample_path_made_under_round_ones_group_names_still_serves(arch: str) -> None:
    """Paths stored before groups were traced name them as round one declared them; they materialize
    to the same network as the same path under the traced names. (tv_resnet50's old paths name a
    subset of its traced groups and serve, the stem at full width; tv_mobilenet_v3_small's old names
    match no traced group: a 422.)"""
    from zoo_store.methods import get_method

    net = build_arch(arch, {"num_classes": 10}).eval()
    net.load_state_dict(tiny_weights(arch, 10))
    groups = channel_groups(net)
    gen = torch.Generator().manual_seed(0)
    perms = {g.name: torch.randperm(_size_of(net, g), generator=gen).int() for g in groups}
    widths = {g.name: max(1, _size_of(net, g) * 7 // 10) for g in groups}
    method = get_method("resample")
    new = method.materialize({"base": "b", "widths": widths}, {f"perm.{k}": v for k, v in perms.items()}, {"b": net})
    declared = {(g.producers, g.consumers, g.depthwise): g.name for g in DECLARED_BY_ARCH[arch](net)}
    old_of = {g.name: declared[(g.producers, g.consumers, g.depthwise)] for g in groups}
    assert any(k != v for k, v in old_of.items())  # the names did change
    config = {"base": "b", "widths": {old_of[k]: w for k, w in widths.items()}}
    old = method.materialize(config, {f"perm.{old_of[k]}": v for k, v in perms.items()}, {"b": net})
    x = torch.rand(2, 1, 28, 28)  # (B, C, H, W)
    with torch.no_grad():
        assert torch.equal(old(x), new(x))


def _size_of(net: nn.Module, g: ChannelGroup) -> int:
    return net.get_submodule(g.producers[0][0]).weight.shape[0]


DECLARED_BY_ARCH = {"resnet_s": _declared_resnet_s, "vgg_s": _declared_vgg_s, "mobilenet_s": _declared_mobilenet_s}
