"""One recipe, start to finish: data -> pretrain -> surgery -> fine-tune.

The same functions back the CLI commands (``pretrain``, ``finetune``, ``run``; ``assemble``
and ``validate`` are :mod:`surgery.planning`'s) and the Python API, so the two cannot drift.
"""

from __future__ import annotations

import json
import shutil
import time
import warnings
from contextlib import nullcontext
from functools import partial
from pathlib import Path
from typing import Any

from .configs import DATA, GRAPH, require
from .data import load_dataset
from .dataset import Dataset
from .devices import resolve_device
from .errors import ConfigError, ManifestError, OutputError, SurgeryError, SurgeryWarning, TrainingDiverged
from .finetune import EpochLog, FinetuneConfig, PopulationTrainer, Record, Trainer
from .graph import ModelGraph
from .io import make_dir, percent
from .lock import hold
from .model_file import load_model, save_model
from .module_engine import error_rate
from .modules import to_module
from .outdirs import check_own_out, read_result
from .planning import assemble, grid_hint, nothing_to_assemble, plan_network, planned_stack
from .population import architecture_key
from .preflight import check_data, check_fits
from .pretrain import greedy_pretrain
from .provenance import COMMANDS_FILE, device_label, recording
from .recipe import Recipe, as_recipe
from .runtime import is_main_process
from .stack import LayerStack
from .stacks_dir import continue_from, save_snapshot
from .weights_io import read_manifest


def _first_difference(here: Any, there: Any, path: str = "") -> str:
    """Where two JSON values first differ, e.g. ``finetune.epochs: 5 here, 2 there``."""
    if isinstance(here, dict) and isinstance(there, dict):
        for k in sorted(set(here) | set(there), key=str):
            if here.get(k) != there.get(k):
                return _first_difference(here.get(k), there.get(k), f"{path}.{k}" if path else str(k))
    return f"{path.removeprefix('recipe.') or 'the recipe'}: {json.dumps(here)} here, {json.dumps(there)} there"


def _finished_already(out: Path, made: dict[str, Any]) -> dict[str, Any] | None:
    """For ``--resume``: the result of the run ``out`` holds finished when it was made as
    ``made`` says (its recipe; what its ``model.safetensors`` records), with a warning that
    nothing trains (its checkpoint, if any, is not read); ``None`` when ``out`` holds no
    finished run (or one we cannot read), or another recipe's with a checkpoint to continue
    (e.g. for more epochs). ``OutputError`` when it holds the finished run of another recipe
    and no checkpoint (``finetune.checkpoint_every: 0``): resuming would start that run over."""
    checkpoint = (out / "checkpoints" / "last.safetensors").is_file()
    try:
        result = read_result(out / "result.json")
        manifest = read_manifest(out / "model.safetensors")
    except (ManifestError, OSError):
        return None
    made = json.loads(json.dumps(made))  # as a manifest reads back (tuples as lists)
    theirs = {k: manifest.get(k) for k in made}
    if theirs != made and checkpoint:
        return None
    if theirs != made:
        raise OutputError(
            f"--resume: {out} holds another finished run ({_first_difference(made, theirs)}) and no checkpoint "
            "(finetune.checkpoint_every was 0): there is nothing of this one to continue, and nothing was "
            "changed. Run without --resume to train this recipe there from the start (replacing that run), or give "
            "it its own --out.")
    ended = f"test error {percent(result.get('test_error'))}, {result.get('epochs')} epochs"
    warnings.warn(f"--resume: {out} has finished ({ended}); nothing was trained. Run without --resume to train it "
                  "again.", SurgeryWarning, stacklevel=3)
    return result


def pretrain(recipe: Recipe | str | Path, data: Dataset | None = None, progress: bool | None = None,
             snapshots: Path | None = None, resume: bool = False, planned: bool = False) -> LayerStack:
    """Greedy layer-wise pretraining of ``recipe.pretrain`` on the recipe's data; the stack
    records the recipe and the dataset. ``snapshots``: a directory to keep each layer's
    snapshot in, which ``resume`` continues after (as an experiment's stacks do). ``planned``:
    the caller has already checked the stack (:func:`plan_network`), so it is not checked again."""
    recipe = as_recipe(recipe, "surgery.pretrain")
    if recipe.pretrain is None:
        raise SurgeryError(f"{recipe.source}: the recipe has no pretrain: section.{grid_hint(recipe)}")
    data = data or load_dataset(recipe.data, recipe.base_dir)
    if not planned:
        planned_stack(recipe, data)  # every layer's shape, size and input checked before the first one trains
    if snapshots is None:
        stack = greedy_pretrain(data.train.x, recipe.pretrain, recipe.seed, y=data.train.y, progress=progress,
                                data_fingerprint=data.fingerprint(), valid=(data.valid.x, data.valid.y))
    else:
        with hold(make_dir(snapshots), flag="-o/--output"):  # two runs would mix their layers there
            plan = {"pretrain": recipe.pretrain.model_dump(mode="json"), "seed": recipe.seed,
                    "data": data.fingerprint()}
            start = continue_from(snapshots, plan, len(recipe.pretrain.layers), resume, progress)
            stack = greedy_pretrain(data.train.x, recipe.pretrain, recipe.seed, y=data.train.y, progress=progress,
                                    data_fingerprint=data.fingerprint(), on_layer=partial(save_snapshot, snapshots),
                                    valid=(data.valid.x, data.valid.y), start=start)
    stack.recipe = recipe.to_dict()
    stack.info["dataset"] = data.name
    return stack


