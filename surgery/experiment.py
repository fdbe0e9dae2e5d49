"""Comparisons: conditions (arms) x depths x seeds, each cell a full recipe.

Every arm of a seed sees the same data order (the fine-tuning shuffle is seeded by the
seed alone) and the same fine-tuning budget; the no-pretraining arm starts from the
classic initialisation for its activation. A cell's results live under a hash of its full
config, so finished cells are skipped when a comparison is re-run. Greedy stacks are
trained once per (arm, seed) at the largest depth; the depth-d stack is the snapshot
after its d-th layer, which for layer-wise methods is exactly what a depth-d run trains.
"""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path
from typing import Any

from .assembly import build_graph
from .data import load_dataset
from .errors import SurgeryError
from .finetune import Trainer
from .grid import plan_cells
from .io import make_dir, progress_bar, write_json, write_text
from .pipeline import load_sources
from .pretrain import greedy_pretrain
from .recipe import Recipe, recipe_from_dict
from .stack import LayerStack

RESULT_FIELDS = ["condition", "depth", "seed", "train_error", "valid_error", "test_error", "epochs",
                 "best_epoch", "pretrain_seconds", "finetune_seconds", "cell", "path"]


def run_experiment(recipe: Recipe, out: str | Path, progress: bool | None = None) -> list[dict[str, Any]]:
    """Run every cell not yet finished under ``out``; write ``results.csv`` and return its rows.

    The report (tables, figures) is :func:`surgery.report.write_report`'s job."""
    out = Path(out)
    make_dir(out)
    data = load_dataset(recipe.data, recipe.base_dir)
    cells = plan_cells(recipe, data.input_shape, data.num_classes)
    datasets = {json.dumps(recipe.data.model_dump(mode="json"), sort_keys=True): data}
    write_json(out / "experiment.json", {"recipe": recipe.to_dict(), "cells": len(cells)})
    rows = []
    bar = progress_bar(len(cells), "experiment", progress, "cell")
    for cell in cells:
        cdir = out / "cells" / cell.key
        res_path = cdir / "result.json"
        if res_path.is_file():
            result = json.loads(res_path.read_text())
        else:
            r = recipe_from_dict(cell.recipe, recipe.base_dir, f"{recipe.source} [{cell.condition} d{cell.depth} "
                                                               f"s{cell.seed}]")
            dkey = json.dumps(r.data.model_dump(mode="json"), sort_keys=True)
            if dkey not in datasets:  # an arm with its own data section (e.g. images for a conv layer)
                datasets[dkey] = load_dataset(r.data, recipe.base_dir)
            data = datasets[dkey]
            t0 = time.perf_counter()
            stack = None
            if cell.pretrain_key is not None:
                sdir = out / "stacks" / cell.pretrain_key
                spath = sdir / f"depth{cell.depth}.safetensors"
                if not (spath.is_file() and (sdir / "pretrain.json").is_file()):  # pretrain.json marks it finished
                    assert r.pretrain is not None

                    def snapshot(i: int, st: LayerStack, sdir: Path = sdir) -> None:
                        st.save(sdir / f"depth{i + 1}.safetensors")

                    st = greedy_pretrain(data.train.x, r.pretrain, r.seed, y=data.train.y, progress=progress,
                                         data_fingerprint=data.fingerprint(), on_layer=snapshot)
                    seconds = round(time.perf_counter() - t0, 3)
                    write_json(sdir / "pretrain.json", {"seconds": seconds, "layers": len(st)})
                stack = LayerStack.load(spath)
                meta = json.loads((sdir / "pretrain.json").read_text())
                pre_s = meta["seconds"] * cell.depth / max(meta["layers"], 1)
            else:
                pre_s = 0.0
            assert r.surgery is not None and r.finetune is not None
            graph = build_graph(r.surgery, load_sources(r, stack), r.seed, data.input_shape)
            result = Trainer(graph, data, r.finetune, r.seed, cdir).fit()
            result["finetune_seconds"] = result.pop("seconds")
            result["pretrain_seconds"] = round(pre_s, 3)
            result.update(condition=cell.condition, depth=cell.depth, seed=cell.seed, cell=cell.key)
            write_json(cdir / "recipe.json", cell.recipe)
            write_json(res_path, result)  # written last: its presence marks the cell finished
        row = {k: result.get(k) for k in RESULT_FIELDS}
        row.update(condition=cell.condition, depth=cell.depth, seed=cell.seed, cell=cell.key, path=str(cdir))
        rows.append(row)
        bar.update(1)
        bar.set_postfix(last=f"{cell.condition} d{cell.depth} {result['test_error']:.2f}%")
    bar.close()
    write_results_csv(out / "results.csv", rows)
    return rows


def write_results_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    """Write the result rows to ``path`` (CSV, atomically)."""
    import io

    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=RESULT_FIELDS)
    w.writeheader()
    for r in rows:
        w.writerow({k: r.get(k) for k in RESULT_FIELDS})
    write_text(path, buf.getvalue())


def read_results(dirs: list[Path]) -> list[dict[str, Any]]:
    """The result rows of one or more experiment directories; later directories win for
    the same (condition, depth, seed)."""
    rows = []
    for d in dirs:
        p = d / "results.csv"
        if not p.is_file():
            raise SurgeryError(f"{d}: no results.csv; run `surgery run RECIPE --out {d}` first.")
        with p.open() as f:
            for r in csv.DictReader(f):
                for k in ("depth", "seed", "epochs", "best_epoch"):
                    r[k] = int(r[k]) if r.get(k) not in (None, "") else None
                for k in ("train_error", "valid_error", "test_error", "pretrain_seconds", "finetune_seconds"):
                    r[k] = float(r[k]) if r.get(k) not in (None, "") else None
                rows.append(r)
    # Later directories win for the same (condition, depth, seed).
    merged = {(r["condition"], r["depth"], r["seed"]): r for r in rows}
    return list(merged.values())
