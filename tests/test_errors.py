"""Bad input through every command, not only `validate`: exit status 2, one paragraph that
names the file, field or layer, no traceback, and nothing already written is lost."""

from __future__ import annotations

import csv
import gzip
import json
import os
import pickle
import shutil
import struct
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import surgery as S
from surgery.cli import main
from surgery.errors import SurgeryWarning
from tests.helpers import random_stack

ROOT = Path(__file__).resolve().parents[1]
TAKE_A = [{"op": "take", "source": "a"}, {"op": "head", "classes": 4}]
SMALL_FT = {"epochs": 2, "batch_size": 100, "device": "cpu", "checkpoint_every": 1, "progress": False}


def _write(path: Path, recipe: dict) -> Path:
    path.write_text(yaml.safe_dump(recipe))
    return path


def _net_recipe(units: int = 16) -> dict:
    return {"data": {"dataset": "synthetic", "n_train": 400},
            "surgery": {"ops": [{"op": "insert", "name": "h1", "units": units}, {"op": "head", "classes": 4}]},
            "finetune": SMALL_FT}


def _idx_dir(d: Path, bad: str) -> Path:
    """An IDX directory whose training images file is broken as ``bad`` says."""
    d.mkdir()
    imgs = np.zeros((20, 4, 4), np.uint8)
    labels = np.arange(20, dtype=np.uint8) % 4
    for stem, arr in (("train-images-idx3-ubyte", imgs), ("train-labels-idx1-ubyte", labels),
                      ("t10k-images-idx3-ubyte", imgs), ("t10k-labels-idx1-ubyte", labels)):
        header = struct.pack(">I", 0x0800 + arr.ndim) + b"".join(struct.pack(">I", n) for n in arr.shape)
        (d / stem).write_bytes(header + arr.tobytes())
    target = d / "train-images-idx3-ubyte"
    if bad == "magic":
        target.write_bytes(b"\x12\x34\x56\x78" + target.read_bytes()[4:])
    elif bad == "truncated":
        target.write_bytes(target.read_bytes()[:6])
    elif bad == "gzip":
        (d / "train-images-idx3-ubyte.gz").write_bytes(b"not gzip at all")
        target.unlink()
    return d


class Evil:
    """Unpickling this would run a command; no load path may ever do that."""

    def __reduce__(self):
        return (os.system, ("touch PWNED",))


# Each case: (setup(tmp) -> argv, fragment the message must contain, files that must survive unchanged)
Case = Callable[[Path], tuple[list[str], str, list[Path]]]


def conv_on_flat(tmp: Path):
    r = _write(tmp / "r.yaml", {"data": {"dataset": "synthetic", "n_train": 200},
                                "pretrain": {"layers": [{"method": "conv_ae", "hidden": 4, "epochs": 1}]}})
    return ["pretrain", str(r), "-o", str(tmp / "s.safetensors")], "conv_ae needs image input", []


def stack_given_as_recipe(tmp: Path):
    p = random_stack(sizes=(64, 8)).save(tmp / "s.safetensors")
    return ["run", str(p), "--out", str(tmp / "out")], "not a text file (byte", [p]


def truncated_stack(tmp: Path):
    p = random_stack(sizes=(64, 8)).save(tmp / "s.safetensors")
    p.write_bytes(p.read_bytes()[:200])
    return ["inspect", str(p)], "truncated or corrupt", [p]


