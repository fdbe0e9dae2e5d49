import copy
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from surgery.cli import main
from surgery.data import DataConfig
from surgery.errors import SurgeryError
from surgery.experiment_config import ExperimentConfig, recorded_experiment
from surgery.grid import plan_cells
from surgery.recipe import Recipe, load_recipe, recipe_from_dict
from tests.helpers import random_stack, shipped_recipe_order, shrunk_recipe_args

ROOT = Path(__file__).resolve().parents[1]

BASE = {
    "name": "t",
    "seed": 0,
    "data": {"dataset": "synthetic"},
    "surgery": {
        "sources": {"a": "a.safetensors", "b": "b.safetensors"},
        "ops": [{"op": "take", "source": "a", "layers": [0, 2]}, {"op": "head", "classes": 4}],
    },
    "finetune": {"epochs": 1, "device": "cpu"},
}


@pytest.fixture()
def workdir(tmp_path):
    random_stack(sizes=(64, 32, 16, 8)).save(tmp_path / "a.safetensors")
    random_stack(sizes=(64, 32, 16, 8)).save(tmp_path / "b.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"not safetensors at all")
    return tmp_path


def _set(path, value):
    def f(r):
        cur = r
        keys = path.split(".")
        for k in keys[:-1]:
            cur = cur[int(k)] if isinstance(cur, list) else cur.setdefault(k, {})
        last = keys[-1]
        if isinstance(cur, list):
            cur[int(last)] = value
        elif value is DELETE:
            del cur[last]
        else:
            cur[last] = value
        return r
    return f


DELETE = object()
OPS = "surgery.ops"


def _ops(*ops):
    return _set(OPS, list(ops))


TAKE = {"op": "take", "source": "a", "layers": [0, 2]}
HEAD = {"op": "head", "classes": 4}

# (mutation, fragment that the message must hold: the field path or node and the bad value)
CATALOGUE = {
    "unknown top-level field": (_set("trainer", {}), "trainer: no such field; the fields of a recipe are data, "
                                "experiment, finetune, name, pretrain, search, seed, surgery"),
    "unknown data field": (_set("data.shuffle", True), "data.shuffle: no such field; the fields of data are "),
    "misspelt field": (_set("finetune.epoch", 3),
                       "finetune.epoch: no such field; did you mean finetune.epochs? (got 3)"),
    "a part of a field's name": (_set("pretrain", {"layers": [{"method": "sparse_ae", "hidden": 4, "sparsity": 0.05}]}),
                                 "pretrain.layers.0.sparsity: no such field; did you mean "
                                 "pretrain.layers.0.sparsity_target or pretrain.layers.0.sparsity_weight? (got 0.05)"),
    "misplaced field": (_set("finetune.lr", 0.05), "finetune.lr: no such field here; it belongs in "
                        "finetune.optimizer.lr (got 0.05)"),
    "misspelt section": (_set("finetune.optimiser", {"lr": 0.1}), "finetune.optimiser: no such field; did you mean "
                         "finetune.optimizer?"),
    "wrong type for seed": (_set("seed", "zero"), 'seed: Input should be a valid integer'),
    "a mapping for a number": (_set("finetune.optimizer.lr", {"start": 0.1}),
                               'finetune.optimizer.lr: Input should be a valid number (got {"start": 0.1})'),
    "name leaving runs/": (_set("name", "../../etc"),  # runs/<name> would be ../etc
                           "name: a recipe's name is its default output directory, runs/<name>: give up to 200"),
    "name with a slash": (_set("name", "mine/v2"), 'directory, runs/<name>: give up to 200 letters, digits, '
                          "'_', '-', '+' and '.' (not first), e.g. bengio2007-relu (got \"mine/v2\")"),
    "negative seed": (_set("seed", -1), "seed: Input should be greater than or equal to 0 (got -1)"),
    "unknown dataset": (_set("data.dataset", "cifar"),
                        "data.dataset: Input should be 'mnist', 'idx', 'arrays' or 'synthetic' (got \"cifar\")"),
    "idx without path": (_set("data.dataset", "idx"), "data.path: dataset 'idx' needs data.path"),
    "limit zero": (_set("data.limit", 0), "data.limit: Input should be greater than 0 (got 0)"),
    "unknown op": (_ops(TAKE, {"op": "graft", "source": "a"}),
                   "surgery.ops.1: Input tag 'graft' found using 'op' does not match"),
    "misspelt op": (_ops(TAKE, {"op": "haed", "classes": 4}), "'import'; did you mean 'head'?"),
    "misspelt method": (_set("pretrain", {"layers": [{"method": "rmb", "hidden": 8}]}), "did you mean 'rbm'?"),
    "begun schedule kind": (_set("finetune.schedule", {"lr": {"kind": "exp"}}),
                            "finetune.schedule.lr.kind: Input should be 'constant', 'exponential', 'step' or 'cosine'; "
                            "did you mean 'exponential'? (got \"exp\")"),
    "dataset in capitals": (_set("data.dataset", "MNIST"), "did you mean 'mnist'? (got \"MNIST\")"),
    "op without op": (_ops(TAKE, {"source": "a"}), "surgery.ops.1: Unable to extract tag using discriminator 'op'"),
    "empty ops": (_ops(), "surgery.ops: List should have at least 1 item"),
    "unknown op field": (_ops({**TAKE, "layer": 1}), "surgery.ops.0.layer: no such field; did you mean "
                         "surgery.ops.0.layers? (got 1)"),
    "another op's field": (_ops({**TAKE, "units": 5}), "surgery.ops.0.units: no such field; the fields of "
                           "surgery.ops.0 are layers, op, prefix, source"),
    "reversed range": (_ops({**TAKE, "layers": [2, 1]}),
                       "surgery.ops.0.layers: layers [2, 1] must be [start, stop)"),
    "range out of bounds": (_ops({**TAKE, "layers": [0, 7]}),
                            "surgery.ops[0] (take): layers [0, 7) is out of range for source 'a'"),
    "unknown source": (_ops({**TAKE, "source": "zz"}), "ops[0].source: 'zz' is not among sources"),
    "missing file": (_set("surgery.sources.a", "missing.safetensors"), "surgery.sources.a:"),
    "corrupt file": (_set("surgery.sources.a", "bad.safetensors"), "bad.safetensors: not a readable safetensors file"),
    "shape mismatch": (_ops(TAKE, {"op": "take", "source": "b", "layers": [0, 1]}, HEAD),
                       "duplicate node name 'h1'"),
    "shape mismatch prefixed": (_ops(TAKE, {"op": "take", "source": "b", "layers": [0, 1], "prefix": "b_"}, HEAD),
                                "shape mismatch between 'h2' and 'b_h1': 'h2' gives (16,) but 'b_h1' expects (64,)"),
    "head classes 1": (_ops(TAKE, {"op": "head", "classes": 1}),
                       "surgery.ops.1.classes: Input should be greater than or equal to 2 (got 1)"),
    "freeze unknown node": (_ops(TAKE, HEAD, {"op": "freeze", "nodes": ["h9"]}),
                            "surgery.ops[2] (freeze): no node matches 'h9'"),
    "dropout p 1.5": (_ops(TAKE, {"op": "dropout", "p": 1.5, "after": "h1"}, HEAD),
                      "surgery.ops.1.p: Input should be less than 1 (got 1.5)"),
    "widen narrower": (_ops(TAKE, {"op": "widen", "node": "h1", "units": 8}, HEAD), "widen: units=8 must exceed 'h1'"),
    "deepen after sigmoid": (_ops(TAKE, {"op": "deepen", "after": "h1"}, HEAD),
                             "deepen after 'h1': an identity sigmoid layer cannot keep"),
    "transplant without place": (_ops(TAKE, {"op": "transplant", "source": "b", "layers": [2, 3]}),
                                 "transplant needs exactly one of after, before, replacing"),
    "insert bad activation": (_ops(TAKE, {"op": "insert", "name": "x", "units": 3, "activation": "swish"}),
                              "unknown activation 'swish'"),
    "insert bad name": (_ops(TAKE, {"op": "insert", "name": "1x", "units": 3}), "'1x' is not a valid node name"),
    "duplicate insert name": (_ops(TAKE, {"op": "insert", "name": "h1", "units": 3}), "duplicate node name 'h1'"),
    "remove unknown": (_ops(TAKE, {"op": "remove", "node": "nope"}), "surgery.ops[1] (remove): no node named 'nope'"),
    "transplant replacing unknown": (_ops(TAKE, {"op": "transplant", "source": "b", "layers": [2, 3],
                                                 "replacing": "nope"}),
                                     "surgery.ops[1] (transplant): no node named 'nope'; the graph has ['h1', 'h2']"),
    "insert after and before": (_ops(TAKE, {"op": "insert", "name": "x", "units": 5, "after": "h1", "before": "h2"}),
                                "insert takes after or before (or neither: at the end), not both"),
    "insert after unknown": (_ops(TAKE, {"op": "insert", "name": "x", "units": 5, "after": "nope"}),
                             "surgery.ops[1] (insert): no node named 'nope'; the graph has ['h1', 'h2']"),
    "insert before unknown": (_ops(TAKE, {"op": "insert", "name": "x", "units": 5, "before": "nope"}),
                              "surgery.ops[1] (insert): no node named 'nope'; the graph has ['h1', 'h2']"),
    "cycle-free but two outputs": (_ops(TAKE, {"op": "insert", "name": "x", "units": 5, "before": "h1"}),
                                   "shape mismatch between 'x' and 'h1'"),
    "epochs zero": (_set("finetune.epochs", 0), "finetune.epochs: Input should be greater than or equal to 1 (got 0)"),
    "unknown optimizer": (_set("finetune.optimizer", {"name": "lbfgs"}), "finetune.optimizer.name: Input should be"),
    "nesterov without momentum": (_set("finetune.optimizer", {"name": "sgd", "nesterov": True, "momentum": 0}),
                                  "nesterov: true needs name: sgd and momentum > 0"),
    "momentum 1": (_set("finetune.optimizer", {"momentum": 1.0}),
                   "finetune.optimizer.momentum: Input should be less than 1 (got 1.0)"),
    "unknown device": (_set("finetune.device", "tpu"), "device: 'tpu' is not"),
    "cuda beyond the GPUs": (_set("finetune.device", "cuda:99"), "device: 'cuda:99'"),
    "bad schedule kind": (_set("finetune.schedule", {"lr": {"kind": "linearish"}}), "finetune.schedule.lr.kind"),
    "layer_lr negative": (_set("finetune.layer_lr", {"h1": -1}),
                          "finetune.layer_lr: ['h1']=-1.0 must be a finite number >= 0"),
    "pretrain unknown method": (_set("pretrain", {"layers": [{"method": "vae", "hidden": 3}]}),
                                "pretrain.layers.0: Input tag 'vae' found using 'method'"),
    "pretrain hidden negative": (_set("pretrain", {"layers": [{"method": "rbm", "hidden": -5}]}),
                                 "pretrain.layers.0.hidden: Input should be greater than 0 (got -5)"),
    "pretrain no layers": (_set("pretrain", {"layers": []}), "pretrain.layers: List should have at least 1 item"),
    "rbm with relu": (_set("pretrain", {"layers": [{"method": "rbm", "hidden": 5, "activation": "relu"}]}),
                      "RBM hidden units are sigmoid"),
    "duplicate pretrain names": (_set("pretrain", {"layers": [{"method": "rbm", "hidden": 5, "name": "a"},
                                                              {"method": "dae", "hidden": 5, "name": "a"}]}),
                                 "layer names must be unique; ['a'] repeat"),
    "conv_ae on flat data": (_set("pretrain", {"layers": [{"method": "conv_ae", "hidden": 4}]}),
                             "conv_ae needs image input"),
    "pretrained without pretrain": (_ops({"op": "take", "source": "pretrained"}, HEAD), "no pretrain: section"),
    "experiment unknown arm": (_set("experiment", {"conditions": ["none", "magic"]}),
                               "experiment.conditions: unknown arm(s) ['magic']"),
    "experiment arm name with a slash": (_set("experiment", {"conditions": {"../x": {"method": "none"}}}),
                                         "experiment.conditions: arm '../x' names its cells (and stands in the "
                                         "report's tables): give up to 100 letters"),
    "experiment depth 0": (_set("experiment", {"conditions": ["none"], "depths": [0, 1]}),
                           "experiment.depths: each depth must be between 1 and 1000"),
    "experiment depth a million": (_set("experiment", {"conditions": ["none"], "depths": [2, 10**6]}),  # hours to plan
                                   "each depth must be between 1 and 1000 (planning a net"),
    "experiment width 0": (_set("experiment", {"conditions": ["none"], "hidden": 0}),  # one line, not one a form
                           "1 problem in the recipe:\n  - experiment.hidden: Input should be greater than 0 (got 0)"),
    "experiment widths [4, 0]": (_set("experiment", {"conditions": ["none"], "hidden": [4, 0]}),
                                 "1 problem in the recipe:\n  - experiment.hidden.1: Input should be greater than 0"),
    "experiment population neither": (_set("experiment", {"conditions": ["none"], "population": "many"}),
                                      "experiment.population: Input should be 'auto' or 'off'; or a valid integer"),
    # a union's value whose inside was reached (a mapping of arms): the line names where in it, not every form
    "experiment arm of no method": (_set("experiment", {"conditions": {"x": {"method": "bogus"}}}),
                                    "1 problem in the recipe:\n  - experiment.conditions.x.method: Input should be "
                                    "'none', 'rbm'"),
    "experiment arm's widths [5, x]": (_set("experiment", {"conditions": {"x": {"hidden": [5, "x"]}}}),
                                       "1 problem in the recipe:\n  - experiment.conditions.x.hidden.1: Input should "
                                       "be a valid integer"),
    # two problems inside one arm, a bound and a wrong choice: both named, not the bound alone
    "experiment arm of no method and a negative width": (
        _set("experiment", {"conditions": {"x": {"method": "bogus", "hidden": [3, -1]}}}),
        "2 problems in the recipe:\n  - experiment.conditions.x.hidden.1: Input should be greater than 0 (got -1)\n"
        "  - experiment.conditions.x.method: Input should be 'none', 'rbm'"),
    "experiment width neither": (_set("experiment", {"conditions": ["none"], "hidden": "x"}),
                                 "experiment.hidden: Input should be a valid integer, unable to parse string as an "
                                 "integer; or a valid list (got \"x\")"),
    "NaN learning rate": (_set("finetune.optimizer.lr", float("nan")),  # not "less than or equal to 100"
                          "finetune.optimizer.lr: Input should be a finite number, not NaN (got NaN)"),
    # a setting the arm's method never reads: the method forgotten
    "experiment arm without pretraining given layer settings": (
        _set("experiment", {"conditions": {"x": {"layer": {"noise": 0.2}}}}),
        "experiment.conditions.x: layer {'noise': 0.2} sets how layers are pretrained, but method none"),
    "experiment arm that does not grow given train": (
        _set("experiment", {"conditions": {"x": {"method": "dae", "train": "new"}}}),
        "experiment.conditions.x: train: new chooses which layers a grow arm trains"),
    "experiment paper error out of range": (_set("experiment", {"conditions": ["none"], "paper": {
        "source": "x", "errors": {"none": float("nan"), "none d2": 120}}}),
        "2 problems in the recipe:\n  - experiment.paper.errors.none: Input should be a finite number, not NaN "
        "(got NaN)\n  - experiment.paper.errors.none d2: Input should be less than or equal to 100 (got 120)"),
    "experiment negative seed": (_set("experiment", {"conditions": ["none"], "seeds": [1, -1]}),
                                 "experiment.seeds.1: Input should be greater than or equal to 0 (got -1)"),
    "search bad range": (_set("search", {"params": {"finetune.optimizer.lr": {"low": 1, "high": 0.1}}}),
                         "low=1.0 must be below high=0.1"),
    "tune bad path": (_set("experiment", {"conditions": ["none"], "tune": {"params": {"seed": {"low": 0, "high": 1}}}}),
                      "tuned paths start with data, pretrain or finetune"),
    "search bad path": (_set("search", {"params": {"seed": {"type": "int", "low": 0, "high": 3}}}),
                        "search paths start with data, pretrain"),
    # trials ranked on different validation examples would not be comparable
    "search over the validation split": (_set("search", {"params": {"data.valid_size": {"type": "int", "low": 100,
                                                                                          "high": 5000}}}),
                                         "search: params['data.valid_size']: trials are ranked by their validation "
                                         "error, so all of them need the same validation examples"),
    "tune over the dataset": (_set("experiment", {"conditions": ["none"], "tune": {"params": {"data.path": {
        "type": "categorical", "choices": ["a.npz", "b.npz"]}}}}), "params['data.path']: trials are ranked by"),
    "a synthetic size on MNIST": (_set("data", {"dataset": "mnist", "n_train": 5}),
                                  "data.n_train: read by dataset synthetic only, not mnist (data.limit keeps the "
                                  "first N training examples); drop it (got 5)"),
    "a file for synthetic data": (_set("data.path", "mnist.pkl.gz"),
                                  "data.path: read by dataset mnist, idx and arrays only, not synthetic"),
    "a validation size for synthetic data": (_set("data.valid_size", 100),
                                             "data.valid_size: read by dataset mnist, idx and arrays only, not "
                                             "synthetic (it has data.n_valid)"),
}


@pytest.mark.parametrize("case", sorted(CATALOGUE))
def test_malformed_recipe_catalogue(workdir, case, capsys):
    mutate, fragment = CATALOGUE[case]
    r = mutate(copy.deepcopy(BASE))
    path = workdir / "r.yaml"
    path.write_text(yaml.safe_dump(r))
    code = main(["validate", str(path)])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    assert fragment in err, err


def test_a_recorded_data_section_reads_back():
    # experiment.json and a cell's recipe.json record every data field, the ones the dataset
    # does not read too (n_train on MNIST): only a value other than the default is a mistake
    for dataset in ("mnist", "synthetic"):
        cfg = DataConfig(dataset=dataset)
        assert DataConfig.model_validate(json.loads(json.dumps(cfg.model_dump(mode="json")))) == cfg


def test_recorded_arms_read_back():
    # experiment.json records every field of an arm, defaults too (train: all on an arm that does not
    # grow): the checks of what an arm may set must still read it back, or a run's directory is lost
    exp = ExperimentConfig.model_validate({"conditions": {
        "none-torch": {"method": "none", "finetune": {"init": "torch"}},
        "frozen": {"method": "grow", "train": "new"}, "relu-dae": {"method": "dae", "layer": {"lr": 0.002}}}})
    again = recorded_experiment(json.loads(json.dumps(exp.model_dump(mode="json"))))
    assert again.arms() == exp.arms()
    assert again.arms()["none-torch"].train == "all" and "train" in again.arms()["none-torch"].model_fields_set


def test_catalogue_is_large_enough():
    assert len(CATALOGUE) >= 25


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_a_recipe_saved_with_a_byte_order_mark_loads(tmp_path, suffix):
    """Windows editors (Notepad, PowerShell's ``Out-File``) start UTF-8 files with a BOM;
    ``json`` refuses one (``Unexpected UTF-8 BOM``), so a recipe is read without it."""
    r = {"name": "bom", "data": {"dataset": "synthetic"}, "finetune": {"epochs": 2}}
    text = json.dumps(r) if suffix == ".json" else yaml.safe_dump(r)
    path = tmp_path / f"r{suffix}"
    path.write_bytes(b"\xef\xbb\xbf" + text.encode())
    assert load_recipe(path).finetune.epochs == 2


def test_yaml_syntax_error_and_non_mapping(workdir, capsys):
    (workdir / "r.yaml").write_text("data: {dataset: [\n")
    assert main(["validate", str(workdir / "r.yaml")]) == 2
    err = capsys.readouterr().err
    assert "not valid YAML at line 2, column 1: while parsing a flow node" in err and err.count("\n") == 1, err
    (workdir / "r.json").write_text('{"data": {,}}')
    assert main(["validate", str(workdir / "r.json")]) == 2
    err = capsys.readouterr().err
    assert "not valid JSON at line 1, column 11" in err and err.count("\n") == 1, err
    (workdir / "r.yaml").write_text("data: {dataset: synthetic}\n")
    assert main(["validate", str(workdir / "r.yaml"), "--set", "seed=[a"]) == 2
    err = capsys.readouterr().err
    assert "--set 'seed=[a': the value is not valid YAML (line 1, column 3" in err and err.count("\n") == 1, err
    assert err.rstrip().endswith("needs quotes round it: --set 'seed=\"...\"'."), err
    (workdir / "r.yaml").write_text("- 1\n- 2\n")
    assert main(["validate", str(workdir / "r.yaml")]) == 2
    assert "must be a mapping" in capsys.readouterr().err
    assert main(["validate", str(workdir / "nope.yaml")]) == 2
    assert "no such recipe file" in capsys.readouterr().err
    (workdir / "recipes").mkdir()
    (workdir / "recipes" / "a.yaml").write_text("data: {dataset: synthetic}\n")
    assert main(["validate", str(workdir / "recipes")]) == 2
    assert "recipes: a directory, not a recipe file; give one of its recipes (a.yaml)." in capsys.readouterr().err


@pytest.mark.skipif(not hasattr(os, "mkfifo") or not Path("/dev/zero").exists(), reason="needs POSIX pipes")
def test_a_recipe_is_read_from_a_pipe_and_an_endless_one_is_refused(tmp_path, capsys):
    """``surgery validate <(...)`` or ``/dev/stdin`` reads the recipe from a pipe; a file that
    never ends (``/dev/zero``) or a huge one is refused after a bounded read, not read until
    memory runs out."""
    fifo = tmp_path / "recipe.yaml"
    os.mkfifo(fifo)
    writer = threading.Thread(target=fifo.write_text, args=("data: {dataset: synthetic}\nfinetune: {epochs: 2}\n",),
                              daemon=True)  # a failing check must not leave pytest waiting on it
    writer.start()
    assert main(["validate", str(fifo)]) == 0
    writer.join()
    assert capsys.readouterr().out.startswith(f"{fifo}: ok")
    assert main(["validate", "/dev/zero"]) == 2
    err = capsys.readouterr().err
    assert "/dev/zero: over 16 MiB, not a recipe" in err and err.count("\n") == 1, err
    if Path("/dev/null").exists():
        assert main(["validate", "/dev/null"]) == 2
        assert "/dev/null: the recipe is empty" in capsys.readouterr().err


def test_a_key_given_twice_is_refused_not_kept_last(workdir, capsys):
    """YAML and JSON keep the last of two equal keys silently (``epochs: 50`` above a
    forgotten ``epochs: 5`` trains 5): a recipe file says where; a key a merge (``<<:``)
    brought in may be overridden, as meant."""
    (workdir / "r.yaml").write_text("data: {dataset: synthetic}\nfinetune:\n  epochs: 50\n  batch_size: 10\n"
                                    "  epochs: 5\n")
    assert main(["validate", str(workdir / "r.yaml")]) == 2
    assert ("r.yaml: not valid YAML at line 5, column 3: 'epochs' is given twice in one mapping (first on line 3); "
            "YAML would keep only the last, so remove one.") in capsys.readouterr().err
    (workdir / "r.json").write_text('{"data": {"dataset": "synthetic", "dataset": "mnist"}}')
    assert main(["validate", str(workdir / "r.json")]) == 2
    assert "r.json: not valid JSON: 'dataset' is given twice in one object" in capsys.readouterr().err
    (workdir / "r.yaml").write_text("finetune:\n  <<: {epochs: 1, batch_size: 10}\n  epochs: 2\n")
    assert load_recipe(workdir / "r.yaml").finetune.epochs == 2


def test_numbers_with_an_exponent_are_numbers(workdir):
    """PyYAML (YAML 1.1) reads 1e-3 as a string; a recipe reads it as the number it looks
    like (a categorical choice of [1e-4, 1e-5] was two strings, data.limit: 2e2 an error)."""
    (workdir / "r.yaml").write_text(
        "data: {dataset: synthetic, limit: 2e2}\nfinetune: {epochs: 1, optimizer: {lr: 1e-2}}\nsearch:\n"
        "  params: {finetune.optimizer.weight_decay: {type: categorical, choices: [1e-4, 1E-5, '1e-6']}}\n")
    r = load_recipe(workdir / "r.yaml", ["finetune.optimizer.momentum=5e-1"])
    assert r.data.limit == 200 and r.finetune.optimizer.lr == 0.01 and r.finetune.optimizer.momentum == 0.5
    assert r.search.params["finetune.optimizer.weight_decay"].choices == [1e-4, 1e-5, "1e-6"]  # quoted: a string


def test_valid_recipe_prints_a_plan(workdir, capsys):
    (workdir / "r.json").write_text(json.dumps(BASE))
    assert main(["validate", str(workdir / "r.json")]) == 0
    out = capsys.readouterr().out
    assert "h1" in out and "out" in out and "(4,)" in out


def test_overrides(workdir):
    (workdir / "r.yaml").write_text(yaml.safe_dump(BASE))
    r = load_recipe(workdir / "r.yaml", ["finetune.epochs=3", "surgery.ops.1.classes=5", "data.limit=100",
                                         "finetune.optimizer.name=adam"])
    assert r.finetune.epochs == 3 and r.surgery.ops[1].classes == 5 and r.data.limit == 100
    assert r.finetune.optimizer.name == "adam"
    assert r.resolve("a.safetensors") == workdir / "a.safetensors"
    with pytest.raises(SurgeryError, match="is not an index"):
        load_recipe(workdir / "r.yaml", ["surgery.ops.9.classes=5"])
    with pytest.raises(SurgeryError, match="dotted.path=value"):
        load_recipe(workdir / "r.yaml", ["finetune.epochs"])
    for bad in ("=3", "finetune..epochs=3", "finetune.=3"):  # not "Extra inputs are not permitted" at the top
        with pytest.raises(SurgeryError, match="the path before '=' has an empty part"):
            load_recipe(workdir / "r.yaml", [bad])


def test_a_list_of_names_selects_the_recipes_own_arms():
    """``--set experiment.conditions=[rbm-cg]`` runs that arm of the recipe's mapping, with the
    same cells (and keys, so finished cells are found) as the whole recipe plans for it."""
    path = ROOT / "recipes" / "hinton2006_all.yaml"
    whole = load_recipe(path)
    one = load_recipe(path, ["experiment.conditions=[rbm-cg]"])
    assert list(one.experiment.arms()) == ["rbm-cg"]
    assert one.experiment.arms()["rbm-cg"] == whole.experiment.arms()["rbm-cg"]
    assert list(load_recipe(path, ["experiment.conditions=[none, rbm]"]).experiment.arms()) == ["none", "rbm"]
    keys = {c.key for c in plan_cells(whole, (784,), 10) if c.condition == "rbm-cg"}
    assert keys and keys == {c.key for c in plan_cells(one, (784,), 10)}
    with pytest.raises(SurgeryError, match="unknown arm"):   # a name the mapping lacks: built-in names only
        load_recipe(path, ["experiment.conditions=[rbm-cg, dae]"])


def test_a_search_parameter_is_set_by_its_dotted_name():
    """A search's parameters are named by dotted recipe paths; ``--set`` reaches inside one."""
    path = ROOT / "recipes" / "search.yaml"
    r = load_recipe(path, ["search.params.finetune.optimizer.lr.low=0.01",
                           "search.params.pretrain.layers.0.lr.high=0.1"])
    lr = r.search.params["finetune.optimizer.lr"]
    assert lr.low == 0.01 and r.search.params["pretrain.layers.0.lr"].high == 0.1
    assert lr.high == load_recipe(path).search.params["finetune.optimizer.lr"].high
    with pytest.raises(SurgeryError, match=r"search\.params\.finetune\.optimizer\.lr: log scale needs low > 0"):
        load_recipe(path, ["search.params.finetune.optimizer.lr.low=-1"])
    # a path the params lack is a new searched parameter, named whole (not a section finetune)
    r = load_recipe(path, ["search.params.finetune.optimizer.weight_decay={type: float, low: 0.0, high: 0.001}"])
    assert r.search.params["finetune.optimizer.weight_decay"].high == 0.001 and len(r.search.params) == 5
    r = load_recipe(path, ["search.params.finetune.optimizer.name={type: categorical, choices: [sgd, adam]}"])
    assert r.search.params["finetune.optimizer.name"].choices == ["sgd", "adam"]
    escaped = load_recipe(path, ["search.params.finetune\\.optimizer\\.lr.low=0.02"])  # as some tools write it
    assert escaped.search.params["finetune.optimizer.lr"].low == 0.02 and len(escaped.search.params) == 4


def test_schema_command(capsys):
    assert main(["schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert {"data", "pretrain", "surgery", "finetune", "experiment", "search"} <= set(schema["properties"])


def test_cli_subprocess_has_no_traceback(workdir):
    r = copy.deepcopy(BASE)
    r["surgery"]["ops"][0]["layers"] = [0, 9]
    (workdir / "r.yaml").write_text(yaml.safe_dump(r))
    p = subprocess.run([sys.executable, "-m", "surgery.cli", "validate", str(workdir / "r.yaml")],
                       capture_output=True, text=True)
    assert p.returncode == 2 and "Traceback" not in p.stderr and "out of range" in p.stderr


# Random recipe dicts: only clean validation errors may come out.
_scalars = st.one_of(st.none(), st.booleans(), st.integers(-5, 2000), st.floats(allow_nan=True), st.text(max_size=8))
_keys = st.sampled_from(["data", "pretrain", "surgery", "finetune", "experiment", "search", "seed", "name",
                         "layers", "ops", "op", "method", "hidden", "epochs", "dataset", "take", "head", "rbm",
                         "classes", "source", "sources", "lr", "optimizer", "conditions", "depths", "params"])
_values = st.recursive(_scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                         st.dictionaries(_keys, inner, max_size=5)), max_leaves=20)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(st.dictionaries(_keys, _values, max_size=6), _values))
def test_random_recipes_give_only_clean_errors(data):
    try:
        r = recipe_from_dict(data)
    except SurgeryError as e:
        assert str(e) and "Traceback" not in str(e)
    else:
        assert isinstance(r, Recipe)


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "recipes").glob("*.yaml")))
def test_shipped_recipes_load(name):
    r = load_recipe(ROOT / "recipes" / name)
    assert r.name
    text = (ROOT / "recipes" / name).read_text()
    assert text.startswith("#"), "each recipe starts with a header comment saying what it does"


