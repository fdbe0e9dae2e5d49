"""Hyperparameter search over recipe fields with Optuna.

A ``search:`` section maps dotted recipe paths to ranges; each trial sets them, runs the
recipe (pretrain -> surgery -> finetune) and reports the validation error. TPE by
default, a Gaussian-process sampler on request. The default storage is a SQLite file in
the output directory; any Optuna RDB URL lets several workers share one study.
"""

from __future__ import annotations

import copy
import os
import random
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from .data import load_dataset
from .dataset import Dataset
from .devices import resolve_device
from .errors import SurgeryError, TrainingDiverged
from .grid import check_search
from .io import make_dir, progress_line, write_json, write_text
from .lock import alive
from .outdirs import check_own_out
from .pipeline import run, run_batch
from .planning import plan_network
from .provenance import COMMANDS_FILE, device_label, recording
from .recipe import Recipe, recipe_from_dict
from .recipe_text import apply_overrides
from .search_config import ParamRange, SearchConfig
from .weights_io import first_line

# Optuna (and SQLAlchemy under it) is imported where a search starts: it costs about a
# second, and `import surgery` should not pay it.

# A trial whose loss diverged is told the worst possible error, so that TPE ranks its region
# last and draws less from it (a failed trial would be ignored and its region sampled again);
# it is marked ``diverged`` in search.json and never written as the best recipe.
DIVERGED_SCORE = 100.0


def make_sampler(name: str, seed: int) -> Any:
    """An Optuna sampler by name (``tpe``, ``gp``, ``random``), seeded."""
    import optuna

    if name == "gp":
        return optuna.samplers.GPSampler(seed=seed)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed)


def suggest(trial: Any, params: dict[str, ParamRange]) -> dict[str, Any]:
    """One value per dotted path, drawn by an Optuna trial from its range."""
    values: dict[str, Any] = {}
    for path, pr in params.items():
        if pr.type == "categorical":
            values[path] = trial.suggest_categorical(path, pr.choices)
        elif pr.type == "int":
            values[path] = trial.suggest_int(path, int(pr.low), int(pr.high), log=pr.log)  # type: ignore[arg-type]
        else:
            values[path] = trial.suggest_float(path, pr.low, pr.high, log=pr.log)  # type: ignore[arg-type]
    return values


def _why(e: Exception) -> str:
    return f"{type(e).__name__}: {first_line(e)}"


def _open_study(name: str, url: str, sampler: Any) -> tuple[Any, Any]:
    """Create or join a study: the study and its storage, which :func:`_close` closes; workers
    starting together may race to create the schema, so a failed attempt is retried after a
    short random wait."""
    import optuna
    from sqlalchemy.exc import ArgumentError, SQLAlchemyError
    from sqlalchemy.pool import NullPool

    # SQLite: wait for the writer lock instead of failing at once when workers share a file,
    # and keep no connection open between uses (a pool's would hold the file open; NullPool's
    # are closed when a session ends, also when opening a damaged file fails)
    kwargs = {"connect_args": {"timeout": 60}, "poolclass": NullPool} if url.startswith("sqlite") else {}
    last: Exception | None = None
    for _ in range(8):
        storage = None
        try:
            storage = optuna.storages.RDBStorage(url, engine_kwargs=kwargs)
            return optuna.create_study(study_name=name, storage=storage, direction="minimize", sampler=sampler,
                                       load_if_exists=True), storage
        except (ImportError, ValueError, ArgumentError) as e:  # no driver for its database, a storage gone, no URL
            raise SurgeryError(f"--storage {url}: cannot open the study ({_why(e)}); give an SQLAlchemy URL "
                               "whose database driver is installed (sqlite:///PATH needs none; postgresql:// needs "
                               "psycopg2, mysql:// pymysql), or leave --storage out for a file under --out.") from None
        except (SQLAlchemyError, optuna.exceptions.StorageInternalError) as e:
            if "not a database" in str(e):
                raise SurgeryError(f"--storage {url}: cannot open the study ({_why(e)}): the file is damaged. Move "
                                   "it away to start the study anew (search.json beside it lists the trials it held), "
                                   "or give another --out or --storage.") from None
            last = e  # a race with another worker creating the schema, or a database not up yet: tried again
            _close(storage)
            time.sleep(0.2 + random.random())
    assert last is not None
    raise SurgeryError(f"--storage {url}: cannot open the study ({_why(last)}); check that the database is "
                       "reachable and the URL right (sqlite:///PATH, postgresql://...), or leave --storage out for a "
                       "file under --out.")