def _edited_manifest(tmp: Path, edit: Callable[[dict], None]) -> Path:
    """A stack whose manifest was edited as ``edit`` does (the tensors untouched)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    p = random_stack(sizes=(64, 8, 4)).save(tmp / "s.safetensors")
    with safe_open(str(p), "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    manifest = json.loads(meta["surgery.manifest"])
    edit(manifest)
    save_file(tensors, str(p), metadata={"surgery.manifest": json.dumps(manifest)})
    return p


def manifest_layer_name_a_list(tmp: Path):
    p = _edited_manifest(tmp, lambda m: m["layers"][1].update(name=[1, 2]))
    return ["inspect", str(p)], "the surgery manifest is damaged (layers.1.name: Input should be a valid string)", [p]


def manifest_without_out_shape(tmp: Path):
    p = _edited_manifest(tmp, lambda m: m["layers"][0].pop("out_shape"))
    r = {**_net_recipe(), "surgery": {"sources": {"a": str(p)}, "ops": TAKE_A}}
    return ["run", str(_write(tmp / "r.yaml", r)), "--out", str(tmp / "out")], \
        "surgery.sources.a: " + str(p) + ": the surgery manifest is damaged (layers.0.out_shape: Field required)", [p]


def garbage_stack(tmp: Path):
    p = tmp / "s.safetensors"
    p.write_bytes(os.urandom(4096))
    return ["inspect", str(p)], "s.safetensors", [p]


def missing_stack(tmp: Path):
    return ["inspect", str(tmp / "nope.safetensors")], "nope.safetensors: no such file", []


def pickle_runs_code(tmp: Path):
    p = tmp / "evil.safetensors"
    p.write_bytes(pickle.dumps(Evil()))
    return ["inspect", str(p)], "evil.safetensors", [p]


def pickle_as_foreign_source(tmp: Path):
    p = tmp / "evil.pt"
    p.write_bytes(pickle.dumps({"w": Evil()}))
    r = _net_recipe()
    r["surgery"] = {"sources": {"x": {"path": "evil.pt", "map": {"w": "h1.weight"}}},
                    "ops": [{"op": "import", "source": "x", "layers": ["h1"]}, {"op": "head", "classes": 4}]}
    return ["run", str(_write(tmp / "r.yaml", r)), "--out", str(tmp / "out")], "weights_only=True", [p]


def truncated_checkpoint(tmp: Path):
    r = _write(tmp / "r.yaml", _net_recipe())
    assert main(["finetune", str(r), "--out", str(tmp / "out")]) == 0
    ck = tmp / "out" / "checkpoints" / "last.safetensors"
    ck.write_bytes(ck.read_bytes()[:300])  # a finished run's result is given without it: ask for more epochs
    more = f"finetune.epochs={SMALL_FT['epochs'] + 1}"
    return ["finetune", str(r), "--out", str(tmp / "out"), "--resume", "--set", more], "unreadable checkpoint", [
        ck, tmp / "out" / "assembled.safetensors", tmp / "out" / "result.json"]


def checkpoint_of_another_network(tmp: Path):
    r = _write(tmp / "r.yaml", _net_recipe(16))
    assert main(["finetune", str(r), "--out", str(tmp / "out")]) == 0
    r2 = _write(tmp / "r2.yaml", _net_recipe(24))
    out = tmp / "out"
    return (["finetune", str(r2), "--out", str(out), "--resume"],
            "different shape: h1.weight (16, 64) in the checkpoint, (24, 64) in the model",
            [out / "checkpoints" / "last.safetensors", out / "assembled.safetensors", out / "model.safetensors"])


def resume_without_checkpoint(tmp: Path):
    model = tmp / "m.safetensors"
    S.save_model(S.build_graph([S.InsertOp(name="h1", units=8, in_features=64), S.HeadOp(classes=4)]), model)
    r = _write(tmp / "r.yaml", _net_recipe())
    return (["finetune", str(r), "--model", str(model), "--out", str(tmp / "out"), "--resume"],
            "no checkpoint at", [model])


def model_of_other_width(tmp: Path):
    model = tmp / "m.safetensors"
    S.save_model(S.build_graph([S.InsertOp(name="h1", units=8, in_features=32), S.HeadOp(classes=4)]), model)
    r = _write(tmp / "r.yaml", _net_recipe())
    return (["finetune", str(r), "--model", str(model), "--out", str(tmp / "out")],
            "the network takes input (32,) but the data 'synthetic' gives (64,)", [model])


def evaluate_a_model_of_other_width(tmp: Path):
    argv, said, keep = model_of_other_width(tmp)
    return ["evaluate", argv[1], argv[3]], said, keep


def evaluate_a_stack(tmp: Path):
    p = random_stack(sizes=(64, 8)).save(tmp / "s.safetensors")
    return ["evaluate", str(_write(tmp / "r.yaml", _net_recipe())), str(p)], "this is a layer stack, not an", [p]


def evaluate_model_before_recipe(tmp: Path):
    r = _write(tmp / "r.yaml", _net_recipe())
    p = random_stack(sizes=(64, 8)).save(tmp / "s.safetensors")
    return ["evaluate", str(p), str(r)], f"takes the recipe first, then the model: `surgery evaluate {r} {p}`", [p, r]


def stack_given_as_model(tmp: Path):
    p = random_stack(sizes=(64, 8)).save(tmp / "s.safetensors")
    r = _write(tmp / "r.yaml", _net_recipe())
    return ["finetune", str(r), "--model", str(p), "--out", str(tmp / "out")], "layer stack", [p]


def _idx_case(bad: str, fragment: str) -> Case:
    def case(tmp: Path):
        _idx_dir(tmp / "idx", bad)
        r = _net_recipe()
        r["data"] = {"dataset": "idx", "path": "idx", "valid_size": 4}
        return ["run", str(_write(tmp / "r.yaml", r)), "--out", str(tmp / "out")], fragment, []
    return case


def unwritable_out(tmp: Path):
    blocker = tmp / "file"
    blocker.write_text("a file where a directory should be")
    r = _write(tmp / "r.yaml", _net_recipe())
    return ["run", str(r), "--out", str(blocker / "out")], "file is a file, not a directory", [blocker]


def unwritable_stack_output(tmp: Path):
    blocker = tmp / "file"
    blocker.write_text("x")
    r = _write(tmp / "r.yaml", {"data": {"dataset": "synthetic", "n_train": 200},
                                "pretrain": {"layers": [{"method": "rbm", "hidden": 4, "epochs": 1}]}})
    return ["pretrain", str(r), "-o", str(blocker / "s.safetensors")], "cannot create the directory", [blocker]


def too_long_stack_output(tmp: Path):
    r = _write(tmp / "r.yaml", {"data": {"dataset": "synthetic", "n_train": 200},
                                "pretrain": {"layers": [{"method": "rbm", "hidden": 4, "epochs": 1}]}})
    return ["pretrain", str(r), "-o", str(tmp / ("s" * 300 + ".safetensors"))], "(File name too long); give a " \
        "shorter path", [r]


def too_long_out(tmp: Path):
    r = _write(tmp / "r.yaml", _net_recipe())
    return ["run", str(r), "--out", str(tmp / ("o" * 300))], "(File name too long); give a shorter path", [r]


def unwritable_model_output(tmp: Path):
    blocker = tmp / "file"
    blocker.write_text("x")
    r = _write(tmp / "r.yaml", {"data": {"dataset": "synthetic", "n_train": 200},
                                "pretrain": {"layers": [{"method": "rbm", "hidden": 4, "epochs": 1}]},
                                "surgery": {"ops": [{"op": "take", "source": "pretrained"},
                                                    {"op": "head", "classes": 4}]}})
    return ["assemble", str(r), "-o", str(blocker / "m.safetensors")], "cannot create the directory", [blocker]


def corrupt_source_stack(tmp: Path):
    p = tmp / "a.safetensors"
    p.write_bytes(b"\x00" * 64)
    r = _net_recipe()
    r["surgery"] = {"sources": {"a": "a.safetensors"}, "ops": TAKE_A}
    return ["run", str(_write(tmp / "r.yaml", r)), "--out", str(tmp / "out")], "surgery.sources.a", [p]


def nothing_trains(tmp: Path):
    r = _net_recipe()
    r["finetune"] = {**SMALL_FT, "unfreeze_at": {"h1": 0}, "freeze_at": {"*": 1}}
    return ["run", str(_write(tmp / "r.yaml", r)), "--out", str(tmp / "out")], "no layer trains in epoch 2", []


def diverging_loss(tmp: Path):
    st = random_stack(sizes=(64, 16), act="relu")
    st[0].tensors["weight"].fill_(3e38)
    st.save(tmp / "a.safetensors")
    r = _net_recipe()
    r["surgery"] = {"sources": {"a": "a.safetensors"}, "ops": TAKE_A}
    return ["run", str(_write(tmp / "r.yaml", r)), "--out", str(tmp / "out")], "NaN or infinite in epoch 1", []


def unknown_device_at_run(tmp: Path):
    r = _net_recipe()
    r["finetune"] = {**SMALL_FT, "device": "tpu"}
    return ["run", str(_write(tmp / "r.yaml", r)), "--out", str(tmp / "out")], "device: 'tpu'", []


def _absent_gpu(r: dict) -> dict:
    """``r`` fine-tuning on a GPU no test machine has (none on a CPU one, not a 8th on a GPU one)."""
    return {**r, "finetune": {**r["finetune"], "device": "cuda:7"}}


def experiment_on_an_absent_gpu(tmp: Path):
    r = _net_recipe()
    del r["surgery"]
    r["experiment"] = {"conditions": ["none", "rbm"], "depths": [1], "hidden": 8, "pretrain_epochs": 1}
    argv = ["run", str(_write(tmp / "r.yaml", _absent_gpu(r))), "--out", str(tmp / "out")]
    return argv, "finetune.device: 'cuda:7'", []


HUGE = 10**12  # units: a weight no machine holds, refused before torch tries to allocate it


def pretrain_layer_too_big(tmp: Path):
    r = _net_recipe()
    r["pretrain"] = {"layers": [{"method": "rbm", "hidden": 8, "epochs": 1}, {"method": "dae", "hidden": HUGE}]}
    return ["pretrain", str(_write(tmp / "r.yaml", r)), "-o", str(tmp / "s.safetensors")], \
        f"pretrain.layers[1]: a dense layer of {HUGE} units on 8 inputs needs a {HUGE}x8 weight of", []


def widened_layer_too_big(tmp: Path):
    r = _net_recipe()
    r["surgery"]["ops"].insert(1, {"op": "widen", "node": "h1", "units": HUGE})
    return ["run", str(_write(tmp / "r.yaml", r)), "--out", str(tmp / "out")], \
        f"surgery.ops[1] (widen): a dense layer of {HUGE} units on 64 inputs", []


def experiment_layers_too_big(tmp: Path):
    r = _net_recipe()
    del r["surgery"]
    r["experiment"] = {"conditions": ["none"], "depths": [1], "hidden": HUGE}
    return ["run", str(_write(tmp / "r.yaml", r)), "--out", str(tmp / "out")], "more than this machine's", []


def search_on_an_absent_gpu(tmp: Path):
    r = _net_recipe()
    r["search"] = {"trials": 2, "params": {"finetune.optimizer.lr": {"low": 0.01, "high": 0.1}}}
    return (["search", str(_write(tmp / "r.yaml", _absent_gpu(r))), "--out", str(tmp / "out")],
            "finetune.device: 'cuda:7'", [])


def missing_data_file(tmp: Path):
    r = _net_recipe()
    r["data"] = {"dataset": "mnist", "path": "no-such.pkl.gz"}
    return ["run", str(_write(tmp / "r.yaml", r)), "--out", str(tmp / "out")], "no-such.pkl.gz", []


def truncated_mnist_pickle(tmp: Path):
    p = tmp / "mnist.pkl.gz"
    p.write_bytes(gzip.compress(b"\x80\x04\x95"))
    r = _net_recipe()
    r["data"] = {"dataset": "mnist", "path": "mnist.pkl.gz"}
    return ["run", str(_write(tmp / "r.yaml", r)), "--out", str(tmp / "out")], "mnist.pkl.gz", [p]


def experiment_with_unwritable_out(tmp: Path):
    blocker = tmp / "file"
    blocker.write_text("x")
    r = _net_recipe()
    del r["surgery"]
    r["experiment"] = {"conditions": ["none"], "depths": [1], "hidden": 8}
    argv = ["run", str(_write(tmp / "r.yaml", r)), "--out", str(blocker / "x")]
    return argv, "cannot create the directory", [blocker]


def compare_a_single_run(tmp: Path):
    r = _write(tmp / "r.yaml", _net_recipe())
    assert main(["run", str(r), "--out", str(tmp / "one")]) == 0
    return ["compare", str(tmp / "one")], "a single run's directory, not an experiment's", [tmp / "one" / "result.json"]


def compare_an_unfinished_experiment(tmp: Path):
    (tmp / "half" / "cells" / "abc").mkdir(parents=True)
    (tmp / "half" / "experiment.json").write_text('{"cells": 4}')
    return ["compare", str(tmp / "half")], "an experiment that has not finished", [tmp / "half" / "experiment.json"]


def compare_a_results_file(tmp: Path):
    (tmp / "exp").mkdir()
    csv = tmp / "exp" / "results.csv"
    csv.write_text("condition,depth,seed,test_error\nnone,1,0,2.0\n")
    return ["compare", str(csv)], f"a file, not an experiment directory (its directory is {tmp / 'exp'})", [csv]


def _damaged_results(tmp: Path, text: bytes, fragment: str, finished: int = 0) -> Case:
    """An experiment directory whose results.csv holds ``text`` (it raised UnicodeDecodeError,
    TypeError or ValueError), beside ``finished`` cells' results."""
    (tmp / "grid").mkdir()
    (tmp / "grid" / "experiment.json").write_text('{"cells": 2}')
    for k in range(finished):
        (tmp / "grid" / "cells" / f"c{k}").mkdir(parents=True)
        (tmp / "grid" / "cells" / f"c{k}" / "result.json").write_text('{"test_error": 2.0}')
    (tmp / "grid" / "results.csv").write_bytes(text)
    return ["compare", str(tmp / "grid")], fragment, [tmp / "grid" / "results.csv"]


