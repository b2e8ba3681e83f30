"""The RL policy loss straight from hidden states and the LM head (SPEC §1-6, §9).

    hidden [B, T, H] --(chunked fused log-prob + entropy)--> logp, entropy [B, T]
                     --(per-token policy loss, KL, entropy bonus/mask, aggregation)--> loss

The log-prob pass never holds ``[B*T, V]`` logits (see ``pyrl.ops.logprobs``). ``kl_type="full"``
(exact KL over the vocabulary to a reference head) runs one more chunked pass over both heads.

Two plans, one result:

* **two passes** (any config; the reference): the log-prob op computes logp/entropy for every token
  (GEMM 1), the per-token loss is formed on the whole batch, and backward recomputes each chunk's
  logits (GEMM 2) for d_hidden and d_weight (GEMMs 3, 4).
* **one pass** (``backend="cpp"``, or ``"triton"`` with its chunked body, bf16/fp16 on CUDA; a
  token-separable config, no ``vocab_parallel_group``: token-level ratio, no top-entropy
  mask, no sequence-level mismatch weight, no full KL): every aggregation mode is a fixed per-token
  weighting of the per-token loss (``_agg_weights``), so a chunk's share of the loss and its
  gradient w.r.t. logp/entropy are known as soon as the chunk's logits are. The chunk's logits are
  turned into d logits in place and consumed by the two gradient GEMMs right away: three GEMMs in
  all, no recomputation. The gradients are kept for backward, which only scales them.
"""
from __future__ import annotations

import torch

from pyrl._validate import check_same_device, check_targets, check_shape, shape_str
from pyrl.config import PolicyLossConfig
from pyrl._backend import resolve_backend
from pyrl.ops.logprobs import (_ROWS, _AccMath, _ChunkedLinear, _acc_dtype, _check_linear_args, _chunk_logits,
                               _chunk_rows, _resolve_chunk_bytes, _triton_linear, fused_linear_logprobs)
from pyrl.ops.policy_loss import _agg_weights, _check_policy_args, _is_token_separable, _policy_loss_core

__all__ = ["fused_linear_policy_loss"]


