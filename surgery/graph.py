"""ModelGraph: a network as a networkx DiGraph of layers, the structure surgery edits.

Nodes are layers (spec + tensors + provenance + frozen flag), dropout, or merges; edges
carry the shape that flows along them. This module holds the structure only (add, insert,
remove, replace, place, match, shape inference, validation); the surgery operations that
use it live in :mod:`surgery.ops`, building the ``nn.Module`` in :mod:`surgery.modules`,
and the model file in :mod:`surgery.model_file`. ``validate()`` accepts a graph that is
acyclic with one input and one output and whose shapes agree on every edge, or raises a
``ShapeError``/``SurgeryError`` naming the nodes and shapes.
"""

from __future__ import annotations

import copy
import fnmatch
from dataclasses import dataclass, field
from typing import Any, Literal

import networkx as nx
import torch
from torch import Tensor

from .errors import NameNotFound, ShapeError, SurgeryError
from .layers import LayerSpec, init_weight

NodeKind = Literal["layer", "dropout", "add", "concat"]


@dataclass(repr=False)
class Node:
    """One node: a layer (``spec`` + ``tensors`` weight [out, in...] and bias [out]), a
    dropout (rate ``p``), or a merge (``add``/``concat``), with how it came to be."""

    name: str
    kind: NodeKind = "layer"
    spec: LayerSpec | None = None
    tensors: dict[str, Tensor] = field(default_factory=dict)
    p: float = 0.0  # dropout rate
    frozen: bool = False
    provenance: dict[str, Any] = field(default_factory=dict)

    def to_manifest(self, inputs: list[str]) -> dict[str, Any]:
        """This node as a JSON-able manifest entry, fed by ``inputs``."""
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
        """Number of numbers in the node's tensors."""
        return sum(t.numel() for t in self.tensors.values())

    def __repr__(self) -> str:  # what it is, not its numbers (a 784x500 weight is 392,000 of them)
        what = self.spec.brief() if self.spec is not None else f"dropout {self.p:g}" if self.kind == "dropout" \
            else self.kind
        prov = ", ".join(f"{k}={v}" for k, v in self.provenance.items())
        return f"Node({self.name!r}, {what}{', frozen' if self.frozen else ''}{'; ' + prov if prov else ''})"


