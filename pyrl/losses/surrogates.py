"""The built-in per-token surrogates, each with the config fields it owns and their validation
(docs/formulas.md §3). Registered by importing ``pyrl.losses``."""
from __future__ import annotations

from typing import Optional

import torch

from pyrl._validate import check_number
from pyrl.losses import register_policy_loss

__all__ = ["ppo_loss", "gspo_loss", "cispo_loss", "sapo_loss", "reinforce_loss", "ppo_clipped_flags", "CLIP_PARAMS"]


def _non_negative(name, x):
    check_number(name, x, low=0)


def _non_negative_or_none(name, x):  # None only where a loss declares the field nullable
    check_number(name, x, low=0, allow_none=True)


def _above_one(name, x):
    check_number(name, x, low=1, low_open=True, allow_none=True)


def _positive(name, x):
    check_number(name, x, low=0, low_open=True)


# The clip range is shared by the clipped losses; ``delta`` and dual-clip ``clip_ratio_c`` belong
# to the PPO surrogate only.
CLIP_PARAMS = {"eps_low": _non_negative_or_none, "eps_high": _non_negative}
_PPO_PARAMS = {**CLIP_PARAMS, "delta": _above_one, "clip_ratio_c": _above_one}


def ppo_clipped_flags(r: torch.Tensor, A: torch.Tensor, lo: Optional[float], hi: float,
                      delta: Optional[float]) -> torch.Tensor:
    """Tokens whose PPO loss a bound decided (zero gradient through ``r``).

    ``A > 0``: the loss is ``-A * min(r, delta, clip(r))``, constant once ``r > min(hi, delta)``.
    ``A < 0``: ``-A * max(min(r, delta), clip(r))``, constant once ``r < lo`` or ``r > max(hi, delta)``
    (the latter only with ``delta``: plain PPO does not bound ``A < 0`` from above).
    """
    r = r.detach()
    up = hi if delta is None else min(hi, delta)
    clipped = (A > 0) & (r > up)
    if lo is not None:
        clipped = clipped | ((A < 0) & (r < lo))
    if delta is not None:
        clipped = clipped | ((A < 0) & (r > max(hi, delta)))
    return clipped


@register_policy_loss("ppo", token_separable=True, params=_PPO_PARAMS)
def ppo_loss(logp, ratio, advantages, config):
    """Clipped surrogate, PPO (Schulman et al. 2017); also GRPO (Shao et al. 2024, DeepSeekMath),
    DAPO clip-higher (Yu et al. 2025: ``eps_high > eps_low``) and Dr.GRPO (Liu et al. 2025), which
    differ only in the aggregation (docs/formulas.md §3):

        L = max(-A * r', -A * clip(r, 1 - eps_low, 1 + eps_high)),   r' = min(r, delta)

    ``delta``: two-sided clipping of INTELLECT-2 (Prime Intellect 2025). ``clip_ratio_c``: dual-clip
    PPO (Ye et al. 2020), ``L = min(L, -A * clip_ratio_c)`` for ``A < 0``.
    """
    A = advantages
    lo, hi = 1.0 - config.eps_low, 1.0 + config.eps_high
    unclipped = ratio if config.delta is None else ratio.clamp(max=config.delta)
    loss = torch.maximum(-A * unclipped, -A * ratio.clamp(lo, hi))
    clipped = ppo_clipped_flags(ratio, A, lo, hi, config.delta)
    if config.clip_ratio_c is not None:
        cap = -A * config.clip_ratio_c
        negative = A < 0
        clipped = clipped | (negative & (loss.detach() > cap))
        loss = torch.where(negative, torch.minimum(loss, cap), loss)
    return loss, clipped


@register_policy_loss("gspo", params=_PPO_PARAMS)
def gspo_loss(logp, ratio, advantages, config):
    """GSPO (Zheng et al. 2025, Group Sequence Policy Optimization): the PPO surrogate on the
    sequence-level ratio ``s_b = exp(mean_t log r)``, applied per token as
    ``r[b,t] = sg(s_b) * exp(logp - sg(logp))`` (the GSPO-token form, docs/formulas.md §2). Not
    token-separable: a token's ratio depends on its whole sequence.
    """
    return ppo_loss(logp, ratio, advantages, config)


@register_policy_loss("cispo", token_separable=True, params=CLIP_PARAMS, nullable=("eps_low",))
def cispo_loss(logp, ratio, advantages, config):
    """CISPO (MiniMax-M1, 2025): REINFORCE weighted by the clipped, detached importance ratio, so
    clipped tokens still get a gradient:

        L = -sg(clamp(r, 1 - eps_low, 1 + eps_high)) * A * logp      (eps_low None: no lower bound)

    ``clipped`` follows the Liger/TRL convention: the bound in the direction ``A`` pushes.
    """
    lo = None if config.eps_low is None else 1.0 - config.eps_low
    hi = 1.0 + config.eps_high
    weight = ratio.detach().clamp(min=lo, max=hi)
    return -weight * advantages * logp, ppo_clipped_flags(ratio, advantages, lo, hi, None)


@register_policy_loss("sapo", token_separable=True, params={"tau_pos": _positive, "tau_neg": _positive})
def sapo_loss(logp, ratio, advantages, config):
    """SAPO (Qwen 2025, Soft Adaptive Policy Optimization): a smooth sigmoid gate replaces the hard
    clip, with a sharper temperature for negative advantages:

        L = -(4 / tau) * sigmoid(tau * (r - 1)) * A,    tau = tau_pos if A > 0 else tau_neg
    """
    pos, neg = (torch.tensor(x, dtype=ratio.dtype, device=ratio.device) for x in (config.tau_pos, config.tau_neg))
    tau = torch.where(advantages > 0, pos, neg)
    return -(4.0 / tau) * torch.sigmoid(tau * (ratio - 1.0)) * advantages, None


@register_policy_loss("reinforce", token_separable=True)
def reinforce_loss(logp, ratio, advantages, config):
    """Vanilla policy gradient (REINFORCE, Williams 1992): ``L = -A * logp``, no ratio, no clip."""
    return -advantages * logp, None
