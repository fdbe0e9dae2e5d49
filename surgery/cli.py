"""``surgery <command>``: parse arguments, load the recipe, call the library.

Every user-fixable problem is printed as one paragraph (no traceback) with exit status 2.
"""

from __future__ import annotations

import argparse
import errno
import json
import math
import os
import shutil
import signal
import sys
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pydantic import ValidationError

from .checkpoint import read_checkpoint_meta
from .data import arrays_dataset, load_dataset, warn_unseen_classes
from .datafiles import is_arrays_file, read_arrays
from .errors import DataError, ManifestError, OutputError, SurgeryError, SurgeryWarning
from .experiment import merge_results, run_experiment, write_results_csv
from .grid import parse_shard
from .io import file_to_write, percent, write_json
from .model_file import describe_model, load_model, save_model
from .outdirs import check_merge_out, experiment_meta
from .pipeline import assemble, check_network, evaluate, finetune_model, pretrain, run, validate
from .preflight import check_data
from .recipe import Recipe, format_validation_error, json_schema, load_recipe
from .report import failed_line, significance_line, summary_grid, write_report
from .rundir import describe_checkpoint, describe_run
from .runtime import exit_status, is_main_process, out_of_memory
from .search import run_search
from .stack import LayerStack
from .tuning import merge_tuning
from .version import __version__
from .weights_io import MODEL_FORMAT, STACK_FORMAT, describe, describe_foreign, is_foreign, read_manifest

EPILOG = """recipes are YAML or JSON files with the sections data, pretrain, surgery,
finetune, experiment and search; `surgery schema` prints their JSON Schema.
Every command that reads a recipe takes --set dotted.path=value overrides, e.g.
--set pretrain.layers.0.epochs=2 --set data.limit=1000; a list of an experiment's
own arm names runs only those: --set 'experiment.conditions=[rbm, none]'."""


def user_path(text: str) -> Path:
    """A path argument, ``~`` expanded (``--out=~/runs/x`` reaches us unexpanded by the shell)."""
    return Path(text).expanduser()


def _recipe_cmd(sub: argparse._SubParsersAction, name: str, help: str) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help, description=help, epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipe", type=user_path, help="recipe file (.yaml/.yml or .json)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="PATH=VALUE",
                   help="override a recipe field by its dotted path (repeatable); values are YAML")
    return p


def _file_commands(sub: argparse._SubParsersAction) -> None:
    """The commands that read files and directories, not a recipe: inspect and compare."""
    p = sub.add_parser("inspect", help="show a stack or model file (layers, shapes, how each was trained), a "
                                       "dataset's arrays file, a checkpoint, or how far a run, experiment or "
                                       "search directory has got")
    p.add_argument("file", type=user_path, help="a .safetensors stack, model or checkpoint, another tool's weights "
                   "(.safetensors, .pt), a dataset's .npz or .safetensors arrays, the --out directory of "
                   "`surgery run`, `finetune` or `search`, or a directory of such (runs/)")
    p.add_argument("--json", action="store_true", help="print the raw manifest (or checkpoint metadata) as JSON")

    p = sub.add_parser("compare", help="rebuild and merge reports from one or more experiment directories")
    p.add_argument("dirs", type=user_path, nargs="+", help="experiment directories (e.g. seeds or arms run apart); "
                   "their results, and their tuning trials, are merged; later ones win for the same cell")
    p.add_argument("--out", type=user_path, help="where merged results and report go (one directory: rebuilt in place)")
    p.add_argument("--baseline", help="arm to test the others against (default: the experiment's own, else none)")


