import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from surgery.dataset import Dataset, Split
from surgery.errors import ConfigError, SurgeryError, SurgeryWarning, TrainingDiverged
from surgery.finetune import FinetuneConfig, Trainer
from surgery.graph import ModelGraph
from surgery.layers import init_weight
from surgery.model_file import load_model
from surgery.ops import FreezeOp, HeadOp, InsertOp
from surgery.schedules import LRSchedule, MomentumSchedule
from surgery.stack import LayerStack
from surgery.weights_io import read_manifest
from tests.helpers import random_stack

ROOT = Path(__file__).resolve().parents[1]


def mlp(sizes=(64, 32), classes=4, act="sigmoid", seed=0, init="classic"):
    g = ModelGraph()
    gen = torch.Generator().manual_seed(seed)
    for i, (a, b) in enumerate(zip(sizes, sizes[1:])):
        op = InsertOp(name=f"h{i + 1}", units=b, activation=act, init=init, in_features=a if i == 0 else None)
        op.apply(g, None, gen)
    HeadOp(classes=classes).apply(g)
    return g


def cfg(**kw):
    base = {"epochs": 2, "batch_size": 50, "device": "cpu", "progress": False,
            "optimizer": {"name": "sgd", "lr": 0.1, "momentum": 0.9}}
    base.update(kw)
    return FinetuneConfig.model_validate(base)


def test_784_500_10_under_10_percent(mnist_small):
    g = mlp((784, 500), 10)
    r = Trainer(g, mnist_small, cfg(epochs=6)).fit()
    assert r["test_error"] < 10.0, r
    assert r["epochs"] == 6 and r["device"] == "cpu"


@pytest.mark.parametrize("opt", [
    {"name": "sgd", "lr": 0.5},
    {"name": "sgd", "lr": 0.1, "momentum": 0.9, "nesterov": True},
    {"name": "rmsprop", "lr": 0.002},
    {"name": "adagrad", "lr": 0.05},
    {"name": "adadelta", "lr": 1.0},
    {"name": "adam", "lr": 0.002, "weight_decay": 1e-4},
])
def test_every_optimizer_learns(synth, opt):
    t = Trainer(mlp(), synth, cfg(epochs=3, optimizer=opt))
    r = t.fit()
    h = t.history
    assert h[-1]["train_loss"] < 0.7 * h[0]["train_loss"], (opt, h)
    assert r["test_error"] < 40
    assert type(t.engine.opt).__name__.lower().startswith(opt["name"][:4])


