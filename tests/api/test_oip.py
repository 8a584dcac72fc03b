"""The Open Inference Protocol (KServe v2) surface: metadata, readiness, infer with JSON and binary
tensors (FP32 and UINT8), errors as {"error": ...}; and tritonclient.http, unchanged, against a
live `zoo serve`, scoring as /v1/paths/{id}/predict does."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as tritonclient_http
from fastapi.testclient import TestClient
from tritonclient.utils import InferenceServerException

from service.api.oip import HEADER
from tests.helpers import compose, reprogram_spec


def _v1_probs(client, pid: str, pixels: np.ndarray) -> tuple[list[str], np.ndarray]:
    """Top labels and full probabilities (N, K) from /v1 predict (top_k = every label)."""
    inputs = [{"tensor": (p.astype(np.float32) / 255).tolist()} for p in pixels]
    labels = client.get(f"/v1/paths/{pid}").json()["labels"]
    preds = client.post(f"/v1/paths/{pid}/predict", json={"inputs": inputs, "top_k": len(labels)}).json()["predictions"]
    probs = np.array([[next(s["score"] for s in p["top_k"] if s["label"] == lab) for lab in labels] for p in preds])
    return [p["label"] for p in preds], probs


def _pixels(n: int) -> np.ndarray:
    return np.random.default_rng(1).integers(0, 256, (n, 1, 28, 28), dtype=np.uint8)


def test_metadata_readiness_and_json_infer(app_client: TestClient) -> None:
    pid = compose(app_client, reprogram_spec())["path_id"]
    assert app_client.get("/v2/health/live").status_code == 200
    assert app_client.get("/v2/health/ready").status_code == 200
    assert app_client.get(f"/v2/models/{pid}/ready").status_code == 200
    meta = app_client.get(f"/v2/models/{pid}").json()
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 1, 28, 28]}]
    assert [o["name"] for o in meta["outputs"]] == ["probabilities", "label"]
    pixels = _pixels(3)
    top, want = _v1_probs(app_client, pid, pixels)
    for datatype, data in (
        ("UINT8", pixels.reshape(-1).tolist()),
        ("FP32", (pixels / 255).astype(np.float32).tolist()),
    ):
        body = {"id": "r1", "inputs": [{"name": "input", "datatype": datatype, "shape": [3, 1, 28, 28], "data": data}]}
        r = app_client.post(f"/v2/models/{pid}/infer", json=body)
        assert r.status_code == 200, r.text
        out = {o["name"]: o for o in r.json()["outputs"]}
        assert r.json()["id"] == "r1" and out["label"]["data"] == top
        assert out["probabilities"]["shape"] == list(want.shape)
        np.testing.assert_allclose(np.array(out["probabilities"]["data"]).reshape(want.shape), want, atol=1e-6, rtol=0)


def test_binary_infer(app_client: TestClient) -> None:
    pid = compose(app_client, reprogram_spec())["path_id"]
    pixels = _pixels(2)
    top, want = _v1_probs(app_client, pid, pixels)
    raw = pixels.tobytes()
    head = json.dumps(
        {
            "inputs": [
                {
                    "name": "input",
                    "datatype": "UINT8",
                    "shape": [2, 1, 28, 28],
                    "parameters": {"binary_data_size": len(raw)},
                }
            ],
            "outputs": [
                {"name": "probabilities", "parameters": {"binary_data": True}},
                {"name": "label", "parameters": {"binary_data": True}},
            ],
        }
    ).encode()
    r = app_client.post(
        f"/v2/models/{pid}/infer",
        content=head + raw,
        headers={HEADER: str(len(head)), "content-type": "application/octet-stream"},
    )
    assert r.status_code == 200, r.text
    n = int(r.headers[HEADER])
    meta, tail = json.loads(r.content[:n]), r.content[n:]
    sizes = [o["parameters"]["binary_data_size"] for o in meta["outputs"]]
    probs = np.frombuffer(tail[: sizes[0]], dtype="<f4").reshape(meta["outputs"][0]["shape"])
    np.testing.assert_allclose(probs, want, atol=1e-6, rtol=0)
    labels, at = [], sizes[0]
    while at < len(tail):  # BYTES: a 4-byte little-endian length, then the bytes
        k = int.from_bytes(tail[at : at + 4], "little")
        labels.append(tail[at + 4 : at + 4 + k].decode())
        at += 4 + k
    assert labels == top and sum(sizes) == len(tail)


@pytest.mark.parametrize(
    ("body", "header", "status", "says"),
    [
        (b"{not json", None, 400, "not JSON"),
        (b'{"inputs": []}', None, 422, 'one input named "input"'),
        (
            json.dumps(
                {"inputs": [{"name": "input", "datatype": "INT64", "shape": [1, 1, 28, 28], "data": [0]}]}
            ).encode(),
            None,
            422,
            "datatype 'INT64'",
        ),
        (
            json.dumps(
                {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 3, 28, 28], "data": [0]}]}
            ).encode(),
            None,
            422,
            "this model takes [N, 1, 28, 28]",
        ),
        (
            json.dumps(
                {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 3, 28, 28], "data": [0.5] * 2352}]}
            ).encode(),
            None,
            422,
            "input shape [1, 3, 28, 28]; this model takes [N, 1, 28, 28]",
        ),  # C, H, W wrong, alone
        (
            json.dumps(
                {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 0, 28, 28], "data": []}]}
            ).encode(),
            None,
            422,
            "input shape [1, 0, 28, 28]; this model takes [N, 1, 28, 28]",
        ),
        (
            json.dumps(
                {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 1, 28, 28], "data": [0.5] * 10}]}
            ).encode(),
            None,
            422,
            "holds 10 values",
        ),
        (
            json.dumps(
                {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 1, 28, 28], "data": [2.0] * 784}]}
            ).encode(),
            None,
            422,
            "in [0, 1]",
        ),
        (
            json.dumps(
                {
                    "inputs": [
                        {
                            "name": "input",
                            "datatype": "UINT8",
                            "shape": [1, 1, 28, 28],
                            "parameters": {"binary_data_size": 784},
                        }
                    ]
                }
            ).encode()
            + b"\0" * 700,
            "header",
            422,
            "700 bytes follow",
        ),
        (b'{"inputs": []}', "999", 400, "within the body"),
        (b'{"inputs": []}', b"\xb2", 400, "byte count"),  # a superscript two, as latin-1 reads it
        (
            json.dumps(
                {
                    "inputs": [{"name": "input", "datatype": "UINT8", "shape": [1, 1, 28, 28], "data": [0] * 784}],
                    "parameters": [1],
                }
            ).encode(),
            None,
            422,
            '"parameters" of the request',
        ),
        (
            json.dumps(
                {"inputs": [{"name": "input", "datatype": "UINT8", "shape": [1, 1.0, 28, 28], "data": [0] * 784}]}
            ).encode(),
            None,
            422,
            "this model takes",
        ),
        (
            json.dumps(
                {"inputs": [{"name": "input", "datatype": ["FP32"], "shape": [1, 1, 28, 28], "data": [0] * 784}]}
            ).encode(),
            None,
            422,
            "datatype",
        ),
        (
            json.dumps(
                {"inputs": [{"name": "input", "datatype": "UINT8", "shape": [1, 1, 28, 28], "data": [300] * 784}]}
            ).encode(),
            None,
            422,
            "integers in [0, 255]",
        ),
        (
            json.dumps(
                {"inputs": [{"name": "input", "datatype": "UINT8", "shape": [1, 1, 28, 28], "data": ["1"] * 784}]}
            ).encode(),
            None,
            422,
            "not an array of UINT8 numbers",
        ),
        (
            json.dumps(
                {"inputs": [{"name": "input", "datatype": "UINT8", "shape": [1, 1, 28, 28], "data": [0] * 784}]}
            ).encode()
            + b"\0\0",
            "header",
            422,
            "declares no binary_data_size",
        ),
        (
            json.dumps(
                {
                    "inputs": [{"name": "input", "datatype": "UINT8", "shape": [1, 1, 28, 28], "data": [0] * 784}],
                    "outputs": [{"name": "logits"}],
                }
            ).encode(),
            None,
            422,
            "requested outputs",
        ),
    ],
)
def test_bad_infer_requests_are_4xx_with_the_protocols_error_body(
    app_client: TestClient, body: bytes, header: str | bytes | None, status: int, says: str
) -> None:
    pid = compose(app_client, reprogram_spec())["path_id"]
    headers = {}
    if header == "header":
        headers[HEADER] = str(body.rindex(b"}") + 1)
    elif header is not None:
        headers[HEADER] = header
    r = app_client.post(f"/v2/models/{pid}/infer", content=body, headers=headers)
    assert r.status_code == status and says in r.json()["error"], r.text
    assert app_client.get("/v2/models/p_" + "0" * 32).json() == {"error": "no path 'p_" + "0" * 32 + "'"}


def test_the_key_and_the_path_are_checked_before_the_body(app_client: TestClient) -> None:
    """Whatever serves it (an HTTP worker reads a small body of a path it has not described before
    it asks the inference process), a bad key is a 401 and an unknown path a 404 before the body's 400."""
    pid = compose(app_client, reprogram_spec())["path_id"]
    nope = {"authorization": "Bearer nope"}
    r = app_client.post(f"/v2/models/{pid}/infer", content=b"{not json", headers=nope)
    assert r.status_code == 401 and "unknown, revoked or expired" in r.json()["error"], r.text
    r = app_client.post(f"/v2/models/p_{'0' * 32}/infer", content=b"{not json")
    assert r.status_code == 404 and r.json() == {"error": f"no path 'p_{'0' * 32}'"}, r.text
    r = app_client.post(f"/v2/models/{pid}/infer", content=b"{not json")
    assert r.status_code == 400 and "not JSON" in r.json()["error"], r.text


