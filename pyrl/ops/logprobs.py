"""Per-token log-probabilities and entropy, from logits or straight from hidden states (SPEC §1).

    z = (h @ W.T + bias) / temperature
    logp[n]    = z[n, y[n]] - logsumexp(z[n])
    entropy[n] = logsumexp(z[n]) - sum_v softmax(z[n])_v * z[n, v]

Two autograd Functions own what is saved and recomputed; the backends only supply row bodies:

* ``_LogprobsFromLogits`` saves the logits and the per-row ``lse``/``entropy`` and recomputes the
  softmax in backward (optionally writing the logits gradient over the logits buffer).
* ``_FusedLinearLogprobs`` walks the tokens in chunks: each chunk's logits ``[chunk, V]`` exist only
  while that chunk is processed, in forward and again (recomputed) in backward, so peak extra memory
  is one chunk of logits, never ``[N, V]``. ``d_weight``/``d_bias`` accumulate in fp32.

The row bodies: ``"torch"`` (the reference, plain PyTorch) and ``"cpp"`` (``torch.ops.pyrl`` from
``csrc/logprobs_cpu.cpp``, one online pass over the vocabulary per row). Both compute in fp32 (fp64
for fp64 inputs) whatever the input dtype. A row's result never depends on the other rows (the
reduction order is fixed per row, and every logits GEMM of the fused op runs on a multiple of
``GEMM_ROW_QUANTUM`` rows, see below), so log-probs and entropy are batch-invariant bit for bit
(docs/reliability.md).
"""
from __future__ import annotations

import os

import torch

from pyrl._backend import resolve_backend
from pyrl._validate import (check_bool, check_chunk_bytes, check_float, check_positive, check_same_device,
                            check_targets, shape_str)

__all__ = ["fused_linear_logprobs", "logprobs_from_logits"]

# Rows per chunk are chosen so one chunk of fp32 logits stays under this many bytes.
DEFAULT_CHUNK_BYTES = 32 * 2**20
# On CUDA a chunk must be large for the GEMMs to fill the GPU: 160 MB of fp32 logits is 256 rows at
# V=151936 (with the chunk's bf16 copy, ~240 MB of working memory).
DEFAULT_CUDA_CHUNK_BYTES = 160 * 2**20


def _resolve_chunk_bytes(chunk_bytes, device: torch.device) -> int:
    if chunk_bytes is None:
        return DEFAULT_CUDA_CHUNK_BYTES if device.type == "cuda" else DEFAULT_CHUNK_BYTES
    return check_chunk_bytes(chunk_bytes)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# --------------------------------------------------------------------------------------------
