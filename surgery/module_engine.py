"""One network trained with ``torch.optim``: the kernel under a single fine-tuning run.

:class:`ModuleEngine` holds any assembled graph as an ``nn.Module`` (conv layers,
branches, every optimizer, freeze schedules, AMP, ``compile``, DDP under ``torchrun``, and
the step captured as a CUDA graph, :mod:`surgery.graphed`) and trains it one epoch at a
time for the training loop (:class:`surgery.finetune.Trainer`), as a population of one.
The dataset lives on the training device; an epoch is one permutation of the training set
(drawn from a seeded generator) sliced into batches. Per-node parameter groups carry
learning-rate multipliers; schedules are functions of the global step.

Also here, shared with the stacked populations (:mod:`surgery.population`):
:func:`prepare_graph` (before training; what is checked before it is in
:mod:`surgery.preflight`), :func:`lr_multiplier`, :func:`param_groups`,
:func:`apply_freezing`, :func:`error_rate`.
"""

from __future__ import annotations

import contextlib
import fnmatch
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .checkpoint import Checkpoint, load_model_state, restore_rng, rng_states
from .dataset import Dataset, Split
from .devices import resolve_device
from .errors import ConfigError, SurgeryError, SurgeryWarning, TrainingDiverged
from .finetune_config import FinetuneConfig
from .graph import ModelGraph, Node
from .graphed import GRAPH_OPTIMIZERS, GraphedStep
from .layers import init_weight
from .modules import read_back, to_module
from .ops import DropoutOp
from .preflight import check_data, check_fits, check_patterns, warn_cuda_only, warn_large_batch
from .runtime import distributed, keep_freed_memory
from .schedules import apply_schedule, build_optimizer


def prepare_graph(graph: ModelGraph, cfg: FinetuneConfig, seed: int) -> ModelGraph:
    """The graph as fine-tuning will train it (a copy): fresh layers re-initialised with
    ``cfg.init``, dropout placed after the matching layers and on the input."""
    g = graph.copy()
    gen = torch.Generator().manual_seed(seed + 7919)
    if cfg.init is not None:
        for node in g.nodes():
            fresh = node.provenance.get("source") == "fresh" and node.provenance.get("init") != "zeros"
            if node.kind == "layer" and fresh:
                init_weight(node.tensors["weight"], node.spec.activation, cfg.init, node.spec, gen)  # type: ignore[union-attr]
                node.provenance = {**node.provenance, "init": cfg.init}
    for pat, p in cfg.dropout.items():
        if p > 0:
            hidden = [n for n in g.match(pat) if g.node(n).kind == "layer" and n != g.last()]
            if hidden:
                DropoutOp(p=p, after=hidden).apply(g)
    if cfg.input_dropout > 0:
        first = g.first()
        assert first is not None
        g.insert_before(first, [Node("drop_input", "dropout", p=cfg.input_dropout)])
    return g


def lr_multiplier(name: str, cfg: FinetuneConfig) -> float:
    """Layer ``name``'s lr multiplier from ``finetune.layer_lr`` (the last matching pattern wins)."""
    mult = 1.0
    for pat, m in cfg.layer_lr.items():
        if fnmatch.fnmatchcase(name, pat):
            mult = m
    return mult


def param_groups(graph: ModelGraph, model: nn.Module, cfg: FinetuneConfig) -> list[dict[str, Any]]:
    """One optimizer group per layer node: ``{"params", "lr_mult", "node"}``. Raises
    ``ConfigError`` when a ``layer_lr``/``unfreeze_at``/``freeze_at``/``dropout`` pattern
    matches no layer."""
    mods = dict(model.named_children())
    groups = [{"params": list(mods[node.name].parameters()), "lr_mult": lr_multiplier(node.name, cfg),
               "node": node.name} for node in graph.nodes() if node.kind == "layer"]
    check_patterns([g["node"] for g in groups], cfg)
    return groups


