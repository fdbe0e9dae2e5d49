"""The kinds of output directory: an experiment's, a single run's, a search's, and the merge
``surgery compare --out`` writes. How each is told by the files in it, and the checks that
keep one kind from writing into another's (their files would mix, or replace each other's).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from .errors import ManifestError, OutputError, SurgeryError
from .io import RERUN, read_json

# Per kind: the files (a trailing / marks a directory) its runs write there.
RUN_FILES: dict[str, tuple[str, ...]] = {
    "experiment": ("experiment.json", "cells/", "stacks/", "tuning/"),
    "single run": ("result.json", "metrics.jsonl", "checkpoints/", "pretrain/"),
    "search": ("search.json", "search.db", "trials/"),
}


def present(out: Path, names: tuple[str, ...]) -> list[str]:
    """Those of ``names`` that ``out`` holds (``x/`` a directory, ``x`` a file)."""
    return [n for n in names if ((out / n[:-1]).is_dir() if n.endswith("/") else (out / n).is_file())]


def is_experiment_dir(path: Path) -> bool:
    """Whether ``path`` is (or was started as) an experiment's output directory."""
    return bool(present(path, RUN_FILES["experiment"]))


def is_single_run_dir(path: Path) -> bool:
    """Whether ``path`` is (or was started as) the output directory of one run (``surgery
    run`` or ``finetune`` of a recipe without an experiment)."""
    return bool(present(path, RUN_FILES["single run"]))


def is_search_dir(path: Path) -> bool:
    """Whether ``path`` is (or was started as) a search's output directory."""
    return bool(present(path, RUN_FILES["search"]))


def is_merge_dir(path: Path) -> bool:
    """Whether ``path`` holds what ``surgery compare --out`` wrote (its experiment.json names
    the directories merged)."""
    try:
        meta = read_json(path / "experiment.json") if (path / "experiment.json").is_file() else None
    except SurgeryError:
        return False
    return isinstance(meta, dict) and isinstance(meta.get("merged_from"), list)


def experiment_meta(d: Path) -> dict[str, Any]:
    """What ``d/experiment.json`` records (an experiment's recipe, cells, data fingerprints;
    a merge's ``merged_from``), checked for the shape its readers rely on: an object whose
    ``recipe``, and that recipe's ``experiment`` and ``data``, are objects where given. ``{}``
    when there is none; ``ManifestError`` naming the file and field when it is damaged."""
    p = d / "experiment.json"
    if not p.is_file():
        return {}
    meta = read_json(p, RERUN)
    recipe = meta.get("recipe")
    parts = [("recipe", recipe)] + ([(f"recipe.{k}", recipe.get(k)) for k in ("experiment", "data")]
                                    if isinstance(recipe, dict) else [])
    for where, value in parts:
        if value is not None and not isinstance(value, dict):
            raise ManifestError(f"{p}: its {where} is a JSON {type(value).__name__}, not an object; the file is "
                                f"damaged.{RERUN}")
    return meta


def read_result(path: Path) -> dict[str, Any]:
    """A run's (or a cell's) ``result.json``, its numbers checked: test error and epochs
    there, errors and seconds numbers (or null), epochs whole numbers; ``ManifestError``
    naming the first that is not (ours are written whole: it was damaged from outside)."""
    result = read_json(path)
    for key, kinds in (("test_error", (int, float)), ("epochs", int), ("best_epoch", int), *(
            (k, (int, float, type(None))) for k in ("valid_error", "train_error", "seconds", "pretrain_seconds",
                                                     "finetune_seconds"))):
        value = result.get(key)
        if (key in result or key in ("test_error", "epochs")) and (not isinstance(value, kinds)
                                                                    or isinstance(value, bool)):
            raise ManifestError(f"{path}: {key} is {value!r}, not a number; the file is damaged.")
    return result


