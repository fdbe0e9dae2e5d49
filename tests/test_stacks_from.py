"""`surgery run --stacks-from DIR`: a grid's greedy stacks start from another experiment's
where they share data, seed and first layers, and end as they would have alone."""

import json
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from safetensors.torch import load_file

from surgery.cli import main
from surgery.experiment import run_experiment
from surgery.grid import stack_key
from surgery.results import read_results
from surgery.stack import LayerStack

GRID = {
    "name": "donors",
    "data": {"dataset": "synthetic", "n_train": 300, "n_valid": 100, "n_test": 100},
    "experiment": {"conditions": ["dae", "rbm", "grow"], "depths": [1], "seeds": [0], "hidden": 12,
                   "pretrain_epochs": 2},
    "finetune": {"epochs": 2, "batch_size": 50, "device": "cpu", "progress": False,
                 "optimizer": {"name": "sgd", "lr": 0.2, "momentum": 0.9}},
}


def _recipe(tmp_path: Path, name: str, **experiment) -> Path:
    r = {**GRID, "experiment": {**GRID["experiment"], **experiment}}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(r))
    return path


def _run(capsys, recipe: Path, out: Path, *donors: Path) -> str:
    args = ["run", str(recipe), "--out", str(out)]
    for d in donors:
        args += ["--stacks-from", str(d)]
    capsys.readouterr()
    assert main(args) == 0
    return capsys.readouterr().err


def _results(out: Path) -> list[tuple]:
    return sorted((r["condition"], r["depth"], r["seed"], r["test_error"], r["best_epoch"]) for r in read_results(out))


def _taken_key(donor: Path, plan: Path) -> str:
    """The donor stack whose first layer the stack of ``plan`` (a plan.json) took."""
    mine = json.loads(plan.read_text())
    for theirs in donor.glob("stacks/*/plan.json"):
        other = json.loads(theirs.read_text())
        if other["seed"] == mine["seed"] and other["pretrain"]["layers"][0] == mine["pretrain"]["layers"][0]:
            return theirs.parent.name
    raise AssertionError(f"no stack of {donor} has {plan}'s first layer")


def _same_stacks(a: Path, b: Path) -> None:
    """Every snapshot and generator state under ``a/stacks`` is in ``b/stacks``, bit for bit."""
    files = sorted(p.relative_to(a) for p in a.glob("stacks/*/*.safetensors"))
    assert files and files == sorted(p.relative_to(b) for p in b.glob("stacks/*/*.safetensors"))
    for f in files:
        ta, tb = load_file(str(a / f)), load_file(str(b / f))
        assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta), f


def _took_an_hour(stacks: Path) -> None:
    """Each layer of the snapshots under ``stacks`` recorded as pretrained in an hour: time a
    stack that takes them did not spend."""
    for path in stacks.glob("*/depth*.safetensors"):
        st = LayerStack.load(path)
        for layer in st.layers:
            layer.pretrain["seconds"] = 3600.0
        st.save(path)


def _pretrain_seconds(out: Path) -> list[float]:
    return [json.loads(p.read_text())["seconds"] for p in out.glob("stacks/*/pretrain.json")]


