"""A small httpx client for the zoo API; the CLI uses it and it doubles as the Python SDK."""

from __future__ import annotations

import base64
import contextlib
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

import httpx

from zoo_store.core.manifest import is_path_id


class ApiError(Exception):
    def __init__(self, status: int, problem: dict[str, Any]):
        self.status, self.problem = status, problem
        super().__init__(f"{status} {problem.get('title', '')}: {problem.get('detail', '')}")


@contextmanager
def _reachable(base_url: object) -> Iterator[None]:
    """A server that cannot be reached is an ApiError (status 0) with a one-line reason, not a trace."""
    try:
        yield
    except httpx.TransportError as e:
        raise ApiError(
            0, {"title": "Unreachable", "detail": f"cannot reach {base_url}: {e or type(e).__name__}"}
        ) from e


def default_key(base_url: str) -> str | None:
    """``ZOO_API_KEY``; else, for a server on this machine, the admin key it wrote on first start
    (``ZOO_DATA_DIR/admin.key``, ``./data/admin.key`` by default)."""
    if os.environ.get("ZOO_API_KEY"):
        return os.environ["ZOO_API_KEY"].strip()
    if httpx.URL(base_url).host in ("127.0.0.1", "localhost", "::1"):
        path = Path(os.environ.get("ZOO_DATA_DIR", "./data")) / "admin.key"
        with contextlib.suppress(OSError):
            return path.read_text().strip() or None
    return None


