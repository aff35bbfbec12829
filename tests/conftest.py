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
def rng(request):
    """A random generator for the test's inputs.

    Fresh and unseeded (the seed is printed on failure) for exact assertions, which hold for every
    input. A test marked ``statistical`` (a fit converges, a correlation beats a bound) gets a fixed
    seed instead, ``CRYOGS_TEST_SEED`` if set (``scripts/flaky.sh`` sweeps it), else 0, so CI never
    fails by chance.
    """
    if request.node.get_closest_marker("statistical") is not None:
        seed = int(os.environ.get("CRYOGS_TEST_SEED", "0"))
    else:
        seed = int.from_bytes(os.urandom(4), "little")
    print(f"random seed {seed}")
    return torch.Generator().manual_seed(seed)