@pytest.mark.parametrize("opt", [
    {"name": "sgd", "lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-3},
    {"name": "adagrad", "lr": 0.05, "weight_decay": 1e-3},
    {"name": "adam", "lr": 0.01, "weight_decay": 1e-3},
])
def test_fused_optimizers_step_like_the_reference_ones(opt):
    """build_optimizer picks torch's fused kernels where they exist; the steps must match
    the reference (for-loop) implementation."""
    from surgery.schedules import OptimizerConfig, build_optimizer

    ocfg = OptimizerConfig.model_validate(opt)
    a = [torch.nn.Parameter(torch.randn(20, 30, generator=torch.Generator().manual_seed(i))) for i in range(2)]
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    ours = build_optimizer(ocfg, [{"params": a[:1], "lr_mult": 2.0}, {"params": a[1:]}])
    kw = {k: v for k, v in opt.items() if k != "name"}
    cls = {"sgd": torch.optim.SGD, "adagrad": torch.optim.Adagrad, "adam": torch.optim.Adam}[opt["name"]]
    ref = cls([{"params": b[:1], "lr": 2 * opt["lr"]}, {"params": b[1:]}], foreach=False, **kw)
    for step in range(5):
        for p, q in zip(a, b):
            g = torch.randn(p.shape, generator=torch.Generator().manual_seed(100 + step))
            p.grad, q.grad = g.clone(), g.clone()
        ours.step()
        ref.step()
    for p, q in zip(a, b):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_error_does_not_depend_on_the_evaluation_chunk(synth):
    t = Trainer(mlp(), synth, cfg(epochs=1))
    t.fit()
    assert t.error("valid", chunk=7) == pytest.approx(t.error("valid")) == pytest.approx(t.error("valid", chunk=10**6))


def test_data_that_does_not_fit_the_network_is_refused_before_training(synth):
    from surgery.errors import ShapeError

    with pytest.raises(ShapeError, match=r"takes input \(63,\) but the data .* gives \(64,\)"):
        Trainer(mlp((63, 32)), synth, cfg())
    with pytest.raises(ShapeError, match="output \\(3,\\), but the data .* has 4 classes.*head of 4"):
        Trainer(mlp(classes=3), synth, cfg())


def test_keep_freed_memory_applies_once_and_can_be_turned_off(monkeypatch):
    from surgery import runtime

    monkeypatch.setattr(runtime, "_done", False)
    monkeypatch.setenv("SURGERY_MALLOC_TUNING", "0")
    assert runtime.keep_freed_memory() is False
    monkeypatch.delenv("SURGERY_MALLOC_TUNING")
    import platform

    if sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc":
        assert runtime.keep_freed_memory() is True
        assert runtime.keep_freed_memory() is True  # idempotent


def test_exponential_lr_and_linear_momentum_follow_the_schedule(synth):
    c = cfg(epochs=4, schedule={"lr": {"kind": "exponential", "start": 0.5, "end": 0.001},
                                "momentum": {"kind": "linear", "start": 0.5, "end": 0.99}})
    t = Trainer(mlp(), synth, c)
    t.fit()
    total = t.engine.plan.total_steps
    last = [h["lr"] for h in t.history]
    # the lr logged for epoch e is the one used at its last step
    expect = [0.5 * (0.001 / 0.5) ** (((e + 1) * t.engine.plan.steps - 1) / (total - 1)) for e in range(4)]
    assert all(math.isclose(a, b, rel_tol=1e-9) for a, b in zip(last, expect))
    assert math.isclose(t.history[-1]["lr"], 0.001) and math.isclose(t.history[-1]["momentum"], 0.99)
    assert all(g["lr"] == pytest.approx(0.001) for g in t.engine.opt.param_groups)


def test_schedule_shapes():
    s = LRSchedule(kind="step", start=1.0, gamma=0.5, step_epochs=2)
    assert [s.value(1.0, e * 10, 10, 100) for e in range(6)] == [1, 1, 0.5, 0.5, 0.25, 0.25]
    c = LRSchedule(kind="cosine", start=1.0, end=0.0 + 1e-9)
    assert c.value(1, 0, 10, 101) == pytest.approx(1.0) and c.value(1, 50, 10, 101) == pytest.approx(0.5, abs=1e-6)
    assert c.value(1, 100, 10, 101) == pytest.approx(0.0, abs=1e-6)
    e = LRSchedule(kind="exponential", start=0.5, end=0.0001, per="epoch")
    assert e.value(1, 5, 10, 100) == e.value(1, 9, 10, 100) == 0.5
    m = MomentumSchedule(kind="sutskever", end=0.995)
    vals = [m.value(t, 100, 10**6) for t in (0, 249, 250, 750, 10**6)]
    assert vals[:3] == [0.5, 0.5, 0.75] and vals[3] == pytest.approx(1 - 2 ** (-1 - 2)) and vals[4] == 0.995
    lin = MomentumSchedule(kind="linear", start=0.7, end=0.995, ramp_epochs=2)
    assert lin.value(0, 10, 100) == 0.7 and lin.value(19, 10, 100) == pytest.approx(0.995)
    assert lin.value(60, 10, 100) == 0.995


def test_frozen_weights_stay_equal_and_unfreeze_at_epoch(synth):
    g = mlp((64, 32, 16))
    FreezeOp(nodes=["h1"]).apply(g)
    t = Trainer(g, synth, cfg(epochs=2))
    w0 = t.model.h1.weight.detach().clone()
    t.fit()
    assert torch.equal(t.model.h1.weight, w0)
    assert not torch.equal(t.model.h2.weight, g.node("h2").tensors["weight"])
    # head first, then everything (a run that ends before the unfreezing says so)
    with pytest.warns(SurgeryWarning, match="'h\\*' becomes trainable at epoch 2, after the last of 1 epochs"):
        t = Trainer(mlp((64, 32, 16)), synth, cfg(epochs=1, unfreeze_at={"h*": 1}))
    w1 = t.model.h1.weight.detach().clone()
    t.fit()
    assert torch.equal(t.model.h1.weight, w1)
    t = Trainer(mlp((64, 32, 16)), synth, cfg(epochs=2, unfreeze_at={"h*": 1}))
    t.fit()
    assert not torch.equal(t.model.h1.weight, w1)
    t = Trainer(mlp((64, 32, 16)), synth, cfg(epochs=1, freeze_at={"h1": 0}))
    t.fit()
    assert torch.equal(t.model.h1.weight, w1)


def test_layer_lr_multipliers_give_per_group_lr(synth):
    t = Trainer(mlp((64, 32, 16)), synth, cfg(epochs=1, layer_lr={"h1": 2.0, "out": 0.5},
                                              schedule={"lr": {"kind": "exponential", "start": 0.2, "end": 0.02}}))
    t.fit()
    lrs = {g["node"]: g["lr"] for g in t.engine.opt.param_groups}
    assert lrs == pytest.approx({"h1": 2 * 0.02, "h2": 0.02, "out": 0.01})
    with pytest.raises(SurgeryError, match="layer_lr: 'zz' matches no layer"):
        Trainer(mlp(), synth, cfg(layer_lr={"zz": 2.0}))


def test_sparse_init_gives_15_nonzeros_per_unit():
    w = init_weight(torch.empty(100, 784), "sigmoid", "sparse", generator=torch.Generator().manual_seed(0))
    assert ((w != 0).sum(1) == 15).all()
    assert 0.5 < w[w != 0].std() < 1.5
    g = mlp((784, 100), init="sparse")
    assert ((g.node("h1").tensors["weight"] != 0).sum(1) == 15).all()


def test_classic_init_makes_deep_sigmoid_nets_trainable(mnist_small):
    """784-1000x3-10 sigmoid: classic init learns in one epoch, PyTorch's stock init does not."""
    res = {}
    for init in ("classic", "torch"):
        g = mlp((784, 1000, 1000, 1000), 10, init=init)
        c = cfg(epochs=1, batch_size=100, optimizer={"name": "sgd", "lr": 0.1, "momentum": 0})
        res[init] = Trainer(g, mnist_small, c).fit()["test_error"]
    # 50 steps: the classic init is well on its way; the stock init still predicts one class
    assert res["classic"] < 70 and res["torch"] > 85, res


def test_dropout_is_placed_and_inactive_at_eval(synth):
    t = Trainer(mlp((64, 32, 16)), synth, cfg(epochs=1, dropout={"h*": 0.5}, input_dropout=0.2))
    assert t.engine.graph.order() == ["drop_input", "h1", "drop_h1", "h2", "drop_h2", "out"]
    t.fit()
    t.model.eval()
    x = synth.test.x[:10]
    assert torch.equal(t.model(x), t.model(x))


def test_early_stopping_restores_the_best_weights(synth):
    c = cfg(epochs=30, early_stopping={"patience": 2}, optimizer={"name": "sgd", "lr": 2.0, "momentum": 0.9})
    t = Trainer(mlp(), synth, c)
    r = t.fit()
    assert r["epochs"] < 30
    best = min(h["valid_error"] for h in t.history)
    assert r["valid_error"] == pytest.approx(best)
    assert r["best_epoch"] == 1 + [h["valid_error"] for h in t.history].index(best)


@pytest.mark.parametrize("validates", [True, False], ids=["valid split", "no valid split"])
def test_kill_and_resume_equals_uninterrupted(synth, tmp_path, validates):
    synth = synth if validates else _without_valid(synth)
    c = cfg(epochs=4, checkpoint_every=1, dropout={"h1": 0.3},
            schedule={"lr": {"kind": "exponential", "start": 0.3, "end": 0.01}, "momentum": {"kind": "linear"}})
    ref = Trainer(mlp((64, 32, 16)), synth, c, seed=1, out_dir=tmp_path / "ref")
    r_ref = ref.fit()
    def kill_after_two(trainer, rec):  # what Ctrl-C after epoch 2 does
        if rec["epoch"] == 2:
            raise KeyboardInterrupt

    t = Trainer(mlp((64, 32, 16)), synth, c, seed=1, out_dir=tmp_path / "cut", on_epoch_end=kill_after_two)
    with pytest.raises(KeyboardInterrupt):
        t.fit()
    torch.manual_seed(12345)  # the resumed process starts with other RNG state
    t2 = Trainer(mlp((64, 32, 16)), synth, c, seed=1, out_dir=tmp_path / "cut")
    r2 = t2.fit(resume=True)
    for k, v in ref.model.state_dict().items():
        assert torch.equal(v, t2.model.state_dict()[k]), k
    assert r2["test_error"] == r_ref["test_error"]
    lines = (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in lines] == [1, 2, 3, 4]


def test_training_again_in_a_finished_runs_directory_unmarks_it_finished(synth, tmp_path, capsys):
    """A run trained in a directory where another had finished, stopped midway: its
    result.json (the mark of a finished run) went with the first epoch, as the old
    metrics.jsonl did; `inspect` said 'finished' with the old run's numbers."""
    from surgery.cli import main

    Trainer(mlp(), synth, cfg(epochs=2), out_dir=tmp_path).fit()
    assert (tmp_path / "result.json").is_file()
    def stop_after_one(trainer, rec):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        Trainer(mlp(), synth, cfg(epochs=5, checkpoint_every=1), out_dir=tmp_path, on_epoch_end=stop_after_one).fit()
    assert not (tmp_path / "result.json").exists()
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 1
    capsys.readouterr()
    assert main(["inspect", str(tmp_path)]) == 0
    assert "unfinished: epoch 1 of 5 trained" in capsys.readouterr().out


def test_nan_loss_stops_with_epoch_and_step_and_keeps_checkpoint(synth, tmp_path):
    c = cfg(epochs=3, checkpoint_every=1)
    t = Trainer(mlp(), synth, c, out_dir=tmp_path)
    t.fit()
    ck = tmp_path / "checkpoints" / "last.safetensors"
    before = ck.read_bytes()
    wild = mlp(act="relu")  # (NaN data is refused before training: test_data_with_nan_...)
    wild.node("out").tensors["weight"].fill_(3e38)
    c2 = cfg(epochs=3, checkpoint_every=1)
    with pytest.raises(TrainingDiverged, match=r"epoch 1, step \d+"):
        Trainer(wild, synth, c2, out_dir=tmp_path).fit()
    assert ck.read_bytes() == before


def test_overflowing_weights_stop_at_the_first_step(synth):
    g = mlp(act="relu")
    g.node("out").tensors["weight"].fill_(3e38)
    with pytest.raises(TrainingDiverged, match="NaN or infinite in epoch 1, step 1 "):
        Trainer(g, synth, cfg()).fit()


@pytest.mark.parametrize("split", ["train", "test"])
def test_data_the_trainer_cannot_use_is_named_before_training(synth, split):
    """A NaN input had surfaced as a diverged loss blamed on the lr; a label of -1 as an
    IndexError from inside cross_entropy; float64 examples, int32 labels, labels fewer than
    examples or an empty training split as torch errors. Each is named, with the split,
    before training."""
    from surgery.errors import DataError
    from surgery.finetune import PopulationTrainer

    def with_split(**kw):
        old = getattr(synth, split)
        new = Split(kw.get("x", old.x), kw.get("y", old.y))
        return Dataset(synth.name, *[new if s == split else getattr(synth, s) for s in ("train", "valid", "test")])

    x = getattr(synth, split).x.clone()
    x[1, 2] = float("nan")
    y = getattr(synth, split).y.clone()
    y[0] = -1
    old = getattr(synth, split)
    for data, what in ((with_split(x=x), f"its {split} split holds 1 NaN or infinite inputs"),
                       (with_split(y=y), f"its {split} split has negative labels"),
                       (with_split(x=old.x.double()), f"its {split} split has torch.float64 examples"),
                       (with_split(y=old.y.int()), f"its {split} split has torch.float32 examples and torch.int32"),
                       (with_split(y=old.y[1:]), f"its {split} split has {len(old)} examples but labels of shape"),
                       (with_split(x=old.x[:0], y=old.y[:0]),
                        "its train split is empty" if split == "train" else None)):
        if what is None:  # an empty test split is no error
            continue
        with pytest.raises(DataError, match=what):
            Trainer(mlp(), data, cfg())
        with pytest.raises(DataError, match=what):
            PopulationTrainer([mlp(), mlp(seed=1)], data, [cfg(), cfg()], [0, 1])


def test_a_batch_larger_than_the_training_set_warns(synth):
    from surgery.finetune import PopulationTrainer

    big = cfg(batch_size=len(synth.train) + 1)
    with pytest.warns(SurgeryWarning, match=f"finetune.batch_size: {len(synth.train) + 1} is more than the "):
        Trainer(mlp(), synth, big)
    with pytest.warns(SurgeryWarning, match="each epoch is one step on all"):
        PopulationTrainer([mlp(), mlp(seed=1)], synth, [big, big], [0, 1])


def test_cuda_asked_for_without_gpu(synth):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(SurgeryError, match="no usable CUDA GPU"):
        Trainer(mlp(), synth, cfg(device="cuda"))
    assert Trainer(mlp(), synth, cfg(device="auto")).device.type == "cpu"


def _torchrun_env() -> dict:
    """The parent's import path goes on: packages may come from PYTHONPATH (a GPU machine's /tmp/site)."""
    path = os.pathsep.join(p for p in [str(ROOT), os.environ.get("PYTHONPATH", "")] if p)
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}


