"""Bring your own network: a registry of torchvision families (random weights, 64 x 64 RGB, 10
labels), each registered through the API as plain PyTorch saves it, with its taps traced. For each
family that reprogram applies to: a reprogram path imported and predicted over HTTP equals its
per-path module and its sample in a mixed-path batch; the bundle round trip is exact. A family a
method cannot apply to is refused at POST with the reason."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save

from tests.conftest import make_settings, start_app
from tests.helpers import library_model
from zoo_store.archs import build_arch
from zoo_store.archs.families import FAMILIES, TIMM_FAMILIES
from zoo_store.archs.groups import block_perm, channel_groups, proven_groups
from zoo_store.core.bundle import PathArtifact, encode_bundle, make_manifest
from zoo_store.methods import get_method
from zoo_store.methods.reprogram.layers import build_reprogrammed
from zoo_store.methods.resample.config import ResampleBudget, ResampleConfig
from zoo_store.methods.resample.layers import (
    assemble,
    fused_layers,
    group_size,
    permute_and_resample,
    resampled_params,
    uniform_cells,
)
from zoo_store.methods.resample.method import widths_for

RGB = {"channels": 3, "size": 64, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
LABELS = [str(i) for i in range(10)]

ALL = {**FAMILIES, **TIMM_FAMILIES}
# what a method says about a family it cannot apply to, and the families refused at registration
REPROGRAM_REFUSED = {"swin": "only patch embeddings"}
REFUSED_AT_REGISTRATION = {"squeezenet": "no linear head", "vit": "cannot take a 3 x 64 x 64 input"}
SERVED = [f for f in ALL if f not in REFUSED_AT_REGISTRATION]


def _register(client, base_id: str, arch: str, model: torch.nn.Module):
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)  # exactly as a user saves what they trained
    card = {"id": base_id, "arch": arch, "labels": LABELS, "input": RGB}
    return client.post("/v1/zoo/models", data={"card": json.dumps(card)}, files={"weights": ("w.pth", buf.getvalue())})


def _registered(client, family: str) -> tuple[dict, torch.nn.Module]:
    """The family's base card (registered by whichever test comes first) and its library model."""
    model = library_model(ALL[family], len(LABELS))
    r = client.get(f"/v1/zoo/models/{family}")
    if r.status_code == 404:
        r = _register(client, family, ALL[family], model)
        assert r.status_code == 201, r.text
    return r.json(), model


def _npy(x: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, x)
    return buf.getvalue()


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    settings = make_settings(tmp_path_factory.mktemp("families"))
    c = start_app(settings)
    yield c
    c.__exit__(None, None, None)


