"""An experiment's results: ``results.csv`` (a row per cell: arm, depth, seed, errors, times,
the cell's directory) written and read back, and several experiment directories' merged
for ``surgery compare``, with what the merge should say: runs a later directory replaces,
arms whose runs were made with other settings (two protocols in one mean), runs it could
not check that way, and directories that ran on other data (refused)."""

from __future__ import annotations

import csv
from collections import Counter
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from .errors import ManifestError, SurgeryError
from .experiment_config import recorded_experiment
from .io import RERUN, read_json, write_text
from .outdirs import experiment_meta, is_experiment_dir, is_single_run_dir

RESULT_FIELDS = ["condition", "depth", "seed", "train_error", "valid_error", "test_error", "epochs",
                 "best_epoch", "pretrain_seconds", "finetune_seconds", "cell", "path"]


def write_results_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    """Write the result rows to ``path`` (CSV, atomically)."""
    import io

    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=RESULT_FIELDS)
    w.writeheader()
    for r in rows:
        w.writerow({k: r.get(k) for k in RESULT_FIELDS})
    write_text(path, buf.getvalue())


def _no_results(d: Path) -> str:
    """Why ``d`` has no results.csv, and what to do."""
    if d.is_file():  # its results.csv, or a report, given in place of the directory
        hint = f" (its directory is {d.parent})" if d.name in ("results.csv", "report.md", "experiment.json") else ""
        return (f"{d}: a file, not an experiment directory{hint}; compare takes the --out directories that "
                "`surgery run` wrote for recipes with an experiment: section.")
    if is_single_run_dir(d) and not is_experiment_dir(d):
        return (f"{d}: a single run's directory, not an experiment's; compare merges the --out directories of "
                "recipes with an experiment: section (`surgery inspect DIR` shows a single run).")
    if is_experiment_dir(d):
        return (f"{d}: an experiment that has not finished (no results.csv yet); `surgery inspect {d}` says how far "
                f"it got, and `surgery run RECIPE --out {d}` finishes it (finished cells are kept).")
    return f"{d}: no results.csv; run `surgery run RECIPE --out {d}` first."


def read_results(dirs: str | Path | list[str | Path]) -> list[dict[str, Any]]:
    """The result rows of one experiment directory or several; later directories win for
    the same (condition, depth, seed)."""
    return merge_results(dirs)[0]


def merge_results(dirs: str | Path | list[str | Path]) -> tuple[list[dict[str, Any]], list[str]]:
    """:func:`read_results`, and a line for each directory whose runs replaced an earlier
    one's for the same (condition, depth, seed), and a warning for each arm whose runs came
    with other settings from different directories. ``SurgeryError`` when the directories ran on
    different data (their ``experiment.json`` say so): their errors would not be comparable."""
    dirs = [Path(dirs)] if isinstance(dirs, (str, Path)) else [Path(d) for d in dirs]
    if len(dirs) > 1:
        _check_same_data(dirs)
    merged: dict[tuple[str, int, int], dict[str, Any]] = {}
    origin: dict[tuple[str, int, int], Path] = {}  # the directory each merged row came from
    notes = []
    for d in dirs:
        rows = _read_rows(d)
        again = sorted((r["condition"], r["depth"], r["seed"]) for r in rows
                       if (r["condition"], r["depth"], r["seed"]) in merged)
        if again:
            shown = ", ".join(f"{c} d{dp} s{s}" for c, dp, s in again[:6]) + (" ..." if len(again) > 6 else "")
            notes.append(f"compare: {len(again)} run(s) of {d} replace earlier directories' ({shown}); "
                         "a later directory wins for the same cell.")
        merged.update({(r["condition"], r["depth"], r["seed"]): r for r in rows})
        origin.update({(r["condition"], r["depth"], r["seed"]): d for r in rows})
    if len(set(origin.values())) > 1:
        notes += _mixed_protocols(merged, origin) + _unchecked(merged, origin)
    return list(merged.values()), notes


def _unchecked(merged: dict[tuple[str, int, int], dict[str, Any]],
               origin: dict[tuple[str, int, int], Path]) -> list[str]:
    """A note for each directory some of whose merged runs the protocol check could not read
    (no ``experiment.json``, or their cell directories gone, as for a published report): the
    absence of a warning says nothing about them."""
    lines = []
    for d, n in Counter(origin.values()).items():
        if not (d / "experiment.json").is_file():
            why, k = "it has no experiment.json, so neither their data nor their settings can be read", n
        else:
            k = sum(1 for key, row in merged.items() if origin[key] == d
                    and not (row.get("path") and (Path(row["path"]) / "recipe.json").is_file()))
            why = "their cell directories are not here"
        if k:
            lines.append(f"compare: {k} of the {n} runs merged from {d} could not be checked against the other "
                         f"directories' settings ({why}); had they run another protocol, nothing here would say so.")
    return lines


