"""GMPO, Geometric-Mean Policy Optimization: ``geo_mean`` (docs/formulas.md §3.10).

Zhao et al. 2025, "GMPO: Geometric-Mean Policy Optimization" (arXiv:2507.20673): GRPO maximises
the arithmetic mean of the token rewards ``r_t * A``; GMPO the geometric mean, whose importance
ratio ``exp(mean_t log r_t)`` is far less sensitive to outlier tokens, with the clip applied to each
token's log-ratio, in the direction of the advantage, before the mean. Follows verl 0.8
(``core_algos.compute_policy_loss_geo_mean``).
"""
from __future__ import annotations

import torch

from pyrl.losses import register_policy_loss
from pyrl.losses.surrogates import CLIP_PARAMS

__all__ = ["geo_mean_loss"]


@register_policy_loss("geo_mean", params=CLIP_PARAMS, needs_mask=True)
def geo_mean_loss(logp, ratio, advantages, config, *, mask):
    """GMPO (docs/formulas.md §3.10). With ``x = log r`` per token and ``s = sign(A)``::

        c_t   = s * min(s * x_t, s * clip(x_t, -eps_low, eps_high))     # clipped in A's direction
        rho_b = exp(mean_t c_t),   A_b = mean_t A_t                      # over the valid tokens
        L_b   = -A_b * rho_b

    ``eps_low``/``eps_high`` bound the *log*-ratio (GMPO uses 0.4 each). ``L_b`` is returned on
    every token of sequence ``b``, so ``agg="seq-mean-token-mean"`` gives GMPO's (and verl's)
    ``mean_b L_b``. ``clipped``: ``A > 0`` and ``x > eps_high``, or ``A < 0`` and ``x < -eps_low``.
    """
    m = mask.to(logp.dtype)
    x = ratio.log()  # the token log-ratio, clamped as the ratio is (docs/formulas.md §2)
    sign = torch.sign(advantages)
    c = sign * torch.minimum(sign * x, sign * x.clamp(-config.eps_low, config.eps_high))
    n = m.sum(-1, keepdim=True).clamp(min=1)
    rho = ((c * m).sum(-1, keepdim=True) / n).exp()
    A = (advantages * m).sum(-1, keepdim=True) / n
    xd = x.detach()
    clipped = ((advantages > 0) & (xd > config.eps_high)) | ((advantages < 0) & (xd < -config.eps_low))
    return (-A * rho).expand_as(logp), clipped
