"""``surgery <command>``: parse arguments, then run the command (:mod:`surgery.commands`).

Every user-fixable problem is printed as one paragraph (no traceback) with exit status 2.
"""

from __future__ import annotations

import argparse
import errno
import os
import signal
import sys
import threading
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from pydantic import ValidationError

from .errors import SurgeryError, SurgeryWarning
from .version import __version__

EPILOG = """recipes are YAML or JSON files with the sections data, pretrain, surgery,
finetune, experiment and search; `surgery schema` prints their JSON Schema.
Every command that reads a recipe takes --set dotted.path=value overrides, e.g.
--set pretrain.layers.0.epochs=2 --set data.limit=1000; a list of an experiment's
own arm names runs only those: --set 'experiment.conditions=[rbm, none]'; a
searched parameter goes by its whole path: --set search.params.finetune.optimizer.lr.low=0.01."""


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
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="PATH=VALUE",
                   help="set the published numbers the report sets beside ours, experiment.paper.* (source, "
                   "errors, target, differences), in the experiment.json of --out (or of the one directory); "
                   "values are YAML, e.g. --set 'experiment.paper.differences=used batches of 10'")


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
    p.add_argument("--stacks-from", action="append", type=user_path, metavar="DIR", help="experiments: another "
                   "experiment's --out whose greedy stacks this one's may start from: a stack with the same data, "
                   "seed and first layers takes that one's snapshot after them and pretrains only the layers "
                   "above (the result is the same, bit for bit); repeatable")

    p = _recipe_cmd(sub, "search", "Optuna hyperparameter search over the recipe's search: params")
    p.add_argument("--trials", type=int, metavar="N", help="run N more trials in this worker (default: the trials "
                   "the study still lacks of search.trials, so a search run again after a stop runs only the rest)")
    p.add_argument("--storage", help="Optuna storage URL (default sqlite:///OUT/search.db); share it across workers")
    p.add_argument("--out", type=user_path, help="output directory (default runs/<name>-search)")
    _file_commands(sub)
    return ap


def _command(name: str) -> Callable[[argparse.Namespace], None]:
    """``surgery NAME``'s function, importing :mod:`surgery.commands` (and so torch) only
    when a command runs: ``surgery --help`` and a mistyped option answer at once."""

    def command(args: argparse.Namespace) -> None:
        from . import commands

        commands.COMMANDS[name](args)

    return command


COMMANDS = {name: _command(name) for name in (
    "pretrain", "inspect", "validate", "schema", "assemble", "finetune", "evaluate", "run", "compare", "search")}


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
        from .recipe import format_validation_error

        print(f"surgery {args.command}: error: {format_validation_error(e, str(getattr(args, 'recipe', '')))}",
              file=sys.stderr)
        return 2
    except (MemoryError, RuntimeError) as e:  # torch's out-of-memory errors are RuntimeErrors
        from .runtime import out_of_memory

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
    status = main()
    if "torch.distributed" not in sys.modules:  # nothing of torch's to end (`surgery --help`)
        return status
    from .runtime import exit_status

    return exit_status(status)


if __name__ == "__main__":
    sys.exit(entry())
