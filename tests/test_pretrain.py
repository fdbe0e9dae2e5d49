import pytest
import torch

from surgery.data import DataConfig, load_dataset
from surgery.errors import ConfigError, DataError, ShapeError, SurgeryWarning, TrainingDiverged
from surgery.pretrain import (
    AEConfig,
    PretrainConfig,
    RBMConfig,
    greedy_pretrain,
    train_autoencoder,
    train_rbm,
)

G = lambda s=0: torch.Generator().manual_seed(s)  # noqa: E731


def _hist(layer, key):
    return [h[key] for h in layer.pretrain["history"]]


@pytest.fixture(scope="module")
def x3k(mnist_small):
    return mnist_small.train.x[:3000]


def test_rbm_reconstruction_error_falls(x3k):
    layer = train_rbm(x3k, RBMConfig(hidden=200, epochs=2, lr=0.1), "h1", 50, G(), False)
    e = _hist(layer, "recon_error")
    assert e[1] < 0.85 * e[0], e
    assert layer.tensors["weight"].shape == (200, 784)
    assert set(layer.tensors) == {"weight", "bias", "visible_bias"}
    assert "pseudo_likelihood" in layer.pretrain["history"][0]
    assert _hist(layer, "inactive_units")[-1] < 0.1


def test_a_collapsed_rbm_layer_is_measured_and_warned_about(x3k, capsys):
    """A learning rate far too high for the layer leaves every hidden unit stuck (the same
    output for every example): its history says so and training warns, naming the layer;
    the CLI prints that warning as one line."""
    from surgery.cli import _one_line
    from surgery.errors import SurgeryWarning

    with pytest.warns(SurgeryWarning, match="layer 'h1': 100% of its hidden units ended inactive.*lower lr than 1"):
        layer = train_rbm(x3k, RBMConfig(hidden=200, epochs=2, lr=1.0, momentum=0.5), "h1", 50, G(), False)
    assert _hist(layer, "inactive_units") == [1.0, 1.0]
    shown = []
    show = _one_line("pretrain", lambda *a: shown.append(a))
    show(SurgeryWarning("layer 'h1': ..."), SurgeryWarning, "x.py", 1)
    show(RuntimeWarning("other"), RuntimeWarning, "x.py", 1)
    assert capsys.readouterr().err == "surgery pretrain: warning: layer 'h1': ...\n"
    assert len(shown) == 1 and shown[0][1] is RuntimeWarning


