"""What a run directory holds so far, for ``surgery inspect DIR``: a paper protocol runs
for hours and resumes where it stopped, and its owner wants to know how far it got without
reading logs.

Read only from the files a run writes: ``experiment.json`` (the recipe and the number of
cells), ``tuning/<key>/`` and ``cells/<key>/`` (``result.json`` once finished, the
per-epoch ``metrics.jsonl`` while training) and ``stacks/<key>/`` (a ``depthN`` snapshot
per pretrained layer and ``rngN``, the generator state after it; ``pretrain.json`` once
whole). Tuning trials show their validation
error only: they are chosen by it, and a test error shown beside them invites choosing by
the test set.

A single run's directory (``surgery run`` or ``surgery finetune``) holds ``metrics.jsonl``
while it trains, ``checkpoints/last.safetensors`` when it checkpoints and ``result.json``
once finished. A search's (``surgery search``) holds ``search.json``, every trial of its
study so far. A checkpoint file alone is described from its metadata.
"""

from __future__ import annotations

import json
import math
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from .cells import DIVERGED_FILE
from .checkpoint import MEMBER_CHECKPOINT, read_checkpoint_meta
from .errors import ManifestError, SurgeryError
from .io import duration, percent
from .lock import describe_holders
from .outdirs import experiment_meta, is_experiment_dir, is_search_dir, is_single_run_dir, recipe_source
from .provenance import COMMANDS_FILE, commands_line, recorded
from .results import read_results
from .stacks_dir import TAKEN_FILE
from .weights_io import first_line, weights_held


def _experiment_record(out: Path) -> tuple[dict[str, Any], list[str]]:
    """``out/experiment.json``'s record (``{}`` before it is written), and a line saying what
    is wrong with it when it is damaged: the cells still say how far the experiment got."""
    try:
        return experiment_meta(out), []
    except ManifestError as e:
        return {}, [first_line(e)]


def _read(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # being written, or damaged: left out of the counts


def _history(path: Path) -> list[dict[str, Any]]:
    """The epochs of a ``metrics.jsonl``; none when it is missing or being written."""
    try:
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, ValueError):
        return []


def _last_epoch(path: Path) -> dict[str, Any] | None:
    hist = _history(path)
    return hist[-1] if hist else None


