"""Couplings beyond a plain conv -> conv chain. Grouped convolutions (ResNeXt, RegNet): a grouped
conv's channels fall into blocks that a permutation and a resample must respect; traced, proven,
resampled block by block, checked in a stored path. Concatenations (DenseNet, GoogLeNet): each
concatenated group is read at its offset and normalized at its offset; permuted and resampled there."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn
from torch.func import functional_call

from zoo_store.archs import build_arch
from zoo_store.archs.groups import _permute, block_perm, channel_groups, keeps_blocks, proven_groups, trace_groups
from zoo_store.core.errors import InvalidInput
from zoo_store.methods import get_method
from zoo_store.methods.resample.config import ResampleBudget
from zoo_store.methods.resample.layers import (
    assemble,
    fused_layers,
    module_tensors,
    permute_and_resample,
    resampled_params,
    select_channels,
    uniform_cells,
)
from zoo_store.methods.resample.method import block_cells, convert, widths_for


class _Grouped(nn.Module):
    """conv -> BN -> grouped conv (4 groups) -> BN -> 1 x 1 conv -> pool -> linear."""

    def __init__(self, second_groups: int | None = None, width: int = 8) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width)
        self.c2, self.b2 = nn.Conv2d(width, width, 3, padding=1, groups=4), nn.BatchNorm2d(width)
        self.other = nn.Conv2d(width, width, 3, padding=1, groups=second_groups) if second_groups else None
        self.c3 = nn.Conv2d(width, 6, 1)
        self.head = nn.Linear(6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.b1(self.c1(x)))
        g = torch.relu(self.b2(self.c2(h)))
        if self.other is not None:  # a second grouped conv, of another group count, reads h too
            g = g + self.other(h)
        return self.head(self.c3(g).mean((2, 3)))


def _perturbed(net: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    with torch.no_grad():
        for name, t in net.state_dict().items():
            if t.is_floating_point():
                t.copy_(torch.rand_like(t) + 0.5 if name.endswith("running_var") else t + 0.1 * torch.randn_like(t))
    return net.eval()


def test_a_grouped_conv_splits_both_its_channel_spaces_into_blocks_and_both_are_proven() -> None:
    net = _perturbed(_Grouped())
    groups = {g.name: g for g in proven_groups(net).groups}
    assert groups["c1"].grouped == ("c2",) and groups["c1"].consumers == () and groups["c1"].blocks == 4
    assert groups["c2"].producers == (("c2", "b2"),) and groups["c2"].consumers == ("c3",) and groups["c2"].blocks == 4


def test_a_permutation_across_blocks_changes_the_function_one_within_them_does_not() -> None:
    """On the grouped conv's output channels (rows of c2, columns of c3): a row moved to another block
    reads another block of c2's input with the same weights."""
    net = _perturbed(_Grouped())
    groups = {g.name: g for g in trace_groups(net).groups}
    x = torch.rand(2, 3, 8, 8)  # (B, C, H, W)
    with torch.no_grad():
        y = net(x)
        for g in groups.values():  # c1's columns in c2 are shuffled block by block
            within = block_perm(8, 4, torch.Generator().manual_seed(1))
            assert keeps_blocks(within, 4) and not torch.equal(within, torch.arange(8))
            _permute(net, g, within)
            torch.testing.assert_close(net(x), y, atol=1e-5, rtol=1e-5)
            _permute(net, g, torch.argsort(within))
        g = groups["c2"]
        across = torch.tensor([2, 1, 0, 3, 4, 5, 6, 7])  # channels 0 and 2 trade blocks
        assert not keeps_blocks(across, 4)
        _permute(net, g, across)
        assert not torch.allclose(net(x), y, atol=1e-3)


def test_a_depthwise_conv_with_a_channel_multiplier_leaves_its_input_at_full_width() -> None:
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.BatchNorm2d(4),
        nn.Conv2d(4, 8, 3, groups=4),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 2),
    )
    traced = trace_groups(_perturbed(net))
    assert "channel multiplier" in traced.opaque["0"], traced.opaque


def test_grouped_convs_of_different_group_counts_on_one_space_leave_it_at_full_width() -> None:
    traced = trace_groups(_perturbed(_Grouped(second_groups=2)))
    assert "c1" not in {g.name for g in traced.groups}
    assert "different group counts" in traced.opaque["c1"], traced.opaque


