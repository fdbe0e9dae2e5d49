"""How an experiment directory's results were made, and what they cost: its
``experiment.json`` lists under ``commands`` every command that wrote into it (the command
line, when it started, how it ended, its wall time, the device and threads, the surgery and
torch versions); ``surgery compare`` carries the merged directories' lists into its own,
each entry naming its directory. The report's Cost section reads them, with the training
time the results themselves record (:func:`cost_markdown`). A single run's and a search's
directory keep the same list in ``commands.json`` (:func:`recording`).

Shards of one grid start together and each adds its entry to the same file, so every
change to the list is a read-modify-write under an exclusive ``flock`` of the directory
(where the platform has one); the file itself is still replaced whole (temp + rename)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from .errors import SurgeryError
from .io import duration, read_json, write_json
from .lock import command_line
from .runtime import is_main_process
from .version import __version__

try:
    import fcntl
except ImportError:  # Windows has no flock: shards there that start at once may drop an entry
    fcntl = None  # type: ignore[assignment]

Entry = dict[str, Any]
COMMANDS_FILE = "commands.json"  # a single run's or a search's record of the commands that wrote there


def invocation(device: str | None, shard: tuple[int, int] | None = None) -> Entry | None:
    """This process's entry, as it starts: its command line, the time, where it trains
    (``device``: ``cpu`` or ``cuda (NVIDIA H100 ...)``; ``None`` for a command that does not
    train, such as ``compare``) with how many CPU threads, and the versions of surgery and
    torch. ``None`` on a ``torchrun`` rank other than the first: the run is recorded once."""
    import torch

    if not is_main_process():
        return None
    now = time.time()
    entry: Entry = {"command": command_line(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(now)),
                    "started_unix": now, "pid": os.getpid(), "device": device,
                    "threads": torch.get_num_threads(), "surgery": __version__, "torch": torch.__version__}
    if device is None:
        entry = {k: v for k, v in entry.items() if k not in ("device", "threads")}
    return {**entry, "shard": f"{shard[0] + 1}/{shard[1]}"} if shard is not None else entry


def ended(entry: Entry, seconds: float, outcome: str) -> Entry:
    """``entry`` once its command has ended after ``seconds`` with ``outcome``."""
    return {**entry, "seconds": round(seconds, 1), "outcome": outcome}


def device_label(device: Any) -> str:
    """``cpu``, or ``cuda (NVIDIA H200)`` for a torch device on a GPU (its name told)."""
    import torch

    if getattr(device, "type", str(device)) == "cuda" and torch.cuda.is_available():
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return str(device)


@contextmanager
def _exclusive(directory: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``directory`` (nothing where there is no ``fcntl``, or
    where the file system refuses locks)."""
    fd = None
    if fcntl is not None:
        try:
            fd = os.open(directory, os.O_RDONLY)
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:  # a file system without locks (some network mounts): the write goes on unguarded
            if fd is not None:
                os.close(fd)
            fd = None
    try:
        yield
    finally:
        if fd is not None:
            os.close(fd)  # closing releases the lock


def update_record(path: Path, change: Callable[[dict[str, Any]], dict[str, Any]]) -> None:
    """Rewrite the JSON object at ``path`` as ``change`` makes it of the one there now (``{}``
    when there is none, or it is damaged: ``change`` then writes it anew), no other process
    of this machine changing it in between."""
    with _exclusive(path.parent):
        try:
            now = read_json(path) if path.is_file() else {}
        except SurgeryError:
            now = {}
        write_json(path, change(now))


def recorded(meta: dict[str, Any]) -> list[Entry]:
    """The ``commands`` an ``experiment.json`` lists (entries that are not objects left out)."""
    entries = meta.get("commands")
    return [e for e in entries if isinstance(e, dict)] if isinstance(entries, list) else []