def layer_node(name: str, spec: LayerSpec, tensors: dict[str, Tensor] | None = None,
               provenance: dict[str, Any] | None = None, generator: torch.Generator | None = None,
               init: str = "classic") -> Node:
    """A layer node; fresh tensors (``init`` scheme) when none are given."""
    if tensors is None:
        w = init_weight(torch.empty(spec.weight_shape), spec.activation, init, spec, generator)
        tensors = {"weight": w, "bias": torch.zeros(spec.out_features)}
        provenance = provenance or {"source": "fresh", "init": init}
    else:  # graphs hold CPU copies, whatever device a stack was trained on
        tensors = {k: tensors[k].detach().to("cpu", copy=True) for k in ("weight", "bias")}
    return Node(name, "layer", spec, tensors, provenance=provenance or {})


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

    def __repr__(self) -> str:
        return graph_summary(self)

    def node(self, name: str) -> Node:
        """The node called ``name``; ``NameNotFound`` lists the graph's nodes otherwise."""
        if name not in self.g:
            raise NameNotFound(f"no node named {name!r}; the graph has {self.order()}")
        return self.g.nodes[name]["node"]

    def nodes(self) -> list[Node]:
        """All nodes in topological order."""
        return [self.g.nodes[n]["node"] for n in self.order()]

    def order(self) -> list[str]:
        """Node names in topological order; ``ShapeError`` if the graph has a cycle."""
        try:
            return list(nx.topological_sort(self.g))
        except nx.NetworkXUnfeasible as e:
            cycle = nx.find_cycle(self.g)
            raise ShapeError(f"the graph has a cycle through {[u for u, _ in cycle]}; a network must be "
                             "acyclic.") from e

    def inputs_of(self, name: str) -> list[str]:
        """The nodes feeding ``name``, in input-slot order."""
        return sorted(self.g.predecessors(name), key=lambda u: self.g.edges[u, name].get("slot", 0))

    def is_chain(self) -> bool:
        """Whether every node has at most one input and one output (an ``nn.Sequential``)."""
        return all(self.g.in_degree(n) <= 1 and self.g.out_degree(n) <= 1 for n in self.g)

    def first(self) -> str | None:
        """The single input node, or ``None`` when there is none or several."""
        heads = [n for n in self.g if self.g.in_degree(n) == 0]
        return heads[0] if len(heads) == 1 else None

    def last(self) -> str | None:
        """The single output node, or ``None`` when there is none or several."""
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
        """Put the chain ``nodes`` between ``anchor`` and everything it fed."""
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
        """Put the chain ``nodes`` in front of ``anchor`` (which must have at most one input)."""
        self.node(anchor)
        preds = self.inputs_of(anchor)
        if len(preds) > 1:
            raise SurgeryError(f"{anchor!r} has several inputs; insert after one of {preds} instead.")
        if preds:
            return self.insert_after(preds[0], nodes)
        for prev, n in zip([None, *nodes], nodes):  # a new head chain feeding the old one
            self.add_node(n, [prev.name] if prev else [])
        self.g.add_edge(nodes[-1].name, anchor, slot=0)
        if nodes[0].spec is not None:
            self.input_shape = nodes[0].spec.input_shape

    def remove(self, name: str) -> Node:
        """Remove a node, joining its single input to its outputs."""
        node = self.node(name)
        preds, succ = self.inputs_of(name), list(self.g.successors(name))
        if len(preds) > 1:
            raise SurgeryError(f"cannot remove merge input structure at {name!r}: it has inputs {preds}.")
        slots = {s: self.g.edges[name, s].get("slot", 0) for s in succ}
        self.g.remove_node(name)
        for s in succ if preds else []:
            self.g.add_edge(preds[0], s, slot=slots[s])
        if not preds and succ and (nxt := self.node(succ[0])).spec is not None:
            self.input_shape = nxt.spec.input_shape
        return node

    def replace(self, name: str, nodes: list[Node]) -> None:
        """Put the chain ``nodes`` where ``name`` was."""
        self.node(name)  # NameNotFound names the graph's nodes
        preds, succ = self.inputs_of(name), list(self.g.successors(name))
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
            preds = self.inputs_of(name)
            if not preds and self.input_shape is None:
                raise ShapeError("the graph has no input shape; start it with take, import or insert.")
            ins = [out[u] for u in preds] if preds else [self.input_shape]
            out[name] = output_shape(self.node(name), ins, preds or [self.INPUT])  # type: ignore[list-item]
        return out

    def validate(self) -> dict[str, tuple[int, ...]]:
        """Every node's output shape, once structure and shapes are checked: ``SurgeryError`` for an empty
        graph, ``ShapeError`` naming the nodes for several inputs/outputs, a cycle or a shape that disagrees."""
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

    def place(self, nodes: list[Node], after: str | None = None, before: str | None = None,
              replacing: str | None = None) -> None:
        """Put the chain ``nodes`` after, before or in place of a node (at most one of the
        three), or at the end when none is given."""
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

    def copy(self) -> ModelGraph:
        """A deep copy: the copy's tensors are its own."""
        return copy.deepcopy(self)


def graph_summary(graph: ModelGraph) -> str:
    """The graph for people (its ``repr``): input shape and parameters, then a node a line in
    order, with its inputs where the graph branches. Never raises: a graph mid-surgery may
    not validate (a cycle lists the nodes as they were added)."""
    try:
        names = graph.order()
    except ShapeError:
        names = list(graph.g)
    total = sum(graph.node(n).n_params for n in names)
    trainable = sum(graph.node(n).n_params for n in names if not graph.node(n).frozen)
    lines = [f"ModelGraph(input {graph.input_shape}, {len(names)} nodes, {total:,} parameters"
             f"{f', {trainable:,} trainable' if trainable != total else ''})" + (":" if names else "")]
    chain = graph.is_chain()
    for n in names:
        ins = "" if chain else f" <- {', '.join(graph.inputs_of(n)) or graph.INPUT}"
        lines.append(f"  {graph.node(n)!r}{ins}")
    return "\n".join(lines)


def output_shape(node: Node, ins: list[tuple[int, ...]], src: list[str]) -> tuple[int, ...]:
    """The per-example output shape of ``node`` fed ``ins`` by the nodes ``src``;
    ``ShapeError`` names both ends when they disagree."""
    name = node.name
    if node.kind == "layer":
        assert node.spec is not None
        if len(ins) != 1:
            raise ShapeError(f"layer {name!r} has {len(ins)} inputs {src}; merge them first (add/concat).")
        if not node.spec.accepts(ins[0]):
            raise ShapeError(
                f"shape mismatch between {src[0]!r} and {name!r}: {src[0]!r} gives "
                f"{ins[0]} but {name!r} expects {node.spec.input_shape}."
            )
        return node.spec.output_shape
    if node.kind == "dropout":
        return ins[0]
    if node.kind == "add":
        if len(set(ins)) != 1:
            raise ShapeError(f"add node {name!r} gets differing shapes {dict(zip(src, ins))}.")
        return ins[0]
    if len({s[1:] for s in ins}) != 1:  # concat along features
        raise ShapeError(f"concat node {name!r} gets incompatible shapes {dict(zip(src, ins))}.")
    return (sum(s[0] for s in ins), *ins[0][1:])
