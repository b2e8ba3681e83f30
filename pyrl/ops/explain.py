"""``pyrl.explain``: the plan an op call would take, as readable text, without running it."""
from __future__ import annotations

from typing import Callable, Union

from pyrl.ops.fused_policy_loss import fused_linear_policy_loss, plan_fused_linear_policy_loss
from pyrl.ops.logprobs import (fused_linear_logprobs, logprobs_from_logits, plan_fused_linear_logprobs,
                               plan_logprobs_from_logits)
from pyrl.ops.distill import fused_linear_distillation_loss, plan_fused_linear_distillation_loss
from pyrl.ops.plan import Plan
from pyrl.ops.preference import fused_linear_preference_loss, plan_fused_linear_preference_loss

__all__ = ["explain", "plan_of"]


def _linear(*args, vocab_parallel_group=None, **kwargs) -> Plan:
    if vocab_parallel_group is not None:
        raise ValueError("explain() plans single-process calls; with vocab_parallel_group the plan is the chunked "
                         "torch walk with collectives, its chunk rows agreed across the ranks at run time")
    return plan_fused_linear_logprobs(*args, **kwargs).plan


_PLANNERS = {
    "logprobs_from_logits": lambda *a, **k: plan_logprobs_from_logits(*a, **k)[0],
    "fused_linear_logprobs": _linear,
    "fused_linear_policy_loss": lambda *a, **k: plan_fused_linear_policy_loss(*a, **k).plan,
    "fused_linear_preference_loss": lambda *a, **k: plan_fused_linear_preference_loss(*a, **k).plan,
    "fused_linear_distillation_loss": lambda *a, **k: plan_fused_linear_distillation_loss(*a, **k).plan,
}
_BY_FUNCTION = {logprobs_from_logits: "logprobs_from_logits", fused_linear_logprobs: "fused_linear_logprobs",
                fused_linear_policy_loss: "fused_linear_policy_loss",
                fused_linear_preference_loss: "fused_linear_preference_loss",
                fused_linear_distillation_loss: "fused_linear_distillation_loss"}


def plan_of(op: Union[str, Callable], *args, **kwargs) -> Plan:
    """The ``Plan`` (``pyrl.ops.plan``) that ``op(*args, **kwargs)`` would run; the arguments are
    validated exactly as the op validates them. ``op``: the function or its name."""
    name = _BY_FUNCTION.get(op, op) if callable(op) else op
    if name not in _PLANNERS:
        raise ValueError(f"op must be one of {sorted(_PLANNERS)} (the function or its name), got {op!r}")
    return _PLANNERS[name](*args, **kwargs)


def explain(op: Union[str, Callable], *args, **kwargs) -> str:
    """Which plan ``op(*args, **kwargs)`` takes, and why, as text::

        >>> print(pyrl.explain("fused_linear_policy_loss", hidden, weight, ids, mask, adv, config=cfg))
        fused_linear_policy_loss: backend=cpp, linear=chunked, gemm=acc, chunk_rows=96 (...), passes=one
          - backend='auto' on cpu -> the cpp row body
          - ...

    Nothing is computed but the validation (and the id-range check of the targets).
    """
    return str(plan_of(op, *args, **kwargs))
