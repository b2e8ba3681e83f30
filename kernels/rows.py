"""Triton row kernels: per-token log-prob and entropy of logits that already exist (SPEC §1).

    z = logits / temperature                                   logits [n, V], raw
    logp[n]    = z[n, y[n]] - lse[n],            lse[n] = logsumexp_v z[n, v]
    entropy[n] = log s[n] - t[n] / s[n],         s = sum_v exp(z - m),  t = sum_v exp(z - m) (z - m)
    d z = g_logp (onehot(y) - p) - g_ent p (z - mu),   p = exp(z - lse),  mu = lse - entropy

The plain-PyTorch reference of exactly this contract is ``TorchRows`` in ``kernels/reference.py``
(``pyrl.kernels.reference``), and ``RowParams`` there carries what is not a tensor:

    LogprobRows.fwd(logits, targets, p) -> (logp, entropy, lse)                  each [n] fp32
    LogprobRows.stats(logits, targets, p) -> RowStats (m, s, t, zy)             one vocabulary block
    LogprobRows.merge_block_(st, logits, targets, c0, p)      that block merged into running stats
    LogprobRows.bwd(logits, targets, lse, entropy, g_logp, g_ent | None, p, out=None) -> d logits

Every reduction over the vocabulary is online: a row keeps its running max ``m`` and, relative to
it, the sum-exp ``s`` and ``t = sum exp(z - m)(z - m)``. Keeping ``t`` relative to the max is what
lets ``entropy = log s - t / s`` be formed without cancelling two large numbers.

What the kernels remove, in memory traffic: one program per row streams the row once in forward
(max, sum-exp, sum-exp*(z-m) and the target logit in the same pass; no fp32 copy of the logits, no
``log_softmax`` tensor) and once in backward, which may write ``d_logits`` over the logits
(``out=logits``) so no second ``[n, V]`` buffer exists.

Numerics: every input dtype (bf16, fp16, fp32) is read and reduced in fp32; fp64 is refused (use
``backend="torch"``). ``-inf`` logits contribute nothing; a target at ``-inf`` gets
``logp = -inf``; ``logp`` is clamped to ``<= 0`` and entropy to ``>= 0``. Rows whose target is
``ignore_index`` give 0 and no gradient. The gradient is written in the logits dtype.

Sampler truncation (``p.top_k / top_p / min_p``, docs/formulas.md §1.1): ``LogprobRows.cutoff``
finds each row's kept-set threshold ``tau`` with one program per row: top-k and top-p are each a
threshold search, a bisection over the 32-bit order-preserving key of the fp32 logits (the k-th
largest value is the largest key ``u`` with ``#{key(z) >= u} >= k``; the top-p threshold the largest
with ``mass(key(z) >= u) >= top_p * mass``), exact, no sort and no scratch, each pass over the row
also taking the value range of the undecided band so the search stops once it holds one value;
min-p is ``max z + log(min_p)``. The row kernels then read every logit below ``tau`` as -inf.

Batch invariance: a row is reduced by one program in ``BLOCK_V`` blocks in vocabulary order, and
``BLOCK_V`` (``_row_config``) is a function of ``V`` only, so a row's bits never depend on ``n`` or
on the other rows.

This module also holds the ``@triton.jit`` pieces that the fused LM-head kernel
(``kernels/fused_linear.py``) shares with the row kernels: ``merge_stats`` (merge two online
summaries), ``finish_row`` (lse, logp, entropy from a merged summary) and ``softmax_grad`` (d z of
one block of logits), so the two kernels cannot drift apart in their maths.
"""
from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from pyrl.kernels.reference import RowParams, RowStats

__all__ = ["LogprobRows", "merge_stats", "finish_row", "softmax_grad", "check_dtype", "INTERPRET"]

# Whether Triton's CPU interpreter runs the kernels (Triton's own variable, read as Triton reads it).
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
if INTERPRET and isinstance(tl.max, triton.runtime.jit.JITFunction):
    raise RuntimeError("TRITON_INTERPRET=1 was set after triton was imported, so Triton's library functions are "
                       "compiled, not interpreted; set TRITON_INTERPRET=1 before the first `import triton`")
_FP64_ERROR = "backend='triton' does not support float64; use backend='torch'"


def check_dtype(t: torch.Tensor) -> None:
    """Refuse fp64 (the kernels reduce in fp32); every Triton body calls this first."""
    if t.dtype == torch.float64:
        raise TypeError(_FP64_ERROR)


