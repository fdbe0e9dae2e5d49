"""The cells of an experiment directory: each cell's greedy stack (pretrained once, from
``stacks_dir``), its fine-tuning alone or in a population, and its result cached under the
cell's key (``OUT/cells/<key>/result.json``; a tuning trial's under ``OUT/tuning/``), so a
rerun, or another shard, finds what has finished.
"""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .assembly import build_graph
from .checkpoint import MEMBER_CHECKPOINT, read_checkpoint_meta
from .data import load_dataset
from .dataset import Dataset
from .devices import resolve_device
from .errors import CheckpointError, ConfigError, ManifestError, SurgeryWarning, TrainingDiverged
from .finetune import PopulationTrainer, Trainer
from .graph import ModelGraph
from .grid import Cell
from .io import Pace, duration, progress_line, read_json, write_json
from .outdirs import read_result
from .planning import load_sources
from .population import architecture_key, model_bytes, population_size
from .recipe import Recipe, recipe_from_dict
from .stacks_dir import StackDonors, StackStore

DIVERGED_FILE = "diverged.json"  # in a tuning trial's directory: its training diverged (told as the worst score)


class CellRunner:
    """Runs cells of one experiment directory: each cell's greedy stack from ``stacks``
    (pretrained once), fine-tuning alone or in populations, each result cached under the
    cell's key."""

    def __init__(self, recipe: Recipe, out: Path, progress: bool | None = None, donors: StackDonors | None = None):
        self.recipe, self.out, self.progress = recipe, out, progress
        data = load_dataset(recipe.data, recipe.base_dir)
        self.data = data
        self.datasets = {json.dumps(recipe.data.model_dump(mode="json"), sort_keys=True): data}
        self.stacks = StackStore(out / "stacks", recipe, self.dataset, progress, donors)
        self.damaged: set[Path] = set()  # result files found damaged, each told once

    def dataset(self, r: Recipe) -> Dataset:
        """The cell's dataset, loaded once per distinct data section (an arm may have its own)."""
        key = json.dumps(r.data.model_dump(mode="json"), sort_keys=True)
        if key not in self.datasets:
            self.datasets[key] = load_dataset(r.data, self.recipe.base_dir)
        return self.datasets[key]

    def run_populations(self, cells: list[Cell], mode: str | int, bar: Any = None,
                        cells_dir: str = "cells", pace: Pace | None = None) -> set[str]:
        """Fine-tune the unfinished cells that share an architecture, data and budget
        together, in populations as large as ``mode`` allows; the rest (and any cell a
        population cannot take) are left for :meth:`run`. Returns the keys of the cells
        finished here (``bar`` and ``pace``, the log line's count, count them as their
        population ends)."""
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
                batch = members[i : i + size]
                if len(batch) == 1 and not after:
                    continue
                told = self._population(batch, cells_dir, after > 0)
                if told is not None:
                    done.update(m[0].key for m in batch)
                    if bar is not None:
                        bar.update(len(batch))
                    progress_line(self.progress, told + (f"; {pace.add(len(batch))}" if pace is not None else ""))
        return done

    def _population(self, members: list[tuple[Cell, Recipe, ModelGraph, float]], cells_dir: str,
                    resume: bool = False) -> str | None:
        """Fine-tune ``members`` as one population; the log line saying so, or None when they
        cannot train together (they then train alone)."""
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
            return None  # not batchable (an optimizer or option populations lack): these cells train alone
        t0 = time.perf_counter()
        try:
            pop.fit()
        except TrainingDiverged:
            return None  # a member diverged: the cells train alone, as without populations; that one says so
        arms = ", ".join(sorted({f"{m[0].condition} depth {m[0].depth}" for m in members}))
        seeds = ", ".join(str(s) for s in sorted({m[0].seed for m in members}))
        who = f"{len(members)} members" if len(members) > 1 else "1 member, continued"
        return f"population: {who} ({arms}; seed {seeds}) fine-tuned together in {duration(time.perf_counter() - t0)}"

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
        done = self.finished(cell, cells_dir)[1]
        if done is not None:
            return done, cdir
        if (cdir / "checkpoints" / MEMBER_CHECKPOINT).is_file() and _member_epoch(cdir, cell):
            # stopped in a population (now off, or its group changed): it continues as a population of one
            r, _, graph, pre_s = self.prepare(cell)
            if self._population([(cell, r, graph, pre_s)], cells_dir, resume=True):
                return read_json(cdir / "result.json"), cdir
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
        for one whose training diverged (its ``diverged.json``). A damaged ``result.json``
        (not written by us: ours are written whole) is an unfinished cell, with a warning."""
        cdir = self.out / cells_dir / cell.key
        if (cdir / "result.json").is_file():
            try:
                return True, read_result(cdir / "result.json")
            except ManifestError as e:
                if cdir not in self.damaged:  # asked again and again while it waits to train
                    self.damaged.add(cdir)
                    warnings.warn(f"cell {cell.condition} depth {cell.depth} seed {cell.seed}: {e} It trains again.",
                                  SurgeryWarning, stacklevel=2)
        return (cdir / DIVERGED_FILE).is_file(), None

    def written(self, cell: Cell, cells_dir: str) -> bool:
        """Whether the cell's directory holds its end (a result, readable or not, or its
        divergence): what a shard waits for from the others, without reading it."""
        cdir = self.out / cells_dir / cell.key
        return (cdir / "result.json").is_file() or (cdir / DIVERGED_FILE).is_file()

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


def summary(result: dict[str, Any], test: bool = True) -> str:
    """A finished run in a few words: its errors (``test``: with the test error; a tuning
    trial shows only what it is chosen by), epochs and wall time."""
    valid = result.get("valid_error")
    errors = [f"test {result['test_error']:.2f}%"] if test else []
    errors += [f"valid {valid:.2f}%"] if valid is not None else []
    epochs = result["epochs"]
    return ", ".join([*errors, f"{epochs} epoch{'' if epochs == 1 else 's'}",
                      duration(result.get("finetune_seconds") or 0)])