def trains(node: Node, cfg: FinetuneConfig, epoch: int) -> bool:
    """Whether ``node`` trains in ``epoch`` (from 0): frozen nodes stay frozen unless
    ``unfreeze_at`` says otherwise; ``freeze_at`` stops a node from that epoch on."""
    trainable = not node.frozen
    for pat, at in cfg.unfreeze_at.items():
        if fnmatch.fnmatchcase(node.name, pat):
            trainable = epoch >= at
    for pat, at in cfg.freeze_at.items():
        if fnmatch.fnmatchcase(node.name, pat) and epoch >= at:
            trainable = False
    return trainable


def check_freezing(groups: list[dict[str, Any]], graph: ModelGraph, cfg: FinetuneConfig) -> None:
    """``ConfigError`` naming the first epoch in which no layer would train; a warning for an
    ``unfreeze_at`` epoch the run never reaches (its layers would never train)."""
    for pat, at in cfg.unfreeze_at.items():
        if at >= cfg.epochs:
            warnings.warn(f"finetune.unfreeze_at: {pat!r} becomes trainable at epoch {at + 1}, after the last of "
                          f"{cfg.epochs} epochs, so it never trains.", SurgeryWarning, stacklevel=2)
    for epoch in range(cfg.epochs):
        if not any(trains(graph.node(gr["node"]), cfg, epoch) for gr in groups if gr["params"]):
            raise ConfigError(
                f"finetune: no layer trains in epoch {epoch + 1}: each is frozen there by the surgery's freeze "
                f"op or by finetune.freeze_at {dict(cfg.freeze_at)} / unfreeze_at {dict(cfg.unfreeze_at)}. Leave "
                "at least one layer (e.g. the head) trainable in every epoch.")


def apply_freezing(groups: list[dict[str, Any]], graph: ModelGraph, cfg: FinetuneConfig, epoch: int) -> None:
    """Set ``requires_grad`` of every group's parameters for ``epoch`` (see :func:`trains`)."""
    for gr in groups:
        trainable = trains(graph.node(gr["node"]), cfg, epoch)
        for p in gr["params"]:
            p.requires_grad_(trainable)


