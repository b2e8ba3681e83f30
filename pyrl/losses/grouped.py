"""Sequence-level objectives over the groups of a batch: ``pacs`` and ``disco`` (docs/formulas.md
§3.11, §3.12).

Both score whole completions and compare them within their prompt's group of ``group_size``
contiguous rows (``None``: the whole call is one group), so they see the ``[B, T]`` batch
(``needs_mask``), are not token-separable, and run on the two-pass plan on every backend. Like
``geo_mean``, the per-sequence loss ``L_b`` is placed on every valid token of ``b``:
``agg="seq-mean-token-mean"`` gives ``mean_b L_b``, the papers' objective.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from pyrl._validate import check_number
from pyrl.losses import register_policy_loss

__all__ = ["pacs_loss", "disco_loss", "DISCO_SCORES"]

DISCO_SCORES = ("l_ratio", "log_l")


def _group_size_or_none(name, x):
    check_number(name, x, low=1, integer=True, allow_none=True)


def _positive(name, x):
    check_number(name, x, low=0, low_open=True)


def _non_negative(name, x):
    check_number(name, x, low=0)


def _positive_or_none(name, x):
    check_number(name, x, low=0, low_open=True, allow_none=True)


def _score_choice(name, x):
    if x not in DISCO_SCORES:
        raise ValueError(f"{name} must be one of {', '.join(repr(s) for s in DISCO_SCORES)}, got {x!r}")


def _groups(x: torch.Tensor, config) -> torch.Tensor:
    """``[B]`` -> ``[B // G, G]`` (``G = config.group_size``, default ``B``)."""
    B = x.shape[0]
    G = B if config.group_size is None else config.group_size
    if B % max(G, 1):
        raise ValueError(f"PolicyLossConfig.group_size={G} must divide the batch of {B} sequences "
                         f"(the completions of a prompt are contiguous rows)")
    return x.view(-1, max(G, 1))


def _per_sequence(x, m):
    """Masked mean over each row, ``[B, T]`` -> ``[B]`` (0 for an empty row), and the counts."""
    n = m.sum(-1)
    return (x * m).sum(-1) / n.clamp(min=1), n


@register_policy_loss("pacs", params={"group_size": _group_size_or_none, "pacs_beta": _positive},
                      needs_mask=True)
def pacs_loss(logp, ratio, advantages, config, *, mask):
    """PACS (Li et al. 2025, "Implicit Actor Critic Coupling via a Supervised Learning Framework for
    RLVR"; docs/formulas.md §3.12): the verifiable reward is a label and the policy a classifier of
    its own completions::

        rhat_b = pacs_beta * sum_t log r[b,t]                   # reward proxy: the sequence log-ratio
        psi_b  = rhat_b - mean_{j != b in the group} rhat_j     # RLOO score (0 baseline for G = 1)
        L_b    = BCE(sigmoid(psi_b), y_b) = softplus(psi_b) - y_b * psi_b

    ``y_b`` is the sequence's mean advantage clamped to ``[0, 1]``: pass the 0/1 reward itself
    (``advantages.compute("reward", ...)``). ``L_b`` is returned on every token of ``b``; use
    ``agg="seq-mean-token-mean"``. ``clipped``: None.
    """
    m = mask.to(logp.dtype)
    x = ratio.log()  # the token log-ratio to the behaviour policy, clamped as the ratio is (§2)
    rhat = config.pacs_beta * (x * m).sum(-1)
    y = _per_sequence(advantages, m)[0].clamp(0.0, 1.0)
    g = _groups(rhat, config)
    G = g.shape[1]
    others = (g.sum(1, keepdim=True) - g) / (G - 1) if G > 1 else torch.zeros_like(g)
    psi = (g - others).reshape(-1)
    loss = F.softplus(psi) - y * psi
    return loss.unsqueeze(-1).expand_as(logp), None


@register_policy_loss("disco", params={"group_size": _group_size_or_none, "disco_score": _score_choice,
                                       "disco_tau": _positive_or_none, "disco_delta": _non_negative,
                                       "disco_beta": _non_negative}, needs_mask=True)
def disco_loss(logp, ratio, advantages, config, *, mask):
    """DisCO (Li et al. 2025, "DisCO: Reinforcing Large Reasoning Models with Discriminative
    Constrained Optimization"; docs/formulas.md §3.11): a discriminative objective that raises the
    score of a group's positive completions over its negative ones, with the trust region a
    constraint, enforced by a squared-hinge penalty::

        s_b  = mean_t r[b,t]  ("l_ratio")   or   mean_t logp[b,t]  ("log_l")
        J_q  = mean_{P_q} s  -  mean_{N_q} s                        (disco_tau None: DisCO-b)
        J_q  = mean_{P_q} s  -  tau * log mean_{N_q} exp(s / tau)   (disco_tau = tau: DisCO)
        KL   = mean over the valid tokens of the call of -log r     (KL(pi_old || pi_theta), k1)
        loss = -mean_q J_q + disco_beta * max(KL - disco_delta, 0)^2

    ``P_q``/``N_q``: the completions of group ``q`` with mean advantage ``> 0`` / ``< 0`` (GRPO's
    advantages of 0/1 rewards mark the correct/incorrect ones; groups without both give 0). The
    loss is spread so that each sequence's ``L_b`` averages to it over the batch (``agg=
    "seq-mean-token-mean"``). ``clipped``: None (nothing is clipped).
    """
    m = mask.to(logp.dtype)
    score = ratio if config.disco_score == "l_ratio" else logp
    s, n = _per_sequence(score, m)
    a = _per_sequence(advantages, m)[0].detach()
    pos, neg = _groups(a > 0, config), _groups(a < 0, config)
    sg = _groups(s, config)
    G = sg.shape[1]
    n_pos = pos.sum(1, keepdim=True).clamp(min=1).to(s.dtype)
    n_neg = neg.sum(1, keepdim=True).clamp(min=1).to(s.dtype)
    both = pos.any(1, keepdim=True) & neg.any(1, keepdim=True)
    zero = torch.zeros_like(sg)
    if config.disco_tau is None:
        neg_term = torch.where(neg, sg, zero) / n_neg
    else:
        tau = config.disco_tau
        lse = torch.logsumexp(torch.where(neg, sg / tau, torch.full_like(sg, float("-inf"))), 1, keepdim=True)
        soft = tau * (torch.where(both, lse, zero) - n_neg.log())     # tau * log mean_N exp(s / tau)
        neg_term = torch.where(neg, soft.expand_as(sg), zero) / n_neg
    per_seq = torch.where(pos, -sg / n_pos, neg_term)
    per_seq = G * torch.where(both, per_seq, zero).reshape(-1)
    count = m.sum()
    kl = -(ratio.log() * m).sum() / count.clamp(min=1)
    penalty = config.disco_beta * (kl - config.disco_delta).clamp(min=0) ** 2
    return (per_seq + penalty).unsqueeze(-1).expand_as(logp), None
