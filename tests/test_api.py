"""The Python API takes what a newcomer would give it: a config as a dict of its fields, a
dataset by name, NumPy arrays for tensors, surgery ops as a recipe writes them; each is
the same call as with the objects, and anything else is one paragraph saying what to give."""

import numpy as np
import pytest
import torch

import surgery as S
from surgery.errors import ConfigError, DataError, SurgeryError

DATA = {"dataset": "synthetic", "n_train": 200, "n_valid": 50, "n_test": 50, "side": 6, "classes": 3}
LAYERS = [{"method": "rbm", "hidden": 8, "epochs": 2}]


def _same_stack(a, b):
    return all(torch.equal(x.tensors[k], y.tensors[k]) for x, y in zip(a.layers, b.layers, strict=True)
               for k in x.tensors)


def test_data_and_pretraining_take_dicts_names_and_arrays():
    data = S.load_dataset(S.DataConfig(**DATA))
    for given in (DATA, {**DATA}):
        assert torch.equal(S.load_dataset(given).train.x, data.train.x)
    assert S.load_dataset("synthetic").name == "synthetic"
    with pytest.raises(ConfigError) as e:  # a field MNIST never reads, said in the validator's own words
        S.load_dataset({"dataset": "mnist", "n_train": 5})
    assert str(e.value) == ("surgery.load_dataset(cfg): n_train: read by dataset synthetic only, not mnist (data.limit "
                            "keeps the first N training examples); drop it (got 5)")
    stack = S.greedy_pretrain(data.train.x, S.PretrainConfig(layers=LAYERS), seed=3)
    assert _same_stack(S.greedy_pretrain(data.train.x, {"layers": LAYERS}, seed=3), stack)
    assert _same_stack(S.greedy_pretrain(data.train.x.numpy(), {"layers": LAYERS}, seed=3), stack)
    rbm = S.train_rbm(data.train.x, S.RBMConfig(hidden=4, epochs=1))
    assert torch.equal(S.train_rbm(data.train.x.numpy(), {"hidden": 4, "epochs": 1}).tensors["weight"],
                       rbm.tensors["weight"])
    ae = S.train_autoencoder(data.train.x, S.AEConfig(method="ae", hidden=4, epochs=1))
    assert torch.equal(S.train_autoencoder(data.train.x, {"hidden": 4, "epochs": 1}).tensors["weight"],
                       ae.tensors["weight"])
    with pytest.raises(ConfigError, match=r"surgery.greedy_pretrain\(x, cfg\): takes a surgery.PretrainConfig or a "
                                          "dict of its fields; got list"):
        S.greedy_pretrain(data.train.x, LAYERS)
    with pytest.raises(DataError, match=r"surgery.train_rbm\(x, cfg\): takes a torch tensor or a NumPy array; got "
                                        "list"):
        S.train_rbm(data.train.x.tolist(), {"hidden": 4})


def test_fine_tuning_takes_a_dict_or_nothing_and_arrays_and_ops_as_a_recipe_writes_them():
    data = S.load_dataset(DATA)
    stack = S.greedy_pretrain(data.train.x, {"layers": LAYERS})
    ops = [S.TakeOp(source="rbm"), S.HeadOp(classes=3)]
    want = S.Trainer(S.build_graph(ops, {"rbm": stack}), data, S.FinetuneConfig(epochs=2, batch_size=20)).fit()
    written = [{"op": "take", "source": "rbm"}, {"op": "head", "classes": 3}]
    got = S.Trainer(S.build_graph(written, {"rbm": stack}), data, {"epochs": 2, "batch_size": 20}).fit()
    assert got["test_error"] == want["test_error"] and got["valid_error"] == want["valid_error"]
    arrays = S.Dataset("np", *(S.Split(s.x.numpy(), s.y.numpy()) for s in (data.train, data.valid, data.test)))
    assert S.Trainer(S.build_graph(ops, {"rbm": stack}), arrays, {"epochs": 2, "batch_size": 20}).fit()[
        "test_error"] == want["test_error"]
    assert S.Trainer(S.build_graph(ops, {"rbm": stack}), data).cfg == S.FinetuneConfig()  # the defaults
    wide = S.Dataset("f64", S.Split(data.train.x.numpy().astype(np.float64), data.train.y.numpy()), data.valid,
                     data.test)
    with pytest.raises(DataError, match="its train split has torch.float64 examples"):
        S.Trainer(S.build_graph(ops, {"rbm": stack}), wide, {"epochs": 1})
    with pytest.raises(ConfigError, match=r"surgery.Trainer\(cfg\): takes a surgery.FinetuneConfig or a dict of its "
                                          "fields; got int"):
        S.Trainer(S.build_graph(ops, {"rbm": stack}), data, 5)


def test_a_report_of_no_rows_is_one_paragraph(tmp_path):
    with pytest.raises(SurgeryError, match="no result rows to report"):
        S.write_report(tmp_path / "out", [])
    assert not (tmp_path / "out").exists()


