"""Comparisons: conditions (arms) x depths x seeds, each cell a full recipe.

Every arm of a seed sees the same data order (the fine-tuning shuffle is seeded by the
seed alone) and the same fine-tuning budget; the no-pretraining arm starts from the
classic initialisation for its activation. A cell's results live under a hash of its full
config, so finished cells are skipped when a comparison is re-run. Greedy stacks are
trained once per (arm, seed) at the largest depth; the depth-d stack is the snapshot
after its d-th layer, which for layer-wise methods is exactly what a depth-d run trains.
Cells of one shape can fine-tune together as a population (``experiment.population``),
and ``experiment.tune`` gives every arm the same tuning budget before the seeds run.
"""

from __future__ import annotations

import csv
import json
import shutil
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .assembly import build_graph
from .checkpoint import MEMBER_CHECKPOINT, read_checkpoint_meta
from .data import Dataset, load_dataset, resolve_device
from .errors import CheckpointError, ConfigError, SurgeryError, SurgeryWarning, TrainingDiverged
from .experiment_config import TuneConfig
from .finetune import PopulationTrainer, Trainer
from .graph import ModelGraph
from .grid import Cell, plan_cells, shard_of, with_values
from .io import make_dir, progress_bar, progress_line, write_json, write_text
from .pipeline import is_single_run_dir, load_sources
from .population import architecture_key, model_bytes, population_size
from .recipe import Recipe, recipe_from_dict
from .search import DIVERGED_SCORE, make_sampler, shown, suggest
from .stacks_dir import StackStore

DIVERGED_FILE = "diverged.json"  # in a tuning trial's directory: its training diverged (told as the worst score)
WAIT_SECONDS = 30.0  # the longest pause between two looks for another shard's trials
RESULT_FIELDS = ["condition", "depth", "seed", "train_error", "valid_error", "test_error", "epochs",
                 "best_epoch", "pretrain_seconds", "finetune_seconds", "cell", "path"]


