import csv
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from surgery.cli import main
from surgery.errors import SurgeryError, SurgeryWarning
from surgery.grid import plan_cells
from surgery.recipe import load_recipe, recipe_from_dict
from surgery.results import read_results
from surgery.stats import summarize, table, welch

ROOT = Path(__file__).resolve().parents[1]
CONV = {"maps": 4, "kernel_size": 3, "stride": 1}

TINY = {
    "name": "tiny",
    "data": {"dataset": "synthetic", "n_train": 400, "n_valid": 200, "n_test": 200},
    "experiment": {"conditions": ["none", "rbm", "dae", "grow", "grow-frozen", "shallow"], "depths": [1, 2],
                   "seeds": [0, 1], "hidden": 16, "pretrain_epochs": 1},
    "finetune": {"epochs": 2, "batch_size": 50, "device": "cpu", "progress": False,
                 "optimizer": {"name": "sgd", "lr": 0.2, "momentum": 0.9}},
}


def _rows(out):
    with (out / "results.csv").open() as f:
        return list(csv.DictReader(f))


def _same_grid(a, b, weights=True):
    """The experiment directories ``a`` and ``b`` hold the same results (and cell weights)."""
    from safetensors.torch import load_file

    key = ("condition", "depth", "seed", "test_error", "valid_error", "best_epoch")
    assert sorted(tuple(x[k] for k in key) for x in _rows(a)) == sorted(tuple(x[k] for k in key) for x in _rows(b))
    for cell in (a / "cells").iterdir() if weights else []:
        wa = load_file(str(cell / "model.safetensors"))
        wb = load_file(str(b / "cells" / cell.name / "model.safetensors"))
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), cell.name


def test_experiment_grid_report_and_skip(tmp_path, capsys):
    rp = tmp_path / "tiny.yaml"
    rp.write_text(yaml.safe_dump(TINY))
    out = tmp_path / "out"
    assert main(["run", str(rp), "--out", str(out)]) == 0
    rows = _rows(out)
    # 5 arms x 2 depths x 2 seeds + shallow (depth 1 only) x 2 seeds
    assert len(rows) == 22
    said = capsys.readouterr().out.splitlines()  # the answer on the console: arm x depth, baseline first
    at = said.index("test error % (mean ± 95% interval over 2 seeds):")
    assert [line.split()[0] for line in said[at + 1:at + 8]] == ["arm", *TINY["experiment"]["conditions"]]
    shallow = summarize([float(r["test_error"]) for r in rows if r["condition"] == "shallow"])
    assert said[at + 7].split() == ["shallow", f"{shallow['mean']:.2f}", "±", f"{shallow['ci_half']:.2f}", "–"]
    assert said[at + 8].startswith("significance")
    assert {"condition", "depth", "seed", "test_error"} <= set(rows[0])
    assert all(0 <= float(r["test_error"]) <= 100 for r in rows)
    report = (out / "report.md").read_text()
    assert "| rbm | 2 | 2 |" in report and "95% CI" in report
    for png in ("error_vs_depth", "error_hist", "learning_curves", "filters"):
        p = out / "figures" / f"{png}.png"
        assert p.is_file() and p.read_bytes()[:4] == b"\x89PNG"
    # same arm, same seed: same data order; the rbm stack is trained once per seed
    assert len(list((out / "stacks").iterdir())) == 2 * 4  # rbm, dae, grow, grow-frozen x 2 seeds
    # re-running skips every finished cell
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("cells/*/result.json")}
    assert main(["run", str(rp), "--out", str(out)]) == 0
    assert {p: p.stat().st_mtime_ns for p in out.glob("cells/*/result.json")} == stamps
    # an interrupted run (cells missing their result) completes on re-run, redoing only those
    gone = sorted(stamps)[:3]
    for p in gone:
        p.unlink()
    assert main(["run", str(rp), "--out", str(out)]) == 0
    after = {p: p.stat().st_mtime_ns for p in out.glob("cells/*/result.json")}
    assert len(after) == 22
    changed = [p for p in after if after[p] != stamps.get(p)]
    assert changed == gone or set(changed) == set(gone)
    # compare rebuilds and merges
    assert main(["compare", str(out), "--out", str(tmp_path / "merged")]) == 0
    assert len(_rows(tmp_path / "merged")) == 22


def test_a_repeated_seed_or_depth_is_one_cell_not_two():
    """``seeds: [0, 0]`` would train one run twice and count it twice in n, the mean and the
    interval; repeats are dropped (first place kept), as for depths, with a warning that
    names them (a typo for another seed, likely)."""
    r = json.loads(json.dumps(TINY))
    r["experiment"] = {**r["experiment"], "seeds": [1, 0, 1], "depths": [2, 1, 2]}
    with pytest.warns(SurgeryWarning) as said:
        recipe = recipe_from_dict(r)
    assert sorted(str(w.message) for w in said) == [
        "experiment.depths: 2 given more than once ([2, 1, 2]); each depth runs once.",
        "experiment.seeds: 1 given more than once ([1, 0, 1]); each seed runs once and counts once in the statistics."]
    assert recipe.experiment.seeds == [1, 0] and recipe.experiment.depths == [1, 2]
    cells = plan_cells(recipe, (64,), 4)
    assert len({(c.condition, c.depth, c.seed) for c in cells}) == len(cells)


def test_one_cell_is_said_in_the_singular(tmp_path, capsys):
    r = json.loads(json.dumps(TINY))
    r["experiment"] = {**r["experiment"], "conditions": ["none"], "depths": [1], "seeds": [0]}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(r))
    assert main(["run", str(tmp_path / "r.yaml"), "--out", str(tmp_path / "o")]) == 0
    text = capsys.readouterr()
    assert "experiment: 1 cell; files in" in text.err + text.out and "1 cell; results in" in text.out


def test_cells_share_data_order_and_budget():
    from surgery.recipe import recipe_from_dict

    r = recipe_from_dict(TINY)
    cells = plan_cells(r, (64,), 4)
    by_seed = {}
    for c in cells:
        by_seed.setdefault(c.seed, []).append(c)
    for seed, cs in by_seed.items():
        budgets = {json.dumps(c.recipe["finetune"], sort_keys=True) for c in cs}
        assert budgets == {json.dumps(cs[0].recipe["finetune"], sort_keys=True)}
        assert {c.recipe["seed"] for c in cs} == {seed}
    none = [c for c in cells if c.condition == "none"][0]
    assert all(op.get("init", "classic") == "classic" for op in none.recipe["surgery"]["ops"] if op["op"] == "insert")
    assert len({c.key for c in cells}) == len(cells)
    # an arm overriding the budget with values the section already holds is the same cell
    spelled = {**TINY, "experiment": {**TINY["experiment"], "conditions": {
        "none": {"method": "none"},
        "same": {"method": "none", "finetune": {"optimizer": {"name": "sgd", "lr": r.finetune.optimizer.lr}}}}}}
    same = {c.condition: c for c in plan_cells(recipe_from_dict(spelled), (64,), 4) if c.seed == cells[0].seed
            and c.depth == cells[0].depth}
    assert same["same"].recipe["finetune"] == same["none"].recipe["finetune"]