def test_ddp_two_gloo_processes_equal_one_process_on_doubled_batch(tmp_path):
    from tests.ddp_worker import train

    single = train(batch_size=100)
    out = tmp_path / "ddp.safetensors"
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        str(ROOT / "tests" / "ddp_worker.py"), str(out), "50"],
                       capture_output=True, text=True, env=_torchrun_env(), timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    ddp = load_file(str(out))
    for k, v in single.items():
        assert torch.allclose(v, ddp[k], atol=1e-5), k


def test_the_cli_under_torchrun_trains_once_writes_once_and_ends_cleanly(tmp_path):
    from surgery.runtime import exit_status

    assert exit_status(3) == 3  # no process group: the status comes back, the process goes on
    (tmp_path / "r.yaml").write_text(
        "data: {dataset: synthetic, n_train: 800}\n"
        "surgery: {ops: [{op: insert, name: h1, units: 32}, {op: head, classes: 4}]}\n"
        "finetune: {epochs: 2, batch_size: 50, device: cpu, optimizer: {lr: 0.2}}\n")
    out = tmp_path / "out"
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        "-m", "surgery", "finetune", str(tmp_path / "r.yaml"), "--out", str(out)],
                       capture_output=True, text=True, env=_torchrun_env(), timeout=300, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.count("test error") == 1  # rank 0 alone prints
    res = json.loads((out / "result.json").read_text())
    assert res["world_size"] == 2 and res["epochs"] == 2


