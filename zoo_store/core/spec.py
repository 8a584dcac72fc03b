"""The task spec users POST to /v1/compositions; each method reads the fields it needs."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SourceSpec(_Strict):
    model: str
    labels: list[str] = Field(min_length=1)


class TaskSpec(_Strict):
    dataset: str
    labels: list[str] | None = Field(None, min_length=2)
    samples_per_label: int | None = Field(None, ge=1, le=100_000)


class TrainSpec(_Strict):
    epochs: int = Field(3, ge=1, le=200)
    seed: int = 0
    lr: float = Field(1e-2, gt=0, le=1)
    batch_size: int = Field(64, ge=1, le=4096)
    steps: int | None = Field(None, ge=0, le=100_000)  # for methods that tune on a few batches (resample)


class CompositionSpec(_Strict):
    method: str
    base: str | None = None
    sources: list[SourceSpec] | None = None
    models: list[str] | None = None
    task: TaskSpec | None = None
    budget: dict[str, Any] = Field(default_factory=dict)
    blocks: int | None = Field(None, ge=2, le=8)  # K, for methods that cut networks into blocks (reassemble)
    train: TrainSpec = Field(default_factory=TrainSpec)
    # the method's own options, checked by the method (reprogram: {"bn": true}); methods without any refuse them
    options: dict[str, Any] = Field(default_factory=dict)
