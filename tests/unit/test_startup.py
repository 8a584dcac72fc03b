"""Start-up is safe when processes start together: migrations take turns and the built-in rows
are inserted once, on SQLite and on PostgreSQL."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from sqlalchemy import func, select

from zoo_store.datasets.builtin import BUILTINS
from zoo_store.store.blobs import DirBlobStore
from zoo_store.store.db import Database, DatasetRow
from zoo_store.store.store import Store


def _start(url: str, blobs: Path) -> None:
    db = Database(url)  # each "process" its own engine and connections
    try:
        db.migrate()
        Store(db, DirBlobStore(blobs)).ensure_builtin_datasets()
    finally:
        db.dispose()


def test_four_starts_at_once(db_url: str, tmp_path: Path) -> None:
    for name in BUILTINS:  # loaded before the race, so the starts overlap where it matters
        BUILTINS[name].make()
    with ThreadPoolExecutor(4) as pool:
        for f in [pool.submit(_start, db_url, tmp_path / f"blobs{i}") for i in range(4)]:
            f.result()  # raises what a start raised
    db = Database(db_url)
    with db.session() as s:
        assert s.scalar(select(func.count()).select_from(DatasetRow)) == len(BUILTINS)
    db.dispose()


def test_exclusive_is_one_holder_at_a_time(db_url: str) -> None:
    """What the migrations and the demo zoo's build take: holders on separate engines never overlap."""
    import threading
    import time

    inside, overlaps = [0], []
    lock = threading.Lock()

    def hold() -> None:
        db = Database(db_url)
        try:
            with db.exclusive(0x5A00_00FF):
                with lock:
                    inside[0] += 1
                    overlaps.append(inside[0])
                time.sleep(0.05)
                with lock:
                    inside[0] -= 1
        finally:
            db.dispose()

    with ThreadPoolExecutor(4) as pool:
        for f in [pool.submit(hold) for _ in range(4)]:
            f.result()
    assert overlaps == [1, 1, 1, 1]
