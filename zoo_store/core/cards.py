"""Base cards: frozen records describing a zoo model, checked against the model they build."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

ID_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,63}$"  # no "_": never a path's id (p_<hex>, ``manifest.is_path_id``)


Interpolation = Literal["nearest", "bilinear", "bicubic"]


class InputSpec(BaseModel):
    """What the network takes, and how an image of any size becomes that (timm's "data config",
    torchvision's weights transforms): the shorter side resized to ``resize`` with ``interpolation``,
    then a centre crop of ``size`` x ``size``, channels converted (grey or RGB), scaled to [0, 1] and
    normalized with ``mean``/``std``. ``resize`` None is ``size``: the whole shorter side is kept.
    `zoo_store.core.images` does all but the normalizing, for image predicts and for compositions on
    datasets of another size or channel count (only 1 and 3 channels take images)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    channels: int = Field(ge=1, le=4)
    size: int = Field(ge=4, le=1024)
    mean: tuple[float, ...]
    std: tuple[float, ...]
    # left out of the JSON at their defaults: a card, manifest or path id of an earlier release stays byte-identical
    resize: int | None = Field(default=None, ge=4, le=2048, exclude_if=lambda v: v is None)
    interpolation: Interpolation = Field(default="bilinear", exclude_if=lambda v: v == "bilinear")

    @field_validator("std")
    @classmethod
    def _positive(cls, v: tuple[float, ...]) -> tuple[float, ...]:
        if any(s <= 0 for s in v):
            raise ValueError("std must be positive")
        return v

    def check(self) -> None:
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ValueError("mean and std need one value per channel")
        if self.resize is not None and self.resize < self.size:
            raise ValueError(f"resize ({self.resize}) must be at least size ({self.size}): the crop is taken from it")

    @property
    def resize_side(self) -> int:
        """The shorter side's length before the centre crop."""
        return self.resize or self.size


class TapInfo(BaseModel):
    model_config = ConfigDict(frozen=True)

    name: str
    channels: int
    stride: int


class CardIn(BaseModel):
    """What a user sends to register a base (the server fills in digest, params, bytes, taps)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    id: str = Field(pattern=ID_PATTERN)
    arch: str
    arch_config: dict[str, Any] = Field(default_factory=dict)
    labels: tuple[str, ...] = Field(min_length=2)
    input: InputSpec
    metrics: dict[str, float] = Field(default_factory=dict)
    description: str = ""


class Card(CardIn):
    digest: str
    num_params: int
    bytes: int
    taps: tuple[TapInfo, ...]