@pytest.fixture(scope="module")
def regnet() -> nn.Module:
    net = build_arch("torchvision:regnet_x_400mf", {"num_classes": 10})
    return _perturbed(net)


def test_regnet_resamples_every_grouped_conv_block_by_block(regnet: nn.Module) -> None:
    groups = channel_groups(regnet)
    blocked = [g for g in groups if g.blocks > 1]
    grouped = {n for n, m in regnet.named_modules() if isinstance(m, nn.Conv2d) and 1 < m.groups < m.in_channels}
    assert grouped and grouped == {c for g in blocked for c in g.grouped}, proven_groups(regnet).opaque
    widths = widths_for(regnet, groups, ResampleBudget(width=0.7))
    assert all(
        widths[g.name] % g.blocks == 0 and widths[g.name] < regnet.get_submodule(g.name).weight.shape[0]
        for g in blocked
    )
    _, ordered, _ = convert(regnet, blocked[:4])  # each block ordered along its own tour (a few: 2-opt is slow)
    assert all(
        keeps_blocks(ordered[g.name], g.blocks)
        and not torch.equal(ordered[g.name].long(), torch.arange(len(ordered[g.name])))
        for g in blocked[:4]
    )
    gen = torch.Generator().manual_seed(0)
    sizes = {g.name: regnet.get_submodule(g.name).weight.shape[0] for g in groups}
    perms = {f"perm.{g.name}": ordered.get(g.name, block_perm(sizes[g.name], g.blocks, gen).int()) for g in groups}
    small = get_method("resample").materialize({"base": "b", "widths": widths}, perms, {"b": regnet})
    assert sum(p.numel() for p in small.parameters()) == resampled_params(regnet, groups, widths)
    assert all(small.get_submodule(c).groups == regnet.get_submodule(c).groups for c in grouped)
    with torch.no_grad():
        y = small(torch.rand(2, 3, 64, 64))  # (B, 10)
    assert y.shape == (2, 10) and torch.isfinite(y).all()