# Row bodies: logits [n, V] (raw, before temperature) -> per-row logp, entropy, lse; and back.
# --------------------------------------------------------------------------------------------
class _TorchRows:
    """The reference: plain PyTorch on one block of rows, in the accumulation dtype."""

    @staticmethod
    def fwd(logits, targets, temperature, ignore_index, need_entropy):
        acc = _acc_dtype(logits.dtype)
        z = logits.to(acc) / temperature
        # logsumexp with an n-independent summation order (see _row_sum); the max is exact.
        zmax = z.amax(dim=-1, keepdim=True)
        zmax = torch.where(torch.isfinite(zmax), zmax, 0.0)
        lse = _row_sum((z - zmax).exp_()).log_() + zmax.squeeze(1)
        finite = torch.isfinite(lse)
        valid = targets != ignore_index
        zy = z.gather(1, torch.where(valid, targets, 0).unsqueeze(1)).squeeze(1)
        logp = torch.where(finite, (zy - lse).clamp(max=0.0), float("-inf"))
        logp = torch.where(valid, logp, 0.0)
        if need_entropy:
            safe_lse = torch.where(finite, lse, 0.0).unsqueeze(1)
            # -inf logits are clamped so that p * log p is 0 * (large finite) = 0, not 0 * inf.
            log_p = z.clamp(min=torch.finfo(acc).min) - safe_lse
            ent = (-_row_sum(log_p.exp() * log_p)).clamp(min=0.0)
            ent = torch.where(valid & finite, ent, 0.0)
        else:
            ent = torch.zeros_like(lse)
        return logp, ent, lse

    @staticmethod
    def bwd(g_logp, g_ent, logits, targets, lse, ent, temperature, ignore_index, out=None):
        acc = _acc_dtype(logits.dtype)
        z = logits.to(acc) / temperature
        finite = torch.isfinite(lse)
        ok = (targets != ignore_index) & finite
        # Use every finite row's own lse (even ignored ones) so p never overflows; rows that are not
        # `ok` are zeroed with where() at the end: multiplying an inf by 0 would give NaN.
        safe_lse = torch.where(finite, lse, 0.0).unsqueeze(1)
        zc = z.clamp(min=torch.finfo(acc).min)
        p = (zc - safe_lse).exp()
        g1 = torch.where(ok, g_logp.to(acc), 0.0).unsqueeze(1)
        dz = -p * g1
        if g_ent is not None:
            mu = torch.where(ok, lse - ent, 0.0).unsqueeze(1)  # sum_v p_v z_v
            g2 = torch.where(ok, g_ent.to(acc), 0.0).unsqueeze(1)
            dz = dz - g2 * p * (zc - mu)
        dz.scatter_add_(1, torch.where(ok, targets, 0).unsqueeze(1), g1)
        dz = torch.where(ok.unsqueeze(1), dz / temperature, 0.0)
        if out is not None:
            out.copy_(dz)
            return out
        return dz.to(logits.dtype)


class _CppRows:
    """``torch.ops.pyrl.logprobs_fwd/bwd`` (C++; CPU, and CUDA when pyrl._C was built with it)."""

    @staticmethod
    def fwd(logits, targets, temperature, ignore_index, need_entropy):
        return torch.ops.pyrl.logprobs_fwd(logits, targets, float(temperature), int(ignore_index), bool(need_entropy))

    @staticmethod
    def bwd(g_logp, g_ent, logits, targets, lse, ent, temperature, ignore_index, out=None):
        args = (g_logp, g_ent, logits, targets, lse, ent, float(temperature), int(ignore_index))
        if out is not None:  # only ever called with out=logits (in-place)
            torch.ops.pyrl.logprobs_bwd_(*args)
            return logits
        return torch.ops.pyrl.logprobs_bwd(*args)


_ROWS = {"torch": _TorchRows, "cpp": _CppRows}
_HAS = ("torch", "cpp", "triton")


def _triton_module():
    from pyrl import kernels  # lazy: Triton costs start-up time and memory on CPU-only paths

    return kernels


# --------------------------------------------------------------------------------------------
# logprobs_from_logits
# --------------------------------------------------------------------------------------------
class _LogprobsFromLogits(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, temperature, ignore_index, need_entropy, inplace_backward, rows):
        logp, ent, lse = rows.fwd(logits, targets, temperature, ignore_index, need_entropy)
        ctx.save_for_backward(logits, targets, lse, ent)
        ctx.cfg = (temperature, ignore_index, need_entropy, inplace_backward, rows)
        if not need_entropy:
            ctx.mark_non_differentiable(ent)
        return logp, ent

    @staticmethod
    def backward(ctx, g_logp, g_ent):
        logits, targets, lse, ent = ctx.saved_tensors
        temperature, ignore_index, need_entropy, inplace, rows = ctx.cfg
        if g_logp is None:
            g_logp = torch.zeros_like(lse)
        g_ent = g_ent if need_entropy else None
        out = logits if inplace else None
        d_logits = rows.bwd(g_logp, g_ent, logits, targets, lse, ent, temperature, ignore_index, out=out)
        return d_logits, None, None, None, None, None, None


