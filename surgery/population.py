"""A population: K networks of one architecture fine-tuned together as one batched program.

An experiment grid is many small networks of the same shape (arms x depths x seeds). Here
their weights are stacked (:class:`surgery.stacked.StackedChain`), ``W[l]`` [K, out, in]
and ``b[l]`` [K, out], so each layer of all K networks is one ``bmm``; every model keeps
its own seed (data order, dropout masks), its own starting weights (a pretrained stack or
a fresh init), its own learning rate, per-layer learning rates, momentum, Nesterov flag,
weight decay and schedule, and its own early stopping (a stopped model's learning rate
becomes 0, so it stands still, and it keeps its best weights). A model trained here equals
the same model trained alone (``tests/test_population.py``). The training loop around it,
epochs, early stopping, results and files, is the single run's
(:class:`surgery.finetune.PopulationTrainer`).

Scope today: dense chains (dropout allowed), SGD with momentum/Nesterov, Adam (a
momentum schedule sets its beta1), RMSprop, Adagrad and Adadelta, ``layer_lr``, any
lr/momentum schedule, early stopping, per-model init and dropout; on a GPU the step is captured as a CUDA graph
(:class:`surgery.graphed.StackedStep`; not with dropout, whose masks are drawn on the CPU). Not
yet: freeze schedules, conv layers, AMP and checkpoints;
``check_population`` names what a config lacks. Greedy pretraining has its own populations
(:func:`surgery.pretrain.greedy.greedy_pretrain_population`); its supervised ``grow`` stages
train through the same stacked chain.
"""

from __future__ import annotations

import json
import math
from typing import Any

import torch
from torch import Tensor

from .batched import loops_on
from .dataset import Dataset
from .devices import resolve_device
from .errors import CheckpointError, ConfigError, TrainingDiverged
from .finetune_config import FinetuneConfig
from .graph import ModelGraph
from .graphed import StackedStep
from .layers import init_weight
from .module_engine import lr_multiplier, prepare_graph
from .preflight import check_data, check_fits, check_patterns, warn_large_batch
from .schedules import schedule_at
from .stacked import StackedChain, StackedOptimizer


def _structure(graph: ModelGraph) -> list[tuple[str, Any]]:
    """The chain as ``("dense", (in, out, activation))`` and ``("dropout", p)`` steps."""
    if not graph.is_chain():
        raise ConfigError("a population trains chains of layers; this graph branches.")
    out: list[tuple[str, Any]] = []
    for node in graph.nodes():
        if node.kind == "dropout":
            out.append(("dropout", node.p))
        elif node.kind == "layer" and node.spec is not None and node.spec.kind == "dense":
            if node.frozen:
                raise ConfigError(f"node {node.name!r} is frozen; populations train every layer.")
            out.append(("dense", (node.spec.in_features, node.spec.out_features, node.spec.activation)))
        else:
            raise ConfigError(f"node {node.name!r} ({node.kind}) cannot be batched yet; populations take dense layers.")
    return out


