"""Cloning, step by step (issues 3 and 28): the plan a spec resolves to, the localization of filters, the
join, the article's topology, the alternation, and paths of the first topology still serving."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import GRAY, tiny_card, tiny_weights
from zoo_store.archs import build_arch
from zoo_store.archs.surgery import replace_module, shared_copy
from zoo_store.core.cards import Card
from zoo_store.core.errors import InvalidInput
from zoo_store.core.spec import CompositionSpec
from zoo_store.core.weights import digest_of
from zoo_store.methods.clone.config import plan_clone
from zoo_store.methods.clone.layers import KeptFilters, occlude, soft_masks
from zoo_store.methods.clone.localize import localize
from zoo_store.store.store import card_for
from zoo_store.training import accuracy, freeze

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
    convs = src.suffix_convs("stage1")
    loc = localize(src, convs, [0, 2, 4], _images(32), GRAY, steps=5, sparsity=0.0, batch_size=16)
    assert set(loc.masks) == set(convs) and convs and not set(convs) & set(src.prefix_convs("stage1"))
    assert all(m.shape == (src.get_submodule(p).out_channels,) and m.dtype == torch.bool for p, m in loc.masks.items())
    assert loc.kept_fraction == 1.0 and loc.fidelity == 1.0
    assert digest_of(src) == before
    assert not any(m._forward_hooks for m in src.modules())


def test_sparsity_drops_filters_and_reports_fidelity() -> None:
    _, src = _base("high", HIGH)
    convs = src.suffix_convs("stem")
    loose = localize(src, convs, [0, 2, 4], _images(32), GRAY, steps=25, sparsity=0.0, batch_size=16, lr=0.3)
    tight = localize(src, convs, [0, 2, 4], _images(32), GRAY, steps=25, sparsity=5.0, batch_size=16, lr=0.3)
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


def test_random_masks_keep_as_many_filters_per_conv() -> None:
    from zoo_store.methods.clone.localize import random_like

    masks = {"a": torch.tensor([True, False, False, True, True]), "b": torch.tensor([False, True])}
    drawn = random_like(masks, seed=3)
    assert {p: int(m.sum()) for p, m in drawn.items()} == {"a": 3, "b": 1}
    assert all(torch.equal(drawn[p], random_like(masks, seed=3)[p]) for p in masks)


def test_joins_pair_taps_of_the_same_size_deepest_first() -> None:
    from zoo_store.methods.clone.insert import candidates

    _, target = _base("low", LOW)
    _, src = _base("all", ALL, "vgg_s")
    joins = candidates(target, src, GRAY)
    t_shapes, s_shapes = target.tap_shapes(1, 28), src.tap_shapes(1, 28)
    assert joins and all(t_shapes[j.insert][1:] == s_shapes[j.cut][1:] == j.size for j in joins)
    order = [(target.spatial_taps().index(j.insert), src.spatial_taps().index(j.cut)) for j in joins]
    assert order == sorted(order, reverse=True)  # the deepest target tap first, then the deepest cut
    every = {(r, c) for r in target.spatial_taps() for c in src.spatial_taps() if t_shapes[r][1:] == s_shapes[c][1:]}
    assert {(j.insert, j.cut) for j in joins} == every


def test_the_ridge_adapter_reproduces_the_source_features_it_can() -> None:
    """Joined to itself at the same tap, A is the identity map the ridge finds (up to the ridge)."""
    from zoo_store.methods.clone.insert import Join, ridge_adapter

    _, net = _base("high", HIGH)
    size = net.tap_shapes(1, 28)["stage1"][1:]
    a = ridge_adapter(net, net, Join("stage1", "stage1", size), _images(64), GRAY)
    eye = torch.eye(a.out_channels).view(a.out_channels, a.in_channels, 1, 1)
    assert torch.allclose(a.weight, eye, atol=5e-2) and a.bias.abs().max() < 5e-2


def _grafted(sources: list[tuple[str, str]], brings: tuple[str, ...] = ("5", "6")):
    """A fresh clone of 'low' with a source 'high' per (R, cut), cloning ``brings`` (5 and 6)."""
    from zoo_store.datasets.tasks import TaskData
    from zoo_store.methods.clone.insert import Join, Part, fresh

    t_card, target = _base("low", LOW)
    s_card, src = _base("high", HIGH, seed=1)
    shapes = src.tap_shapes(1, 28)
    parts = [Part(src, s_card, brings, Join(r, c, shapes[c][1:])) for r, c in sources]
    x, y = _images(40), torch.arange(40) % 7
    data = TaskData(x, y, x[:10], y[:10], [*LOW, "5", "6"], x[10:20], y[10:20])
    return fresh(target, t_card, parts, data, seed=0), target, src, parts, data, t_card


@pytest.mark.parametrize("brings", [("5", "6"), ("4", "5", "6")])  # a source may bring a label the target knows
def test_a_fresh_clone_gives_the_target_logits_on_its_labels(brings: tuple[str, ...]) -> None:
    """F_c starts from the heads, each label's row from the first head that knows it: the target's
    logits on its labels are its own, exactly."""
    model, target, *_ = _grafted([("stage1", "stage1")], brings)
    x = torch.rand(3, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(model(x)[:, :5], target(x))


def test_a_source_joined_to_itself_is_itself() -> None:
    """Target and source the same network, joined at the same tap: the ridge A is close to the
    identity, so the source's block of the features is close to the network's own feature vector."""
    from zoo_store.datasets.tasks import TaskData
    from zoo_store.methods.clone.insert import Join, Part, fresh

    card, net = _base("high", HIGH)
    x = _images(64)
    size = net.tap_shapes(1, 28)["stage1"][1:]
    part = Part(net, card.model_copy(update={"id": "twin"}), ("5",), Join("stage1", "stage1", size))
    model = fresh(
        net,
        card,
        [part],
        TaskData(x, x[:, 0, 0, 0].long() * 0, x, x[:, 0, 0, 0].long() * 0, list(HIGH), x, x[:, 0, 0, 0].long() * 0),
        seed=0,
    )
    with torch.no_grad():
        xn = (x[:8] - GRAY.mean[0]) / GRAY.std[0]
        own, twin = model.features(xn).split(net.feature_dim, 1)
        assert torch.equal(own, net.embed(xn)) and torch.allclose(twin, own, atol=0.05 * own.abs().max().item())


def test_the_target_prefix_runs_once_per_batch() -> None:
    """Two sources joined at two taps: every stage of the target runs once per forward."""
    model, target, *_ = _grafted([("stage2", "stage2"), ("stage1", "stage1")])
    calls: dict[int, int] = {}
    stages = target.stage_modules(None, target.taps[-1].name)  # every module a stage of the target runs
    handles = [
        m.register_forward_hook(lambda _m, _i, _o, n=n: calls.__setitem__(n, calls.get(n, 0) + 1))
        for n, m in enumerate(stages)
    ]
    try:
        with torch.no_grad():
            model(torch.rand(5, 1, 28, 28))
    finally:
        for h in handles:
            h.remove()
    assert len(stages) >= 4 and calls == dict.fromkeys(range(len(stages)), 1)


def test_the_alternation_keeps_its_best_round(monkeypatch: pytest.MonkeyPatch) -> None:
    """Validation falls in round 2: round 1's masks, adapter and head come back, and the rest of the
    epochs train them (the dropped round's epoch not counted)."""
    from zoo_store.methods.clone import insert

    model, _, src, parts, data, t_card = _grafted([("stage1", "stage1")])
    scores, seen, kept = iter([0.5, 0.4]), [], {}
    real_train = insert.train

    def train(m, d, c, *, epochs, **kw):  # the rounds' epochs train; the last training is only counted
        seen.append(epochs)
        if epochs == 1:
            real_train(m, d, c, epochs=epochs, **kw)

    def val(m, d, c):
        if not kept:
            kept.update(state=insert._trained_state(m), masks=dict(parts[0].masks))
        return next(scores)

    monkeypatch.setattr(insert, "train", train)
    monkeypatch.setattr(insert, "val_accuracy", val)
    history = insert.learn_together(
        model, [src], parts, data, t_card, epochs=4, rounds=3, steps=30, lr=0.05, batch_size=16, seed=0
    )
    assert history == [0.5, 0.4] and seen == [1, 1, 3]
    after = insert._trained_state(model)
    assert all(torch.equal(after[k], v) for k, v in kept["state"].items())
    assert all(torch.equal(parts[0].masks[p], m) for p, m in kept["masks"].items())
    assert parts[0].fidelity is not None


LOCALIZATIONS = ("joint", "once", "none", "random")


@pytest.mark.parametrize("localization", LOCALIZATIONS)
def test_clone_builds_and_materializes_end_to_end(localization: str) -> None:
    """The whole build on tiny bases, for the article's localization and each ablation: every join
    scored on validation, the path's tensors are what the method expects, survive a bundle, and
    materialize to the network that was trained; the bases are untouched."""
    from zoo_store.core.bundle import check_expected, decode_bundle, encode_bundle, make_manifest
    from zoo_store.datasets.tasks import TaskData
    from zoo_store.methods.base import BuildContext
    from zoo_store.methods.clone.insert import candidates
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
            "train": {"epochs": 3, "batch_size": 16, "steps": 20},
        }
    )
    ctx = BuildContext(
        bases={"low": (t_card, target), "high": (s_card, src)},
        load_task=lambda t, c: TaskData(x, y, x[:10], y[:10], labels, x[10:20], y[10:20]),
    )
    method = Clone()
    method.localization = localization
    art = method.build(spec, ctx)
    assert art.labels == labels and [b.id for b in art.bases] == ["low", "high"]
    scores = art.metrics["source0_join_val_accuracy"]
    assert list(scores) == [f"{j.insert}->{j.cut}" for j in candidates(target, src, GRAY)]
    (link,) = art.config["sources"]
    deepest_good = next(k for k, v in scores.items() if v >= max(scores.values()) - 0.005)
    assert f"{link['insert']}->{link['depth']}" == deepest_good  # the deepest join within half a point
    assert art.config["topology"] == "target-prefix" and art.metrics["localization"] == localization
    assert (len(art.metrics["rounds_val_accuracy"]) > 0) == (localization == "joint")
    kept = art.metrics["source0_kept_fraction"]
    assert kept == 1.0 if localization == "none" else 0.0 < kept <= 1.0
    manifest = make_manifest(art)
    nets = {"low": target, "high": src}
    check_expected(manifest, Clone().expected_tensors(art.config, nets))
    bundle = decode_bundle(encode_bundle(manifest, art.tensors, art.metrics))
    module = Clone().materialize(manifest.config, bundle.tensors, nets)
    probe = torch.rand(4, 1, 28, 28, generator=g)
    with torch.no_grad():
        assert module(probe).shape == (4, len(labels))
        assert torch.equal(module(probe), Clone().materialize(manifest.config, bundle.tensors, nets)(probe))
    served = accuracy(module, x[:10], y[:10], GRAY)  # the test split, normalized as predict does
    assert served == pytest.approx(art.metrics["accuracy"])  # the served network is the one measured
    assert 0.0 <= art.metrics["agreement_target_labels"] <= 1.0
    unsized = {**manifest.config, "sources": [{**link, "size": None}]}
    with pytest.raises(InvalidInput, match="feature size at the cut"):
        Clone().materialize(unsized, bundle.tensors, nets)
    assert (digest_of(target), digest_of(src)) == digests


