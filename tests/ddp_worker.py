"""Run by tests/test_finetune.py under torchrun: train a small net and save its weights."""

import sys

import torch
from safetensors.torch import save_file

from surgery.data import DataConfig, load_dataset
from surgery.finetune import FinetuneConfig, Trainer
from surgery.graph import ModelGraph
from surgery.layers import LayerSpec


def build() -> ModelGraph:
    g = ModelGraph()
    g.insert("h1", LayerSpec(in_features=64, out_features=32), generator=torch.Generator().manual_seed(5))
    g.head(4)
    return g


def train(batch_size: int) -> dict:
    torch.set_num_threads(1)
    ds = load_dataset(DataConfig(dataset="synthetic", n_train=800))
    cfg = FinetuneConfig(epochs=2, batch_size=batch_size, device="cpu", progress=False,
                         optimizer={"name": "sgd", "lr": 0.2, "momentum": 0.9})
    t = Trainer(build(), ds, cfg, seed=3)
    t.fit()
    return {k: v.detach().clone() for k, v in t.model.state_dict().items()}


if __name__ == "__main__":
    state = train(int(sys.argv[2]))
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_rank() == 0:
        save_file(state, sys.argv[1])
    if dist.is_initialized():
        dist.destroy_process_group()
