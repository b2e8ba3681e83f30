"""Per-token log-prob and entropy with the LM head split by vocabulary across ranks (SPEC §1).

Each rank of a ``torch.distributed`` process group holds a contiguous slice of the LM head,
``weight[V_r, H]`` (and ``bias[V_r]``), in rank order: rank ``r`` owns the global ids
``[offset_r, offset_r + V_r)`` with ``offset_r = V_0 + ... + V_{r-1}``. Slices may differ in size.
``hidden [..., H]`` and ``targets [...]`` (GLOBAL ids) are the same on every rank. Every rank
returns the full-vocabulary ``logp`` (and ``entropy``) of every token; the values are bitwise
identical on all ranks (they are computed from the same all-reduced statistics).

Collectives (all on ``group``; every rank must make the same calls in the same order):

* once per call: one ``all_gather`` of a tiny int64 tensor (each rank's ``V_r``, ``N``, ``H``,
  dtype, grad flags, ``chunk_bytes``), so each rank learns its vocabulary offset, the global ``V``
  and a common chunk size, and mismatched calls raise the same clear error on every rank instead
  of hanging;
* forward, per chunk of tokens: one ``all_reduce(MAX)`` of the per-row local max ``m_r`` and one
  ``all_reduce(SUM)`` of ONE packed ``[2 or 3, chunk]`` tensor holding, relative to the global max
  ``m``, the local sum-exp ``s_r = sum exp(z - m)``, (with entropy) ``t_r = sum exp(z - m)(z - m)``,
  and the target logit (its owner contributes ``z_y``, the others 0). Then
  ``lse = m + log s``, ``logp = z_y - lse``, ``entropy = log s - t / s``;
* backward, per chunk: one ``all_reduce(SUM)`` (fp32, or fp64 for fp64 inputs) of the local
  contribution ``dz_r @ W_r`` to ``d_hidden``.

Gradients: ``d_weight``/``d_bias`` are this rank's slice (fp32 accumulation, returned in the input
dtype). **Each rank's ``d_hidden`` is the FULL gradient** (already summed over the vocabulary
shards inside backward): do not all-reduce it again across this group (e.g. a Megatron-style
"copy to tensor-parallel region" in front of the LM head would double-count it). Data-parallel
averaging across *other* groups is unaffected.

This path is the PyTorch reference body plus collectives on every device (CPU with gloo, CUDA with
NCCL); ``backend`` accepts ``"auto"`` and ``"torch"`` only.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from pyrl._backend import BACKENDS
from pyrl._validate import FLOAT_DTYPES, check_same_device, check_targets
from pyrl.ops.logprobs import (DEFAULT_CHUNK_BYTES, _acc_dtype, _check_linear_args, _chunk_logits, _chunk_rows,
                               _row_sum)

__all__ = ["vocab_parallel_linear_logprobs"]


def _check_group(group):
    if not dist.is_available():
        raise RuntimeError("vocab_parallel_group needs torch.distributed, which this PyTorch build lacks")
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"vocab_parallel_group must be a torch.distributed.ProcessGroup (e.g. dist.group.WORLD "
                        f"or dist.new_group(...)), got {type(group).__name__}")
    if not dist.is_initialized():
        raise RuntimeError("vocab_parallel_group given but torch.distributed is not initialized; "
                           "call torch.distributed.init_process_group first")
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError("this process is not a member of vocab_parallel_group")
    return rank, dist.get_world_size(group)


def _gather_meta(group, world, device, *, v_local, n, h, dtype, grad_needed, need_h, chunk_bytes):
    """One all_gather of a tiny tensor: every rank sees every rank's call signature."""
    mine = torch.tensor([v_local, n, h, FLOAT_DTYPES.index(dtype), int(grad_needed), int(need_h), chunk_bytes],
                        dtype=torch.int64, device=device)
    parts = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(parts, mine, group=group)
    meta = torch.stack(parts).cpu()  # [world, 7]
    # Every rank runs the same checks on the same gathered data, so all raise together (no hang).
    for col, what in ((1, "number of tokens N (hidden.shape[:-1] numel)"), (2, "hidden size H"),
                      (3, "dtype of hidden/weight"),
                      (4, "autograd need (some input requires grad, grad mode on)")):
        if not bool((meta[:, col] == meta[0, col]).all()):
            raise ValueError(f"vocab-parallel ranks disagree on the {what}: per rank {meta[:, col].tolist()}; "
                             "every rank must call with the same hidden/targets and the same grad setup")
    sizes = meta[:, 0].tolist()
    need_h_any = bool(meta[:, 5].any())
    return sizes, need_h_any, int(meta[:, 6].min()), max(sizes)