def logprobs_from_logits(logits, targets, *, temperature=1.0, ignore_index=-100, return_entropy=False,
                         inplace_backward=False, backend="auto"):
    """Log-probability of ``targets`` under ``softmax(logits / temperature)`` (and its entropy).

    Args:
        logits: ``[..., V]`` fp32/bf16/fp16/fp64.
        targets: ``[...]`` int64 token ids in ``[0, V)`` or ``ignore_index`` (gives 0 and no gradient).
        temperature: > 0; the logits are divided by it.
        return_entropy: also return the entropy of each row's distribution.
        inplace_backward: let backward overwrite ``logits`` with its gradient (saves an ``[N, V]``
            buffer; only when nothing else needs ``logits`` afterwards).
        backend: ``"auto" | "triton" | "cpp" | "torch"``.

    Returns:
        ``logp`` ``[...]`` fp32 (fp64 for fp64 input), or ``(logp, entropy)``.
    """
    check_float("logits", logits, min_dim=1)
    vocab = logits.shape[-1]
    if vocab < 1:
        raise ValueError(f"logits must have a vocabulary dimension >= 1, got shape {shape_str(logits)}")
    temperature = check_positive("temperature", temperature)
    if not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    check_bool("return_entropy", return_entropy)
    check_bool("inplace_backward", inplace_backward)
    check_same_device(logits=logits, targets=targets)
    targets = check_targets("targets", targets, logits.shape[:-1], vocab, ignore_index)
    name = resolve_backend(backend, logits.device, has=_HAS)
    lead = logits.shape[:-1]
    flat = logits.reshape(-1, vocab)
    if flat.stride(-1) != 1:
        # not .contiguous(): it keeps any stride of a size-1 (V == 1) or empty dimension, and the
        # row bodies need unit stride along the vocabulary
        flat = flat.clone(memory_format=torch.contiguous_format)
    rows = _triton_module().LogprobRows if name == "triton" else _ROWS[name]
    logp, ent = _LogprobsFromLogits.apply(flat, targets.reshape(-1), temperature, ignore_index,
                                          bool(return_entropy), bool(inplace_backward), rows)
    logp = logp.reshape(lead)
    return (logp, ent.reshape(lead)) if return_entropy else logp


# --------------------------------------------------------------------------------------------
# fused_linear_logprobs: chunked over tokens, logits recomputed per chunk in backward
# --------------------------------------------------------------------------------------------
# Batch invariance of the GEMMs. A BLAS may give a row of ``h @ W.T`` other last bits depending on
# how many rows the call has: MKL (PyTorch's x86 BLAS) does whenever M is not a multiple of 4 (its
# edge kernels sum in another order). Every logits GEMM of the fused ops therefore runs on a
# multiple of GEMM_ROW_QUANTUM rows, zero-padding the last chunk, so a token's logits (and so its
# log-prob, entropy and d_hidden) are bitwise the same whatever else is in the batch. 16 covers
# microkernel heights 1, 2, 4, 8 and 16. Keep equal to kGemmRowQuantum in csrc/fused_linear_cpu.cpp.
GEMM_ROW_QUANTUM = 16
# Row reductions of the torch body run over blocks of this many entries: a single sum over a row
# longer than ATen's grain size (32768) is split across threads when it is the only output, which
# changes its rounding with the number of rows.
_SUM_BLOCK = 2048


def _chunk_rows(n_rows: int, vocab: int, chunk_bytes: int) -> int:
    rows = chunk_bytes // max(1, vocab * 4)
    if rows >= GEMM_ROW_QUANTUM:
        rows -= rows % GEMM_ROW_QUANTUM  # full chunks need no padding
    return max(1, min(n_rows, rows))


def _padded_chunk_logits(h, weight, bias):
    """``h @ weight.T + bias`` computed on ``h`` zero-padded to a multiple of GEMM_ROW_QUANTUM rows;
    returns the padded ``[c', V]`` buffer (its first ``h.shape[0]`` rows are the logits)."""
    pad = -h.shape[0] % GEMM_ROW_QUANTUM
    if pad:
        h = torch.cat([h, h.new_zeros(pad, h.shape[1])])
    return torch.addmm(bias, h, weight.t()) if bias is not None else h @ weight.t()


def _chunk_logits(h, weight, bias):
    # h, weight, bias already in the accumulation dtype; a row-contiguous [c, V] view.
    return _padded_chunk_logits(h, weight, bias)[: h.shape[0]]