def test_rbm_momentum_ramp_switches_after_its_epochs(x3k):
    """``final_momentum`` (Hinton's 0.5 -> 0.9): before the switch the run is the constant-
    momentum run, after it the velocity decays by the final momentum; a switch at epoch 0
    is the final momentum throughout."""
    x = x3k[:600]
    cfg = RBMConfig(hidden=30, epochs=3, lr=0.05, momentum=0.5, final_momentum=0.9, momentum_switch=2)
    assert [cfg.momentum_at(e) for e in (1, 2, 3)] == [0.5, 0.5, 0.9]

    def weights(**kw):
        return train_rbm(x, RBMConfig(hidden=30, lr=0.05, **kw), "h1", 50, G(), False).tensors["weight"]

    ramp = weights(epochs=3, momentum=0.5, final_momentum=0.9, momentum_switch=2)
    torch.testing.assert_close(weights(epochs=2, momentum=0.5, final_momentum=0.9, momentum_switch=2),
                               weights(epochs=2, momentum=0.5), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(weights(epochs=3, momentum=0.5, final_momentum=0.9, momentum_switch=0),
                               weights(epochs=3, momentum=0.9), rtol=1e-5, atol=1e-7)
    for other in (weights(epochs=3, momentum=0.5), weights(epochs=3, momentum=0.9)):
        assert (ramp - other).abs().max() > 1e-3
    with pytest.raises(ValueError, match="final_momentum"):
        RBMConfig(hidden=3, final_momentum=1.0)


@pytest.mark.parametrize("k,persistent", [(3, False), (1, True), (2, True)])
def test_cdk_and_pcd_learn(x3k, k, persistent):
    layer = train_rbm(x3k, RBMConfig(hidden=100, epochs=3, lr=0.05, k=k, persistent=persistent), "h1", 50, G(), False)
    e = _hist(layer, "recon_error")
    assert e[-1] < 0.8 * e[0], e
    pl = _hist(layer, "pseudo_likelihood")
    assert pl[-1] > pl[0] - 5  # stochastic estimate; it must not collapse


def test_grbm_learns_on_standardized_data():
    ds = load_dataset(DataConfig(limit=2000, normalize="standardize"))
    layer = train_rbm(ds.train.x, RBMConfig(method="grbm", hidden=100, epochs=3, lr=0.01), "g1", 50, G(), False)
    e = _hist(layer, "recon_error")
    assert e[-1] < 0.9 * e[0], e


def test_dae_loss_falls(x3k):
    layer = train_autoencoder(x3k, AEConfig(method="dae", hidden=100, epochs=3, lr=0.01), "h1", 50, G(), False)
    loss = _hist(layer, "loss")
    assert loss[-1] < 0.8 * loss[0], loss
    assert layer.pretrain["hyperparameters"]["noise"] == 0.25


@pytest.mark.parametrize("kind", ["gaussian", "salt_pepper"])
def test_untied_noisy_ae_learns(x3k, kind):
    cfg = AEConfig(method="dae", hidden=64, epochs=2, tied=False, noise=0.2, noise_kind=kind, loss="squared", lr=0.01,
                   activation="tanh")
    layer = train_autoencoder(x3k[:2000], cfg, "h1", 50, G(), False)
    assert "decoder_weight" in layer.tensors
    r = _hist(layer, "recon_error")
    assert r[-1] < 0.8 * r[0], r
    assert "inactive_units" not in layer.pretrain["history"][0]  # measured for sigmoid units only


def test_a_collapsed_sigmoid_autoencoder_is_measured_and_warned_about(x3k):
    """Tied weights under squared loss on [0, 1] pixels: the linear reconstruction through
    the sigmoid-scaled (x4) weights starts ~750 off per image, and those errors drive every
    hidden unit off (the visible bias then learns the mean image, so the error still falls);
    the history says so and training warns. An untied decoder is initialised for its linear
    output and keeps its units, as does the usual DAE (tied, cross-entropy)."""
    from surgery.errors import SurgeryWarning

    x = x3k[:2000]
    tied = AEConfig(method="dae", hidden=64, epochs=2, noise=0.2, loss="squared", lr=0.01)
    with pytest.warns(SurgeryWarning, match="layer 'h1': 100% of its hidden units ended inactive"):
        dead = train_autoencoder(x, tied, "h1", 50, G(), False)
    assert _hist(dead, "inactive_units")[-1] == 1.0
    untied = train_autoencoder(x, AEConfig(**{**tied.model_dump(), "tied": False}), "h1", 50, G(), False)
    assert _hist(untied, "inactive_units")[-1] < 0.1
    assert _hist(untied, "recon_error")[-1] < 0.7 * _hist(dead, "recon_error")[-1]
    usual = train_autoencoder(x, AEConfig(method="dae", hidden=64, epochs=2, noise=0.2, lr=0.01), "h1", 50, G(), False)
    assert _hist(usual, "inactive_units")[-1] < 0.1


def test_sparse_ae_lowers_mean_activation(x3k):
    plain = train_autoencoder(x3k, AEConfig(method="ae", hidden=100, epochs=2), "a", 50, G(), False)
    sparse_cfg = AEConfig(method="sparse_ae", hidden=100, epochs=2, sparsity_weight=3.0)
    sparse = train_autoencoder(x3k, sparse_cfg, "s", 50, G(), False)
    act = lambda layer: layer.transform(x3k[:1000]).mean().item()  # noqa: E731
    assert act(sparse) < 0.7 * act(plain)


def test_conv_ae_learns_on_images():
    ds = load_dataset(DataConfig(dataset="synthetic", flatten=False))
    cfg = AEConfig(method="conv_ae", hidden=8, kernel_size=3, epochs=3, lr=0.01)
    layer = train_autoencoder(ds.train.x, cfg, "c1", 50, G(), False)
    loss = _hist(layer, "loss")
    assert loss[-1] < loss[0]
    assert layer.spec.kind == "conv2d" and layer.spec.output_shape == (8, 6, 6)
    assert layer.transform(ds.train.x[:5]).shape == (5, 8, 6, 6)


def test_greedy_stack_transform_equals_layer_by_layer(x3k):
    cfg = PretrainConfig(batch_size=50, layers=[
        {"method": "rbm", "hidden": 64, "epochs": 1},
        {"method": "dae", "hidden": 32, "epochs": 1, "activation": "tanh", "loss": "squared"},
        {"method": "sparse_ae", "hidden": 16, "epochs": 1, "activation": "relu", "loss": "squared"},
    ])
    x = x3k[:1000]
    stack = greedy_pretrain(x, cfg, seed=3, progress=False)
    assert stack.names == ["h1", "h2", "h3"]
    h = x
    for layer, act in zip(stack, (torch.sigmoid, torch.tanh, torch.relu)):
        h = act(h @ layer.tensors["weight"].t() + layer.tensors["bias"])
    assert torch.allclose(stack.transform(x), h, atol=1e-6)
    # greedy = layer-wise: a deeper run's prefix equals the shallower run
    short = greedy_pretrain(x, PretrainConfig(batch_size=50, layers=cfg.layers[:2]), seed=3, progress=False)
    assert torch.equal(short[1].tensors["weight"], stack[1].tensors["weight"])


def test_grow_supervised_stages(mnist_small):
    x, y = mnist_small.train.x[:2000], mnist_small.train.y[:2000]
    frozen = greedy_pretrain(x, PretrainConfig(layers=[
        {"method": "grow", "hidden": 64, "epochs": 2, "lr": 0.1},
        {"method": "grow", "hidden": 64, "epochs": 2, "lr": 0.1, "train": "new"},
    ]), y=y, progress=False)
    errs = [h["train_error"] for h in frozen[1].pretrain["history"]]
    assert errs[-1] < errs[0] and errs[-1] < 50, errs
    stage1 = PretrainConfig(layers=[{"method": "grow", "hidden": 64, "epochs": 2, "lr": 0.1}])
    h1_after_stage1 = greedy_pretrain(x, stage1, y=y, progress=False)[0].tensors["weight"]
    assert torch.equal(frozen[0].tensors["weight"], h1_after_stage1)  # train: new left h1 alone
    both = greedy_pretrain(x, PretrainConfig(layers=[
        {"method": "grow", "hidden": 64, "epochs": 2, "lr": 0.1},
        {"method": "grow", "hidden": 64, "epochs": 2, "lr": 0.1, "train": "all"},
    ]), y=y, progress=False)
    assert not torch.equal(both[0].tensors["weight"], h1_after_stage1)
    assert both[0].pretrain["updated_by"] == ["grow:h2"]
    # with a validation split each stage records its net's error there, and trains the same
    valid = (mnist_small.valid.x[:1000], mnist_small.valid.y[:1000])
    watched = greedy_pretrain(x, PretrainConfig(layers=[
        {"method": "grow", "hidden": 64, "epochs": 2, "lr": 0.1},
        {"method": "grow", "hidden": 64, "epochs": 2, "lr": 0.1, "train": "new"},
    ]), y=y, progress=False, valid=valid)
    for a, b in zip(frozen, watched):
        assert all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)
        assert 0 < b.pretrain["final"]["valid_error"] < 50 and "valid_error" not in a.pretrain["final"]


