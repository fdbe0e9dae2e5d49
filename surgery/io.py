"""Writing files: every file goes to a temp name beside its target and is renamed, so a
reader (or a killed run) never sees half a file; an unwritable place is an ``OutputError``
naming the path. Reading back our own JSON files: a damaged one is a ``ManifestError``
naming it. Also the progress bar every long loop shows."""

from __future__ import annotations

import errno
import json
import os
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from safetensors import SafetensorError

from .errors import ManifestError, OutputError


def make_dir(path: str | Path) -> Path:
    """Create ``path`` (and its parents) if needed; ``OutputError`` if that is not allowed."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        if e.errno in (errno.EEXIST, errno.ENOTDIR):  # the path, or a folder above it, is a file
            file = next((p for p in (path, *path.parents) if p.exists() and not p.is_dir()), path)
            raise OutputError(f"cannot create the directory {path}: {file} is a file, not a directory; "
                              "choose another --out/--output.") from e
        raise OutputError(f"cannot create the directory {path} ({e.strerror}); choose another --out/--output "
                          "or fix its permissions.") from e
    if not os.access(path, os.W_OK | os.X_OK):  # exists, but nothing could be written into it
        raise OutputError(f"cannot write into the directory {path} (permission denied); choose another "
                          "--out/--output or fix its permissions.")
    return path


def file_to_write(path: str | Path) -> Path:
    """``path``, once its directory exists and is writable and it is no directory itself:
    ``OutputError`` otherwise, so a command can check its output before its work."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{path} is a directory; give the path of a file to write, e.g. {path}/NAME"
                          f"{path.suffix or '.safetensors'}.")
    make_dir(path.parent)
    return path


# Writing failed for want of room or permission, not for a bug: the write is an OutputError.
_NO_ROOM = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG}


def _no_room(e: OSError | SafetensorError) -> str | None:
    """Why a write failed, when it was for want of room or permission (safetensors reports
    those as ``SafetensorError: ... I/O error: No space left on device (os error 28)``)."""
    if isinstance(e, OSError):
        return e.strerror if e.errno in _NO_ROOM else None
    text = str(e)
    if "I/O error: " not in text:
        return None
    why = text.split("I/O error: ", 1)[1]
    return why.split(" (os error")[0] if any(f"(os error {n})" in why for n in _NO_ROOM) else None


def _mode_for(path: Path) -> int:
    """The permissions the finished file gets: those of the file it replaces, or what a
    plain ``open(path, "w")`` would give under this process's umask (``mkstemp`` makes its
    temp file readable by its owner only, which on a shared machine would hide every result
    from the rest of the group)."""
    try:
        return path.stat().st_mode & 0o7777
    except OSError:
        return 0o666 & ~_umask()


