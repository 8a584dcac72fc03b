"""Cloning, step by step (issue 3): the plan a spec resolves to, and the localization of filters."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import GRAY, tiny_card, tiny_weights
from zoo_store.archs import build_arch
from zoo_store.archs.base import resize_to
from zoo_store.archs.surgery import replace_module, shared_copy
from zoo_store.core.cards import Card
from zoo_store.core.errors import InvalidInput
from zoo_store.core.spec import CompositionSpec
from zoo_store.core.weights import digest_of
from zoo_store.methods.clone.config import plan_clone
from zoo_store.methods.clone.layers import ADAPTERS, KeptFilters, occlude, soft_masks
from zoo_store.methods.clone.localize import localize
from zoo_store.store.store import card_for
from zoo_store.training import freeze

LOW, HIGH, ALL = tuple("01234"), tuple("56789"), tuple("0123456789")


def _base(base_id: str, labels: tuple[str, ...], arch: str = "resnet_s", seed: int = 0) -> tuple[Card, torch.nn.Module]:
    net = build_arch(arch, {"num_classes": len(labels)})
    net.load_state_dict(tiny_weights(arch, len(labels), seed))
    freeze(net)
    return card_for(tiny_card(base_id, arch, labels), net, digest_of(net), 0), net


@pytest.fixture(scope="module")
def cards() -> dict[str, Card]:
    return {c.id: c for c in (_base("low", LOW)[0], _base("high", HIGH)[0], _base("all", ALL, "vgg_s")[0])}


def _spec(**kw) -> CompositionSpec:
    return CompositionSpec.model_validate({"method": "clone", "base": "low", "task": {"dataset": "mnist"}, **kw})


def test_plan_with_named_sources(cards) -> None:
    plan = plan_clone(_spec(sources=[{"model": "high", "labels": ["7", "9"]}]), cards)
    assert plan.target == "low" and plan.sources[0].model == "high" and plan.sources[0].labels == ("7", "9")
    assert plan.labels == (*LOW, "7", "9") and not plan.chosen


def test_plan_picks_sources_by_label_coverage(cards) -> None:
    plan = plan_clone(_spec(task={"dataset": "mnist", "labels": list(ALL)}), cards)
    # 'high' and 'all' both cover 5-9; the narrower one (fewer labels) is the better-localized source
    assert plan.chosen and [(s.model, s.labels) for s in plan.sources] == [("high", HIGH)]
    assert plan.labels == ALL


BAD = {
    "source lacks a label": ({"sources": [{"model": "high", "labels": ["5", "1"]}]}, "does not know labels ['1']"),
    "unknown source": ({"sources": [{"model": "nope", "labels": ["5"]}]}, "unknown source model 'nope'"),
    "source is the target": ({"sources": [{"model": "low", "labels": ["1"]}]}, "is the target itself"),
    "labels nobody knows": ({"task": {"dataset": "mnist", "labels": ["0", "x"]}}, "['x'] are known to no base"),
    "labels the sources lack": (
        {"sources": [{"model": "high", "labels": ["5"]}], "task": {"dataset": "mnist", "labels": ["0", "5", "y"]}},
        "['y'] are known to neither",
    ),
    "nothing to clone": ({"task": {"dataset": "mnist", "labels": ["0", "1"]}}, "already knows every requested label"),
    "no sources no labels": ({}, "nothing to clone"),
    "models given": ({"models": ["high"]}, "does not take 'models'"),
    "blocks given": ({"sources": [{"model": "high", "labels": ["5"]}], "blocks": 3}, "does not take 'blocks'"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_clone_specs(cards, case: str) -> None:
    fields, needle = BAD[case]
    with pytest.raises(InvalidInput, match=needle.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(")):
        plan_clone(_spec(**fields), cards)


def test_plan_refuses_a_source_with_another_input(cards) -> None:
    rgb = cards["high"].model_copy(update={"id": "rgb", "input": GRAY.model_copy(update={"channels": 3})})
    with pytest.raises(InvalidInput, match="takes input"):
        plan_clone(_spec(sources=[{"model": "rgb", "labels": ["5"]}]), {**cards, "rgb": rgb})


def test_occlusion_zeroes_square_patches() -> None:
    x = torch.ones(3, 1, 28, 28)
    y = occlude(x, torch.Generator().manual_seed(0), patches=1, fraction=0.25)
    assert y.shape == x.shape and torch.equal(x, torch.ones_like(x))  # input untouched
    assert all(int((img == 0).sum()) == 7 * 7 for img in y)
    assert torch.equal(y, occlude(x, torch.Generator().manual_seed(0), patches=1, fraction=0.25))


@pytest.mark.parametrize(("arch", "which"), [("resnet_s", 1), ("mobilenet_s", 2)])  # a plain and a depthwise conv
def test_hard_masks_skip_filters_exactly(arch: str, which: int) -> None:
    """A conv computing only its kept filters equals the conv gated by the 0/1 mask."""
    _, net = _base("high", HIGH, arch)
    path = net.prefix_convs("stage1")[which]
    keep = torch.arange(net.get_submodule(path).out_channels) % 3 == 0
    x = torch.rand(2, 1, 28, 28)
    gated = shared_copy(net)
    with torch.no_grad(), soft_masks(gated, {path: keep.float()}):
        want = gated(x)
    hard = shared_copy(net)
    replace_module(hard, path, KeptFilters(net.get_submodule(path), keep))
    with torch.no_grad():
        assert torch.allclose(hard(x), want, atol=1e-6)
    assert not net.get_submodule(path)._forward_hooks  # the gate never touched the resident conv


def _images(n: int = 64) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return (torch.rand(n, 1, 28, 28, generator=g) > 0.7).float()  # sparse strokes, MNIST-like range


def test_localize_without_sparsity_keeps_the_source() -> None:
    _, src = _base("high", HIGH)
    before = digest_of(src)
    loc = localize(src, "stage2", [0, 2, 4], _images(32), GRAY, steps=5, sparsity=0.0, batch_size=16)
    assert set(loc.masks) == set(src.prefix_convs("stage2"))
    assert all(m.shape == (src.get_submodule(p).out_channels,) and m.dtype == torch.bool for p, m in loc.masks.items())
    assert loc.kept_fraction == 1.0 and loc.fidelity == 1.0
    assert digest_of(src) == before
    assert not any(m._forward_hooks for m in src.modules())


def test_sparsity_drops_filters_and_reports_fidelity() -> None:
    _, src = _base("high", HIGH)
    loose = localize(src, "stage1", [0, 2, 4], _images(32), GRAY, steps=25, sparsity=0.0, batch_size=16, lr=0.3)
    tight = localize(src, "stage1", [0, 2, 4], _images(32), GRAY, steps=25, sparsity=5.0, batch_size=16, lr=0.3)
    assert tight.kept_fraction < 0.8 * loose.kept_fraction
    assert 0.0 <= tight.fidelity <= 1.0 and all(m.any() for m in tight.masks.values())


def test_pack_masks_round_trip() -> None:
    import numpy as np

    from zoo_store.methods.clone.layers import pack_mask, unpack_mask

    keep = torch.rand(37, generator=torch.Generator().manual_seed(0)) > 0.5
    packed = pack_mask(keep)
    assert packed.dtype == torch.uint8 and packed.shape == (5,)
    assert np.array_equal(packed.numpy(), np.packbits(keep.numpy()))
    assert torch.equal(unpack_mask(packed, 37), keep)


@pytest.mark.parametrize("kind", ADAPTERS)
def test_a_fresh_connection_changes_nothing(kind: str) -> None:
    """Fresh adapters of every kind: the composed network's logits on the target's labels are the
    target's own, in training mode (batch statistics) and in eval mode."""
    from zoo_store.methods.clone.insert import Part, fresh_cloned

    t_card, target = _base("low", LOW)
    _, src = _base("high", HIGH, seed=1)
    model = fresh_cloned(target, t_card, [Part(src, "stage2")], ["stage1"], [*LOW, "5"], seed=0, adapter=kind)
    x = torch.rand(3, 1, 28, 28)
    with torch.no_grad():
        for mode in (True, False):
            model.adapters.train(mode)
            assert torch.allclose(model(x)[:, :5], target(x), atol=1e-6)


