"""The same tuning budget for every arm (``experiment.tune``): an (arm, depth)'s Optuna
trials on its first seed's cell (on its first ``seeds`` seeds' cells, scored by their mean),
``batch`` at a time (a batch's trials train together as populations where
``experiment.population`` allows, or are shared out among shards), scored by validation
error only; then the ``then`` steps, each trying its alternatives over the values chosen
so far (a minibatch size chosen last); the values chosen go to every seed's cell, and the
chosen run's directories become those seeds' cells. ``tuning.json`` records every trial
and every step's runs.
"""

from __future__ import annotations

import fnmatch
import shutil
import time
from pathlib import Path
from typing import Any

from .cells import DIVERGED_FILE, CellRunner, summary
from .errors import SurgeryError, TrainingDiverged
from .experiment_config import TuneConfig
from .grid import Cell, changes, shard_of, step_values, with_values
from .io import Pace, progress_bar, progress_line, write_json
from .outdirs import read_tuning
from .recipe import recipe_from_dict
from .search import DIVERGED_SCORE, make_sampler, shown, suggest

WAIT_SECONDS = 30.0  # the longest pause between two looks for another shard's trials
Ended = tuple[dict[str, Any] | None, str]  # a run's result (None: it diverged) and whose it is ("", another shard's)
Waiting = tuple[Any, dict[str, Any], list[Cell]]  # an Optuna trial, its values and its run on each seed


def tune_arms(cfg: TuneConfig, cells: list[Cell], runner: CellRunner, out: Path,
              progress: bool | None = None, shard: tuple[int, int] | None = None) -> list[Cell]:
    """The same search budget for every (arm, depth): ``cfg.trials`` Optuna trials on the
    first ``cfg.seeds`` seeds' cells, scored by their mean validation error (never test),
    ``cfg.batch`` at a time, and the ``cfg.then`` steps after them; then every seed's cell
    with the values chosen (the caller adopts the chosen run's directories as those seeds'
    cells). Writes every trial and step run to ``OUT/tuning.json``; a trial whose training
    diverged (on any of its seeds) is recorded as such and told to Optuna as the worst error
    (``DIVERGED_SCORE``), never chosen (nor is such a step's alternative). A ``shard`` trains
    its share of each batch and waits for the other shards' trials."""
    groups: dict[tuple[str, int], list[Cell]] = {}
    for c in cells:
        groups.setdefault((c.condition, c.depth), []).append(c)
    record, stepped, tuned = [], [], []
    total = sum(cfg.trials + cfg.step_runs(arm) for arm, _ in groups)  # an alternative counts as a trial
    bar = progress_bar(total, "tuning", progress, "trial")
    pace = Pace(total, unit="trials" if not cfg.then else "trials and step alternatives")
    for (arm, depth), group in groups.items():
        trials, best = _tune_arm(cfg, group[:cfg.seeds], runner, bar, pace, progress, shard)
        steps, best = _then(cfg, group[:cfg.seeds], best, runner, (bar, pace, progress), shard)
        record += [{"condition": arm, "depth": depth, **t} for t in [*trials, best]]
        stepped += [{"condition": arm, "depth": depth, **s} for s in steps]
        tuned += [with_values(c, best["params"]) for c in group]
    bar.close()
    then = {"then": [s.model_dump() for s in cfg.then], "steps": stepped} if cfg.then else {}
    write_json(out / "tuning.json", {"metric": cfg.metric, "trials_per_arm": cfg.trials, "seeds": cfg.seeds,
                                     "batch": cfg.batch, "trials": record, **then})
    return tuned


