"""Triton fused LM-head kernel: per-token log-prob and entropy straight from hidden states (SPEC §1).

    z = (h @ W.T + bias) / temperature                         h [N, H], W [V, H], bias [V] or None
    logp[n]    = z[n, y[n]] - lse[n],            lse[n] = logsumexp_v z[n, v]
    entropy[n] = log s[n] - t[n] / s[n],         s = sum_v exp(z - m),  t = sum_v exp(z - m) (z - m)

The plain-PyTorch reference is ``TorchRows`` of ``kernels/reference.py`` (``pyrl.kernels.reference``)
on the materialised logits ``h @ W.T + bias``, with the same ``RowParams``; the contract is

    FusedLinear.fwd(hidden, weight, bias | None, targets, p) -> (logp, entropy, lse)      each [N] fp32
    FusedLinear.bwd(hidden, weight, bias, targets, lse, entropy, g_logp, g_ent | None, p,
                    need=(d_hidden?, d_weight?, d_bias?)) -> (d_hidden | None, d_weight | None, d_bias | None)

The online row statistics (``merge_stats``, ``finish_row``) and the softmax gradient
(``softmax_grad``) are the ones of the row kernels, imported from ``kernels/rows.py``.

What the kernel removes, in memory traffic: the logits never reach memory. ``_fused_fwd_kernel``
computes ``[BLOCK_N, BLOCK_V]`` tiles of ``h @ W.T`` with ``tl.dot`` over ``BLOCK_H`` slices and
folds each tile into the running statistics while it is in registers; the ``[N, V]`` fp32 logits
(1.2 GB per 2k tokens at V=151936) become ``3 * N * V / 2048`` floats of per-slice partials, merged
by ``_fused_combine_kernel``. Backward recomputes the tiles instead of reading saved logits:
``_fused_bwd_hidden_kernel`` (one program per token tile) accumulates ``d_hidden = dz @ W`` over
the vocabulary, ``_fused_bwd_weight_kernel`` (one program per vocabulary tile) accumulates
``d_weight = dz.T @ h`` and ``d_bias`` over the tokens. Both add into fp32 buffers that each
program owns (no atomics: deterministic). The price: the logits are computed three times
(``8 N H V`` FLOPs of matmul for forward + backward, against ``6 N H V`` for an unfused
implementation), each backward tile reads and writes its fp32 accumulator slice, and bf16/fp16
inputs need fp32 ``[N, H]`` and ``[V, H]`` accumulators during backward.

Which body runs: ``pyrl.fused_linear_logprobs(..., backend="triton")`` uses this single kernel
(``FusedLinear``) for fp32 inputs; for bf16/fp16 on CUDA it runs cuBLAS GEMMs per token chunk (fp32
logits out) around ``LogprobRows`` (``kernels/rows.py``) instead: on an H100 this kernel's tl.dot
tiles reached ~100 TFLOP/s where cuBLAS reaches ~720 (benchmarks/results/h100-gpu-check-1).

Numerics: fp32 accumulation for bf16/fp16 inputs, whose ``dz`` is rounded to the input dtype
before the two backward matmuls (as flash-attention does with P); fp32 inputs use 3xTF32
products (fp32-class error, on tensor cores); fp64 is refused (use ``backend="torch"``).
``-inf`` logits (masked tokens, or a ``-inf`` bias) contribute nothing; a target at ``-inf`` gets
``logp = -inf``; ``logp`` is clamped to ``<= 0`` and entropy to ``>= 0``. Rows equal to
``ignore_index`` give 0 and no gradient.

Batch invariance: a row's vocabulary reduction order depends only on ``V`` and ``H``, never on
``N`` or on the other rows. The forward splits the vocabulary into fixed ``_VOCAB_SPLIT``-wide
slices (so small ``N`` still fills the GPU) merged in slice order; ``@triton.autotune`` is keyed
on ``H`` and ``V`` only, so a process uses one tiling per shape (another process may autotune
to another tiling, i.e. other last bits; pin one config with ``PYRL_TRITON_CONFIG``, read through
``pyrl.ops.plan.env_knobs()``, for bitwise reproducibility across runs). A tile product is
``tl.dot`` on the GPU; under Triton's CPU interpreter (where ``tl.dot`` would be numpy's matmul,
whose BLAS rounds a row by its position in the tile) ``_dot`` forms it in a fixed order instead.

The configs were chosen from compile-time reports (ptxas for sm80/sm90: registers, spills,
shared memory), not yet from timings on hardware. Under ``TRITON_INTERPRET=1`` (CPU tests) each
kernel has one small config, so nothing is autotuned and every code path (several vocabulary
slices and tiles) runs on small shapes.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from pyrl.kernels.reference import RowParams
from pyrl.kernels.rows import INTERPRET, check_dtype, finish_row, merge_stats, softmax_grad
from pyrl.ops.plan import env_knobs

__all__ = ["FusedLinear"]

# Vocabulary slice of one forward program; a multiple of every BLOCK_V below. Fixed per V so the
# per-row merge order never depends on N.
_VOCAB_SPLIT = 128 if INTERPRET else 2048
# Under the interpreter only, `_dot` forms tile products without BLAS (see there); on the GPU this
# is a compile-time False and `_dot` is exactly tl.dot.
_DOT_WITHOUT_BLAS = tl.constexpr(INTERPRET)
_GROUP_N = 8  # token tiles that sweep the same weight slices together (L2 reuse of W)


# PYRL_TRITON_CONFIG=<name> pins one named config (below) in every kernel instead of autotuning:
# no autotuning time per new (H, V), and the same tiling (so the same last bits) in every process.
_PINNED = env_knobs().triton_config


def _configs(named: dict[str, triton.Config], small: triton.Config) -> list[triton.Config]:
    if INTERPRET:
        return [small]
    if _PINNED is not None:
        if _PINNED not in named:
            raise ValueError(f"PYRL_TRITON_CONFIG must name a config every kernel has, one of "
                             f"{sorted(set(_FWD_CONFIGS) & set(_BWD_HIDDEN_CONFIGS) & set(_BWD_WEIGHT_CONFIGS))}; "
                             f"got {_PINNED!r}")
        return [named[_PINNED]]
    return list(named.values())


def _cfg(n: int, v: int, h: int, warps: int, stages: int) -> triton.Config:
    return triton.Config({"BLOCK_N": n, "BLOCK_V": v, "BLOCK_H": h}, num_warps=warps, num_stages=stages)


# Named configs (tiles token x vocabulary x hidden). "any-" fits every GPU's shared memory: the
# autotuner skips configs that do not fit, e.g. the big Hopper tiles on a 100 KB consumer card or
# for fp32 inputs.
_FWD_CONFIGS = {
    "hopper-128x256x64-w8-s3": _cfg(n=128, v=256, h=64, warps=8, stages=3),
    "hopper-128x128x64-w8-s4": _cfg(n=128, v=128, h=64, warps=8, stages=4),
    "ampere-128x128x32-w4-s4": _cfg(n=128, v=128, h=32, warps=4, stages=4),
    "ampere-64x128x64-w4-s3": _cfg(n=64, v=128, h=64, warps=4, stages=3),
    "any-64x64x32-w4-s2": _cfg(n=64, v=64, h=32, warps=4, stages=2),
}
_BWD_HIDDEN_CONFIGS = {
    "hopper-128x128x64-w8-s3": _cfg(n=128, v=128, h=64, warps=8, stages=3),
    "hopper-64x256x64-w8-s3": _cfg(n=64, v=256, h=64, warps=8, stages=3),
    "ampere-64x128x64-w4-s3": _cfg(n=64, v=128, h=64, warps=4, stages=3),
    "any-64x64x32-w4-s2": _cfg(n=64, v=64, h=32, warps=4, stages=2),
}
_BWD_WEIGHT_CONFIGS = {
    "hopper-128x128x64-w8-s3": _cfg(n=128, v=128, h=64, warps=8, stages=3),
    "hopper-64x256x64-w8-s3": _cfg(n=64, v=256, h=64, warps=8, stages=3),
    "ampere-64x128x64-w4-s3": _cfg(n=64, v=128, h=64, warps=4, stages=3),
    "any-64x64x32-w4-s2": _cfg(n=64, v=64, h=32, warps=4, stages=2),
}
_SMALL = _cfg(n=16, v=32, h=16, warps=4, stages=1)
assert all(_VOCAB_SPLIT % c.kwargs["BLOCK_V"] == 0 for c in _configs(_FWD_CONFIGS, _SMALL)), \
    "a vocabulary slice must be a whole number of BLOCK_V tiles"


# --------------------------------------------------------------------------------------------
# Logits tiles computed in SRAM, never stored
# --------------------------------------------------------------------------------------------
@triton.jit
def _dot(a, b, acc, DOT_PRECISION: tl.constexpr):
    """acc + a @ b, fp32 accumulation.

    Interpreter only (``_DOT_WITHOUT_BLAS``): ``tl.dot`` would be numpy's matmul, whose BLAS may
    round a row by its position and alignment in the tile (one ulp on some AVX2 machines, i.e. a
    row's bits would depend on the other rows of the batch) and which multiplies bf16 tiles as
    their uint16 bit patterns. So the product is formed without BLAS: both tiles widened to fp64,
    where each product of two bf16/fp16/fp32 values is exact, summed over K by ``tl.sum`` (a
    fixed order given by the tile shape) and rounded once into the fp32 accumulator. The bits of
    a row depend on that row's operands only, on every CPU.
    """
    if _DOT_WITHOUT_BLAS:
        a64 = a.to(tl.float32).to(tl.float64)
        b64 = b.to(tl.float32).to(tl.float64)
        acc = (acc.to(tl.float64) + tl.sum(a64[:, :, None] * b64[None, :, :], 1)).to(tl.float32)
    else:
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def _logit_tile(h_ptr, stride_h, w_ptr, stride_w, n0, v0, N, V, H,
                BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """acc[BLOCK_N, BLOCK_V] = h[n0:n0+BLOCK_N] @ W[v0:v0+BLOCK_V].T in fp32, over BLOCK_H slices of H.

    Rows >= N and columns >= V wrap around to valid ones instead of being masked (Triton tutorial
    03: fewer registers); callers discard them (their logits are set to -inf, their gradients to 0).
    """
    rows = (n0 + tl.arange(0, BLOCK_N)) % N
    cols = (v0 + tl.arange(0, BLOCK_V)) % V
    k = tl.arange(0, BLOCK_H)
    h_ptrs = h_ptr + (rows.to(tl.int64)[:, None] * stride_h + k[None, :])
    w_ptrs = w_ptr + (cols.to(tl.int64)[None, :] * stride_w + k[:, None])  # W tile, read transposed
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_H):
        h = tl.load(h_ptrs, mask=(k0 + k < H)[None, :], other=0.0)
        w_t = tl.load(w_ptrs, mask=(k0 + k < H)[:, None], other=0.0)
        acc = _dot(h, w_t, acc, DOT_PRECISION)
        h_ptrs += BLOCK_H
        w_ptrs += BLOCK_H
    return acc


@triton.autotune(configs=_configs(_FWD_CONFIGS, _SMALL), key=["H", "V"])
@triton.jit(do_not_specialize=["N"])
def _fused_fwd_kernel(h_ptr, stride_h, w_ptr, stride_w, b_ptr, y_ptr,
                      m_part_ptr, s_part_ptr, t_part_ptr, zy_ptr,
                      N, H, V, n_splits, temperature,
                      HAS_BIAS: tl.constexpr, NEED_ENTROPY: tl.constexpr, DOT_PRECISION: tl.constexpr,
                      VOCAB_SPLIT: tl.constexpr, GROUP_N: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr):
    """One program: BLOCK_N tokens x one VOCAB_SPLIT slice -> per-row partial (m, s, t) and z_y."""
    # Grouped order (Triton tutorial 03): GROUP_N token tiles run against the same vocabulary
    # slices at the same time, so each weight tile is read from HBM once per group.
    pid = tl.program_id(0)
    n_tiles = (N + BLOCK_N - 1) // BLOCK_N
    per_group = GROUP_N * n_splits
    first = (pid // per_group) * GROUP_N
    group = tl.minimum(n_tiles - first, GROUP_N)
    pid_n = first + (pid % per_group) % group
    pid_s = (pid % per_group) // group

    rows = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    row_mask = rows < N
    y = tl.load(y_ptr + rows, mask=row_mask, other=-1)
    m = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    s = tl.zeros((BLOCK_N,), tl.float32)
    t = tl.zeros((BLOCK_N,), tl.float32)
    zy = tl.zeros((BLOCK_N,), tl.float32)
    v_begin = pid_s * VOCAB_SPLIT
    for v0 in range(v_begin, tl.minimum(v_begin + VOCAB_SPLIT, V), BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_mask = cols < V
        z = _logit_tile(h_ptr, stride_h, w_ptr, stride_w, pid_n * BLOCK_N, v0, N, V, H,
                        BLOCK_N, BLOCK_V, BLOCK_H, DOT_PRECISION)
        if HAS_BIAS:
            z += tl.load(b_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
        z = tl.where(col_mask[None, :], z / temperature, float("-inf"))
        zy += tl.sum(tl.where(cols[None, :] == y[:, None], z, 0.0), 1)
        m_b = tl.max(z, 1)
        m_b_safe = tl.where(m_b == float("-inf"), 0.0, m_b)
        # d = z - max, floored so that exp(d) * d is 0 (not 0 * -inf) for -inf logits.
        d = tl.maximum(z - m_b_safe[:, None], -3.4028234663852886e38)
        e = tl.exp(d)
        s_b = tl.sum(e, 1)
        if NEED_ENTROPY:
            t_b = tl.sum(e * d, 1)
        else:
            t_b = tl.zeros((BLOCK_N,), tl.float32)
        m, s, t = merge_stats(m, s, t, m_b, s_b, t_b)
    part = tl.cast(pid_s, tl.int64) * N + rows
    tl.store(m_part_ptr + part, m, mask=row_mask)
    tl.store(s_part_ptr + part, s, mask=row_mask)
    if NEED_ENTROPY:
        tl.store(t_part_ptr + part, t, mask=row_mask)
    # Exactly one slice owns each target id.
    owns = row_mask & (y >= v_begin) & (y < v_begin + VOCAB_SPLIT)
    tl.store(zy_ptr + rows, zy, mask=owns)


@triton.jit(do_not_specialize=["N"])
def _fused_combine_kernel(m_part_ptr, s_part_ptr, t_part_ptr, zy_ptr, y_ptr, logp_ptr, ent_ptr, lse_ptr,
                          N, n_splits, ignore_index, NEED_ENTROPY: tl.constexpr, BLOCK: tl.constexpr):
    """Merge the per-slice summaries of each row in slice order (fixed, so batch-invariant)."""
    rows = (tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)).to(tl.int64)
    row_mask = rows < N
    m = tl.full((BLOCK,), float("-inf"), tl.float32)
    s = tl.zeros((BLOCK,), tl.float32)
    t = tl.zeros((BLOCK,), tl.float32)
    for i in range(0, n_splits):
        part = tl.cast(i, tl.int64) * N + rows
        m_i = tl.load(m_part_ptr + part, mask=row_mask, other=float("-inf"))
        s_i = tl.load(s_part_ptr + part, mask=row_mask, other=0.0)
        if NEED_ENTROPY:
            t_i = tl.load(t_part_ptr + part, mask=row_mask, other=0.0)
        else:
            t_i = tl.zeros((BLOCK,), tl.float32)
        m, s, t = merge_stats(m, s, t, m_i, s_i, t_i)
    y = tl.load(y_ptr + rows, mask=row_mask, other=ignore_index)
    valid = y != ignore_index
    zy = tl.load(zy_ptr + rows, mask=row_mask & valid, other=0.0)
    lse, logp, ent = finish_row(m, s, t, zy, valid, NEED_ENTROPY)
    tl.store(logp_ptr + rows, logp, mask=row_mask)
    tl.store(ent_ptr + rows, ent, mask=row_mask)
    tl.store(lse_ptr + rows, lse, mask=row_mask)


@triton.jit
def _row_grad_inputs(y_ptr, lse_ptr, ent_ptr, g_logp_ptr, g_ent_ptr, rows, row_mask, ignore_index, temperature,
                     HAS_G_ENT: tl.constexpr):
    """Per-row (y, ok, lse, mu, g1 / T, g2 / T) of a token tile; rows that get no gradient have g1 = g2 = 0."""
    y = tl.load(y_ptr + rows, mask=row_mask, other=ignore_index)
    lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0)
    ok = row_mask & (y != ignore_index) & (lse == lse) & (tl.abs(lse) < float("inf"))
    lse = tl.where(ok, lse, 0.0)
    g1 = tl.where(ok, tl.load(g_logp_ptr + rows, mask=row_mask, other=0.0), 0.0) / temperature
    if HAS_G_ENT:
        g2 = tl.where(ok, tl.load(g_ent_ptr + rows, mask=row_mask, other=0.0), 0.0) / temperature
        mu = lse - tl.load(ent_ptr + rows, mask=row_mask, other=0.0)
    else:
        g2 = lse * 0.0
        mu = lse * 0.0
    return y, ok, lse, mu, g1, g2


@triton.autotune(configs=_configs(_BWD_HIDDEN_CONFIGS, _SMALL), key=["H", "V"], reset_to_zero=["dh_ptr"])
@triton.jit(do_not_specialize=["N"])
def _fused_bwd_hidden_kernel(h_ptr, stride_h, w_ptr, stride_w, b_ptr, y_ptr, lse_ptr, ent_ptr,
                             g_logp_ptr, g_ent_ptr, dh_ptr, stride_dh,
                             N, H, V, temperature, ignore_index,
                             HAS_BIAS: tl.constexpr, HAS_G_ENT: tl.constexpr, DOT_PRECISION: tl.constexpr,
                             BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr):
    """d_hidden[tile] (fp32, zero-initialised) += sum over vocabulary tiles of dz @ W[tile]."""
    n0 = tl.program_id(0) * BLOCK_N
    r = tl.arange(0, BLOCK_N)
    c = tl.arange(0, BLOCK_V)
    k = tl.arange(0, BLOCK_H)
    rows = n0 + r
    row_mask = rows < N
    y, ok, lse, mu, g1, g2 = _row_grad_inputs(y_ptr, lse_ptr, ent_ptr, g_logp_ptr, g_ent_ptr, rows, row_mask,
                                              ignore_index, temperature, HAS_G_ENT)
    dh_tile = dh_ptr + tl.cast(n0, tl.int64) * stride_dh + (r[:, None] * stride_dh + k[None, :])
    if tl.max(ok.to(tl.int32), 0) > 0:  # a tile of ignored rows (e.g. a prompt) has zero gradient
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + c
            col_mask = cols < V
            z = _logit_tile(h_ptr, stride_h, w_ptr, stride_w, n0, v0, N, V, H,
                            BLOCK_N, BLOCK_V, BLOCK_H, DOT_PRECISION)
            if HAS_BIAS:
                z += tl.load(b_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
            z = tl.where(col_mask[None, :], z / temperature, float("-inf"))
            dz = softmax_grad(z, ok[:, None], lse[:, None], mu[:, None], g1[:, None], g2[:, None],
                               cols[None, :] == y[:, None], HAS_G_ENT)
            dz = dz.to(w_ptr.dtype.element_ty)
            w_ptrs = w_ptr + tl.cast(v0, tl.int64) * stride_w + (c[:, None] * stride_w + k[None, :])
            dh_ptrs = dh_tile
            for k0 in range(0, H, BLOCK_H):
                k_mask = k0 + k < H
                w = tl.load(w_ptrs, mask=col_mask[:, None] & k_mask[None, :], other=0.0)
                dh_mask = row_mask[:, None] & k_mask[None, :]
                dh = tl.load(dh_ptrs, mask=dh_mask, other=0.0)
                tl.store(dh_ptrs, _dot(dz, w, dh, DOT_PRECISION), mask=dh_mask)
                w_ptrs += BLOCK_H
                dh_ptrs += BLOCK_H


@triton.autotune(configs=_configs(_BWD_WEIGHT_CONFIGS, _SMALL), key=["H", "V"], reset_to_zero=["dw_ptr", "db_ptr"])
@triton.jit(do_not_specialize=["N"])
def _fused_bwd_weight_kernel(h_ptr, stride_h, w_ptr, stride_w, b_ptr, y_ptr, lse_ptr, ent_ptr,
                             g_logp_ptr, g_ent_ptr, dw_ptr, stride_dw, db_ptr,
                             N, H, V, temperature, ignore_index,
                             HAS_BIAS: tl.constexpr, HAS_G_ENT: tl.constexpr, DOT_PRECISION: tl.constexpr,
                             NEED_DW: tl.constexpr, NEED_DB: tl.constexpr,
                             BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr):
    """d_weight[tile] (fp32, zero-initialised) += sum over token tiles of dz.T @ h; d_bias = sum dz.

    The tile is computed tokens x vocabulary, like everywhere else, because per-token values (lse,
    gradients) are cheap to broadcast along that layout's rows; dz is transposed once for the dot.
    """
    v0 = tl.program_id(0) * BLOCK_V
    r = tl.arange(0, BLOCK_N)
    c = tl.arange(0, BLOCK_V)
    k = tl.arange(0, BLOCK_H)
    cols = v0 + c
    col_mask = cols < V
    dw_tile = dw_ptr + tl.cast(v0, tl.int64) * stride_dw + (c[:, None] * stride_dw + k[None, :])
    db = tl.zeros((BLOCK_V,), tl.float32)
    for n0 in range(0, N, BLOCK_N):
        rows = n0 + r
        row_mask = rows < N
        y, ok, lse, mu, g1, g2 = _row_grad_inputs(y_ptr, lse_ptr, ent_ptr, g_logp_ptr, g_ent_ptr, rows, row_mask,
                                                  ignore_index, temperature, HAS_G_ENT)
        if tl.max(ok.to(tl.int32), 0) > 0:
            z = _logit_tile(h_ptr, stride_h, w_ptr, stride_w, n0, v0, N, V, H,
                            BLOCK_N, BLOCK_V, BLOCK_H, DOT_PRECISION)
            if HAS_BIAS:  # reloaded per token tile (from cache): a live [BLOCK_V] vector costs registers
                z += tl.load(b_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
            z = tl.where(col_mask[None, :], z / temperature, float("-inf"))
            dz = softmax_grad(z, ok[:, None], lse[:, None], mu[:, None], g1[:, None], g2[:, None],
                               cols[None, :] == y[:, None], HAS_G_ENT)
            if NEED_DB:
                db += tl.sum(dz, 0)
            if NEED_DW:
                dz_t = tl.trans(dz.to(h_ptr.dtype.element_ty))
                h_ptrs = h_ptr + tl.cast(n0, tl.int64) * stride_h + (r[:, None] * stride_h + k[None, :])
                dw_ptrs = dw_tile
                for k0 in range(0, H, BLOCK_H):
                    k_mask = k0 + k < H
                    h = tl.load(h_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
                    dw_mask = col_mask[:, None] & k_mask[None, :]
                    dw = tl.load(dw_ptrs, mask=dw_mask, other=0.0)
                    tl.store(dw_ptrs, _dot(dz_t, h, dw, DOT_PRECISION), mask=dw_mask)
                    h_ptrs += BLOCK_H
                    dw_ptrs += BLOCK_H
    if NEED_DB:
        tl.store(db_ptr + cols, db, mask=col_mask)


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs: three TF32 products (error ~1e-6 relative, fp32-class) on tensor cores; plain
    # TF32 would cost ~1e-3 and IEEE fp32 runs on the CUDA cores (and spills registers).
    return "tf32x3" if dtype == torch.float32 else "tf32"


def _fused_forward(hidden, weight, bias, targets, temperature, ignore_index, need_entropy):
    n, hdim = hidden.shape
    vocab = weight.shape[0]
    dev = hidden.device
    logp = torch.empty(n, dtype=torch.float32, device=dev)
    ent = torch.empty_like(logp)
    lse = torch.empty_like(logp)
    if n == 0:
        return logp, ent, lse
    n_splits = triton.cdiv(vocab, _VOCAB_SPLIT)
    m_part = torch.empty((n_splits, n), dtype=torch.float32, device=dev)
    s_part = torch.empty_like(m_part)
    t_part = torch.empty_like(m_part) if need_entropy else m_part
    zy = torch.zeros(n, dtype=torch.float32, device=dev)
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]) * n_splits,)  # noqa: E731
    _fused_fwd_kernel[grid](hidden, hidden.stride(0), weight, weight.stride(0),
                            bias if bias is not None else weight, targets,
                            m_part, s_part, t_part, zy, n, hdim, vocab, n_splits, float(temperature),
                            HAS_BIAS=bias is not None, NEED_ENTROPY=bool(need_entropy),
                            DOT_PRECISION=_dot_precision(hidden.dtype), VOCAB_SPLIT=_VOCAB_SPLIT, GROUP_N=_GROUP_N)
    block = 16 if INTERPRET else 128
    _fused_combine_kernel[(triton.cdiv(n, block),)](m_part, s_part, t_part, zy, targets, logp, ent, lse, n, n_splits,
                                                    int(ignore_index), NEED_ENTROPY=bool(need_entropy), BLOCK=block)
    return logp, ent, lse


def _prepare(hidden, weight, bias, targets, ignore_index):
    """Rows with unit stride, and int32 ids with -1 for ignored rows (the ``[BLOCK_N, BLOCK_V]``
    target compares stay 32-bit)."""
    if hidden.stride(-1) != 1:
        hidden = hidden.contiguous()
    if weight.stride(-1) != 1:
        weight = weight.contiguous()
    if bias is not None:
        bias = bias.contiguous()
    return hidden, weight, bias, torch.where(targets == ignore_index, -1, targets).to(torch.int32)


class FusedLinear:
    """The single-kernel body of ``pyrl.fused_linear_logprobs(..., backend="triton")``: the kernels
    tile the whole batch, and backward recomputes the logits tiles (the caller saves the inputs and
    the per-row lse/entropy, O(N)). fp32 per-token outputs; gradients come back in the input dtype.
    """

    @staticmethod
    def fwd(hidden: torch.Tensor, weight: torch.Tensor, bias, targets: torch.Tensor, p: RowParams):
        """-> (logp, entropy, lse), each ``[N]`` fp32; entropy is 0 unless ``p.need_entropy``."""
        check_dtype(hidden)
        hidden, weight, bias, y = _prepare(hidden, weight, bias, targets, p.ignore_index)
        return _fused_forward(hidden, weight, bias, y, p.temperature, -1, p.need_entropy)

    @staticmethod
    def bwd(hidden: torch.Tensor, weight: torch.Tensor, bias, targets: torch.Tensor, lse: torch.Tensor,
            ent: torch.Tensor, g_logp: torch.Tensor, g_ent, p: RowParams, need: tuple[bool, bool, bool]):
        """-> (d_hidden, d_weight, d_bias), each ``None`` where ``need`` says so, in the input dtypes."""
        need_h, need_w, need_b = need
        hidden, weight, bias, y = _prepare(hidden, weight, bias, targets, p.ignore_index)
        n, hdim = hidden.shape
        vocab = weight.shape[0]
        temperature = float(p.temperature)
        g_logp = g_logp.to(torch.float32).contiguous()
        has_g_ent = g_ent is not None
        g_ent = g_ent.to(torch.float32).contiguous() if has_g_ent else g_logp
        common = dict(HAS_BIAS=bias is not None, HAS_G_ENT=has_g_ent, DOT_PRECISION=_dot_precision(hidden.dtype))
        b_arg = bias if bias is not None else weight
        d_hidden = d_weight = d_bias = None
        if need_h:
            # fp32 accumulator; for fp32 inputs it is the gradient itself.
            dh = torch.zeros((n, hdim), dtype=torch.float32, device=hidden.device)
            if n > 0:
                grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
                _fused_bwd_hidden_kernel[grid](hidden, hidden.stride(0), weight, weight.stride(0), b_arg, y,
                                               lse, ent, g_logp, g_ent, dh, dh.stride(0), n, hdim, vocab,
                                               temperature, -1, **common)
            d_hidden = dh.to(hidden.dtype)
        if need_w or need_b:
            dw = torch.zeros((vocab, hdim) if need_w else (1, 1), dtype=torch.float32, device=weight.device)
            db = torch.zeros(vocab if need_b else 1, dtype=torch.float32, device=weight.device)
            if n > 0:
                grid = lambda meta: (triton.cdiv(vocab, meta["BLOCK_V"]),)  # noqa: E731
                _fused_bwd_weight_kernel[grid](hidden, hidden.stride(0), weight, weight.stride(0), b_arg, y,
                                               lse, ent, g_logp, g_ent, dw, dw.stride(0), db, n, hdim, vocab,
                                               temperature, -1,
                                               NEED_DW=bool(need_w), NEED_DB=bool(need_b), **common)
            d_weight = dw.to(weight.dtype) if need_w else None
            d_bias = db.to(bias.dtype) if need_b else None
        return d_hidden, d_weight, d_bias
