"""ModelGraph: a network as a networkx DiGraph of layers, edited by surgery operations.

Nodes are layers (spec + tensors + provenance + frozen flag), dropout, or merges; edges
carry the shape that flows along them. Every operation leaves a graph that ``validate()``
accepts (acyclic, one input, one output, shapes agree on every edge) or raises a
``ShapeError``/``SurgeryError`` naming the nodes and shapes. ``compile()`` turns it into
an ``nn.Module`` whose parameter names are ``<node>.weight`` / ``<node>.bias``.
"""

from __future__ import annotations

import copy
import fnmatch
import json
import math
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import networkx as nx
import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from .errors import ShapeError, SurgeryError
from .io import atomic_path
from .layers import IDEMPOTENT_ON_OWN_RANGE, LayerSpec, init_weight
from .stack import (
    FORMAT_VERSION,
    MANIFEST_KEY,
    MODEL_FORMAT,
    LayerStack,
    package_version,
    read_safetensors,
)

NodeKind = Literal["layer", "dropout", "add", "concat"]


@dataclass
class Node:
    name: str
    kind: NodeKind = "layer"
    spec: LayerSpec | None = None
    tensors: dict[str, Tensor] = field(default_factory=dict)
    p: float = 0.0  # dropout rate
    frozen: bool = False
    provenance: dict[str, Any] = field(default_factory=dict)

    def to_manifest(self, inputs: list[str]) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "spec": self.spec.model_dump(mode="json") if self.spec else None,
            "p": self.p,
            "frozen": self.frozen,
            "provenance": self.provenance,
            "inputs": inputs,
            "tensors": {k: list(v.shape) for k, v in self.tensors.items()},
        }

    @property
    def n_params(self) -> int:
        return sum(t.numel() for t in self.tensors.values())


def layer_node(name: str, spec: LayerSpec, tensors: dict[str, Tensor] | None = None,
               provenance: dict[str, Any] | None = None, generator: torch.Generator | None = None,
               init: str = "classic") -> Node:
    """A layer node; fresh tensors (``init`` scheme) when none are given."""
    if tensors is None:
        w = init_weight(torch.empty(spec.weight_shape), spec.activation, init, spec, generator)
        tensors = {"weight": w, "bias": torch.zeros(spec.out_features)}
        provenance = provenance or {"source": "fresh", "init": init}
    else:
        tensors = {k: tensors[k].detach().clone() for k in ("weight", "bias")}
    return Node(name, "layer", spec, tensors, provenance=provenance or {})


def input_fits(want: tuple[int, ...], have: tuple[int, ...]) -> bool:
    """Whether data of shape ``have`` (per example) feeds a network taking ``want``
    (images feed a dense first layer of their flattened size)."""
    return tuple(want) == tuple(have) or (len(want) == 1 and math.prod(have) == want[0])


