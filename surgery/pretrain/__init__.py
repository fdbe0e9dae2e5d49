"""Layer pretrainers and greedy stacking."""

from .ae_model import AEConfig, AEModel
from .autoencoder import train_autoencoder
from .greedy import METHODS, GrowConfig, LayerConfig, PretrainConfig, greedy_pretrain
from .rbm import RBMConfig, train_rbm

__all__ = [
    "AEConfig",
    "AEModel",
    "GrowConfig",
    "LayerConfig",
    "METHODS",
    "PretrainConfig",
    "RBMConfig",
    "greedy_pretrain",
    "train_autoencoder",
    "train_rbm",
]