def _runs(root: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """The finished runs' results under ``root`` and a line for each one still training."""
    done, running = [], []
    for d in sorted(p for p in root.glob("*") if p.is_dir()) if root.is_dir() else []:
        result = _read(d / "result.json")
        if not isinstance(result, dict):
            result = _read(d / DIVERGED_FILE)  # a tuning trial that diverged: ended, never trained again
        if isinstance(result, dict):
            done.append(result)
            continue
        last = _last_epoch(d / "metrics.jsonl")
        recipe = _read(d / "recipe.json")
        name = recipe.get("name", d.name) if isinstance(recipe, dict) else d.name
        if last is not None:
            valid = last.get("valid_error")
            ck = read_checkpoint_meta(d / "checkpoints" / "last.safetensors") or \
                read_checkpoint_meta(d / "checkpoints" / MEMBER_CHECKPOINT)  # a population member's
            running.append(f"{root.name}/{d.name} ({name}): epoch {last.get('epoch')}"
                           + (f", validation {valid:.2f}%" if isinstance(valid, (int, float)) else "")
                           + (f"; the rerun continues from its checkpoint after epoch {ck['state'].get('epoch')}"
                              if isinstance((ck or {}).get("state"), dict) else ""))
    return done, running


def _layers_kept(d: Path) -> tuple[int, bool]:
    """How many layers of an unfinished greedy stack ``d`` holds snapshots of, and whether a
    rerun continues after them (their generator state was kept) or starts again."""
    done = len(list(d.glob("depth*.safetensors")))
    return done, bool(done) and (d / f"rng{done}.safetensors").is_file()


def _stack_so_far(d: Path) -> str:
    """``; KEY: N layers so far`` for a stack whose pretraining has not ended."""
    done, goes_on = _layers_kept(d)
    return f"; {d.name}: {_layers(done)} so far" + (" (the rerun continues after them)" if goes_on else "")


def _layers(n: int) -> str:
    return f"{n} layer" + ("s" if n != 1 else "")


def _span(values: list[float]) -> str:
    lo, hi = min(values), max(values)
    return f"{lo:.2f}%" if lo == hi else f"{lo:.2f}-{hi:.2f}%"


def _in_use(out: Path) -> list[str]:
    """A line for each run writing into ``out`` now (its lock, :mod:`surgery.lock`)."""
    return [f"running now: {line}" for line in describe_holders(out)]


def describe_single_run(out: Path) -> list[str]:
    """Lines saying how far the single run in ``out`` got: its result once finished, else its
    last epoch, its best validation error so far and whether a checkpoint can resume it."""
    lines = [f"{out}: a single run (surgery run or surgery finetune)", *_in_use(out)]
    result = _read(out / "result.json")
    ck = read_checkpoint_meta(out / "checkpoints" / "last.safetensors")
    planned = ((ck or {}).get("config") or {}).get("epochs")
    of = f" of {planned}" if isinstance(planned, int) else ""
    if isinstance(result, dict):
        seconds = result.get("finetune_seconds", result.get("seconds"))  # surgery run's name, finetune's
        took = duration(seconds) if isinstance(seconds, (int, float)) else "?"
        errors = f"test {percent(result.get('test_error'))}, validation {percent(result.get('valid_error'))}"
        lines.append(f"finished: {errors} "
                     f"(best epoch {result.get('best_epoch')} of {result.get('epochs')} trained), "
                     f"{took} fine-tuning on {result.get('device', '?')}")
    else:
        hist = [h for h in _history(out / "metrics.jsonl") if isinstance(h, dict)]
        valid = [(h["valid_error"], h.get("epoch")) for h in hist if isinstance(h.get("valid_error"), (int, float))]
        if hist:
            best = ""
            if valid:
                error, epoch = min(valid)
                best = f" (best {error:.2f}% at epoch {epoch})"
            lines.append(f"unfinished: epoch {hist[-1].get('epoch')}{of} trained, validation "
                         f"{percent(hist[-1].get('valid_error'))}{best}")
        elif not (out / "stack.safetensors").is_file() and any((out / "pretrain").glob("depth*.safetensors")):
            done, goes_on = _layers_kept(out / "pretrain")
            lines.append(f"unfinished: pretraining, {_layers(done)} so far" +
                         (" (`--resume` continues after them)" if goes_on else ""))
        else:
            lines.append("unfinished: no epoch finished yet")
        if ck is not None:
            lines.append(f"checkpoint after epoch {(ck.get('state') or {}).get('epoch')}: `--resume` (surgery run or "
                         f"surgery finetune, the same recipe and --out {out}) continues from it")
        else:
            lines.append("no readable checkpoint (finetune.checkpoint_every: 0, or none written yet): running it "
                         "again starts its fine-tuning over")
    held = sorted(p.name for p in out.glob("*.safetensors"))
    if held:
        lines.append(f"weights: {', '.join(held)} (`surgery inspect FILE` shows each)")
    return lines + _commands_file(out)


def _commands_file(out: Path) -> list[str]:
    """The line on the commands a single run's or a search's ``commands.json`` records."""
    meta = _read(out / COMMANDS_FILE)  # None when missing or damaged: no line
    return _made_by(meta if isinstance(meta, dict) else {}, f"{COMMANDS_FILE} lists them all")


def describe_search(out: Path) -> list[str]:
    """Lines saying what the search in ``out`` has found: its study, the trials so far
    (those that diverged or failed counted apart), the best one's validation error and
    values, and how to add trials."""
    if not (out / "search.json").is_file():  # written after each trial: none has finished
        started = len(list((out / "trials").glob("*"))) if (out / "trials").is_dir() else 0
        return [f"{out}: a search (surgery search)",
                f"trials: none finished ({started} started)",
                f"`surgery search RECIPE --out {out}` runs it again; search.json is written after each trial",
                *_commands_file(out)]
    summary = _read(out / "search.json")
    if not isinstance(summary, dict) or not isinstance(summary.get("trials"), list):
        raise SurgeryError(f"{out}/search.json: damaged or being written; `surgery search RECIPE --out {out}` "
                           "writes it anew from the study's storage.")
    trials = [t for t in summary["trials"] if isinstance(t, dict)]
    scored = [t for t in trials if t.get("state") == "COMPLETE" and not t.get("diverged")
              and isinstance(t.get("value"), (int, float))]
    diverged = sum(bool(t.get("diverged")) for t in trials)
    other = len(trials) - len(scored) - diverged
    lines = [f"{out}: a search (surgery search), study {summary.get('study')!r} in {summary.get('storage')}",
             f"trials: {len(trials)}" + (f" ({diverged} diverged)" if diverged else "")
             + (f" ({other} failed or unfinished)" if other else "")]
    if scored:
        values = [float(t["value"]) for t in scored]
        lines.append(f"validation error: {_span(values)} over the {len(scored)} scored")
    if isinstance(summary.get("best_value"), (int, float)):
        best = summary.get("best_params")
        values = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                           for k, v in (best if isinstance(best, dict) else {}).items())
        n = summary.get("best_trial")
        n = n + 1 if isinstance(n, int) else "?"  # counted from 1, as the log counts them
        lines.append(f"best: trial {n}, validation {summary['best_value']:.2f}% with "
                     f"{values}; its recipe: {out}/best.yaml")
    lines.append(f"`surgery search RECIPE --out {out}` runs the trials it still lacks of search.trials; "
                 "`--trials N` runs N more")
    return lines + _commands_file(out)


