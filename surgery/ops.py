"""Surgery operations: each op is a small frozen pydantic model (discriminated on ``op``)
whose ``apply`` does the whole operation on a ModelGraph; the graph itself only knows
structure. Recipes list ops under ``surgery.ops``; Python calls them directly::

    g = ModelGraph()
    TakeOp(source="rbm", layers=(0, 2)).apply(g, {"rbm": stack})
    HeadOp(classes=10).apply(g)

``apply(graph, sources, generator)`` returns the names of the nodes it made or changed.
Checks that need only the op run at validation (pydantic, naming the field); checks that
need the graph or the sources raise ``SurgeryError``/``ShapeError`` naming the nodes.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Annotated, Any, Literal

import torch
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, model_validator

from .errors import ShapeError, SurgeryError
from .graph import ModelGraph, Node, layer_node
from .layers import IDEMPOTENT_ON_OWN_RANGE, Activation, InitName, LayerSpec, init_weight
from .stack import LayerStack, StackLayer

Sources = Mapping[str, Any]


def check_node_name(v: str) -> str:
    """A node name is an identifier (it becomes a state-dict key prefix)."""
    if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", v):
        raise ValueError(f"{v!r} is not a valid node name (letters, digits, underscore; not starting with a digit)")
    return v


def layer_range(v: Any) -> Any:
    """``3`` means layer 3 alone: ``[3, 4)``."""
    return (v, v + 1) if isinstance(v, int) else v


def as_list(v: Any) -> Any:
    """One name means a list of one."""
    return [v] if isinstance(v, str) else v


def check_range(v: tuple[int, int] | None) -> tuple[int, int] | None:
    """A half-open ``[start, stop)`` with ``0 <= start < stop``."""
    if v is not None and not (0 <= v[0] < v[1]):
        raise ValueError(f"layers {list(v)} must be [start, stop) with 0 <= start < stop")
    return v


NodeName = Annotated[str, AfterValidator(check_node_name)]
LayerRange = Annotated[tuple[int, int] | None, BeforeValidator(layer_range), AfterValidator(check_range)]


class ForeignWeights:
    """Tensors from a foreign file, renamed to ``<layer>.weight|bias`` by a source's map,
    and the report of what loaded, what was skipped and what was missing."""

    def __init__(self, tensors: dict[str, torch.Tensor], report: dict[str, list[str]]):
        self.tensors, self.report = tensors, report


def model_layers(graph: ModelGraph, source: str) -> LayerStack:
    """A model's layer nodes, in order, as a stack: ``take`` and ``transplant`` copy layers
    of a fine-tuned or assembled model as they copy a pretrained stack's. Its dropout nodes
    are left out and its frozen flags stay behind; a model whose graph branches is refused."""
    if not graph.is_chain():
        merges = [n.name for n in graph.nodes() if n.kind in ("add", "concat")]
        raise SurgeryError(f"source {source!r} is a model whose graph branches (at {merges or graph.order()}); "
                           "take and transplant copy layers of a model that is one chain of layers.")
    return LayerStack([StackLayer(n.name, n.spec, n.tensors, dict(n.provenance))  # type: ignore[arg-type]
                       for n in graph.nodes() if n.kind == "layer"])


def _stack(sources: Sources | None, name: str) -> LayerStack:
    s = (sources or {}).get(name)
    if s is None:
        raise SurgeryError(f"source {name!r} is not loaded; known: {sorted(sources or {})}")
    if isinstance(s, ModelGraph):
        return model_layers(s, name)
    if not isinstance(s, LayerStack):
        raise SurgeryError(f"source {name!r} is a foreign weights file; use op: import for it.")
    return s


def _taken(source: str, stack: LayerStack, i: int) -> dict[str, Any]:
    """The provenance of a copy of layer ``i`` of ``stack``: where it came from and, for a
    pretrained layer, how it was pretrained."""
    method = stack[i].pretrain.get("method")
    return {"source": source, "layer": stack[i].name, "index": i, **({"method": method} if method else {})}


class _Op(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TakeOp(_Op):
    """Append copies of layers ``[start, stop)`` of a source: a stack, or a model's layer nodes."""

    op: Literal["take"] = "take"
    source: str
    layers: LayerRange = Field(default=None, description="[start, stop), half-open; default all")
    prefix: str = Field(default="", description="prepended to node names (needed when a source repeats)")

    def nodes(self, sources: Sources | None) -> list[Node]:
        """The layer nodes this op adds (copies of the source's tensors)."""
        stack = _stack(sources, self.source)
        start, stop = self.layers or (0, len(stack))
        if stop > len(stack):
            raise SurgeryError(
                f"layers [{start}, {stop}) is out of range for source {self.source!r}, which has "
                f"{len(stack)} layers {stack.names} (half-open, like Python slices)."
            )
        return [layer_node(self.prefix + stack[i].name, stack[i].spec, stack[i].tensors, _taken(self.source, stack, i))
                for i in range(start, stop)]

    def apply(self, g: ModelGraph, sources: Sources | None = None, gen: torch.Generator | None = None) -> list[str]:
        """Append the layers at the graph's output."""
        nodes = self.nodes(sources)
        g.place(nodes)
        return [n.name for n in nodes]


