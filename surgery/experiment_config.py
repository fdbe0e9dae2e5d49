"""The ``experiment:`` recipe section: arms (conditions), depths, seeds and the per-method
layer defaults. Kept apart from the runner (:mod:`surgery.experiment`) so that recipe
composition can import it without importing what runs it.
"""

from __future__ import annotations

import re
import warnings
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    NonNegativeInt,
    PositiveInt,
    field_validator,
    model_validator,
)

from .errors import SurgeryWarning
from .layers import Activation
from .search_config import ParamRange, check_scored_alike


def file_name(name: str, what: str, longest: int) -> str:
    """``name``, checked to be one file or directory name (a recipe's is its default output
    directory, an arm's is part of its cells' names): no ``/`` that nests it, no ``..``."""
    if len(name) > longest or not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.+-]*", name):
        raise ValueError(f"{what}: give up to {longest} letters, digits, '_', '-', '+' and '.' (not first), "
                         "e.g. bengio2007-relu")
    return name


ArmMethod = Literal["none", "rbm", "grbm", "ae", "dae", "sparse_ae", "grow"]

# Units per hidden layer: one width for every layer, or a list (layer i gets item i):
# ``[500, 500, 2000]`` is Hinton & Salakhutdinov's DBN.
Widths = PositiveInt | Annotated[list[PositiveInt], Field(min_length=1)]


class ConvLayer(BaseModel):
    """A convolutional first layer: ``maps`` feature maps of ``kernel_size`` with ``stride``;
    pretrained arms pretrain it as a convolutional autoencoder."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    maps: int = Field(default=16, gt=0)
    kernel_size: int = Field(default=5, gt=0)
    stride: int = Field(default=2, gt=0)


class ArmConfig(BaseModel):
    """One arm. ``method`` pretrains every hidden layer (``none``: random classic init)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: ArmMethod = "none"
    train: Literal["all", "new"] = Field(default="all", description="grow only")
    layer: dict[str, Any] = Field(default_factory=dict, description="overrides for each pretrain.layers entry")
    finetune: dict[str, Any] = Field(default_factory=dict, description="overrides for the finetune section")
    hidden: Widths | None = Field(default=None, description="units per hidden layer, or a list per layer "
                                  "(default: experiment.hidden)")
    activation: Activation | None = None
    fixed_depth: int | None = Field(default=None, gt=0, description="run only this depth (shallow arms)")
    conv: ConvLayer | None = Field(default=None, description="make the first hidden layer convolutional (needs "
                                                             "data.flatten: false)")
    data: dict[str, Any] = Field(default_factory=dict, description="overrides for the data section")

    @model_validator(mode="after")
    def _settings_it_uses(self) -> ArmConfig:
        # a setting the arm's method never reads is a mistake (the method forgotten, most likely)
        if self.method == "none" and self.layer:
            raise ValueError(f"layer {self.layer} sets how layers are pretrained, but method none pretrains none; "
                             "give the arm a pretraining method (rbm, dae, ...) or drop layer")
        if self.method != "grow" and self.train == "new":  # (a recorded recipe says the default, all)
            raise ValueError(f"train: {self.train} chooses which layers a grow arm trains at each stage; method "
                             f"{self.method} does not grow (give method: grow, or drop train)")
        return self


BUILTIN_ARMS: dict[str, ArmConfig] = {
    "none": ArmConfig(method="none"),
    "rbm": ArmConfig(method="rbm"),
    "dae": ArmConfig(method="dae"),
    "ae": ArmConfig(method="ae"),
    "grow": ArmConfig(method="grow", train="all"),
    "grow-frozen": ArmConfig(method="grow", train="new"),
    "shallow": ArmConfig(method="none", fixed_depth=1),
}


def _tunable_paths(v: dict[str, Any]) -> dict[str, Any]:
    for k in v:
        if k.split(".")[0] not in ("data", "pretrain", "finetune"):
            raise ValueError(f"params[{k!r}]: tuned paths start with data, pretrain or finetune "
                             "(a cell's recipe; pretrain.layers.*.lr sets every layer)")
        check_scored_alike(k)
    return v


def scale_of(value: Any) -> float | None:
    """The factor of a ``{times: X}`` value of ``experiment.tune.then`` (X times the value
    chosen so far), or ``None`` for a plain value."""
    if isinstance(value, dict) and set(value) == {"times"}:
        return value["times"]
    return None


def _alternatives(v: list[dict[str, Any]]) -> list[dict[str, Any]]:
    for i, alt in enumerate(v):
        if not alt:
            raise ValueError(f"alternatives[{i}] is empty: give the values it sets, e.g. {{finetune.batch_size: 10}}")
        try:
            _tunable_paths(alt)
        except ValueError as e:  # the same rules as a tuned parameter's path, named as this one
            raise ValueError(str(e).replace("params[", f"alternatives[{i}][", 1)) from None
        for path, value in alt.items():
            factor = scale_of(value)
            if factor is None and isinstance(value, dict) and "times" in value:
                raise ValueError(f"alternatives[{i}][{path!r}]: {{times: X}} takes no other key (got {value})")
            if factor is not None and (isinstance(factor, bool) or not isinstance(factor, (int, float))
                                       or not factor > 0):
                raise ValueError(f"alternatives[{i}][{path!r}]: times must be a positive number (got {factor!r})")
    return v


