"""Tables for a comparison: report.md (its figures: :mod:`surgery.figures`; its statistics:
:mod:`surgery.stats`): per condition x depth the mean, standard deviation and 95% interval
with a Welch t-test against the baseline arm at the same depth, what adding a layer did,
the spread over seeds, the paper's numbers, the tuning and the cost.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from .errors import SurgeryError
from .figures import kept_figures, write_figures
from .io import make_dir, write_text
from .outdirs import experiment_meta, read_tuning
from .provenance import cost_markdown, recorded
from .stats import FAILED_TRAIN_ERROR, cell_errors, cells, check_rows, learned, spread_p, table, welch


def _fmt(x: float, nd: int = 2) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{nd}f}"


def _p(p: float) -> str:
    """A p-value to four places; one that rounds to zero is written ``<0.0001``, not 0.0000."""
    return "<0.0001" if p < 5e-5 else _fmt(p, 4)


def tuning_markdown(tuning: dict[str, Any], ran: Iterable[tuple[str, int]] = ()) -> list[str]:
    """The report's tuning section: the budget, and per (arm, depth) the values chosen on
    the validation set; every trial is listed in ``tuning.json``. Which of ``ran`` (the
    report's (arm, depth) pairs) were not tuned, as in a merge of tuned and untuned runs."""
    metric, seeds = tuning["metric"], tuning.get("seeds", 1)  # files written before tune.seeds: one
    on = f"the first seed, scored by {metric}" if seeds == 1 else \
        f"the first {seeds} seeds, scored by the mean of their {metric}"
    then = [s["name"] for s in tuning.get("then", [])]
    steps = (f", then {len(then)} step{'s' * (len(then) > 1)} ({'; '.join(then)}), each trying its alternatives "
             "over the values chosen so far and keeping the lowest" if then else "")
    tuned = {(t["condition"], int(t["depth"])) for t in tuning["trials"] if "best_trial" in t}
    untuned = sorted(set(ran) - tuned)
    arms = "Every arm tuned here" if untuned else "Every arm"
    lines = ["", "## Tuning", "",
             f"{arms} had the same budget: {tuning['trials_per_arm']} trials per depth on {on}{steps} (the test "
             "set plays no part); the seeds then ran with the values chosen. All trials: `tuning.json`.", "",
             f"| condition | depth | {'chosen by' if then else 'best trial'} | {metric} | values |",
             "|---|---:|---:|---:|---|"]
    for t in tuning["trials"]:
        if "best_trial" in t:
            vals = _values(t["params"], t.get("ignored", ()))  # leaving out values the arm does not use
            best = f"{t['best_trial'] + 1}/{tuning['trials_per_arm']}"  # counted from 1, as the log counts them
            best = f"trial {best}" + "".join(f" + {s}" for s in t.get("steps_taken", [])) if then else best
            lines.append(f"| {t['condition']} | {t['depth']} | {best} | {t[metric]:.2f} | {vals} |")
    lines += ["", _untuned_line(untuned)] if untuned else []
    if tuning.get("steps"):
        lines += ["", f"The steps after the trials, each alternative set over the values chosen so far ({metric} "
                  "so far beside it):", "", f"| condition | depth | step | alternative | {metric} | so far | taken |",
                  "|---|---:|---|---|---:|---:|---|"]
        for s in tuning["steps"]:
            score = "not run" if s.get("skipped") else "diverged" if s.get("diverged") else f"{s[metric]:.2f}"
            lines.append(f"| {s['condition']} | {s['depth']} | {s['step']} | {_values(s['params'])} | {score} | "
                         f"{s['so_far']:.2f} | {'yes' if s.get('taken') else ''} |")
    return lines


def _untuned_line(untuned: list[tuple[str, int]]) -> str:
    """Which (arm, depth) cells of a merged report ran without tuning, arm by arm."""
    depths: dict[str, list[int]] = {}
    for arm, depth in untuned:
        depths.setdefault(arm, []).append(depth)
    which = " and ".join(f"{arm} at depth{'s' * (len(ds) > 1)} {', '.join(map(str, ds))}" for arm, ds in depths.items())
    return (f"Not tuned: {which}, with the values set in the recipe of the run each came from (that "
            "directory's `experiment.json`; a merge lists its directories under `merged_from`), not values "
            "chosen at that depth.")


def _values(params: dict[str, Any], ignored: Any = ()) -> str:
    """Tuned values for a markdown table cell, each path in backquotes, floats to 4 digits."""
    return ", ".join(f"`{k}`={v:.4g}" if isinstance(v, float) else f"`{k}`={v}" for k, v in params.items()
                     if k not in ignored)


def _step(a: list[float], b: list[float]) -> str:
    """The change in mean from sample ``a`` to ``b`` with Welch's p ("+0.27 (p 0.0004)")."""
    diff = float(np.mean(b) - np.mean(a))
    p = welch(b, a)[1]
    return f"{diff:+.2f}" + ("" if math.isnan(p) else f" (p {_p(p)})")


def depth_markdown(rows: list[dict[str, Any]], baseline: str = "none") -> list[str]:
    """The report's answer to "what did adding a layer do?": per arm run at two depths or more,
    the change in mean test error from each depth to the next (Welch p) and the depth where it
    is lowest; then each cell's spread over seeds against ``baseline``'s at the same depth
    (Levene p). Nothing when no arm ran at two depths."""
    errs = cell_errors(rows)
    arms = sorted({c for c, _ in errs}, key=lambda c: (c != baseline, c))
    depths = {a: sorted(d for c, d in errs if c == a) for a in arms}
    deep = [a for a in arms if len(depths[a]) > 1]
    if not deep:
        return []
    every = sorted({d for a in deep for d in depths[a]})
    steps = list(zip(every, every[1:]))
    def step(a: str, d: int, e: int) -> str:  # the arm's step into depth e, from d or its last depth below e
        below = [b for b in depths[a] if b < e]
        if (a, e) not in errs or not below:
            return "–"
        return _step(errs[a, below[-1]], errs[a, e]) + ("" if below[-1] == d else f" from {below[-1]}")

    lines = ["", "## Depth", "", "What adding a layer did: the change in each arm's mean test error from one depth "
             "to the next it ran (Welch's p; \"from 1\": from the depth named, where it skipped one), and the "
             "depth where its mean is lowest.", "",
             "| condition | " + " | ".join(f"{a} -> {b}" for a, b in steps) + " | lowest at |",
             "|---|" + "---:|" * (len(steps) + 1)]
    for a in deep:
        cols = [step(a, d, e) for d, e in steps]
        lowest = min(depths[a], key=lambda d: float(np.mean(errs[a, d])))
        lines.append(f"| {a} | " + " | ".join(cols) + f" | {lowest} |")
    others = [a for a in arms if a != baseline and any((baseline, d) in errs for d in depths[a])]
    if baseline not in arms or not others:
        return lines
    shown = sorted({d for a in others for d in depths[a] if (baseline, d) in errs})
    lines += ["", f"Spread over seeds: the standard deviation of each cell's test error, and Levene's test "
              f"(median-centred) against `{baseline}` at the same depth: a small p says the spreads differ.", "",
              "| condition | " + " | ".join(f"depth {d}" for d in shown) + " |", "|---|" + "---:|" * len(shown)]
    for a in [baseline] + others:
        cols = []
        for d in shown:
            vals, base = errs.get((a, d)), errs.get((baseline, d))
            sd = _fmt(float(np.std(vals, ddof=1))) if vals and len(vals) > 1 else "–"
            p = spread_p(vals, base) if vals and base and a != baseline else math.nan
            cols.append(sd + ("" if math.isnan(p) else f" (p {_p(p)})"))
        lines.append(f"| {a} | " + " | ".join(cols) + " |")
    return lines


def paper_markdown(paper: dict[str, Any], tab: list[dict[str, Any]]) -> list[str]:
    """The report's comparison with the published numbers: per arm the paper's test error,
    ours (mean and 95% interval), the gap, and whether it is within ``target`` points."""
    target = paper.get("target")
    lines = ["", "## Against the paper", "", f"{paper['source']}. Test error %; gap = ours - paper"
             + (f"; a match is within {target} points." if target else "."), "",
             "| condition | depth | paper | ours (n) | 95% CI | gap |" + (" match |" if target else ""),
             "|---|---:|---:|---:|---|---:|" + ("---|" if target else "")]
    for key, ref in paper["errors"].items():
        arm, _, d = key.partition(" ")
        cells = [t for t in tab if t["condition"] == arm and (not d or t["depth"] == int(d[1:]))]
        if not cells:
            lines.append(f"| {arm} | {d[1:] or '–'} | {ref:.2f} | not run | | |" + (" |" if target else ""))
            continue
        t = max(cells, key=lambda c: c["depth"])
        gap = t["mean"] - ref
        row = (f"| {arm} | {t['depth']} | {ref:.2f} | {t['mean']:.2f} ({t['n']}) | [{_fmt(t['ci_low'])}, "
               f"{_fmt(t['ci_high'])}] | {gap:+.2f} |")
        lines.append(row + (f" {'yes' if abs(gap) <= target else 'no'} |" if target else ""))
    if paper.get("differences"):
        lines += ["", "What the paper did that this run did not: " + paper["differences"].strip()]
    return lines


def markdown(rows: list[dict[str, Any]], baseline: str = "none", tuning: dict[str, Any] | None = None,
             paper: dict[str, Any] | None = None, commands: list[dict[str, Any]] | None = None,
             kept: bool = False) -> str:
    """The report's markdown: the table, the best arm, the paper's numbers and the tuning
    (if any), the cost (with the ``commands`` that made the results), the figures (``kept``:
    those drawn from the runs' directories are an earlier build's, none of them being here)."""
    tab = table(rows, baseline)
    seeds = sorted({int(r["seed"]) for r in rows})
    lines = [
        "# Comparison report",
        "",
        f"{len(rows)} runs; seeds {seeds}. Test error in percent; CI is the 95% Student-t interval "
        f"of the mean over seeds; Welch's t-test compares each arm with `{baseline}` at the same depth, "
        f"or, for an arm at a depth `{baseline}` did not run, at `{baseline}`'s only depth "
        "(negative t: lower error than the baseline).",
        "",
        "| condition | depth | n | mean | std | 95% CI | vs baseline | t | p |",
        "|---|---:|---:|---:|---:|---|---:|---:|---:|",
    ]
    for t in tab:
        ci = f"[{_fmt(t['ci_low'])}, {_fmt(t['ci_high'])}]"
        vs_base = not math.isnan(t["baseline_mean"]) and t["condition"] != baseline
        diff = t["mean"] - t["baseline_mean"] if vs_base else math.nan
        lines.append(f"| {t['condition']} | {t['depth']} | {t['n']} | {_fmt(t['mean'])} | {_fmt(t['std'])} | {ci} | "
                     f"{'' if math.isnan(diff) else f'{diff:+.2f}'} | {_fmt(t['t'])} | {_p(t['p'])} |")
    best = min(tab, key=lambda t: t["mean"]) if tab else None
    if best:
        lines += ["", significance_line(rows, baseline)]
        failed = failed_line(rows)
        lines += ["", failed] if failed else []
        lines += ["", f"Lowest mean test error: **{best['condition']}** at depth {best['depth']} "
                      f"({best['mean']:.2f}%)."]
    lines += depth_markdown(rows, baseline)
    lines += paper_markdown(paper, tab) if paper else []
    lines += tuning_markdown(tuning, cells(rows)) if tuning else []
    lines += cost_markdown(rows, commands or [])
    lines += ["", "## Figures", "",
              "![test error vs depth](figures/error_vs_depth.png)", "",
              "![spread over seeds](figures/error_hist.png)", ""]
    gone = [r for r in rows if not (r.get("path") and (Path(r["path"]) / "metrics.jsonl").is_file())]
    if kept:
        lines += ["The learning curves and filters are kept as an earlier build of this report drew them: none of "
                  "its runs' directories (results.csv's `path`) is here to draw them from.", ""]
    elif gone:  # runs merged from a results.csv whose run directories are not here
        arms = ", ".join(sorted({r["condition"] for r in gone}))
        lines += [f"The learning curves and filters leave out the runs whose directories (results.csv's `path`) "
                  f"are not here: {len(gone)} of {len(rows)} ({arms}); the curves are each arm's at the largest "
                  "depth whose runs are here.", ""]
    lines += ["![learning curves](figures/learning_curves.png)", "",
              "![first-layer filters](figures/filters.png)", ""]
    return "\n".join(lines)


def significance_line(rows: list[dict[str, Any]], baseline: str = "none", alpha: float = 0.01) -> str:
    """One sentence: which arms differ from ``baseline`` at the same depth (Welch p < alpha)."""
    full = table(rows, baseline)
    tab = [t for t in full if t["condition"] != baseline and not math.isnan(t["p"])]
    arms = sorted({t["condition"] for t in full})
    if len(arms) == 1:
        return f"significance: one arm ({arms[0]}), nothing to test."
    if not tab:
        return f"significance: no arm can be tested against {baseline!r}: {_untestable(full, baseline)}."
    def name(t: dict[str, Any]) -> str:
        other = f" (vs d{t['baseline_depth']})" if t["baseline_depth"] != t["depth"] else ""
        return f"{t['condition']} d{t['depth']}{other}"

    better = [name(t) for t in tab if t["p"] < alpha and t["mean"] < t["baseline_mean"]]
    worse = [name(t) for t in tab if t["p"] < alpha and t["mean"] > t["baseline_mean"]]
    if not better and not worse:
        return f"significance: no arm differs from {baseline!r} at p < {alpha} (Welch t-test per depth)."
    parts = []
    if better:
        parts.append(f"below {baseline!r}: {', '.join(better)}")
    if worse:
        parts.append(f"above {baseline!r}: {', '.join(worse)}")
    return f"significance (Welch p < {alpha}, same depth): " + "; ".join(parts) + "."


def summary_grid(rows: list[dict[str, Any]], baseline: str = "none") -> list[str]:
    """The test errors as a text grid for a console: one line per arm (``baseline`` first, then
    the arms in the order they ran), one column per depth, each cell "mean ± half-width of the
    95% interval" over the seeds ("mean (n=1)" for a single seed)."""
    tab = table(rows, baseline)
    if not tab:
        return []
    order = list(dict.fromkeys([baseline] + [str(r["condition"]) for r in rows]))
    arms = [a for a in order if any(t["condition"] == a for t in tab)]
    depths = sorted({t["depth"] for t in tab})
    at = {(t["condition"], t["depth"]): t for t in tab}

    def cell(t: dict[str, Any] | None) -> str:
        if t is None:
            return "–"
        return f"{t['mean']:.2f} (n=1)" if t["n"] < 2 else f"{t['mean']:.2f} ± {t['ci_half']:.2f}"

    seeds = sorted({t["n"] for t in tab})
    n = f"{seeds[0]}-{seeds[-1]} seeds" if len(seeds) > 1 else f"{seeds[0]} seed{'s' if seeds[0] > 1 else ''}"
    grid = [["arm"] + [f"depth {d}" for d in depths]]
    grid += [[a] + [cell(at.get((a, d))) for d in depths] for a in arms]
    widths = [max(len(r[i]) for r in grid) for i in range(len(grid[0]))]
    lines = [f"test error % (mean ± 95% interval over {n}):"]
    for r in grid:
        lines.append("  " + r[0].ljust(widths[0]) + "".join("   " + v.rjust(w) for v, w in zip(r[1:], widths[1:])))
    return lines


def failed_line(rows: list[dict[str, Any]], threshold: float = FAILED_TRAIN_ERROR) -> str | None:
    """One sentence on the runs that did not learn (training error at or above ``threshold`` %
    at the kept epoch: stuck near chance, as a deep net without pretraining can be): per arm
    and depth how many, which seeds, and the others' mean; None when every run learned."""
    parts = []
    for (cond, depth), runs in cells(rows).items():
        stuck = sorted((r for r in runs if not learned(r, threshold)), key=lambda r: int(r["seed"]))
        if not stuck:
            continue
        seeds = ", ".join(str(int(r["seed"])) for r in stuck)
        rest = [float(r["test_error"]) for r in runs if learned(r, threshold)]
        others = f"; the others' mean {np.mean(rest):.2f}%" if rest else ""
        plural = "s" if len(stuck) > 1 else ""
        parts.append(f"{cond} d{depth} {len(stuck)} of {len(runs)} (seed{plural} {seeds}{others})")
    if not parts:
        return None
    return (f"did not learn (training error {threshold:g}% or more at the kept epoch): " + "; ".join(parts)
            + ". The table's means and intervals include them.")


def _untestable(tab: list[dict[str, Any]], baseline: str) -> str:
    """Why no arm of ``tab`` has a t-test against ``baseline``: the first reason that holds."""
    if not any(t["condition"] == baseline for t in tab):
        return ("it was not run (add it to experiment.conditions, or name another arm with "
                "--baseline / experiment.baseline)")
    testable = [t for t in tab if t["condition"] != baseline and t["baseline_depth"] is not None]
    if not testable:
        return "no other arm ran at a depth it ran at"
    return "a t-test needs >= 2 seeds in each cell (run more experiment.seeds)"


def write_report(out: Path, rows: list[dict[str, Any]], baseline: str = "none") -> None:
    """Write ``out/report.md`` and ``out/figures/*.png`` for an experiment's result rows (with the
    published numbers when ``out/experiment.json`` names ``experiment.paper``)."""
    out = Path(out)
    if not rows:
        raise SurgeryError(f"{out}: no result rows to report; give the rows surgery.run_experiment returned (or "
                           "surgery.read_results(out)) once a cell has finished.")
    check_rows(rows, str(out))
    tuning_path = out / "tuning.json"
    tuning = read_tuning(tuning_path) if tuning_path.is_file() else None
    meta = experiment_meta(out)
    exp = (meta.get("recipe") or {}).get("experiment") or {}
    make_dir(out)
    kept = kept_figures(out, rows)
    write_text(out / "report.md", markdown(rows, baseline, tuning, exp.get("paper"), recorded(meta), kept))
    write_figures(out, rows, table(rows, baseline), baseline, learned, kept)
