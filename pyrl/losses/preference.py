"""Preference-optimisation losses on per-sequence log-probabilities (docs/formulas.md §13).

Formula-only: every function takes per-sequence tensors ``[B]`` (the log-prob of each completion,
summed or averaged over its tokens) and returns per-sequence losses ``[B]``; the fused op
``pyrl.fused_linear_preference_loss`` computes the log-probs from hidden states and averages.

* ``pair_loss(loss_type, ...)``: the paired losses (chosen/rejected completions of one prompt):
  the DPO family (reference-relative log-ratios), SimPO, CPO and ORPO, with the rewards each
  reports.
* ``kto_loss(...)``: KTO's unpaired loss (each completion labelled desirable or not).
* ``kto_kl_baseline(...)``: KTO's reference point from mismatched completions.

Losses (``h = chosen log-ratio - rejected log-ratio``, a log-ratio being ``logp - logp_ref``):

| loss_type | per-pair loss | paper |
|---|---|---|
| ``sigmoid`` | ``-log sigmoid(beta h)`` | DPO, Rafailov et al. 2023 |
| ``hinge`` | ``relu(1 - beta h)`` | SLiC, Zhao et al. 2023 |
| ``ipo`` | ``(h / |y| - 1/(2 beta))^2`` (log-ratios per token) | IPO, Azar et al. 2023 |
| ``robust`` | ``(-(1-e) log s(beta h) + e log s(-beta h)) / (1 - 2e)`` | Robust DPO, Chowdhury et al. 2024 |
| ``exo_pair`` | ``KL([s(beta h), s(-beta h)] || [1-e, e])`` | EXO, Ji et al. 2024 |
| ``nca_pair`` | ``-log s(r_w) - (log s(-r_w) + log s(-r_l)) / 2`` | NCA, Chen et al. 2024 |
| ``bco_pair`` | ``-log s(r_w) - log s(-r_l)`` | BCO, Jung et al. 2024 |
| ``sppo_hard`` | ``(a_w - 1/(2 beta))^2 + (a_l + 1/(2 beta))^2`` | SPPO, Wu et al. 2024 |
| ``apo_zero`` | ``1 - s(r_w) + s(r_l)`` | APO, D'Oosterlinck et al. 2024 |
| ``apo_down`` | ``s(r_w) + 1 - s(beta h)`` | APO |
| ``discopop`` | ``(1 - s(beta h / tau)) (-log s(beta h)) + s(beta h / tau) exp(-beta h)`` | DiscoPOP, Chris Lu et al. 2024 |
| ``simpo`` | ``-(1-e) log s(beta (l_w - l_l) - gamma) - e log s(-...)``, ``l`` per-token means | SimPO, Meng et al. 2024 |
| ``cpo`` | ``-(1-e) log s(beta (l_w - l_l)) - e log s(-...)`` | CPO, Xu et al. 2024 |
| ``orpo`` | ``-beta log s(log odds(l_w) - log odds(l_l))``, ``odds = p / (1 - p)`` | ORPO, Hong et al. 2024 |

``s`` is the sigmoid, ``e`` the label smoothing, ``r = beta * log-ratio`` the implicit reward,
``a`` a log-ratio. The DPO family's rewards are ``beta * (logp - logp_ref)``; SimPO, CPO and ORPO
are reference-free and report ``beta * logp``.
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F

__all__ = ["DPO_LOSS_TYPES", "REFERENCE_FREE_LOSS_TYPES", "PAIR_LOSS_TYPES", "PREFERENCE_LOSS_TYPES", "pair_loss",
           "kto_loss", "kto_kl_baseline", "log1mexp"]

DPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "robust", "exo_pair", "nca_pair", "bco_pair", "sppo_hard", "apo_zero",
                  "apo_down", "discopop")
REFERENCE_FREE_LOSS_TYPES = ("simpo", "cpo", "orpo")
PAIR_LOSS_TYPES = DPO_LOSS_TYPES + REFERENCE_FREE_LOSS_TYPES
PREFERENCE_LOSS_TYPES = PAIR_LOSS_TYPES + ("kto",)


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(x))`` for ``x <= 0``, accurate at both ends (Maechler 2012); ``x`` is clamped
    just below 0 so a log-prob of exactly 0 gives a large finite value, never ``-inf``/NaN."""
    x = x.clamp(max=-torch.finfo(x.dtype).tiny)
    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def _smoothed_logistic(logits: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    return -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)