class _Trial(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    condition: str
    depth: int
    params: dict[str, Any] = {}


class _Step(_Trial):
    step: str
    so_far: float | int


class _Tuning(BaseModel):
    """What the readers of ``tuning.json`` (compare, the report) take for granted."""

    model_config = ConfigDict(extra="allow", strict=True)
    metric: str
    trials_per_arm: int
    seeds: int = 1  # a trial's runs, one a seed (files written before tune.seeds have no such key)
    trials: list[_Trial]
    then: list[dict[str, Any]] = []  # experiment.tune.then (files written before it have none)
    steps: list[_Step] = []

    @model_validator(mode="after")
    def _best_rows_scored(self) -> _Tuning:
        for i, t in enumerate(self.trials):
            if "best_trial" in (t.model_extra or {}) and not isinstance((t.model_extra or {}).get(self.metric),
                                                                         (int, float)):
                raise ValueError(f"trials.{i}: a best trial without a numeric {self.metric}")
        for i, s in enumerate(self.steps):
            extra = s.model_extra or {}
            if not (extra.get("skipped") or extra.get("diverged")) and not isinstance(extra.get(self.metric),
                                                                                      (int, float)):
                raise ValueError(f"steps.{i}: a step's run without a numeric {self.metric}")
        return self


def read_tuning(path: Path) -> dict[str, Any]:
    """An experiment's ``tuning.json`` (every trial of ``experiment.tune``), checked for the
    shape compare and the report rely on; ``ManifestError`` naming the field when damaged."""
    record = read_json(path, RERUN)
    try:
        _Tuning.model_validate(record)
    except ValidationError as e:
        err = e.errors()[0]
        where = "".join(f"{p}: " for p in [".".join(str(p) for p in err["loc"])] if p)
        raise ManifestError(f"{path}: {where}{err['msg'].removeprefix('Value error, ')}; the file is damaged."
                            f"{RERUN}") from None
    return record


def _a(kind: str) -> str:
    return f"{'an' if kind[0] == 'e' else 'a'} {kind}"


def check_own_out(out: Path, kind: str) -> None:
    """``OutputError`` when ``out`` holds the files of another kind of run than ``kind`` (an
    experiment, a single run or a search) and none of its own: they would mix; or holds the
    merge `surgery compare --out` wrote, whose results a run's would replace."""
    if is_merge_dir(out):
        raise OutputError(f"{out}: holds the results `surgery compare` merged from other directories; "
                          f"{_a(kind)}'s would replace them. Give the {kind.split()[-1]} its own --out.")
    if present(out, RUN_FILES[kind]):
        return  # its own: continued, or added to
    for other, files in RUN_FILES.items():
        if other != kind and present(out, files):
            raise OutputError(f"{out}: holds {_a(other)}'s files ({', '.join(files[:-1])} or {files[-1]}); "
                              f"{_a(kind)}'s would go beside them. Give the {kind.split()[-1]} its own --out.")


def check_merge_out(out: Path, dirs: list[Path]) -> None:
    """``OutputError`` when writing a merge into ``out`` would replace what a run made there:
    ``out`` holds files a run wrote (an experiment's cells, a single run's or a search's),
    whether or not it is one of the directories merged. A new directory, or an earlier
    merge's (one of those merged too: runs added to it in place), is fine."""
    made = [f for files in RUN_FILES.values() for f in present(out, files) if f != "experiment.json"]
    if made and any(out.resolve() == d.resolve() for d in dirs):
        raise OutputError(f"compare: --out {out} is one of the directories merged, and a run trained there "
                          f"({', '.join(made)}); the merge would replace its own results.csv and report. Give a "
                          "new directory (each merged one keeps its own).")
    if made:
        raise OutputError(f"compare: --out {out} holds a run's files ({', '.join(made)}); the merge's results.csv "
                          "and report would replace or mix with that run's. Give a new directory, or one an earlier "
                          "`compare --out` made.")


def recipe_source(d: Path, meta: dict) -> str:
    """The directory whose recipe ``d``'s experiment.json (``meta``) records: ``d`` for a run's;
    for a merge's, the first directory merged, followed back through earlier merges (its
    ``recipe_from``; the first of ``merged_from`` where an older compare wrote none)."""
    if not isinstance(meta.get("merged_from"), list) or not meta["merged_from"]:
        return str(d)
    return str(meta.get("recipe_from") or meta["merged_from"][0])


def merged_from(out: Path, dirs: list[Path], meta: dict) -> list[str]:
    """A merge's ``merged_from``: the directories merged, ``out`` among them (runs added to an
    earlier merge in place; ``meta`` its experiment.json) standing for those it lists."""
    names = [name for d in dirs
             for name in (meta.get("merged_from", []) if d.resolve() == out.resolve() else [d])]
    return list(dict.fromkeys(map(str, names)))