def test_a_layer_pattern_of_a_grid_applies_to_the_depths_that_have_the_layer(tmp_path, capsys):
    """finetune.dropout: {h2: ...} and layer_lr: {h2: 0} in a grid of depths 1 and 2 concern
    the depth-2 cells (their h2 never moves from its start); each depth-1 cell is the cell of
    the grid without them (same recipe, key and result). A pattern no cell's layers match is
    one paragraph naming it, before anything trains."""
    from surgery.model_file import load_model
    from surgery.stack import LayerStack

    r = {**TINY, "experiment": {**TINY["experiment"], "conditions": ["none", "rbm"], "seeds": [0]}}
    with_h2 = json.loads(json.dumps(r))
    with_h2["finetune"].update(dropout={"h2": 0.2}, layer_lr={"h2": 0.0, "out": 2.0})
    plain = {(c.condition, c.depth): c for c in plan_cells(recipe_from_dict(r), (64,), 4)}
    cells = {(c.condition, c.depth): c for c in plan_cells(recipe_from_dict(with_h2), (64,), 4)}
    for arm in ("none", "rbm"):
        assert cells[arm, 1].key != plain[arm, 1].key  # out: 2.0 is every cell's
        assert cells[arm, 1].recipe["finetune"]["dropout"] == {}
        assert cells[arm, 1].recipe["finetune"]["layer_lr"] == {"out": 2.0}
        assert cells[arm, 2].recipe["finetune"]["dropout"] == {"h2": 0.2}
    with_h2["finetune"]["layer_lr"] = {"h2": 0.0}
    cells = {(c.condition, c.depth): c for c in plan_cells(recipe_from_dict(with_h2), (64,), 4)}
    assert all(cells[arm, 1].key == plain[arm, 1].key for arm in ("none", "rbm"))
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(with_h2))
    assert main(["run", str(tmp_path / "r.yaml"), "--out", str(tmp_path / "o")]) == 0, capsys.readouterr().err
    rbm2 = cells["rbm", 2]
    stack = LayerStack.load(tmp_path / "o" / "stacks" / rbm2.pretrain_key / "depth2.safetensors")
    tuned = load_model(tmp_path / "o" / "cells" / rbm2.key / "model.safetensors")
    assert torch.equal(tuned.node("h2").tensors["weight"], stack["h2"].tensors["weight"])  # lr x 0
    assert not torch.equal(tuned.node("h1").tensors["weight"], stack["h1"].tensors["weight"])
    with_h2["finetune"]["layer_lr"] = {"h7": 0.5}
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(with_h2))
    assert main(["run", str(tmp_path / "bad.yaml"), "--out", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err
    assert "finetune.layer_lr: 'h7' matches no layer of any cell of the grid" in err and "h1 ... h2" in err
    assert not (tmp_path / "bad").exists()


def test_per_layer_widths():
    """``hidden: [a, b, c]`` gives layer i width i in pretrained and fresh arms alike (Hinton 2006's
    500-500-2000); a list shorter than the largest depth is refused, naming the arm."""
    from surgery.errors import SurgeryError
    from surgery.recipe import recipe_from_dict

    r = {**TINY, "experiment": {**TINY["experiment"], "conditions": ["none", "rbm", "shallow"], "depths": [1, 3],
                                "hidden": [8, 6, 12]}}
    cells = {(c.condition, c.depth): c for c in plan_cells(recipe_from_dict(r), (64,), 4)}
    assert [lay["hidden"] for lay in cells["rbm", 3].recipe["pretrain"]["layers"]] == [8, 6, 12]
    assert [op["units"] for op in cells["none", 3].recipe["surgery"]["ops"] if op["op"] == "insert"] == [8, 6, 12]
    assert [op["units"] for op in cells["none", 1].recipe["surgery"]["ops"] if op["op"] == "insert"] == [8]
    assert [op["units"] for op in cells["shallow", 1].recipe["surgery"]["ops"] if op["op"] == "insert"] == [8]
    r["experiment"]["hidden"] = [8, 6]
    with pytest.raises(SurgeryError, match="conditions.none: hidden lists 2 widths"):
        plan_cells(recipe_from_dict(r), (64,), 4)


def test_stats():
    s = summarize([1.0, 2.0, 3.0])
    assert s["mean"] == 2.0 and s["std"] == 1.0
    assert s["ci_half"] == pytest.approx(4.302652729 / 3 ** 0.5, rel=1e-6)
    t, p = welch([1.0, 1.1, 0.9, 1.05], [2.0, 2.2, 1.9, 2.1])
    assert t < 0 and p < 0.001
    # no spread on either side (every seed the same error): t's sign still says which is lower
    assert welch([1.0, 1.0], [2.0, 2.0]) == (-math.inf, 0.0) and welch([2.0, 2.0], [1.0, 1.0]) == (math.inf, 0.0)
    assert all(math.isnan(v) for v in welch([1.0, 1.0], [1.0, 1.0]))


def test_the_console_summary_is_an_arm_by_depth_grid():
    """Baseline first, then the arms in the order they ran; a cell is mean ± the 95% interval's
    half-width, a single seed is marked n=1 and a cell that did not run is a dash."""
    from surgery.report import summary_grid

    rows = [{"condition": c, "depth": d, "seed": s, "test_error": e}
            for c, d, s, e in [("rbm", 1, 0, 2.0), ("rbm", 1, 1, 3.0), ("none", 1, 0, 4.0), ("none", 1, 1, 5.0),
                               ("none", 2, 0, 6.0), ("none", 2, 1, 6.5), ("rbm", 2, 0, 1.5)]]
    half = summarize([2.0, 3.0])["ci_half"]
    assert summary_grid(rows, "none") == [
        "test error % (mean ± 95% interval over 1-2 seeds):",
        "  arm        depth 1       depth 2",
        f"  none   4.50 ± {half:.2f}   6.25 ± {summarize([6.0, 6.5])['ci_half']:.2f}",
        f"  rbm    2.50 ± {half:.2f}    1.50 (n=1)",
    ]
    assert summary_grid(rows[:1], "none")[0] == "test error % (mean ± 95% interval over 1 seed):"
    assert summary_grid([], "none") == []
    assert summary_grid(rows[:4], "rbm")[2:] == [f"  rbm    2.50 ± {half:.2f}", f"  none   4.50 ± {half:.2f}"]
    assert summary_grid(rows + [{"condition": "dae", "depth": 2, "seed": 0, "test_error": 1.0}], "none")[-1] \
        == "  dae              –    1.00 (n=1)"


def test_an_arm_at_a_depth_the_baseline_did_not_run_is_tested_against_its_only_depth():
    """A shallow arm (1 layer) beside a deep grid (3 layers) is compared with the baseline at
    3 layers, and the significance line says so; with two baseline depths there is no such pick."""
    from surgery.report import significance_line

    def rows(spec):
        return [{"condition": c, "depth": d, "seed": i, "test_error": e}
                for c, d, errs in spec for i, e in enumerate(errs)]

    grid = rows([("none", 3, [2.3, 2.35, 2.4, 2.32]), ("shallow", 1, [2.7, 2.65, 2.6, 2.68]),
                 ("rbm", 3, [1.9, 1.85, 1.95, 1.88])])
    by = {t["condition"]: t for t in table(grid, "none")}
    assert by["shallow"]["baseline_depth"] == 3 and by["shallow"]["p"] < 0.01 and by["shallow"]["t"] > 0
    assert by["rbm"]["baseline_depth"] == 3
    assert significance_line(grid, "none") == ("significance (Welch p < 0.01, same depth): below 'none': rbm d3; "
                                               "above 'none': shallow d1 (vs d3).")
    two = grid + rows([("none", 2, [2.5, 2.4, 2.45, 2.5])])
    shallow = next(t for t in table(two, "none") if t["condition"] == "shallow")
    assert shallow["baseline_depth"] is None and math.isnan(shallow["p"])


def test_runs_that_did_not_learn_are_named_in_the_report():
    """A deep net stuck near chance (training error >= 50% at the kept epoch) is named with its
    seeds and the mean of the runs that learned; runs without a training error count as learned."""
    from surgery.report import failed_line, markdown

    def run(cond, seed, train, test):
        return {"condition": cond, "depth": 3, "seed": seed, "train_error": train, "test_error": test}

    rows = [run("none", 2, 89.1, 89.7), run("none", 0, 89.2, 88.6), run("none", 1, 3.6, 5.0),
            run("none", 3, 1.3, 3.1), run("rbm", 0, 0.1, 1.5), run("rbm", 1, "", 1.4)]
    line = failed_line(rows)
    assert line == ("did not learn (training error 50% or more at the kept epoch): none d3 2 of 4 (seeds 0, 2; "
                    "the others' mean 4.05%). The table's means and intervals include them.")
    assert line in markdown(rows)
    assert failed_line([r for r in rows if r["condition"] == "rbm"]) is None
    assert "did not learn" not in markdown([r for r in rows if r["condition"] == "rbm"])


def test_error_bars_stay_between_0_and_100_percent():
    """A cell split between chance and learning has a t interval wider than an error can be;
    the figure's bars stop at 0 and 100, while a narrow interval is drawn whole."""
    from surgery.figures import _bars

    def run(cond, seed, test):
        return {"condition": cond, "depth": 3, "seed": seed, "test_error": test}

    rows = [run("none", s, e) for s, e in enumerate([88.6, 89.7, 3.1, 5.0, 88.7])]
    rows += [run("rbm", s, e) for s, e in enumerate([1.4, 1.5, 1.6])]
    tab = table(rows)
    none, rbm = (next(t for t in tab if t["condition"] == c) for c in ("none", "rbm"))
    assert none["ci_low"] < 0 and none["ci_high"] > 100
    (below_none, below_rbm), (above_none, above_rbm) = _bars([none, rbm])
    assert none["mean"] - below_none == pytest.approx(0) and none["mean"] + above_none == pytest.approx(100)
    assert below_rbm == above_rbm == pytest.approx(rbm["ci_half"])


def test_cells_that_did_not_learn_are_drawn_off_the_scale():
    """Nets stuck at chance (90%) beside nets at 1-2% would flatten the depth curves to a line
    at the bottom: the error axis keeps to the cells that learned, and each mean beyond it is
    marked at the edge with its value; with nothing far above, the axis is left as it is. The
    histogram of errors over seeds bins the runs that learned and counts the others apart."""
    import matplotlib

    matplotlib.use("Agg")
    from surgery.figures import _depth_figure, _hist_figure

    def run(cond, depth, seed, test):
        return {"condition": cond, "depth": depth, "seed": seed, "test_error": test}

    rows = [run("none", d, s, e + d / 10) for d in (1, 2) for s, e in enumerate([1.6, 1.8, 1.7])]
    rows += [run("none", 3, s, 89.7) for s in range(3)]
    rows += [run("dae", d, s, e) for d in (1, 2, 3) for s, e in enumerate([1.4, 1.5, 1.45])]
    colors = {"none": "tab:blue", "dae": "tab:orange"}
    fig = _depth_figure(table(rows), ["none", "dae"], colors, "none", {("none", 3)})
    ax = fig.axes[0]
    low, high = ax.get_ylim()
    assert 1.0 < high < 3 and low < 1.4
    assert [t.get_text() for t in ax.texts] == ["89.7%"] and "off the scale" in ax.get_title()
    learned = [r for r in rows if r["depth"] < 3 or r["condition"] == "dae"]
    fig = _depth_figure(table(learned), ["none", "dae"], colors, "none", set())
    assert not fig.axes[0].texts
    one = [r for r in rows if r["depth"] == 3]  # one depth: arms side by side, the error along x
    fig = _depth_figure(table(one), ["none", "dae"], colors, "none", {("none", 3)})
    assert fig.axes[0].get_xlim()[1] < 3 and len(fig.axes[0].texts) == 1
    # the spread over seeds: bins over the runs that learned, the others counted in the label
    fig = _hist_figure(rows, ["none", "dae"], lambda r: r["test_error"] < 50)
    none, dae = fig.axes
    assert none.get_xlim()[1] < 3 and none.get_ylabel() == "none\nn=6, sd=0.10\n+3 not learned\n(mean 89.7%)"
    assert dae.get_ylabel() == "dae\nn=9, sd=0.05"  # within a depth: not 0.04 over all nine
    # one learned run far above the rest goes off the axis too, named in the label (its error
    # still counts in the sd)
    far = [run("dae", d, s, e + d / 10) for d in (1, 2, 3) for s, e in enumerate([1.4, 1.5, 1.45])]
    far.append(run("dae", 3, 9, 4.06))
    fig = _hist_figure(far, ["dae"], lambda r: True)
    ax = fig.axes[0]
    assert ax.get_xlim()[1] < 3.5 and ax.get_ylabel() == "dae\nn=10, sd=0.76\n+1 off the axis\n(4.06%)"
    assert sum(p.get_height() for p in ax.patches) == 9


def test_cell_keys_stay_what_earlier_versions_made():
    """A cell's directory is a hash of its recipe, so a run resumed by a newer surgery finds
    its finished cells only if a recipe that does not use a new option dumps as before (new
    options default to None, which recipe dumps leave out). These keys were made by the
    version before `optimizer.line_searches` existed; when a key changes on purpose, say so
    in the commit message and the README: every unfinished experiment directory trains again."""
    r = recipe_from_dict({"name": "k", "data": {"dataset": "synthetic"},
                          "experiment": {"conditions": ["none", "rbm"], "depths": [1], "seeds": [0], "hidden": 8},
                          "finetune": {"epochs": 1}}, Path("."), "probe")
    keys = [(c.condition, c.key, c.pretrain_key) for c in plan_cells(r, (64,), 4)]
    assert keys == [("none", "034a0b3cb0f9", None), ("rbm", "c5893238b20d", "84584130ec26")]

def test_the_significance_line_says_why_no_arm_can_be_tested():
    from surgery.report import significance_line

    def rows(spec):
        return [{"condition": c, "depth": d, "seed": i, "test_error": e}
                for c, d, errs in spec for i, e in enumerate(errs)]

    def why(spec, baseline="none"):
        return significance_line(rows(spec), baseline).split(": ", 1)[1]

    assert "was not run" in why([("rbm", 3, [1.9, 2.0]), ("dae", 3, [1.9, 2.0])])
    for arm in ("rbm-cg", "none"):
        line = significance_line(rows([(arm, 3, [1.9, 2.0])]), "none")
        assert line == f"significance: one arm ({arm}), nothing to test."
    assert "ran at a depth" in why([("none", 2, [2.3, 2.4]), ("none", 3, [2.3, 2.4]), ("rbm", 1, [1.9, 2.0])])
    assert ">= 2 seeds" in why([("none", 3, [2.3]), ("rbm", 3, [1.9])])
    assert "differs" in significance_line(rows([("none", 3, [2.3, 2.4]), ("rbm", 3, [2.3, 2.41])]), "none")

def _search_recipe(tmp_path):
    r = {
        "name": "s",
        "data": {"dataset": "synthetic", "n_train": 300, "n_valid": 100, "n_test": 100},
        "surgery": {"ops": [{"op": "insert", "name": "h1", "units": 8, "in_features": 64},
                            {"op": "head", "classes": 4}]},
        "finetune": {"epochs": 1, "device": "cpu", "progress": False},
        "search": {"params": {"finetune.optimizer.lr": {"type": "float", "low": 0.01, "high": 1.0, "log": True},
                              "finetune.batch_size": {"type": "categorical", "choices": [25, 50]}},
                   "trials": 3},
    }
    p = tmp_path / "search.yaml"
    p.write_text(yaml.safe_dump(r))
    return p


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="lists open files through /proc")
def test_a_finished_search_leaves_its_database_closed(tmp_path):
    """The study's connection pool is closed when the search returns: an open search.db
    outlives it in a notebook (and Windows cannot then move or delete the directory)."""
    import surgery as S
    from surgery.search import run_search

    out = tmp_path / "sout"
    run_search(S.load_recipe(_search_recipe(tmp_path)), out, trials=1, progress=False)

    def open_files():
        return {os.path.realpath(f"/proc/self/fd/{fd}") for fd in os.listdir("/proc/self/fd")}

    assert str((out / "search.db").resolve()) not in open_files()


def test_search_end_to_end(tmp_path, capsys):
    p = _search_recipe(tmp_path)
    out = tmp_path / "sout"
    r = yaml.safe_load(p.read_text())
    r["finetune"].pop("progress")  # the log's line per trial, as in a job's log file
    p.write_text(yaml.safe_dump(r))
    capsys.readouterr()
    assert main(["search", str(p), "--out", str(out)]) == 0
    s = json.loads((out / "search.json").read_text())
    assert len(s["trials"]) == 3 and s["storage"].startswith("sqlite:///")
    # one trial, one number, counted from 1: the log, the last line, best.yaml and its directory
    k = s["best_trial"] + 1
    printed, log = capsys.readouterr()
    assert [x for x in log.splitlines() if x.endswith(f": valid {s['best_value']:.2f}%")][0].startswith(
        f"search: trial {k} "), log  # the first trial with the best error is the best
    assert f"best valid error {s['best_value']:.2f}% (trial {k}) with" in printed, printed
    assert (out / "best.yaml").read_text().startswith(f"# best of study 's': trial {k}, valid error")
    assert sorted(d.name.split("-")[0] for d in (out / "trials").iterdir()) == ["0001", "0002", "0003"]
    best = load_recipe(out / "best.yaml")
    assert best.finetune.optimizer.lr == pytest.approx(s["best_params"]["finetune.optimizer.lr"])
    assert best.search is None
    capsys.readouterr()
    assert main(["inspect", str(out)]) == 0  # a search's directory: its study and best trial
    said = capsys.readouterr().out.splitlines()
    values = [t["value"] for t in s["trials"]]
    assert said[0] == f"{out}: a search (surgery search), study 's' in {s['storage']}" and said[1] == "trials: 3"
    assert said[2] == f"validation error: {min(values):.2f}-{max(values):.2f}% over the 3 scored", said
    assert said[3].startswith(f"best: trial {k}, validation {s['best_value']:.2f}% with "
                              f"finetune.batch_size={s['best_params']['finetune.batch_size']}, "
                              "finetune.optimizer.lr=") and said[3].endswith(f"its recipe: {out}/best.yaml"), said
    (out / "search.json").write_text("{")
    assert main(["inspect", str(out)]) == 2
    assert "search.json: damaged or being written" in capsys.readouterr().err
    # edited from outside: a word for a trial's value, a list for the best values (were tracebacks)
    (out / "search.json").write_text('{"trials": [{"state": "COMPLETE", "value": "x"}], "best_value": 1.0, '
                                     '"best_params": [1]}')
    assert main(["inspect", str(out)]) == 0
    assert "trials: 1 (1 failed or unfinished)" in capsys.readouterr().out


def test_search_trials_flag_counts_exactly(tmp_path, capsys):
    """--trials 0 (or less) is refused before anything is written; it used to run search.trials."""
    p = _search_recipe(tmp_path)
    assert main(["search", str(p), "--trials", "0", "--out", str(tmp_path / "z")]) == 2
    err = capsys.readouterr().err
    assert "--trials 0" in err and "search.trials (3)" in err and "Traceback" not in err, err
    assert not (tmp_path / "z").exists()
    assert main(["search", str(p), "--trials", "1", "--out", str(tmp_path / "one")]) == 0
    assert len(json.loads((tmp_path / "one" / "search.json").read_text())["trials"]) == 1
    capsys.readouterr()
    more = ["--set", "finetune.progress=null", "--set", "finetune.epochs=2"]  # a log, but a trial says one line
    assert main(["search", str(p), "--trials", "2", "--out", str(tmp_path / "two"), *more]) == 0
    err = capsys.readouterr().err
    assert "search: trial 2 " in err and "finetune: epoch" not in err, err


@pytest.mark.parametrize("batch", [1, 3])
def test_search_marks_diverged_trials_and_never_picks_them(tmp_path, monkeypatch, capsys, batch):
    """A diverged trial is scored as the worst error and marked in search.json; best.yaml is a
    trial that trained; when all diverge the command says so in one paragraph, keeping search.json."""
    import optuna

    from surgery import search
    from surgery.errors import TrainingDiverged
    from surgery.finetune import PopulationTrainer, Trainer

    def diverging(fit):
        def wrapped(self, *a, **k):
            lrs = [c.optimizer.lr for c in getattr(self, "cfgs", [getattr(self, "cfg", None)])]
            if max(lrs) > limit:
                raise TrainingDiverged("the training loss became NaN or infinite in epoch 1")
            return fit(self, *a, **k)
        return wrapped

    monkeypatch.setattr(Trainer, "fit", diverging(Trainer.fit))
    monkeypatch.setattr(PopulationTrainer, "fit", diverging(PopulationTrainer.fit))
    monkeypatch.setattr(search, "make_sampler", lambda name, seed: optuna.samplers.RandomSampler(seed=seed + 3))
    p = _search_recipe(tmp_path)
    r = yaml.safe_load(p.read_text())
    r["search"].update(trials=6, batch=batch)
    p.write_text(yaml.safe_dump(r))
    limit = 0.1
    assert main(["search", str(p), "--out", str(tmp_path / "a")]) == 0
    s = json.loads((tmp_path / "a" / "search.json").read_text())
    bad = [t for t in s["trials"] if t["diverged"]]
    assert bad and all(t["params"]["finetune.optimizer.lr"] > limit and t["value"] == 100.0 for t in bad)
    assert s["best_params"]["finetune.optimizer.lr"] <= limit and s["best_value"] < 100.0
    assert load_recipe(tmp_path / "a" / "best.yaml").finetune.optimizer.lr <= limit
    limit = 0.0
    capsys.readouterr()
    assert main(["search", str(p), "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert "every trial of study 's' diverged" in err.splitlines()[-1] and "Traceback" not in err, err
    assert len(json.loads((tmp_path / "b" / "search.json").read_text())["trials"]) == 6
    assert not (tmp_path / "b" / "best.yaml").exists()


def _interrupt_fit(monkeypatch, n: int) -> list:
    """Ctrl-C at the ``n``-th fine-tuning (a Trainer's or a population's fit); returns the
    list of fits so far (a test can reset it)."""
    from surgery.finetune import PopulationTrainer, Trainer

    fits: list = []

    def stop(fit):
        def wrapped(self, *a, **k):
            fits.append(1)
            if len(fits) == n:
                raise KeyboardInterrupt
            return fit(self, *a, **k)
        return wrapped

    monkeypatch.setattr(Trainer, "fit", stop(Trainer.fit))
    monkeypatch.setattr(PopulationTrainer, "fit", stop(PopulationTrainer.fit))
    return fits


@pytest.mark.parametrize("batch", [1, 2])
def test_a_stopped_search_keeps_its_trials_and_best_so_far(tmp_path, monkeypatch, capsys, batch):
    """search.json and best.yaml are written after every trial (or batch), not only at the
    end: a search stopped midway (Ctrl-C, a lost machine) keeps them, and `inspect` describes
    it; it said the directory was not a run's."""
    fits = _interrupt_fit(monkeypatch, 3 - (batch > 1))  # the third trial alone, or the second batch of two
    p = _search_recipe(tmp_path)
    r = yaml.safe_load(p.read_text())
    r["search"].update(trials=6, batch=batch)
    r["finetune"]["batch_size"] = 50  # one shape: a batch of trials fine-tunes as one population
    r["search"]["params"].pop("finetune.batch_size")
    p.write_text(yaml.safe_dump(r))
    out = tmp_path / "s"
    assert main(["search", str(p), "--out", str(out)]) != 0
    s = json.loads((out / "search.json").read_text())
    done = [t for t in s["trials"] if t["state"] == "COMPLETE"]
    assert len(done) == 2 and s["best_value"] == min(t["value"] for t in done)
    best_lr = s["best_params"]["finetune.optimizer.lr"]
    assert load_recipe(out / "best.yaml").finetune.optimizer.lr == pytest.approx(best_lr)
    capsys.readouterr()
    assert main(["inspect", str(out)]) == 0
    said = capsys.readouterr().out
    assert f"trials: {len(done)}" in said and f"best: trial {s['best_trial'] + 1}" in said, said
    fits[:] = [1] * (2 - (batch > 1))  # stopped in its first trial (batch): no search.json yet
    assert main(["search", str(p), "--out", str(tmp_path / "first")]) != 0
    capsys.readouterr()
    assert main(["inspect", str(tmp_path / "first")]) == 0
    assert f"trials: none finished ({batch} started)" in capsys.readouterr().out
    assert main(["inspect", str(tmp_path)]) == 0
    said = capsys.readouterr().out
    assert f"  first: search, trials: none finished ({batch} started)\n" in said, said
    assert "  s: search, trials: 2\n" not in said and "  s: search, trials: 2; best: trial" in said, said


@pytest.mark.parametrize("batch", [1, 2])
def test_a_search_run_again_runs_only_the_trials_it_lacks(tmp_path, monkeypatch, capsys, batch):
    """Stopped after two of its four trials, the same command run again runs the other two
    (it ran four more, and the Ctrl-C message said to run it again); run once more it runs
    none and says so; --trials N still runs N more."""
    p = _search_recipe(tmp_path)
    r = yaml.safe_load(p.read_text())
    r["search"].update(trials=4, batch=batch)
    p.write_text(yaml.safe_dump(r))
    out = tmp_path / "s"

    def states():
        return [t["state"] for t in json.loads((out / "search.json").read_text())["trials"]]

    with monkeypatch.context() as m:
        _interrupt_fit(m, 3 - (batch > 1))  # the third trial alone, or the second batch of two
        assert main(["search", str(p), "--out", str(out)]) == 130
    assert states().count("COMPLETE") == 2
    assert main(["search", str(p), "--out", str(out)]) == 0
    assert states().count("COMPLETE") == 4 and len(states()) == 4 + batch  # the stopped ones: FAIL
    capsys.readouterr()
    assert main(["search", str(p), "--out", str(out)]) == 0
    said = capsys.readouterr()
    assert "nothing to run: study s already has 4 finished trials (search.trials: 4)" in said.out, said.out
    assert f"4 trials finished ({batch} failed or unfinished); best valid" in said.out
    assert states().count("COMPLETE") == 4
    assert main(["search", str(p), "--out", str(out), "--trials", "1"]) == 0
    assert states().count("COMPLETE") == 5


def test_a_search_marks_failed_the_trials_a_killed_worker_left_running(tmp_path, capsys):
    """A worker killed midway (kill -9) leaves its trial RUNNING; the next search on the
    study marks it failed (inspect said 'failed or unfinished' for ever) and runs the trials
    the study lacks; a trial of a worker still running is left alone."""
    import socket

    import optuna

    p = _search_recipe(tmp_path)
    out = tmp_path / "s"
    out.mkdir()
    url = f"sqlite:///{out / 'search.db'}"
    storage = optuna.storages.RDBStorage(url)
    study = optuna.create_study(study_name="s", storage=storage, direction="minimize")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    for pid in (int(dead.stdout), os.getppid()):  # a process that has ended, one that runs
        study.ask().set_user_attr("worker", f"{socket.gethostname()}:{pid}")
    storage.engine.dispose()
    assert main(["search", str(p), "--out", str(out)]) == 0
    states = [t["state"] for t in json.loads((out / "search.json").read_text())["trials"]]
    assert states[:2] == ["FAIL", "RUNNING"] and states.count("COMPLETE") == 3, states
    assert "trial 1 was left unfinished by a process that has ended; marked failed" in capsys.readouterr().err


def test_two_workers_share_one_sqlite_study(tmp_path):
    p = _search_recipe(tmp_path)
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "surgery.cli", "search", str(p), "--trials", "2", "--storage", url]
    procs = [subprocess.Popen(cmd + ["--out", str(tmp_path / f"w{i}")], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    for pr in procs:
        _, err = pr.communicate(timeout=300)
        assert pr.returncode == 0, err[-2000:]
    import optuna

    storage = optuna.storages.RDBStorage(url)
    trials = optuna.load_study(study_name="s", storage=storage).trials
    storage.engine.dispose()  # its connections closed, not left to the garbage collector
    workers = {t.user_attrs["worker"] for t in trials if t.state.name == "COMPLETE"}
    assert len(trials) == 4 and len(workers) == 2
    drawn = [tuple(sorted(t.params.items())) for t in trials]
    assert len(set(drawn)) == 4, drawn  # no worker repeats another's draw
    # Without --trials each worker stops once the study has search.trials (4): not 4 each.
    url = f"sqlite:///{tmp_path / 'second.db'}"
    for pr in [subprocess.Popen(cmd[:-4] + ["--set", "search.trials=4", "--storage", url, "--out",
                                            str(tmp_path / f"v{i}")], env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True) for i in range(2)]:
        _, err = pr.communicate(timeout=300)
        assert pr.returncode == 0, err[-2000:]
    storage = optuna.storages.RDBStorage(url)
    trials = optuna.load_study(study_name="s", storage=storage).trials
    storage.engine.dispose()
    assert 4 <= len(trials) <= 5 and all(t.state.name == "COMPLETE" for t in trials), len(trials)  # 5: both ran one


@pytest.mark.parametrize("batch", [1, 2])
def test_a_search_run_again_draws_the_same_trials(tmp_path, batch):
    """The sampler is seeded by the recipe's seed and each trial's number: the same search
    run again (another --out) draws the same values, so its result can be repeated; another
    seed draws others."""
    p = _search_recipe(tmp_path)
    drawn = {}
    for out, seed in (("a", 0), ("b", 0), ("c", 1)):
        args = ["search", str(p), "--out", str(tmp_path / out), "--trials", "4", "--set", f"seed={seed}",
                "--set", f"search.batch={batch}"]
        if out == "b":  # another process, as a search run again is
            done = subprocess.run([sys.executable, "-m", "surgery", *args], capture_output=True, text=True,
                                  env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
            assert done.returncode == 0, done.stderr[-2000:]
        else:
            assert main(args) == 0
        trials = json.loads((tmp_path / out / "search.json").read_text())["trials"]
        drawn[out] = [t["params"] for t in sorted(trials, key=lambda t: t["number"])]
    assert drawn["a"] == drawn["b"] and drawn["a"] != drawn["c"]


def test_conv_and_custom_arms(tmp_path):
    r = {
        "name": "conv",
        "data": {"dataset": "synthetic", "n_train": 300, "n_valid": 100, "n_test": 100},
        "experiment": {"conditions": {
            "conv-none": {"method": "none", "conv": CONV, "data": {"flatten": False}},
            "conv-dae": {"method": "dae", "conv": CONV, "data": {"flatten": False}},
            "relu-rmsprop": {"method": "none", "activation": "relu",
                             "finetune": {"optimizer": {"name": "rmsprop", "lr": 0.001}}},
        }, "depths": [2], "seeds": [0], "hidden": 16, "pretrain_epochs": 1, "baseline": "relu-rmsprop"},
        "finetune": {"epochs": 1, "device": "cpu", "progress": False},
    }
    p = tmp_path / "conv.yaml"
    p.write_text(yaml.safe_dump(r))
    assert main(["run", str(p), "--out", str(tmp_path / "o")]) == 0
    rows = _rows(tmp_path / "o")
    assert {x["condition"] for x in rows} == {"conv-none", "conv-dae", "relu-rmsprop"}
    model = json.loads((tmp_path / "o" / "cells" / rows[0]["cell"] / "recipe.json").read_text())
    assert model["surgery"]["ops"][0].get("kind") == "conv2d" or model["pretrain"]["layers"][0]["method"] == "conv_ae"
    r["experiment"]["conditions"]["conv-none"]["data"] = {}
    p.write_text(yaml.safe_dump(r))
    assert main(["run", str(p), "--out", str(tmp_path / "o2")]) == 2


@pytest.mark.slow
def test_quick_recipe_end_to_end(tmp_path):
    """The README's main job, in full (2.4-2.6 minutes on a slow 2-core machine), and its answer: a
    pretrained arm below `none` at depth >= 2 with p < 0.01."""
    out = tmp_path / "quick"
    assert main(["run", str(ROOT / "recipes" / "quick.yaml"), "--out", str(out)]) == 0
    rows = _rows(out)
    assert len(rows) == 60 and all(float(r["test_error"]) < 15 for r in rows)
    deep = [t for t in table(rows, "none") if t["depth"] >= 2 and t["condition"] != "none"]
    assert any(t["p"] < 0.01 and t["ci_high"] < t2["ci_low"] for t in deep for t2 in table(rows, "none")
               if t2["condition"] == "none" and t2["depth"] == t["depth"])
    figures = ("error_vs_depth", "error_hist", "learning_curves", "filters")
    assert all((out / "figures" / f"{n}.png").is_file() for n in figures)


def test_every_arm_gets_the_same_tuning_budget(tmp_path, capsys):
    r = json.loads(json.dumps(TINY))
    r["experiment"] = {"conditions": ["none", "dae"], "depths": [1], "seeds": [0, 1], "hidden": 16,
                       "pretrain_epochs": 1,
                       "tune": {"trials": 3, "params": {
                           "finetune.optimizer.lr": {"low": 0.01, "high": 0.5, "log": True},
                           "pretrain.layers.*.noise": {"low": 0.05, "high": 0.5}}}}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(r))
    assert main(["validate", str(tmp_path / "r.yaml")]) == 0
    assert "tuning first: 3 tpe trials for each of 2 (arm, depth) on seed 0 (6 runs)" in capsys.readouterr().out
    out = tmp_path / "out"
    assert main(["run", str(tmp_path / "r.yaml"), "--out", str(out)]) == 0
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("tuning: ")]
    assert len(lines) == 6 and all(", valid " not in x and ": valid " in x and "test" not in x for x in lines), lines
    # the noise means nothing to the arm without pretraining: not shown as if it had been used
    assert all(("noise=" in x) == x.startswith("tuning: dae") for x in lines), lines
    tuning = json.loads((out / "tuning.json").read_text())
    trials = [t for t in tuning["trials"] if "trial" in t]
    bests = {t["condition"]: t for t in tuning["trials"] if "best_trial" in t}
    assert sorted(t["condition"] for t in trials) == ["dae"] * 3 + ["none"] * 3
    for arm, best in bests.items():
        mine = [t for t in trials if t["condition"] == arm]
        assert best["valid_error"] == min(t["valid_error"] for t in mine)
        assert best["params"] == mine[best["best_trial"]]["params"]
    for row in _rows(out):  # every seed ran with its arm's best values
        cell = json.loads((Path(row["path"]) / "recipe.json").read_text())
        best = bests[row["condition"]]["params"]
        assert cell["finetune"]["optimizer"]["lr"] == best["finetune.optimizer.lr"]
        if row["condition"] == "dae":
            assert all(layer["noise"] == best["pretrain.layers.*.noise"] for layer in cell["pretrain"]["layers"])
        else:
            assert "pretrain" not in cell
        if row["seed"] == "0":  # the best trial itself, not trained a second time
            trial = out / "tuning" / Path(row["path"]).name / "result.json"
            assert trial.read_text() == (Path(row["path"]) / "result.json").read_text()
    assert bests["none"]["ignored"] == ["pretrain.layers.*.noise"] and "ignored" not in bests["dae"]
    report = (out / "report.md").read_text().splitlines()
    tuning_rows = [x for x in report if x.startswith(("| none | 1 |", "| dae | 1 |")) and "`finetune.optimizer.lr" in x]
    assert len(tuning_rows) == 2 and all(("noise" in x) == x.startswith("| dae") for x in tuning_rows), tuning_rows
    assert all(f"| {bests[x.split()[1]]['best_trial'] + 1}/3 |" in x for x in tuning_rows), tuning_rows
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("result.json")}
    assert main(["run", str(tmp_path / "r.yaml"), "--out", str(out)]) == 0  # a rerun trains nothing again
    assert {p: p.stat().st_mtime_ns for p in out.rglob("result.json")} == stamps
    _inspect_tells_how_far_the_run_got(out, bests, capsys)


def _inspect_tells_how_far_the_run_got(out, bests, capsys):
    capsys.readouterr()
    assert main(["inspect", str(out)]) == 0
    said = capsys.readouterr().out.splitlines()
    assert "pretrained stacks: 4 whole" in said and "cells: 4 of 4 finished" in said, said  # 3 trials + seed 1
    dae = next(x for x in said if x.startswith("tuning dae d1: 3 of 3 trials finished, validation "))
    assert f"validation {bests['dae']['valid_error']:.2f}" in dae and "test" not in dae  # the lowest first
    cell = next(p for p in (out / "cells").iterdir() if p.is_dir())
    (cell / "result.json").unlink()  # as if the run had stopped while this cell trained
    assert main(["inspect", str(out)]) == 0
    said = capsys.readouterr().out.splitlines()
    assert "cells: 3 of 4 finished" in said, said
    assert any(x.startswith(f"unfinished (training now, or stopped): cells/{cell.name} (") for x in said), said
    meta = json.loads((out / "experiment.json").read_text())
    (out / "experiment.json").write_text(json.dumps({**meta, "cells": 2}))  # a later run with fewer seeds
    assert main(["inspect", str(out)]) == 0
    assert "cells: 3 finished (the last run planned 2)" in capsys.readouterr().out.splitlines()


def _tuning_recipe(**tune):
    r = json.loads(json.dumps(TINY))
    r["experiment"] = {"conditions": ["none", "dae"], "depths": [1], "seeds": [0, 1], "hidden": 16,
                       "pretrain_epochs": 1,
                       "tune": {"trials": 4, **tune, "params": {
                           "finetune.optimizer.lr": {"low": 0.01, "high": 0.5, "log": True},
                           "pretrain.layers.*.noise": {"low": 0.05, "high": 0.5}}}}
    return r


def test_a_trial_scored_on_several_seeds_is_their_mean_and_its_runs_become_those_seeds_cells(tmp_path, capsys):
    """tune.seeds: 2 runs each trial on the first two seeds and scores it by the mean of their
    validation errors (Erhan et al. chose over 10 seeds, where one seed rewards a lucky draw);
    the best mean is chosen, its two runs are adopted as those seeds' cells and only the third
    seed trains anew; validate, the log, inspect and the report say so; a tune.seeds the
    experiment's seeds cannot give is refused, naming the field."""
    r = _tuning_recipe(trials=3, seeds=2)
    r["experiment"]["seeds"] = [0, 1, 2]
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(r))
    assert main(["validate", str(tmp_path / "r.yaml")]) == 0
    assert "on seeds 0, 1, scored by their mean (12 runs)" in capsys.readouterr().out
    out = tmp_path / "out"
    assert main(["run", str(tmp_path / "r.yaml"), "--out", str(out)]) == 0
    lines = [x for x in capsys.readouterr().err.splitlines() if x.startswith("tuning: ")]
    assert len(lines) == 6 and all(", the mean of seeds 0: " in x for x in lines), lines
    tuning = json.loads((out / "tuning.json").read_text())
    assert tuning["seeds"] == 2
    trials = [t for t in tuning["trials"] if "trial" in t]
    for t in trials:
        by_seed = t["valid_error_by_seed"]
        assert sorted(by_seed) == ["0", "1"] and t["valid_error"] == pytest.approx(sum(by_seed.values()) / 2)
    runs = sorted(json.loads(p.read_text())["valid_error"] for p in (out / "tuning").glob("*/result.json"))
    assert runs == sorted(v for t in trials for v in t["valid_error_by_seed"].values())  # 12 runs, each scored
    rows = _rows(out)
    for best in (t for t in tuning["trials"] if "best_trial" in t):
        mine = [t for t in trials if t["condition"] == best["condition"]]
        assert best["valid_error"] == min(t["valid_error"] for t in mine)
        chosen = mine[best["best_trial"]]["valid_error_by_seed"]
        for row in (x for x in rows if x["condition"] == best["condition"]):
            cell = Path(row["path"])
            trial = out / "tuning" / cell.name / "result.json"
            assert trial.is_file() == (row["seed"] in chosen)  # seeds 0 and 1: the best trial's runs, adopted
            if row["seed"] in chosen:
                assert trial.read_text() == (cell / "result.json").read_text()
                assert float(row["valid_error"]) == chosen[row["seed"]]
    assert "the first 2 seeds, scored by the mean of their valid_error" in (out / "report.md").read_text()
    capsys.readouterr()
    assert main(["inspect", str(out)]) == 0
    assert any(x.startswith("tuning dae d1: 6 of 6 trial runs (3 trials x 2 seeds) finished, validation ")
               for x in capsys.readouterr().out.splitlines())
    r["experiment"]["seeds"] = [0]
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(r))
    assert main(["run", str(tmp_path / "r.yaml"), "--out", str(tmp_path / "o2")]) == 2
    assert "tune.seeds is 2, but seeds lists 1 ([0])" in capsys.readouterr().err
    assert not (tmp_path / "o2").exists()