def describe_snapshots(d: Path) -> list[str]:
    """Lines saying what a greedy stack's snapshot directory holds: how many layers, whether
    the stack is whole, and how to see it."""
    done, goes_on = _layers_kept(d)
    state = ("whole" if (d / "pretrain.json").is_file() else
             "unfinished: a rerun continues after them" if goes_on else "unfinished: a rerun pretrains it again")
    those = "that layer" if done == 1 else f"the stack of those {done} layers"
    return [f"{d}: a greedy stack's layer snapshots (an experiment's stacks/KEY, or a run's pretrain/), "
            f"{_layers(done)} ({state})", *_plan_line(d), *_taken_line(d),
            f"`surgery inspect {d}/depth{done}.safetensors` shows {those} (depthN: the first N)"]


def _taken(stacks: list[Path]) -> list[str]:
    """A line saying which stacks started from another experiment's (``taken.json``)."""
    taken = [t for d in stacks if isinstance(t := _read(d / TAKEN_FILE), dict)]
    if not taken:
        return []
    where = sorted({str(Path(str(t.get("from", "?"))).parent.parent) for t in taken})
    after = " or ".join(sorted({str(t.get("layers", "?")) for t in taken}))
    return [f"{len(taken)} of them started from another experiment's (--stacks-from {', '.join(where)}), after "
            f"layer {after} of theirs"]


def _taken_line(d: Path) -> list[str]:
    """Where a stack's first layers came from, as its ``taken.json`` says (none: nothing)."""
    taken = _read(d / TAKEN_FILE)
    if not isinstance(taken, dict):
        return []
    return [f"taken from {taken.get('from')} (--stacks-from): its first {_layers(taken.get('layers', 0))}"]


def _plan_line(d: Path) -> list[str]:
    """What a grid's stack is pretrained to, as its ``plan.json`` says (none: nothing)."""
    plan = _read(d / "plan.json")
    try:
        layers = ", ".join(f"{lc['method']} {lc['hidden']}" for lc in plan["pretrain"]["layers"])
        data = plan["data"].get("path") or plan["data"].get("dataset")
        return [f"its plan (plan.json): {layers}; seed {plan['seed']}, data {data}"]
    except (KeyError, TypeError, AttributeError):
        return []


def describe_checkpoint(path: Path, meta: dict[str, Any]) -> list[str]:
    """Lines saying where the fine-tuning checkpoint ``path`` (its metadata ``meta``) stands:
    the epoch it was written after, the best validation error so far and how to continue."""
    state = meta.get("state") if isinstance(meta.get("state"), dict) else {}
    planned = (meta.get("config") or {}).get("epochs") if isinstance(meta.get("config"), dict) else None
    of = f" of {planned}" if isinstance(planned, int) else ""
    member = " (a population member's)" if path.name == MEMBER_CHECKPOINT else ""
    lines = [f"{path}: a fine-tuning checkpoint{member}",
             f"written after epoch {state.get('epoch')}{of} (step {state.get('step')})"]
    if isinstance(state.get("best_valid"), (int, float)) and math.isfinite(state["best_valid"]):
        lines.append(f"best validation error so far {state['best_valid']:.2f}% at epoch {state.get('best_epoch')}")
    if (path.parent.parent / "result.json").is_file():  # RUN/checkpoints/FILE
        how = f"its run has finished ({path.parent.parent}/result.json); this is the state it ended in"
    elif member and len(path.parents) > 3:  # OUT/cells/<key>/checkpoints/member.safetensors
        how = f"the experiment run again (the same recipe, --out {path.parents[3]}) continues its cell from it"
    else:
        how = (f"`surgery run --resume` or `surgery finetune --resume` (the same recipe, --out {path.parent.parent}) "
               "continues from it")
    return lines + [how]


def _is_run_dir(d: Path) -> bool:
    return is_experiment_dir(d) or is_single_run_dir(d) or is_search_dir(d)


