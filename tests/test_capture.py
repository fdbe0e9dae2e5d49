"""Steps a GPU captures as CUDA graphs replay what they recorded: each audited on the CPU
(tests/replay_audit.py) over a run the GPU would capture."""

import pytest
import torch

from surgery.capture import Replay
from surgery.finetune import PopulationTrainer, Trainer
from surgery.population import capture_blockers
from surgery.pretrain import AEConfig, RBMConfig
from surgery.pretrain.autoencoder import train_autoencoder_population
from surgery.pretrain.rbm import train_rbm_population
from tests.replay_audit import audit_replays
from tests.test_finetune import cfg, mlp


def _gens(k):
    return [torch.Generator().manual_seed(s) for s in range(k)]


def _inputs():
    x = (torch.rand(330, 40, generator=torch.Generator().manual_seed(5)) < 0.3).float()
    return [x, x]


@pytest.mark.parametrize("kw", [{}, {"persistent": True, "k": 2},
                                {"momentum": 0.5, "final_momentum": 0.9, "momentum_switch": 1, "weight_decay": 1e-3},
                                {"method": "grbm", "lr": 0.01}],
                         ids=["cd-1", "pcd-2", "momentum ramp", "gaussian"])
def test_rbm_step(kw):
    """CD-k and PCD-k of two RBMs together, their samples from words drawn ahead."""
    kw = {"lr": 0.05, **kw}
    cfgs = [RBMConfig(hidden=10, epochs=2, **{**kw, "lr": kw["lr"] * (k + 1)}) for k in range(2)]
    with audit_replays() as audit:
        train_rbm_population(_inputs(), cfgs, ["h1"] * 2, 10, _gens(2), False, ahead=True)
    audit.check(min_replays=40)


@pytest.mark.parametrize("kw", [{"method": "dae", "noise": 0.3}, {"method": "ae", "tied": False, "loss": "squared"},
                                {"method": "sparse_ae", "weight_decay": 1e-3}],
                         ids=["denoising (mask)", "untied, squared", "sparse"])
def test_dense_autoencoder_step(kw):
    """Dense autoencoders, one member without noise: masks from words drawn ahead."""
    cfgs = [AEConfig(hidden=10, epochs=2, lr=0.03, **kw), AEConfig(**{**kw, "hidden": 10, "epochs": 2, "noise": 0})]
    with audit_replays() as audit:
        train_autoencoder_population(_inputs(), cfgs, ["h1"] * 2, 10, _gens(2), False, ahead=True)
    audit.check(min_replays=40)


@pytest.mark.parametrize("opt,extra", [
    ({"name": "sgd", "lr": 0.2, "momentum": 0.5, "nesterov": True, "weight_decay": 1e-4},
     {"schedule": {"lr": {"kind": "exponential", "end": 0.01}, "momentum": {"kind": "linear", "end": 0.9}},
      "dropout": {"h1": 0.3}, "layer_lr": {"out": 0.5}}),
    ({"name": "sgd", "lr": 0.3, "momentum": 0.9},
     {"schedule": {"lr": {"kind": "step", "step_epochs": 1, "gamma": 0.5}}}),
    ({"name": "adam", "lr": 0.005, "weight_decay": 1e-4}, {"schedule": {"lr": {"kind": "cosine", "end": 0.001}}}),
    ({"name": "rmsprop", "lr": 0.003, "momentum": 0.5}, {"schedule": {"momentum": {"kind": "linear", "end": 0.9}},
                                                        "dropout": {"h1": 0.2}}),
    ({"name": "adagrad", "lr": 0.03, "weight_decay": 1e-4}, {"layer_lr": {"out": 0.5}}),
    ({"name": "adadelta", "lr": 1.0}, {"schedule": {"lr": {"kind": "exponential", "end": 0.1}}}),
], ids=["sgd+nesterov+schedules+dropout", "sgd+momentum+schedule", "adam+schedule", "rmsprop+momentum ramp+dropout",
        "adagrad+layer_lr", "adadelta+schedule"])
def test_finetune_step(synth, monkeypatch, opt, extra):
    from surgery import module_engine

    real = module_engine.graph_blockers
    monkeypatch.setattr(module_engine, "graph_blockers", lambda c, device, world: real(c, torch.device("cuda"), world))
    t = Trainer(mlp(), synth, cfg(epochs=2, batch_size=48, optimizer=opt, **extra))
    assert t.engine.graphed is not None
    with audit_replays() as audit:
        t.fit()
    audit.check(min_replays=60)


@pytest.mark.parametrize("opt", [{"momentum": 0.9}, {"name": "adam", "weight_decay": 1e-4}, {"name": "rmsprop"},
                                 {"name": "adagrad"}, {"name": "adadelta"}],
                         ids=["sgd", "adam", "rmsprop", "adagrad", "adadelta"])
def test_population_step(synth, opt):
    """Two models fine-tuned together (their own lr, Nesterov flag and schedule); the first
    stops early (its lr held at 0 from then on) while the other trains on."""
    stop = {"patience": 1, "min_delta": 100.0}
    cfgs = [cfg(epochs=4, optimizer={**opt, "lr": lr, "nesterov": nest and "momentum" in opt}, early_stopping=es,
                schedule={"lr": {"kind": "exponential", "end": 0.01}}) for lr, nest, es in ((0.01, False, stop),
                                                                                         (0.02, True, None))]
    assert capture_blockers(cfgs, torch.device("cuda"), False) == []
    with audit_replays() as audit:
        trainer = PopulationTrainer([mlp(), mlp(seed=1)], synth, cfgs, seeds=[0, 1])
        trainer.fit()
    assert [len(h) for h in trainer.histories] == [2, 4]
    audit.check(min_replays=150)


def test_the_audit_finds_what_a_graph_would_get_wrong():
    """Each way a step can defeat capture, in a toy step the audit must refuse."""
    w, lr, g = torch.zeros(3), torch.tensor(0.1), torch.Generator().manual_seed(0)
    state = {"lr": 0.1, "lr_tensor": lr}
    steps = {
        "a Python lr": lambda: w.sub_(torch.ones(3), alpha=state["lr"]),
        "a host sync": lambda: w.sub_(torch.ones(3) * float(lr)),
        "a tensor made again": lambda: w.sub_(torch.ones(3) * state["lr_tensor"]),
        "its own generator": lambda: w.add_(torch.rand(3, generator=g)),
        "host data": lambda: w.add_(torch.tensor([1.0, 2.0, 3.0])),
    }
    found = {}
    for name, fn in steps.items():
        with audit_replays() as audit:
            replay = Replay(fn, capture=True, warmup=1)
            for i in range(4):
                state["lr"], state["lr_tensor"] = 0.1 / (i + 1), torch.tensor(0.1 / (i + 1))
                replay()
        found[name] = audit.problems
    assert "captured, now" in found["a Python lr"][0]
    assert "reads a tensor's value on the host" in found["a host sync"][0]
    assert "moved since it was captured" in found["a tensor made again"][0]
    assert "generator of its own" in found["its own generator"][0]
    assert "from host data" in found["host data"][0]
    with audit_replays() as audit:  # the same step reading its lr from a tensor refilled in place
        replay = Replay(lambda: w.sub_(torch.ones(3) * lr), capture=True, warmup=1)
        for i in range(4):
            lr.fill_(0.1 / (i + 1))
            replay()
    audit.check(min_replays=2)
