"""Comparisons: conditions (arms) x depths x seeds, each cell a full recipe.

Every arm of a seed sees the same data order (the fine-tuning shuffle is seeded by the
seed alone) and the same fine-tuning budget; the no-pretraining arm starts from the
classic initialisation for its activation. A cell's results live under a hash of its full
config, so finished cells are skipped when a comparison is re-run. Greedy stacks are
trained once per (arm, seed) at the largest depth; the depth-d stack is the snapshot
after its d-th layer, which for layer-wise methods is exactly what a depth-d run trains.
Cells of one shape can fine-tune together as a population (``experiment.population``),
and ``experiment.tune`` gives every arm the same tuning budget before the seeds run.
This module plans the grid and runs it (or a shard's share of it); a cell's training is
:mod:`surgery.cells`', an arm's tuning :mod:`surgery.tuning`'s, its ``results.csv`` (and
merging several directories') :mod:`surgery.results`'.
"""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path
from typing import Any

from .cells import CellRunner, summary
from .dataset import fingerprint
from .devices import resolve_device
from .errors import ConfigError, ManifestError, OutputError, SurgeryError, SurgeryWarning
from .experiment_config import ExperimentConfig
from .grid import Cell, plan_cells, shard_of
from .io import Pace, make_dir, progress_bar, progress_line, read_json
from .lock import hold
from .outdirs import check_own_out, is_experiment_dir
from .planning import check_grid
from .provenance import device_label, ends_recorded, invocation, update_record, with_command
from .recipe import Recipe, as_recipe
from .results import RESULT_FIELDS, write_results_csv
from .stacks_dir import StackDonors
from .tuning import adopt_trial, tune_arms


def run_experiment(recipe: Recipe | str | Path, out: str | Path, progress: bool | None = None,
                   shard: tuple[int, int] | None = None,
                   stacks_from: list[str | Path] | None = None) -> list[dict[str, Any]]:
    """Run every cell not yet finished under ``out`` (after tuning each arm when the
    experiment has ``tune:``); write ``results.csv`` and return its rows.

    ``shard=(i, n)``: this process is shard ``i`` (0-based) of ``n`` sharing ``out``: it
    trains only its share of each trial batch and of the cells (:func:`grid.shard_of`),
    waits for the other shards' trials of a batch before the next (or the best is chosen),
    and writes no ``results.csv`` (a run without a shard does, training whatever is left);
    it returns the rows of its own cells.

    ``stacks_from``: other experiments' directories whose greedy stacks this one's may
    start from (:class:`surgery.stacks_dir.StackDonors`): a depth-5 grid continues a depth-4
    grid's stacks after their fourth layer instead of pretraining those four again.

    The report (tables, figures) is :func:`surgery.report.write_report`'s job."""
    t0 = time.perf_counter()
    recipe = as_recipe(recipe, "surgery.run_experiment")
    if recipe.experiment is None:
        raise ConfigError(f"{recipe.source}: the recipe has no experiment: section; one network runs with "
                          "surgery.run(recipe, out) (`surgery run RECIPE` runs either).")
    donors = StackDonors(_donor_dirs(stacks_from, Path(out))) if stacks_from else None
    runner = CellRunner(recipe, Path(out), progress, donors)
    cells = plan_cells(recipe, runner.data.input_shape, runner.data.num_classes)
    check_grid(recipe, cells, runner.dataset)  # before the directory is made: a grid that cannot run leaves nothing
    device = device_label(resolve_device(recipe.finetune.device, "finetune.device"))
    entry = invocation(device, shard)  # this command, as experiment.json records it
    check_own_out(Path(out), "experiment")
    fingerprints = _data_unchanged(Path(out), runner)
    out = make_dir(Path(out))
    with hold(out, shard):
        update_record(out / "experiment.json", lambda meta: {  # first: inspect reads it
            "recipe": recipe.to_dict(), "cells": len(cells), "data_fingerprints": fingerprints,
            "commands": with_command(meta, entry)})
        with ends_recorded(out / "experiment.json", entry, t0):
            return _run_cells(recipe, runner, cells, out, progress, shard)


def _donor_dirs(dirs: list[str | Path], out: Path) -> list[Path]:
    """``--stacks-from``'s directories, each checked to be another experiment's."""
    checked = []
    for d in map(Path, dirs):
        if not d.is_dir() or not is_experiment_dir(d):
            why = "does not exist" if not d.exists() else "is not an experiment's output directory (no experiment.json)"
            raise SurgeryError(f"--stacks-from {d}: {why}; give the --out of an earlier `surgery run` of an "
                               "experiment, whose stacks/ this run's stacks may start from.")
        if d.resolve() == out.resolve():
            raise SurgeryError(f"--stacks-from {d} is this run's --out; a run continues its own stacks without it "
                               "(give another experiment's directory, or drop --stacks-from).")
        checked.append(d)
    return checked