# Fields that change where or how a run is watched or kept, not its numbers.
_NOT_PROTOCOL = {"name", "seed", "device", "progress", "checkpoint_every"}


def _mixed_protocols(merged: dict[tuple[str, int, int], dict[str, Any]],
                     origin: dict[tuple[str, int, int], Path]) -> list[str]:
    """A line for each arm whose merged runs were made with different settings in different
    directories (a cell's fine-tuning, data and surgery, its arm's pretraining), naming the
    first field that differs and the directories: their mean, or their depth curve, would mix
    two protocols. At one depth every setting counts; between depths only what does not
    depend on depth (not the layers' list or the surgery). Values a directory's
    ``experiment.tune`` chose may differ (each directory chose its own by the same budget)."""
    arms = {d: _arm_settings(d) for d in set(origin.values())}
    # the first run of an arm (depth None), and of an arm at a depth
    first: dict[tuple[str, int | None], tuple[Path, int, dict[str, Any]]] = {}
    said: set[tuple[str, Path, Path, bool]] = set()  # (arm, first directory, this one, same depth): once each
    found: dict[tuple[str, str, Path, str, Path], list[str]] = {}  # a difference -> the arms and depths it is in
    for (arm, depth, seed), row in sorted(merged.items()):
        d = origin[(arm, depth, seed)]
        settings = _cell_settings(row, arm, arms[d])
        if settings is None:
            continue  # nothing to compare
        first.setdefault((arm, None), (d, depth, settings))
        d0, depth0, settings0 = first.setdefault((arm, depth), (d, depth, settings))
        if d0 == d:
            d0, depth0, settings0 = first[(arm, None)]  # none at this depth from elsewhere: the arm's first run
        pair = (arm, d0, d, depth0 == depth)
        if d0 == d or pair in said:
            continue
        tuned = arms[d0][0] + arms[d][0]  # type: ignore[index]  # both were read, or settings would be None
        diff = sorted(k for k in settings0.keys() | settings.keys()
                      if settings0.get(k) != settings.get(k) and not _tuned(k, tuned)
                      and (depth0 == depth or _same_at_any_depth(k, settings0, settings))
                      and _described_in_both(k, settings0, settings))
        if diff:
            said.add(pair)
            k = diff[0]
            where = f"{arm} d{depth}" if depth0 == depth else f"{arm} d{depth0} and d{depth}"
            found.setdefault((k, repr(settings0.get(k)), d0, repr(settings.get(k)), d), []).append(where)
    return [f"compare: warning: the runs merged for {', '.join(dict.fromkeys(where))} differ in {k} ({a} in {da}, {b} "
            f"in {db}): their means and intervals mix two protocols. Merge runs of one recipe (seeds or arms run "
            "apart), or rerun one of them with the other's settings."
            for (k, a, da, b, db), where in found.items()]


