"""Triton kernels of pyrl, installed as the subpackage ``pyrl.kernels``.

This package is imported lazily (only when a CUDA tensor or ``backend="triton"`` asks for it), and
even ``import pyrl.kernels`` does not import Triton: the names below load their module on first
use, so CPU users never pay Triton's import time and memory.

* ``LogprobRows`` (``kernels/rows.py``): the row body (``fwd``/``bwd``) for
  ``pyrl.logprobs_from_logits``: log-prob and entropy of logits that already exist.
* ``FusedLinear`` (``kernels/fused_linear.py``): a body (``fwd``/``bwd``) for
  ``pyrl.fused_linear_logprobs``: log-prob and entropy straight from hidden states and the LM head
  in one kernel, logits never stored.

Both follow the contract of their plain-PyTorch reference, ``TorchRows`` with ``RowParams`` in
``kernels/reference.py`` (which imports torch only).

``python -m pyrl.kernels.compile_check`` compiles every kernel for an NVIDIA target without a GPU.
"""
from __future__ import annotations

import importlib

__all__ = ["LogprobRows", "FusedLinear"]

_WHERE = {"LogprobRows": "rows", "FusedLinear": "fused_linear"}


def __getattr__(name: str):
    if name in _WHERE:
        module = importlib.import_module(f"{__name__}.{_WHERE[name]}")
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