def _close(storage: Any) -> None:
    """Close the storage's database connections: the pool would hold them (and the file,
    which Windows then cannot move or delete) until the process ends."""
    if storage is not None:
        storage.remove_session()
        storage.engine.dispose()


def shown(values: dict[str, Any], skip: list[str] | tuple[str, ...] = ()) -> str:
    """A trial's values for a log line: ``a.b=0.0123, c=10`` (floats to 3 significant digits)."""
    return ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items()
                     if k not in skip)


def _score(trial: Any, values: dict[str, Any], res: dict[str, Any] | None, progress: bool | None) -> float:
    """The value to tell Optuna for a finished run (``None``: it diverged); logs one line."""
    if res is None:
        trial.set_user_attr("diverged", True)
        progress_line(progress, f"search: trial {trial.number + 1} {shown(values)}: diverged "
                                f"(scored {DIVERGED_SCORE:g}%)")
        return DIVERGED_SCORE
    trial.set_user_attr("test_error", res["test_error"])
    progress_line(progress, f"search: trial {trial.number + 1} {shown(values)}: valid {res['valid_error']:.2f}%")
    return float(res["valid_error"])


def seeded_suggest(study: Any, trial: Any, cfg: SearchConfig, seed: int) -> dict[str, Any]:
    """``trial``'s values, drawn by a sampler seeded with the recipe's ``seed`` and the trial's
    number (each trial of a study has its own): a search run again draws the same values
    from the same history, and workers sharing a study do not repeat one another's draws
    (a sampler seeded once per worker would need the workers' seeds to differ, and then no
    run could be repeated)."""
    study.sampler = make_sampler(cfg.sampler, seed * 100_003 + trial.number)
    return suggest(trial, cfg.params)


def _trial_recipe(base: dict[str, Any], values: dict[str, Any], recipe: Recipe, trial: Any,
                  out: Path) -> tuple[Recipe, Path]:
    """One trial's recipe (``base`` with its ``values``) and its run directory. Trials are
    counted from 1 wherever a person reads them (the log, ``best.yaml``, ``surgery inspect``,
    ``OUT/trials/0001-PID``); ``search.json`` keeps Optuna's own numbers, from 0."""
    data = apply_overrides(copy.deepcopy(base), values)
    r = recipe_from_dict(data, recipe.base_dir, f"{recipe.source} [trial {trial.number + 1}]")
    return r, out / "trials" / f"{trial.number + 1:04d}-{os.getpid()}"


def _optimize_in_batches(study: Any, cfg: SearchConfig, base: dict[str, Any], recipe: Recipe, out: Path, n: int,
                         worker: str, progress: bool | None, after: Callable[[], bool]) -> int:
    """Ask ``cfg.batch`` trials at a time, run them as one batch (their fine-tuning as one
    population where they can share it) and tell their validation errors (``DIVERGED_SCORE``
    when a run diverged), until ``n`` trials are done or ``after()``, called after each
    batch, says to stop; returns how many ran."""
    import optuna

    done = 0
    while done < n:
        asked = [study.ask() for _ in range(min(cfg.batch, n - done))]
        recipes, outs, values = [], [], []
        for trial in asked:
            values.append(seeded_suggest(study, trial, cfg, recipe.seed))
            trial.set_user_attr("worker", worker)
            r, rdir = _trial_recipe(base, values[-1], recipe, trial, out)
            recipes.append(r)
            outs.append(rdir)
        try:
            results = run_batch(recipes, outs, progress)
        except BaseException:
            for trial in asked:  # not left RUNNING in a shared study
                study.tell(trial, state=optuna.trial.TrialState.FAIL)
            raise
        for trial, vals, res in zip(asked, values, results):
            study.tell(trial, _score(trial, vals, res, progress))
        done += len(asked)
        if after():
            break
    return done


