"""Every kind of bad input is a precise 4xx, nothing is written, and the server stays healthy."""

from __future__ import annotations

import base64
import io
import json

import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from tests.helpers import compose, png_b64, reprogram_spec, tensor_inputs
from zoo_store.core.bundle import PathArtifact, decode_bundle, make_manifest
from zoo_store.core.manifest import canonical_json


def _counts(c: TestClient) -> tuple[int, int, int, int]:
    return tuple(len(c.get(u).json()["items"]) for u in ("/v1/paths", "/v1/datasets", "/v1/jobs", "/v1/zoo/models"))


def _reencode(data: bytes, *, tensors=None, manifest_patch=None) -> bytes:
    """A self-consistent bundle (fresh tensor digest) with altered tensors or manifest fields."""
    b = decode_bundle(data)
    m = b.manifest
    ts = tensors(dict(b.tensors)) if tensors else b.tensors
    art = PathArtifact(m.method, list(m.bases), list(m.labels), m.input, dict(m.config), ts, b.metrics)
    raw = make_manifest(art).model_dump(mode="json")
    if manifest_patch:
        raw = {**raw, **manifest_patch(raw)}  # not validated: the server must refuse it
    meta = {"zoopath": "1", "manifest": canonical_json(raw), "metrics": canonical_json(b.metrics)}
    return st_save({k: v.contiguous() for k, v in ts.items()}, metadata=meta)


@pytest.fixture
def served(app_client: TestClient) -> tuple[TestClient, str, bytes]:
    pid = compose(app_client, reprogram_spec())["path_id"]
    return app_client, pid, app_client.get(f"/v1/paths/{pid}/bundle").content


def _flip_tensor_byte(data: bytes) -> bytes:
    b = bytearray(data)
    b[-3] ^= 0xFF
    return bytes(b)


def _wrong_shape(ts: dict) -> dict:
    ts["head.bias"] = torch.zeros(5)
    return ts


def _wrong_dtype(ts: dict) -> dict:
    ts["head.bias"] = ts["head.bias"].half()
    return ts


def _wrong_name(ts: dict) -> dict:
    ts["head.extra"] = ts.pop("head.bias")
    return ts


