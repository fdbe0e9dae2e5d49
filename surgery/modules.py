"""From a ModelGraph to an ``nn.Module`` and back.

:func:`to_module` builds the network a graph describes (an ``nn.Sequential`` for a
chain, a :class:`GraphModule` for a general DAG); its parameter names are the graph's
tensor names (``<node>.weight``, ``<node>.bias``), so state dicts and stack files agree
with no renaming. :func:`read_back` copies trained weights from such a module into the
graph's nodes.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import Tensor, nn

from .configs import GRAPH, require
from .errors import ShapeError
from .graph import ModelGraph


def to_module(graph: ModelGraph) -> nn.Module:
    """The network as an ``nn.Module`` (on the CPU); frozen nodes' parameters get
    ``requires_grad=False``. Raises what ``graph.validate()`` raises."""
    require(graph, ModelGraph, "surgery.to_module(graph)", GRAPH)
    graph.validate()
    mods: OrderedDict[str, nn.Module] = OrderedDict()
    for name in graph.order():
        node = graph.node(name)
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
    if graph.is_chain():
        return nn.Sequential(mods)
    return GraphModule(mods, {n: graph.inputs_of(n) for n in mods})


def read_back(graph: ModelGraph, module: nn.Module) -> None:
    """Copy ``module``'s trained weights (made by :func:`to_module`) into the graph's nodes;
    ``ShapeError`` naming the node when the module is not one ``to_module(graph)`` made."""
    require(graph, ModelGraph, "surgery.read_back(graph, module)", GRAPH)
    require(module, nn.Module, "surgery.read_back(graph, module)", "the nn.Module surgery.to_module(graph) made")
    state = module.state_dict()
    for node in graph.nodes():
        for key in ("weight", "bias") if node.kind == "layer" else ():
            have = state.get(f"{node.name}.{key}")
            if have is None or have.shape != node.tensors[key].shape:
                what = "has none" if have is None else f"has shape {tuple(have.shape)}"
                raise ShapeError(f"surgery.read_back: node {node.name!r} needs {node.name}.{key} of shape "
                                 f"{tuple(node.tensors[key].shape)}, but the module {what}; give the module "
                                 "surgery.to_module(graph) made for this graph.")
            node.tensors[key] = have.detach().to("cpu").clone()


class Merge(nn.Module):
    """``add``: the sum of its inputs; ``concat``: their concatenation along features."""

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
