"""Reassembly, step by step (issue 4): costs, CKA and the partition search, NASWOT and the other
proxies, the exact and 0-1 program searches, stitches, the frozen blocks, and the specs and configs
refused."""

from __future__ import annotations

import itertools
import random

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from tests.conftest import tiny_card, tiny_weights
from zoo_store.archs import build_arch
from zoo_store.core.cards import Card
from zoo_store.core.errors import InvalidInput
from zoo_store.core.spec import CompositionSpec
from zoo_store.core.weights import digest_of
from zoo_store.methods.base import BuildContext
from zoo_store.methods.reassemble import method as reassemble_method
from zoo_store.methods.reassemble.config import Budget, partitions, plan_reassemble, smallest_assembly
from zoo_store.methods.reassemble.layers import (
    Stitch,
    build_assembled,
    fit_stitches,
    shapes_of,
    stitch_params,
)
from zoo_store.methods.reassemble.method import Reassemble, assembled_bytes, search
from zoo_store.methods.reassemble.naswot import RectifierCodes, logdet, rectifiers
from zoo_store.methods.reassemble.partition import SimilarityCache, linear_cka, search_partition
from zoo_store.methods.reassemble.profile import Block, assembly_cost, card_profile, profile_of
from zoo_store.methods.reassemble.proxies import PROXIES, codes, ridge_loo_accuracy, size_corrected
from zoo_store.methods.reassemble.search import feasible, milp_top
from zoo_store.store.store import card_for
from zoo_store.training import freeze


def _base(base_id: str, arch: str, seed: int = 0, labels=tuple("0123456789")) -> tuple[Card, torch.nn.Module]:
    net = build_arch(arch, {"num_classes": len(labels)})
    net.load_state_dict(tiny_weights(arch, len(labels), seed))
    freeze(net)
    return card_for(tiny_card(base_id, arch, labels), net, digest_of(net), 0), net


@pytest.fixture(scope="module")
def zoo() -> dict[str, tuple[Card, torch.nn.Module]]:
    return {i: _base(i, a, s) for i, a, s in (("res", "resnet_s", 0), ("vgg", "vgg_s", 1), ("mob", "mobilenet_s", 2))}


def _cards(zoo) -> dict[str, Card]:
    return {k: c for k, (c, _) in zoo.items()}


def _spec(**kw) -> CompositionSpec:
    return CompositionSpec.model_validate({"method": "reassemble", "task": {"dataset": "digits"}, **kw})


CROSS = [
    Block(model="res", start=None, end="stage1"),
    Block(model="vgg", start="block1", end="block2"),
    Block(model="mob", start="stage2", end="stage3"),
]


def test_costs_match_the_built_network(zoo) -> None:
    """Params and FLOPs from the architecture alone equal those of the assembled network."""
    nets = {k: n for k, (_, n) in zoo.items()}
    profiles = {k: card_profile(c) for k, c in _cards(zoo).items()}
    params, flops = assembly_cost(CROSS, profiles, 4)
    model = build_assembled(CROSS, nets, shapes_of(nets, list(nets), 1, 28), 4)
    assert assembled_bytes(model) > 4 * params  # the blocks' BatchNorm buffers come on top of the params
    counted = {
        id(p): p.numel()
        for net, (s, e) in zip(model.nets, model.spans, strict=True)
        for m in net.stage_modules(s, e)
        for p in m.parameters()
    }
    assert params == sum(counted.values()) + sum(p.numel() for p in stitch_params(model))
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.zeros(1, 1, 28, 28))
    assert flops == counter.get_total_flops()
    assert profile_of(nets["vgg"], 1, 28) == profiles["vgg"]  # the meta skeleton profiles like the real network


def test_linear_cka_invariances() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 16, generator=g, dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(16, 16, generator=g, dtype=torch.float64))
    assert linear_cka(x, x) == pytest.approx(1.0)
    assert linear_cka(x, 3.0 * x @ q + 5.0) == pytest.approx(1.0)  # rotation, scale, shift
    assert linear_cka(x, torch.randn(200, 16, generator=g, dtype=torch.float64)) < 0.2


