"""A predict's request and response bodies, and its answer as plain data: pydantic and numpy only
(the HTTP workers of `zoo serve` answer predicts with this, without torch or the database's rows)."""

from __future__ import annotations

from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator


class PredictInput(BaseModel):
    model_config = ConfigDict(extra="forbid")
    tensor: list[Any] | None = Field(None, description="C x H x W pixel values in [0, 1] at the base's input size")
    image: str | None = Field(
        None,
        description="base64 PNG or JPEG of any size: converted as the base's card input says "
        "(channels, the shorter side resized to `resize`, the centre `size` x `size` cropped)",
    )

    @model_validator(mode="after")
    def _one(self) -> PredictInput:
        if (self.tensor is None) == (self.image is None):
            raise ValueError("each input needs exactly one of 'tensor' or 'image'")
        return self


class PredictRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    inputs: list[PredictInput] = Field(min_length=1)
    top_k: int = Field(1, ge=1, le=1000)


class Scored(BaseModel):
    label: str
    score: float


class Prediction(Scored):
    top_k: list[Scored]


class PredictResponse(BaseModel):
    path_id: str
    predictions: list[Prediction]


def predictions(path_id: str, labels: tuple[str, ...], probs: np.ndarray, top_k: int) -> dict:
    """The ``PredictResponse`` body as plain data (encoded once, no model round trip on the hot path):
    each input's ``top_k`` best labels, by score (ties: the first label first)."""
    idx = np.argsort(-probs, axis=1, kind="stable")[:, : min(top_k, len(labels))]  # (N, k)
    scores = np.take_along_axis(probs, idx, axis=1)  # (N, k)
    preds = []
    for s_row, i_row in zip(scores.tolist(), idx.tolist(), strict=True):
        top = [{"label": labels[i], "score": s} for s, i in zip(s_row, i_row, strict=True)]
        preds.append({"label": top[0]["label"], "score": top[0]["score"], "top_k": top})
    return {"path_id": path_id, "predictions": preds}
