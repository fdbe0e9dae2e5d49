"""The kinds of output directory: an experiment's, a single run's, a search's, and the merge
``surgery compare --out`` writes. How each is told by the files in it, and the checks that
keep one kind from writing into another's (their files would mix, or replace each other's).
"""

from __future__ import annotations

from pathlib import Path

from .errors import OutputError, SurgeryError
from .io import read_json

# Per kind: the files (a trailing / marks a directory) its runs write there.
RUN_FILES: dict[str, tuple[str, ...]] = {
    "experiment": ("experiment.json", "cells/", "stacks/", "tuning/"),
    "single run": ("result.json", "metrics.jsonl", "checkpoints/", "pretrain/"),
    "search": ("search.json", "search.db", "trials/"),
}


def present(out: Path, names: tuple[str, ...]) -> list[str]:
    """Those of ``names`` that ``out`` holds (``x/`` a directory, ``x`` a file)."""
    return [n for n in names if ((out / n[:-1]).is_dir() if n.endswith("/") else (out / n).is_file())]


def is_experiment_dir(path: Path) -> bool:
    """Whether ``path`` is (or was started as) an experiment's output directory."""
    return bool(present(path, RUN_FILES["experiment"]))


def is_single_run_dir(path: Path) -> bool:
    """Whether ``path`` is (or was started as) the output directory of one run (``surgery
    run`` or ``finetune`` of a recipe without an experiment)."""
    return bool(present(path, RUN_FILES["single run"]))


def is_search_dir(path: Path) -> bool:
    """Whether ``path`` is (or was started as) a search's output directory."""
    return bool(present(path, RUN_FILES["search"]))


def is_merge_dir(path: Path) -> bool:
    """Whether ``path`` holds what ``surgery compare --out`` wrote (its experiment.json names
    the directories merged)."""
    try:
        meta = read_json(path / "experiment.json") if (path / "experiment.json").is_file() else None
    except SurgeryError:
        return False
    return isinstance(meta, dict) and isinstance(meta.get("merged_from"), list)


def _a(kind: str) -> str:
    return f"{'an' if kind[0] == 'e' else 'a'} {kind}"


def check_own_out(out: Path, kind: str) -> None:
    """``OutputError`` when ``out`` holds the files of another kind of run than ``kind`` (an
    experiment, a single run or a search) and none of its own: they would mix; or holds the
    merge `surgery compare --out` wrote, whose results a run's would replace."""
    if is_merge_dir(out):
        raise OutputError(f"{out}: holds the results `surgery compare` merged from other directories; "
                          f"{_a(kind)}'s would replace them. Give the {kind.split()[-1]} its own --out.")
    if present(out, RUN_FILES[kind]):
        return  # its own: continued, or added to
    for other, files in RUN_FILES.items():
        if other != kind and present(out, files):
            raise OutputError(f"{out}: holds {_a(other)}'s files ({', '.join(files[:-1])} or {files[-1]}); "
                              f"{_a(kind)}'s would go beside them. Give the {kind.split()[-1]} its own --out.")


def check_merge_out(out: Path, dirs: list[Path]) -> None:
    """``OutputError`` when writing a merge into ``out`` would replace what a run made there:
    ``out`` is one of the directories merged, or holds files a run wrote (an experiment's
    cells, a single run's or a search's). A new directory, or an earlier merge's, is fine."""
    if any(out.resolve() == d.resolve() for d in dirs):
        raise OutputError(f"compare: --out {out} is one of the directories merged; the merge would replace its own "
                          "results.csv and report. Give a new directory (each merged one keeps its own).")
    made = [f for files in RUN_FILES.values() for f in present(out, files) if f != "experiment.json"]
    if made:
        raise OutputError(f"compare: --out {out} holds a run's files ({', '.join(made)}); the merge's results.csv "
                          "and report would replace or mix with that run's. Give a new directory, or one an earlier "
                          "`compare --out` made.")
