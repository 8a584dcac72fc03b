"""Built-in datasets: three disjoint splits each, the package's MNIST validation split in use, the
cluttered task made as documented, tasks drawing validation apart from training."""

from __future__ import annotations

import hashlib
import io

import numpy as np
import pytest
from PIL import Image

from zoo_store.core.spec import TaskSpec
from zoo_store.datasets import synthetic
from zoo_store.datasets.builtin import BUILTINS, _mnist, split_sizes, split_three
from zoo_store.datasets.tasks import VAL_PER_LABEL, make_task
from zoo_store.store.demo import MNIST_INPUT


def _rows(x: np.ndarray) -> set[bytes]:
    return {hashlib.blake2b(r.tobytes(), digest_size=12).digest() for r in x}


@pytest.mark.parametrize("dataset", sorted(BUILTINS))
def test_every_builtin_has_three_disjoint_splits(dataset: str) -> None:
    assert len(BUILTINS[dataset].name) <= 200  # the database's column
    a, described = BUILTINS[dataset].make(), BUILTINS[dataset].described()  # what its row records
    assert described.labels == a.labels and described.train_x.shape[1:] == a.train_x.shape[1:]
    sizes = [(len(d.train_y), len(d.val_y), len(d.test_y)) for d in (a, described)]
    assert sizes[0] == sizes[1]
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


def _digest(a) -> str:
    """sha256 over every split's images and labels, then the label names."""
    h = hashlib.sha256()
    for arr in (a.train_x, a.train_y, a.val_x, a.val_y, a.test_x, a.test_y):
        h.update(np.ascontiguousarray(arr).tobytes())
    h.update("\n".join(a.labels).encode())
    return h.hexdigest()


# (labels, train / validation / test images per label, sha256 of the arrays): a change to how a set
# is drawn changes its digest, so the bases trained on it are retrained knowingly
DRAWN = {
    "letters": (synthetic.LETTERS, (600, 200, 200), "16004394f218a6f41dacf3c5882f013e90bc1f910cd5539582ebb8337fd3f550"),
    "shapes": (synthetic.SHAPES, (800, 200, 200), "885f578d9051db71d7fe70f70f7459592da1d8fd9217eb1e20e42917c0df34e4"),
    "textures": (
        synthetic.TEXTURES,
        (800, 200, 200),
        "4ef017ef25aaa4c41a2b9ef7b0eb050d166161d27c5519e28aa1441b2d51719b",
    ),
    "dots": (synthetic.DOTS, (800, 200, 200), "432fc16a92440860da37848efefebe590883186e7f7a41cb27f75269586b47a1"),
}


@pytest.mark.parametrize("dataset", sorted(DRAWN))
def test_drawn_sets_are_fixed_balanced_and_shaped_like_mnist(dataset: str) -> None:
    labels, per_label, digest = DRAWN[dataset]
    a = BUILTINS[dataset].make()
    assert a.labels == labels and len(set(labels)) == len(labels)
    for (x, y), n in zip(((a.train_x, a.train_y), (a.val_x, a.val_y), (a.test_x, a.test_y)), per_label, strict=True):
        assert x.shape == (n * len(labels), 1, 28, 28) and x.dtype == np.uint8 and y.dtype == np.int64
        assert np.bincount(y, minlength=len(labels)).tolist() == [n] * len(labels)
        assert len(np.unique(y[:50])) > 1  # shuffled: a strip of the first images shows several labels
        assert 10 < x.mean() < 200 and x.std() > 20  # neither blank nor saturated
    assert _digest(a) == digest


def test_cluttered_digits_are_pinned() -> None:
    """MNIST over photo patches is the set of digits on photo backgrounds: pinned like the drawn ones."""
    assert _digest(BUILTINS["mnist-cluttered"].make()) == (
        "03c1a69eceda5dca9354da67275b0113e5ee86b24ed55f24cf6da4e2cc80159e"
    )


def test_drawing_repeats_for_a_seed_and_differs_across_seeds() -> None:
    y = np.arange(60) % len(synthetic.SHAPES)
    for draw in (synthetic.draw_letters, synthetic.draw_shapes, synthetic.draw_textures, synthetic.draw_dots):
        one = draw(y % 9, np.random.default_rng(5))
        assert np.array_equal(one, draw(y % 9, np.random.default_rng(5)))
        assert not np.array_equal(one, draw(y % 9, np.random.default_rng(6)))


