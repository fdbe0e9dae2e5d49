"""What an experiment directory holds so far, for ``surgery inspect DIR``: a paper protocol
runs for hours and resumes where it stopped, and its owner wants to know how far it got
without reading logs.

Read only from the files a run writes: ``experiment.json`` (the recipe and the number of
cells), ``tuning/<key>/`` and ``cells/<key>/`` (``result.json`` once finished, the
per-epoch ``metrics.jsonl`` while training) and ``stacks/<key>/`` (a ``depthN`` snapshot
per pretrained layer, ``pretrain.json`` once whole). Tuning trials show their validation
error only: they are chosen by it, and a test error shown beside them invites choosing by
the test set.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

from .errors import SurgeryError
from .stack import weights_held


def _read(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None  # being written, or damaged: left out of the counts


def _last_epoch(path: Path) -> dict[str, Any] | None:
    try:
        lines = path.read_text().splitlines()
        return json.loads(lines[-1]) if lines else None
    except (OSError, ValueError):
        return None


def _runs(root: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """The finished runs' results under ``root`` and a line for each one still training."""
    done, running = [], []
    for d in sorted(p for p in root.glob("*") if p.is_dir()) if root.is_dir() else []:
        result = _read(d / "result.json")
        if isinstance(result, dict):
            done.append(result)
            continue
        last = _last_epoch(d / "metrics.jsonl")
        recipe = _read(d / "recipe.json")
        name = recipe.get("name", d.name) if isinstance(recipe, dict) else d.name
        if last is not None:
            valid = last.get("valid_error")
            running.append(f"{root.name}/{d.name} ({name}): epoch {last.get('epoch')}"
                           + (f", validation {valid:.2f}%" if isinstance(valid, (int, float)) else ""))
    return done, running


def _layers(n: int) -> str:
    return f"{n} layer" + ("s" if n != 1 else "")


def _span(values: list[float]) -> str:
    lo, hi = min(values), max(values)
    return f"{lo:.2f}%" if lo == hi else f"{lo:.2f}-{hi:.2f}%"


def is_experiment_dir(path: Path) -> bool:
    """Whether ``path`` is (or was started as) an experiment's output directory."""
    return (path / "experiment.json").is_file() or any((path / d).is_dir() for d in ("cells", "tuning", "stacks"))


def describe_run(out: Path) -> list[str]:
    """Lines saying what the experiment directory ``out`` holds: pretrained stacks, tuning
    trials (per arm and depth, with their validation errors), finished cells and what is
    training now. ``SurgeryError`` when ``out`` is no experiment directory."""
    out = Path(out)
    if not is_experiment_dir(out):
        raise SurgeryError(f"{out}: a directory that is not an experiment's (no experiment.json, cells/, tuning/ or "
                           f"stacks/); give a .safetensors file{weights_held(out)} or an experiment's --out directory.")
    meta = _read(out / "experiment.json")
    exp = (meta or {}).get("recipe", {}).get("experiment") or {}
    lines = [f"{out}: experiment {(meta or {}).get('recipe', {}).get('name', '')}".rstrip()]
    stacks = [d for d in sorted((out / "stacks").glob("*")) if d.is_dir()] if (out / "stacks").is_dir() else []
    if stacks:
        whole = sum((d / "pretrain.json").is_file() for d in stacks)
        lines.append(f"pretrained stacks: {whole} whole" + "".join(
            f"; {d.name}: {_layers(len(list(d.glob('depth*.safetensors'))))} so far" for d in stacks
            if not (d / "pretrain.json").is_file()))
    trials, tuning_now = _runs(out / "tuning")
    planned = (exp.get("tune") or {}).get("trials")
    by_arm: dict[tuple[str, int], list[float]] = defaultdict(list)
    for r in trials:
        if isinstance(r.get("valid_error"), (int, float)):
            by_arm[(str(r.get("condition")), int(r.get("depth", 0)))].append(float(r["valid_error"]))
    for (arm, depth), vals in sorted(by_arm.items()):
        of = f" of {planned}" if planned else ""
        lines.append(f"tuning {arm} d{depth}: {len(vals)}{of} trials finished, validation {_span(vals)}")
    cells, cells_now = _runs(out / "cells")
    total = meta.get("cells") if isinstance(meta, dict) else None
    if total and len(cells) > total:  # runs of other seed lists shared the directory
        lines.append(f"cells: {len(cells)} finished (the last run planned {total})")
    else:
        lines.append(f"cells: {len(cells)}{f' of {total}' if total else ''} finished")
    lines += [f"unfinished (training now, or stopped): {x}" for x in tuning_now + cells_now]
    if total and len(cells) >= total:
        lines.append(f"finished: results in {out}/results.csv, report in {out}/report.md")
    return lines
