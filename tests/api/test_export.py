"""Every method's path leaves as one standalone file: ``GET /v1/paths/{id}/export?format=onnx|pt2``.
For each (method, family): the path built on tiny random-weight bases, imported into a server, then
ONNX Runtime on the exported ``.onnx`` and ``torch.export.load`` of the ``.pt2`` give the top-1 and
the probabilities (within 1e-4) that the server's own ``/v1/paths/{id}/predict`` gives."""

from __future__ import annotations

import errno
import io
import json
import os
import threading
from concurrent.futures.process import BrokenProcessPool

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from typer.testing import CliRunner

import service.runtime.exports
from bench.export import build_path
from service import cli
from service.client import ZooClient
from tests.conftest import GRAY, HTTP_WORKERS, make_settings, serving_client, start_app, tiny_weights
from tests.helpers import library_model
from zoo_store.archs import arch_names
from zoo_store.archs.export import Served, export_path
from zoo_store.core.bundle import decode_bundle, encode_bundle, make_manifest
from zoo_store.core.cards import CardIn, InputSpec
from zoo_store.core.errors import InvalidInput, storage_full
from zoo_store.methods import method_names

LABELS = tuple("0123456789")
RGB = InputSpec(channels=3, size=32, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
# the built-in families, and five torchvision ones (at 32 x 32 RGB: the smallest input all five take)
FAMILIES = {a: a for a in arch_names() if not a.startswith("tv_")} | {
    "resnet": "torchvision:resnet18",
    "mobilenet_v2": "torchvision:mobilenet_v2",
    "shufflenet": "torchvision:shufflenet_v2_x0_5",
    "regnet": "torchvision:regnet_x_400mf",
    "mnasnet": "torchvision:mnasnet0_5",
}


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    c = start_app(make_settings(tmp_path_factory.mktemp("export")))
    yield c
    c.__exit__(None, None, None)


def _spec_input(arch: str) -> InputSpec:
    return RGB if ":" in arch else GRAY


def _bases(client, family: str) -> list[tuple]:
    """Bases ``<family>-b`` and ``<family>-s`` (two random-weight nets of the family), registered once."""
    svc, arch = client.app.state.services, FAMILIES[family]
    ids = [f"{family}-{role}".replace("_", "-") for role in "bs"]
    for seed, base_id in enumerate(ids):
        if base_id not in svc.zoo.bases:
            weights = library_model(arch, 10, seed).state_dict() if ":" in arch else tiny_weights(arch, 10, seed=seed)
            card, _ = svc.store.add_base(CardIn(id=base_id, arch=arch, labels=LABELS, input=_spec_input(arch)), weights)
            svc.zoo.add(card)
    return [svc.zoo.bases[i] for i in ids]


def _path(client, method: str, family: str) -> str:
    """The method's path on the family's bases, built here (a few steps on 12 random images) and
    imported into the server: its id."""
    art = build_path(method, *_bases(client, family))
    r = client.post("/v1/paths/import", content=encode_bundle(make_manifest(art), art.tensors, art.metrics))
    assert r.status_code in (200, 201), r.text
    return r.json()["id"]


def _served_probs(client, path_id: str, x: np.ndarray) -> np.ndarray:
    """The server's predict of ``x`` ((N, C, H, W) in [0, 1]): every label's probability, in label order."""
    buf = io.BytesIO()
    np.save(buf, x)
    labels = client.get(f"/v1/paths/{path_id}").json()["labels"]
    r = client.post(
        f"/v1/paths/{path_id}/predict?top_k={len(labels)}",
        content=buf.getvalue(),
        headers={"content-type": "application/octet-stream"},
    )
    assert r.status_code == 200, r.text
    return np.array(
        [[{p["label"]: p["score"] for p in row["top_k"]}[lab] for lab in labels] for row in r.json()["predictions"]]
    )


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("method", method_names())
def test_the_exported_files_predict_what_the_server_predicts(client, method: str, family: str) -> None:
    path_id = _path(client, method, family)
    spec = _spec_input(FAMILIES[family])
    x = np.random.default_rng(1).random((5, spec.channels, spec.size, spec.size), dtype=np.float32)
    served = _served_probs(client, path_id, x)  # (5, K)
    r = client.get(f"/v1/paths/{path_id}/export", params={"format": "onnx"})
    assert r.status_code == 200, r.text
    model = onnx.load_model_from_string(r.content)
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["zoo.path_id"] == path_id
    assert json.loads(meta["zoo.labels"]) == client.get(f"/v1/paths/{path_id}").json()["labels"]
    assert model.opset_import[0].version >= 17
    session = ort.InferenceSession(r.content, providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["input"]
    assert [o.name for o in session.get_outputs()] == ["probabilities"]
    (from_onnx,) = session.run(None, {"input": x})
    pt2 = client.get(f"/v1/paths/{path_id}/export", params={"format": "pt2"})
    assert pt2.status_code == 200, pt2.text
    program = torch.export.load(io.BytesIO(pt2.content))
    from_pt2 = program.module()(torch.from_numpy(x)).detach().numpy()
    for name, probs in (("onnx", from_onnx), ("pt2", from_pt2)):
        assert probs.shape == served.shape, name
        np.testing.assert_allclose(probs, served, atol=1e-4, rtol=0, err_msg=name)
        assert (probs.argmax(1) == served.argmax(1)).all(), name
    # the same file again, from the cache; and another batch size through the dynamic axis
    assert client.get(f"/v1/paths/{path_id}/export", params={"format": "onnx"}).content == r.content
    (one,) = session.run(None, {"input": x[:1]})
    np.testing.assert_allclose(one, served[:1], atol=1e-4, rtol=0)


def test_export_is_audited_cached_and_forgotten_with_the_path(client) -> None:
    path_id = _path(client, "reprogram", "resnet_s")
    assert client.get(f"/v1/paths/{path_id}/export", params={"format": "pt2"}).status_code == 200
    svc = client.app.state.services
    assert (svc.exports.root / f"{path_id}.pt2").exists()
    rows = client.get("/v1/audit", params={"limit": 100}).json()["items"]
    assert any(r["route"] == "/v1/paths/{path_id}/export" and r["target"] == path_id for r in rows), rows
    r = client.get(f"/v1/paths/{path_id}/export", params={"format": "tflite"})
    assert r.status_code == 422 and "format" in r.text
    assert client.delete(f"/v1/paths/{path_id}").status_code == 204
    assert not (svc.exports.root / f"{path_id}.pt2").exists()
    assert client.get(f"/v1/paths/{path_id}/export").status_code == 404


@pytest.mark.parametrize("workers", HTTP_WORKERS, ids=[f"workers{n}" for n in HTTP_WORKERS])
def test_an_export_through_the_http_workers_is_the_same_file(client, request, tmp_path, workers: int) -> None:
    """``zoo serve``'s HTTP workers pass the file through unchanged (a server of its own, the same path)."""
    path_id = _path(client, "clone", "resnet_s")
    expected = client.get(f"/v1/paths/{path_id}/export", params={"format": "onnx"}).content
    other = serving_client(request, workers, tmp_path)
    try:
        svc = other.app.state.services
        for card, net in _bases(client, "resnet_s"):
            svc.store.add_base(CardIn(**{k: getattr(card, k) for k in CardIn.model_fields}), net.state_dict())
            svc.zoo.add(svc.store.card(card.id))
        bundle = client.get(f"/v1/paths/{path_id}/bundle").content
        assert other.post("/v1/paths/import", content=bundle).status_code == 201
        r = other.get(f"/v1/paths/{path_id}/export", params={"format": "onnx"})
        assert r.status_code == 200 and r.content == expected  # the same path, the same bytes, on another server
    finally:
        other.__exit__(None, None, None)


def test_a_full_disk_still_exports_and_keeps_nothing(client, monkeypatch: pytest.MonkeyPatch) -> None:
    path_id = _path(client, "reprogram", "vgg_s")
    svc = client.app.state.services
    svc.exports.forget(path_id)  # the same path as another test's: its files may be there already

    def full(target, data, what: str) -> None:  # what atomic_write raises on a full disk
        raise storage_full(OSError(errno.ENOSPC, "No space left on device"), what)

    monkeypatch.setattr(service.runtime.exports, "atomic_write", full)
    r = client.get(f"/v1/paths/{path_id}/export", params={"format": "pt2"})
    assert r.status_code == 200 and f'filename="{path_id}.pt2"' in r.headers["content-disposition"]
    assert torch.export.load(io.BytesIO(r.content)).module()(torch.rand(1, 1, 28, 28)).shape == (1, 3)
    assert not list(svc.exports.root.glob(f"{path_id}.*"))


def test_the_cli_writes_the_file(client, tmp_path) -> None:
    path_id = _path(client, "resample", "mobilenet_s")

    def make(url: str) -> ZooClient:
        c = ZooClient(url)
        c.http = client
        return c

    out = tmp_path / "m.onnx"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cli, "_client", make)
        res = CliRunner().invoke(cli.app, ["paths", "export", path_id, "--out", str(out)], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    assert f"wrote {out}" in res.output and onnx.load_model(str(out)).graph.input[0].name == "input"


class _DataDependent(torch.nn.Module):
    """A branch on a value computed from the input: no static graph holds it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, 2)
        pooled = x.mean((1, 2, 3))  # (B,)
        if pooled.sum() > 0:
            return torch.stack([pooled, -pooled], 1)
        return torch.stack([-pooled, pooled], 1)


class _Eig(torch.nn.Module):
    """An operator ONNX has no counterpart for."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, 2)
        m = x[:, 0, :2, :2]  # (B, 2, 2)
        return torch.linalg.eigvals(m).real


@pytest.mark.parametrize(
    ("net", "fmt", "says"), [(_DataDependent(), "pt2", "data-dependent"), (_Eig(), "onnx", "aten")]
)
def test_what_an_exporter_cannot_express_is_a_precise_refusal(net: torch.nn.Module, fmt: str, says: str) -> None:
    with pytest.raises(InvalidInput) as e:
        export_path(net, GRAY, ("a", "b"), "p_x", fmt, "myfamily")  # type: ignore[arg-type]
    text = str(e.value)
    assert f"the {fmt} exporter cannot" in text and "myfamily" in text and "\x1b" not in text, text
    assert says in text.lower(), text


def test_served_is_the_predict_arithmetic() -> None:
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 3))
    x = torch.rand(4, 1, 28, 28)
    expected = net((x - 0.5) / 0.5).softmax(-1)
    torch.testing.assert_close(Served(net, GRAY)(x), expected)