THEN = [  # the steps of bengio2007's protocol, in small
    {"name": "unsupervised epochs", "conditions": ["dae"], "alternatives": [{"pretrain.layers.*.epochs": 3}]},
    {"name": "lr again", "alternatives": [{"finetune.optimizer.lr": {"times": 0.5}},
                                          {"finetune.optimizer.lr": {"times": 2}}]},
    {"name": "budget", "alternatives": [{"finetune.epochs": 4}, {"finetune.epochs": 2}]},  # 2: the recipe's
    {"name": "noise", "alternatives": [{"pretrain.layers.*.noise": 0.1}]},
]


def _replay_steps(trial, steps):
    """The values and score the rule of experiment.tune.then arrives at from the best trial's
    and the steps' records: each step's lowest run taken when below the score so far."""
    values, score = dict(trial["params"]), trial["valid_error"]
    for name in dict.fromkeys(s["step"] for s in steps):
        mine = [s for s in steps if s["step"] == name]
        assert all(s["so_far"] == score for s in mine), mine
        ran = [s for s in mine if not s.get("skipped")]
        low = min((s["valid_error"] for s in ran), default=None)
        taken = [s for s in mine if s["taken"]]
        if low is not None and low < score:
            assert taken == [next(s for s in ran if s["valid_error"] == low)], mine
            values, score = {**values, **taken[0]["params"]}, low
        else:
            assert not taken, mine
    return values, score


