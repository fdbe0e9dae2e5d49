"""Layer pretrainers and greedy stacking."""

from .autoencoder import AEConfig, train_autoencoder
from .greedy import METHODS, GrowConfig, LayerConfig, PretrainConfig, greedy_pretrain
from .rbm import RBMConfig, train_rbm

__all__ = [
    "AEConfig",
    "GrowConfig",
    "LayerConfig",
    "METHODS",
    "PretrainConfig",
    "RBMConfig",
    "greedy_pretrain",
    "train_autoencoder",
    "train_rbm",
]
