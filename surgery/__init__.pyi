"""The public API as type checkers and readers see it: every name ``import surgery`` gives.
``__init__.py`` reads this file to learn which module holds each name, and imports that
module on first use (so ``surgery --help`` does not wait for torch)."""

from .assembly import ForeignSource, SurgeryConfig, build_graph
from .data import DataConfig, load_dataset
from .dataset import Dataset, Split
from .devices import resolve_device
from .errors import (
    CheckpointError,
    ConfigError,
    DataError,
    DeviceError,
    ManifestError,
    OutOfMemory,
    OutputError,
    ShapeError,
    SurgeryError,
    TrainingDiverged,
)
from .experiment import run_experiment
from .experiment_config import ArmConfig, ExperimentConfig
from .finetune import FinetuneConfig, PopulationTrainer, Trainer
from .graph import ModelGraph, Node
from .grid import plan_cells
from .layers import LayerSpec, init_weight
from .model_file import describe_model, load_model, save_model
from .modules import read_back, to_module
from .ops import (
    DeepenOp,
    DropoutOp,
    FreezeOp,
    HeadOp,
    ImportOp,
    InsertOp,
    ReinitOp,
    RemoveOp,
    TakeOp,
    TransplantOp,
    WidenOp,
)
from .pipeline import evaluate, pretrain, run
from .planning import assemble, validate
from .pretrain import (
    AEConfig,
    GrowConfig,
    PretrainConfig,
    RBMConfig,
    greedy_pretrain,
    train_autoencoder,
    train_rbm,
)
from .recipe import Recipe, load_recipe, recipe_from_dict
from .report import significance_line, summary_grid, write_report
from .results import read_results
from .schedules import OptimizerConfig, ScheduleConfig
from .search_config import SearchConfig
from .stack import LayerStack, StackLayer
from .stats import table
from .version import __version__

__all__ = [
    "AEConfig", "ArmConfig", "CheckpointError", "ConfigError", "DataConfig", "DataError", "Dataset",
    "DeepenOp", "DeviceError", "DropoutOp", "ExperimentConfig", "FinetuneConfig", "ForeignSource", "FreezeOp",
    "GrowConfig", "HeadOp", "ImportOp", "InsertOp", "LayerSpec", "LayerStack", "ManifestError", "ModelGraph",
    "Node", "OptimizerConfig", "OutOfMemory", "OutputError", "PopulationTrainer", "PretrainConfig",
    "RBMConfig", "Recipe", "ReinitOp", "RemoveOp", "ScheduleConfig", "SearchConfig", "ShapeError", "Split",
    "StackLayer", "SurgeryConfig", "SurgeryError", "TakeOp", "Trainer", "TrainingDiverged", "TransplantOp",
    "WidenOp", "assemble", "build_graph", "describe_model", "evaluate", "greedy_pretrain", "init_weight",
    "load_dataset", "load_model", "load_recipe", "plan_cells", "pretrain", "read_back", "read_results",
    "recipe_from_dict", "resolve_device", "run", "run_experiment", "save_model", "significance_line",
    "summary_grid", "table", "to_module", "train_autoencoder", "train_rbm", "validate", "write_report",
    "__version__",
]
