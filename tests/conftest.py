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


# --------------------------------------------------------------------------------------------------
# Hypothesis profiles (property-based tests: tests/test_fuzz.py; see docs/reliability.md).
#   ci       (default) a fixed, reproducible set of examples (derandomize) that runs in CI time;
#   nightly  10x the examples, freshly random each run (a failure prints its @reproduce_failure blob).
# Select with HYPOTHESIS_PROFILE=nightly.
# --------------------------------------------------------------------------------------------------
FUZZ_EXAMPLES = {"ci": 200, "nightly": 2000}
try:
    from hypothesis import HealthCheck, settings

    _suppress = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture,
                 HealthCheck.filter_too_much]
    settings.register_profile("ci", max_examples=FUZZ_EXAMPLES["ci"], deadline=None, derandomize=True,
                              suppress_health_check=_suppress, print_blob=True)
    settings.register_profile("nightly", max_examples=FUZZ_EXAMPLES["nightly"], deadline=None, derandomize=False,
                              suppress_health_check=_suppress, print_blob=True)
    HYPOTHESIS_PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "ci")
    settings.load_profile(HYPOTHESIS_PROFILE)
except ImportError:  # hypothesis is a test extra; the fuzz tests skip without it
    HYPOTHESIS_PROFILE = None


def interpret_triton_stdlib() -> None:
    """Make Triton's library functions (tl.max, tl.sum, tl.zeros, ...) interpretable.

    ``triton.jit`` picks compiled or interpreted when a function is defined, so Triton's own library
    follows TRITON_INTERPRET as it was when ``triton`` was first imported. ``pyrl.backends()`` above
    already imported triton, so redo what that import would have done under TRITON_INTERPRET=1 (a
    no-op when triton was imported after it was set, or when this already ran).
    """
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    if not isinstance(tl.max, JITFunction):
        return
    wrapped = {}
    for module in (tl.standard, tl.random, tl):
        for name, fn in list(vars(module).items()):
            if isinstance(fn, JITFunction):
                wrapped.setdefault(id(fn), InterpretedFunction(fn.fn))
                setattr(module, name, wrapped[id(fn)])


def triton_on_cpu() -> bool:
    """Make ``backend="triton"`` runnable on CPU tensors (the Triton interpreter) if Triton imports and
    pyrl has a Triton body; returns whether it can run. Call at a test module's import.
    """
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        interpret_triton_stdlib()
    except Exception:  # noqa: BLE001
        return False
    try:
        return bool(pyrl.backends()["triton"]["available"])
    except Exception:  # noqa: BLE001
        return False
