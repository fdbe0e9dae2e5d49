"""Fine-tuning: train an assembled ModelGraph end to end on a Dataset.

The dataset lives on the training device; an epoch is one permutation of the training
set (drawn from a seeded generator) sliced into batches. Per-node parameter groups carry
learning-rate multipliers; schedules are functions of the global step; checkpoints hold
model, optimizer, RNG and early-stopping state in safetensors (+ JSON), so a resumed run
equals an uninterrupted one on the CPU. Launched by ``torchrun``, it trains with DDP.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from .data import Dataset, resolve_device
from .errors import ManifestError, ShapeError, SurgeryError, TrainingDiverged
from .graph import ModelGraph, Node, input_fits
from .io import atomic_path, progress_bar, write_json
from .layers import INIT_SCHEMES, init_weight
from .runtime import keep_freed_memory
from .schedules import OptimizerConfig, ScheduleConfig, apply_schedule, build_optimizer
from .stack import package_version


class EarlyStopping(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    patience: int = Field(default=5, ge=1)
    min_delta: float = Field(default=0.0, ge=0, description="in error percentage points")


class FinetuneConfig(BaseModel):
    """The ``finetune:`` recipe section."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    epochs: int = Field(default=10, ge=1)
    batch_size: int = Field(default=100, gt=0, description="per process under torchrun")
    device: str = Field(default="auto", description="auto, cpu, cuda, cuda:N")
    optimizer: OptimizerConfig = OptimizerConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    layer_lr: dict[str, float] = Field(default_factory=dict, description="node name/glob -> lr multiplier")
    unfreeze_at: dict[str, int] = Field(default_factory=dict, description="node glob -> epoch it becomes trainable")
    freeze_at: dict[str, int] = Field(default_factory=dict, description="node glob -> epoch it stops training")
    init: str | None = Field(default=None, description="re-initialise fresh hidden layers: classic, xavier, he, sparse, torch")
    dropout: dict[str, float] = Field(default_factory=dict, description="node name/glob -> dropout rate after it")
    input_dropout: float = Field(default=0.0, ge=0, lt=1)
    early_stopping: EarlyStopping | None = None
    checkpoint_every: int = Field(default=0, ge=0, description="epochs between checkpoints; 0: none")
    amp: bool = Field(default=False, description="bf16 autocast (CUDA)")
    compile: bool = Field(default=False, description="torch.compile the model")
    progress: bool | None = None

    def model_post_init(self, __context: Any) -> None:
        if self.init is not None and self.init not in INIT_SCHEMES:
            raise ValueError(f"init: unknown scheme {self.init!r}; choose one of {list(INIT_SCHEMES)}")
        for k, v in self.layer_lr.items():
            if not (v >= 0 and math.isfinite(v)):
                raise ValueError(f"layer_lr[{k!r}]={v} must be a finite number >= 0")
        for k, v in self.dropout.items():
            if not 0 <= v < 1:
                raise ValueError(f"dropout[{k!r}]={v} must be in [0, 1)")
        for field in ("unfreeze_at", "freeze_at"):
            for k, v in getattr(self, field).items():
                if v < 0:
                    raise ValueError(f"{field}[{k!r}]={v} must be an epoch >= 0")


def _dist() -> tuple[int, int]:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("gloo" if not torch.cuda.is_available() else "nccl")
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def prepare_graph(graph: ModelGraph, cfg: FinetuneConfig, seed: int) -> ModelGraph:
    """The graph as fine-tuning will train it: fresh layers re-initialised, dropout placed."""
    g = graph.copy()
    gen = torch.Generator().manual_seed(seed + 7919)
    if cfg.init is not None:
        for node in g.nodes():
            if node.kind == "layer" and node.provenance.get("source") == "fresh" and node.provenance.get("init") != "zeros":
                init_weight(node.tensors["weight"], node.spec.activation, cfg.init, node.spec, gen)  # type: ignore[union-attr]
                node.provenance = {**node.provenance, "init": cfg.init}
    if cfg.dropout:
        for pat, p in cfg.dropout.items():
            if p > 0:
                g.add_dropout([n for n in g.match(pat) if g.node(n).kind == "layer" and n != g.last()], p)
    if cfg.input_dropout > 0:
        first = g.first()
        assert first is not None
        g.insert_before(first, [Node("drop_input", "dropout", p=cfg.input_dropout)])
    return g