class _FullKL(torch.autograd.Function):
    """Per-token KL(p || p_ref) = sum_v p_v (log p_v - log p_ref_v), chunked over tokens.

    Gradient w.r.t. the policy logits: p * (log p - log p_ref - KL) / temperature; the reference
    side gets none (it is a fixed target).
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, ref_hidden, ref_weight, ref_bias, valid, temperature, chunk):
        acc = _acc_dtype(hidden.dtype)
        w, rw = weight.to(acc), ref_weight.to(acc)
        b = bias.to(acc) if bias is not None else None
        rb = ref_bias.to(acc) if ref_bias is not None else None
        n = hidden.shape[0]
        kl = hidden.new_zeros(n, dtype=acc)
        for s in range(0, n, chunk):
            e = min(n, s + chunk)
            lp = lq = None  # the last chunk's buffers go before the next ones are allocated
            lp = torch.log_softmax(_chunk_logits(hidden[s:e].to(acc), w, b) / temperature, -1)
            lq = torch.log_softmax(_chunk_logits(ref_hidden[s:e].to(acc), rw, rb) / temperature, -1)
            kl[s:e] = (lp.exp() * (lp - lq)).sum(-1).clamp(min=0.0)
        kl = torch.where(valid, kl, 0.0)
        ctx.save_for_backward(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, valid, kl)
        ctx.cfg = (temperature, chunk)
        return kl

    @staticmethod
    def backward(ctx, g):
        hidden, weight, bias, ref_hidden, ref_weight, ref_bias, valid, kl = ctx.saved_tensors
        temperature, chunk = ctx.cfg
        acc = _acc_dtype(hidden.dtype)
        w, rw = weight.to(acc), ref_weight.to(acc)
        b = bias.to(acc) if bias is not None else None
        rb = ref_bias.to(acc) if ref_bias is not None else None
        n = hidden.shape[0]
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        d_hidden = torch.zeros_like(hidden) if need_h else None
        d_weight = torch.zeros_like(weight, dtype=acc) if need_w else None
        d_bias = torch.zeros(weight.shape[0], dtype=acc, device=weight.device) if need_b and bias is not None else None
        g = torch.where(valid, g.to(acc), 0.0)
        for s in range(0, n, chunk):
            e = min(n, s + chunk)
            h = hidden[s:e].to(acc)
            lp = lq = dz = None  # the last chunk's buffers go before the next ones are allocated
            lp = torch.log_softmax(_chunk_logits(h, w, b) / temperature, -1)
            lq = torch.log_softmax(_chunk_logits(ref_hidden[s:e].to(acc), rw, rb) / temperature, -1)
            dz = lp.exp() * (lp - lq - kl[s:e, None]) * (g[s:e, None] / temperature)
            if need_h:
                d_hidden[s:e] = (dz @ w).to(hidden.dtype)
            if need_w:
                d_weight.addmm_(dz.t(), h)
            if d_bias is not None:
                d_bias += dz.sum(0)
        return (d_hidden, None if d_weight is None else d_weight.to(weight.dtype),
                None if d_bias is None else d_bias.to(bias.dtype), None, None, None, None, None, None)


class _OnePassPolicyLoss(torch.autograd.Function):
    """Forward computes the loss *and* d_hidden/d_weight/d_bias chunk by chunk; backward scales them."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, ignore_index, rows, math, chunk, chunk_loss):
        need = ctx.needs_input_grad[:3]
        m = math(hidden, weight, bias, chunk, need=need)
        n = hidden.shape[0]
        loss = hidden.new_zeros((), dtype=_acc_dtype(hidden.dtype))
        sums = None
        for s in range(0, n, chunk):
            e = min(n, s + chunk)
            full = logits = None  # one chunk alive at a time, not two
            h = m.operand(s, e)
            full = m.logits(h)
            logits = full[: e - s]
            lp, ent, lse = rows.fwd(logits, targets[s:e], temperature, ignore_index, True)
            with torch.enable_grad():
                lp_leaf, ent_leaf = lp.requires_grad_(), ent.requires_grad_()
                loss_c, sums_c = chunk_loss(lp_leaf, ent_leaf, s, e)
                g_lp, g_ent = torch.autograd.grad(loss_c, (lp_leaf, ent_leaf), allow_unused=True)
            loss += loss_c.detach()
            sums = sums_c if sums is None else _merge_sums(sums, sums_c)
            if not any(need):
                continue
            g_lp = torch.zeros_like(lse) if g_lp is None else g_lp
            rows.bwd(g_lp, g_ent, logits, targets[s:e], lse, ent.detach(), temperature, ignore_index, out=logits)
            m.backprop(full, s, e, h)
        ctx.grads = m.grads()
        ctx.mark_non_differentiable(*sums.values())
        return (loss, *sums.values())

    @staticmethod
    def backward(ctx, g_loss, *_):
        # The buffers are ours alone: scale them in place instead of allocating a second d_weight.
        grads = [None if g is None else g.mul_(g_loss.to(g.dtype)) for g in ctx.grads]
        ctx.grads = None
        return (*grads, None, None, None, None, None, None, None)


def _merge_sums(a: dict, b: dict) -> dict:
    return {k: torch.maximum(a[k], b[k]) if k == "ratio_max" else a[k] + b[k] for k in a}