def test_grow_needs_labels(x3k):
    """...and class numbers, one an example: float, one-hot, too few or negative labels were
    torch's RuntimeError from inside the loss (too few trained silently)."""
    grow = PretrainConfig(layers=[{"method": "grow", "hidden": 8, "epochs": 1}])
    with pytest.raises(ValueError, match="needs labels"):
        greedy_pretrain(x3k[:100], grow, progress=False)
    y = torch.arange(100) % 3
    bad = {"float32 of shape \\(100,\\)": y.float(), "int64 of shape \\(100, 3\\)": torch.nn.functional.one_hot(y),
           "int64 of shape \\(10,\\)": y[:10]}
    for said, labels in bad.items():
        with pytest.raises(DataError, match=rf"pretrain.layers\[0\] \(grow\): its labels y are torch.{said} for 100 "
                                            r"examples; give one int64 class number per example"):
            greedy_pretrain(x3k[:100], grow, y=labels, progress=False)
    with pytest.raises(DataError, match="its labels y include -1; classes are numbered 0, 1, 2"):
        greedy_pretrain(x3k[:100], grow, y=y - 1, progress=False)
    greedy_pretrain(x3k[:100], grow, y=y.numpy(), progress=False)


@pytest.mark.parametrize("method", ["rbm", "dae"])
def test_input_with_nan_is_named_before_pretraining_not_blamed_on_the_lr(x3k, method):
    x = x3k[:100].clone()
    x[7, 3] = float("nan")
    with pytest.raises(DataError, match="layer 'h1': its input holds 1 NaN or infinite values"):
        greedy_pretrain(x, PretrainConfig(layers=[{"method": method, "hidden": 8}]), progress=False)
    one_layer = train_rbm if method == "rbm" else train_autoencoder  # the single-layer API checks the same
    with pytest.raises(DataError, match="layer 'h1': its input holds 1 NaN or infinite values"):
        one_layer(x, {"method": method, "hidden": 8}, progress=False)