def test_tune_then_steps_try_alternatives_over_the_values_chosen_so_far(tmp_path, capsys):
    """experiment.tune.then, after an arm's trials, runs each step's alternatives over the
    values chosen so far ({times: X}: X times the value so far; conditions: those arms only;
    one that changes nothing for an arm is not run) and keeps the lowest validation error, a
    tie keeping the values so far; every seed runs with the values chosen and the chosen run
    is seed 0's cell; validate, the log, the report and inspect say so; a rerun trains nothing."""
    r = _tuning_recipe(trials=2)
    r["experiment"]["tune"]["then"] = THEN
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(r))
    assert main(["validate", str(tmp_path / "r.yaml")]) == 0
    assert ("then 4 step(s) (unsupervised epochs; lr again; budget; noise: up to 11 runs more, each alternative "
            "over the values chosen so far") in capsys.readouterr().out
    out = tmp_path / "out"
    assert main(["run", str(tmp_path / "r.yaml"), "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "tuning: none depth 1 noise: pretrain.layers.*.noise=0.1: changes nothing for this arm: not run" in err
    tuning = json.loads((out / "tuning.json").read_text())
    assert [s["name"] for s in tuning["then"]] == [s["name"] for s in THEN]
    rows = _rows(out)
    for arm, names in (("none", ["lr again"] * 2 + ["budget"] * 2 + ["noise"]),
                       ("dae", ["unsupervised epochs"] + ["lr again"] * 2 + ["budget"] * 2 + ["noise"])):
        best = next(t for t in tuning["trials"] if "best_trial" in t and t["condition"] == arm)
        trial = [t for t in tuning["trials"] if "trial" in t and t["condition"] == arm][best["best_trial"]]
        steps = [s for s in tuning["steps"] if s["condition"] == arm]
        assert [s["step"] for s in steps] == names
        lr = trial["params"]["finetune.optimizer.lr"]  # no step before "lr again" changes it
        assert [s["params"]["finetune.optimizer.lr"] for s in steps if s["step"] == "lr again"] == \
            pytest.approx([lr / 2, lr * 2])
        assert [s["step"] for s in steps if s.get("skipped")] == ["budget"] + ["noise"] * (arm == "none")
        values, score = _replay_steps(trial, steps)
        assert best["valid_error"] == score and best["params"] == {**best["params"], **values}
        assert best["steps_taken"] == [s["step"] for s in steps if s["taken"]]
        for row in (x for x in rows if x["condition"] == arm):
            cell = json.loads((Path(row["path"]) / "recipe.json").read_text())
            assert cell["finetune"]["optimizer"]["lr"] == best["params"]["finetune.optimizer.lr"]
            assert cell["finetune"]["epochs"] == best["params"].get("finetune.epochs", 2)
            if arm == "dae":
                assert cell["pretrain"]["layers"][0]["epochs"] == best["params"].get("pretrain.layers.*.epochs", 1)
            if row["seed"] == "0":  # the chosen run itself, not trained again
                chosen = out / "tuning" / Path(row["path"]).name / "result.json"
                assert chosen.read_text() == (Path(row["path"]) / "result.json").read_text()
    report = (out / "report.md").read_text().split("## Tuning")[1]
    assert "then 4 steps (unsupervised epochs; lr again; budget; noise), each trying" in report
    assert "| none | 1 | noise | `pretrain.layers.*.noise`=0.1 | not run |" in report
    assert sum(x.startswith(("| none | 1 | ", "| dae | 1 | ")) for x in report.splitlines()) == 2 + 11
    capsys.readouterr()
    assert main(["inspect", str(out)]) == 0
    said = capsys.readouterr().out
    ran = 2 + sum(not s.get("skipped") for s in tuning["steps"] if s["condition"] == "dae")
    assert f"tuning dae d1: {ran} of up to 8 trials and step alternatives finished, validation " in said, said
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("result.json")}
    assert main(["run", str(tmp_path / "r.yaml"), "--out", str(out)]) == 0  # a rerun trains nothing again
    assert {p: p.stat().st_mtime_ns for p in out.rglob("result.json")} == stamps
    assert json.loads((out / "tuning.json").read_text()) == tuning


def test_a_step_alternative_scales_each_value_it_names_as_the_field_allows():
    """{times: X} multiplies the value a cell has now: each layer's own for a ``*`` path (one
    ``*`` value where the layers agree), to the nearest whole number for a field of whole
    numbers, an lr written as 1 as the float it is; a pretraining value is dropped for a
    cell that does not pretrain; a later value for a ``*`` path replaces the per-layer ones
    before it."""
    from surgery.grid import changes, step_values
    from surgery.tuning import merged_values

    r = recipe_from_dict({"data": {"dataset": "synthetic"}, "finetune": {"epochs": 15, "optimizer": {"lr": 1}},
                          "pretrain": {"layers": [{"method": "rbm", "hidden": 8, "lr": 0.1},
                                                  {"method": "rbm", "hidden": 8, "lr": 0.3}]}})
    full = r.to_dict()
    got = step_values(full, {"finetune.epochs": {"times": 0.5}, "finetune.optimizer.lr": {"times": 0.5},
                             "pretrain.layers.*.lr": {"times": 2}})
    assert got == {"finetune.epochs": 8, "finetune.optimizer.lr": 0.5, "pretrain.layers.0.lr": 0.2,
                   "pretrain.layers.1.lr": 0.6}
    alike = recipe_from_dict({**r.to_dict(), "pretrain": {"layers": [{"method": "rbm", "hidden": 8, "lr": 0.1}] * 2}})
    assert step_values(alike.to_dict(), {"pretrain.layers.*.lr": {"times": 3}}) == {"pretrain.layers.*.lr": 0.1 * 3}
    assert changes(full, got) and not changes(full, {"finetune.epochs": 15, "pretrain.layers.*.hidden": 8})
    no_pretrain = {k: v for k, v in full.items() if k != "pretrain"}
    assert step_values(no_pretrain, {"pretrain.layers.*.lr": {"times": 2}, "finetune.epochs": 3}) == \
        {"finetune.epochs": 3}
    assert list(merged_values(got, {"pretrain.layers.*.lr": 0.05})) == [
        "finetune.epochs", "finetune.optimizer.lr", "pretrain.layers.*.lr"]
    with pytest.raises(SurgeryError, match="needs a number there, and this cell's recipe has 'sgd'"):
        step_values(full, {"finetune.optimizer.name": {"times": 2}})


def test_tune_then_steps_merge_by_arm_and_refuse_a_bad_alternative_before_training(tmp_path, capsys):
    """Arms tuned apart with the same steps merge, each arm's steps with its trials; other
    steps are another budget, refused; an alternative that sets no recipe field, scales what
    is not a number or names an arm the grid lacks is refused before anything trains."""
    for arm in ("none", "dae"):
        r = _tuning_recipe(trials=2)
        r["experiment"].update(conditions=[arm], seeds=[0])
        r["experiment"]["tune"]["then"] = THEN[1:3]
        (tmp_path / f"{arm}.yaml").write_text(yaml.safe_dump(r))
        assert main(["run", str(tmp_path / f"{arm}.yaml"), "--out", str(tmp_path / arm)]) == 0
    assert main(["compare", str(tmp_path / "none"), str(tmp_path / "dae"), "--out", str(tmp_path / "m")]) == 0
    merged = json.loads((tmp_path / "m" / "tuning.json").read_text())
    each = [json.loads((tmp_path / arm / "tuning.json").read_text()) for arm in ("none", "dae")]
    assert merged["steps"] == each[0]["steps"] + each[1]["steps"] and len(merged["steps"]) == 8
    assert "| dae | 1 | budget | `finetune.epochs`=2 | not run |" in (tmp_path / "m" / "report.md").read_text()
    (tmp_path / "dae" / "tuning.json").write_text(json.dumps({**each[1], "then": THEN[1:2]}))
    capsys.readouterr()
    assert main(["compare", str(tmp_path / "none"), str(tmp_path / "dae"), "--out", str(tmp_path / "m2")]) == 2
    assert "('valid_error', 2, 1, 'lr again', 'budget')" in capsys.readouterr().err
    r = _tuning_recipe(trials=2)
    for then, said in (
            ([{"name": "x", "alternatives": [{"finetune.nonsense": 1}]}],
             "experiment.tune.then[0].alternatives[0]"),
            ([{"name": "x", "alternatives": [{"finetune.optimizer.name": {"times": 2}}]}],
             "experiment.tune.then[0].alternatives[0] [none d1]: finetune.optimizer.name: {times: 2} needs a "
             "number there, and this cell's recipe has 'sgd'"),
            ([{"name": "x", "alternatives": [{"finetune.epochs": 3}]},
              {"name": "y", "conditions": ["dea"], "alternatives": [{"finetune.epochs": 3}]}],
             "tune.then[1].conditions: ['dea'] not among the experiment's arms ['none', 'dae']"),
            ([{"name": "x", "alternatives": [{"finetune.optimizer.lr": {"times": 0}}]}],
             "alternatives[0]['finetune.optimizer.lr']: times must be a positive number (got 0)")):
        r["experiment"]["tune"]["then"] = then
        (tmp_path / "bad.yaml").write_text(yaml.safe_dump(r))
        for cmd in (["validate"], ["run", "--out", str(tmp_path / "o")]):
            assert main([cmd[0], str(tmp_path / "bad.yaml"), *cmd[1:]]) == 2
            assert said in capsys.readouterr().err
        assert not (tmp_path / "o").exists()
    # a built-in arm left out of this run (arms run apart, as above): a warning, and the step
    # runs for no arm here
    r["experiment"]["tune"]["then"] = [{"name": "y", "conditions": ["dae"], "alternatives": [{"finetune.epochs": 3}]}]
    (tmp_path / "apart.yaml").write_text(yaml.safe_dump(r))
    assert main(["validate", str(tmp_path / "apart.yaml"), "--set", "experiment.conditions=[none]"]) == 0
    said = capsys.readouterr()
    assert "warning: experiment.tune.then[0] (y): its conditions ['dae'] are not among the arms run here ['none']" \
        in said.err
    assert "experiment: 2 cells (none x depths [1] x seeds [0, 1])" in said.out and " step" not in said.out
    # a finished run's record read again (surgery compare) repeats none of it: nothing runs from it
    import warnings

    from surgery.experiment_config import ExperimentConfig, recorded_experiment
    section = {**r["experiment"], "conditions": ["none"]}
    with pytest.warns(SurgeryWarning, match="not among the arms run here"):
        ExperimentConfig.model_validate(section)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert recorded_experiment(section).tune.then[0].conditions == ["dae"]


def test_a_tuning_batch_trains_its_trials_together_and_equals_one_by_one(tmp_path, capsys):
    """tune.batch: 4 with population: 4 asks an arm's four trials at once (TPE's first ten are
    random draws, so the same values), pretrains the dae trials' stacks and fine-tunes the
    trials as populations, and finds every trial's validation error, every best choice and
    every seed's result of the one-by-one run without populations."""
    runs = {}
    for name, batch, mode in (("alone", 1, "off"), ("together", 4, 4)):
        r = _tuning_recipe(batch=batch)
        r["experiment"]["population"] = mode
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(r))
        assert main(["run", str(tmp_path / f"{name}.yaml"), "--out", str(tmp_path / name)]) == 0
        runs[name] = json.loads((tmp_path / name / "tuning.json").read_text())["trials"]
    alone, together = runs["alone"], runs["together"]
    err = capsys.readouterr().err  # a log line as each population ends
    assert "population: 4 members (dae depth 1; seed 0) fine-tuned together in " in err, err
    assert "population: 2 members (dae depth 1, none depth 1; seed 1) fine-tuned together in " in err, err
    assert len(alone) == len(together) == 10  # 4 trials and the best, for each arm
    for a, b in zip(alone, together):
        assert a["params"] == b["params"] and a.get("best_trial") == b.get("best_trial")
        assert a["valid_error"] == pytest.approx(b["valid_error"], abs=1e-9)
    trials = list((tmp_path / "together" / "tuning").glob("*/result.json"))
    assert len(trials) == 8 and all(json.loads(p.read_text()).get("population") == 4 for p in trials)
    stacks = list((tmp_path / "together" / "stacks").glob("*/pretrain.json"))
    assert sum(json.loads(p.read_text()).get("population") == 4 for p in stacks) == 4  # the dae trials' stacks
    for ra, rb in zip(*(sorted(_rows(tmp_path / n), key=lambda x: x["cell"]) for n in ("alone", "together"))):
        assert (ra["cell"], ra["test_error"], ra["valid_error"]) == (rb["cell"], rb["test_error"], rb["valid_error"])


