"""The RL policy loss straight from hidden states and the LM head (docs/formulas.md §1-§6, §10).

    hidden [B, T, H] --(chunk walk: fused log-prob + entropy)--> logp, entropy [B, T]
                     --(per-token policy loss, KL, entropy bonus/mask, aggregation)--> loss

The log-prob pass never holds ``[B*T, V]`` logits (``pyrl.ops.walk``). ``kl_type="full"`` (exact
KL over the vocabulary to a reference head) runs one more walk over both heads. The plan
(``pyrl.ops.plan``) picks one of two, with one result:

* **two passes** (any loss; and the only plan of the fused Triton kernel and of a
  vocabulary-split head): the log-prob op computes logp/entropy for every token (GEMM 1), the
  per-token loss is formed on the whole batch, and backward recomputes each chunk's logits
  (GEMM 2) for d_hidden and d_weight (GEMMs 3, 4).
* **one pass** (a token-separable loss on a chunked body, every backend): every aggregation mode
  is a fixed per-token weighting of the per-token loss (``agg_weights``), so a chunk's share of
  the loss and its gradient w.r.t. logp/entropy are known as soon as the chunk's logits are. The
  chunk's logits are turned into d logits in place and consumed by the two gradient GEMMs right
  away: three GEMMs in all, no recomputation. The gradients are kept for backward, which only
  scales them.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch

from pyrl._validate import check_chunk_bytes, check_linear_args, check_ref_model, check_same_device, check_shape, \
    check_targets, shape_str
from pyrl.config import PolicyLossConfig
from pyrl.kernels.reference import RowParams, acc_dtype, divergence_rows, row_sum
from pyrl.ops.logprobs import LinearCall, fused_linear_logprobs, row_params, run_linear_logprobs
from pyrl.ops.plan import GEMM_ROW_QUANTUM, Plan, make_plan
from pyrl.ops.policy_loss import agg_weights, check_policy_args, not_token_separable, policy_loss_core
from pyrl.ops.walk import Head, rows_body, scale_forward_grads, walk

__all__ = ["fused_linear_policy_loss", "plan_fused_linear_policy_loss", "proxy_kl_rows_fwd", "proxy_kl_rows_bwd"]

_METRICS = ("clip_frac", "kl_mean", "entropy_mean", "ratio_mean", "ratio_max")


class _FullKL(torch.autograd.Function):
    """Per-token exact divergence to the reference head (docs/formulas.md §4, §14; ``kind`` as
    ``pyrl.kernels.reference.divergence_rows``: ``"reverse_kl"`` for ``kl_type="full"``): a walk over
    both heads in lockstep; the reference side gets no gradient (it is a fixed target)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, ref_hidden, ref_weight, ref_bias, valid, plan: Plan, temperature,
                kind="reverse_kl"):
        n = hidden.shape[0]
        kl = hidden.new_zeros(n, dtype=acc_dtype(hidden.dtype))

        def step(s, e, z, z_ref):
            kl[s:e] = divergence_rows(z, z_ref, temperature, kind)[0]
            return False

        walk(_kl_head(hidden, weight, bias), plan.kl_chunk_rows, step, ref=_kl_head(ref_hidden, ref_weight, ref_bias))
        kl = torch.where(valid, kl, 0.0)
        ctx.save_for_backward(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, valid)
        ctx.plan, ctx.temperature, ctx.kind = plan, temperature, kind
        return kl

    @staticmethod
    def backward(ctx, g):
        hidden, weight, bias, ref_hidden, ref_weight, ref_bias, valid = ctx.saved_tensors
        g = torch.where(valid, g.to(acc_dtype(hidden.dtype)), 0.0)

        def step(s, e, z, z_ref):
            divergence_rows(z, z_ref, ctx.temperature, ctx.kind, g=g[s:e], out=z)
            return True

        head = _kl_head(hidden, weight, bias, need=ctx.needs_input_grad[:3])
        grads = walk(head, ctx.plan.kl_chunk_rows, step, ref=_kl_head(ref_hidden, ref_weight, ref_bias))
        return (*grads, None, None, None, None, None, None, None)