def _padded_rows_mm(full, rows, w):
    """``full[:rows] @ w`` as a GEMM over all of ``full`` (whose rows past ``rows`` are zeroed here),
    so the call has a multiple of GEMM_ROW_QUANTUM rows (see ``_padded_chunk_logits``)."""
    if full.shape[0] != rows:
        full[rows:] = 0
    # As (W.T @ full.T).T: with few rows and a large V, MKL streams W through this layout ~1.35x
    # faster than through full @ W (87 vs 117 ms at 48 x 151936 x 896 fp32 on 2 EPYC cores).
    return torch.mm(w.t(), full.t()).t()[:rows]


def _row_sum(x):
    """``x.sum(-1)`` for ``[n, V]`` with a reduction order that does not depend on ``n``."""
    n, V = x.shape
    if V <= _SUM_BLOCK:
        return x.sum(-1)
    k = V // _SUM_BLOCK
    parts = x[:, : k * _SUM_BLOCK].unflatten(1, (k, _SUM_BLOCK)).sum(-1)  # a view: no copy
    if V % _SUM_BLOCK:
        parts = torch.cat([parts, x[:, k * _SUM_BLOCK:].sum(-1, keepdim=True)], dim=1)
    return parts.sum(-1)


def _mm_fp32(a, b):
    """``a @ b`` with an fp32 result from 16-bit operands: cuBLAS accumulates in fp32 and writes fp32
    (``out_dtype``, CUDA); elsewhere, or on a torch without it, the operands are widened first."""
    global _MM_OUT_DTYPE
    if _MM_OUT_DTYPE is not False and a.is_cuda:
        try:
            out = torch.mm(a, b, out_dtype=torch.float32)
        except torch.cuda.OutOfMemoryError:
            raise  # a real failure, not a missing feature: never fall back to widening the weight
        except (TypeError, RuntimeError, NotImplementedError):
            _MM_OUT_DTYPE = False
        else:
            _MM_OUT_DTYPE = True
            return out
    return a.float() @ b.float()


_MM_OUT_DTYPE = None  # unknown until the first CUDA call


class _AccMath:
    """The GEMMs of one token chunk with every operand in the accumulation dtype (fp32; fp64 for
    fp64): the reference, and the CPU path. Chunks are padded to a multiple of GEMM_ROW_QUANTUM rows.

    A *math* object owns the operands and the gradient buffers of one forward or backward walk:
    ``operand(s, e)`` is the chunk of hidden states as the GEMMs take it, ``logits(h)`` the padded
    ``[c', V]`` fp32 buffer whose first rows are the chunk's logits, and ``backprop`` consumes that
    buffer once it holds ``d logits`` (it may be overwritten).
    """

    widen = True  # the weight (GEMM operand) and the d_weight accumulator in the accumulation dtype

    def __init__(self, hidden, weight, bias, chunk, need=(False, False, False)):
        acc = _acc_dtype(hidden.dtype)
        self.hidden, self.weight, self.bias, self.chunk = hidden, weight, bias, chunk
        self.w = weight.to(acc) if self.widen else weight
        self.b = None if bias is None else bias.to(acc)
        need_h, need_w, need_b = need
        self.d_hidden = torch.zeros_like(hidden) if need_h else None
        self.d_weight = torch.zeros_like(weight, dtype=self.w.dtype) if need_w else None
        self.d_bias = torch.zeros(weight.shape[0], dtype=acc, device=weight.device) if need_b else None

    def operand(self, s, e):
        return self.hidden[s:e].to(self.w.dtype)

    def logits(self, h):
        return _padded_chunk_logits(h, self.w, self.b)

    def backprop(self, full, s, e, h):
        """Accumulate the chunk's gradients from ``full[:e - s]`` = d logits (the rest is scratch)."""
        dz = full[: e - s]
        if self.d_hidden is not None:
            self.d_hidden[s:e] = _padded_rows_mm(full, e - s, self.w).to(self.hidden.dtype)
        if self.d_weight is not None:
            self.d_weight.addmm_(dz.t(), h)
        if self.d_bias is not None:
            self.d_bias += dz.sum(0)

    def grads(self):
        """(d_hidden, d_weight, d_bias) in the dtypes of hidden, weight and bias."""
        return (self.d_hidden, None if self.d_weight is None else self.d_weight.to(self.weight.dtype),
                None if self.d_bias is None else self.d_bias.to(self.bias.dtype))


