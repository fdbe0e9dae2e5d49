"""CUDA paths; skipped on machines without a GPU (run them where one is lent)."""

import pytest
import torch

from surgery.data import DataConfig, load_dataset
from surgery.finetune import FinetuneConfig, Trainer
from surgery.pretrain import PretrainConfig, greedy_pretrain
from tests.test_finetune import mlp

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_data_lives_on_the_gpu():
    ds = load_dataset(DataConfig(dataset="synthetic", device="cuda"))
    assert ds.train.x.is_cuda and ds.test.y.is_cuda


@pytest.mark.parametrize("amp", [False, True])
def test_finetune_on_cuda_learns(amp):
    ds = load_dataset(DataConfig(dataset="synthetic", device="cuda"))
    t = Trainer(mlp(), ds, FinetuneConfig(epochs=3, device="cuda", amp=amp, progress=False,
                                          optimizer={"name": "sgd", "lr": 0.2, "momentum": 0.9}))
    r = t.fit()
    assert r["device"].startswith("cuda") and r["test_error"] < 40
    assert t.history[-1]["train_loss"] < t.history[0]["train_loss"]


def test_pretraining_on_cuda_learns():
    ds = load_dataset(DataConfig(limit=3000, device="cuda"))
    st = greedy_pretrain(ds.train.x, PretrainConfig(layers=[
        {"method": "rbm", "hidden": 128, "epochs": 2}, {"method": "dae", "hidden": 64, "epochs": 2}]), progress=False)
    e = [h["recon_error"] for h in st[0].pretrain["history"]]
    assert e[1] < e[0]
    assert st[0].tensors["weight"].is_cuda


def test_cuda_resume_and_nan(tmp_path):
    ds = load_dataset(DataConfig(dataset="synthetic", device="cuda"))
    c = FinetuneConfig(epochs=2, device="cuda", checkpoint_every=1, progress=False)
    Trainer(mlp(), ds, c, out_dir=tmp_path).fit()
    t = Trainer(mlp(), ds, c.model_copy(update={"epochs": 3}), out_dir=tmp_path)
    assert t.fit(resume=True)["epochs"] == 3
