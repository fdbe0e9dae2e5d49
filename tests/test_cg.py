"""Conjugate-gradient fine-tuning (Hinton & Salakhutdinov 2006's method): the line-search
minimiser finds known minima, and as a fine-tuning optimizer it trains, resumes exactly,
refuses what it cannot use and leaves populations to train alone."""

import json

import pytest
import torch
import yaml

from surgery.cg import ConjugateGradient, minimize
from surgery.cli import main
from surgery.errors import ConfigError
from surgery.finetune import Trainer
from surgery.finetune_config import FinetuneConfig
from surgery.population import check_population
from tests.test_finetune import cfg, mlp


def _rosenbrock(x):
    x = x.detach().clone().requires_grad_(True)
    f = (1 - x[0]) ** 2 + 100 * (x[1] - x[0] ** 2) ** 2
    f.backward()
    return float(f.detach()), x.grad


def test_minimize_finds_the_rosenbrock_minimum():
    x = minimize(_rosenbrock, torch.tensor([-1.2, 1.0], dtype=torch.float64), line_searches=60)
    assert torch.allclose(x, torch.ones(2, dtype=torch.float64), atol=1e-6)
    # fewer line searches stop short of it, and never above the start
    short = minimize(_rosenbrock, torch.tensor([-1.2, 1.0], dtype=torch.float64), line_searches=5)
    assert _rosenbrock(short)[0] < _rosenbrock(torch.tensor([-1.2, 1.0], dtype=torch.float64))[0]
    assert not torch.allclose(short, torch.ones(2, dtype=torch.float64), atol=1e-2)


def test_minimize_solves_a_quadratic_and_survives_non_finite_trial_points():
    g = torch.Generator().manual_seed(0)
    m = torch.randn(6, 6, generator=g, dtype=torch.float64)
    a, b = m @ m.T + torch.eye(6, dtype=torch.float64), torch.randn(6, generator=g, dtype=torch.float64)
    sol = torch.linalg.solve(a, b)
    x = minimize(lambda x: (float(0.5 * x @ a @ x - b @ x), a @ x - b), torch.zeros(6, dtype=torch.float64), 40)
    assert torch.allclose(x, sol, atol=1e-6)

    def walled(x):  # the quadratic, undefined beyond |x| > 3: the search must back off, not fail
        if float(x.abs().max()) > 3:
            return float("nan"), torch.full_like(x, float("nan"))
        return float(0.5 * x @ x - 2.5 * x.sum()), x - 2.5

    y = minimize(walled, torch.zeros(6, dtype=torch.float64), 20)
    assert torch.allclose(y, torch.full((6,), 2.5, dtype=torch.float64), atol=1e-6)


def test_cg_optimizer_steps_only_what_trains_and_adds_weight_decay():
    w = torch.nn.Parameter(torch.tensor([3.0, -2.0]))
    frozen = torch.nn.Parameter(torch.tensor([5.0]), requires_grad=False)
    opt = ConjugateGradient([w, frozen], line_searches=20, weight_decay=1.0)

    def closure():
        opt.zero_grad()
        loss = ((w - 1.0) ** 2).sum() + frozen.sum()
        loss.backward()
        return loss

    before = opt.step(closure)
    assert float(before) == pytest.approx(4 + 9 + 5)  # the loss before the step
    # minimum of (w-1)^2 + w^2/2: w = 2/3
    assert torch.allclose(w.detach(), torch.full((2,), 2 / 3), atol=1e-5)
    assert float(frozen) == 5.0 and opt.evaluations > 2


def test_cg_fine_tuning_trains_and_resumes_exactly(synth, tmp_path):
    c = cfg(epochs=4, batch_size=200, optimizer={"name": "cg", "line_searches": 2}, checkpoint_every=1,
            unfreeze_at={"h1": 2})  # the paper's warm-up: the lower layers join after a few epochs
    ref = Trainer(mlp((64, 32, 16)), synth, c, seed=3, out_dir=tmp_path / "ref")
    r = ref.fit()
    losses = [h["train_loss"] for h in ref.history]
    assert losses[-1] < 0.5 * losses[0] and r["valid_error"] < 30
    assert all(h["lr"] is None and h["momentum"] is None for h in ref.history)  # it has neither
    assert all(h["evaluations"] >= 2 * ref.engine.plan.steps for h in ref.history)  # a batch: its start + >= 1

    def kill_after_two(trainer, rec):
        if rec["epoch"] == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        Trainer(mlp((64, 32, 16)), synth, c, seed=3, out_dir=tmp_path / "cut", on_epoch_end=kill_after_two).fit()
    t = Trainer(mlp((64, 32, 16)), synth, c, seed=3, out_dir=tmp_path / "cut")
    t.fit(resume=True)
    for k, v in ref.model.state_dict().items():
        assert torch.equal(v, t.model.state_dict()[k]), k


def test_cg_refuses_rates_it_does_not_have_and_populations():
    with pytest.raises(ValueError, match="schedule: optimizer cg"):
        FinetuneConfig(optimizer={"name": "cg"}, schedule={"lr": {"kind": "exponential"}})
    with pytest.raises(ValueError, match="layer_lr: optimizer cg"):
        FinetuneConfig(optimizer={"name": "cg"}, layer_lr={"h1": 0.1})
    with pytest.raises(ConfigError, match="cg"):
        check_population([FinetuneConfig(optimizer={"name": "cg"})] * 2)
    with pytest.raises(ValueError, match="line_searches: only optimizer cg takes it"):
        FinetuneConfig(optimizer={"name": "sgd", "line_searches": 3})
    assert "line_searches" not in FinetuneConfig(optimizer={"name": "cg"}).model_dump(exclude_none=True)["optimizer"]


def test_an_experiment_with_cg_trains_its_cells_alone_in_a_population_run(tmp_path, capsys):
    r = {"name": "cg", "seed": 0, "data": {"dataset": "synthetic", "n_train": 300, "n_valid": 100, "n_test": 100},
         "experiment": {"conditions": ["none"], "depths": [1], "seeds": [0, 1], "hidden": 16, "population": 2},
         "finetune": {"epochs": 2, "batch_size": 100, "device": "cpu", "progress": False,
                      "optimizer": {"name": "cg", "line_searches": 2}}}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(r))
    assert main(["run", str(tmp_path / "r.yaml"), "--out", str(tmp_path / "out")]) == 0
    assert "population:" not in capsys.readouterr().err
    results = [json.loads(p.read_text()) for p in (tmp_path / "out").glob("cells/*/result.json")]
    assert len(results) == 2 and all(x["test_error"] < 60 for x in results)


def test_a_recipe_with_a_cg_schedule_is_one_paragraph(tmp_path, capsys):
    r = {"name": "x", "data": {"dataset": "synthetic"},
         "finetune": {"optimizer": {"name": "cg"}, "schedule": {"lr": {"kind": "exponential"}}}}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(r))
    assert main(["validate", str(tmp_path / "r.yaml")]) == 2
    err = capsys.readouterr().err
    assert "schedule: optimizer cg" in err and "Traceback" not in err


def test_a_nan_loss_under_cg_stops_with_the_epoch_and_step(synth):
    from surgery.errors import TrainingDiverged

    wild = mlp(act="relu")  # overflowing weights (NaN data is refused before training)
    wild.node("out").tensors["weight"].fill_(3e38)
    with pytest.raises(TrainingDiverged, match=r"epoch 1, step \d+"):
        Trainer(wild, synth, cfg(optimizer={"name": "cg"})).fit()