class _VocabParallelLinearLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, group, vocab_start, temperature, ignore_index,
                need_entropy, need_h_any, chunk):
        acc = _acc_dtype(hidden.dtype)
        w = weight.to(acc)
        b = bias.to(acc) if bias is not None else None
        n, v_local = hidden.shape[0], weight.shape[0]
        fmin = torch.finfo(acc).min
        logp = hidden.new_empty(n, dtype=acc)
        ent = hidden.new_empty(n, dtype=acc)
        lse = hidden.new_empty(n, dtype=acc)
        valid_all = targets != ignore_index
        local_all = targets - vocab_start
        owned_all = valid_all & (local_all >= 0) & (local_all < v_local)
        for s in range(0, n, chunk):
            e = min(n, s + chunk)
            z = ex = None  # the last chunk's buffers go before the next ones are allocated
            z = _chunk_logits(hidden[s:e].to(acc), w, b).div_(temperature)  # [c, V_r]
            m = z.amax(dim=1)
            dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
            m_safe = torch.where(torch.isfinite(m), m, 0.0).unsqueeze(1)
            ex = (z - m_safe).exp_()  # -inf logits give exactly 0
            owned = owned_all[s:e]
            zy = z.gather(1, torch.where(owned, local_all[s:e], 0).unsqueeze(1)).squeeze(1)
            rows = [_row_sum(ex), torch.where(owned, zy, 0.0)]
            if need_entropy:
                # -inf logits clamped so the term is 0 * (large finite) = 0, never 0 * inf.
                rows.append(_row_sum(ex * (z.clamp_(min=fmin) - m_safe)))
            packed = torch.stack(rows)
            dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=group)
            sum_exp, zy = packed[0], packed[1]
            log_s = sum_exp.log()
            lse_c = m + log_s  # all-(-inf) row: -inf + log 0 = -inf
            finite = torch.isfinite(lse_c)
            valid = valid_all[s:e]
            lp = torch.where(finite, (zy - lse_c).clamp(max=0.0), float("-inf"))
            logp[s:e] = torch.where(valid, lp, 0.0)
            lse[s:e] = lse_c
            if need_entropy:
                en = (log_s - packed[2] / sum_exp).clamp(min=0.0)
                ent[s:e] = torch.where(valid & finite, en, 0.0)
            else:
                ent[s:e] = 0.0
        ctx.save_for_backward(hidden, weight, bias, targets, lse, ent)
        ctx.cfg = (group, vocab_start, temperature, ignore_index, need_entropy, need_h_any, chunk)
        if not need_entropy:
            ctx.mark_non_differentiable(ent)
        return logp, ent

    @staticmethod
    def backward(ctx, g_logp, g_ent):
        hidden, weight, bias, targets, lse, ent = ctx.saved_tensors
        group, vocab_start, temperature, ignore_index, need_entropy, need_h_any, chunk = ctx.cfg
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        acc = _acc_dtype(hidden.dtype)
        w = weight.to(acc)
        b = bias.to(acc) if bias is not None else None
        n, v_local = hidden.shape[0], weight.shape[0]
        fmin = torch.finfo(acc).min
        if g_logp is None:
            g_logp = torch.zeros_like(lse)
        if not need_entropy:
            g_ent = None
        d_hidden = torch.zeros_like(hidden) if need_h else None
        d_weight = torch.zeros_like(weight, dtype=acc) if need_w else None
        d_bias = torch.zeros(v_local, dtype=acc, device=weight.device) if need_b and bias is not None else None
        finite_all = torch.isfinite(lse)
        ok_all = (targets != ignore_index) & finite_all
        local_all = targets - vocab_start
        for s in range(0, n, chunk):
            e = min(n, s + chunk)
            ok = ok_all[s:e]
            h = hidden[s:e].to(acc)
            if bool(ok.any()):
                z = p = dz = None  # the last chunk's buffers go before the next ones are allocated
                z = _chunk_logits(h, w, b).div_(temperature).clamp_(min=fmin)
                safe_lse = torch.where(finite_all[s:e], lse[s:e], 0.0).unsqueeze(1)
                p = (z - safe_lse).exp_()
                g1 = torch.where(ok, g_logp[s:e].to(acc), 0.0)
                dz = p * (-g1).unsqueeze(1)
                if g_ent is not None:
                    mu = torch.where(ok, lse[s:e] - ent[s:e], 0.0).unsqueeze(1)  # sum_v p_v z_v
                    g2 = torch.where(ok, g_ent[s:e].to(acc), 0.0).unsqueeze(1)
                    dz -= g2 * p * (z - mu)
                # Rows that are ignored (or whose lse is not finite) get exactly zero gradient,
                # even where p overflowed: select, never multiply by 0.
                dz = torch.where(ok.unsqueeze(1), dz, 0.0)
                local = local_all[s:e]
                owned = ok & (local >= 0) & (local < v_local)
                dz.scatter_add_(1, torch.where(owned, local, 0).unsqueeze(1), torch.where(owned, g1, 0.0).unsqueeze(1))
                dz.div_(temperature)
                if need_w:
                    d_weight.addmm_(dz.t(), h)
                if d_bias is not None:
                    d_bias += dz.sum(0)
                dh = dz @ w if need_h_any else None
            else:
                dh = h.new_zeros(e - s, h.shape[1]) if need_h_any else None
            if need_h_any:
                # Every rank joins (the flag is the same on all ranks), even one whose own hidden
                # needs no gradient: the others need its shard's contribution.
                dist.all_reduce(dh, op=dist.ReduceOp.SUM, group=group)
                if need_h:
                    d_hidden[s:e] = dh.to(hidden.dtype)
        return (d_hidden,
                None if d_weight is None else d_weight.to(weight.dtype),
                None if d_bias is None else d_bias.to(bias.dtype),
                None, None, None, None, None, None, None, None)


