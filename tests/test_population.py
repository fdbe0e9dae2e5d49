"""A population of K models trained together equals each model trained alone."""

import pytest
import torch

from surgery.errors import ConfigError
from surgery.finetune import FinetuneConfig, Trainer
from surgery.population import PopulationTrainer
from tests.test_finetune import mlp

SIZES = (64, 32, 16)


def _cfg(**kw):
    base = {"epochs": 4, "batch_size": 50, "device": "cpu", "progress": False}
    return FinetuneConfig.model_validate({**base, **kw})


CASES = {
    "momentum, nesterov, decay": [
        _cfg(optimizer={"lr": 0.2, "momentum": 0.9}),
        _cfg(optimizer={"lr": 0.1, "momentum": 0.9, "nesterov": True}),
        _cfg(optimizer={"lr": 0.3, "momentum": 0, "weight_decay": 1e-3}),
    ],
    "schedules": [
        _cfg(optimizer={"lr": 0.3, "momentum": 0.5},
             schedule={"lr": {"kind": "exponential", "start": 0.5, "end": 0.01}, "momentum": {"kind": "linear"}}),
        _cfg(optimizer={"lr": 0.2, "momentum": 0.9}, schedule={"lr": {"kind": "cosine", "end": 0.01}}),
    ],
    "dropout": [
        _cfg(optimizer={"lr": 0.2, "momentum": 0.9}, dropout={"h*": 0.3}, input_dropout=0.1),
        _cfg(optimizer={"lr": 0.1, "momentum": 0.9}, dropout={"h*": 0.5}, input_dropout=0.2),
    ],
    "early stopping": [
        _cfg(epochs=12, optimizer={"lr": 0.8, "momentum": 0.9}, early_stopping={"patience": 1}),
        _cfg(epochs=12, optimizer={"lr": 0.05, "momentum": 0.5}, early_stopping={"patience": 2}),
        _cfg(epochs=12, optimizer={"lr": 0.5, "momentum": 0.9}, early_stopping={"patience": 1}),
    ],
}


@pytest.mark.parametrize("case", list(CASES))
def test_population_equals_each_model_alone(synth, case):
    cfgs = CASES[case]
    seeds = [11 + k for k in range(len(cfgs))]
    graphs = [mlp(SIZES, seed=k, init="classic") for k in range(len(cfgs))]
    pop = PopulationTrainer(graphs, synth, cfgs, seeds)
    together = pop.fit()
    for k, (g, c, s) in enumerate(zip(graphs, cfgs, seeds)):
        alone = Trainer(g, synth, c, seed=s)
        res = alone.fit()
        for name, w in pop.weights(k).items():
            torch.testing.assert_close(w, alone.model.state_dict()[name], rtol=1e-5, atol=1e-5, msg=f"{k} {name}")
        assert [h["valid_error"] for h in pop.history[k]] == [h["valid_error"] for h in alone.history]
        losses = [h["train_loss"] for h in alone.history]
        assert [h["train_loss"] for h in pop.history[k]] == pytest.approx(losses, rel=1e-5, abs=1e-6)
        assert (together[k]["epochs"], together[k]["best_epoch"]) == (res["epochs"], res["best_epoch"])
        assert together[k]["test_error"] == res["test_error"]
    if case == "early stopping":
        assert len({r["epochs"] for r in together}) > 1, "the members should stop at different epochs"


def test_population_refuses_what_it_cannot_batch(synth):
    with pytest.raises(ConfigError, match="optimizer 'adam'"):
        PopulationTrainer([mlp(SIZES)], synth, [_cfg(optimizer={"name": "adam", "lr": 0.01})], [0])
    with pytest.raises(ConfigError, match="finetune.epochs differs"):
        PopulationTrainer([mlp(SIZES), mlp(SIZES)], synth, [_cfg(), _cfg(epochs=3)], [0, 1])
    with pytest.raises(ConfigError, match="share one architecture"):
        PopulationTrainer([mlp(SIZES), mlp((64, 24, 16))], synth, [_cfg(), _cfg()], [0, 1])


@pytest.mark.parametrize("act", ["relu", "tanh", "softplus"])
def test_population_equals_alone_for_other_activations(synth, act):
    cfgs = [_cfg(optimizer={"lr": 0.05, "momentum": 0.9}), _cfg(optimizer={"lr": 0.02, "momentum": 0.5})]
    graphs = [mlp(SIZES, act=act, seed=k) for k in range(2)]
    pop = PopulationTrainer(graphs, synth, cfgs, [3, 4])
    pop.fit()
    for k in range(2):
        alone = Trainer(graphs[k], synth, cfgs[k], seed=3 + k)
        alone.fit()
        for name, w in pop.weights(k).items():
            torch.testing.assert_close(w, alone.model.state_dict()[name], rtol=1e-5, atol=1e-5, msg=f"{k} {name}")