class CellRunner:
    """Runs cells of one experiment directory: each cell's greedy stack from ``stacks``
    (pretrained once), fine-tuning alone or in populations, each result cached under the
    cell's key."""

    def __init__(self, recipe: Recipe, out: Path, progress: bool | None = None):
        self.recipe, self.out, self.progress = recipe, out, progress
        data = load_dataset(recipe.data, recipe.base_dir)
        self.data = data
        self.datasets = {json.dumps(recipe.data.model_dump(mode="json"), sort_keys=True): data}
        self.stacks = StackStore(out / "stacks", recipe, self.dataset, progress)

    def dataset(self, r: Recipe) -> Dataset:
        """The cell's dataset, loaded once per distinct data section (an arm may have its own)."""
        key = json.dumps(r.data.model_dump(mode="json"), sort_keys=True)
        if key not in self.datasets:
            self.datasets[key] = load_dataset(r.data, self.recipe.base_dir)
        return self.datasets[key]

    def run_populations(self, cells: list[Cell], mode: str | int, bar: Any = None,
                        cells_dir: str = "cells") -> set[str]:
        """Fine-tune the unfinished cells that share an architecture, data and budget
        together, in populations as large as ``mode`` allows; the rest (and any cell a
        population cannot take) are left for :meth:`run`. Returns the keys of the cells
        finished here (``bar`` counts them as their population ends)."""
        assert self.recipe.finetune is not None
        if mode == "off" or (mode == "auto" and resolve_device(self.recipe.finetune.device).type != "cuda"):
            return set()  # one cell at a time: nothing to prepare here
        groups: dict[tuple[str, str, int], list[tuple[Cell, Recipe, ModelGraph, float]]] = {}
        for cell in cells:
            if (self.out / cells_dir / cell.key / "result.json").is_file():
                continue
            r, _, graph, pre_s = self.prepare(cell)
            assert r.finetune is not None
            dkey = json.dumps(r.data.model_dump(mode="json"), sort_keys=True)
            # members stopped after the same epoch continue together (0: none kept)
            after = _member_epoch(self.out / cells_dir / cell.key, cell) if r.finetune.checkpoint_every else 0
            groups.setdefault((dkey, architecture_key(graph, r.finetune), after), []).append((cell, r, graph, pre_s))
        done: set[str] = set()
        for (_, _, after), members in groups.items():
            r0 = members[0][1]
            size = population_size(mode, resolve_device(r0.finetune.device), model_bytes(members[0][2], 100))
            for i in range(0, len(members), size):
                # a member's checkpoint continues in a population, of one if need be
                if (len(members[i : i + size]) > 1 or after) and self._population(members[i : i + size], cells_dir,
                                                                                   after > 0):
                    done.update(m[0].key for m in members[i : i + size])
                    if bar is not None:
                        bar.update(len(members[i : i + size]))
        return done

    def _population(self, members: list[tuple[Cell, Recipe, ModelGraph, float]], cells_dir: str,
                    resume: bool = False) -> bool:
        data = self.dataset(members[0][1])

        def trainer() -> PopulationTrainer:
            return PopulationTrainer([m[2] for m in members], data, [m[1].finetune for m in members],
                                     [m[1].seed for m in members],
                                     out_dirs=[self.open_cell(m[0], cells_dir) for m in members],
                                     record=lambda k, res: _record(members[k][0], res, members[k][3], len(members)),
                                     provenance=[{"recipe": m[0].recipe} for m in members])

        try:
            pop = trainer()
            if resume:
                try:
                    pop.resume()
                except CheckpointError as e:
                    warnings.warn(f"population of {len(members)}: a member's checkpoint cannot be used "
                                  f"({str(e).split('; ')[0]}); the members train from epoch 1.", SurgeryWarning,
                                  stacklevel=2)
                    pop = trainer()  # its state may be half restored: built again
        except ConfigError:
            return False  # not batchable (an optimizer or option populations lack): these cells train alone
        t0 = time.perf_counter()
        try:
            pop.fit()
        except TrainingDiverged:
            return False  # a member diverged: the cells train alone, as without populations; that one says so
        arms = ", ".join(sorted({f"{m[0].condition} depth {m[0].depth}" for m in members}))
        seeds = ", ".join(str(s) for s in sorted({m[0].seed for m in members}))
        who = f"{len(members)} members" if len(members) > 1 else "1 member, continued"
        progress_line(self.progress, f"population: {who} ({arms}; seed {seeds}) fine-tuned together "
                                     f"in {(time.perf_counter() - t0) / 60:.1f} min")
        return True

    def open_cell(self, cell: Cell, cells_dir: str = "cells") -> Path:
        """The cell's directory, holding its ``recipe.json`` (written here) before it trains."""
        cdir = self.out / cells_dir / cell.key
        write_json(cdir / "recipe.json", cell.recipe)
        return cdir

    def prepare(self, cell: Cell) -> tuple[Recipe, Dataset, ModelGraph, float]:
        """The cell's recipe, dataset and assembled network (its stack pretrained on first
        use), and the pretraining seconds attributed to it."""
        where = f"{self.recipe.source} [{cell.condition} d{cell.depth} s{cell.seed}]"
        r = recipe_from_dict(cell.recipe, self.recipe.base_dir, where)
        data = self.dataset(r)
        stack, pre_s = self.stacks.stack(cell, r, data) if cell.pretrain_key is not None else (None, 0.0)
        assert r.surgery is not None
        return r, data, build_graph(r.surgery, load_sources(r, stack), r.seed, data.input_shape), pre_s

    def run(self, cell: Cell, cells_dir: str = "cells") -> tuple[dict[str, Any], Path]:
        """The cell's result (cached in ``OUT/<cells_dir>/<key>/result.json``) and its directory."""
        cdir = self.out / cells_dir / cell.key
        res_path = cdir / "result.json"
        if res_path.is_file():
            return json.loads(res_path.read_text()), cdir
        if (cdir / "checkpoints" / MEMBER_CHECKPOINT).is_file() and _member_epoch(cdir, cell):
            # stopped in a population (now off, or its group changed): it continues as a population of one
            r, _, graph, pre_s = self.prepare(cell)
            if self._population([(cell, r, graph, pre_s)], cells_dir, resume=True):
                return json.loads(res_path.read_text()), cdir
        trainer = self._resumed(cell, cells_dir)
        try:
            return trainer.fit(), cdir  # its result.json, written last, marks the cell finished
        except TrainingDiverged as e:
            raise TrainingDiverged(f"cell {cell.condition} depth {cell.depth} seed {cell.seed} ({cdir}): {e}") from None

    def _trainer(self, cell: Cell, cells_dir: str) -> Trainer:
        r, data, graph, pre_s = self.prepare(cell)
        assert r.finetune is not None
        return Trainer(graph, data, r.finetune, r.seed, self.open_cell(cell, cells_dir),
                       record=lambda k, res: _record(cell, res, pre_s), provenance={"recipe": cell.recipe})

    def _resumed(self, cell: Cell, cells_dir: str) -> Trainer:
        """The cell's trainer, continued from the checkpoint a killed run left in its
        directory (with ``finetune.checkpoint_every``); with an unusable one the cell trains
        from epoch 1, with a warning."""
        trainer = self._trainer(cell, cells_dir)
        if not (trainer.cfg.checkpoint_every and trainer.ckpt_path().is_file()):
            return trainer
        try:
            trainer.load_checkpoint()
            return trainer
        except CheckpointError as e:
            _starts_over(cell, str(e).split("; ")[0])  # what is wrong, without the advice meant for --resume
            return self._trainer(cell, cells_dir)  # its graph may be half restored: built again

    def finished(self, cell: Cell, cells_dir: str) -> tuple[bool, dict[str, Any] | None]:
        """Whether the cell has ended (here or in another process) and its result: ``None``
        for one whose training diverged (its ``diverged.json``)."""
        cdir = self.out / cells_dir / cell.key
        if (cdir / "result.json").is_file():
            return True, json.loads((cdir / "result.json").read_text())
        return (cdir / DIVERGED_FILE).is_file(), None

    def run_batch(self, cells: list[Cell], mode: str | int, cells_dir: str) -> Iterator[dict[str, Any] | None]:
        """Yield each cell's result in order, ``None`` for one whose training diverged: the
        unfinished cells' stacks pretrain and their fine-tuning runs in populations as
        ``mode`` allows (a tuning batch's trials), then the rest train alone, each yielded
        as it finishes; equal cells train once."""
        unique = [c for c in {c.key: c for c in cells}.values() if not self.finished(c, cells_dir)[0]]
        self.stacks.pretrain_populations(unique, mode)
        self.run_populations(unique, mode, cells_dir=cells_dir)
        for cell in cells:
            ended, result = self.finished(cell, cells_dir)
            if ended:  # a rerun (or another shard) finds it finished, or diverged: not trained again
                yield result
                continue
            try:
                yield self.run(cell, cells_dir)[0]
            except TrainingDiverged as e:
                write_json(self.out / cells_dir / cell.key / DIVERGED_FILE,
                           {"condition": cell.condition, "depth": cell.depth, "seed": cell.seed, "error": str(e)})
                yield None


