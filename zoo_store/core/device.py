"""Torch on this process's device: which one ``Settings.device`` names, and the one call that sets
torch's process-wide state for it (made where a process starts using the device)."""

from __future__ import annotations

import os

import torch

from zoo_store.core.settings import Settings


def torch_device(settings: Settings) -> str:
    """``settings.device`` with ``auto`` resolved: CUDA where there is one, else the CPU."""
    return settings.device if settings.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu"


def configure_torch(settings: Settings) -> str:
    """Set torch up for this process's device; returns the device. Called once where a process
    starts using it (the app, a job's process, ``zoo worker``), before CUDA starts: seeded
    compositions repeat exactly (cuBLAS's deterministic workspace) and, on CUDA, float32 is exact."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read when CUDA starts
    device = torch_device(settings)
    if device.startswith("cuda"):
        exact_float32()
    return device


def exact_float32() -> None:
    """float32 on CUDA as on the CPU: no TF32 in convolutions or matmuls. A mixed-path batch runs
    grouped convolutions where each path's own module runs plain ones; with TF32 (cuDNN's default)
    the two differ by 1e-4, beyond the 1e-5 the equality promises (measured on an H100)."""
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
