"""Which kernel bodies this installation has, and which one an op call gets.

``backend="auto"`` picks Triton for CUDA tensors (when Triton imports), the compiled C++ kernels
(``pyrl._C``) for CPU tensors (when the extension imported), and the PyTorch reference otherwise.
Naming a backend that is not available raises ``RuntimeError`` saying why.
"""
from __future__ import annotations

import os

import torch

__all__ = ["backends", "resolve_backend", "BACKENDS"]

BACKENDS = ("auto", "triton", "cpp", "torch")

_C = None
_C_ERROR: str | None = None
try:  # the extension is optional: a failed build must not break `import pyrl`
    from pyrl import _C  # noqa: F401  (importing it registers torch.ops.pyrl.*)
except Exception as exc:  # noqa: BLE001
    _C = None
    import importlib.util

    if importlib.util.find_spec("pyrl._C") is None:  # not built (PYRL_SKIP_EXT=1, or the build failed)
        _C_ERROR = "pyrl._C is not built in this installation"
    else:
        _C_ERROR = f"{type(exc).__name__}: {exc}"

_TRITON: dict = {}


def _triton_status() -> tuple[bool, str]:
    """Whether Triton is installed, found WITHOUT importing it: the import costs ~70 MB of RSS and a
    second of start-up on CPU paths, and importing it before TRITON_INTERPRET=1 is set would fix
    its library functions in compiled mode for the rest of the process."""
    if not _TRITON:
        import importlib.metadata
        import importlib.util

        if importlib.util.find_spec("triton") is None:
            _TRITON["ok"], _TRITON["why"] = False, "triton is not installed (pip install triton)"
        else:
            try:
                version = importlib.metadata.version("triton")
            except importlib.metadata.PackageNotFoundError:
                version = "unknown version"
            _TRITON["ok"], _TRITON["why"] = True, f"triton {version}"
    return _TRITON["ok"], _TRITON["why"]


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def backends() -> dict[str, dict]:
    """Report what this installation can run: ``{name: {"available": bool, "detail": str}}``."""
    cpp_ok = _C is not None
    tri_ok, tri_why = _triton_status()
    return {
        "torch": {"available": True, "detail": f"PyTorch reference, torch {torch.__version__}"},
        "cpp": {
            "available": cpp_ok,
            "detail": f"pyrl._C (CPU kernels), built for torch {_C.torch_version}" if cpp_ok
            else f"pyrl._C did not import ({_C_ERROR}); reinstall with `pip install --no-build-isolation .`",
        },
        "triton": {
            "available": tri_ok and (torch.cuda.is_available() or _interpret()),
            "detail": tri_why + ("" if torch.cuda.is_available() else
                                 (" (interpreter on CPU: TRITON_INTERPRET=1)" if _interpret()
                                  else " (no CUDA device; set TRITON_INTERPRET=1 to run on CPU)")),
        },
    }


def resolve_backend(backend: str, device: torch.device) -> str:
    """Turn ``backend`` into the name of the row body to run for tensors on ``device``; called
    only by the plan (``pyrl.ops.plan.make_plan``)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        if device.type == "cuda" and _triton_status()[0]:
            return "triton"
        if device.type == "cpu" and _C is not None:
            return "cpp"
        return "torch"
    if backend == "torch":
        return "torch"
    if backend == "cpp":
        if _C is None:
            raise RuntimeError(f"backend='cpp' is not available: pyrl._C did not import ({_C_ERROR})")
        if device.type != "cpu":
            raise RuntimeError(f"backend='cpp' got {device.type} tensors, but pyrl._C has CPU kernels only "
                               f"(it is built without CUDA); use backend='triton' or 'torch'")
        return "cpp"
    ok, why = _triton_status()
    if not ok:
        raise RuntimeError(f"backend='triton' is not available: {why}")
    if device.type == "cpu" and not _interpret():
        raise RuntimeError("backend='triton' got CPU tensors: set TRITON_INTERPRET=1 to run Triton on CPU")
    return "triton"
