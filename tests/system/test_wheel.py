"""The wheel as users install it: ``pip install .`` (not editable) into a fresh virtual environment,
then ``zoo serve`` from another directory migrates its database, trains the demo zoo and serves.
The wheel ships the migrations inside the store's package and holds no benchmarks and no tests."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import time
import zipfile
from pathlib import Path

import httpx

from bench.scale import free_port

ROOT = Path(__file__).resolve().parents[2]


def _wheel(out: Path) -> Path:
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out), str(ROOT)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = out.glob("zoo-*.whl")
    return wheel


def _venv(where: Path) -> Path:
    """A fresh environment that reuses this one's installed packages (torch: not reinstalled) through a
    ``.pth`` line; the ``.pth`` files of that folder (this checkout's editable install) are not run."""
    subprocess.run([sys.executable, "-m", "venv", str(where)], check=True, timeout=300)
    site = Path(
        subprocess.run(
            [str(where / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
    )
    (site / "reuse-test-env.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return where / "bin"


def test_the_wheel_holds_the_migrations_and_no_benchmarks_or_tests(tmp_path: Path) -> None:
    names = zipfile.ZipFile(_wheel(tmp_path)).namelist()
    assert not [n for n in names if n.startswith(("bench/", "tests/", "migrations/"))]
    assert "zoo_store/migrations/env.py" in names and "zoo_store/migrations/script.py.mako" in names
    assert [n for n in names if n.startswith("zoo_store/migrations/versions/0001_")]
    assert "service/api/static/index.html" in names


def test_pip_install_dot_then_zoo_serve_from_elsewhere(tmp_path: Path) -> None:
    bin_dir = _venv(tmp_path / "venv")
    subprocess.run(
        [str(bin_dir / "pip"), "install", "-q", "--no-deps", "--no-index", str(_wheel(tmp_path / "dist"))],
        check=True,
        capture_output=True,
        timeout=300,
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = subprocess.run(
        [str(bin_dir / "python"), "-c", "import service, zoo_store; print(service.__file__, zoo_store.__file__)"],
        cwd=elsewhere,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    assert str(ROOT) not in where and str(tmp_path / "venv") in where, where  # the installed copy, not this checkout
    port, data = free_port(), tmp_path / "data"
    env = {**os.environ, "ZOO_DATA_DIR": str(data), "ZOO_DEMO_SAMPLES": "500", "ZOO_HTTP_WORKERS": "1"}
    env.pop("PYTHONPATH", None)
    log = (tmp_path / "serve.log").open("wb")
    proc = subprocess.Popen(
        [str(bin_dir / "zoo"), "serve", "--port", str(port), "--no-access-log"],
        cwd=elsewhere,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            ready = _wait_ready(client, proc, 600)
            assert ready, (tmp_path / "serve.log").read_text(errors="replace")[-3000:]
            assert ready["bases"] >= 1
            client.headers["Authorization"] = f"Bearer {(data / 'admin.key').read_text().strip()}"
            cards = client.get("/v1/zoo/models").json()["items"]
            assert "resnet-mnist" in [c["id"] for c in cards]
    finally:
        proc.terminate()
        proc.wait(60)
    assert (data / "zoo.db").exists()


def _wait_ready(client: httpx.Client, proc: subprocess.Popen, timeout: float) -> dict | None:
    end = time.monotonic() + timeout
    while time.monotonic() < end and proc.poll() is None:
        try:
            r = client.get("/readyz")
            if r.status_code == 200:
                return r.json()
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    return None
