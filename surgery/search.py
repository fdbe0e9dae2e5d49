"""Hyperparameter search over recipe fields with Optuna.

A ``search:`` section maps dotted recipe paths to ranges; each trial sets them, runs the
recipe (pretrain -> surgery -> finetune) and reports the validation error. TPE by
default, a Gaussian-process sampler on request. The default storage is a SQLite file in
the output directory; any Optuna RDB URL lets several workers share one study.
"""

from __future__ import annotations

import copy
import os
import socket
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from .io import write_json, write_text


class ParamRange(BaseModel):
    """``{type: float, low, high, log}`` | ``{type: int, low, high}`` | ``{type: categorical, choices}``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["float", "int", "categorical"] = "float"
    low: float | None = None
    high: float | None = None
    log: bool = False
    choices: list[Any] | None = None

    @model_validator(mode="after")
    def _check(self) -> ParamRange:
        if self.type == "categorical":
            if not self.choices:
                raise ValueError("a categorical parameter needs a non-empty choices list")
        else:
            if self.low is None or self.high is None:
                raise ValueError(f"a {self.type} parameter needs low and high")
            if self.low >= self.high:
                raise ValueError(f"low={self.low} must be below high={self.high}")
            if self.log and self.low <= 0:
                raise ValueError(f"log scale needs low > 0 (got {self.low})")
        return self


class SearchConfig(BaseModel):
    """The ``search:`` recipe section."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    params: dict[str, ParamRange] = Field(min_length=1, description="dotted recipe path -> range")
    trials: int = Field(default=20, ge=1)
    sampler: Literal["tpe", "gp", "random"] = "tpe"
    study: str | None = Field(default=None, description="study name (default: the recipe's name)")

    @model_validator(mode="after")
    def _paths(self) -> SearchConfig:
        for k in self.params:
            if k.split(".")[0] not in ("data", "pretrain", "surgery", "finetune"):
                raise ValueError(f"params[{k!r}]: search paths start with data, pretrain, surgery or finetune")
        return self


def _sampler(name: str, seed: int) -> Any:
    import optuna

    if name == "gp":
        return optuna.samplers.GPSampler(seed=seed)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed)


def _open_study(name: str, url: str, sampler: Any) -> Any:
    """Create or join a study; workers starting together may race to create the schema,
    so a failed attempt is retried after a short random wait."""
    import random
    import time

    import optuna
    from sqlalchemy.exc import SQLAlchemyError

    from .errors import SurgeryError

    last: Exception | None = None
    for _ in range(8):
        try:
            storage: Any = url
            if url.startswith("sqlite"):
                # wait for the writer lock instead of failing at once when workers share a file
                storage = optuna.storages.RDBStorage(url, engine_kwargs={"connect_args": {"timeout": 60}})
            return optuna.create_study(study_name=name, storage=storage, direction="minimize", sampler=sampler,
                                       load_if_exists=True)
        except (SQLAlchemyError, optuna.exceptions.StorageInternalError) as e:
            last = e
            time.sleep(0.2 + random.random())
    raise SurgeryError(f"--storage {url}: cannot open the study ({type(last).__name__}: {str(last).splitlines()[0]}).")


def run_search(recipe: Any, out: str | Path, trials: int | None = None, storage: str | None = None,
               progress: bool | None = None) -> dict[str, Any]:
    """Run (or join) the study; write best.yaml and search.json under ``out``."""
    import optuna

    from .errors import SurgeryError, TrainingDiverged
    from .pipeline import run
    from .recipe import apply_overrides, recipe_from_dict

    cfg: SearchConfig | None = recipe.search
    if cfg is None:
        raise SurgeryError(f"{recipe._source}: the recipe has no search: section.")
    if recipe.finetune is None:
        raise SurgeryError("search: the objective is the validation error, so the recipe needs a finetune: section.")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    storage = storage or f"sqlite:///{(out / 'search.db').resolve()}"
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    name = cfg.study or recipe.name
    # Each worker draws its own sampler seed, so workers sharing a study do not repeat trials.
    worker = f"{socket.gethostname()}:{os.getpid()}"
    study = _open_study(name, storage, _sampler(cfg.sampler, recipe.seed + os.getpid()))
    base = recipe.to_dict()
    base.pop("search", None)

    def objective(trial: optuna.Trial) -> float:
        values: dict[str, Any] = {}
        for path, pr in cfg.params.items():
            if pr.type == "categorical":
                values[path] = trial.suggest_categorical(path, pr.choices)  # type: ignore[arg-type]
            elif pr.type == "int":
                values[path] = trial.suggest_int(path, int(pr.low), int(pr.high), log=pr.log)  # type: ignore[arg-type]
            else:
                values[path] = trial.suggest_float(path, pr.low, pr.high, log=pr.log)  # type: ignore[arg-type]
        trial.set_user_attr("worker", worker)
        data = apply_overrides(copy.deepcopy(base), values)
        r = recipe_from_dict(data, recipe.base_dir, f"{recipe._source} [trial {trial.number}]")
        try:
            res = run(r, out / "trials" / f"{trial.number:04d}-{os.getpid()}", progress=progress)
        except TrainingDiverged:
            return 100.0
        trial.set_user_attr("test_error", res["test_error"])
        return float(res["valid_error"])

    study.optimize(objective, n_trials=trials or cfg.trials)
    best = study.best_trial
    best_recipe = apply_overrides(copy.deepcopy(recipe.to_dict()), dict(best.params))
    best_recipe.pop("search", None)
    write_text(out / "best.yaml", f"# best of study {name!r}: trial {best.number}, valid error {best.value:.3f}%\n"
               + yaml.safe_dump(best_recipe, sort_keys=False))
    summary = {
        "study": name,
        "storage": storage,
        "best_value": best.value,
        "best_params": best.params,
        "best_trial": best.number,
        "trials": [{"number": t.number, "value": t.value, "params": t.params, "worker": t.user_attrs.get("worker"),
                    "state": t.state.name} for t in study.trials],
    }
    write_json(out / "search.json", summary)
    return summary
