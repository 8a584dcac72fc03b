"""Shared test helpers: composing a path through the API and waiting for it."""

from __future__ import annotations

import base64
import io
import time

import numpy as np
import torch
import torchvision
from fastapi.testclient import TestClient
from PIL import Image

SMALL_TASK = {"dataset": "digits", "labels": ["0", "1", "2"], "samples_per_label": 8}


def compose(client: TestClient, spec: dict, timeout: float = 120) -> dict:
    r = client.post("/v1/compositions", json=spec)
    assert r.status_code == 202, r.text
    return wait_job(client, r.json()["id"], timeout)


def wait_job(client: TestClient, job_id: str, timeout: float = 120) -> dict:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job["state"] in ("succeeded", "failed", "cancelled"):
            return job
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} did not end: {job}")


def bundle_roundtrip(client: TestClient, pid: str, body: dict) -> dict:
    """Predict, export the bundle, delete the path, import the bundle: the same id and identical
    predictions. Returns the predictions."""
    before = client.post(f"/v1/paths/{pid}/predict", json=body).json()
    bundle = client.get(f"/v1/paths/{pid}/bundle").content
    assert client.delete(f"/v1/paths/{pid}").status_code == 204
    assert client.post("/v1/paths/import", content=bundle).json()["id"] == pid
    assert client.post(f"/v1/paths/{pid}/predict", json=body).json() == before
    return before


def reprogram_spec(
    base: str = "res", task: dict | None = None, epochs: int = 1, seed: int = 0, options: dict | None = None
) -> dict:
    spec = {"method": "reprogram", "base": base, "task": task or SMALL_TASK, "train": {"epochs": epochs, "seed": seed}}
    return {**spec, "options": options} if options is not None else spec


def tensor_inputs(n: int, seed: int = 0, c: int = 1, size: int = 28) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"tensor": rng.random((c, size, size)).round(4).tolist()} for _ in range(n)]


def png_b64(size: int = 28, mode: str = "L", seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    shape = (size, size) if mode == "L" else (size, size, 3)
    img = Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def library_model(arch: str, num_classes: int, seed: int = 0) -> torch.nn.Module:
    """``timm:NAME`` or ``torchvision:NAME`` as its library builds it, random weights, no tensor left at
    a constant initialisation (a zero BatchNorm scale hides a shuffle; statistics not the identity)."""
    library, _, name = arch.partition(":")
    torch.manual_seed(seed)
    if library == "timm":
        import timm  # the dev extras install it

        model = timm.create_model(name, pretrained=False, num_classes=num_classes).eval()
    else:
        model = torchvision.models.get_model(name, weights=None, num_classes=num_classes).eval()
    with torch.no_grad():
        for key, t in model.state_dict().items():
            if t.is_floating_point():
                t.copy_(torch.rand_like(t) + 0.5 if key.endswith("running_var") else t + 0.05 * torch.randn_like(t))
    return model
