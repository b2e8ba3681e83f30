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
the logits in place).

Sampler truncation (``params.top_k / top_p / min_p``, docs/formulas.md §1.1): a row keeps the
tokens whose scaled logit is ``>= tau`` (one threshold per row; ties with the boundary token are
kept) and is renormalised over them. ``cutoff(logits, params) -> tau [n]`` finds the thresholds
(``-inf``: keep all), and ``fwd``/``bwd`` take them as ``tau=``; every other token counts as a
``-inf`` logit. A target outside the kept set gets ``logp = -inf`` and no log-prob gradient. ``targets == params.ignore_index`` gives 0 and no gradient. This module is
the reference the others are tested against; it is written as stats -> merge -> finish so that the
vocabulary-parallel plan (``pyrl.ops.vocab_parallel``) can merge the stats of vocabulary shards
across ranks between the two steps, with no second copy of the maths.

A row's result never depends on the other rows: the max is exact and every sum over the
vocabulary runs over fixed blocks of ``SUM_BLOCK`` entries (a single ``sum`` over a row longer
than ATen's grain size is split across threads when it is the only output, which changes its
rounding with the number of rows), so log-probs and entropy are batch-invariant bit for bit.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch

__all__ = ["RowParams", "RowStats", "rescale_stats", "merge_stats", "TorchRows", "acc_dtype", "row_sum", "DIVERGENCES", "divergence_rows",
           "sparse_forward_kl_rows", "SAMPLER_ORDERS"]

SUM_BLOCK = 2048
# The order of the truncations after the temperature (docs/formulas.md §1.1): "hf" is HF generate's
# (top-k, top-p, min-p; also vLLM's v0 sampler), "vllm" is vLLM v1's (min-p, top-k, top-p).
SAMPLER_ORDERS = ("hf", "vllm")


@dataclass(frozen=True)
class RowParams:
    """What every row body needs besides the tensors."""

    temperature: float = 1.0
    ignore_index: int = -100
    need_entropy: bool = False
    # the sampler's truncation (docs/formulas.md §1.1); None: off. ``check_sampler`` normalises the
    # values that keep everything (top_p = 1, min_p = 0) to None.
    top_k: Optional[int] = None
    top_p: Optional[float] = None
    min_p: Optional[float] = None
    sampler_order: str = "hf"

    @property
    def truncates(self) -> bool:
        """Whether rows are truncated to a kept set (then ``cutoff`` gives its thresholds)."""
        return self.top_k is not None or self.top_p is not None or self.min_p is not None

    @property
    def sampler_text(self) -> str:
        """The truncation as text, for plans and errors (``""`` when off)."""
        parts = [f"{k}={getattr(self, k)!r}" for k in ("top_k", "top_p", "min_p") if getattr(self, k) is not None]
        if self.top_p is not None and self.min_p is not None:  # the only pair whose order matters
            parts.append(f"sampler_order={self.sampler_order!r}")
        return ", ".join(parts)


class RowStats(NamedTuple):
    """Per-row summaries of a block of logits: ``m`` (max of z), ``s`` and ``t`` (relative to
    ``m``), ``zy`` (the target's z; 0 where the target is not in this block of the vocabulary)."""

    m: torch.Tensor
    s: torch.Tensor
    t: torch.Tensor
    zy: torch.Tensor


def rescale_stats(st: RowStats, m: torch.Tensor):
    """``(s, t)`` of ``st`` re-expressed relative to a larger max ``m``: ``s e^(m_b - m)`` and
    ``e^(m_b - m) (t + s (m_b - m))``. A block whose row is all -inf (``s = 0``) gives 0 for both:
    its offset is taken as 0, so that -inf - -inf or 0 * inf never appear."""
    m_safe = torch.where(torch.isfinite(m), m, 0.0)
    d = torch.where(torch.isfinite(st.m), st.m - m_safe, 0.0)
    a = d.exp()
    return st.s * a, a * (st.t + st.s * d)


def merge_stats(a: RowStats, b: RowStats) -> RowStats:
    """The stats of two blocks of the same rows' vocabulary, as if computed over both at once
    (docs/formulas.md §1: the online log-sum-exp); ``zy`` adds, since one block at most holds the target."""
    m = torch.maximum(a.m, b.m)
    (sa, ta), (sb, tb) = rescale_stats(a, m), rescale_stats(b, m)
    return RowStats(m, sa + sb, ta + tb, a.zy + b.zy)


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


