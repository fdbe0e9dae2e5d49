"""LayerStack: ordered, named, pretrained layers saved as one ``.safetensors`` file.

Tensors are named ``<layer>.<param>`` (``h1.weight`` [out, in], ``h1.bias`` [out], plus the
tensors pretraining needed, e.g. ``h1.visible_bias``, ``h1.decoder_weight``). The file's
``__metadata__`` holds one JSON string, ``surgery.manifest``: format and version, the input
shape, the ordered layers (name, spec, in/out shapes, tensor shapes, how each was
pretrained with its per-epoch metrics and data fingerprint) and the producing recipe.
Reading a stack needs nothing beyond ``safetensors`` + ``json``; nothing is pickled.
"""

from __future__ import annotations

import json
import math
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, NonNegativeInt, ValidationError, model_validator
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from .errors import ConfigError, ManifestError, NameNotFound
from .io import atomic_path
from .layers import LayerSpec
from .version import package_version

STACK_FORMAT = "surgery.stack"
MODEL_FORMAT = "surgery.model"
FORMAT_VERSION = 1
MANIFEST_KEY = "surgery.manifest"


@dataclass
class StackLayer:
    """One pretrained layer: its spec, its tensors and how it was trained.

    ``tensors['weight']`` / ``tensors['bias']`` are the layer itself; any other entry is
    an extra that pretraining needed (visible bias, decoder weight).
    """

    name: str
    spec: LayerSpec
    tensors: dict[str, Tensor]
    pretrain: dict[str, Any] = field(default_factory=dict)

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


@dataclass
class LayerStack:
    """An ordered list of pretrained layers plus provenance; saved as one safetensors file."""
    layers: list[StackLayer] = field(default_factory=list)
    recipe: dict[str, Any] | None = None
    info: dict[str, Any] = field(default_factory=dict)

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
        """Map ``x`` through layers ``[0, upto)`` (all by default)."""
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
        """Write the stack atomically (temp file + rename) and return the path."""
        path = Path(path)
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
        prev_shape = None
        for i, lm in enumerate(_list(manifest, "layers", path)):
            where = f"{path}: manifest layer {i}"
            try:
                name = lm["name"]
                spec = LayerSpec.model_validate(lm["spec"])
                listed = lm["tensors"]
            except (KeyError, TypeError, ValidationError) as e:
                raise ManifestError(f"{where} is malformed ({_short(e)}); the file was edited or damaged.") from e
            if name in seen:
                raise ManifestError(f"{where}: duplicate layer name {name!r}.")
            seen.add(name)
            own = {}
            for key in listed:
                full = f"{name}.{key}"
                if full not in tensors:
                    raise ManifestError(f"{path}: the manifest lists tensor {full!r} but the file does not hold it.")
                own[key] = tensors.pop(full).to(device)
            for key, want in (("weight", spec.weight_shape), ("bias", (spec.out_features,))):
                if key not in own:
                    raise ManifestError(f"{path}: layer {name!r} has no {key} tensor.")
                if tuple(own[key].shape) != tuple(want):
                    raise ManifestError(
                        f"{path}: layer {name!r} tensor {key!r} has shape {tuple(own[key].shape)} "
                        f"but its spec needs {tuple(want)}."
                    )
            if prev_shape is not None and not spec.accepts(prev_shape):
                raise ManifestError(
                    f"{path}: layer {name!r} expects input {spec.input_shape} but the previous "
                    f"layer gives {prev_shape}."
                )
            prev_shape = spec.output_shape
            layers.append(StackLayer(name, spec, own, lm.get("pretrain", {})))
        if tensors:
            raise ManifestError(
                f"{path}: tensors {sorted(tensors)[:5]} are not in the manifest; the file was "
                "edited or written by another tool."
            )
        return cls(layers, manifest.get("recipe"), manifest.get("info", {}))


def _short(e: Exception) -> str:
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def _list(manifest: dict, key: str, path: Path) -> list:
    v = manifest.get(key)
    if not isinstance(v, list):
        raise ManifestError(f"{path}: manifest field {key!r} is missing or not a list.")
    return v


