"""The ``surgery:`` recipe section: sources and a list of operations, each a small pydantic
model (discriminated on ``op``) that calls one ``ModelGraph`` method.

Checks that need only the recipe run at load time (pydantic); checks that need the
source files (layer ranges, shape chains) run in ``build_graph``, before any training,
and name the op by its index.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal, Union

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .errors import SurgeryError
from .graph import ModelGraph, layer_node
from .layers import INIT_SCHEMES, LayerSpec, check_activation
from .stack import LayerStack

NAME = r"^[A-Za-z_][A-Za-z0-9_]*$"


def _check_name(v: str) -> str:
    if not re.match(NAME, v):
        raise ValueError(f"{v!r} is not a valid node name (letters, digits, underscore; not starting with a digit)")
    return v


class _Op(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _range(v: Any) -> Any:
    if isinstance(v, int):
        return (v, v + 1)
    return v


class TakeOp(_Op):
    """Append layers ``[start, stop)`` of a source stack."""

    op: Literal["take"]
    source: str
    layers: tuple[int, int] | None = Field(default=None, description="[start, stop), half-open; default all")
    prefix: str = Field(default="", description="prepended to node names (needed when a source repeats)")

    _norm = field_validator("layers", mode="before")(classmethod(lambda cls, v: _range(v)))

    @field_validator("layers")
    @classmethod
    def _ordered(cls, v: tuple[int, int] | None) -> tuple[int, int] | None:
        if v is not None and not (0 <= v[0] < v[1]):
            raise ValueError(f"layers {list(v)} must be [start, stop) with 0 <= start < stop")
        return v

    def apply(self, g: ModelGraph, sources: dict[str, Any], gen: torch.Generator) -> list[str]:
        stack = _stack(sources, self.source)
        start, stop = self.layers or (0, len(stack))
        return g.take(stack, start, stop, self.source, self.prefix)


class TransplantOp(TakeOp):
    """Put layers of a source after / before / in place of a node."""

    op: Literal["transplant"]  # type: ignore[assignment]
    after: str | None = None
    before: str | None = None
    replacing: str | None = None

    @model_validator(mode="after")
    def _one_place(self) -> TransplantOp:
        given = [k for k in ("after", "before", "replacing") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"transplant needs exactly one of after, before, replacing; got {given or 'none'}")
        return self

    def apply(self, g: ModelGraph, sources: dict[str, Any], gen: torch.Generator) -> list[str]:
        stack = _stack(sources, self.source)
        start, stop = self.layers or (0, len(stack))
        return g.transplant(stack, start, stop, self.source, after=self.after, before=self.before,
                            replacing=self.replacing, prefix=self.prefix)


class InsertOp(_Op):
    """A fresh layer (classic init by default) after or before a node, or at the end.

    ``kind: conv2d`` makes a convolutional layer with ``units`` feature maps; its input
    must be an image (the previous node's output, or ``in_shape`` in an empty graph).
    """

    op: Literal["insert"]
    name: str
    units: int = Field(gt=0)
    activation: str = "sigmoid"
    init: str = "classic"
    after: str | None = None
    before: str | None = None
    in_features: int | None = Field(default=None, gt=0, description="dense, only when the graph is empty")
    kind: Literal["dense", "conv2d"] = "dense"
    in_shape: tuple[int, int, int] | None = Field(default=None, description="conv2d, only when the graph is empty")
    kernel_size: int = Field(default=5, gt=0)
    stride: int = Field(default=1, gt=0)
    padding: int = Field(default=0, ge=0)

    _n = field_validator("name")(classmethod(lambda cls, v: _check_name(v)))
    _a = field_validator("activation")(classmethod(lambda cls, v: check_activation(v)))

    @field_validator("init")
    @classmethod
    def _init(cls, v: str) -> str:
        if v not in INIT_SCHEMES:
            raise ValueError(f"unknown init {v!r}; choose one of {list(INIT_SCHEMES)}")
        return v

    def _input_shape(self, g: ModelGraph) -> tuple[int, ...]:
        if self.before is not None:
            preds = g.inputs_of(self.before)
            return g.shapes()[preds[0]] if preds else tuple(g.input_shape or ())
        if self.after is not None:
            return g.shapes()[self.after]
        if len(g):
            return g.shapes()[g.last()]  # type: ignore[index]
        if self.kind == "conv2d" and self.in_shape is not None:
            return tuple(self.in_shape)
        if self.kind == "dense" and self.in_features is not None:
            return (self.in_features,)
        raise SurgeryError(f"insert into an empty graph needs {'in_shape' if self.kind == 'conv2d' else 'in_features'}.")

    def apply(self, g: ModelGraph, sources: dict[str, Any], gen: torch.Generator) -> list[str]:
        import math

        shape = self._input_shape(g)
        if self.kind == "conv2d":
            if len(shape) != 3:
                raise SurgeryError(f"insert {self.name!r}: a conv2d layer needs image input (C, H, W), got {shape}.")
            spec = LayerSpec(kind="conv2d", in_features=shape[0], out_features=self.units, in_shape=shape,
                             activation=self.activation, kernel_size=self.kernel_size, stride=self.stride,
                             padding=self.padding)
        else:
            spec = LayerSpec(in_features=math.prod(shape), out_features=self.units, activation=self.activation)
        g.insert(self.name, spec, after=self.after, before=self.before, init=self.init, generator=gen)
        return [self.name]


class RemoveOp(_Op):
    op: Literal["remove"]
    node: str

    def apply(self, g: ModelGraph, sources: dict[str, Any], gen: torch.Generator) -> list[str]:
        g.remove(self.node)
        return []


class ReinitOp(_Op):
    op: Literal["reinit"]
    nodes: list[str] = Field(min_length=1)
    init: str = "classic"

    _init = InsertOp._init  # type: ignore[assignment]

    def apply(self, g: ModelGraph, sources: dict[str, Any], gen: torch.Generator) -> list[str]:
        return g.reinit(self.nodes, self.init, gen)


class FreezeOp(_Op):
    """Freeze (or with ``op: unfreeze``, unfreeze) nodes by name or glob."""

    op: Literal["freeze", "unfreeze"]
    nodes: list[str] = Field(min_length=1)

    def apply(self, g: ModelGraph, sources: dict[str, Any], gen: torch.Generator) -> list[str]:
        return g.set_frozen(self.nodes, self.op == "freeze")


class DeepenOp(_Op):
    """Net2DeeperNet: an identity layer after ``after``."""

    op: Literal["deepen"]
    after: str
    name: str | None = None
    activation: str | None = None
    allow_inexact: bool = False

    @field_validator("activation")
    @classmethod
    def _act(cls, v: str | None) -> str | None:
        return None if v is None else check_activation(v)

    def apply(self, g: ModelGraph, sources: dict[str, Any], gen: torch.Generator) -> list[str]:
        return [g.deepen(self.after, self.name, self.activation, self.allow_inexact)]


class WidenOp(_Op):
    """Net2WiderNet: ``node`` grows to ``units`` units, the function unchanged."""

    op: Literal["widen"]
    node: str
    units: int = Field(gt=0)
    noise: float = Field(default=0.0, ge=0, description="symmetry-breaking noise on copied weights (0: exact)")

    def apply(self, g: ModelGraph, sources: dict[str, Any], gen: torch.Generator) -> list[str]:
        return g.widen(self.node, self.units, gen, self.noise)


class HeadOp(_Op):
    """A softmax classifier on top, with optional hidden layers."""

    op: Literal["head"]
    classes: int = Field(ge=2)
    hidden: list[Annotated[int, Field(gt=0)]] = Field(default_factory=list)
    activation: str = "sigmoid"
    name: str = "out"

    _a = field_validator("activation")(classmethod(lambda cls, v: check_activation(v)))
    _n = field_validator("name")(classmethod(lambda cls, v: _check_name(v)))

    def apply(self, g: ModelGraph, sources: dict[str, Any], gen: torch.Generator) -> list[str]:
        return g.head(self.classes, self.hidden, self.activation, gen, name=self.name)


class DropoutOp(_Op):
    op: Literal["dropout"]
    p: float = Field(gt=0, lt=1)
    after: list[str] = Field(min_length=1, description="node names or globs")

    @field_validator("after", mode="before")
    @classmethod
    def _listify(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v

    def apply(self, g: ModelGraph, sources: dict[str, Any], gen: torch.Generator) -> list[str]:
        return g.add_dropout(self.after, self.p)


class ImportOp(_Op):
    """Layers from a foreign weights file: ``layers`` names the destination layers whose
    ``<layer>.weight`` / ``<layer>.bias`` the source's ``map`` provides."""

    op: Literal["import"]
    source: str
    layers: list[str] = Field(min_length=1)
    activation: str = "sigmoid"
    after: str | None = None
    before: str | None = None

    _a = field_validator("activation")(classmethod(lambda cls, v: check_activation(v)))

    def apply(self, g: ModelGraph, sources: dict[str, Any], gen: torch.Generator) -> list[str]:
        src = sources.get(self.source)
        if not isinstance(src, ForeignWeights):
            raise SurgeryError(f"source {self.source!r} is not a foreign file with a map:; import needs one.")
        nodes = []
        for name in self.layers:
            w, b = src.tensors.get(f"{name}.weight"), src.tensors.get(f"{name}.bias")
            if w is None:
                raise SurgeryError(
                    f"source {self.source!r} maps nothing to {name}.weight; its map gives {sorted(src.tensors)}."
                )
            if w.dim() != 2:
                raise SurgeryError(f"{name}.weight from {self.source!r} has shape {tuple(w.shape)}; import takes dense [out, in] weights.")
            if b is None:
                b = torch.zeros(w.shape[0])
            if tuple(b.shape) != (w.shape[0],):
                raise SurgeryError(f"{name}.bias from {self.source!r} has shape {tuple(b.shape)}, weight needs ({w.shape[0]},); map it with transpose: true?")
            spec = LayerSpec(in_features=w.shape[1], out_features=w.shape[0], activation=self.activation)
            nodes.append(layer_node(name, spec, {"weight": w, "bias": b}, {"source": self.source, "import": True}))
        g._place(nodes, self.after, self.before, None)
        g.report.append(f"import from {self.source!r}: loaded {src.report['loaded']}; "
                        f"skipped {src.report['skipped']}; missing {src.report['missing']}")
        return [n.name for n in nodes]


Op = Annotated[
    Union[TakeOp, TransplantOp, InsertOp, RemoveOp, ReinitOp, FreezeOp, DeepenOp, WidenOp, HeadOp,
          DropoutOp, ImportOp],
    Field(discriminator="op"),
]


class MapEntry(BaseModel):
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
        out = {}
        for k, d in self.map.items():
            if isinstance(d, str):
                out[k] = (d, self.transpose and d.endswith(".weight"))
            else:
                out[k] = (d.to, d.transpose)
        return out


class ForeignWeights:
    def __init__(self, tensors: dict[str, torch.Tensor], report: dict[str, list[str]]):
        self.tensors, self.report = tensors, report


class SurgeryConfig(BaseModel):
    """The ``surgery:`` recipe section."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    sources: dict[str, str | ForeignSource] = Field(default_factory=dict)
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


def _stack(sources: dict[str, Any], name: str) -> LayerStack:
    if name not in sources:
        raise SurgeryError(f"source {name!r} is not loaded; known: {sorted(sources)}")
    s = sources[name]
    if not isinstance(s, LayerStack):
        raise SurgeryError(f"source {name!r} is a foreign weights file; use op: import for it.")
    return s


def build_graph(cfg: SurgeryConfig, sources: dict[str, Any], seed: int = 0) -> ModelGraph:
    """Apply every op in order; any failure names the op by index and kind.

    Shapes may disagree between ops (remove a layer, then insert its replacement); the
    finished graph must validate, and an error then names the nodes and shapes.
    """
    g = ModelGraph()
    gen = torch.Generator().manual_seed(seed)
    for i, op in enumerate(cfg.ops):
        try:
            op.apply(g, sources, gen)
        except SurgeryError as e:
            raise SurgeryError(f"surgery.ops[{i}] ({op.op}): {e}") from e
        except (ValueError, KeyError, IndexError) as e:
            raise SurgeryError(f"surgery.ops[{i}] ({op.op}): {e}") from e
    try:
        g.validate()
    except SurgeryError as e:
        raise SurgeryError(f"surgery.ops (the network they build): {e}") from e
    return g
