"""Run by tests/test_finetune.py under torchrun: train a small net and save its weights."""

import sys

import torch
from safetensors.torch import save_file

from surgery.assembly import build_graph
from surgery.data import DataConfig, load_dataset
from surgery.finetune import FinetuneConfig, Trainer
from surgery.graph import ModelGraph
from surgery.ops import HeadOp, InsertOp
from surgery.runtime import exit_status


def build() -> ModelGraph:
    return build_graph([InsertOp(name="h1", units=32, in_features=64), HeadOp(classes=4)], seed=5)


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
    sys.exit(exit_status(0))  # as the CLI ends a torchrun rank