def describe_runs_in(parent: Path, runs: list[Path]) -> list[str]:
    """A line for each run directory in ``parent`` (``surgery inspect runs``): an
    experiment's cells finished, a single run's result or last epoch, a search's best trial."""
    lines = [f"{parent}: {len(runs)} run director{'ies' if len(runs) != 1 else 'y'} "
             f"(`surgery inspect {parent}/NAME` says more)"]
    for d in runs:
        try:
            said = describe_run(d)
        except SurgeryError as e:
            lines.append(f"  {d.name}: {str(e).splitlines()[0]}")
            continue
        now = "; running now" if any(s.startswith("running now: ") for s in said) else ""
        said = [s for s in said if not s.startswith("running now: ")]
        merged = next((s for s in said if s.startswith("merged: ")), None)
        if merged:
            lines.append(f"  {d.name}: {merged.split(' from ')[0].replace('merged: ', 'merged results, ')}")
        elif is_experiment_dir(d):
            cells = next((s for s in said if s.startswith("cells: ")), "cells: none finished")
            ended = any(s.startswith("finished: ") for s in said)
            lines.append(f"  {d.name}: experiment, {cells.removeprefix('cells: ')}"
                         + ("; results written" if ended else "") + now)
        elif is_single_run_dir(d):
            lines.append(f"  {d.name}: single run, {said[1]}{now}")
        else:
            best = next((f"; {s.split('; its recipe')[0]}" for s in said if s.startswith("best: ")), "")
            lines.append(f"  {d.name}: search, {said[1]}{best}")
    return lines


def _describe_merge(out: Path, meta: dict[str, Any]) -> list[str]:
    """What a directory ``surgery compare --out`` wrote holds: how many runs of which arms,
    merged from where (it trains nothing: its cells are in those directories)."""
    name = meta["recipe"].get("name") if isinstance(meta.get("recipe"), dict) else None
    try:
        rows = read_results(out)
        held = _runs_of(rows)
    except SurgeryError:
        rows, held = [], "results.csv unreadable (run the compare again)"
    return [f"{out}: experiment{f' {name}' if name else ''}, merged by `surgery compare`",
            f"merged: {held} from {_some(list(map(str, meta['merged_from'])))}", *_seeds_line(rows),
            f"recipe (experiment.json's): {recipe_source(out, meta)}'s, the first merged; the arms, depths and seeds "
            "are results.csv's, each run's settings its command's", *_made_by(meta),
            f"finished: results in {out}/results.csv, report in {out}/report.md"]


def _held(out: Path) -> list[str]:
    """The runs ``out/results.csv`` holds and their seeds per arm and depth (none if unreadable)."""
    try:
        rows = read_results(out)
    except SurgeryError:
        return []
    return [f"results.csv: {_runs_of(rows)}", *_seeds_line(rows)]


def _runs_of(rows: list[dict[str, Any]]) -> str:
    """``12 runs (none, dae)``: how many result rows, of which arms."""
    return f"{len(rows)} runs ({', '.join(dict.fromkeys(str(r['condition']) for r in rows))})"


def _some(dirs: list[str], shown: int = 4) -> str:
    """The directories a merge holds, the first ``shown`` of a long list and how many more."""
    if len(dirs) <= shown + 1:
        return ", ".join(dirs)
    return f"{', '.join(dirs[:shown])} and {len(dirs) - shown} more (experiment.json's merged_from lists them all)"


def _seeds_line(rows: list[dict[str, Any]]) -> list[str]:
    """How many seeds each arm has at each depth, e.g. ``seeds at depths 1, 2: none 20, 15;
    dae 20, -`` (``-``: none at that depth)."""
    seeds: dict[str, Counter[int]] = defaultdict(Counter)
    for r in rows:
        seeds[str(r["condition"])][int(r["depth"])] += 1
    depths = sorted({d for c in seeds.values() for d in c})
    if not depths:
        return []
    arms = "; ".join(f"{arm} {', '.join(str(c[d] or '-') for d in depths)}" for arm, c in seeds.items())
    return [f"seeds at depth{'s' * (len(depths) > 1)} {', '.join(map(str, depths))}: {arms}"]


def _made_by(meta: dict[str, Any], *where: str) -> list[str]:
    """The line on the commands an ``experiment.json`` (or ``commands.json``) records, if it
    records any; ``where``: where all of them are listed, if not the experiment's files."""
    line = commands_line(recorded(meta), *where)
    return [line] if line else []


