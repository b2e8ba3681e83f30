"""Triton kernels of pyrl, installed as the subpackage ``pyrl.kernels``.

This package is imported lazily (only when a CUDA tensor or ``backend="triton"`` asks for it), so
CPU users never pay Triton's import time and memory. Until a family's Triton body exists, ops
resolve ``backend="auto"`` on CUDA to the PyTorch reference, and ``backend="triton"`` says so.
"""

__all__: list[str] = []