class TuneStep(BaseModel):
    """One step of ``experiment.tune.then``, after an arm's trials: each alternative runs once
    (on the tuning seeds) with the values chosen so far and its own set over them; the
    lowest validation error among the alternatives and the values so far is kept (a tie
    keeps the values so far). ``{times: X}`` sets X times the value so far (an lr halved or
    doubled). An alternative that changes nothing for an arm (a pretraining value of an arm
    that does not pretrain, or the value it has) does not run."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, description="what the step chooses, as the log and report say it")
    conditions: list[str] | None = Field(default=None, description="the arms it applies to (default: all)")
    alternatives: Annotated[list[dict[str, Any]], AfterValidator(_alternatives)] = Field(
        min_length=1, description="each a dotted path -> value (or {times: X}) set over the values so far")

    def applies_to(self, arm: str) -> bool:
        """Whether the step runs for arm ``arm`` (every arm when ``conditions`` is unset)."""
        return self.conditions is None or arm in self.conditions


class TuneConfig(BaseModel):
    """``experiment.tune``: the same search budget for every arm. Per (arm, depth),
    ``trials`` Optuna trials score each set of values by ``metric`` (the validation error)
    on the first seed, or by its mean over the first ``seeds`` seeds, ``batch`` trials at a
    time (trained together as a population where the experiment's ``population`` allows);
    every seed then runs with the best values."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    params: Annotated[dict[str, ParamRange], AfterValidator(_tunable_paths)] = Field(
        min_length=1, description="dotted path in a cell's recipe -> range")
    trials: int = Field(default=10, ge=1)
    seeds: int = Field(default=1, ge=1, description=(
        "how many of the experiment's first seeds score each trial, by their mean (Erhan et al. chose "
        "over 10): more seeds cost more runs and reward a lucky seed less; the chosen trial's runs "
        "become those seeds' cells"))
    metric: Literal["valid_error"] = "valid_error"
    sampler: Literal["tpe", "gp", "random"] = "tpe"
    seed: int = Field(default=0, ge=0, description="the sampler's seed")
    batch: int = Field(default=1, ge=1, description=(
        "trials asked of the sampler at once; their pretraining and fine-tuning run as populations "
        "where experiment.population allows (TPE draws its first 10 trials at random, so up to 10 "
        "at once it asks exactly what it would ask one by one)"))
    then: list[TuneStep] = Field(default_factory=list, description=(
        "steps after the trials, in order: each tries its alternatives at the values chosen so far "
        "and keeps the one with the lowest validation error (the minibatch size, say, or the number "
        "of pretraining epochs, chosen last as a paper did)"))

    def step_runs(self, arm: str) -> int:
        """How many alternatives the ``then`` steps that apply to ``arm`` try (each a run on
        each tuning seed, unless it changes nothing for the arm)."""
        return sum(len(s.alternatives) for s in self.then if s.applies_to(arm))


def _paper_keys(v: dict[str, float]) -> dict[str, float]:
    for k in v:
        parts = k.split()
        if len(parts) not in (1, 2) or (len(parts) == 2 and not (parts[1][:1] == "d" and parts[1][1:].isdigit())):
            raise ValueError(f"errors[{k!r}]: keys are an arm ('rbm': its largest depth) or an arm and a depth "
                             "('rbm d2')")
    return v


def _say_repeats(field: str, values: list[int], what: str) -> None:
    """A ``SurgeryWarning`` naming the values ``experiment.<field>`` gives more than once
    (a typo for another value, likely: ``seeds: [0, 0]`` for ``[0, 1]``)."""
    twice = sorted({v for v in values if values.count(v) > 1})
    if twice:
        warnings.warn(f"experiment.{field}: {', '.join(map(str, twice))} given more than once ({values}); {what}.",
                      SurgeryWarning, stacklevel=2)


def _yaml_off(v: Any) -> Any:
    """YAML reads a bare ``off`` as false (and ``on`` as true): take them as written."""
    if v is False:
        return "off"
    if v is True:
        raise ValueError("population: true is not a mode; write auto, off or a number")
    return v