@pytest.mark.slow
def test_every_shipped_recipe_runs_shrunk_on_the_cpu(tmp_path):
    """What tests/test_cuda.py runs on a GPU, on the CPU: each shipped recipe shrunk to 300
    examples and one epoch runs to the end (its shrinking checked here, where CI runs)."""
    import shutil

    shutil.copytree(ROOT / "recipes", tmp_path / "recipes")
    for name in shipped_recipe_order(tmp_path / "recipes"):
        out = tmp_path / "runs" / name.removesuffix(".yaml")
        assert main(shrunk_recipe_args(tmp_path / "recipes", name, out, "cpu")) == 0, name


def test_bengio2007_plans_the_cells_its_published_report_ran():
    """recipes/bengio2007.yaml states its whole protocol (trials, then experiment.tune.then):
    from the values its arms' trials chose (docs/results/bengio2007_one_protocol/tuning.json)
    the step taken for grow-frozen, none and shallow (the minibatch size) gives every seed
    exactly the cell (its recipe's hash) that report ran, none run differently by hand."""
    import csv

    from surgery.grid import step_values, with_values
    from surgery.tuning import merged_values

    results = ROOT / "docs" / "results" / "bengio2007_one_protocol"
    r = load_recipe(ROOT / "recipes" / "bengio2007.yaml")
    assert r.experiment is not None and r.experiment.tune is not None
    step = next(s for s in r.experiment.tune.then if s.name == "minibatch size")
    best = {t["condition"]: t["params"] for t in json.loads((results / "tuning.json").read_text())["trials"]
            if "best_trial" in t}
    with (results / "results.csv").open() as f:
        ran = {(row["condition"], int(row["seed"])): row["cell"] for row in csv.DictReader(f)}
    cells = plan_cells(r, (784,), 10)
    for arm in ("grow-frozen", "none", "shallow"):
        first = next(c for c in cells if c.condition == arm)
        full = recipe_from_dict(with_values(first, best[arm]).recipe, r.base_dir).to_dict()
        values = merged_values(best[arm], step_values(full, step.alternatives[0]))
        assert [with_values(c, values).key for c in cells if c.condition == arm] == \
            [ran[arm, seed] for seed in r.experiment.seeds], arm