def _row_config(vocab: int) -> tuple[int, int]:
    """(BLOCK_V, num_warps) of the row kernels: a function of V only (batch invariance).

    The row kernels are bandwidth-bound and the backward may run in place, so they are not
    autotuned (benchmarking an in-place kernel would need a copy of the logits).
    """
    if INTERPRET:
        return 128, 4
    block = min(4096, triton.next_power_of_2(vocab))
    return block, max(4, min(16, block // 256))


# --------------------------------------------------------------------------------------------
# Pieces shared with kernels/fused_linear.py
# --------------------------------------------------------------------------------------------
@triton.jit
def merge_stats(m_a, s_a, t_a, m_b, s_b, t_b):
    """Merge two (max, sum-exp, sum-exp*(z-max)) summaries; either may be empty (m = -inf, s = t = 0)."""
    m = tl.maximum(m_a, m_b)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    # An empty side has s = t = 0; its offset is set to 0 so that -inf - -inf or 0 * inf never appear.
    d_a = tl.where(m_a == float("-inf"), 0.0, m_a - m_safe)
    d_b = tl.where(m_b == float("-inf"), 0.0, m_b - m_safe)
    a = tl.exp(d_a)
    b = tl.exp(d_b)
    s = s_a * a + s_b * b
    t = a * (t_a + s_a * d_a) + b * (t_b + s_b * d_b)
    return m, s, t


@triton.jit
def finish_row(m, s, t, zy, valid, NEED_ENTROPY: tl.constexpr):
    """(lse, logp, entropy) of rows from their merged summaries and target logits."""
    lse = m + tl.log(s)
    finite = (lse == lse) & (tl.abs(lse) < float("inf"))
    logp = tl.where(finite, tl.minimum(zy - lse, 0.0), float("-inf"))
    logp = tl.where(valid, logp, 0.0)
    if NEED_ENTROPY:
        ent = tl.maximum(tl.log(s) - t / s, 0.0)
        ent = tl.where(valid & finite, ent, 0.0)
    else:
        ent = lse * 0.0
    return lse, logp, ent


@triton.jit
def softmax_grad(z, ok, lse, mu, g1, g2, is_target, HAS_G_ENT: tl.constexpr):
    """dz of g1 * logp + g2 * entropy w.r.t. logits z (g1, g2 already divided by temperature); 0 if not ``ok``.

    dz = g1 * (onehot - p) - g2 * p * (z - mu),   p = exp(z - lse),   mu = sum_v p_v z_v = lse - entropy
    """
    zc = tl.maximum(z, -3.4028234663852886e38)  # p * (z - mu) must be 0, not 0 * inf, at -inf
    p = tl.where(ok, tl.exp(zc - lse), 0.0)  # not exp(z - 0) = inf (times g = 0) on rows without a gradient
    if HAS_G_ENT:
        # p * (z - mu) first: it is 0 at -inf logits, where g2 * (z - mu) alone could overflow.
        dz = tl.where(is_target, g1, 0.0) - p * g1 - g2 * (p * (zc - mu))
    else:
        dz = tl.where(is_target, g1, 0.0) - p * g1
    return dz


# --------------------------------------------------------------------------------------------
# Row kernels
# --------------------------------------------------------------------------------------------
@triton.jit
def _row_summary(x_row, V, temperature, tau, HAS_TAU: tl.constexpr, NEED_ENTROPY: tl.constexpr,
                 BLOCK_V: tl.constexpr):
    """One streaming pass over a row of raw logits: its (max, sum-exp, sum-exp*(z-max)) of z = x / T."""
    m = tl.full((), float("-inf"), tl.float32)
    s = tl.zeros((), tl.float32)
    t = tl.zeros((), tl.float32)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        z = tl.load(x_row + cols, mask=cols < V, other=float("-inf")).to(tl.float32) / temperature
        if HAS_TAU:
            z = tl.where(z >= tau, z, float("-inf"))
        m_b = tl.max(z, 0)
        m_b_safe = tl.where(m_b == float("-inf"), 0.0, m_b)
        d = tl.maximum(z - m_b_safe, -3.4028234663852886e38)  # exp(d) * d = 0, not 0 * -inf, at -inf
        e = tl.exp(d)
        s_b = tl.sum(e, 0)
        if NEED_ENTROPY:
            t_b = tl.sum(e * d, 0)
        else:
            t_b = tl.zeros((), tl.float32)
        m, s, t = merge_stats(m, s, t, m_b, s_b, t_b)
    return m, s, t


@triton.jit(do_not_specialize=["n_rows"])
def _rows_fwd_kernel(x_ptr, stride_x, y_ptr, logp_ptr, ent_ptr, lse_ptr, tau_ptr, n_rows, V, temperature,
                     ignore_index, NEED_ENTROPY: tl.constexpr, HAS_TAU: tl.constexpr, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_x
    y = tl.load(y_ptr + row)
    valid = y != ignore_index
    zy = tl.load(x_row + tl.where(valid, y, 0)).to(tl.float32) / temperature
    tau = 0.0
    if HAS_TAU:  # the sampler's kept set: every logit below tau counts as -inf
        tau = tl.load(tau_ptr + row)
        zy = tl.where(zy >= tau, zy, float("-inf"))
    m, s, t = _row_summary(x_row, V, temperature, tau, HAS_TAU, NEED_ENTROPY, BLOCK_V)
    lse, logp, ent = finish_row(m, s, t, zy, valid, NEED_ENTROPY)
    tl.store(logp_ptr + row, logp)
    tl.store(ent_ptr + row, ent)
    tl.store(lse_ptr + row, lse)


@triton.jit(do_not_specialize=["n_rows", "c0"])
def _rows_stats_kernel(x_ptr, stride_x, y_ptr, m_ptr, s_ptr, t_ptr, zy_ptr, n_rows, V, c0, temperature,
                       ignore_index, NEED_ENTROPY: tl.constexpr, BLOCK_V: tl.constexpr):
    """Merge the row stats (``RowStats``) of one vocabulary block, columns ``[c0, c0 + V)`` of each row,
    into the running stats at ``m_ptr .. zy_ptr``, in place: one launch per block of the blocked walk
    (the block's stats, the online merge and the target logit at once). ``y`` holds global ids."""
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_x
    y = tl.load(y_ptr + row)
    local = y - c0
    here = (y != ignore_index) & (local >= 0) & (local < V)
    zy = tl.load(x_row + tl.where(here, local, 0)).to(tl.float32) / temperature
    m_b, s_b, t_b = _row_summary(x_row, V, temperature, 0.0, False, NEED_ENTROPY, BLOCK_V)
    m, s, t = merge_stats(tl.load(m_ptr + row), tl.load(s_ptr + row), tl.load(t_ptr + row), m_b, s_b, t_b)
    tl.store(m_ptr + row, m)
    tl.store(s_ptr + row, s)
    tl.store(t_ptr + row, t)
    tl.store(zy_ptr + row, tl.load(zy_ptr + row) + tl.where(here, zy, 0.0))


@triton.jit(do_not_specialize=["n_rows"])
def _rows_bwd_kernel(x_ptr, stride_x, out_ptr, stride_out, y_ptr, lse_ptr, ent_ptr, g_logp_ptr, g_ent_ptr, tau_ptr,
                     n_rows, V, temperature, ignore_index, HAS_G_ENT: tl.constexpr, HAS_TAU: tl.constexpr,
                     BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_x
    out_row = out_ptr + row * stride_out
    y = tl.load(y_ptr + row)
    lse = tl.load(lse_ptr + row)
    ok = (y != ignore_index) & (lse == lse) & (tl.abs(lse) < float("inf"))
    lse = tl.where(ok, lse, 0.0)
    g1 = tl.where(ok, tl.load(g_logp_ptr + row), 0.0) / temperature
    if HAS_G_ENT:
        g2 = tl.where(ok, tl.load(g_ent_ptr + row), 0.0) / temperature
        mu = lse - tl.load(ent_ptr + row)  # sum_v p_v z_v
    else:
        g2 = 0.0
        mu = 0.0
    if HAS_TAU:
        tau = tl.load(tau_ptr + row)
        # a target outside the kept set has logp = -inf: no log-prob gradient (read before out is written)
        zy = tl.load(x_row + tl.where(ok, y, 0)).to(tl.float32) / temperature
        g1 = tl.where((zy >= tau) & (zy > float("-inf")), g1, 0.0)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        mask = cols < V
        # Each element is read before it is written by this same program: out may alias x.
        z = tl.load(x_row + cols, mask=mask, other=float("-inf")).to(tl.float32) / temperature
        if HAS_TAU:
            z = tl.where(z >= tau, z, float("-inf"))
        dz = softmax_grad(z, ok, lse, mu, g1, g2, cols == y, HAS_G_ENT)
        tl.store(out_row + cols, dz.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _key(z):
    """An int32 key of fp32 values in the same order (the sign-magnitude bits, negatives flipped)."""
    b = z.to(tl.int32, bitcast=True)
    return tl.where(b >= 0, b, b ^ 0x7FFFFFFF)


@triton.jit
def _unkey(k):
    b = k.to(tl.int32)
    return tl.where(b >= 0, b, b ^ 0x7FFFFFFF).to(tl.float32, bitcast=True)


@triton.jit
def _key_search(x_row, V, temperature, t, m_safe, m, goal, MASS: tl.constexpr, BLOCK_V: tl.constexpr):
    """The largest value u of the row with f(u) >= goal, f(u) = #{z >= u} (or, with MASS, the mass
    sum exp(z - m) over z >= u), among the tokens z >= t: a bisection over the int32 keys in
    [key(t), key(m)], each pass also taking the range of the values in [mid, hi), so it stops as
    soon as that range holds one distinct value (a handful of passes on real rows, 32 at most)."""
    lo = _key(t).to(tl.int64)
    hi = _key(m).to(tl.int64) + 1
    u = t
    searching = hi - lo > 1
    while searching:
        mid = lo + (hi - lo) // 2
        f = tl.zeros((), tl.float32)
        v_min = tl.full((), float("inf"), tl.float32)
        v_max = tl.full((), float("-inf"), tl.float32)
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)
            z = tl.load(x_row + cols, mask=cols < V, other=float("-inf")).to(tl.float32) / temperature
            k = _key(z).to(tl.int64)
            above = (k >= mid) & (z >= t) & (cols < V)
            if MASS:
                f += tl.sum(tl.where(above, tl.exp(z - m_safe), 0.0), 0)
            else:
                f += tl.sum(above.to(tl.float32), 0)
            band = above & (k < hi)
            v_min = tl.minimum(v_min, tl.min(tl.where(band, z, float("inf")), 0))
            v_max = tl.maximum(v_max, tl.max(tl.where(band, z, float("-inf")), 0))
        ok = f >= goal
        # f(mid) >= goal and [mid, hi) holds one distinct value: that value is u (f fails at hi)
        found = ok & (v_min == v_max)
        u = tl.where(found, v_min, tl.where(ok, _unkey(mid), u))
        lo = tl.where(ok, mid, lo)
        hi = tl.where(ok, hi, mid)
        searching = (~found) & (hi - lo > 1)
    return u


@triton.jit(do_not_specialize=["n_rows"])
def _cutoff_kernel(x_ptr, stride_x, tau_ptr, n_rows, V, temperature, top_k, top_p, log_min_p, HAS_K: tl.constexpr,
                   HAS_P: tl.constexpr, MIN_P_FIRST: tl.constexpr, BLOCK_V: tl.constexpr):
    """tau[row]: the row's kept-set threshold (module docstring): -inf keeps every token."""
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_x
    m = tl.full((), float("-inf"), tl.float32)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        z = tl.load(x_row + cols, mask=cols < V, other=float("-inf")).to(tl.float32) / temperature
        m = tl.maximum(m, tl.max(z, 0))
    t = tl.full((), float("-inf"), tl.float32)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    if HAS_K:
        t = _key_search(x_row, V, temperature, t, m_safe, m, top_k, False, BLOCK_V)
    t_min = m + log_min_p  # min-p: p_v >= min_p * p_max  <=>  z_v >= max z + log(min_p)
    if MIN_P_FIRST:
        t = tl.maximum(t, t_min)
    if HAS_P:
        total = tl.zeros((), tl.float32)
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)
            z = tl.load(x_row + cols, mask=cols < V, other=float("-inf")).to(tl.float32) / temperature
            total += tl.sum(tl.where(z >= t, tl.exp(z - m_safe), 0.0), 0)
        t = tl.maximum(t, _key_search(x_row, V, temperature, t, m_safe, m, top_p * total, True, BLOCK_V))
    t = tl.maximum(t, t_min)
    tl.store(tau_ptr + row, tl.where(m == float("-inf"), float("-inf"), t))


class LogprobRows:
    """The Triton row body (the ``TorchRows`` contract of ``pyrl.kernels.reference``): logits ``[n, V]``, raw."""

    @staticmethod
    def cutoff(logits: torch.Tensor, p: RowParams):
        """The kept-set thresholds ``tau [n]`` fp32 (``TorchRows.cutoff``), None when nothing is truncated."""
        if not p.truncates:
            return None
        check_dtype(logits)
        if logits.stride(-1) != 1:
            logits = logits.contiguous()
        n, vocab = logits.shape
        tau = torch.empty(n, dtype=torch.float32, device=logits.device)
        if n == 0:
            return tau
        block, warps = _row_config(vocab)
        has_k = p.top_k is not None and p.top_k < vocab
        _cutoff_kernel[(n,)](logits, logits.stride(0), tau, n, vocab, float(p.temperature), float(p.top_k or 0),
                             float(p.top_p or 1.0), math.log(p.min_p) if p.min_p is not None else float("-inf"),
                             HAS_K=has_k, HAS_P=p.top_p is not None, MIN_P_FIRST=p.sampler_order == "vllm",
                             BLOCK_V=block, num_warps=warps)
        return tau

    @staticmethod
    def fwd(logits: torch.Tensor, targets: torch.Tensor, p: RowParams, tau=None):
        """-> (logp, entropy, lse), each ``[n]`` fp32; entropy is 0 unless ``p.need_entropy``."""
        check_dtype(logits)
        if logits.stride(-1) != 1:
            logits = logits.contiguous()
        n, vocab = logits.shape
        logp = torch.empty(n, dtype=torch.float32, device=logits.device)
        ent = torch.empty_like(logp)
        lse = torch.empty_like(logp)
        if n == 0:
            return logp, ent, lse
        block, warps = _row_config(vocab)
        _rows_fwd_kernel[(n,)](logits, logits.stride(0), targets.contiguous(), logp, ent, lse,
                               lse if tau is None else tau.to(torch.float32).contiguous(), n, vocab,
                               float(p.temperature), int(p.ignore_index), NEED_ENTROPY=bool(p.need_entropy),
                               HAS_TAU=tau is not None, BLOCK_V=block, num_warps=warps)
        return logp, ent, lse

    @staticmethod
    def stats(logits: torch.Tensor, targets: torch.Tensor, p: RowParams, tau=None) -> RowStats:
        """One vocabulary block's ``RowStats`` (``TorchRows.stats``): block-local target ids, one
        outside ``[0, V)`` is in another block (zy = 0); each field ``[n]`` fp32."""
        if tau is not None:
            raise ValueError("LogprobRows.stats: truncated rows are never split into vocabulary blocks")
        n = logits.shape[0]
        st = RowStats(torch.full((n,), float("-inf"), device=logits.device), *torch.zeros(3, n, device=logits.device))
        LogprobRows.merge_block_(st, logits, targets, 0, p)
        return st

    @staticmethod
    def merge_block_(st: RowStats, logits: torch.Tensor, targets: torch.Tensor, c0: int, p: RowParams) -> None:
        """Merge the stats of ``logits`` ``[n, b]``, columns ``[c0, c0 + b)`` of the rows' vocabulary, into
        the running ``st`` (fp32 ``[n]`` each) in place; ``targets`` are global ids. The same as
        ``merge_stats(st, stats(logits, block_targets(targets, c0, c0 + b)))``, in one launch."""
        check_dtype(logits)
        if logits.stride(-1) != 1:
            logits = logits.contiguous()
        if any(x.dtype != torch.float32 or x.stride(0) != 1 for x in st):
            raise ValueError("LogprobRows.merge_block_ needs fp32 running stats with unit stride")
        n, vocab = logits.shape
        if n:
            block, warps = _row_config(vocab)
            _rows_stats_kernel[(n,)](logits, logits.stride(0), targets.contiguous(), *st, n, vocab, int(c0),
                                     float(p.temperature), int(p.ignore_index), NEED_ENTROPY=bool(p.need_entropy),
                                     BLOCK_V=block, num_warps=warps)

    @staticmethod
    def bwd(logits: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor, ent: torch.Tensor,
            g_logp: torch.Tensor, g_ent, p: RowParams, out=None, tau=None):
        """d_logits ``[n, V]`` in the logits dtype, written into ``out`` (which may be ``logits``)."""
        check_dtype(logits)
        n, vocab = logits.shape
        if out is None:
            out = torch.empty((n, vocab), dtype=logits.dtype, device=logits.device)
        if logits.stride(-1) != 1 or out.stride(-1) != 1:
            raise ValueError("LogprobRows.bwd needs logits and out with contiguous rows")
        if n == 0:
            return out
        # Upstream gradients of a .sum() arrive as expanded (stride 0) views.
        g_logp = g_logp.to(torch.float32).contiguous()
        g_ent_c = g_ent.to(torch.float32).contiguous() if g_ent is not None else g_logp
        block, warps = _row_config(vocab)
        _rows_bwd_kernel[(n,)](logits, logits.stride(0), out, out.stride(0), targets.contiguous(), lse, ent,
                               g_logp, g_ent_c, lse if tau is None else tau.to(torch.float32).contiguous(), n, vocab,
                               float(p.temperature), int(p.ignore_index), HAS_G_ENT=g_ent is not None,
                               HAS_TAU=tau is not None, BLOCK_V=block, num_warps=warps)
        return out