def test_partition_recovers_planted_sets() -> None:
    """Three models whose taps are alike exactly when they sit at the same planted block boundary."""
    ends = {"a": (1, 3), "b": (0, 2), "c": (2, 4)}  # indices of the taps the first two blocks end at
    taps = {"a": 5, "b": 4, "c": 6}
    stage = {m: [sum(i > e for e in ends[m]) for i in range(taps[m])] for m in taps}  # block of each tap

    def sim(m: str, n: str) -> torch.Tensor:
        return torch.tensor(
            [
                [
                    0.9
                    if (i in ends[m] or i == taps[m] - 1)
                    and stage[m][i] == stage[n][j]
                    and (j in ends[n] or j == taps[n] - 1)
                    else 0.1 * random.Random(i * 7 + j).random()
                    for j in range(taps[n])
                ]
                for i in range(taps[m])
            ],
            dtype=torch.float64,
        )

    mats = {(m, n): sim(m, n) for m, n in itertools.permutations(taps, 2)}
    part = search_partition(taps, mats, 3, seed=0)
    assert part.cuts == ends
    assert search_partition(taps, mats, 3, seed=0) == part  # deterministic for a seed


def test_similarity_cache_hits_on_the_same_probe() -> None:
    cache = SimilarityCache()
    calls = []
    for _ in range(3):
        cache.matrix("d1", "d2", "p", lambda: calls.append(1) or torch.eye(2, dtype=torch.float64))
    assert calls == [1] and (cache.hits, cache.misses) == (2, 1)
    cache.matrix("d1", "d2", "other-probe", lambda: torch.eye(2, dtype=torch.float64))
    assert cache.misses == 2


def test_naswot_kernel_by_hand() -> None:
    relu = torch.nn.Sequential(torch.nn.ReLU())
    x = torch.tensor([[1.0, -1.0, 1.0], [1.0, 1.0, -1.0], [-1.0, -1.0, -1.0]])
    codes = RectifierCodes([relu[0]])
    relu(x)
    codes.close()
    c = (x > 0).double()
    expected = c @ c.T + (1 - c) @ (1 - c).T  # agreements: diagonal 3, off-diagonal counts
    assert torch.equal(codes.kernel, expected)
    assert logdet(codes.kernel) == pytest.approx(torch.logdet(expected).item())
    assert logdet(torch.ones(3, 3, dtype=torch.float64)) == float("-inf")  # identical codes: singular


def test_naswot_prefers_distinct_codes() -> None:
    """Images that a network maps to the same activation pattern give a lower score."""
    _, net = _base("res", "resnet_s")
    g = torch.Generator().manual_seed(0)
    varied = torch.randn(16, 1, 28, 28, generator=g)
    same = varied[:1].repeat(16, 1, 1, 1) + 1e-3 * torch.randn(16, 1, 28, 28, generator=g)
    from zoo_store.archs.surgery import shared_copy

    def naswot(x: torch.Tensor) -> float:
        copy = shared_copy(net)
        return logdet(codes(copy, rectifiers(copy), x)[0])

    assert naswot(varied) > naswot(same)
    assert not any(m._forward_hooks for m in net.modules()), "scoring must not hook the resident network"


def test_naswot_codes_smooth_rectifiers_by_sign() -> None:
    """GELU, SiLU and Hardswish are coded like ReLU: by the sign of their input (a ConvNeXt block is
    not invisible to the score)."""
    x = torch.randn(8, 20, generator=torch.Generator().manual_seed(0))
    kernels = []
    for act in (torch.nn.ReLU(), torch.nn.GELU(), torch.nn.SiLU(), torch.nn.Hardswish()):
        codes = RectifierCodes(rectifiers(torch.nn.Sequential(act)))
        act(x)
        codes.close()
        kernels.append(codes.kernel)
    assert all(torch.equal(k, kernels[0]) for k in kernels[1:])


def test_size_corrected_naswot_does_not_count_units() -> None:
    """Every unit duplicated: raw NASWOT grows by N·ln 2, the size-corrected score stays the same."""
    x = torch.randn(8, 20, generator=torch.Generator().manual_seed(0))
    one, two = torch.nn.ReLU(), torch.nn.ReLU()
    k1, u1 = codes(one, [one], x)
    k2, u2 = codes(lambda t: two(torch.cat([t, t], 1)), [two], x)
    assert (u1, u2) == (20, 40)
    assert logdet(k2) == pytest.approx(logdet(k1) + 8 * torch.log(torch.tensor(2.0)).item())
    assert size_corrected(k2, u2, 8) == pytest.approx(size_corrected(k1, u1, 8))
    assert size_corrected(k1, u1, 8) == pytest.approx(logdet(k1 / 20))