def _member_epoch(cdir: Path, cell: Cell) -> int:
    """The epoch a population member's checkpoint in cell directory ``cdir`` was written
    after; 0 when there is none, or (with a warning) when it cannot be read."""
    path = cdir / "checkpoints" / MEMBER_CHECKPOINT
    if not path.is_file():
        return 0
    epoch = ((read_checkpoint_meta(path) or {}).get("state") or {}).get("epoch")
    if isinstance(epoch, int) and epoch > 0:
        return epoch
    _starts_over(cell, f"{path} is unreadable")
    return 0


def _starts_over(cell: Cell, why: str) -> None:
    """Warn that ``cell``'s checkpoint cannot be used (``why``) and it trains from epoch 1."""
    warnings.warn(f"cell {cell.condition} depth {cell.depth} seed {cell.seed}: its checkpoint cannot be used "
                  f"({why}); the cell trains from epoch 1.", SurgeryWarning, stacklevel=3)


def _record(cell: Cell, result: dict[str, Any], pretrain_seconds: float, share: int = 1) -> dict[str, Any]:
    """A cell's result.json: the training result, its seconds (a population member gets its
    ``1/share`` of the population's), the pretraining seconds, and which cell it is."""
    res = dict(result)
    res["finetune_seconds"] = round(res.pop("seconds") / share, 3)
    res["pretrain_seconds"] = round(pretrain_seconds, 3)
    res.update(condition=cell.condition, depth=cell.depth, seed=cell.seed, cell=cell.key)
    return res


