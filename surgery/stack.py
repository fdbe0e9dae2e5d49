"""LayerStack: ordered, named, pretrained layers saved as one ``.safetensors`` file.

Tensors are named ``<layer>.<param>`` (``h1.weight`` [out, in], ``h1.bias`` [out], plus the
tensors pretraining needed, e.g. ``h1.visible_bias``, ``h1.decoder_weight``). The file's
``__metadata__`` holds one JSON string, ``surgery.manifest``: format and version, the input
shape, the ordered layers (name, spec, in/out shapes, tensor shapes, how each was
pretrained with its per-epoch metrics and data fingerprint) and the producing recipe.
Reading a stack needs nothing beyond ``safetensors`` + ``json``; nothing is pickled.
The file format's constants and its checked reading are :mod:`surgery.weights_io`'s.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from safetensors.torch import save_file
from torch import Tensor, nn

from .configs import as_tensor
from .errors import ConfigError, DataError, ManifestError, NameNotFound, ShapeError
from .io import atomic_path
from .layers import LayerSpec, input_fits
from .version import package_version
from .weights_io import FORMAT_VERSION, MANIFEST_KEY, STACK_FORMAT, first_line, read_safetensors


@dataclass(repr=False)
class StackLayer:
    """One pretrained layer: its spec, its tensors and how it was trained.

    ``tensors['weight']`` / ``tensors['bias']`` are the layer itself; any other entry is
    an extra that pretraining needed (visible bias, decoder weight).
    """

    name: str
    spec: LayerSpec
    tensors: dict[str, Tensor]
    pretrain: dict[str, Any] = field(default_factory=dict)

    def __repr__(self) -> str:  # what it is and how it was trained, not its numbers
        p = self.pretrain or {}
        epochs = p.get("epochs")
        how = ", ".join(s for s in (p.get("method"), None if epochs is None else f"{epochs} epoch{'s' * (epochs != 1)}")
                        if s)
        final = ", ".join(f"{k} {v:.4g}" for k, v in (p.get("final") or {}).items() if isinstance(v, (int, float)))
        return f"StackLayer({self.name!r}, {self.spec.brief()}" + "".join(f"; {s}" for s in (how, final) if s) + ")"

    def module(self) -> nn.Module:
        """A fresh module holding copies of this layer's weight and bias."""
        m = self.spec.build()
        with torch.no_grad():
            m.weight.copy_(self.tensors["weight"])
            m.bias.copy_(self.tensors["bias"])
        return m.to(self.tensors["weight"].device)

    @torch.no_grad()
    def transform(self, x: Tensor, chunk: int = 10000) -> Tensor:
        """The layer's output for ``x`` [N, ...], computed in chunks of ``chunk`` rows without autograd."""
        m = self.module().to(x.device)
        return torch.cat([m(x[i : i + chunk]) for i in range(0, x.shape[0], chunk)])

    def layer_manifest(self) -> dict[str, Any]:
        """This layer's manifest entry (spec, shapes, tensors, how it was pretrained)."""
        return {
            "name": self.name,
            "kind": self.spec.kind,
            "activation": self.spec.activation,
            "in_shape": list(self.spec.input_shape),
            "out_shape": list(self.spec.output_shape),
            "spec": self.spec.model_dump(mode="json"),
            "tensors": {k: list(v.shape) for k, v in self.tensors.items()},
            "pretrain": self.pretrain,
        }