def _tuning_so_far(trials: list[dict[str, Any]], tune: dict[str, Any]) -> list[str]:
    """A line per (arm, depth) of an experiment's tuning: its runs ended (``trials``: their
    results) against those planned by ``tune`` (the recipe's ``experiment.tune``), and the
    span of their validation errors."""
    seeds = tune.get("seeds", 1)  # a trial runs on each of the first seeds
    planned = tune.get("trials", 0) * seeds
    by_arm: dict[tuple[str, int], list[float | None]] = defaultdict(list)
    for r in (r for r in trials if isinstance(r.get("depth"), int)):  # one damaged from outside is left out
        valid = r.get("valid_error")
        by_arm[(str(r.get("condition")), r["depth"])].append(float(valid) if isinstance(valid, (int, float)) else None)
    lines = []
    for (arm, depth), ends in sorted(by_arm.items()):
        # a tune.then step's alternatives: each a run more on each tuning seed, unless it changes nothing
        alts = sum(len(s.get("alternatives") or []) for s in tune.get("then") or []
                   if isinstance(s, dict) and arm in (s.get("conditions") or [arm]))
        of = f" of {'up to ' if alts else ''}{planned + alts * seeds}" if planned else ""
        vals = [v for v in ends if v is not None]
        diverged = f", {len(ends) - len(vals)} diverged" if len(vals) < len(ends) else ""
        valid = f", validation {_span(vals)}" if vals else ""
        what = "trials" if seeds == 1 else f"trial runs ({tune.get('trials')} trials x {seeds} seeds)"
        what += " and step alternatives" if alts else ""
        lines.append(f"tuning {arm} d{depth}: {len(ends)}{of} {what} finished{valid}{diverged}")
    return lines


def describe_run(out: Path) -> list[str]:
    """Lines saying what the experiment directory ``out`` holds: pretrained stacks, tuning
    trials (per arm and depth, with their validation errors), finished cells and what is
    training now; for a single run's directory, how far it got; for a search's, its best
    trial. ``SurgeryError`` when ``out`` is none of these."""
    out = Path(out)
    if not is_experiment_dir(out):
        if is_single_run_dir(out):
            return describe_single_run(out)
        if is_search_dir(out):
            return describe_search(out)
        runs = [d for d in sorted(out.iterdir()) if d.is_dir() and _is_run_dir(d)] if out.is_dir() else []
        if runs:  # a directory of runs, e.g. runs/
            return describe_runs_in(out, runs)
        if any(out.glob("depth*.safetensors")):  # an experiment's stacks/KEY, or a run's pretrain/
            return describe_snapshots(out)
        raise SurgeryError(f"{out}: a directory that is not a run's (no result.json, metrics.jsonl, checkpoints/ "
                           f"or pretrain/, nor an experiment's experiment.json, cells/, tuning/ or stacks/, nor a "
                           f"search's search.json, search.db or trials/); give a .safetensors file"
                           f"{weights_held(out)} or a run's --out directory.")
    meta, damaged = _experiment_record(out)
    if isinstance(meta.get("merged_from"), list):
        return _describe_merge(out, meta)
    recipe = meta.get("recipe") or {}
    exp = recipe.get("experiment") or {}
    lines = [f"{out}: experiment {recipe.get('name', '')}".rstrip(), *damaged, *_in_use(out)]
    stacks = [d for d in sorted((out / "stacks").glob("*")) if d.is_dir()] if (out / "stacks").is_dir() else []
    if stacks:
        whole = sum((d / "pretrain.json").is_file() for d in stacks)
        lines.append(f"pretrained stacks: {whole} whole" + "".join(
            _stack_so_far(d) for d in stacks if not (d / "pretrain.json").is_file()))
        lines += _taken(stacks)
    trials, tuning_now = _runs(out / "tuning")
    lines += _tuning_so_far(trials, exp.get("tune") or {})
    cells, cells_now = _runs(out / "cells")
    if not cells and damaged:  # a merge's directory, say: what its results.csv holds
        lines += _held(out)
    total = meta.get("cells") if isinstance(meta.get("cells"), int) else None
    if total and len(cells) > total:  # runs of other seed lists shared the directory
        lines.append(f"cells: {len(cells)} finished (the last run planned {total})")
    else:
        lines.append(f"cells: {len(cells)}{f' of {total}' if total else ''} finished")
    lines += [f"unfinished (training now, or stopped): {x}" for x in tuning_now + cells_now]
    lines += _made_by(meta)
    if total and len(cells) >= total and (out / "results.csv").is_file():
        lines.append(f"finished: results in {out}/results.csv, report in {out}/report.md")
    elif total and len(cells) >= total:  # shards trained them; the run that writes the results has not run
        lines.append(f"every cell finished, no results.csv yet: `surgery run RECIPE --out {out}` (no --shard) "
                     "writes it and the report, training nothing again")
    return lines
