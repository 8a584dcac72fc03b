"""What a reprogram path stores in its JSON config, and the options a spec may set."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class ReprogramOptions(BaseModel):
    """``spec.options`` of a reprogram spec: ``{"bn": true}`` gives the task its own BatchNorm."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    bn: bool = False  # tune and store each BatchNorm's affine and statistics per task (the reference code does)


class ReprogramConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    base: str
    num_classes: int = Field(ge=2)
    kernel: int = 3  # size of the depthwise reprogramming kernels
    bn: bool = False  # True: tensors "bn.<path>.{weight,bias,running_mean,running_var}" replace the base's

    def stored(self) -> dict:
        """The config as a manifest holds it (``bn`` only when set: paths without it keep their bytes)."""
        return self.model_dump(exclude=None if self.bn else {"bn"})