@pytest.mark.parametrize("seeds", [1, 2])
def test_shards_share_one_tuned_grid_and_equal_one_process(tmp_path, capsys, seeds):
    """`--shard 1/2` (here) and `--shard 2/2` (another process) over one --out, at once:
    each trains its half of an arm's trial batch (of its trials' runs, with tune.seeds: 2),
    waits for the other's, then its half of each tune.then step's runs, then its half of the
    seed cells; no trial is trained by both, and the run without --shard trains nothing more
    and writes the results, trials, steps and choices of a run in one process."""
    r = _tuning_recipe(batch=4, seeds=seeds)
    r["experiment"]["tune"]["then"] = THEN[1:3]
    r["experiment"]["seeds"] = [0, 1, 2]
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(r))
    recipe, out = str(tmp_path / "r.yaml"), tmp_path / "sharded"
    assert main(["run", recipe, "--out", str(tmp_path / "one")]) == 0
    capsys.readouterr()
    other = subprocess.Popen([sys.executable, "-m", "surgery", "run", recipe, "--out", str(out), "--shard", "2/2"],
                             cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    assert main(["run", recipe, "--out", str(out), "--shard", "1/2"]) == 0
    said_other = other.communicate(timeout=600)
    assert other.returncode == 0, said_other[1][-2000:]
    said = capsys.readouterr()
    trials = [x for err in (said.err, said_other[1]) for x in err.splitlines() if x.startswith("tuning: ")]
    trained = [x for x in trials if "trial " in x and "another shard's)" not in x]
    read = [x for x in trials if "(another shard's);" in x]  # then how many of all are done
    if seeds == 1:
        assert len(trained) == len(read) == 8 and len({x.split(":")[1] for x in trained}) == 8, trials
    else:  # each shard tells all 8 trials, some of whose runs the other trained
        assert len([x for x in trials if "trial " in x]) == 16 and "(partly another shard's);" in "".join(trials)
    assert "shard 1/2: " in said.out and "shard 2/2: " in said_other[0]
    assert main(["inspect", str(out)]) == 0  # every cell trained by a shard, nothing collected yet
    assert "every cell finished, no results.csv yet: `surgery run RECIPE " in capsys.readouterr().out
    finished = {p: p.stat().st_mtime_ns for p in out.rglob("result.json")}
    assert main(["run", recipe, "--out", str(out)]) == 0
    assert {p: p.stat().st_mtime_ns for p in out.rglob("result.json")} == finished  # nothing trained again
    one = json.loads((tmp_path / "one" / "tuning.json").read_text())
    assert json.loads((out / "tuning.json").read_text()) == one
    rows = [sorted(_rows(d), key=lambda x: x["cell"]) for d in (tmp_path / "one", out)]
    assert [(a["cell"], a["test_error"]) for a in rows[0]] == [(b["cell"], b["test_error"]) for b in rows[1]]


def test_a_shard_trains_again_another_shards_trial_whose_result_was_damaged(tmp_path, capsys):
    """A shard waits for the other shards' trials until their result files appear; one
    damaged afterwards (by something else: ours are written whole) is trained again here,
    not waited for forever nor told as diverged, and the grid's choices are those of a run
    that nothing damaged."""
    r = _tuning_recipe(batch=4)
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(r))
    recipe, out = str(tmp_path / "r.yaml"), tmp_path / "o"
    assert main(["run", recipe, "--out", str(out)]) == 0
    want = json.loads((out / "tuning.json").read_text())
    (out / "tuning.json").unlink()
    damaged = sorted((out / "tuning").glob("*/result.json"))
    assert len(damaged) == 8
    for p in damaged:  # each shard's share among them
        p.write_text(p.read_text()[:40])
    shard = subprocess.run([sys.executable, "-m", "surgery", "run", recipe, "--out", str(out), "--shard", "1/2"],
                           cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
                           timeout=300)
    assert shard.returncode == 0, shard.stderr[-2000:]
    assert shard.stderr.count("It trains again.") == 8 and "(another shard's)" not in shard.stderr, shard.stderr
    assert all(json.loads(p.read_text())["valid_error"] >= 0 for p in damaged)  # whole again
    assert main(["run", recipe, "--out", str(out)]) == 0
    assert json.loads((out / "tuning.json").read_text()) == want


def test_a_shard_keeps_the_cells_of_one_stack_together(tmp_path, capsys):
    from surgery.grid import shard_of

    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump(TINY))
    cells = plan_cells(load_recipe(p), (16,), 4)
    shares = [shard_of(cells, i, 3) for i in range(3)]
    assert sorted(c.key for s in shares for c in s) == sorted(c.key for c in cells)  # each cell in one share
    for s in shares:
        others = {c.pretrain_key for t in shares if t is not s for c in t}
        assert all(c.pretrain_key is None or c.pretrain_key not in others for c in s)
    assert max(map(len, shares)) - min(map(len, shares)) <= 2  # depths 1 and 2 of an arm's seed: one stack
    for bad in ("3/2", "0/2", "a/b", "1"):
        assert main(["run", str(p), "--out", str(tmp_path / "o"), "--shard", bad]) == 2
        assert "--shard" in capsys.readouterr().err
    assert main(["run", str(ROOT / "recipes" / "dbn.yaml"), "--out", str(tmp_path / "s"), "--shard", "1/2"]) == 2
    assert "has no experiment: section" in capsys.readouterr().err


def test_a_batch_of_trials_trained_one_by_one_logs_each_as_it_finishes(tmp_path, monkeypatch):
    """Without populations (the CPU's default) a batch's trials train one after another, and
    each is told and logged when it ends, not when the whole batch has."""
    import surgery.tuning
    from surgery.finetune import Trainer

    events, fit, line = [], Trainer.fit, surgery.tuning.progress_line
    monkeypatch.setattr(Trainer, "fit", lambda self, *a, **k: (events.append("fit"), fit(self, *a, **k))[1])
    monkeypatch.setattr(surgery.tuning, "progress_line",
                        lambda progress, text: (events.append(text.split(":")[0]), line(progress, text)))
    r = _tuning_recipe(batch=4)
    r["experiment"].update(conditions=["none"], seeds=[0])
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(r))
    assert main(["run", str(tmp_path / "r.yaml"), "--out", str(tmp_path / "out")]) == 0
    assert events[:8] == ["fit", "tuning"] * 4, events


def test_compare_merges_arms_tuned_in_separate_runs(tmp_path, capsys, monkeypatch):
    """A protocol run arm by arm (as on a small machine) merges into one report whose tuning
    section lists every arm's best trial; budgets that differ are refused, naming them."""
    for arm in ("none", "dae"):
        r = _tuning_recipe(trials=2)
        r["experiment"].update(conditions=[arm], seeds=[0])
        (tmp_path / f"{arm}.yaml").write_text(yaml.safe_dump(r))
        assert main(["run", str(tmp_path / f"{arm}.yaml"), "--out", str(tmp_path / arm)]) == 0
    capsys.readouterr()
    assert main(["compare", str(tmp_path / "none"), str(tmp_path / "dae"), "--out", str(tmp_path / "merged")]) == 0
    assert "warning" not in capsys.readouterr().out  # arms apart, each tuned by the same budget: one protocol
    tuning = json.loads((tmp_path / "merged" / "tuning.json").read_text())
    assert [(t["condition"], "best_trial" in t) for t in tuning["trials"]] == [
        ("none", False), ("none", False), ("none", True), ("dae", False), ("dae", False), ("dae", True)]
    report = (tmp_path / "merged" / "report.md").read_text()
    assert "| none | 1 | " in report.split("## Tuning")[1] and "| dae | 1 | " in report.split("## Tuning")[1]
    assert "leave out" not in report and "Every arm had the same budget" in report and "Not tuned" not in report
    # a deeper run of one arm with the values set by hand (untuned, as at the paper's scale on 2 cores): the
    # report says which cells the budget did not cover
    r = _tuning_recipe(trials=2)
    r["experiment"].update(conditions=["none"], seeds=[0], depths=[2], tune=None)
    (tmp_path / "deep.yaml").write_text(yaml.safe_dump(r))
    assert main(["run", str(tmp_path / "deep.yaml"), "--out", str(tmp_path / "deep")]) == 0
    assert main(["compare", str(tmp_path / "none"), str(tmp_path / "dae"), str(tmp_path / "deep"),
                 "--out", str(tmp_path / "m3")]) == 0
    section = (tmp_path / "m3" / "report.md").read_text().split("## Tuning")[1]
    assert "Every arm tuned here had the same budget" in section and "Not tuned: none at depth 2, " in section
    # merged again once one run's directories are gone (results.csv kept): the report says whose curves are missing
    shutil.rmtree(tmp_path / "dae" / "cells")
    assert main(["compare", str(tmp_path / "none"), str(tmp_path / "dae"), "--out", str(tmp_path / "m1")]) == 0
    assert "are not here: 1 of 2 (dae)" in (tmp_path / "m1" / "report.md").read_text()
    # rebuilt once no run's directory is here (a published report): the curves and filters an
    # earlier build drew are kept, not drawn anew from nothing
    figures = {n: (tmp_path / "m1" / "figures" / n).read_bytes() for n in ("learning_curves.png", "filters.png")}
    shutil.move(tmp_path / "none" / "cells", tmp_path / "none_cells")
    assert main(["compare", str(tmp_path / "m1")]) == 0
    assert figures == {n: (tmp_path / "m1" / "figures" / n).read_bytes() for n in figures}
    report = (tmp_path / "m1" / "report.md").read_text()
    assert "kept as an earlier build of this report drew them" in report and "are not here: " not in report
    shutil.move(tmp_path / "none_cells", tmp_path / "none" / "cells")
    # some here: each arm's curves at the largest depth whose runs are here (none's depth-2 run is gone)
    import surgery.figures as figures_module

    read, history = [], figures_module._history
    monkeypatch.setattr(figures_module, "_history", lambda p: read.append(p) or history(p))
    shutil.rmtree(tmp_path / "deep" / "cells")
    assert main(["compare", str(tmp_path / "none"), str(tmp_path / "deep"), "--out", str(tmp_path / "m4")]) == 0
    assert len(read) == 1 and (tmp_path / "none") in read[0].parents, read
    fig = figures_module._curves_figure(_rows(tmp_path / "m4"), ["none"], {"none": "tab:blue"})
    assert fig.axes[0].get_legend_handles_labels()[1] == ["none (depth 1, 1 seed)"]  # which depth, how many seeds
    assert "the curves are each arm's at the largest depth whose runs are here" in (
        tmp_path / "m4" / "report.md").read_text()
    other = json.loads((tmp_path / "dae" / "tuning.json").read_text())
    (tmp_path / "dae" / "tuning.json").write_text(json.dumps({**other, "trials_per_arm": 5}))
    capsys.readouterr()
    assert main(["compare", str(tmp_path / "none"), str(tmp_path / "dae"), "--out", str(tmp_path / "m2")]) == 2
    assert "different budgets [('valid_error', 2, 1), ('valid_error', 5, 1)]" in capsys.readouterr().err
    assert not (tmp_path / "m2").exists()  # refused before anything was written
    (tmp_path / "dae" / "tuning.json").write_text(json.dumps({**other, "seeds": 2}))  # trials scored on 2 seeds
    assert main(["compare", str(tmp_path / "none"), str(tmp_path / "dae"), "--out", str(tmp_path / "m2")]) == 2
    assert "[('valid_error', 2, 1), ('valid_error', 2, 2)] (metric, trials per arm, seeds a trial, and" in \
        capsys.readouterr().err


def test_compare_refuses_runs_on_other_data_and_says_which_runs_a_later_directory_replaces(tmp_path, capsys):
    """Merging needs --out (each directory keeps its own results and report); directories that
    ran on different data are refused, naming the field, before anything is written; a run of
    a later directory that replaces an earlier one's is named; runs of one arm and depth made
    with other settings (here fine-tuning epochs) are merged with a warning naming them."""
    def grid(name, seeds, finetune=None, depth=1, **data):
        r = json.loads(json.dumps(TINY))
        r["data"] = {**r["data"], **data}
        r["finetune"] = {**r["finetune"], **(finetune or {})}
        r["experiment"] = {**r["experiment"], "conditions": ["none"], "depths": [depth], "seeds": seeds}
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(r))
        assert main(["run", str(tmp_path / f"{name}.yaml"), "--out", str(tmp_path / name)]) == 0

    grid("a", [0, 1])
    grid("b", [1, 2])
    grid("c", [3], n_train=200)
    before = (tmp_path / "a" / "results.csv").read_text()
    capsys.readouterr()
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "b")]) == 2
    assert "give --out DIR" in capsys.readouterr().err
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "c"), "--out", str(tmp_path / "ac")]) == 2
    assert "ran on different data (data.n_train" in capsys.readouterr().err and not (tmp_path / "ac").exists()
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "b"), f"{tmp_path / 'a'}/", "--out",
                 str(tmp_path / "ab")]) == 0
    said = capsys.readouterr().out
    assert f"compare: {tmp_path / 'a'} given more than once; read once." in said  # not "a replaces b's s1"
    assert f"compare: 1 run(s) of {tmp_path / 'b'} replace earlier directories' (none d1 s1)" in said
    assert "warning" not in said  # seeds run apart: one protocol
    assert sorted(r["seed"] for r in _rows(tmp_path / "ab")) == ["0", "1", "2"]
    assert (tmp_path / "a" / "results.csv").read_text() == before
    # the merge goes to a new directory or an earlier merge's: never over what a run made
    for out, said in (("a", "is one of the directories merged, and a run trained there (cells/"),
                      ("c", "holds a run's files (cells/)")):
        kept = (tmp_path / out / "results.csv").read_text()
        assert main(["compare", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / out)]) == 2
        assert said in capsys.readouterr().err and (tmp_path / out / "results.csv").read_text() == kept
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "ab")]) == 0
    capsys.readouterr()
    assert main(["inspect", str(tmp_path / "ab")]) == 0  # what it holds, not "0 of 2 cells finished"
    assert capsys.readouterr().out.splitlines()[:4] == [
        f"{tmp_path / 'ab'}: experiment tiny, merged by `surgery compare`",
        f"merged: 3 runs (none) from {tmp_path / 'a'}, {tmp_path / 'b'}", "seeds at depth 1: none 3",
        f"recipe (experiment.json's): {tmp_path / 'a'}'s, the first merged; the arms, depths and seeds are "
        "results.csv's, each run's settings its command's"]
    assert main(["inspect", str(tmp_path)]) == 0
    assert "  ab: merged results, 3 runs (none)" in capsys.readouterr().out.splitlines()
    kept = (tmp_path / "ab" / "results.csv").read_text()
    assert main(["run", str(tmp_path / "a.yaml"), "--out", str(tmp_path / "ab")]) == 2  # a run would replace them
    assert "holds the results `surgery compare` merged" in capsys.readouterr().err
    assert (tmp_path / "ab" / "results.csv").read_text() == kept
    # runs added to an earlier merge in place: what a merge into a new directory makes, and its
    # merged_from names the directories it holds, not itself
    grid("g", [5])
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "b"), str(tmp_path / "g"), "--out",
                 str(tmp_path / "abg")]) == 0
    older = json.loads((tmp_path / "ab" / "experiment.json").read_text())  # as a compare before recipe_from wrote it
    (tmp_path / "ab" / "experiment.json").write_text(json.dumps({k: v for k, v in older.items() if k != "recipe_from"}))
    assert main(["compare", str(tmp_path / "ab"), str(tmp_path / "g"), "--out", str(tmp_path / "ab")]) == 0
    capsys.readouterr()
    assert (tmp_path / "ab" / "results.csv").read_text() == (tmp_path / "abg" / "results.csv").read_text() != kept
    meta = json.loads((tmp_path / "ab" / "experiment.json").read_text())
    assert meta["merged_from"] == [str(tmp_path / d) for d in ("a", "b", "g")]
    assert meta["recipe_from"] == str(tmp_path / "a")  # whose recipe it holds: a's, not the merge's own
    assert [e.get("dir") for e in meta["commands"]] == [  # the runs, the first merge, g's run, this merge
        *(str(tmp_path / d) for d in ("a", "b", "ab", "g")), None]
    grid("d", [4], finetune={"epochs": 3})
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "d"), "--out", str(tmp_path / "ad")]) == 0
    assert (f"compare: warning: the runs merged for none d1 differ in finetune.epochs (2 in {tmp_path / 'a'}, 3 in "
            f"{tmp_path / 'd'}): their means and intervals mix two protocols") in capsys.readouterr().out
    # between depths: the depth curve of one arm made with two protocols (here another recipe's
    # fine-tuning epochs); the same protocol at another depth (another surgery) merges quietly
    grid("e", [0], finetune={"epochs": 3}, depth=2)
    grid("f", [0], depth=2)
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "e"), "--out", str(tmp_path / "ae")]) == 0
    assert (f"compare: warning: the runs merged for none d1 and d2 differ in finetune.epochs (2 in {tmp_path / 'a'}, "
            f"3 in {tmp_path / 'e'})") in capsys.readouterr().out
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "f"), "--out", str(tmp_path / "af")]) == 0
    assert "warning" not in capsys.readouterr().out
    grid("h", [7], depth=1)
    grid("i", [7], depth=3)
    assert main(["compare", str(tmp_path / "af"), str(tmp_path / "h"), str(tmp_path / "i"), "--out",
                 str(tmp_path / "af")]) == 0
    capsys.readouterr()
    assert main(["inspect", str(tmp_path / "af")]) == 0  # how far each cell has got to the seeds it wants
    assert "seeds at depths 1, 2, 3: none 3, 1, 1" in capsys.readouterr().out.splitlines()