def test_ridge_leave_one_out_is_refitting_without_each_image() -> None:
    """The closed form equals fitting the ridge probe M times, each without one image (the same
    standardization and penalty, as the closed form holds them fixed)."""
    from zoo_store.methods.reassemble.proxies import RIDGE

    g = torch.Generator().manual_seed(0)
    labels = torch.arange(24) % 3
    feats = torch.randn(24, 4, generator=g, dtype=torch.float64) + labels.unsqueeze(1).double()
    x = (feats - feats.mean(0)) / feats.std(0, unbiased=False)
    x = torch.cat([x, torch.ones(24, 1, dtype=x.dtype)], 1)
    y = torch.nn.functional.one_hot(labels, 3).double()
    right = 0
    for i in range(24):
        keep = torch.arange(24) != i
        gram = x[keep].T @ x[keep] + RIDGE * 24 * torch.eye(5, dtype=x.dtype)
        w = torch.linalg.solve(gram, x[keep].T @ y[keep])
        right += int((x[i] @ w).argmax() == labels[i])
    assert ridge_loo_accuracy(feats, labels) == pytest.approx(right / 24)
    assert ridge_loo_accuracy(torch.randn(24, 4, generator=g), labels) < right / 24  # noise probes worse


@pytest.mark.parametrize(
    ("proxy", "exact_max"), [*((p, 256) for p in PROXIES), ("ridge", 0)], ids=[*PROXIES, "ridge-milp"]
)
def test_search_ranks_by_the_chosen_proxy(zoo, proxy, exact_max, monkeypatch) -> None:
    """Each proxy ranks the candidates (exactly; or the 0-1 program's, proposed on the proxy's own
    block surrogate); the metrics name it; every score is finite on a working pool."""
    from zoo_store.datasets.builtin import BUILTINS
    from zoo_store.datasets.tasks import make_task

    monkeypatch.setattr(reassemble_method, "EXACT_MAX", exact_max)
    arrays = BUILTINS["digits"].make()
    spec = _spec(
        models=["res", "vgg"],
        blocks=2,
        task={"dataset": "digits", "labels": ["0", "1", "2"], "samples_per_label": 12},
        options={"proxy": proxy},
    )
    found = search(spec, BuildContext(bases=zoo, load_task=lambda t, c: make_task(arrays, t, c.input, 0)))
    scores = [c.score for c in found.ranked]
    assert found.metrics["proxy"] == proxy and found.metrics["search"] == ("exact" if exact_max else "milp")
    assert scores == sorted(scores, reverse=True) and all(s > float("-inf") for s in scores)
    assert len(found.probes.images) == len(found.probes.labels) == 36


def test_unknown_proxy_is_refused(zoo) -> None:
    with pytest.raises(InvalidInput, match="options.proxy"):
        Reassemble().check(_spec(options={"proxy": "flops"}), _cards(zoo))


def test_stitches_at_a_single_models_own_cuts(zoo) -> None:
    """The bench's control: one model cut at its own taps with a stitch at every cut; the
    least-squares start is close to the identity, so it begins as the model itself."""
    nets = {k: n for k, (_, n) in zoo.items()}
    own = [Block(model="res", start=None, end="stage1"), Block(model="res", start="stage1", end="stage3")]
    shapes = shapes_of(nets, ["res"], 1, 28)
    assert isinstance(build_assembled(own, nets, shapes, 4).stitches[1], torch.nn.Identity)
    model = build_assembled(own, nets, shapes, 4, stitch_all=True)
    assert isinstance(model.stitches[1], Stitch)
    x = torch.rand(64, 1, 28, 28)
    fit_stitches(model, own, nets, x)
    with torch.no_grad():
        ref = nets["res"].run(x, None, "stage3")
        got = model.features(x)
    assert (got - ref).norm() / ref.norm() < 0.05