def _one_pass_loss(hidden, weight, bias, targets, mask, advantages, *, old_logp, ref_logp, rollout_logp,
                   policy_weight, config, rows, math, chunk, ignore_index):
    """The one-pass plan (see the module docstring) over flattened tokens."""
    B, T, H = hidden.shape
    valid = mask.bool()
    m = valid.to(_acc_dtype(hidden.dtype))
    agg_w = _agg_weights(m, config).reshape(1, -1)
    adv = advantages.unsqueeze(-1).expand(B, T) if advantages.dim() == 1 else advantages
    if policy_weight is not None:
        policy_weight = policy_weight.unsqueeze(-1) if policy_weight.dim() == 1 else policy_weight
        policy_weight = policy_weight.expand(B, T)
    flat = {k: None if v is None else v.reshape(1, -1) for k, v in
            dict(adv=adv, valid=valid, old=old_logp, ref=ref_logp, roll=rollout_logp, pw=policy_weight).items()}

    def piece(name, s, e):
        x = flat[name]
        return None if x is None else x[:, s:e]

    def chunk_loss(lp, ent, s, e):
        loss, metrics = _policy_loss_core(
            lp.unsqueeze(0), piece("adv", s, e), piece("valid", s, e), old_logp=piece("old", s, e),
            ref_logp=piece("ref", s, e), entropy=ent.unsqueeze(0), rollout_logp=piece("roll", s, e), config=config,
            policy_weight=piece("pw", s, e), agg_weight=agg_w[:, s:e])
        count = piece("valid", s, e).sum().to(loss.dtype)
        # the core reports means over the chunk's valid tokens: turn them into sums to merge chunks
        return loss, {k: v if k == "ratio_max" else v * count for k, v in metrics.items()}

    loss, *values = _OnePassPolicyLoss.apply(hidden.reshape(B * T, H), weight, bias, targets.reshape(-1),
                                             config.temperature, ignore_index, rows, math, chunk, chunk_loss)
    keys = ["clip_frac", "kl_mean", "entropy_mean", "ratio_mean", "ratio_max"]
    if config.is_level is not None:
        keys.append("is_weight_mean")
    total = m.sum()
    metrics = {k: v if k == "ratio_max" else torch.where(total > 0, v / total.clamp(min=1), 0.0)
               for k, v in zip(keys, values)}
    return loss, metrics