def test_layers_that_take_probabilities_refuse_inputs_outside_0_1(x3k):
    """Standardized data is not probabilities: a Bernoulli RBM and an autoencoder with a
    cross-entropy loss (which has no minimum on a target above 1: its outputs grow until the
    loss is NaN) refuse it, naming what takes it (grbm, loss: squared); a layer below either
    that is not sigmoid is refused when the recipe is read, before any layer trains."""
    from pydantic import ValidationError

    z = (x3k[:200] - x3k[:200].mean(0)) / (x3k[:200].std(0) + 1e-6)
    with pytest.raises(DataError, match=r"layer 'h1': a Bernoulli RBM takes probabilities in \[0, 1\], but its "
                                        r"inputs span \[-.*Use method: grbm"):
        greedy_pretrain(z, PretrainConfig(layers=[{"method": "rbm", "hidden": 8}]), progress=False)
    with pytest.raises(DataError, match=r"layer 'h1': a dae layer with loss cross_entropy reconstructs probabilities "
                                        r"in \[0, 1\], but its inputs span \[-.*Use loss: squared"):
        greedy_pretrain(z, PretrainConfig(layers=[{"method": "dae", "hidden": 8}]), progress=False)
    with pytest.raises(DataError, match=r"layer 'h1': a Bernoulli RBM takes probabilities .*Use method: grbm"):
        train_rbm(z, {"hidden": 8}, progress=False)
    with pytest.raises(DataError, match=r"layer 'h1': a dae layer with loss cross_entropy .*Use loss: squared"):
        train_autoencoder(z, {"method": "dae", "hidden": 8}, progress=False)
    greedy_pretrain(z, PretrainConfig(layers=[{"method": "grbm", "hidden": 8, "epochs": 1}]), progress=False)
    greedy_pretrain(z, PretrainConfig(layers=[{"method": "dae", "hidden": 8, "epochs": 1, "loss": "squared"}]),
                    progress=False)
    relu = {"method": "dae", "hidden": 8, "activation": "relu", "loss": "squared"}
    for above, fix in (("rbm", "method: grbm"), ("ae", "loss: squared")):
        said = (rf"layers\[1\] \({above}(, loss cross_entropy)?\) takes probabilities in \[0, 1\], but layer 'h1' "
                rf"below it gives relu outputs; use {fix}")
        with pytest.raises(ValidationError, match=said):
            PretrainConfig(layers=[relu, {"method": above, "hidden": 4}])
    PretrainConfig(layers=[relu, {"method": "grbm", "hidden": 4}])


def test_diverging_pretraining_names_layer_and_epoch():
    x = torch.randn(200, 20) * 1e3
    with pytest.raises(TrainingDiverged, match="layer 'h1'.*epoch 1"):
        wild = AEConfig(method="ae", hidden=8, epochs=2, lr=50.0, loss="squared", activation="linear")
        train_autoencoder(x, wild, "h1", 50, G(), False)