def finished(study: Any) -> int:
    """How many of the study's trials finished (scored, or diverged and scored the worst)."""
    import optuna

    return len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)))


def _fail_orphans(study: Any) -> list[int]:
    """Mark failed the trials a worker on this machine left running when its process ended
    (``kill -9``, a lost session: it could not say so), so that the study, search.json and
    ``inspect`` count them as failed; returns their numbers. A trial of a worker still
    running, or of another machine, is left as it is."""
    import optuna

    orphans = []
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        host, _, pid = str(t.user_attrs.get("worker", "")).rpartition(":")
        if host and pid.isdigit() and not alive({"host": host, "pid": int(pid)}):
            orphans.append(t.number)
    if orphans:
        level = optuna.logging.get_verbosity()
        optuna.logging.set_verbosity(optuna.logging.ERROR)  # not a 'Trial N failed' warning each
        try:
            for number in orphans:
                study.tell(number, state=optuna.trial.TrialState.FAIL)
        finally:
            optuna.logging.set_verbosity(level)
    return orphans


def run_search(recipe: Recipe, out: str | Path, trials: int | None = None, storage: str | None = None,
               progress: bool | None = None) -> dict[str, Any]:
    """Run (or join) the study; write best.yaml and search.json under ``out``, and return
    what search.json holds and ``ran``, the trials this call ran. Without ``trials`` the
    study is taken to ``search.trials`` finished trials (a search run again after a stop
    runs only the rest, as an experiment skips its finished cells; with other workers on its
    storage, each stops once the study has them); ``trials``: this worker runs that many more."""
    import optuna

    cfg: SearchConfig | None = recipe.search
    if cfg is None:
        raise SurgeryError(f"{recipe.source}: the recipe has no search: section.")
    if recipe.finetune is None:
        raise SurgeryError("search: the objective is the validation error, so the recipe needs a finetune: section.")
    if trials is not None and trials < 1:
        raise SurgeryError(f"search: --trials {trials}: give at least 1 trial, or leave it out to run "
                           f"search.trials ({cfg.trials}).")
    check_search(recipe)  # before the directory is made: a recipe that cannot run leaves nothing
    base = recipe.to_dict()
    base.pop("search", None)
    first = recipe_from_dict(copy.deepcopy(base), recipe.base_dir, recipe.source)
    dataset = load_dataset(first.data, recipe.base_dir)
    plan_network(first, dataset)  # a fine-tuning option or device that cannot apply fails here, not in trial 0
    out = Path(out)
    check_own_out(out, "search")
    if storage is None:  # the study lives in the output directory
        make_dir(out)
        storage = f"sqlite:///{(out / 'search.db').resolve()}"
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    name = cfg.study or recipe.name
    study, db = _open_study(name, storage, make_sampler(cfg.sampler, recipe.seed))
    try:
        make_dir(out)  # after a --storage that cannot be opened has failed: it leaves no directory
        device = device_label(resolve_device(recipe.finetune.device, "finetune.device"))
        with recording(out / COMMANDS_FILE, device):  # a worker joining the study adds its entry
            orphans = _fail_orphans(study)
            if orphans:
                which = f"trial {orphans[0] + 1} was" if len(orphans) == 1 else \
                    f"trials {', '.join(str(n + 1) for n in orphans)} were"
                progress_line(progress, f"search: {which} left unfinished by a process that has ended; marked failed")
            done = finished(study)
            if trials is None and done >= cfg.trials:  # nothing left to run: the outcome written again
                return {**_write_outcome(study, name, storage, recipe, out), "ran": 0}
            n, total = (cfg.trials - done, cfg.trials) if trials is None else (trials, None)
            return _optimize(study, recipe, base, first, dataset, out, n, total, storage, progress)
    finally:
        _close(db)


