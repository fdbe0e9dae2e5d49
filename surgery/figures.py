"""The report's figures (figures/*.png): test error vs depth with 95% intervals, the spread over
seeds, learning curves and first-layer filters. Drawn with matplotlib's Agg backend; each file
is written atomically."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open

from .errors import ManifestError, SurgeryWarning
from .io import atomic_path, make_dir, read_jsonl
from .weights_io import first_line


def write_figures(out: Path, rows: list[dict[str, Any]], tab: list[dict[str, Any]], baseline: str,
                  learned: Callable[[dict[str, Any]], bool] = lambda row: True, kept: bool = False) -> None:
    """``out/figures/*.png`` for an experiment's result rows and their ``stats.table``;
    ``learned(row)``: whether a run learned (those that did not are drawn apart when their
    errors would squash the others'); ``kept``: leave the figures drawn from the runs'
    directories as they are (:func:`kept_figures`)."""
    import matplotlib

    matplotlib.use("Agg")
    make_dir(out / "figures")
    conds = sorted({r["condition"] for r in rows}, key=lambda c: (c != baseline, c))
    cmap = plt_colormap(len(conds))
    colors = {c: cmap(i % cmap.N) for i, c in enumerate(conds)}
    stuck = {(r["condition"], int(r["depth"])) for r in rows if not learned(r)}
    _save(_depth_figure(tab, conds, colors, baseline, stuck), out / "figures" / "error_vs_depth.png")
    _save(_hist_figure(rows, conds, learned), out / "figures" / "error_hist.png")
    if not kept:  # else none of the runs is here to draw them anew from
        _save(_curves_figure(rows, conds, colors), out / "figures" / "learning_curves.png")
        _save(_filters_figure(rows, conds), out / "figures" / "filters.png")


_FROM_RUNS = ("learning_curves.png", "filters.png")  # the figures drawn from the runs' own directories


def kept_figures(out: Path, rows: list[dict[str, Any]]) -> bool:
    """Whether the figures drawn from the runs' directories are kept as an earlier build drew
    them: none of those directories (results.csv's ``path``) is here, as for a published
    report, and the figures are; drawn anew from nothing they would be empty."""
    return (not any(r.get("path") and Path(r["path"]).is_dir() for r in rows)
            and all((out / "figures" / name).is_file() for name in _FROM_RUNS))


def plt_colormap(n: int) -> Any:
    """A qualitative colormap with enough colours for ``n`` arms."""
    import matplotlib.pyplot as plt

    return plt.cm.tab10 if n <= 10 else plt.cm.tab20


def _depth_figure(tab: list[dict[str, Any]], conds: list[str], colors: dict[str, Any], baseline: str,
                  stuck: Collection[tuple[str, int]]) -> Any:
    """Test error vs depth with CI bars (one depth: arms side by side, sorted); the means of
    cells where runs did not learn, far above the rest, are marked at the edge with their value."""
    import matplotlib.pyplot as plt

    depths_all = sorted({t["depth"] for t in tab})
    if len(depths_all) == 1 or all(len({t["depth"] for t in tab if t["condition"] == c}) == 1 for c in conds):
        ts = sorted(tab, key=lambda t: t["mean"])
        fig, ax = plt.subplots(figsize=(7, 1.2 + 0.32 * len(ts)))
        ys = range(len(ts))
        ax.errorbar([t["mean"] for t in ts], ys, xerr=_bars(ts), fmt="o", capsize=3, color="tab:blue",
                    ecolor="tab:gray")
        for t in ts:
            if t["condition"] == baseline:
                ax.axvline(t["mean"], color="tab:red", lw=0.8, ls="--")
        ax.set_yticks(list(ys), [f"{t['condition']} (depth {t['depth']})" for t in ts])
        ax.invert_yaxis()
        ax.set_xlabel("test error (%)")
        ax.set_title(f"Test error per arm (mean, 95% CI over seeds; dashed: {baseline})")
        ax.grid(alpha=0.3, axis="x")
        _off_scale(ax, [(t["mean"], y, "tab:blue") for t, y in zip(ts, ys)], _scale(ts, stuck), "x")
        return fig
    fig, ax = plt.subplots(figsize=(8 if len(conds) <= 8 else 9, 4.5))
    points = []  # (mean, depth as drawn, colour) of every cell
    for i, c in enumerate(conds):
        ts = [t for t in tab if t["condition"] == c]
        dodge = 0.06 * (i - (len(conds) - 1) / 2)  # keep the CI bars apart
        ax.errorbar([t["depth"] + dodge for t in ts], [t["mean"] for t in ts], yerr=_bars(ts), marker="o", capsize=4,
                    label=c, color=colors[c])
        points += [(t["mean"], t["depth"] + dodge, colors[c]) for t in ts]
    ax.set_title("Test error vs depth (mean, 95% CI over seeds)")
    _off_scale(ax, points, _scale(tab, stuck), "y")
    ax.set_xlabel("hidden layers")
    ax.set_ylabel("test error (%)")
    ax.set_xticks(depths_all)
    ax.grid(alpha=0.3)
    ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5))  # beside the axes: never over a point
    return fig


def _scale(tab: list[dict[str, Any]], stuck: Collection[tuple[str, int]]) -> tuple[float, float] | None:
    """The error axis's range when cells where runs did not learn lie far above the others
    (the range of those others, intervals included, with room above); None to leave it be."""
    learned = [t for t in tab if (t["condition"], t["depth"]) not in stuck]
    if not learned or len(learned) == len(tab):
        return None
    below, above = _bars(learned)
    low = min(t["mean"] - b for t, b in zip(learned, below))
    high = max(t["mean"] + a for t, a in zip(learned, above))
    span = max(high - low, 0.1 * high, 1e-3)
    top = high + 0.3 * span
    if max(t["mean"] for t in tab) <= top:
        return None  # every mean fits
    return max(0.0, low - 0.1 * span), top


def _off_scale(ax: Any, points: list[tuple[float, float, Any]], scale: tuple[float, float] | None,
               axis: str) -> None:
    """Cut the error ``axis`` to ``scale`` and mark each point beyond it at the edge: a
    triangle pointing out and its value (values side by side stacked, never over each other);
    the title says what the triangles are."""
    if scale is None:
        return
    (ax.set_ylim if axis == "y" else ax.set_xlim)(*scale)
    beyond = sorted(((at, value, color) for value, at, color in points if value > scale[1]), key=lambda p: p[0])
    for k, (at, value, color) in enumerate(beyond):
        xy, marker, offset = ((at, scale[1]), "^", (0, -12 - 11 * k)) if axis == "y" else \
            ((scale[1], at), ">", (-8, 0))
        ax.plot(*xy, marker=marker, color=color, ms=9, clip_on=False, zorder=5)
        ax.annotate(f"{value:.1f}%", xy, xytext=offset, textcoords="offset points", fontsize=8, color=color,
                    ha="center" if axis == "y" else "right", va="top" if axis == "y" else "center")
    ax.set_title(f"{ax.get_title()}\n(triangles: means off the scale, of cells where runs did not learn)",
                 fontsize="medium")


def _bars(ts: list[dict[str, Any]]) -> list[list[float]]:
    """Error bars (below, above each mean) for the 95% intervals, cut at 0 and 100%: a cell whose
    seeds split between learning and chance has an interval wider than an error can be."""
    half = [0.0 if math.isnan(t["ci_half"]) else t["ci_half"] for t in ts]
    return [[min(h, t["mean"]) for h, t in zip(half, ts)], [min(h, 100 - t["mean"]) for h, t in zip(half, ts)]]


def _hist_figure(rows: list[dict[str, Any]], conds: list[str], learned: Callable[[dict[str, Any]], bool]) -> Any:
    """Histogram of test errors over seeds, one panel per arm (as Erhan et al. 2010); where
    some runs learned and some did not, the bins span those that learned and a panel's label
    says how many of its runs did not (and their mean), so chance does not squash the spread;
    a learned run far above the rest (beyond the upper quartile by three interquartile ranges)
    is left off the axis the same way and counted in the label with its error. The sd is the
    spread within a depth (pooled over depths), the one the seeds' spread is about."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    apart = [r for r in rows if not learned(r)] if any(learned(r) for r in rows) else []
    kept = [r for r in rows if r not in apart]
    top = _fence([float(r["test_error"]) for r in kept])
    drawn = [r for r in kept if float(r["test_error"]) <= top]
    allv = [float(r["test_error"]) for r in drawn]
    bins = np.linspace(min(allv), max(allv) + 1e-6, 26) if allv else 10
    depths = sorted({int(r["depth"]) for r in rows})
    fig, axes = plt.subplots(len(conds), 1, figsize=(7, 1.6 + 1.3 * len(conds)), sharex=True, squeeze=False)
    for ax, c in zip(axes[:, 0], conds):
        per_depth = [[float(r["test_error"]) for r in drawn if r["condition"] == c and int(r["depth"]) == d]
                     for d in depths]
        shades = [plt.cm.viridis(i / max(len(depths) - 1, 1)) for i in range(len(depths))]
        ax.hist(per_depth, bins=bins, stacked=True, color=shades, label=[f"depth {d}" for d in depths])
        mine = [r for r in kept if r["condition"] == c]
        far = sorted(float(r["test_error"]) for r in mine if float(r["test_error"]) > top)
        stuck = [float(r["test_error"]) for r in apart if r["condition"] == c]
        more = f"\n+{len(far)} off the axis\n({', '.join(f'{x:.2f}%' for x in far[:3])})" if far else ""
        more += f"\n+{len(stuck)} not learned\n(mean {np.mean(stuck):.1f}%)" if stuck else ""
        ax.set_ylabel(f"{c}\nn={len(mine)}, sd={_sd_within(mine):.2f}{more}", rotation=0, ha="right", va="center")
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    axes[0, 0].legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize="small")  # beside: never over a bar
    axes[-1, 0].set_xlabel("test error (%)")
    fig.suptitle("Spread of test error over seeds (stacked by depth; sd: within a depth)")
    return fig


def _fence(values: list[float]) -> float:
    """The upper quartile plus three interquartile ranges (at least 0.1 points): errors above it
    are far out, drawn off the axis so one run does not squash the others into a few bins."""
    if len(values) < 4:
        return math.inf
    q1, q3 = np.percentile(values, [25, 75])
    return float(q3 + 3 * max(q3 - q1, 0.1 / 3))


def _sd_within(rows: list[dict[str, Any]]) -> float:
    """The standard deviation of test error within a depth, pooled over the depths (their
    variances weighted by degrees of freedom); 0 with no depth of two runs."""
    by_depth: dict[int, list[float]] = {}
    for r in rows:
        by_depth.setdefault(int(r["depth"]), []).append(float(r["test_error"]))
    dof = sum(len(v) - 1 for v in by_depth.values() if len(v) > 1)
    if not dof:
        return 0.0
    return math.sqrt(sum(np.var(v, ddof=1) * (len(v) - 1) for v in by_depth.values() if len(v) > 1) / dof)


def _curves_figure(rows: list[dict[str, Any]], conds: list[str], colors: dict[str, Any]) -> Any:
    """Validation error per epoch at each arm's largest depth (of the runs whose directories
    are here, for a merge of a published report and new runs; the legend says which depth and
    how many seeds): every seed faint (early stopping ends them at different epochs) and the
    mean over seeds while all of them run; the training error instead when the runs had no
    validation split (``data.valid_size: 0``). A log scale when the errors span more than 20x
    (a run stuck near chance beside ones at 2%)."""
    import matplotlib.pyplot as plt

    histories: dict[str, list[list[dict[str, Any]]]] = {}
    for c in conds:
        crow = [r for r in rows if r["condition"] == c]
        here = [r for r in crow if r.get("path") and (Path(r["path"]) / "metrics.jsonl").is_file()]
        dmax = max(int(r["depth"]) for r in here or crow)  # the largest depth whose runs are here
        paths = [Path(r["path"]) / "metrics.jsonl" for r in here if int(r["depth"]) == dmax]
        hs = [h for p in paths if (h := _history(p))]
        histories[f"{c} (depth {dmax}, {len(hs)} seed{'s' * (len(hs) != 1)})"] = hs
    validated = all(h["valid_error"] is not None for hs in histories.values() for hist in hs for h in hist)
    key = "valid_error" if validated else "train_error"
    fig, ax = plt.subplots(figsize=(7, 4.5))
    values = []
    for (label, hs), c in zip(histories.items(), conds):
        curves = [[h[key] for h in hist] for hist in hs if hist]
        for cv in curves if len(curves) > 1 else []:
            ax.plot(range(1, len(cv) + 1), cv, color=colors[c], alpha=0.25, linewidth=0.8)
        if curves:
            n = min(len(cv) for cv in curves)
            mean = np.mean([cv[:n] for cv in curves], axis=0)
            ax.plot(range(1, n + 1), mean, marker=".", label=label, color=colors[c])
            values += [v for cv in curves for v in cv]
    positive = [v for v in values if v > 0]
    if positive and max(positive) > 20 * min(positive):
        ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation error (%)" if validated else "training error (%): no validation split")
    ax.set_title("Learning curves (mean over seeds; each seed faint)")
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend()
    return fig


def _history(path: Path) -> list[dict[str, Any]]:
    """A run's epochs from its ``metrics.jsonl``; a damaged file is left out of the curves,
    with a warning (the report's numbers come from the results, not from it)."""
    try:
        hist = read_jsonl(path)
        if missing := [i for i, h in enumerate(hist, 1) if not {"train_error", "valid_error"} <= h.keys()]:
            raise ManifestError(f"{path}, line {missing[0]}: an epoch without train_error and valid_error; the file "
                                "is damaged.")
        return hist
    except ManifestError as e:
        warnings.warn(f"learning curves: {e} Its run's curve is left out.", SurgeryWarning, stacklevel=2)
        return []


def _filters_figure(rows: list[dict[str, Any]], conds: list[str]) -> Any:
    """First-layer filters of each arm (the lowest seed, largest depth)."""
    import matplotlib.pyplot as plt

    panels = []
    for c in conds:
        crow = sorted((r for r in rows if r["condition"] == c), key=lambda r: (int(r["seed"]), -int(r["depth"])))
        for r in (r for r in crow if r.get("path")):  # rows made by hand may not say where their cell is
            w = _first_weight(Path(r["path"]) / "model.safetensors")
            if w is not None:
                panels.append((c, w))
                break
    n = max(len(panels), 1)
    cols = min(n, 6)
    grid_rows = math.ceil(n / cols)
    fig, axes = plt.subplots(grid_rows, cols, figsize=(3.2 * cols, 3.4 * grid_rows + 0.4), squeeze=False)
    axes = axes.ravel()
    n = len(panels)
    for ax, (c, w) in zip(axes, panels):
        ax.imshow(filter_grid(w), cmap="gray", interpolation="nearest")
        ax.set_title(c)
        ax.axis("off")
    for ax in axes[n:]:
        ax.axis("off")
    fig.suptitle("First-layer filters (first 64 units, each scaled to its own range)")
    return fig


def _first_weight(path: Path) -> torch.Tensor | None:
    """The first layer's weight in a run's model file; None when there is none (a damaged
    file is warned of: the report's numbers come from the results, not from it)."""
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = [k for k in f.keys() if k.endswith(".weight")]
            return f.get_tensor("h1.weight") if "h1.weight" in keys else f.get_tensor(keys[0]) if keys else None
    except Exception as e:  # safetensors raises its own error types for a damaged header
        warnings.warn(f"filters: {path}: not a readable safetensors file ({first_line(e)}); the file is damaged. "
                      "Another run of its arm stands in for it.", SurgeryWarning, stacklevel=2)
        return None


def filter_grid(w: torch.Tensor, n: int = 64) -> np.ndarray:
    """Tile the first ``n`` units' incoming weights as square images."""
    w = w.reshape(w.shape[0], -1)[:n].float()
    side = int(math.isqrt(w.shape[1]))
    if side * side != w.shape[1]:
        return w.numpy()
    cols = int(math.ceil(math.sqrt(w.shape[0])))
    rows = int(math.ceil(w.shape[0] / cols))
    grid = np.ones((rows * (side + 1) + 1, cols * (side + 1) + 1)) * 0.5
    for i, unit in enumerate(w):
        lo, hi = unit.min(), unit.max()
        img = ((unit - lo) / (hi - lo + 1e-12)).reshape(side, side).numpy()
        r, c = divmod(i, cols)
        grid[1 + r * (side + 1): 1 + r * (side + 1) + side, 1 + c * (side + 1): 1 + c * (side + 1) + side] = img
    return grid


def _save(fig: Any, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
