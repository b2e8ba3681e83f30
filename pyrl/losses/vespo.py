"""VESPO's sequence weight (docs/formulas.md §12): the detached per-sequence coefficient of a
REINFORCE term, ``L = -phi(w_b) * A_b * logp`` (Liger/TRL ``loss_type="vespo"``).

VESPO, Variational Sequence-Level Soft Policy Optimization (arXiv:2602.10693, 2026), replaces the
hard clip of PPO by a smooth, asymmetric gamma-shaped weight of the sequence-level importance
weight ``w``:

    phi(w) = exp(lambda) * w^k * exp(-lambda * w)          (so phi(1) = 1)
    log phi(w) = lambda + k * log w - lambda * w

with ``(k, lambda) = (k_pos, lambda_pos)`` for ``A >= 0`` and ``(k_neg, lambda_neg)`` for ``A < 0``;
``phi`` peaks at ``w = k / lambda`` and vanishes as ``w -> 0`` or ``w -> inf``. The weight is
computed in log space, as TRL does, with TRL's clamps:

    log w_b = clamp(sum_t m_bt * clamp(log r_bt, -20, 20) + log v_b, log(1e-8), 20)

``r_bt = pi_theta / pi_old`` per token, ``v_b`` the rollout engine's importance ratio (each token's
``log v`` clamped to ``[log(1e-8), 20]`` and summed over the valid tokens, or one per sequence).
``phi`` is a constant of the loss (no gradient flows through it).
"""
from __future__ import annotations

import math
from typing import Optional

import torch

__all__ = ["VESPO_MIN_LOG_WEIGHT", "VESPO_MAX_LOG", "vespo_log_weight", "vespo_weight"]

VESPO_MIN_LOG_WEIGHT = math.log(1e-8)  # TRL's floor on the sequence log-weight (and each log v)
VESPO_MAX_LOG = 20.0  # TRL's clamp on each token's log-ratio, each log v and the sequence log-weight


@torch.no_grad()
def vespo_log_weight(valid: torch.Tensor, log_ratio: Optional[torch.Tensor] = None,
                     rollout_ratio: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The clamped sequence log-weight ``log w`` ``[B, 1]`` fp32 (module docstring).

    Args:
        valid: ``[B, T]`` bool, the completion tokens.
        log_ratio: ``[B, T]`` ``logp - logp_old`` per token, or ``None`` (on-policy: ``r = 1``).
        rollout_ratio: the rollout engine's importance ratio, ``[B]``, ``[B, 1]`` (per sequence) or
            ``[B, T]`` (per token; padded positions are ignored), or ``None``.
    """
    log_w = torch.zeros(valid.shape[0], 1, dtype=torch.float32, device=valid.device)
    if log_ratio is not None:
        log_r = log_ratio.float().clamp(-VESPO_MAX_LOG, VESPO_MAX_LOG)
        log_w = log_w + torch.where(valid, log_r, 0.0).sum(-1, keepdim=True)
    if rollout_ratio is not None:
        log_v = rollout_ratio.float().log().clamp(VESPO_MIN_LOG_WEIGHT, VESPO_MAX_LOG)
        log_v = log_v.unsqueeze(-1) if log_v.dim() == 1 else log_v
        if log_v.shape[1] != 1:
            log_v = torch.where(valid, log_v, 0.0)
        log_w = log_w + log_v.sum(-1, keepdim=True)
    return log_w.clamp(VESPO_MIN_LOG_WEIGHT, VESPO_MAX_LOG)


@torch.no_grad()
def vespo_weight(log_w: torch.Tensor, advantages: torch.Tensor, *, k_pos: float = 2.0, lambda_pos: float = 3.0,
                 k_neg: float = 3.0, lambda_neg: float = 2.0) -> torch.Tensor:
    """VESPO's detached sequence weight ``phi(w) = exp(lambda + k * log w - lambda * w)`` ``[B, 1]``.

    ``log_w`` ``[B, 1]`` is the sequence log-weight (``vespo_log_weight``); ``advantages`` ``[B]``
    (or ``[B, 1]``) picks ``(k, lambda)`` by its sign (``A >= 0``: the ``_pos`` pair). ``lambda`` is
    floored at ``1e-4`` and a non-finite ``phi`` becomes 0, as in TRL. The defaults are TRL's and
    Liger's (``vespo_k_pos`` ... ``vespo_lambda_neg``).
    """
    nonneg = advantages >= 0
    nonneg = nonneg.unsqueeze(-1) if nonneg.dim() == 1 else nonneg
    k = torch.where(nonneg, float(k_pos), float(k_neg))
    lam = torch.where(nonneg, float(lambda_pos), float(lambda_neg)).clamp(min=1e-4)
    phi = (lam + k * log_w - lam * log_w.exp()).exp()
    return phi.nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)