def with_command(meta: dict[str, Any], entry: Entry | None) -> list[Entry]:
    """The ``commands`` of ``meta`` (an ``experiment.json``) and ``entry`` after them (if any)."""
    return [*recorded(meta), *([entry] if entry is not None else [])]


def finish(path: Path, entry: Entry | None, seconds: float, outcome: str) -> None:
    """Mark ``entry`` in the ``commands`` of the ``experiment.json`` at ``path`` as ended
    after ``seconds`` with ``outcome`` (``finished``, ``interrupted``, ``stopped by
    OutputError``); the entry is added again if it is no longer there. Nothing for ``None``."""
    if entry is None:
        return

    def change(meta: dict[str, Any]) -> dict[str, Any]:
        kept = [e for e in recorded(meta) if not _same(e, entry)]
        return {**meta, "commands": [*kept, ended(entry, seconds, outcome)]}

    update_record(path, change)


@contextmanager
def ends_recorded(path: Path, entry: Entry | None, t0: float) -> Iterator[None]:
    """Mark ``entry`` (in the ``commands`` at ``path``) ended when the block ends, however it
    ends, with the wall time since ``t0`` (``time.perf_counter()``); the error that ended it,
    if any, is the one raised, not a failure to record it."""
    try:
        yield
    except BaseException as e:
        with suppress(SurgeryError, OSError):
            finish(path, entry, time.perf_counter() - t0, outcome_of(e))
        raise
    finish(path, entry, time.perf_counter() - t0, outcome_of(None))


@contextmanager
def recording(path: Path, device: str | None, t0: float | None = None) -> Iterator[None]:
    """Record this command in the ``commands`` of the JSON object at ``path`` (a single
    run's or a search's ``commands.json``) now, and its end when the block ends; ``t0``:
    when it started, if before now. Nothing on a ``torchrun`` rank other than the first."""
    t0 = time.perf_counter() if t0 is None else t0
    entry = invocation(device)
    if entry is not None:
        update_record(path, lambda meta: {**meta, "commands": with_command(meta, entry)})
    with ends_recorded(path, entry, t0):
        yield


def _same(a: Entry, b: Entry) -> bool:
    """Whether two entries are one command's (one process may run two in the same second: the
    Python API's calls; entries written before ``started_unix`` was kept have none)."""
    return all(a.get(k) == b.get(k) for k in ("command", "started", "pid", "started_unix"))


def merged(sources: list[tuple[Path, dict[str, Any]]]) -> list[Entry]:
    """The commands of merged directories (each with its ``experiment.json``), in the order
    given, each naming its directory (an entry a merge already carried keeps its own)."""
    return [{**e, "dir": e.get("dir", str(d))} for d, meta in sources for e in recorded(meta)]


def outcome_of(error: BaseException | None) -> str:
    """How a command ended, for its entry: ``finished``, ``interrupted`` (Ctrl-C, a signal)
    or ``stopped by NAME`` (the error that ended it)."""
    if error is None:
        return "finished"
    if isinstance(error, (KeyboardInterrupt, SystemExit)):
        return "interrupted"
    return f"stopped by {type(error).__name__}"


def _stacks(rows: list[dict[str, Any]]) -> list[float]:
    """Each greedy stack's pretraining seconds, once: a depth-d cell records its stack's first
    d layers' share, so a stack's time is its deepest cell's. Stacks are told apart by
    experiment directory (a cell's ``path`` is ``DIR/cells/KEY``), arm and seed; arms that
    share a stack (two arms of one method that differ only in fine-tuning) record the very
    same seconds, counted once."""
    deepest: dict[tuple[str, str, Any], float] = {}
    for r in rows:
        seconds = r.get("pretrain_seconds")
        if isinstance(seconds, (int, float)) and seconds > 0:
            key = (str(Path(str(r.get("path") or "")).parent.parent), str(r["condition"]), r["seed"])
            deepest[key] = max(deepest.get(key, 0.0), float(seconds))
    return list({(where, seed, seconds): seconds for (where, _, seed), seconds in deepest.items()}.values())