def test_a_clone_exports_the_shared_prefix_once(client) -> None:
    """The exported graph of a clone runs each conv of the target once, each kept conv of the
    source after its cut once, and one adapter conv: nothing of the target's prefix twice."""
    path_id = _path(client, "clone", "resnet_s")
    svc = client.app.state.services
    path = client.get(f"/v1/paths/{path_id}").json()
    (target, source), bundle = _bases(client, "resnet_s"), decode_bundle(svc.store.path_bundle(path_id))
    (link,) = bundle.manifest.config["sources"]
    assert bundle.manifest.config["topology"] == "target-prefix" and path["bases"][0]["id"] == target[0].id
    graph = onnx.load_from_string(client.get(f"/v1/paths/{path_id}/export", params={"format": "onnx"}).content).graph
    convs = [n for n in graph.node if n.op_type == "Conv"]
    expected = len(target[1].prefix_convs(target[1].taps[-1].name)) + len(source[1].suffix_convs(link["depth"])) + 1
    assert len(convs) == expected


def test_an_export_beside_a_running_forward_traces_neither(client) -> None:
    """``torch.export`` patches ``nn.Module.__call__`` for a whole process while it traces: a job's or
    a predict's forward in another thread meanwhile must neither break the export (CI saw "Unexpected
    key stages.stage3...") nor run through the tracer itself."""
    path_id = _path(client, "reprogram", "resnet_s")
    client.app.state.services.exports.forget(path_id)
    _, net = _bases(client, "resnet_s")[1]  # a resident base, as a job's training runs one
    x, call = torch.rand(2, GRAY.channels, GRAY.size, GRAY.size), torch.nn.Module.__call__
    traced: list[bool] = []
    stop = threading.Event()

    def forwards() -> None:
        with torch.no_grad():
            while not stop.is_set():
                traced.append(torch.nn.Module.__call__ is not call)
                net(x)

    worker = threading.Thread(target=forwards)
    worker.start()
    try:
        for fmt in ("pt2", "onnx"):
            r = client.get(f"/v1/paths/{path_id}/export", params={"format": fmt})
            assert r.status_code == 200, r.text
    finally:
        stop.set()
        worker.join()
    assert traced and not any(traced), f"{sum(traced)} of {len(traced)} forwards ran through the tracer"


def test_an_export_child_that_died_is_replaced(client) -> None:
    path_id = _path(client, "reprogram", "resnet_s")
    client.app.state.services.exports.forget(path_id)
    child = service.runtime.exports._exporter()
    with pytest.raises(BrokenProcessPool):
        child.submit(os._exit, 1).result()  # killed, as by the kernel's OOM killer
    r = client.get(f"/v1/paths/{path_id}/export", params={"format": "pt2"})
    assert r.status_code == 200, r.text
    assert service.runtime.exports._exporter() is not child
