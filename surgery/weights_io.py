"""Reading surgery's weights files and foreign ones, nothing trusted before it is checked.

A layer stack or an assembled model is one ``.safetensors`` file whose ``__metadata__`` holds
one JSON string, ``surgery.manifest``. :func:`read_manifest` reads that manifest alone and
validates its frame (format, version, shapes, each layer's or node's name, kind, tensors,
spec), so a file edited by hand or by another tool is one ``ManifestError`` naming the
damaged field, not a ``KeyError`` deep in a loader; :func:`read_safetensors` adds the
tensors (every one finite). :func:`load_foreign` reads another tool's weights (safetensors,
or a torch state dict with ``weights_only=True``: never unpickled). :func:`describe` is
the summary ``surgery inspect`` prints, :func:`describe_foreign` its listing of another
tool's file.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, NonNegativeInt, ValidationError, model_validator
from safetensors import SafetensorError, safe_open
from torch import Tensor

from .errors import ManifestError

STACK_FORMAT = "surgery.stack"
MODEL_FORMAT = "surgery.model"
FORMAT_VERSION = 1
MANIFEST_KEY = "surgery.manifest"


def first_line(e: Exception) -> str:
    """The first line of ``e``'s message (its type's name if it has none), for one-paragraph errors."""
    return str(e).splitlines()[0] if str(e) else type(e).__name__

def weights_held(directory: Path) -> str:
    """`` (it holds a.safetensors, ...)`` naming up to four weights files in ``directory``, or ``""``."""
    held = sorted(p.name for p in directory.glob("*.safetensors"))[:4]
    return f" (it holds {', '.join(held)})" if held else ""


def _require_file(path: Path) -> None:
    """``ManifestError`` unless ``path`` is a file; a directory gets the files it holds named."""
    if path.is_dir():
        raise ManifestError(f"{path}: a directory, not a weights file{weights_held(path)}; give the .safetensors "
                            "file's path.")
    if path.exists() and not path.is_file():
        raise ManifestError(f"{path}: not a regular file (a device, pipe or socket); give a .safetensors file's path.")
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
            f"{path}: not a readable safetensors file ({first_line(e)}); it is truncated or corrupt. "
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
        fix = {(STACK_FORMAT, MODEL_FORMAT): " A network with a head is made of a stack's layers by a recipe's "
                                             "surgery: section (its sources name the stack; `surgery assemble` "
                                             "saves it).",
               (MODEL_FORMAT, STACK_FORMAT): " To take a model's layers into another network, name the file under "
                                             "a recipe's surgery.sources (op: take or transplant)."}
        raise ManifestError(
            f"{path}: this is {what.get(fmt, repr(fmt))}, not {what.get(expect, expect)}.{fix.get((fmt, expect), '')}"
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
        raise ManifestError(f"{path}: tensor data is unreadable ({first_line(e)}); the file is truncated or "
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


def _foreign_tensors(path: Path) -> dict[str, Tensor]:
    """Every tensor of a foreign weights file by name (see :func:`load_foreign`)."""
    _require_file(path)
    if path.suffix == ".safetensors":
        try:
            with safe_open(str(path), framework="pt") as f:
                return {k: f.get_tensor(k) for k in f.keys()}
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise ManifestError(f"{path}: not a readable safetensors file ({first_line(e)}).") from e
    try:
        with warnings.catch_warnings():  # its note on a pickle's protocol is noise beside our error
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for bad files
        raise ManifestError(
            f"{path}: cannot read it as a torch state dict with weights_only=True ({first_line(e)}); "
            "convert it to safetensors."
        ) from e
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise ManifestError(f"{path}: holds a {type(obj).__name__}, not a state dict of tensors.")
    return {k: v for k, v in obj.items() if isinstance(v, Tensor)}


FOREIGN_SUFFIXES = (".pt", ".pth", ".bin")  # torch state dicts, read with weights_only=True


def is_foreign(path: str | Path) -> bool:
    """Whether ``path`` is another tool's weights file: a torch state dict by its name, or a
    readable ``.safetensors`` file without a surgery manifest."""
    path = Path(path)
    if not path.is_file():
        return False
    if path.suffix in FOREIGN_SUFFIXES:
        return True
    try:
        with safe_open(str(path), framework="pt") as f:
            return MANIFEST_KEY not in (f.metadata() or {})
    except (SafetensorError, OSError, ValueError):
        return False  # unreadable: read_manifest says so


# safetensors' names of its element types, as torch names them
_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
           "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}


def _foreign_shapes(path: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """Each tensor's shape and element type in a foreign weights file: from a safetensors
    header alone (no tensor read), or from a loaded state dict."""
    if path.suffix != ".safetensors":
        return {k: (tuple(t.shape), str(t.dtype).removeprefix("torch.")) for k, t in _foreign_tensors(path).items()}
    _require_file(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            slices = {k: f.get_slice(k) for k in f.keys()}
            return {k: (tuple(s.get_shape()), _DTYPES.get(s.get_dtype(), s.get_dtype())) for k, s in slices.items()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise ManifestError(f"{path}: not a readable safetensors file ({first_line(e)}).") from e


def describe_foreign(path: str | Path) -> str:
    """What ``surgery inspect`` prints for a foreign weights file: its tensors (name, shape,
    type) and the recipe lines that import its first weight and bias as a layer."""
    path = Path(path)
    raw = _foreign_shapes(path)
    if list(raw) == ["state"] and raw["state"][1] == "uint8":  # ours: save_generator_state's
        return (f"{path}: a random generator's state ({math.prod(raw['state'][0]):,} bytes), not weights: a "
                "greedy stack keeps one after each layer (rngN beside depthN) so that its pretraining continues "
                "there.")
    width = max((len(k) for k in raw), default=0)
    lines = [f"{path}: foreign weights (no surgery manifest), {len(raw)} tensor{'s' if len(raw) != 1 else ''}, "
             f"{sum(math.prod(shape) for shape, _ in raw.values()):,} numbers"]
    lines += [f"  {k:<{width}}  {str(shape):>14}  {dtype}" for k, (shape, dtype) in raw.items()]
    weight = next((k for k, (shape, _) in raw.items() if len(shape) == 2 and k.endswith("weight")), None)
    if weight is not None:
        bias = weight.removesuffix("weight") + "bias"
        pair = f"{weight}: h1.weight" + (f", {bias}: h1.bias" if bias in raw else "")
        lines.append(f"to use {weight} as a layer h1 (dense [out, in]; transpose: true for [in, out]): surgery: "
                     f"{{sources: {{w: {{path: {path.name}, map: {{{pair}}}}}}}, ops: [{{op: import, source: w, "
                     "layers: [h1]}, ...]}")
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
    raw = _foreign_tensors(path)
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
