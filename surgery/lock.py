"""One writer per output directory. A run holds ``OUT/.lock`` while it writes there (a
shard of an experiment ``OUT/.lock-shard-I-of-N``, beside the other shards), so a second
run given the same ``--out`` by mistake is refused before it trains, instead of training
the same cells twice or mixing two runs' files. A lock whose process has ended (killed,
or its machine restarted) is taken over; one held on another machine (an ``--out`` on
shared storage) cannot be checked from here, and the error says how to remove it."""

from __future__ import annotations

import json
import os
import re
import shlex
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .errors import OutputError
from .runtime import is_main_process

LOCK = ".lock"
_YOUNG = 60.0  # seconds: an empty lock file this young is still being written


def _name(shard: tuple[int, int] | None) -> str:
    return LOCK if shard is None else f"{LOCK}-shard-{shard[0] + 1}-of-{shard[1]}"


def _read(path: Path) -> dict[str, Any] | None:
    """A lock's holder, ``{}`` for one being written, ``None`` when it is gone or damaged."""
    try:
        text = path.read_text(encoding="utf-8")
        if not text and time.time() - path.stat().st_mtime < _YOUNG:
            return {}
        holder = json.loads(text)
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) else None


def alive(holder: dict[str, Any]) -> bool:
    """Whether the lock's process still runs: checked on this machine (a lock of this
    process counts as ended: it was left by an earlier call that did not end cleanly);
    taken as running when held on another machine or while it is being written."""
    if not holder or holder.get("host") != socket.gethostname():
        return True
    pid = holder.get("pid")
    if not isinstance(pid, int) or pid <= 0 or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def holders(out: Path) -> list[tuple[Path, dict[str, Any]]]:
    """The locks of ``out`` whose runs still run (or cannot be checked), with their holders."""
    found = []
    for path in sorted(Path(out).glob(f"{LOCK}*")):
        holder = _read(path)
        if holder is not None and alive(holder):
            found.append((path, holder))
    return found


def describe_holder(holder: dict[str, Any]) -> str:
    """``surgery run r.yaml --out runs/x (pid 123 on this machine, since 20:31)``."""
    if not holder:
        return "a run that is starting (its lock is being written)"
    return f"`{holder.get('command', '?')}` (pid {holder.get('pid')} on {_where_since([holder])})"


_SHARD_OPTION = re.compile(r"--shard[= ]\d+/\d+")


def describe_holders(out: Path) -> list[str]:
    """A line for each run writing into ``out`` now; the shards started with one command line
    (apart from their ``--shard``) on one machine share a line that writes it once."""
    groups: dict[tuple[str, ...], list[dict[str, Any]]] = {}
    for path, holder in holders(out):
        shard = holder.get("shard")
        key: tuple[str, ...] = (str(path),)  # a run alone
        if isinstance(shard, list) and len(shard) == 2:  # one of N shards: grouped by its command, machine and N
            key = (_SHARD_OPTION.sub("--shard I/N", str(holder.get("command"))), str(holder.get("host")), str(shard[1]))
        groups.setdefault(key, []).append(holder)
    lines = []
    for key, group in groups.items():
        if len(group) == 1:
            lines.append(describe_holder(group[0]))
            continue
        group.sort(key=lambda h: h["shard"][0])  # the lock files sort 1, 10, 2 from ten shards
        shards = ", ".join(f"{h['shard'][0] + 1}/{h['shard'][1]}" for h in group)
        pids = ", ".join(str(h.get("pid")) for h in group)
        lines.append(f"shards {shards} of `{key[0]}` (pids {pids} on {_where_since(group)})")
    return lines


def _where_since(group: list[dict[str, Any]]) -> str:
    """``this machine, since 2026-12-06 23:52``: where the runs of ``group`` (one machine's) run
    and when the first of them started."""
    starts = [h["since"] for h in group if isinstance(h.get("since"), (int, float))]
    when = time.strftime(", since %Y-%m-%d %H:%M", time.localtime(min(starts))) if starts else ""
    host = group[0].get("host")
    return ("this machine" if host == socket.gethostname() else f"the machine {host!r}") + when


def _conflict(path: Path, holder: dict[str, Any], shard: tuple[int, int] | None) -> str | None:
    """Why a run (``shard``) cannot go beside the lock at ``path``; ``None`` if it can."""
    theirs = holder.get("shard") if holder else None
    if shard is None:
        return "a run writes there now" if theirs is None else "a shard of its grid trains there now"
    if path.name == LOCK:
        return "a run without --shard writes there now (a shard goes beside other shards only)"
    if theirs == [shard[0], shard[1]] or path.name == _name(shard):
        return f"shard {shard[0] + 1}/{shard[1]} trains there now"
    if isinstance(theirs, list) and len(theirs) == 2 and theirs[1] != shard[1]:
        return f"a shard of {theirs[1]} trains there now (the shards of one grid share one N)"
    return None


def _refusal(out: Path, path: Path, holder: dict[str, Any], why: str, flag: str) -> OutputError:
    gone = ("" if not holder or holder.get("host") == socket.gethostname() else
            f" That machine cannot be checked from here: if its run has ended without removing its lock, "
            f"delete {path}.")
    return OutputError(f"{out}: {why}: {describe_holder(holder)}. Two runs in one directory would train the same "
                       "networks twice and mix their files, so this one did not start (nothing was written). Wait "
                       f"for it to end (`surgery inspect {out}` says how far it has got), give this run its own "
                       f"{flag}, or split an experiment's grid between processes with --shard I/N.{gone}")


@contextmanager
def hold(out: str | Path, shard: tuple[int, int] | None = None, flag: str = "--out") -> Iterator[None]:
    """Hold ``out`` (an existing directory) for this run while the block writes there;
    ``OutputError`` naming the other run when one already does (and the option, ``flag``,
    that gives this one another place). Only the main process of a ``torchrun`` takes it:
    the other ranks are the same run."""
    if not is_main_process():
        yield
        return
    out = Path(out)
    path = out / _name(shard)
    for _ in range(3):  # a run that took the lock between our look and our create: look again
        for other in sorted(out.glob(f"{LOCK}*")):
            holder = _read(other)
            if holder is None or not alive(holder):  # left by a run that has ended
                other.unlink(missing_ok=True)
            elif (why := _conflict(other, holder, shard)) is not None:
                raise _refusal(out, other, holder, why, flag)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "since": round(time.time(), 3),
              "command": command_line(), "shard": list(shard) if shard is not None else None}
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            continue
        except OSError as e:
            raise OutputError(f"cannot write {path} ({e.strerror}); choose another --out or fix its "
                              "permissions.") from e
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(json.dumps(me))
        break
    else:
        raise OutputError(f"{out}: other runs kept taking its lock ({path}); run this one again, or give it its own "
                          "--out.")
    try:
        yield
    finally:
        if _read(path) == me:  # not taken over meanwhile by a run that found us ended
            path.unlink(missing_ok=True)


def command_line() -> str:
    """This process's command line, as its lock names it: ``surgery run r.yaml``, or the
    Python program that called the API."""
    argv = sys.argv or ["?"]
    if Path(argv[0]).name in ("surgery", "__main__.py"):  # the console script, or python -m surgery
        return shlex.join(["surgery", *argv[1:]])
    return shlex.join([Path(sys.executable).name, *argv])