class TransplantOp(TakeOp):
    """Put copies of layers of a source after / before / in place of a node."""

    op: Literal["transplant"] = "transplant"  # type: ignore[assignment]
    after: str | None = None
    before: str | None = None
    replacing: str | None = None

    @model_validator(mode="after")
    def _one_place(self) -> TransplantOp:
        given = [k for k in ("after", "before", "replacing") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"transplant needs exactly one of after, before, replacing; got {given or 'none'}")
        return self

    def apply(self, g: ModelGraph, sources: Sources | None = None, gen: torch.Generator | None = None) -> list[str]:
        """Place the layers where ``after``/``before``/``replacing`` says."""
        nodes = self.nodes(sources)
        g.place(nodes, self.after, self.before, self.replacing)
        return [n.name for n in nodes]


class InsertOp(_Op):
    """A fresh layer (classic init by default) after or before a node, or at the end.

    ``kind: conv2d`` makes a convolutional layer with ``units`` feature maps; its input
    must be an image. In an empty graph the input is ``in_features``/``in_shape`` or, when
    neither is given, the data's (recipes fill it in).
    """

    op: Literal["insert"] = "insert"
    name: NodeName
    units: int = Field(gt=0)
    activation: Activation = "sigmoid"
    init: InitName = "classic"
    after: str | None = None
    before: str | None = None
    in_features: int | None = Field(default=None, gt=0, description="dense, only when the graph is empty")
    kind: Literal["dense", "conv2d"] = "dense"
    in_shape: tuple[int, int, int] | None = Field(default=None, description="conv2d, only when the graph is empty")
    kernel_size: int = Field(default=5, gt=0)
    stride: int = Field(default=1, gt=0)
    padding: int = Field(default=0, ge=0)

    @model_validator(mode="after")
    def _one_place(self) -> InsertOp:
        if self.after is not None and self.before is not None:
            raise ValueError(f"insert takes after or before (or neither: at the end), not both; got after "
                             f"{self.after!r} and before {self.before!r}")
        return self

    def _input_shape(self, g: ModelGraph) -> tuple[int, ...]:
        for where in (self.before, self.after):
            if where is not None:
                g.node(where)  # NameNotFound, listing the graph's nodes
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
        if g.input_shape is not None:
            return g.input_shape
        raise SurgeryError("insert into an empty graph needs "
                           f"{'in_shape' if self.kind == 'conv2d' else 'in_features'}.")

    def spec(self, g: ModelGraph) -> LayerSpec:
        """The new layer's spec, sized from what feeds it."""
        shape = self._input_shape(g)
        if self.kind == "dense":
            return LayerSpec(in_features=math.prod(shape), out_features=self.units, activation=self.activation)
        if len(shape) != 3:
            raise ShapeError(f"insert {self.name!r}: a conv2d layer needs image input (C, H, W), got {shape}.")
        return LayerSpec(kind="conv2d", in_features=shape[0], out_features=self.units, in_shape=shape,
                         activation=self.activation, kernel_size=self.kernel_size, stride=self.stride,
                         padding=self.padding)

    def apply(self, g: ModelGraph, sources: Sources | None = None, gen: torch.Generator | None = None) -> list[str]:
        """Add the freshly initialised layer."""
        g.place([layer_node(self.name, self.spec(g), None, None, gen, self.init)], self.after, self.before)
        return [self.name]


class RemoveOp(_Op):
    """Remove a node, joining its input to its outputs."""

    op: Literal["remove"] = "remove"
    node: str

    def apply(self, g: ModelGraph, sources: Sources | None = None, gen: torch.Generator | None = None) -> list[str]:
        """Remove the node; returns no names."""
        g.remove(self.node)
        return []


class ReinitOp(_Op):
    """Draw fresh weights (zero biases) for layers by name or glob."""

    op: Literal["reinit"] = "reinit"
    nodes: list[str] = Field(min_length=1)
    init: InitName = "classic"

    def apply(self, g: ModelGraph, sources: Sources | None = None, gen: torch.Generator | None = None) -> list[str]:
        """Re-initialise the matching layers in place."""
        names = [n for n in g.match(self.nodes) if g.node(n).kind == "layer"]
        for name in names:
            node = g.node(name)
            assert node.spec is not None
            init_weight(node.tensors["weight"], node.spec.activation, self.init, node.spec, gen)
            node.tensors["bias"].zero_()
            node.provenance = {**node.provenance, "reinit": self.init}
        return names


