"""The RL policy loss on per-token log-probs (docs/formulas.md §2-§6 and §9), in plain PyTorch.

    per_token = L[b,t] * policy_mask * is_weight  +  beta * KL[b,t] * m  -  entropy_coef * entropy * m
    loss      = agg(per_token, m)

``L`` is the surrogate of ``config.loss_type`` (a function registered in ``pyrl.losses``), on the
ratio of docs/formulas.md §2; ``policy_mask = m * entropy_mask * is_keep``. ``policy_loss`` validates its
arguments and calls ``policy_loss_core``, which the fused op (``fused_linear_policy_loss``) reuses
with the log-probs, entropy and exact KL it computed from hidden states.

Everything is computed in fp32 (fp64 when ``logp`` is fp64). Padded positions (``mask == 0``) are
zeroed before any arithmetic, so whatever they hold (``-inf`` log-probs, NaN) never reaches the loss
or the gradient. Nothing here synchronises with the device: metrics are 0-dim tensors.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from pyrl._validate import check_float, check_same_device, shape_str
from pyrl.config import PolicyLossConfig
from pyrl.losses import get_policy_loss, policy_loss_names, register_policy_loss

__all__ = ["policy_loss", "register_policy_loss", "policy_loss_names", "agg_weights", "aggregate",
           "not_token_separable", "policy_loss_core", "check_policy_args", "local_entropy_quantile", "kl_estimate"]

_INT_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)

# log-ratios are clamped before exp so a far-off-policy token gives a large finite ratio, not inf.
LOG_RATIO_CLAMP = 20.0


# --------------------------------------------------------------------------------------------
# Pieces of the core
# --------------------------------------------------------------------------------------------
def _masked_mean(x: torch.Tensor, m: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    return (x * m).sum() / count.clamp(min=1)


def local_entropy_quantile(entropy: torch.Tensor, valid: torch.Tensor, q: float) -> torch.Tensor:
    """The ``q`` quantile of ``entropy[valid]`` with ``torch.quantile``'s linear interpolation.

    Computed by sorting with the invalid entries pushed to +inf and gathering at the interpolation
    ranks, so it needs no boolean indexing (no device sync), has no input-size limit (torch.quantile
    refuses more than 2**24 elements) and gives bit-identical results: the same ranks
    ``q * (n - 1)`` in the same dtype, the same ``lerp``.
    """
    flat = torch.where(valid, entropy, float("inf")).reshape(-1)
    ordered = flat.sort().values
    n = valid.sum()
    rank = torch.tensor(q, dtype=entropy.dtype, device=entropy.device) * (n - 1).clamp(min=0).to(entropy.dtype)
    below = rank.floor()
    lo = below.long().view(1)
    hi = rank.ceil().long().view(1)
    return torch.lerp(ordered.gather(0, lo), ordered.gather(0, hi), rank - below).squeeze(0)


def _ratio(logp, old_logp, m, level: str) -> torch.Tensor:
    """docs/formulas.md §2. The sequence level keeps the per-token gradient ``s_b * d logp``."""
    log_r = logp - old_logp
    if level == "token":
        return log_r.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP).exp()
    count = m.sum(-1, keepdim=True).clamp(min=1)
    seq = ((log_r.detach() * m).sum(-1, keepdim=True) / count).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    return seq.exp() * (logp - logp.detach()).exp()


def kl_estimate(logp, ref_logp, kl_type: str) -> torch.Tensor:
    """docs/formulas.md §4, ``d = logp - logp_ref``: k1 = d, k2 = d^2 / 2, k3 = exp(-d) + d - 1 (d clamped
    to [-20, 20] for k3 only, whose exp would overflow), abs = |d|. A trailing ``+`` (§4.1) keeps the
    estimator's value and takes the gradient of k2 (straight-through), as verl's ``k3+``."""
    d = logp - ref_logp
    if kl_type.endswith("+"):
        k2 = 0.5 * d * d
        return (k2 - k2.detach()) + kl_estimate(logp.detach(), ref_logp, kl_type[:-1])  # exactly the value
    if kl_type == "k1":
        return d
    if kl_type == "k2":
        return 0.5 * d * d
    if kl_type == "abs":
        return d.abs()
    d = d.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    return (-d).exp() + d - 1.0


def _mismatch_weight(old_logp, rollout_logp, m, config) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """TIS / MIS (docs/formulas.md §3): the detached weight and, in mask mode, the kept tokens."""
    log_w = old_logp.detach() - rollout_logp
    if config.is_level == "sequence":
        log_w = (log_w * m).sum(-1, keepdim=True).expand_as(m)
    w = log_w.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP).exp()
    if config.is_mode == "truncate":
        return w.clamp(max=config.is_cap), None
    keep = w <= config.is_cap
    if config.is_min is not None:
        keep = keep & (w >= config.is_min)
    return torch.where(keep, w, 0.0), keep


def agg_weights(m: torch.Tensor, config: PolicyLossConfig) -> torch.Tensor:
    """Per-token weights ``w`` [B, T] of the aggregation (docs/formulas.md §6): every mode is linear
    in the per-token loss, ``agg(x) = sum(x * w)`` for any ``x`` that is zero at padding. The
    one-pass fused loss uses them to form a chunk's share of the loss and its gradient before the
    rest of the batch exists."""
    B, T = m.shape
    if config.agg == "token-mean":
        n = config.num_items_in_batch
        if n is None:
            denom = m.sum().clamp(min=1)
        elif isinstance(n, torch.Tensor):
            n = n.to(device=m.device, dtype=m.dtype)
            # a zero global count means nothing was valid anywhere: loss 0 rather than 0/0
            denom = torch.where(n > 0, n, torch.ones_like(n))
        else:
            denom = torch.tensor(float(n), dtype=m.dtype, device=m.device)
        return m / denom
    if config.agg == "seq-mean-token-mean":
        return m / (m.sum(-1, keepdim=True).clamp(min=1) * max(B, 1))
    if config.agg == "seq-mean-token-sum":
        return m / max(B, 1)
    length = config.max_completion_length if config.max_completion_length is not None else T
    return m / max(B * length, 1)


def aggregate(per_token: torch.Tensor, m: torch.Tensor, config: PolicyLossConfig) -> torch.Tensor:
    """The scalar loss of ``config.agg`` (docs/formulas.md §6); ``per_token`` is zero at padding."""
    return (per_token * agg_weights(m, config)).sum()


def not_token_separable(config: PolicyLossConfig) -> Optional[str]:
    """``None`` when token t's loss depends on token t's log-prob and entropy alone (the one-pass
    plan can run, docs/formulas.md §10), else the reason it does not."""
    if not get_policy_loss(config.loss_type).token_separable:
        return f"loss_type={config.loss_type!r} is not registered as token-separable"
    if config.effective_ratio_level != "token":
        return "a sequence-level ratio"
    if config.top_entropy_rho != 1.0:
        return "the top-entropy mask (a quantile over the batch)"
    if config.is_level == "sequence":
        return "a sequence-level mismatch weight"
    if config.exact_kl is not None:
        return "the exact KL (a walk over the reference head too)"
    if config.lp_reg_min_p is not None:
        return "Lp-Reg (a walk over the vocabulary, tokens selected over the batch)"
    return None


def _lp_reg_selection(logp, advantages, valid, kept_y, rho):
    """Lp-Reg's tokens (docs/formulas.md §4.2): of the valid negative-advantage tokens, the
    ``max(1, floor(rho * n))`` of lowest log-prob (ties: the earlier token, row-major), then those
    whose target the proxy keeps. No device sync."""
    candidate = valid & (advantages < 0)
    flat = torch.where(candidate, logp.detach(), float("inf")).reshape(-1)
    order = torch.sort(flat, stable=True).indices
    rank = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))
    k = (candidate.sum() * rho).floor().clamp(min=1)
    return candidate & (rank.view_as(candidate) < k) & kept_y


def policy_loss_core(logp, advantages, mask, *, old_logp, ref_logp, entropy, rollout_logp, config,
                      kl=None, entropy_quantile_fn=None, policy_weight=None, agg_weight=None, proxy_kl=None):
    """The loss on validated inputs (shapes [B, T]; advantages [B] or [B, T]).

    ``kl``: an optional precomputed per-token KL [B, T] (the exact ``"full"`` KL of the fused op),
    used instead of computing it from ``ref_logp``. ``policy_weight``: an optional constant factor
    [B], [B, 1] or [B, T] on the policy term (see ``policy_loss``). ``entropy_quantile_fn(entropy, valid, q)``:
    returns the 0-dim ``q`` quantile of ``entropy[valid]``; a distributed caller passes one that
    gathers across ranks (docs/formulas.md §5); the default is local.
    ``agg_weight``: [B, T] weights replacing the aggregation (see ``agg_weights``), when this call
    sees only a chunk of the batch. ``proxy_kl``: ``(kl, kept_y)`` [B, T] of Lp-Reg (the fused op's
    walk, docs/formulas.md §4.2), needed when ``config.lp_reg_min_p`` is set.
    Returns ``(loss, metrics)`` as ``policy_loss`` does.
    """
    dtype = torch.float64 if logp.dtype == torch.float64 else torch.float32
    valid = mask if mask.dtype == torch.bool else mask != 0
    m = valid.to(dtype)
    zero = torch.zeros((), dtype=dtype, device=logp.device)

    def clean(x, detach):
        # padded positions may hold anything (-inf log-probs); zero them before any arithmetic
        if x is None:
            return None
        x = x.detach() if detach else x
        return torch.where(valid, x.to(dtype), zero)

    logp = clean(logp, False)
    old_logp = logp.detach() if old_logp is None else clean(old_logp, True)
    ref_logp = clean(ref_logp, True)
    rollout_logp = clean(rollout_logp, True)
    entropy = clean(entropy, False)
    kl = clean(kl, False)
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(-1)
    advantages = clean(advantages.expand_as(logp), False)
    count = m.sum()

    kept = m  # the tokens the policy and KL terms see
    if config.truncates:
        # docs/formulas.md §3.13: under the sampler's distribution a token outside the current (or the
        # behaviour) policy's kept set has logp = -inf: it is dropped from the policy and KL terms, its
        # log-probs replaced by 0 first so that no -inf (or 0 * inf) reaches the loss or the gradient.
        outside = valid & (logp == float("-inf"))
        drop = outside | (valid & (old_logp == float("-inf")))
        logp, old_logp = torch.where(drop, zero, logp), torch.where(drop, zero, old_logp)
        kept = m * (~drop).to(dtype)

    ratio = _ratio(logp, old_logp, m, config.effective_ratio_level)
    spec = get_policy_loss(config.loss_type)
    extra = {"mask": valid} if spec.needs_mask else {}
    per_token, clipped = spec.fn(logp, ratio, advantages, config, **extra)

    policy_mask = kept
    if config.top_entropy_rho < 1.0 and logp.numel() > 0:
        quantile = entropy_quantile_fn or local_entropy_quantile
        ent = entropy.detach()
        threshold = quantile(ent, valid, 1.0 - config.top_entropy_rho)
        policy_mask = policy_mask * (ent >= threshold).to(dtype)
    extra_metrics = {}
    if config.mastered_token_prob is not None:  # UloRL: drop positive tokens the policy has mastered
        mastered = (advantages > 0) & (logp.detach() > math.log(config.mastered_token_prob))
        policy_mask = policy_mask * (~mastered).to(dtype)
        extra_metrics["mastered_frac"] = _masked_mean(mastered.to(dtype), m, count)
    if config.is_level is not None:
        weight, keep = _mismatch_weight(old_logp, rollout_logp, m, config)
        if keep is not None:
            policy_mask = policy_mask * keep.to(dtype)
        per_token = per_token * weight
        extra_metrics["is_weight_mean"] = _masked_mean(weight, m, count)
    if config.truncates:
        extra_metrics["outside_kept_frac"] = _masked_mean(outside.to(dtype), m, count)
    if policy_weight is not None:
        w = policy_weight.detach().to(dtype)
        w = w.unsqueeze(-1) if w.dim() == 1 else w
        per_token = per_token * torch.where(valid, w.expand_as(per_token), zero)
    per_token = per_token * policy_mask

    kl_type = config.effective_kl_type
    if kl is None and kl_type is not None and config.exact_kl is None and ref_logp is not None:
        kl = kl_estimate(logp, ref_logp, kl_type)
    if kl is not None and config.use_bias_correction_kl:
        kl = kl * ratio
    if kl is not None and config.beta != 0:
        per_token = per_token + config.beta * kl * kept
    if entropy is not None and config.entropy_coef != 0:
        per_token = per_token - config.entropy_coef * entropy * m
    if config.lp_reg_min_p is not None:
        proxy, kept_y = proxy_kl
        selected = _lp_reg_selection(logp, advantages, valid, kept_y, config.lp_reg_rho)
        per_token = per_token + config.lp_reg_coef * torch.where(selected, proxy.to(dtype), zero)
        extra_metrics["lp_reg_frac"] = _masked_mean(selected.to(dtype), m, count)

    loss = aggregate(per_token, m, config) if agg_weight is None else (per_token * agg_weight).sum()

    with torch.no_grad():
        r = ratio.detach()
        if r.numel() > 0:
            ratio_max = torch.where(valid, r, float("-inf")).max()
            ratio_max = torch.where(count > 0, ratio_max, zero)
        else:
            ratio_max = zero
        metrics = {
            "clip_frac": zero if clipped is None else _masked_mean(clipped.to(dtype), m, count),
            "kl_mean": zero if kl is None else _masked_mean(kl.detach(), kept, count),
            "entropy_mean": zero if entropy is None else _masked_mean(entropy.detach(), m, count),
            "ratio_mean": _masked_mean(r, m, count),
            "ratio_max": ratio_max,
            **{k: v.detach() for k, v in extra_metrics.items()},
        }
    return loss, metrics


# --------------------------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------------------------
def _check_per_token(name: str, t, shape) -> None:
    if t is None:
        return
    check_float(name, t)
    if tuple(t.shape) != tuple(shape):
        want = "[" + ", ".join(str(s) for s in shape) + "]"
        raise ValueError(f"{name} must have shape {want} (the shape of logp), got {shape_str(t)}")


def check_policy_args(B, T, anchor_name, anchor, advantages, mask, *, old_logp, ref_logp, entropy, rollout_logp,
                       config, has_entropy, full_kl=False, ref_model=False, policy_weight=None,
                       full_distribution=False) -> None:
    """Validate the per-token arguments of a policy loss over a [B, T] batch (shared by the fused op).

    ``anchor`` is the tensor the others must share a device with; ``full_kl``/``ref_model`` say the
    caller can compute the exact KL / the reference log-probs itself, ``full_distribution`` that it
    sees the policy's whole next-token distribution (Lp-Reg).
    """
    check_float("advantages", advantages)
    if tuple(advantages.shape) not in ((B,), (B, T)):
        raise ValueError(f"advantages must have shape [B] or [B, T] = [{B}] or [{B}, {T}], got {shape_str(advantages)}")
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be a torch.Tensor, got {type(mask).__name__}")
    if not (mask.dtype == torch.bool or mask.dtype in _INT_DTYPES or mask.is_floating_point()):
        dtype = str(mask.dtype).replace("torch.", "")
        raise TypeError(f"mask must be a bool, integer or float tensor, got dtype {dtype}")
    if tuple(mask.shape) != (B, T):
        raise ValueError(f"mask must have shape [{B}, {T}] (the [B, T] of {anchor_name}), got {shape_str(mask)}")
    for name, t in (("old_logp", old_logp), ("ref_logp", ref_logp), ("entropy", entropy),
                    ("rollout_logp", rollout_logp)):
        _check_per_token(name, t, (B, T))
    if policy_weight is not None:
        check_float("policy_weight", policy_weight)
        if tuple(policy_weight.shape) not in ((B,), (B, 1), (B, T)):
            raise ValueError(f"policy_weight must have shape [B], [B, 1] or [B, T] = [{B}], [{B}, 1] or [{B}, {T}], "
                             f"got {shape_str(policy_weight)}")
    n_items = config.num_items_in_batch if isinstance(config.num_items_in_batch, torch.Tensor) else None
    check_same_device(**{anchor_name: anchor}, advantages=advantages, mask=mask, old_logp=old_logp, ref_logp=ref_logp,
                      entropy=entropy, rollout_logp=rollout_logp, policy_weight=policy_weight)
    if n_items is not None and n_items.device != anchor.device and n_items.device.type != "cpu":
        raise ValueError(f"config.num_items_in_batch is on {n_items.device} but {anchor_name} is on {anchor.device}")

    if config.lp_reg_min_p is not None and not full_distribution:
        raise ValueError("lp_reg_min_p (Lp-Reg) regularises towards a filtered copy of the whole next-token "
                         "distribution, which policy_loss cannot get from log-probs: use fused_linear_policy_loss")
    if config.exact_kl is not None and not full_kl:
        raise ValueError(f"kl_type={config.kl_type!r} needs the reference model's full distribution, which policy_loss "
                         "cannot get from log-probs: use fused_linear_policy_loss with ref_hidden/ref_weight, "
                         "or kl_type 'k1', 'k2' or 'k3' with ref_logp")
    if config.beta > 0 and ref_logp is None and not (full_kl or ref_model):
        raise ValueError(f"ref_logp is required when config.beta > 0 (beta={config.beta!r}, "
                         f"kl_type={config.effective_kl_type!r})")
    if not has_entropy and config.entropy_coef != 0:
        raise ValueError(f"entropy is required when config.entropy_coef != 0 (got {config.entropy_coef!r})")
    if not has_entropy and config.top_entropy_rho < 1:
        raise ValueError(f"entropy is required when config.top_entropy_rho < 1 (got {config.top_entropy_rho!r})")
    if rollout_logp is None and config.is_level is not None:
        raise ValueError(f"rollout_logp is required when config.is_level is set (got {config.is_level!r})")



def policy_loss(logp, advantages, mask, *, old_logp=None, ref_logp=None, entropy=None,
                rollout_logp=None, policy_weight=None, config=PolicyLossConfig()):
    """The RL policy loss of ``config`` on per-token log-probs (docs/formulas.md §2-§6).

    Args:
        logp: [B, T] log-probs of the sampled tokens under the current policy (differentiable).
        advantages: [B] (one per sequence) or [B, T] (per token).
        mask: [B, T] completion mask, bool or 0/1 (any nonzero value counts as valid).
        old_logp: [B, T] log-probs under the policy that the ratio is taken against; default
            ``logp.detach()`` (on-policy, ratio 1). Treated as constant.
        ref_logp: [B, T] reference-model log-probs, needed when ``beta > 0`` (constant).
        entropy: [B, T] per-token entropy, needed when ``entropy_coef != 0`` or
            ``top_entropy_rho < 1``; differentiable (the entropy bonus backpropagates through it).
        rollout_logp: [B, T] log-probs from the rollout engine, needed when ``is_level`` is set.
        policy_weight: optional [B], [B, 1] or [B, T] constant factor on the policy term ``L`` only
            (not on KL or the entropy bonus), applied like the mismatch weight: e.g. an importance
            ratio the rollout engine computed (TRL/Liger ``vllm_is_ratio``). Treated as constant.
        config: a ``PolicyLossConfig``.

    Returns:
        ``(loss, metrics)``: the 0-dim loss to minimise (fp32, fp64 for fp64 ``logp``) and a dict of
        detached 0-dim tensors (means over valid tokens, 0 when there are none): ``clip_frac``,
        ``kl_mean``, ``entropy_mean``, ``ratio_mean``, ``ratio_max`` and ``is_weight_mean`` (the
        mismatch weight applied, 0 where ``is_mode="mask"`` dropped the token) when ``is_level`` is
        set, and ``outside_kept_frac`` (the fraction of valid tokens with ``logp = -inf``: outside the
        current policy's kept set, dropped from the policy and KL terms, docs/formulas.md §3.13) when
        ``config`` sets ``top_k``/``top_p``/``min_p``. ``clip_frac`` counts the tokens whose loss a clip bound decided. With
        ``config.num_items_in_batch`` the loss is this batch's sum divided by the global token
        count (sum it over micro-batches and ranks).

    ``kl_type="full"`` (and ``"full_forward"``, ``"full_jsd"``) needs the reference model's whole distribution: use
    ``fused_linear_policy_loss`` with ``ref_hidden``/``ref_weight``.
    """
    if not isinstance(config, PolicyLossConfig):
        raise TypeError(f"config must be a PolicyLossConfig, got {type(config).__name__}")
    check_float("logp", logp, dim=2)
    B, T = logp.shape
    check_policy_args(B, T, "logp", logp, advantages, mask, old_logp=old_logp, ref_logp=ref_logp, entropy=entropy,
                       rollout_logp=rollout_logp, config=config, has_entropy=entropy is not None,
                       policy_weight=policy_weight)
    return policy_loss_core(logp, advantages, mask, old_logp=old_logp, ref_logp=ref_logp, entropy=entropy,
                             rollout_logp=rollout_logp, config=config, policy_weight=policy_weight)