def _summary(result: dict[str, Any], test: bool = True) -> str:
    """A finished run in a few words: its errors (``test``: with the test error; a tuning
    trial shows only what it is chosen by), epochs and minutes."""
    valid = result.get("valid_error")
    errors = [f"test {result['test_error']:.2f}%"] if test else []
    errors += [f"valid {valid:.2f}%"] if valid is not None else []
    minutes = (result.get("finetune_seconds") or 0) / 60
    return ", ".join([*errors, f"{result['epochs']} epochs", f"{minutes:.1f} min"])


def run_experiment(recipe: Recipe, out: str | Path, progress: bool | None = None,
                   shard: tuple[int, int] | None = None) -> list[dict[str, Any]]:
    """Run every cell not yet finished under ``out`` (after tuning each arm when the
    experiment has ``tune:``); write ``results.csv`` and return its rows.

    ``shard=(i, n)``: this process is shard ``i`` (0-based) of ``n`` sharing ``out``: it
    trains only its share of each trial batch and of the cells (:func:`grid.shard_of`),
    waits for the other shards' trials of a batch before the next (or the best is chosen),
    and writes no ``results.csv`` (a run without a shard does, training whatever is left);
    it returns the rows of its own cells.

    The report (tables, figures) is :func:`surgery.report.write_report`'s job."""
    out = make_dir(Path(out))
    runner = CellRunner(recipe, out, progress)
    cells = plan_cells(recipe, runner.data.input_shape, runner.data.num_classes)
    assert recipe.experiment is not None
    write_json(out / "experiment.json", {"recipe": recipe.to_dict(), "cells": len(cells)})  # first: inspect reads it
    if recipe.experiment.tune is not None:
        tuned = tune_arms(recipe.experiment.tune, cells, runner, out, progress, shard)
        if shard is None or shard[0] == 0:  # one process adopts them
            for cell in tuned:  # a first seed's cell is its arm's best trial
                adopt_trial(out, cell)
        cells = tuned if shard is None else shard_of([c for c in tuned if not runner.finished(c, "tuning")[0]], *shard)
    elif shard is not None:
        cells = shard_of(cells, *shard)
    bar = progress_bar(len(cells), "experiment", progress, "cell")
    done_before = {c.key for c in cells if (out / "cells" / c.key / "result.json").is_file()}
    runner.stacks.pretrain_populations(cells, recipe.experiment.population)
    together = runner.run_populations(cells, recipe.experiment.population, bar)
    rows = []
    for cell in cells:
        result, cdir = runner.run(cell)
        row = {k: result.get(k) for k in RESULT_FIELDS}
        row.update(condition=cell.condition, depth=cell.depth, seed=cell.seed, cell=cell.key, path=str(cdir))
        rows.append(row)
        if cell.key not in together:  # a population's cells were counted when it finished
            bar.update(1)
        bar.set_postfix(last=f"{cell.condition} d{cell.depth} {result['test_error']:.2f}%")
        if cell.key not in done_before:
            progress_line(progress, f"experiment: cell {len(rows)}/{len(cells)} {cell.condition} depth {cell.depth} "
                                    f"seed {cell.seed}: {_summary(result)}")
    bar.close()
    if shard is None:
        write_results_csv(out / "results.csv", rows)
    return rows


