"""Distillation from a teacher straight from hidden states: a full-vocabulary divergence between
two LM heads, chunked so that neither model's logits ever exist whole (docs/formulas.md §14).

    for each token chunk (pyrl.ops.walk, the two heads in lockstep):
        z_s = h_s W_s^T (+ b_s),  z_t = h_t W_t^T (+ b_t)            [c, V] fp32 scratch each
        soft  += D(p_s, p_t) per valid token        forward_kl | reverse_kl | jsd (divergence_rows)
        hard  += -log softmax(z_s)[y] per valid token   (the plan's row body: torch | cpp | triton)
                 (backend cpp: the divergence too, one row at a time in C++, torch.ops.pyrl.divergence_rows_)
        d z_s  = soft_weight d soft + hard_weight d hard, consumed by the d_hidden/d_weight GEMMs now

The loss is ``soft_weight * soft / n + hard_weight * hard / n`` over the ``n`` valid tokens (those
whose target is not ``ignore_index``), so every token's gradient is known as soon as its chunk's
logits are: one pass, three student GEMMs and one teacher GEMM per chunk, backward only scales the
gradients kept from forward (as the one-pass policy loss, docs/formulas.md §10). The teacher gets
no gradient. The sparse-teacher form replaces the teacher head by its top-k ids and log-probs per
token (what an inference server returns) and the divergence by ``sparse_forward_kl_rows``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch

from pyrl._validate import (check_chunk_bytes, check_float, check_linear_args, check_number, check_ref_model,
                            check_same_device, check_shape, check_targets, check_tensor, shape_str)
from pyrl.kernels.reference import DIVERGENCES, RowParams, acc_dtype, divergence_rows, sparse_forward_kl_rows
from pyrl.ops.plan import Plan, make_plan
from pyrl.ops.walk import Head, rows_body, scale_forward_grads, walk

__all__ = ["fused_linear_distillation_loss", "plan_fused_linear_distillation_loss", "DistillParams"]

# the ``kind`` of torch.ops.pyrl.divergence_rows_ (csrc/ops.cpp)
_KIND = {"forward_kl": 0, "reverse_kl": 1, "jsd": 2}


@dataclass(frozen=True)
class DistillParams:
    """Everything the distillation walk needs besides the tensors."""

    divergence: str = "forward_kl"
    beta: float = 0.5              # jsd: the teacher's weight in the mixture m = beta q + (1 - beta) p
    temperature: float = 1.0       # divides both heads' logits in the divergence (not in the hard term)
    ignore_index: int = -100
    soft_weight: float = 1.0
    hard_weight: float = 0.0
    sparse: bool = False


class _Distill(torch.autograd.Function):
    """Forward computes the loss and the student's gradients chunk by chunk; backward scales them."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, t_hidden, t_weight, t_bias, targets, topk_ids, topk_logprobs,
                plan: Plan, p: DistillParams):
        need = ctx.needs_input_grad[:3]
        acc = acc_dtype(hidden.dtype)
        rows = rows_body(plan.backend)
        hard_params = RowParams(1.0, p.ignore_index, False)
        valid = targets != p.ignore_index
        count = valid.sum().clamp(min=1).to(acc)
        g_soft = torch.where(valid, p.soft_weight / count, 0.0)
        g_hard = torch.where(valid, -p.hard_weight / count, 0.0)
        sums = hidden.new_zeros(2, dtype=acc)  # soft, hard
        cpp_rows = plan.backend == "cpp" and not p.sparse and plan.gemm == "acc"

        def step(s, e, z, z_t):
            v, t = valid[s:e], targets[s:e]
            logp, _, lse = rows.fwd(z, t, hard_params)
            sums[1] -= logp.sum()
            d_hard = None
            if any(need) and p.hard_weight != 0:
                d_hard = rows.bwd(z, t, lse, torch.zeros_like(lse), g_hard[s:e], None, hard_params)
            g = g_soft[s:e] if any(need) else None
            if cpp_rows:
                # one row at a time in C++: the value, and g * d value / d z written over z (z_t is scratch);
                # rows without a valid target have g = 0 and get exactly zero
                value = torch.ops.pyrl.divergence_rows_(z, z_t, g, p.temperature, _KIND[p.divergence], p.beta)
                sums[0] += torch.where(v, value, 0.0).sum()
                if g is None:
                    return False
                if d_hard is not None:
                    z.add_(d_hard)  # zero on rows without a valid target
                return True
            if p.sparse:
                value, dz = sparse_forward_kl_rows(z, topk_ids[s:e], topk_logprobs[s:e], p.temperature, g=g, out=z)
            else:
                value, dz = divergence_rows(z, z_t, p.temperature, p.divergence, p.beta, g=g, out=z)
            sums[0] += torch.where(v, value, 0.0).sum()
            if dz is None:
                return False
            # rows without a valid target get exactly zero (never 0 * inf from a degenerate row)
            z.copy_(torch.where(v.unsqueeze(1), z if d_hard is None else z + d_hard, 0.0))
            return True

        teacher = None if p.sparse else Head.of(plan, t_hidden, t_weight, t_bias)
        ctx.grads = walk(Head.of(plan, hidden, weight, bias, need=need), plan.chunk_rows, step, ref=teacher,
                         active=valid)
        soft, hard = sums[0] / count, sums[1] / count
        loss = p.soft_weight * soft + p.hard_weight * hard
        ctx.mark_non_differentiable(soft, hard)
        return loss, soft, hard

    @staticmethod
    def backward(ctx, g_loss, *_):
        grads = scale_forward_grads(ctx.grads, g_loss)
        ctx.grads = None
        return (*grads, None, None, None, None, None, None, None, None)


