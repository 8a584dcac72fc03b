"""The repository: zoo cards, datasets, jobs and paths over the database and the blob store."""

from __future__ import annotations

import io
import re
import threading
from pathlib import Path
from typing import Any

import numpy as np
import torch
from cachetools import LRUCache, cached
from sqlalchemy import JSON, delete, func, or_, select, text
from sqlalchemy.exc import IntegrityError as SAIntegrityError
from sqlalchemy.orm import Session

from zoo_store.archs import TapNet, build_for
from zoo_store.core.bundle import Bundle
from zoo_store.core.cards import Card, CardIn, TapInfo
from zoo_store.core.errors import Conflict, Forbidden, IntegrityError, InvalidInput, NotFound
from zoo_store.core.keystore import DirKeyStore, KeyStore, MemoryKeyStore, sha256
from zoo_store.core.manifest import Manifest
from zoo_store.core.settings import Settings
from zoo_store.core.weights import canonical_bytes, load_into, read_weights
from zoo_store.datasets.builtin import BUILTINS, Arrays, split_sizes, split_three
from zoo_store.store.blobs import BlobStore, DbBlobStore, DirBlobStore
from zoo_store.store.db import (
    BaseRow,
    Database,
    DatasetRow,
    JobRow,
    PathDeletionRow,
    PathGrantRow,
    PathOwnerRow,
    PathRow,
    new_id,
    page,
)
from zoo_store.training import freeze

UPLOADS_KEPT_BYTES = 128 * 2**20  # the splits of the uploads read last, kept in memory up to this many bytes
TERMINAL = ("succeeded", "failed", "cancelled")
_BUNDLE_OF = text("SELECT bundle FROM paths WHERE id = :id")
_MANIFEST_OF = text("SELECT manifest FROM paths WHERE id = :id").columns(manifest=JSON)


def card_for(card_in: CardIn, net: TapNet, digest: str, nbytes: int) -> Card:
    try:
        card_in.input.check()
    except ValueError as e:
        raise InvalidInput(f"card input: {e}") from e
    if net.num_classes != len(card_in.labels):
        raise InvalidInput(
            f"card has {len(card_in.labels)} labels but the network's head has {net.num_classes} outputs"
        )
    return Card(
        **card_in.model_dump(),
        digest=digest,
        num_params=sum(p.numel() for p in net.parameters()),
        bytes=nbytes,
        taps=tuple(TapInfo(**t.as_dict()) for t in net.taps),
    )


def fits_input(card_in: CardIn) -> None:
    """The architecture takes the card's input: a forward on the meta device (shapes only)."""
    net, spec = build_for(card_in, meta=True), card_in.input
    try:
        net.tap_shapes(spec.channels, spec.size)
    except Exception as e:
        raise InvalidInput(
            f"architecture {card_in.arch!r} cannot take a {spec.channels} x {spec.size} x "
            f"{spec.size} input: {type(e).__name__}: {e}"
        ) from e


