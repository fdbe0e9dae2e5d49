"""Fine-tuning: the training loop, for one network or a population of K trained together.

One loop (:class:`TrainingLoop`) walks the epochs for K >= 1 members: it trains an epoch
through an engine, validates, keeps each member's best weights, stops each member on its
own early-stopping rule, and writes each member's ``metrics.jsonl``, ``result.json`` and
``model.safetensors``. The engine is the kernel under it: :class:`ModuleEngine` for one
network of any shape (the :class:`Trainer`, a population of one, with checkpoints, DDP
under ``torchrun`` and CUDA graphs) or :class:`surgery.population.StackedEngine` for K
dense chains as one batched program (the :class:`PopulationTrainer`). A resumed run
equals an uninterrupted one on the CPU; under ``torchrun`` only rank 0 writes.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from .checkpoint import MEMBER_CHECKPOINT, Checkpoint, read_checkpoint, save_checkpoint
from .configs import DATA, GRAPH, as_config, require
from .dataset import Dataset
from .errors import CheckpointError, ConfigError, TrainingDiverged
from .finetune_config import FinetuneConfig
from .graph import ModelGraph
from .io import Pace, atomic_path, duration, progress_bar, progress_line, write_json
from .model_file import save_model
from .module_engine import ModuleEngine
from .population import StackedEngine
from .version import package_version

__all__ = ["FinetuneConfig", "ModuleEngine", "PopulationTrainer", "Trainer", "TrainingLoop"]


class Engine(Protocol):
    """What the loop needs of a kernel that trains K members (see :class:`ModuleEngine`)."""

    K: int
    rank: int
    world: int
    device: torch.device
    data: Dataset

    def train_epoch(self, epoch: int, step: int) -> tuple[list[dict[str, Any]], int]:
        """Train epoch ``epoch`` (from 0) from global ``step``: each member's record, the new step."""

    def errors(self, split: str, chunk: int | None = None) -> list[float]:
        """Each member's classification error in percent on ``split``."""

    def keep_best(self, k: int) -> None:
        """Remember member ``k``'s weights as they are now as its best."""

    def stop(self, k: int) -> None:
        """Member ``k`` trains no more (its weights stand still)."""

    def restore_best(self) -> None:
        """Every member's best weights back in place."""

    def member_graph(self, k: int) -> ModelGraph:
        """Member ``k``'s graph holding its weights as they are now."""

    def weights(self, k: int) -> dict[str, Tensor]:
        """Member ``k``'s weights by parameter name, on the CPU."""


# record(k, result): member k's result as it is returned and written (e.g. with what an
# experiment knows of the cell added), so result.json is written once, whole.
Record = Callable[[int, dict[str, Any]], dict[str, Any]]