def test_a_deeper_grid_continues_a_shallower_grid_s_stacks_and_ends_as_alone(tmp_path, capsys):
    one = tmp_path / "one"
    _run(capsys, _recipe(tmp_path, "one"), one)
    _took_an_hour(one / "stacks")
    deeper = _recipe(tmp_path, "two", depths=[2, 3])
    err = _run(capsys, deeper, tmp_path / "continued", one)
    # a taken layer's time is the donor's, counted in its report: a merge of both counts it once
    assert len(_pretrain_seconds(tmp_path / "continued")) == 3 and max(_pretrain_seconds(tmp_path / "continued")) < 3600
    assert all(float(r["pretrain_seconds"]) < 3600 for r in read_results(tmp_path / "continued"))
    assert err.count("starts from the first 1 layer of") == 3, err  # each arm's, from the one-layer grid's
    _run(capsys, deeper, tmp_path / "alone")
    assert _results(tmp_path / "continued") == _results(tmp_path / "alone")
    _same_stacks(tmp_path / "alone", tmp_path / "continued")
    plans = sorted((tmp_path / "continued").glob("stacks/*/plan.json"))
    assert len(plans) == 3 and all(stack_key(json.loads(p.read_text())) == p.parent.name for p in plans)
    capsys.readouterr()
    assert main(["inspect", str(plans[0].parent)]) == 0
    said = capsys.readouterr().out.splitlines()
    plan_line = r"its plan \(plan\.json\): (dae|rbm|grow) 12, \1 12, \1 12; seed 0, data synthetic"
    assert re.fullmatch(plan_line, said[1]), said
    assert said[2] == f"taken from {one / 'stacks'}/{_taken_key(one, plans[0])} (--stacks-from): its first 1 layer"
    assert main(["inspect", str(tmp_path / "continued")]) == 0
    said = capsys.readouterr().out
    assert f"3 of them started from another experiment's (--stacks-from {one}), after layer 1 of theirs" in said
    # a three-layer grid takes the continued grid's three-layer stacks whole: nothing is pretrained again
    _took_an_hour(tmp_path / "continued" / "stacks")
    err = _run(capsys, _recipe(tmp_path, "three", depths=[3]), tmp_path / "again", tmp_path / "continued")
    assert err.count("starts from the first 3 layers of") == 3, err
    assert len(_pretrain_seconds(tmp_path / "again")) == 3 and max(_pretrain_seconds(tmp_path / "again")) < 3600
    assert "pretrain: continuing the stack after layer 3 of 3" in err
    _same_stacks(tmp_path / "again", tmp_path / "alone")


def test_a_shallower_grid_takes_the_first_layers_of_a_deeper_one(tmp_path, capsys):
    """Stacks made before ``plan.json`` was kept beside them are known by their cells' recipes."""
    deep = tmp_path / "deep"
    _run(capsys, _recipe(tmp_path, "deep", depths=[2]), deep)
    for plan in deep.glob("stacks/*/plan.json"):
        plan.unlink()
    shallow = _recipe(tmp_path, "shallow", depths=[1])
    err = _run(capsys, shallow, tmp_path / "taken", deep)
    assert err.count("starts from the first 1 layer of") == 3, err
    _run(capsys, shallow, tmp_path / "alone")
    assert _results(tmp_path / "taken") == _results(tmp_path / "alone")
    _same_stacks(tmp_path / "alone", tmp_path / "taken")


def test_stacks_of_another_plan_are_not_taken(tmp_path, capsys):
    one = tmp_path / "one"
    _run(capsys, _recipe(tmp_path, "one"), one)
    for name, changed, says in (
            ("seed", {"seeds": [1]}, "has seed 0 where this run has 1"),
            ("epochs", {"pretrain_epochs": 1}, "has pretrain.layers.0.epochs 2 where this run has 1"),
            ("noise", {"methods": {"dae": {"noise": 0.1}}, "conditions": ["dae"]},
             "has pretrain.layers.0.noise 0.25 where this run has 0.1")):
        err = _run(capsys, _recipe(tmp_path, name, depths=[2], **changed), tmp_path / name, one)
        assert "starts from" not in err, name
        told = [line for line in err.splitlines() if "takes nothing from --stacks-from" in line]
        assert told and all(says in line and line.endswith("it pretrains from layer 1") for line in told), err