def _described_in_both(key: str, a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether both runs' settings can say what ``key`` was: an arm's ``experiment.*``
    settings are missing for the runs of an earlier merge whose recipe (its first
    directory's) has not that arm, which is no difference of protocol."""
    return not key.startswith("experiment.") or (key in a and key in b)


def _tuned(key: str, tuned: list[str]) -> bool:
    """Whether ``key`` holds a value ``experiment.tune`` chose: a tuned path, or the method's
    default for a tuned layer setting (``pretrain.layers.*.lr`` sets ``experiment.methods.M.lr``)."""
    name = key.rsplit(".", 1)[-1]
    return any(fnmatch(key, t) or (key.startswith("experiment.methods.") and t.startswith("pretrain.layers.")
                                   and t.rsplit(".", 1)[-1] == name) for t in tuned)


def _same_at_any_depth(key: str, a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether runs of one arm at two depths should agree on ``key``: all but the surgery and
    the layers one of them lacks (a greedy stack's lower layers are trained alike)."""
    return not key.startswith("surgery.") and (not key.startswith("pretrain.layers.") or (key in a and key in b))


def _cell_settings(row: dict[str, Any], arm: str,
                   recorded: tuple[list[str], dict[str, Any]] | None) -> dict[str, Any] | None:
    """The settings one merged run was made with, flat (its cell's recipe and its arm's
    pretraining, without what changes only where or how it is watched); None when its cell
    directory or its directory's experiment.json cannot be read."""
    try:
        cell = read_json(Path(row["path"]) / "recipe.json", RERUN) if row.get("path") else None
    except ManifestError:
        cell = None  # its cell directory is gone or damaged (the report says whose curves are missing)
    if not isinstance(cell, dict) or recorded is None:
        return None
    return {k: v for k, v in _flat({**cell, **recorded[1].get(arm, {})}).items()
            if k.rsplit(".", 1)[-1] not in _NOT_PROTOCOL}


def _arm_settings(d: Path) -> tuple[list[str], dict[str, Any]] | None:
    """Directory ``d``'s tuned paths and, for each of its arms, what makes its pretraining
    and widths by the paths its recipe holds them at (its ``experiment.json``); None when
    that cannot be read."""
    try:
        exp = recorded_experiment(read_json(d / "experiment.json", RERUN)["recipe"]["experiment"])
    except (ManifestError, ValidationError, KeyError, TypeError):
        return None
    tuned = [p for p in (exp.tune.params if exp.tune is not None else {})]
    by_arm = {}
    for name, arm in exp.arms().items():
        method = {"none": None}.get(arm.method, arm.method)
        pretraining = {"experiment.pretrain_epochs": exp.pretrain_epochs,
                       f"experiment.methods.{method}": exp.methods.get(method)} if method else {}
        by_arm[name] = {f"experiment.conditions.{name}": arm.model_dump(mode="json", exclude={"finetune", "data"}),
                        "experiment.hidden": arm.hidden or exp.hidden,
                        "experiment.activation": arm.activation or exp.activation, **pretraining}
    return tuned, by_arm


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``d`` as dotted paths to values, lists of mappings by index (``pretrain.layers.0.lr``)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
            v = dict(enumerate(v))
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def _check_same_data(dirs: list[Path]) -> None:
    """``SurgeryError`` naming the first field in which two directories' data sections differ,
    or the section whose examples differ between them (a data file changed between runs)."""
    first: tuple[Path, dict[str, Any]] | None = None
    seen: dict[str, tuple[Path, str]] = {}  # data section -> (first directory, its examples' fingerprint)
    for d in dirs:
        record = experiment_meta(d)
        prints = record.get("data_fingerprints")
        for section, fp in (prints if isinstance(prints, dict) else {}).items():
            other = seen.setdefault(section, (d, fp))
            if other[1] != fp:
                raise SurgeryError(f"compare: {other[0]} and {d} ran on different examples of the same data section "
                                   f"({section}): the data changed between them, so their errors are not "
                                   "comparable. Merge only runs on the same examples.")
        data = record.get("recipe", {}).get("data") if isinstance(record.get("recipe"), dict) else None
        if not isinstance(data, dict):
            continue  # an older directory without its recipe: nothing to compare against
        data = {k: v for k, v in data.items() if k != "device"}  # where it ran does not change the numbers
        if first is None:
            first = (d, data)
            continue
        diff = sorted(k for k in data.keys() | first[1].keys() if data.get(k) != first[1].get(k))
        if diff:
            k = diff[0]
            raise SurgeryError(f"compare: {first[0]} and {d} ran on different data (data.{k}: {first[1].get(k)!r} "
                               f"against {data.get(k)!r}); their errors are not comparable. Merge only runs of "
                               "one data section.")


def _read_rows(d: Path) -> list[dict[str, Any]]:
    """One experiment directory's results.csv as typed rows. A row's ``path`` is its cell's
    directory under ``d`` where that is there: the one written was relative to where the run
    was started, and the directory may have moved since (or be read from elsewhere)."""
    p = d / "results.csv"
    if not p.is_file():
        raise SurgeryError(_no_results(d))
    damaged = ("; the file is damaged. Run its recipe again with this --out to write it anew (finished cells are "
               "read back, not trained again), or, for a directory `surgery compare --out` made, that compare.")
    try:
        with p.open(newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise ManifestError(f"{p}: not a readable CSV table ({e}){damaged}") from None
    if not rows:  # emptied, or not a table at all: a run writes the file once, with every row
        finished = len(list(d.glob("cells/*/result.json")))
        beside = f", but {finished} cell{'s' * (finished != 1)} under {d / 'cells'} finished" if finished else ""
        raise ManifestError(f"{p}: holds no result rows{beside}{damaged}")
    for line, r in enumerate(rows, 2):  # the header is line 1
        if missing := [k for k in ("condition", "depth", "seed", "test_error") if r.get(k) in (None, "")]:
            raise ManifestError(f"{p}, line {line}: no {missing[0]}{damaged}")
        if r.get("cell") and (d / "cells" / r["cell"]).is_dir():
            r["path"] = str(d / "cells" / r["cell"])
        for k, kind in [*((k, int) for k in ("depth", "seed", "epochs", "best_epoch")),
                        *((k, float) for k in RESULT_FIELDS if k.endswith(("_error", "_seconds")))]:
            try:
                r[k] = kind(r[k]) if r.get(k) not in (None, "") else None
            except ValueError:
                raise ManifestError(f"{p}, line {line}: {k} is {r[k]!r}, not a number{damaged}") from None
    return rows