def test_compare_says_which_merged_runs_it_could_not_check_for_another_protocol(tmp_path, capsys):
    """Runs whose cell directories are gone (a published report) or whose directory has no
    experiment.json cannot be checked against the others' settings: compare says so rather
    than letting the absence of a warning vouch for them."""
    def grid(name, seed, epochs):
        r = json.loads(json.dumps(TINY))
        r["finetune"] = {**r["finetune"], "epochs": epochs}
        r["experiment"] = {**r["experiment"], "conditions": ["none"], "depths": [1], "seeds": [seed]}
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(r))
        assert main(["run", str(tmp_path / f"{name}.yaml"), "--out", str(tmp_path / name)]) == 0

    grid("a", 0, 2)
    grid("d", 1, 3)
    capsys.readouterr()
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "d"), "--out", str(tmp_path / "ad")]) == 0
    said = capsys.readouterr().out
    assert "differ in finetune.epochs" in said and "could not be checked" not in said
    # what compare said stays in the report, under the command that said it, through a rebuild
    warning = next(line for line in said.splitlines() if "differ in finetune.epochs" in line)
    assert main(["compare", str(tmp_path / "ad")]) == 0
    report = (tmp_path / "ad" / "report.md").read_text()
    lines = report.split("## Cost")[1].splitlines()
    assert lines[lines.index(f"  - {warning}") - 1].startswith("- `")  # below the command's own line
    shutil.rmtree(tmp_path / "d" / "cells")
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "d"), "--out", str(tmp_path / "ad2")]) == 0
    said = capsys.readouterr().out
    assert "differ in" not in said, said
    unchecked = (f"compare: 1 of the 1 runs merged from {tmp_path / 'd'} could not be checked against the other "
                 "directories' settings (their cell directories are not here)")
    assert unchecked in said
    assert unchecked in (tmp_path / "ad2" / "report.md").read_text()
    (tmp_path / "a" / "experiment.json").unlink()
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "d"), "--out", str(tmp_path / "ad3")]) == 0
    said = capsys.readouterr().out
    assert f"runs merged from {tmp_path / 'a'} could not be checked against the other directories' settings (it " \
           "has no experiment.json, so neither their data nor their settings can be read)" in said
    assert main(["compare", str(tmp_path / "a"), "--out", str(tmp_path / "a1")]) == 0  # one directory: nothing to check
    assert "could not be checked" not in capsys.readouterr().out


def test_runs_added_to_an_earlier_merge_of_arms_run_apart_merge_quietly(tmp_path, capsys):
    """A merge's recipe is its first directory's, which may have run another arm: the runs of
    an arm it does not describe are no other protocol than the same arm's runs added later."""
    def grid(name, arm, seed, epochs=1):
        r = json.loads(json.dumps(TINY))
        r["experiment"] = {**r["experiment"], "conditions": [arm], "depths": [1], "seeds": [seed],
                           "pretrain_epochs": epochs}
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(r))
        assert main(["run", str(tmp_path / f"{name}.yaml"), "--out", str(tmp_path / name)]) == 0

    grid("none", "none", 0)
    grid("dae", "dae", 0)
    grid("dae1", "dae", 1)
    grid("dae2", "dae", 2, epochs=2)  # pretrained otherwise
    merged = str(tmp_path / "merged")
    assert main(["compare", str(tmp_path / "none"), str(tmp_path / "dae"), "--out", merged]) == 0
    capsys.readouterr()
    assert main(["compare", merged, str(tmp_path / "dae1"), "--out", merged]) == 0
    said = capsys.readouterr().out
    assert "warning" not in said and "report for 3 runs" in said
    assert main(["compare", merged, str(tmp_path / "dae2"), "--out", merged]) == 0  # still told
    assert "the runs merged for dae d1 differ in pretrain.layers.0.epochs (1 in " in capsys.readouterr().out


def test_inspect_counts_the_seeds_of_each_arm_at_each_depth_of_a_merge():
    from surgery.rundir import _seeds_line

    rows = [{"condition": c, "depth": d, "seed": s} for c, d, s in
            (("none", 1, 0), ("none", 1, 1), ("none", 3, 0), ("dae", 3, 0), ("dae", 3, 4))]
    assert _seeds_line(rows) == ["seeds at depths 1, 3: none 2, 1; dae -, 2"]
    assert _seeds_line([]) == []


def test_inspect_names_the_first_directories_of_a_long_merge_and_counts_the_rest():
    from surgery.rundir import _some

    assert _some(["a", "b", "c", "d", "e"]) == "a, b, c, d, e"  # one more than shown: named, not counted
    assert _some([f"runs/s{i}" for i in range(30)]) == (
        "runs/s0, runs/s1, runs/s2, runs/s3 and 26 more (experiment.json's merged_from lists them all)")


def test_a_tuned_layer_setting_covers_the_methods_default_it_replaced():
    """A directory that tuned ``pretrain.layers.*.lr`` records the method's untuned default
    beside the value its cells used; merged with runs given that value by hand, the default is
    no difference of protocol, while an untuned setting of the method still is."""
    from surgery.results import _tuned

    assert _tuned("experiment.methods.dae.lr", ["pretrain.layers.*.lr"])
    assert _tuned("pretrain.layers.3.lr", ["pretrain.layers.*.lr"])
    assert not _tuned("experiment.methods.dae.noise", ["pretrain.layers.*.lr"])
    assert not _tuned("finetune.optimizer.lr", ["pretrain.layers.*.lr"])