def _take_recipe(tmp_path: Path, finetune: str, data: str = "{dataset: synthetic}", extra_ops: str = "") -> Path:
    """``tmp_path/r.yaml``: a random 64-32-16 stack (``a.safetensors``) taken whole under a
    4-class head (``extra_ops`` between them), fine-tuned as ``finetune`` says."""
    random_stack(sizes=(64, 32, 16)).save(tmp_path / "a.safetensors")
    r = tmp_path / "r.yaml"
    r.write_text(f"data: {data}\n"
                 f"surgery: {{sources: {{a: a.safetensors}}, ops: [{{op: take, source: a}}, {extra_ops}"
                 "{op: head, classes: 4}]}\n"
                 f"finetune: {finetune}\n")
    return r


def test_finetune_cli_writes_results_and_resumes(tmp_path, capsys):
    from surgery.cli import main

    _take_recipe(tmp_path, "{epochs: 3, device: cpu, checkpoint_every: 1, optimizer: {lr: 0.5}}")
    out = tmp_path / "out"
    assert main(["finetune", str(tmp_path / "r.yaml"), "--out", str(out)]) == 0
    assert "test error" in capsys.readouterr().out
    res = json.loads((out / "result.json").read_text())
    assert res["epochs"] == 3 and 0 <= res["test_error"] <= 100
    assert (out / "checkpoints" / "last.safetensors").is_file() and (out / "metrics.jsonl").is_file()
    made = read_manifest(out / "model.safetensors")  # the fine-tuned model says what made it
    assert made["recipe"]["finetune"]["epochs"] == 3 and made["result"]["test_error"] == res["test_error"]
    assert main(["inspect", str(out / "model.safetensors")]) == 0
    assert "made by recipe 'run' (seed 0)" in capsys.readouterr().out
    assert main(["finetune", str(tmp_path / "r.yaml"), "--out", str(tmp_path / "again"), "--model",
                 str(out / "model.safetensors")]) == 0
    assert read_manifest(tmp_path / "again" / "model.safetensors")["started_from"] == str(out / "model.safetensors")
    # more epochs, resumed from the checkpoint
    more = ["--resume", "--set", "finetune.epochs=4"]
    assert main(["finetune", str(tmp_path / "r.yaml"), "--out", str(out), *more]) == 0
    assert json.loads((out / "result.json").read_text())["epochs"] == 4
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 4
    assert "warning" not in capsys.readouterr().err
    # --resume where no checkpoint was written: trains from epoch 1 and says why
    bare = ["--set", "finetune.checkpoint_every=0"]
    assert main(["finetune", str(tmp_path / "r.yaml"), "--out", str(tmp_path / "bare"), "--resume", *bare]) == 0
    err = capsys.readouterr().err
    assert "warning: --resume: no checkpoint at" in err and "checkpoint_every is 0" in err, err
    assert len((tmp_path / "bare" / "metrics.jsonl").read_text().splitlines()) == 3


def test_layers_of_a_fine_tuned_model_file_are_a_surgery_source(tmp_path, capsys):
    """Cutting layers out of a fine-tuned model: its file under surgery.sources, `take` copies
    the weights fine-tuning left (not the stack it started from), as from a pretrained stack,
    in every command that reads the recipe."""
    from surgery.cli import main

    _take_recipe(tmp_path, "{epochs: 2, device: cpu, optimizer: {lr: 0.5}}")
    stack = LayerStack.load(tmp_path / "a.safetensors")
    assert main(["run", str(tmp_path / "r.yaml"), "--out", str(tmp_path / "tuned")]) == 0
    (tmp_path / "cut.yaml").write_text(
        "data: {dataset: synthetic}\n"
        "surgery: {sources: {m: tuned/model.safetensors}, ops: [{op: take, source: m, layers: [0, 2]},\n"
        "  {op: head, classes: 4}]}\n"
        "finetune: {epochs: 1, device: cpu}\n")
    assert main(["validate", str(tmp_path / "cut.yaml")]) == 0
    assert main(["assemble", str(tmp_path / "cut.yaml"), "-o", str(tmp_path / "cut.safetensors")]) == 0
    tuned, cut = load_model(tmp_path / "tuned" / "model.safetensors"), load_model(tmp_path / "cut.safetensors")
    assert cut.order() == ["h1", "h2", "out"] and cut.node("h2").provenance["source"] == "m"
    for name in ("h1", "h2"):
        assert torch.equal(cut.node(name).tensors["weight"], tuned.node(name).tensors["weight"])
        assert not torch.equal(cut.node(name).tensors["weight"], stack[name].tensors["weight"])
    assert main(["run", str(tmp_path / "cut.yaml"), "--out", str(tmp_path / "again")]) == 0
    assert "warning" not in capsys.readouterr().err