# Lp-Reg's row maths, on the reference rows' conventions (pyrl.kernels.reference): plain PyTorch on one
# chunk of logits, in the chunk's dtype, reductions over the vocabulary by row_sum.
def _proxy(z_policy: torch.Tensor, min_p: float, temperature: float):
    """``(p, keep, log Z)``: the policy's probabilities, the tokens the min-p filter keeps
    (``p_v >= min_p * max_u p_u``) and the log of their mass."""
    lp = torch.log_softmax(z_policy / temperature, -1)
    keep = lp >= lp.amax(-1, keepdim=True) + math.log(min_p)
    p = lp.exp()
    return p, keep, row_sum(torch.where(keep, p, 0.0)).log()


def proxy_kl_rows_fwd(z_policy: torch.Tensor, targets: torch.Tensor, min_p: float, temperature: float):
    """Lp-Reg's ``KL(p_proxy || p)`` per row (docs/formulas.md §4.2), ``p_proxy`` the policy with the
    tokens below ``min_p`` times its top probability removed and renormalised (a constant target):
    ``sum_kept p_proxy (log p - log Z - log p) = -log Z``. Also whether each row's target survives
    the filter (``False`` for a negative target id, i.e. padding)."""
    _, keep, log_z = _proxy(z_policy, min_p, temperature)
    kept_y = keep.gather(1, targets.clamp(min=0).unsqueeze(1)).squeeze(1) & (targets >= 0)
    return (-log_z).clamp(min=0.0), kept_y