def _run_cells(recipe: Recipe, runner: CellRunner, cells: list[Cell], out: Path, progress: bool | None,
               shard: tuple[int, int] | None) -> list[dict[str, Any]]:
    """:func:`run_experiment`'s work once it holds ``out``: tune each arm (with ``tune:``),
    pretrain the stacks, fine-tune the cells (in populations where they allow), write
    ``results.csv`` (not a shard)."""
    assert recipe.experiment is not None
    _warn_absent_baseline(recipe.experiment, out)
    tune = recipe.experiment.tune
    whose = f"shard {shard[0] + 1}/{shard[1]} of " if shard is not None else ""
    progress_line(progress, f"experiment: {whose}{len(cells)} cell{'s' * (len(cells) != 1)}" + (
        f", each arm and depth tuned first ({tune.trials} trials"
        + (f" on {tune.seeds} seeds each" if tune.seeds > 1 else "") + ")" if tune is not None else "")
        + f"; files in {out} (`surgery inspect {out}` says how far it has got)")
    if tune is not None:
        tuned = tune_arms(tune, cells, runner, out, progress, shard)
        if shard is None or shard[0] == 0:  # one process adopts them
            for cell in tuned:  # a first seed's cell is its arm's best trial
                adopt_trial(out, cell)
        cells = tuned if shard is None else shard_of([c for c in tuned if not runner.finished(c, "tuning")[0]], *shard)
    elif shard is not None:
        cells = shard_of(cells, *shard)
    bar = progress_bar(len(cells), "experiment", progress, "cell")
    done_before = {c.key for c in cells if (out / "cells" / c.key / "result.json").is_file()}
    runner.stacks.pretrain_populations(cells, recipe.experiment.population)
    pace = Pace(len({c.key for c in cells}), len(done_before))  # equal cells train once
    together = runner.run_populations(cells, recipe.experiment.population, bar, pace=pace)
    rows, paced = [], set()
    for cell in cells:
        result, cdir = runner.run(cell)
        row = {k: result.get(k) for k in RESULT_FIELDS}
        row.update(condition=cell.condition, depth=cell.depth, seed=cell.seed, cell=cell.key, path=str(cdir))
        rows.append(row)
        if cell.key not in together:  # a population's cells were counted when it finished
            bar.update(1)
        bar.set_postfix(last=f"{cell.condition} d{cell.depth} {result['test_error']:.2f}%")
        if cell.key not in done_before:
            left = "" if cell.key in together | paced else pace.add().left()  # a population's counted as it ended
            paced.add(cell.key)
            progress_line(progress, f"experiment: cell {len(rows)}/{len(cells)} {cell.condition} depth {cell.depth} "
                                    f"seed {cell.seed}: {summary(result)}" + (f"; {left}" if left else ""))
    bar.close()
    if shard is None:
        write_results_csv(out / "results.csv", rows)
    return rows


def _data_unchanged(out: Path, runner: CellRunner) -> dict[str, str]:
    """Each data section of the grid with a fingerprint of its examples (every split), those
    ``out``'s earlier runs recorded included. ``OutputError`` when a section an earlier run
    used now holds other examples (a data file changed): the cells and stacks kept under
    ``out`` were trained on the old ones, and a rerun would mix the two."""
    try:
        before = read_json(out / "experiment.json").get("data_fingerprints")
    except ManifestError:  # none yet, or damaged (this run writes it anew): nothing to compare with
        before = None
    before = before if isinstance(before, dict) else {}
    now = {}
    for key, ds in runner.datasets.items():
        fields = {k: v for k, v in json.loads(key).items() if k != "device"}  # where it runs changes nothing
        now[json.dumps(fields, sort_keys=True)] = fingerprint(*(t for s in (ds.train, ds.valid, ds.test)
                                                                 for t in (s.x, s.y)))
    for section, fp in now.items():
        if before.get(section, fp) != fp:
            data = json.loads(section)
            raise OutputError(
                f"{out}: its cells and stacks were trained on other examples than this run's data "
                f"({data.get('path') or data.get('dataset')}) holds now (fingerprint {before[section]}, now {fp}): "
                "the data changed since. Give this run its own --out, or remove that directory to start over; "
                "nothing in it was changed.")
    return {**before, **now}


def _warn_absent_baseline(exp: ExperimentConfig, out: Path) -> None:
    """A warning before anything trains when the baseline is none of the arms run here (a
    misspelt name, or arms run apart): the report's tests need it."""
    arms = sorted(exp.arms())
    if exp.baseline not in arms:
        warnings.warn(f"experiment.baseline: {exp.baseline!r} is not among the arms run here {arms}; the report tests "
                      "the arms against it once merged with a run of it (`surgery compare DIR... --out DIR`), or "
                      f"against one of these (`surgery compare {out} --baseline ARM`).", SurgeryWarning, stacklevel=3)