class TrainingLoop:
    """Epochs, early stopping, best weights, results and files for the K members of
    ``engine``, member k with ``cfgs[k]``, ``seeds[k]`` and output directory ``outs[k]``;
    ``record`` (optional) completes each member's result before it is written, and
    ``provenance[k]`` (optional) is what member k's ``model.safetensors`` records of how it
    was made beside its result (e.g. ``{"recipe": ...}``).

    With an empty validation split (``data.valid_size: 0``: train on every training
    example) there is nothing to choose an epoch by: each member keeps its last epoch's
    weights, its ``valid_error`` is ``None``, and early stopping is refused."""

    def __init__(self, engine: Engine, cfgs: list[FinetuneConfig], seeds: list[int],
                 outs: list[str | Path | None], record: Record | None = None,
                 provenance: list[dict[str, Any] | None] | None = None):
        self.engine, self.cfgs, self.seeds, self.cfg, self.record = engine, cfgs, seeds, cfgs[0], record
        self.provenance = provenance or [None] * len(cfgs)
        self.outs = [Path(o) if o else None for o in outs]
        self.epoch, self.step = 0, 0
        self.histories: list[list[dict[str, Any]]] = [[] for _ in cfgs]
        self.marks = [{"best_valid": math.inf, "best_epoch": 0, "bad_epochs": 0, "steps": 0} for _ in cfgs]
        self.running = [True] * len(cfgs)
        self.validates = len(engine.data.valid) > 0
        if not self.validates and any(c.early_stopping is not None for c in cfgs):
            raise ConfigError("finetune.early_stopping: stopping early needs a validation split, but this data has "
                              "none (data.valid_size: 0). Remove early_stopping (training then keeps its last "
                              "epoch's weights) or keep validation examples.")

    @property
    def device(self) -> torch.device:
        """Where the members train."""
        return self.engine.device

    def run_epoch(self) -> list[dict[str, Any] | None]:
        """Train one epoch and validate: each member's record (not yet booked; None for a
        member that has stopped)."""
        t0 = time.perf_counter()
        try:
            recs, step = self.engine.train_epoch(self.epoch, self.step)
        except TrainingDiverged as e:
            raise TrainingDiverged(f"{e}. {self._diverged_advice()}") from None
        for k, m in enumerate(self.marks):
            m["steps"] += (step - self.step) if self.running[k] else 0
        self.step = step
        valid = self.engine.errors("valid") if self.validates else [None] * self.engine.K
        seconds = round(time.perf_counter() - t0, 4)
        return [{"epoch": self.epoch + 1, **rec, "valid_error": v, "seconds": seconds} if run else None
                for rec, v, run in zip(recs, valid, self.running)]

    def _diverged_advice(self) -> str:
        return "Lower finetune.optimizer.lr, add a schedule, or check the input data for NaNs."

    def book(self, k: int, rec: dict[str, Any]) -> bool:
        """Record member ``k``'s epoch (history, best weights); returns whether its early
        stopping says to stop."""
        es, m = self.cfgs[k].early_stopping, self.marks[k]
        self.histories[k].append(rec)
        valid = rec["valid_error"]
        if valid is None:  # no validation split: the last epoch is the one kept (see _finish)
            m.update(best_epoch=rec["epoch"])
            return False
        if valid < m["best_valid"] - (es.min_delta if es else 0) or m["best_epoch"] == 0:
            m.update(best_valid=min(valid, m["best_valid"]), best_epoch=rec["epoch"], bad_epochs=0)
            self.engine.keep_best(k)
        else:
            m["bad_epochs"] += 1
        return es is not None and m["bad_epochs"] >= es.patience

    def after_epoch(self, recs: list[dict[str, Any] | None], stopping: bool) -> None:
        """Hook after an epoch is booked (the Trainer checkpoints and calls back here)."""

    def fit_members(self) -> list[dict[str, Any]]:
        """Train until the budget is spent or every member has stopped; each member keeps
        its best epoch's weights. Returns one result dict per member (test/valid/train
        error, epochs, best epoch, steps, seconds, device, versions)."""
        K, rank0 = self.engine.K, self.engine.rank == 0
        label = "finetune" if K == 1 else f"population of {K}"
        bar = progress_bar(self.cfg.epochs, label, self.cfg.progress if rank0 else False, "epoch", self.epoch)
        t_run = time.perf_counter()
        try:
            while self.epoch < self.cfg.epochs and any(self.running):
                recs = self.run_epoch()
                self.epoch += 1
                stops = [k for k, rec in enumerate(recs) if rec is not None and self.book(k, rec)]
                for k in stops:
                    self.running[k] = False
                    self.engine.stop(k)
                self._log()
                self.after_epoch(recs, bool(stops))
                bar.update(1)
                best = min(m["best_valid"] for m in self.marks)
                loss = [r["train_loss"] for r in recs if r is not None]
                bar.set_postfix(loss=f"{min(loss):.4f}" if loss else "-",
                                valid=f"{best:.2f}%" if self.validates else "-",
                                **({"running": sum(self.running)} if K > 1 else {}))
        finally:
            bar.close()
        return self._finish(time.perf_counter() - t_run)

    def _finish(self, seconds: float) -> list[dict[str, Any]]:
        if not self.validates:  # the weights as they are now are the ones kept, copied once
            for k in range(self.engine.K):
                self.engine.keep_best(k)
        self.engine.restore_best()
        # Only the test split needs a new pass: the best epoch's validation error is known,
        # and its training error is the running one measured while training.
        test = self.engine.errors("test")
        results = []
        for k, (hist, m) in enumerate(zip(self.histories, self.marks)):
            best = hist[m["best_epoch"] - 1] if hist else {}
            valid = best.get("valid_error", m["best_valid"] if self.validates else None)
            result = {
                "test_error": test[k], "valid_error": valid,
                "train_error": best.get("train_error"), "epochs": len(hist), "best_epoch": m["best_epoch"],
                "steps": m["steps"], "seconds": round(seconds, 3), "device": str(self.engine.device),
                "world_size": self.engine.world, "seed": self.seeds[k], **self._extra(),
                "versions": {"torch": torch.__version__, "surgery": package_version()},
            }
            result = self.record(k, result) if self.record is not None else result
            out = self.outs[k]
            if out is not None and self.engine.rank == 0:
                made = {"result": result, **(self.provenance[k] or {})}
                save_model(self.engine.member_graph(k), out / "model.safetensors", made)
                write_json(out / "result.json", result)  # last: its presence marks the member finished
            results.append(result)
        return results

    def _extra(self) -> dict[str, Any]:
        return {}

    def _log(self) -> None:
        if self.engine.rank != 0:
            return
        for out, hist in zip(self.outs, self.histories):
            if out is not None:  # rewritten whole, atomically: consistent with the checkpoint
                (out / "result.json").unlink(missing_ok=True)  # a run's trained here before: stale until this ends
                with atomic_path(out / "metrics.jsonl") as tmp:
                    tmp.write_text("".join(json.dumps(h) + "\n" for h in hist), encoding="utf-8")