def _entry_line(e: Entry) -> str:
    """One command of the Cost section: the command, how long and how it ended, on what, and
    what it said of the runs it merged (a ``compare``'s ``notes``), each on a line below it."""
    seconds = e.get("seconds")
    took = (f"{duration(seconds)}, {e.get('outcome', 'ended')}" if isinstance(seconds, (int, float))
            else "no end recorded (still running, or killed)")
    threads = e.get("threads")
    on = ", ".join(str(x) for x in (e.get("device"), f"{threads} thread{'s' * (threads != 1)}" if threads else None,
                                    e.get("shard") and f"shard {e['shard']}") if x)
    versions = f"surgery {e.get('surgery', '?')}, torch {e.get('torch', '?')}"
    where = f"in `{e['dir']}`" if e.get("dir") else ""
    parts = [took, on, versions, f"started {e.get('started', '?')}", where]
    notes = e.get("notes") if isinstance(e.get("notes"), list) else []
    return "\n".join([f"- `{e.get('command', '?')}`: " + "; ".join(p for p in parts if p),
                      *(f"  - {n}" for n in notes)])


def _ended_seconds(commands: list[Entry]) -> list[float]:
    """The wall times of the commands that have an end recorded."""
    return [float(e["seconds"]) for e in commands if isinstance(e.get("seconds"), (int, float))]


def commands_line(commands: list[Entry], where: str = "experiment.json lists them all, as does the report's "
                  "Cost section") -> str | None:
    """``surgery inspect``'s line on the commands that wrote a directory: how many, their wall
    time, the last one, and ``where`` all are listed; ``None`` when none is recorded."""
    if not commands:
        return None
    timed = _ended_seconds(commands)
    last = commands[-1]
    how = (f"{last.get('outcome', 'ended')} after {duration(last['seconds'])}"
           if isinstance(last.get("seconds"), (int, float)) else "no end recorded yet")
    wall = f"{duration(sum(timed))} of wall time" if timed else "none ended yet"
    return (f"made by {len(commands)} command{'s' * (len(commands) != 1)} ({wall}); "
            f"the last `{_clipped(str(last.get('command', '?')))}`, started {last.get('started', '?')}, {how} "
            f"({where})")


def _clipped(command: str, limit: int = 300) -> str:
    """``command`` whole if it is at most ``limit`` characters, else its start and end with
    how many characters were left out (a merge's ``--set experiment.paper...`` runs to pages)."""
    if len(command) <= limit:
        return command
    keep = limit // 2
    return f"{command[:keep]} [... {len(command) - 2 * keep} characters ...] {command[-keep:]}"


def cost_markdown(rows: list[dict[str, Any]], commands: list[Entry]) -> list[str]:
    """The report's Cost section: the training time the results record (fine-tuning summed
    over the runs, pretraining over the stacks, each once), and the commands that made them
    with their wall time."""
    tuned = sum(float(r["finetune_seconds"]) for r in rows if isinstance(r.get("finetune_seconds"), (int, float)))
    stacks = _stacks(rows)
    lines = ["", "## Cost", "",
             f"Training time the results record (wall clock, summed): fine-tuning {duration(tuned)} over "
             f"{len(rows)} run{'s' * (len(rows) != 1)}"
             + (f", pretraining {duration(sum(stacks))} over {len(stacks)} greedy "
                f"stack{'s' * (len(stacks) != 1)} (each once; a depth-d run starts from its stack's first d layers)"
                if stacks else "")
             + ". Tuning trials, data loading and reports are not in it"
             + ("; the commands' wall time below is." if commands else ".")]
    if commands:
        timed = _ended_seconds(commands)
        lines += ["", f"Commands that wrote these results ({len(commands)}; {duration(sum(timed))} of wall time "
                      "summed over those with an end recorded; processes that ran at once count each):", ""]
        lines += [_entry_line(e) for e in commands]
    return lines
