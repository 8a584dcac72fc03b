"""The task spec users POST to /v1/compositions; each method reads the fields it needs."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SourceSpec(_Strict):
    model: str = Field(description="a base that knows the labels")
    labels: list[str] = Field(min_length=1, description="the labels cloned from it")


class TaskSpec(_Strict):
    dataset: str = Field(description="the task's images (GET /v1/datasets)")
    labels: list[str] | None = Field(None, min_length=2, description="the task's labels (default: the dataset's)")
    samples_per_label: int | None = Field(
        None, ge=1, le=100_000, description="training images per label (default: all)"
    )


class TrainSpec(_Strict):
    epochs: int = Field(3, ge=1, le=200, description="passes over the training images")
    seed: int = Field(0, description="draws the training images and the initialization")
    lr: float = Field(1e-2, gt=0, le=1, description="learning rate")
    batch_size: int = Field(64, ge=1, le=4096, description="images per step")
    steps: int | None = Field(
        None, ge=0, le=100_000, description="steps, for what tunes on a few batches (resample; clone's masks)"
    )


class CompositionSpec(_Strict):
    method: str
    base: str | None = Field(None, description="the base network (clone: the target) (GET /v1/zoo/models)")
    sources: list[SourceSpec] | None = Field(None, description="where each missing label comes from (default: chosen)")
    models: list[str] | None = Field(None, description="the pool of bases (default: every compatible one)")
    task: TaskSpec | None = None
    budget: dict[str, Any] = Field(default_factory=dict)
    blocks: int | None = Field(None, ge=2, le=8, description="K: the blocks each network is cut into (default 3)")
    train: TrainSpec = Field(default_factory=TrainSpec)
    # the method's own options, checked by the method (reprogram: {"bn": true}); methods without any refuse them
    options: dict[str, Any] = Field(default_factory=dict)
