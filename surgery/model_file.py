"""The assembled-model file: a ModelGraph as one ``.safetensors`` file.

Tensors are named ``<node>.<param>``; the metadata key ``surgery.manifest`` holds a JSON
object with ``format: surgery.model``, the version, input/output shapes and the nodes in
topological order (kind, spec, frozen, provenance, inputs, tensor shapes). Readable with
``safetensors`` + ``json`` alone; written atomically; never pickle.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from safetensors.torch import save_file

from .configs import GRAPH, require
from .errors import ManifestError, SurgeryError
from .graph import ModelGraph, Node
from .io import atomic_path
from .layers import LayerSpec
from .version import package_version
from .weights_io import FORMAT_VERSION, MANIFEST_KEY, MODEL_FORMAT, read_safetensors


def model_manifest(graph: ModelGraph, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The JSON manifest of ``graph`` (validated first), plus ``extra`` keys."""
    shapes = graph.validate()
    return {
        "format": MODEL_FORMAT,
        "version": FORMAT_VERSION,
        "package_version": package_version(),
        "input_shape": list(graph.input_shape or ()),
        "output_shape": list(shapes[graph.order()[-1]]),
        "nodes": [graph.node(n).to_manifest(graph.inputs_of(n)) for n in graph.order()],
        **(extra or {}),
    }


def save_model(graph: ModelGraph, path: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """Write ``graph`` to ``path`` atomically (float32 tensors on the CPU); returns the path."""
    require(graph, ModelGraph, "surgery.save_model(graph, path)", GRAPH)
    path = Path(path)
    meta = {MANIFEST_KEY: json.dumps(model_manifest(graph, extra))}
    tensors = {f"{n.name}.{k}": v.detach().to("cpu", torch.float32).contiguous()
               for n in graph.nodes() for k, v in n.tensors.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return path


def load_model(path: str | Path) -> ModelGraph:
    """Read a model file back into a ModelGraph; ``ManifestError`` names the file and what
    is wrong when it is missing, truncated, not a model, or inconsistent."""
    path = Path(path)
    manifest, tensors = read_safetensors(path, expect=MODEL_FORMAT)
    graph = ModelGraph(tuple(manifest.get("input_shape") or ()) or None)
    try:
        for nm in manifest["nodes"]:
            spec = LayerSpec.model_validate(nm["spec"]) if nm["spec"] else None
            own = {k: tensors.pop(f"{nm['name']}.{k}") for k in nm["tensors"]}
            node = Node(nm["name"], nm["kind"], spec, own, nm.get("p", 0.0), nm.get("frozen", False),
                        nm.get("provenance", {}))
            graph.add_node(node, nm["inputs"])
    except (KeyError, TypeError, ValueError, ValidationError, SurgeryError) as e:
        raise ManifestError(f"{path}: the model manifest is malformed or does not match its tensors ({e}).") from e
    if tensors:
        raise ManifestError(f"{path}: tensors {sorted(tensors)[:5]} are not in the manifest.")
    try:
        graph.validate()
    except SurgeryError as e:
        raise ManifestError(f"{path}: {e}") from e
    return graph


def describe_model(graph: ModelGraph | str | Path) -> str:
    """A table of the graph's nodes (or a model file's): kind, output shape, parameters,
    frozen, provenance."""
    if isinstance(graph, (str, Path)):
        graph = load_model(graph)
    require(graph, ModelGraph, "surgery.describe_model(graph)", GRAPH)
    shapes = graph.validate()
    rows = [f"{'node':<12} {'kind':<8} {'output':>14} {'params':>10} {'frozen':<6} provenance"]
    total = trainable = 0
    for name in graph.order():
        n = graph.node(name)
        total += n.n_params
        trainable += 0 if n.frozen else n.n_params
        what = n.kind if n.kind != "layer" else f"{n.spec.kind[:5]}/{n.spec.activation[:4]}"  # type: ignore[union-attr]
        if n.kind == "dropout":
            what = f"drop {n.p:g}"
        prov = ", ".join(f"{k}={v}" for k, v in n.provenance.items())
        rows.append(f"{name:<12} {what:<8} {str(shapes[name]):>14} {n.n_params:>10,} {'yes' if n.frozen else 'no':<6} "
                    f"{prov}")
    rows.append(f"input {graph.input_shape}; {total:,} parameters, {trainable:,} trainable")
    return "\n".join(rows)