def test_two_sources_clone_and_serve() -> None:
    """P = 2 (a ResNet and a VGG source): each gets its join, masks and adapter; the head reads the
    three feature vectors; the path materializes, through a bundle, to the network measured."""
    from zoo_store.core.bundle import check_expected, decode_bundle, encode_bundle, make_manifest
    from zoo_store.datasets.tasks import TaskData
    from zoo_store.methods.base import BuildContext
    from zoo_store.methods.clone.method import Clone

    t_card, target = _base("low", LOW)
    s_card, src = _base("high", HIGH, seed=1)
    v_card, vgg = _base("all", ALL, "vgg_s", seed=2)
    x, y = _images(48), torch.arange(48) % 8
    labels = [*LOW, "5", "6", "7"]
    spec = CompositionSpec.model_validate(
        {
            "method": "clone",
            "base": "low",
            "sources": [{"model": "high", "labels": ["5", "6"]}, {"model": "all", "labels": ["7"]}],
            "task": {"dataset": "t"},
            "train": {"epochs": 2, "batch_size": 16, "steps": 10},
        }
    )
    ctx = BuildContext(
        bases={"low": (t_card, target), "high": (s_card, src), "all": (v_card, vgg)},
        load_task=lambda t, c: TaskData(x, y, x[:16], y[:16], labels, x[16:32], y[16:32]),
    )
    art = Clone().build(spec, ctx)
    assert [s["model"] for s in art.config["sources"]] == ["high", "all"]
    assert {"source0_join_val_accuracy", "source1_join_val_accuracy", "source1_fidelity"} <= set(art.metrics)
    assert art.tensors["head.weight"].shape == (8, target.feature_dim + src.feature_dim + vgg.feature_dim)
    assert any(k.startswith("mask.1.") for k in art.tensors) == bool(
        vgg.suffix_convs(art.config["sources"][1]["depth"])
    )
    manifest, nets = make_manifest(art), {"low": target, "high": src, "all": vgg}
    check_expected(manifest, Clone().expected_tensors(art.config, nets))
    bundle = decode_bundle(encode_bundle(manifest, art.tensors, art.metrics))
    module = Clone().materialize(manifest.config, bundle.tensors, nets)
    assert accuracy(module, x[:16], y[:16], GRAY) == pytest.approx(art.metrics["accuracy"])


