"""What each ``surgery`` command does once its arguments are parsed (``surgery.cli``
parses them, imports this module, and turns a ``SurgeryError`` into one paragraph)."""

from __future__ import annotations

import argparse
import copy
import json
import math
import shutil
import time
from collections import Counter
from pathlib import Path

from pydantic import ValidationError

from .checkpoint import read_checkpoint_meta
from .data import load_dataset, warn_unseen_classes
from .datafiles import is_arrays_file, read_arrays
from .errors import ConfigError, DataError, ManifestError, OutputError, SurgeryError
from .experiment import run_experiment
from .experiment_config import recorded_experiment
from .grid import parse_shard
from .io import file_to_write, percent, write_json
from .loaders import arrays_dataset
from .model_file import describe_model, load_model, save_model
from .outdirs import check_merge_out, experiment_meta, merged_from, recipe_source
from .pipeline import evaluate, finetune_model, pretrain, run
from .planning import assemble, check_network, validate
from .preflight import check_data
from .provenance import ended, invocation, merged, with_command
from .recipe import Recipe, format_validation_error, json_schema, load_recipe
from .recipe_text import RECIPE_SUFFIXES, apply_overrides, parse_overrides
from .report import failed_line, significance_line, summary_grid, write_report
from .results import merge_results, write_results_csv
from .rundir import describe_checkpoint, describe_run
from .runtime import is_main_process
from .search import run_search
from .stack import LayerStack
from .tuning import merge_tuning
from .weights_io import MODEL_FORMAT, STACK_FORMAT, describe, describe_foreign, is_foreign, read_manifest


def _load(args: argparse.Namespace) -> Recipe:
    return load_recipe(args.recipe, args.overrides)


def _out(args: argparse.Namespace, recipe: Recipe, suffix: str = "") -> Path:
    return args.out if getattr(args, "out", None) else Path("runs") / f"{recipe.name}{suffix}"


def say(*lines: str) -> None:
    """Print on the main process only (under torchrun every rank runs the command)."""
    if is_main_process():
        for line in lines:
            print(line)


def _keep_other_weights(out: Path, writing: str) -> None:
    """``OutputError`` when ``out`` already holds weights that writing a ``writing`` file
    (a stack or a model) over would lose: another tool's, a fine-tuned model, or the other
    kind of surgery file. One of the same kind (a rerun's) or one that cannot be read is
    replaced."""
    if not out.is_file():
        return
    if is_foreign(out):
        what = "another tool's weights"
    else:
        try:
            manifest = read_manifest(out)
        except ManifestError:
            return  # damaged: nothing to keep
        trained = manifest.get("format") == MODEL_FORMAT and "result" in manifest
        if manifest.get("format") == writing and not trained:
            return
        what = "a fine-tuned model" if trained else "a layer stack" if writing == MODEL_FORMAT else "a model"
    made = "the stack" if writing == STACK_FORMAT else "the assembled (untrained) model"
    raise OutputError(f"{out}: holds {what}; writing {made} there would lose it. Give -o another file, or move that "
                      "one away first.")


def cmd_pretrain(args: argparse.Namespace) -> None:
    """``surgery pretrain``: train the stack and save it."""
    recipe = _load(args)
    out = args.output or Path("runs") / recipe.name / "stack.safetensors"
    file_to_write(out)  # an unwritable output fails now, not after the training
    _keep_other_weights(out, STACK_FORMAT)
    layers = out.with_suffix(".layers")
    stack = pretrain(recipe, snapshots=layers if is_main_process() else None, resume=args.resume)
    if is_main_process():
        stack.save(out)
        shutil.rmtree(layers, ignore_errors=True)  # the whole stack is written: its layers are no longer needed
    say(describe(stack.manifest()), f"stack written to {out}")


_TEXT_SUFFIXES = (".yaml", ".yml", ".json", ".csv", ".md", ".txt", ".log", ".png")


def _text_not_weights(path: Path) -> str:
    """What to run instead of ``inspect`` on a recipe or on one of a run's own text files."""
    if path.suffix.lower() in (".yaml", ".yml"):
        return (f"{path}: a recipe, not a weights file; `surgery validate {path}` checks it and prints the "
                "planned network.")
    recipe = f", or `surgery validate {path}` if it is a recipe" if path.suffix.lower() == ".json" else ""
    return (f"{path}: a {path.suffix} file, not a weights file (inspect reads stacks, models, checkpoints, arrays "
            f"files and run directories); `surgery inspect {path.parent}` shows the run it belongs to{recipe}.")


