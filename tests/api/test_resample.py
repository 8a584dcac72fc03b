"""Width resampling, step by step: channel groups, conversion (exact), interpolation, ordering."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from tests.conftest import tiny_weights
from zoo_store.archs import build_arch
from zoo_store.archs.groups import channel_groups
from zoo_store.methods.resample.layers import (
    assemble,
    cell_centres,
    channel_features,
    fused_layers,
    group_size,
    permute_and_resample,
    recalibrate,
    resample_axis,
    select_channels,
    tour_length,
    two_opt_order,
    uniform_cells,
)

ARCHS = [
    ("resnet_s", 1, 28),
    ("vgg_s", 1, 28),
    ("mobilenet_s", 1, 28),
    ("tv_resnet18", 3, 32),
    ("tv_resnet50", 3, 32),
    ("tv_mobilenet_v3_small", 3, 32),
]


def _net(arch: str):
    net = build_arch(arch, {"num_classes": 10})
    net.load_state_dict(tiny_weights(arch, 10))
    return net.eval()


@pytest.mark.parametrize(("arch", "channels", "size"), ARCHS)
def test_permuted_network_computes_the_same(arch: str, channels: int, size: int) -> None:
    """BatchNorm folded and every group's channels shuffled: the same function, within 1e-5 of the
    largest output."""
    net = _net(arch)
    groups = channel_groups(net)
    assert groups, f"{arch} declares no channel groups"
    layers = fused_layers(net, groups)
    gen = torch.Generator().manual_seed(0)
    perms = {g.name: torch.randperm(group_size(layers, g), generator=gen).int() for g in groups}
    cells = {g.name: uniform_cells(group_size(layers, g)) for g in groups}
    permuted = assemble(net, groups, permute_and_resample(layers, groups, perms, cells))
    x = torch.rand(2, channels, size, size, generator=gen)
    with torch.no_grad():
        y, y2 = net(x), permuted(x)
    err = ((y2 - y).abs().max() / y.abs().max()).item()  # float32 sums in another order: relative to the scale
    assert err < 1e-5, err
    # every group was really touched: its producers are rebuilt layers, its BatchNorms gone
    for g in groups:
        assert permuted.get_submodule(g.producers[0][0]) is not net.get_submodule(g.producers[0][0])


def test_a_dropped_coupled_tensor_breaks_equivalence() -> None:
    """The check above can fail: forget one consumer of a group and the outputs change."""
    net = _net("mobilenet_s")
    groups = channel_groups(net)
    g0 = groups[0]
    broken = [type(g0)(g0.name, g0.producers, (), g0.depthwise), *groups[1:]]
    layers = fused_layers(net, broken)
    perms = {
        g.name: torch.randperm(group_size(layers, g), generator=torch.Generator().manual_seed(1)).int() for g in broken
    }
    cells = {g.name: uniform_cells(group_size(layers, g)) for g in broken}
    wrong = assemble(net, broken, permute_and_resample(layers, broken, perms, cells))
    x = torch.rand(2, 1, 28, 28)
    with torch.no_grad():
        assert not torch.allclose(wrong(x), net(x), atol=1e-4)


def _recalibrated_by_hand(net, x: torch.Tensor):
    """The textbook recalibration: a copy of ``net`` whose every BatchNorm re-estimates its statistics
    in one train-mode pass over ``x`` (momentum None), then eval mode."""
    ref = copy.deepcopy(net)
    for m in ref.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None
            m.reset_running_stats()
            m.train()
    with torch.no_grad():
        ref(x)
    return ref.eval()


@pytest.mark.parametrize("arch", ["resnet_s", "vgg_s", "mobilenet_s"])
def test_pruning_baselines_rescale_and_recalibrate(arch: str) -> None:
    """Pruning with the n/n' rescale scales each reader by n/k. Recalibration of the folded network
    (kept at full width, so a reference exists) computes what re-estimating every BatchNorm of the
    base in train mode computes, folded and unfolded BatchNorms alike, and leaves the base as it was;
    on a pruned network every BatchNorm module left holds the mean of its input on the images."""
    net = _net(arch)
    groups = channel_groups(net)
    layers = fused_layers(net, groups)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 1, 28, 28, generator=gen)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    every = {g.name: torch.arange(group_size(layers, g)) for g in groups}
    same = assemble(net, groups, select_channels(layers, groups, every))
    recalibrate(same, net, groups, every, x)
    probe = torch.randn(8, 1, 28, 28, generator=gen)
    with torch.no_grad():
        want = _recalibrated_by_hand(net, x)(probe)
        assert torch.allclose(same(probe), want, rtol=1e-4, atol=1e-4), (same(probe) - want).abs().max()
        assert not torch.allclose(net(probe), want, atol=1e-4)  # recalibration changed something to check
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())  # the resident base untouched
    half = {
        g.name: torch.sort(
            torch.randperm(group_size(layers, g), generator=gen)[: max(1, group_size(layers, g) // 2)]
        ).values
        for g in groups
    }
    plain, scaled = (select_channels(layers, groups, half, rescale=r) for r in (False, True))
    g = groups[0]
    ratio = group_size(layers, g) / len(half[g.name])
    assert torch.allclose(scaled[g.consumers[0]].weight, plain[g.consumers[0]].weight * ratio)
    pruned = assemble(net, groups, scaled)
    recalibrate(pruned, net, groups, half, x)
    seen: dict[str, torch.Tensor] = {}
    bns = {n: m for n, m in pruned.named_modules() if isinstance(m, torch.nn.BatchNorm2d)}
    hooks = [m.register_forward_pre_hook(lambda m, i, n=n: seen.__setitem__(n, i[0].clone())) for n, m in bns.items()]
    with torch.no_grad():
        pruned(x)
    for h in hooks:
        h.remove()
    moved = 0.0
    for n, m in bns.items():
        # (within what the pass's batch variance upstream differs from the served running variance)
        assert torch.allclose(m.running_mean, seen[n].mean((0, 2, 3)), atol=5e-3), n
        moved = max(moved, (m.running_mean - net.get_submodule(n).running_mean).abs().max().item())
    assert not bns or moved > 5e-2  # the base's statistics would not have done
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())


def test_cubic_resampling_is_exact_on_the_grid_and_smooth_between() -> None:
    n = 16
    centres = cell_centres(uniform_cells(n))
    t = torch.stack([torch.sin(3 * centres), centres**2], 1)  # (n, 2) samples along axis 0
    assert torch.allclose(resample_axis(t, 0, centres), t)
    fine = cell_centres(uniform_cells(40))
    inner = fine.abs() < 0.8  # away from the replicated edges
    got = resample_axis(t, 0, fine)
    assert torch.allclose(got[inner, 1], fine[inner] ** 2, atol=1e-3)  # Keys' kernel reproduces quadratics
    assert torch.allclose(got[inner, 0], torch.sin(3 * fine[inner]), atol=2e-2)
    positions = torch.tensor([-0.5, 0.25], dtype=torch.float64, requires_grad=True)
    resample_axis(t, 0, positions).sum().backward()  # differentiable in the sample positions
    assert positions.grad is not None and positions.grad.abs().sum() > 0


def test_two_opt_orders_alike_channels_next_to_each_other() -> None:
    rng = np.random.default_rng(0)
    smooth = np.cumsum(rng.normal(size=(64, 8)), 0)  # a random walk: neighbours are alike
    shuffled = rng.permutation(64)
    x = torch.as_tensor(smooth[shuffled])
    order = two_opt_order(x)
    assert sorted(order.tolist()) == list(range(64))
    dist = torch.cdist(x, x, p=1).numpy()
    assert tour_length(dist, order) < 0.5 * tour_length(dist, np.arange(64))
    assert tour_length(dist, order) <= 1.05 * tour_length(
        torch.cdist(torch.as_tensor(smooth), torch.as_tensor(smooth), p=1).numpy(), np.arange(64)
    )


def test_ordering_makes_resampling_gentler() -> None:
    """At 70% width, the tour-ordered network stays closer to the base than a random order."""
    net = _net("resnet_s")
    groups = channel_groups(net)
    layers = fused_layers(net, groups)
    cells = {g.name: uniform_cells(round(0.7 * group_size(layers, g))) for g in groups}
    tour = {g.name: torch.as_tensor(two_opt_order(channel_features(layers, g))).int() for g in groups}
    gen = torch.Generator().manual_seed(0)
    shuffled = {g.name: torch.randperm(group_size(layers, g), generator=gen).int() for g in groups}
    x = torch.rand(8, 1, 28, 28, generator=gen)
    with torch.no_grad():
        y = net(x)
        err = {
            k: (assemble(net, groups, permute_and_resample(layers, groups, p, cells))(x) - y).abs().mean().item()
            for k, p in (("tour", tour), ("shuffled", shuffled))
        }
    assert err["tour"] < err["shuffled"], err


# -- the method through the API ----------------------------------------------------------------
def _spec(**budget) -> dict:
    return {
        "method": "resample",
        "base": "res",
        "budget": budget or {"width": 0.5},
        "task": {"dataset": "digits", "labels": ["0", "1", "2"], "samples_per_label": 8},
        "train": {"steps": 3, "batch_size": 8},
    }


BAD_BUDGETS = {
    "no budget": ({}, "exactly one"),
    "zero width": ({"width": 0}, "budget.width"),
    "width above 1": ({"width": 1.5}, "budget.width"),
    "both": ({"width": 0.5, "max_params": 10**6}, "exactly one"),
    "below the smallest": ({"max_params": 1000}, "smallest resample"),
    "unknown key": ({"depth": 2}, "depth"),
}


@pytest.mark.parametrize("case", BAD_BUDGETS)
def test_bad_resample_specs_are_422(app_client, case: str) -> None:
    budget, needle = BAD_BUDGETS[case]
    spec = {**_spec(), "budget": budget}
    jobs = len(app_client.get("/v1/jobs").json()["items"])
    r = app_client.post("/v1/compositions", json=spec)
    assert r.status_code == 422 and needle in r.json()["detail"], r.text
    assert len(app_client.get("/v1/jobs").json()["items"]) == jobs


def test_an_architecture_without_groups_is_refused() -> None:
    from zoo_store.core.errors import InvalidInput
    from zoo_store.methods.resample.config import ResampleBudget
    from zoo_store.methods.resample.method import widths_for

    with pytest.raises(InvalidInput, match="no channel group that traces"):
        widths_for(_net("resnet_s"), [], ResampleBudget(width=0.5))


def test_resample_end_to_end(app_client) -> None:
    from tests.helpers import compose, tensor_inputs

    svc = app_client.app.state.services
    digests = svc.zoo.digests()
    job = compose(app_client, _spec(max_params=400_000))
    assert job["state"] == "succeeded", job
    m = job["metrics"]
    assert m["params"] <= 400_000 < m["base_params"] and 0 < m["params_removed"] < 1
    assert {"base_accuracy", "uniform_accuracy", "accuracy", "tour_length_ratio"} <= set(m)
    pid = job["path_id"]
    path = app_client.get(f"/v1/paths/{pid}").json()
    assert path["labels"] == list("0123456789") and path["bytes"] < 0.01 * path["dense_bytes"]
    body = {"inputs": tensor_inputs(3), "top_k": 3}
    before = app_client.post(f"/v1/paths/{pid}/predict", json=body).json()
    bundle = app_client.get(f"/v1/paths/{pid}/bundle").content
    assert app_client.delete(f"/v1/paths/{pid}").status_code == 204
    r = app_client.post("/v1/paths/import", content=bundle)
    assert r.status_code == 201 and r.json()["id"] == pid
    assert app_client.post(f"/v1/paths/{pid}/predict", json=body).json() == before
    assert svc.zoo.digests() == digests


def _tampered(bundle: bytes, name: str, value: torch.Tensor) -> bytes:
    from zoo_store.core.bundle import PathArtifact, decode_bundle, encode_bundle, make_manifest

    b = decode_bundle(bundle)
    m, tensors = b.manifest, {**b.tensors, name: value}
    art = PathArtifact(m.method, list(m.bases), list(m.labels), m.input, m.config, tensors)
    return encode_bundle(make_manifest(art), tensors, b.metrics)


def test_bad_resample_bundles_are_422(app_client) -> None:
    from tests.helpers import compose

    pid = compose(app_client, _spec(width=0.5))["path_id"]
    bundle = app_client.get(f"/v1/paths/{pid}/bundle").content
    app_client.delete(f"/v1/paths/{pid}")
    perm_name = next(k for k in decode(bundle).tensors if k.startswith("perm."))
    grid_name = next(k for k in decode(bundle).tensors if k.startswith("grid."))
    n = len(decode(bundle).tensors[perm_name])
    cases = {
        "not a permutation": (_tampered(bundle, perm_name, torch.zeros(n, dtype=torch.int32)), "not a permutation"),
        "cells not summing to 2": (_tampered(bundle, grid_name, decode(bundle).tensors[grid_name] * 3), "summing to 2"),
    }
    for case, (data, needle) in cases.items():
        r = app_client.post("/v1/paths/import", content=data)
        assert r.status_code == 422 and needle in r.json()["detail"], (case, r.text)
    assert app_client.get("/v1/paths").json()["items"] == []
    assert app_client.post("/v1/paths/import", content=bundle).status_code == 201


def decode(bundle: bytes):
    from zoo_store.core.bundle import decode_bundle

    return decode_bundle(bundle)


def test_standalone_network_export(app_client) -> None:
    """A resample path downloads as a plain network that rebuilds without the service, same outputs."""
    from tests.helpers import compose, reprogram_spec, tensor_inputs
    from zoo_store.archs.standalone import load_network
    from zoo_store.training import normalize

    pid = compose(app_client, _spec(width=0.6))["path_id"]
    data = app_client.get(f"/v1/paths/{pid}/network")
    assert data.status_code == 200
    net, card = load_network(data.content)
    svc = app_client.app.state.services
    base_card, base = svc.zoo.bases["res"]
    x = normalize(torch.rand(4, 1, 28, 28), base_card.input)
    with torch.no_grad():
        assert torch.equal(net(x), svc.cache.get(pid).module(x))
    assert card["labels"] == list("0123456789") and card["from_path"] == pid
    assert sum(p.numel() for p in net.parameters()) < sum(p.numel() for p in base.parameters())
    probs = app_client.post(f"/v1/paths/{pid}/predict", json={"inputs": tensor_inputs(1)}).json()
    assert probs["predictions"][0]["label"] in card["labels"]
    other = compose(app_client, reprogram_spec())["path_id"]
    r = app_client.get(f"/v1/paths/{other}/network")
    assert r.status_code == 409 and "only resample paths" in r.json()["detail"]
