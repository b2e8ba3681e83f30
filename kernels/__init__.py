"""Triton kernels of pyrl, installed as the subpackage ``pyrl.kernels``.

This package is imported lazily (only when a CUDA tensor or ``backend="triton"`` asks for it), and
even ``import pyrl.kernels`` does not import Triton: the names below load their module on first
use, so CPU users never pay Triton's import time and memory.

* ``LogprobRows``: row bodies (``fwd``/``bwd``) for ``pyrl.logprobs_from_logits``.
* ``FusedLinear``: a body (``fwd``/``bwd``) for ``pyrl.fused_linear_logprobs``: log-prob and entropy
  straight from hidden states and the LM head in one kernel, logits never stored.

``python -m pyrl.kernels.compile_check`` compiles every kernel for an NVIDIA target without a GPU.
"""
from __future__ import annotations

import importlib

__all__ = ["LogprobRows", "FusedLinear"]

_WHERE = {"LogprobRows": "logprobs", "FusedLinear": "logprobs"}


def __getattr__(name: str):
    if name in _WHERE:
        module = importlib.import_module(f"{__name__}.{_WHERE[name]}")
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
