import os

import pytest
import torch

from cryogs.render import _extension

torch.set_default_dtype(torch.float32)


def pytest_collection_modifyitems(config, items):
    """Skip ``cuda`` tests unless a GPU and the compiled extension are both present."""
    if _extension.available():
        return
    reason = ("no CUDA GPU visible" if not torch.cuda.is_available()
              else f"CUDA extension {_extension.status()}")
    skip = pytest.mark.skip(reason=reason)
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _float32_default_dtype():
    """Every test starts from float32 as torch's default dtype, whatever an earlier test left behind."""
    torch.set_default_dtype(torch.float32)


@pytest.fixture
def rng():
    """A fresh, unseeded generator: tests run on new random inputs each time (seed printed on failure)."""
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"random seed {seed}")
    return torch.Generator().manual_seed(seed)