HEADER = b"condition,depth,seed,train_error,valid_error,test_error,epochs,best_epoch\n"


def compare_against_no_arm_merged(tmp: Path):
    """A misspelt --baseline: refused before the merge's directory is made."""
    _damaged_results(tmp, HEADER + b"none,1,0,1.0,2.0,3.0,1,1\nrbm,1,0,1.0,2.0,2.5,1,1\n", "")
    argv = ["compare", str(tmp / "grid"), "--out", str(tmp / "merged"), "--baseline", "nnoe"]
    return argv, "compare: --baseline 'nnoe' is none of the arms merged (none, rbm); name one of them", [
        tmp / "grid" / "results.csv"]


def _damaged_tuning(tmp: Path, text: str, fragment: str) -> Case:
    """An experiment directory whose tuning.json was edited into ``text`` (KeyError in compare)."""
    _damaged_results(tmp, HEADER + b"none,1,0,1.0,2.0,3.0,1,1\n", "")
    (tmp / "grid" / "tuning.json").write_text(text)
    return ["compare", str(tmp / "grid")], fragment, [tmp / "grid" / "tuning.json"]


def _damaged_meta(tmp: Path, text: str, fragment: str) -> Case:
    """An experiment directory whose experiment.json was edited into ``text`` (a recipe that
    is not an object was an AttributeError in compare and inspect); inspect still reads it."""
    _damaged_results(tmp, HEADER + b"none,1,0,1.0,2.0,3.0,1,1\n", "")
    (tmp / "grid" / "experiment.json").write_text(text)
    assert main(["inspect", str(tmp / "grid")]) == 0
    return ["compare", str(tmp / "grid")], fragment, [tmp / "grid" / "experiment.json"]


def _tuned_experiment(params: dict) -> dict:
    r = _net_recipe()
    del r["surgery"]
    r["experiment"] = {"conditions": ["none", "rbm"], "depths": [1], "hidden": 8, "pretrain_epochs": 1,
                       "tune": {"trials": 2, "params": params}}
    return r


def tuned_path_not_in_the_recipe(tmp: Path):
    r = _tuned_experiment({"finetune.optimizer.lrr": {"low": 0.01, "high": 0.1}})
    return (["run", str(_write(tmp / "r.yaml", r)), "--out", str(tmp / "out")],
            "[none d1] with experiment.tune.params['finetune.optimizer.lrr']", [])


def tuned_layer_the_stack_lacks(tmp: Path):
    r = _tuned_experiment({"pretrain.layers.3.lr": {"low": 0.01, "high": 0.1}})
    return (["validate", str(_write(tmp / "r.yaml", r))],
            "experiment.tune.params['pretrain.layers.3.lr'] [rbm d1]: '3' is not an index", [])


def tuned_choice_out_of_range(tmp: Path):
    r = _tuned_experiment({"finetune.batch_size": {"type": "categorical", "choices": [10, 0]}})
    return (["run", str(_write(tmp / "r.yaml", r)), "--out", str(tmp / "out")],
            "finetune.batch_size: Input should be greater than 0 (got 0)", [])


def searched_path_not_in_the_recipe(tmp: Path):
    r = _net_recipe()
    r["search"] = {"trials": 2, "params": {"finetune.optimizer.momentm": {"low": 0.5, "high": 0.9}}}
    return (["search", str(_write(tmp / "r.yaml", r)), "--out", str(tmp / "out")],
            "with search.params['finetune.optimizer.momentm']", [])


def _search(tmp: Path, *more: str) -> list[str]:
    r = _net_recipe()
    r["search"] = {"trials": 1, "params": {"finetune.optimizer.lr": {"low": 0.05, "high": 0.1}}}
    return ["search", str(_write(tmp / "r.yaml", r)), "--out", str(tmp / "out"), *more]


def search_storage_of_no_known_database(tmp: Path):
    return (_search(tmp, "--storage", "nosuchdb://x"),
            "--storage nosuchdb://x: cannot open the study (NoSuchModuleError: Can't load plugin: sqlalchemy.dialects:"
            "nosuchdb); give an SQLAlchemy URL whose database driver is installed", [])


def search_storage_optuna_dropped(tmp: Path):
    return (_search(tmp, "--storage", "redis://localhost"),  # optuna once raised a ValueError: a traceback
            "--storage redis://localhost: cannot open the study (NoSuchModuleError: Can't load plugin: "
            "sqlalchemy.dialects:redis); give an SQLAlchemy URL", [])


def search_storage_damaged(tmp: Path):
    (tmp / "out").mkdir()
    (tmp / "out" / "search.db").write_bytes(b"not a database" * 100)
    return (_search(tmp), "search.db: cannot open the study (DatabaseError: (sqlite3.DatabaseError) file is not a "
            "database): the file is damaged. Move it away", [tmp / "out" / "search.db"])


def _run_dir(d: Path, kind: str) -> Path:
    """``d`` made to look like an experiment's, a single run's or a search's output directory;
    returns the file in it that a refused command must leave as it was."""
    sub, name, text = {"experiment": ("cells", "experiment.json", '{"cells": 4}'),
                       "single run": ("checkpoints", "result.json", '{"test_error": 1.0}'),
                       "search": ("trials", "search.json", '{"trials": []}')}[kind]
    (d / sub).mkdir(parents=True)
    (d / name).write_text(text)
    return d / name