def fused_linear_policy_loss(hidden, weight, targets, mask, advantages, *, bias=None, old_logp=None,
                             ref_logp=None, ref_hidden=None, ref_weight=None, ref_bias=None, rollout_logp=None,
                             policy_weight=None, config: PolicyLossConfig = PolicyLossConfig(), backend="auto",
                             ignore_index=-100, chunk_bytes=None, vocab_parallel_group=None,
                             entropy_quantile_fn=None):
    """The full RL policy loss from hidden states and the LM-head weight. Returns ``(loss, metrics)``.

    Args:
        hidden: ``[B, T, H]`` last hidden states at the completion positions (the state that
            predicts ``targets[b, t]``).
        weight: ``[V, H]`` LM head; ``bias`` optional ``[V]``.
        targets: ``[B, T]`` int64 completion token ids (padding may hold any id; ``mask`` decides).
        mask: ``[B, T]`` 1 for completion tokens, 0 for padding.
        advantages: ``[B]`` or ``[B, T]``.
        old_logp, ref_logp, rollout_logp: ``[B, T]`` log-probs of the behaviour, reference and
            sampler (rollout engine) policies; see ``pyrl.policy_loss``.
        ref_hidden, ref_weight, ref_bias: the reference model's hidden states and head: used for
            ``kl_type="full"`` (exact KL over the vocabulary), or to compute ``ref_logp`` when it is
            not given and ``beta > 0``.
        policy_weight: optional [B], [B, 1] or [B, T] constant factor on the policy term (e.g.
            vLLM's importance ratio); see ``pyrl.policy_loss``.
        config: a ``PolicyLossConfig``; ``config.temperature`` divides the logits.
        chunk_bytes: fp32 logits per token chunk (default 32 MiB on CPU, 160 MiB on CUDA).
        vocab_parallel_group: a ``torch.distributed`` group across which ``weight`` (and
            ``bias``/``ref_weight``/``ref_bias``) are split by vocabulary, as in
            ``fused_linear_logprobs``; ``targets`` hold global ids. Every rank gets the same loss;
            ``kl_type="full"`` is not supported there.
        entropy_quantile_fn: ``fn(entropy [B, T], valid [B, T] bool, q) -> threshold`` for
            ``top_entropy_rho``; default: the quantile over this call's valid tokens. Pass one that
            gathers the entropies of every data-parallel rank for one global quantile (TRL's mask).

    Entropy is always computed in the same pass (it is nearly free there) and reported as
    ``metrics["entropy_mean"]``.
    """
    if not isinstance(config, PolicyLossConfig):
        raise TypeError(f"config must be a pyrl.PolicyLossConfig, got {type(config).__name__}")
    _check_linear_args(hidden, weight, bias, config.temperature, ignore_index)
    if entropy_quantile_fn is not None and not callable(entropy_quantile_fn):
        raise TypeError(f"entropy_quantile_fn must be callable, got {type(entropy_quantile_fn).__name__}")
    if 0 <= ignore_index < weight.shape[0]:
        # padding is marked with ignore_index internally: a real token with that id would be dropped
        raise ValueError(f"ignore_index must lie outside the vocabulary [0, {weight.shape[0]}) (mask decides which "
                         f"tokens count; ignore_index only marks padding internally), got {ignore_index}")
    if hidden.dim() != 3:
        raise ValueError(f"hidden must have shape [B, T, H], got {shape_str(hidden)}")
    B, T, _ = hidden.shape
    if not isinstance(targets, torch.Tensor):
        raise TypeError(f"targets must be a torch.Tensor, got {type(targets).__name__}")
    check_shape("targets", targets, (B, T), "(the leading dims of hidden)")
    # The exact KL is computed whenever kl_type="full" (with beta == 0 for the kl_mean metric only,
    # as for the other estimators); it needs ref_hidden/ref_weight either way.
    full_kl = config.effective_kl_type == "full"
    _check_policy_args(B, T, "hidden", hidden, advantages, mask, old_logp=old_logp, ref_logp=ref_logp, entropy=None,
                       rollout_logp=rollout_logp, config=config, has_entropy=True, full_kl=full_kl,
                       ref_model=ref_hidden is not None, policy_weight=policy_weight)
    if ref_hidden is not None:
        _check_ref_model(ref_hidden, ref_weight, ref_bias, B, T, weight.shape[0], ignore_index)
    check_same_device(hidden=hidden, weight=weight, targets=targets, ref_hidden=ref_hidden, ref_weight=ref_weight,
                      ref_bias=ref_bias)
    valid = mask.bool()
    # Padding never enters the log-prob pass: no work, no gradient, and any id is allowed there.
    targets = torch.where(valid, targets, torch.full_like(targets, ignore_index))
    name = resolve_backend(backend, hidden.device, has=("torch", "cpp", "triton"))
    chunk_bytes = _resolve_chunk_bytes(chunk_bytes, hidden.device)
    if vocab_parallel_group is not None and full_kl:
        raise ValueError("kl_type='full' is not supported with vocab_parallel_group (the exact KL over a split "
                         "vocabulary is not implemented); use kl_type='k1'/'k2'/'k3' with ref_logp or ref_hidden")
    # (with a vocab-parallel group the log-prob op owns the collectives: always the two-pass plan)
    one_pass = None
    if vocab_parallel_group is None and _is_token_separable(config) and B * T > 0:
        one_pass = _one_pass_plan(name, hidden.reshape(B * T, -1), weight.shape[0], chunk_bytes)
    if one_pass is not None:
        if config.effective_kl_type is not None and ref_logp is None and ref_hidden is not None:
            ref_logp = _ref_logprobs(ref_hidden, ref_weight, ref_bias, targets, config, ignore_index, backend,
                                     chunk_bytes, None)
        targets = check_targets("targets", targets, (B, T), weight.shape[0], ignore_index)
        rows, math, chunk = one_pass
        return _one_pass_loss(hidden, weight, bias, targets, mask, advantages, old_logp=old_logp, ref_logp=ref_logp,
                              rollout_logp=rollout_logp, policy_weight=policy_weight, config=config,
                              rows=rows, math=math, chunk=chunk, ignore_index=ignore_index)
    logp, entropy = fused_linear_logprobs(hidden, weight, targets, bias=bias, temperature=config.temperature,
                                          ignore_index=ignore_index, return_entropy=True, backend=backend,
                                          chunk_bytes=chunk_bytes, vocab_parallel_group=vocab_parallel_group)
    kl = None
    if full_kl:
        if ref_hidden is None or ref_weight is None:
            raise ValueError("kl_type='full' needs ref_hidden [B, T, H] and ref_weight [V, H]")
        _check_linear_args(ref_hidden, ref_weight, ref_bias, config.temperature, ignore_index)
        check_shape("ref_hidden", ref_hidden, tuple(hidden.shape), "(the shape of hidden)")
        check_shape("ref_weight", ref_weight, tuple(weight.shape), "(the shape of weight)")
        h2 = hidden.reshape(B * T, -1)
        chunk = _chunk_rows(h2.shape[0], weight.shape[0], chunk_bytes // 2)
        kl = _FullKL.apply(h2, weight, bias, ref_hidden.reshape(B * T, -1).detach(), ref_weight.detach(),
                           None if ref_bias is None else ref_bias.detach(), valid.reshape(-1),
                           config.temperature, chunk).reshape(B, T)
    elif config.effective_kl_type is not None and ref_logp is None and ref_hidden is not None:
        ref_logp = _ref_logprobs(ref_hidden, ref_weight, ref_bias, targets, config, ignore_index, backend, chunk_bytes,
                                 vocab_parallel_group)
    return _policy_loss_core(logp, advantages, mask, old_logp=old_logp, ref_logp=ref_logp, entropy=entropy,
                             rollout_logp=rollout_logp, config=config, kl=kl, policy_weight=policy_weight,
                             entropy_quantile_fn=entropy_quantile_fn)


def _one_pass_plan(name, hidden, vocab, chunk_bytes):
    """``(rows, math, chunk)`` of the one-pass plan for backend ``name``, or None where its body is not
    a chunk loop (``torch``: the reference stays two-pass; Triton's single fused kernel)."""
    if name == "cpp":
        return _ROWS["cpp"], _AccMath, _chunk_rows(hidden.shape[0], vocab, chunk_bytes)
    if name == "triton":
        body, chunk = _triton_linear(hidden, vocab, chunk_bytes)
        if isinstance(body, _ChunkedLinear):
            return body.rows, body.math, chunk
    return None


def _check_ref_model(ref_hidden, ref_weight, ref_bias, B, T, V, ignore_index):
    """The reference model's hidden states [B, T, H_ref] and head [V, H_ref] (its own hidden size,
    the policy's vocabulary), with errors that name the ref_* arguments."""
    if ref_weight is None:
        raise ValueError("ref_hidden was given without ref_weight: pass both (or pass ref_logp)")
    _check_linear_args(ref_hidden, ref_weight, ref_bias, 1.0, ignore_index,
                       names=("ref_hidden", "ref_weight", "ref_bias"))
    if ref_hidden.dim() != 3 or tuple(ref_hidden.shape[:2]) != (B, T):
        raise ValueError(f"ref_hidden must have shape [{B}, {T}, H_ref] (the [B, T] of hidden), "
                         f"got {shape_str(ref_hidden)}")
    if ref_weight.shape[0] != V:
        raise ValueError(f"ref_weight must have shape [V, H_ref] with V = weight.shape[0] = {V} (the policy's "
                         f"vocabulary), got {shape_str(ref_weight)}")


def _ref_logprobs(ref_hidden, ref_weight, ref_bias, targets, config, ignore_index, backend, chunk_bytes, group):
    """Reference-model log-probs from its hidden states and head, without gradient."""
    if ref_weight is None:
        raise ValueError("ref_hidden was given without ref_weight: pass both (or pass ref_logp)")
    with torch.no_grad():
        return fused_linear_logprobs(ref_hidden, ref_weight, targets, bias=ref_bias, temperature=config.temperature,
                                     ignore_index=ignore_index, backend=backend, chunk_bytes=chunk_bytes,
                                     vocab_parallel_group=group)
