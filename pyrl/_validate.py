"""Argument checks shared by every public function. Errors name the argument and what was expected."""
from __future__ import annotations

import math
import numbers
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


class NumberTypeError(TypeError, ValueError):
    """A number argument that is not a real number at all (a str, a bool, None where None is not
    allowed). It is both a ``TypeError`` (what it is) and a ``ValueError`` (what older pyrl raised
    for some arguments), so callers catching either keep working."""


def check_number(name: str, x, *, low=None, high=None, low_open: bool = False, high_open: bool = False,
                 allow_none: bool = False, integer: bool = False, expect: str | None = None):
    """``x`` must be a finite real number (never a bool: ``True`` is almost always a mistake) in the
    interval given by ``low``/``high`` (closed unless ``low_open``/``high_open``); ``integer``
    asks for an int; ``expect`` replaces the generated description of what is expected in the
    range error (e.g. ``"a finite number > 0"``). Returns ``x`` as a float (an int with ``integer``), or None when allowed.

    Errors name the argument: ``NumberTypeError`` for a non-number, ``ValueError`` for a
    non-finite value or one out of range.
    """
    if x is None and allow_none:
        return None
    kinds = (numbers.Integral,) if integer else (numbers.Real,)
    if isinstance(x, bool) or not isinstance(x, kinds) or (isinstance(x, torch.Tensor)):
        kind = ("an int" if integer else "a finite number") + (" or None" if allow_none else "")
        raise NumberTypeError(f"{name} must be {kind}, got {type(x).__name__} {x!r}")
    if not math.isfinite(x):
        raise ValueError(f"{name} must be finite, got {x!r}")
    bad_low = low is not None and (x <= low if low_open else x < low)
    bad_high = high is not None and (x >= high if high_open else x > high)
    if bad_low or bad_high:
        if low is not None and high is not None:
            want = f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        elif low is not None:
            want = f"{'>' if low_open else '>='} {low}"
        else:
            want = f"{'<' if high_open else '<='} {high}"
        raise ValueError(f"{name} must be {expect or want}, got {x!r}")
    return int(x) if integer else float(x)


def check_positive(name: str, x) -> float:
    """A finite number > 0."""
    return check_number(name, x, low=0, low_open=True, expect="a finite number > 0")


def check_bool(name: str, x) -> bool:
    """A real ``bool`` (``"no"`` or ``2`` would silently mean True)."""
    if not isinstance(x, bool):
        raise TypeError(f"{name} must be a bool, got {type(x).__name__} {x!r}")
    return x


def check_chunk_bytes(x):
    """A positive int, or ``"auto"`` (sized from free memory by ``pyrl.ops.plan.resolve_chunk_bytes``)."""
    if x == "auto":
        return x
    if isinstance(x, bool) or not isinstance(x, int) or x <= 0:
        raise ValueError(f"chunk_bytes must be a positive int or 'auto', got {x!r}")
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


def check_linear_args(hidden, weight, bias, temperature, ignore_index, names=("hidden", "weight", "bias")) -> float:
    """Hidden states ``[..., H]``, an LM head ``[V, H]`` and an optional bias ``[V]`` of one float
    dtype, a temperature > 0 and an int ``ignore_index``; returns the temperature as a float.
    ``names``: what the caller calls hidden, weight and bias (e.g. Liger's ``_input``, ``lin_weight``)."""
    nh, nw, nb = names
    check_float(nh, hidden, min_dim=1)
    check_float(nw, weight, dim=2)
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"{nw} must have shape [V, H] with H = {nh}.shape[-1] = {hidden.shape[-1]}, "
                         f"got {shape_str(weight)}")
    if weight.shape[0] < 1:
        raise ValueError(f"{nw} must have at least one vocabulary row, got shape {shape_str(weight)}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"{nw} must have the dtype of {nh} ({hidden.dtype}), got {weight.dtype}")
    if bias is not None:
        check_float(nb, bias, dim=1)
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"{nb} must have shape [V] = [{weight.shape[0]}], got {shape_str(bias)}")
        if bias.dtype != hidden.dtype:
            raise TypeError(f"{nb} must have the dtype of {nh} ({hidden.dtype}), got {bias.dtype}")
    if not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    return check_positive("temperature", temperature)


def check_ref_model(ref_hidden, ref_weight, ref_bias, lead, V, ignore_index, names=("ref_hidden", "ref_weight", "ref_bias")):
    """A reference (or teacher) model's hidden states ``[*lead, H_ref]`` and head ``[V, H_ref]``: its
    own hidden size, the policy's vocabulary ``V``, with errors that name the ``names`` arguments."""
    nh, nw, _ = names
    if ref_weight is None:
        raise ValueError(f"{nh} was given without {nw}: pass both")
    check_linear_args(ref_hidden, ref_weight, ref_bias, 1.0, ignore_index, names=names)
    want = "[" + ", ".join(str(d) for d in lead) + ", H_ref]"
    if ref_hidden.dim() != len(lead) + 1 or tuple(ref_hidden.shape[:-1]) != tuple(lead):
        raise ValueError(f"{nh} must have shape {want} (the leading dims of the policy's hidden), "
                         f"got {shape_str(ref_hidden)}")
    if ref_weight.shape[0] != V:
        raise ValueError(f"{nw} must have shape [V, H_ref] with V = {V} (the policy's vocabulary), "
                         f"got {shape_str(ref_weight)}")


def check_positive_int(name: str, x) -> int:
    """An int >= 1 (never a bool, nor a float such as ``2.0``). Every failure reads
    ``"{name} must be a positive int, got ..."``: ``NumberTypeError`` for a non-int,
    ``ValueError`` for an int < 1."""
    try:
        return check_number(name, x, low=1, integer=True, expect="a positive int")
    except NumberTypeError:
        raise NumberTypeError(f"{name} must be a positive int, got {x!r}") from None


def check_group_size(group_size, batch: int) -> int:
    """``group_size`` completions per prompt: a positive int that divides ``batch`` (the number of
    rewards). Returns it as an int."""
    G = check_positive_int("group_size", group_size)
    if batch % G:
        raise ValueError(f"group_size={G} does not divide the batch of {batch} rewards")
    return G


def check_sampler(top_k, top_p, min_p, sampler_order, prefix: str = "") -> tuple:
    """The sampler's truncation (docs/formulas.md §1.1): ``top_k`` an int >= 1, ``top_p`` in (0, 1],
    ``min_p`` in [0, 1] (each or None), ``sampler_order`` ``"hf"`` or ``"vllm"``. Returns them with
    the values that keep every token (``top_p = 1``, ``min_p = 0``) as None, as HF ``generate``
    adds no warper for ``top_p = 1``. ``prefix`` goes before each name in the errors."""
    from pyrl.kernels.reference import SAMPLER_ORDERS

    if top_k is not None:
        top_k = check_number(f"{prefix}top_k", top_k, low=1, integer=True, expect="an int >= 1 or None")
    top_p = check_number(f"{prefix}top_p", top_p, low=0, high=1, low_open=True, allow_none=True)
    min_p = check_number(f"{prefix}min_p", min_p, low=0, high=1, allow_none=True)
    if not isinstance(sampler_order, str) or sampler_order not in SAMPLER_ORDERS:
        raise ValueError(f"{prefix}sampler_order must be one of {', '.join(map(repr, SAMPLER_ORDERS))}, "
                         f"got {sampler_order!r}")
    return (int(top_k) if top_k is not None else None, None if top_p in (None, 1.0) else float(top_p),
            None if min_p in (None, 0.0) else float(min_p), sampler_order)