def single_run_into_an_experiment_dir(tmp: Path):
    kept = _run_dir(tmp / "grid", "experiment")
    argv = ["run", str(_write(tmp / "r.yaml", _net_recipe())), "--out", str(tmp / "grid")]
    return argv, "holds an experiment's files", [kept]


def experiment_into_a_single_run_dir(tmp: Path):
    kept = _run_dir(tmp / "one", "single run")
    r = _net_recipe()
    del r["surgery"]
    r["experiment"] = {"conditions": ["none"], "depths": [1], "hidden": 8}
    argv = ["run", str(_write(tmp / "r.yaml", r)), "--out", str(tmp / "one")]
    return argv, "holds a single run's files", [kept]


def search_into_an_experiment_dir(tmp: Path):
    kept = _run_dir(tmp / "out", "experiment")
    return (_search(tmp), "holds an experiment's files (experiment.json, cells/, stacks/ or tuning/); a search's would "
            "go beside them. Give the search its own --out.", [kept])


def single_run_into_a_search_dir(tmp: Path):
    kept = _run_dir(tmp / "s", "search")
    argv = ["run", str(_write(tmp / "r.yaml", _net_recipe())), "--out", str(tmp / "s")]
    return argv, "holds a search's files (search.json, search.db or trials/)", [kept]


def _fine_tuned_model(path: Path) -> Path:
    from surgery.graph import ModelGraph
    from surgery.model_file import save_model
    from surgery.ops import HeadOp, InsertOp

    g = ModelGraph()
    InsertOp(name="h1", units=4, in_features=64).apply(g)
    HeadOp(classes=4).apply(g)
    return save_model(g, path, {"result": {"test_error": 1.0}})


def assemble_over_a_fine_tuned_model(tmp: Path):
    model = _fine_tuned_model(tmp / "model.safetensors")
    return (["assemble", str(_write(tmp / "r.yaml", _net_recipe())), "-o", str(model)],
            "model.safetensors: holds a fine-tuned model; writing the assembled (untrained) model there would lose it",
            [model])


def pretrain_over_a_model_or_foreign_weights(tmp: Path):
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(3)}, str(tmp / "theirs.safetensors"))
    r = _write(tmp / "r.yaml", {"data": {"dataset": "synthetic", "n_train": 200},
                                "pretrain": {"layers": [{"method": "rbm", "hidden": 4, "epochs": 1}]}})
    return (["pretrain", str(r), "-o", str(tmp / "theirs.safetensors")],
            "theirs.safetensors: holds another tool's weights; writing the stack there would lose it",
            [tmp / "theirs.safetensors"])


def rbm_on_standardized_data(tmp: Path):
    r = _net_recipe()
    del r["surgery"]
    r["data"] = {**r["data"], "normalize": "standardize"}
    r["pretrain"] = {"layers": [{"method": "rbm", "hidden": 8, "epochs": 1}]}
    return (["run", str(_write(tmp / "r.yaml", r)), "--out", str(tmp / "out")],
            "a Bernoulli RBM takes probabilities in [0, 1]", [])


def experiment_beside_a_network(tmp: Path):
    r = _net_recipe()  # its surgery: section would be ignored by the grid
    r["experiment"] = {"conditions": ["none"], "depths": [1], "hidden": 8}
    return (["validate", str(_write(tmp / "r.yaml", r))],
            "the surgery: section beside it would be ignored", [])


def experiment_recipe_to_finetune(tmp: Path):
    r = _net_recipe()
    del r["surgery"]
    r["experiment"] = {"conditions": ["none"], "depths": [1], "hidden": 8}
    return ["finetune", str(_write(tmp / "r.yaml", r)), "--out", str(tmp / "out")], "is an experiment grid", []


