"""The RL policy loss straight from hidden states and the LM head (SPEC §1-6, §9).

    hidden [B, T, H] --(chunked fused log-prob + entropy)--> logp, entropy [B, T]
                     --(per-token policy loss, KL, entropy bonus/mask, aggregation)--> loss

The log-prob pass never holds ``[B*T, V]`` logits (see ``pyrl.ops.logprobs``). ``kl_type="full"``
(exact KL over the vocabulary to a reference head) runs one more chunked pass over both heads.
"""
from __future__ import annotations

import torch

from pyrl._validate import check_same_device, check_shape, shape_str
from pyrl.config import PolicyLossConfig
from pyrl.ops.logprobs import (DEFAULT_CHUNK_BYTES, _acc_dtype, _check_linear_args, _chunk_logits, _chunk_rows,
                               fused_linear_logprobs)
from pyrl.ops.policy_loss import _check_policy_args, _policy_loss_core

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


def fused_linear_policy_loss(hidden, weight, targets, mask, advantages, *, bias=None, old_logp=None,
                             ref_logp=None, ref_hidden=None, ref_weight=None, ref_bias=None, rollout_logp=None,
                             policy_weight=None, config: PolicyLossConfig = PolicyLossConfig(), backend="auto",
                             ignore_index=-100, chunk_bytes=DEFAULT_CHUNK_BYTES):
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

    Entropy is always computed in the same pass (it is nearly free there) and reported as
    ``metrics["entropy_mean"]``.
    """
    if not isinstance(config, PolicyLossConfig):
        raise TypeError(f"config must be a pyrl.PolicyLossConfig, got {type(config).__name__}")
    _check_linear_args(hidden, weight, bias, config.temperature, ignore_index)
    if hidden.dim() != 3:
        raise ValueError(f"hidden must have shape [B, T, H], got {shape_str(hidden)}")
    B, T, _ = hidden.shape
    if not isinstance(targets, torch.Tensor):
        raise TypeError(f"targets must be a torch.Tensor, got {type(targets).__name__}")
    check_shape("targets", targets, (B, T), "(the leading dims of hidden)")
    full_kl = config.beta > 0 and config.effective_kl_type == "full"
    _check_policy_args(B, T, "hidden", hidden, advantages, mask, old_logp=old_logp, ref_logp=ref_logp, entropy=None,
                       rollout_logp=rollout_logp, config=config, has_entropy=True, full_kl=full_kl,
                       ref_model=ref_hidden is not None, policy_weight=policy_weight)
    check_same_device(hidden=hidden, weight=weight, targets=targets, ref_hidden=ref_hidden, ref_weight=ref_weight)
    valid = mask.bool()
    # Padding never enters the log-prob pass: no work, no gradient, and any id is allowed there.
    targets = torch.where(valid, targets, torch.full_like(targets, ignore_index))
    logp, entropy = fused_linear_logprobs(hidden, weight, targets, bias=bias, temperature=config.temperature,
                                          ignore_index=ignore_index, return_entropy=True, backend=backend,
                                          chunk_bytes=chunk_bytes)
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
    elif config.beta > 0 and ref_logp is None and ref_hidden is not None:
        if ref_weight is None:
            raise ValueError("ref_hidden was given without ref_weight: pass both (or pass ref_logp)")
        with torch.no_grad():
            ref_logp = fused_linear_logprobs(ref_hidden, ref_weight, targets, bias=ref_bias,
                                             temperature=config.temperature, ignore_index=ignore_index,
                                             backend=backend, chunk_bytes=chunk_bytes)
    return _policy_loss_core(logp, advantages, mask, old_logp=old_logp, ref_logp=ref_logp, entropy=entropy,
                             rollout_logp=rollout_logp, config=config, kl=kl, policy_weight=policy_weight)
