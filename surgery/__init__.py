"""surgery: greedy layer-wise pretraining and model surgery for PyTorch.

The public API, the same objects the recipes are made of::

    import surgery as S

    data = S.load_dataset(S.DataConfig(dataset="mnist", limit=5000))
    stack = S.greedy_pretrain(data.train.x, S.PretrainConfig(layers=[{"method": "rbm", "hidden": 500}]))
    graph = S.build_graph([S.TakeOp(source="rbm"), S.HeadOp(classes=10)], {"rbm": stack})
    result = S.Trainer(graph, data, S.FinetuneConfig(epochs=5)).fit()

Recipes: ``S.load_recipe(path)`` then ``S.run(recipe, out)`` (one network) or
``S.run_experiment(recipe, out)`` and ``S.write_report(out, rows)`` (a grid).
"""

from .assembly import ForeignSource, SurgeryConfig, build_graph
from .data import DataConfig, Dataset, Split, load_dataset
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
from .experiment import read_results, run_experiment
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
from .pipeline import assemble, evaluate, pretrain, run, validate
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
from .report import significance_line, summary_grid, table, write_report
from .schedules import OptimizerConfig, ScheduleConfig
from .search_config import SearchConfig
from .stack import LayerStack, StackLayer
from .version import __version__

__all__ = [
    "AEConfig", "ArmConfig", "CheckpointError", "ConfigError", "DataConfig", "DataError", "Dataset", "DeepenOp",
    "DeviceError", "DropoutOp", "ExperimentConfig", "FinetuneConfig", "ForeignSource", "FreezeOp", "GrowConfig",
    "HeadOp", "ImportOp", "InsertOp", "LayerSpec", "LayerStack", "ManifestError", "ModelGraph", "Node",
    "describe_model",
    "OptimizerConfig", "OutOfMemory", "OutputError", "PopulationTrainer", "PretrainConfig", "RBMConfig", "Recipe",
    "ReinitOp",
    "RemoveOp",
    "ScheduleConfig", "SearchConfig", "ShapeError", "Split", "StackLayer", "SurgeryConfig", "SurgeryError",
    "TakeOp", "Trainer", "TrainingDiverged", "TransplantOp", "WidenOp", "__version__", "assemble", "build_graph",
    "evaluate",
    "greedy_pretrain", "init_weight", "load_dataset", "load_model", "load_recipe", "plan_cells", "pretrain",
    "read_back", "read_results", "recipe_from_dict", "resolve_device", "run", "run_experiment", "save_model",
    "significance_line", "summary_grid",
    "table", "to_module", "train_autoencoder", "train_rbm", "validate", "write_report",
]
