"""Argument checks shared by every public function. Errors name the argument and what was expected."""
from __future__ import annotations

import math
from typing import Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def shape_str(t: torch.Tensor) -> str:
    return "[" + ", ".join(str(s) for s in t.shape) + "]"


def check_tensor(name: str, t, *, dtypes: Sequence[torch.dtype] | None = None, dim: int | None = None,
                 min_dim: int | None = None) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None and t.dtype not in dtypes:
        allowed = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must have dtype in ({allowed}), got {str(t.dtype).replace('torch.', '')}")
    if dim is not None and t.dim() != dim:
        raise ValueError(f"{name} must be {dim}-D, got shape {shape_str(t)}")
    if min_dim is not None and t.dim() < min_dim:
        raise ValueError(f"{name} must have at least {min_dim} dimension(s), got shape {shape_str(t)}")
    return t


def check_float(name: str, t, **kw) -> torch.Tensor:
    return check_tensor(name, t, dtypes=FLOAT_DTYPES, **kw)


def check_same_device(**tensors) -> None:
    items = [(k, v) for k, v in tensors.items() if isinstance(v, torch.Tensor)]
    if not items:
        return
    k0, v0 = items[0]
    for k, v in items[1:]:
        if v.device != v0.device:
            raise ValueError(f"{k} is on {v.device} but {k0} is on {v0.device}; all inputs must be on one device")


def check_shape(name: str, t: torch.Tensor, shape: Sequence[int], what: str = "") -> None:
    if tuple(t.shape) != tuple(shape):
        want = "[" + ", ".join(str(s) for s in shape) + "]"
        raise ValueError(f"{name} must have shape {want}{' ' + what if what else ''}, got {shape_str(t)}")


def check_positive(name: str, x) -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x) or x <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {x!r}")
    return float(x)


def check_bool(name: str, x) -> bool:
    """A real ``bool`` (``"no"`` or ``2`` would silently mean True)."""
    if not isinstance(x, bool):
        raise TypeError(f"{name} must be a bool, got {type(x).__name__} {x!r}")
    return x


def check_chunk_bytes(x) -> int:
    if isinstance(x, bool) or not isinstance(x, int) or x <= 0:
        raise ValueError(f"chunk_bytes must be a positive int, got {x!r}")
    return x


def check_targets(name: str, targets, lead_shape: Sequence[int], vocab: int, ignore_index: int,
                  *, vocab_start: int = 0, vocab_total: int | None = None) -> torch.Tensor:
    """Targets must be int64 of shape ``lead_shape`` with ids in [0, V) or equal to ignore_index."""
    check_tensor(name, targets, dtypes=(torch.int64, torch.int32))
    if tuple(targets.shape) != tuple(lead_shape):
        want = "[" + ", ".join(str(s) for s in lead_shape) + "]"
        raise ValueError(f"{name} must have shape {want} (the leading dims of the input), got {shape_str(targets)}")
    total = vocab if vocab_total is None else vocab_total
    # The id range check reads a value back from the device; inside torch.compile it would break
    # the graph, so compiled regions rely on the eager run having checked the same data path.
    if targets.numel() and not torch.compiler.is_compiling():
        valid = targets != ignore_index
        bad = valid & ((targets < 0) | (targets >= total))
        if bool(bad.any()):
            first = int(targets[bad].flatten()[0])
            raise ValueError(
                f"{name} must hold ids in [0, {total}) or ignore_index={ignore_index}, found {first}")
    return targets.long()
