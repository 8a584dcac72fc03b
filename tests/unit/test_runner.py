"""The job runner without the app: what ``run_job`` stores."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from service.common.metrics import Metrics
from service.jobs.queues import MemoryQueue
from service.jobs.runner import JobRunner, run_job
from tests.conftest import tiny_card, tiny_weights
from tests.helpers import reprogram_spec
from zoo_store.core import bundle as bundle_module
from zoo_store.core.settings import Settings
from zoo_store.store.blobs import DirBlobStore
from zoo_store.store.db import Database
from zoo_store.store.store import Store


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    db = Database(f"sqlite:///{tmp_path / 'zoo.db'}")
    db.migrate()
    store = Store(db, DirBlobStore(tmp_path / "blobs"))
    store.ensure_builtin_datasets()
    store.add_base(tiny_card("res"), tiny_weights("resnet_s", 10))
    yield store
    db.dispose()


def test_run_job_hashes_and_encodes_the_bundle_once(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """The tensors are hashed once (for the manifest), not again by decoding the bytes just encoded;
    the stored bundle is a valid one, with the job's path id."""
    hashed = []
    digest = bundle_module.tensor_digest
    monkeypatch.setattr(bundle_module, "tensor_digest", lambda t: hashed.append(1) or digest(t))
    job = store.create_job(reprogram_spec())
    run_job(store, job.id, None, "cpu")
    done = store.job(job.id)
    assert done.state == "succeeded", done.error
    assert len(hashed) == 1
    monkeypatch.undo()
    data = store.path_bundle(done.path_id)
    assert bundle_module.decode_bundle(data).id == done.path_id and done.metrics["bytes"] == len(data)
    assert store.path(done.path_id).metrics == {k: v for k, v in done.metrics.items() if k != "bytes"}


def test_submit_stores_the_job_and_queues_it(store: Store, tmp_path: Path) -> None:
    queue = MemoryQueue()
    runner = JobRunner(Settings(data_dir=tmp_path), store, queue, Metrics())
    row = runner.submit(reprogram_spec(), "a")
    assert (store.job(row.id).state, store.job(row.id).tenant) == ("queued", "a")
    assert queue.get(timeout=1)[1] == row.id