def test_evaluate_gives_the_errors_a_fine_tuned_model_recorded(tmp_path, capsys):
    """`surgery evaluate RECIPE MODEL` (and S.evaluate) on the data a model was fine-tuned on
    gives the test and validation errors it recorded, to the last digit (its weights are the
    best epoch's, evaluated with dropout off), and trains nothing."""
    import surgery as S
    from surgery.cli import main

    _take_recipe(tmp_path, "{epochs: 3, device: cpu, optimizer: {lr: 0.3}}", "{dataset: synthetic, n_train: 600}",
                 "{op: dropout, after: h1, p: 0.5}, ")
    assert main(["run", str(tmp_path / "r.yaml"), "--out", str(tmp_path / "out")]) == 0
    res = json.loads((tmp_path / "out" / "result.json").read_text())
    model = tmp_path / "out" / "model.safetensors"
    data = S.load_dataset(S.load_recipe(tmp_path / "r.yaml").data)
    errors = S.evaluate(S.load_model(model), data)
    assert errors["test_error"] == res["test_error"] and errors["valid_error"] == res["valid_error"]
    assert 0 <= errors["train_error"] <= 100
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}
    capsys.readouterr()
    assert main(["evaluate", str(tmp_path / "r.yaml"), str(model), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == errors
    assert main(["evaluate", str(tmp_path / "r.yaml"), str(model)]) == 0
    said = capsys.readouterr().out.splitlines()
    test, valid = f"{res['test_error']:.2f}%", f"{res['valid_error']:.2f}%"
    assert said[0].endswith(f"(train / valid / test: 600 / 500 / 500 examples): error train "
                            f"{errors['train_error']:.2f}%, valid {valid}, test {test}")
    assert said[1] == f"recorded when it was fine-tuned: test {test}, valid {valid} (best epoch {res['best_epoch']})"
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")} == before


def test_resume_of_a_finished_run_does_not_need_its_checkpoint(tmp_path, capsys):
    """--resume on a finished run of the same recipe returns its result without reading its
    checkpoint: a damaged one stopped it ('delete it and start again without --resume', which
    retrains what had finished); more epochs still continue from the checkpoint, so a damaged
    one is an error there."""
    from surgery.cli import main

    recipe = str(_take_recipe(tmp_path, "{epochs: 2, device: cpu, checkpoint_every: 1, optimizer: {lr: 0.5}}"))
    for cmd in ("run", "finetune"):
        out = tmp_path / cmd
        assert main([cmd, recipe, "--out", str(out)]) == 0
        res = json.loads((out / "result.json").read_text())
        (out / "checkpoints" / "last.safetensors").write_bytes(b"damaged")
        capsys.readouterr()
        before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
        assert main([cmd, recipe, "--out", str(out), "--resume"]) == 0
        said = capsys.readouterr()
        assert f"--resume: {out} has finished (test error {res['test_error']:.2f}%, 2 epochs)" in said.err, said.err
        assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before
        assert main([cmd, recipe, "--out", str(out), "--resume", "--set", "finetune.epochs=3"]) == 2
        assert "last.safetensors: unreadable checkpoint" in capsys.readouterr().err
        assert json.loads((out / "result.json").read_text()) == res


def test_resume_past_a_result_json_with_a_word_for_a_number(tmp_path, capsys):
    """A finished run whose result.json was edited into a word for a number: --resume takes
    it for damaged and continues from the checkpoint, writing it anew (it was a KeyError or a
    format-string ValueError)."""
    from surgery.cli import main

    recipe = str(_take_recipe(tmp_path, "{epochs: 2, device: cpu, checkpoint_every: 1, optimizer: {lr: 0.5}}"))
    out = tmp_path / "out"
    assert main(["run", recipe, "--out", str(out)]) == 0
    res = json.loads((out / "result.json").read_text())
    (out / "result.json").write_text('{"test_error": "x", "epochs": 2}')
    capsys.readouterr()
    assert main(["run", recipe, "--out", str(out), "--resume"]) == 0
    assert f"test error {res['test_error']:.2f}%" in capsys.readouterr().out
    again = json.loads((out / "result.json").read_text())
    assert {k: again[k] for k in ("test_error", "valid_error", "epochs")} == {
        k: res[k] for k in ("test_error", "valid_error", "epochs")}


def test_resume_of_a_finished_run_without_checkpoint_trains_nothing(tmp_path, capsys):
    """--resume on a single run that finished without checkpoints (`surgery run` and `surgery
    finetune`): its result, nothing trained or written; another recipe's finished run is
    refused, naming the first difference, and kept."""
    from surgery.cli import main

    recipe = str(_take_recipe(tmp_path, "{epochs: 2, device: cpu, optimizer: {lr: 0.5}}"))
    for cmd in ("run", "finetune"):
        out = tmp_path / cmd
        assert main([cmd, recipe, "--out", str(out)]) == 0
        res = json.loads((out / "result.json").read_text())
        capsys.readouterr()
        before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
        assert main([cmd, recipe, "--out", str(out), "--resume"]) == 0
        said = capsys.readouterr()
        assert f"--resume: {out} has finished (test error {res['test_error']:.2f}%, 2 epochs)" in said.err, said.err
        assert f"test error {res['test_error']:.2f}%" in said.out
        assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before  # nothing written
        assert main([cmd, recipe, "--out", str(out), "--resume", "--set", "finetune.epochs=3"]) == 2
        err = capsys.readouterr().err
        assert f"{out} holds another finished run (finetune.epochs: 3 here, 2 there)" in err, err
        assert json.loads((out / "result.json").read_text()) == res
        assert main([cmd, recipe, "--out", str(out), "--set", "finetune.epochs=3"]) == 0  # without: trained again
        assert json.loads((out / "result.json").read_text())["epochs"] == 3


def test_resume_pretrains_a_damaged_stack_again_and_continues(tmp_path, capsys):
    """A run cut in fine-tuning whose stack.safetensors was then damaged: --resume warns,
    pretrains the same stack again from the seed and continues from the checkpoint to the
    uninterrupted run's result (it stopped with 'Re-create it with surgery pretrain')."""
    from surgery.cli import main
    from surgery.stack import LayerStack

    (tmp_path / "r.yaml").write_text(
        "data: {dataset: synthetic, n_train: 200, n_valid: 50, n_test: 50}\n"
        "pretrain: {layers: [{method: rbm, hidden: 16, epochs: 2}]}\n"
        "finetune: {epochs: 3, batch_size: 20, device: cpu, checkpoint_every: 1, progress: false}\n")
    recipe, whole, cut = str(tmp_path / "r.yaml"), tmp_path / "whole", tmp_path / "cut"
    assert main(["run", recipe, "--out", str(whole)]) == 0
    assert main(["run", recipe, "--out", str(cut), "--set", "finetune.epochs=1"]) == 0  # as if stopped after epoch 1
    stack = cut / "stack.safetensors"
    stack.write_bytes(stack.read_bytes()[:300])
    capsys.readouterr()
    assert main(["run", recipe, "--out", str(cut), "--resume"]) == 0
    err = capsys.readouterr().err
    assert f"warning: --resume: {stack}, this run's pretrained stack, is damaged" in err, err
    a, b = LayerStack.load(whole / "stack.safetensors"), LayerStack.load(stack)
    assert all(torch.equal(x.tensors[k], y.tensors[k]) for x, y in zip(a.layers, b.layers, strict=True)
               for k in x.tensors)
    ended = [json.loads((d / "result.json").read_text()) for d in (whole, cut)]
    assert [(r["test_error"], r["valid_error"], r["epochs"]) for r in ended] == [
        (ended[0]["test_error"], ended[0]["valid_error"], 3)] * 2


def test_inspect_says_how_far_a_single_run_got(synth, tmp_path, capsys):
    """`surgery inspect OUT` on a run cut after epoch 2 of 4: its last and best epochs and that
    --resume continues it; once finished: its errors; without a checkpoint: it starts over."""
    from surgery.cli import main

    c = cfg(epochs=4, checkpoint_every=1)

    def cut_after_two(trainer, rec):
        if rec["epoch"] == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        Trainer(mlp((64, 32, 16)), synth, c, seed=1, out_dir=tmp_path / "cut", on_epoch_end=cut_after_two).fit()
    hist = [json.loads(x) for x in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    best = min(h["valid_error"] for h in hist)
    capsys.readouterr()
    assert main(["inspect", str(tmp_path / "cut")]) == 0
    out = capsys.readouterr().out
    assert "a single run" in out and "unfinished: epoch 2 of 4 trained" in out, out
    assert f"(best {best:.2f}% at epoch" in out and "checkpoint after epoch 2: `--resume`" in out, out
    checkpoint = tmp_path / "cut" / "checkpoints" / "last.safetensors"
    assert main(["inspect", str(checkpoint)]) == 0  # the checkpoint file itself, from its metadata
    assert capsys.readouterr().out.splitlines() == [
        f"{checkpoint}: a fine-tuning checkpoint",
        f"written after epoch 2 of 4 (step {2 * math.ceil(len(synth.train) / 50)})",
        f"best validation error so far {best:.2f}% at epoch {min(hist, key=lambda h: h['valid_error'])['epoch']}",
        f"`surgery run --resume` or `surgery finetune --resume` (the same recipe, --out {tmp_path / 'cut'}) "
        "continues from it"]
    assert main(["inspect", str(checkpoint), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["state"]["epoch"] == 2
    r = Trainer(mlp((64, 32, 16)), synth, c, seed=1, out_dir=tmp_path / "cut").fit(resume=True)
    assert main(["inspect", str(tmp_path / "cut")]) == 0
    out = capsys.readouterr().out
    assert f"finished: test {r['test_error']:.2f}%, validation {r['valid_error']:.2f}%" in out, out
    assert f"of {r['epochs']} trained" in out and "weights: model.safetensors" in out, out
    (tmp_path / "cut" / "result.json").unlink()
    (tmp_path / "cut" / "checkpoints" / "last.safetensors").write_bytes(b"torn")
    assert main(["inspect", str(tmp_path / "cut")]) == 0
    assert "no readable checkpoint" in capsys.readouterr().out


def test_sigkill_mid_run_then_resume_equals_uninterrupted(tmp_path):
    """A real kill: SIGKILL the CLI after its first checkpoint, resume, compare weights."""
    import signal
    import time

    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "data: {dataset: synthetic, n_train: 6000, side: 16}\n"
        "surgery: {ops: [{op: insert, name: h1, units: 128, in_features: 256}, {op: head, classes: 4}]}\n"
        "finetune: {epochs: 8, device: cpu, checkpoint_every: 1, dropout: {h1: 0.2},\n"
        "           schedule: {lr: {kind: exponential, start: 0.2, end: 0.01}}}\n")
    cmd = [sys.executable, "-m", "surgery.cli", "finetune", str(recipe), "--out"]
    ref = subprocess.run(cmd + [str(tmp_path / "ref")], capture_output=True, text=True, timeout=300)
    assert ref.returncode == 0, ref.stderr[-2000:]
    cut = tmp_path / "cut"
    p = subprocess.Popen(cmd + [str(cut)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ck = cut / "checkpoints" / "last.safetensors"
    deadline = time.time() + 120
    while not ck.exists() and time.time() < deadline and p.poll() is None:
        time.sleep(0.02)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert not (cut / "result.json").exists(), "the run finished before it could be killed"
    r = subprocess.run(cmd + [str(cut), "--resume"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    a, b = load_file(str(tmp_path / "ref" / "model.safetensors")), load_file(str(cut / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_compiled_training_matches_eager(synth):
    """finetune.compile: true (torch.compile, inductor on the CPU) trains the same weights."""
    eager = Trainer(mlp(), synth, cfg(epochs=1))
    eager.fit()
    compiled = Trainer(mlp(), synth, cfg(epochs=1, compile=True))
    compiled.fit()
    for (k, a), (_, b) in zip(eager.model.state_dict().items(), compiled.model.state_dict().items()):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-3, msg=k)


def _graphed_vs_torch(opt_cfg, schedule=None, layer_lr=None, steps=6):
    """The captured step's arithmetic (run eagerly on the CPU) against torch.optim."""
    from surgery.graphed import GraphedStep
    from surgery.modules import to_module
    from surgery.schedules import OptimizerConfig, ScheduleConfig, apply_schedule, build_optimizer

    o = OptimizerConfig.model_validate(opt_cfg)
    sched = ScheduleConfig.model_validate(schedule or {})
    g = mlp((20, 12, 8), classes=3, seed=4)
    with torch.no_grad():
        g.node("out").tensors["weight"].normal_(0, 0.3)
    nets = [to_module(g), to_module(g)]
    mult = layer_lr or {}
    opts = [build_optimizer(o, [{"params": list(m.parameters()), "lr_mult": mult.get(name, 1.0), "node": name}
                                for name, m in net.named_children()]) for net in nets]
    step = GraphedStep(nets[1], opts[1], o.name, amp=False, capture=False)
    gen = torch.Generator().manual_seed(0)
    xs, ys = torch.rand(16 * steps - 5, 20, generator=gen), torch.randint(0, 3, (16 * steps - 5,), generator=gen)
    step.start_epoch(xs, ys, 16)
    for t in range(steps):
        x, y = xs[16 * t : 16 * (t + 1)], ys[16 * t : 16 * (t + 1)]
        lr, mom = apply_schedule(opts[0], sched, o.lr, t, 3, steps)
        opts[0].zero_grad()
        torch.nn.functional.cross_entropy(nets[0](x), y).backward()
        opts[0].step()
        lr1, mom1 = apply_schedule(opts[1], sched, o.lr, t, 3, steps)
        step.set_hyperparameters(lr1, mom1)
        step.step() if t < steps - 1 else step.last_batch(16 * t)  # the last batch is 11 rows
    for (k, a), (_, b) in zip(nets[0].state_dict().items(), nets[1].state_dict().items()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=k)


@pytest.mark.parametrize("case", [
    ({"name": "sgd", "lr": 0.3, "momentum": 0.9}, None, None),
    ({"name": "sgd", "lr": 0.3, "momentum": 0}, None, {"h1": 2.0}),
    ({"name": "sgd", "lr": 0.2, "momentum": 0.9, "nesterov": True, "weight_decay": 0.01}, None, None),
    ({"name": "sgd", "lr": 0.3, "momentum": 0.5},
     {"lr": {"kind": "exponential", "start": 0.5, "end": 0.01}, "momentum": {"kind": "linear", "start": 0.5}}, None),
    ({"name": "adam", "lr": 0.01, "weight_decay": 1e-3}, None, {"out": 0.5}),
    ({"name": "adam", "lr": 0.01}, {"momentum": {"kind": "linear", "start": 0.8, "end": 0.95}}, None),
    ({"name": "rmsprop", "lr": 0.01, "weight_decay": 1e-3, "alpha": 0.9}, None, {"out": 0.5}),
    ({"name": "rmsprop", "lr": 0.01, "momentum": 0.5}, {"momentum": {"kind": "linear", "start": 0.5, "end": 0.9},
                                                        "lr": {"kind": "cosine", "end": 0.001}}, None),
    ({"name": "adagrad", "lr": 0.05, "weight_decay": 1e-3}, {"lr": {"kind": "exponential", "end": 0.01}}, None),
    ({"name": "adadelta", "lr": 1.0, "rho": 0.95, "eps": 1e-5}, None, {"h1": 0.5}),
], ids=["momentum", "plain+layer_lr", "nesterov+decay", "schedules", "adam+layer_lr", "adam+beta1 ramp",
        "rmsprop+decay+layer_lr", "rmsprop+momentum ramp", "adagrad+decay+schedule", "adadelta+layer_lr"])
def test_captured_step_arithmetic_equals_torch_optim(case):
    _graphed_vs_torch(*case)


@pytest.mark.parametrize("opt,extra", [
    ({"name": "sgd", "lr": 0.2, "momentum": 0.5},
     {"schedule": {"lr": {"kind": "exponential", "end": 0.01}, "momentum": {"kind": "linear", "end": 0.9}},
      "dropout": {"h1": 0.3}}),
    ({"name": "adam", "lr": 0.005, "weight_decay": 1e-4}, {"layer_lr": {"out": 0.5}}),
    ({"name": "rmsprop", "lr": 0.002, "momentum": 0.5}, {"schedule": {"lr": {"kind": "cosine", "end": 1e-4}}}),
    ({"name": "adadelta", "lr": 1.0, "weight_decay": 1e-4}, {"dropout": {"h1": 0.2}}),
], ids=["sgd+schedules+dropout", "adam+layer_lr", "rmsprop+momentum+schedule", "adadelta+dropout"])
def test_graphed_epoch_loop_trains_what_the_eager_loop_trains(synth, opt, extra):
    """The epoch loop a CUDA run takes (train_graphed_epoch: the schedule written into the
    step's device tensors each step, the partial last batch run eagerly, loss and error
    summed on the device), its step run uncaptured on the CPU, trains the weights and
    writes the epoch records the eager loop does (2000 examples in batches of 48: 41 full,
    then 32 rows)."""
    from surgery.graphed import GraphedStep

    c = cfg(epochs=2, batch_size=48, optimizer=opt, **extra)
    eager = Trainer(mlp(), synth, c)  # seeds torch's default generator, which dropout draws from
    a = eager.fit()
    graphed = Trainer(mlp(), synth, c)
    e = graphed.engine
    e.graphed = GraphedStep(e.net, e.opt, c.optimizer.name, amp=False, capture=False)
    b = graphed.fit()
    for (k, x), (_, y) in zip(eager.model.state_dict().items(), graphed.model.state_dict().items()):
        torch.testing.assert_close(y, x, rtol=1e-4, atol=1e-5, msg=k)
    for ha, hb in zip(eager.history, graphed.history, strict=True):
        for key in ("train_loss", "train_error", "lr", "momentum", "valid_error"):  # Adam's momentum: None
            assert hb[key] == (None if ha[key] is None else pytest.approx(ha[key], rel=1e-4, abs=1e-6)), key
    assert b["test_error"] == pytest.approx(a["test_error"], abs=0.11)


def test_cuda_graph_option_on_the_cpu(synth):
    assert Trainer(mlp(), synth, cfg()).engine.graphed is None  # auto: eager on the CPU
    with pytest.raises(SurgeryError, match="finetune.cuda_graph: true, but the device is cpu, not a CUDA GPU"):
        Trainer(mlp(), synth, cfg(cuda_graph=True))
    with pytest.raises(SurgeryError, match="'cg' is not one of"):
        Trainer(mlp(), synth, cfg(cuda_graph=True, optimizer={"name": "cg"}))


def _without_valid(ds):
    return Dataset(ds.name, ds.train, Split(ds.valid.x[:0], ds.valid.y[:0]), ds.test)


def test_without_a_validation_split_the_last_epoch_is_kept(synth, tmp_path):
    c = cfg(epochs=3, optimizer={"name": "sgd", "lr": 2.0, "momentum": 0.9})
    last = {}
    ref = Trainer(mlp(), synth, c, seed=3, on_epoch_end=lambda t, rec: last.update(
        {k: v.clone() for k, v in t.model.state_dict().items()}))
    ref.fit()
    t = Trainer(mlp(), _without_valid(synth), c, seed=3, out_dir=tmp_path / "run")
    r = t.fit()
    assert r["valid_error"] is None and r["best_epoch"] == r["epochs"] == 3
    assert all(h["valid_error"] is None for h in t.history)
    for k, v in t.model.state_dict().items():  # the validation split never changes training
        assert torch.equal(v, last[k]), k
    assert json.loads((tmp_path / "run" / "result.json").read_text())["valid_error"] is None
    with pytest.raises(ConfigError, match="finetune.early_stopping.*data.valid_size: 0"):
        Trainer(mlp(), _without_valid(synth), cfg(early_stopping={"patience": 2}))


def test_amp_off_cuda_is_warned_and_trains_as_float32(synth):
    """amp (bf16 autocast) applies on CUDA only: asked for on the CPU it is said, and the run is
    the float32 run it was silently before."""
    with pytest.warns(SurgeryWarning, match="finetune.amp: bf16 autocast applies on CUDA only; on cpu"):
        with_amp = Trainer(mlp(), synth, cfg(amp=True), seed=3).fit()
    assert with_amp["test_error"] == Trainer(mlp(), synth, cfg(), seed=3).fit()["test_error"]


def test_a_single_run_logs_each_epoch_where_its_bar_is_hidden(tmp_path, capsys):
    """stderr no terminal (a job log): `surgery run` of one network says each epoch, its loss
    and errors, the best so far and the time left; a resumed run counts from where it
    continued; `finetune.progress: false` says nothing; an experiment's cells say only their
    own line when they end."""
    from surgery.cli import main

    (tmp_path / "r.yaml").write_text(
        "data: {dataset: synthetic, n_train: 200, n_valid: 50, n_test: 50}\n"
        "surgery: {ops: [{op: insert, name: h1, units: 8}, {op: head, classes: 4}]}\n"
        "finetune: {epochs: 3, batch_size: 20, checkpoint_every: 1}\n")
    recipe = str(tmp_path / "r.yaml")
    assert main(["run", recipe, "--out", str(tmp_path / "a")]) == 0
    lines = [x for x in capsys.readouterr().err.splitlines() if x.startswith("finetune: ")]
    hist = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [x.split(":")[1] for x in lines] == [" epoch 1/3", " epoch 2/3", " epoch 3/3"], lines
    best = min(hist[:2], key=lambda h: (h["valid_error"], h["epoch"]))
    assert lines[1].startswith(f"finetune: epoch 2/3: loss {hist[1]['train_loss']:.4g}, train "
                               f"{hist[1]['train_error']:.2f}%, valid {hist[1]['valid_error']:.2f}% (best "
                               f"{best['valid_error']:.2f}% at epoch {best['epoch']}), "), lines
    assert lines[0].endswith(" left") and lines[1].endswith(" left") and not lines[2].endswith(" left"), lines
    assert main(["run", recipe, "--out", str(tmp_path / "a"), "--resume", "--set", "finetune.epochs=5"]) == 0
    lines = [x for x in capsys.readouterr().err.splitlines() if x.startswith("finetune: ")]
    assert [x.split(":")[1] for x in lines] == [" epoch 4/5", " epoch 5/5"], lines
    assert main(["run", recipe, "--out", str(tmp_path / "b"), "--set", "finetune.progress=false"]) == 0
    assert "finetune: epoch" not in capsys.readouterr().err
    assert main(["run", recipe, "--out", str(tmp_path / "e"), "--set", "finetune.early_stopping={patience: 5}"]) == 0
    first = next(x for x in capsys.readouterr().err.splitlines() if x.startswith("finetune: epoch 1/3"))
    assert first.endswith(" left") and "; at most about " in first, first  # it may stop sooner
    grid = "experiment: {conditions: [none], depths: [1], seeds: [0, 1], hidden: 8}\n"
    (tmp_path / "g.yaml").write_text((tmp_path / "r.yaml").read_text().replace(
        "surgery: {ops: [{op: insert, name: h1, units: 8}, {op: head, classes: 4}]}\n", grid))
    assert main(["run", str(tmp_path / "g.yaml"), "--out", str(tmp_path / "g")]) == 0
    err = capsys.readouterr().err
    assert "finetune: epoch" not in err and "experiment: cell 2/2" in err, err


def test_finetune_init_redraws_the_fresh_hidden_layers_only():
    """``finetune.init`` re-draws the fresh hidden layers in its scheme; the pretrained layers
    and the zero-initialised softmax head keep their weights, so an arm whose only fresh
    layer is the head (rbm, dae) trains the same under every init."""
    from surgery.assembly import build_graph
    from surgery.module_engine import prepare_graph

    ops = [{"op": "take", "source": "s"}, {"op": "insert", "name": "extra", "units": 40}, {"op": "head", "classes": 3}]
    before = build_graph(ops, {"s": random_stack((20, 30, 25))}, seed=1)
    after = prepare_graph(before, cfg(init="torch"), seed=1)
    for name in ("h1", "h2", "out"):
        for k, t in before.node(name).tensors.items():
            assert torch.equal(after.node(name).tensors[k], t), (name, k)
    assert not after.node("out").tensors["weight"].any()
    w = after.node("extra").tensors["weight"]
    assert not torch.equal(w, before.node("extra").tensors["weight"])
    assert float(w.abs().max()) <= 1 / math.sqrt(25) < float(before.node("extra").tensors["weight"].abs().max())
    assert after.node("extra").provenance["init"] == "torch"