def test_grating_labels_name_their_orientation() -> None:
    """The strongest frequency of each test grating (its 2D spectrum's peak) lies within 15 degrees of
    its class's orientation, nearer than any other class's (the drawing jitters by 10; a distractor
    grating or the noise may win in a few): labels and images agree."""
    a = BUILTINS["textures"].make()
    x = a.test_x[:, 0].astype(np.float64)  # (N, 28, 28)
    power = np.abs(np.fft.fft2(x - x.mean(axis=(1, 2), keepdims=True))) ** 2  # (N, 28, 28)
    f = np.fft.fftfreq(28)
    fy, fx = np.meshgrid(f, f, indexing="ij")  # (28, 28) each
    peak = power.reshape(len(x), -1).argmax(axis=1)  # (N,)
    found = np.degrees(np.arctan2(fy.ravel()[peak], fx.ravel()[peak])) % 180  # (N,)
    want = np.array(synthetic.ORIENTATIONS)[a.test_y // len(synthetic.FREQUENCIES)]
    off = np.abs((found - want + 90) % 180 - 90)
    assert (off <= 15).mean() > 0.95, np.round(off[off > 15][:10])


def test_dot_images_brighten_with_the_count() -> None:
    """More dots, more ink: the mean image (less its background) grows with every count."""
    a = BUILTINS["dots"].make()
    x = a.test_x[:, 0].astype(np.float64)
    ink = (x - np.median(x, axis=(1, 2), keepdims=True)).clip(0).sum(axis=(1, 2))  # (N,)
    by_count = [ink[a.test_y == k].mean() for k in range(len(synthetic.DOTS))]
    assert all(lo < hi for lo, hi in zip(by_count, by_count[1:], strict=False)), by_count


def test_the_drawn_sets_are_listed_with_a_sample_strip(app_client) -> None:
    items = {d["id"]: d for d in app_client.get("/v1/datasets", params={"limit": 100}).json()["items"]}
    for dataset, (labels, per_label, _) in DRAWN.items():
        row = items[dataset]
        assert row["labels"] == list(labels) and row["shape"] == [1, 28, 28] and row["source"] == "builtin"
        assert row["splits"] == {s: n * len(labels) for s, n in zip(("train", "val", "test"), per_label, strict=True)}
        r = app_client.get(row["samples"], params={"n": 6})
        assert r.status_code == 200 and r.headers["content-type"] == "image/png"
        img = Image.open(io.BytesIO(r.content))
        assert img.format == "PNG" and img.size == (6 * 28, 28) and img.mode == "L"
        shown = np.asarray(img).reshape(28, 6, 28).transpose(1, 0, 2)  # (6, 28, 28)
        assert np.array_equal(shown, BUILTINS[dataset].make().test_x[:6, 0])


def test_a_union_sets_its_parts_side_by_side() -> None:
    from zoo_store.datasets.builtin import union

    a, letters = BUILTINS["mnist-letters"].make(), BUILTINS["letters"].make()
    assert a.labels == (*_mnist().labels, *letters.labels)
    for y, n in ((a.train_y, 600), (a.val_y, 200), (a.test_y, 200)):
        assert np.bincount(y, minlength=36).tolist() == [n] * 36
    k = a.labels.index("Q")
    want = letters.test_x[np.flatnonzero(letters.test_y == letters.labels.index("Q"))[:200]]
    assert _rows(a.test_x[a.test_y == k]) == _rows(want)
    assert len(np.unique(a.train_y[:50])) > 1  # shuffled together
    with pytest.raises(ValueError, match="labels repeat"):
        union([letters, letters], (1, 1, 1), 0)


def test_an_upload_is_read_from_its_blob_once_while_kept(tmp_path, monkeypatch) -> None:
    """The dashboard's samples, strip and evaluation read one upload in a row: its blob is read and
    split once while its arrays fit the store's byte budget (least recently read dropped first), and
    the arrays are the ones a fresh read gives; an upload over the whole budget is read each time."""
    from zoo_store.store import store as store_module
    from zoo_store.store.blobs import DirBlobStore
    from zoo_store.store.db import Database
    from zoo_store.store.store import Store

    db = Database(f"sqlite:///{tmp_path / 'zoo.db'}")
    db.migrate()
    rng = np.random.default_rng(0)

    def upload(store: Store, n: int):
        x = rng.integers(0, 256, (n, 1, 4, 4), dtype=np.uint8)
        return store.add_dataset(f"u{n}", x, np.arange(n) % 2, ["a", "b"])

    per_upload = 20 * 16 + 20 * 8  # 20 images of 4 x 4 bytes, 20 int64 labels
    monkeypatch.setattr(store_module, "UPLOADS_KEPT_BYTES", 2 * per_upload)  # two of them
    store = Store(db, DirBlobStore(tmp_path / "blobs"))
    rows = [upload(store, 20) for _ in range(3)]
    reads: list[str] = []
    get = store.blobs.get
    monkeypatch.setattr(store.blobs, "get", lambda digest: reads.append(digest) or get(digest))
    first, again = store.arrays(rows[0].id), store.arrays(rows[0].id)
    assert reads == [rows[0].blob_digest]
    fresh = Store(db, DirBlobStore(tmp_path / "blobs")).arrays(rows[0].id)
    for field in ("train_x", "train_y", "val_x", "val_y", "test_x", "test_y"):
        assert getattr(again, field) is getattr(first, field)
        assert np.array_equal(getattr(again, field), getattr(fresh, field))
    for row in rows[1:]:  # a third upload's arrays do not fit beside two: the first is dropped, read again
        store.arrays(row.id)
    store.arrays(rows[0].id)
    assert reads.count(rows[0].blob_digest) == 2
    large = upload(store, 60)
    store.arrays(large.id), store.arrays(large.id)
    assert reads.count(large.blob_digest) == 2