def run(recipe: Recipe | str | Path, out: str | Path, resume: bool = False, progress: bool | None = None,
        data: Dataset | None = None, epoch_lines: bool = True, record: bool = True) -> dict[str, Any]:
    """pretrain (if any) -> assemble -> fine-tune (if any) of a recipe (or a recipe file);
    files go under ``out``. ``epoch_lines``: a log line per epoch where the bar is hidden
    (:class:`surgery.finetune.EpochLog`; a search's trials say one line each instead).
    ``record``: this command goes into ``out/commands.json`` when it trains (a search's trials
    are recorded in the search's; a ``resume`` that finds the run finished writes nothing)."""
    recipe = as_recipe(recipe, "surgery.run")
    if recipe.pretrain is None and recipe.surgery is None:
        nothing_to_assemble(recipe)  # before anything is made or loaded
    t0 = time.perf_counter()
    data = data or load_dataset(recipe.data, recipe.base_dir)
    if recipe.pretrain is not None:  # what would fail after pretraining fails now, before --out is made
        plan_network(recipe, data)
    out = Path(out)
    check_own_out(out, "single run")
    make_dir(out)
    with hold(out):
        if resume and (done := _finished_already(out, {"recipe": recipe.to_dict()})) is not None:
            return done  # nothing trained, nothing written
        with recording(out / COMMANDS_FILE, _device(recipe), t0) if record else nullcontext():
            return _pretrain_and_finetune(recipe, data, out, resume, progress, t0, epoch_lines)


def _device(recipe: Recipe) -> str:
    """Where a single run trains, as its commands record it: fine-tuning's device, or the data's
    (pretraining) when it has no finetune: section."""
    if recipe.finetune is not None:
        return device_label(resolve_device(recipe.finetune.device, "finetune.device"))
    return device_label(resolve_device(recipe.data.device, "data.device"))


def _pretrain_and_finetune(recipe: Recipe, data: Dataset, out: Path, resume: bool, progress: bool | None,
                           t0: float, epoch_lines: bool) -> dict[str, Any]:
    """:func:`run`'s work once it holds ``out``: pretrain (or, resumed, read the stack or
    continue its layers), assemble, fine-tune (or continue from the checkpoint)."""
    stack = None
    stack_path = out / "stack.safetensors"
    if recipe.pretrain is not None:
        if resume and stack_path.is_file():
            try:
                stack = LayerStack.load(stack_path)
            except ManifestError:  # a damaged stack is made again, as a damaged cell's result is
                warnings.warn(f"--resume: {stack_path}, this run's pretrained stack, is damaged (no readable stack "
                              "file); it is pretrained again from the recipe's seed.", SurgeryWarning, stacklevel=2)
        if stack is None:
            stack = pretrain(recipe, data, progress, out / "pretrain" if is_main_process() else None, resume,
                             planned=True)
            if is_main_process():
                stack.save(stack_path)
                shutil.rmtree(out / "pretrain", ignore_errors=True)  # its layers are in the stack now
    t_pre = time.perf_counter() - t0
    graph = assemble(recipe, stack, data.num_classes, data.input_shape)
    trainer = None
    if recipe.finetune is not None:
        trainer = Trainer(graph, data, recipe.finetune, recipe.seed, out,
                          EpochLog(recipe.finetune) if epoch_lines else None,
                          record=_timed([out], [t_pre]),
                          provenance={"recipe": recipe.to_dict()})
    if trainer is not None and resume:
        if trainer.ckpt_path().is_file():
            trainer.load_checkpoint()  # a checkpoint that does not fit fails here, before anything is written
        else:
            every = trainer.cfg.checkpoint_every
            why = "finetune.checkpoint_every is 0: none are written" if not every else "none was written yet"
            warnings.warn(f"--resume: no checkpoint at {trainer.ckpt_path()} ({why}); fine-tuning starts from "
                          "epoch 1.", SurgeryWarning, stacklevel=2)
    if is_main_process():
        save_model(graph, out / "assembled.safetensors", {"recipe": recipe.to_dict()})
    if trainer is None:
        return {"pretrain_seconds": round(t_pre, 3), "out": str(out)}
    return trainer.fit()