def build_parser() -> argparse.ArgumentParser:
    """The ``surgery`` argument parser: one sub-command per job."""
    ap = argparse.ArgumentParser(
        prog="surgery",
        description="Greedy layer-wise pretraining (RBMs, autoencoders) and model surgery for PyTorch.",
        epilog="Quick start: surgery run recipes/quick.yaml --out runs/quick",
    )
    ap.add_argument("--version", action="version", version=f"surgery {__version__}")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = _recipe_cmd(sub, "pretrain", "train the recipe's pretrain: layers greedily and save the stack")
    p.add_argument("-o", "--output", type=user_path, help="stack file (default runs/<name>/stack.safetensors); each "
                   "layer is also kept beside it in STACK.layers/ until the stack is written")
    p.add_argument("--resume", action="store_true", help="continue after the last layer kept in STACK.layers/ "
                   "(made by the same pretrain section, seed and data)")

    _recipe_cmd(sub, "validate", "check a recipe and every file it refers to; print the planned network")
    sub.add_parser("schema", help="print the recipe JSON Schema (for editor completion)")

    p = _recipe_cmd(sub, "assemble", "build the network the surgery: section describes and save it")
    p.add_argument("-o", "--output", type=user_path, help="model file (default runs/<name>/assembled.safetensors)")

    p = _recipe_cmd(sub, "finetune", "fine-tune the assembled network (or --model FILE) end to end")
    p.add_argument("--out", type=user_path, help="output directory (default runs/<name>)")
    p.add_argument("--model", type=user_path, help="an assembled model file to fine-tune instead of assembling")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoints/")

    p = _recipe_cmd(sub, "evaluate", "the error of a model file on each split of the recipe's data (no training)")
    p.add_argument("model", type=user_path, help="a model file: a run's model.safetensors, or an assembled one")
    p.add_argument("--json", action="store_true", help="print the errors as one JSON object")

    p = _recipe_cmd(sub, "run", "run everything the recipe holds: pretrain -> surgery -> finetune, or the experiment "
                                "grid")
    p.add_argument("--out", type=user_path, help="output directory (default runs/<name>)")
    p.add_argument("--resume", action="store_true", help="single runs: continue pretraining after its last "
                   "finished layer, fine-tuning from the last checkpoint (experiments always continue)")
    p.add_argument("--shard", metavar="I/N", help="experiments: train only share I of N of the trials and cells, so N "
                   "processes (or machines sharing --out) run one grid together; a shard waits for the others' "
                   "trials of a batch; when all have ended, run once without --shard: it trains what is left and "
                   "writes results.csv and the report")

    p = _recipe_cmd(sub, "search", "Optuna hyperparameter search over the recipe's search: params")
    p.add_argument("--trials", type=int, metavar="N", help="run N more trials in this worker (default: the trials "
                   "the study still lacks of search.trials, so a search run again after a stop runs only the rest)")
    p.add_argument("--storage", help="Optuna storage URL (default sqlite:///OUT/search.db); share it across workers")
    p.add_argument("--out", type=user_path, help="output directory (default runs/<name>-search)")
    _file_commands(sub)
    return ap


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


def cmd_inspect(args: argparse.Namespace) -> None:
    """``surgery inspect``: describe a stack or model file (validating it whole), or an
    run or experiment directory's progress."""
    if args.file.is_dir():
        say(*describe_run(args.file))  # one paragraph when it is no run's directory
        return
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
        res = run(recipe, out, resume=args.resume)
        if "test_error" in res:
            _print_result(res, out)
        else:
            say(f"assembled model in {out}/assembled.safetensors (no finetune: section)")
        return
    baseline = recipe.experiment.baseline
    rows = run_experiment(recipe, out, shard=shard)
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
    if len(args.dirs) > 1 and args.out is None:
        raise SurgeryError(f"compare: merging {len(args.dirs)} directories makes a new results.csv and report; give "
                           "--out DIR for them (each directory's own are kept as they are).")
    merging = args.out is not None and (len(args.dirs) > 1 or args.out.resolve() != args.dirs[0].resolve())
    if merging:
        check_merge_out(args.out, args.dirs)
    rows, notes = merge_results(args.dirs)  # refused when the directories ran on different data
    tuning = merge_tuning(args.dirs)  # arms tuned in separate runs: all their trials (checked before any write)
    out = args.out or args.dirs[0]
    described = experiment_meta(Path(args.dirs[0]))
    baseline = args.baseline
    if baseline is None:
        baseline = ((described.get("recipe") or {}).get("experiment") or {}).get("baseline", "none")
    if merging:
        write_results_csv(Path(out) / "results.csv", rows)
        if described:  # the first run's recipe (and paper), and what was merged (`surgery inspect` says)
            kept = {k: v for k, v in described.items() if k not in ("cells", "merged_from")}
            write_json(Path(out) / "experiment.json", {**kept, "merged_from": [str(d) for d in args.dirs]})
        if tuning is not None:
            write_json(Path(out) / "tuning.json", tuning)
    write_report(Path(out), rows, baseline=baseline)
    say(*notes, f"report for {len(rows)} runs in {out}/report.md")
    _summary(rows, baseline)


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