def weights_held(directory: Path) -> str:
    """`` (it holds a.safetensors, ...)`` naming up to four weights files in ``directory``, or ``""``."""
    held = sorted(p.name for p in directory.glob("*.safetensors"))[:4]
    return f" (it holds {', '.join(held)})" if held else ""


def _require_file(path: Path) -> None:
    """``ManifestError`` unless ``path`` is a file; a directory gets the files it holds named."""
    if path.is_dir():
        raise ManifestError(f"{path}: a directory, not a weights file{weights_held(path)}; give the .safetensors "
                            "file's path.")
    if not path.is_file():
        raise ManifestError(f"{path}: no such file.")


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The manifest alone (no tensors read)."""
    path = Path(path)
    _require_file(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise ManifestError(
            f"{path}: not a readable safetensors file ({_short(e)}); it is truncated or corrupt. "
            "Re-create it with `surgery pretrain` or `surgery assemble`."
        ) from e
    if MANIFEST_KEY not in meta:
        raise ManifestError(
            f"{path}: a safetensors file without a surgery manifest; to use foreign weights, "
            "add it under surgery.sources with a `map:` and an `import` op."
        )
    try:
        manifest = json.loads(meta[MANIFEST_KEY])
    except json.JSONDecodeError as e:
        raise ManifestError(f"{path}: the surgery manifest is not valid JSON ({e}); the file was hand-edited.") from e
    if not isinstance(manifest, dict):
        raise ManifestError(f"{path}: the surgery manifest is not a JSON object.")
    try:
        _Manifest.model_validate(manifest)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        raise ManifestError(f"{path}: the surgery manifest is damaged ({where}: {err['msg']}); the file was "
                            "edited by hand or by another tool. Re-create it with `surgery pretrain` or "
                            "`surgery assemble`.") from e
    return manifest


class _Entry(BaseModel):
    """What every reader of a manifest's layer or node takes for granted (the rest is free)."""

    model_config = ConfigDict(extra="allow", strict=True)
    name: str
    kind: str
    tensors: dict[str, list[NonNegativeInt]] = {}