def tune_arms(cfg: TuneConfig, cells: list[Cell], runner: CellRunner, out: Path,
              progress: bool | None = None, shard: tuple[int, int] | None = None) -> list[Cell]:
    """The same search budget for every (arm, depth): ``cfg.trials`` Optuna trials on the
    first seed's cell, scored by validation error (never test), ``cfg.batch`` at a time;
    then every seed's cell with the best trial's values (the caller adopts the best trial's
    directory as its first seed's cell). Writes every trial to ``OUT/tuning.json``; a trial
    whose training diverged is recorded as such and told to Optuna as the worst error
    (``DIVERGED_SCORE``), never chosen. A ``shard`` trains its share of each batch and waits
    for the other shards' trials."""
    groups: dict[tuple[str, int], list[Cell]] = {}
    for c in cells:
        groups.setdefault((c.condition, c.depth), []).append(c)
    record, tuned = [], []
    bar = progress_bar(len(groups) * cfg.trials, "tuning", progress, "trial")
    for (arm, depth), group in groups.items():
        trials, best = _tune_arm(cfg, group[0], runner, bar, progress, shard)
        record += [{"condition": arm, "depth": depth, **t} for t in [*trials, best]]
        tuned += [with_values(c, best["params"]) for c in group]
    bar.close()
    write_json(out / "tuning.json", {"metric": cfg.metric, "trials_per_arm": cfg.trials, "batch": cfg.batch,
                                     "trials": record})
    return tuned