def _umask() -> int:
    try:  # Linux shows it without changing it (another thread may be creating a file)
        with open("/proc/self/status", encoding="ascii") as f:
            return next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError, IndexError):
        mask = os.umask(0o022)  # elsewhere the only way to read it is to set it; put it straight back
        os.umask(mask)
        return mask


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temp path in the target's directory; rename over ``path`` on success (a
    file that was there is replaced only then; on any failure the temp file is removed)."""
    path = file_to_write(path)
    try:
        # the temp name is at most 80 characters, so that any name that fits the file system has one that fits too
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name[:64]}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise OutputError(f"cannot write {path} ({e.strerror}); choose another --out/--output "
                          "or fix the directory's permissions.") from e
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, _mode_for(path))
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        why = _no_room(e) if isinstance(e, (OSError, SafetensorError)) else None
        if why is None:
            raise
        raise OutputError(f"cannot write {path} ({why}); whatever was there is kept. Free some space or "
                          "choose another --out/--output, then run the same command again.") from e


def write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    write_text(path, json.dumps(obj, indent=2, default=str) + "\n")


RERUN = " Run its recipe again with this --out to write it anew."  # what to do about a damaged experiment.json


def read_json(path: str | Path, hint: str = "") -> dict[str, Any]:
    """The JSON object in one of the files a run writes (``result.json``, ``experiment.json``,
    ...); ``ManifestError`` naming the file when it cannot be read, is not JSON (truncated or
    damaged) or holds something other than an object; ``hint`` says what to do about it."""
    path = Path(path)
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise ManifestError(f"{path}: cannot be read ({e.strerror}).{hint}") from e
    except ValueError as e:
        raise ManifestError(f"{path}: not readable JSON ({e}); the file is truncated or damaged.{hint}") from e
    if not isinstance(obj, dict):
        raise ManifestError(f"{path}: holds a JSON {type(obj).__name__}, not the object it should; the file is "
                            f"damaged.{hint}")
    return obj


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """The JSON objects, one a line, of a ``metrics.jsonl``; ``ManifestError`` naming the
    file and line when one is not."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise ManifestError(f"{path}: cannot be read ({e.strerror}).") from e
    except UnicodeDecodeError as e:
        raise ManifestError(f"{path}: not text (byte {e.start} is no UTF-8); the file is damaged.") from e
    out = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError as e:
            raise ManifestError(f"{path}, line {i}: not readable JSON ({e}); the file is truncated or damaged.") from e
        if not isinstance(obj, dict):
            raise ManifestError(f"{path}, line {i}: a JSON {type(obj).__name__}, not an object; the file is damaged.")
        out.append(obj)
    return out


def progress_bar(total: int, desc: str, progress: bool | None, unit: str = "it", initial: int = 0):
    """A tqdm bar; ``progress=None`` shows it only when stderr is a terminal."""
    import sys

    from tqdm.auto import tqdm

    show = sys.stderr.isatty() if progress is None else progress
    return tqdm(total=total, desc=desc, unit=unit, initial=initial, leave=False, disable=not show, dynamic_ncols=True)


def percent(v: Any) -> str:
    """An error rate for a message: ``1.23%``, or ``none`` when there is none (or it is not a number)."""
    return f"{v:.2f}%" if isinstance(v, (int, float)) else "none"


def duration(seconds: float) -> str:
    """Wall time for a log line: ``4.2 s``, ``3.5 min`` or ``2 h 05 min``."""
    if seconds < 59.95:  # what rounds to 60.0 goes up a unit
        return f"{seconds:.1f} s"
    if seconds < 3597:
        return f"{seconds / 60:.1f} min"
    hours, rest = divmod(round(seconds / 60), 60)
    return f"{hours} h {rest:02d} min"


class Pace:
    """How far a long loop has got, for its log lines: ``5/16 cells done, about 12 min left``.
    Units finished before it started (by an earlier run) count as done; the time left is
    estimated from the pace of those finished since."""

    def __init__(self, total: int, done: int = 0, unit: str = "cells"):
        self.total, self.done, self.unit = total, done, unit
        self._before, self._t0 = done, time.perf_counter()
        self.since = time.time()  # when it started, to compare with files' times

    def add(self, n: int = 1, fresh: bool = True) -> Pace:
        """Count ``n`` more finished; not ``fresh`` (read back, finished by an earlier run):
        done, but not in the pace."""
        self.done += n
        if not fresh:
            self._before += n
        return self

    def left(self) -> str:
        """``about 12 min left`` at the pace so far; empty before the first or after the last."""
        ran, left = self.done - self._before, self.total - self.done
        return f"about {duration((time.perf_counter() - self._t0) / ran * left)} left" if ran > 0 < left else ""

    def __str__(self) -> str:
        left = self.left()
        return f"{self.done}/{self.total} {self.unit} done" + (f", {left}" if left else "")


def progress_line(progress: bool | None, text: str) -> None:
    """``text`` as one line on stderr when a bar with this ``progress`` setting is hidden
    only because stderr is not a terminal (a log file, ``nohup``): a long run still says
    how far it got there, one line per unit of work, without a bar's carriage returns."""
    import sys

    if progress is None and not sys.stderr.isatty():
        print(text, file=sys.stderr, flush=True)