class _DistillCall(NamedTuple):
    """A validated ``fused_linear_distillation_loss`` call over flattened tokens, with its plan."""

    plan: Plan
    params: DistillParams
    targets: torch.Tensor                 # [N] int64
    topk_ids: Optional[torch.Tensor]      # [N, k] int64 (sparse teacher)
    topk_logprobs: Optional[torch.Tensor]


def plan_fused_linear_distillation_loss(student_hidden, student_weight, teacher_hidden=None, teacher_weight=None,
                                        targets=None, *, student_bias=None, teacher_bias=None, teacher_topk_ids=None,
                                        teacher_topk_logprobs=None, divergence="forward_kl", beta=0.5,
                                        temperature=1.0, ignore_index=-100, soft_weight=1.0, hard_weight=0.0,
                                        backend="auto", chunk_bytes=None) -> _DistillCall:
    """Validate a ``fused_linear_distillation_loss`` call and plan it."""
    names = ("student_hidden", "student_weight", "student_bias")
    temperature = check_linear_args(student_hidden, student_weight, student_bias, temperature, ignore_index,
                                    names=names)
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {DIVERGENCES}, got {divergence!r}")
    if divergence == "jsd":
        beta = check_number("beta", beta, low=0.0, high=1.0, low_open=True, high_open=True,
                            expect="in (0, 1) for divergence='jsd' (0 and 1 are the forward and reverse KL)")
    soft_weight = check_number("soft_weight", soft_weight)
    hard_weight = check_number("hard_weight", hard_weight)
    if chunk_bytes is not None:
        check_chunk_bytes(chunk_bytes)
    lead, V = tuple(student_hidden.shape[:-1]), student_weight.shape[0]
    if targets is None:
        raise ValueError("targets is required: the token ids (ignore_index marks tokens outside the loss)")
    targets = check_targets("targets", targets, lead, V, ignore_index)
    sparse = teacher_topk_ids is not None or teacher_topk_logprobs is not None
    if sparse:
        if teacher_hidden is not None or teacher_weight is not None:
            raise ValueError("pass the teacher as teacher_hidden/teacher_weight or as teacher_topk_ids/"
                             "teacher_topk_logprobs, not both")
        if teacher_topk_ids is None or teacher_topk_logprobs is None:
            raise ValueError("the sparse teacher needs both teacher_topk_ids and teacher_topk_logprobs [..., k]")
        if divergence != "forward_kl":
            raise ValueError(f"a sparse (top-k) teacher supports divergence='forward_kl' only (the student's mass "
                             f"outside the teacher's support has no teacher probability), got {divergence!r}")
        check_tensor("teacher_topk_ids", teacher_topk_ids, dtypes=(torch.int64, torch.int32), min_dim=1)
        if tuple(teacher_topk_ids.shape[:-1]) != lead or teacher_topk_ids.shape[-1] < 1:
            raise ValueError(f"teacher_topk_ids must have shape [{', '.join(map(str, lead))}, k] with k >= 1, "
                             f"got {shape_str(teacher_topk_ids)}")
        check_float("teacher_topk_logprobs", teacher_topk_logprobs)
        check_shape("teacher_topk_logprobs", teacher_topk_logprobs, tuple(teacher_topk_ids.shape),
                    "(the shape of teacher_topk_ids)")
        if teacher_topk_ids.numel() and bool(((teacher_topk_ids < 0) | (teacher_topk_ids >= V)).any()):
            raise ValueError(f"teacher_topk_ids must hold ids in [0, {V})")
    else:
        if teacher_hidden is None:
            raise ValueError("the teacher is missing: pass teacher_hidden and teacher_weight (or the sparse "
                             "teacher_topk_ids/teacher_topk_logprobs)")
        check_ref_model(teacher_hidden, teacher_weight, teacher_bias, lead, V, ignore_index,
                        names=("teacher_hidden", "teacher_weight", "teacher_bias"))
    check_same_device(student_hidden=student_hidden, student_weight=student_weight, student_bias=student_bias,
                      teacher_hidden=teacher_hidden, teacher_weight=teacher_weight, teacher_bias=teacher_bias,
                      targets=targets, teacher_topk_ids=teacher_topk_ids, teacher_topk_logprobs=teacher_topk_logprobs)
    n = targets.numel()
    plan = make_plan("fused_linear_distillation_loss", device=student_hidden.device, dtype=student_hidden.dtype,
                     n_rows=n, vocab=V, backend=backend, chunk_bytes=chunk_bytes, sparse_teacher=sparse)
    params = DistillParams(divergence, float(beta), temperature, ignore_index, soft_weight, hard_weight, sparse)
    k = None if not sparse else teacher_topk_ids.shape[-1]
    return _DistillCall(plan, params, targets.reshape(-1), None if not sparse else teacher_topk_ids.reshape(n, k).long(),
                        None if not sparse else teacher_topk_logprobs.reshape(n, k))