def cmd_inspect(args: argparse.Namespace) -> None:
    """``surgery inspect``: describe a stack or model file (validating it whole), or an
    run or experiment directory's progress."""
    if args.file.is_dir():
        say(*describe_run(args.file))  # one paragraph when it is no run's directory
        return
    if args.file.suffix.lower() in _TEXT_SUFFIXES and args.file.is_file():
        raise ManifestError(_text_not_weights(args.file))
    if is_arrays_file(args.file):
        say(_describe_dataset_file(args.file))
        return
    if (checkpoint := read_checkpoint_meta(args.file)) is not None:
        say(json.dumps(checkpoint, indent=2) if args.json else "\n".join(describe_checkpoint(args.file, checkpoint)))
        return
    if is_foreign(args.file):  # another tool's weights: their names and shapes, to write a source's map
        say(describe_foreign(args.file))
        return
    manifest = read_manifest(args.file)
    if args.json:
        say(json.dumps(manifest, indent=2))
        return
    if manifest.get("format") == MODEL_FORMAT:
        g = load_model(args.file)
        say(f"{MODEL_FORMAT} v{manifest.get('version')} (surgery {manifest.get('package_version')})", describe_model(g))
        if "result" in manifest:
            r = manifest["result"]
            epochs = r.get("epochs")
            say(f"fine-tuned: test error {r.get('test_error'):.2f}% after {epochs} epoch{'s' if epochs != 1 else ''}")
    else:
        LayerStack.load(args.file)  # full validation, not just the header
        say(describe(manifest))
    if isinstance(manifest.get("recipe"), dict):
        made = manifest["recipe"]
        say(f"made by recipe {made.get('name')!r} (seed {made.get('seed')})"
            + (f" from {manifest['started_from']}" if manifest.get("started_from") else "")
            + "; `--json` shows it whole")


def _describe_dataset_file(path: Path) -> str:
    """Its arrays (name, shape, type) and what a recipe would load from it, checked as a run
    would check them (a problem is one paragraph)."""
    try:
        arrays = read_arrays(path)
        data = arrays_dataset(arrays, path, None if "x_valid" in arrays else 0)
    except DataError as e:  # here the file is the argument, not a recipe's data.path
        raise DataError(str(e).removeprefix("data.path: ")) from None
    check_data(data)
    warn_unseen_classes(data)
    lines = [f"{path}: a dataset's arrays (data: {{dataset: arrays, path: {path.name}}})"]
    order = [f"{v}_{s}" for s in ("train", "valid", "test") for v in "xy"]
    names = [n for n in order if n in arrays] + sorted(set(arrays) - set(order))
    lines += [f"  {name:<8} {str(tuple(arrays[name].shape)):>18}  {arrays[name].dtype}" for name in names]
    shape = data.input_shape
    flat = f" (rows of {math.prod(shape)} with data.flatten: true, the default)" if len(shape) > 1 else ""
    lines.append(f"{data.num_classes} classes; examples of shape {shape}{flat}"
                 + ("" if "x_valid" in arrays else "; no validation split: data.valid_size carves one from x_train"))
    return "\n".join(lines)


def cmd_validate(args: argparse.Namespace) -> None:
    """``surgery validate``: check everything a run would need, train nothing."""
    recipe = _load(args)
    graph, notes = validate(recipe)
    say(f"{args.recipe}: ok", *("  " + n for n in notes))
    if graph is not None:
        say(describe_model(graph))


def cmd_schema(args: argparse.Namespace) -> None:
    """``surgery schema``: the recipe's JSON Schema."""
    say(json.dumps(json_schema(), indent=2))


def cmd_assemble(args: argparse.Namespace) -> None:
    """``surgery assemble``: pretrain if asked, build the network, save it."""
    recipe = _load(args)
    out = args.output or Path("runs") / recipe.name / "assembled.safetensors"
    file_to_write(out)  # an unwritable output fails now, not after any pretraining
    _keep_other_weights(out, MODEL_FORMAT)
    data = load_dataset(recipe.data, recipe.base_dir)
    check_network(recipe, data)  # a network that cannot fit the data fails now, not after its pretraining
    stack = pretrain(recipe, data) if recipe.pretrain is not None else None
    graph = assemble(recipe, stack, data.num_classes, data.input_shape)
    if is_main_process():
        save_model(graph, out, {"recipe": recipe.to_dict()})
    say(*graph.report, describe_model(graph), f"model written to {out}")


def cmd_finetune(args: argparse.Namespace) -> None:
    """``surgery finetune``: fine-tune the recipe's network, or a model file."""
    recipe = _load(args)
    if recipe.finetune is None:
        raise SurgeryError(f"{args.recipe}: the recipe has no finetune: section; add one (e.g. finetune: "
                           f"{{epochs: 10}}).")
    out = _out(args, recipe)
    if args.model:
        data = load_dataset(recipe.data, recipe.base_dir)
        res = finetune_model(args.model, data, recipe.finetune, recipe.seed, out, args.resume,
                             provenance={"recipe": recipe.to_dict(), "started_from": str(args.model)})
    else:
        res = run(recipe, out, resume=args.resume)
    _print_result(res, out)


