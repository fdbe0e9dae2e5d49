"""What the Python API takes where it asks for a config or a tensor: the pydantic model
itself or a dict of its fields (validated as a recipe's section is), and a tensor or a
NumPy array (taken as it is, its type checked where it is used)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar

import numpy as np
import torch
from pydantic import BaseModel

from .errors import ConfigError, DataError

Config = TypeVar("Config", bound=BaseModel)


def as_config(value: Config | Mapping[str, Any], cls: type[Config], where: str) -> Config:
    """``value`` as a ``cls``: itself, or a dict of its fields validated (a pydantic
    ``ValidationError`` names a bad field); anything else is a ``ConfigError`` naming
    ``where`` (the function and argument) and what to give."""
    if isinstance(value, cls):
        return value
    if isinstance(value, Mapping):
        return cls.model_validate(dict(value))
    raise ConfigError(f"{where}: takes a surgery.{cls.__name__} or a dict of its fields; got "
                      f"{type(value).__name__}.")


def as_tensor(value: Any, where: str) -> torch.Tensor:
    """``value`` as a tensor: itself, or a NumPy array's data (not copied); anything else is
    a ``DataError`` naming ``where``."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value)
    raise DataError(f"{where}: takes a torch tensor or a NumPy array; got {type(value).__name__}.")
