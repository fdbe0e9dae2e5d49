"""The ``search:`` recipe section: which recipe fields to search over and how. Kept apart
from the runner (:mod:`surgery.search`) so recipe composition does not import Optuna.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

# The data fields that decide which examples score a trial (its validation split): trials
# that vary one would be ranked on different validation sets.
SCORING_DATA = ("dataset", "path", "valid_size", "n_train", "n_valid", "side", "classes")


def check_scored_alike(path: str) -> None:
    """``ValueError`` for a searched or tuned ``path`` that changes the validation examples."""
    head, _, field = path.partition(".")
    if head == "data" and field.split(".")[0] in SCORING_DATA:
        raise ValueError(f"params[{path!r}]: trials are ranked by their validation error, so all of them need the "
                         f"same validation examples, and {path} changes them; set it in the recipe instead (and "
                         "compare its values by separate runs)")


class ParamRange(BaseModel):
    """``{type: float, low, high, log}`` | ``{type: int, low, high}`` | ``{type: categorical, choices}``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["float", "int", "categorical"] = "float"
    low: float | None = None
    high: float | None = None
    log: bool = False
    choices: list[Any] | None = None

    @model_validator(mode="after")
    def _check(self) -> ParamRange:
        if self.type == "categorical":
            if not self.choices:
                raise ValueError("a categorical parameter needs a non-empty choices list")
        else:
            if self.low is None or self.high is None:
                raise ValueError(f"a {self.type} parameter needs low and high")
            if self.low >= self.high:
                raise ValueError(f"low={self.low} must be below high={self.high}")
            if self.log and self.low <= 0:
                raise ValueError(f"log scale needs low > 0 (got {self.low})")
        return self


class SearchConfig(BaseModel):
    """The ``search:`` recipe section."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    params: dict[str, ParamRange] = Field(min_length=1, description="dotted recipe path -> range")
    trials: int = Field(default=20, ge=1)
    sampler: Literal["tpe", "gp", "random"] = "tpe"
    study: str | None = Field(default=None, description="study name (default: the recipe's name)")
    batch: int = Field(default=1, ge=1, description="trials asked at once and fine-tuned together as a population")

    @model_validator(mode="after")
    def _paths(self) -> SearchConfig:
        for k in self.params:
            if k.split(".")[0] not in ("data", "pretrain", "surgery", "finetune"):
                raise ValueError(f"params[{k!r}]: search paths start with data, pretrain, surgery or finetune")
            check_scored_alike(k)
        return self