class Store:
    def __init__(self, db: Database, blobs: BlobStore, cache: KeyStore | None = None):
        self.db = db
        self.blobs = blobs
        self.cache = cache if cache is not None else MemoryKeyStore()  # derived data methods may reuse
        # an upload's splits by its blob's digest (content-addressed: never stale), least recently read
        # dropped first: the dashboard's samples, strip and evaluation read one upload in a row (an
        # upload larger than the whole budget is read each time)
        kept = LRUCache(maxsize=UPLOADS_KEPT_BYTES, getsizeof=_arrays_bytes)
        self._upload_arrays = cached(kept, lock=threading.Lock())(self._read_upload)

    @classmethod
    def open(cls, settings: Settings, db: Database) -> Store:
        """The Settings' store: blobs in the database or under the data dir; derived caches per process."""
        blobs = DbBlobStore(db) if settings.blobs_in_database else DirBlobStore(settings.blob_dir)
        return cls(db, blobs, DirKeyStore(settings.cache_dir))

    # -- zoo ----------------------------------------------------------------------------------
    def add_base(
        self, card_in: CardIn, weights: bytes | Path | dict[str, torch.Tensor], claimed: dict[str, Any] | None = None
    ) -> tuple[Card, bool]:
        """Register a base; returns (card, created). Same id with another digest is a Conflict, and so
        is a ``claimed`` server-computed field (a card as another server returned it) that these
        weights do not give: checked before anything is written."""
        fits_input(card_in)
        net = build_for(card_in)
        load_into(net, weights if isinstance(weights, dict) else read_weights(weights))
        data = canonical_bytes(net)
        digest = sha256(data)
        card = card_for(card_in, net, digest, len(data))
        computed = card.model_dump(mode="json")
        for field, value in (claimed or {}).items():
            if value != computed[field]:
                raise Conflict(f"card.{field} is {value!r} but these weights give {computed[field]!r}")
        existing = self._base_row(card.id)
        if existing is None:
            self.blobs.put(data)
            try:
                with self.db.session() as s:
                    s.add(BaseRow(id=card.id, digest=digest, arch=card.arch, card=card.model_dump(mode="json")))
                return card, True
            except SAIntegrityError:  # registered at the same moment through another process
                existing = self._base_row(card.id)
                assert existing is not None
        if existing[0] != digest:
            raise Conflict(f"base {card.id!r} exists with digest {existing[0]}, not {digest}")
        return existing[1], False

    def _base_row(self, base_id: str) -> tuple[str, Card] | None:
        with self.db.session() as s:
            row = s.get(BaseRow, base_id)
            return None if row is None else (row.digest, Card.model_validate(row.card))

    def zoo_version(self) -> int:
        """How many bases the zoo has had: bases are never changed or removed, so this only grows,
        and a process whose resident zoo holds fewer has bases to load."""
        with self.db.session() as s:
            return s.scalar(text("SELECT count(*) FROM bases")) or 0

    def card(self, base_id: str) -> Card:
        with self.db.session() as s:
            row = s.get(BaseRow, base_id)
            if row is None:
                raise NotFound(f"no zoo model {base_id!r}")
            return Card.model_validate(row.card)

    def cards(self) -> dict[str, Card]:
        with self.db.session() as s:
            return {r.id: Card.model_validate(r.card) for r in s.scalars(select(BaseRow).order_by(BaseRow.id))}

    def list_cards(self, cursor: str | None, limit: int) -> tuple[list[Card], str | None]:
        with self.db.session() as s:
            rows, nxt = page(s, BaseRow, cursor, limit)
            return [Card.model_validate(r.card) for r in rows], nxt

    def base_weights(self, base_id: str) -> bytes:
        return self.blobs.get(self.card(base_id).digest)

    def load_base(self, card: Card, device: str = "cpu") -> TapNet:
        """Build and load a base from its verified blob: frozen, eval, on ``device``."""
        from safetensors.torch import load as st_load

        net = build_for(card)
        net.load_state_dict(st_load(self.blobs.get(card.digest)), strict=True)
        return freeze(net.to(device))

    # -- datasets -----------------------------------------------------------------------------
    def ensure_builtin_datasets(self) -> None:
        """Register missing built-in datasets; rows written before validation splits existed get
        this release's names and split sizes (uploads: the 70/10/20 split they are now read with)."""
        with self.db.session() as s:
            have = set(s.scalars(select(DatasetRow.id).where(DatasetRow.source == "builtin")))
            for row in s.scalars(select(DatasetRow)):
                if "val" in row.splits:
                    continue
                if row.source == "builtin" and row.id in BUILTINS:
                    b = BUILTINS[row.id]
                    fresh = _dataset_row(row.id, b.name, "builtin", None, b.described())
                    row.name, row.num_samples, row.splits = fresh.name, fresh.num_samples, fresh.splits
                elif row.source == "upload":
                    row.splits = split_sizes(row.num_samples, UPLOAD_VAL, UPLOAD_TEST)
        missing = [b for b in BUILTINS.values() if b.id not in have]
        for b in missing:
            try:
                with self.db.session() as s:
                    s.merge(_dataset_row(b.id, b.name, "builtin", None, b.described()))
            except SAIntegrityError:  # another process starting at the same time inserted the same row
                pass

    def add_dataset(
        self, name: str, x: np.ndarray, y: np.ndarray, labels: list[str], tenant: str | None = None
    ) -> DatasetRow:
        arrays = split_upload(x, y, labels)
        buf = io.BytesIO()
        np.savez(buf, x=x, y=y, labels=np.array(labels, dtype=np.str_))
        digest = self.blobs.put(buf.getvalue())
        with self.db.session() as s:
            row = _dataset_row(new_id("ds"), name, "upload", digest, arrays)
            row.tenant, row.bytes = tenant, x.nbytes + y.nbytes  # what the tenant's quota counts
            s.add(row)
        return row

    def dataset(self, dataset_id: str, visible_to: str | None = None) -> DatasetRow:
        """A dataset ``visible_to`` that tenant (None: to anyone): a built-in one, or one it uploaded
        (an upload from before tenants, with none, is an admin's)."""
        with self.db.session() as s:
            row = s.get(DatasetRow, dataset_id)
            if row is None or (visible_to is not None and row.source != "builtin" and row.tenant != visible_to):
                raise NotFound(f"no dataset {dataset_id!r}")
            return row

    def list_datasets(
        self, cursor: str | None, limit: int, visible_to: str | None = None
    ) -> tuple[list[DatasetRow], str | None]:
        where = () if visible_to is None else (or_(DatasetRow.source == "builtin", DatasetRow.tenant == visible_to),)
        with self.db.session() as s:
            return page(s, DatasetRow, cursor, limit, where)

    def arrays(self, dataset_id: str) -> Arrays:
        row = self.dataset(dataset_id)
        if row.source == "builtin":
            return BUILTINS[row.id].make()
        assert row.blob_digest
        return self._upload_arrays(row.blob_digest)

    def _read_upload(self, digest: str) -> Arrays:
        with np.load(io.BytesIO(self.blobs.get(digest)), allow_pickle=False) as z:
            return split_upload(z["x"], z["y"], [str(v) for v in z["labels"]])

    # -- jobs ---------------------------------------------------------------------------------
    def create_job(self, spec: dict[str, Any], tenant: str | None = None) -> JobRow:
        with self.db.session() as s:
            row = JobRow(
                id=new_id("job"),
                method=spec["method"],
                spec=spec,
                state="queued",
                progress={"fraction": 0.0},
                metrics={},
                tenant=tenant,
            )
            s.add(row)
        return row

    def job(self, job_id: str, visible_to: str | None = None) -> JobRow:
        with self.db.session() as s:
            row = s.get(JobRow, job_id)
            if row is None or (visible_to is not None and row.tenant != visible_to):
                raise NotFound(f"no job {job_id!r}")
            return row

    def list_jobs(
        self, cursor: str | None, limit: int, state: str | None = None, visible_to: str | None = None
    ) -> tuple[list[JobRow], str | None]:
        with self.db.session() as s:
            return page(s, JobRow, cursor, limit, state=state, tenant=visible_to)

    def job_state(self, job_id: str) -> str | None:
        """The job's state; None once it is deleted."""
        with self.db.session() as s:
            return s.scalar(select(JobRow.state).where(JobRow.id == job_id))

    def update_job(self, job_id: str, **fields: Any) -> None:
        """Update a job unless it already ended (a cancelled job stays cancelled) or was deleted."""
        with self.db.session() as s:
            row = s.get(JobRow, job_id, with_for_update=True)
            if row is not None and row.state not in TERMINAL:
                for k, v in fields.items():
                    setattr(row, k, v)

    def cancel_job(self, job_id: str) -> None:
        """Cancel a job unless it already ended or was deleted."""
        with self.db.session() as s:
            row = s.get(JobRow, job_id, with_for_update=True)
            if row is not None and row.state not in TERMINAL:
                row.state, row.cancel_requested = "cancelled", True

    def delete_job(self, job_id: str) -> None:
        """Forget a job (the caller cancels it first if it may still run); the path it made stays."""
        with self.db.session() as s:
            s.execute(delete(JobRow).where(JobRow.id == job_id))

    def finish_job(self, job_id: str, bundle: Bundle, metrics: dict[str, Any]) -> None:
        """Store the path and mark the job succeeded in one transaction (or neither)."""
        with self.db.session() as s:
            row = s.get(JobRow, job_id, with_for_update=True)
            if row is None or row.state in TERMINAL:
                return  # cancelled meanwhile: keep nothing
            if s.get(PathRow, bundle.id) is None:
                s.add(_path_row(bundle))
            if row.tenant is not None:
                _own(s, bundle.id, row.tenant)
            row.state, row.path_id, row.metrics = "succeeded", bundle.id, metrics
            row.progress = {**row.progress, "fraction": 1.0}

    def requeue_job(self, job_id: str) -> None:
        """A running job handed back by its runner (stopping): queued again, its progress from the start."""
        with self.db.session() as s:
            row = s.get(JobRow, job_id, with_for_update=True)
            if row is not None and row.state == "running":
                row.state, row.progress = "queued", {"fraction": 0.0}

    def queued_jobs(self) -> list[str]:
        with self.db.session() as s:
            return list(s.scalars(select(JobRow.id).where(JobRow.state == "queued").order_by(JobRow.id)))

    def fail_stale_jobs(self, reason: str) -> list[str]:
        """Jobs left running by a server that died are failed; queued ones are returned to requeue."""
        with self.db.session() as s:
            for row in s.scalars(select(JobRow).where(JobRow.state == "running")):
                row.state, row.error = "failed", reason
        return self.queued_jobs()

    # -- paths --------------------------------------------------------------------------------
    def save_path(self, bundle: Bundle, tenant: str | None = None) -> tuple[PathRow, bool]:
        """Store a path (once) owned by ``tenant``; created: whether it is new to that tenant (to
        the store when no tenant). Two tenants importing one bundle: two owners of one path."""
        with self.db.session() as s:
            row = s.get(PathRow, bundle.id)
            created = row is None
            if row is None:
                row = _path_row(bundle)
                s.add(row)
            if tenant is not None:
                created = _own(s, bundle.id, tenant)
            return row, created

    def path(self, path_id: str, visible_to: str | None = None) -> PathRow:
        """A path ``visible_to`` that tenant (None: to anyone): one it owns or was granted, or a public one."""
        if not re.fullmatch(r"p_[0-9a-f]{32}", path_id):
            raise NotFound(f"no path {path_id!r}")
        with self.db.session() as s:
            row = s.get(PathRow, path_id)
            if row is None or (visible_to is not None and _role(s, path_id, visible_to) is None):
                raise NotFound(f"no path {path_id!r}")
            return row

    def usage(self, tenant: str) -> dict[str, int]:
        """What the tenant holds: jobs queued or running, paths it owns and their bytes, uploads' bytes."""
        owned = select(PathOwnerRow.path_id).where(PathOwnerRow.tenant == tenant)
        with self.db.session() as s:
            return {
                "jobs": s.scalar(
                    select(func.count())
                    .select_from(JobRow)
                    .where(JobRow.tenant == tenant, JobRow.state.in_(("queued", "running")))
                )
                or 0,
                "paths": s.scalar(select(func.count()).select_from(owned.subquery())) or 0,
                "path_bytes": s.scalar(select(func.sum(PathRow.bytes)).where(PathRow.id.in_(owned))) or 0,
                "dataset_bytes": s.scalar(select(func.sum(DatasetRow.bytes)).where(DatasetRow.tenant == tenant)) or 0,
            }

    def path_exists(self, path_id: str) -> bool:
        """Whether the path is stored (its id only: not its bundle)."""
        with self.db.session() as s:
            return s.scalar(select(PathRow.id).where(PathRow.id == path_id)) is not None

    def role(self, path_id: str, tenant: str) -> str | None:
        """The tenant's role for the path: ``owner``, ``reader`` (granted, or public) or None."""
        with self.db.session() as s:
            return _role(s, path_id, tenant)

    def sharing(self, path_id: str, grantor: str | None) -> dict[str, Any]:
        """The path's owners and the grants of ``grantor`` (None: every owner's)."""
        with self.db.session() as s:
            owners = sorted(s.scalars(select(PathOwnerRow.tenant).where(PathOwnerRow.path_id == path_id)))
            q = select(PathGrantRow.grantee).where(PathGrantRow.path_id == path_id)
            grantees = set(s.scalars(q if grantor is None else q.where(PathGrantRow.grantor == grantor)))
        return {"owners": owners, "public": "*" in grantees, "tenants": sorted(grantees - {"*"})}

    def share(self, path_id: str, grantor: str, public: bool, tenants: list[str]) -> dict[str, Any]:
        """Replace ``grantor``'s grants of the path: every tenant (public) and/or the named ones.
        The caller checks that the grantor owns it (or is an admin)."""
        with self.db.session() as s:
            s.execute(delete(PathGrantRow).where(PathGrantRow.path_id == path_id, PathGrantRow.grantor == grantor))
            for grantee in sorted({*tenants, *(["*"] if public else [])} - {grantor}):
                s.add(PathGrantRow(path_id=path_id, grantor=grantor, grantee=grantee))
        return self.sharing(path_id, grantor)

    def path_bundle(self, path_id: str) -> bytes:
        """Only the ``.zoopath`` bytes of a path (what serving needs; one column, no JSON decoding)."""
        return self._path_column(_BUNDLE_OF, path_id)

    def path_manifest(self, path_id: str) -> Manifest:
        """Only the manifest of a path (what a question about it needs; no tensor bytes read)."""
        return Manifest.model_validate(self._path_column(_MANIFEST_OF, path_id))

    def _path_column(self, query, path_id: str):
        if not re.fullmatch(r"p_[0-9a-f]{32}", path_id):
            raise NotFound(f"no path {path_id!r}")
        with self.db.engine.connect() as c:  # text(): a fraction of select()'s cost, on the cold predict's path
            value = c.execute(query, {"id": path_id}).scalar()
        if value is None:
            raise NotFound(f"no path {path_id!r}")
        return value

    def list_paths(
        self, cursor: str | None, limit: int, visible_to: str | None = None
    ) -> tuple[list[PathRow], str | None]:
        where = () if visible_to is None else (PathRow.id.in_(_visible(visible_to)),)
        with self.db.session() as s:
            return page(s, PathRow, cursor, limit, where)

    def delete_path(self, path_id: str, by: str | None = None) -> bool:
        """``by`` an owner: it owns the path no more (and its grants go), and the path is deleted
        with its last owner (True). ``by`` None (an admin): deleted for every owner. A reader may not."""
        with self.db.session() as s:
            row = s.get(PathRow, path_id, with_for_update=True)  # owners deleting at once take turns
            role = None if row is None or by is None else _role(s, path_id, by)
            if row is None or (by is not None and role is None):
                raise NotFound(f"no path {path_id!r}")
            if by is not None:
                if role != "owner":
                    raise Forbidden(f"only an owner of path {path_id!r} may delete it; {by!r} reads it")
                s.execute(delete(PathOwnerRow).where(PathOwnerRow.path_id == path_id, PathOwnerRow.tenant == by))
                s.execute(delete(PathGrantRow).where(PathGrantRow.path_id == path_id, PathGrantRow.grantor == by))
                if s.scalar(select(PathOwnerRow.tenant).where(PathOwnerRow.path_id == path_id).limit(1)) is not None:
                    return False
            s.execute(delete(PathOwnerRow).where(PathOwnerRow.path_id == path_id))
            s.execute(delete(PathGrantRow).where(PathGrantRow.path_id == path_id))
            s.delete(row)
            s.add(PathDeletionRow(path_id=path_id))  # for the other replicas' caches
            return True

    def deletions_since(self, seq: int | None) -> tuple[int, list[str]]:
        """Paths deleted after deletion ``seq`` (None: none, just the latest seq) and the latest seq."""
        with self.db.session() as s:
            latest = s.scalar(select(func.max(PathDeletionRow.seq))) or 0
            if seq is None or seq >= latest:
                return latest, []
            q = select(PathDeletionRow.path_id).where(PathDeletionRow.seq > seq, PathDeletionRow.seq <= latest)
            return latest, list(s.scalars(q))