def test_stacks_from_that_cannot_be_used_are_refused_in_one_paragraph(tmp_path, capsys):
    recipe = _recipe(tmp_path, "r")
    (tmp_path / "plain").mkdir()
    single = tmp_path / "single.yaml"
    single.write_text(yaml.safe_dump({"data": GRID["data"], "surgery": {"ops": [
        {"op": "insert", "name": "h1", "units": 4, "in_features": 20}, {"op": "head", "classes": 2}]}}))
    for args, says in (
            ([str(recipe), "--out", str(tmp_path / "o"), "--stacks-from", str(tmp_path / "missing")], "does not exist"),
            ([str(recipe), "--out", str(tmp_path / "o"), "--stacks-from", str(tmp_path / "plain")],
             "is not an experiment's output directory"),
            ([str(single), "--out", str(tmp_path / "s"), "--stacks-from", str(tmp_path / "plain")],
             "has no experiment: section")):
        capsys.readouterr()
        assert main(["run", *args]) != 0
        err = capsys.readouterr().err
        assert "--stacks-from" in err and says in err and "Traceback" not in err, err
        assert not (tmp_path / "o").exists() and not (tmp_path / "s").exists()
    _run(capsys, recipe, tmp_path / "o")
    with pytest.raises(Exception, match="is this run's --out"):
        run_experiment(recipe, tmp_path / "o", progress=False, stacks_from=[tmp_path / "o"])


def test_stacks_pretrained_together_start_from_donors_too(tmp_path, capsys):
    """With populations, the seeds of an arm pretrain together; each takes its own donor's layers."""
    together = {"conditions": ["dae"], "seeds": [0, 1], "population": 2}
    one = tmp_path / "one"
    _run(capsys, _recipe(tmp_path, "one", **together), one)
    _took_an_hour(one / "stacks")
    deeper = _recipe(tmp_path, "two", depths=[2], **together)
    err = _run(capsys, deeper, tmp_path / "continued", one)
    assert err.count("starts from the first 1 layer of") == 2, err
    assert "pretrain: continuing 2 stacks after layer 1 of 2" in err
    assert len(_pretrain_seconds(tmp_path / "continued")) == 2 and max(_pretrain_seconds(tmp_path / "continued")) < 3600
    _run(capsys, deeper, tmp_path / "alone")
    assert _results(tmp_path / "continued") == _results(tmp_path / "alone")
    _same_stacks(tmp_path / "alone", tmp_path / "continued")


@pytest.mark.parametrize("together", [{}, {"seeds": [0, 1], "population": 2}], ids=["alone", "population"])
def test_a_continued_stack_records_each_layer_s_time_once(tmp_path, capsys, monkeypatch, together):
    """The pretraining seconds of a stack that continues (another grid's first layers, or its
    own run's before a stop) are this run's time plus the earlier layers' of its own: the
    layers it trains now are not counted again (they join the very stack it continued)."""
    import surgery.stacks_dir as stacks_dir

    grid = {"conditions": ["dae"], **together}
    one = tmp_path / "one"
    _run(capsys, _recipe(tmp_path, "one", **grid), one)
    monkeypatch.setattr(stacks_dir, "time", SimpleNamespace(perf_counter=lambda: 0.0))  # this run took no time
    three = _recipe(tmp_path, "three", depths=[3], **grid)
    _run(capsys, three, tmp_path / "continued", one)
    assert _pretrain_seconds(tmp_path / "continued") == [0.0] * len(together.get("seeds", [0]))
    # stopped after its first layer, then run again in its own directory: that layer's seconds, once
    own = tmp_path / "own"
    _run(capsys, three, own)
    for sdir in own.glob("stacks/*"):
        for f in ("pretrain.json", "depth2.safetensors", "rng2.safetensors", "depth3.safetensors", "rng3.safetensors"):
            (sdir / f).unlink()
    shutil.rmtree(own / "cells")
    first = {sdir.name: LayerStack.load(sdir / "depth1.safetensors").layers[0].pretrain["seconds"]
             for sdir in own.glob("stacks/*")}
    assert "continuing" in _run(capsys, three, own)
    assert {sdir.name: json.loads((sdir / "pretrain.json").read_text())["seconds"]
            for sdir in own.glob("stacks/*")} == {k: round(v, 3) for k, v in first.items()}