def fused_linear_distillation_loss(student_hidden, student_weight, teacher_hidden=None, teacher_weight=None,
                                   targets=None, *, student_bias=None, teacher_bias=None, teacher_topk_ids=None,
                                   teacher_topk_logprobs=None, divergence="forward_kl", beta=0.5, temperature=1.0,
                                   ignore_index=-100, soft_weight=1.0, hard_weight=0.0, backend="auto",
                                   chunk_bytes=None):
    """Distil a teacher's token distributions into a student, from both models' hidden states.
    Returns ``(loss, outputs)``.

    Args:
        student_hidden: ``[..., H_s]``; student_weight ``[V, H_s]``; student_bias optional ``[V]``.
        teacher_hidden: ``[..., H_t]`` (the same tokens); teacher_weight ``[V, H_t]`` (the
            student's vocabulary); teacher_bias optional. No gradient flows to the teacher.
        targets: ``[...]`` int64 ids: the hard labels; ``ignore_index`` marks tokens outside the loss.
        teacher_topk_ids, teacher_topk_logprobs: ``[..., k]``: the sparse-teacher form, instead of
            ``teacher_hidden``/``teacher_weight``; the log-probs are renormalised over the ``k`` ids
            (``-inf`` marks an unused slot) and taken as given (``temperature`` scales only the
            student). Only with ``divergence="forward_kl"``.
        divergence: ``"forward_kl"`` ``KL(teacher || student)`` (Hinton distillation, GKD's
            ``beta=0``), ``"reverse_kl"`` ``KL(student || teacher)`` (on-policy distillation, GKD's
            ``beta=1``) or ``"jsd"`` (generalised Jensen-Shannon with mixing weight ``beta``).
        beta: the jsd's teacher weight, in (0, 1).
        temperature: > 0, divides both heads' logits in the divergence.
        soft_weight, hard_weight: ``loss = soft_weight * divergence + hard_weight * cross-entropy``,
            each a mean over the valid tokens; the cross-entropy of the targets uses the student's
            untempered logits (Liger and TRL's GKD do the same).
        backend: ``"auto" | "triton" | "cpp" | "torch"`` (the hard term's row body; the divergence
            maths is the fp32 reference on every backend). chunk_bytes: the logits budget per chunk
            (an int, or ``"auto"`` from free memory, docs/scaling.md section 8).

    Returns:
        ``loss`` (a scalar, differentiable in the student's hidden, weight and bias) and
        ``outputs``: ``{"soft_loss", "hard_loss"}``, detached means over the valid tokens.
        Formulas and gradients: docs/formulas.md §14.
    """
    call = plan_fused_linear_distillation_loss(
        student_hidden, student_weight, teacher_hidden, teacher_weight, targets, student_bias=student_bias,
        teacher_bias=teacher_bias, teacher_topk_ids=teacher_topk_ids, teacher_topk_logprobs=teacher_topk_logprobs,
        divergence=divergence, beta=beta, temperature=temperature, ignore_index=ignore_index,
        soft_weight=soft_weight, hard_weight=hard_weight, backend=backend, chunk_bytes=chunk_bytes)
    n = call.targets.shape[0]
    flat = lambda x: None if x is None else x.reshape(n, x.shape[-1]).detach()  # noqa: E731
    loss, soft, hard = _Distill.apply(
        student_hidden.reshape(n, student_hidden.shape[-1]), student_weight, student_bias, flat(teacher_hidden),
        None if teacher_weight is None else teacher_weight.detach(),
        None if teacher_bias is None else teacher_bias.detach(), call.targets, call.topk_ids,
        None if call.topk_logprobs is None else call.topk_logprobs.detach(), call.plan, call.params)
    return loss, {"soft_loss": soft, "hard_loss": hard}