class _LowpMath(_AccMath):
    """bf16/fp16 (made for CUDA): the GEMMs run on the tensor cores in the input dtype, the weight is
    used as it is (no fp32 copy), and the logits come out of cuBLAS in fp32 (fp32 accumulation).
    ``d logits`` is rounded to the input dtype for the two gradient GEMMs (as flash-attention does
    with P), and ``d_weight`` accumulates in the weight's dtype, rounded once per chunk (an fp32
    accumulator would be 2.5 GB at V=151936, H=4096). Every chunk GEMM is padded to the same
    ``chunk`` rows, so a token's logits never depend on how many tokens share its chunk (batch
    invariance).
    """

    widen = False

    def operand(self, s, e):
        return self.hidden[s:e]

    def logits(self, h):
        if h.shape[0] != self.chunk:
            h = torch.cat([h, h.new_zeros(self.chunk - h.shape[0], h.shape[1])])
        z = _mm_fp32(h, self.w.t())
        return z.add_(self.b) if self.b is not None else z

    def backprop(self, full, s, e, h):
        rows = e - s
        if full.shape[0] != rows:
            full[rows:] = 0
        if self.d_bias is not None:
            self.d_bias += full[:rows].sum(0)
        dz = full.to(self.w.dtype)
        if self.d_hidden is not None:
            self.d_hidden[s:e] = (dz @ self.w)[:rows]
        if self.d_weight is not None:
            self.d_weight.addmm_(dz[:rows].t(), h)


def _lowp_chunk_rows(vocab: int, chunk_bytes: int) -> int:
    """Rows of every chunk GEMM of ``_LowpMath``: a multiple of 64 in [64, 4096]."""
    rows = chunk_bytes // max(1, vocab * 4)
    return int(min(4096, max(64, rows - rows % 64)))


def _triton_linear(hidden, vocab: int, chunk_bytes: int):
    """The body of ``backend="triton"`` for the fused op and its chunk rows: ``(body, chunk)``.

    bf16/fp16 on CUDA take cuBLAS GEMMs per token chunk around Triton's row kernels (the GEMMs run
    at tensor-core speed; the single kernel's tl.dot tiles reached ~100 TFLOP/s on an H100, see
    benchmarks/results/h100-gpu-check-1); fp32 takes the single kernel (3xTF32 dot products instead
    of full-fp32 GEMMs). ``PYRL_TRITON_LINEAR=fused|chunked`` overrides the choice.
    """
    low = hidden.dtype in (torch.bfloat16, torch.float16)
    mode = os.environ.get("PYRL_TRITON_LINEAR") or ("chunked" if low and hidden.is_cuda else "fused")
    if mode == "fused":
        return _triton_module().FusedLinear, hidden.shape[0]  # one kernel tiles the whole batch
    if mode != "chunked":
        raise ValueError(f"PYRL_TRITON_LINEAR must be 'fused' or 'chunked', got {mode!r}")
    rows = _triton_module().LogprobRows
    if low:
        return _ChunkedLinear(rows, _LowpMath), _lowp_chunk_rows(vocab, chunk_bytes)
    return _ChunkedLinear(rows, _AccMath), _chunk_rows(hidden.shape[0], vocab, chunk_bytes)