class FreezeOp(_Op):
    """Freeze (or with ``op: unfreeze``, unfreeze) nodes by name or glob."""

    op: Literal["freeze", "unfreeze"] = "freeze"
    nodes: list[str] = Field(min_length=1)

    def apply(self, g: ModelGraph, sources: Sources | None = None, gen: torch.Generator | None = None) -> list[str]:
        """Set the matching nodes' frozen flag."""
        names = g.match(self.nodes)
        for n in names:
            g.node(n).frozen = self.op == "freeze"
        return names


class DeepenOp(_Op):
    """Net2DeeperNet: an identity-initialised layer after ``after``.

    Exact for relu and linear (relu(I relu(z)) = relu(z)); for sigmoid/tanh no identity
    weight exists (sigmoid(h) != h), so ``activation: linear`` is the exact choice and
    ``allow_inexact`` keeps the squashing at the price of changing the function.
    """

    op: Literal["deepen"] = "deepen"
    after: str
    name: str | None = None
    activation: Activation | None = None
    allow_inexact: bool = False

    def apply(self, g: ModelGraph, sources: Sources | None = None, gen: torch.Generator | None = None) -> list[str]:
        """Insert the identity layer; ``SurgeryError`` when it could not keep the function."""
        node = g.node(self.after)
        if node.kind != "layer" or node.spec is None or node.spec.kind != "dense":
            raise SurgeryError(f"deepen: {self.after!r} is not a dense layer; deepen goes after a dense layer.")
        act = self.activation or node.spec.activation
        exact = act == "linear" or (act in IDEMPOTENT_ON_OWN_RANGE and act == node.spec.activation)
        if not exact and not self.allow_inexact:
            raise SurgeryError(
                f"deepen after {self.after!r}: an identity {act} layer cannot keep the function exactly "
                f"({act}(h) != h for the {node.spec.activation} outputs of {self.after!r}). Use "
                "activation: linear (exact; the new layer then learns), activation: relu after a "
                "relu layer, or allow_inexact: true to accept the change."
            )
        width = node.spec.out_features
        new = self.name or f"{self.after}_deep"
        spec = LayerSpec(in_features=width, out_features=width, activation=act)
        tensors = {"weight": torch.eye(width), "bias": torch.zeros(width)}
        g.insert_after(self.after, [layer_node(new, spec, tensors, {"source": "deepen", "after": self.after,
                                                                     "exact": exact})])
        return [new]


class WidenOp(_Op):
    """Net2WiderNet: ``node`` grows to ``units`` units by copying random units and dividing
    their outgoing weights by the copy count, the function unchanged (with ``noise: 0``)."""

    op: Literal["widen"] = "widen"
    node: str
    units: int = Field(gt=0)
    noise: float = Field(default=0.0, ge=0, description="symmetry-breaking noise on copied weights (0: exact)")

    def apply(self, g: ModelGraph, sources: Sources | None = None, gen: torch.Generator | None = None) -> list[str]:
        """Widen the layer and every dense layer it feeds; returns their names."""
        node = g.node(self.node)
        if node.kind != "layer" or node.spec is None or node.spec.kind != "dense":
            raise SurgeryError(f"widen: {self.node!r} is not a dense layer.")
        old = node.spec.out_features
        if self.units <= old:
            raise SurgeryError(f"widen: units={self.units} must exceed {self.node!r}'s current {old} units.")
        consumers = _dense_consumers(g, self.node)
        spec = node.spec.resized(out_features=self.units)  # refused here if it cannot be held
        specs = {c: g.node(c).spec.resized(in_features=self.units) for c in consumers}  # type: ignore[union-attr]
        mapping = torch.cat([torch.arange(old), torch.randint(0, old, (self.units - old,), generator=gen)])
        counts = torch.bincount(mapping, minlength=old).float()
        w, b = node.tensors["weight"], node.tensors["bias"]
        node.tensors = {"weight": w[mapping].clone(), "bias": b[mapping].clone()}
        node.spec = spec
        for cname in consumers:
            c = g.node(cname)
            cw = c.tensors["weight"][:, mapping] / counts[mapping]
            if self.noise:
                cw = cw + self.noise * torch.randn(cw.shape, generator=gen)
            c.tensors["weight"] = cw.clone()
            c.spec = specs[cname]
        node.provenance = {**node.provenance, "widened": f"{old}->{self.units}"}
        return [self.node, *consumers]