def vocab_parallel_linear_logprobs(hidden, weight, targets, *, group, bias=None, temperature=1.0,
                                   ignore_index=-100, return_entropy=False, backend="auto",
                                   chunk_bytes=DEFAULT_CHUNK_BYTES):
    """``fused_linear_logprobs`` with the LM head split by vocabulary across ``group``'s ranks.

    Args:
        hidden: ``[..., H]`` fp32/bf16/fp16/fp64, the same on every rank.
        weight: ``[V_r, H]``, this rank's contiguous vocabulary slice (rank order; sizes may differ).
        targets: ``[...]`` int64 GLOBAL ids in ``[0, V)`` (``V = sum_r V_r``) or ``ignore_index``,
            the same on every rank.
        group: the ``torch.distributed.ProcessGroup`` the head is split across.
        bias: optional ``[V_r]``, this rank's slice.
        temperature: > 0, divides the logits.
        return_entropy: also return each token's (full-vocabulary) entropy.
        backend: ``"auto"`` or ``"torch"`` (this path always runs the PyTorch body plus collectives).
        chunk_bytes: bound on one chunk of fp32 local logits ``[chunk, V_r]``; the chunk size is
            computed from the largest slice and the smallest ``chunk_bytes`` over the ranks, so every
            rank runs the same number of chunks.

    Returns:
        ``logp [...]`` fp32 (fp64 for fp64 input), or ``(logp, entropy)``; identical on every rank.
        In backward, ``weight``/``bias`` get this rank's slice of the gradient and ``hidden`` gets
        the FULL gradient on every rank (already all-reduced over ``group``; do not reduce again).

    Every rank must call this with the same ``hidden``/``targets`` shapes and backpropagate through
    the outputs, as for any tensor-parallel op; mismatched shapes raise on every rank.
    """
    temperature = _check_linear_args(hidden, weight, bias, temperature, ignore_index)
    check_same_device(hidden=hidden, weight=weight, bias=bias, targets=targets)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend not in ("auto", "torch"):
        raise RuntimeError(f"backend={backend!r} is not implemented for the vocab-parallel path "
                           "(vocab_parallel_group): it runs the PyTorch body plus collectives on every device; "
                           "use backend='auto' or 'torch'")
    if isinstance(chunk_bytes, bool) or not isinstance(chunk_bytes, int) or chunk_bytes <= 0:
        raise ValueError(f"chunk_bytes must be a positive int, got {chunk_bytes!r}")
    rank, world = _check_group(group)
    lead = hidden.shape[:-1]
    h2 = hidden.reshape(-1, hidden.shape[-1])
    grad_needed = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (hidden, weight, bias))
    sizes, need_h_any, chunk_bytes, v_max = _gather_meta(
        group, world, hidden.device, v_local=weight.shape[0], n=h2.shape[0], h=h2.shape[1], dtype=hidden.dtype,
        grad_needed=grad_needed, need_h=torch.is_grad_enabled() and hidden.requires_grad, chunk_bytes=chunk_bytes)
    vocab_start, vocab_total = sum(sizes[:rank]), sum(sizes)
    targets = check_targets("targets", targets, lead, weight.shape[0], ignore_index,
                            vocab_start=vocab_start, vocab_total=vocab_total)
    chunk = _chunk_rows(h2.shape[0], v_max, chunk_bytes)
    logp, ent = _VocabParallelLinearLogprobs.apply(h2, weight, bias, targets.reshape(-1), group, vocab_start,
                                                   temperature, ignore_index, bool(return_entropy), need_h_any,
                                                   chunk)
    logp = logp.reshape(lead)
    return (logp, ent.reshape(lead)) if return_entropy else logp