class _ChunkedLinear:
    """The fused op as a Python loop over token chunks: a row body (``_TorchRows`` or Triton's
    ``LogprobRows``) on each chunk's logits, and a math class for the GEMMs around it."""

    def __init__(self, rows, math):
        self.rows, self.math = rows, math

    def fwd(self, hidden, weight, bias, targets, temperature, ignore_index, need_entropy, chunk):
        m = self.math(hidden, weight, bias, chunk)
        n = hidden.shape[0]
        acc = _acc_dtype(hidden.dtype)
        logp, ent, lse = (hidden.new_empty(n, dtype=acc) for _ in range(3))
        for s in range(0, n, chunk):
            e = min(n, s + chunk)
            logits = None  # drop the last chunk before the next is allocated: one chunk alive, not two
            logits = m.logits(m.operand(s, e))[: e - s]
            logp[s:e], ent[s:e], lse[s:e] = self.rows.fwd(logits, targets[s:e], temperature, ignore_index,
                                                           need_entropy)
        return logp, ent, lse

    def bwd(self, g_logp, g_ent, hidden, weight, bias, targets, lse, ent, temperature, ignore_index, chunk,
            need_h, need_w, need_b):
        m = self.math(hidden, weight, bias, chunk, need=(need_h, need_w, need_b))
        n = hidden.shape[0]
        active = targets != ignore_index
        for s in range(0, n, chunk):
            e = min(n, s + chunk)
            if not bool(active[s:e].any()):
                continue  # every row ignored: its gradient is exactly zero
            full = logits = None  # one chunk alive at a time, not two
            h = m.operand(s, e)
            full = m.logits(h)
            logits = full[: e - s]
            self.rows.bwd(g_logp[s:e], None if g_ent is None else g_ent[s:e], logits, targets[s:e],
                          lse[s:e], ent[s:e], temperature, ignore_index, out=logits)
            m.backprop(full, s, e, h)
        return m.grads()


_ChunkedTorchLinear = _ChunkedLinear(_TorchRows, _AccMath)


class _CppLinear:
    """``torch.ops.pyrl.fused_linear_logprobs_fwd/bwd``: the same chunk loop in C++ (one op each)."""

    @staticmethod
    def fwd(hidden, weight, bias, targets, temperature, ignore_index, need_entropy, chunk):
        return torch.ops.pyrl.fused_linear_logprobs_fwd(hidden, weight, bias, targets, float(temperature),
                                                        int(ignore_index), bool(need_entropy), int(chunk))

    @staticmethod
    def bwd(g_logp, g_ent, hidden, weight, bias, targets, lse, ent, temperature, ignore_index, chunk,
            need_h, need_w, need_b):
        dh, dw, db = torch.ops.pyrl.fused_linear_logprobs_bwd(
            g_logp, g_ent, hidden, weight, bias, targets, lse, ent, float(temperature), int(ignore_index),
            int(chunk), bool(need_h), bool(need_w), bool(need_b))
        return dh if need_h else None, dw if need_w else None, db if need_b else None


_LINEAR = {"torch": _ChunkedTorchLinear, "cpp": _CppLinear}


class _FusedLinearLogprobs(torch.autograd.Function):
    """Saves hidden, weight, bias and the per-row lse/entropy; the body recomputes logits in backward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, ignore_index, need_entropy, body, chunk):
        logp, ent, lse = body.fwd(hidden, weight, bias, targets, temperature, ignore_index, need_entropy, chunk)
        ctx.save_for_backward(hidden, weight, bias, targets, lse, ent)
        ctx.cfg = (temperature, ignore_index, need_entropy, body, chunk)
        if not need_entropy:
            ctx.mark_non_differentiable(ent)
        return logp, ent

    @staticmethod
    def backward(ctx, g_logp, g_ent):
        hidden, weight, bias, targets, lse, ent = ctx.saved_tensors
        temperature, ignore_index, need_entropy, body, chunk = ctx.cfg
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        if g_logp is None:
            g_logp = torch.zeros_like(lse)
        g_ent = g_ent if need_entropy else None
        d_hidden, d_weight, d_bias = body.bwd(g_logp, g_ent, hidden, weight, bias, targets, lse, ent, temperature,
                                              ignore_index, chunk, need_h, need_w, need_b and bias is not None)
        return d_hidden, d_weight, d_bias, None, None, None, None, None, None


def _check_linear_args(hidden, weight, bias, temperature, ignore_index, names=("hidden", "weight", "bias")):
    """``names``: what the caller calls hidden, weight and bias (e.g. Liger's ``_input``, ``lin_weight``)."""
    nh, nw, nb = names
    check_float(nh, hidden, min_dim=1)
    check_float(nw, weight, dim=2)
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"{nw} must have shape [V, H] with H = {nh}.shape[-1] = {hidden.shape[-1]}, "
                         f"got {shape_str(weight)}")
    if weight.shape[0] < 1:
        raise ValueError(f"{nw} must have at least one vocabulary row, got shape {shape_str(weight)}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"{nw} must have the dtype of {nh} ({hidden.dtype}), got {weight.dtype}")
    if bias is not None:
        check_float(nb, bias, dim=1)
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"{nb} must have shape [V] = [{weight.shape[0]}], got {shape_str(bias)}")
        if bias.dtype != hidden.dtype:
            raise TypeError(f"{nb} must have the dtype of {nh} ({hidden.dtype}), got {bias.dtype}")
    if not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    return check_positive("temperature", temperature)


