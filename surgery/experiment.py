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
import hashlib
import json
import math
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from .errors import SurgeryError
from .io import progress_bar, write_json, write_text
from .layers import check_activation

ArmMethod = Literal["none", "rbm", "grbm", "ae", "dae", "sparse_ae", "grow"]


class ConvLayer(BaseModel):
    """A convolutional first layer: ``maps`` feature maps of ``kernel_size`` with ``stride``;
    pretrained arms pretrain it as a convolutional autoencoder."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    maps: int = Field(default=16, gt=0)
    kernel_size: int = Field(default=5, gt=0)
    stride: int = Field(default=2, gt=0)


class ArmConfig(BaseModel):
    """One arm. ``method`` pretrains every hidden layer (``none``: random classic init)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: ArmMethod = "none"
    train: Literal["all", "new"] = Field(default="all", description="grow only")
    layer: dict[str, Any] = Field(default_factory=dict, description="overrides for each pretrain.layers entry")
    finetune: dict[str, Any] = Field(default_factory=dict, description="overrides for the finetune section")
    hidden: int | None = Field(default=None, gt=0, description="units per hidden layer (default: experiment.hidden)")
    activation: str | None = None
    fixed_depth: int | None = Field(default=None, gt=0, description="run only this depth (shallow arms)")
    conv: ConvLayer | None = Field(default=None, description="make the first hidden layer convolutional (needs data.flatten: false)")
    data: dict[str, Any] = Field(default_factory=dict, description="overrides for the data section")

    @field_validator("activation")
    @classmethod
    def _act(cls, v: str | None) -> str | None:
        return None if v is None else check_activation(v)


BUILTIN_ARMS: dict[str, ArmConfig] = {
    "none": ArmConfig(method="none"),
    "rbm": ArmConfig(method="rbm"),
    "dae": ArmConfig(method="dae"),
    "ae": ArmConfig(method="ae"),
    "grow": ArmConfig(method="grow", train="all"),
    "grow-frozen": ArmConfig(method="grow", train="new"),
    "shallow": ArmConfig(method="none", fixed_depth=1),
}


