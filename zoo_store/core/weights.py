"""Canonical weight files: a state dict <-> safetensors bytes, and the SHA-256 that names a base."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import torch
from safetensors.torch import load as st_load
from safetensors.torch import load_file as st_load_file
from safetensors.torch import save as st_save
from torch import nn

from zoo_store.core.errors import BadRequest, InvalidInput
from zoo_store.core.keystore import sha256


def canonical_bytes(module_or_state: nn.Module | dict[str, torch.Tensor]) -> bytes:
    state = module_or_state.state_dict() if isinstance(module_or_state, nn.Module) else module_or_state
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in sorted(state.items())}
    return st_save(tensors)


def digest_of(module: nn.Module) -> str:
    return sha256(canonical_bytes(module))


def read_weights(data: bytes | Path) -> dict[str, torch.Tensor]:
    """Parse a user's weights file (its bytes, or a file read in place, memory-mapped): safetensors,
    or a torch zip loaded with weights_only=True (never unpickled otherwise)."""
    if isinstance(data, Path):
        if data.stat().st_size == 0:
            raise BadRequest("weights file is empty")
        source, is_zip = str(data), zipfile.is_zipfile(data)
    else:
        if not data:
            raise BadRequest("weights file is empty")
        source, is_zip = io.BytesIO(data), zipfile.is_zipfile(io.BytesIO(data))
    if is_zip:
        try:
            state = torch.load(source, map_location="cpu", weights_only=True, mmap=isinstance(data, Path))
        except Exception as e:  # any failure of the restricted loader is bad input
            raise BadRequest(f"weights file is not a loadable weights-only torch file: {e}") from e
        if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
            state = state["state_dict"]
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise BadRequest("torch weights file must hold a flat dict of tensors (a state dict)")
        return dict(state)
    try:
        return st_load_file(data) if isinstance(data, Path) else st_load(data)
    except Exception as e:  # SafetensorError, or a header that is not JSON
        raise BadRequest(f"weights file is neither safetensors nor a torch zip: {e}") from e


def load_into(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load a state dict strictly, answering InvalidInput with the exact key/shape mismatch."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    extra = sorted(set(state) - set(own))
    if missing or extra:
        raise InvalidInput(
            f"weights do not fit the architecture: missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {extra[:5]}{'...' if len(extra) > 5 else ''}"
        )
    for k, v in own.items():
        if tuple(state[k].shape) != tuple(v.shape):
            raise InvalidInput(f"weight {k!r} has shape {tuple(state[k].shape)}, expected {tuple(v.shape)}")
        if state[k].dtype != v.dtype and not (state[k].is_floating_point() and v.is_floating_point()):
            raise InvalidInput(f"weight {k!r} has dtype {state[k].dtype}, expected {v.dtype}")
    module.load_state_dict({k: state[k].to(own[k].dtype) for k in own}, strict=True)