EpochCallback = Callable[["Trainer", dict[str, Any]], None]


class EpochLog:
    """An ``on_epoch_end`` for a single run: a line per epoch on stderr where its bar is
    hidden only because stderr is no terminal (``nohup``, a job log), e.g. ``finetune: epoch
    3/100: loss 0.0812, train 2.31%, valid 2.65% (best 2.60% at epoch 2), 4.8 s; about 8 min
    left`` (``at most about`` with early stopping, which may end it sooner). An experiment's
    cells say their line when they end instead."""

    def __init__(self, cfg: FinetuneConfig):
        self.cfg, self.pace = cfg, None

    def __call__(self, trainer: Trainer, rec: dict[str, Any]) -> None:
        if trainer.engine.rank != 0:  # under torchrun the other ranks are the same run
            return
        if self.pace is None:  # a resumed run's pace counts from where it continued
            self.pace = Pace(self.cfg.epochs, rec["epoch"] - 1, "epochs")
        left = self.pace.add().left()
        if left and self.cfg.early_stopping is not None:  # the budget's end; early stopping may come first
            left = left.replace("about ", "at most about ", 1)
        valid = [(h["valid_error"], h["epoch"]) for h in trainer.history if h.get("valid_error") is not None]
        errors = f"train {rec['train_error']:.2f}%"
        if valid:
            best = min(valid)
            errors += f", valid {rec['valid_error']:.2f}% (best {best[0]:.2f}% at epoch {best[1]})"
        progress_line(self.cfg.progress, f"finetune: epoch {rec['epoch']}/{self.cfg.epochs}: loss "
                                         f"{rec['train_loss']:.4g}, {errors}, {duration(rec['seconds'])}"
                                         + (f"; {left}" if left else ""))