class PaperReference(BaseModel):
    """``experiment.paper``: the published numbers this experiment reproduces. The report
    sets them beside the measured ones, with the gap, and says what the paper did
    differently."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    source: str = Field(description="the paper and table, e.g. 'Bengio et al. 2007, Table 2'")
    errors: Annotated[dict[str, Annotated[float, Field(ge=0, le=100)]], AfterValidator(_paper_keys)] = Field(
        min_length=1, description="test error % by arm ('rbm': at its largest depth) or arm and depth ('rbm d2')")
    target: float | None = Field(default=None, gt=0, description="points within the paper that count as a match")
    differences: str = Field(default="", description="what the paper did that this recipe does not")


MAX_DEPTH = 1000


class ExperimentConfig(BaseModel):
    """The ``experiment:`` recipe section."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    conditions: list[str] | dict[str, ArmConfig] = Field(description="built-in arm names, or name -> arm")
    depths: list[int] = Field(default=[1, 2, 3], min_length=1)
    seeds: list[NonNegativeInt] = Field(default=[0], min_length=1)
    hidden: Widths = Field(default=500, description="units per hidden layer, or a list: layer i gets item i")
    activation: Activation = "sigmoid"
    shallow_hidden: int | None = Field(default=None, gt=0, description="units of the shallow arm (default: hidden)")
    pretrain_epochs: int = Field(default=5, ge=0)
    pretrain_batch_size: int = Field(default=100, gt=0)
    methods: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="per-method layer defaults, e.g. {rbm: {lr: 0.05}}"
    )
    baseline: str = Field(default="none", description="the arm every other is tested against")
    tune: TuneConfig | None = Field(default=None, description="tune every arm with the same budget first")
    paper: PaperReference | None = Field(default=None, description="published numbers to report beside ours")
    population: Annotated[Literal["auto", "off"] | Annotated[int, Field(ge=1, strict=True)],
                          BeforeValidator(_yaml_off)] = Field(
        default="auto", description="train cells of one shape together: auto (GPU: as many as fit, stacks "
        "too; CPU: one at a time), N, or off")

    @field_validator("conditions")
    @classmethod
    def _known(cls, v: list[str] | dict[str, ArmConfig]) -> list[str] | dict[str, ArmConfig]:
        if isinstance(v, list):
            if not v:
                raise ValueError("conditions is empty; name at least one arm")
            bad = [c for c in v if c not in BUILTIN_ARMS]
            if bad:
                raise ValueError(f"unknown arm(s) {bad}; built-in arms are {sorted(BUILTIN_ARMS)} (or give a mapping)")
            if len(set(v)) != len(v):
                raise ValueError("conditions repeat an arm")
        for name in v:
            file_name(name, f"arm {name!r} names its cells (and stands in the report's tables)", 100)
        return v

    @field_validator("depths")
    @classmethod
    def _depths(cls, v: list[int]) -> list[int]:
        if any(d < 1 or d > MAX_DEPTH for d in v):
            raise ValueError(f"each depth must be between 1 and {MAX_DEPTH} (planning a net of 1000 layers takes "
                             "seconds, one of a million hours)")
        _say_repeats("depths", v, "each depth runs once")
        return sorted(set(v))

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, v: list[int]) -> list[int]:
        # a repeated seed would be one run counted twice in n, the mean and the interval
        _say_repeats("seeds", v, "each seed runs once and counts once in the statistics")
        return list(dict.fromkeys(v))

    @model_validator(mode="after")
    def _tune_seeds_run(self) -> ExperimentConfig:
        if self.tune is not None and self.tune.seeds > len(self.seeds):
            raise ValueError(f"tune.seeds is {self.tune.seeds}, but seeds lists {len(self.seeds)} "
                             f"({self.seeds}): a trial is scored on the first tune.seeds of the experiment's "
                             "seeds; lower tune.seeds or add seeds")
        return self

    @model_validator(mode="after")
    def _steps_name_arms(self) -> ExperimentConfig:
        # a name no arm here has: a typo where the arms are built-in names (no such arm can
        # exist), else maybe an arm left out by --set 'experiment.conditions=[...]' (run apart)
        arms = self.arms()
        for i, step in enumerate(self.tune.then if self.tune is not None else []):
            absent = [a for a in step.conditions or [] if a not in arms]
            if isinstance(self.conditions, list) and any(a not in BUILTIN_ARMS for a in absent):
                raise ValueError(f"tune.then[{i}].conditions: {absent} not among the experiment's arms {list(arms)}")
            if absent:
                here = [a for a in step.conditions or [] if a in arms]
                warnings.warn(f"experiment.tune.then[{i}] ({step.name}): its conditions {absent} are not among the "
                              f"arms run here {list(arms)}; it runs for {here or 'no arm'} here (arms run apart "
                              "are merged by `surgery compare`).", SurgeryWarning, stacklevel=2)
        return self

    def arms(self) -> dict[str, ArmConfig]:
        """The arms by name (built-in names resolved to their configs)."""
        if isinstance(self.conditions, list):
            return {c: BUILTIN_ARMS[c] for c in self.conditions}
        return dict(self.conditions)


DEFAULT_LAYER = {
    "rbm": {"lr": 0.05, "momentum": 0.5},
    "grbm": {"lr": 0.005, "momentum": 0.5},
    "ae": {"lr": 0.01, "momentum": 0.9},
    "dae": {"lr": 0.01, "momentum": 0.9, "noise": 0.25},
    "sparse_ae": {"lr": 0.01, "momentum": 0.9},
    "grow": {"lr": 0.1, "momentum": 0.9},
}


def recorded_experiment(section: Any) -> ExperimentConfig:
    """The ``experiment`` section a finished run recorded (its ``experiment.json``), checked
    again without the warnings the run gave when it started (a repeated seed, a step for an
    arm run apart): nothing runs from it now, so they would only repeat themselves."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SurgeryWarning)
        return ExperimentConfig.model_validate(section)
