"""Fine-tuning checkpoints: one safetensors file with JSON metadata, never pickle.

Tensors: ``model.<name>`` (the current weights), ``best.<name>`` (the best epoch's),
``opt.<param index>.<key>`` (optimizer state tensors) and ``rng.<stream>`` (generator
states); the metadata key ``surgery.checkpoint`` holds the loop state, the history, the
optimizer's param groups and non-tensor state, and the config. Written atomically, so a
kill mid-write leaves the previous checkpoint whole.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from .errors import CheckpointError
from .io import atomic_path

META_KEY = "surgery.checkpoint"
# A population member's own checkpoint, beside a lone run's ``last.safetensors``: its slice of
# the stacked weights, best weights and optimizer state (``model.<kind>.<i>``), its generators.
MEMBER_CHECKPOINT = "member.safetensors"


@dataclass
class Checkpoint:
    """What a checkpoint holds, as plain values (tensors on the CPU)."""

    model: dict[str, Tensor]
    best: dict[str, Tensor] | None
    optimizer: dict[str, Any]
    rng: dict[str, Tensor]
    meta: dict[str, Any] = field(default_factory=dict)


def _optimizer_tensors(osd: dict[str, Any]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    tensors: dict[str, Tensor] = {}
    scalars: dict[str, Any] = {}
    for pid, st in osd["state"].items():
        for k, v in st.items():
            if isinstance(v, Tensor):
                tensors[f"opt.{pid}.{k}"] = v.detach().cpu().contiguous()
            else:
                scalars[f"{pid}.{k}"] = v
    return tensors, scalars


def save_checkpoint(path: Path, ck: Checkpoint) -> Path:
    """Write ``ck`` to ``path`` atomically."""
    t = {f"model.{k}": v.detach().cpu().contiguous() for k, v in ck.model.items()}
    if ck.best is not None:
        t.update({f"best.{k}": v.detach().cpu().contiguous() for k, v in ck.best.items()})
    opt_tensors, scalars = _optimizer_tensors(ck.optimizer)
    t.update(opt_tensors)
    t.update({f"rng.{k}": v.cpu() for k, v in ck.rng.items()})
    meta = {**ck.meta, "opt_groups": ck.optimizer["param_groups"], "opt_scalars": scalars}
    with atomic_path(path) as tmp:
        save_file(t, str(tmp), metadata={META_KEY: json.dumps(meta, default=float)})
    return path


def read_checkpoint(path: Path) -> Checkpoint:
    """Read a checkpoint; ``CheckpointError`` names the file when it is missing or corrupt."""
    if not path.is_file():
        raise CheckpointError(f"--resume: no checkpoint at {path}; run without --resume, or set "
                              "finetune.checkpoint_every.")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {})[META_KEY])
            t = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises several types for truncated or foreign files
        raise CheckpointError(f"{path}: unreadable checkpoint ({type(e).__name__}: {e}); delete it and "
                              "start again without --resume.") from e
    state: dict[int, dict[str, Any]] = {}
    for k, v in t.items():
        if k.startswith("opt."):
            _, pid, key = k.split(".", 2)
            state.setdefault(int(pid), {})[key] = v
    for k, v in meta.pop("opt_scalars", {}).items():
        pid, key = k.split(".", 1)
        state.setdefault(int(pid), {})[key] = v
    return Checkpoint(
        model={k[6:]: v for k, v in t.items() if k.startswith("model.")},
        best={k[5:]: v for k, v in t.items() if k.startswith("best.")} or None,
        optimizer={"state": state, "param_groups": meta.pop("opt_groups", [])},
        rng={k[4:]: v for k, v in t.items() if k.startswith("rng.")},
        meta=meta,
    )


def read_checkpoint_meta(path: Path) -> dict[str, Any] | None:
    """A checkpoint's metadata alone (loop state, history, config; no tensors read), or
    None when ``path`` is missing or unreadable."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {})[META_KEY])
    except Exception:  # missing, truncated or foreign: the caller says what it can without it
        return None
    return meta if isinstance(meta, dict) else None


def mismatch(saved: dict[str, Tensor], model: nn.Module, limit: int = 4) -> str:
    """What differs between saved tensors and a module's, for an error message: missing
    and unexpected names and shape disagreements, the first ``limit`` of each."""
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    have = {k: tuple(v.shape) for k, v in saved.items()}
    parts = []
    missing = [k for k in want if k not in have]
    extra = [k for k in have if k not in want]
    shapes = [f"{k} {have[k]} in the checkpoint, {want[k]} in the "
              "model" for k in want if k in have and have[k] != want[k]]
    for label, items in (("missing", missing), ("unexpected", extra), ("different shape", shapes)):
        if items:
            more = f" and {len(items) - limit} more" if len(items) > limit else ""
            parts.append(f"{label}: {', '.join(items[:limit])}{more}")
    return "; ".join(parts)


def load_model_state(path: Path, model: nn.Module, state: dict[str, Tensor]) -> None:
    """Load ``state`` into ``model``; ``CheckpointError`` lists the mismatching tensors."""
    diff = mismatch(state, model)
    if diff:
        raise CheckpointError(
            f"{path}: the checkpoint was made for another network ({diff}). Was the recipe changed? "
            "Resume with the recipe that made it, or start again without --resume."
        )
    model.load_state_dict(state)


def rng_states(shuffle: torch.Generator, device: torch.device) -> dict[str, Tensor]:
    """The generator states a resumed run needs to draw what an uninterrupted one would."""
    out = {"cpu": torch.get_rng_state(), "shuffle": shuffle.get_state()}
    if device.type == "cuda":
        out["cuda"] = torch.cuda.get_rng_state(device)
    return out


def restore_rng(rng: dict[str, Tensor], shuffle: torch.Generator, device: torch.device) -> None:
    """Put back what :func:`rng_states` saved."""
    torch.set_rng_state(rng["cpu"])
    shuffle.set_state(rng["shuffle"])
    if "cuda" in rng and device.type == "cuda":
        torch.cuda.set_rng_state(rng["cuda"], device)


def save_generator_state(path: Path, state: Tensor) -> Path:
    """Write a generator's state (``torch.Generator.get_state()``) atomically."""
    with atomic_path(path) as tmp:
        save_file({"state": state.cpu().contiguous()}, str(tmp))
    return path


def read_generator_state(path: Path) -> Tensor:
    """What :func:`save_generator_state` wrote; ``CheckpointError`` names the file when it is
    missing or unreadable."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return f.get_tensor("state")
    except Exception as e:  # missing, truncated or foreign
        raise CheckpointError(f"{path}: unreadable generator state ({type(e).__name__}: {e}).") from e