class ModelGraph:
    """A network under surgery. ``input_shape`` is per example, e.g. ``(784,)``."""

    INPUT = "input"

    def __init__(self, input_shape: tuple[int, ...] | None = None):
        self.g = nx.DiGraph()
        self.input_shape = tuple(input_shape) if input_shape else None
        self.report: list[str] = []  # what operations did (imports: loaded / skipped)

    # ------------------------------------------------------------------ structure
    def __contains__(self, name: str) -> bool:
        return name in self.g

    def __len__(self) -> int:
        return self.g.number_of_nodes()

    def node(self, name: str) -> Node:
        if name not in self.g:
            raise SurgeryError(f"no node named {name!r}; the graph has {self.order()}")
        return self.g.nodes[name]["node"]

    def nodes(self) -> list[Node]:
        return [self.g.nodes[n]["node"] for n in self.order()]

    def order(self) -> list[str]:
        try:
            return list(nx.topological_sort(self.g))
        except nx.NetworkXUnfeasible as e:
            cycle = nx.find_cycle(self.g)
            raise ShapeError(f"the graph has a cycle through {[u for u, _ in cycle]}; a network must be acyclic.") from e

    def inputs_of(self, name: str) -> list[str]:
        return sorted(self.g.predecessors(name), key=lambda u: self.g.edges[u, name].get("slot", 0))

    def is_chain(self) -> bool:
        return all(self.g.in_degree(n) <= 1 and self.g.out_degree(n) <= 1 for n in self.g)

    def first(self) -> str | None:
        heads = [n for n in self.g if self.g.in_degree(n) == 0]
        return heads[0] if len(heads) == 1 else None

    def last(self) -> str | None:
        tails = [n for n in self.g if self.g.out_degree(n) == 0]
        return tails[0] if len(tails) == 1 else None

    def add_node(self, node: Node, inputs: list[str] | None = None) -> Node:
        """Add ``node`` fed by ``inputs`` (general DAG building)."""
        if node.name in self.g or node.name == self.INPUT:
            raise SurgeryError(f"duplicate node name {node.name!r}; pick another name (e.g. with prefix:).")
        self.g.add_node(node.name, node=node)
        for slot, u in enumerate(inputs or []):
            self.node(u)
            self.g.add_edge(u, node.name, slot=slot)
        return node

    def append(self, node: Node) -> Node:
        """Add ``node`` after the current output (the graph stays a chain)."""
        tail = self.last() if len(self) else None
        if len(self) and tail is None:
            raise SurgeryError("the graph has several outputs; say where the new node goes (after:).")
        if self.input_shape is None and node.spec is not None:
            self.input_shape = node.spec.input_shape
        return self.add_node(node, [tail] if tail else [])

    def insert_after(self, anchor: str, nodes: list[Node]) -> None:
        self.node(anchor)
        succ = list(self.g.successors(anchor))
        slots = {s: self.g.edges[anchor, s].get("slot", 0) for s in succ}
        for s in succ:
            self.g.remove_edge(anchor, s)
        prev = anchor
        for n in nodes:
            self.add_node(n, [prev])
            prev = n.name
        for s in succ:
            self.g.add_edge(prev, s, slot=slots[s])

    def insert_before(self, anchor: str, nodes: list[Node]) -> None:
        self.node(anchor)
        preds = self.inputs_of(anchor)
        if len(preds) > 1:
            raise SurgeryError(f"{anchor!r} has several inputs; insert after one of {preds} instead.")
        if not preds:
            for n in nodes:
                self.add_node(n)
            for a, b in zip(nodes, nodes[1:]):
                self.g.add_edge(a.name, b.name, slot=0)
            self.g.add_edge(nodes[-1].name, anchor, slot=0)
            if nodes[0].spec is not None:
                self.input_shape = nodes[0].spec.input_shape
            return
        self.insert_after(preds[0], nodes)

    def remove(self, name: str) -> Node:
        """Remove a node, joining its single input to its outputs."""
        node = self.node(name)
        preds, succ = self.inputs_of(name), list(self.g.successors(name))
        if len(preds) > 1:
            raise SurgeryError(f"cannot remove merge input structure at {name!r}: it has inputs {preds}.")
        slots = {s: self.g.edges[name, s].get("slot", 0) for s in succ}
        self.g.remove_node(name)
        for s in succ:
            if preds:
                self.g.add_edge(preds[0], s, slot=slots[s])
        if not preds and succ:
            nxt = self.node(succ[0])
            if nxt.spec is not None:
                self.input_shape = nxt.spec.input_shape
        return node

    def replace(self, name: str, nodes: list[Node]) -> None:
        preds = self.inputs_of(name)
        succ = list(self.g.successors(name))
        old_input = self.input_shape
        self.remove(name)
        if preds:
            self.insert_after(preds[0], nodes)
        elif succ:
            self.insert_before(succ[0], nodes)
        else:
            for n in nodes:
                self.append(n)
            self.input_shape = nodes[0].spec.input_shape if nodes[0].spec else old_input

    def match(self, patterns: list[str] | str) -> list[str]:
        """Node names matching names or globs, in graph order; unknown names are an error."""
        if isinstance(patterns, str):
            patterns = [patterns]
        out: list[str] = []
        for p in patterns:
            hits = [n for n in self.order() if fnmatch.fnmatchcase(n, p)]
            if not hits:
                raise SurgeryError(f"no node matches {p!r}; the graph has {self.order()}")
            out += [h for h in hits if h not in out]
        return out

    # -------------------------------------------------------------------- shapes
    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Output shape of every node; raises ``ShapeError`` at the first disagreement."""
        out: dict[str, tuple[int, ...]] = {}
        for name in self.order():
            node = self.node(name)
            preds = self.inputs_of(name)
            if preds:
                ins = [out[u] for u in preds]
            else:
                if self.input_shape is None:
                    raise ShapeError("the graph has no input shape; start it with take, import or insert.")
                ins = [self.input_shape]
            src = preds or [self.INPUT]
            if node.kind == "layer":
                assert node.spec is not None
                if len(ins) != 1:
                    raise ShapeError(f"layer {name!r} has {len(ins)} inputs {preds}; merge them first (add/concat).")
                if not node.spec.accepts(ins[0]):
                    raise ShapeError(
                        f"shape mismatch between {src[0]!r} and {name!r}: {src[0]!r} gives "
                        f"{ins[0]} but {name!r} expects {node.spec.input_shape}."
                    )
                out[name] = node.spec.output_shape
            elif node.kind == "dropout":
                out[name] = ins[0]
            elif node.kind == "add":
                if len(set(ins)) != 1:
                    raise ShapeError(f"add node {name!r} gets differing shapes {dict(zip(src, ins))}.")
                out[name] = ins[0]
            else:  # concat along features
                if len({s[1:] for s in ins}) != 1:
                    raise ShapeError(f"concat node {name!r} gets incompatible shapes {dict(zip(src, ins))}.")
                out[name] = (sum(s[0] for s in ins), *ins[0][1:])
        return out

    def validate(self) -> dict[str, tuple[int, ...]]:
        if len(self) == 0:
            raise SurgeryError("the graph is empty; add layers with take, import or insert.")
        order = self.order()  # raises on cycles
        heads = [n for n in order if self.g.in_degree(n) == 0]
        tails = [n for n in order if self.g.out_degree(n) == 0]
        if len(heads) != 1:
            raise ShapeError(f"the graph must have one input node; it has {heads}.")
        if len(tails) != 1:
            raise ShapeError(f"the graph must have one output node; it has {tails}.")
        for name in order:
            node = self.node(name)
            if node.kind == "layer":
                assert node.spec is not None
                for key, want in (("weight", node.spec.weight_shape), ("bias", (node.spec.out_features,))):
                    have = tuple(node.tensors[key].shape)
                    if have != tuple(want):
                        raise ShapeError(f"node {name!r}: tensor {key} has shape {have}, its spec needs {tuple(want)}.")
        return self.shapes()

    # ------------------------------------------------------------------- compile
    def compile(self) -> nn.Module:
        """The network as an ``nn.Module``; frozen parameters get ``requires_grad=False``."""
        self.validate()
        mods: OrderedDict[str, nn.Module] = OrderedDict()
        for name in self.order():
            node = self.node(name)
            if node.kind == "layer":
                assert node.spec is not None
                m = node.spec.build()
                with torch.no_grad():
                    m.weight.copy_(node.tensors["weight"])
                    m.bias.copy_(node.tensors["bias"])
                m.requires_grad_(not node.frozen)
            elif node.kind == "dropout":
                m = nn.Dropout(node.p)
            else:
                m = Merge(node.kind)
            mods[name] = m
        if self.is_chain():
            return nn.Sequential(mods)
        return GraphModule(mods, {n: self.inputs_of(n) for n in mods})

    def load_module_state(self, module: nn.Module) -> None:
        """Copy trained weights from a compiled module back into the nodes."""
        state = module.state_dict()
        for node in self.nodes():
            if node.kind == "layer":
                for key in ("weight", "bias"):
                    node.tensors[key] = state[f"{node.name}.{key}"].detach().to("cpu").clone()

    # ------------------------------------------------------------------ save/load
    def manifest(self, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        shapes = self.validate()
        return {
            "format": MODEL_FORMAT,
            "version": FORMAT_VERSION,
            "package_version": package_version(),
            "input_shape": list(self.input_shape or ()),
            "output_shape": list(shapes[self.order()[-1]]),
            "nodes": [self.node(n).to_manifest(self.inputs_of(n)) for n in self.order()],
            **(extra or {}),
        }

    def save(self, path: str | Path, extra: dict[str, Any] | None = None) -> Path:
        path = Path(path)
        meta = {MANIFEST_KEY: json.dumps(self.manifest(extra))}
        tensors = {f"{n.name}.{k}": v.detach().to("cpu", torch.float32).contiguous()
                   for n in self.nodes() for k, v in n.tensors.items()}
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata=meta)
        return path

    @classmethod
    def load(cls, path: str | Path) -> ModelGraph:
        from .errors import ManifestError

        path = Path(path)
        manifest, tensors = read_safetensors(path, expect=MODEL_FORMAT)
        graph = cls(tuple(manifest.get("input_shape") or ()) or None)
        try:
            for nm in manifest["nodes"]:
                spec = LayerSpec.model_validate(nm["spec"]) if nm["spec"] else None
                own = {k: tensors.pop(f"{nm['name']}.{k}") for k in nm["tensors"]}
                node = Node(nm["name"], nm["kind"], spec, own, nm.get("p", 0.0), nm.get("frozen", False),
                            nm.get("provenance", {}))
                graph.add_node(node, nm["inputs"])
        except (KeyError, TypeError, ValueError) as e:
            raise ManifestError(f"{path}: the model manifest is malformed or does not match its tensors ({e}).") from e
        if tensors:
            raise ManifestError(f"{path}: tensors {sorted(tensors)[:5]} are not in the manifest.")
        try:
            graph.validate()
        except SurgeryError as e:
            raise ManifestError(f"{path}: {e}") from e
        return graph

    def summary(self) -> str:
        shapes = self.validate()
        rows = [f"{'node':<12} {'kind':<8} {'output':>14} {'params':>10} {'frozen':<6} provenance"]
        total = trainable = 0
        for name in self.order():
            n = self.node(name)
            total += n.n_params
            trainable += 0 if n.frozen else n.n_params
            what = n.kind if n.kind != "layer" else f"{n.spec.kind[:5]}/{n.spec.activation[:4]}"  # type: ignore[union-attr]
            if n.kind == "dropout":
                what = f"drop {n.p:g}"
            prov = ", ".join(f"{k}={v}" for k, v in n.provenance.items())
            rows.append(f"{name:<12} {what:<8} {str(shapes[name]):>14} {n.n_params:>10,} {'yes' if n.frozen else 'no':<6} {prov}")
        rows.append(f"input {self.input_shape}; {total:,} parameters, {trainable:,} trainable")
        return "\n".join(rows)

    # ------------------------------------------------------------ surgery methods
    def take(self, stack: LayerStack, start: int = 0, stop: int | None = None, source: str = "stack",
             prefix: str = "") -> list[str]:
        """Append layers ``[start, stop)`` of ``stack`` (copies, never shared tensors)."""
        stop = len(stack) if stop is None else stop
        if not (0 <= start < stop <= len(stack)):
            raise SurgeryError(
                f"layers [{start}, {stop}) is out of range for source {source!r}, which has "
                f"{len(stack)} layers {stack.names} (half-open, like Python slices)."
            )
        names = []
        for i in range(start, stop):
            layer = stack[i]
            node = layer_node(prefix + layer.name, layer.spec, layer.tensors,
                              {"source": source, "layer": layer.name, "index": i,
                               "method": layer.pretrain.get("method")})
            self.append(node)
            names.append(node.name)
        return names

    def transplant(self, stack: LayerStack, start: int, stop: int | None, source: str, *,
                   after: str | None = None, before: str | None = None, replacing: str | None = None,
                   prefix: str = "") -> list[str]:
        stop = len(stack) if stop is None else stop
        if not (0 <= start < stop <= len(stack)):
            raise SurgeryError(f"layers [{start}, {stop}) is out of range for source {source!r} ({len(stack)} layers).")
        nodes = [layer_node(prefix + stack[i].name, stack[i].spec, stack[i].tensors,
                            {"source": source, "layer": stack[i].name, "index": i}) for i in range(start, stop)]
        self._place(nodes, after, before, replacing)
        return [n.name for n in nodes]

    def _place(self, nodes: list[Node], after: str | None, before: str | None, replacing: str | None) -> None:
        given = [x for x in (after, before, replacing) if x is not None]
        if len(given) > 1:
            raise SurgeryError("say only one of after, before, replacing.")
        if after is not None:
            self.insert_after(after, nodes)
        elif before is not None:
            self.insert_before(before, nodes)
        elif replacing is not None:
            self.replace(replacing, nodes)
        else:
            for n in nodes:
                self.append(n)

    def insert(self, name: str, spec: LayerSpec, *, after: str | None = None, before: str | None = None,
               init: str = "classic", generator: torch.Generator | None = None) -> str:
        self._place([layer_node(name, spec, None, None, generator, init)], after, before, None)
        return name

    def reinit(self, patterns: list[str] | str, init: str = "classic", generator: torch.Generator | None = None) -> list[str]:
        names = [n for n in self.match(patterns) if self.node(n).kind == "layer"]
        for name in names:
            node = self.node(name)
            assert node.spec is not None
            init_weight(node.tensors["weight"], node.spec.activation, init, node.spec, generator)
            node.tensors["bias"].zero_()
            node.provenance = {**node.provenance, "reinit": init}
        return names

    def set_frozen(self, patterns: list[str] | str, frozen: bool) -> list[str]:
        names = self.match(patterns)
        for n in names:
            self.node(n).frozen = frozen
        return names

    def deepen(self, after: str, name: str | None = None, activation: str | None = None,
               allow_inexact: bool = False) -> str:
        """Net2DeeperNet: an identity-initialised layer after ``after``.

        Exact for relu and linear (relu(I relu(z)) = relu(z)); for sigmoid/tanh no identity
        weight exists (sigmoid(h) != h), so ``activation: linear`` is the exact choice and
        ``allow_inexact`` keeps the squashing at the price of changing the function.
        """
        node = self.node(after)
        if node.kind != "layer" or node.spec is None or node.spec.kind != "dense":
            raise SurgeryError(f"deepen: {after!r} is not a dense layer; deepen goes after a dense layer.")
        act = activation or node.spec.activation
        exact = act == "linear" or (act in IDEMPOTENT_ON_OWN_RANGE and act == node.spec.activation)
        if not exact and not allow_inexact:
            raise SurgeryError(
                f"deepen after {after!r}: an identity {act} layer cannot keep the function exactly "
                f"({act}(h) != h for the {node.spec.activation} outputs of {after!r}). Use "
                "activation: linear (exact; the new layer then learns), activation: relu after a "
                "relu layer, or allow_inexact: true to accept the change."
            )
        width = node.spec.out_features
        new = name or f"{after}_deep"
        spec = LayerSpec(in_features=width, out_features=width, activation=act)
        tensors = {"weight": torch.eye(width), "bias": torch.zeros(width)}
        self.insert_after(after, [layer_node(new, spec, tensors, {"source": "deepen", "after": after, "exact": exact})])
        return new

    def widen(self, name: str, width: int, generator: torch.Generator | None = None, noise: float = 0.0) -> list[str]:
        """Net2WiderNet: grow ``name`` to ``width`` units by copying random units and
        dividing their outgoing weights by the copy count (function-preserving)."""
        node = self.node(name)
        if node.kind != "layer" or node.spec is None or node.spec.kind != "dense":
            raise SurgeryError(f"widen: {name!r} is not a dense layer.")
        old = node.spec.out_features
        if width <= old:
            raise SurgeryError(f"widen: width={width} must exceed {name!r}'s current {old} units.")
        consumers = self._consumers_through_dropout(name)
        mapping = torch.cat([torch.arange(old), torch.randint(0, old, (width - old,), generator=generator)])
        counts = torch.bincount(mapping, minlength=old).float()
        w, b = node.tensors["weight"], node.tensors["bias"]
        node.tensors = {"weight": w[mapping].clone(), "bias": b[mapping].clone()}
        node.spec = node.spec.model_copy(update={"out_features": width})
        for cname in consumers:
            c = self.node(cname)
            assert c.spec is not None
            cw = c.tensors["weight"][:, mapping] / counts[mapping]
            if noise:
                cw = cw + noise * torch.randn(cw.shape, generator=generator)
            c.tensors["weight"] = cw.clone()
            c.spec = c.spec.model_copy(update={"in_features": width})
        node.provenance = {**node.provenance, "widened": f"{old}->{width}"}
        return [name, *consumers]

    def _consumers_through_dropout(self, name: str) -> list[str]:
        out = []
        frontier = list(self.g.successors(name))
        while frontier:
            s = frontier.pop()
            n = self.node(s)
            if n.kind == "dropout":
                frontier += list(self.g.successors(s))
            elif n.kind == "layer" and n.spec is not None and n.spec.kind == "dense":
                out.append(s)
            else:
                raise SurgeryError(f"widen: {name!r} feeds {s!r} ({n.kind}); only dense consumers can absorb new units.")
        return out

    def head(self, classes: int, hidden: list[int] | None = None, activation: str = "sigmoid",
             generator: torch.Generator | None = None, init: str = "classic", name: str = "out") -> list[str]:
        shapes = self.validate()
        width = math.prod(shapes[self.last()])  # type: ignore[index]
        names = []
        for i, h in enumerate(hidden or []):
            nm = f"fc{i + 1}"
            self.append(layer_node(nm, LayerSpec(in_features=width, out_features=h, activation=activation),
                                   None, None, generator, init))
            names.append(nm)
            width = h
        out = layer_node(name, LayerSpec(in_features=width, out_features=classes, activation="linear"),
                         {"weight": torch.zeros(classes, width), "bias": torch.zeros(classes)},
                         {"source": "fresh", "init": "zeros"})
        self.append(out)
        return [*names, name]

    def add_dropout(self, patterns: list[str] | str, p: float) -> list[str]:
        made = []
        for n in self.match(patterns):
            nm = f"drop_{n}"
            self.insert_after(n, [Node(nm, "dropout", p=p, provenance={"source": "dropout"})])
            made.append(nm)
        return made

    def copy(self) -> ModelGraph:
        return copy.deepcopy(self)


class Merge(nn.Module):
    def __init__(self, mode: str):
        super().__init__()
        self.mode = mode

    def forward(self, *xs: Tensor) -> Tensor:
        if self.mode == "add":
            out = xs[0]
            for x in xs[1:]:
                out = out + x
            return out
        return torch.cat(xs, dim=1)


class GraphModule(nn.Module):
    """General DAG execution in topological order (used when the graph is not a chain)."""

    def __init__(self, mods: OrderedDict[str, nn.Module], inputs: dict[str, list[str]]):
        super().__init__()
        for k, m in mods.items():
            self.add_module(k, m)
        self.order = list(mods)
        self.inputs = inputs

    def forward(self, x: Tensor) -> Tensor:
        vals: dict[str, Tensor] = {}
        for name in self.order:
            ins = [vals[u] for u in self.inputs[name]] or [x]
            vals[name] = getattr(self, name)(*ins)
        return vals[self.order[-1]]
