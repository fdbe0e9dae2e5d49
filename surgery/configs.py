"""What the Python API takes where it asks for a config or a tensor: the pydantic model
itself or a dict of its fields (validated as a recipe's section is), and a tensor or a
NumPy array (taken as it is, its type checked where it is used)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar

import numpy as np
import torch
from pydantic import BaseModel, ValidationError

from .errors import ConfigError, DataError

Config = TypeVar("Config", bound=BaseModel)

# what an API function given the wrong object says to give instead
GRAPH = ("a surgery.ModelGraph (surgery.build_graph(ops, sources) or surgery.load_model(path); a LayerStack has no "
         "head: surgery.build_graph([TakeOp(source='s'), HeadOp(classes=10)], {'s': stack}) makes a network of it)")
DATA = ("a surgery.Dataset (surgery.load_dataset(cfg), or surgery.Dataset(name, train, valid, test) of "
        "surgery.Split(x, y))")


def as_config(value: Config | Mapping[str, Any], cls: type[Config], where: str) -> Config:
    """``value`` as a ``cls``: itself, or a dict of its fields validated; anything else, or
    a dict with a bad field, is a ``ConfigError`` naming ``where`` (the function and
    argument) and the field or what to give."""
    if isinstance(value, cls):
        return value
    if isinstance(value, Mapping):
        try:
            return cls.model_validate(dict(value))
        except ValidationError as e:
            raise ConfigError(f"{where}: {problems(e)}") from None
    raise ConfigError(f"{where}: takes a surgery.{cls.__name__} or a dict of its fields; got "
                      f"{type(value).__name__}.")


def problems(e: ValidationError) -> str:
    """A pydantic error in one line: each bad field's path, what is wrong and the value."""
    def one(err: Any) -> str:
        got = "" if isinstance(err.get("input"), Mapping) else f" (got {err.get('input')!r})"
        msg = err["msg"].removeprefix("Value error, ")  # a validator's own words
        return f"{'.'.join(str(p) for p in err['loc']) or '(top level)'}: {msg}{got}"
    return "; ".join(one(err) for err in e.errors())


def require(value: Any, cls: type | tuple[type, ...], where: str, give: str) -> Any:
    """``value`` when it is a ``cls``; else a ``ConfigError`` naming ``where`` and what to ``give``."""
    if not isinstance(value, cls):
        raise ConfigError(f"{where}: takes {give}; got {type(value).__name__}.")
    return value


def as_tensor(value: Any, where: str) -> torch.Tensor:
    """``value`` as a tensor: itself, or a NumPy array's data (not copied); anything else is
    a ``DataError`` naming ``where``."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value)
    raise DataError(f"{where}: takes a torch tensor or a NumPy array; got {type(value).__name__}.")
