"""The float64 answer every implementation is checked against, on the very inputs it ran on.

Written from the formulas of docs/formulas.md §1 with no pyrl code, in two passes over blocks of token
rows so that even GPU-sized shapes never hold ``[N, V]`` float64 logits:

1. per-row ``logp``, ``entropy`` and ``lse``;
2. the scalar objective (a function of ``logp``/``entropy`` only) is differentiated by autograd on
   those ``[N]`` vectors, then each block's logits gradient
   ``dz = g_logp * (onehot(y) - p) - g_entropy * p * (z - sum_v p_v z_v)`` is chained into
   ``d_hidden = dz @ W`` and ``d_weight += dz.T @ h``.

For ``logits_logprobs`` the logits gradient itself is the output; it is ``[N, V]``, so only a fixed
sample of rows is kept (rows are independent, so a sample checks them exactly).
"""
from __future__ import annotations

import torch

import math

import torch.nn.functional as F

from pyrl.bench.cases import DPO_BETA, IGNORE_INDEX, JSD_BETA, Case, grpo_loss_from_logp, logprob_objective

__all__ = ["reference", "token_stats", "SAMPLED_ROWS"]

BLOCK_BYTES = 256 * 2**20  # float64 logits per block
SAMPLED_ROWS = 256


def _blocks(n: int, v: int):
    rows = max(1, BLOCK_BYTES // (8 * v))
    for s in range(0, n, rows):
        yield s, min(n, s + rows)


def _row_stats(z: torch.Tensor, y: torch.Tensor):
    lse = torch.logsumexp(z, dim=-1)
    logp = z.gather(1, y[:, None]).squeeze(1) - lse
    p = torch.exp(z - lse[:, None])
    entropy = lse - (p * z).sum(-1)
    return logp, entropy, lse


def _row_grad(z, y, lse, entropy, g_logp, g_entropy):
    p = torch.exp(z - lse[:, None])
    dz = -p * g_logp[:, None]
    dz.scatter_add_(1, y[:, None], g_logp[:, None])
    if g_entropy is not None:
        mean_z = (lse - entropy)[:, None]  # sum_v p_v z_v
        dz -= g_entropy[:, None] * p * (z - mean_z)
    return dz


def _dpo_objective(case: Case):
    """DPO's sigmoid loss on per-token float64 log-probs: sums over each completion, chosen half
    first; the reference's log-probs from its own head (docs/formulas.md §13)."""
    b, t = case.targets.shape
    valid = case.targets != IGNORE_INDEX
    h = case.ref_hidden.reshape(b * t, -1)
    w = case.ref_weight.double()
    ref = torch.empty(b * t, dtype=torch.float64, device=case.device)
    y = torch.where(valid, case.targets, 0).reshape(-1)
    for s, e in _blocks(b * t, case.v):
        ref[s:e] = _row_stats(h[s:e].double() @ w.t(), y[s:e])[0]
    ref_seq = torch.where(valid, ref.view(b, t), 0.0).sum(-1)

    def objective(logp, ent):
        seq = torch.where(valid, logp.view(b, t), 0.0).sum(-1) - ref_seq
        return -F.logsigmoid(DPO_BETA * (seq[: b // 2] - seq[b // 2:])).mean()
    return objective


def _distill_reference(case: Case) -> dict[str, torch.Tensor]:
    """The generalised JSD of docs/formulas.md §14 in float64, block by block, its gradient by
    autograd on each block's logits (the loss is a sum over tokens: blocks are independent)."""
    y = case.targets
    n, v = y.shape[0], case.v
    valid = y != IGNORE_INDEX
    count = valid.sum().clamp(min=1).double()
    h, w = case.hidden.detach(), case.weight.detach().double()
    ht, wt = case.ref_hidden.detach(), case.ref_weight.detach().double()
    loss = torch.zeros((), dtype=torch.float64, device=case.device)
    d_hidden = torch.empty(n, case.h, dtype=torch.float64, device=case.device)
    d_weight = torch.zeros(v, case.h, dtype=torch.float64, device=case.device)
    for s, e in _blocks(n, v):
        hb = h[s:e].double()
        with torch.enable_grad():
            z = (hb @ w.t()).requires_grad_()
            lp, lq = z.log_softmax(-1), (ht[s:e].double() @ wt.t()).log_softmax(-1)
            lm = torch.logaddexp(lp + math.log(1 - JSD_BETA), lq + math.log(JSD_BETA))
            per = JSD_BETA * (lq.exp() * (lq - lm)).sum(-1) + (1 - JSD_BETA) * (lp.exp() * (lp - lm)).sum(-1)
            part = torch.where(valid[s:e], per, 0.0).sum() / count
            (dz,) = torch.autograd.grad(part, z)
        loss += part.detach()
        d_hidden[s:e] = dz @ w
        d_weight.addmm_(dz.t(), hb)
    return {"loss": loss.cpu(), "d_hidden": d_hidden.cpu(), "d_weight": d_weight.cpu()}


def _objective(case: Case, outputs: tuple[str, ...]):
    if case.op == "dpo_loss":
        return _dpo_objective(case)
    if case.op == "grpo_loss":
        b, t = case.targets.shape
        return lambda logp, ent: grpo_loss_from_logp(logp.view(b, t), case.old_logp, case.advantages, case.mask)
    with_entropy = "entropy" in outputs
    return lambda logp, ent: logprob_objective(case, logp, ent if with_entropy else None)


@torch.no_grad()
def token_stats(case: Case) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pass 1: float64 ``logp``, ``entropy`` and ``lse`` per token, ``[N]`` on the case's device
    (an ignored target scores id 0; the objectives give it no weight)."""
    y = case.targets.reshape(-1).clamp(min=0)
    n, v = y.shape[0], case.v
    logp, ent, lse = (torch.empty(n, dtype=torch.float64, device=case.device) for _ in range(3))
    if case.logits is not None:
        logits = case.logits.detach()
        for s, e in _blocks(n, v):
            logp[s:e], ent[s:e], lse[s:e] = _row_stats(logits[s:e].double(), y[s:e])
    else:
        h = case.hidden.detach().reshape(n, -1)
        w = case.weight.detach().double()
        for s, e in _blocks(n, v):
            logp[s:e], ent[s:e], lse[s:e] = _row_stats(h[s:e].double() @ w.t(), y[s:e])
    return logp, ent, lse


@torch.no_grad()
def reference(case: Case, outputs: tuple[str, ...] = ("logp", "entropy"), stats=None) -> dict[str, torch.Tensor]:
    """Float64 outputs and gradients of ``case`` (on the CPU).

    ``outputs`` names the per-token outputs the implementation differentiates (log-prob ops only).
    Keys: ``logp``, ``entropy`` (if requested), ``d_hidden``, ``d_weight`` for linear_logprobs;
    ``logp``, ``entropy``, ``d_logits`` (rows ``rows`` only) for logits_logprobs; ``loss``,
    ``d_hidden``, ``d_weight`` for grpo_loss. ``stats``: ``token_stats(case)`` if already computed.
    """
    if case.op == "distill_loss":
        return _distill_reference(case)
    y = case.targets.reshape(-1).clamp(min=0)
    n, v = y.shape[0], case.v
    logp, ent, lse = stats if stats is not None else token_stats(case)
    with torch.enable_grad():
        lp, en = logp.clone().requires_grad_(), ent.clone().requires_grad_()
        objective = _objective(case, outputs)(lp, en)
        g_logp, g_ent = torch.autograd.grad(objective, [lp, en], allow_unused=True)
    g_logp = torch.zeros_like(logp) if g_logp is None else g_logp
    ref: dict[str, torch.Tensor] = {}
    if case.op in ("grpo_loss", "dpo_loss"):
        ref["loss"] = objective.detach()
    else:
        ref["logp"] = logp
        if "entropy" in outputs:
            ref["entropy"] = ent
    if case.logits is not None:
        rows = torch.linspace(0, n - 1, min(n, SAMPLED_ROWS)).round().long().unique().to(case.device)
        z = case.logits.detach()[rows].double()
        ref["d_logits"] = _row_grad(z, y[rows], lse[rows], ent[rows], g_logp[rows],
                                    None if g_ent is None else g_ent[rows])
        ref["rows"] = rows
    else:
        h = case.hidden.detach().reshape(n, -1)
        w = case.weight.detach().double()
        d_hidden = torch.empty(n, case.h, dtype=torch.float64, device=case.device)
        d_weight = torch.zeros(v, case.h, dtype=torch.float64, device=case.device)
        for s, e in _blocks(n, v):
            hb = h[s:e].double()
            dz = _row_grad(hb @ w.t(), y[s:e], lse[s:e], ent[s:e], g_logp[s:e],
                           None if g_ent is None else g_ent[s:e])
            d_hidden[s:e] = dz @ w
            d_weight.addmm_(dz.t(), hb)
        ref["d_hidden"] = d_hidden.view(case.hidden.shape)
        ref["d_weight"] = d_weight
    return {k: t.cpu() for k, t in ref.items()}