def pair_loss(loss_type: str, chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, *,
              ref_chosen_logps: Optional[torch.Tensor] = None, ref_rejected_logps: Optional[torch.Tensor] = None,
              beta: float = 0.1, label_smoothing: float = 0.0, gamma: float = 0.5, discopop_tau: float = 0.05,
              chosen_lengths: Optional[torch.Tensor] = None, rejected_lengths: Optional[torch.Tensor] = None,
              ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, Dict[str, torch.Tensor]]:
    """Per-pair losses ``[B]`` of one ``loss_type`` (module table), with ``(losses, chosen_rewards,
    rejected_rewards, extras)``; ``extras`` holds ORPO's ``log_odds`` ``[B]``.

    ``chosen_logps``/``rejected_logps``: each completion's log-prob (a sum over its tokens; SimPO,
    CPO and ORPO are given means where their papers use them). ``ref_*``: the reference model's
    (None: 0, Liger's ``use_ref_model=False``). ``chosen_lengths``/``rejected_lengths``: token
    counts, needed by ``ipo`` (TRL's length normalisation, clamped at 1).
    """
    zero = chosen_logps.new_zeros(())
    if loss_type in REFERENCE_FREE_LOSS_TYPES:
        chosen_rewards, rejected_rewards = beta * chosen_logps, beta * rejected_logps
        extras = {}
        if loss_type == "orpo":
            log_odds = (chosen_logps - rejected_logps) - (log1mexp(chosen_logps) - log1mexp(rejected_logps))
            losses = -beta * F.logsigmoid(log_odds)
            extras["log_odds"] = log_odds
        else:
            margin = beta * (chosen_logps - rejected_logps) - (gamma if loss_type == "simpo" else 0.0)
            losses = _smoothed_logistic(margin, label_smoothing)
        return losses, chosen_rewards, rejected_rewards, extras
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {PREFERENCE_LOSS_TYPES}, got {loss_type!r}")

    a_w = chosen_logps - (zero if ref_chosen_logps is None else ref_chosen_logps)
    a_l = rejected_logps - (zero if ref_rejected_logps is None else ref_rejected_logps)
    r_w, r_l = beta * a_w, beta * a_l
    h = beta * (a_w - a_l)
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(h)
    elif loss_type == "hinge":
        losses = torch.relu(1 - h)
    elif loss_type == "ipo":
        if chosen_lengths is None or rejected_lengths is None:
            raise ValueError("loss_type='ipo' needs chosen_lengths and rejected_lengths (tokens per completion)")
        per_token = a_w / chosen_lengths.clamp(min=1) - a_l / rejected_lengths.clamp(min=1)
        losses = (per_token - 1 / (2 * beta)) ** 2
    elif loss_type == "robust":
        e = label_smoothing
        losses = (-(1 - e) * F.logsigmoid(h) + e * F.logsigmoid(-h)) / (1 - 2 * e)
    elif loss_type == "exo_pair":
        e = label_smoothing
        losses = (torch.sigmoid(h) * (F.logsigmoid(h) - math.log1p(-e))
                  + torch.sigmoid(-h) * (F.logsigmoid(-h) - math.log(e)))
    elif loss_type == "nca_pair":
        losses = -F.logsigmoid(r_w) - 0.5 * F.logsigmoid(-r_w) - 0.5 * F.logsigmoid(-r_l)
    elif loss_type == "bco_pair":
        losses = -F.logsigmoid(r_w) - F.logsigmoid(-r_l)
    elif loss_type == "sppo_hard":
        losses = (a_w - 0.5 / beta) ** 2 + (a_l + 0.5 / beta) ** 2
    elif loss_type == "apo_zero":
        losses = 1 - torch.sigmoid(r_w) + torch.sigmoid(r_l)
    elif loss_type == "apo_down":
        losses = torch.sigmoid(r_w) + 1 - torch.sigmoid(h)
    else:  # discopop
        mix = torch.sigmoid(h / discopop_tau)
        # exp(-h) overflows to inf where mix is 0 exactly (h very negative); the mix then picks the logistic term
        exp_term = torch.where(mix > 0, torch.exp(-h), 0.0)
        losses = -F.logsigmoid(h) * (1 - mix) + exp_term * mix
    return losses, r_w, r_l, {}


def kto_loss(logps: torch.Tensor, desirable: torch.Tensor, *, ref_logps: Optional[torch.Tensor] = None,
             kl: Optional[torch.Tensor] = None, beta: float = 0.1, desirable_weight: float = 1.0,
             undesirable_weight: float = 1.0) -> Tuple[torch.Tensor, torch.Tensor]:
    """KTO (Ethayarajh et al. 2024, eq. 7) per completion: with the log-ratio ``a = logp - logp_ref``
    and the reference point ``z = kl`` (0 when None),

        desirable:    w_d (1 - sigmoid(beta (a - z)))
        undesirable:  w_u (1 - sigmoid(beta (z - a)))

    ``desirable`` ``[B]`` bool. Returns ``(losses [B], rewards = beta * a [B])``.
    """
    a = logps - (0.0 if ref_logps is None else ref_logps)
    z = 0.0 if kl is None else kl
    sign = torch.where(desirable, 1.0, -1.0).to(a.dtype)
    weight = torch.where(desirable, desirable_weight, undesirable_weight).to(a.dtype)
    return weight * (1 - torch.sigmoid(beta * (a - z) * sign)), beta * a


def kto_kl_baseline(kl_logps: torch.Tensor, ref_kl_logps: torch.Tensor) -> torch.Tensor:
    """KTO's reference point: ``max(0, mean(logp - logp_ref))`` over mismatched (prompt, completion)
    pairs, detached (TRL's ``KL_completion_ids``; average it across data-parallel ranks before use)."""
    return (kl_logps - ref_kl_logps).mean().detach().clamp(min=0)