@pytest.mark.parametrize("family", SERVED)
def test_family_registers_and_serves_reprogram_paths_exactly(client, family: str) -> None:
    card, model = _registered(client, family)
    assert card["taps"][-1]["stride"] == 0 and all(t["stride"] > 0 for t in card["taps"][:-1])
    net = build_arch(ALL[family], {"num_classes": 10})
    net.load_state_dict(model.state_dict())  # the same keys, unchanged
    x = torch.rand(3, 3, 64, 64)  # (B, C, H, W) in [0, 1]
    spec = {"base": family, "task": {"dataset": "none", "labels": ["a", "b", "c"]}}
    if family in REPROGRAM_REFUSED:
        r = client.post("/v1/compositions", json={"method": "reprogram", **spec})
        assert r.status_code == 422 and REPROGRAM_REFUSED[family] in r.json()["detail"], r.text
        return
    method = get_method("reprogram")
    torch.manual_seed(1)
    tensors = {
        k: (v + 0.1 * torch.randn_like(v)).contiguous() for k, v in build_reprogrammed(net, 3).delta_state().items()
    }
    config = {"base": family, "num_classes": 3, "kernel": 3}
    digest = card["digest"]
    art = PathArtifact("reprogram", [{"id": family, "digest": digest}], ["a", "b", "c"], card["input"], config, tensors)
    bundle = encode_bundle(make_manifest(art), tensors, {})
    r = client.post("/v1/paths/import", content=bundle)
    assert r.status_code in (200, 201), r.text
    path_id = r.json()["id"]
    r = client.post(
        f"/v1/paths/{path_id}/predict?top_k=3",
        content=_npy(x.numpy()),
        headers={"content-type": "application/octet-stream"},
    )
    assert r.status_code == 200, r.text
    served = torch.tensor(
        [[p["score"] for p in sorted(row["top_k"], key=lambda p: p["label"])] for row in r.json()["predictions"]]
    )
    own = method.materialize(config, tensors, {family: net})
    mean, std = torch.tensor(RGB["mean"]).view(1, 3, 1, 1), torch.tensor(RGB["std"]).view(1, 3, 1, 1)
    with torch.inference_mode():
        expected = own((x - mean) / std).softmax(-1)  # (B, 3)
        # a mixed batch: the path's samples between those of another path (5 labels, other tensors)
        other_config = {**config, "num_classes": 5}
        other = {
            k: (v + 0.1 * torch.randn_like(v)).contiguous() for k, v in build_reprogrammed(net, 5).delta_state().items()
        }
        bank = method.bank(config, {family: net})
        bank.grow(2)
        bank.load(0, other_config, other)
        bank.load(1, config, tensors)
        xs = (torch.cat([x[:1], x[:1], x[1:2], x[2:]]) - mean) / std  # (4, 3, 64, 64)
        mixed = bank.forward(xs, torch.tensor([1, 0, 1, 1]))  # (4, 5)
        other_own = method.materialize(other_config, other, {family: net})(xs[1:2]).softmax(-1)  # (1, 5)
    torch.testing.assert_close(mixed[[0, 2, 3], :3].softmax(-1), expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(mixed[1:2].softmax(-1), other_own, atol=1e-5, rtol=0)
    torch.testing.assert_close(served, expected, atol=1e-5, rtol=0)
    assert client.get(f"/v1/paths/{path_id}/bundle").content == bundle  # the round trip is exact


@pytest.mark.parametrize("family", SERVED)
def test_family_groups_permute_exactly_and_resample_to_70_percent(client, family: str) -> None:
    """Every traced group shuffled (BatchNorms folded, through resample's own code): the same function
    within 1e-5. Then a resample path at 70% width, imported and served, and its bundle round trip."""
    card, model = _registered(client, family)
    net = build_arch(ALL[family], {"num_classes": 10})
    net.load_state_dict(model.state_dict())
    groups = channel_groups(net)
    assert groups, proven_groups(net).opaque
    layers = fused_layers(net, groups)
    gen = torch.Generator().manual_seed(0)
    perms = {g.name: block_perm(group_size(layers, g), g.blocks, gen).int() for g in groups}
    full = {g.name: uniform_cells(group_size(layers, g)) for g in groups}
    permuted = assemble(net, groups, permute_and_resample(layers, groups, perms, full))
    x = torch.rand(2, 3, 64, 64, generator=gen)  # (B, C, H, W)
    with torch.no_grad():
        y, y2 = net(x), permuted(x)  # (B, 10)
    torch.testing.assert_close(y2, y, atol=1e-5 * max(1.0, y.abs().max().item()), rtol=1e-5)

    widths = widths_for(net, groups, ResampleBudget(width=0.7))
    assert resampled_params(net, groups, widths) < sum(p.numel() for p in net.parameters())
    config = ResampleConfig(base=family, widths=widths).model_dump()
    art = PathArtifact(
        "resample",
        [{"id": family, "digest": card["digest"]}],
        LABELS,
        card["input"],
        config,
        {f"perm.{k}": v for k, v in perms.items()},
    )
    bundle = encode_bundle(make_manifest(art), art.tensors, {})
    r = client.post("/v1/paths/import", content=bundle)
    assert r.status_code in (200, 201), r.text
    path_id = r.json()["id"]
    r = client.post(
        f"/v1/paths/{path_id}/predict", content=_npy(x.numpy()), headers={"content-type": "application/octet-stream"}
    )
    assert r.status_code == 200 and len(r.json()["predictions"]) == 2, r.text
    assert client.get(f"/v1/paths/{path_id}/bundle").content == bundle


@pytest.mark.parametrize("family", list(REFUSED_AT_REGISTRATION))
def test_family_without_a_head_or_this_input_is_refused_at_registration(client, family: str) -> None:
    reason = REFUSED_AT_REGISTRATION[family]
    r = _register(client, family, ALL[family], library_model(ALL[family], len(LABELS)))
    assert r.status_code == 422 and reason in r.json()["detail"], r.text
    assert client.get(f"/v1/zoo/models/{family}").status_code == 404  # nothing written


def test_a_plain_pytorch_finetune_registers_unchanged_and_predicts_identically(tmp_path: Path, client) -> None:
    """Fine-tuned in plain PyTorch (a few SGD steps on random data), saved with torch.save(state_dict()):
    the registered base's forward equals the library model's, bit for bit."""
    model = library_model("torchvision:mobilenet_v3_small", len(LABELS)).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        x, y = torch.rand(8, 3, 64, 64, generator=gen), torch.randint(0, 10, (8,), generator=gen)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    model.eval()
    path = tmp_path / "finetuned.pth"
    torch.save(model.state_dict(), path)
    r = _register(client, "finetuned", "torchvision:mobilenet_v3_small", model)
    assert r.status_code == 201, r.text
    store = client.app.state.services.store
    base = store.load_base(store.card("finetuned"))
    assert list(base.state_dict()) == list(torch.load(path, weights_only=True))  # keys unchanged, in order
    x = torch.rand(4, 3, 64, 64)
    with torch.inference_mode():
        assert torch.equal(base(x), model(x))


@pytest.mark.parametrize(
    ("arch", "config", "says"),
    [
        ("torchvision:resnet19", {}, "unknown torchvision classifier 'resnet19'"),
        ("torchvision:resnet18", {"weights": "IMAGENET1K_V1"}, "may not set ['weights']"),
        ("timm:resnet18", {"checkpoint_path": "/etc/passwd"}, "may not set ['checkpoint_path']"),
        ("torchvision:vit_b_16", {"image_size": 225}, "bad config"),
        ("torchvision:resnet18", {"bogus": 1}, "unexpected keyword argument 'bogus'"),
    ],
)
def test_a_bad_architecture_or_config_is_422_and_nothing_is_written(client, arch: str, config: dict, says: str) -> None:
    card = {"id": "nope", "arch": arch, "arch_config": config, "labels": LABELS, "input": RGB}
    r = client.post(
        "/v1/zoo/models",
        data={"card": json.dumps(card)},
        files={"weights": ("w.safetensors", save({"a": torch.zeros(1)}))},
    )
    assert r.status_code == 422 and says in r.json()["detail"], r.text
    assert client.get("/v1/zoo/models/nope").status_code == 404


@pytest.mark.parametrize("method", ["clone", "reassemble"])
def test_clone_and_reassemble_across_families_through_traced_taps(client, method: str) -> None:
    """A torchvision resnet and mobilenet_v2 joined at their traced taps (stitches sized from the traced
    shapes): composed over the API, served, bundle round trip."""
    from tests.helpers import bundle_roundtrip, compose

    for family in ("resnet", "mobilenet_v2"):
        _registered(client, family)
    task = {"dataset": "digits", "labels": ["0", "1", "2"], "samples_per_label": 8}
    if method == "clone":
        spec = {
            "method": "clone",
            "base": "resnet",
            "sources": [{"model": "mobilenet_v2", "labels": ["1", "2"]}],
            "task": task,
            "train": {"epochs": 1, "steps": 5, "batch_size": 8},
        }
    else:
        spec = {
            "method": "reassemble",
            "models": ["resnet", "mobilenet_v2"],
            "blocks": 2,
            "task": task,
            "train": {"epochs": 1, "batch_size": 8},
        }
    job = compose(client, spec, timeout=300)
    assert job["state"] == "succeeded", job
    path = client.get(f"/v1/paths/{job['path_id']}").json()
    if method == "clone":
        assert {b["id"] for b in path["bases"]} == {"resnet", "mobilenet_v2"}
    else:  # the search built and scored assemblies that cross the families (it may pick a single one)
        crossing = [
            c["blocks"]
            for c in job["metrics"]["top_candidates"]
            if "resnet" in str(c["blocks"]) and "mobilenet_v2" in str(c["blocks"])
        ]
        assert crossing, job["metrics"]["top_candidates"]
    assert path["labels"] == ["0", "1", "2"]
    x = np.random.default_rng(0).random((2, 3, 64, 64)).round(3).tolist()
    bundle_roundtrip(client, job["path_id"], {"inputs": [{"tensor": t} for t in x], "top_k": 2})
