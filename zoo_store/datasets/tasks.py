"""Turning a dataset and a task spec into training/held-out tensors for one base's input."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from zoo_store.core.cards import InputSpec
from zoo_store.core.errors import InvalidInput
from zoo_store.core.images import batch_to_input
from zoo_store.core.spec import TaskSpec
from zoo_store.datasets.builtin import Arrays


@dataclass
class TaskData:
    """A task's images as float tensors in [0, 1] at the base's input size, plus label names.
    Choices (insertion tap, candidate, epochs) are made on validation; test only measures."""

    train_x: torch.Tensor  # (N, C, H, W)
    train_y: torch.Tensor  # (N,)
    test_x: torch.Tensor  # (M, C, H, W)
    test_y: torch.Tensor  # (M,)
    labels: list[str]
    val_x: torch.Tensor  # (V, C, H, W)
    val_y: torch.Tensor  # (V,)


def resolve_labels(known: tuple[str, ...] | list[str], task: TaskSpec) -> list[str]:
    labels = list(task.labels) if task.labels else list(known)
    unknown = [lab for lab in labels if lab not in known]
    if unknown:
        raise InvalidInput(f"task labels {unknown} are not in dataset {task.dataset!r} (labels {list(known)})")
    if len(set(labels)) != len(labels):
        raise InvalidInput(f"task labels repeat: {labels}")
    return labels


def _select(
    x: np.ndarray, y: np.ndarray, keep: list[int], per_label: int | None, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    order = np.random.default_rng(seed).permutation(len(y))
    idx: list[np.ndarray] = []
    for old in keep:
        hits = order[y[order] == old]
        idx.append(hits[:per_label] if per_label else hits)
    sel = np.sort(np.concatenate(idx)) if idx else np.array([], dtype=np.int64)
    remap = {old: new for new, old in enumerate(keep)}
    return x[sel], np.array([remap[int(v)] for v in y[sel]], dtype=np.int64)


def to_input(x: np.ndarray, spec: InputSpec) -> torch.Tensor:
    """uint8 (N, C, H, W) -> float (N, C', S, S) in [0, 1] at the base's channels and size, each image
    converted as an image predict converts it (`zoo_store.core.images`: shorter side, centre crop)."""
    return torch.from_numpy(batch_to_input(np.ascontiguousarray(x), spec))  # (N, C', S, S)


VAL_PER_LABEL = 200  # validation images per label a task holds for its choices (fixed draw, seed 0)


def make_task(arrays: Arrays, task: TaskSpec, spec: InputSpec, seed: int) -> TaskData:
    """Training images drawn by ``seed``; validation (at most VAL_PER_LABEL per label) and test fixed."""
    labels = resolve_labels(arrays.labels, task)
    keep = [arrays.labels.index(lab) for lab in labels]
    tx, ty = _select(arrays.train_x, arrays.train_y, keep, task.samples_per_label, seed)
    vx, vy = _select(arrays.val_x, arrays.val_y, keep, VAL_PER_LABEL, 0)
    sx, sy = _select(arrays.test_x, arrays.test_y, keep, None, 0)
    missing = [labels[i] for i in range(len(keep)) if not (ty == i).any()]
    if missing:
        raise InvalidInput(f"dataset {task.dataset!r} has no training samples for labels {missing}")
    return TaskData(
        to_input(tx, spec),
        torch.from_numpy(ty),
        to_input(sx, spec),
        torch.from_numpy(sy),
        labels,
        to_input(vx, spec),
        torch.from_numpy(vy),
    )