def autocast(device: torch.device, amp: bool) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA when ``amp``; otherwise nothing."""
    if amp and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def error_rate(model: nn.Module, split: Split, device: torch.device, amp: bool = False,
               chunk: int | None = None) -> float:
    """Classification error in percent of ``model`` on ``split`` (x [N, ...], y [N]).

    Evaluated in chunks of ``chunk`` rows (default: 1000 on a CPU, where chunks whose
    activations stay in cache ran 1.2x faster than 10000-row ones, 10000 on a GPU)."""
    chunk = chunk or (1000 if device.type == "cpu" else 10000)
    was_training = model.training
    model.eval()
    wrong = torch.zeros((), dtype=torch.long, device=device)
    for i in range(0, len(split), chunk):
        with autocast(device, amp):
            out = model(split.x[i : i + chunk])
        wrong += (out.argmax(1) != split.y[i : i + chunk]).sum()
    model.train(was_training)
    return 100.0 * float(wrong) / max(len(split), 1)


@dataclass
class EpochPlan:
    """How one process walks an epoch: ``batch`` rows per step, its ``rank`` of ``world``."""

    batch: int
    steps: int
    total_steps: int
    rank: int = 0
    world: int = 1


def train_one_epoch(net: nn.Module, opt: torch.optim.Optimizer, xs: Tensor, ys: Tensor, cfg: FinetuneConfig,
                    plan: EpochPlan, epoch: int, step: int, device: torch.device) -> dict[str, Any]:
    """One pass over the shuffled training set ``xs`` [N, ...], ``ys`` [N] as epoch
    ``epoch`` (from 0), starting at global step ``step``. Returns the epoch's record
    (loss, error, lr, momentum) and the new ``step``; raises ``TrainingDiverged``
    (checked every step on a CPU, every 50 on a GPU: a check is a host sync)."""
    check_every = 1 if device.type == "cpu" else 50
    loss_sum = torch.zeros((), device=device)
    wrong = torch.zeros((), dtype=torch.long, device=device)
    seen = 0
    lr = mom = None
    scheduled = cfg.schedule.lr is not None or cfg.schedule.momentum is not None
    line_search = getattr(opt, "needs_closure", False)  # conjugate gradients: no lr, several evaluations a step
    evals0 = getattr(opt, "evaluations", 0)
    for s in range(plan.steps):
        lo = s * plan.batch * plan.world + plan.rank * plan.batch
        xb, yb = xs[lo : lo + plan.batch], ys[lo : lo + plan.batch]
        if xb.shape[0] == 0:
            continue
        if line_search:
            out, loss = _line_search_step(net, opt, xb, yb, cfg.amp, device)
        else:
            if scheduled or s == 0:  # constant lr/momentum: set once per epoch
                lr, mom = apply_schedule(opt, cfg.schedule, cfg.optimizer.lr, step, plan.steps, plan.total_steps)
            with autocast(device, cfg.amp):
                out = net(xb)
                loss = F.cross_entropy(out if out.dtype == torch.float32 else out.float(), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        step += 1
        loss_sum += loss.detach() * xb.shape[0]
        wrong += (out.detach().argmax(1) != yb).sum()
        seen += xb.shape[0]
        if ((s + 1) % check_every == 0 or s + 1 == plan.steps) and not bool(torch.isfinite(loss_sum)):
            raise TrainingDiverged(
                f"the training loss became NaN or infinite in epoch {epoch + 1}, step {s + 1} (global step {step})")
    rec = {"train_loss": float(loss_sum) / max(seen, 1), "train_error": 100.0 * float(wrong) / max(seen, 1),
           "lr": lr, "momentum": mom, "step": step}
    if line_search:  # what an epoch cost: loss and gradient evaluations (forward + backward), all batches
        rec["evaluations"] = opt.evaluations - evals0  # type: ignore[attr-defined]
    return rec


def _line_search_step(net: nn.Module, opt: torch.optim.Optimizer, xb: Tensor, yb: Tensor, amp: bool,
                      device: torch.device) -> tuple[Tensor, Tensor]:
    """One step of an optimizer that evaluates the loss itself (conjugate gradients): its
    closure gives the cross-entropy summed over the batch, as the method was used with.
    Returns the output and the mean loss before the step, as an SGD step records them."""
    outs: list[Tensor] = []

    def closure() -> Tensor:
        opt.zero_grad(set_to_none=True)
        with autocast(device, amp):
            out = net(xb)
            loss = F.cross_entropy(out if out.dtype == torch.float32 else out.float(), yb, reduction="sum")
        loss.backward()
        if not outs:
            outs.append(out.detach())
        return loss

    loss = opt.step(closure)  # type: ignore[arg-type]
    return outs[0], loss / xb.shape[0]


def train_graphed_epoch(step_fn: GraphedStep, opt: torch.optim.Optimizer, xs: Tensor, ys: Tensor,
                        cfg: FinetuneConfig, plan: EpochPlan, epoch: int, step: int) -> dict[str, Any]:
    """:func:`train_one_epoch` through a captured step: the same record, with the loss and
    error summed on the device and NaN checked once, at the end of the epoch."""
    step_fn.start_epoch(xs, ys, plan.batch)
    lr = mom = None
    scheduled = cfg.schedule.lr is not None or cfg.schedule.momentum is not None
    full = xs.shape[0] // plan.batch
    for s in range(plan.steps):
        if scheduled or s == 0:
            lr, mom = apply_schedule(opt, cfg.schedule, cfg.optimizer.lr, step, plan.steps, plan.total_steps)
            step_fn.set_hyperparameters(lr, mom)
        if s < full:
            step_fn.step()
        else:
            step_fn.last_batch(s * plan.batch)
        step += 1
    loss_sum, n = float(step_fn.loss_sum), xs.shape[0]  # the epoch's one host sync
    if not math.isfinite(loss_sum):
        raise TrainingDiverged(f"the training loss became NaN or infinite in epoch {epoch + 1} (a CUDA-graph "
                               f"epoch checks once, at its end; global step {step})")
    return {"train_loss": loss_sum / n, "train_error": 100.0 * float(step_fn.wrong) / n, "lr": lr,
            "momentum": mom, "step": step}


def graph_blockers(cfg: FinetuneConfig, device: torch.device, world: int) -> list[str]:
    """Why the training step cannot be captured as a CUDA graph (empty: it can)."""
    reasons = []
    if device.type != "cuda":
        reasons.append(f"the device is {device}, not a CUDA GPU")
    if cfg.optimizer.name not in GRAPH_OPTIMIZERS:
        reasons.append(f"the optimizer {cfg.optimizer.name!r} is not one of {list(GRAPH_OPTIMIZERS)}")
    if world > 1:
        reasons.append("DDP (torchrun) runs several processes")
    if cfg.compile:
        reasons.append("compile: true")
    if cfg.unfreeze_at or cfg.freeze_at:
        reasons.append("unfreeze_at/freeze_at change what trains between epochs")
    return reasons


class ModuleEngine:
    """``graph`` as one ``nn.Module`` trained on ``data`` as ``cfg`` says, with ``seed``
    (data order, dropout, fresh layers' init): a population of one (``K = 1``) for the
    training loop, which calls :meth:`train_epoch`, :meth:`errors`, :meth:`keep_best` and
    :meth:`restore_best`; checkpoints come from :meth:`checkpoint` and :meth:`restore`.

    Dropout draws from torch's default generators (the ones a captured CUDA graph advances),
    so building an engine seeds them with ``seed``: a script's own draws after it differ
    from what they would have been (checkpoints save and restore that state)."""

    K = 1

    def __init__(self, graph: ModelGraph, data: Dataset, cfg: FinetuneConfig, seed: int):
        self.cfg = cfg
        self.rank, self.world, self.device = distributed(resolve_device(cfg.device, "finetune.device"))
        if cfg.optimizer.name == "cg" and self.world > 1:
            raise ConfigError("finetune.optimizer: cg's line search decides on each process's own loss, so its "
                              "processes would drift apart under torchrun; run it in one process.")
        if self.device.type == "cpu":
            keep_freed_memory()
        check_data(data)
        check_fits(graph, data)
        warn_large_batch(cfg, data)
        warn_cuda_only(cfg, self.device)
        self.graph = prepare_graph(graph, cfg, seed)
        self.data = data.to(self.device)
        torch.manual_seed(seed)
        self.model = to_module(self.graph).to(self.device)
        self.groups = param_groups(self.graph, self.model, cfg)
        check_freezing(self.groups, self.graph, cfg)
        self.opt = build_optimizer(cfg.optimizer, self.groups)
        self.net: nn.Module = self.model
        if self.world > 1:
            self.net = nn.parallel.DistributedDataParallel(self.model)
        if cfg.compile:
            self.net = torch.compile(self.net)  # type: ignore[assignment]
        self.graphed = self._graphed_step()
        self.shuffle = torch.Generator().manual_seed(seed)
        steps = math.ceil(len(self.data.train) / (cfg.batch_size * self.world))
        self.plan = EpochPlan(cfg.batch_size, steps, steps * cfg.epochs, self.rank, self.world)
        self.best: dict[str, Tensor] | None = None
        self._xs: Tensor | None = None  # the shuffled training set, reused every epoch
        self._ys: Tensor | None = None

    def _graphed_step(self) -> GraphedStep | None:
        cfg = self.cfg
        if cfg.cuda_graph is False:
            return None
        blockers = graph_blockers(cfg, self.device, self.world)
        if blockers and cfg.cuda_graph is True:
            raise ConfigError(f"finetune.cuda_graph: true, but {'; '.join(blockers)}. Use cuda_graph: auto "
                              "(captures where it can) or false.")
        if blockers:
            return None
        return GraphedStep(self.net, self.opt, cfg.optimizer.name, cfg.amp, capture=True)

    def errors(self, split: str, chunk: int | None = None) -> list[float]:
        """``[error]``: the classification error in percent on ``split`` (train, valid or test)."""
        return [error_rate(self.model, getattr(self.data, split), self.device, self.cfg.amp, chunk)]

    def _shuffled(self) -> tuple[Tensor, Tensor]:
        """This epoch's shuffled copy of the training set, written into the same buffers
        every epoch (a fresh copy each epoch costs page faults on all of it)."""
        x, y = self.data.train.x, self.data.train.y
        perm = torch.randperm(x.shape[0], generator=self.shuffle).to(self.device)
        if self._xs is None or self._ys is None or self._xs.shape != x.shape:
            self._xs, self._ys = torch.empty_like(x), torch.empty_like(y)
        torch.index_select(x, 0, perm, out=self._xs)
        torch.index_select(y, 0, perm, out=self._ys)
        return self._xs, self._ys

    def train_epoch(self, epoch: int, step: int) -> tuple[list[dict[str, Any]], int]:
        """Train epoch ``epoch`` (from 0) from global step ``step``: ``([record], new step)``,
        the record holding the training loss and error, lr and momentum."""
        apply_freezing(self.groups, self.graph, self.cfg, epoch)
        xs, ys = self._shuffled()
        if self.graphed is not None:
            rec = train_graphed_epoch(self.graphed, self.opt, xs, ys, self.cfg, self.plan, epoch, step)
        else:
            rec = train_one_epoch(self.net, self.opt, xs, ys, self.cfg, self.plan, epoch, step, self.device)
        return [rec], rec.pop("step")

    def keep_best(self, k: int) -> None:
        """Remember the weights as they are now as the best."""
        self.best = {name: v.detach().clone() for name, v in self.model.state_dict().items()}

    def stop(self, k: int) -> None:
        """Nothing to do: a population of one ends when its member stops."""

    def restore_best(self) -> None:
        """Put the best weights back into the model and the graph."""
        if self.best is not None:
            self.model.load_state_dict(self.best)
        read_back(self.graph, self.model)

    def member_graph(self, k: int) -> ModelGraph:
        """The graph with the model's weights (after :meth:`restore_best`: the best ones)."""
        return self.graph

    def weights(self, k: int) -> dict[str, Tensor]:
        """The model's weights by parameter name (``<node>.weight``...), on the CPU."""
        return {name: v.detach().cpu() for name, v in self.model.state_dict().items()}

    def checkpoint(self, meta: dict[str, Any]) -> Checkpoint:
        """Weights, best weights, optimizer state and RNG, with the loop's ``meta``."""
        return Checkpoint(self.model.state_dict(), self.best, self.opt.state_dict(),
                          rng_states(self.shuffle, self.device), meta)

    def restore(self, path: Path, ck: Checkpoint) -> None:
        """Continue from checkpoint ``ck`` read from ``path``; ``CheckpointError`` when it was
        made for another network, ``SurgeryError`` for another optimizer."""
        load_model_state(path, self.model, ck.model)
        self.best = {k: v.to(self.device) for k, v in ck.best.items()} if ck.best else None
        for st in ck.optimizer["state"].values():
            for k, v in st.items():
                if isinstance(v, Tensor):
                    st[k] = v.to(self.device)
        try:
            self.opt.load_state_dict(ck.optimizer)
        except (ValueError, KeyError) as e:
            raise SurgeryError(f"{path}: the optimizer state does not fit this recipe's optimizer ({e}); "
                               "resume with the recipe that made the checkpoint.") from e
        restore_rng(ck.rng, self.shuffle, self.device)