def test_a_clone_path_of_the_first_topology_serves_as_it_did() -> None:
    """A bundle made by main at 191806e (the source's prefix added into the target; no 'topology'
    in its config) materializes today to the logits that commit computed."""
    import json
    from pathlib import Path

    from zoo_store.core.bundle import check_expected, decode_bundle
    from zoo_store.methods.clone.layers import unpack_mask
    from zoo_store.methods.clone.method import Clone

    here = Path(__file__).resolve().parents[1] / "fixtures" / "clone-191806e"
    bundle = decode_bundle((here / "clone.zoopath").read_bytes())
    expected = json.loads((here / "expected.json").read_text())
    nets = {"low": _base("low", LOW)[1], "high": _base("high", HIGH, seed=1)[1]}
    assert {b.id: b.digest for b in bundle.manifest.bases} == {k: digest_of(n) for k, n in nets.items()}
    config = bundle.manifest.config
    assert "topology" not in config
    (link,) = config["sources"]  # kept-filter convs and a resize are on the path it serves
    masks = [
        unpack_mask(t, nets["high"].get_submodule(k.split(".", 2)[2]).out_channels)
        for k, t in bundle.tensors.items()
        if k.startswith("mask.")
    ]
    assert masks and all(not m.all() for m in masks)
    shapes = nets["high"].tap_shapes(1, 28)[link["depth"]], nets["low"].tap_shapes(1, 28)[link["insert"]]
    assert shapes[0][1:] != shapes[1][1:]
    check_expected(bundle.manifest, Clone().expected_tensors(config, nets))
    module = Clone().materialize(bundle.manifest.config, bundle.tensors, nets)
    probe = torch.rand(4, 1, 28, 28, generator=torch.Generator().manual_seed(expected["probe_seed"]))
    with torch.no_grad():
        assert torch.allclose(module(probe), torch.tensor(expected["logits"]), atol=1e-5)


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
    keys = {"accuracy", "agreement_target_labels", "source0_kept_fraction", "source0_join_val_accuracy"}
    assert keys <= set(job["metrics"]) and job["metrics"]["rounds_val_accuracy"]
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