def _one_line(command: str, show):
    """``warnings.showwarning`` that prints a :class:`SurgeryWarning` as ``surgery CMD:
    warning: ...`` and leaves every other warning to ``show``."""

    def showwarning(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, SurgeryWarning):
            print(f"surgery {command}: warning: {message}", file=sys.stderr)
        else:
            show(message, category, filename, lineno, file, line)

    return showwarning


def main(argv: list[str] | None = None) -> int:
    """Run ``surgery`` with ``argv``; returns the exit status (2 for any user error)."""
    parser = build_parser()
    if not (sys.argv[1:] if argv is None else argv):  # `surgery` alone: what it can do, not only that it needs more
        parser.print_help(sys.stderr)
        return 2
    args = parser.parse_args(argv)
    try:
        with warnings.catch_warnings(), _terminate_as_interrupt():
            warnings.showwarning = _one_line(args.command, warnings.showwarning)
            COMMANDS[args.command](args)
            sys.stdout.flush()  # a reader gone away is found here, not at the interpreter's exit
    except SurgeryError as e:
        print(f"surgery {args.command}: error: {e}", file=sys.stderr)
        return 2
    except ValidationError as e:
        print(f"surgery {args.command}: error: {format_validation_error(e, str(getattr(args, 'recipe', '')))}",
              file=sys.stderr)
        return 2
    except (MemoryError, RuntimeError) as e:  # torch's out-of-memory errors are RuntimeErrors
        if (oom := out_of_memory(e)) is None:
            raise
        print(f"surgery {args.command}: error: {oom}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `surgery inspect runs | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nor may the exit's flush complain
        return 141  # 128 + SIGPIPE, as a shell reports a command whose reader went away
    except OSError as e:  # the file system refused a path we were given (too long, a link loop, no access)
        if e.filename is not None:
            print(f"surgery {args.command}: error: {os_refusal(e)}", file=sys.stderr)
            return 2
        if e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO):
            raise
        # no path: printing failed (`surgery run ... > log` on a full disk); the results are on disk
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nor may the exit's flush fail again
        print(f"surgery {args.command}: error: cannot write to standard output ({e.strerror}); what the "
              "command wrote to files is kept. Free some space where its output goes, or send it elsewhere.",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        again = {"run": " (an experiment skips its finished cells; a single run needs --resume and a "
                        "checkpoint, finetune.checkpoint_every)",
                 "finetune": " with --resume (it continues from the last checkpoint, finetune.checkpoint_every)",
                 "search": " (the study in its storage, OUT/search.db unless --storage, keeps the finished trials "
                           "and runs only the rest of search.trials; --trials N runs N more)"}.get(args.command, "")
        how = "terminated (SIGTERM)" if isinstance(e, Terminated) else "interrupted"
        print(f"surgery {args.command}: {how}; files written so far are kept. Run the same command again to "
              f"continue{again}.", file=sys.stderr)
        return 143 if isinstance(e, Terminated) else 130  # 128 + the signal, as a shell reports it
    return 0


def os_refusal(e: OSError) -> str:
    """One paragraph for an ``OSError`` on a path: which path, why, what to do."""
    advice = {errno.ENAMETOOLONG: "give a shorter path (a name in it is longer than the file system allows)",
              errno.ELOOP: "the path goes round a loop of symbolic links; give another",
              errno.EACCES: "fix its permissions or give another path",
              errno.EPERM: "fix its permissions or give another path"}.get(e.errno or 0, "check the path")
    return f"cannot use {e.filename} ({e.strerror}); {advice}, then run the same command again."


class Terminated(KeyboardInterrupt):
    """SIGTERM (`kill`, a job scheduler ending a job), raised where the command is, so that
    it ends as Ctrl-C does: temp files removed, its output directory's lock released."""


@contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM raises :class:`Terminated` while the block runs (a signal handler can only be
    set from the main thread; elsewhere SIGTERM keeps its default)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminated(signum: int, frame: object) -> None:
        raise Terminated

    before = signal.signal(signal.SIGTERM, terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, before)


def entry() -> int:
    """The console script: :func:`main` on ``sys.argv``, ending a ``torchrun`` rank cleanly
    (:func:`surgery.runtime.exit_status`)."""
    return exit_status(main())


if __name__ == "__main__":
    sys.exit(entry())
