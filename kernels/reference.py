"""The plain-PyTorch reference of every row kernel, and the contract all row bodies share.

A *row body* turns one block of logits ``[n, V]`` (raw, before the temperature) into per-row
statistics and back (docs/formulas.md §1):

    z = logits / temperature
    m = max_v z,  s = sum_v exp(z - m),  t = sum_v exp(z - m) (z - m)       (the row "stats")
    lse = m + log s,   logp = z_y - lse,   entropy = log s - t / s
    d z = g_logp (onehot(y) - p) - g_ent p (z - mu),   p = exp(z - lse),  mu = lse - entropy

Keeping ``t`` relative to the max is what lets ``entropy = log s - t / s`` be formed without
cancelling two large numbers. Every body (this one, ``torch.ops.pyrl.logprobs_*`` in
``csrc/logprobs_cpu.cpp``, Triton's ``pyrl.kernels.rows``) has the same two calls:

    fwd(logits [n, V], targets [n], params) -> (logp, entropy, lse)      each [n], fp32 (fp64 for fp64)
    bwd(logits, targets, lse, entropy, g_logp, g_ent | None, params, out=None) -> d logits [n, V]

``bwd`` writes into ``out`` when given (``out`` may be ``logits`` itself: the gradient replaces
the logits in place). ``targets == params.ignore_index`` gives 0 and no gradient. This module is
the reference the others are tested against; it is written as stats -> merge -> finish so that the
vocabulary-parallel plan (``pyrl.ops.vocab_parallel``) can merge the stats of vocabulary shards
across ranks between the two steps, with no second copy of the maths.

A row's result never depends on the other rows: the max is exact and every sum over the
vocabulary runs over fixed blocks of ``SUM_BLOCK`` entries (a single ``sum`` over a row longer
than ATen's grain size is split across threads when it is the only output, which changes its
rounding with the number of rows), so log-probs and entropy are batch-invariant bit for bit.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch

__all__ = ["RowParams", "RowStats", "TorchRows", "acc_dtype", "row_sum", "kl_rows_fwd", "kl_rows_bwd"]

SUM_BLOCK = 2048


@dataclass(frozen=True)
class RowParams:
    """What every row body needs besides the tensors."""

    temperature: float = 1.0
    ignore_index: int = -100
    need_entropy: bool = False


class RowStats(NamedTuple):
    """Per-row summaries of a block of logits: ``m`` (max of z), ``s`` and ``t`` (relative to
    ``m``), ``zy`` (the target's z; 0 where the target is not in this block of the vocabulary)."""

    m: torch.Tensor
    s: torch.Tensor
    t: torch.Tensor
    zy: torch.Tensor


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation dtype: fp64 for fp64 inputs, fp32 for everything else."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def row_sum(x: torch.Tensor) -> torch.Tensor:
    """``x.sum(-1)`` for ``[n, V]`` with a reduction order that does not depend on ``n``."""
    n, V = x.shape
    if V <= SUM_BLOCK:
        return x.sum(-1)
    k = V // SUM_BLOCK
    parts = x[:, : k * SUM_BLOCK].unflatten(1, (k, SUM_BLOCK)).sum(-1)  # a view: no copy
    if V % SUM_BLOCK:
        parts = torch.cat([parts, x[:, k * SUM_BLOCK:].sum(-1, keepdim=True)], dim=1)
    return parts.sum(-1)


def _scaled(logits: torch.Tensor, p: RowParams) -> torch.Tensor:
    return logits.to(acc_dtype(logits.dtype)) / p.temperature


def _here(targets: torch.Tensor, V: int, p: RowParams) -> torch.Tensor:
    """Rows whose target id lies in this block's vocabulary ``[0, V)`` (an id >= V is a valid
    target held by another vocabulary shard)."""
    return (targets != p.ignore_index) & (targets >= 0) & (targets < V)


class TorchRows:
    """The reference row body (plain PyTorch, in the accumulation dtype)."""

    @staticmethod
    def stats(logits: torch.Tensor, targets: torch.Tensor, p: RowParams) -> RowStats:
        z = _scaled(logits, p)
        acc = z.dtype
        m = z.amax(dim=-1)
        m_safe = torch.where(torch.isfinite(m), m, 0.0).unsqueeze(1)
        # -inf logits are floored so that exp(d) * d is 0 * (large finite) = 0, never 0 * -inf
        d = (z - m_safe).clamp_(min=torch.finfo(acc).min)
        e = d.exp()
        s = row_sum(e)
        t = row_sum(e.mul_(d)) if p.need_entropy else torch.zeros_like(s)
        here = _here(targets, z.shape[1], p)
        zy = z.gather(1, torch.where(here, targets, 0).unsqueeze(1)).squeeze(1)
        return RowStats(m, s, t, torch.where(here, zy, 0.0))

    @staticmethod
    def finish(st: RowStats, targets: torch.Tensor, p: RowParams):
        """(logp, entropy, lse) from merged stats (all-(-inf) rows: lse = -inf, logp = -inf)."""
        log_s = st.s.log()
        lse = st.m + log_s
        finite = torch.isfinite(lse)
        valid = targets != p.ignore_index
        logp = torch.where(finite, (st.zy - lse).clamp(max=0.0), float("-inf"))
        logp = torch.where(valid, logp, 0.0)
        if p.need_entropy:
            ent = (log_s - st.t / st.s).clamp(min=0.0)
            ent = torch.where(valid & finite, ent, 0.0)
        else:
            ent = torch.zeros_like(lse)
        return logp, ent, lse

    @staticmethod
    def fwd(logits, targets, p: RowParams):
        return TorchRows.finish(TorchRows.stats(logits, targets, p), targets, p)

    @staticmethod
    def bwd(logits, targets, lse, ent, g_logp, g_ent, p: RowParams, out=None):
        z = _scaled(logits, p)
        acc = z.dtype
        finite = torch.isfinite(lse)
        ok = (targets != p.ignore_index) & finite
        # Every finite row's own lse (even ignored ones) keeps p from overflowing; rows that are not
        # `ok` are zeroed with where() at the end: multiplying an inf by 0 would give NaN.
        safe_lse = torch.where(finite, lse, 0.0).unsqueeze(1)
        zc = z.clamp(min=torch.finfo(acc).min)
        prob = (zc - safe_lse).exp()
        g1 = torch.where(ok, g_logp.to(acc), 0.0).unsqueeze(1)
        dz = -prob * g1
        if g_ent is not None:
            mu = torch.where(ok, lse - ent, 0.0).unsqueeze(1)  # sum_v p_v z_v
            g2 = torch.where(ok, g_ent.to(acc), 0.0).unsqueeze(1)
            dz = dz - g2 * prob * (zc - mu)
        here = ok & _here(targets, z.shape[1], p)
        dz.scatter_add_(1, torch.where(here, targets, 0).unsqueeze(1), torch.where(here.unsqueeze(1), g1, 0.0))
        dz = torch.where(ok.unsqueeze(1), dz / p.temperature, 0.0)
        if out is not None:
            out.copy_(dz)
            return out
        return dz.to(logits.dtype)


def kl_rows_fwd(z_policy: torch.Tensor, z_ref: torch.Tensor, temperature: float) -> torch.Tensor:
    """Exact per-row ``KL(p || q) = sum_v p_v (log p_v - log q_v)`` of two blocks of raw logits."""
    lp = torch.log_softmax(z_policy / temperature, -1)
    lq = torch.log_softmax(z_ref / temperature, -1)
    return row_sum(lp.exp() * (lp - lq)).clamp(min=0.0)


def kl_rows_bwd(z_policy: torch.Tensor, z_ref: torch.Tensor, kl: torch.Tensor, g: torch.Tensor,
                temperature: float, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``d (g * KL) / d z_policy = g * p * (log p - log q - KL) / temperature``; the reference side
    is a fixed target (no gradient). Written into ``out`` when given (it may be ``z_policy``)."""
    lp = torch.log_softmax(z_policy / temperature, -1)
    lq = torch.log_softmax(z_ref / temperature, -1)
    dz = lp.exp() * (lp - lq - kl.unsqueeze(1)) * (g.unsqueeze(1) / temperature)
    if out is not None:
        out.copy_(dz)
        return out
    return dz