def _sets(zoo) -> tuple[list[list[Block]], dict]:
    profiles = {k: card_profile(c) for k, c in _cards(zoo).items()}
    cuts = {m: partitions(profiles[m], 3)[0] for m in profiles}
    return [[cuts[m][k].model_copy(update={"model": m}) for m in profiles] for k in range(3)], profiles


@pytest.mark.parametrize("limit", [None, 0.4, 0.15])
def test_milp_matches_enumeration(zoo, limit) -> None:
    """The 0-1 program's best and its no-good successors are the enumeration's, under any budget."""
    sets, profiles = _sets(zoo)
    rng = random.Random(1)
    unary = [[rng.uniform(0, 10) for _ in s] for s in sets]
    all_cands, _ = feasible(sets, profiles, 10, Budget())
    biggest = max(c.params for c in all_cands)
    budget = Budget(max_params=None if limit is None else int(limit * biggest))
    cands, _ = feasible(sets, profiles, 10, budget)
    surrogate = {c.blocks: sum(unary[k][sets[k].index(b)] for k, b in enumerate(c.blocks)) for c in cands}
    ranked = sorted(surrogate.values(), reverse=True)
    top = milp_top(sets, unary, profiles, 10, budget, 5)
    assert [pytest.approx(surrogate[c.blocks]) for c in top] == ranked[:5]
    assert all(budget.admits(c.params, c.flops) for c in top)
    assert len({c.blocks for c in top}) == len(top)


def test_feasible_names_the_smallest(zoo) -> None:
    sets, profiles = _sets(zoo)
    cands, (p, _) = feasible(sets, profiles, 10, Budget(max_params=1))
    assert not cands and p == min(assembly_cost(list(c), profiles, 10)[0] for c in itertools.product(*sets))


def test_stitch_least_squares_recovers_a_linear_map() -> None:
    g = torch.Generator().manual_seed(0)
    a = torch.randn(32, 6, 8, 8, generator=g)
    w, b = torch.randn(5, 6, generator=g), torch.randn(5, generator=g)
    target = torch.einsum("oc,nchw->nohw", w, a) + b.view(1, 5, 1, 1)
    stitch = Stitch(6, 5, (8, 8))
    stitch.fit(a, target, ridge=1e-9)
    with torch.no_grad():
        assert torch.allclose(stitch.eval()(a), target, atol=1e-3)


def test_blocks_stay_frozen_and_shared(zoo) -> None:
    nets = {k: n for k, (_, n) in zoo.items()}
    digests = {k: digest_of(n) for k, n in nets.items()}
    model = build_assembled(CROSS, nets, shapes_of(nets, list(nets), 1, 28), 4)
    x = torch.rand(16, 1, 28, 28)
    fit_stitches(model, CROSS, nets, x)
    model.train()
    assert not any(m.training for m in model.nets.modules()) and all(s.training for s in model.stitches)
    opt = torch.optim.SGD(stitch_params(model), lr=0.1)
    model(x).sum().backward()
    opt.step()
    assert {k: digest_of(n) for k, n in nets.items()} == digests
    assert not any(n.training for n in nets.values())
    resident = {p.data_ptr() for n in nets.values() for p in n.parameters()}
    assert {p.data_ptr() for p in model.nets.parameters()} <= resident


BAD = {
    "pool of one": ({"models": ["res"]}, "at least two compatible models"),
    "empty pool": ({"models": []}, "'models' is empty"),
    "boolean budget": ({"budget": {"max_params": True}}, "budget.max_params"),
    "unknown model": ({"models": ["res", "nope"]}, "unknown pool models ['nope']"),
    "too few taps": ({"models": ["res", "vgg"], "blocks": 4}, "fewer spatial taps than blocks=4"),
    "budget too small": ({"budget": {"max_params": 10}}, "the smallest takes max_params="),
    "bad budget key": ({"budget": {"params": 10}}, "budget.params"),
    "negative flops": ({"budget": {"max_flops": -1}}, "budget.max_flops"),
    "a base given": ({"base": "res"}, "does not take ['base']"),
    "no task": ({"task": None}, "needs 'task'"),
}