class ZooClient:
    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8000",
        *,
        api_key: str | None = None,
        transport: httpx.BaseTransport | None = None,
        timeout: float = 60.0,
    ):
        """``api_key``: the bearer key of every request (default: ``default_key``)."""
        key = api_key if api_key is not None else default_key(base_url)
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.http = httpx.Client(base_url=base_url, transport=transport, timeout=timeout, headers=headers)

    def close(self) -> None:
        self.http.close()

    def _call(self, method: str, url: str, **kw: Any) -> httpx.Response:
        with _reachable(self.http.base_url):
            r = self.http.request(method, url, **kw)
        if r.status_code >= 400:
            try:
                body = r.json()
            except ValueError:
                body = {"detail": r.text}
            raise ApiError(r.status_code, body)
        return r

    def _items(self, url: str, params: dict[str, str] | None = None) -> list[dict]:
        items, cursor = [], None
        while True:
            page = self._call("GET", url, params={**(params or {}), **({"cursor": cursor} if cursor else {})}).json()
            items += page["items"]
            cursor = page["next_cursor"]
            if not cursor:
                return items

    # zoo
    def models(self) -> list[dict]:
        return self._items("/v1/zoo/models")

    def model(self, model_id: str) -> dict:
        return self._call("GET", f"/v1/zoo/models/{model_id}").json()

    def model_weights(self, model_id: str) -> bytes:
        return self._call("GET", f"/v1/zoo/models/{model_id}/weights").content

    def add_model(
        self, card: dict, weights: bytes | BinaryIO, filename: str = "weights.safetensors"
    ) -> tuple[dict, bool]:
        """The base, and whether the server created it (False: it held these exact weights already).
        ``weights`` may be an open file: it is streamed, not read into memory (a real network is GBs)."""
        files = {"weights": (filename, weights, "application/octet-stream")}
        r = self._call("POST", "/v1/zoo/models", data={"card": json.dumps(card)}, files=files)
        return r.json(), r.status_code == 201

    def add_pretrained(self, name: str) -> tuple[dict, bool]:
        """Register a packaged ImageNet-pretrained base by name (the server needs the ``pretrained``
        extra); the base, and whether the server created it (False: it was registered already)."""
        r = self._call("POST", "/v1/zoo/models/pretrained", json={"name": name})
        return r.json(), r.status_code == 201

    # datasets
    def datasets(self) -> list[dict]:
        return self._items("/v1/datasets")

    def add_dataset(self, path: Path, name: str | None = None) -> dict:
        files = {"file": (path.name, path.read_bytes(), "application/octet-stream")}
        return self._call("POST", "/v1/datasets", files=files, data={"name": name} if name else {}).json()

    # compositions and jobs
    def compose(self, spec: dict) -> dict:
        return self._call("POST", "/v1/compositions", json=spec).json()

    def jobs(self, state: str | None = None) -> list[dict]:
        return self._items("/v1/jobs", {"state": state} if state else None)

    def job(self, job_id: str) -> dict:
        return self._call("GET", f"/v1/jobs/{job_id}").json()

    def cancel(self, job_id: str) -> dict:
        """Ask a queued or running job to stop; the job as it is then."""
        return self._call("POST", f"/v1/jobs/{job_id}/cancel").json()

    def delete_job(self, job_id: str) -> None:
        """Delete a job (cancelled first if it still runs); the path it made stays."""
        self._call("DELETE", f"/v1/jobs/{job_id}")

    def events(self, job_id: str) -> Iterator[dict]:
        """The job's server-sent events, each a job dict, until it ends."""
        with _reachable(self.http.base_url), self.http.stream("GET", f"/v1/jobs/{job_id}/events", timeout=None) as r:
            if r.status_code >= 400:
                r.read()
                raise ApiError(r.status_code, r.json())
            event = None
            for line in r.iter_lines():
                if line.startswith("event: "):
                    event = line[7:]
                elif line.startswith("data: ") and event == "job":
                    yield json.loads(line[6:])

    # paths
    def paths(self) -> list[dict]:
        return self._items("/v1/paths")

    def path(self, path_id: str) -> dict:
        return self._call("GET", f"/v1/paths/{path_id}").json()

    def delete_path(self, path_id: str) -> None:
        self._call("DELETE", f"/v1/paths/{path_id}")

    def share_path(self, path_id: str, public: bool = False, tenants: list[str] | None = None) -> dict:
        return self._call(
            "PUT", f"/v1/paths/{path_id}/sharing", json={"public": public, "tenants": tenants or []}
        ).json()

    # keys (admins)
    def create_key(self, tenant: str, admin: bool = False, expires_in_days: int | None = None) -> dict:
        body = {"tenant": tenant, "admin": admin, "expires_in_days": expires_in_days}
        return self._call("POST", "/v1/keys", json=body).json()

    def sign_in_token(self) -> dict:
        """A one-time token that signs a browser in at ``<server>/#token=<token>`` (15 minutes)."""
        return self._call("POST", "/v1/keys/sign-in").json()

    def keys(self) -> list[dict]:
        return self._items("/v1/keys")

    def revoke_key(self, key_id: str) -> dict:
        return self._call("DELETE", f"/v1/keys/{key_id}").json()

    def bundle(self, path_id: str) -> bytes:
        return self._call("GET", f"/v1/paths/{path_id}/bundle").content

    def network(self, path_id: str) -> bytes:
        """A resample path as a standalone network (safetensors); load it with zoo_store.archs.standalone."""
        return self._call("GET", f"/v1/paths/{path_id}/network").content

    def export(self, path_id: str, fmt: str) -> bytes:
        """A path as one standalone file (``onnx`` or ``pt2``), for runtimes without this project."""
        return self._call("GET", f"/v1/paths/{path_id}/export", params={"format": fmt}).content

    def import_bundle(self, data: bytes) -> tuple[dict, bool]:
        """The path, and whether the server created it (False: it held this path already)."""
        r = self._call("POST", "/v1/paths/import", content=data, headers={"content-type": "application/octet-stream"})
        return r.json(), r.status_code == 201

    def predict(self, path_id: str, inputs: list[dict], top_k: int = 1) -> dict:
        """A path's predict, or a base's by itself when ``path_id`` is a base's id (``is_path_id``)."""
        route = f"/v1/paths/{path_id}" if is_path_id(path_id) else f"/v1/zoo/models/{path_id}"
        return self._call("POST", f"{route}/predict", json={"inputs": inputs, "top_k": top_k}).json()

    def predict_images(self, path_id: str, images: list[Path], top_k: int = 1) -> dict:
        inputs = [{"image": base64.b64encode(p.read_bytes()).decode()} for p in images]
        return self.predict(path_id, inputs, top_k)
