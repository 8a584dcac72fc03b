"""Built-in datasets: three disjoint splits each, the package's MNIST validation split in use, the
cluttered task made as documented, tasks drawing validation apart from training."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from zoo_store.core.spec import TaskSpec
from zoo_store.datasets.builtin import BUILTINS, _mnist, split_sizes, split_three
from zoo_store.datasets.tasks import VAL_PER_LABEL, make_task
from zoo_store.store.demo import MNIST_INPUT


def _rows(x: np.ndarray) -> set[bytes]:
    return {hashlib.blake2b(r.tobytes(), digest_size=12).digest() for r in x}


@pytest.mark.parametrize("dataset", sorted(BUILTINS))
def test_every_builtin_has_three_disjoint_splits(dataset: str) -> None:
    a = BUILTINS[dataset].make()
    for x, y in ((a.train_x, a.train_y), (a.val_x, a.val_y), (a.test_x, a.test_y)):
        assert len(x) == len(y) > 0 and x.dtype == np.uint8 and x.ndim == 4
        assert set(np.unique(y)) == set(range(len(a.labels)))  # every label in every split
    train, val, test = _rows(a.train_x), _rows(a.val_x), _rows(a.test_x)
    shared = len(train & val) + len(train & test) + len(val & test)
    assert shared <= 0.002 * len(a.train_x), f"{dataset}: {shared} images repeat across splits"


def test_mnist_validation_is_the_package_split() -> None:
    a = _mnist()
    assert (len(a.train_x), len(a.val_x), len(a.test_x)) == (50_000, 10_000, 10_000)


def test_cluttered_digits_are_mnist_over_dimmer_photo_patches() -> None:
    a, m = BUILTINS["mnist-cluttered"].make(), _mnist()
    for x, clean in ((a.train_x, m.train_x), (a.val_x, m.val_x), (a.test_x, m.test_x)):
        assert np.array_equal(np.maximum(x, clean), x)  # the digit drawn on top: never dimmed
        background = x[clean == 0]
        assert background.max() <= round(0.7 * 255) and background.mean() > 20  # a real, dimmed photo
    assert np.array_equal(a.train_y, m.train_y) and np.array_equal(a.test_y, m.test_y)
    assert np.array_equal(BUILTINS["mnist-cluttered"].make().test_x, a.test_x)  # one fixed draw


def test_a_task_holds_validation_apart_from_its_training_draw() -> None:
    arrays = BUILTINS["digits"].make()
    one = make_task(arrays, TaskSpec(dataset="digits", samples_per_label=20), MNIST_INPUT, seed=0)
    two = make_task(arrays, TaskSpec(dataset="digits", samples_per_label=20), MNIST_INPUT, seed=1)
    assert len(one.train_x) == 200 and not np.array_equal(one.train_x.numpy(), two.train_x.numpy())
    assert np.array_equal(one.val_x.numpy(), two.val_x.numpy())  # validation and test do not move with the seed
    assert np.array_equal(one.test_x.numpy(), two.test_x.numpy())
    assert len(one.val_x) == len(arrays.val_y) < 10 * VAL_PER_LABEL
    mnist = make_task(_mnist(), TaskSpec(dataset="mnist", labels=["3", "7"]), MNIST_INPUT, seed=0)
    assert len(mnist.val_x) == 2 * VAL_PER_LABEL and set(mnist.val_y.tolist()) == {0, 1}


@pytest.mark.parametrize("n", [2, 3, 10, 1000])
def test_uploads_split_70_10_20_keeping_earlier_test_images(n: int) -> None:
    """Test images are the ones the earlier 80/20 split held out (the last fifth of the seeded
    permutation), so no path trained before validation existed is measured on its training images."""
    x, y = np.arange(n).reshape(n, 1, 1, 1), np.arange(n) % 2  # each image its own index
    a = split_three(x, y, ("a", "b"), split_sizes(n, 0.1, 0.2))
    assert len(a.train_y) >= 1 and len(a.train_y) + len(a.val_y) + len(a.test_y) == n
    old_test = np.random.default_rng(0).permutation(n)[max(1, round(n * 0.8)) :]
    assert set(a.test_x.flatten().tolist()) == set(x[old_test].flatten().tolist())
    if n == 1000:
        assert (len(a.train_y), len(a.val_y), len(a.test_y)) == (700, 100, 200)


def test_the_cluttered_task_is_listed(app_client) -> None:
    items = app_client.get("/v1/datasets", params={"limit": 100}).json()["items"]
    row = next(d for d in items if d["id"] == "mnist-cluttered")
    assert row["splits"] == {"train": 50_000, "val": 10_000, "test": 10_000} and row["shape"] == [1, 28, 28]


def test_rows_from_before_validation_splits_are_brought_up_to_date(tmp_path) -> None:
    """A database written by the previous release (two splits per row): the next start gives the
    built-in rows this release's description and sizes, and uploads the split they are read with."""
    from sqlalchemy import select

    from zoo_store.store.blobs import DirBlobStore
    from zoo_store.store.db import Database, DatasetRow
    from zoo_store.store.store import Store

    db = Database(f"sqlite:///{tmp_path / 'zoo.db'}")
    db.migrate()
    store = Store(db, DirBlobStore(tmp_path / "blobs"))
    with db.session() as s:
        s.add(
            DatasetRow(
                id="digits",
                name="old",
                source="builtin",
                blob_digest=None,
                labels=list("0123456789"),
                num_samples=1797,
                shape=[1, 28, 28],
                splits={"train": 1257, "test": 540},
            )
        )
        s.add(
            DatasetRow(
                id="ds_old",
                name="mine",
                source="upload",
                blob_digest="0" * 64,
                labels=["a", "b"],
                num_samples=1000,
                shape=[1, 4, 4],
                splits={"train": 800, "test": 200},
            )
        )
    store.ensure_builtin_datasets()
    with db.session() as s:
        rows = {r.id: r for r in s.scalars(select(DatasetRow))}
    assert (
        rows["digits"].splits == {"train": 987, "val": 270, "test": 540}
        and rows["digits"].name == BUILTINS["digits"].name
    )
    assert rows["ds_old"].splits == {"train": 700, "val": 100, "test": 200} and rows["ds_old"].name == "mine"
    assert set(rows) == {*BUILTINS, "ds_old"}
