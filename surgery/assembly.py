"""The ``surgery:`` recipe section (sources and a list of ops) and building a graph from it.

Checks that need only the recipe run at load time (pydantic); checks that need the
source files (layer ranges, shape chains) run in :func:`build_graph`, before any
training, and name the op by its index.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator, model_validator

from .configs import problems, require
from .errors import ConfigError, SurgeryError
from .graph import ModelGraph
from .ops import InsertOp, Op, Sources


class MapEntry(BaseModel):
    """Where one foreign tensor goes (``to: <layer>.weight|bias``) and whether to transpose it."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    to: str
    transpose: bool = False


class ForeignSource(BaseModel):
    """A foreign weights file and how its keys map onto ``<layer>.weight|bias``."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    path: str
    map: dict[str, str | MapEntry] = Field(min_length=1)
    transpose: bool = Field(default=False, description="all weights stored visible x hidden")

    @field_validator("map")
    @classmethod
    def _dest(cls, v: dict[str, str | MapEntry]) -> dict[str, str | MapEntry]:
        for k, d in v.items():
            to = d if isinstance(d, str) else d.to
            if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*\.(weight|bias)$", to):
                raise ValueError(f"map[{k!r}] -> {to!r}: destinations are <layer>.weight or <layer>.bias")
        return v

    def mapping(self) -> dict[str, tuple[str, bool]]:
        """Foreign key -> (destination name, transpose)."""
        out = {}
        for k, d in self.map.items():
            if isinstance(d, str):
                out[k] = (d, self.transpose and d.endswith(".weight"))
            else:
                out[k] = (d.to, d.transpose)
        return out


class SurgeryConfig(BaseModel):
    """The ``surgery:`` recipe section."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    sources: dict[str, str | ForeignSource] = Field(
        default_factory=dict,
        description="name -> a layer stack or a (fine-tuned or assembled) model file, path relative to the recipe; "
                    "or {path, map, transpose} for another tool's weights (op: import)")
    ops: list[Op] = Field(min_length=1)

    @model_validator(mode="after")
    def _sources_exist(self) -> SurgeryConfig:
        for i, op in enumerate(self.ops):
            src = getattr(op, "source", None)
            if src is not None and src not in self.sources and src != "pretrained":
                raise ValueError(
                    f"ops[{i}].source: {src!r} is not among sources {sorted(self.sources)} "
                    "(or 'pretrained', the stack this recipe's pretrain section makes)"
                )
        return self


def _sized_from_data(op: Any, input_shape: tuple[int, ...] | None) -> Any:
    """An ``insert`` that starts the graph takes its input size from the data when the
    recipe does not give one."""
    if not isinstance(op, InsertOp) or input_shape is None or op.in_features or op.in_shape:
        return op
    if op.kind == "conv2d":
        return op.model_copy(update={"in_shape": tuple(input_shape)}) if len(input_shape) == 3 else op
    return op.model_copy(update={"in_features": math.prod(input_shape)})


def build_graph(ops: SurgeryConfig | Sequence[Any], sources: Sources | None = None, seed: int = 0,
                input_shape: tuple[int, ...] | None = None) -> ModelGraph:
    """Apply every op in order to an empty graph; any failure names the op by index and kind.
    ``ops``: a ``surgery:`` section, or a list of ops (or of dicts, as a recipe writes them).

    ``input_shape`` (per example, e.g. the data's) sizes an ``insert`` that starts the
    graph without ``in_features``. Shapes may disagree between ops (remove a layer, then
    insert its replacement); the finished graph must validate, and an error then names
    the nodes and shapes.
    """
    require(ops, (SurgeryConfig, list, tuple), "surgery.build_graph(ops, ...)",
            "a list of ops (surgery.TakeOp(...), or dicts as a recipe writes them) or a surgery.SurgeryConfig")
    require(sources or {}, Mapping, "surgery.build_graph(ops, sources)",
            "a dict of source name -> surgery.LayerStack or surgery.ModelGraph")
    op_list = list(ops.ops if isinstance(ops, SurgeryConfig) else ops)
    for i, op in enumerate(op_list):
        if isinstance(op, dict):  # {"op": "take", "source": "rbm"}, as a recipe writes it
            try:
                op_list[i] = TypeAdapter(Op).validate_python(op)
            except ValidationError as e:
                raise ConfigError(f"surgery.build_graph: ops[{i}]: {problems(e)}") from None
        elif not isinstance(op, BaseModel) or not hasattr(op, "apply"):
            raise ConfigError(f"surgery.build_graph: ops[{i}] is a {type(op).__name__}; give an op "
                              "(surgery.TakeOp(...), ...) or a dict as a recipe writes it ({'op': 'take', ...}).")
    g = ModelGraph()
    gen = torch.Generator().manual_seed(seed)
    for i, op in enumerate(op_list):
        if i == 0:
            op = _sized_from_data(op, input_shape)
        try:
            op.apply(g, sources or {}, gen)
        except SurgeryError as e:  # keep the kind (ShapeError, ...), add where it happened
            raise type(e)(f"surgery.ops[{i}] ({op.op}): {e}") from e
        except (ValueError, KeyError, IndexError) as e:
            raise SurgeryError(f"surgery.ops[{i}] ({op.op}): {e}") from e
    try:
        g.validate()
    except SurgeryError as e:
        raise type(e)(f"surgery.ops (the network they build): {e}") from e
    return g