@pytest.mark.parametrize("kind", ADAPTERS)
def test_an_adapter_is_served_as_the_conv_it_folds_to(kind: str) -> None:
    """After training steps (BatchNorm statistics moved), the stored conv computes what the adapter
    computes in eval mode; 3x3 keeps the resolution."""
    from zoo_store.methods.clone.layers import Adapter

    torch.manual_seed(0)
    a = Adapter(6, 4, kind)
    opt = torch.optim.SGD(a.parameters(), lr=0.1)
    for _ in range(3):
        loss = a(torch.rand(8, 6, 5, 5), (7, 7)).square().mean() - a(torch.rand(8, 6, 5, 5), (7, 7)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    a.eval()
    f = torch.rand(2, 6, 5, 5)
    with torch.no_grad():
        out = a(f, (7, 7))
        assert out.shape == (2, 4, 7, 7) and out.abs().max() > 0
        assert torch.allclose(a.folded()(resize_to(f, (7, 7))), out, atol=1e-5)
    assert a.folded().kernel_size == ((3, 3) if kind == "3x3" else (1, 1))


@pytest.mark.parametrize("kind", ADAPTERS)
def test_clone_builds_and_materializes_end_to_end(kind: str) -> None:
    """The whole build on tiny bases (not yet behind the registry), for each adapter kind: every
    (source depth, insertion tap) pair scored on validation, the path's tensors are what the method
    expects, survive a bundle, and materialize to the network that was trained."""
    from zoo_store.core.bundle import check_expected, decode_bundle, encode_bundle, make_manifest
    from zoo_store.datasets.tasks import TaskData
    from zoo_store.methods.base import BuildContext
    from zoo_store.methods.clone.method import Clone

    t_card, target = _base("low", LOW)
    s_card, src = _base("high", HIGH, seed=1)
    digests = (digest_of(target), digest_of(src))
    g = torch.Generator().manual_seed(0)
    x, y = _images(40), torch.arange(40) % 7
    labels = [*LOW, "5", "6"]
    spec = CompositionSpec.model_validate(
        {
            "method": "clone",
            "base": "low",
            "sources": [{"model": "high", "labels": ["5", "6"]}],
            "task": {"dataset": "t"},
            "train": {"epochs": 1, "batch_size": 16, "steps": 20},
        }
    )
    ctx = BuildContext(
        bases={"low": (t_card, target), "high": (s_card, src)},
        load_task=lambda t, c: TaskData(x, y, x[:10], y[:10], labels, x[10:20], y[10:20]),
    )
    method = Clone()
    method.adapter = kind
    art = method.build(spec, ctx)
    assert art.labels == labels and [b.id for b in art.bases] == ["low", "high"]
    taps = ["stem", "stage1", "stage2", "stage3"]
    scores = art.metrics["source0_join_val_accuracy"]
    assert set(scores) == {f"{d}->{r}" for d in taps for r in taps}
    (link,) = art.config["sources"]
    assert scores[f"{link['depth']}->{link['insert']}"] == max(scores.values())
    assert link["kernel"] == (3 if kind == "3x3" else 1) and art.metrics["adapter"] == kind
    manifest = make_manifest(art)
    nets = {"low": target, "high": src}
    check_expected(manifest, Clone().expected_tensors(art.config, nets))
    bundle = decode_bundle(encode_bundle(manifest, art.tensors, art.metrics))
    module = Clone().materialize(manifest.config, bundle.tensors, nets)
    probe = torch.rand(4, 1, 28, 28, generator=g)
    with torch.no_grad():
        assert module(probe).shape == (4, len(labels))
        assert torch.equal(module(probe), Clone().materialize(manifest.config, bundle.tensors, nets)(probe))
        served = (module(x[:10]).argmax(1) == y[:10]).float().mean().item()
        if kind != "3x3":  # a path stored before adapters had kinds (no "kernel") serves as a 1x1 one
            old = {
                **manifest.config,
                "sources": [{k: v for k, v in s.items() if k != "kernel"} for s in manifest.config["sources"]],
            }
            assert torch.equal(Clone().materialize(old, bundle.tensors, nets)(probe), module(probe))
    assert served == pytest.approx(art.metrics["accuracy"])  # the served network is the one measured
    assert (digest_of(target), digest_of(src)) == digests


def test_a_task_without_validation_images_is_refused() -> None:
    """The join is chosen on validation images: none is a 4xx naming why, before any training."""
    from zoo_store.datasets.tasks import TaskData
    from zoo_store.methods.base import BuildContext
    from zoo_store.methods.clone.method import Clone

    t_card, target = _base("low", LOW)
    s_card, src = _base("high", HIGH, seed=1)
    x, y = _images(8), torch.arange(8) % 6
    spec = CompositionSpec.model_validate(
        {"method": "clone", "base": "low", "sources": [{"model": "high", "labels": ["5"]}], "task": {"dataset": "tiny"}}
    )
    empty = TaskData(x, y, x[:2], y[:2], [*LOW, "5"], x[:0], y[:0])
    ctx = BuildContext(bases={"low": (t_card, target), "high": (s_card, src)}, load_task=lambda t, c: empty)
    with pytest.raises(InvalidInput, match="no validation images"):
        Clone().build(spec, ctx)


def test_clone_through_the_api(app_client) -> None:
    """Compose, predict, bundle export -> delete -> import: same id, same predictions; bases untouched."""
    from tests.helpers import bundle_roundtrip, compose, tensor_inputs

    svc = app_client.app.state.services
    digests = svc.zoo.digests()
    spec = {
        "method": "clone",
        "base": "res",
        "sources": [{"model": "vgg", "labels": ["1", "2"]}],
        "task": {"dataset": "digits", "labels": ["0", "1", "2"], "samples_per_label": 8},
        "train": {"epochs": 1, "steps": 10, "batch_size": 8},
    }
    job = compose(app_client, spec)
    assert job["state"] == "succeeded", job
    assert {"accuracy", "source0_kept_fraction", "source0_fidelity", "source0_join_val_accuracy"} <= set(job["metrics"])
    pid = job["path_id"]
    path = app_client.get(f"/v1/paths/{pid}").json()
    assert [b["id"] for b in path["bases"]] == ["res", "vgg"] and path["labels"] == ["0", "1", "2"]
    assert path["bytes"] < 0.05 * path["dense_bytes"]
    body = {"inputs": tensor_inputs(2), "top_k": 2}
    bundle_roundtrip(app_client, pid, body)
    assert svc.zoo.digests() == digests
    bad = {**spec, "sources": [{"model": "vgg", "labels": ["1", "x"]}]}
    r = app_client.post("/v1/compositions", json=bad)
    assert r.status_code == 422 and "does not know labels ['x']" in r.json()["detail"]