def cmd_evaluate(args: argparse.Namespace) -> None:
    """``surgery evaluate``: a model file's error on each split of the recipe's data, beside
    what it recorded when it was fine-tuned."""
    if Path(args.recipe).suffix == ".safetensors" and Path(args.model).suffix in RECIPE_SUFFIXES:
        raise ConfigError(f"surgery evaluate takes the recipe first, then the model: `surgery evaluate {args.model} "
                          f"{args.recipe}`.")
    recipe = _load(args)
    graph = load_model(args.model)
    data = load_dataset(recipe.data, recipe.base_dir)
    errors = evaluate(graph, data)
    if args.json:
        say(json.dumps(errors))
        return
    sizes = " / ".join(f"{len(s):,}" for s in (data.train, data.valid, data.test))
    said = ", ".join(f"{k.removesuffix('_error')} {percent(v)}" for k, v in errors.items() if v is not None)
    lines = [f"{args.model} on the data {data.name!r} (train / valid / test: {sizes} examples): error {said}"]
    made = read_manifest(args.model).get("result")
    if isinstance(made, dict):
        lines.append(f"recorded when it was fine-tuned: test {percent(made.get('test_error'))}, valid "
                     f"{percent(made.get('valid_error'))} (best epoch {made.get('best_epoch')})")
    say(*lines)


def _print_result(res: dict, out: Path) -> None:
    v = res.get("valid_error")  # a result.json read back was checked for its test error and epochs only
    chosen = f"valid {v:.2f}%, best epoch {res.get('best_epoch')}" if v is not None else "no validation split, " \
        "last epoch"
    say(f"test error {res['test_error']:.2f}% ({chosen} of {res['epochs']}, {res.get('device', '?')})",
        f"results in {out}: result.json, metrics.jsonl, model.safetensors")


def cmd_run(args: argparse.Namespace) -> None:
    """``surgery run``: the whole recipe, or its experiment grid and report."""
    recipe = _load(args)
    out = _out(args, recipe)
    shard = parse_shard(args.shard) if args.shard else None
    if recipe.experiment is None:
        if shard is not None:
            raise SurgeryError(f"--shard: {args.recipe} has no experiment: section; shards split an experiment's "
                               "cells (a single run is one process: drop --shard).")
        if args.stacks_from:
            raise SurgeryError(f"--stacks-from: {args.recipe} has no experiment: section; a single run continues "
                               "only its own pretraining (--resume), or takes a saved stack through its surgery: "
                               "section (source: a stack file).")
        res = run(recipe, out, resume=args.resume)
        if "test_error" in res:
            _print_result(res, out)
        else:
            say(f"assembled model in {out}/assembled.safetensors (no finetune: section)")
        return
    baseline = recipe.experiment.baseline
    rows = run_experiment(recipe, out, shard=shard, stacks_from=args.stacks_from)
    cells = f"{len(rows)} cell{'s' * (len(rows) != 1)}"
    if shard is not None:
        say(f"shard {args.shard}: {cells} finished in {out}/cells/; when every shard has finished, "
            f"`surgery run {args.recipe} --out {out}` (same --set options, no --shard) trains what is left and "
            "writes results.csv and the report")
        return
    write_report(out, rows, baseline=baseline)
    say(f"{cells}; results in {out}/results.csv, report in {out}/report.md, figures in {out}/figures/")
    _summary(rows, baseline)


def _summary(rows: list[dict], baseline: str) -> None:
    """An experiment's answer on the console: the arm x depth grid, the significant arms, and
    the runs that did not learn."""
    say(*summary_grid(rows, baseline), significance_line(rows, baseline))
    if failed := failed_line(rows):
        say(failed)


