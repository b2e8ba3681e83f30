"""Per-token log-probabilities and entropy, from logits or straight from hidden states
(docs/formulas.md §1):

    z = (h @ W.T + bias) / temperature
    logp[n]    = z[n, y[n]] - logsumexp(z[n])
    entropy[n] = logsumexp(z[n]) - sum_v softmax(z[n])_v * z[n, v]

With ``top_k`` / ``top_p`` / ``min_p`` (docs/formulas.md §1.1) the sums run over each row's kept
set only, the distribution the sampler drew from; each body finds the row's threshold ``tau``
(``rows.cutoff``) on the full row of logits it already holds, and backward reuses the saved ``tau``.

Each public function validates its arguments once, takes its plan from ``pyrl.ops.plan``, and
runs the one autograd Function of that plan:

* ``_LogprobsFromLogits`` (plan ``linear="given"``): saves the logits and the per-row
  ``lse``/``entropy`` and recomputes the softmax in backward (optionally writing the logits
  gradient over the logits buffer).
* ``_ChunkedLinearLogprobs`` (``linear="chunked"``, also the vocabulary-parallel plan): the chunk
  walk of ``pyrl.ops.walk``; each chunk's logits ``[chunk, V]`` exist only while that chunk is
  processed, in forward and again (recomputed) in backward, so peak extra memory is one chunk of
  logits, never ``[N, V]``.
* ``_BlockedLinearLogprobs`` (``linear="blocked"``): the vocabulary-blocked walk of
  ``pyrl.ops.walk.Blocks``: forward streams the head once in vocabulary blocks against large token
  tiles and merges each block's row stats (online log-sum-exp, docs/formulas.md §10.1); backward
  recomputes each tile's logits and runs both gradient GEMMs on it. Peak extra memory is one tile.
* ``_KernelLinearLogprobs`` (``linear="kernel"``): Triton's single fused kernel.

Every body computes in fp32 (fp64 for fp64 inputs) whatever the input dtype. A row's result never
depends on the other rows, so log-probs and entropy are batch-invariant bit for bit
(docs/reliability.md).
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from pyrl._validate import (check_bool, check_chunk_bytes, check_float, check_linear_args, check_positive,
                            check_same_device, check_sampler, check_targets, shape_str)
from pyrl.kernels.reference import RowParams, RowStats, TorchRows, acc_dtype
from pyrl.ops.plan import Plan, chunk_bytes_default, make_plan
from pyrl.ops.walk import Blocks, Head, block_targets, fused_kernel, merge_block_, rows_body, walk

__all__ = ["fused_linear_logprobs", "logprobs_from_logits", "LinearCall", "plan_fused_linear_logprobs",
           "plan_logprobs_from_logits", "run_linear_logprobs", "row_params"]


def row_params(temperature: float, ignore_index: int, need_entropy: bool, top_k=None, top_p=None, min_p=None,
               sampler_order="hf", prefix: str = "") -> RowParams:
    """The ``RowParams`` of a call, its sampler settings validated (``prefix`` names their owner in errors)."""
    top_k, top_p, min_p, sampler_order = check_sampler(top_k, top_p, min_p, sampler_order, prefix)
    return RowParams(float(temperature), ignore_index, bool(need_entropy), top_k, top_p, min_p, sampler_order)


def _saved(ctx, params: RowParams, tensors, logp, ent):
    """What every log-prob Function keeps: its inputs and the per-row lse/entropy (O(N)), and the
    kept-set thresholds (O(N)) when the rows are truncated."""
    ctx.save_for_backward(*tensors)
    ctx.params = params
    if not params.need_entropy:
        ctx.mark_non_differentiable(ent)
    return logp, ent


def _upstream(params: RowParams, lse, g_logp, g_ent):
    """The upstream gradients as the row bodies take them (g_logp never None, g_ent None when unused)."""
    return (torch.zeros_like(lse) if g_logp is None else g_logp), (g_ent if params.need_entropy else None)


# --------------------------------------------------------------------------------------------
# logprobs_from_logits
# --------------------------------------------------------------------------------------------
class _LogprobsFromLogits(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, rows, params: RowParams, inplace_backward: bool):
        tau = rows.cutoff(logits, params)
        logp, ent, lse = rows.fwd(logits, targets, params, tau=tau)
        ctx.rows, ctx.inplace = rows, inplace_backward
        return _saved(ctx, params, (logits, targets, lse, ent, tau), logp, ent)

    @staticmethod
    def backward(ctx, g_logp, g_ent):
        logits, targets, lse, ent, tau = ctx.saved_tensors
        p = ctx.params
        g_logp, g_ent = _upstream(p, lse, g_logp, g_ent)
        d_logits = ctx.rows.bwd(logits, targets, lse, ent, g_logp, g_ent, p, out=logits if ctx.inplace else None,
                                tau=tau)
        return d_logits, None, None, None, None


def plan_logprobs_from_logits(logits, targets, *, temperature=1.0, top_k=None, top_p=None, min_p=None,
                              sampler_order="hf", ignore_index=-100, return_entropy=False, inplace_backward=False,
                              backend="auto"):
    """Validate a ``logprobs_from_logits`` call; returns ``(plan, targets, params)``."""
    check_float("logits", logits, min_dim=1)
    vocab = logits.shape[-1]
    if vocab < 1:
        raise ValueError(f"logits must have a vocabulary dimension >= 1, got shape {shape_str(logits)}")
    check_positive("temperature", temperature)
    if not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    check_bool("return_entropy", return_entropy)
    check_bool("inplace_backward", inplace_backward)
    params = row_params(temperature, ignore_index, return_entropy, top_k, top_p, min_p, sampler_order)
    check_same_device(logits=logits, targets=targets)
    targets = check_targets("targets", targets, logits.shape[:-1], vocab, ignore_index)
    plan = make_plan("logprobs_from_logits", device=logits.device, dtype=logits.dtype, backend=backend,
                     sampler=params.sampler_text)
    return plan, targets, params


_SAMPLER_ARGS = """top_k, top_p, min_p: the sampler's truncation after the temperature (docs/formulas.md
            §1.1): keep the ``top_k`` largest logits (ties kept), the smallest top set whose
            probability reaches ``top_p``, the tokens with ``p >= min_p * p_max``; the log-prob and
            entropy are those of the distribution renormalised over the kept tokens. A target
            outside the kept set gets ``logp = -inf`` (and no gradient). ``top_k`` an int >= 1,
            ``top_p`` in (0, 1], ``min_p`` in [0, 1], or None (off).
        sampler_order: ``"hf"`` (HF ``generate``: top-k, top-p, min-p) or ``"vllm"`` (vLLM v1:
            min-p before top-k/top-p); they differ only when both ``top_p`` and ``min_p`` are set."""


def logprobs_from_logits(logits, targets, *, temperature=1.0, top_k=None, top_p=None, min_p=None, sampler_order="hf",
                         ignore_index=-100, return_entropy=False, inplace_backward=False, backend="auto"):
    """Log-probability of ``targets`` under ``softmax(logits / temperature)`` (and its entropy).

    Args:
        logits: ``[..., V]`` fp32/bf16/fp16/fp64.
        targets: ``[...]`` int64 token ids in ``[0, V)`` or ``ignore_index`` (gives 0 and no gradient).
        temperature: > 0; the logits are divided by it.
        {sampler}
        return_entropy: also return the entropy of each row's distribution.
        inplace_backward: let backward overwrite ``logits`` with its gradient (saves an ``[N, V]``
            buffer; only when nothing else needs ``logits`` afterwards).
        backend: ``"auto" | "triton" | "cpp" | "torch"``.

    Returns:
        ``logp`` ``[...]`` fp32 (fp64 for fp64 input), or ``(logp, entropy)``. Formulas and
        gradients: docs/formulas.md §1.
    """
    plan, targets, params = plan_logprobs_from_logits(
        logits, targets, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, sampler_order=sampler_order,
        ignore_index=ignore_index, return_entropy=return_entropy, inplace_backward=inplace_backward, backend=backend)
    lead = logits.shape[:-1]
    flat = logits.reshape(-1, logits.shape[-1])
    if flat.stride(-1) != 1:
        # not .contiguous(): it keeps any stride of a size-1 (V == 1) or empty dimension, and the
        # row bodies need unit stride along the vocabulary
        flat = flat.clone(memory_format=torch.contiguous_format)
    logp, ent = _LogprobsFromLogits.apply(flat, targets.reshape(-1), rows_body(plan.backend), params,
                                          bool(inplace_backward))
    logp = logp.reshape(lead)
    return (logp, ent.reshape(lead)) if return_entropy else logp


logprobs_from_logits.__doc__ = logprobs_from_logits.__doc__.replace("{sampler}", _SAMPLER_ARGS)


# --------------------------------------------------------------------------------------------
# fused_linear_logprobs
# --------------------------------------------------------------------------------------------
class _ChunkedLinearLogprobs(torch.autograd.Function):
    """The chunk walk: saves hidden, weight, bias and the per-row lse/entropy; backward recomputes
    each chunk's logits. ``collective`` (vocabulary-parallel, ``pyrl.ops.vocab_parallel``) merges
    the row stats of the vocabulary shards in forward and sums d_hidden in backward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, plan: Plan, params: RowParams, collective):
        rows = rows_body(plan.backend)
        n = hidden.shape[0]
        out = hidden.new_empty(3, n, dtype=acc_dtype(hidden.dtype))
        tau = out.new_empty(n) if params.truncates else None

        def step(s, e, z, _):
            t = targets[s:e]
            if collective is None:
                cut = None
                if tau is not None:  # the chunk holds whole rows: the kept sets are found here
                    cut = tau[s:e] = rows.cutoff(z, params)
                res = rows.fwd(z, t, params, tau=cut)
            else:
                res = rows.finish(collective.merge(rows.stats(z, t, params)), t, params)
            for i in range(3):
                out[i, s:e] = res[i]
            return False

        walk(Head.of(plan, hidden, weight, bias), plan.chunk_rows, step)
        logp, ent, lse = out
        ctx.plan, ctx.collective = plan, collective
        return _saved(ctx, params, (hidden, weight, bias, targets, lse, ent, tau), logp, ent)

    @staticmethod
    def backward(ctx, g_logp, g_ent):
        hidden, weight, bias, targets, lse, ent, tau = ctx.saved_tensors
        plan, p, collective = ctx.plan, ctx.params, ctx.collective
        rows = rows_body(plan.backend)
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        g_logp, g_ent = _upstream(p, lse, g_logp, g_ent)
        reduce = None
        if collective is not None and collective.need_d_hidden:
            reduce = collective.reduce_d_hidden
        head = Head.of(plan, hidden, weight, bias, need=(need_h, need_w, need_b), reduce_d_hidden=reduce)

        def step(s, e, z, _):
            rows.bwd(z, targets[s:e], lse[s:e], ent[s:e], g_logp[s:e], None if g_ent is None else g_ent[s:e], p,
                     out=head.d_out(z), tau=None if tau is None else tau[s:e])
            return True

        active = (targets != p.ignore_index) & torch.isfinite(lse)
        d_hidden, d_weight, d_bias = walk(head, plan.chunk_rows, step, active=active)
        return d_hidden, d_weight, d_bias, None, None, None, None


