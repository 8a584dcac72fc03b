"""Connection paths and their portable form, the ``.zoopath`` bundle (one safetensors file).

The manifest (``zoo_store.core.manifest``) is canonical JSON (sorted keys, no spaces) holding the
format version, method, base references, labels, input spec, the method's config, the tensor index
and the digest of the tensor bytes. The path ID is derived from the manifest, so a path keeps its ID
on every server. Here: the tensors, their digest, and the bundle's encoding and decoding.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

import torch
from pydantic import ValidationError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from zoo_store.core.cards import InputSpec
from zoo_store.core.errors import BadRequest, InvalidInput
from zoo_store.core.manifest import (
    FORMAT_VERSION,
    BaseRef,
    Manifest,
    TensorInfo,
    canonical_json,
    manifest_json,
    path_id_of,
)

ALLOWED_DTYPES = {"float32": torch.float32, "float16": torch.float16, "uint8": torch.uint8, "int32": torch.int32}
DTYPE_NAMES = {v: k for k, v in ALLOWED_DTYPES.items()}


@dataclass
class PathArtifact:
    """What a method builds: everything a path stores, before it gets an ID."""

    method: str
    bases: list[BaseRef]
    labels: list[str]
    input: InputSpec
    config: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    metrics: dict[str, Any] = field(default_factory=dict)


def tensor_digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        h.update(canonical_json([name, DTYPE_NAMES[t.dtype], list(t.shape)]).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def make_manifest(art: PathArtifact) -> Manifest:
    for name, t in art.tensors.items():
        if t.dtype not in DTYPE_NAMES:
            raise ValueError(f"tensor {name} has unsupported dtype {t.dtype}")
    return Manifest(
        format=FORMAT_VERSION,
        method=art.method,
        bases=tuple(art.bases),
        labels=tuple(art.labels),
        input=art.input,
        config=json.loads(canonical_json(art.config)),
        tensors={n: TensorInfo(dtype=DTYPE_NAMES[t.dtype], shape=tuple(t.shape)) for n, t in art.tensors.items()},
        tensor_digest=tensor_digest(art.tensors),
    )


def encode_bundle(m: Manifest, tensors: dict[str, torch.Tensor], metrics: dict[str, Any]) -> bytes:
    meta = {"zoopath": FORMAT_VERSION, "manifest": manifest_json(m), "metrics": canonical_json(metrics)}
    cpu = {k: v.detach().to("cpu").contiguous() for k, v in sorted(tensors.items())}
    return st_save(cpu, metadata=meta)


@dataclass
class Bundle:
    id: str
    manifest: Manifest
    tensors: dict[str, torch.Tensor]
    metrics: dict[str, Any]
    data: bytes


def _header(data: bytes) -> dict[str, Any]:
    if len(data) < 8:
        raise BadRequest("bundle is truncated: shorter than the 8-byte safetensors header length")
    n = int.from_bytes(data[:8], "little")
    if n <= 0 or 8 + n > len(data):
        raise BadRequest(f"bundle is truncated: header claims {n} bytes, file has {len(data) - 8}")
    try:
        header = json.loads(data[8 : 8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BadRequest(f"bundle header is not valid JSON: {e}") from e
    if not isinstance(header, dict):
        raise BadRequest("bundle header is not a JSON object")
    ends = [v.get("data_offsets", [0, 0])[1] for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)]
    if 8 + n + max(ends, default=0) != len(data):
        raise BadRequest(
            f"bundle is truncated or padded: tensors need {max(ends, default=0)} bytes, file has {len(data) - 8 - n}"
        )
    return header


def decode_bundle(data: bytes) -> Bundle:
    """Parse and self-check a bundle: format, manifest schema, tensor index and digest."""
    manifest, tensors, metrics = _parse(data)
    if tensor_digest(tensors) != manifest.tensor_digest:
        raise InvalidInput("bundle tensor bytes do not match the manifest's tensor_digest (altered or corrupted)")
    return Bundle(path_id_of(manifest), manifest, tensors, metrics, data)


def decode_stored(data: bytes, path_id: str) -> Bundle:
    """A bundle read back from this server's own store, where ``decode_bundle`` checked it before it
    was saved: the header parsed once, the tensors views of one copy of its bytes, the index checked,
    the digests not recomputed (the cold predict's path)."""
    header = _header(data)
    meta = header.pop("__metadata__", None) or {}
    try:
        manifest = Manifest.model_validate_json(meta["manifest"])
        metrics = json.loads(meta.get("metrics", "{}"))
        payload = bytearray(data[8 + int.from_bytes(data[:8], "little") :])  # one copy: the tensors are views of it
        tensors = {name: _view(payload, info) for name, info in header.items()}
    except (KeyError, TypeError, ValueError) as e:
        raise BadRequest(f"stored bundle {path_id} cannot be read: {type(e).__name__}: {e}") from e
    _check_index(manifest, tensors)
    return Bundle(path_id, manifest, tensors, metrics, data)


_ST_DTYPES = {"F32": torch.float32, "F16": torch.float16, "U8": torch.uint8, "I32": torch.int32}


def _view(payload: bytearray, info: dict[str, Any]) -> torch.Tensor:
    """One tensor of a safetensors payload, from its header entry: {"dtype", "shape", "data_offsets"}."""
    dtype = _ST_DTYPES[info["dtype"]]
    begin, end = info["data_offsets"]
    count = (end - begin) // dtype.itemsize
    flat = torch.frombuffer(payload, dtype=dtype, count=count, offset=begin) if count else torch.empty(0, dtype=dtype)
    return flat.view(info["shape"])


def _parse(data: bytes) -> tuple[Manifest, dict[str, torch.Tensor], dict[str, Any]]:
    meta = _header(data).get("__metadata__") or {}
    if meta.get("zoopath") != FORMAT_VERSION:
        raise BadRequest(f"not a .zoopath bundle of format {FORMAT_VERSION} (metadata zoopath={meta.get('zoopath')!r})")
    try:
        raw_manifest = json.loads(meta["manifest"])
        metrics = json.loads(meta.get("metrics", "{}"))
    except (KeyError, TypeError, json.JSONDecodeError) as e:
        raise BadRequest(f"bundle manifest is missing or not JSON: {e}") from e
    try:
        manifest = Manifest.model_validate(raw_manifest)
    except ValidationError as e:
        raise InvalidInput(f"bundle manifest does not match the schema: {_first_error(e)}") from e
    if manifest.format != FORMAT_VERSION:
        raise InvalidInput(f"unsupported bundle format {manifest.format!r}")
    try:
        tensors = st_load(data)
    except Exception as e:
        raise BadRequest(f"bundle tensors cannot be read: {e}") from e
    _check_index(manifest, tensors)
    if not isinstance(metrics, dict):
        raise BadRequest("bundle metrics must be a JSON object")
    return manifest, tensors, metrics


def _check_index(m: Manifest, tensors: dict[str, torch.Tensor]) -> None:
    if set(tensors) != set(m.tensors):
        missing, extra = sorted(set(m.tensors) - set(tensors)), sorted(set(tensors) - set(m.tensors))
        raise InvalidInput(f"bundle tensors differ from its manifest: missing {missing}, unexpected {extra}")
    for name, info in m.tensors.items():
        t = tensors[name]
        if DTYPE_NAMES.get(t.dtype) != info.dtype or tuple(t.shape) != tuple(info.shape):
            raise InvalidInput(
                f"tensor {name!r} is {DTYPE_NAMES.get(t.dtype, str(t.dtype))}{list(t.shape)}, "
                f"manifest says {info.dtype}{list(info.shape)}"
            )


def check_expected(m: Manifest, expected: dict[str, tuple[str, tuple[int, ...]]]) -> None:
    """Every tensor's name, dtype and shape against what the method expects for these bases."""
    got = {n: (i.dtype, tuple(i.shape)) for n, i in m.tensors.items()}
    missing, extra = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
    if missing or extra:
        raise InvalidInput(
            f"path tensors do not fit method {m.method!r}: missing {missing[:5]}, unexpected {extra[:5]}"
        )
    for name, (dtype, shape) in expected.items():
        if got[name] != (dtype, tuple(shape)):
            raise InvalidInput(
                f"tensor {name!r} is {got[name][0]}{list(got[name][1])}, method {m.method!r} expects "
                f"{dtype}{list(shape)}"
            )


def _first_error(e: ValidationError) -> str:
    err = e.errors()[0]
    return f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}"
