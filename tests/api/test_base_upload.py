"""Bases as large as real networks register: the weights file is spooled to disk by the upload and
read from there (memory-mapped), bounded by ZOO_MAX_BASE_BYTES (GBs), not by the 64 MiB of a
dataset upload. torchvision resnet50 with random weights is 94 MiB as a state dict."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
import torchvision
from safetensors.torch import save

from tests.conftest import make_settings, start_app
from zoo_store.core.keystore import sha256
from zoo_store.core.weights import canonical_bytes

RGB = {"channels": 3, "size": 64, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}


@pytest.mark.parametrize("fmt", ["pth", "safetensors"])
def test_a_base_larger_than_an_upload_registers(tmp_path: Path, fmt: str) -> None:
    torch.manual_seed(0)
    state = torchvision.models.resnet50(num_classes=10).state_dict()  # as plain PyTorch saves it
    if fmt == "pth":
        buf = io.BytesIO()
        torch.save(state, buf)
        data = buf.getvalue()
    else:
        data = save({k: v.contiguous() for k, v in state.items()})
    client = start_app(make_settings(tmp_path))
    try:
        assert len(data) > client.app.state.services.settings.max_upload_bytes
        card = {"id": "r50", "arch": "tv_resnet50", "labels": list("0123456789"), "input": RGB}
        r = client.post("/v1/zoo/models", data={"card": json.dumps(card)}, files={"weights": (f"w.{fmt}", data)})
        assert r.status_code == 201, r.text
        assert r.json()["digest"] == sha256(canonical_bytes(state))
        assert not list(tmp_path.glob("upload-*"))  # the spooled copy is gone
    finally:
        client.__exit__(None, None, None)


def test_a_weights_file_over_the_bound_is_413(tmp_path: Path) -> None:
    client = start_app(make_settings(tmp_path, max_base_bytes=2**20))
    try:
        card = {
            "id": "big",
            "arch": "resnet_s",
            "labels": list("0123456789"),
            "input": {"channels": 1, "size": 28, "mean": [0.5], "std": [0.5]},
        }
        r = client.post(
            "/v1/zoo/models", data={"card": json.dumps(card)}, files={"weights": ("w.safetensors", b"\0" * (2**20 + 1))}
        )
        assert r.status_code == 413 and "limit" in r.json()["detail"]
        assert client.get("/v1/zoo/models").json()["items"] == []
    finally:
        client.__exit__(None, None, None)
