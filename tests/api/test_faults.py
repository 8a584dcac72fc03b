"""Faults below the service. A full disk, without filling one: blob writes land on /dev/full (the
write itself fails with ENOSPC), SQLite may not grow past its pages (``max_page_count``: its own
"database or disk is full"), an upload's spooled copy fails with ENOSPC. Dataset uploads, base
uploads and imports answer 507 with a clear message that names no file, the log has one line for
the episode and no traceback, and no temporary file is left behind. A bug's 500 carries no
exception text either, and a job's event stream waits while the database is away instead of
breaking off."""

from __future__ import annotations

import io
import json
import logging
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import save
from sqlalchemy import event, text

from bench.scale import make_paths
from tests.conftest import make_settings, start_app, tiny_card, tiny_weights


@pytest.fixture
def client(tmp_path: Path) -> Iterator:
    client = start_app(make_settings(tmp_path))
    store = client.app.state.services.store
    card, _ = store.add_base(tiny_card("res"), tiny_weights("resnet_s", 10))
    client.app.state.services.zoo.add(card)
    yield client
    client.__exit__(None, None, None)


def _files(root: Path) -> set[str]:
    """Every file under ``root`` but SQLite's own (its WAL grows and shrinks as it likes)."""
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and ".db" not in p.name}


def _full_blob_disk(monkeypatch) -> list[str]:
    """DirBlobStore's temporary files are made as usual, but written through a descriptor of /dev/full."""
    made, real = [], tempfile.mkstemp

    def mkstemp(**kw):
        fd, name = real(**kw)
        made.append(name)
        os.close(fd)
        return os.open("/dev/full", os.O_WRONLY), name

    monkeypatch.setattr("zoo_store.core.keystore.tempfile.mkstemp", mkstemp)
    return made


def _npz(n: int = 12) -> bytes:
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    np.savez(buf, x=rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), y=np.arange(n) % 2)
    return buf.getvalue()


def _assert_507(r, caplog, tmp_path: Path) -> None:
    assert r.status_code == 507, r.text
    body = r.json()
    assert body["title"] == "Insufficient storage" and "storage is full" in body["detail"], body
    assert str(tmp_path) not in r.text and "Errno" not in r.text and "sqlite" not in r.text.lower()
    assert not [rec for rec in caplog.records if rec.exc_info or rec.levelno >= logging.ERROR]  # no traceback


def test_dataset_uploads_on_a_full_disk_are_507_with_one_log_line_and_no_file_left(
    client, tmp_path, monkeypatch, caplog
) -> None:
    before = _files(tmp_path)
    made = _full_blob_disk(monkeypatch)
    with caplog.at_level(logging.WARNING):
        for i in range(5):
            r = client.post("/v1/datasets", files={"file": (f"d{i}.npz", _npz(12 + i))})
            _assert_507(r, caplog, tmp_path)
    assert len(made) == 5 and _files(tmp_path) == before  # every temporary blob file removed
    assert [rec.name for rec in caplog.records] == ["zoo.errors"]  # one line for the episode, not one per request
    assert "No space left on device" in caplog.records[0].getMessage()
    assert [d["source"] for d in client.get("/v1/datasets").json()["items"]].count("upload") == 0
    monkeypatch.undo()  # space again: the same upload goes in
    assert client.post("/v1/datasets", files={"file": ("d.npz", _npz())}).status_code == 201


def test_a_base_upload_on_a_full_disk_is_507_and_leaves_no_file(client, tmp_path, monkeypatch, caplog) -> None:
    before = _files(tmp_path)
    _full_blob_disk(monkeypatch)
    card = tiny_card("res2").model_dump(mode="json")
    with caplog.at_level(logging.WARNING):
        r = client.post(
            "/v1/zoo/models",
            data={"card": json.dumps(card)},
            files={"weights": ("w.safetensors", save(tiny_weights("resnet_s", 10, seed=1)))},
        )
        _assert_507(r, caplog, tmp_path)
    assert _files(tmp_path) == before  # neither the upload's copy (upload-*.weights) nor a blob's temporary file
    assert client.get("/v1/zoo/models/res2").status_code == 404