class _Pretrained(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    final: dict[str, Any] = {}
    history: list[dict[str, Any]] = []


class _StackLayer(_Entry):
    activation: str
    in_shape: list[NonNegativeInt]
    out_shape: list[NonNegativeInt]
    pretrain: _Pretrained | None = None


class _Node(_Entry):
    spec: dict[str, Any] | None = None
    inputs: list[str] = []
    provenance: dict[str, Any] = {}

    @model_validator(mode="after")
    def _layer_has_spec(self) -> _Node:
        if self.kind == "layer" and self.spec is None:
            raise ValueError("a layer node needs its spec")
        return self


class _Manifest(BaseModel):
    """The frame of a manifest: its format and version, and the entries of a stack
    (``layers``) or a model (``nodes``) as :func:`describe` and the loaders read them."""

    model_config = ConfigDict(extra="allow", strict=True)
    format: str
    version: int
    input_shape: list[NonNegativeInt] | None = None
    output_shape: list[NonNegativeInt] | None = None
    layers: list[_StackLayer] = []
    nodes: list[_Node] = []
    result: dict[str, Any] | None = None


def read_safetensors(path: Path, expect: str) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """The manifest and tensors of a surgery file of format ``expect``; ``ManifestError`` names what is wrong."""
    manifest = read_manifest(path)
    fmt = manifest.get("format")
    if fmt != expect:
        what = {STACK_FORMAT: "a layer stack", MODEL_FORMAT: "an assembled model"}
        raise ManifestError(
            f"{path}: this is {what.get(fmt, repr(fmt))}, not {what.get(expect, expect)}."
        )
    version = manifest.get("version")
    if version != FORMAT_VERSION:
        raise ManifestError(
            f"{path}: manifest version {version!r}; this surgery reads version {FORMAT_VERSION}."
        )
    try:
        tensors: dict[str, Tensor] = {}
        with safe_open(str(path), framework="pt") as f:
            for k in f.keys():
                tensors[k] = f.get_tensor(k)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise ManifestError(f"{path}: tensor data is unreadable ({_short(e)}); the file is truncated or "
                            "corrupt.") from e
    for k, t in tensors.items():
        if not _all_finite(t):
            raise ManifestError(f"{path}: tensor {k!r} holds NaN or infinite values.")
    return manifest, tensors


def _all_finite(t: Tensor) -> bool:
    """Whether every value of ``t`` is finite: NaN and inf reach its min or max, so two
    reductions answer it without the full-size boolean tensor of ``isfinite`` (10x faster)."""
    if not t.is_floating_point() or t.numel() == 0:
        return True
    return all(math.isfinite(float(m)) for m in torch.aminmax(t))


def describe(manifest: dict[str, Any]) -> str:
    """A human-readable summary of a stack or model manifest."""
    lines = [f"{manifest.get('format')} v{manifest.get('version')} (surgery {manifest.get('package_version')})"]
    lines.append(f"input shape: {tuple(manifest.get('input_shape', []))}")
    if manifest.get("format") == STACK_FORMAT:
        lines.append(f"{'layer':<8} {'kind':<7} {'in':>14} {'out':>14} {'activation':<10} {'method':<10} "
                     f"{'epochs':>6}  final metrics")
        for lm in manifest.get("layers", []):
            p = lm.get("pretrain", {}) or {}
            final = p.get("final", {}) or {}
            metrics = ", ".join(f"{k}={v:.4g}" for k, v in final.items() if isinstance(v, (int, float)))
            lines.append(
                f"{lm['name']:<8} {lm['kind']:<7} {str(tuple(lm['in_shape'])):>14} "
                f"{str(tuple(lm['out_shape'])):>14} {lm['activation']:<10} "
                f"{str(p.get('method', '-')):<10} {str(p.get('epochs', '-')):>6}  {metrics}"
            )
        n = sum(math.prod(s) for lm in manifest.get("layers", []) for s in lm["tensors"].values())
        lines.append(f"{n:,} numbers in {len(manifest.get('layers', []))} layers")
    return "\n".join(lines)


def load_foreign(path: str | Path,
                 mapping: dict[str, tuple[str, bool]]) -> tuple[dict[str, Tensor], dict[str, list[str]]]:
    """Tensors of a foreign weights file renamed by ``mapping`` (src key -> (dest, transpose)).

    Accepts any ``.safetensors`` file, or a torch state dict (``.pt``/``.pth``/``.bin``) read
    with ``torch.load(weights_only=True)``, torch's restricted loader that admits tensors
    and plain containers only. Returns the renamed tensors and a report with ``loaded``,
    ``skipped`` (in the file, not mapped) and ``missing`` (mapped, not in the file).
    """
    path = Path(path)
    _require_file(path)
    raw: dict[str, Tensor] = {}
    if path.suffix == ".safetensors":
        try:
            with safe_open(str(path), framework="pt") as f:
                for k in f.keys():
                    raw[k] = f.get_tensor(k)
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise ManifestError(f"{path}: not a readable safetensors file ({_short(e)}).") from e
    else:
        try:
            with warnings.catch_warnings():  # its note on a pickle's protocol is noise beside our error
                warnings.filterwarnings("ignore", message="Detected pickle protocol")
                obj = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises many types for bad files
            raise ManifestError(
                f"{path}: cannot read it as a torch state dict with weights_only=True ({_short(e)}); "
                "convert it to safetensors."
            ) from e
        if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
            obj = obj["state_dict"]
        if not isinstance(obj, dict):
            raise ManifestError(f"{path}: holds a {type(obj).__name__}, not a state dict of tensors.")
        raw = {k: v for k, v in obj.items() if isinstance(v, Tensor)}
    out: dict[str, Tensor] = {}
    report: dict[str, list[str]] = {"loaded": [], "skipped": [], "missing": []}
    for src, (dest, transpose) in mapping.items():
        if src not in raw:
            report["missing"].append(src)
            continue
        t = raw[src].detach().float()
        out[dest] = (t.t() if transpose else t).contiguous()
        report["loaded"].append(f"{src} -> {dest}" + (" (transposed)" if transpose else ""))
    report["skipped"] = sorted(set(raw) - set(mapping))
    return out, report
