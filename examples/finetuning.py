"""Fine-tuning with the Python API: pretrain one RBM layer, put a softmax head on it,
and train end to end with Nesterov momentum, an exponential lr decay, a momentum ramp
and a higher learning rate for the pretrained layer.

    python examples/finetuning.py [--limit 5000] [--epochs 3]
"""

import argparse
from pathlib import Path

from surgery.data import DataConfig, load_dataset
from surgery.finetune import FinetuneConfig, Trainer
from surgery.graph import ModelGraph
from surgery.pretrain import PretrainConfig, greedy_pretrain

ap = argparse.ArgumentParser()
ap.add_argument("--dataset", default="mnist")
ap.add_argument("--limit", type=int, default=5000)
ap.add_argument("--epochs", type=int, default=3)
ap.add_argument("--out", type=Path, default=Path("runs/examples/finetune"))
args = ap.parse_args()

data = load_dataset(DataConfig(dataset=args.dataset, limit=args.limit))
stack = greedy_pretrain(data.train.x, PretrainConfig(layers=[{"method": "rbm", "hidden": 500, "epochs": 2}]))
graph = ModelGraph()
graph.take(stack, source="rbm")
graph.head(data.num_classes)
cfg = FinetuneConfig(
    epochs=args.epochs,
    batch_size=50,
    optimizer={"name": "sgd", "lr": 0.1, "momentum": 0.9, "nesterov": True},
    schedule={"lr": {"kind": "exponential", "start": 0.1, "end": 0.01},
              "momentum": {"kind": "linear", "start": 0.7, "end": 0.95}},
    layer_lr={"h1": 2.0},
)
result = Trainer(graph, data, cfg, seed=0, out_dir=args.out).fit()
print(f"test error {result['test_error']:.2f}% after {result['epochs']} epochs; files in {args.out}")