class Trainer(TrainingLoop):
    """Train ``graph`` on ``data`` as ``cfg`` says; ``fit()`` returns the result dict.

    The loop with a :class:`ModuleEngine`: a population of one. ``on_epoch_end(trainer,
    record)`` runs after every epoch's bookkeeping (the record is in ``history`` and any
    checkpoint is written), e.g. to log, or to stop a run. ``record(0, result)`` completes
    the result before it is returned and written; ``provenance`` goes into the model file
    beside it (e.g. ``{"recipe": recipe.to_dict()}``). Building one seeds torch's default
    generators with ``seed`` (dropout draws from them; see :class:`ModuleEngine`)."""

    def __init__(self, graph: ModelGraph, data: Dataset, cfg: FinetuneConfig | dict[str, Any] | None = None,
                 seed: int = 0, out_dir: str | Path | None = None, on_epoch_end: EpochCallback | None = None,
                 record: Record | None = None, provenance: dict[str, Any] | None = None):
        require(graph, ModelGraph, "surgery.Trainer(graph, ...)", GRAPH)
        require(data, Dataset, "surgery.Trainer(graph, data)", DATA)
        cfg = FinetuneConfig() if cfg is None else as_config(cfg, FinetuneConfig, "surgery.Trainer(cfg)")
        self.engine: ModuleEngine = ModuleEngine(graph, data, cfg, seed)
        super().__init__(self.engine, [cfg], [seed], [out_dir], record, [provenance])
        self.seed, self.out, self.on_epoch_end = seed, self.outs[0], on_epoch_end

    @property
    def model(self) -> nn.Module:
        """The network being trained."""
        return self.engine.model

    @property
    def history(self) -> list[dict[str, Any]]:
        """One record per epoch so far."""
        return self.histories[0]

    def error(self, split: str, chunk: int | None = None) -> float:
        """Classification error in percent on ``split`` (train, valid or test)."""
        return self.engine.errors(split, chunk)[0]

    def fit(self, resume: bool = False) -> dict[str, Any]:
        """Train until ``cfg.epochs`` (or early stopping), keep the best epoch's weights,
        write results when there is an output directory; returns the result dict.
        ``resume``: continue from the checkpoint in the output directory."""
        if resume:
            self.load_checkpoint()
        self.engine.model.train()
        return self.fit_members()[0]

    def _diverged_advice(self) -> str:
        where = self.out / "checkpoints" if self.out else "no checkpoint directory"
        return f"The last good checkpoint is kept ({where}). {super()._diverged_advice()}"

    def after_epoch(self, recs: list[dict[str, Any] | None], stopping: bool) -> None:
        """Checkpoint when due (and at an early stop), then call ``on_epoch_end``."""
        every = self.cfg.checkpoint_every
        if every and (self.epoch % every == 0 or stopping):
            self.save_checkpoint()
        if self.on_epoch_end is not None and recs[0] is not None:
            self.on_epoch_end(self, recs[0])

    def ckpt_path(self) -> Path:
        """Where this run's checkpoint lives (``OUT/checkpoints/last.safetensors``)."""
        if self.out is None:
            raise ConfigError("checkpoints need an output directory (--out DIR).")
        return self.out / "checkpoints" / "last.safetensors"

    def save_checkpoint(self) -> Path | None:
        """Write the checkpoint (rank 0 only); returns its path."""
        if self.engine.rank != 0:
            return None
        m = self.marks[0]
        state = {"epoch": self.epoch, "step": self.step, "best_valid": m["best_valid"],
                 "best_epoch": m["best_epoch"], "bad_epochs": m["bad_epochs"]}
        meta = {"state": state, "history": self.history, "config": self.cfg.model_dump(mode="json")}
        ck: Checkpoint = self.engine.checkpoint(meta)
        return save_checkpoint(self.ckpt_path(), ck)

    def load_checkpoint(self) -> None:
        """Continue from the checkpoint: weights, best weights, optimizer, RNG, history.
        ``CheckpointError`` when it is missing, corrupt, or made for another network."""
        path = self.ckpt_path()
        ck = read_checkpoint(path)
        self.engine.restore(path, ck)
        st = ck.meta["state"]
        self.epoch, self.step = st["epoch"], st["step"]
        self.marks[0].update(best_valid=st["best_valid"], best_epoch=st["best_epoch"], bad_epochs=st["bad_epochs"],
                             steps=st["step"])
        self.histories[0] = ck.meta["history"]
        es = self.cfg.early_stopping
        self.running[0] = not (es is not None and st["bad_epochs"] >= es.patience)


