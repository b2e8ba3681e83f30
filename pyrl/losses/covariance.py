"""Covariance-selected PPO: ``clip_cov`` and ``kl_cov`` (docs/formulas.md §3.8, §3.9).

Cui et al. 2025, "The Entropy Mechanism of Reinforcement Learning for Reasoning Language Models":
the policy entropy falls fastest through the tokens whose log-prob and advantage covary most,

    cov[b,t] = (A[b,t] - mean(A)) * (logp[b,t] - mean(logp))        (means over the valid tokens)

so a small fraction of those tokens is either excluded from the gradient (Clip-Cov) or penalised
by ``|log r|`` (KL-Cov). Both follow verl 0.8 (``core_algos.compute_policy_loss_clip_cov`` /
``_kl_cov``) in every choice verl makes, including Clip-Cov's random pick of tokens among the
eligible ones (``torch.randperm`` on torch's global CPU generator, so ``torch.manual_seed`` makes
it reproducible). The selection is over the whole batch: neither loss is token-separable, so the
fused op runs them on the two-pass plan on every backend (docs/formulas.md §10).
"""
from __future__ import annotations

import math
import numbers

import torch

from pyrl._validate import check_number
from pyrl.losses import register_policy_loss
from pyrl.losses.surrogates import CLIP_PARAMS

__all__ = ["clip_cov_loss", "kl_cov_loss", "token_covariance", "CLIP_COV_DEFAULTS", "KL_COV_DEFAULTS"]

# verl's defaults for a field left at None (verl's ActorConfig.policy_loss)
CLIP_COV_DEFAULTS = {"clip_cov_ratio": 2e-4, "clip_cov_lb": 1.0, "clip_cov_ub": 5.0}
KL_COV_DEFAULTS = {"kl_cov_ratio": 2e-4, "ppo_kl_coef": 1.0}


def _fraction(name, x):
    check_number(name, x, low=0, high=1, low_open=True, allow_none=True)


def _bound(name, x):  # a covariance bound: any real number, +-inf meaning no bound
    if isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isinf(x):
        return
    check_number(name, x, allow_none=True)


def _non_negative(name, x):
    check_number(name, x, low=0, allow_none=True)


def _setting(config, name: str, defaults: dict) -> float:
    value = getattr(config, name)
    return defaults[name] if value is None else float(value)


def token_covariance(logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``cov[b,t] = (A - mean A) * (logp - mean logp)`` ``[B, T]``, detached, means over ``mask``;
    ``-inf`` at invalid tokens (so they are never selected)."""
    m = mask.to(logp.dtype)
    n = m.sum().clamp(min=1)
    lp, A = logp.detach(), advantages.detach()
    cov = (A - (A * m).sum() / n) * (lp - (lp * m).sum() / n)
    return torch.where(mask, cov, float("-inf"))


def _selected_count(mask: torch.Tensor, ratio: float) -> torch.Tensor:
    """``max(int(ratio * n), 1)`` for ``n`` valid tokens, as a 0-dim int64 tensor (verl's count;
    the product is taken in float64, as Python takes it)."""
    n = mask.sum().to(torch.float64)
    return (n * ratio).floor().clamp(min=1).to(torch.int64)


@register_policy_loss("clip_cov", params={**CLIP_PARAMS, "clip_cov_ratio": _fraction, "clip_cov_lb": _bound,
                                          "clip_cov_ub": _bound}, needs_mask=True)
def clip_cov_loss(logp, ratio, advantages, config, *, mask):
    """Clip-Cov (Cui et al. 2025; verl ``clip_cov``): the PPO surrogate (no dual clip, no ``delta``),
    with the gradient of ``k = max(int(clip_cov_ratio * n), 1)`` tokens removed, drawn uniformly
    among the valid tokens the PPO clip left alone whose covariance lies in
    ``(clip_cov_lb, clip_cov_ub)`` (docs/formulas.md §3.8)::

        L = max(-A * r, -A * clip(r, 1 - eps_low, 1 + eps_high)) * (1 - selected)

    ``clipped``: the PPO-clipped tokens and the selected ones (both get no gradient).
    """
    ratio_k = _setting(config, "clip_cov_ratio", CLIP_COV_DEFAULTS)
    lb, ub = _setting(config, "clip_cov_lb", CLIP_COV_DEFAULTS), _setting(config, "clip_cov_ub", CLIP_COV_DEFAULTS)
    A = advantages
    pg1 = -A * ratio
    pg2 = -A * ratio.clamp(1.0 - config.eps_low, 1.0 + config.eps_high)
    by_clip = (pg2 > pg1) & mask
    cov = token_covariance(logp, A, mask)
    eligible = (cov > lb) & (cov < ub) & mask & ~by_clip
    candidates = eligible.reshape(-1).nonzero().squeeze(-1)   # row-major, as verl's torch.nonzero
    selected = torch.zeros_like(eligible)
    if candidates.numel() > 0:  # verl draws only when there is a candidate (one randperm, global generator)
        k = int(_selected_count(mask, ratio_k))
        pick = candidates[torch.randperm(candidates.numel())[:k].to(candidates.device)]
        selected = selected.reshape(-1).index_fill(0, pick, True).reshape(eligible.shape)
    loss = torch.where(selected, torch.zeros_like(pg1), torch.maximum(pg1, pg2))
    return loss, by_clip | selected


@register_policy_loss("kl_cov", params={"kl_cov_ratio": _fraction, "ppo_kl_coef": _non_negative}, needs_mask=True)
def kl_cov_loss(logp, ratio, advantages, config, *, mask):
    """KL-Cov (Cui et al. 2025; verl ``kl_cov``): the unclipped surrogate ``-A * r``, plus
    ``ppo_kl_coef * |log r|`` on the ``k = max(int(kl_cov_ratio * n), 1)`` valid tokens of largest
    covariance (docs/formulas.md §3.9; ties go to the earlier token). No clip: ``clipped = None``.
    """
    ratio_k = _setting(config, "kl_cov_ratio", KL_COV_DEFAULTS)
    coef = _setting(config, "ppo_kl_coef", KL_COV_DEFAULTS)
    cov = token_covariance(logp, advantages, mask).reshape(-1)
    # rank of each token by covariance, largest first; a sort instead of topk keeps k a tensor (no sync)
    order = torch.sort(cov, descending=True, stable=True).indices
    rank = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))
    selected = ((rank < _selected_count(mask, ratio_k)) & mask.reshape(-1)).reshape(mask.shape)
    loss = -advantages * ratio
    penalty = coef * ratio.log().abs()  # |log r|, log r clamped as the ratio is (docs/formulas.md §2)
    return torch.where(selected, loss + penalty, loss), None