def test_an_upload_spooled_onto_a_full_disk_is_507(client, tmp_path, monkeypatch, caplog) -> None:
    """The multipart parser's spooled file fails to grow: FastAPI's "error parsing the body" (400) is the disk's 507."""
    from starlette import formparsers

    class Full(tempfile.SpooledTemporaryFile):
        def write(self, s):
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(formparsers, "SpooledTemporaryFile", Full)
    with caplog.at_level(logging.WARNING):
        _assert_507(client.post("/v1/datasets", files={"file": ("d.npz", _npz())}), caplog, tmp_path)


def test_imports_into_a_full_database_are_507_with_no_traceback(client, tmp_path, caplog) -> None:
    svc = client.app.state.services
    bundles = make_paths(svc.store, "res", 3)
    with svc.db.engine.connect() as c:
        pages = c.scalar(text("PRAGMA page_count"))
    event.listen(svc.db.engine, "connect", lambda conn, _: conn.execute(f"PRAGMA max_page_count = {pages}"))
    svc.db.engine.dispose()  # every connection from now on: the file may not grow
    with caplog.at_level(logging.WARNING):
        for bundle in bundles:
            _assert_507(client.post("/v1/paths/import", content=bundle), caplog, tmp_path)
    full = [rec for rec in caplog.records if rec.name == "zoo.db"]
    assert len(full) == 1 and "database or disk is full" in full[0].getMessage()
    assert client.get("/v1/paths").json()["items"] == []


def test_a_bug_is_500_without_its_text_and_logged_with_a_ref(tmp_path, monkeypatch, caplog) -> None:
    from fastapi.testclient import TestClient

    from service.api.app import create_app

    settings = make_settings(tmp_path, auth=False)
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        assert client.app.state.services.ready.wait(60)

        def broken(*a, **kw):
            raise RuntimeError("connection to server at 10.1.2.3, port 5432 failed")

        monkeypatch.setattr(client.app.state.services.store, "list_cards", broken)
        with caplog.at_level(logging.ERROR, "zoo.errors"):
            r = client.get("/v1/zoo/models")
        assert r.status_code == 500 and "10.1.2.3" not in r.text and "RuntimeError" not in r.text, r.text
        ref = r.json()["detail"].split("ref ")[1].split(")")[0]
        logged = [rec for rec in caplog.records if rec.name == "zoo.errors"]
        assert len(logged) == 1 and ref in logged[0].getMessage() and "10.1.2.3" in str(logged[0].exc_info[1])


def test_a_job_event_stream_waits_while_the_database_is_away(client, monkeypatch, caplog) -> None:
    from tests.helpers import SMALL_TASK
    from zoo_store.core.errors import Unavailable

    svc = client.app.state.services
    job = svc.store.create_job({"method": "reprogram", "base": "res", "task": SMALL_TASK}, None)  # no runner takes it
    real, away = svc.store.job, [0]

    def job_or_away(*a, **kw):
        if away[0]:
            away[0] -= 1
            raise Unavailable("the database is unreachable for a moment; retry shortly", retry_after=2)
        return real(*a, **kw)

    monkeypatch.setattr(svc.store, "job", job_or_away)
    events = []
    with caplog.at_level(logging.WARNING), client.stream("GET", f"/v1/jobs/{job.id}/events") as r:
        for line in r.iter_lines():
            if line.startswith("event: "):
                events.append(line.removeprefix("event: "))
                if events == ["job"]:
                    away[0] = 2  # the next two polls find the database away
                    svc.runner.delete(job.id)  # then the job is gone: the stream ends, as it would have
    assert events == ["job", "end"] and away == [0]
    assert not [rec for rec in caplog.records if rec.exc_info]