def _then(cfg: TuneConfig, cells: list[Cell], best: dict[str, Any], runner: CellRunner,
          shown_by: tuple[Any, Pace, bool | None], shard: tuple[int, int] | None) -> tuple[list[dict[str, Any]],
                                                                                        dict[str, Any]]:
    """The ``cfg.then`` steps of one (arm, depth) after its trials (``best``: the best
    trial's entry), in order: each runs its alternatives over the values chosen so far on
    ``cells`` (the tuning seeds'), scored as a trial is, and keeps the lowest validation error
    (a tie keeps the values so far). Returns the steps' records and ``best`` with the values
    chosen. ``shown_by``: the progress bar, the pace and the progress setting."""
    bar, pace, progress = shown_by
    where = f"{cells[0].condition} depth {cells[0].depth}"
    values, score, taken = dict(best["params"]), best[cfg.metric], []
    record: list[dict[str, Any]] = []
    for step in (s for s in cfg.then if s.applies_to(cells[0].condition)):
        now = with_values(cells[0], values).recipe
        full = recipe_from_dict(now, runner.recipe.base_dir, f"{runner.recipe.source} [{where}]").to_dict()
        tries = [step_values(full, alt) for alt in step.alternatives]
        runs = {i: [with_values(c, merged_values(values, vals)) for c in cells] for i, vals in enumerate(tries)
                if changes(full, vals)}  # one that changes nothing has the score so far: not run
        ended = _run_shared([c for rs in runs.values() for c in rs], runner, shard, f"tuning: {where}", progress)
        entries: list[dict[str, Any]] = []
        for i, vals in enumerate(tries):
            if i not in runs:  # said as written (step_values drops what an arm without pretraining ignores)
                vals = dict(step.alternatives[i])
                entries.append({"step": step.name, "params": vals, "skipped": "changes nothing for this arm"})
                outcome = "changes nothing for this arm: not run"
                pace.add(fresh=False)
            else:
                entry, outcome = _score(cfg.metric, runs[i], [ended[c.key][0] for c in runs[i]])
                entries.append({"step": step.name, "params": vals, **entry})
                pace.add(fresh=any(_ended_since(runner.out / "tuning" / c.key, pace.since) for c in runs[i]))
            bar.update(1)
            progress_line(progress, f"tuning: {where} {step.name}: {shown(vals) or 'nothing'}: {outcome}; {pace}")
        scored = [e for e in entries if isinstance(e.get(cfg.metric), (int, float))]
        win = min(scored, key=lambda e: e[cfg.metric], default=None)
        for e in entries:
            e.update(so_far=score, taken=e is win and e[cfg.metric] < score)
        if win is not None and win["taken"]:
            values, score = merged_values(values, win["params"]), win[cfg.metric]
            taken.append(step.name)
        said = f"took {shown(win['params'])}" if win is not None and win["taken"] else "kept the values so far"
        progress_line(progress, f"tuning: {where} {step.name}: {said} (valid {score:.2f}%)")
        record += entries
    return record, {**best, "params": values, cfg.metric: score, **({"steps_taken": taken} if cfg.then else {})}


def merged_values(values: dict[str, Any], more: dict[str, Any]) -> dict[str, Any]:
    """``values`` with ``more`` set over them, in the order they apply: a path ``more`` sets
    (every layer's, for a ``*`` path) leaves ``values`` and comes after the rest."""
    kept = {k: v for k, v in values.items() if not any(k == p or fnmatch.fnmatchcase(k, p) for p in more)}
    return {**kept, **more}


def _run_shared(runs: list[Cell], runner: CellRunner, shard: tuple[int, int] | None, what: str,
                progress: bool | None) -> dict[str, Ended]:
    """Train ``runs`` (tuning runs, as populations where the experiment allows), a
    ``shard`` its share and then waiting for the others'; by key, each one's end."""
    assert runner.recipe.experiment is not None
    mode = runner.recipe.experiment.population
    runs = list({c.key: c for c in runs}.values())
    mine = runs if shard is None else shard_of(runs, *shard)
    ended: dict[str, Ended] = {c.key: (r, "") for c, r in zip(mine, runner.run_batch(mine, mode, "tuning"))}
    rest = [c for c in runs if c.key not in ended]
    return {**ended, **(_others_ended(rest, runner, mode, what, progress) if rest else {})}