CASES: dict[str, Case] = {
    "finetune: an experiment recipe": experiment_recipe_to_finetune,
    "run: a tuned path that is no recipe field": tuned_path_not_in_the_recipe,
    "validate: an experiment beside a surgery: section": experiment_beside_a_network,
    "run: an RBM on standardized data": rbm_on_standardized_data,
    "run: a single run into an experiment's directory": single_run_into_an_experiment_dir,
    "run: an experiment into a single run's directory": experiment_into_a_single_run_dir,
    "search: into an experiment's directory": search_into_an_experiment_dir,
    "run: a single run into a search's directory": single_run_into_a_search_dir,
    "assemble: -o over a fine-tuned model": assemble_over_a_fine_tuned_model,
    "pretrain: -o over another tool's weights": pretrain_over_a_model_or_foreign_weights,
    "validate: a tuned layer the stack lacks": tuned_layer_the_stack_lacks,
    "run: a tuned choice out of range": tuned_choice_out_of_range,
    "search: a searched path that is no recipe field": searched_path_not_in_the_recipe,
    "search: a storage URL of no database it knows": search_storage_of_no_known_database,
    "search: a damaged study file": search_storage_damaged,
    "search: a storage optuna no longer has": search_storage_optuna_dropped,
    "compare: a single run's directory": compare_a_single_run,
    "compare: an unfinished experiment": compare_an_unfinished_experiment,
    "compare: its results.csv in place of the directory": compare_a_results_file,
    "compare: a baseline of no arm merged": compare_against_no_arm_merged,
    "compare: a results.csv of random bytes": lambda tmp: _damaged_results(
        tmp, bytes(range(128, 256)), "results.csv: not a readable CSV table ('utf-8' codec can't decode"),
    "compare: a results.csv without test errors": lambda tmp: _damaged_results(
        tmp, b"condition,depth,seed\nnone,1,0\n", "results.csv, line 2: no test_error; the file is damaged. Run its"),
    "compare: an emptied results.csv beside finished cells": lambda tmp: _damaged_results(
        tmp, b"", "results.csv: holds no result rows, but 2 cells under ", finished=2),
    "compare: a results.csv of a header alone": lambda tmp: _damaged_results(
        tmp, HEADER, "results.csv: holds no result rows; the file is damaged. Run its recipe again"),
    "compare: a results.csv with a word for a number": lambda tmp: _damaged_results(
        tmp, HEADER + b"none,1,0,1.0,2.0,3.0,x,1\n", "results.csv, line 2: epochs is 'x', not a number"),
    "compare: an experiment.json whose recipe is a string": lambda tmp: _damaged_meta(
        tmp, '{"recipe": "x"}', "experiment.json: its recipe is a JSON str, not an object; the file is damaged"),
    "compare: an experiment.json whose experiment is a list": lambda tmp: _damaged_meta(
        tmp, '{"recipe": {"experiment": [1]}}', "experiment.json: its recipe.experiment is a JSON list, not an object"),
    "compare: a tuning.json without its budget": lambda tmp: _damaged_tuning(
        tmp, '{"trials": []}', "tuning.json: metric: Field required; the file is damaged. Run its recipe again"),
    "compare: a tuning.json whose trials are words": lambda tmp: _damaged_tuning(
        tmp, '{"metric": "valid_error", "trials_per_arm": 2, "trials": ["x"]}', "tuning.json: trials.0: Input should"),
    "compare: a tuning.json whose best trial has no score": lambda tmp: _damaged_tuning(
        tmp, '{"metric": "valid_error", "trials_per_arm": 2, "trials": [{"condition": "none", "depth": 1, '
        '"best_trial": 0}]}', "tuning.json: trials.0: a best trial without a numeric valid_error"),
    "pretrain: conv_ae on flat data": conv_on_flat,
    "pretrain: unwritable -o": unwritable_stack_output,
    "assemble: unwritable -o": unwritable_model_output,
    "pretrain: -o of a name too long for the file system": too_long_stack_output,
    "run: --out of a name too long for the file system": too_long_out,
    "inspect: truncated stack": truncated_stack,
    "run: a stack file given as the recipe": stack_given_as_recipe,
    "inspect: random bytes": garbage_stack,
    "inspect: a manifest edited by hand": manifest_layer_name_a_list,
    "run: a source whose manifest lost a field": manifest_without_out_shape,
    "inspect: missing file": missing_stack,
    "inspect: a pickle that runs code": pickle_runs_code,
    "run: a pickle as a foreign source": pickle_as_foreign_source,
    "run: IDX bad magic": _idx_case("magic", "bad magic number"),
    "run: IDX truncated header": _idx_case("truncated", "truncated IDX header"),
    "run: IDX gzip that is not": _idx_case("gzip", "train-images-idx3-ubyte.gz"),
    "run: unwritable --out": unwritable_out,
    "run: experiment, unwritable --out": experiment_with_unwritable_out,
    "run: corrupt source stack": corrupt_source_stack,
    "run: loss diverges": diverging_loss,
    "run: every layer frozen in an epoch": nothing_trains,
    "run: unknown device": unknown_device_at_run,
    "run: experiment on a GPU the machine lacks": experiment_on_an_absent_gpu,
    "search: on a GPU the machine lacks": search_on_an_absent_gpu,
    "pretrain: a layer too big to hold": pretrain_layer_too_big,
    "run: a layer widened past what memory holds": widened_layer_too_big,
    "run: an experiment's layers too big to hold": experiment_layers_too_big,
    "run: missing data file": missing_data_file,
    "run: truncated MNIST pickle": truncated_mnist_pickle,
    "finetune --resume: truncated checkpoint": truncated_checkpoint,
    "finetune --resume: checkpoint of another network": checkpoint_of_another_network,
    "finetune --resume: no checkpoint": resume_without_checkpoint,
    "finetune --model: wrong input width": model_of_other_width,
    "finetune --model: a stack, not a model": stack_given_as_model,
    "evaluate: wrong input width": evaluate_a_model_of_other_width,
    "evaluate: a stack, not a model": evaluate_a_stack,
    "evaluate: the model before the recipe": evaluate_model_before_recipe,
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_gives_one_paragraph_and_exit_2(name, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv, fragment, keep = CASES[name](tmp_path)
    capsys.readouterr()
    before = {p: p.read_bytes() for p in keep}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert not [w for w in caught if not issubclass(w.category, SurgeryWarning)], [str(w.message) for w in caught]
    assert "Traceback" not in err and err.startswith(f"surgery {argv[0]}: error: "), err
    assert fragment in err, err
    for p, data in before.items():
        assert p.read_bytes() == data, f"{p} changed"
    assert not (tmp_path / "PWNED").exists(), "a pickle ran code"
    if "GPU the machine lacks" in name:  # refused before anything pretrained or was made
        assert not (tmp_path / "out").exists()
    assert not (tmp_path / "merged").exists()


def test_catalogue_covers_the_commands():
    commands = {name.split(":")[0].split()[0] for name in CASES}
    assert len(CASES) >= 15 and {"pretrain", "run", "finetune", "inspect"} <= commands


def test_one_case_through_a_real_process(tmp_path):
    """`python -m surgery` in its own process: exit 2, no traceback on stderr."""
    argv, fragment, _ = checkpoint_of_another_network(tmp_path)
    path = os.pathsep.join(p for p in [str(ROOT), os.environ.get("PYTHONPATH", "")] if p)  # keep the parent's
    p = subprocess.run([sys.executable, "-m", "surgery", *argv], capture_output=True, text=True,
                       cwd=tmp_path, env={**os.environ, "PYTHONPATH": path})
    assert p.returncode == 2 and "Traceback" not in p.stderr and fragment in p.stderr, p.stderr


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full, a device that is always full")
def test_a_full_disk_under_standard_output_is_one_paragraph_and_the_results_stay(tmp_path):
    """`surgery run ... > log` where the log's disk is full: printing fails after the work is
    done; one paragraph on stderr, exit 2, no traceback, the run's files in place."""
    (tmp_path / "r.yaml").write_text("data: {dataset: synthetic, n_train: 200}\n"
                                     "surgery: {ops: [{op: insert, name: h1, units: 8}, {op: head, classes: 4}]}\n"
                                     "finetune: {epochs: 1, batch_size: 50, device: cpu}\n")
    path = os.pathsep.join(p for p in [str(ROOT), os.environ.get("PYTHONPATH", "")] if p)
    with open("/dev/full", "w") as full:
        p = subprocess.run([sys.executable, "-m", "surgery", "run", "r.yaml", "--out", "o"], cwd=tmp_path,
                           env={**os.environ, "PYTHONPATH": path}, stdout=full, stderr=subprocess.PIPE, text=True,
                           timeout=300)
    assert p.returncode == 2 and "Traceback" not in p.stderr and "Exception ignored" not in p.stderr, p.stderr
    assert p.stderr.splitlines()[-1] == ("surgery run: error: cannot write to standard output (No space left on "
                                         "device); what the command wrote to files is kept. Free some space where "
                                         "its output goes, or send it elsewhere."), p.stderr
    assert json.loads((tmp_path / "o" / "result.json").read_text())["epochs"] == 1


def test_sigterm_ends_a_run_as_ctrl_c_does(tmp_path):
    """SIGTERM (a job scheduler ending a job) mid-training: one line saying how to continue,
    exit 143, the checkpoint kept (what --resume continues from), no temp file or lock left."""
    (tmp_path / "r.yaml").write_text(
        "data: {dataset: synthetic, n_train: 2000}\n"
        "surgery: {ops: [{op: insert, name: h1, units: 32}, {op: head, classes: 4}]}\n"
        "finetune: {epochs: 100000, batch_size: 20, device: cpu, checkpoint_every: 1}\n")
    path = os.pathsep.join(p for p in [str(ROOT), os.environ.get("PYTHONPATH", "")] if p)
    cmd = [sys.executable, "-m", "surgery", "run", "r.yaml", "--out", "o"]
    p = subprocess.Popen(cmd, cwd=tmp_path, env={**os.environ, "PYTHONPATH": path}, stderr=subprocess.PIPE, text=True)
    ckpt = tmp_path / "o" / "checkpoints" / "last.safetensors"
    deadline = time.monotonic() + 120
    while not ckpt.is_file() and p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    p.terminate()
    err = p.communicate(timeout=60)[1]
    assert p.returncode == 143, err
    said = err.splitlines()  # a log: the epochs trained, then one line
    assert said[-1].startswith("surgery run: terminated (SIGTERM); files written so far are kept. Run the same "
                               "command again to continue") and "Traceback" not in err, err
    assert all(line.startswith("finetune: epoch ") for line in said[:-1]) and len(said) > 1, err
    assert ckpt.is_file() and not list((tmp_path / "o").rglob("*.tmp")) and not (tmp_path / "o" / ".lock").exists()


def test_surgery_alone_lists_the_commands(capsys):
    """`surgery` with no command says what each command does (argparse alone says only
    that a command is required)."""
    from surgery.cli import main

    assert main([]) == 2
    said = capsys.readouterr()
    assert not said.out and "the following arguments are required" not in said.err
    for command in ("pretrain", "inspect", "validate", "run", "compare", "search"):
        assert f"\n    {command} " in said.err, said.err
    assert "Quick start: surgery run recipes/quick.yaml" in said.err


def test_insert_first_takes_its_input_size_from_the_data(tmp_path):
    r = _write(tmp_path / "r.yaml", _net_recipe())  # insert h1 without in_features
    assert main(["run", str(r), "--out", str(tmp_path / "out")]) == 0
    g = S.load_model(tmp_path / "out" / "model.safetensors")
    assert g.node("h1").spec.in_features == 64


def test_errors_are_one_family():
    for cls in (S.ConfigError, S.DataError, S.DeviceError, S.ShapeError, S.ManifestError, S.CheckpointError,
                S.OutputError, S.TrainingDiverged, S.OutOfMemory):
        assert issubclass(cls, S.SurgeryError)
    assert issubclass(S.ConfigError, ValueError) and issubclass(S.ShapeError, ValueError)
    with pytest.raises(ValueError, match="unknown activation"):
        S.LayerSpec(in_features=3, out_features=2, activation="swish")
    with pytest.raises(S.ShapeError):
        S.train_autoencoder(torch.rand(10, 16), S.AEConfig(method="conv_ae", hidden=2), "h1", 5, torch.Generator())


def test_only_rank_zero_prints_under_torchrun(tmp_path, capsys, monkeypatch):
    r = _write(tmp_path / "r.yaml", _net_recipe())
    monkeypatch.setenv("RANK", "1")
    assert main(["validate", str(r)]) == 0
    assert capsys.readouterr().out == ""
    monkeypatch.setenv("RANK", "0")
    assert main(["validate", str(r)]) == 0
    assert "ok" in capsys.readouterr().out


def test_a_directory_that_cannot_be_written_into_is_refused_up_front(tmp_path, monkeypatch):
    import surgery.io
    from surgery.errors import OutputError

    assert surgery.io.make_dir(tmp_path / "ok") == tmp_path / "ok"
    monkeypatch.setattr(surgery.io.os, "access", lambda path, mode: False)  # as a read-only directory would say
    with pytest.raises(OutputError, match=r"cannot write into the directory .*ro \(permission denied\)"):
        surgery.io.make_dir(tmp_path / "ro")


def test_an_output_file_that_is_a_directory_is_refused_before_the_work(tmp_path, capsys):
    """`pretrain -o DIR` and `assemble -o DIR` say so before they train (it was a traceback
    after the training, from the rename)."""
    r = _write(tmp_path / "r.yaml", _net_recipe())
    (tmp_path / "d").mkdir()
    for command in ("pretrain", "assemble"):
        assert main([command, str(r), "-o", str(tmp_path / "d")]) == 2
        err = capsys.readouterr().err
        assert f"{tmp_path / 'd'} is a directory; give the path of a file to write, e.g." in err, err
        assert "pretrain: layer" not in err and err.count("\n") == 1
    assert list((tmp_path / "d").iterdir()) == []


def test_assemble_refuses_a_network_that_cannot_take_the_data_before_pretraining(tmp_path, capsys):
    """`surgery assemble` checks the network against the recipe's data as validate and run do
    (it wrote a model whose first layer took 8 inputs for data of 64), before it pretrains."""
    r = _net_recipe()
    r["pretrain"] = {"layers": [{"method": "rbm", "hidden": 8, "epochs": 1}]}
    r["surgery"]["ops"] = [{"op": "take", "source": "pretrained"}, {"op": "head", "classes": 4}]
    r["finetune"] = {**r["finetune"], "layer_lr": {"h9": 0.1}}
    p = _write(tmp_path / "r.yaml", r)
    for command in ("validate", "assemble"):
        args = [command, str(p)] + (["-o", str(tmp_path / "m.safetensors")] if command == "assemble" else [])
        assert main(args) == 2
        err = capsys.readouterr().err
        assert "finetune.layer_lr: 'h9' matches no layer" in err and "pretrain: layer" not in err, err
    assert not (tmp_path / "m.safetensors").exists()
    r["surgery"]["ops"] = [{"op": "insert", "name": "h1", "units": 4, "in_features": 8}, {"op": "head", "classes": 4}]
    del r["pretrain"]
    assert main(["assemble", str(_write(tmp_path / "r.yaml", r)), "-o", str(tmp_path / "m.safetensors")]) == 2
    assert "the network takes input (8,) but the data 'synthetic' gives (64,)" in capsys.readouterr().err
    assert not (tmp_path / "m.safetensors").exists()


@pytest.mark.parametrize("fails", ["rename", "safetensors"])
def test_a_full_disk_is_one_paragraph_and_keeps_the_file_that_was_there(tmp_path, monkeypatch, fails):
    """No room left (the rename, or safetensors' own I/O error as it writes the temp file):
    an OutputError naming the file; the earlier file is untouched and no temp file is left.
    Any other error of the write is no user's problem and stays as it is."""
    import errno

    from safetensors import SafetensorError

    import surgery.io
    from surgery.errors import OutputError

    target = tmp_path / "stack.safetensors"
    random_stack(sizes=(8, 4)).save(target)
    before = target.read_bytes()

    def no_room(*args):
        if fails == "rename":
            raise OSError(errno.ENOSPC, "No space left on device")
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(surgery.io.os, "replace", no_room)
    with pytest.raises(OutputError, match=r"cannot write .*stack.safetensors \(No space left on device\); "
                                          "whatever was there is kept"):
        random_stack(sizes=(8, 6)).save(target)
    assert target.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["stack.safetensors"]

    def bug(*args):
        raise SafetensorError("Error while serializing: tensor is not contiguous")

    monkeypatch.setattr(surgery.io.os, "replace", bug)
    with pytest.raises(SafetensorError, match="not contiguous"):
        random_stack(sizes=(8, 6)).save(target)


@pytest.mark.parametrize("command,hint", [("run", "a single run needs --resume"), ("finetune", "with --resume"),
                                          ("search", "runs only the rest of search.trials")])
def test_ctrl_c_says_how_to_continue(tmp_path, capsys, monkeypatch, command, hint):
    """Ctrl-C is one line with exit status 130 saying how that command continues, no traceback."""
    from surgery import cli

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setitem(cli.COMMANDS, command, interrupted)
    assert cli.main([command, str(tmp_path / "r.yaml")]) == 130
    err = capsys.readouterr().err
    assert err.startswith(f"surgery {command}: interrupted; files written so far are kept") and hint in err, err
    assert err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.parametrize("raised,where", [
    (RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: you "
                  "tried to allocate 3136000000000 bytes. Error code 12 (Cannot allocate memory)"),
     "(torch asked for 2,920.6 GiB more): the network, a batch or the data needs more than this machine's"),
    (torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB. GPU 0 has a total capacity of "
                                 "79.15 GiB of which 3.20 GiB is free."), "(torch asked for 20.00 GiB more)"),
    (MemoryError(), "out of memory: the network, a batch or the data needs more than"),
])
def test_running_out_of_memory_is_one_paragraph_from_any_command(tmp_path, capsys, monkeypatch, raised, where):
    """Memory that runs out while a command works (a layer, a batch, a population too big for the
    machine or GPU) is exit status 2 and one paragraph on what to make smaller; any other
    RuntimeError is a bug and keeps its traceback."""
    from surgery import cli

    def fails(args):
        raise raised

    monkeypatch.setitem(cli.COMMANDS, "run", fails)
    assert cli.main(["run", str(tmp_path / "r.yaml")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("surgery run: error: out of memory") and where in err, err
    assert "finetune.batch_size" in err and "experiment.population: off" in err and err.count("\n") == 1

    def bug(args):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied (2x3 and 4x5)")

    monkeypatch.setitem(cli.COMMANDS, "run", bug)
    with pytest.raises(RuntimeError, match="cannot be multiplied"):
        cli.main(["run", str(tmp_path / "r.yaml")])


def test_a_layer_larger_than_memory_is_refused_when_it_is_planned(monkeypatch):
    """The check compares a layer's float32 weight with the machine's memory: at 1 MiB a
    784x1000 weight (3 MiB) is refused, a 784x300 one (0.9 MiB) is not; a widened spec too."""
    import surgery.layers

    monkeypatch.setattr(surgery.layers, "machine_memory", lambda: 2**20)
    S.LayerSpec(in_features=784, out_features=300)
    with pytest.raises(S.OutOfMemory, match="784x1000|1000x784"):
        S.LayerSpec(in_features=784, out_features=1000)
    with pytest.raises(S.OutOfMemory, match="more than this machine's 0.0 GiB"):
        S.LayerSpec(in_features=784, out_features=300).resized(out_features=400)
    monkeypatch.setattr(surgery.layers, "machine_memory", lambda: None)  # an OS that does not say: no check
    S.LayerSpec(in_features=784, out_features=1000)


def test_a_recipe_with_nothing_to_build_makes_no_output_directory(tmp_path, capsys):
    """finetune/run of a recipe with neither pretrain: nor surgery: fails before --out is made."""
    r = _net_recipe()
    del r["surgery"]
    r["experiment"] = {"conditions": ["none"], "depths": [1], "hidden": 8}
    assert main(["finetune", str(_write(tmp_path / "r.yaml", r)), "--out", str(tmp_path / "out")]) == 2
    assert "`surgery run" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_a_grid_that_cannot_run_fails_before_training_and_makes_no_output_directory(tmp_path, capsys, monkeypatch):
    """A tuned path that is no recipe field fails before the first stack or trial trains,
    and leaves no --out behind."""
    import surgery.cells

    trained = []
    monkeypatch.setattr(surgery.cells.CellRunner, "run_batch", lambda *a, **k: trained.append(a) or iter(()))
    r = _tuned_experiment({"finetune.optimizer.lrr": {"low": 0.01, "high": 0.1}})
    assert main(["run", str(_write(tmp_path / "r.yaml", r)), "--out", str(tmp_path / "out")]) == 2
    assert "experiment.tune.params['finetune.optimizer.lrr']" in capsys.readouterr().err
    assert not trained and not (tmp_path / "out").exists()


def test_a_search_that_cannot_run_makes_no_output_directory(tmp_path, capsys):
    r = _net_recipe()
    r["search"] = {"trials": 2, "params": {"finetune.optimizer.lr": {"low": 0.0, "high": 0.1}}}  # lr 0 is refused
    assert main(["search", str(_write(tmp_path / "r.yaml", r)), "--out", str(tmp_path / "out")]) == 2
    assert "finetune.optimizer.lr: Input should be greater than 0 (got 0.0)" in capsys.readouterr().err
    r["search"]["params"]["finetune.optimizer.lr"]["low"] = 0.01
    argv = ["search", str(_write(tmp_path / "r.yaml", r)), "--out", str(tmp_path / "out"), "--storage", "notaurl"]
    assert main(argv) == 2 and "--storage notaurl: cannot open the study" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("grid", [False, True])
def test_a_finetune_option_that_cannot_apply_fails_before_pretraining(tmp_path, capsys, monkeypatch, grid):
    """A layer_lr naming no layer of the network used to fail when fine-tuning began, after
    the stack had pretrained; the network is planned first now, and no --out is made."""
    import importlib

    pretrained = []
    for name in ("surgery.pretrain.greedy", "surgery.stacks_dir"):  # the one function every pretraining runs
        module = importlib.import_module(name)
        real = module.greedy_pretrain_population
        monkeypatch.setattr(module, "greedy_pretrain_population",
                            lambda *a, real=real, **k: pretrained.append(1) or real(*a, **k))
    r = _net_recipe()
    del r["surgery"]
    r["finetune"] = {**SMALL_FT, "layer_lr": {"h3": 2.0}}
    if grid:
        r["experiment"] = {"conditions": ["rbm", "none"], "depths": [1], "hidden": 8, "pretrain_epochs": 1}
        where = "r.yaml: finetune.layer_lr: 'h3' matches no layer of any cell of the grid (the deepest cell's " \
                "layers are h1 and out)"
    else:
        r["pretrain"] = {"layers": [{"method": "rbm", "hidden": 8, "epochs": 1}]}
        where = "finetune.layer_lr: 'h3' matches no layer"
    path = _write(tmp_path / "r.yaml", r)
    assert main(["validate", str(path)]) == 2 and where in capsys.readouterr().err
    assert main(["run", str(path), "--out", str(tmp_path / "out")]) == 2 and where in capsys.readouterr().err
    assert not pretrained and not (tmp_path / "out").exists()


def _small_grid(tmp: Path) -> tuple[Path, Path]:
    """A finished 2-arm, 1-depth, 2-seed experiment: its recipe and --out."""
    r = _net_recipe()
    del r["surgery"]
    r["experiment"] = {"conditions": ["none", "rbm"], "depths": [1], "seeds": [0, 1], "hidden": 8,
                       "pretrain_epochs": 1}
    rp, out = _write(tmp / "r.yaml", r), tmp / "out"
    assert main(["run", str(rp), "--out", str(out)]) == 0
    return rp, out


def test_inspect_reads_past_words_for_numbers(tmp_path, capsys):
    """inspect of an experiment whose experiment.json and a tuning trial's result.json were
    edited into words for numbers leaves them out (it was a TypeError / ValueError)."""
    grid = tmp_path / "grid"
    for name, depth in (("t1", "x"), ("t2", 2)):
        (grid / "tuning" / name).mkdir(parents=True)
        (grid / "tuning" / name / "result.json").write_text(json.dumps(
            {"condition": "rbm", "depth": depth, "valid_error": 3.0, "test_error": 3.0, "epochs": 1}))
    (grid / "experiment.json").write_text('{"cells": "x", "recipe": {"name": "g"}}')
    assert main(["inspect", str(grid)]) == 0
    said = capsys.readouterr().out.splitlines()
    assert said[0] == f"{grid}: experiment g" and "tuning rbm d2: 1 trials finished, validation 3.00%" in said, said
    assert "cells: 0 finished" in said, said


def test_a_stacks_pretrain_json_with_a_word_for_a_number(tmp_path, capsys):
    """A finished stack's pretrain.json edited into a word for its seconds (read when a cell
    needs the stack again) is one paragraph saying what to do (a TypeError before)."""
    rp, out = _small_grid(tmp_path)
    for cell in (out / "cells").iterdir():
        (cell / "result.json").unlink()
    meta = next((out / "stacks").glob("*/pretrain.json"))
    meta.write_text('{"seconds": "x", "layers": 1}')
    capsys.readouterr()
    assert main(["run", str(rp), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"{meta}: seconds 'x' and layers 1 are not both numbers; the file is damaged. Delete {meta.parent}" in err
    assert "Traceback" not in err


@pytest.mark.parametrize("damage", ["truncated", "a list", "a word for a number"])
def test_damaged_files_in_an_experiment_directory(tmp_path, capsys, damage):
    """Files of a finished grid damaged from outside (ours are written whole): a cell's
    result.json makes that cell train again, with a warning, to the result it had; a damaged
    metrics.jsonl leaves its curve out of the figure, with a warning; a damaged experiment.json
    stops compare with one paragraph naming it; none is a traceback."""
    rp, out = _small_grid(tmp_path)
    before = {r["cell"]: r["test_error"] for r in csv.DictReader((out / "results.csv").read_text().splitlines())}
    cells = sorted((out / "cells").iterdir())
    bad = {"truncated": '{"test_error": 1', "a list": "[1, 2]", "a word for a number": '{"test_error": "x"}'}[damage]
    (cells[0] / "result.json").write_text(bad)
    (cells[1] / "metrics.jsonl").write_text(bad + "\n" if damage != "a word for a number" else "[1, 2]\n")
    capsys.readouterr()
    assert main(["run", str(rp), "--out", str(out)]) == 0
    said = capsys.readouterr().err.splitlines()  # the CLI prints each warning as one line
    assert [s for s in said if s.endswith("It trains again.")] == [  # told once
        next(s for s in said if f"{cells[0] / 'result.json'}:" in s)], said
    assert f"surgery run: warning: learning curves: {cells[1] / 'metrics.jsonl'}, line 1: " \
        f"{'not readable JSON' if damage == 'truncated' else 'a JSON list'}" in "\n".join(said), said
    if damage == "a word for a number":  # it was a ValueError from a format string
        assert f"{cells[0] / 'result.json'}: test_error is 'x', not a number" in "\n".join(said), said
    after = {r["cell"]: r["test_error"] for r in csv.DictReader((out / "results.csv").read_text().splitlines())}
    assert after == before  # the cell trained again to the same result
    (out / "experiment.json").write_text(bad if damage != "a word for a number" else '{"recipe": 1}')
    assert main(["compare", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"surgery compare: error: {out / 'experiment.json'}: ") and "Traceback" not in err
    assert "Run its recipe again with this --out to write it anew." in err and err.count("\n") == 1
    assert main(["inspect", str(out)]) == 0  # how far it got, and what is wrong with its record
    said = capsys.readouterr().out.splitlines()
    assert said[1].startswith(f"{out / 'experiment.json'}: ") and "Run its recipe again" in said[1], said
    assert f"cells: {len(cells)} finished" in said, said
    shutil.rmtree(out / "cells")  # as in a published report: what its results.csv holds
    assert main(["inspect", str(out)]) == 0
    said = capsys.readouterr().out.splitlines()
    assert any(s.startswith(f"results.csv: {len(before)} runs (") for s in said), said
    assert main(["run", str(rp), "--out", str(out)]) == 0  # as the error says: written anew
    assert main(["compare", str(out)]) == 0


def test_read_json_names_the_file_and_line(tmp_path):
    from surgery.errors import ManifestError
    from surgery.io import read_json, read_jsonl

    p = tmp_path / "x.json"
    p.write_text('{"a": 1}')
    assert read_json(p) == {"a": 1}
    for text, says in [("{", "not readable JSON"), ("[1]", "holds a JSON list, not the object it should")]:
        p.write_text(text)
        with pytest.raises(ManifestError, match=f"^{p}: {says}.*damaged. Do this.$"):
            read_json(p, " Do this.")
    with pytest.raises(ManifestError, match="cannot be read"):
        read_json(tmp_path / "missing.json")
    p.write_text('{"epoch": 1}\n\n{"epoch": 2}\n')
    assert read_jsonl(p) == [{"epoch": 1}, {"epoch": 2}]
    p.write_text('{"epoch": 1}\n"two"\n')
    with pytest.raises(ManifestError, match=f"^{p}, line 2: a JSON str, not an object"):
        read_jsonl(p)


DAMAGES = {  # what a killed process, a full disk or a stray copy leaves of a file
    "garbage": lambda b: bytes(range(256))[::-1] * 2,  # no UTF-8, no JSON, no safetensors header
    "truncated": lambda b: b[: len(b) // 2],
    "empty": lambda b: b"",
}


@pytest.fixture(scope="module")
def finished_grid(tmp_path_factory):
    """A finished tuned experiment on synthetic data: every kind of file a grid writes."""
    tmp = tmp_path_factory.mktemp("grid")
    r = {"data": {"dataset": "synthetic", "n_train": 120, "n_valid": 40, "n_test": 40},
         "finetune": {"epochs": 2, "batch_size": 20, "checkpoint_every": 1, "progress": False},
         "experiment": {"conditions": ["none", "dae"], "depths": [1], "seeds": [0, 1], "hidden": 8,
                        "pretrain_epochs": 1,
                        "tune": {"trials": 2, "params": {"finetune.optimizer.lr": {"low": 0.05, "high": 0.2}}}}}
    assert main(["run", str(_write(tmp / "r.yaml", r)), "--out", str(tmp / "grid")]) == 0
    return tmp / "grid"


def _one_of_each(grid: Path) -> list[Path]:
    """A file of each kind under ``grid`` (a cell's, a trial's and a stack's taken once)."""
    kinds = {}
    for p in sorted(grid.rglob("*")):
        if p.is_file() and p.suffix != ".png":
            parts = p.relative_to(grid).parts
            kinds.setdefault((parts[0], parts[-1]) if len(parts) > 1 else parts, p)
    return list(kinds.values())


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_a_damaged_file_anywhere_in_a_grid_is_never_a_traceback(finished_grid, tmp_path, capsys, damage):
    """Any file of a finished grid damaged (results.csv, experiment.json, tuning.json, a cell's
    or a trial's result.json, metrics.jsonl, model.safetensors, checkpoint, recipe.json, a
    stack's layers and generator states): inspect and compare end with a result or one
    paragraph (exit 0 or 2), never a traceback (a damaged results.csv, model file or
    non-UTF-8 metrics.jsonl were)."""
    files = _one_of_each(finished_grid)
    assert len(files) >= 12, files
    for i, f in enumerate(files):
        grid = tmp_path / f"g{i}"
        shutil.copytree(finished_grid, grid)
        damaged = grid / f.relative_to(finished_grid)
        damaged.write_bytes(DAMAGES[damage](damaged.read_bytes()))
        for argv in (["inspect", str(grid)], ["compare", str(grid)]):
            try:
                code = main(argv)
            except Exception as e:  # noqa: BLE001 - the point: no exception gets out
                pytest.fail(f"{argv[0]} with {damaged.relative_to(grid)} {damage}: {type(e).__name__}: {e}")
            err = capsys.readouterr().err
            assert code in (0, 2) and "Traceback" not in err, (argv, damaged, err)
            lines = [x for x in err.strip().splitlines() if not x.startswith(f"surgery {argv[0]}: warning: ")]
            assert len(lines) == (code == 2) and all(x.startswith(f"surgery {argv[0]}: error: ") for x in lines), err


@pytest.mark.parametrize("umask", [0o022, 0o007])
def test_written_files_get_the_permissions_open_would_give_them(tmp_path, umask):
    """The temp file a write goes through is its owner's alone (``mkstemp``); the finished
    file must not be, or a run's results on a shared machine are hidden from the group. A
    new file gets ``0o666 & ~umask``, as ``open`` gives; a replaced file keeps its mode."""
    import surgery.io
    from surgery import cli

    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: r\ndata: {dataset: synthetic, limit: 200}\n"
                      "pretrain: {layers: [{method: rbm, hidden: 8, epochs: 1}]}\n"
                      "surgery: {ops: [{op: take, source: pretrained}, {op: head, classes: 10}]}\n"
                      "finetune: {epochs: 1, batch_size: 50}\n")
    old = os.umask(umask)
    try:
        assert cli.main(["run", str(recipe), "--out", str(tmp_path / "out")]) == 0
        written = sorted(p for p in (tmp_path / "out").rglob("*") if p.is_file())
        assert {p.name for p in written} >= {"model.safetensors", "result.json", "stack.safetensors"}
        assert {p.name: oct(p.stat().st_mode & 0o777) for p in written} == {p.name: oct(0o666 & ~umask)
                                                                             for p in written}
        kept = tmp_path / "out" / "result.json"
        kept.chmod(0o640)
        surgery.io.write_json(kept, {"x": 1})
        assert kept.stat().st_mode & 0o777 == 0o640 and surgery.io.read_json(kept) == {"x": 1}
    finally:
        os.umask(old)


def test_a_file_name_as_long_as_the_file_system_allows_is_written(tmp_path):
    """The temp file a write goes through has a name of its own; it must fit wherever the
    target's name fits (255 bytes here), not fail for a name of 245."""
    import surgery.io

    target = tmp_path / ("m" * 243 + ".json")
    surgery.io.write_json(target, {"x": 1})
    assert surgery.io.read_json(target) == {"x": 1} and [p.name for p in tmp_path.iterdir()] == [target.name]
