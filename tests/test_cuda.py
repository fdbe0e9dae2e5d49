"""CUDA paths; skipped on machines without a GPU (run them where one is lent:
`benchmarks/gpu.sh` does)."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from surgery.cli import main
from surgery.data import DataConfig, load_dataset
from surgery.finetune import FinetuneConfig, Trainer
from surgery.pretrain import PretrainConfig, greedy_pretrain
from tests.helpers import shipped_recipe_order, shrunk_recipe_args
from tests.test_finetune import mlp

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
ROOT = Path(__file__).resolve().parents[1]


def _ds(**kw):
    return load_dataset(DataConfig(dataset="synthetic", device="cuda", **kw))


def test_data_lives_on_the_gpu():
    ds = _ds()
    assert ds.train.x.is_cuda and ds.test.y.is_cuda


@pytest.mark.parametrize("amp", [False, True])
@pytest.mark.parametrize("graph", [False, True])
def test_finetune_on_cuda_learns(amp, graph):
    t = Trainer(mlp(), _ds(), FinetuneConfig(epochs=3, device="cuda", amp=amp, progress=False, cuda_graph=graph,
                                             optimizer={"name": "sgd", "lr": 0.2, "momentum": 0.9}))
    r = t.fit()
    assert (t.engine.graphed is not None) == graph
    assert r["device"].startswith("cuda") and r["test_error"] < 40
    assert t.history[-1]["train_loss"] < t.history[0]["train_loss"]


def test_evaluate_on_cuda_gives_the_recorded_errors():
    """S.evaluate on data on the GPU gives the errors fine-tuning recorded there (eager, no amp;
    within an example or two: another module's kernels may break an argmax tie otherwise)."""
    import surgery as S

    t = Trainer(mlp(), _ds(), FinetuneConfig(epochs=2, device="cuda", progress=False, cuda_graph=False))
    r = t.fit()
    errors = S.evaluate(t.engine.member_graph(0), _ds())
    assert errors["test_error"] == pytest.approx(r["test_error"], abs=0.5)
    assert errors["valid_error"] == pytest.approx(r["valid_error"], abs=0.5)


def test_conjugate_gradient_fine_tuning_on_cuda():
    """CG is not captured (cuda_graph auto leaves it eager) and learns on the GPU."""
    t = Trainer(mlp(), _ds(), FinetuneConfig(epochs=3, device="cuda", batch_size=200, progress=False,
                                             optimizer={"name": "cg", "line_searches": 3}))
    r = t.fit()
    assert t.engine.graphed is None and r["test_error"] < 40
    assert t.history[-1]["train_loss"] < t.history[0]["train_loss"] and t.history[0]["evaluations"] > 0


@pytest.mark.parametrize("layer", [
    {"method": "rbm", "hidden": 64}, {"method": "rbm", "hidden": 64, "persistent": True, "k": 2},
    {"method": "ae", "hidden": 64}, {"method": "dae", "hidden": 64}, {"method": "sparse_ae", "hidden": 64},
    {"method": "grow", "hidden": 64}, {"method": "grow", "hidden": 64, "train": "new"},
], ids=lambda d: "-".join(str(v) for v in d.values()))
def test_each_pretraining_method_on_cuda(layer):
    ds = load_dataset(DataConfig(limit=2000, device="cuda"))
    st = greedy_pretrain(ds.train.x, PretrainConfig(layers=[{**layer, "epochs": 2}, {**layer, "epochs": 2}]),
                         y=ds.train.y, progress=False)
    hist = st[1].pretrain["history"]
    key = "train_error" if layer["method"] == "grow" else "recon_error"
    assert hist[-1][key] < hist[0][key] or hist[-1][key] < 5
    assert st[0].tensors["weight"].is_cuda


def test_grbm_and_conv_ae_on_cuda():
    ds = load_dataset(DataConfig(limit=1000, device="cuda", normalize="standardize"))
    st = greedy_pretrain(ds.train.x, PretrainConfig(layers=[{"method": "grbm", "hidden": 32, "epochs": 2}]),
                         progress=False)
    assert torch.isfinite(st[0].tensors["weight"]).all()
    img = load_dataset(DataConfig(limit=1000, device="cuda", flatten=False))
    st = greedy_pretrain(img.train.x, PretrainConfig(layers=[{"method": "conv_ae", "hidden": 4, "epochs": 2}]),
                         progress=False)
    e = [h["recon_error"] for h in st[0].pretrain["history"]]
    assert e[-1] < e[0]


def _twin(cfg_kw: dict, epochs: int = 2):
    """The same run with the step captured and eager; returns both trainers."""
    ds = _ds()
    out = []
    for graph in (True, False):
        c = FinetuneConfig(epochs=epochs, device="cuda", batch_size=50, progress=False, cuda_graph=graph, **cfg_kw)
        t = Trainer(mlp((64, 32, 16)), ds, c, seed=3)
        t.fit()
        out.append(t)
    return out


@pytest.mark.parametrize("kw", [
    {"optimizer": {"name": "sgd", "lr": 0.2, "momentum": 0.9}},
    {"optimizer": {"name": "sgd", "lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-3}},
    {"optimizer": {"name": "adam", "lr": 0.003}},
    {"optimizer": {"name": "sgd", "lr": 0.3, "momentum": 0.5}, "layer_lr": {"h1": 2.0},
     "schedule": {"lr": {"kind": "exponential", "start": 0.3, "end": 0.01}, "momentum": {"kind": "linear"}}},
    {"optimizer": {"name": "sgd", "lr": 0.2, "momentum": 0.9}, "dropout": {"h1": 0.3}, "input_dropout": 0.1},
    {"optimizer": {"name": "rmsprop", "lr": 0.003, "momentum": 0.5, "weight_decay": 1e-4}},
    {"optimizer": {"name": "adagrad", "lr": 0.03}, "schedule": {"lr": {"kind": "cosine", "end": 0.001}}},
    {"optimizer": {"name": "adadelta", "lr": 1.0}, "layer_lr": {"out": 0.5}},
], ids=["momentum", "nesterov", "adam", "schedule", "dropout", "rmsprop", "adagrad", "adadelta"])
def test_cuda_graph_equals_eager(kw):
    graphed, eager = _twin(kw)
    g = graphed.engine.graphed
    assert g is not None and g.replay.graph is not None and eager.engine.graphed is None
    for (k, a), (_, b) in zip(eager.model.state_dict().items(), graphed.model.state_dict().items()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5, msg=k)
    assert [h["train_loss"] for h in graphed.history] == pytest.approx([h["train_loss"] for h in eager.history],
                                                                      rel=1e-5)


def test_cuda_graph_resume_equals_uninterrupted(tmp_path):
    ds = _ds()
    c = FinetuneConfig(epochs=4, device="cuda", checkpoint_every=1, progress=False, cuda_graph=True,
                       optimizer={"name": "sgd", "lr": 0.2, "momentum": 0.9})
    ref = Trainer(mlp(), ds, c, seed=1, out_dir=tmp_path / "ref")
    ref.fit()

    def stop_after_two(trainer, rec):
        if rec["epoch"] == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        Trainer(mlp(), ds, c, seed=1, out_dir=tmp_path / "cut", on_epoch_end=stop_after_two).fit()
    t = Trainer(mlp(), ds, c, seed=1, out_dir=tmp_path / "cut")
    assert t.fit(resume=True)["epochs"] == 4
    for (k, a), (_, b) in zip(ref.model.state_dict().items(), t.model.state_dict().items()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5, msg=k)


def test_cuda_nan_is_caught_at_the_epoch_end():
    g = mlp(act="relu")
    g.node("out").tensors["weight"].fill_(3e38)
    from surgery.errors import TrainingDiverged

    with pytest.raises(TrainingDiverged, match="epoch 1"):
        Trainer(g, _ds(), FinetuneConfig(epochs=2, device="cuda", progress=False, cuda_graph=True)).fit()


def test_compile_on_cuda_learns():
    t = Trainer(mlp(), _ds(), FinetuneConfig(epochs=2, device="cuda", compile=True, progress=False))
    assert t.engine.graphed is None and t.fit()["test_error"] < 50


@pytest.mark.parametrize("device", ["cuda", "auto"])
def test_experiment_grid_with_every_builtin_arm_on_cuda(tmp_path, device):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "data: {dataset: synthetic, limit: 600}\n"
        "experiment: {conditions: [none, rbm, dae, ae, grow, grow-frozen, shallow], depths: [1, 2], seeds: [0],\n"
        "             hidden: 32, pretrain_epochs: 1}\n"
        f"finetune: {{epochs: 1, device: {device}, batch_size: 50}}\n")
    assert main(["run", str(recipe), "--out", str(tmp_path / "out"), "--set", f"data.device={device}"]) == 0
    assert (tmp_path / "out" / "results.csv").read_text().count("\n") == 1 + 6 * 2 + 1
    made = json.loads((tmp_path / "out" / "experiment.json").read_text())["commands"]
    assert made[-1]["device"] == f"cuda ({torch.cuda.get_device_name()})"  # where it trained, named


def test_every_recipe_runs_on_cuda(tmp_path):
    """Each shipped recipe, shrunk (300 examples, 1 epoch, small layers), on the GPU; the
    stacks dbn and dae_stack make are the sources transplant takes."""
    shutil.copytree(ROOT / "recipes", tmp_path / "recipes")
    for name in shipped_recipe_order(tmp_path / "recipes"):
        out = tmp_path / "runs" / name.removesuffix(".yaml")
        assert main(shrunk_recipe_args(tmp_path / "recipes", name, out, "cuda")) == 0, name


def test_population_on_cuda_equals_alone():
    from surgery.finetune import PopulationTrainer

    ds = _ds()
    cfgs = [FinetuneConfig(epochs=2, device="cuda", batch_size=50, progress=False, cuda_graph=False,
                           optimizer={"lr": lr, "momentum": 0.9}) for lr in (0.1, 0.2)]
    graphs = [mlp((64, 32, 16), seed=k) for k in range(2)]
    pop = PopulationTrainer(graphs, ds, cfgs, [1, 2])
    assert not pop.engine.chain.loop  # one bmm per layer for both models
    pop.fit()
    for k in range(2):
        alone = Trainer(graphs[k], ds, cfgs[k], seed=1 + k)
        alone.fit()
        for name, w in pop.weights(k).items():
            torch.testing.assert_close(w, alone.model.state_dict()[name].cpu(), rtol=1e-4, atol=1e-5, msg=name)


def test_a_captured_population_continues_from_its_members_checkpoints(tmp_path):
    """A population whose step is a CUDA graph, stopped after epoch 2 of 4 and continued
    from its members' checkpoints, ends where the unbroken run does."""
    from surgery.finetune import PopulationTrainer

    ds = _ds()
    cfgs = [FinetuneConfig(epochs=4, device="cuda", batch_size=50, progress=False, cuda_graph="auto",
                           checkpoint_every=1, optimizer={"lr": lr, "momentum": 0.9}) for lr in (0.1, 0.2)]
    graphs = [mlp((64, 32, 16), seed=k) for k in range(2)]

    def population(name, epochs=4):
        return PopulationTrainer(graphs, ds, [c.model_copy(update={"epochs": epochs}) for c in cfgs], [1, 2],
                                 out_dirs=[tmp_path / name / str(k) for k in range(2)])

    whole = population("whole")
    whole.fit()
    population("cut", epochs=2).fit()  # the same first two epochs, its checkpoints after epoch 2
    for k in range(2):
        (tmp_path / "cut" / str(k) / "result.json").unlink()
    continued = population("cut")
    assert continued.resume() == 2 and continued.engine.stepper.replay.capture
    continued.fit()
    for k in range(2):
        for name, w in whole.weights(k).items():
            torch.testing.assert_close(continued.weights(k)[name], w, rtol=1e-6, atol=1e-7, msg=f"{k} {name}")


@pytest.mark.parametrize("kind", ["sgd", "adam", "rmsprop", "adagrad", "adadelta"])
def test_population_step_captured_as_a_cuda_graph_equals_eager(kind):
    """A population's step replayed from a CUDA graph (SGD: momentum, Nesterov, weight
    decay; the others with their own lr and decay; an lr schedule, a partial last batch;
    Adam's bias correction from the global step in a device tensor) equals the same
    population run eagerly."""
    from surgery.finetune import PopulationTrainer

    ds = _ds()
    scale = 1.0 if kind in ("sgd", "adadelta") else 0.05

    def cfgs(graph):
        kw = {"epochs": 3, "device": "cuda", "batch_size": 48, "progress": False, "cuda_graph": graph}
        sgd = kind == "sgd"
        return [FinetuneConfig(**kw, optimizer={"name": kind, "lr": 0.1 * scale, **({"momentum": 0.9} if sgd else {})}),
                FinetuneConfig(**kw, optimizer={"name": kind, "lr": 0.2 * scale, "weight_decay": 1e-3,
                                                **({"momentum": 0.5, "nesterov": True} if sgd else {})}),
                FinetuneConfig(**kw, optimizer={"name": kind, "lr": 0.3 * scale, **({"momentum": 0.9} if sgd else {})},
                               schedule={"lr": {"kind": "exponential", "end": 0.01 * scale}})]

    graphs = [mlp((64, 32, 16), seed=k) for k in range(3)]
    eager = PopulationTrainer(graphs, ds, cfgs(False), [1, 2, 3])
    graphed = PopulationTrainer(graphs, ds, cfgs("auto"), [1, 2, 3])
    assert not eager.engine.stepper.replay.capture and graphed.engine.stepper.replay.capture
    eager.fit()
    graphed.fit()
    assert graphed.engine.stepper.replay.graph is not None
    for k in range(3):
        for name, w in graphed.weights(k).items():
            torch.testing.assert_close(w, eager.weights(k)[name], rtol=1e-5, atol=1e-5, msg=f"{k} {name}")
        assert [h["train_loss"] for h in graphed.histories[k]] == pytest.approx(
            [h["train_loss"] for h in eager.histories[k]], rel=1e-5)


@pytest.mark.parametrize("kw", [{}, {"persistent": True, "k": 2}, {"momentum": 0.5, "final_momentum": 0.9,
                                                                   "momentum_switch": 1}],
                         ids=["cd-1", "pcd-2", "momentum ramp"])
def test_rbm_step_captured_as_a_cuda_graph_equals_eager(kw):
    """Two RBMs trained together, each full batch's CD step replayed from a CUDA graph,
    equal the same step run eagerly over the same words drawn ahead."""
    from surgery.pretrain.rbm import RBMConfig, train_rbm_population

    x = (torch.rand(1030, 40, generator=torch.Generator().manual_seed(0)) < 0.3).float().cuda()
    cfgs = [RBMConfig(hidden=16, epochs=2, lr=0.05 * (k + 1), **kw) for k in range(2)]

    def run(capture):
        return train_rbm_population([x, x], cfgs, ["h1"] * 2, 50, [torch.Generator().manual_seed(s) for s in (0, 1)],
                                    False, capture=capture, ahead=True)

    for graphed, eager in zip(run(True), run(False)):
        for k, t in eager.tensors.items():
            torch.testing.assert_close(graphed.tensors[k], t, rtol=1e-5, atol=1e-6, msg=k)


def test_dae_step_captured_as_a_cuda_graph_equals_eager():
    """Denoising autoencoders (their own noise levels, one without) with the step replayed
    from a CUDA graph equal the same step run eagerly over the same mask words."""
    from surgery.pretrain.ae_model import AEConfig
    from surgery.pretrain.autoencoder import train_autoencoder_population

    x = (torch.rand(1030, 40, generator=torch.Generator().manual_seed(0)) < 0.3).float().cuda()
    cfgs = [AEConfig(method="dae", hidden=16, epochs=2, lr=0.1, noise=n) for n in (0.3, 0.0)]

    def run(capture):
        return train_autoencoder_population([x, x], cfgs, ["h1"] * 2, 50, [torch.Generator().manual_seed(s)
                                                                            for s in (0, 1)], False,
                                            capture=capture, ahead=True)

    for graphed, eager in zip(run(True), run(False)):
        for k, t in eager.tensors.items():
            torch.testing.assert_close(graphed.tensors[k], t, rtol=1e-5, atol=1e-6, msg=k)


@pytest.mark.parametrize("method", ["rbm", "dae"])
def test_pretraining_population_on_cuda(method):
    """On a GPU: member by member (the GEMM loop) a population equals each layer alone; as
    one bmm per GEMM (the default there) rounding can flip a Gibbs sample or a mask, so each
    member need only train as well as it does alone."""
    from surgery.pretrain import AEConfig, RBMConfig, train_autoencoder, train_rbm
    from surgery.pretrain.autoencoder import train_autoencoder_population
    from surgery.pretrain.rbm import train_rbm_population

    x = _ds().train.x.flatten(1).cuda()
    make, alone_fn, pop_fn = ((RBMConfig, train_rbm, train_rbm_population) if method == "rbm"
                              else (AEConfig, train_autoencoder, train_autoencoder_population))
    cfgs = [make(method=method, hidden=32, epochs=3, lr=lr) for lr in (0.05, 0.05, 0.02)]

    def gens():
        return [torch.Generator().manual_seed(s) for s in range(3)]

    alone = [alone_fn(x, c, "h1", 50, g, False) for c, g in zip(cfgs, gens())]
    loop = pop_fn([x] * 3, cfgs, ["h1"] * 3, 50, gens(), False, False)
    batched = pop_fn([x] * 3, cfgs, ["h1"] * 3, 50, gens(), False)
    for a, m, b in zip(alone, loop, batched):
        for k in a.tensors:
            torch.testing.assert_close(m.tensors[k], a.tensors[k], rtol=1e-5, atol=1e-6)
        ra, rb = a.pretrain["final"]["recon_error"], b.pretrain["final"]["recon_error"]
        assert abs(rb - ra) <= 0.05 * ra, (ra, rb)


def test_grid_pretrains_stacks_as_a_population_on_cuda(tmp_path):
    out = tmp_path / "grid"
    (tmp_path / "g.yaml").write_text(
        "data: {dataset: synthetic, n_train: 400, n_valid: 200, n_test: 200, device: cuda}\n"
        "experiment: {conditions: [none, rbm, dae], depths: [1, 2], seeds: [0, 1, 2], hidden: 16, pretrain_epochs: 1}\n"
        "finetune: {epochs: 2, device: cuda, batch_size: 50}\n")
    assert main(["run", str(tmp_path / "g.yaml"), "--out", str(out)]) == 0
    import json

    metas = [json.loads(p.read_text()) for p in (out / "stacks").glob("*/pretrain.json")]
    assert len(metas) == 6 and all(m.get("population") == 3 for m in metas)


def test_a_tuning_batch_trains_as_a_population_on_cuda(tmp_path):
    """experiment.tune.batch on a GPU (population: auto): an arm's trials pretrain and
    fine-tune together and find what the same trials find one by one."""
    import json

    import yaml

    base = {"data": {"dataset": "synthetic", "n_train": 400, "n_valid": 200, "n_test": 200, "device": "cuda"},
            "experiment": {"conditions": ["dae"], "depths": [1], "seeds": [0], "hidden": 16, "pretrain_epochs": 1,
                           "tune": {"trials": 3, "params": {
                               "finetune.optimizer.lr": {"low": 0.01, "high": 0.5, "log": True},
                               "pretrain.layers.*.noise": {"low": 0.05, "high": 0.5}}}},
            "finetune": {"epochs": 2, "device": "cuda", "batch_size": 50}}
    runs = {}
    for name, batch, mode in (("alone", 1, "off"), ("together", 3, "auto")):
        r = json.loads(json.dumps(base))
        r["experiment"]["population"], r["experiment"]["tune"]["batch"] = mode, batch
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(r))
        assert main(["run", str(tmp_path / f"{name}.yaml"), "--out", str(tmp_path / name)]) == 0
        runs[name] = json.loads((tmp_path / name / "tuning.json").read_text())["trials"]
    for a, b in zip(runs["alone"], runs["together"]):
        assert a["params"] == b["params"] and abs(a["valid_error"] - b["valid_error"]) <= 0.5  # one example
    trials = [json.loads(p.read_text()) for p in (tmp_path / "together" / "tuning").glob("*/result.json")]
    assert len(trials) == 3 and all(t.get("population") == 3 for t in trials)