def _tune_arm(cfg: TuneConfig, cell: Cell, runner: CellRunner, bar: Any, progress: bool | None,
              shard: tuple[int, int] | None = None) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """One (arm, depth)'s study on ``cell``: its trials' records and the best one's (a
    ``shard`` trains its share of each batch, then waits for the rest)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="minimize", sampler=make_sampler(cfg.sampler, cfg.seed))
    where = f"{cell.condition} depth {cell.depth}"
    # a pretraining value means nothing to an arm that does not pretrain (with_values skips it)
    ignored = sorted(k for k in cfg.params if k.startswith("pretrain")) if cell.pretrain_key is None else []
    assert runner.recipe.experiment is not None
    mode = runner.recipe.experiment.population
    record: list[dict[str, Any]] = []

    def tell(trial: Any, vals: dict[str, Any], result: dict[str, Any] | None, whose: str = "") -> None:
        if result is None:
            study.tell(trial, DIVERGED_SCORE)
            record.append({"trial": trial.number, "params": vals, cfg.metric: None, "diverged": True})
        else:
            study.tell(trial, result[cfg.metric])
            record.append({"trial": trial.number, "params": vals, cfg.metric: result[cfg.metric]})
        bar.update(1)
        outcome = f"diverged (scored {DIVERGED_SCORE:g}%)" if result is None else _summary(result, test=False)
        progress_line(progress, f"tuning: {where} trial {trial.number + 1}/{cfg.trials} "
                                f"{shown(vals, ignored)}: {outcome}{whose}")

    while len(record) < cfg.trials:
        asked = [study.ask() for _ in range(min(cfg.batch, cfg.trials - len(record)))]
        values = [suggest(t, cfg.params) for t in asked]
        batch = [with_values(cell, v) for v in values]
        mine = {c.key for c in (batch if shard is None else shard_of(batch, *shard))}
        trained = runner.run_batch([c for c in batch if c.key in mine], mode, "tuning")
        later = []  # other shards' trials, read once this shard's have trained
        for trial, vals, c in zip(asked, values, batch):  # each told and logged as it finishes
            if c.key not in mine:
                later.append((trial, vals, c))
                continue
            tell(trial, vals, next(trained))
        if later:
            _wait_for([c for _, _, c in later], runner, f"tuning: {where}", progress)
        for trial, vals, c in later:
            tell(trial, vals, runner.finished(c, "tuning")[1], " (another shard's)")
    record.sort(key=lambda t: t["trial"])
    scored = [t for t in record if not t.get("diverged")]
    if not scored:
        raise TrainingDiverged(f"experiment.tune: every trial of {where} diverged; narrow the ranges in "
                               f"experiment.tune.params (a lower learning rate) and rerun.")
    best = min(scored, key=lambda t: t[cfg.metric])
    return record, {"best_trial": best["trial"], "params": best["params"], cfg.metric: best[cfg.metric],
                    **({"ignored": ignored} if ignored else {})}


def _wait_for(trials: list[Cell], runner: CellRunner, what: str, progress: bool | None) -> None:
    """Return once every one of ``trials`` (other shards' tuning trials) has ended, looking
    after 1, 2, 4 ... seconds, at most ``WAIT_SECONDS`` apart; says once what it waits for."""
    pause, said = 1.0, False
    while not all(runner.finished(c, "tuning")[0] for c in trials):
        if not said:
            left = sum(not runner.finished(c, "tuning")[0] for c in trials)
            progress_line(progress, f"{what}: waiting for {left} trial(s) of the other shards (start them with "
                                    f"the same recipe, --set options and --out; Ctrl-C stops, a rerun continues)")
            said = True
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


def write_results_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    """Write the result rows to ``path`` (CSV, atomically)."""
    import io

    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=RESULT_FIELDS)
    w.writeheader()
    for r in rows:
        w.writerow({k: r.get(k) for k in RESULT_FIELDS})
    write_text(path, buf.getvalue())


def merge_tuning(dirs: list[Path]) -> dict[str, Any] | None:
    """The ``tuning.json`` of experiment directories run arm by arm, as one: every
    directory's trials, later directories winning for the same (arm, depth); ``None`` when
    none was tuned. Refused when their budgets differ (the comparison would not be fair)."""
    found = [json.loads((d / "tuning.json").read_text()) for d in dirs if (d / "tuning.json").is_file()]
    if not found:
        return None
    budgets = {(t["metric"], t["trials_per_arm"]) for t in found}
    if len(budgets) > 1:
        raise SurgeryError(f"compare: the directories were tuned with different budgets {sorted(budgets)} "
                           "(metric, trials per arm); merge only runs of one recipe's experiment.tune.")
    arms: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for t in found:
        arms.update(_by_arm(t["trials"]))
    return {**found[0], "trials": [t for trials in arms.values() for t in trials]}


def _by_arm(trials: list[dict[str, Any]]) -> dict[tuple[str, int], list[dict[str, Any]]]:
    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for t in trials:
        groups.setdefault((t["condition"], t["depth"]), []).append(t)
    return groups


def is_experiment_dir(path: Path) -> bool:
    """Whether ``path`` is (or was started as) an experiment's output directory."""
    return (path / "experiment.json").is_file() or any((path / d).is_dir() for d in ("cells", "tuning", "stacks"))


def _no_results(d: Path) -> str:
    """Why ``d`` has no results.csv, and what to do."""
    if is_single_run_dir(d) and not is_experiment_dir(d):
        return (f"{d}: a single run's directory, not an experiment's; compare merges the --out directories of "
                "recipes with an experiment: section (`surgery inspect DIR` shows a single run).")
    if is_experiment_dir(d):
        return (f"{d}: an experiment that has not finished (no results.csv yet); `surgery inspect {d}` says how far "
                f"it got, and `surgery run RECIPE --out {d}` finishes it (finished cells are kept).")
    return f"{d}: no results.csv; run `surgery run RECIPE --out {d}` first."


def read_results(dirs: list[Path]) -> list[dict[str, Any]]:
    """The result rows of one or more experiment directories; later directories win for
    the same (condition, depth, seed)."""
    rows = []
    for d in dirs:
        p = d / "results.csv"
        if not p.is_file():
            raise SurgeryError(_no_results(d))
        with p.open() as f:
            for r in csv.DictReader(f):
                for k in ("depth", "seed", "epochs", "best_epoch"):
                    r[k] = int(r[k]) if r.get(k) not in (None, "") else None
                for k in ("train_error", "valid_error", "test_error", "pretrain_seconds", "finetune_seconds"):
                    r[k] = float(r[k]) if r.get(k) not in (None, "") else None
                rows.append(r)
    # Later directories win for the same (condition, depth, seed).
    merged = {(r["condition"], r["depth"], r["seed"]): r for r in rows}
    return list(merged.values())