def test_erhan2010_plans_the_cells_its_published_report_ran():
    """docs/results/erhan2010_d1_d5 ran depth 1 by recipes/erhan2010.yaml's protocol and
    depths 2-5 with each arm's depth-1 values, one command per arm, depth and seeds
    (docs/erhan2010.md): the values its tuning.json records as chosen, set on the recipe with
    tuning off, plan the very cell (its recipe's hash) of every run the report holds."""
    import csv

    results = ROOT / "docs" / "results" / "erhan2010_d1_d5"
    best = {t["condition"]: t["params"] for t in json.loads((results / "tuning.json").read_text())["trials"]
            if "best_trial" in t}
    none = [f"finetune.optimizer.{k}={best['none'][f'finetune.optimizer.{k}']!r}" for k in ("lr", "weight_decay")]
    dae = best["dae"]
    arms = {
        "none": ["experiment.conditions=[none]", *none],
        "dae": ["experiment.conditions=[dae]", *(f"finetune.optimizer.{k}={dae[f'finetune.optimizer.{k}']!r}"
                                                for k in ("lr", "weight_decay")),
                f"experiment.methods.dae={{lr: {dae['pretrain.layers.*.lr']!r}, momentum: 0.0, "
                f"noise: {dae['pretrain.layers.*.noise']!r}}}"],
        "none-torch": ["experiment.conditions={none-torch: {method: none, finetune: {init: torch}}}",
                       "experiment.baseline=none-torch", *none],
        "none-torch-50": ["experiment.conditions={none-torch-50: {method: none, finetune: {init: torch, "
                          "early_stopping: null}}}", "experiment.baseline=none-torch-50", *none],
    }
    with (results / "results.csv").open() as f:
        ran: dict[tuple[str, int], dict[int, str]] = {}
        for row in csv.DictReader(f):
            ran.setdefault((row["condition"], int(row["depth"])), {})[int(row["seed"])] = row["cell"]
    assert {arm for arm, _ in ran} == set(arms) and len(ran) == 15  # none, dae at 1-5; none-torch 2-5
    for (arm, depth), cells in ran.items():
        seeds = sorted(cells)
        r = load_recipe(ROOT / "recipes" / "erhan2010.yaml", ["experiment.tune=null", f"experiment.depths=[{depth}]",
                                                               f"experiment.seeds={seeds}", *arms[arm]])
        assert {c.seed: c.key for c in plan_cells(r, (784,), 10)} == cells, (arm, depth)