def cmd_compare(args: argparse.Namespace) -> None:
    """``surgery compare``: merge experiment directories and rebuild the report."""
    t0, entry = time.perf_counter(), invocation(None)
    given = Counter(d.resolve() for d in args.dirs)
    first = {d.resolve(): d for d in reversed(args.dirs)}  # each once, as it first stands
    dirs = [first[r] for r in given]  # in the order first given
    twice = [str(first[r]) for r, n in given.items() if n > 1]
    if len(dirs) > 1 and args.out is None:
        raise SurgeryError(f"compare: merging {len(dirs)} directories makes a new results.csv and report; give "
                           "--out DIR for them (each directory's own are kept as they are).")
    merging = args.out is not None and (len(dirs) > 1 or args.out.resolve() != dirs[0].resolve())
    if merging:
        check_merge_out(args.out, dirs)
    rows, notes = merge_results(dirs)  # refused when the directories ran on different data
    arms = sorted({r["condition"] for r in rows})
    if args.baseline is not None and args.baseline not in arms:
        raise ConfigError(f"compare: --baseline {args.baseline!r} is none of the arms merged ({', '.join(arms)}); "
                          "name one of them, or leave --baseline out for the recipe's experiment.baseline.")
    tuning = merge_tuning(dirs)  # arms tuned in separate runs: all their trials (checked before any write)
    out = args.out or dirs[0]
    described = experiment_meta(Path(dirs[0]))
    if args.overrides:
        described = with_paper(described, args.overrides, dirs[0])
    baseline = args.baseline
    if baseline is None:
        baseline = ((described.get("recipe") or {}).get("experiment") or {}).get("baseline", "none")
    this = ended(entry, time.perf_counter() - t0, "finished") if entry is not None else None
    if this is not None and notes:  # what it said of the merge stays with it, in the report's Cost section
        this = {**this, "notes": notes}
    if args.overrides and not merging:  # the one directory's record of the paper, and nothing else, changes
        write_json(Path(out) / "experiment.json", {**described, "commands": with_command(described, this)})
    if merging:  # everything read (``out`` may be an earlier merge among them) before anything is written
        made = merged([(d, experiment_meta(d)) for d in dirs])
        sources = merged_from(Path(out), dirs, experiment_meta(Path(out)))
        write_results_csv(Path(out) / "results.csv", rows)
        if described:  # the first run's recipe (and paper), what was merged and the commands that made it
            kept = {k: v for k, v in described.items() if k not in ("cells", "merged_from", "commands")}
            write_json(Path(out) / "experiment.json", {**kept, "recipe_from": recipe_source(dirs[0], described),
                                                       "merged_from": sources,
                                                       "commands": with_command({"commands": made}, this)})
        if tuning is not None:
            write_json(Path(out) / "tuning.json", tuning)
    write_report(Path(out), rows, baseline=baseline)
    read_once = [f"compare: {', '.join(twice)} given more than once; read once."] if twice else []
    say(*read_once, *notes, f"report for {len(rows)} runs in {out}/report.md")
    _summary(rows, baseline)


def with_paper(meta: dict, overrides: list[str], where: Path) -> dict:
    """``meta`` (an ``experiment.json``) with ``experiment.paper.*`` set by ``overrides``
    (``--set PATH=VALUE``), checked as a recipe's paper section is; ``ConfigError`` for any
    other field: the rest records how the cells ran."""
    pairs = parse_overrides(overrides)
    for key in pairs:
        if key != "experiment.paper" and not key.startswith("experiment.paper."):
            raise ConfigError(f"compare --set {key}: only experiment.paper.* (source, errors, target, differences: "
                              "what the report compares with) can be set on finished runs; the other fields record "
                              "how the cells ran, so change them in the recipe and run it.")
    recipe = meta.get("recipe")
    if not isinstance(recipe, dict) or not isinstance(recipe.get("experiment"), dict):
        raise ConfigError(f"compare --set: {where} has no experiment.json recording its recipe, so there is no "
                          "experiment.paper to set; give first a directory `surgery run` made.")
    recipe = apply_overrides(copy.deepcopy(recipe), pairs)
    try:
        recorded_experiment(recipe["experiment"])
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, "compare --set", rename=lambda p: ["experiment", *p])) from None
    return {**meta, "recipe": recipe}


def cmd_search(args: argparse.Namespace) -> None:
    """``surgery search``: run or join an Optuna study over the recipe's search params."""
    recipe = _load(args)
    out = _out(args, recipe, "-search")
    s = run_search(recipe, out, args.trials, args.storage)
    done = sum(t["state"] == "COMPLETE" for t in s["trials"])
    if s["ran"] == 0:
        say(f"nothing to run: study {s['study']} already has {done} finished trials (search.trials: "
            f"{recipe.search.trials}); --trials N runs N more")
    others = f" ({len(s['trials']) - done} failed or unfinished)" if len(s["trials"]) > done else ""
    say(f"study {s['study']}: {done} trials finished{others}; best valid error {s['best_value']:.2f}% "
        f"(trial {s['best_trial'] + 1}) with {s['best_params']}",
        f"best recipe written to {out}/best.yaml")


COMMANDS = {
    "pretrain": cmd_pretrain, "inspect": cmd_inspect, "validate": cmd_validate, "schema": cmd_schema,
    "assemble": cmd_assemble, "finetune": cmd_finetune, "evaluate": cmd_evaluate, "run": cmd_run,
    "compare": cmd_compare, "search": cmd_search,
}
