"""What a reprogram path stores in its JSON config."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class ReprogramConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    base: str
    num_classes: int = Field(ge=2)
    kernel: int = 3  # size of the depthwise reprogramming kernels