def test_pseudo_likelihood_shortcut_equals_direct_free_energies():
    import torch.nn.functional as F

    from surgery.pretrain.rbm import _metrics, free_energy

    v = (torch.rand(300, 50, generator=G(3)) < 0.3).float()
    W = torch.randn(20, 50, generator=G(4)) * 0.3
    b, c = torch.randn(50, generator=G(5)) * 0.1, torch.randn(20, generator=G(6))
    m = _metrics(v, W, b, c, False, G(1))
    idx = torch.randint(0, 50, (300,), generator=G(1))
    flipped = v.clone()
    rows = torch.arange(300)
    flipped[rows, idx] = 1 - flipped[rows, idx]
    f0, f1 = free_energy(v, W, b, c, False), free_energy(flipped, W, b, c, False)
    assert m["pseudo_likelihood"] == pytest.approx(float(-F.softplus(f0 - f1).mean() * 50), rel=1e-5)
    assert m["free_energy"] == pytest.approx(float(f0.mean()), rel=1e-5)


def test_bernoulli_sampler_frequencies_match_p():
    from surgery.pretrain.rbm import BernoulliSampler

    b, h = 7, 1001  # b * h not a multiple of 4: the last 64-bit draw is partly unused
    s = BernoulliSampler(b, h, torch.device("cpu"))
    p = torch.linspace(0, 1, h).expand(b, h).contiguous()
    out, total, g = torch.empty(b, h), torch.zeros(h), G(0)
    for _ in range(300):
        total += s(p, out, g).sum(0)
    freq = total / (300 * b)
    assert freq[0] == 0 and freq[-1] == 1  # p = 0 and p = 1 are exact
    sd = (p[0] * (1 - p[0]) / (300 * b)).sqrt()
    assert ((freq - p[0]).abs() <= 5 * sd + 2**-15).all()
    assert abs(float(freq.mean() - p[0].mean())) < 2e-3
    few = s(p[:3], torch.empty(3, h), g)  # a short last batch uses the first rows
    assert few.shape == (3, h) and set(few.unique().tolist()) <= {0.0, 1.0}