@pytest.mark.parametrize("case", BAD, ids=list(BAD))
def test_bad_specs(zoo, case) -> None:
    extra, message = BAD[case]
    with pytest.raises(InvalidInput, match=message.replace("[", r"\[").replace("]", r"\]")):
        Reassemble().validate(_spec(**extra), _cards(zoo))


def test_smallest_budget_is_feasible_and_exact(zoo) -> None:
    cards = _cards(zoo)
    p, _ = smallest_assembly({k: card_profile(c) for k, c in cards.items()}, 3, 2)
    Reassemble().validate(_spec(budget={"max_params": p}), cards)
    with pytest.raises(InvalidInput, match=f"max_params={p}"):
        Reassemble().validate(_spec(budget={"max_params": p - 1}), cards)


def test_bound_when_too_many_to_enumerate(zoo, monkeypatch) -> None:
    """Past the enumeration limit the POST-time check uses a lower bound, and says so."""
    from zoo_store.methods.reassemble import config

    cards = _cards(zoo)
    profiles = {k: card_profile(c) for k, c in cards.items()}
    bound, exact_min = config.cheapest_bound(profiles, 3, 2), smallest_assembly(profiles, 3, 2)
    assert bound[0] <= exact_min[0] and bound[1] <= exact_min[1]
    monkeypatch.setattr(config, "EXACT_COMBINATIONS", 0)
    with pytest.raises(InvalidInput, match=f"every assembly takes at least max_params={bound[0]}"):
        Reassemble().validate(_spec(budget={"max_params": bound[0] - 1}), cards)


def test_milp_survives_singular_scores(zoo) -> None:
    """A block whose kernel is singular (NASWOT -inf) ranks last instead of breaking the program."""
    sets, profiles = _sets(zoo)
    unary = [[float("-inf") if j == 0 else float(j) for j in range(len(s))] for s in sets]
    top = milp_top(sets, unary, profiles, 10, Budget(), 2)
    assert next(tuple(b.model for b in c.blocks) for c in top) == tuple(s[-1].model for s in sets)


def test_pool_with_another_input_is_refused(zoo) -> None:
    cards = _cards(zoo)
    other = cards["vgg"].model_copy(update={"id": "rgb", "input": cards["vgg"].input.model_copy(update={"size": 32})})
    with pytest.raises(InvalidInput, match=r"pool models \['rgb'\] take another input"):
        plan_reassemble(_spec(models=["res", "rgb"]), {**cards, "rgb": other})
    assert "rgb" not in plan_reassemble(_spec(), {**cards, "rgb": other}).pool  # the default pool leaves it out


TAMPERED = {
    "second block from the input": ({1: {"start": None}}, "only the first block starts at the input"),
    "unknown tap": ({0: {"end": "nowhere"}}, "not a spatial tap"),
    "empty block": ({2: {"start": "stage3"}}, "is empty"),
    "unreferenced base": ({1: {"model": "zzz"}}, "does not reference"),
}


def test_config_input_must_match_the_path() -> None:
    from zoo_store.core.cards import InputSpec

    config = {"blocks": [b.model_dump() for b in CROSS], "num_classes": 4, "channels": 1, "size": 28}
    Reassemble().check_input(config, InputSpec(channels=1, size=28, mean=(0.5,), std=(0.5,)))
    with pytest.raises(InvalidInput, match="differs from the path's 1x32x32"):
        Reassemble().check_input(config, InputSpec(channels=1, size=32, mean=(0.5,), std=(0.5,)))


@pytest.mark.parametrize("case", TAMPERED, ids=list(TAMPERED))
def test_tampered_configs_are_refused(zoo, case) -> None:
    nets = {k: n for k, (_, n) in zoo.items()}
    edits, message = TAMPERED[case]
    blocks = [b.model_dump() | edits.get(i, {}) for i, b in enumerate(CROSS)]
    config = {"blocks": blocks, "num_classes": 4, "channels": 1, "size": 28}
    with pytest.raises(InvalidInput, match=message):
        Reassemble().expected_tensors(config, nets)