def fused_linear_logprobs(hidden, weight, targets, *, bias=None, temperature=1.0, ignore_index=-100,
                          return_entropy=False, vocab_parallel_group=None, backend="auto",
                          chunk_bytes=None):
    """Per-token log-prob (and entropy) of ``targets`` from hidden states and the LM-head weight.

    Never holds ``[N, V]`` logits: tokens are processed in chunks of at most ``chunk_bytes`` of fp32
    logits, recomputed in backward. Differentiable in ``hidden``, ``weight`` and ``bias``.

    Args:
        hidden: ``[..., H]`` fp32/bf16/fp16/fp64.
        weight: ``[V, H]``, the LM head (same dtype as ``hidden``).
        targets: ``[...]`` int64 ids in ``[0, V)`` or ``ignore_index``.
        bias: optional ``[V]``.
        temperature: > 0, divides the logits.
        return_entropy: also return each token's entropy.
        vocab_parallel_group: a ``torch.distributed`` group across which ``weight`` is split by
            vocabulary (see ``pyrl.ops.vocab_parallel``).
        backend: ``"auto" | "triton" | "cpp" | "torch"``.
        chunk_bytes: the fp32 logits of one token chunk, in bytes (default: 32 MiB on CPU,
            160 MiB on CUDA, where the chunk GEMMs need more rows to fill the GPU).

    Returns:
        ``logp [...]`` fp32 (fp64 for fp64 input), or ``(logp, entropy)``.
    """
    temperature = _check_linear_args(hidden, weight, bias, temperature, ignore_index)
    check_bool("return_entropy", return_entropy)
    check_same_device(hidden=hidden, weight=weight, bias=bias, targets=targets)
    chunk_bytes = _resolve_chunk_bytes(chunk_bytes, hidden.device)
    if vocab_parallel_group is not None:
        from pyrl.ops.vocab_parallel import vocab_parallel_linear_logprobs

        return vocab_parallel_linear_logprobs(hidden, weight, targets, group=vocab_parallel_group, bias=bias,
                                              temperature=temperature, ignore_index=ignore_index,
                                              return_entropy=return_entropy, backend=backend,
                                              chunk_bytes=chunk_bytes)
    targets = check_targets("targets", targets, hidden.shape[:-1], weight.shape[0], ignore_index)
    name = resolve_backend(backend, hidden.device, has=_HAS)
    lead = hidden.shape[:-1]
    h2 = hidden.reshape(-1, hidden.shape[-1])
    t1 = targets.reshape(-1)
    if name == "triton":
        body, chunk = _triton_linear(h2, weight.shape[0], chunk_bytes)
    else:
        body, chunk = _LINEAR[name], _chunk_rows(h2.shape[0], weight.shape[0], chunk_bytes)
    logp, ent = _FusedLinearLogprobs.apply(h2, weight, bias, t1, temperature, ignore_index, bool(return_entropy),
                                           body, chunk)
    logp = logp.reshape(lead)
    return (logp, ent.reshape(lead)) if return_entropy else logp