def test_a_stored_path_that_breaks_the_blocks_is_422(regnet: nn.Module) -> None:
    groups = channel_groups(regnet)
    g = next(g for g in groups if g.blocks > 1)
    sizes = {h.name: regnet.get_submodule(h.name).weight.shape[0] for h in groups}
    perms = {f"perm.{h.name}": torch.arange(sizes[h.name], dtype=torch.int32) for h in groups}
    method = get_method("resample")
    widths = dict(sizes)
    n = sizes[g.name]
    crossing = torch.arange(n, dtype=torch.int32)
    crossing[[0, n - 1]] = crossing[
        [n - 1, 0]
    ]  # the first channel of the first block trades with the last block's last
    with pytest.raises(InvalidInput, match="moves channels across the .* blocks"):
        method.materialize({"base": "b", "widths": widths}, {**perms, f"perm.{g.name}": crossing}, {"b": regnet})
    with pytest.raises(InvalidInput, match="as many channels in every block"):
        method.materialize({"base": "b", "widths": {**widths, g.name: n - 1}}, perms, {"b": regnet})
    grids = {f"grid.{h.name}": torch.full((sizes[h.name],), 2.0 / sizes[h.name]) for h in groups}
    skewed = torch.full((n,), 2.0 / n)
    skewed[: n // g.blocks] *= 1.5  # the first block's cells sum past 2 / blocks, the total does not stay 2
    skewed *= 2.0 / skewed.sum()  # the total 2 again: still not 2 / blocks per block
    tuned = {"base": "b", "widths": widths, "tuned": True}
    with pytest.raises(InvalidInput, match=r"each of its \d+ block\(s\) summing to"):
        method.materialize(tuned, {**perms, **grids, f"grid.{g.name}": skewed}, {"b": regnet})
    method.materialize(tuned, {**perms, **grids}, {"b": regnet})  # the uniform grid is fine


def test_a_path_made_before_grouped_convs_were_traced_still_serves(regnet: nn.Module) -> None:
    """It names only the groups traced then (none with blocks): those are resampled, the grouped
    convs' groups stay at full width."""
    groups = channel_groups(regnet)
    older = [g for g in groups if g.blocks == 1]
    assert older and len(older) < len(groups)
    sizes = {g.name: regnet.get_submodule(g.name).weight.shape[0] for g in older}
    widths = {k: n // 2 for k, n in sizes.items()}
    perms = {f"perm.{k}": torch.arange(n, dtype=torch.int32) for k, n in sizes.items()}
    method = get_method("resample")
    assert set(method.expected_tensors({"base": "b", "widths": widths}, {"b": regnet})) == set(perms)
    small = method.materialize({"base": "b", "widths": widths}, perms, {"b": regnet})
    grouped = [c for g in groups for c in g.grouped]
    assert all(small.get_submodule(c).weight.shape == regnet.get_submodule(c).weight.shape for c in grouped)
    assert sum(p.numel() for p in small.parameters()) == resampled_params(regnet, older, widths)


def test_tuned_cells_sum_to_each_blocks_share() -> None:
    cells = block_cells(torch.randn(12), 3)
    torch.testing.assert_close(cells.view(3, 4).sum(1), torch.full((3,), 2 / 3))


def test_blocks_resample_each_on_its_own_as_resample_axis_does() -> None:
    from zoo_store.methods.resample.layers import _along, block_centres, resample_axis

    t = torch.randn(5, 12, 3, dtype=torch.float64)  # axis 1: 3 blocks of 4 channels
    cells = block_cells(torch.randn(6), 3).double()  # 3 blocks of 2 new cells, uneven
    xs = block_centres(cells, 3)
    expected = torch.cat([resample_axis(part, 1, x) for part, x in zip(t.tensor_split(3, 1), xs, strict=True)], 1)
    torch.testing.assert_close(_along(t, 1, xs), expected)


class _Concat(nn.Module):
    """Two convs side by side, concatenated, a BatchNorm over the concatenation, a conv reading it
    (DenseNet's pattern); ``then_add``: the concatenation is added to another value instead."""

    def __init__(self, then_add: bool = False) -> None:
        super().__init__()
        self.a, self.ba = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.b, self.bb = nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.norm, self.c = nn.BatchNorm2d(10), nn.Conv2d(10, 5, 1)
        self.other = nn.Conv2d(3, 10, 1) if then_add else None
        self.head = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.cat(tensors=[torch.relu(self.ba(self.a(x))), torch.relu(self.bb(self.b(x)))], dim=1)  # (B, 10, H, W)
        if self.other is not None:
            h = h + self.other(x)
        return self.head(torch.relu(self.c(torch.relu(self.norm(h)))).mean((2, 3)))


def test_a_concatenation_is_read_and_normalized_at_each_groups_offset() -> None:
    net = _perturbed(_Concat())
    groups = {g.name: g for g in proven_groups(net).groups}
    assert groups["a"].sliced == (("c", 0),) and groups["a"].carried == (("norm", 0),) and groups["a"].consumers == ()
    assert groups["b"].sliced == (("c", 4),) and groups["b"].carried == (("norm", 4),)


def test_a_concatenation_resamples_each_group_at_its_offset() -> None:
    net = _perturbed(_Concat())
    groups = proven_groups(net).groups
    layers = fused_layers(net, groups)
    x = torch.rand(2, 3, 8, 8)  # (B, C, H, W)
    gen = torch.Generator().manual_seed(0)
    perms = {g.name: torch.randperm(layers[g.name].weight.shape[0], generator=gen) for g in groups}
    full = {g.name: uniform_cells(layers[g.name].weight.shape[0]) for g in groups}
    with torch.no_grad():
        torch.testing.assert_close(
            assemble(net, groups, permute_and_resample(layers, groups, perms, full))(x), net(x), atol=1e-5, rtol=1e-5
        )
        widths = {"a": 3, "b": 4}
        fused = permute_and_resample(layers, groups, perms, {k: uniform_cells(w) for k, w in widths.items()})
        small = assemble(net, groups, fused)
        assert small.c.in_channels == 7 and small.norm.num_features == 7 and small(x).shape == (2, 3)
        assert (small.norm.running_var >= net.norm.running_var.min()).all()  # cubic overshoot kept off zero
        # partition tuning runs the small network on tensors it recomputes: the same function
        torch.testing.assert_close(functional_call(small, module_tensors(fused), (x,)), small(x))
    assert sum(p.numel() for p in small.parameters()) == resampled_params(net, groups, widths)


def test_pruning_keeps_as_many_channels_of_every_block() -> None:
    net = _perturbed(_Grouped())
    groups = [g for g in proven_groups(net).groups if g.name == "c1"]
    layers = fused_layers(net, groups)
    x = torch.rand(2, 3, 8, 8)  # (B, C, H, W)
    small = assemble(
        net, groups, select_channels(layers, groups, {"c1": torch.tensor([0, 2, 5, 7])})
    )  # one of each block of 2
    assert small.c2.groups == 4 and small.c2.in_channels == 4
    with torch.no_grad():
        assert small(x).shape == (2, 5)
    with pytest.raises(ValueError, match="as many channels of each"):
        select_channels(
            layers, groups, {"c1": torch.tensor([0, 1, 4, 6])}
        )  # two from the first block, none from the second


def test_a_concatenation_added_to_another_value_is_left_at_full_width() -> None:
    traced = trace_groups(_perturbed(_Concat(then_add=True)))
    assert {"a", "b"} <= set(traced.opaque) and "adds or multiplies a concatenation" in traced.opaque["a"]


def test_densenet_resamples_with_every_concatenation_and_counts_its_parameters() -> None:
    net = _perturbed(build_arch("torchvision:densenet121", {"num_classes": 10}))
    report = proven_groups(net)
    assert not report.opaque and sum(bool(g.sliced) for g in report.groups) > 50, report.opaque
    groups = channel_groups(net)
    widths = widths_for(net, groups, ResampleBudget(width=0.5))
    gen = torch.Generator().manual_seed(0)
    perms = {
        f"perm.{g.name}": torch.randperm(net.get_submodule(g.name).weight.shape[0], generator=gen).int() for g in groups
    }
    small = get_method("resample").materialize({"base": "b", "widths": widths}, perms, {"b": net})
    assert sum(p.numel() for p in small.parameters()) == resampled_params(net, groups, widths)
    assert sum(p.numel() for p in small.parameters()) < 0.6 * sum(p.numel() for p in net.parameters())
    with torch.no_grad():
        assert torch.isfinite(small(torch.rand(2, 3, 64, 64))).all()


@pytest.mark.parametrize("model", [lambda: _Grouped(width=16), _Concat], ids=["grouped", "concat"])
def test_partition_tuning_learns_cells_through_blocks_and_concatenations(model: Callable[[], nn.Module]) -> None:
    """A few steps of partition tuning (the resample job's, with a task): the loss falls from the
    uniform grid's, every block's cells still sum to its share."""
    from types import SimpleNamespace

    from zoo_store.core.cards import InputSpec
    from zoo_store.methods.resample.method import tune_partition

    net = _perturbed(model())
    groups = proven_groups(net).groups
    layers = fused_layers(net, groups)
    perms = {g.name: torch.arange(layers[g.name].weight.shape[0]) for g in groups}
    widths = {g.name: layers[g.name].weight.shape[0] // 2 for g in groups}
    cells = {k: uniform_cells(w) for k, w in widths.items()}
    small = assemble(net, groups, permute_and_resample(layers, groups, perms, cells))
    card = SimpleNamespace(input=InputSpec(channels=3, size=8, mean=(0.5,) * 3, std=(0.25,) * 3))
    ctx = SimpleNamespace(device="cpu", progress=lambda **_: None)
    images = torch.rand(16, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    _, first = tune_partition(net, small, groups, layers, perms, cells, images, card, 1, 0.0, 16, 0, ctx)
    tuned, last = tune_partition(net, small, groups, layers, perms, cells, images, card, 30, 0.1, 16, 0, ctx)
    assert last < first
    assert all(widths[g.name] // g.blocks > 1 for g in groups)  # each block has cells to move
    assert all(not torch.allclose(tuned[g.name], cells[g.name].double()) for g in groups)  # every group's cells moved
    for g in groups:
        torch.testing.assert_close(
            tuned[g.name].view(g.blocks, -1).sum(1), torch.full((g.blocks,), 2 / g.blocks, dtype=torch.float64)
        )