def population_size(mode: str | int, device: torch.device, bytes_per_model: int) -> int:
    """How many models train together: ``off`` 1; a number, that many; ``auto``: on a GPU
    as many as fit in half its free memory (at most 100); on a CPU 1, where batching
    measured both ways: recipes/quick.yaml in groups of 5 1.1-1.4x faster, three batch-2 nets
    1.16x, but five 784-500-500-10 nets mixing SGD and Nesterov 0.85-0.96x and 25 nets
    0.95x (benchmarks/population.py)."""
    if mode == "off":
        return 1
    if isinstance(mode, int):
        return mode
    if device.type != "cuda":
        return 1
    free, _ = torch.cuda.mem_get_info(device)
    return max(1, min(100, free // 2 // max(bytes_per_model, 1)))


def model_bytes(graph: ModelGraph, batch: int) -> int:
    """A member's memory in a population: weights, gradients, momentum and best copies
    (4 x 4 bytes per parameter) and a batch's activations kept for the backward pass."""
    params = sum(n.n_params for n in graph.nodes())
    widths = sum(n.spec.out_features for n in graph.nodes() if n.spec is not None)
    return 16 * params + 12 * batch * widths


def architecture_key(graph: ModelGraph, cfg: FinetuneConfig) -> str:
    """What members must share to train together: layers, dropout, the budget and the optimizer."""
    layers = [[n.kind, n.spec.model_dump(mode="json") if n.spec else n.p] for n in graph.nodes()]
    shared = {"layers": layers, "dropout": cfg.dropout, "input_dropout": cfg.input_dropout, "epochs": cfg.epochs,
              "batch_size": cfg.batch_size, "device": cfg.device, "optimizer": cfg.optimizer.name}
    return json.dumps(shared, sort_keys=True)


def check_population(cfgs: list[FinetuneConfig]) -> None:
    """``ConfigError`` unless the configs can train together: same epochs, batch size and
    device, and only what the population supports."""
    first = cfgs[0]
    for i, c in enumerate(cfgs):
        for field in ("epochs", "batch_size", "device"):
            if getattr(c, field) != getattr(first, field):
                raise ConfigError(f"population member {i}: finetune.{field} differs ({getattr(c, field)!r} vs "
                                  f"{getattr(first, field)!r}); members share the budget and the device.")
        if c.optimizer.name == "cg":
            raise ConfigError(f"population member {i}: optimizer cg (a line search a step) trains one model at a "
                              "time.")
        if c.optimizer.name != first.optimizer.name:
            raise ConfigError(f"population member {i}: optimizer {c.optimizer.name!r} but member 0 uses "
                              f"{first.optimizer.name!r}; members share the optimizer.")
        for field in ("unfreeze_at", "freeze_at"):
            if getattr(c, field):
                raise ConfigError(f"population member {i}: finetune.{field} is not supported in a population yet.")
        if c.amp or c.compile:
            raise ConfigError(f"population member {i}: amp/compile are not supported in a population yet.")


def layer_multipliers(graph: ModelGraph, cfg: FinetuneConfig) -> list[float]:
    """The lr multiplier of each layer node in order, as the Trainer's parameter groups get
    them; ``ConfigError`` for a pattern that matches no layer."""
    names = [n.name for n in graph.nodes() if n.kind == "layer"]
    check_patterns(names, cfg)
    return [lr_multiplier(name, cfg) for name in names]


def dropout_stream(graph: ModelGraph, seed: int) -> torch.Generator:
    """The generator a model alone draws its dropout masks from: Trainer seeds the global
    generator with ``seed``, and building its modules draws a throwaway init for each
    layer from it (``to_module``) before the first mask."""
    gen = torch.Generator().manual_seed(seed)
    for node in graph.nodes():
        if node.kind == "layer" and node.spec is not None:
            init_weight(torch.empty(node.spec.weight_shape), node.spec.activation, "classic", node.spec, gen)
    return gen


def dropout_noise(shape: torch.Size, rates: list[float], gens: list[torch.Generator]) -> Tensor:
    """Each model's dropout noise [K, ...] from its own generator, drawn as ``F.dropout``
    draws it on a CPU (Bernoulli(1 - p), divided by 1 - p)."""
    out = torch.empty(shape)
    for k, (p, g) in enumerate(zip(rates, gens)):
        out[k].bernoulli_(1 - p, generator=g).div_(1 - p)
    return out


def capture_blockers(cfgs: list[FinetuneConfig], device: torch.device, dropout: bool) -> list[str]:
    """Why a population's step cannot be captured as a CUDA graph (empty: it can)."""
    reasons = []
    if device.type != "cuda":
        reasons.append(f"the device is {device}, not a CUDA GPU")
    if any(c.cuda_graph is False for c in cfgs):
        reasons.append("cuda_graph: false")
    if dropout:
        reasons.append("dropout masks are drawn per member on the CPU")
    return reasons


def dropout_positions(steps: list[tuple[str, Any]]) -> dict[int, list[int]]:
    """Where each dropout of a chain acts: ``{dense layer index: [dropout columns]}``, a
    dropout acting on the input of the dense layer after it."""
    out: dict[int, list[int]] = {}
    dense = col = 0
    for kind, _ in steps:
        if kind == "dense":
            dense += 1
        else:
            out.setdefault(dense, []).append(col)
            col += 1
    return out


def schedule_values(cfgs: list[FinetuneConfig], step: int, steps_per_epoch: int,
                    total_steps: int) -> tuple[list[float], list[float | None]]:
    """Each member's learning rate and momentum (Adam: beta1) at global ``step`` (its own schedule)."""
    lrs: list[float] = []
    moms: list[float | None] = []
    for c in cfgs:
        o = c.optimizer
        lr, mom = schedule_at(c.schedule, o.lr, step, steps_per_epoch, total_steps)
        lrs.append(lr)
        if o.name in ("adagrad", "adadelta"):  # no momentum: a momentum schedule does nothing
            moms.append(None)
        else:
            moms.append(mom if mom is not None else o.betas[0] if o.name == "adam" else o.momentum)  # Adam: beta1
    return lrs, moms


class StackedEngine:
    """``graphs[k]`` trained with ``cfgs[k]`` and ``seeds[k]`` on ``data``, together: the
    kernel under a population (:class:`surgery.finetune.PopulationTrainer`), with the same
    calls as :class:`surgery.module_engine.ModuleEngine`. ``stacked``: one ``bmm`` per layer
    for all members (default: on a GPU) or a loop of GEMMs."""

    rank, world = 0, 1

    def __init__(self, graphs: list[ModelGraph], data: Dataset, cfgs: list[FinetuneConfig], seeds: list[int],
                 stacked: bool | None = None):
        if not (len(graphs) == len(cfgs) == len(seeds) >= 1):
            raise ConfigError(f"a population needs as many configs and seeds as graphs; got {len(graphs)}, "
                              f"{len(cfgs)}, {len(seeds)}.")
        check_population(cfgs)
        self.cfgs, self.seeds, self.K = cfgs, seeds, len(graphs)
        self.device = resolve_device(cfgs[0].device, "finetune.device")
        check_data(data)
        for g in graphs:
            check_fits(g, data)
        warn_large_batch(cfgs[0], data)
        self.graphs = [prepare_graph(g, c, s) for g, c, s in zip(graphs, cfgs, seeds)]
        steps = [_structure(g) for g in self.graphs]
        self.steps = [(kind, val if kind == "dense" else None) for kind, val in steps[0]]
        if any([k for k, _ in s] != [k for k, _ in steps[0]] or
               [v for k, v in s if k == "dense"] != [v for k, v in steps[0] if k == "dense"] for s in steps):
            raise ConfigError("population members must share one architecture (layer sizes and activations).")
        self.rates = torch.tensor([[v for k, v in s if k == "dropout"] for s in steps], dtype=torch.float32)
        self.drop_at = dropout_positions(self.steps)
        self.data = data.to(self.device)
        layers = [[n for n in g.nodes() if n.kind == "layer"] for g in self.graphs]
        W = [torch.stack([ls[i].tensors["weight"] for ls in layers]).to(self.device) for i in range(len(layers[0]))]
        b = [torch.stack([ls[i].tensors["bias"] for ls in layers]).to(self.device) for i in range(len(layers[0]))]
        self.chain = StackedChain(W, b, [spec[2] for kind, spec in self.steps if kind == "dense"],
                                  loops_on(self.device) if stacked is None else not stacked)
        self.W, self.b = self.chain.W, self.chain.b
        opts = [c.optimizer for c in cfgs]
        self.opt = StackedOptimizer(
            self.chain.params, self.chain.grads, opts[0].name,
            [layer_multipliers(g, c) for g, c in zip(self.graphs, cfgs)], [o.weight_decay for o in opts],
            [o.nesterov for o in opts], [o.betas[1] for o in opts], [o.eps for o in opts], [o.alpha for o in opts],
            [o.rho for o in opts])
        self.shuffles = [torch.Generator().manual_seed(s) for s in seeds]
        self.masks = [dropout_stream(g, s) for g, s in zip(self.graphs, seeds)]
        n = len(self.data.train)
        self.steps_per_epoch = math.ceil(n / cfgs[0].batch_size)
        self.total_steps = self.steps_per_epoch * cfgs[0].epochs
        self.running = torch.ones(self.K, device=self.device)
        blockers = capture_blockers(cfgs, self.device, bool(self.drop_at))
        if blockers and cfgs[0].cuda_graph is True:
            raise ConfigError(f"finetune.cuda_graph: true, but a population cannot capture its step: "
                              f"{'; '.join(blockers)}. Use cuda_graph: auto or false.")
        self.stepper = StackedStep(self.chain, self.opt, self.data.train.x, self.data.train.y, cfgs[0].batch_size,
                                   self._noise if self.drop_at else None, capture=not blockers)
        self.best_W = [w.detach().clone() for w in self.W]
        self.best_b = [v.detach().clone() for v in self.b]

    def _noise(self, position: int, shape: torch.Size) -> Tensor | None:
        """The dropout noise [K, ...] on the input of dense layer ``position`` (each member's
        own masks, from its own stream), or None where the chain has no dropout."""
        noise = None
        for col in self.drop_at.get(position, []):
            n = dropout_noise(shape, self.rates[:, col].tolist(), self.masks).to(self.device)
            noise = n if noise is None else noise * n
        return noise

    def _schedule(self, step: int) -> tuple[Tensor, Tensor, list[float], list[float | None]]:
        """Per-model lr (0 once stopped) and momentum at ``step``: [K] tensors and the values."""
        lrs, moms = schedule_values(self.cfgs, step, self.steps_per_epoch, self.total_steps)
        lr = torch.tensor(lrs, device=self.device) * self.running
        return lr, torch.tensor([m or 0.0 for m in moms], device=self.device), lrs, moms

    def train_epoch(self, epoch: int, step: int) -> tuple[list[dict[str, Any]], int]:
        """One epoch for every model from global step ``step``: the per-model records
        (training loss and error, lr, momentum) and the new step."""
        n, B, K = len(self.data.train), self.cfgs[0].batch_size, self.K
        self.stepper.start_epoch(torch.stack([torch.randperm(n, generator=g) for g in self.shuffles]))
        scheduled = any(c.schedule.lr is not None or c.schedule.momentum is not None for c in self.cfgs)
        lrs: list[float] = []
        moms: list[float | None] = []
        for s in range(self.steps_per_epoch):
            if scheduled or s == 0:  # constant lr/momentum: set once per epoch
                lr, mom, lrs, moms = self._schedule(step)
                self.stepper.set_hyperparameters(lr, mom)
            if (s + 1) * B <= n:
                self.stepper.step(step)
            else:
                self.stepper.last_batch(s * B, step)
            step += 1
        loss_sum, wrong = self.stepper.loss_sum.cpu(), self.stepper.wrong.cpu()  # the epoch's one host sync
        running = self.running.cpu().tolist()
        bad = [k for k in range(K) if running[k] and not math.isfinite(float(loss_sum[k]))]
        if bad:
            raise TrainingDiverged(f"the training loss of population member{'s' if len(bad) > 1 else ''} "
                                   f"{', '.join(map(str, bad))} (of 0-{K - 1}) became NaN or infinite in epoch "
                                   f"{epoch + 1}")
        recs = [{"train_loss": float(loss_sum[k]) / n, "train_error": 100.0 * float(wrong[k]) / n,
                 "lr": lrs[k], "momentum": moms[k]} for k in range(K)]
        return recs, step

    @torch.no_grad()
    def errors(self, split: str, chunk: int | None = None) -> list[float]:
        """Each model's classification error in percent on ``split``, in chunks of ``chunk``
        rows (default: 1000 on a CPU, 10000 on a GPU, as for a single model)."""
        s, chunk = getattr(self.data, split), chunk or (10000 if self.device.type == "cuda" else 1000)
        wrong = torch.zeros(self.K, device=self.device)
        for i in range(0, len(s), chunk):
            xb = s.x[i : i + chunk].flatten(1)
            out = self.chain.forward(xb.unsqueeze(0).expand(self.K, -1, -1))
            wrong += (out.argmax(2) != s.y[i : i + chunk]).sum(1)
        return [100.0 * float(w) / max(len(s), 1) for w in wrong]

    def keep_best(self, k: int) -> None:
        """Remember model ``k``'s weights as they are now as its best."""
        for w, bw in zip(self.W, self.best_W):
            bw[k].copy_(w[k])
        for b, bb in zip(self.b, self.best_b):
            bb[k].copy_(b[k])

    def stop(self, k: int) -> None:
        """Model ``k`` stops: its lr is 0 from now on, so it stands still."""
        self.running[k] = 0.0

    def restore_best(self) -> None:
        """Every model's best weights back in place."""
        for w, bw in zip(self.W, self.best_W):
            w.copy_(bw)
        for b, bb in zip(self.b, self.best_b):
            b.copy_(bb)

    def _stacked_state(self) -> dict[str, list[Tensor]]:
        """Every [K, ...] tensor a continued run needs, by kind: weights and biases (the
        optimizer's params), the optimizer's state, the best weights."""
        return {"param": self.opt.params, "buf": self.opt.bufs, "sq": self.opt.sq, "best_W": self.best_W,
                "best_b": self.best_b}

    def member_state(self, k: int) -> dict[str, Tensor]:
        """Member ``k``'s part of the state (its slice of every stacked tensor, its shuffle
        and dropout generators), on the CPU: what continues it, in this population or another."""
        out = {f"{kind}.{i}": t[k].detach().cpu().clone()
               for kind, ts in self._stacked_state().items() for i, t in enumerate(ts)}
        return {**out, "rng.shuffle": self.shuffles[k].get_state(), "rng.masks": self.masks[k].get_state()}

    def load_member_state(self, k: int, state: dict[str, Tensor], where: str) -> None:
        """Put :meth:`member_state`'s tensors back as member ``k``'s; ``CheckpointError``
        (naming ``where``) when they are not this architecture's and optimizer's."""
        want = {f"{kind}.{i}": t[k] for kind, ts in self._stacked_state().items() for i, t in enumerate(ts)}
        got = {n: t for n, t in state.items() if not n.startswith("rng.")}
        bad = sorted(n for n in want.keys() | got.keys() if n not in got or n not in want
                     or got[n].shape != want[n].shape)
        if bad or {"rng.shuffle", "rng.masks"} - state.keys():
            raise CheckpointError(f"{where}: made for another network or optimizer (tensors {bad[:4]} differ)")
        for n, t in want.items():
            t.copy_(got[n])
        self.shuffles[k].set_state(state["rng.shuffle"])
        self.masks[k].set_state(state["rng.masks"])

    def weights(self, k: int) -> dict[str, Tensor]:
        """Model ``k``'s weights by node name (``<node>.weight``, ``<node>.bias``), on the CPU."""
        names = [n.name for n in self.graphs[k].nodes() if n.kind == "layer"]
        return {f"{nm}.{p}": t[k].cpu() for nm, w, b in zip(names, self.W, self.b)
                for p, t in (("weight", w), ("bias", b))}

    def member_graph(self, k: int) -> ModelGraph:
        """Model ``k``'s graph holding its weights as they are now."""
        graph, w = self.graphs[k].copy(), self.weights(k)
        for node in graph.nodes():
            if node.kind == "layer":
                node.tensors = {"weight": w[f"{node.name}.weight"].clone(), "bias": w[f"{node.name}.bias"].clone()}
        return graph
