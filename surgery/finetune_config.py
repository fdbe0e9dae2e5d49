"""The ``finetune:`` recipe section: budget, optimizer, schedules, per-layer settings,
early stopping, checkpoints and device options. Kept apart from the Trainer so that a
reader finds every option in one short file."""

from __future__ import annotations

import math
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from .devices import DeviceName
from .layers import InitName
from .schedules import OptimizerConfig, ScheduleConfig

# the finetune fields keyed by layer name patterns (fnmatch globs: "h*", "h[23]")
LAYER_PATTERN_FIELDS = ("layer_lr", "unfreeze_at", "freeze_at", "dropout")


def _finite_multipliers(v: dict[str, float]) -> dict[str, float]:
    for k, m in v.items():
        if not (m >= 0 and math.isfinite(m)):
            raise ValueError(f"[{k!r}]={m} must be a finite number >= 0")
    return v


def _rates(v: dict[str, float]) -> dict[str, float]:
    for k, p in v.items():
        if not 0 <= p < 1:
            raise ValueError(f"[{k!r}]={p} must be in [0, 1)")
    return v


def _epochs(v: dict[str, int]) -> dict[str, int]:
    for k, e in v.items():
        if e < 0:
            raise ValueError(f"[{k!r}]={e} must be an epoch >= 0")
    return v


class EarlyStopping(BaseModel):
    """Stop after ``patience`` epochs without a validation error ``min_delta`` below the best."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    patience: int = Field(default=5, ge=1)
    min_delta: float = Field(default=0.0, ge=0, description="in error percentage points")


class FinetuneConfig(BaseModel):
    """The ``finetune:`` recipe section."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    epochs: int = Field(default=10, ge=1)
    batch_size: int = Field(default=100, gt=0, description="per process under torchrun")
    device: DeviceName = Field(default="auto", description="auto, cpu, cuda, cuda:N")
    optimizer: OptimizerConfig = OptimizerConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    layer_lr: Annotated[dict[str, float], AfterValidator(_finite_multipliers)] = Field(
        default_factory=dict, description="node name/glob -> lr multiplier")
    unfreeze_at: Annotated[dict[str, int], AfterValidator(_epochs)] = Field(
        default_factory=dict, description="node glob -> epoch it becomes trainable")
    freeze_at: Annotated[dict[str, int], AfterValidator(_epochs)] = Field(
        default_factory=dict, description="node glob -> epoch it stops training")
    init: InitName | None = Field(default=None, description="re-initialise fresh hidden layers: classic, xavier, he, "
                                                            "sparse, torch")
    dropout: Annotated[dict[str, float], AfterValidator(_rates)] = Field(
        default_factory=dict, description="node name/glob -> dropout rate after it")
    input_dropout: float = Field(default=0.0, ge=0, lt=1)
    early_stopping: EarlyStopping | None = None
    checkpoint_every: int = Field(default=0, ge=0, description="epochs between checkpoints; 0: none")
    amp: bool = Field(default=False, description="bf16 autocast (CUDA)")
    cuda_graph: bool | Literal["auto"] = Field(
        default="auto", description="capture the training step as a CUDA graph; auto: on CUDA with any "
        "optimizer but cg, no DDP, no compile and no freeze schedule")
    compile: bool = Field(default=False, description="torch.compile the model")
    progress: bool | None = None

    @model_validator(mode="after")
    def _cg_has_no_rates(self) -> FinetuneConfig:
        # conjugate gradients choose each step by a line search: a rate set here would do nothing
        if self.optimizer.name == "cg":
            if self.schedule.lr is not None or self.schedule.momentum is not None:
                raise ValueError("schedule: optimizer cg chooses each step by a line search and has no lr or "
                                 "momentum to schedule; remove the schedule")
            if self.layer_lr:
                raise ValueError("layer_lr: optimizer cg has no learning rates to scale; remove layer_lr "
                                 "(unfreeze_at/freeze_at still choose what trains)")
        return self
