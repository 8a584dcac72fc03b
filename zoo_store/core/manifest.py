"""A path's manifest: the canonical JSON every ``.zoopath`` bundle carries, and the path ID derived
from it. Pydantic only (no torch): the HTTP workers of `zoo serve` read manifests too."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from zoo_store.core.cards import InputSpec

FORMAT_VERSION = "1"


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


class BaseRef(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    id: str
    digest: str = Field(pattern=r"^[0-9a-f]{64}$")


class TensorInfo(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    dtype: str
    shape: tuple[int, ...]


class Manifest(BaseModel):
    """The schema every bundle's manifest is validated against."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    format: str
    method: str
    bases: tuple[BaseRef, ...] = Field(min_length=1)
    labels: tuple[str, ...] = Field(min_length=1)
    input: InputSpec
    config: dict[str, Any]
    tensors: dict[str, TensorInfo]
    tensor_digest: str = Field(pattern=r"^[0-9a-f]{64}$")


def manifest_json(m: Manifest) -> str:
    return canonical_json(m.model_dump(mode="json"))


def path_id_of(m: Manifest) -> str:
    return "p_" + hashlib.sha256(manifest_json(m).encode()).hexdigest()[:32]


def is_path_id(model_id: str) -> bool:
    """Whether an id names a path rather than a base: paths and bases share the Open Inference
    Protocol's ``/v2/models/{id}``, and never an id: a path's is ``p_`` and hex, a base's has no ``_``
    (``ID_PATTERN``)."""
    return model_id.startswith("p_")