def test_a_grid_trained_in_populations_equals_the_grid_trained_cell_by_cell(tmp_path):
    """experiment.population: 3 groups the cells of each (arm, depth) shape; every cell's
    result and weights equal those of population: off, and a rerun trains nothing again."""
    import json

    import yaml
    from safetensors.torch import load_file

    from surgery.cli import main

    recipe = {"data": {"dataset": "synthetic", "n_train": 400, "n_valid": 200, "n_test": 200},
              "experiment": {"conditions": ["none", "dae"], "depths": [1, 2], "seeds": [0, 1, 2], "hidden": 16,
                             "pretrain_epochs": 1},
              "finetune": {"epochs": 3, "batch_size": 50, "device": "cpu", "dropout": {"h*": 0.2},
                           "optimizer": {"lr": 0.2, "momentum": 0.9}, "early_stopping": {"patience": 1}}}
    runs = {}
    for mode in ("off", 3):
        r = json.loads(json.dumps(recipe))
        r["experiment"]["population"] = mode
        (tmp_path / f"{mode}.yaml").write_text(yaml.safe_dump(r))
        out = tmp_path / str(mode)
        assert main(["run", str(tmp_path / f"{mode}.yaml"), "--out", str(out)]) == 0
        runs[mode] = {c.name: json.loads((c / "result.json").read_text()) for c in (out / "cells").iterdir()}
    assert runs["off"].keys() == runs[3].keys() and len(runs["off"]) == 12
    assert all(res.get("population") == 3 for res in runs[3].values())
    for key, alone in runs["off"].items():
        together = runs[3][key]
        for field in ("test_error", "valid_error", "epochs", "best_epoch"):
            assert together[field] == alone[field], (key, field)
        a = load_file(str(tmp_path / "off" / "cells" / key / "model.safetensors"))
        b = load_file(str(tmp_path / "3" / "cells" / key / "model.safetensors"))
        for name in a:
            torch.testing.assert_close(b[name], a[name], rtol=1e-5, atol=1e-5)
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "3").rglob("result.json")}
    assert main(["run", str(tmp_path / "3.yaml"), "--out", str(tmp_path / "3")]) == 0
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "3").rglob("result.json")} == stamps


def test_the_batched_gemm_path_equals_alone_too(synth):
    """The GPU's path (one bmm per layer for all K models), run on the CPU."""
    cfgs = CASES["dropout"]
    graphs = [mlp(SIZES, seed=k) for k in range(len(cfgs))]
    pop = PopulationTrainer(graphs, synth, cfgs, [5, 6])
    pop.loop = False
    pop.fit()
    for k in range(len(cfgs)):
        alone = Trainer(graphs[k], synth, cfgs[k], seed=5 + k)
        alone.fit()
        for name, w in pop.weights(k).items():
            torch.testing.assert_close(w, alone.model.state_dict()[name], rtol=1e-5, atol=1e-5, msg=f"{k} {name}")


def test_search_batch_equals_sequential_trials(tmp_path):
    """search.batch: 4 asks four trials at once and fine-tunes them as one population; each
    trial's validation error equals the sequential search's for the same values."""
    import json

    import yaml

    from surgery.cli import main

    recipe = {"name": "s", "data": {"dataset": "synthetic", "n_train": 300, "n_valid": 100, "n_test": 100},
              "pretrain": {"layers": [{"method": "rbm", "hidden": 8, "epochs": 1}]},
              "surgery": {"ops": [{"op": "take", "source": "pretrained"}, {"op": "head", "classes": 4}]},
              "finetune": {"epochs": 2, "device": "cpu", "batch_size": 50},
              "search": {"sampler": "random", "trials": 4, "params": {
                  "pretrain.layers.0.lr": {"low": 0.01, "high": 0.2, "log": True},
                  "finetune.optimizer.lr": {"low": 0.01, "high": 0.5, "log": True},
                  "finetune.optimizer.momentum": {"low": 0.0, "high": 0.9}}}}
    studies = {}
    for batch in (1, 4):
        r = json.loads(json.dumps(recipe))
        r["search"]["batch"] = batch
        (tmp_path / f"b{batch}.yaml").write_text(yaml.safe_dump(r))
        out = tmp_path / f"b{batch}"
        assert main(["search", str(tmp_path / f"b{batch}.yaml"), "--out", str(out)]) == 0
        studies[batch] = json.loads((out / "search.json").read_text())["trials"]
        results = [json.loads(p.read_text()) for p in sorted((out / "trials").glob("*/result.json"))]
        assert len(results) == 4 and all(r.get("population") == (4 if batch == 4 else None) for r in results)
    for seq, bat in zip(studies[1], studies[4]):
        assert seq["params"] == bat["params"]
        assert bat["value"] == pytest.approx(seq["value"], abs=1e-9)