class _BlockedLinearLogprobs(torch.autograd.Function):
    """The vocabulary-blocked walk (``Blocks``): saves hidden, weight, bias and the per-row
    lse/entropy, as ``_ChunkedLinearLogprobs``; the row bodies see one block of each row at a time,
    with block-local target ids (``block_targets``)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, plan: Plan, params: RowParams):
        rows = rows_body(plan.backend)
        n = hidden.shape[0]
        acc = acc_dtype(hidden.dtype)
        st = RowStats(hidden.new_full((n,), float("-inf"), dtype=acc), *hidden.new_zeros(3, n, dtype=acc))

        def step(s, e, c0, c1, z):
            merge_block_(rows, RowStats(*(x[s:e] for x in st)), z, targets[s:e], c0, c1, params)
            return False

        Blocks.of(plan, hidden, weight, bias).walk(step)
        logp, ent, lse = TorchRows.finish(st, targets, params)
        ctx.plan = plan
        return _saved(ctx, params, (hidden, weight, bias, targets, lse, ent), logp, ent)

    @staticmethod
    def backward(ctx, g_logp, g_ent):
        hidden, weight, bias, targets, lse, ent = ctx.saved_tensors
        plan, p = ctx.plan, ctx.params
        rows = rows_body(plan.backend)
        g_logp, g_ent = _upstream(p, lse, g_logp, g_ent)

        def step(s, e, c0, c1, z):
            rows.bwd(z, block_targets(targets[s:e], c0, c1, p.ignore_index), lse[s:e], ent[s:e], g_logp[s:e],
                     None if g_ent is None else g_ent[s:e], p, out=blocks.d_out(z))
            return True

        active = (targets != p.ignore_index) & torch.isfinite(lse)
        blocks = Blocks.of(plan, hidden, weight, bias, need=tuple(ctx.needs_input_grad[:3]))
        d_hidden, d_weight, d_bias = blocks.walk(step, active=active)
        return d_hidden, d_weight, d_bias, None, None, None


class _KernelLinearLogprobs(torch.autograd.Function):
    """Triton's single fused kernel: forward and backward each one set of launches over the
    whole batch, the logits tiles recomputed in backward, never stored."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, params: RowParams):
        logp, ent, lse = fused_kernel().fwd(hidden, weight, bias, targets, params)
        return _saved(ctx, params, (hidden, weight, bias, targets, lse, ent), logp, ent)

    @staticmethod
    def backward(ctx, g_logp, g_ent):
        hidden, weight, bias, targets, lse, ent = ctx.saved_tensors
        p = ctx.params
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        g_logp, g_ent = _upstream(p, lse, g_logp, g_ent)
        grads = fused_kernel().bwd(hidden, weight, bias, targets, lse, ent, g_logp, g_ent, p,
                                   (need_h, need_w, need_b and bias is not None))
        return (*grads, None, None)