UPLOAD_VAL, UPLOAD_TEST = 0.1, 0.2


def split_upload(x: np.ndarray, y: np.ndarray, labels: list[str]) -> Arrays:
    """A fixed 70/10/20 split (seed 0) of an uploaded dataset into train, validation and test."""
    return split_three(x, y, tuple(labels), split_sizes(len(y), UPLOAD_VAL, UPLOAD_TEST))


def _arrays_bytes(a: Arrays) -> int:
    return sum(v.nbytes for v in vars(a).values() if isinstance(v, np.ndarray))  # the arrays as they are, no copy


def _dataset_row(ds_id: str, name: str, source: str, digest: str | None, a: Arrays) -> DatasetRow:
    return DatasetRow(
        id=ds_id,
        name=name,
        source=source,
        blob_digest=digest,
        labels=list(a.labels),
        num_samples=len(a.train_y) + len(a.val_y) + len(a.test_y),
        shape=list(a.train_x.shape[1:]),
        splits={"train": len(a.train_y), "val": len(a.val_y), "test": len(a.test_y)},
    )


def _own(s: Session, path_id: str, tenant: str) -> bool:
    """Make ``tenant`` an owner of the path; whether it was not one."""
    if s.get(PathOwnerRow, (path_id, tenant)) is not None:
        return False
    s.add(PathOwnerRow(path_id=path_id, tenant=tenant))
    return True


def _visible(tenant: str):
    """The ids of the paths the tenant owns or was granted (or that are public)."""
    owned = select(PathOwnerRow.path_id).where(PathOwnerRow.tenant == tenant)
    return owned.union(select(PathGrantRow.path_id).where(PathGrantRow.grantee.in_((tenant, "*"))))


def _role(s: Session, path_id: str, tenant: str) -> str | None:
    """``owner``, ``reader`` (granted to it, or public) or None."""
    if s.get(PathOwnerRow, (path_id, tenant)) is not None:
        return "owner"
    granted = select(PathGrantRow.grantee).where(
        PathGrantRow.path_id == path_id, PathGrantRow.grantee.in_((tenant, "*"))
    )
    return "reader" if s.scalar(granted.limit(1)) is not None else None


def _path_row(b: Bundle) -> PathRow:
    return PathRow(
        id=b.id,
        method=b.manifest.method,
        manifest=b.manifest.model_dump(mode="json"),
        bundle=b.data,
        bytes=len(b.data),
        dense_bytes=int(b.metrics.get("dense_bytes", 0)),
        metrics=b.metrics,
    )


__all__ = ["TERMINAL", "IntegrityError", "Store"]
