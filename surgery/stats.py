"""The statistics of a comparison: per (arm, depth) the mean test error over seeds, its
standard deviation and 95% Student-t interval, Welch's t-test against the baseline arm,
Levene's test of the spread, and whether a run learned at all. ``scipy.stats`` is imported
when a statistic is first wanted."""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np

from .errors import SurgeryError


def _stats() -> Any:
    """``scipy.stats``, imported when a statistic is first wanted: the import takes 1-2 s of
    every command's start, and most (validate, inspect, a single run, --help) never need it."""
    from scipy import stats

    return stats


def summarize(values: list[float]) -> dict[str, float]:
    """n, mean, sd and the 95% Student-t interval of the mean."""
    a = np.asarray(values, dtype=float)
    n = len(a)
    mean = float(a.mean()) if n else math.nan
    std = float(a.std(ddof=1)) if n > 1 else math.nan
    half = float(_stats().t.ppf(0.975, n - 1) * std / math.sqrt(n)) if n > 1 else math.nan
    return {"n": n, "mean": mean, "std": std, "ci_low": mean - half, "ci_high": mean + half, "ci_half": half}


def welch(a: list[float], b: list[float]) -> tuple[float, float]:
    """Welch's t statistic and two-sided p-value (nan when either side has < 2 values)."""
    if len(a) < 2 or len(b) < 2:
        return math.nan, math.nan
    if np.std(a) == 0 and np.std(b) == 0:  # no spread on either side: any difference is certain
        diff = float(np.mean(a) - np.mean(b))
        return (math.copysign(math.inf, diff), 0.0) if diff else (math.nan, math.nan)
    with warnings.catch_warnings():  # near-identical samples: scipy warns, the numbers stand
        warnings.simplefilter("ignore", RuntimeWarning)
        t, p = _stats().ttest_ind(a, b, equal_var=False)
    return float(t), float(p)


def cells(rows: list[dict[str, Any]]) -> dict[tuple[str, int], list[dict[str, Any]]]:
    """The rows per (arm, depth), ordered by depth, then arm."""
    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["condition"], int(r["depth"])), []).append(r)
    return dict(sorted(groups.items(), key=lambda kv: (kv[0][1], kv[0][0])))


def cell_errors(rows: list[dict[str, Any]]) -> dict[tuple[str, int], list[float]]:
    """The test errors per (arm, depth), in :func:`cells`' order."""
    return {key: [float(r["test_error"]) for r in runs] for key, runs in cells(rows).items()}


def check_rows(rows: list[dict[str, Any]], where: str) -> None:
    """``SurgeryError`` naming ``where`` and the first row that is not a result: a dict with
    condition, depth, seed and a numeric test_error."""
    for i, r in enumerate(rows):
        lacks = [k for k in ("condition", "depth", "seed", "test_error") if k not in r] if isinstance(r, dict) else []
        if isinstance(r, dict) and not lacks and not isinstance(r["test_error"], (int, float, str)):
            lacks = ["a numeric test_error"]
        if not isinstance(r, dict) or lacks:
            what = f"lacks {lacks[0]}" if isinstance(r, dict) else f"is a {type(r).__name__}"
            raise SurgeryError(f"{where}: rows[{i}] {what}; give the rows surgery.run_experiment returned (or "
                               "surgery.read_results(out)): dicts with condition, depth, seed and test_error.")


def table(rows: list[dict[str, Any]], baseline: str = "none") -> list[dict[str, Any]]:
    """Per (arm, depth): the summary of test errors and Welch's t-test against ``baseline``
    at the same depth; an arm at a depth the baseline did not run (a shallow arm beside a
    deep grid) against the baseline's only depth, when it ran at one (``baseline_depth``)."""
    check_rows(rows, "the result rows")
    groups = cell_errors(rows)
    base_depths = sorted(d for c, d in groups if c == baseline)
    out = []
    for (cond, depth), vals in groups.items():
        s = summarize(vals)
        bd = depth if depth in base_depths else (base_depths[0] if len(base_depths) == 1 else None)
        base = groups.get((baseline, bd)) if bd is not None else None
        t, p = welch(vals, base) if base is not None and cond != baseline else (math.nan, math.nan)
        out.append({"condition": cond, "depth": depth, **s, "t": t, "p": p, "baseline_depth": bd,
                    "baseline_mean": float(np.mean(base)) if base else math.nan})
    return out


def spread_p(a: list[float], b: list[float]) -> float:
    """Levene's test that two samples have the same spread, centred on the median (the
    Brown-Forsythe form, robust to a skewed sample): the p-value; nan where the test is
    undefined: fewer than 3 values on a side (two values lie equally far from their median,
    so the test has nothing to compare), or no spread in the distances."""
    if len(a) < 3 or len(b) < 3:
        return math.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        p = float(_stats().levene(a, b, center="median").pvalue)
    return p if math.isfinite(p) else math.nan


FAILED_TRAIN_ERROR = 50.0  # %: a run that gets half its own training set wrong has not learned


def learned(r: dict[str, Any], threshold: float = FAILED_TRAIN_ERROR) -> bool:
    """Whether result row ``r``'s run learned: training error below ``threshold`` % at the
    kept epoch (or not recorded)."""
    return r.get("train_error") in (None, "") or float(r["train_error"]) < threshold