def test_a_diverging_trial_is_scored_worst_and_the_arm_goes_on(tmp_path, monkeypatch, capsys):
    """A trial whose loss diverges is recorded as such and never chosen; when every trial of
    an arm diverges the run stops with one paragraph naming the arm."""
    from surgery.errors import TrainingDiverged
    from surgery.finetune import Trainer

    fit = Trainer.fit

    def diverge_fast(self, *a, **k):
        if self.cfg.optimizer.lr > limit:
            raise TrainingDiverged("the training loss became NaN or infinite in epoch 1")
        return fit(self, *a, **k)

    monkeypatch.setattr(Trainer, "fit", diverge_fast)
    r = _tuning_recipe()
    r["experiment"]["conditions"] = ["none"]
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(r))
    limit = 0.1
    assert main(["run", str(tmp_path / "r.yaml"), "--out", str(tmp_path / "a")]) == 0
    trials = json.loads((tmp_path / "a" / "tuning.json").read_text())["trials"]
    failed = [t for t in trials if t.get("diverged")]
    assert failed and all(t["params"]["finetune.optimizer.lr"] > limit and t["valid_error"] is None for t in failed)
    best = trials[-1]
    assert best["params"]["finetune.optimizer.lr"] <= limit and best["valid_error"] is not None
    assert "diverged (scored 100%)" in capsys.readouterr().err
    assert len(list((tmp_path / "a" / "tuning").glob("*/diverged.json"))) == len(failed)
    calls = []
    monkeypatch.setattr(Trainer, "fit", lambda self, *a, **k: calls.append(self) or diverge_fast(self, *a, **k))
    assert main(["run", str(tmp_path / "r.yaml"), "--out", str(tmp_path / "a")]) == 0
    assert calls == [] and json.loads((tmp_path / "a" / "tuning.json").read_text())["trials"] == trials  # kept
    capsys.readouterr()
    assert main(["inspect", str(tmp_path / "a")]) == 0
    said = capsys.readouterr().out
    assert "tuning none d1: 4 of 4 trials finished, validation " in said and f", {len(failed)} diverged" in said
    assert "unfinished" not in said, said
    limit = 0.0
    assert main(["run", str(tmp_path / "r.yaml"), "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert "every trial of none depth 1 diverged" in err and "Traceback" not in err, err


def test_a_trial_that_diverges_on_one_of_its_seeds_is_scored_worst(tmp_path, monkeypatch, capsys):
    """With tune.seeds: 2 a trial whose run on seed 1 diverges (and on seed 0 trains) is
    recorded as diverged, says on which seed, and is never chosen."""
    from surgery.errors import TrainingDiverged
    from surgery.finetune import Trainer

    fit = Trainer.fit

    def diverge_on_seed_1(self, *a, **k):
        if self.cfg.optimizer.lr > 0.1 and self.seed == 1:
            raise TrainingDiverged("the training loss became NaN or infinite in epoch 1")
        return fit(self, *a, **k)

    monkeypatch.setattr(Trainer, "fit", diverge_on_seed_1)
    r = _tuning_recipe(seeds=2)
    r["experiment"]["conditions"] = ["none"]
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(r))
    assert main(["run", str(tmp_path / "r.yaml"), "--out", str(tmp_path / "a")]) == 0
    trials = json.loads((tmp_path / "a" / "tuning.json").read_text())["trials"]
    failed = [t for t in trials if t.get("diverged")]
    assert failed and all(t["params"]["finetune.optimizer.lr"] > 0.1 and t["valid_error"] is None for t in failed)
    assert trials[-1]["params"]["finetune.optimizer.lr"] <= 0.1 and trials[-1]["valid_error"] is not None
    assert "diverged on seed 1 (scored 100%)" in capsys.readouterr().err
    assert len(list((tmp_path / "a" / "tuning").glob("*/diverged.json"))) == len(failed)  # seed 0's runs trained


def test_report_sets_the_papers_numbers_beside_ours():
    """experiment.paper: per arm the published error, ours with its interval, the gap and
    whether it is within the target; an arm that did not run says so; bad keys are refused."""
    from pydantic import ValidationError

    from surgery.experiment_config import PaperReference
    from surgery.report import markdown

    rows = [{"condition": c, "depth": d, "seed": s, "test_error": e}
            for c, d, errs in (("rbm", 2, (1.3, 1.5)), ("rbm", 1, (1.9, 2.1)), ("none", 2, (2.0, 2.2)))
            for s, e in enumerate(errs)]
    paper = PaperReference(source="Some et al. 2007, Table 2", errors={"rbm": 1.2, "none d2": 1.6, "dae": 1.4},
                           target=0.3, differences="they used 60k examples.").model_dump()
    md = markdown(rows, "none", None, paper)
    assert "Some et al. 2007, Table 2" in md and "a match is within 0.3 points" in md
    assert "| rbm | 2 | 1.20 | 1.40 (2) |" in md and "| +0.20 | yes |" in md  # the arm's largest depth
    assert "| none | 2 | 1.60 | 2.10 (2) |" in md and "| +0.50 | no |" in md
    assert "| dae | – | 1.40 | not run |" in md
    assert "did not: they used 60k examples." in md
    with pytest.raises(ValidationError, match="keys are an arm"):
        PaperReference(source="x", errors={"rbm depth 2": 1.0})


def test_population_off_written_bare_in_yaml(tmp_path):
    """YAML reads a bare ``off`` as false; the recipe takes it as the mode it looks like."""
    rp = tmp_path / "r.yaml"
    rp.write_text("data: {dataset: synthetic}\nexperiment: {conditions: [none], population: off}\n"
                  "finetune: {epochs: 1}\n")
    assert load_recipe(rp).experiment.population == "off"
    rp.write_text(rp.read_text().replace("population: off", "population: on"))
    with pytest.raises(SurgeryError, match="population: true is not a mode"):
        load_recipe(rp)


def test_an_experiment_on_every_training_example_keeps_last_epochs(tmp_path, capsys):
    from surgery.recipe import recipe_from_dict
    from tests.test_data import make_idx_dir

    make_idx_dir(tmp_path / "idx", n_train=300, n_test=100)
    data = {"dataset": "idx", "path": str(tmp_path / "idx"), "valid_size": 0}
    paper = {"source": "Some et al.", "errors": {"rbm": 1.2, "none": 1.6}, "target": 0.2}
    recipe = {**TINY, "data": data, "experiment": {**TINY["experiment"], "conditions": ["none", "rbm"],
                                                   "depths": [1], "seeds": [0], "paper": paper}}
    rp = tmp_path / "all.yaml"
    rp.write_text(yaml.safe_dump(recipe))
    assert main(["run", str(rp), "--out", str(tmp_path / "out")]) == 0
    # stderr is no terminal here, so no bar: a line saying what it will do, then one per finished cell
    err = capsys.readouterr().err
    start = f"experiment: 2 cells; files in {tmp_path / 'out'} (`surgery inspect {tmp_path / 'out'}` says how far"
    assert start in err and err.index(start) < err.index("experiment: cell 1/2"), err
    assert "experiment: cell 1/2 none depth 1 seed 0: test " in err and "experiment: cell 2/2 rbm" in err
    assert ", valid" not in err and "2 epochs" in err and "pretrain: layer 1/1 (rbm, 16 units) in " in err
    assert re.search(r"2 epochs, \d+\.\d s\n", err)  # a short run's time in seconds, not "0.0 min"
    rows = _rows(tmp_path / "out")
    assert len(rows) == 2 and all(r["valid_error"] == "" and r["best_epoch"] == r["epochs"] == "2" for r in rows)
    assert (tmp_path / "out" / "figures" / "learning_curves.png").is_file()
    # merged elsewhere (e.g. with another seed's directory), the report keeps the paper's numbers
    assert main(["compare", str(tmp_path / "out"), "--out", str(tmp_path / "merged")]) == 0
    assert "## Against the paper" in (tmp_path / "merged" / "report.md").read_text()
    # the paper's numbers and text set on finished runs (merged, or in place), and nothing else
    capsys.readouterr()
    recorded = (tmp_path / "out" / "experiment.json").read_text()
    assert main(["compare", str(tmp_path / "out"), "--out", str(tmp_path / "m2"), "--set",
                 "experiment.paper.errors.rbm=1.1", "--set", "experiment.paper.differences=used 300 examples"]) == 0
    report = (tmp_path / "m2" / "report.md").read_text()
    assert "| rbm | 1 | 1.10 |" in report and "this run did not: used 300 examples" in report
    assert (tmp_path / "out" / "experiment.json").read_text() == recorded
    for bad, said in (("finetune.epochs=3", "compare --set finetune.epochs: only experiment.paper.*"),
                      ("experiment.paper.target=-1", "experiment.paper.target: Input should be greater than 0")):
        assert main(["compare", str(tmp_path / "out"), "--set", bad]) == 2
        assert said in capsys.readouterr().err
        assert (tmp_path / "out" / "experiment.json").read_text() == recorded
    bare = tmp_path / "bare"  # results without the experiment.json that records the recipe
    shutil.copytree(tmp_path / "out", bare)
    (bare / "experiment.json").unlink()
    assert main(["compare", str(bare), "--set", "experiment.paper.target=0.5"]) == 2
    assert f"compare --set: {bare} has no experiment.json recording its recipe" in capsys.readouterr().err
    assert main(["compare", str(tmp_path / "out"), "--set", "experiment.paper.target=0.5"]) == 0
    assert "a match is within 0.5 points" in (tmp_path / "out" / "report.md").read_text()
    assert json.loads((tmp_path / "out" / "experiment.json").read_text())["cells"] == json.loads(recorded)["cells"]
    # whatever chooses by validation error is refused at validation, naming the field
    tuned = {**recipe["experiment"], "tune": {"params": {"finetune.optimizer.lr": {"type": "float", "low": 0.01,
                                                                                     "high": 0.3}}, "trials": 2}}
    stopping = {"finetune": {**TINY["finetune"], "early_stopping": {"patience": 2}}}
    search = {"search": {"trials": 2, "params": {"finetune.optimizer.lr": {"type": "float", "low": 0.01, "high": 0.3}}}}
    single = {k: v for k, v in recipe.items() if k != "experiment"}  # a search is a single run's
    for base, bad, field in ((recipe, stopping, "finetune.early_stopping"), (recipe, {"experiment": tuned},
                             "experiment.tune"), (single, search, "search")):
        with pytest.raises(SurgeryError, match=f"{field} chooses by validation error, but data.valid_size is 0"):
            recipe_from_dict({**base, **bad})


def test_a_killed_cell_resumes_from_its_checkpoint_and_equals_the_uninterrupted_one(tmp_path, monkeypatch, capsys):
    """With finetune.checkpoint_every, a grid killed in a cell's epoch 3 of 4 continues that
    cell from its checkpoint on the rerun (epochs 1-2 are not trained again) and every result
    and weight equals the grid run without a break; a torn checkpoint makes the cell start
    over, with a warning."""
    from safetensors.torch import load_file

    from surgery.finetune import Trainer

    r = {**TINY, "experiment": {**TINY["experiment"], "conditions": ["none", "rbm"], "depths": [2], "seeds": [0]},
         "finetune": {**TINY["finetune"], "epochs": 4, "checkpoint_every": 1}}
    rp = tmp_path / "r.yaml"
    rp.write_text(yaml.safe_dump(r))
    assert main(["run", str(rp), "--out", str(tmp_path / "whole")]) == 0
    epochs_run, cells_seen, killed_once = [], [], []
    original = Trainer.after_epoch

    def killed_in_epoch_three(self, recs, stopping):  # of the second cell
        original(self, recs, stopping)
        epochs_run.append(self.epoch)
        cells_seen.append(self.out) if self.out not in cells_seen else None
        if self.epoch == 2 and len(cells_seen) == 2 and not killed_once:
            killed_once.append(self.out)
            raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "after_epoch", killed_in_epoch_three)
    assert main(["run", str(rp), "--out", str(tmp_path / "cut")]) == 130
    killed = cells_seen[1]
    assert not (killed / "result.json").exists() and (killed / "checkpoints" / "last.safetensors").is_file()
    capsys.readouterr()
    assert main(["inspect", str(tmp_path / "cut")]) == 0
    assert "the rerun continues from its checkpoint after epoch 2" in capsys.readouterr().out
    epochs_run.clear()
    assert main(["run", str(rp), "--out", str(tmp_path / "cut")]) == 0
    assert epochs_run == [3, 4], epochs_run  # only the killed cell ran, from epoch 3
    _same_grid(tmp_path / "whole", tmp_path / "cut")
    # a torn checkpoint: the cell trains again from epoch 1, saying why
    (killed / "result.json").unlink()
    (killed / "checkpoints" / "last.safetensors").write_bytes(b"torn")
    capsys.readouterr()
    epochs_run.clear()
    assert main(["run", str(rp), "--out", str(tmp_path / "cut")]) == 0
    assert epochs_run == [1, 2, 3, 4] and "its checkpoint cannot be used" in capsys.readouterr().err
    b = load_file(str(killed / "model.safetensors"))
    a = load_file(str(tmp_path / "whole" / "cells" / killed.name / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("population", ["off", 2])
def test_a_pretraining_killed_after_a_layer_continues_there_and_equals_the_uninterrupted_one(tmp_path, monkeypatch,
                                                                                              capsys, population):
    """A grid killed after layer 2 of its 3-layer greedy stacks (alone, or two seeds' as a
    population) trains only layer 3 on the rerun (from the depth-2 snapshots and the
    generator states kept with them), and its stacks and results equal the grid run without
    a break; an unreadable snapshot makes the stacks start again at layer 1, with a warning."""
    from safetensors.torch import load_file

    import surgery.stacks_dir as stacks_dir

    seeds = [0] if population == "off" else [0, 1]
    r = {**TINY, "experiment": {**TINY["experiment"], "conditions": ["dae"], "depths": [3], "seeds": seeds,
                                "population": population}}
    rp = tmp_path / "r.yaml"
    rp.write_text(yaml.safe_dump(r))
    assert main(["run", str(rp), "--out", str(tmp_path / "whole")]) == 0
    original = stacks_dir.save_snapshot
    saved = []

    def killed_after_layer_two(sdir, i, stack, rng):  # once every member's is saved
        original(sdir, i, stack, rng)
        saved.append(i)
        if saved.count(1) == len(seeds):
            raise KeyboardInterrupt

    monkeypatch.setattr(stacks_dir, "save_snapshot", killed_after_layer_two)
    assert main(["run", str(rp), "--out", str(tmp_path / "cut")]) == 130
    monkeypatch.setattr(stacks_dir, "save_snapshot", original)
    capsys.readouterr()
    assert main(["inspect", str(tmp_path / "cut")]) == 0
    assert "2 layers so far (the rerun continues after them)" in capsys.readouterr().out
    assert main(["run", str(rp), "--out", str(tmp_path / "cut")]) == 0
    err = capsys.readouterr().err
    assert ("continuing the stack" if population == "off" else "continuing 2 stacks") + " after layer 2 of 3" in err
    assert "layer 3/3" in err and "layer 1/3" not in err
    keys = [d.name for d in (tmp_path / "whole" / "stacks").iterdir()]
    assert len(keys) == len(seeds)

    def same(a, b):
        a, b = load_file(str(a)), load_file(str(b))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    for key in keys:
        for depth in (1, 2, 3):
            same(tmp_path / "whole" / "stacks" / key / f"depth{depth}.safetensors",
                 tmp_path / "cut" / "stacks" / key / f"depth{depth}.safetensors")
    _same_grid(tmp_path / "whole", tmp_path / "cut")
    # an unreadable snapshot is passed over for a shallower one, saying why; with none left
    # usable the stacks are pretrained again from layer 1; the same stacks either way
    for damaged, said in ((["depth2"], "pretraining continues after layer 1, the deepest snapshot it can use: "
                           "a deeper one is unusable"), (["depth2", "depth1"], "pretraining starts again at layer 1")):
        for key in keys:
            sdir = tmp_path / "cut" / "stacks" / key
            (sdir / "pretrain.json").unlink()
            (sdir / "depth3.safetensors").unlink()
        for name in damaged:
            (tmp_path / "cut" / "stacks" / keys[0] / f"{name}.safetensors").write_bytes(b"torn")
        shutil.rmtree(tmp_path / "cut" / "cells")
        assert main(["run", str(rp), "--out", str(tmp_path / "cut")]) == 0
        err = capsys.readouterr().err
        assert said in err and ("layer 1/3" in err) == (len(damaged) == 2) and "layer 2/3" in err, err
        for key in keys:
            for depth in (1, 2, 3):
                same(tmp_path / "whole" / "stacks" / key / f"depth{depth}.safetensors",
                     tmp_path / "cut" / "stacks" / key / f"depth{depth}.safetensors")


def test_a_killed_population_continues_from_its_members_checkpoints(tmp_path, monkeypatch, capsys):
    """With populations and finetune.checkpoint_every, a grid killed after epoch 2 of 4 of a
    population continues it from its members' checkpoints on the rerun (epochs 1-2 are not
    trained again), and every result and weight equals the grid run without a break."""

    from surgery.finetune import PopulationTrainer

    r = {**TINY, "experiment": {**TINY["experiment"], "conditions": ["none", "rbm"], "depths": [2], "seeds": [0, 1],
                                "population": 2},
         "finetune": {**TINY["finetune"], "epochs": 4, "checkpoint_every": 1}}
    rp = tmp_path / "r.yaml"
    rp.write_text(yaml.safe_dump(r))
    assert main(["run", str(rp), "--out", str(tmp_path / "whole")]) == 0
    original, epochs_run = PopulationTrainer.after_epoch, []

    def killed_after_epoch_two(self, recs, stopping):  # of the second population
        original(self, recs, stopping)
        epochs_run.append(self.epoch)
        if epochs_run.count(2) == 2 and self.epoch == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(PopulationTrainer, "after_epoch", killed_after_epoch_two)
    assert main(["run", str(rp), "--out", str(tmp_path / "cut")]) == 130
    capsys.readouterr()
    assert main(["inspect", str(tmp_path / "cut")]) == 0
    assert capsys.readouterr().out.count("the rerun continues from its checkpoint after epoch 2") == 2
    shutil.copytree(tmp_path / "cut", tmp_path / "cut_off")
    epochs_run.clear()
    assert main(["run", str(rp), "--out", str(tmp_path / "cut")]) == 0
    assert epochs_run == [3, 4], epochs_run  # only the killed population ran, from epoch 3
    _same_grid(tmp_path / "whole", tmp_path / "cut")
    # rerun with populations off: each of its members continues alone, as a population of one
    epochs_run.clear()
    assert main(["run", str(rp), "--out", str(tmp_path / "cut_off"), "--set", "experiment.population=off"]) == 0
    assert epochs_run == [3, 4, 3, 4], epochs_run
    _same_grid(tmp_path / "whole", tmp_path / "cut_off")
    # a torn member checkpoint: that population trains again from epoch 1, saying why
    rbm = [c for c in (tmp_path / "cut" / "cells").iterdir()
           if json.loads((c / "recipe.json").read_text())["name"].startswith("rbm")]
    assert len(rbm) == 2
    for c in rbm:
        (c / "result.json").unlink()
    (rbm[0] / "checkpoints" / "member.safetensors").write_bytes(b"torn")
    capsys.readouterr()
    from surgery.finetune import TrainingLoop

    monkeypatch.setattr(PopulationTrainer, "after_epoch", original)
    trains = TrainingLoop.run_epoch
    monkeypatch.setattr(TrainingLoop, "run_epoch", lambda self: epochs_run.append(self.epoch + 1) or trains(self))
    epochs_run.clear()
    assert main(["run", str(rp), "--out", str(tmp_path / "cut")]) == 0
    assert epochs_run == [1, 2, 3, 4], epochs_run  # that cell anew (alone); the other's was after its last epoch
    torn = json.loads((rbm[0] / "recipe.json").read_text())["seed"]
    assert f"seed {torn}: its checkpoint cannot be used" in capsys.readouterr().err
    _same_grid(tmp_path / "whole", tmp_path / "cut", weights=False)  # one cell alone: equal within 1e-5


def test_the_report_writes_a_tiny_p_value_as_below_its_last_place():
    """A p-value that rounds to 0.0000 is written <0.0001 (a p-value is never zero); others to four places."""
    from surgery.report import markdown

    errors = {"none": [5.0, 5.1, 4.9, 5.05], "rbm": [2.0, 2.1, 1.9, 2.05], "dae": [4.9, 5.2, 4.8, 5.0]}
    rows = [{"condition": c, "depth": 1, "seed": i, "test_error": e} for c, errs in errors.items()
            for i, e in enumerate(errs)]
    lines = {line.split(" |")[0]: line for line in markdown(rows).splitlines() if line.startswith("| ")}
    p = {t["condition"]: t["p"] for t in table(rows, "none")}
    assert lines["| rbm"].endswith("| <0.0001 |") and p["rbm"] < 5e-5
    assert lines["| dae"].endswith(f"| {p['dae']:.4f} |") and p["dae"] > 0.01 and lines["| none"].endswith("| – |")


def test_inspect_describes_a_population_members_checkpoint(tmp_path):
    """A member's checkpoint under an experiment's cells/ says that rerunning the experiment
    continues the cell; once the cell's result.json is there, that it is the state it ended in."""
    from surgery.rundir import describe_checkpoint

    path = tmp_path / "out" / "cells" / "abc" / "checkpoints" / "member.safetensors"
    path.parent.mkdir(parents=True)
    meta = {"state": {"epoch": 3, "step": 30, "best_valid": 4.5, "best_epoch": 2}, "config": {"epochs": 10}}
    assert describe_checkpoint(path, meta) == [
        f"{path}: a fine-tuning checkpoint (a population member's)", "written after epoch 3 of 10 (step 30)",
        "best validation error so far 4.50% at epoch 2",
        f"the experiment run again (the same recipe, --out {tmp_path / 'out'}) continues its cell from it"]
    (path.parent.parent / "result.json").write_text("{}")
    assert describe_checkpoint(path, meta)[-1].startswith("its run has finished")


def test_read_results_takes_one_directory_or_several(tmp_path):
    """`S.read_results(out)` (a str or Path) gives the rows `S.run_experiment` returned, as a
    list of one directory does; a directory with no results is one paragraph."""
    import surgery as S

    recipe = recipe_from_dict({"data": {"dataset": "synthetic", "n_train": 120, "n_valid": 40, "n_test": 40},
                               "finetune": {"epochs": 1, "batch_size": 20, "progress": False},
                               "experiment": {"conditions": ["none"], "depths": [1], "seeds": [0, 1], "hidden": 8}})
    rows = S.run_experiment(recipe, tmp_path / "out", progress=False)
    S.write_report(tmp_path / "out", rows)
    key = lambda r: (r["condition"], int(r["depth"]), int(r["seed"]), float(r["test_error"]))  # noqa: E731
    want = sorted(map(key, rows))
    assert sorted(map(key, S.read_results(str(tmp_path / "out")))) == want
    assert sorted(map(key, S.read_results([tmp_path / "out"]))) == want
    with pytest.raises(SurgeryError, match="nope: no results.csv"):
        S.read_results(tmp_path / "nope")


def test_the_api_takes_a_recipe_file_or_a_dict_as_the_recipe(tmp_path):
    """`S.run("r.yaml", out)`, `S.run_experiment`, `S.validate`: a path (str or Path) or a
    dict works as the Recipe it holds (it was an AttributeError on 'str'); anything else is
    one paragraph saying what to give."""
    import surgery as S

    single = {"data": {"dataset": "synthetic", "n_train": 120, "n_valid": 40, "n_test": 40},
              "surgery": {"ops": [{"op": "insert", "name": "h1", "units": 8}, {"op": "head", "classes": 4}]},
              "finetune": {"epochs": 1, "batch_size": 20, "progress": False}}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(single))
    alone = S.run(S.load_recipe(tmp_path / "r.yaml"), tmp_path / "a")
    for given, out in [(str(tmp_path / "r.yaml"), "b"), (tmp_path / "r.yaml", "c"), (single, "d")]:
        assert S.run(given, tmp_path / out)["test_error"] == alone["test_error"]
        assert S.validate(given)[0].order() == S.validate(S.recipe_from_dict(single))[0].order()
    grid = {**single, "experiment": {"conditions": ["none"], "depths": [1], "seeds": [0], "hidden": 8}}
    del grid["surgery"]
    (tmp_path / "g.yaml").write_text(yaml.safe_dump(grid))
    rows = S.run_experiment(str(tmp_path / "g.yaml"), tmp_path / "g", progress=False)
    again = S.run_experiment(grid, tmp_path / "g2", progress=False)
    assert [r["test_error"] for r in rows] == [r["test_error"] for r in again] and len(rows) == 1
    with pytest.raises(SurgeryError, match="surgery.run: takes a recipe .* got int"):
        S.run(42, tmp_path / "e")
    with pytest.raises(SurgeryError, match=r"in Python, surgery.run_experiment\) runs it"):
        S.run(tmp_path / "g.yaml", tmp_path / "e")
    assert not (tmp_path / "e").exists()


def test_a_baseline_among_no_arm_run_here_is_warned_before_training(tmp_path, capsys):
    """A misspelt experiment.baseline (or arms run apart) is said before the first cell trains,
    with how the report can still test against it; the run goes on."""
    r = {"data": {"dataset": "synthetic", "n_train": 120, "n_valid": 40, "n_test": 40},
         "finetune": {"epochs": 1, "batch_size": 20, "progress": False},
         "experiment": {"conditions": ["none"], "depths": [1], "seeds": [0], "hidden": 8, "baseline": "nnoe"}}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(r))
    assert main(["run", str(tmp_path / "r.yaml"), "--out", str(tmp_path / "o")]) == 0
    err = capsys.readouterr().err
    warned = "warning: experiment.baseline: 'nnoe' is not among the arms run here ['none']"
    assert warned in err and "--baseline ARM" in err, err
    assert err.index(warned) < err.index("experiment: cell 1/1"), err
    r["experiment"]["baseline"] = "none"
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(r))
    assert main(["run", str(tmp_path / "r.yaml"), "--out", str(tmp_path / "o2")]) == 0
    assert "experiment.baseline" not in capsys.readouterr().err


