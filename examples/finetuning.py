"""Fine-tuning with the Python API: pretrain one RBM layer, put a softmax head on it,
and train end to end with Nesterov momentum, an exponential lr decay, a momentum ramp
and a higher learning rate for the pretrained layer.

    python examples/finetuning.py [--limit 5000] [--epochs 3]
"""

import argparse
from pathlib import Path

import surgery as S

ap = argparse.ArgumentParser()
ap.add_argument("--dataset", default="mnist")
ap.add_argument("--limit", type=int, default=5000)
ap.add_argument("--epochs", type=int, default=3)
ap.add_argument("--out", type=Path, default=Path("runs/examples/finetune"))
args = ap.parse_args()

data = S.load_dataset(S.DataConfig(dataset=args.dataset, limit=args.limit))
stack = S.greedy_pretrain(data.train.x, S.PretrainConfig(layers=[{"method": "rbm", "hidden": 500, "epochs": 2}]))
graph = S.build_graph([S.TakeOp(source="rbm"), S.HeadOp(classes=data.num_classes)], {"rbm": stack})
cfg = S.FinetuneConfig(
    epochs=args.epochs,
    batch_size=50,
    optimizer={"name": "sgd", "lr": 0.1, "momentum": 0.9, "nesterov": True},
    schedule={"lr": {"kind": "exponential", "start": 0.1, "end": 0.01},
              "momentum": {"kind": "linear", "start": 0.7, "end": 0.95}},
    layer_lr={"h1": 2.0},
)
result = S.Trainer(graph, data, cfg, seed=0, out_dir=args.out).fit()
print(f"test error {result['test_error']:.2f}% after {result['epochs']} epochs; files in {args.out}")
