"""A population of K models trained together equals each model trained alone."""

import csv
import random
import re
import shutil

import pytest
import torch
import yaml

from surgery.cli import main
from surgery.errors import CheckpointError, ConfigError
from surgery.finetune import FinetuneConfig, PopulationTrainer, Trainer
from tests.test_finetune import _without_valid, mlp

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
    "adam, decay, beta1 schedule": [
        _cfg(optimizer={"name": "adam", "lr": 0.01}),
        _cfg(optimizer={"name": "adam", "lr": 0.003, "weight_decay": 1e-3, "betas": [0.8, 0.99], "eps": 1e-6}),
        _cfg(optimizer={"name": "adam", "lr": 0.005}, schedule={"lr": {"kind": "exponential", "end": 0.001},
                                                                 "momentum": {"kind": "linear", "start": 0.5,
                                                                              "end": 0.9}}),
    ],
    "rmsprop (momentum 0 and 0.5), decay": [
        _cfg(optimizer={"name": "rmsprop", "lr": 0.003}),
        _cfg(optimizer={"name": "rmsprop", "lr": 0.001, "momentum": 0.5, "alpha": 0.9, "weight_decay": 1e-3}),
        _cfg(optimizer={"name": "rmsprop", "lr": 0.002, "eps": 1e-6},
             schedule={"momentum": {"kind": "linear", "start": 0.1, "end": 0.6}}),
    ],
    "adagrad, decay, layer_lr": [
        _cfg(optimizer={"name": "adagrad", "lr": 0.05}),
        _cfg(optimizer={"name": "adagrad", "lr": 0.02, "weight_decay": 1e-3}, layer_lr={"h1": 0.5}),
    ],
    "adadelta, schedule": [
        _cfg(optimizer={"name": "adadelta", "lr": 1.0}),
        _cfg(optimizer={"name": "adadelta", "lr": 0.5, "rho": 0.95, "eps": 1e-5},
             schedule={"lr": {"kind": "exponential", "end": 0.1}}),
    ],
    "layer_lr": [
        _cfg(optimizer={"lr": 0.2, "momentum": 0.9}, layer_lr={"h1": 0.1, "h*": 2.0}),
        _cfg(optimizer={"lr": 0.1, "momentum": 0.5}, layer_lr={"h2": 0.5}),
        _cfg(optimizer={"name": "sgd", "lr": 0.1, "momentum": 0.9}),
    ],
    "a partial last batch (2000 rows in batches of 300)": [
        _cfg(batch_size=300, optimizer={"lr": 0.2, "momentum": 0.9}),
        _cfg(batch_size=300, optimizer={"lr": 0.1, "momentum": 0.9, "nesterov": True},
             schedule={"lr": {"kind": "exponential", "end": 0.01}}),
    ],
    "adam, a partial last batch": [
        _cfg(batch_size=300, optimizer={"name": "adam", "lr": 0.01}),
        _cfg(batch_size=300, optimizer={"name": "adam", "lr": 0.003}),
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
        assert [h["valid_error"] for h in pop.histories[k]] == [h["valid_error"] for h in alone.history]
        losses = [h["train_loss"] for h in alone.history]
        assert [h["train_loss"] for h in pop.histories[k]] == pytest.approx(losses, rel=1e-5, abs=1e-6)
        assert (together[k]["epochs"], together[k]["best_epoch"]) == (res["epochs"], res["best_epoch"])
        assert together[k]["test_error"] == res["test_error"]
    if case == "early stopping":
        assert len({r["epochs"] for r in together}) > 1, "the members should stop at different epochs"


def test_a_diverging_member_is_named(synth):
    """A member whose loss turns NaN or infinite stops the population's fit with
    TrainingDiverged naming it (the experiment then trains the cells alone); the others'
    finite losses do not hide it."""
    from surgery.errors import TrainingDiverged

    cfgs = [_cfg(optimizer={"lr": 0.1}), _cfg(optimizer={"lr": 100.0, "momentum": 0.9}), _cfg(optimizer={"lr": 0.05})]
    graphs = [mlp(SIZES, act="linear", seed=k) for k in range(3)]
    with pytest.raises(TrainingDiverged, match=r"population member 1 \(of 0-2\) became NaN or infinite in epoch 1"):
        PopulationTrainer(graphs, synth, cfgs, [0, 1, 2]).fit()


@pytest.mark.parametrize("case", ["dropout", "adam, decay, beta1 schedule", "early stopping"])
def test_a_population_killed_mid_run_continues_from_its_members_checkpoints(synth, case, tmp_path, monkeypatch):
    """With checkpoint_every, each member keeps its own slice of the population (weights,
    best weights, optimizer state, generators, history, early stopping); a population
    stopped after epoch 2 and continued, or one member continued alone (a population of
    one), ends with exactly the weights and histories of the unbroken run."""
    cfgs = [c.model_copy(update={"checkpoint_every": 1}) for c in CASES[case]]
    seeds = [11 + k for k in range(len(cfgs))]
    graphs = [mlp(SIZES, seed=k, init="classic") for k in range(len(cfgs))]

    def population(name, members=None):
        ks = members or range(len(cfgs))
        return PopulationTrainer([graphs[k] for k in ks], synth, [cfgs[k] for k in ks], [seeds[k] for k in ks],
                                 out_dirs=[tmp_path / name / str(k) for k in ks])

    whole = population("whole")
    whole.fit()
    original = PopulationTrainer.after_epoch

    def stopped_after_two(self, recs, stopping):
        original(self, recs, stopping)
        if self.epoch == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(PopulationTrainer, "after_epoch", stopped_after_two)
    with pytest.raises(KeyboardInterrupt):
        population("cut").fit()
    monkeypatch.setattr(PopulationTrainer, "after_epoch", original)
    shutil.copytree(tmp_path / "cut", tmp_path / "cut1")
    continued = population("cut")
    assert continued.resume() == 2
    continued.fit()
    last = len(cfgs) - 1
    alone = population("cut1", [last])
    assert alone.resume() == 2
    alone.fit()
    for k in range(len(cfgs)):
        for name, w in whole.weights(k).items():
            assert torch.equal(continued.weights(k)[name], w), (k, name)
        times = [{**h, "seconds": 0} for h in whole.histories[k]]
        assert [{**h, "seconds": 0} for h in continued.histories[k]] == times
    assert all(torch.equal(alone.weights(0)[n], w) for n, w in whole.weights(last).items())
    (tmp_path / "cut" / "0" / "checkpoints" / "member.safetensors").write_bytes(b"torn")
    with pytest.raises(CheckpointError, match="member.safetensors"):
        population("cut").resume()


def test_population_refuses_what_it_cannot_batch(synth):
    with pytest.raises(ConfigError, match="unfreeze_at is not supported"):
        PopulationTrainer([mlp(SIZES)], synth, [_cfg(unfreeze_at={"h1": 2})], [0])
    with pytest.raises(ConfigError, match="members share the optimizer"):
        PopulationTrainer([mlp(SIZES), mlp(SIZES)], synth, [_cfg(), _cfg(optimizer={"name": "adam"})], [0, 1])
    with pytest.raises(ConfigError, match="layer_lr: 'x9' matches no layer"):
        PopulationTrainer([mlp(SIZES)], synth, [_cfg(layer_lr={"x9": 2.0})], [0])
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
    """experiment.population: 3 pretrains the seeds' stacks together and groups the cells of
    each (arm, depth) shape; every stack, cell result and weight equals those of population:
    off, and a rerun trains nothing again."""
    import json

    import yaml
    from safetensors.torch import load_file

    from surgery.cli import main
    from surgery.weights_io import read_manifest

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
    # the three seeds' dae stacks were pretrained together, and equal the stacks pretrained alone
    stacks = sorted((tmp_path / "3" / "stacks").iterdir())
    assert len(stacks) == 3
    for sdir in stacks:
        assert json.loads((sdir / "pretrain.json").read_text())["population"] == 3
        for depth in (1, 2):
            a = load_file(str(tmp_path / "off" / "stacks" / sdir.name / f"depth{depth}.safetensors"))
            b = load_file(str(sdir / f"depth{depth}.safetensors"))
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for key, alone in runs["off"].items():
        together = runs[3][key]
        for field in ("test_error", "valid_error", "epochs", "best_epoch"):
            assert together[field] == alone[field], (key, field)
        a = load_file(str(tmp_path / "off" / "cells" / key / "model.safetensors"))
        b = load_file(str(tmp_path / "3" / "cells" / key / "model.safetensors"))
        for name in a:
            torch.testing.assert_close(b[name], a[name], rtol=1e-5, atol=1e-5)
        for mode in ("off", 3):  # each model file carries the recipe of its own cell
            cell = tmp_path / str(mode) / "cells" / key
            assert read_manifest(cell / "model.safetensors")["recipe"] == json.loads((cell / "recipe.json").read_text())
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "3").rglob("result.json")}
    assert main(["run", str(tmp_path / "3.yaml"), "--out", str(tmp_path / "3")]) == 0
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "3").rglob("result.json")} == stamps


