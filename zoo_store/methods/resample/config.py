"""What a resample path stores in its JSON config, and the budget a spec asks for."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator


class ResampleBudget(BaseModel):
    """Exactly one of: the fraction of channels kept in every group, or a parameter budget."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    width: float | None = Field(None, gt=0, le=1, description="the fraction of channels kept in every group")
    max_params: int | None = Field(None, ge=1, description="or: the most parameters the resampled network has")

    @model_validator(mode="after")
    def _one(self) -> ResampleBudget:
        if (self.width is None) == (self.max_params is None):
            raise ValueError("give exactly one of budget.width (0 < width <= 1) and budget.max_params")
        return self


class ResampleConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    base: str
    widths: dict[str, int]  # channel group -> channels kept (n')
    tuned: bool = False  # True: non-uniform cells per group in tensors "grid.<group>"
