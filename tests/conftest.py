import os

import pytest
import torch

import pyrl

CPP = pyrl.backends()["cpp"]["available"]
# CI builds the extension strictly; a developer without a compiler may run the torch backend only.
CPU_BACKENDS = ["torch", pytest.param("cpp", marks=pytest.mark.skipif(not CPP, reason="pyrl._C not built"))]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def require_extension() -> bool:
    return os.environ.get("PYRL_ALLOW_NO_EXT") != "1"
