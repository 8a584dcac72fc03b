"""Response and request bodies of the HTTP API (v1); a predict's are in ``service.api.bodies``."""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any, Generic, TypeVar
from urllib.parse import quote

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field

from zoo_store.core.cards import InputSpec
from zoo_store.core.manifest import BaseRef
from zoo_store.store.db import ApiKeyRow, DatasetRow, JobRow, PathRow
from zoo_store.store.tenancy import TENANT

T = TypeVar("T")
# For an int of a strict model: also 3.0 (JSON Schema's "integer" includes it), not "3" or true. Put
# bounds before it in the Annotated (Field(ge=...), WHOLE) so that they reach the JSON schema.
WHOLE = BeforeValidator(lambda v: int(v) if isinstance(v, float) and v.is_integer() else v)
# SQLite drops the zone of stored timestamps; every timestamp the service writes is UTC.
Utc = Annotated[dt.datetime, AfterValidator(lambda v: v if v.tzinfo else v.replace(tzinfo=dt.UTC))]


class Page(BaseModel, Generic[T]):
    items: list[T]
    next_cursor: str | None


class Job(BaseModel):
    id: str
    method: str
    tenant: str | None
    state: str
    spec: dict[str, Any] = Field(description="the task spec as it was posted")
    progress: dict[str, Any]
    metrics: dict[str, Any]
    path_id: str | None
    error: str | None
    created_at: Utc
    updated_at: Utc

    @classmethod
    def of(cls, r: JobRow, curve: bool = True) -> Job:
        """``curve``: with ``progress.curve``, every loss and validation accuracy reported (not in lists)."""
        hidden = ("trace",) if curve else ("trace", "curve")
        progress = {k: v for k, v in r.progress.items() if k not in hidden}
        return cls(
            id=r.id,
            method=r.method,
            tenant=r.tenant,
            state=r.state,
            spec=r.spec,
            progress=progress,
            metrics=r.metrics,
            path_id=r.path_id,
            error=r.error,
            created_at=r.created_at,
            updated_at=r.updated_at,
        )


class Path(BaseModel):
    id: str
    method: str
    bases: list[BaseRef]
    labels: list[str]
    input: InputSpec
    bytes: int
    dense_bytes: int
    metrics: dict[str, Any]
    created_at: Utc

    @classmethod
    def of(cls, r: PathRow) -> Path:
        m = r.manifest
        return cls(
            id=r.id,
            method=r.method,
            bases=m["bases"],
            labels=m["labels"],
            input=m["input"],
            bytes=r.bytes,
            dense_bytes=r.dense_bytes,
            metrics=r.metrics,
            created_at=r.created_at,
        )


class Dataset(BaseModel):
    id: str
    name: str
    source: str
    labels: list[str]
    num_samples: int
    shape: list[int]
    splits: dict[str, int]
    created_at: Utc
    samples: str = Field(description="a PNG strip of its first held-out images (add ?n=1..32; default 8)")

    @classmethod
    def of(cls, r: DatasetRow) -> Dataset:
        return cls(
            id=r.id,
            name=r.name,
            source=r.source,
            labels=r.labels,
            num_samples=r.num_samples,
            shape=r.shape,
            splits=r.splits,
            created_at=r.created_at,
            samples=f"/v1/datasets/{quote(r.id, safe='')}/samples.png",
        )


Tenant = Annotated[str, Field(pattern=f"^{TENANT.pattern}$", description="a tenant's name")]


class SharingIn(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    public: bool = Field(False, description="every tenant may read and predict the path")
    tenants: list[Tenant] = Field(
        default_factory=list, max_length=1000, description="tenants that may read and predict it"
    )


class Sharing(SharingIn):
    owners: list[str]


class KeyIn(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    tenant: Tenant
    admin: bool = False
    expires_in_days: Annotated[int, Field(ge=1, le=3650), WHOLE] | None = Field(
        None, description="the key stops working after this many days (none: never)"
    )


class Key(BaseModel):
    """An API key as listed: never the key itself, nor its hash."""

    id: str
    prefix: str
    tenant: str
    admin: bool
    created_at: Utc
    expires_at: Utc | None
    revoked_at: Utc | None

    @classmethod
    def of(cls, r: ApiKeyRow) -> Key:
        return cls(
            id=r.id,
            prefix=r.prefix,
            tenant=r.tenant,
            admin=r.admin,
            created_at=r.created_at,
            expires_at=r.expires_at,
            revoked_at=r.revoked_at,
        )


class NewKey(Key):
    key: str = Field(description="the API key: shown this once, kept by the server only as a hash")


class Samples(BaseModel):
    labels: list[str] = Field(description="the label of each image of the strip, left to right")
    png: str = Field(description="the strip: the first held-out images side by side")


class Evaluation(BaseModel):
    dataset: str
    labels: list[str] = Field(description="the path's labels: the rows (true) and columns (predicted) of matrix")
    samples: int = Field(description="held-out images of the dataset whose label is one of the path's")
    accuracy: float
    matrix: list[list[int]] = Field(description="matrix[i][j]: images of label i predicted as label j")


class SignIn(BaseModel):
    token: str = Field(description="a one-time sign-in token: the dashboard at /#token=<token> exchanges it")
    expires_at: Utc


class SignInToken(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    token: Annotated[str, Field(max_length=200)]


class Audit(BaseModel):
    id: str
    at: Utc
    key_id: str | None
    tenant: str | None
    method: str
    route: str
    target: str | None
    status: int