def test_reassemble_through_the_api(app_client) -> None:
    """Compose over the API (the second job reuses the cached CKA matrices), predict, bundle export ->
    delete -> import: same id, same predictions; bases untouched; a bad spec is a 422."""
    from tests.helpers import bundle_roundtrip, compose, tensor_inputs

    svc = app_client.app.state.services
    digests = svc.zoo.digests()
    spec = {
        "method": "reassemble",
        "models": ["res", "vgg"],
        "blocks": 2,
        "task": {"dataset": "digits", "labels": ["0", "1", "2"], "samples_per_label": 8},
        "train": {"epochs": 1, "batch_size": 8},
    }
    job = compose(app_client, spec)
    assert job["state"] == "succeeded", job
    m = job["metrics"]
    assert m["search"] == "exact" and m["candidates_feasible"] == 4 and m["cka_cache"] == {"hits": 0, "misses": 1}
    assert len(m["partition"]) == 2 and len(m["top_candidates"]) == 4
    again = compose(app_client, {**spec, "train": {"epochs": 1, "batch_size": 8, "lr": 0.005}})
    assert again["metrics"]["cka_cache"] == {"hits": 1, "misses": 0}
    pid = job["path_id"]
    path = app_client.get(f"/v1/paths/{pid}").json()
    assert path["method"] == "reassemble" and path["labels"] == ["0", "1", "2"]
    assert path["bytes"] < 0.05 * path["dense_bytes"]
    body = {"inputs": tensor_inputs(3), "top_k": 2}
    bundle_roundtrip(app_client, pid, body)
    assert svc.zoo.digests() == digests
    r = app_client.post("/v1/compositions", json={**spec, "budget": {"max_params": 100}})
    assert r.status_code == 422 and "the smallest takes max_params=" in r.json()["detail"]


def test_cross_architecture_path_is_served_and_bundled(app_client) -> None:
    """Blocks of a ResNet and a VGG net, stitched and tuned, imported as a bundle, served, exported,
    deleted and imported again: the same id and the same predictions."""
    from tests.helpers import bundle_roundtrip, tensor_inputs
    from zoo_store.core.bundle import PathArtifact, encode_bundle, make_manifest
    from zoo_store.core.manifest import BaseRef
    from zoo_store.datasets.tasks import TaskData
    from zoo_store.methods.reassemble.method import path_tensors, train_assembly
    from zoo_store.methods.reassemble.search import Candidate

    svc = app_client.app.state.services
    bases = svc.zoo.bases
    blocks = (Block(model="res", start=None, end="stage1"), Block(model="vgg", start="block1", end="block3"))
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(24, 1, 28, 28, generator=g), torch.arange(24) % 3
    card = bases["res"][0]
    nets = {k: n for k, (_, n) in bases.items()}
    model = train_assembly(
        Candidate(blocks, 0, 0), nets, card, TaskData(x, y, x, y, ["a", "b", "c"], x, y), x, 1, 1e-2, 8, 0, "cpu"
    )
    art = PathArtifact(
        "reassemble",
        [BaseRef(id=k, digest=bases[k][0].digest) for k in ("res", "vgg")],
        ["a", "b", "c"],
        card.input,
        {"blocks": [b.model_dump() for b in blocks], "num_classes": 3, "channels": 1, "size": 28},
        path_tensors(model),
        {},
    )
    bundle = encode_bundle(make_manifest(art), art.tensors, art.metrics)
    r = app_client.post("/v1/paths/import", content=bundle)
    assert r.status_code == 201, r.text
    pid = r.json()["id"]
    body = {"inputs": tensor_inputs(3), "top_k": 3}
    before = app_client.post(f"/v1/paths/{pid}/predict", json=body).json()
    from zoo_store.training import predict_logits

    x_in = torch.tensor([i["tensor"] for i in body["inputs"]])
    expected = predict_logits(model, x_in, card.input).softmax(1)
    assert [p["label"] for p in before["predictions"]] == [["a", "b", "c"][int(i)] for i in expected.argmax(1)]
    assert bundle_roundtrip(app_client, pid, body) == before
    # the same blocks, but the bundle references only 'res': a resident base it does not name is refused
    lone = PathArtifact("reassemble", art.bases[:1], art.labels, art.input, art.config, art.tensors, {})
    r = app_client.post("/v1/paths/import", content=encode_bundle(make_manifest(lone), lone.tensors, {}))
    assert r.status_code == 422 and "names base 'vgg', which the path does not reference" in r.json()["detail"]