BUNDLE_CASES = {
    "empty": (lambda d: b"", 400, "empty body"),
    "truncated": (lambda d: d[: len(d) // 2], 400, "truncated"),
    "garbage": (lambda d: b"\x00" * 64, 400, "truncated"),
    "padded": (lambda d: d + b"\x00" * 16, 400, "padded"),
    "altered": (_flip_tensor_byte, 422, "tensor_digest"),
    "not a bundle": (lambda d: st_save({"a": torch.zeros(2)}), 400, "not a .zoopath"),
    "missing base": (
        lambda d: _reencode(d, manifest_patch=lambda m: {"bases": [{**m["bases"][0], "id": "gone"}]}),
        409,
        "lacks",
    ),
    "other digest": (
        lambda d: _reencode(d, manifest_patch=lambda m: {"bases": [{**m["bases"][0], "digest": "0" * 64}]}),
        409,
        "digest",
    ),
    "unknown method": (lambda d: _reencode(d, manifest_patch=lambda m: {"method": "teleport"}), 422, "unknown method"),
    "wrong shape": (lambda d: _reencode(d, tensors=_wrong_shape), 422, "head.bias"),
    "wrong dtype": (lambda d: _reencode(d, tensors=_wrong_dtype), 422, "head.bias"),
    "wrong name": (lambda d: _reencode(d, tensors=_wrong_name), 422, "head.extra"),
    "bad schema": (lambda d: _reencode(d, manifest_patch=lambda m: {"labels": []}), 422, "labels"),
}


@pytest.mark.parametrize("case", BUNDLE_CASES)
def test_bad_bundles(served, case: str) -> None:
    client, pid, good = served
    mutate, status, needle = BUNDLE_CASES[case]
    bad = mutate(good)
    client.delete(f"/v1/paths/{pid}")
    before = _counts(client)
    r = client.post("/v1/paths/import", content=bad, headers={"content-type": "application/octet-stream"})
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/problem+json"
    assert needle in r.json()["detail"]
    assert _counts(client) == before
    assert client.post("/v1/paths/import", content=good).status_code == 201  # still healthy
    assert client.get("/healthz").status_code == 200


REASSEMBLE = {"method": "reassemble", "models": ["res", "vgg"], "task": {"dataset": "digits"}}
SPEC_CASES = {
    "unknown method": ({"method": "teleport", "base": "res"}, "unknown method"),
    "unknown base": (reprogram_spec(base="nope"), "unknown base"),
    "no task": ({"method": "reprogram", "base": "res"}, "needs 'task'"),
    "unknown dataset": (reprogram_spec(task={"dataset": "nope"}), "no dataset"),
    "unknown label": (reprogram_spec(task={"dataset": "digits", "labels": ["0", "x"]}), "['x']"),
    "extra field": ({**reprogram_spec(), "colour": "red"}, "colour"),
    "bad type": ({**reprogram_spec(), "train": {"epochs": "many"}}, "train.epochs"),
    "epochs out of range": ({**reprogram_spec(), "train": {"epochs": 0}}, "train.epochs"),
    "missing method": ({"base": "res"}, "method"),
    "sources for reprogram": ({**reprogram_spec(), "sources": [{"model": "res", "labels": ["1"]}]}, "sources"),
    "blocks for reprogram": ({**reprogram_spec(), "blocks": 3}, "does not take ['blocks']"),
    "reassemble pool of one": (REASSEMBLE | {"models": ["res"]}, "at least two compatible models"),
    "reassemble unknown model": (REASSEMBLE | {"models": ["res", "nope"]}, "unknown pool models ['nope']"),
    "reassemble too many blocks": (REASSEMBLE | {"blocks": 4}, "fewer spatial taps than blocks=4"),
    "reassemble budget too small": (REASSEMBLE | {"budget": {"max_params": 10}}, "the smallest takes max_params="),
}


@pytest.mark.parametrize("case", SPEC_CASES)
def test_bad_specs(app_client: TestClient, case: str) -> None:
    spec, needle = SPEC_CASES[case]
    before = _counts(app_client)
    r = app_client.post("/v1/compositions", json=spec)
    assert r.status_code == 422, r.text
    assert needle in r.json()["detail"]
    assert _counts(app_client) == before


def test_spec_not_json(app_client: TestClient) -> None:
    r = app_client.post("/v1/compositions", content=b"{nope", headers={"content-type": "application/json"})
    assert r.status_code == 422 and "JSON" in r.json()["detail"]


def _jpeg_bytes(size: int) -> bytes:
    buf = io.BytesIO()
    Image.new("L", (size, size)).save(buf, format="JPEG")
    return buf.getvalue()


PREDICT_CASES = {
    "wrong shape": ({"inputs": tensor_inputs(1, size=27)}, 422, "expected [1, 28, 28]"),
    "ragged": ({"inputs": [{"tensor": [[[0.1, 0.2], [0.3]]]}]}, 422, "rectangular"),
    "out of range": ({"inputs": [{"tensor": (torch.ones(1, 28, 28) * 2).tolist()}]}, 422, "[0, 1]"),
    "both": ({"inputs": [{"tensor": [[[0.0]]], "image": "x"}]}, 422, "exactly one"),
    "no inputs": ({"inputs": []}, 422, "inputs"),
    "not base64": ({"inputs": [{"image": "***"}]}, 422, "base64"),
    "undecodable": ({"inputs": [{"image": base64.b64encode(b"not an image at all").decode()}]}, 422, "decodable"),
    "huge image": ({"inputs": [{"image": base64.b64encode(_jpeg_bytes(3000)).decode()}]}, 413, "limit"),
    "bad top_k": ({"inputs": tensor_inputs(1), "top_k": 0}, 422, "top_k"),
}


@pytest.mark.parametrize("case", PREDICT_CASES)
def test_bad_predict(served, case: str) -> None:
    client, pid, _ = served
    body, status, needle = PREDICT_CASES[case]
    r = client.post(f"/v1/paths/{pid}/predict", json=body)
    assert r.status_code == status, r.text
    assert needle in r.json()["detail"]
    assert client.post(f"/v1/paths/{pid}/predict", json={"inputs": [{"image": png_b64()}]}).status_code == 200


def _npy(arr) -> bytes:
    import numpy as np

    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=True)
    return buf.getvalue()


def _npy_cases() -> dict[str, tuple[bytes, str]]:
    import numpy as np

    ok = np.zeros((1, 1, 28, 28), np.float32)
    zipped = io.BytesIO()
    np.savez(zipped, x=ok)
    return {
        "not npy": (b"plain bytes", "one .npy array"),
        "npz archive": (zipped.getvalue(), "one .npy array"),
        "pickled objects": (_npy(np.array([{"a": 1}], dtype=object)), "cannot be read"),
        "truncated": (_npy(ok)[:-10], "cannot be read"),
        "no batch axis": (_npy(ok[0]), "expected [N, 1, 28, 28]"),
        "wrong size": (_npy(np.zeros((1, 1, 27, 28), np.float32)), "expected [N, 1, 28, 28]"),
        "empty batch": (_npy(np.zeros((0, 1, 28, 28), np.float32)), "holds 0 inputs"),
        "no values": (_npy(np.zeros((1, 0, 28, 28), np.float32)), "has shape [1, 0, 28, 28]"),
        "float64": (_npy(ok.astype(np.float64)), "float64"),
        "int32": (_npy(ok.astype(np.int32)), "int32"),
        "out of range": (_npy(ok + 2), "[0, 1]"),
        "nan": (_npy(ok * np.nan), "finite"),
    }


@pytest.mark.parametrize("case", list(_npy_cases()))
def test_bad_npy_predict(served, case: str) -> None:
    client, pid, _ = served
    body, needle = _npy_cases()[case]
    r = client.post(f"/v1/paths/{pid}/predict", content=body, headers={"content-type": "application/octet-stream"})
    assert r.status_code == 422, r.text
    assert needle in r.json()["detail"]


def test_a_bad_npy_body_is_refused_for_its_key_or_path_first(served) -> None:
    """The key and the path are checked before the body, whatever serves it (a worker's first
    small .npy predict of a path reads the body before asking the inference process)."""
    client, pid, _ = served
    octet = {"content-type": "application/octet-stream"}
    r = client.post(
        f"/v1/paths/{pid}/predict", content=b"plain bytes", headers={**octet, "authorization": "Bearer nope"}
    )
    assert r.status_code == 401, r.text
    r = client.post(f"/v1/paths/p_{'0' * 32}/predict", content=b"plain bytes", headers=octet)
    assert r.status_code == 404, r.text
    assert client.post(f"/v1/paths/{pid}/predict", content=b"plain bytes", headers=octet).status_code == 422


@pytest.mark.parametrize(("query", "needle"), [("?top_k=0", "at least 1"), ("?top_k=many", "must be an integer")])
def test_bad_npy_top_k(served, query: str, needle: str) -> None:
    import numpy as np

    client, pid, _ = served
    body = _npy(np.zeros((1, 1, 28, 28), np.float32))
    r = client.post(
        f"/v1/paths/{pid}/predict{query}", content=body, headers={"content-type": "application/octet-stream"}
    )
    assert r.status_code == 422 and needle in r.json()["detail"], r.text


def test_oversized_body(served) -> None:
    client, pid, _ = served
    limit = client.app.state.services.settings.max_body_bytes
    r = client.post(
        f"/v1/paths/{pid}/predict", content=b"x" * (limit + 1), headers={"content-type": "application/json"}
    )
    assert r.status_code == 413 and "limit" in r.json()["detail"]


def test_non_zip_upload(app_client: TestClient) -> None:
    before = _counts(app_client)
    r = app_client.post("/v1/datasets", files={"file": ("d.zip", b"plain text, not a zip", "application/zip")})
    assert r.status_code == 400 and "neither" in r.json()["detail"]
    assert _counts(app_client) == before


def test_bad_model_registration(app_client: TestClient) -> None:
    from safetensors.torch import save

    from tests.conftest import tiny_card, tiny_weights

    before = _counts(app_client)
    card = tiny_card("res").model_dump(mode="json")
    other = save(tiny_weights("resnet_s", 10, seed=9))
    r = app_client.post("/v1/zoo/models", data={"card": json.dumps(card)}, files={"weights": ("w.safetensors", other)})
    assert r.status_code == 409 and "exists with digest" in r.json()["detail"]
    vgg = save(tiny_weights("vgg_s", 10))
    card2 = {**card, "id": "res2"}
    r = app_client.post("/v1/zoo/models", data={"card": json.dumps(card2)}, files={"weights": ("w.safetensors", vgg)})
    assert r.status_code == 422 and "do not fit" in r.json()["detail"]
    r = app_client.post("/v1/zoo/models", data={"card": "{"}, files={"weights": ("w", b"x")})
    assert r.status_code == 400
    r = app_client.post(
        "/v1/zoo/models",
        data={"card": json.dumps({**card2, "arch": "nope"})},
        files={"weights": ("w.safetensors", vgg)},
    )
    assert r.status_code == 422 and "unknown architecture" in r.json()["detail"]
    r = app_client.post(
        "/v1/zoo/models", data={"card": json.dumps(card2)}, files={"weights": ("w.pth", b"PK\x03\x04junk")}
    )
    assert r.status_code == 400
    assert _counts(app_client) == before
    assert st_load(app_client.get("/v1/zoo/models/res/weights").content)  # untouched


def test_oversized_chunked_body(served) -> None:
    client, pid, _ = served
    limit = client.app.state.services.settings.max_body_bytes

    def chunks():
        for _ in range(limit // 65536 + 2):
            yield b"x" * 65536

    r = client.post(f"/v1/paths/{pid}/predict", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and "exceeds the limit" in r.json()["detail"]
    assert client.get("/healthz").status_code == 200