def _tune_arm(cfg: TuneConfig, cells: list[Cell], runner: CellRunner, bar: Any, pace: Pace, progress: bool | None,
              shard: tuple[int, int] | None = None) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """One (arm, depth)'s study on ``cells`` (its first seeds'): its trials' records and the
    best one's. A trial runs its values on each of ``cells`` and scores their mean (a
    ``shard`` trains its share of each batch's runs, then waits for the rest); ``pace``
    counts the trials of every arm for the log lines."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="minimize", sampler=make_sampler(cfg.sampler, cfg.seed))
    where = f"{cells[0].condition} depth {cells[0].depth}"
    # a pretraining value means nothing to an arm that does not pretrain (with_values skips it)
    ignored = sorted(k for k in cfg.params if k.startswith("pretrain")) if cells[0].pretrain_key is None else []
    assert runner.recipe.experiment is not None
    mode = runner.recipe.experiment.population
    record: list[dict[str, Any]] = []

    def tell(trial: Any, vals: dict[str, Any], runs: list[Cell], ended: list[Ended]) -> None:
        entry, outcome = _score(cfg.metric, runs, [result for result, _ in ended])
        study.tell(trial, DIVERGED_SCORE if entry.get("diverged") else entry[cfg.metric])
        record.append({"trial": trial.number, "params": vals, **entry})
        bar.update(1)
        told = shown(vals, ignored) or "(no tuned value applies to this arm)"
        fresh = any(_ended_since(runner.out / "tuning" / c.key, pace.since) for c in runs)
        pace.add(fresh=fresh)  # one a rerun reads back: no pace
        others = sum(bool(whose) for _, whose in ended)
        whose = "" if not others else " (another shard's)" if others == len(ended) else " (partly another shard's)"
        progress_line(progress, f"tuning: {where} trial {trial.number + 1}/{cfg.trials} {told}: {outcome}{whose}; "
                                f"{pace}")

    def tell_ended(waiting: list[Waiting], ended: dict[str, Ended]) -> list[Waiting]:
        """Tell (and log) each waiting trial whose runs have all ended; the others."""
        for trial, vals, runs in (w for w in waiting if all(c.key in ended for c in w[2])):
            tell(trial, vals, runs, [ended[c.key] for c in runs])
        return [w for w in waiting if not all(c.key in ended for c in w[2])]

    while len(record) < cfg.trials:
        asked = [study.ask() for _ in range(min(cfg.batch, cfg.trials - len(record)))]
        values = [suggest(t, cfg.params) for t in asked]
        waiting: list[Waiting] = [(t, v, [with_values(c, v) for c in cells]) for t, v in zip(asked, values)]
        runs = [c for _, _, trial_runs in waiting for c in trial_runs]
        mine = {c.key for c in (runs if shard is None else shard_of(runs, *shard))}
        own = [c for c in runs if c.key in mine]
        ended: dict[str, Ended] = {}
        for c, result in zip(own, runner.run_batch(own, mode, "tuning")):  # each trial told as its runs end
            ended[c.key] = (result, "")
            waiting = tell_ended(waiting, ended)
        if waiting:  # other shards' runs, read once this shard's have trained
            later = [c for _, _, trial_runs in waiting for c in trial_runs if c.key not in ended]
            ended.update(_others_ended(later, runner, mode, f"tuning: {where}", progress))
            tell_ended(waiting, ended)
    record.sort(key=lambda t: t["trial"])
    scored = [t for t in record if not t.get("diverged")]
    if not scored:
        raise TrainingDiverged(f"experiment.tune: every trial of {where} diverged; narrow the ranges in "
                               f"experiment.tune.params (a lower learning rate) and rerun.")
    best = min(scored, key=lambda t: t[cfg.metric])
    return record, {"best_trial": best["trial"], "params": best["params"], cfg.metric: best[cfg.metric],
                    **({"ignored": ignored} if ignored else {})}


def _score(metric: str, runs: list[Cell], results: list[dict[str, Any] | None]) -> tuple[dict[str, Any], str]:
    """A trial's record (its score: the mean ``metric`` over its runs, one per seed; with
    more than one, each seed's too) and its outcome in words; diverged if any run diverged."""
    if any(r is None for r in results):
        bad = [str(c.seed) for c, r in zip(runs, results) if r is None]
        on = f" on seed {', '.join(bad)}" if len(runs) > 1 else ""
        return {metric: None, "diverged": True}, f"diverged{on} (scored {DIVERGED_SCORE:g}%)"
    done = [r for r in results if r is not None]
    if len(done) == 1:
        return {metric: done[0][metric]}, summary(done[0], test=False)
    score = round(sum(r[metric] for r in done) / len(done), 4)
    each = ", ".join(f"{c.seed}: {r[metric]:.2f}%" for c, r in zip(runs, done))
    return ({metric: score, f"{metric}_by_seed": {str(c.seed): r[metric] for c, r in zip(runs, done)}},
            f"valid {score:.2f}%, the mean of seeds {each}")