@dataclass(repr=False)
class LayerStack:
    """An ordered list of pretrained layers plus provenance; saved as one safetensors file."""
    layers: list[StackLayer] = field(default_factory=list)
    recipe: dict[str, Any] | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def __repr__(self) -> str:
        n = sum(t.numel() for layer in self.layers for t in layer.tensors.values())
        head = f"LayerStack({len(self)} layer{'s' if len(self) != 1 else ''}, input {self.input_shape}, {n:,} numbers)"
        return "\n".join([head + (":" if self.layers else ""), *(f"  {layer!r}" for layer in self.layers)])

    def __len__(self) -> int:
        return len(self.layers)

    def __iter__(self) -> Iterator[StackLayer]:
        return iter(self.layers)

    def __getitem__(self, key: int | str) -> StackLayer:
        if isinstance(key, str):
            for layer in self.layers:
                if layer.name == key:
                    return layer
            raise NameNotFound(f"no layer named {key!r}; the stack has {self.names}")
        return self.layers[key]

    @property
    def names(self) -> list[str]:
        """The layer names in order."""
        return [layer.name for layer in self.layers]

    @property
    def input_shape(self) -> tuple[int, ...]:
        """The per-example input shape of the first layer."""
        return self.layers[0].spec.input_shape if self.layers else ()

    def append(self, layer: StackLayer) -> LayerStack:
        """Add ``layer`` on top; ``ConfigError`` if its name is taken. Returns self."""
        if layer.name in self.names:
            raise ConfigError(f"the stack already has a layer named {layer.name!r}; give the new layer another name")
        self.layers.append(layer)
        return self

    @torch.no_grad()
    def transform(self, x: Tensor, upto: int | None = None) -> Tensor:
        """Map ``x`` [N, ...] (a tensor or NumPy array) through layers ``[0, upto)`` (all by
        default); ``ShapeError`` when its examples do not fit the first layer."""
        x = as_tensor(x, "LayerStack.transform(x)")
        if self.layers and not input_fits(self.input_shape, tuple(x.shape[1:])):
            raise ShapeError(f"LayerStack.transform(x): the stack's first layer {self.layers[0].name!r} takes input "
                             f"{self.input_shape} per example, but x of shape {tuple(x.shape)} gives "
                             f"{tuple(x.shape[1:])}; give x as [N, ...] examples of that shape.")
        dtype = next(iter(self.layers[0].tensors.values())).dtype if self.layers else x.dtype
        if x.dtype != dtype:
            raise DataError(f"LayerStack.transform(x): x is {x.dtype} but the stack's weights are {dtype}; convert "
                            f"x first (x.to({dtype})).")
        for layer in self.layers[:upto]:
            x = layer.transform(x)
        return x

    def manifest(self) -> dict[str, Any]:
        """The JSON manifest written into the file's metadata."""
        return {
            "format": STACK_FORMAT,
            "version": FORMAT_VERSION,
            "package_version": package_version(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "input_shape": list(self.input_shape),
            "layers": [layer.layer_manifest() for layer in self.layers],
            "info": self.info,
            "recipe": self.recipe,
        }

    def save(self, path: str | Path) -> Path:
        """Write the stack atomically (temp file + rename) and return the path; ``ShapeError``
        first when its layers could not be loaded back (:func:`layers_problem`)."""
        path = Path(path)
        if problem := layers_problem(self.layers):
            raise ShapeError(f"{path}: not written: {problem}; a stack is a chain of layers, each a weight and bias "
                             "of its spec's shapes, with names of their own.")
        tensors = {
            f"{layer.name}.{k}": v.detach().to("cpu", torch.float32).contiguous()
            for layer in self.layers
            for k, v in layer.tensors.items()
        }
        meta = {MANIFEST_KEY: json.dumps(self.manifest())}
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata=meta)
        return path

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> LayerStack:
        """Load and validate a stack file; every inconsistency is a ``ManifestError``."""
        path = Path(path)
        manifest, tensors = read_safetensors(path, expect=STACK_FORMAT)
        layers = []
        seen: set[str] = set()
        for i, lm in enumerate(_list(manifest, "layers", path)):
            where = f"{path}: manifest layer {i}"
            try:
                name = lm["name"]
                spec = LayerSpec.model_validate(lm["spec"])
                listed = lm["tensors"]
            except (KeyError, TypeError, ValidationError) as e:
                raise ManifestError(f"{where} is malformed ({first_line(e)}); the file was edited or damaged.") from e
            if name in seen:
                raise ManifestError(f"{where}: duplicate layer name {name!r}.")
            seen.add(name)
            own = {}
            for key in listed:
                full = f"{name}.{key}"
                if full not in tensors:
                    raise ManifestError(f"{path}: the manifest lists tensor {full!r} but the file does not hold it.")
                own[key] = tensors.pop(full).to(device)
            layers.append(StackLayer(name, spec, own, lm.get("pretrain", {})))
        if problem := layers_problem(layers):
            raise ManifestError(f"{path}: {problem}.")
        if tensors:
            raise ManifestError(
                f"{path}: tensors {sorted(tensors)[:5]} are not in the manifest; the file was "
                "edited or written by another tool."
            )
        return cls(layers, manifest.get("recipe"), manifest.get("info", {}))


def layers_problem(layers: list[StackLayer]) -> str | None:
    """What keeps ``layers`` from being one stack, or None: a repeated name, a weight or bias
    missing or not of its spec's shape, a layer that does not take the previous one's output."""
    seen: set[str] = set()
    prev = None
    for layer in layers:
        name, spec = layer.name, layer.spec
        if name in seen:
            return f"duplicate layer name {name!r}"
        seen.add(name)
        for key, want in (("weight", spec.weight_shape), ("bias", (spec.out_features,))):
            if key not in layer.tensors:
                return f"layer {name!r} has no {key} tensor"
            have = tuple(layer.tensors[key].shape)
            if have != tuple(want):
                return f"layer {name!r} tensor {key!r} has shape {have} but its spec needs {tuple(want)}"
        if prev is not None and not spec.accepts(prev):
            return f"layer {name!r} expects input {spec.input_shape} but the previous layer gives {prev}"
        prev = spec.output_shape
    return None


def _list(manifest: dict, key: str, path: Path) -> list:
    v = manifest.get(key)
    if not isinstance(v, list):
        raise ManifestError(f"{path}: manifest field {key!r} is missing or not a list.")
    return v