def check_fits(graph: ModelGraph, data: Dataset) -> None:
    """Raise ``ShapeError`` unless ``data`` feeds ``graph`` and its labels fit its output."""
    shapes = graph.validate()
    if graph.input_shape is not None and not input_fits(graph.input_shape, data.input_shape):
        raise ShapeError(
            f"the network takes input {graph.input_shape} but the data {data.name!r} gives "
            f"{data.input_shape} per example; check data.flatten or the first layer's size."
        )
    last = graph.last()
    out = shapes[last] if last is not None else ()
    if len(out) != 1 or out[0] < data.num_classes:
        raise ShapeError(
            f"the network ends in {last!r} with output {out}, but the data {data.name!r} has "
            f"{data.num_classes} classes; end it with a head of {data.num_classes} units (op: head)."
        )


class Trainer:
    """Train ``graph`` on ``data`` as ``cfg`` says; ``fit()`` returns the result dict."""

    def __init__(self, graph: ModelGraph, data: Dataset, cfg: FinetuneConfig, seed: int = 0,
                 out_dir: str | Path | None = None):
        self.cfg, self.seed = cfg, seed
        self.out = Path(out_dir) if out_dir else None
        self.device = resolve_device(cfg.device)
        self.rank, self.world = _dist()
        if self.world > 1 and self.device.type == "cuda":
            self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        if self.device.type == "cpu":
            keep_freed_memory()
        check_fits(graph, data)
        self.graph = prepare_graph(graph, cfg, seed)
        self.data = data.to(self.device)
        torch.manual_seed(seed)
        self.model = self.graph.compile().to(self.device)
        self.groups = self._param_groups()
        self.opt = build_optimizer(cfg.optimizer, self.groups)
        self.net: nn.Module = self.model
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            self.net = DDP(self.model)
        if cfg.compile:
            self.net = torch.compile(self.net)  # type: ignore[assignment]
        self.shuffle = torch.Generator().manual_seed(seed)
        n = len(self.data.train)
        self.steps_per_epoch = math.ceil(n / (cfg.batch_size * self.world))
        self.total_steps = self.steps_per_epoch * cfg.epochs
        self.state: dict[str, Any] = {"epoch": 0, "step": 0, "best_valid": math.inf, "best_epoch": 0, "bad_epochs": 0}
        self.history: list[dict[str, Any]] = []
        self.best: dict[str, Tensor] | None = None
        self._xs: Tensor | None = None  # the shuffled training set, reused every epoch
        self._ys: Tensor | None = None
        self.stop_after_epoch: int | None = None  # tests: simulate a kill after this epoch

    # ------------------------------------------------------------------ groups
    def _param_groups(self) -> list[dict]:
        mods = dict(self.model.named_children())
        groups = []
        matched: set[str] = set()
        for node in self.graph.nodes():
            if node.kind != "layer":
                continue
            mult = 1.0
            for pat, m in self.cfg.layer_lr.items():
                if fnmatch.fnmatchcase(node.name, pat):
                    mult = m
                    matched.add(pat)
            groups.append({"params": list(mods[node.name].parameters()), "lr_mult": mult, "node": node.name})
        unknown = set(self.cfg.layer_lr) - matched
        if unknown:
            raise SurgeryError(f"finetune.layer_lr: {sorted(unknown)} match no layer; layers are {[g['node'] for g in groups]}.")
        for field in ("unfreeze_at", "freeze_at", "dropout"):
            for pat in getattr(self.cfg, field):
                if not any(fnmatch.fnmatchcase(g["node"], pat) for g in groups):
                    raise SurgeryError(f"finetune.{field}: {pat!r} matches no layer; layers are {[g['node'] for g in groups]}.")
        return groups

    def _apply_freezing(self, epoch: int) -> None:
        for gr in self.groups:
            node = self.graph.node(gr["node"])
            trainable = not node.frozen
            for pat, at in self.cfg.unfreeze_at.items():
                if fnmatch.fnmatchcase(node.name, pat):
                    trainable = epoch >= at
            for pat, at in self.cfg.freeze_at.items():
                if fnmatch.fnmatchcase(node.name, pat) and epoch >= at:
                    trainable = False
            for p in gr["params"]:
                p.requires_grad_(trainable)

    def _shuffled(self, x: Tensor, y: Tensor, perm: Tensor) -> tuple[Tensor, Tensor]:
        """This epoch's shuffled copy of the training set, written into the same buffers
        every epoch (a fresh copy a epoch costs page faults on all of it)."""
        if self._xs is None or self._xs.shape != x.shape:
            self._xs, self._ys = torch.empty_like(x), torch.empty_like(y)
        torch.index_select(x, 0, perm, out=self._xs)
        torch.index_select(y, 0, perm, out=self._ys)
        return self._xs, self._ys

    # --------------------------------------------------------------- evaluation
    @torch.no_grad()
    def error(self, split: str, chunk: int | None = None) -> float:
        """Classification error in percent on ``split`` (train, valid or test).

        Evaluated in chunks of ``chunk`` rows (default: 1000 on a CPU, where chunks whose
        activations stay in cache ran 1.2x faster than 10000-row ones, 10000 on a GPU)."""
        s = getattr(self.data, split)
        chunk = chunk or (1000 if self.device.type == "cpu" else 10000)
        self.model.eval()
        wrong = torch.zeros((), dtype=torch.long, device=self.device)
        for i in range(0, len(s), chunk):
            with self._autocast():
                out = self.model(s.x[i : i + chunk])
            wrong += (out.argmax(1) != s.y[i : i + chunk]).sum()
        self.model.train()
        return 100.0 * float(wrong) / max(len(s), 1)

    def _autocast(self):
        if self.cfg.amp and self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    # --------------------------------------------------------------------- fit
    def fit(self, resume: bool = False) -> dict[str, Any]:
        cfg = self.cfg
        if resume:
            self.load_checkpoint()
        x, y = self.data.train.x, self.data.train.y
        n = x.shape[0]
        B, W, r = cfg.batch_size, self.world, self.rank
        check_every = 1 if self.device.type == "cpu" else 50
        bar = progress_bar(cfg.epochs, "finetune", cfg.progress if r == 0 else False, "epoch", self.state["epoch"])
        t_run = time.perf_counter()
        self.model.train()
        while self.state["epoch"] < cfg.epochs:
            epoch = self.state["epoch"]
            self._apply_freezing(epoch)
            t0 = time.perf_counter()
            perm = torch.randperm(n, generator=self.shuffle).to(self.device)
            xs, ys = self._shuffled(x, y, perm)
            loss_sum = torch.zeros((), device=self.device)
            wrong = torch.zeros((), dtype=torch.long, device=self.device)
            seen = 0
            lr = mom = None
            scheduled = cfg.schedule.lr is not None or cfg.schedule.momentum is not None
            for s in range(self.steps_per_epoch):
                lo = s * B * W + r * B
                xb, yb = xs[lo : lo + B], ys[lo : lo + B]
                if xb.shape[0] == 0:
                    continue
                if scheduled or s == 0:  # constant lr/momentum: set once per epoch
                    lr, mom = apply_schedule(self.opt, cfg.schedule, cfg.optimizer.lr, self.state["step"],
                                             self.steps_per_epoch, self.total_steps)
                with self._autocast():
                    out = self.net(xb)
                    loss = F.cross_entropy(out if out.dtype == torch.float32 else out.float(), yb)
                self.opt.zero_grad(set_to_none=True)
                loss.backward()
                self.opt.step()
                self.state["step"] += 1
                ld = loss.detach()
                loss_sum += ld * xb.shape[0]
                wrong += (out.detach().argmax(1) != yb).sum()
                seen += xb.shape[0]
                if (s + 1) % check_every == 0 or s + 1 == self.steps_per_epoch:
                    if not bool(torch.isfinite(loss_sum)):
                        self._diverged(epoch, s)
            valid = self.error("valid")
            rec = {"epoch": epoch + 1, "train_loss": float(loss_sum) / max(seen, 1),
                   "train_error": 100.0 * float(wrong) / max(seen, 1), "valid_error": valid,
                   "lr": lr, "momentum": mom, "seconds": round(time.perf_counter() - t0, 4)}
            self.history.append(rec)
            self.state["epoch"] = epoch + 1
            improved = valid < self.state["best_valid"] - (cfg.early_stopping.min_delta if cfg.early_stopping else 0)
            if improved or self.best is None:
                self.state.update(best_valid=min(valid, self.state["best_valid"]), best_epoch=epoch + 1, bad_epochs=0)
                self.best = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
            else:
                self.state["bad_epochs"] += 1
            self._log(rec)
            bar.update(1)
            bar.set_postfix(loss=f"{rec['train_loss']:.4f}", valid=f"{valid:.2f}%")
            stop = cfg.early_stopping is not None and self.state["bad_epochs"] >= cfg.early_stopping.patience
            if cfg.checkpoint_every and (self.state["epoch"] % cfg.checkpoint_every == 0 or stop):
                self.save_checkpoint()
            if stop:
                break
            if self.stop_after_epoch is not None and self.state["epoch"] >= self.stop_after_epoch:
                bar.close()
                raise KeyboardInterrupt(f"stopped after epoch {self.state['epoch']} (test hook)")
        bar.close()
        if self.best is not None:
            self.model.load_state_dict(self.best)
        self.graph.load_module_state(self.model)
        # Only the test split needs a new pass: the best epoch's validation error is known,
        # and its training error is the running one measured while training.
        best_rec = self.history[self.state["best_epoch"] - 1] if self.history else {}
        result = {
            "test_error": self.error("test"),
            "valid_error": best_rec.get("valid_error", self.state["best_valid"]),
            "train_error": best_rec.get("train_error"),
            "epochs": self.state["epoch"],
            "best_epoch": self.state["best_epoch"],
            "steps": self.state["step"],
            "seconds": round(time.perf_counter() - t_run, 3),
            "device": str(self.device),
            "world_size": self.world,
            "seed": self.seed,
            "versions": {"torch": torch.__version__, "surgery": package_version()},
        }
        if self.out is not None and self.rank == 0:
            write_json(self.out / "result.json", result)
            self.graph.save(self.out / "model.safetensors", {"result": result})
        return result

    def _log(self, rec: dict[str, Any]) -> None:
        if self.out is None or self.rank != 0:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        # Rewrite the whole file atomically: JSONL stays consistent with the checkpoint.
        with atomic_path(self.out / "metrics.jsonl") as tmp:
            tmp.write_text("".join(json.dumps(h) + "\n" for h in self.history))

    def _diverged(self, epoch: int, step: int) -> None:
        where = f"{self.out / 'checkpoints'}" if self.out else "no checkpoint directory"
        raise TrainingDiverged(
            f"the training loss became NaN or infinite in epoch {epoch + 1}, step {step + 1} "
            f"(global step {self.state['step']}). The last good checkpoint is kept ({where}). "
            "Lower finetune.optimizer.lr, add a schedule, or check the input data for NaNs."
        )

    # -------------------------------------------------------------- checkpoints
    def ckpt_path(self) -> Path:
        if self.out is None:
            raise SurgeryError("checkpoints need an output directory (--out DIR).")
        return self.out / "checkpoints" / "last.safetensors"

    def save_checkpoint(self) -> Path | None:
        if self.rank != 0:
            return None
        path = self.ckpt_path()
        t: dict[str, Tensor] = {f"model.{k}": v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()}
        if self.best is not None:
            t.update({f"best.{k}": v.detach().cpu().contiguous() for k, v in self.best.items()})
        osd = self.opt.state_dict()
        scalars: dict[str, Any] = {}
        for pid, st in osd["state"].items():
            for k, v in st.items():
                if isinstance(v, Tensor):
                    t[f"opt.{pid}.{k}"] = v.detach().cpu().contiguous()
                else:
                    scalars[f"{pid}.{k}"] = v
        t["rng.cpu"] = torch.get_rng_state()
        t["rng.shuffle"] = self.shuffle.get_state()
        if self.device.type == "cuda":
            t["rng.cuda"] = torch.cuda.get_rng_state(self.device)
        meta = {"state": self.state, "history": self.history, "opt_groups": osd["param_groups"],
                "opt_scalars": scalars, "config": self.cfg.model_dump(mode="json")}
        with atomic_path(path) as tmp:
            save_file(t, str(tmp), metadata={"surgery.checkpoint": json.dumps(meta, default=float)})
        return path

    def load_checkpoint(self) -> None:
        path = self.ckpt_path()
        if not path.is_file():
            raise SurgeryError(f"--resume: no checkpoint at {path}; run without --resume, or set finetune.checkpoint_every.")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = json.loads((f.metadata() or {})["surgery.checkpoint"])
                t = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:
            raise ManifestError(f"{path}: unreadable checkpoint ({type(e).__name__}: {e}).") from e
        try:
            self.model.load_state_dict({k[6:]: v for k, v in t.items() if k.startswith("model.")})
        except RuntimeError as e:
            raise ManifestError(f"{path}: the checkpoint does not fit this model (was the recipe changed?): {str(e).splitlines()[0]}") from e
        best = {k[5:]: v.to(self.device) for k, v in t.items() if k.startswith("best.")}
        self.best = best or None
        state: dict[int, dict[str, Any]] = {}
        for k, v in t.items():
            if k.startswith("opt."):
                _, pid, key = k.split(".", 2)
                state.setdefault(int(pid), {})[key] = v.to(self.device)
        for k, v in meta["opt_scalars"].items():
            pid, key = k.split(".", 1)
            state.setdefault(int(pid), {})[key] = v
        self.opt.load_state_dict({"state": state, "param_groups": meta["opt_groups"]})
        torch.set_rng_state(t["rng.cpu"])
        self.shuffle.set_state(t["rng.shuffle"])
        if "rng.cuda" in t and self.device.type == "cuda":
            torch.cuda.set_rng_state(t["rng.cuda"], self.device)
        self.state = meta["state"]
        self.history = meta["history"]