def test_a_report_of_rows_made_by_hand_and_a_model_described_by_its_path(tmp_path):
    """Rows with only condition, depth, seed and test_error (what write_report asks for) make
    a report and every figure (the curves and filters, which need a cell's directory, stay
    empty): it was a KeyError 'path'. describe_model takes a model file's path too."""
    rows = [{"condition": c, "depth": d, "seed": s, "test_error": 2.0 + s + (c == "none")}
            for c in ("none", "rbm") for d in (1, 2) for s in (0, 1)]
    S.write_report(tmp_path / "rep", rows)
    assert "| rbm |" in (tmp_path / "rep" / "report.md").read_text()
    assert sorted(p.name for p in (tmp_path / "rep" / "figures").iterdir()) == [
        "error_hist.png", "error_vs_depth.png", "filters.png", "learning_curves.png"]
    graph = S.build_graph([{"op": "insert", "name": "h1", "units": 4, "in_features": 6}, {"op": "head", "classes": 3}])
    assert S.describe_model(S.save_model(graph, tmp_path / "m.safetensors")) == S.describe_model(graph)


def test_the_wrong_object_or_a_bad_field_is_one_paragraph_naming_the_call(tmp_path):
    """Each was an AttributeError, KeyError or pydantic ValidationError from inside the call."""
    data = S.load_dataset(DATA)
    stack = S.greedy_pretrain(data.train.x, {"layers": LAYERS})
    graph = S.build_graph([S.TakeOp(source="rbm"), S.HeadOp(classes=3)], {"rbm": stack})
    calls = {
        r"surgery.Trainer\(cfg\): epochs: Input should be a valid integer, unable to parse string as an integer "
        r"\(got 'x'\)": lambda: S.Trainer(graph, data, {"epochs": "x"}),
        r"surgery.greedy_pretrain\(x, cfg\): layers.0.rbm.hidden: Field required; layers.0.rbm.hiden: Extra inputs":
            lambda: S.greedy_pretrain(data.train.x, {"layers": [{"method": "rbm", "hiden": 8}]}),
        r"surgery.Trainer\(graph, data\): takes a surgery.Dataset .*; got NoneType": lambda: S.Trainer(graph, None),
        r"surgery.Trainer\(graph, ...\): takes a surgery.ModelGraph .* a LayerStack has no head: .*; got LayerStack":
            lambda: S.Trainer(stack, data),
        r"surgery.PopulationTrainer\(graphs\[1\]\): takes a surgery.ModelGraph": lambda: S.PopulationTrainer(
            [graph, stack], data, [{}, {}], [0, 1]),
        r"surgery.PopulationTrainer\(out_dirs\): members 0 and 2 both write to .*a; each member's files":
            lambda: S.PopulationTrainer([graph] * 3, data, [{}] * 3, [0, 1, 2],
                                        out_dirs=[tmp_path / "a", tmp_path / "b", tmp_path / "b" / ".." / "a"]),
        r"surgery.to_module\(graph\): takes a surgery.ModelGraph": lambda: S.to_module(stack),
        r"Dataset\('d', train, valid, test\): valid is a list; give each split as surgery.Split\(x, y\)":
            lambda: S.Dataset("d", data.train, [data.train.x, data.train.y], data.test),
        r"surgery.save_model\(graph, path\): takes a surgery.ModelGraph": lambda: S.save_model(stack, tmp_path / "m"),
        r"surgery.describe_model\(graph\): takes a surgery.ModelGraph": lambda: S.describe_model(stack),
        r"surgery.read_back: node 'h1' needs h1.weight of shape \(8, 36\), but the module has none":
            lambda: S.read_back(graph, torch.nn.Linear(3, 3)),
        r"surgery.plan_cells: <recipe> has no experiment: section": lambda: S.plan_cells({"data": DATA}, (64,), 3),
        r"surgery.load_recipe\(path\): takes a recipe file's path; got dict. A dict of sections is a recipe through "
        r"surgery.recipe_from_dict": lambda: S.load_recipe({"data": DATA}),
        r"surgery.build_graph\(ops, sources\): takes a dict of source name -> ": lambda: S.build_graph(
            [S.TakeOp(source="rbm")], [stack]),
        r"surgery.build_graph: ops\[1\]: head.classes: Field required": lambda: S.build_graph(
            [{"op": "take", "source": "rbm"}, {"op": "head"}], {"rbm": stack}),
        r"surgery.build_graph: ops\[0\] is a str; give an op": lambda: S.build_graph(["take"], {"rbm": stack}),
        r"the recipe has no experiment: section; one network runs with surgery.run\(recipe, out\)": lambda: (
            S.run_experiment({"data": DATA, "finetune": {"epochs": 1}}, tmp_path / "grid")),
        r"surgery.assemble\(recipe, stack, classes\): <recipe>'s network is made of the stack its pretrain: section "
        r"makes; pass it": lambda: S.assemble({"data": DATA, "pretrain": {"layers": LAYERS}}, None, 3),
        r"the result rows: rows\[0\] lacks a numeric test_error": lambda: S.summary_grid(
            [{"condition": "none", "depth": 1, "seed": 0, "test_error": None}]),
        r"rows\[1\] lacks depth; give the rows surgery.run_experiment returned": lambda: S.write_report(
            tmp_path, [{"condition": "none", "depth": 1, "seed": 0, "test_error": 2.0}, {"condition": "none"}]),
    }
    for message, call in calls.items():
        with pytest.raises(SurgeryError, match=message):
            call()