def test_tritonclient_against_a_live_server(tmp_path: Path) -> None:
    """tritonclient.http unchanged: the same top labels and probabilities (1e-6) as /v1 predict,
    with JSON tensors and with binary ones."""
    from bench.common import dir_store
    from bench.scale import Server, make_paths
    from tests.conftest import tiny_card, tiny_weights
    from zoo_store.core.bundle import decode_bundle

    store = dir_store(tmp_path)
    store.add_base(tiny_card("res"), tiny_weights("resnet_s", 10))
    pid = store.save_path(decode_bundle(make_paths(store, "res", 1)[0]))[0].id
    server = Server(tmp_path, "mixed", workers=1)
    try:
        pixels = _pixels(4)
        top, want = _v1_probs(server.client, pid, pixels)
        client = tritonclient_http.InferenceServerClient(f"127.0.0.1:{server.port}")
        auth = {"Authorization": f"Bearer {server.key}"}  # tritonclient passes headers through as given
        assert not client.is_model_ready(pid)  # no key: 401
        with pytest.raises(InferenceServerException, match="needs an API key"):
            client.get_model_metadata(pid)
        assert client.is_server_live(headers=auth) and client.is_server_ready(headers=auth)
        assert client.is_model_ready(pid, headers=auth)
        assert client.get_model_metadata(pid, headers=auth)["outputs"][0]["name"] == "probabilities"
        for binary in (False, True):
            x = tritonclient_http.InferInput("input", list(pixels.shape), "UINT8")
            x.set_data_from_numpy(pixels, binary_data=binary)
            outs = [tritonclient_http.InferRequestedOutput(n, binary_data=binary) for n in ("probabilities", "label")]
            result = client.infer(pid, [x], outputs=outs, headers=auth)
            np.testing.assert_allclose(result.as_numpy("probabilities"), want, atol=1e-6, rtol=0)
            got = [v.decode() if isinstance(v, bytes) else str(v) for v in result.as_numpy("label").tolist()]
            assert got == top
        client.close()
    finally:
        server.close()