def test_a_trial_whose_arm_uses_none_of_the_tuned_values_says_so(tmp_path, capsys):
    """`none` tuned over a pretraining value only: its trials' lines say no value applies
    (they printed an empty list of values)."""
    r = {"data": {"dataset": "synthetic", "n_train": 120, "n_valid": 40, "n_test": 40},
         "finetune": {"epochs": 1, "batch_size": 20, "progress": False},
         "experiment": {"conditions": ["none"], "depths": [1], "seeds": [0], "hidden": 8,
                        "tune": {"trials": 2, "params": {"pretrain.layers.*.lr": {"low": 0.01, "high": 0.1}}}}}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(r))
    assert main(["run", str(tmp_path / "r.yaml"), "--out", str(tmp_path / "o")]) == 0
    err = capsys.readouterr().err
    assert "tuning: none depth 1 trial 2/2 (no tuned value applies to this arm): valid " in err, err


def test_pace_tells_cells_done_and_time_left_from_this_runs_pace(monkeypatch):
    """Log lines of long runs say how far they got and about how long the rest takes: cells an
    earlier run finished count as done but not in the pace; nothing is promised before the
    first or after the last."""
    import surgery.io
    from surgery.io import Pace

    now = [100.0]
    monkeypatch.setattr(surgery.io.time, "perf_counter", lambda: now[0])
    pace = Pace(total=10, done=4)
    assert str(pace) == "4/10 cells done" and pace.left() == ""
    now[0] += 30.0  # 2 cells in 30 s: 15 s a cell, 4 left
    assert str(pace.add(2)) == "6/10 cells done, about 1.0 min left"
    now[0] += 90.0
    assert pace.add(3).left() == "about 24.0 s left"  # 5 cells in 120 s, 1 left
    assert str(pace.add()) == "10/10 cells done"


def test_inspect_of_a_directory_of_runs_gives_a_line_for_each(tmp_path, capsys):
    """`surgery inspect runs`: each run directory inside in one line (an experiment's cells,
    a single run's result, a search's best trial, a damaged one's problem); a reader that goes
    away early (`| head`) ends it quietly with 141, no traceback."""
    runs = tmp_path / "runs"
    (runs / "grid" / "cells" / "k1").mkdir(parents=True)
    (runs / "grid" / "experiment.json").write_text(json.dumps({"recipe": {"name": "grid"}, "cells": 2}))
    (runs / "grid" / "cells" / "k1" / "result.json").write_text(json.dumps({"test_error": 2.0}))
    (runs / "one").mkdir()
    (runs / "one" / "result.json").write_text(json.dumps({"test_error": 1.5, "valid_error": 1.25, "best_epoch": 3,
                                                          "epochs": 4, "seconds": 12.0, "device": "cpu"}))
    (runs / "s").mkdir()
    (runs / "s" / "search.json").write_text(json.dumps({"study": "s", "storage": "sqlite:///x.db", "trials": [
        {"number": 0, "value": 3.5, "params": {"lr": 0.5}, "state": "COMPLETE"}], "best_value": 3.5,
        "best_params": {"lr": 0.5}, "best_trial": 0}))
    (runs / "torn").mkdir()
    (runs / "torn" / "search.json").write_text("{")
    (runs / "notes").mkdir()  # no run: left out
    assert main(["inspect", str(runs)]) == 0
    assert capsys.readouterr().out.splitlines() == [
        f"{runs}: 4 run directories (`surgery inspect {runs}/NAME` says more)",
        "  grid: experiment, 1 of 2 finished",
        "  one: single run, finished: test 1.50%, validation 1.25% (best epoch 3 of 4 trained), 12.0 s fine-tuning "
        "on cpu",
        "  s: search, trials: 1; best: trial 1, validation 3.50% with lr=0.5",
        f"  torn: {runs / 'torn'}/search.json: damaged or being written; `surgery search RECIPE --out "
        f"{runs / 'torn'}` writes it anew from the study's storage."]
    p = subprocess.Popen([sys.executable, "-m", "surgery", "inspect", str(runs)], cwd=ROOT, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(ROOT)})
    p.stdout.close()  # the reader goes away before anything is printed
    with p.stderr:
        assert p.wait(timeout=120) == 141 and b"Traceback" not in p.stderr.read()


def test_tuning_lines_count_the_trials_of_every_arm_and_leave_read_back_ones_out_of_the_pace(tmp_path, capsys):
    """Each tuning trial's log line says how many of all arms' trials are done and about how
    long the rest takes; a rerun reads its trials back (no training), so they count as done
    but promise no time."""
    r = {"data": {"dataset": "synthetic", "n_train": 120, "n_valid": 40, "n_test": 40},
         "finetune": {"epochs": 1, "batch_size": 20, "progress": False},
         "experiment": {"conditions": ["none", "shallow"], "depths": [1], "seeds": [0], "hidden": 8,
                        "tune": {"trials": 2, "params": {"finetune.optimizer.lr": {"low": 0.01, "high": 0.1}}}}}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(r))
    for run in ("first", "again"):
        assert main(["run", str(tmp_path / "r.yaml"), "--out", str(tmp_path / "o")]) == 0
        lines = [s for s in capsys.readouterr().err.splitlines() if s.startswith("tuning: ")]
        assert [s.split("; ")[-1].split(",")[0] for s in lines] == [f"{i}/4 trials done" for i in (1, 2, 3, 4)], lines
        assert all(", about " in s for s in lines[:-1]) if run == "first" else not any("about" in s for s in lines)


@pytest.mark.parametrize("experiment, said", [
    ({"conditions": {"slow": {"method": "none", "finetune": {"epochs": "many"}}}},
     ["experiment.conditions.slow.finetune.epochs: Input should be a valid integer, unable to parse string as an "
      'integer (got "many")']),
    ({"conditions": {"big": {"method": "none", "finetune": {"optimizer": {"name": "sgd", "lrr": 0.1}}}}},
     ["experiment.conditions.big.finetune.optimizer.lrr: no such field; did you mean "
      "experiment.conditions.big.finetune.optimizer.lr? (got 0.1)"]),
    ({"conditions": ["rbm"], "methods": {"rbm": {"lrr": 0.1}}},  # one line, not one per layer
     ["experiment.methods.rbm.lrr: no such field; did you mean experiment.methods.rbm.lr? (got 0.1)"]),
    ({"conditions": {"fast": {"method": "dae", "layer": {"momentum": 2}}}},
     ["experiment.conditions.fast.layer.momentum: Input should be less than 1 (got 2)"]),
    ({"conditions": ["dae"], "tune": {"trials": 2, "params": {"pretrain.layers.*.noise": {
        "type": "categorical", "choices": [0.1, -1]}}}},
     ["pretrain.layers.*.noise: Input should be greater than or equal to 0 (got -1)"]),
    ({"conditions": {"mine": {"method": "none", "data": {"limitt": 50}}}},
     ["experiment.conditions.mine.data.limitt: no such field; did you mean experiment.conditions.mine.data.limit? "
      "(got 50)"]),
])
def test_a_bad_arm_or_method_value_is_named_where_the_recipe_has_it(tmp_path, capsys, experiment, said):
    """A grid's cells are recipes made from the experiment's sections; a bad value is named by
    the path the user wrote (`experiment.methods.rbm.lrr`), once, not by the cell's path
    (`pretrain.layers.0.lrr`, `pretrain.layers.1.lrr`)."""
    r = {"data": {"dataset": "synthetic", "n_train": 120, "n_valid": 40, "n_test": 40},
         "finetune": {"epochs": 1, "batch_size": 20, "progress": False},
         "experiment": {"depths": [2], "seeds": [0], "hidden": 8, "pretrain_epochs": 1, **experiment}}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(r))
    assert main(["validate", str(tmp_path / "r.yaml")]) == 2
    err = capsys.readouterr().err
    assert err.splitlines()[1:] == [f"  - {line}" for line in said], err


def test_compare_draws_a_moved_directory_s_runs_and_passes_over_a_damaged_model_file(tmp_path, monkeypatch, capsys):
    """results.csv's `path` is relative to where the run started: a directory moved since (or
    read from another working directory) still has its learning curves and filters drawn,
    from its own cells/; a damaged model file is warned of and another run's filters drawn
    (the report's writing raised safetensors' own error)."""
    import surgery.figures as figures

    r = {"data": {"dataset": "synthetic", "n_train": 120, "n_valid": 40, "n_test": 40},
         "finetune": {"epochs": 2, "batch_size": 20, "progress": False},
         "experiment": {"conditions": ["none", "dae"], "depths": [1], "seeds": [0, 1], "hidden": 8,
                        "pretrain_epochs": 1}}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(r))
    monkeypatch.chdir(tmp_path)
    assert main(["run", "r.yaml", "--out", "grid"]) == 0
    shutil.move(tmp_path / "grid", tmp_path / "kept")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    read, history = [], figures._history
    monkeypatch.setattr(figures, "_history", lambda p: read.append(p) or history(p))
    capsys.readouterr()
    assert main(["compare", str(tmp_path / "kept")]) == 0
    assert len(read) == 4 and all(p.is_file() and (tmp_path / "kept") in p.parents for p in read), read
    assert "are not here" not in (tmp_path / "kept" / "report.md").read_text()

    rows = read_results(tmp_path / "kept")
    damaged = Path(next(x["path"] for x in rows if x["condition"] == "dae" and x["seed"] == 0)) / "model.safetensors"
    damaged.write_bytes(b"[1, 2]")
    drawn = []
    monkeypatch.setattr(figures, "filter_grid", lambda w, n=64: drawn.append(w.shape) or np.zeros((8, 8)))
    assert main(["compare", str(tmp_path / "kept")]) == 0
    err = capsys.readouterr().err
    assert f"warning: filters: {damaged}: not a readable safetensors file" in err, err
    assert len(drawn) == 2, drawn  # both arms: dae's seed 1 stands in for its seed 0
    metrics = damaged.parent / "metrics.jsonl"
    metrics.write_bytes(b"\xfe\xff" * 10)  # no UTF-8: it raised UnicodeDecodeError
    assert main(["compare", str(tmp_path / "kept")]) == 0
    assert f"warning: learning curves: {metrics}: not text (byte 0 is no UTF-8)" in capsys.readouterr().err


def test_inspect_says_what_a_stack_s_snapshot_directory_holds(tmp_path, capsys):
    """An experiment's stacks/KEY (a run's pretrain/) was 'a directory that is not a run's'."""
    d = tmp_path / "stacks" / "abc"
    d.mkdir(parents=True)
    for name in ("depth1.safetensors", "rng1.safetensors", "depth2.safetensors"):
        (d / name).write_bytes(b"")
    said = []
    for last in ("rng2.safetensors", "pretrain.json"):
        assert main(["inspect", str(d)]) == 0
        said.append(capsys.readouterr().out.splitlines())
        (d / last).write_bytes(b"")
    assert main(["inspect", str(d)]) == 0
    said.append(capsys.readouterr().out.splitlines())
    states = [lines[0].rsplit("2 layers ", 1)[-1] for lines in said]
    assert states == ["(unfinished: a rerun pretrains it again)", "(unfinished: a rerun continues after them)",
                      "(whole)"], said
    assert said[0][1].startswith(f"`surgery inspect {d}/depth2.safetensors` shows the stack of those 2 layers")


def test_the_report_says_what_adding_a_layer_did():
    """The depth section: per arm at two depths or more, the change in mean from each depth to
    the next with Welch's p and the depth where the mean is lowest; each cell's sd against the
    baseline's at that depth with Levene's (median-centred) p; absent with one depth."""
    from scipy import stats

    from surgery.report import depth_markdown, markdown

    errors = {("none", 1): [5.0, 5.1, 4.9, 5.05], ("none", 2): [4.6, 4.7, 4.5, 4.65],
              ("none", 3): [5.5, 6.4, 4.9, 6.1], ("dae", 1): [4.0, 4.1, 3.9, 4.05],
              ("dae", 3): [3.5, 3.6, 3.45, 3.55], ("shallow", 1): [4.4, 4.5, 4.3, 4.45]}
    rows = [{"condition": c, "depth": d, "seed": i, "test_error": e} for (c, d), errs in errors.items()
            for i, e in enumerate(errs)]
    lines = depth_markdown(rows)
    assert "\n".join(lines) in markdown(rows)
    table_rows = [line for line in lines if line.startswith("| ")]
    assert table_rows[0] == "| condition | 1 -> 2 | 2 -> 3 | lowest at |"
    p12 = stats.ttest_ind(errors["none", 2], errors["none", 1], equal_var=False).pvalue
    p23 = stats.ttest_ind(errors["none", 3], errors["none", 2], equal_var=False).pvalue
    assert table_rows[1] == f"| none | -0.40 (p {p12:.4f}) | +1.11 (p {p23:.4f}) | 2 |"
    p13 = stats.ttest_ind(errors["dae", 3], errors["dae", 1], equal_var=False).pvalue
    assert table_rows[2] == f"| dae | – | -0.49 (p {p13:.4f}) from 1 | 3 |"  # dae skipped depth 2
    assert not any(r.startswith("| shallow |") and "->" in r for r in table_rows[:3])  # one depth: no trend
    spread = table_rows[3:]
    assert spread[0] == "| condition | depth 1 | depth 3 |"  # the depths another arm shares with none
    sd = {k: np.std(v, ddof=1) for k, v in errors.items()}
    assert spread[1] == f"| none | {sd['none', 1]:.2f} | {sd['none', 3]:.2f} |"
    lev = stats.levene(errors["dae", 3], errors["none", 3], center="median").pvalue
    assert spread[2].startswith("| dae | ") and spread[2].endswith(f" | {sd['dae', 3]:.2f} (p {lev:.4f}) |")
    assert lev < 0.05  # the baseline's depth-3 cell is the wide one
    assert spread[3].startswith("| shallow | 0.09 (p ") and spread[3].endswith(" | – |")
    one_depth = [r for r in rows if r["depth"] == 1]
    assert depth_markdown(one_depth) == [] and "## Depth" not in markdown(one_depth)
    two_seeds = [r for r in rows if r["seed"] < 2]  # two values lie equally far from their median
    assert "(p " not in depth_markdown(two_seeds)[-1] and "| dae | 0.07 | 0.07 |" in depth_markdown(two_seeds)
