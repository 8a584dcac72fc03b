"""The supervisor and the HTTP workers of `zoo serve` import no torch (nor torchvision, nor the
database's models): they stay small, and start fast; only the inference process holds the device."""

from __future__ import annotations

import subprocess
import sys

HEAVY = ("torch", "torchvision", "sqlalchemy")
CHECK = f"""
import sys
import service.cli, service.serve.front, service.serve.supervisor
from service.serve.front import create_front_app
from zoo_store.core.settings import Settings

create_front_app(Settings(ipc_dir="/nonexistent", demo_zoo=False))  # what a worker builds at its start
heavy = sorted({{m.split(".")[0] for m in sys.modules}} & set({HEAVY!r}))
assert not heavy, f"imported {{heavy}}"
"""


def test_the_supervisor_and_the_http_workers_import_no_torch() -> None:
    out = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
