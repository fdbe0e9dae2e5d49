import pytest
import torch

from surgery.data import DataConfig, load_dataset


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def mnist_small():
    """5000 MNIST training examples (rows), the full valid and test splits."""
    return load_dataset(DataConfig(dataset="mnist", limit=5000, device="cpu"))


@pytest.fixture(scope="session")
def synth():
    return load_dataset(DataConfig(dataset="synthetic", device="cpu"))