@pytest.mark.parametrize("momentum,weight_decay", [(0.0, 0.0), (0.0, 0.01), (0.5, 0.01)])
def test_cd1_steps_equal_the_textbook_update(monkeypatch, momentum, weight_decay):
    """Two CD-1 steps by hand (deterministic hidden 'samples': p > 0.5) against the fused
    GEMM with the biases carried in ones columns."""
    from surgery.pretrain import rbm

    monkeypatch.setattr(rbm.BernoulliSampler, "__call__", lambda self, p, out, g, words=None: torch.gt(p, 0.5, out=out))
    x = (torch.rand(40, 30, generator=G(7)) < 0.4).float()
    cfg = RBMConfig(hidden=12, epochs=1, lr=0.3, momentum=momentum, weight_decay=weight_decay, init_std=0.3)
    layer = train_rbm(x, cfg, "h1", 20, G(0), False)
    g = G(0)
    W = torch.randn(12, 30, generator=g) * 0.3
    perm = torch.randperm(40, generator=g)
    m = x.mean(0).clamp(1e-3, 1 - 1e-3)
    b, c = torch.log(m / (1 - m)), torch.zeros(12)
    vW, vb, vc = torch.zeros_like(W), torch.zeros_like(b), torch.zeros_like(c)
    for i in (0, 20):
        v0 = x[perm[i : i + 20]]
        ph0 = torch.sigmoid(v0 @ W.t() + c)
        v1 = torch.sigmoid((ph0 > 0.5).float() @ W + b)
        ph1 = torch.sigmoid(v1 @ W.t() + c)
        a = cfg.lr / 20
        vW = momentum * vW + a * (ph0.t() @ v0 - ph1.t() @ v1) - cfg.lr * weight_decay * W
        vb = momentum * vb + a * (v0 - v1).sum(0)
        vc = momentum * vc + a * (ph0 - ph1).sum(0)
        W, b, c = W + vW, b + vb, c + vc
    torch.testing.assert_close(layer.tensors["weight"], W, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(layer.tensors["visible_bias"], b, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(layer.tensors["bias"], c, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("kw", [
    dict(method="ae"),
    dict(method="ae", momentum=0.0, weight_decay=1e-2),
    dict(method="ae", weight_decay=1e-2, tied=False),
    dict(method="ae", activation="tanh", loss="squared", lr=0.005),
    dict(method="ae", activation="relu", loss="squared", lr=0.005, tied=False),
    dict(method="ae", activation="linear", loss="squared", lr=0.005),
    dict(method="ae", activation="softplus"),
    dict(method="sparse_ae", sparsity_weight=0.5),
    dict(method="sparse_ae", sparsity_weight=0.5, tied=False, momentum=0.0),
])
def test_dense_ae_hand_written_gradients_equal_autograd(kw):
    """The fused dense loop against autograd + torch.optim.SGD on the same batches
    (no corruption, so both see the same inputs), including a short last batch."""
    x = torch.rand(130, 30, generator=G(3))
    cfg = AEConfig(hidden=12, epochs=2, lr=kw.pop("lr", 0.1), noise=0.0, **kw)
    fast = train_autoencoder(x, cfg, "h1", 50, G(0), False)
    ref = train_autoencoder(x, cfg, "h1", 50, G(0), False, _autograd=True)
    assert set(fast.tensors) == set(ref.tensors)
    for k in ref.tensors:
        torch.testing.assert_close(fast.tensors[k], ref.tensors[k], atol=2e-5, rtol=1e-4, msg=k)
    for a, b in zip(_hist(fast, "loss"), _hist(ref, "loss")):
        assert a == pytest.approx(b, rel=1e-4)
    assert _hist(fast, "recon_error") == pytest.approx(_hist(ref, "recon_error"), rel=1e-4)


def test_mask_noise_keeps_one_minus_level():
    from surgery.pretrain.sampling import MaskNoise

    m, g = MaskNoise(50, 333, torch.device("cpu")), G(1)
    x = torch.ones(50, 333)
    out = torch.empty_like(x)
    kept = torch.stack([m(x, 0.25, out, g).mean() for _ in range(200)])
    assert float(kept.mean()) == pytest.approx(0.75, abs=2e-3)
    assert float(m(x, 0.0, out, g).min()) == 1.0
    assert float(m(x * 3, 0.25, out, g).max()) == 3.0  # kept values pass unchanged


def _grow_reference(x, y, stack, cfg, batch_size, g):
    """The grow stage written with autograd and torch.optim.SGD, drawing from ``g`` in the
    same order (new layer's init, head's init, then one permutation per epoch)."""
    from surgery.dataset import epoch_batches
    from surgery.layers import init_weight

    below = [layer.module() for layer in stack.layers] if cfg.train == "all" else []
    feats = x if cfg.train == "all" else stack.transform(x)
    spec = cfg.spec_for((stack.transform(x[:1]).shape[1],))
    new, head = spec.build(), torch.nn.Linear(cfg.hidden, int(y.max()) + 1)
    with torch.no_grad():
        init_weight(new.weight, cfg.activation, cfg.init, spec, generator=g)
        init_weight(head.weight, "linear", cfg.init, generator=g)
        head.bias.zero_()
    net = torch.nn.Sequential(*below, new, head)
    opt = torch.optim.SGD(net.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    losses = []
    for _ in range(cfg.epochs):
        total = 0.0
        for xb, yb in epoch_batches(feats, y, batch_size, g):
            loss = torch.nn.functional.cross_entropy(net(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss.detach()) * xb.shape[0]
        losses.append(total / x.shape[0])
    return net, losses


@pytest.mark.parametrize("stacked", [False, True], ids=["gemm loop", "bmm"])
@pytest.mark.parametrize("train", ["all", "new"])
def test_grow_stage_equals_autograd_for_each_member(train, stacked):
    """Two members grown together through the stacked chain (their own lr, momentum, weight
    decay and init scheme) each equal autograd + torch.optim.SGD on that member alone: the new
    layer, the layers below (train: all) and the loss history; and the validation error each
    records is that of the stage's network (layers below, new layer, head) on held-out rows."""
    from surgery.layers import LayerSpec
    from surgery.pretrain.grow import GrowConfig, train_grow_population
    from surgery.stack import LayerStack, StackLayer

    x, y = torch.rand(130, 30, generator=G(3)), torch.randint(0, 4, (130,), generator=G(4))

    def stack(seed):
        w = torch.randn(16, 30, generator=G(seed)) * 0.3
        return LayerStack([StackLayer("h1", LayerSpec(in_features=30, out_features=16, activation="tanh"),
                                      {"weight": w, "bias": torch.zeros(16)}, {"method": "rbm"})])

    cfgs = [GrowConfig(hidden=12, epochs=2, lr=0.1, momentum=0.9, train=train),
            GrowConfig(hidden=12, epochs=2, lr=0.05, momentum=0.5, weight_decay=0.01, train=train,
                       init="torch")]
    refs = [_grow_reference(x, y, stack(k), c, 50, G(10 + k)) for k, c in enumerate(cfgs)]
    stacks = [stack(0), stack(1)]
    vx, vy = torch.rand(4100, 30, generator=G(5)), torch.randint(0, 4, (4100,), generator=G(6))  # > one chunk
    new = train_grow_population(x, y, [s.transform(x) for s in stacks], stacks, cfgs, ["h2", "h2"], 50,
                                [G(10), G(11)], False, stacked, valid=(vx, vy))
    for k, (net, losses) in enumerate(refs):
        with torch.no_grad():
            wrong = net(vx if train == "all" else stack(k).transform(vx)).argmax(1) != vy
        assert new[k].pretrain["final"]["valid_error"] == pytest.approx(100.0 * float(wrong.float().mean()), abs=0.03)
        assert ["valid_error" in h for h in new[k].pretrain["history"]] == [False, True]  # after the last epoch
        torch.testing.assert_close(new[k].tensors["weight"], net[-2].weight.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(new[k].tensors["bias"], net[-2].bias.detach(), rtol=1e-5, atol=1e-6)
        assert _hist(new[k], "loss") == pytest.approx(losses, rel=1e-5)
        below = stacks[k][0].tensors["weight"]
        if train == "all":
            torch.testing.assert_close(below, net[0].weight.detach(), rtol=1e-5, atol=1e-6)
            assert stacks[k][0].pretrain["updated_by"] == ["grow:h2"]
        else:
            assert torch.equal(below, stack(k)[0].tensors["weight"])


def test_grow_on_conv_layers_trains_only_the_new_layer():
    with pytest.raises(ValueError, match="grow with train: all"):
        PretrainConfig(layers=[{"method": "conv_ae", "hidden": 4}, {"method": "grow", "hidden": 8}])


def test_a_single_run_stopped_mid_pretraining_resumes_after_its_last_layer(tmp_path, monkeypatch, capsys):
    """`surgery run` keeps each pretrained layer's snapshot under OUT/pretrain/; killed after
    layer 2 of 3, `surgery inspect` says so and `--resume` trains only layer 3, making the
    stack (and the fine-tuned net) of the run without a break."""
    import json

    from safetensors.torch import load_file

    import surgery.pipeline as pipeline
    from surgery.cli import main

    (tmp_path / "r.yaml").write_text(
        "data: {dataset: synthetic, n_train: 300, n_valid: 100, n_test: 100}\n"
        "pretrain: {batch_size: 50, layers: [{method: rbm, hidden: 16, epochs: 2}, {method: dae, hidden: 12, "
        "epochs: 2}, {method: ae, hidden: 8, epochs: 2}]}\n"
        "finetune: {epochs: 2, device: cpu, progress: false}\n")
    assert main(["run", str(tmp_path / "r.yaml"), "--out", str(tmp_path / "whole")]) == 0
    original = pipeline.save_snapshot

    def killed_after_layer_two(sdir, i, stack, rng):
        original(sdir, i, stack, rng)
        if i == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "save_snapshot", killed_after_layer_two)
    assert main(["run", str(tmp_path / "r.yaml"), "--out", str(tmp_path / "cut")]) == 130
    monkeypatch.setattr(pipeline, "save_snapshot", original)
    capsys.readouterr()
    assert main(["inspect", str(tmp_path / "cut")]) == 0
    assert "unfinished: pretraining, 2 layers so far (`--resume` continues after them)" in capsys.readouterr().out
    assert main(["run", str(tmp_path / "r.yaml"), "--out", str(tmp_path / "cut"), "--resume"]) == 0
    err = capsys.readouterr().err
    assert "continuing the stack after layer 2 of 3" in err and "layer 3/3" in err and "layer 1/3" not in err
    for name in ("stack.safetensors", "model.safetensors"):
        a, b = load_file(str(tmp_path / "whole" / name)), load_file(str(tmp_path / "cut" / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    whole, cut = (json.loads((tmp_path / d / "result.json").read_text()) for d in ("whole", "cut"))
    assert whole["test_error"] == cut["test_error"]
    # layers kept by another pretrain section are not continued from: --resume warns and starts at layer 1
    monkeypatch.setattr(pipeline, "save_snapshot", killed_after_layer_two)
    assert main(["run", str(tmp_path / "r.yaml"), "--out", str(tmp_path / "other")]) == 130
    monkeypatch.setattr(pipeline, "save_snapshot", original)
    capsys.readouterr()
    changed = ["--set", "pretrain.layers.0.epochs=1"]
    assert main(["run", str(tmp_path / "r.yaml"), "--out", str(tmp_path / "other"), "--resume", *changed]) == 0
    err = capsys.readouterr().err
    assert "were pretrained by another pretrain section, seed or data" in err and "layer 1/3" in err, err
    assert not (tmp_path / "other" / "pretrain").exists()  # the stack is written whole: its layers go
    # `surgery pretrain` keeps them beside its output (STACK.layers/) and continues the same way
    monkeypatch.setattr(pipeline, "save_snapshot", killed_after_layer_two)
    stack = tmp_path / "p" / "stack.safetensors"
    assert main(["pretrain", str(tmp_path / "r.yaml"), "-o", str(stack)]) == 130
    monkeypatch.setattr(pipeline, "save_snapshot", original)
    assert not stack.exists() and (tmp_path / "p" / "stack.layers" / "depth2.safetensors").is_file()
    capsys.readouterr()
    assert main(["pretrain", str(tmp_path / "r.yaml"), "-o", str(stack), "--resume"]) == 0
    assert "continuing the stack after layer 2 of 3" in capsys.readouterr().err
    a, b = load_file(str(tmp_path / "whole" / "stack.safetensors")), load_file(str(stack))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not (tmp_path / "p" / "stack.layers").exists()


@pytest.mark.parametrize("x, batch, error, fragment", [
    (torch.randint(0, 2, (10, 16)), 5, DataError, "its input is torch.int64; pretraining takes float32"),
    (torch.rand(10, 16, dtype=torch.float64), 5, DataError, "its input is torch.float64"),
    (torch.rand(0, 16), 5, ShapeError, "its input has shape (0, 16)"),
    (torch.rand(16), 5, ShapeError, "its input has shape (16,)"),
    (torch.rand(10, 16), 0, ConfigError, "batch_size 0"),
])
@pytest.mark.parametrize("train", [
    lambda x, b: train_rbm(x, RBMConfig(hidden=3, epochs=1), "h1", b, G(), False),
    lambda x, b: train_autoencoder(x, AEConfig(method="dae", hidden=3, epochs=1), "h1", b, G(), False),
], ids=["rbm", "dae"])
def test_a_layer_refuses_input_it_cannot_train_on_naming_the_layer(train, x, batch, error, fragment):
    with pytest.raises(error, match="layer 'h1': ") as e:
        train(x, batch)
    assert fragment in str(e.value)


def test_a_batch_larger_than_the_input_warns():
    with pytest.warns(SurgeryWarning, match="layer 'h1': batch_size 50 is more than its 10 examples"):
        train_rbm(torch.rand(10, 16), RBMConfig(hidden=3, epochs=1), "h1", 50, G(), False)


def test_one_layer_trains_from_the_api_with_defaults():
    """`S.train_rbm(x, cfg)` and `S.train_autoencoder(x, cfg)` need no name, batch size or
    generator: layer h1, the config's batch size (else 100) and a generator seeded with 0,
    the same layer as those given by hand."""
    x = torch.rand(250, 12, generator=G(3))
    rbm = train_rbm(x, RBMConfig(hidden=5, epochs=2, lr=0.1), progress=False)
    same = train_rbm(x, RBMConfig(hidden=5, epochs=2, lr=0.1), "h1", 100, G(0), False)
    assert rbm.name == "h1" and rbm.pretrain["batch_size"] == 100
    assert torch.equal(rbm.tensors["weight"], same.tensors["weight"])
    dae = train_autoencoder(x, AEConfig(method="dae", hidden=5, epochs=2, batch_size=30), progress=False)
    same = train_autoencoder(x, AEConfig(method="dae", hidden=5, epochs=2, batch_size=30), "h1", 30, G(0), False)
    assert dae.pretrain["batch_size"] == 30 and torch.equal(dae.tensors["weight"], same.tensors["weight"])