class PopulationTrainer(TrainingLoop):
    """Fine-tune ``graphs[k]`` with ``cfgs[k]`` and ``seeds[k]`` on ``data``, together, as
    one batched program (:class:`surgery.population.StackedEngine`); ``fit()`` returns one
    result dict per model, as :meth:`Trainer.fit` would for each alone, and writes member
    k's files under ``out_dirs[k]`` when given. ``stacked``: one ``bmm`` per layer (default:
    on a GPU) or a loop of GEMMs. ``record`` and ``provenance`` as for :class:`TrainingLoop`."""

    def __init__(self, graphs: list[ModelGraph], data: Dataset, cfgs: list[FinetuneConfig], seeds: list[int],
                 stacked: bool | None = None, out_dirs: list[str | Path | None] | None = None,
                 record: Record | None = None, provenance: list[dict[str, Any] | None] | None = None):
        sizes = [len(graphs), len(cfgs), len(seeds), len(out_dirs or graphs), len(provenance or graphs)]
        if len(set(sizes)) != 1 or not graphs:
            raise ConfigError(f"a population needs as many configs, seeds, output directories and provenances as "
                              f"graphs (at least one); got {', '.join(map(str, sizes))}.")
        for k, g in enumerate(graphs):
            require(g, ModelGraph, f"surgery.PopulationTrainer(graphs[{k}])", GRAPH)
        require(data, Dataset, "surgery.PopulationTrainer(graphs, data)", DATA)
        seen: dict[Path, int] = {}
        for k, d in enumerate(out_dirs or []):
            if d is not None and (j := seen.setdefault(Path(d).resolve(), k)) != k:
                raise ConfigError(f"surgery.PopulationTrainer(out_dirs): members {j} and {k} both write to {d}; each "
                                  "member's files (result.json, model, checkpoints) need a directory of their own.")
        cfgs = [as_config(c, FinetuneConfig, f"surgery.PopulationTrainer(cfgs[{k}])") for k, c in enumerate(cfgs)]
        self.engine: StackedEngine = StackedEngine(graphs, data, cfgs, seeds, stacked)
        super().__init__(self.engine, cfgs, seeds, list(out_dirs) if out_dirs else [None] * len(graphs), record,
                         provenance)

    def fit(self) -> list[dict[str, Any]]:
        """Train every model for the shared budget (each stops on its own early-stopping
        rule); returns one result dict per model, its best epoch's weights kept."""
        return self.fit_members()

    def member_ckpt_path(self, k: int) -> Path:
        """Where member ``k``'s checkpoint lives (``OUT/checkpoints/member.safetensors``)."""
        out = self.outs[k]
        if out is None:
            raise ConfigError("checkpoints need an output directory for every population member.")
        return out / "checkpoints" / MEMBER_CHECKPOINT

    def after_epoch(self, recs: list[dict[str, Any] | None], stopping: bool) -> None:
        """Checkpoint each member whose ``finetune.checkpoint_every`` is due (and one that
        has just stopped early): its own slice of the population, so a rerun continues it."""
        for k, cfg in enumerate(self.cfgs):
            every = cfg.checkpoint_every
            if every and self.outs[k] is not None and (self.epoch % every == 0 or
                                                       (stopping and recs[k] is not None and not self.running[k])):
                self._save_member(k)

    def _save_member(self, k: int) -> Path:
        m = self.marks[k]
        state = {"epoch": self.epoch, "step": self.step, "running": self.running[k],
                 **{key: m[key] for key in ("best_valid", "best_epoch", "bad_epochs", "steps")}}
        tensors = self.engine.member_state(k)
        rng = {name[4:]: tensors.pop(name) for name in [n for n in tensors if n.startswith("rng.")]}
        meta = {"state": state, "history": self.histories[k], "config": self.cfgs[k].model_dump(mode="json")}
        return save_checkpoint(self.member_ckpt_path(k), Checkpoint(tensors, None, {"state": {}, "param_groups": []},
                                                                    rng, meta))

    def resume(self) -> int:
        """Continue every member from its checkpoint (all written after the same epoch, by
        this population or another); returns that epoch. ``CheckpointError`` naming the
        file when one is missing, unreadable or made for another network."""
        cks = [read_checkpoint(self.member_ckpt_path(k)) for k in range(self.engine.K)]
        where = [self.member_ckpt_path(k) for k in range(self.engine.K)]
        try:
            at = {(ck.meta["state"]["epoch"], ck.meta["state"]["step"]) for ck in cks}
        except (KeyError, TypeError) as e:
            raise CheckpointError(f"{where[0].parent}: a member checkpoint without its loop state ({e})") from None
        if len(at) != 1:
            raise CheckpointError(f"{where[0]}: the members' checkpoints were written after different epochs "
                                  f"({sorted(a[0] for a in at)})")
        for k, ck in enumerate(cks):
            self.engine.load_member_state(k, {**ck.model, **{f"rng.{n}": t for n, t in ck.rng.items()}}, str(where[k]))
            st = ck.meta["state"]
            self.marks[k].update({key: st[key] for key in ("best_valid", "best_epoch", "bad_epochs", "steps")})
            self.histories[k], self.running[k] = ck.meta["history"], bool(st["running"])
            if not self.running[k]:
                self.engine.stop(k)
        (self.epoch, self.step), = at
        return self.epoch

    def weights(self, k: int) -> dict[str, Tensor]:
        """Model ``k``'s weights by node name (``<node>.weight``, ``<node>.bias``), on the CPU."""
        return self.engine.weights(k)

    def _extra(self) -> dict[str, Any]:
        return {"population": self.engine.K}
