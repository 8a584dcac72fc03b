"""Torch's process-wide state is set by one explicit call, ``configure_torch``: not by importing
the packages, and not by resolving the device."""

from __future__ import annotations

import json
import os
import subprocess
import sys

CHECK = """
import json, os, torch
torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
import zoo_store, service.api.app, service.jobs.runner, service.cli
from zoo_store.core.device import configure_torch, torch_device
from zoo_store.core.settings import Settings

def state():
    return [os.environ.get("CUBLAS_WORKSPACE_CONFIG"), torch.backends.cuda.matmul.allow_tf32,
            torch.backends.cudnn.allow_tf32]

settings = Settings(device="cuda:0")
assert torch_device(settings) == "cuda:0"
before = state()
assert configure_torch(settings) == "cuda:0"  # nothing touches the device itself: no GPU needed
print(json.dumps([before, state()]))
"""


def test_only_configure_torch_changes_torchs_global_state() -> None:
    env = {k: v for k, v in os.environ.items() if k != "CUBLAS_WORKSPACE_CONFIG"}
    out = subprocess.run([sys.executable, "-c", CHECK], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    before, after = json.loads(out.stdout.splitlines()[-1])
    assert before == [None, True, True]  # imported, and the device resolved: nothing changed
    assert after == [":4096:8", False, False]  # deterministic cuBLAS, and float32 exact on CUDA