def _timed(outs: list[Path], t_pres: list[float]) -> Record:
    """``record`` for the results of runs fine-tuned together: run k's output directory, its
    pretraining seconds ``t_pres[k]`` and its share of the fine-tuning seconds."""
    def complete(k: int, res: dict[str, Any]) -> dict[str, Any]:
        res = {"pretrain_seconds": round(t_pres[k], 3), "out": str(outs[k]), **res,
               "finetune_seconds": round(res["seconds"] / len(outs), 3)}
        res.pop("seconds")
        return res
    return complete


def _prepare(recipe: Recipe, out: Path, data: Dataset, progress: bool | None) -> tuple[ModelGraph, float]:
    """Pretrain (if the recipe says so) and assemble, saving both under ``out``."""
    make_dir(out)
    t0 = time.perf_counter()
    stack = pretrain(recipe, data, progress) if recipe.pretrain is not None else None
    if stack is not None:
        stack.save(out / "stack.safetensors")
    graph = assemble(recipe, stack, data.num_classes, data.input_shape)
    save_model(graph, out / "assembled.safetensors", {"recipe": recipe.to_dict()})
    return graph, time.perf_counter() - t0


def run_batch(recipes: list[Recipe], outs: list[Path], progress: bool | None = None) -> list[dict[str, Any] | None]:
    """Run recipes that differ only in their values (a batch of search trials): each is
    pretrained and assembled on its own, then all are fine-tuned together as one population
    when they share data, architecture and budget, else one after another. Each run's files
    are what :func:`run` writes; ``None`` marks a run whose loss diverged."""
    datasets: dict[str, Dataset] = {}
    prepared: list[tuple[int, Recipe, Path, Dataset, ModelGraph, float]] = []
    results: list[dict[str, Any] | None] = [None] * len(recipes)
    for i, (r, out) in enumerate(zip(recipes, outs)):
        if r.finetune is None:
            raise ConfigError(f"{r.source}: a batch of runs needs a finetune: section.")
        key = json.dumps(r.data.model_dump(mode="json"), sort_keys=True)
        if key not in datasets:
            datasets[key] = load_dataset(r.data, r.base_dir)
        try:
            graph, t_pre = _prepare(r, out, datasets[key], progress)
        except TrainingDiverged:
            continue
        prepared.append((i, r, out, datasets[key], graph, t_pre))
    shapes = {(id(p[3]), architecture_key(p[4], p[1].finetune)) for p in prepared}
    if len(shapes) == 1 and len(prepared) > 1:
        try:
            fitted = PopulationTrainer([p[4] for p in prepared], prepared[0][3], [p[1].finetune for p in prepared],
                                       [p[1].seed for p in prepared], out_dirs=[p[2] for p in prepared],
                                       record=_timed([p[2] for p in prepared], [p[5] for p in prepared]),
                                       provenance=[{"recipe": p[1].to_dict()} for p in prepared]).fit()
            for k, p in enumerate(prepared):
                results[p[0]] = fitted[k]
            return results
        except (ConfigError, TrainingDiverged):
            pass  # not batchable, or a member diverged: each runs alone below
    for i, r, out, data, graph, t_pre in prepared:
        assert r.finetune is not None
        try:
            results[i] = Trainer(graph, data, r.finetune, r.seed, out, record=_timed([out], [t_pre]),
                                 provenance={"recipe": r.to_dict()}).fit()
        except TrainingDiverged:
            continue
    return results


def evaluate(graph: ModelGraph, data: Dataset) -> dict[str, float | None]:
    """The classification error (%) of ``graph`` on each split of ``data`` (``train_error``,
    ``valid_error``, ``test_error``; ``None`` for an empty split), dropout off, on the device
    the data is on; the data and the network are checked as fine-tuning checks them."""
    require(graph, ModelGraph, "surgery.evaluate(graph, data)", GRAPH)
    require(data, Dataset, "surgery.evaluate(graph, data)", DATA)
    check_data(data)
    check_fits(graph, data)
    device = data.train.x.device
    model = to_module(graph).to(device)
    return {f"{name}_error": error_rate(model, split, device) if len(split) else None
            for name, split in (("train", data.train), ("valid", data.valid), ("test", data.test))}


def finetune_model(model_path: str | Path, data: Dataset, cfg: FinetuneConfig, seed: int, out: str | Path,
                   resume: bool = False, provenance: dict[str, Any] | None = None) -> dict[str, Any]:
    """Fine-tune an assembled model file on ``data``; results go under ``out``, and
    ``provenance`` (e.g. the recipe) into the fine-tuned model file."""
    check_own_out(Path(out), "single run")
    make_dir(out)  # an unwritable output fails now, not after the first epoch
    device = device_label(resolve_device(cfg.device, "finetune.device"))
    with hold(out):
        if resume and (done := _finished_already(Path(out), provenance or {})) is not None:
            return done  # nothing trained, nothing written
        with recording(Path(out) / COMMANDS_FILE, device):
            graph = load_model(model_path)
            return Trainer(graph, data, cfg, seed, out, EpochLog(cfg), provenance=provenance).fit(resume=resume)