class LinearCall(NamedTuple):
    """A validated ``fused_linear_logprobs`` call over flattened tokens, with its plan."""

    plan: Plan
    hidden: torch.Tensor       # [N, H]
    weight: torch.Tensor
    bias: Optional[torch.Tensor]
    targets: torch.Tensor      # [N] int64
    params: RowParams
    lead: tuple


def plan_fused_linear_logprobs(hidden, weight, targets, *, bias=None, temperature=1.0, top_k=None, top_p=None,
                               min_p=None, sampler_order="hf", ignore_index=-100, return_entropy=False, backend="auto",
                               chunk_bytes=None) -> LinearCall:
    """Validate a single-process ``fused_linear_logprobs`` call and plan it."""
    temperature = check_linear_args(hidden, weight, bias, temperature, ignore_index)
    check_bool("return_entropy", return_entropy)
    params = row_params(temperature, ignore_index, return_entropy, top_k, top_p, min_p, sampler_order)
    check_same_device(hidden=hidden, weight=weight, bias=bias, targets=targets)
    if chunk_bytes is not None:
        check_chunk_bytes(chunk_bytes)
    targets = check_targets("targets", targets, hidden.shape[:-1], weight.shape[0], ignore_index)
    h2 = hidden.reshape(-1, hidden.shape[-1])
    plan = make_plan("fused_linear_logprobs", device=hidden.device, dtype=hidden.dtype, n_rows=h2.shape[0],
                     vocab=weight.shape[0], hidden_size=weight.shape[1], backend=backend, chunk_bytes=chunk_bytes,
                     sampler=params.sampler_text)
    return LinearCall(plan, h2, weight, bias, targets.reshape(-1), params, hidden.shape[:-1])