def _dense_consumers(g: ModelGraph, name: str) -> list[str]:
    """The dense layers ``name`` feeds, looking through dropout nodes."""
    out = []
    frontier = list(g.g.successors(name))
    while frontier:
        s = frontier.pop()
        n = g.node(s)
        if n.kind == "dropout":
            frontier += list(g.g.successors(s))
        elif n.kind == "layer" and n.spec is not None and n.spec.kind == "dense":
            out.append(s)
        else:
            raise SurgeryError(f"widen: {name!r} feeds {s!r} ({n.kind}); only dense consumers can absorb new units.")
    return out


class HeadOp(_Op):
    """A softmax classifier on top (zero-initialised), with optional fresh hidden layers."""

    op: Literal["head"] = "head"
    classes: int = Field(ge=2)
    hidden: list[Annotated[int, Field(gt=0)]] = Field(default_factory=list)
    activation: Activation = "sigmoid"
    name: NodeName = "out"

    def apply(self, g: ModelGraph, sources: Sources | None = None, gen: torch.Generator | None = None) -> list[str]:
        """Append the hidden layers and the output layer."""
        shapes = g.validate()
        width = math.prod(shapes[g.last()])  # type: ignore[index]
        names = []
        for i, h in enumerate(self.hidden):
            nm = f"fc{i + 1}"
            g.append(layer_node(nm, LayerSpec(in_features=width, out_features=h, activation=self.activation),
                                None, None, gen))
            names.append(nm)
            width = h
        g.append(layer_node(self.name, LayerSpec(in_features=width, out_features=self.classes, activation="linear"),
                            {"weight": torch.zeros(self.classes, width), "bias": torch.zeros(self.classes)},
                            {"source": "fresh", "init": "zeros"}))
        return [*names, self.name]


class DropoutOp(_Op):
    """Dropout with rate ``p`` after each node matching ``after``."""

    op: Literal["dropout"] = "dropout"
    p: float = Field(gt=0, lt=1)
    after: Annotated[list[str], BeforeValidator(as_list)] = Field(min_length=1, description="node names or globs")

    def apply(self, g: ModelGraph, sources: Sources | None = None, gen: torch.Generator | None = None) -> list[str]:
        """Insert one dropout node after each match; returns their names."""
        made = []
        for n in g.match(self.after):
            nm = f"drop_{n}"
            g.insert_after(n, [Node(nm, "dropout", p=self.p, provenance={"source": "dropout"})])
            made.append(nm)
        return made


class ImportOp(_Op):
    """Layers from a foreign weights file: ``layers`` names the destination layers whose
    ``<layer>.weight`` / ``<layer>.bias`` the source's ``map`` provides."""

    op: Literal["import"] = "import"
    source: str
    layers: list[str] = Field(min_length=1)
    activation: Activation = "sigmoid"
    after: str | None = None
    before: str | None = None

    def _node(self, src: ForeignWeights, name: str) -> Node:
        w, b = src.tensors.get(f"{name}.weight"), src.tensors.get(f"{name}.bias")
        if w is None:
            raise SurgeryError(f"source {self.source!r} maps nothing to {name}.weight; its map gives "
                               f"{sorted(src.tensors)}.")
        if w.dim() != 2:
            raise ShapeError(f"{name}.weight from {self.source!r} has shape {tuple(w.shape)}; "
                             "import takes dense [out, in] weights.")
        if b is None:
            b = torch.zeros(w.shape[0])
        if tuple(b.shape) != (w.shape[0],):
            raise ShapeError(f"{name}.bias from {self.source!r} has shape {tuple(b.shape)}, weight needs "
                             f"({w.shape[0]},); map it with transpose: true?")
        spec = LayerSpec(in_features=w.shape[1], out_features=w.shape[0], activation=self.activation)
        return layer_node(name, spec, {"weight": w, "bias": b}, {"source": self.source, "import": True})

    def apply(self, g: ModelGraph, sources: Sources | None = None, gen: torch.Generator | None = None) -> list[str]:
        """Add the imported layers and record what loaded in ``g.report``."""
        src = (sources or {}).get(self.source)
        if not isinstance(src, ForeignWeights):
            raise SurgeryError(f"source {self.source!r} is not a foreign file with a map:; import needs one.")
        nodes = [self._node(src, name) for name in self.layers]
        g.place(nodes, self.after, self.before)
        g.report.append(f"import from {self.source!r}: loaded {src.report['loaded']}; "
                        f"skipped {src.report['skipped']}; missing {src.report['missing']}")
        return [n.name for n in nodes]


Op = Annotated[
    TakeOp | TransplantOp | InsertOp | RemoveOp | ReinitOp | FreezeOp | DeepenOp | WidenOp | HeadOp
    | DropoutOp | ImportOp,
    Field(discriminator="op"),
]