class ExperimentConfig(BaseModel):
    """The ``experiment:`` recipe section."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    conditions: list[str] | dict[str, ArmConfig] = Field(description="built-in arm names, or name -> arm")
    depths: list[int] = Field(default=[1, 2, 3], min_length=1)
    seeds: list[int] = Field(default=[0], min_length=1)
    hidden: int = Field(default=500, gt=0)
    activation: str = "sigmoid"
    shallow_hidden: int | None = Field(default=None, gt=0, description="units of the shallow arm (default: hidden)")
    pretrain_epochs: int = Field(default=5, ge=0)
    pretrain_batch_size: int = Field(default=100, gt=0)
    methods: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="per-method layer defaults, e.g. {rbm: {lr: 0.05}}"
    )
    baseline: str = Field(default="none", description="the arm every other is tested against")

    _a = field_validator("activation")(classmethod(lambda cls, v: check_activation(v)))

    @field_validator("conditions")
    @classmethod
    def _known(cls, v: list[str] | dict[str, ArmConfig]) -> list[str] | dict[str, ArmConfig]:
        if isinstance(v, list):
            if not v:
                raise ValueError("conditions is empty; name at least one arm")
            bad = [c for c in v if c not in BUILTIN_ARMS]
            if bad:
                raise ValueError(f"unknown arm(s) {bad}; built-in arms are {sorted(BUILTIN_ARMS)} (or give a mapping)")
            if len(set(v)) != len(v):
                raise ValueError("conditions repeat an arm")
        return v

    @field_validator("depths")
    @classmethod
    def _depths(cls, v: list[int]) -> list[int]:
        if any(d < 1 for d in v):
            raise ValueError(f"depths {v} must all be >= 1")
        return sorted(set(v))

    def arms(self) -> dict[str, ArmConfig]:
        if isinstance(self.conditions, list):
            return {c: BUILTIN_ARMS[c] for c in self.conditions}
        return dict(self.conditions)


DEFAULT_LAYER = {
    "rbm": {"lr": 0.05, "momentum": 0.5},
    "grbm": {"lr": 0.005, "momentum": 0.5},
    "ae": {"lr": 0.01, "momentum": 0.9},
    "dae": {"lr": 0.01, "momentum": 0.9, "noise": 0.25},
    "sparse_ae": {"lr": 0.01, "momentum": 0.9},
    "grow": {"lr": 0.1, "momentum": 0.9},
}


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


class Cell(BaseModel):
    condition: str
    depth: int
    seed: int
    recipe: dict[str, Any]
    pretrain_key: str | None

    @property
    def key(self) -> str:
        return _hash(self.recipe)


def plan_cells(recipe: Any, input_shape: tuple[int, ...], classes: int) -> list[Cell]:
    """Materialise every (arm, depth, seed) cell as a full recipe dict."""
    exp: ExperimentConfig = recipe.experiment
    if recipe.finetune is None:
        raise SurgeryError("experiment: a comparison needs a finetune: section (the budget every arm gets).")
    base = recipe.to_dict()
    for k in ("experiment", "pretrain", "surgery", "search"):
        base.pop(k, None)
    cells = []
    for name, arm in exp.arms().items():
        depths = [arm.fixed_depth] if arm.fixed_depth else exp.depths
        hidden = arm.hidden or (exp.shallow_hidden if arm.fixed_depth and exp.shallow_hidden else exp.hidden)
        act = arm.activation or exp.activation
        if arm.conv is not None and arm.data.get("flatten", base["data"].get("flatten", True)):
            raise SurgeryError(f"experiment.conditions.{name}.conv: a conv first layer needs images; add data: {{flatten: false}} to the arm.")
        for seed in exp.seeds:
            max_d = max(depths)
            pre = None
            if arm.method != "none":
                layer = {"method": arm.method, "hidden": hidden, "epochs": exp.pretrain_epochs,
                         **DEFAULT_LAYER.get(arm.method, {}), **exp.methods.get(arm.method, {}), **arm.layer}
                if arm.method == "grow":
                    layer["train"] = arm.train
                if arm.method not in ("rbm", "grbm"):
                    layer.setdefault("activation", act)
                layers = [dict(layer) for _ in range(max_d)]
                if arm.conv is not None:
                    c = arm.conv
                    first = {"method": "conv_ae", "hidden": c.maps, "kernel_size": c.kernel_size, "stride": c.stride,
                             "epochs": exp.pretrain_epochs, "lr": 0.01, "activation": act}
                    layers[0] = {**first, **exp.methods.get("conv_ae", {})}
                pre = {"batch_size": exp.pretrain_batch_size, "layers": layers}
            for depth in depths:
                r = json.loads(json.dumps(base))
                r["seed"] = seed
                r["name"] = f"{name}-d{depth}-s{seed}"
                ft = r.get("finetune", {})
                ft.update(arm.finetune)
                r["finetune"] = ft
                r["data"] = {**r["data"], **arm.data}
                classes_hint = {"op": "head", "classes": classes}
                if pre is not None:
                    r["pretrain"] = pre
                    r["surgery"] = {"ops": [{"op": "take", "source": "pretrained", "layers": [0, depth]}, classes_hint]}
                else:
                    ops: list[dict[str, Any]] = []
                    for i in range(depth):
                        op: dict[str, Any] = {"op": "insert", "name": f"h{i + 1}", "units": hidden, "activation": act}
                        if i == 0 and arm.conv is not None:
                            c = arm.conv
                            img = input_shape if len(input_shape) == 3 else (1, *(2 * (int(math.isqrt(math.prod(input_shape))),)))
                            op.update(kind="conv2d", units=c.maps, kernel_size=c.kernel_size, stride=c.stride, in_shape=list(img))
                        elif i == 0:
                            op["in_features"] = math.prod(input_shape)
                        ops.append(op)
                    r["surgery"] = {"ops": [*ops, classes_hint]}
                pkey = _hash({"data": r["data"], "pretrain": pre, "seed": seed}) if pre else None
                cells.append(Cell(condition=name, depth=depth, seed=seed, recipe=r, pretrain_key=pkey))
    return cells


RESULT_FIELDS = ["condition", "depth", "seed", "train_error", "valid_error", "test_error", "epochs",
                 "best_epoch", "pretrain_seconds", "finetune_seconds", "cell", "path"]


def run_experiment(recipe: Any, out: str | Path, progress: bool | None = None) -> list[dict[str, Any]]:
    """Run every cell not yet finished under ``out``; write results.csv and the report."""
    from .data import load_dataset
    from .finetune import Trainer
    from .ops import build_graph
    from .pipeline import load_sources
    from .pretrain import greedy_pretrain
    from .recipe import recipe_from_dict
    from .report import write_report
    from .stack import LayerStack

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
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
            r = recipe_from_dict(cell.recipe, recipe.base_dir, f"{recipe._source} [{cell.condition} d{cell.depth} s{cell.seed}]")
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
                    write_json(sdir / "pretrain.json", {"seconds": round(time.perf_counter() - t0, 3), "layers": len(st)})
                stack = LayerStack.load(spath)
                meta = json.loads((sdir / "pretrain.json").read_text())
                pre_s = meta["seconds"] * cell.depth / max(meta["layers"], 1)
            else:
                pre_s = 0.0
            assert r.surgery is not None and r.finetune is not None
            graph = build_graph(r.surgery, load_sources(r, stack), r.seed)
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
    write_report(out, rows, baseline=recipe.experiment.baseline)
    return rows


def write_results_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    import io

    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=RESULT_FIELDS)
    w.writeheader()
    for r in rows:
        w.writerow({k: r.get(k) for k in RESULT_FIELDS})
    write_text(path, buf.getvalue())


def read_results(dirs: list[Path]) -> list[dict[str, Any]]:
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