def proxy_kl_rows_bwd(z_policy: torch.Tensor, g: torch.Tensor, min_p: float, temperature: float,
                      out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``d (g * KL(p_proxy || p)) / d z = g * (p - p_proxy) / temperature`` (``p_proxy`` constant).
    Written into ``out`` when given (it may be ``z_policy``)."""
    p, keep, log_z = _proxy(z_policy, min_p, temperature)
    proxy = torch.where(keep, p * (-log_z).exp().unsqueeze(1), 0.0)
    dz = (p - proxy) * (g.unsqueeze(1) / temperature)
    if out is not None:
        out.copy_(dz)
        return out
    return dz


class _ProxyKL(torch.autograd.Function):
    """Lp-Reg's per-token ``KL(p_proxy || p)`` and whether the target survives the proxy's filter
    (docs/formulas.md §4.2): a walk over the policy head alone, the reference rows of
    ``pyrl.kernels.reference`` on each chunk; ``p_proxy`` is a constant target."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, valid, plan: Plan, min_p, temperature):
        n = hidden.shape[0]
        kl = hidden.new_zeros(n, dtype=acc_dtype(hidden.dtype))
        kept = torch.zeros(n, dtype=torch.bool, device=hidden.device)

        def step(s, e, z, _):
            kl[s:e], kept[s:e] = proxy_kl_rows_fwd(z, targets[s:e], min_p, temperature)
            return False

        walk(_kl_head(hidden, weight, bias), plan.kl_chunk_rows, step, active=valid)
        kl = torch.where(valid, kl, 0.0)
        ctx.save_for_backward(hidden, weight, bias, valid)
        ctx.plan, ctx.min_p, ctx.temperature = plan, min_p, temperature
        ctx.mark_non_differentiable(kept)
        return kl, kept & valid

    @staticmethod
    def backward(ctx, g, _):
        hidden, weight, bias, valid = ctx.saved_tensors
        g = torch.where(valid, g.to(acc_dtype(hidden.dtype)), 0.0)

        def step(s, e, z, _):
            proxy_kl_rows_bwd(z, g[s:e], ctx.min_p, ctx.temperature, out=z)
            return True

        head = _kl_head(hidden, weight, bias, need=ctx.needs_input_grad[:3])
        grads = walk(head, ctx.plan.kl_chunk_rows, step, active=g != 0)
        return (*grads, None, None, None, None, None)


def _kl_head(hidden, weight, bias, need=(False, False, False)):
    # the exact KL always runs its GEMMs in the accumulation dtype (two heads' logits per chunk)
    return Head(hidden, weight, bias, gemm="acc", pad_rows=GEMM_ROW_QUANTUM, need=need)


class _OnePassPolicyLoss(torch.autograd.Function):
    """Forward computes the loss *and* d_hidden/d_weight/d_bias chunk by chunk; backward scales them."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, plan: Plan, params: RowParams, chunk_loss):
        need = ctx.needs_input_grad[:3]
        rows = rows_body(plan.backend)
        loss = hidden.new_zeros((), dtype=acc_dtype(hidden.dtype))
        sums = {}

        def step(s, e, z, _):
            nonlocal loss
            t = targets[s:e]
            tau = rows.cutoff(z, params)  # the sampler's kept sets (None when not truncated)
            lp, ent, lse = rows.fwd(z, t, params, tau=tau)
            with torch.enable_grad():
                lp_leaf, ent_leaf = lp.requires_grad_(), ent.requires_grad_()
                loss_c, sums_c = chunk_loss(lp_leaf, ent_leaf, s, e)
                g_lp, g_ent = torch.autograd.grad(loss_c, (lp_leaf, ent_leaf), allow_unused=True)
            loss = loss + loss_c.detach()
            for k, v in sums_c.items():
                sums[k] = v if k not in sums else (torch.maximum(sums[k], v) if k == "ratio_max" else sums[k] + v)
            if not any(need):
                return False
            g_lp = torch.zeros_like(lse) if g_lp is None else g_lp
            rows.bwd(z, t, lse, ent.detach(), g_lp, g_ent, params, out=head.d_out(z), tau=tau)
            return True

        head = Head.of(plan, hidden, weight, bias, need=need)
        ctx.grads = walk(head, plan.chunk_rows, step)
        ctx.mark_non_differentiable(*sums.values())
        return (loss, *sums.values())

    @staticmethod
    def backward(ctx, g_loss, *_):
        # The buffers are ours alone: scale them in place instead of allocating a second d_weight.
        grads = scale_forward_grads(ctx.grads, g_loss)
        ctx.grads = None
        return (*grads, None, None, None, None)


def _one_pass_loss(hidden, weight, bias, targets, mask, advantages, *, old_logp, ref_logp, rollout_logp,
                   policy_weight, config, plan, ignore_index):
    """The one-pass plan (module docstring) over flattened tokens."""
    B, T, H = hidden.shape
    valid = mask.bool()
    m = valid.to(acc_dtype(hidden.dtype))
    agg_w = agg_weights(m, config).reshape(1, -1)
    adv = advantages.unsqueeze(-1).expand(B, T) if advantages.dim() == 1 else advantages
    if policy_weight is not None:
        policy_weight = policy_weight.unsqueeze(-1) if policy_weight.dim() == 1 else policy_weight
        policy_weight = policy_weight.expand(B, T)
    flat = {k: None if v is None else v.reshape(1, -1) for k, v in
            dict(adv=adv, valid=valid, old=old_logp, ref=ref_logp, roll=rollout_logp, pw=policy_weight).items()}

    def chunk_loss(lp, ent, s, e):
        # A token-separable loss is elementwise: it runs on [1, c] slices of the flattened tokens.
        piece = {k: None if x is None else x[:, s:e] for k, x in flat.items()}
        loss, metrics = policy_loss_core(
            lp.unsqueeze(0), piece["adv"], piece["valid"], old_logp=piece["old"], ref_logp=piece["ref"],
            entropy=ent.unsqueeze(0), rollout_logp=piece["roll"], config=config, policy_weight=piece["pw"],
            agg_weight=agg_w[:, s:e])
        count = piece["valid"].sum().to(loss.dtype)
        # the core reports means over the chunk's valid tokens: turn them into sums to merge chunks
        return loss, {k: v if k == "ratio_max" else v * count for k, v in metrics.items()}

    loss, *values = _OnePassPolicyLoss.apply(hidden.reshape(B * T, H), weight, bias, targets.reshape(-1), plan,
                                             _row_params(config, ignore_index), chunk_loss)
    keys = (list(_METRICS) + (["mastered_frac"] if config.mastered_token_prob is not None else [])
            + (["is_weight_mean"] if config.is_level is not None else [])
            + (["outside_kept_frac"] if config.truncates else []))
    total = m.sum()
    metrics = {k: v if k == "ratio_max" else torch.where(total > 0, v / total.clamp(min=1), 0.0)
               for k, v in zip(keys, values)}
    return loss, metrics


def _row_params(config: PolicyLossConfig, ignore_index: int) -> RowParams:
    """The policy's rows: its temperature and the sampler's truncation, entropy always on."""
    return row_params(config.temperature, ignore_index, True, config.top_k, config.top_p, config.min_p,
                      config.sampler_order, prefix="PolicyLossConfig.")


class _PolicyCall(NamedTuple):
    """A validated ``fused_linear_policy_loss`` call and its plan."""

    plan: Plan
    targets: torch.Tensor   # [B, T] int64, padding marked with ignore_index
    full_kl: bool


def plan_fused_linear_policy_loss(hidden, weight, targets, mask, advantages, *, bias=None, old_logp=None,
                                  ref_logp=None, ref_hidden=None, ref_weight=None, ref_bias=None, rollout_logp=None,
                                  policy_weight=None, config: PolicyLossConfig = PolicyLossConfig(), backend="auto",
                                  ignore_index=-100, chunk_bytes=None, vocab_parallel_group=None,
                                  entropy_quantile_fn=None) -> _PolicyCall:
    """Validate a ``fused_linear_policy_loss`` call and plan it."""
    if not isinstance(config, PolicyLossConfig):
        raise TypeError(f"config must be a pyrl.PolicyLossConfig, got {type(config).__name__}")
    check_linear_args(hidden, weight, bias, config.temperature, ignore_index)
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
    full_kl = config.exact_kl is not None
    check_policy_args(B, T, "hidden", hidden, advantages, mask, old_logp=old_logp, ref_logp=ref_logp, entropy=None,
                      rollout_logp=rollout_logp, config=config, has_entropy=True, full_kl=full_kl,
                      ref_model=ref_hidden is not None, policy_weight=policy_weight, full_distribution=True)
    if ref_hidden is not None:
        check_ref_model(ref_hidden, ref_weight, ref_bias, (B, T), weight.shape[0], ignore_index)
    check_same_device(hidden=hidden, weight=weight, targets=targets, ref_hidden=ref_hidden, ref_weight=ref_weight,
                      ref_bias=ref_bias)
    if chunk_bytes is not None:
        check_chunk_bytes(chunk_bytes)
    if vocab_parallel_group is not None and config.lp_reg_min_p is not None:
        raise ValueError("lp_reg_min_p (Lp-Reg) is not supported with vocab_parallel_group (its proxy filters the "
                         "whole vocabulary, which no rank holds)")
    if vocab_parallel_group is not None and full_kl:
        raise ValueError(f"kl_type={config.kl_type!r} is not supported with vocab_parallel_group (the exact KL over a split "
                         "vocabulary is not implemented); use kl_type='k1'/'k2'/'k3' with ref_logp or ref_hidden")
    if full_kl:
        if ref_hidden is None or ref_weight is None:
            raise ValueError(f"kl_type={config.kl_type!r} needs ref_hidden [B, T, H] and ref_weight [V, H]")
        check_shape("ref_hidden", ref_hidden, tuple(hidden.shape), "(the shape of hidden)")
        check_shape("ref_weight", ref_weight, tuple(weight.shape), "(the shape of weight)")
    valid = mask.bool()
    # Padding never enters the log-prob pass: no work, no gradient, and any id is allowed there.
    targets = torch.where(valid, targets, torch.full_like(targets, ignore_index))
    plan = make_plan("fused_linear_policy_loss", device=hidden.device, dtype=hidden.dtype, n_rows=B * T,
                     vocab=weight.shape[0], hidden_size=weight.shape[1], backend=backend, chunk_bytes=chunk_bytes,
                     separable=not_token_separable(config), full_kl=full_kl,
                     vocab_parallel=vocab_parallel_group is not None, proxy_kl=config.lp_reg_min_p is not None,
                     sampler=_row_params(config, ignore_index).sampler_text)
    if vocab_parallel_group is None:
        targets = check_targets("targets", targets, (B, T), weight.shape[0], ignore_index)
    return _PolicyCall(plan, targets, full_kl)


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
        config: a ``PolicyLossConfig``; ``config.temperature`` divides the logits, and its
            ``top_k``/``top_p``/``min_p`` take the log-probs and entropy under the sampler's
            truncated distribution (docs/formulas.md §1.1, §3.13); the reference log-probs
            (``ref_hidden``) and the exact KL stay under the full softmax.
        chunk_bytes: fp32 logits per token chunk, or per tile of the vocabulary-blocked walk
            (docs/formulas.md §10.1; default 64 MiB on CPU, 160 MiB on CUDA), or ``"auto"``: sized
            from the device's free memory (docs/scaling.md section 8).
        vocab_parallel_group: a ``torch.distributed`` group across which ``weight`` (and
            ``bias``/``ref_weight``/``ref_bias``) are split by vocabulary, as in
            ``fused_linear_logprobs``; ``targets`` hold global ids. Every rank gets the same loss;
            ``kl_type="full"`` is not supported there.
        entropy_quantile_fn: ``fn(entropy [B, T], valid [B, T] bool, q) -> threshold`` for
            ``top_entropy_rho``; default: the quantile over this call's valid tokens. Pass one that
            gathers the entropies of every data-parallel rank for one global quantile (TRL's mask).

    Entropy is always computed in the same pass (it is nearly free there) and reported as
    ``metrics["entropy_mean"]``. ``pyrl.explain("fused_linear_policy_loss", ...)`` shows the plan
    a call takes (one or two passes, docs/formulas.md §10).
    """
    call = plan_fused_linear_policy_loss(
        hidden, weight, targets, mask, advantages, bias=bias, old_logp=old_logp, ref_logp=ref_logp,
        ref_hidden=ref_hidden, ref_weight=ref_weight, ref_bias=ref_bias, rollout_logp=rollout_logp,
        policy_weight=policy_weight, config=config, backend=backend, ignore_index=ignore_index,
        chunk_bytes=chunk_bytes, vocab_parallel_group=vocab_parallel_group, entropy_quantile_fn=entropy_quantile_fn)
    plan, targets = call.plan, call.targets
    B, T, _ = hidden.shape
    if config.effective_kl_type is not None and not call.full_kl and ref_logp is None and ref_hidden is not None:
        ref_logp = _ref_logprobs(ref_hidden, ref_weight, ref_bias, targets, config, ignore_index, backend,
                                 plan.chunk_bytes, vocab_parallel_group)
    if plan.passes == "one":
        return _one_pass_loss(hidden, weight, bias, targets, mask, advantages, old_logp=old_logp, ref_logp=ref_logp,
                              rollout_logp=rollout_logp, policy_weight=policy_weight, config=config, plan=plan,
                              ignore_index=ignore_index)
    if vocab_parallel_group is None:
        # the log-prob pass of this call's own plan: validated and planned once, above
        logp, entropy = run_linear_logprobs(LinearCall(plan, hidden.reshape(B * T, -1), weight, bias,
                                                       targets.reshape(-1), _row_params(config, ignore_index),
                                                       (B, T)))
        logp, entropy = logp.reshape(B, T), entropy.reshape(B, T)
    else:  # the vocab-parallel op agrees its chunks with the other ranks first
        logp, entropy = fused_linear_logprobs(hidden, weight, targets, bias=bias, temperature=config.temperature,
                                              ignore_index=ignore_index, return_entropy=True, backend=backend,
                                              chunk_bytes=plan.chunk_bytes, vocab_parallel_group=vocab_parallel_group)
    kl = None
    if call.full_kl:
        kl = _FullKL.apply(hidden.reshape(B * T, -1), weight, bias, ref_hidden.reshape(B * T, -1).detach(),
                           ref_weight.detach(), None if ref_bias is None else ref_bias.detach(),
                           mask.bool().reshape(-1), plan, config.temperature, config.exact_kl).reshape(B, T)
    proxy = None
    if config.lp_reg_min_p is not None:
        kl_p, kept = _ProxyKL.apply(hidden.reshape(B * T, -1), weight, bias, targets.reshape(-1),
                                    mask.bool().reshape(-1), plan, config.lp_reg_min_p, config.temperature)
        proxy = (kl_p.reshape(B, T), kept.reshape(B, T))
    return policy_loss_core(logp, advantages, mask, old_logp=old_logp, ref_logp=ref_logp, entropy=entropy,
                            rollout_logp=rollout_logp, config=config, kl=kl, policy_weight=policy_weight,
                            entropy_quantile_fn=entropy_quantile_fn, proxy_kl=proxy)


def _ref_logprobs(ref_hidden, ref_weight, ref_bias, targets, config, ignore_index, backend, chunk_bytes, group):
    """Reference-model log-probs from its hidden states and head, without gradient."""
    with torch.no_grad():
        return fused_linear_logprobs(ref_hidden, ref_weight, targets, bias=ref_bias, temperature=config.temperature,
                                     ignore_index=ignore_index, backend=backend, chunk_bytes=chunk_bytes,
                                     vocab_parallel_group=group)