def _ended_since(trial_dir: Path, since: float) -> bool:
    """Whether the trial's result (or divergence) was written at or after ``since`` (a
    wall-clock time): trained in this run, or by another shard while it ran."""
    times = [p.stat().st_mtime for p in (trial_dir / "result.json", trial_dir / DIVERGED_FILE) if p.is_file()]
    return bool(times) and max(times) >= since


def _others_ended(trials: list[Cell], runner: CellRunner, mode: str | int, what: str,
                  progress: bool | None) -> dict[str, Ended]:
    """Other shards' ``trials`` once they have ended: by key, each one's result (``None``:
    diverged) and whose it is. One whose result was damaged after its shard wrote it (by
    something else: ours are written whole) is trained here again."""
    _wait_for(trials, runner, what, progress)
    damaged = [c for c in trials if not runner.finished(c, "tuning")[0]]
    ended = {c.key: (result, "") for c, result in zip(damaged, runner.run_batch(damaged, mode, "tuning"))}
    for c in trials:
        ended.setdefault(c.key, (runner.finished(c, "tuning")[1], " (another shard's)"))
    return ended


def _wait_for(trials: list[Cell], runner: CellRunner, what: str, progress: bool | None) -> None:
    """Return once every one of ``trials`` (other shards' tuning trials) has ended, looking
    after 1, 2, 4 ... seconds, at most ``WAIT_SECONDS`` apart; says once what it waits for."""
    pause = 1.0
    while left := [c for c in trials if not runner.written(c, "tuning")]:
        if pause == 1.0:
            progress_line(progress, f"{what}: waiting for {len(left)} trial(s) of the other shards (start them with "
                                    f"the same recipe, --set options and --out; Ctrl-C stops, a rerun continues)")
        time.sleep(pause)
        pause = min(2 * pause, WAIT_SECONDS)


def adopt_trial(out: Path, cell: Cell) -> None:
    """The first seed's cell with an arm's best values is its best trial (same recipe, same
    key): take the trial's finished directory as the cell's instead of training it again.
    Copied to a temp name, then renamed, so a kill leaves either no cell or a whole one."""
    src, dst = out / "tuning" / cell.key, out / "cells" / cell.key
    if (dst / "result.json").is_file() or not (src / "result.json").is_file():
        return
    tmp = dst.with_name(f".{cell.key}.adopt")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    shutil.rmtree(dst, ignore_errors=True)  # what a killed run of this cell left
    tmp.rename(dst)


def merge_tuning(dirs: list[Path]) -> dict[str, Any] | None:
    """The ``tuning.json`` of experiment directories run arm by arm, as one: every
    directory's trials, later directories winning for the same (arm, depth); ``None`` when
    none was tuned. Refused when their budgets differ (the comparison would not be fair)."""
    found = [read_tuning(d / "tuning.json") for d in dirs if (d / "tuning.json").is_file()]
    if not found:
        return None
    budgets = {(t["metric"], t["trials_per_arm"], t.get("seeds", 1), *(s["name"] for s in t.get("then", [])))
               for t in found}  # no seeds: written before tune.seeds; no then: before tune.then
    if len(budgets) > 1:
        raise SurgeryError(f"compare: the directories were tuned with different budgets {sorted(budgets)} "
                           "(metric, trials per arm, seeds a trial, and any tune.then steps by name); merge only "
                           "runs of one recipe's experiment.tune.")
    arms: dict[tuple[str, int], list[dict[str, Any]]] = {}
    steps: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for t in found:  # an arm's steps come from the directory its trials come from
        trials = _by_arm(t["trials"])
        arms.update(trials)
        steps.update({arm: _by_arm(t.get("steps", [])).get(arm, []) for arm in trials})
    merged = {**found[0], "trials": [t for trials in arms.values() for t in trials]}
    return {**merged, "steps": [s for arm in steps.values() for s in arm]} if "then" in found[0] else merged


def _by_arm(trials: list[dict[str, Any]]) -> dict[tuple[str, int], list[dict[str, Any]]]:
    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for t in trials:
        groups.setdefault((t["condition"], t["depth"]), []).append(t)
    return groups