def run_linear_logprobs(call: LinearCall, collective=None):
    """(logp, entropy) ``[N]`` of a planned call (entropy 0 unless asked for)."""
    if call.plan.linear == "kernel":
        return _KernelLinearLogprobs.apply(call.hidden, call.weight, call.bias, call.targets, call.params)
    if call.plan.linear == "blocked":
        if collective is not None:
            raise ValueError("the vocabulary-blocked plan has no vocabulary-parallel form (make_plan never pairs them)")
        return _BlockedLinearLogprobs.apply(call.hidden, call.weight, call.bias, call.targets, call.plan, call.params)
    return _ChunkedLinearLogprobs.apply(call.hidden, call.weight, call.bias, call.targets, call.plan, call.params,
                                        collective)


def fused_linear_logprobs(hidden, weight, targets, *, bias=None, temperature=1.0, top_k=None, top_p=None, min_p=None,
                          sampler_order="hf", ignore_index=-100, return_entropy=False, vocab_parallel_group=None,
                          backend="auto", chunk_bytes=None):
    """Per-token log-prob (and entropy) of ``targets`` from hidden states and the LM-head weight.

    Never holds ``[N, V]`` logits: tokens are processed in chunks of at most ``chunk_bytes`` of fp32
    logits, recomputed in backward. Differentiable in ``hidden``, ``weight`` and ``bias``.
    ``pyrl.explain("fused_linear_logprobs", ...)`` shows which plan a call takes.

    Args:
        hidden: ``[..., H]`` fp32/bf16/fp16/fp64.
        weight: ``[V, H]``, the LM head (same dtype as ``hidden``).
        targets: ``[...]`` int64 ids in ``[0, V)`` or ``ignore_index``.
        bias: optional ``[V]``.
        temperature: > 0, divides the logits.
        {sampler}
        return_entropy: also return each token's entropy.
        vocab_parallel_group: a ``torch.distributed`` group across which ``weight`` is split by
            vocabulary (see ``pyrl.ops.vocab_parallel``, docs/formulas.md §11).
        backend: ``"auto" | "triton" | "cpp" | "torch"``.
        chunk_bytes: the fp32 logits of one token chunk (or one tile of the vocabulary-blocked walk,
            docs/formulas.md §10.1), in bytes (default: 64 MiB on CPU, 160 MiB on CUDA, where the
            chunk GEMMs need more rows to fill the GPU), or ``"auto"``: sized from the device's free
            memory, up to 256 MiB on CPU and 4 GiB on CUDA (docs/scaling.md section 8).

    Returns:
        ``logp [...]`` fp32 (fp64 for fp64 input), or ``(logp, entropy)``. Formulas and gradients:
        docs/formulas.md §1.
    """
    if vocab_parallel_group is not None:
        from pyrl.ops.vocab_parallel import vocab_parallel_linear_logprobs

        sampler = row_params(1.0, ignore_index, False, top_k, top_p, min_p, sampler_order).sampler_text

        if chunk_bytes is None:  # a bad `hidden` is reported by the vocab-parallel op's own checks
            chunk_bytes = chunk_bytes_default(getattr(hidden, "device", torch.device("cpu")))
        return vocab_parallel_linear_logprobs(hidden, weight, targets, group=vocab_parallel_group, bias=bias,
                                              temperature=temperature, ignore_index=ignore_index,
                                              return_entropy=return_entropy, backend=backend,
                                              chunk_bytes=chunk_bytes, sampler=sampler)
    call = plan_fused_linear_logprobs(hidden, weight, targets, bias=bias, temperature=temperature, top_k=top_k,
                                      top_p=top_p, min_p=min_p, sampler_order=sampler_order, ignore_index=ignore_index,
                                      return_entropy=return_entropy, backend=backend, chunk_bytes=chunk_bytes)
    logp, ent = run_linear_logprobs(call)
    logp = logp.reshape(call.lead)
    return (logp, ent.reshape(call.lead)) if return_entropy else logp


fused_linear_logprobs.__doc__ = fused_linear_logprobs.__doc__.replace("{sampler}", _SAMPLER_ARGS)