def _scaled(logits: torch.Tensor, p: RowParams, tau: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``logits / temperature`` in the accumulation dtype; tokens below the row's ``tau`` become -inf."""
    z = logits.to(acc_dtype(logits.dtype)) / p.temperature
    return z if tau is None else z.masked_fill(z < tau.unsqueeze(1), float("-inf"))


def _top_p_cutoff(z: torch.Tensor, tau: torch.Tensor, m: torch.Tensor, top_p: float) -> torch.Tensor:
    """The top-p threshold of each row among the tokens ``z >= tau`` (a sort of the row): the value of
    the first token, in descending order, at which the kept mass reaches ``top_p`` of the total."""
    kept = torch.where(z >= tau.unsqueeze(1), z, float("-inf"))
    ordered = kept.sort(dim=-1, descending=True).values
    m_safe = torch.where(torch.isfinite(m), m, 0.0).unsqueeze(1)
    cum = (ordered - m_safe).exp().cumsum(-1)
    first = (cum < top_p * cum[:, -1:]).sum(-1, keepdim=True).clamp(max=z.shape[1] - 1)
    return ordered.gather(1, first).squeeze(1)


def _here(targets: torch.Tensor, V: int, p: RowParams) -> torch.Tensor:
    """Rows whose target id lies in this block's vocabulary ``[0, V)`` (an id >= V is a valid
    target held by another vocabulary shard)."""
    return (targets != p.ignore_index) & (targets >= 0) & (targets < V)


class TorchRows:
    """The reference row body (plain PyTorch, in the accumulation dtype)."""

    @staticmethod
    def cutoff(logits: torch.Tensor, p: RowParams) -> Optional[torch.Tensor]:
        """Per-row kept-set thresholds ``tau [n]`` of the sampler's truncation (None when ``p`` keeps
        every token): top-k by ``topk`` (a selection), min-p in closed form, top-p by a sort."""
        if not p.truncates:
            return None
        z = _scaled(logits, p)
        n, V = z.shape
        m = z.amax(dim=-1) if V else z.new_full((n,), float("-inf"))
        tau = z.new_full((n,), float("-inf"))
        if p.top_k is not None and p.top_k < V:
            tau = z.topk(p.top_k, dim=-1).values[:, -1]
        # min-p keeps p_v >= min_p * p_max, i.e. z_v >= max z + log(min_p), whatever was removed before
        tau_m = m + math.log(p.min_p) if p.min_p is not None else tau
        if p.sampler_order == "vllm":
            tau = torch.maximum(tau, tau_m)
        if p.top_p is not None:
            tau = torch.maximum(tau, _top_p_cutoff(z, tau, m, p.top_p))
        return torch.maximum(tau, tau_m)

    @staticmethod
    def stats(logits: torch.Tensor, targets: torch.Tensor, p: RowParams, tau=None) -> RowStats:
        z = _scaled(logits, p, tau)
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
    def fwd(logits, targets, p: RowParams, tau=None):
        return TorchRows.finish(TorchRows.stats(logits, targets, p, tau), targets, p)

    @staticmethod
    def bwd(logits, targets, lse, ent, g_logp, g_ent, p: RowParams, out=None, tau=None):
        z = _scaled(logits, p, tau)
        acc = z.dtype
        finite = torch.isfinite(lse)
        ok = (targets != p.ignore_index) & finite
        # Every finite row's own lse (even ignored ones) keeps p from overflowing; rows that are not
        # `ok` are zeroed with where() at the end: multiplying an inf by 0 would give NaN.
        safe_lse = torch.where(finite, lse, 0.0).unsqueeze(1)
        zc = z.clamp(min=torch.finfo(acc).min)
        prob = (zc - safe_lse).exp()
        has_logp = ok
        if tau is not None:  # a target outside the kept set has logp = -inf: no log-prob gradient
            at = ok & _here(targets, z.shape[1], p)
            has_logp = at & (z.gather(1, torch.where(at, targets, 0).unsqueeze(1)).squeeze(1) > float("-inf"))
        g1 = torch.where(has_logp, g_logp.to(acc), 0.0).unsqueeze(1)
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


DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")


def _xdiff(p: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """``p * d`` with 0 wherever ``p == 0`` (a zero-probability entry adds nothing, even where ``d`` is
    infinite: a -inf logit in both heads, or in the one whose probability weights the sum)."""
    return torch.where(p > 0, p * d, 0.0)


def divergence_rows(z_student: torch.Tensor, z_teacher: torch.Tensor, temperature: float, kind: str = "reverse_kl",
                    beta: float = 0.5, g: Optional[torch.Tensor] = None, out: Optional[torch.Tensor] = None):
    """Per-row divergence of two blocks of raw logits ``[n, V]`` at ``temperature`` (docs/formulas.md §14),
    with ``p = softmax(z_student / T)`` (the distribution trained) and ``q = softmax(z_teacher / T)``
    (a fixed target, no gradient):

        forward_kl   KL(q || p) = sum_v q (log q - log p)           d/dz_s = (p - q) / T
        reverse_kl   KL(p || q) = sum_v p (log p - log q)           d/dz_s = p (log p - log q - KL) / T
        jsd          beta KL(q || m) + (1 - beta) KL(p || m),  m = beta q + (1 - beta) p,
                                                                    d/dz_s = (1 - beta) p (log p - log m - KL(p || m)) / T

    Returns ``(value [n], dz)``: ``dz`` is ``g [n] * d value / d z_student`` (``None`` when ``g`` is
    None), written into ``out`` when given (``out`` may be ``z_student`` itself). Every sum over the
    vocabulary is a ``row_sum`` (batch-invariant); the value is clamped at 0.
    """
    acc = acc_dtype(z_student.dtype)
    ls = torch.log_softmax(z_student.to(acc) / temperature, -1)
    lt = torch.log_softmax(z_teacher.to(acc) / temperature, -1)
    ps = ls.exp()
    if kind == "reverse_kl":
        d = ls - lt
        value = row_sum(_xdiff(ps, d))
        base = None if g is None else _xdiff(ps, d - value.unsqueeze(1))
    elif kind == "forward_kl":
        pt = lt.exp()
        value = row_sum(_xdiff(pt, lt - ls))
        base = None if g is None else ps - pt
    elif kind == "jsd":
        pt = lt.exp()
        lm = torch.logaddexp(ls + math.log1p(-beta), lt + math.log(beta))
        kl_s = row_sum(_xdiff(ps, ls - lm))
        value = beta * row_sum(_xdiff(pt, lt - lm)) + (1 - beta) * kl_s
        base = None if g is None else (1 - beta) * _xdiff(ps, ls - lm - kl_s.unsqueeze(1))
    else:
        raise ValueError(f"kind must be one of {DIVERGENCES}, got {kind!r}")
    value = value.clamp(min=0.0)
    if g is None:
        return value, None
    dz = base * (g.to(acc).unsqueeze(1) / temperature)
    if out is not None:
        out.copy_(dz)
        return value, out
    return value, dz


def sparse_forward_kl_rows(z_student: torch.Tensor, ids: torch.Tensor, teacher_logprobs: torch.Tensor,
                           temperature: float, g: Optional[torch.Tensor] = None, out: Optional[torch.Tensor] = None):
    """The forward KL to a teacher known only by its top-k (docs/formulas.md §14): with
    ``q = softmax(teacher_logprobs)`` over the ``k`` ids of each row (the given log-probs renormalised
    over the support; ``-inf`` marks an unused slot) and ``log p`` the student's full-vocabulary
    log-probs at temperature ``T``,

        value = sum_k q_k (log q_k - log p[ids_k]),      d/dz_s = (p - scatter(ids, q)) / T

    ``ids`` ``[n, k]`` int64, ``teacher_logprobs`` ``[n, k]``. Returns ``(value [n], dz | None)`` as
    ``divergence_rows`` does (``dz`` scaled by ``g``, written into ``out`` when given).
    """
    acc = acc_dtype(z_student.dtype)
    ls = torch.log_softmax(z_student.to(acc) / temperature, -1)
    lq = torch.log_softmax(teacher_logprobs.to(acc), -1)
    q = lq.exp()
    value = _xdiff(q, lq - ls.gather(1, ids)).sum(-1).clamp(min=0.0)
    if g is None:
        return value, None
    dz = ls.exp_().scatter_add_(1, ids, -q) * (g.to(acc).unsqueeze(1) / temperature)
    if out is not None:
        out.copy_(dz)
        return value, out
    return value, dz