def test_a_diverging_population_falls_back_to_cells_alone_and_names_the_cell(tmp_path, monkeypatch, capsys):
    """A population whose loss diverges is not the end of the grid: its cells train alone,
    as with population: off, and a cell that diverges alone is named in the error."""
    import yaml

    import surgery.cells
    from surgery.cli import main
    from surgery.errors import TrainingDiverged

    def diverge(self, *args, **kwargs):
        raise TrainingDiverged("the training loss became NaN or infinite in epoch 1")

    recipe = {"data": {"dataset": "synthetic", "n_train": 200, "n_valid": 100, "n_test": 100},
              "experiment": {"conditions": ["none"], "depths": [1], "seeds": [0, 1], "hidden": 8, "population": 2},
              "finetune": {"epochs": 1, "batch_size": 50, "device": "cpu", "progress": False}}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    monkeypatch.setattr(surgery.cells.PopulationTrainer, "fit", diverge)
    assert main(["run", str(tmp_path / "r.yaml"), "--out", str(tmp_path / "a")]) == 0
    results = list((tmp_path / "a" / "cells").glob("*/result.json"))
    assert len(results) == 2 and all("population" not in p.read_text() for p in results)
    monkeypatch.setattr(surgery.cells.Trainer, "fit", diverge)
    capsys.readouterr()
    assert main(["run", str(tmp_path / "r.yaml"), "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert "error: cell none depth 1 seed 0 (" in err and "became NaN or infinite in epoch 1" in err, err


def test_the_batched_gemm_path_equals_alone_too(synth):
    """The GPU's path (one bmm per layer for all K models), run on the CPU."""
    cfgs = CASES["dropout"]
    graphs = [mlp(SIZES, seed=k) for k in range(len(cfgs))]
    pop = PopulationTrainer(graphs, synth, cfgs, [5, 6], stacked=True)
    assert not pop.engine.chain.loop
    pop.fit()
    for k in range(len(cfgs)):
        alone = Trainer(graphs[k], synth, cfgs[k], seed=5 + k)
        alone.fit()
        for name, w in pop.weights(k).items():
            torch.testing.assert_close(w, alone.model.state_dict()[name], rtol=1e-5, atol=1e-5, msg=f"{k} {name}")


def test_a_population_without_a_validation_split_keeps_each_members_last_epoch(synth):
    synth = _without_valid(synth)
    cfgs = CASES["momentum, nesterov, decay"][:2]
    graphs = [mlp(SIZES, seed=k) for k in range(len(cfgs))]
    pop = PopulationTrainer(graphs, synth, cfgs, [7, 8])
    together = pop.fit()
    for k in range(len(cfgs)):
        alone = Trainer(graphs[k], synth, cfgs[k], seed=7 + k)
        res = alone.fit()
        assert together[k]["valid_error"] is res["valid_error"] is None
        assert together[k]["best_epoch"] == res["best_epoch"] == 4
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


# --- pretraining populations: K stacks trained together, each equal to its stack alone ---

from surgery.pretrain import AEConfig, PretrainConfig, RBMConfig, greedy_pretrain, train_autoencoder, train_rbm  # noqa: E402
from surgery.pretrain.autoencoder import train_autoencoder_population  # noqa: E402
from surgery.pretrain.greedy import greedy_pretrain_population  # noqa: E402
from surgery.pretrain.rbm import train_rbm_population  # noqa: E402
from surgery.stack import LayerStack  # noqa: E402

# Three members with their own lr, momentum (one without), weight decay and noise level.
MEMBER_HP = [{"lr": 0.1, "momentum": 0.5}, {"lr": 0.05, "momentum": 0.0, "weight_decay": 0.01},
             {"lr": 0.02, "momentum": 0.9}]
LAYER_CASES = {
    "rbm": (RBMConfig, {"method": "rbm"}),
    "rbm pcd-2": (RBMConfig, {"method": "rbm", "k": 2, "persistent": True}),
    "rbm momentum ramp": (RBMConfig, {"method": "rbm", "final_momentum": 0.8, "momentum_switch": 1}),
    "grbm": (RBMConfig, {"method": "grbm"}),
    "dae": (AEConfig, {"method": "dae"}),
    "untied relu squared": (AEConfig, {"method": "ae", "tied": False, "activation": "relu", "loss": "squared"}),
    "sparse": (AEConfig, {"method": "sparse_ae", "sparsity_weight": 0.3}),
    "gaussian noise tanh": (AEConfig, {"method": "dae", "noise_kind": "gaussian", "activation": "tanh"}),
}


def _layer_inputs():
    g = torch.Generator().manual_seed(5)
    x = (torch.rand(330, 40, generator=g) < 0.3).float()
    return [x, torch.rand(330, 40, generator=g), x]  # two members share their input, one has its own


def _same_layer(alone, member):
    assert alone.tensors.keys() == member.tensors.keys()
    for k in alone.tensors:
        torch.testing.assert_close(member.tensors[k], alone.tensors[k], rtol=1e-5, atol=1e-7)
    assert member.pretrain["history"] == [{**h, "seconds": m["seconds"]} for h, m in
                                          zip(alone.pretrain["history"], member.pretrain["history"])]


@pytest.mark.parametrize("stacked", [False, True], ids=["gemm loop", "bmm"])
@pytest.mark.parametrize("case", list(LAYER_CASES))
def test_pretraining_population_equals_each_layer_alone(case, stacked):
    """RBM and autoencoder layers of K members trained together (the CPU's GEMM loop and the
    GPU's bmm path, both run here) equal each layer trained alone: weights and histories."""
    kind, fixed = LAYER_CASES[case]
    noise = [{"noise": n} for n in (0.3, 0.1, 0.2)] if fixed["method"] == "dae" else [{}] * 3
    cfgs = [kind(hidden=10, epochs=2, **fixed, **hp, **nz) for hp, nz in zip(MEMBER_HP, noise)]
    xs = _layer_inputs()
    alone_fn, pop_fn = (train_rbm, train_rbm_population) if kind is RBMConfig else (train_autoencoder,
                                                                                     train_autoencoder_population)
    alone = [alone_fn(x, c, "h1", 50, torch.Generator().manual_seed(s), False)
             for s, (x, c) in enumerate(zip(xs, cfgs))]
    pop = pop_fn(xs, cfgs, ["h1"] * 3, 50, [torch.Generator().manual_seed(s) for s in range(3)], False, stacked)
    for a, m in zip(alone, pop):
        _same_layer(a, m)


def test_rbm_members_sharing_a_momentum_ramp_update_as_one_bmm_equal_each_alone():
    """Members with the same hyperparameters (one batched update, its momentum a [K, 1, 1]
    tensor set at each epoch) equal each member alone across the momentum switch."""
    cfg = RBMConfig(hidden=10, epochs=3, lr=0.05, momentum=0.5, final_momentum=0.9, momentum_switch=1)
    xs = _layer_inputs()
    alone = [train_rbm(x, cfg, "h1", 50, torch.Generator().manual_seed(s), False) for s, x in enumerate(xs)]
    pop = train_rbm_population(xs, [cfg] * 3, ["h1"] * 3, 50, [torch.Generator().manual_seed(s) for s in range(3)],
                               False, True)
    for a, m in zip(alone, pop):
        _same_layer(a, m)


@pytest.mark.parametrize("stacked", [False, True], ids=["gemm loop", "bmm"])
def test_greedy_population_equals_each_stack_alone(stacked, tmp_path):
    """Greedy stacks (rbm -> dae -> grow) of three seeds, one with its own learning rates,
    pretrained together equal the stacks pretrained one by one; so do the stacks continued
    from the files and generator states saved after layer 1."""
    g = torch.Generator().manual_seed(1)
    x, y = (torch.rand(330, 40, generator=g) < 0.3).float(), torch.randint(0, 3, (330,), generator=g)

    def cfg(lr):
        return PretrainConfig(batch_size=50, layers=[
            {"method": "rbm", "hidden": 20, "epochs": 2, "lr": lr, "momentum": 0.5},
            {"method": "dae", "hidden": 10, "epochs": 2, "lr": lr / 2},
            {"method": "grow", "hidden": 8, "epochs": 1, "lr": lr}])

    cfgs, seeds = [cfg(0.1), cfg(0.1), cfg(0.05)], [0, 1, 2]
    alone = [greedy_pretrain(x, c, s, y, False) for c, s in zip(cfgs, seeds)]
    seen, after_1 = [], []

    def on_layer(i, sts, rngs):
        seen.append((i, len(sts)))
        if i == 0:
            after_1.extend((st.save(tmp_path / f"{k}.safetensors"), rng) for k, (st, rng) in enumerate(zip(sts, rngs)))

    pop = greedy_pretrain_population(x, cfgs, seeds, y, False, on_layer=on_layer, stacked=stacked)
    assert seen == [(0, 3), (1, 3), (2, 3)]
    start = [(LayerStack.load(p), rng) for p, rng in after_1]
    continued = greedy_pretrain_population(x, cfgs, seeds, y, False, stacked=stacked, start=start)
    for a, m, c in zip(alone, pop, continued):
        assert a.info["seed"] == m.info["seed"] == c.info["seed"]
        for la, lm, lc in zip(a.layers, m.layers, c.layers, strict=True):
            _same_layer(la, lm)
            _same_layer(la, lc)


def test_a_pretraining_populations_log_line_gives_its_wall_time_and_every_members_metrics(capsys):
    """In a log (stderr not a terminal) a population's layer line says how many members, the
    layer's wall time (not one member's share) and the range of the members' metrics."""
    g = torch.Generator().manual_seed(1)
    x = (torch.rand(200, 30, generator=g) < 0.3).float()
    cfgs = [PretrainConfig(batch_size=20, layers=[{"method": "rbm", "hidden": 12, "epochs": 3, "lr": lr}])
            for lr in (0.01, 0.5)]
    stacks = greedy_pretrain_population(x, cfgs, [0, 1], progress=None)
    line = [x for x in capsys.readouterr().err.splitlines() if x.startswith("pretrain: ")]
    errs = [f"{e:.4g}" for e in sorted(st.layers[0].pretrain["final"]["recon_error"] for st in stacks)]
    assert errs[0] != errs[1]  # the members differ, so the line shows a range
    assert len(line) == 1 and re.fullmatch(
        rf"pretrain: layer 1/1 \(rbm, 12 units, 2 members\) in \d+\.\d (s|min), recon_error {errs[0]}-{errs[1]}, "
        r"\d+\.\d%(-\d+\.\d%)? of units inactive", line[0]), line


def test_pretraining_population_refuses_members_of_different_shapes():
    xs = _layer_inputs()
    cfgs = [RBMConfig(hidden=10, epochs=1), RBMConfig(hidden=12, epochs=1)]
    with pytest.raises(ConfigError, match=r"member 1\): hidden=12 but member 0 has 10"):
        train_rbm_population(xs[:2], cfgs, ["h1", "h1"], 50, [torch.Generator(), torch.Generator()], False)
    a = PretrainConfig(layers=[{"method": "rbm", "hidden": 5}])
    b = PretrainConfig(layers=[{"method": "dae", "hidden": 5}])
    with pytest.raises(ConfigError, match="member 1: its layers"):
        greedy_pretrain_population(xs[0], [a, b], [0, 1], progress=False)


def test_population_cells_are_counted_as_their_population_finishes(tmp_path):
    """run_populations returns the cells it finished and advances the grid's cell bar by
    each population's size; a second call trains nothing."""
    from surgery.cells import CellRunner
    from surgery.grid import plan_cells
    from surgery.recipe import recipe_from_dict

    r = recipe_from_dict({"data": {"dataset": "synthetic", "n_train": 200, "n_valid": 100, "n_test": 100},
                          "experiment": {"conditions": ["none"], "depths": [1, 2], "seeds": [0, 1, 2],
                                         "hidden": 8, "population": 3},
                          "finetune": {"epochs": 1, "batch_size": 50, "device": "cpu", "progress": False}})
    runner = CellRunner(r, tmp_path)
    cells = plan_cells(r, runner.data.input_shape, runner.data.num_classes)

    class Bar:
        n = 0

        def update(self, k):
            self.n += k

    bar = Bar()
    done = runner.run_populations(cells, 3, bar)
    assert done == {c.key for c in cells} and bar.n == 6
    assert runner.run_populations(cells, 3, bar) == set() and bar.n == 6


@pytest.mark.parametrize("kw,batch", [({}, 50), ({"persistent": True, "k": 2}, 4), ({"k": 3}, 7)],
                         ids=["cd-1", "pcd-2, 82 batches (two banks)", "cd-3, a partial last batch"])
def test_rbm_words_drawn_ahead_are_the_words_drawn_as_it_goes(kw, batch):
    """The CUDA-graph path draws its samples' random words ahead into a bank; on a CPU the
    bank holds exactly the words the eager loop draws step by step, so both train the same
    RBMs bit for bit (three members, their own lr)."""
    xs = _layer_inputs()
    cfgs = [RBMConfig(hidden=10, epochs=2, lr=0.05 * (k + 1), **kw) for k in range(3)]

    def run(ahead):
        return train_rbm_population(xs, cfgs, ["h1"] * 3, batch, [torch.Generator().manual_seed(s) for s in range(3)],
                                    False, ahead=ahead)

    for drawn, ahead in zip(run(False), run(True)):
        for k, t in drawn.tensors.items():
            assert torch.equal(t, ahead.tensors[k]), k


@pytest.mark.parametrize("batch", [50, 7], ids=["20 batches", "147 batches (three banks), a partial last"])
def test_dae_mask_words_drawn_ahead_are_the_words_drawn_as_it_goes(batch):
    """Denoising autoencoders' masks from words drawn ahead (the CUDA-graph path) equal the
    masks drawn step by step, bit for bit; a member without noise draws none (its data
    order stays its own)."""
    xs = _layer_inputs()
    cfgs = [AEConfig(method="dae", hidden=10, epochs=2, lr=0.03,  # 0.1 sends most of member 1's units dead
                      noise=n) for n in (0.3, 0.0, 0.2)]

    def run(ahead):
        return train_autoencoder_population(xs, cfgs, ["h1"] * 3, batch, [torch.Generator().manual_seed(s)
                                                                          for s in range(3)], False, ahead=ahead)

    for drawn, ahead in zip(run(False), run(True)):
        for k, t in drawn.tensors.items():
            assert torch.equal(t, ahead.tensors[k]), k


@pytest.mark.parametrize("kw,scale", [
    ({"method": "conv_ae"}, 1.0),
    ({"method": "conv_ae", "tied": False, "loss": "squared", "activation": "tanh", "stride": 2, "padding": 1}, 0.01),
    ({"method": "conv_ae", "noise": 0.3, "sparsity_weight": 0.2}, 1.0),
], ids=["tied", "untied squared tanh stride 2", "masked sparse"])
def test_conv_ae_population_equals_each_layer_alone_with_autograd(kw, scale):
    """Three conv autoencoders trained as one grouped convolution (their own data order,
    noise, lr, momentum and weight decay) each equal autograd + torch.optim.SGD alone:
    weights and loss histories, over a partial last batch."""
    g = torch.Generator().manual_seed(3)
    xs = [torch.rand(70, 2, 9, 9, generator=g) for _ in range(3)]
    cfgs = [AEConfig(hidden=4, kernel_size=3, epochs=2, **kw, **{**hp, "lr": hp["lr"] * scale}) for hp in MEMBER_HP]
    pop = train_autoencoder_population(xs, cfgs, ["c1"] * 3, 32, [torch.Generator().manual_seed(s) for s in range(3)],
                                       False)
    for k, (x, c) in enumerate(zip(xs, cfgs)):
        alone = train_autoencoder(x, c, "c1", 32, torch.Generator().manual_seed(k), False, _autograd=True)
        for name, t in alone.tensors.items():
            torch.testing.assert_close(pop[k].tensors[name], t, rtol=1e-5, atol=1e-5, msg=f"{k} {name}")
        assert [h["loss"] for h in pop[k].pretrain["history"]] == pytest.approx(
            [h["loss"] for h in alone.pretrain["history"]], rel=1e-5)


def test_a_population_of_one_is_the_single_run(synth):
    """K = 1 through the population's engine and the single run through the Trainer go
    through one loop and end with the same weights, history and result."""
    cfg = _cfg(optimizer={"lr": 0.2, "momentum": 0.9}, early_stopping={"patience": 2})
    g = mlp(SIZES, seed=3, init="classic")
    pop = PopulationTrainer([g], synth, [cfg], [7])
    (res,) = pop.fit()
    alone = Trainer(g, synth, cfg, seed=7)
    single = alone.fit()
    for name, w in pop.weights(0).items():
        torch.testing.assert_close(w, alone.model.state_dict()[name], rtol=1e-5, atol=1e-5, msg=name)
    assert [h["valid_error"] for h in pop.histories[0]] == [h["valid_error"] for h in alone.history]
    assert {k: res[k] for k in ("test_error", "valid_error", "epochs", "best_epoch", "steps")} == \
        {k: single[k] for k in ("test_error", "valid_error", "epochs", "best_epoch", "steps")}


def _random_grid(rng: random.Random) -> dict:
    """A small experiment of 1-3 random arms beside `none`: any method, widths per layer,
    activations, a fixed depth, a fine-tuning override, sometimes tuning in batches."""
    def arm() -> dict:
        a = {"method": rng.choice(["none", "rbm", "grbm", "ae", "dae", "sparse_ae", "grow"])}
        if a["method"] == "grow":
            a["train"] = rng.choice(["all", "new"])
        if rng.random() < .3:
            a["hidden"] = rng.choice([12, [12, 8, 8]])
        if rng.random() < .3 and a["method"] not in ("ae", "dae", "sparse_ae"):
            a["activation"] = rng.choice(["relu", "tanh"])
        if rng.random() < .2:
            a["fixed_depth"] = 1
        if rng.random() < .4:
            a["finetune"] = rng.choice([{"optimizer": {"name": "adam", "lr": 0.01}}, {"dropout": {"h*": 0.2}},
                                        {"schedule": {"lr": {"kind": "exponential", "end": 0.01}}},
                                        {"early_stopping": {"patience": 1}, "epochs": 4}, {"layer_lr": {"h1": 0.5}}])
        return a

    exp = {"conditions": {"none": {"method": "none"}, **{f"a{j}": arm() for j in range(rng.randint(1, 3))}},
           "depths": rng.choice([[1, 2], [2, 3]]), "seeds": rng.choice([[0, 1], [0, 1, 2]]), "hidden": 10,
           "pretrain_epochs": 1}
    if rng.random() < .5:
        exp["tune"] = {"params": {"finetune.optimizer.lr": {"type": "float", "low": 0.02, "high": 0.3, "log": True}},
                       "trials": 2, "batch": 2, "sampler": "random"}
    return {"name": "g", "seed": rng.randint(0, 99), "experiment": exp,
            "data": {"dataset": "synthetic", "n_train": 300, "n_valid": 100, "n_test": 100, "side": 5},
            "finetune": {"epochs": 2, "batch_size": rng.choice([30, 64]), "device": "cpu", "progress": False,
                         "optimizer": {"name": "sgd", "lr": 0.1, "momentum": 0.9}}}


@pytest.mark.parametrize("seed", range(3))
def test_random_grids_give_the_same_results_in_populations_as_cell_by_cell(tmp_path, seed):
    """Whatever the arms (methods, widths, activations, fine-tuning overrides, tuning in
    batches), a grid run with populations (auto, or 2 at a time) gives every cell exactly the
    test error, validation error and epochs it gets trained cell by cell (population: off)."""
    recipe = _random_grid(random.Random(seed))
    got = {}
    for population in ("off", "auto", 2):
        recipe["experiment"]["population"] = population
        (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
        out = tmp_path / f"out-{population}"
        assert main(["run", str(tmp_path / "r.yaml"), "--out", str(out)]) == 0
        with (out / "results.csv").open() as f:
            got[population] = {(r["condition"], r["depth"], r["seed"]): (r["test_error"], r["valid_error"], r["epochs"])
                               for r in csv.DictReader(f)}
    assert len(got["off"]) >= 4 and got["auto"] == got["off"] and got[2] == got["off"]