def _optimize(study: Any, recipe: Recipe, base: dict[str, Any], first: Recipe, dataset: Dataset, out: Path, n: int,
              total: int | None, storage: str, progress: bool | None) -> dict[str, Any]:
    """Run ``n`` trials of the study (one at a time, or ``search.batch`` together), each
    ``base`` (the recipe without its search section) with the trial's values, on ``first``'s
    ``dataset`` where its data section is the same, and write the outcome; stop early once
    the study has ``total`` finished trials (other workers' among them)."""
    import optuna

    cfg: SearchConfig = recipe.search  # type: ignore[assignment]
    name = cfg.study or recipe.name
    worker = f"{socket.gethostname()}:{os.getpid()}"

    ran = 0  # trials this call runs

    def objective(trial: optuna.Trial) -> float:
        nonlocal ran
        ran += 1
        values = seeded_suggest(study, trial, cfg, recipe.seed)
        trial.set_user_attr("worker", worker)
        r, rdir = _trial_recipe(base, values, recipe, trial, out)
        try:
            res = run(r, rdir, progress=progress,
                      data=dataset if r.data == first.data else None, epoch_lines=False, record=False)
        except TrainingDiverged:
            res = None
        return _score(trial, values, res, progress)

    def so_far() -> bool:
        """Write search.json and best.yaml (for inspect, and a kill); True once the study has ``total``."""
        s = _write_outcome(study, name, storage, recipe, out, final=False)
        return total is not None and sum(t["state"] == "COMPLETE" for t in s["trials"]) >= total

    if cfg.batch == 1:
        study.optimize(objective, n_trials=n, callbacks=[lambda st, _: so_far() and st.stop()])
    else:
        ran = _optimize_in_batches(study, cfg, base, recipe, out, n, worker, progress, so_far)
    return {**_write_outcome(study, name, storage, recipe, out), "ran": ran}


def _write_outcome(study: Any, name: str, storage: str, recipe: Recipe, out: Path,
                   final: bool = True) -> dict[str, Any]:
    """Write search.json (every trial of the study) and best.yaml (the best scored trial's
    recipe): after each trial (``final=False``), and when the search ends, when a study in
    which no trial scored is a ``TrainingDiverged``."""
    trials = study.trials  # each access reads every trial from the storage
    summary = {
        "study": name,
        "storage": storage,
        "trials": [{"number": t.number, "value": t.value, "params": t.params, "worker": t.user_attrs.get("worker"),
                    "state": t.state.name, "diverged": bool(t.user_attrs.get("diverged"))} for t in trials],
    }
    scored = [t for t in trials if t.state.name == "COMPLETE" and not t.user_attrs.get("diverged")]
    if not scored:
        write_json(out / "search.json", summary)
        if not final:
            return summary
        raise TrainingDiverged(f"search: every trial of study {name!r} diverged (listed in {out}/search.json); "
                               "narrow the ranges in search.params (a lower learning rate) and rerun.")
    best = min(scored, key=lambda t: t.value)
    best_recipe = apply_overrides(copy.deepcopy(recipe.to_dict()), dict(best.params))
    best_recipe.pop("search", None)
    write_text(out / "best.yaml", f"# best of study {name!r}: trial {best.number + 1}, valid error {best.value:.3f}%\n"
               + yaml.safe_dump(best_recipe, sort_keys=False))
    summary.update(best_value=best.value, best_params=best.params, best_trial=best.number)
    write_json(out / "search.json", summary)
    return summary