SMALL = ["--set", "data.dataset=synthetic", "--set", "data.limit=300"]


def _small_layers(n, hidden=16, epochs=1):
    out = []
    for i in range(n):
        out += ["--set", f"pretrain.layers.{i}.hidden={hidden}", "--set", f"pretrain.layers.{i}.epochs={epochs}"]
    return out


def test_shipped_surgery_recipes_run(tmp_path, capsys):
    import shutil

    shutil.copytree(ROOT / "recipes", tmp_path / "recipes")
    rec = tmp_path / "recipes"
    ft = ["--set", "finetune.epochs=1", "--set", "finetune.device=cpu"]
    runs = tmp_path / "runs"
    assert main(["run", str(rec / "dbn.yaml"), "--out", str(runs / "dbn"), *SMALL, *ft, *_small_layers(3)]) == 0
    stack = runs / "dae_stack" / "stack.safetensors"
    assert main(["pretrain", str(rec / "dae_stack.yaml"), "-o", str(stack), *SMALL, *_small_layers(3)]) == 0
    capsys.readouterr()
    assert main(["inspect", str(stack)]) == 0
    assert "made by recipe 'dae_stack' (seed 1)" in capsys.readouterr().out
    assert main(["validate", str(rec / "transplant.yaml"), *SMALL]) == 0
    out = capsys.readouterr().out
    assert "source=a" in out and "source=b" in out
    assert main(["run", str(rec / "transplant.yaml"), "--out", str(tmp_path / "t"), *SMALL, *ft]) == 0
    assert main(["run", str(rec / "net2net.yaml"), "--out", str(tmp_path / "n"), *SMALL, *ft, *_small_layers(2)]) == 0
    assert json.loads((tmp_path / "n" / "result.json").read_text())["epochs"] == 1
    model = tmp_path / "m.safetensors"
    assert main(["assemble", str(rec / "net2net.yaml"), "-o", str(model), *SMALL, *_small_layers(2)]) == 0
    assert main(["inspect", str(tmp_path / "m.safetensors")]) == 0
    assert "h2_deep" in capsys.readouterr().out
