"""An experiment grid and a population with the Python API: "train one layer, then add a
second and train both, then a third..." against a net that starts from random weights.

Part 1 runs a small grid (arms x depths x seeds) from a recipe written as a dict, as
`surgery run` would, and prints its table and the arms that differ from `none`. Part 2
trains four networks of one shape together as a population, each with its own seed and
learning rate, and checks that one of them ends where the same network trained alone does.

    python examples/experiment.py [--limit 2000] [--epochs 6] [--pretrain-epochs 10] [--seeds 3]
                                  [--out runs/examples/experiment]
"""

import argparse
from pathlib import Path

import surgery as S

ap = argparse.ArgumentParser()
ap.add_argument("--dataset", default="mnist")
ap.add_argument("--limit", type=int, default=2000)
ap.add_argument("--epochs", type=int, default=6, help="fine-tuning epochs")
ap.add_argument("--pretrain-epochs", type=int, default=10, help="epochs per pretrained layer")
ap.add_argument("--seeds", type=int, default=3)
ap.add_argument("--out", type=Path, default=Path("runs/examples/experiment"))
args = ap.parse_args()

# Part 1: the grid. Every arm gets the same fine-tuning budget and, per seed, the same data order.
recipe = S.recipe_from_dict({
    "name": "example-grid",
    "data": {"dataset": args.dataset, "limit": args.limit},
    "experiment": {"conditions": ["none", "grow", "rbm"], "depths": [1, 2], "seeds": list(range(args.seeds)),
                   "hidden": 200, "pretrain_epochs": args.pretrain_epochs,
                   "methods": {"rbm": {"lr": 0.1, "momentum": 0.5}}},
    "finetune": {"epochs": args.epochs, "batch_size": 50, "progress": False,
                 "optimizer": {"name": "sgd", "lr": 0.1, "momentum": 0.9}},
}, base_dir=Path.cwd())
rows = S.run_experiment(recipe, args.out, progress=False)  # run again: finished cells are kept, not retrained
S.write_report(args.out, rows)
print("\n".join(S.summary_grid(rows)))  # S.table(rows): the same numbers as dicts (sd, interval, t, p)
print(S.significance_line(rows))
print(f"report: {args.out / 'report.md'}")

# Part 2: a population. Four nets of one shape, each with its own seed (init, data order) and lr.
data = S.load_dataset(S.DataConfig(dataset=args.dataset, limit=args.limit))
lrs, seeds = [0.05, 0.1, 0.2, 0.4], [0, 1, 2, 3]


def net(seed: int) -> S.ModelGraph:
    ops = [S.InsertOp(name="h1", units=200, in_features=data.input_shape[0]), S.HeadOp(classes=data.num_classes)]
    return S.build_graph(ops, seed=seed)


def config(lr: float) -> S.FinetuneConfig:
    return S.FinetuneConfig(epochs=args.epochs, batch_size=50, progress=False,
                            optimizer={"name": "sgd", "lr": lr, "momentum": 0.9})


together = S.PopulationTrainer([net(s) for s in seeds], data, [config(lr) for lr in lrs], seeds)
results = together.fit()
for lr, r in zip(lrs, results):
    print(f"population member lr {lr}: test error {r['test_error']:.2f}%, best epoch {r['best_epoch']}")
alone = S.Trainer(net(seeds[2]), data, config(lrs[2]), seed=seeds[2])
alone_result = alone.fit()
gap = max(float((w - alone.model.state_dict()[k]).abs().max()) for k, w in together.weights(2).items())
same = gap < 1e-4 and alone_result["best_epoch"] == results[2]["best_epoch"]
print(f"member lr {lrs[2]} trained alone: test error {alone_result['test_error']:.2f}%; "
      f"largest weight difference to the population's {gap:.1e}: {'the same network' if same else 'DIFFERENT'}")
