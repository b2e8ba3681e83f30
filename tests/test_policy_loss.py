"""policy_loss against an independent float64 reference written with explicit loops over (b, t)."""
import dataclasses
import math
import zlib

import pytest
import torch

import pyrl

from pyrl.config import PolicyLossConfig
from pyrl.losses import get_policy_loss
from pyrl.ops.policy_loss import (local_entropy_quantile, policy_loss, policy_loss_core, policy_loss_names,
                                  register_policy_loss)

METRICS = ("clip_frac", "kl_mean", "entropy_mean", "ratio_mean", "ratio_max")


# --------------------------------------------------------------------------------------------
# The reference: one token at a time, branches written out, no vectorised clamp/min/max.
# --------------------------------------------------------------------------------------------
def ref_quantile(values, q):
    """torch.quantile's linear interpolation, by hand."""
    v = sorted(values)
    pos = q * (len(v) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return v[lo] + (pos - lo) * (v[hi] - v[lo])


def num(x):
    return float(x.detach()) if isinstance(x, torch.Tensor) else float(x)


def const(x):
    return torch.tensor(float(x), dtype=torch.float64)


def ref_policy_loss(logp, adv, mask, cfg, old=None, ref=None, ent=None, roll=None, kl_in=None):
    """Returns (loss, metrics); differentiable in logp and ent (float64 scalars built per token)."""
    B, T = logp.shape
    valid = [[bool(mask[b, t] != 0) for t in range(T)] for b in range(B)]
    n_b = [sum(row) for row in valid]
    N = sum(n_b)
    if old is None:
        old = logp.detach()

    def A(b, t):
        return num(adv[b]) if adv.dim() == 1 else num(adv[b, t])

    sequence = cfg.loss_type == "gspo" or cfg.ratio_level == "sequence"
    ratio = {}
    for b in range(B):
        if sequence:
            s = sum(num(logp[b, t] - old[b, t]) for t in range(T) if valid[b][t]) / max(n_b[b], 1)
            s = math.exp(min(max(s, -20.0), 20.0))
        for t in range(T):
            if valid[b][t]:
                if sequence:
                    ratio[b, t] = s * torch.exp(logp[b, t] - logp[b, t].detach())
                else:
                    ratio[b, t] = torch.exp(logp[b, t] - num(old[b, t]))

    threshold = -math.inf
    if cfg.top_entropy_rho < 1 and N > 0:
        threshold = ref_quantile([num(ent[b, t]) for b in range(B) for t in range(T) if valid[b][t]],
                                 1 - cfg.top_entropy_rho)

    weights = {}
    if cfg.is_level is not None:
        for b in range(B):
            seq_log_w = sum(num(old[b, t] - roll[b, t]) for t in range(T) if valid[b][t])
            for t in range(T):
                if not valid[b][t]:
                    continue
                w = math.exp(seq_log_w if cfg.is_level == "sequence" else num(old[b, t] - roll[b, t]))
                if cfg.is_mode == "truncate":
                    weights[b, t] = min(w, cfg.is_cap)
                else:
                    keep = w <= cfg.is_cap and (cfg.is_min is None or w >= cfg.is_min)
                    weights[b, t] = w if keep else 0.0

    kl_type = cfg.kl_type if cfg.kl_type is not None else ("k3" if cfg.beta > 0 else None)
    per_token = {}
    clipped = {}
    kls = {}
    for b in range(B):
        for t in range(T):
            if not valid[b][t]:
                continue
            a, r, rv = A(b, t), ratio[b, t], num(ratio[b, t])
            is_clipped = False
            if cfg.loss_type in ("ppo", "gspo"):
                lo, hi = 1 - cfg.eps_low, 1 + cfg.eps_high
                r_unclipped, const_unclipped = r, False
                if cfg.delta is not None and rv > cfg.delta:
                    r_unclipped, const_unclipped = const(cfg.delta), True
                if rv < lo:
                    r_clipped, const_clipped = const(lo), True
                elif rv > hi:
                    r_clipped, const_clipped = const(hi), True
                else:
                    r_clipped, const_clipped = r, False
                l1, l2 = -a * r_unclipped, -a * r_clipped
                if num(l1) >= num(l2):
                    L, is_clipped = l1, const_unclipped
                else:
                    L, is_clipped = l2, const_clipped
                if cfg.clip_ratio_c is not None and a < 0 and num(L) > -a * cfg.clip_ratio_c:
                    L, is_clipped = const(-a * cfg.clip_ratio_c), True
                is_clipped = is_clipped and a != 0
            elif cfg.loss_type == "cispo":
                lo = None if cfg.eps_low is None else 1 - cfg.eps_low
                hi = 1 + cfg.eps_high
                w = rv
                if lo is not None and rv < lo:
                    w = lo
                if rv > hi:
                    w = hi
                L = -w * a * logp[b, t]
                is_clipped = (a > 0 and rv > hi) or (a < 0 and lo is not None and rv < lo)
            elif cfg.loss_type == "sapo":
                tau = cfg.tau_pos if a > 0 else cfg.tau_neg
                L = -(4 / tau) * torch.sigmoid(tau * (r - 1)) * a
            elif cfg.loss_type == "reinforce":
                L = -a * logp[b, t]
            clipped[b, t] = is_clipped

            if cfg.top_entropy_rho < 1 and num(ent[b, t]) < threshold:
                L = L * 0.0
            if cfg.is_level is not None:
                L = L * weights[b, t]
            total = L
            if kl_in is not None or (kl_type is not None and ref is not None):
                if kl_in is not None:
                    kl = kl_in[b, t]
                else:
                    d = logp[b, t] - num(ref[b, t])  # test values stay inside the [-20, 20] clamp
                    kl = {"k1": d, "k2": d * d / 2, "k3": torch.exp(-d) + d - 1}[kl_type]
                if cfg.use_bias_correction_kl:
                    kl = kl * r
                kls[b, t] = kl
                total = total + cfg.beta * kl
            if cfg.entropy_coef != 0:
                total = total - cfg.entropy_coef * ent[b, t]
            per_token[b, t] = total

    zero = logp.sum() * 0.0  # keeps the graph for empty/all-masked batches
    seq_sums = [sum((per_token[b, t] for t in range(T) if valid[b][t]), zero) for b in range(B)]
    total = sum(seq_sums, zero)
    if cfg.agg == "token-mean":
        n = cfg.num_items_in_batch
        denom = max(N, 1) if n is None else num(n)
        loss = total / denom
    elif cfg.agg == "seq-mean-token-mean":
        loss = sum((seq_sums[b] / max(n_b[b], 1) for b in range(B)), zero) / max(B, 1)
    elif cfg.agg == "seq-mean-token-sum":
        loss = total / max(B, 1)
    else:
        length = cfg.max_completion_length or T
        loss = total / max(B * length, 1)

    def mean(values):
        values = list(values)
        return sum(values) / len(values) if values else 0.0

    metrics = {
        "clip_frac": mean(num(v) for v in clipped.values()),
        "kl_mean": mean(num(v) for v in kls.values()),
        "entropy_mean": mean(num(ent[k]) for k in ratio) if ent is not None else 0.0,
        "ratio_mean": mean(num(v) for v in ratio.values()),
        "ratio_max": max((num(v) for v in ratio.values()), default=0.0),
    }
    if cfg.is_level is not None:
        metrics["is_weight_mean"] = mean(weights.values())
    return loss, metrics


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------
def make_inputs(B=4, T=6, per_token_adv=False, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    old = logp + 0.35 * torch.randn(B, T, generator=g, dtype=torch.float64)  # ratios ~0.5..2: many clip
    ref = logp + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)
    roll = old + 0.4 * torch.randn(B, T, generator=g, dtype=torch.float64)
    # entropy rounded to one decimal: many ties, so the quantile threshold hits equal values
    ent = (torch.rand(B, T, generator=g, dtype=torch.float64) * 2).round(decimals=1)
    adv_shape = (B, T) if per_token_adv else (B,)
    adv = torch.randn(adv_shape, generator=g, dtype=torch.float64)
    mask = torch.rand(B, T, generator=g) > 0.25
    mask[0] = False          # a row with no valid token
    mask[1, :2] = True       # make sure something is valid
    to = lambda x: x.to(dtype)  # noqa: E731
    return dict(logp=to(logp).requires_grad_(), advantages=to(adv), mask=mask, old_logp=to(old),
                ref_logp=to(ref), entropy=to(ent).requires_grad_(), rollout_logp=to(roll))


def clone_inputs(inputs):
    out = {}
    for k, v in inputs.items():
        out[k] = v.detach().clone().requires_grad_(v.requires_grad)
    return out


def check_against_reference(cfg, inputs, use=("old_logp", "ref_logp", "entropy", "rollout_logp")):
    mine, theirs = clone_inputs(inputs), clone_inputs(inputs)
    kwargs = {k: mine[k] for k in use}
    loss, metrics = policy_loss(mine["logp"], mine["advantages"], mine["mask"], config=cfg, **kwargs)
    ref_loss, ref_metrics = ref_policy_loss(
        theirs["logp"], theirs["advantages"], theirs["mask"], cfg,
        old=theirs["old_logp"] if "old_logp" in use else None,
        ref=theirs["ref_logp"] if "ref_logp" in use else None,
        ent=theirs["entropy"] if "entropy" in use else None,
        roll=theirs["rollout_logp"] if "rollout_logp" in use else None)
    assert loss.dtype == torch.float64 and loss.dim() == 0
    torch.testing.assert_close(loss, ref_loss.detach(), rtol=1e-10, atol=1e-12)
    assert set(metrics) == set(ref_metrics)
    for k, v in metrics.items():
        assert v.dim() == 0 and not v.requires_grad
        torch.testing.assert_close(v, torch.tensor(ref_metrics[k], dtype=torch.float64), rtol=1e-10, atol=1e-12,
                                   msg=lambda s, k=k: f"metric {k}: {s}")
    loss.backward()
    ref_loss.backward()
    for name in ("logp", "entropy"):
        if name in use or name == "logp":
            g, rg = mine[name].grad, theirs[name].grad
            if rg is None:
                assert g is None or not g.any()
            else:
                torch.testing.assert_close(g, rg, rtol=1e-10, atol=1e-12, msg=lambda s, n=name: f"grad {n}: {s}")
    return loss, metrics


# --------------------------------------------------------------------------------------------
# Every option against the reference
# --------------------------------------------------------------------------------------------
CASES = {
    # loss types x ratio levels
    **{f"{lt}-{lvl}": dict(loss_type=lt, ratio_level=lvl)
       for lt in ("ppo", "cispo", "sapo", "reinforce") for lvl in ("token", "sequence")},
    "gspo": dict(loss_type="gspo", eps_low=0.1, eps_high=0.15),
    "dapo-clip-higher": dict(eps_low=0.2, eps_high=0.28),
    "cispo-no-lower": dict(loss_type="cispo", eps_low=None, eps_high=0.3),
    "cispo-tight": dict(loss_type="cispo", eps_low=0.1, eps_high=0.1),
    "sapo-temps": dict(loss_type="sapo", tau_pos=0.7, tau_neg=2.0),
    # delta (also delta < 1 + eps_high) and dual clip
    "delta": dict(delta=1.3),
    "delta-below-high": dict(delta=1.3, eps_high=0.6),
    "dual-clip": dict(clip_ratio_c=1.4),
    "delta-dual-clip": dict(delta=1.6, clip_ratio_c=1.5),
    "gspo-dual-clip": dict(loss_type="gspo", clip_ratio_c=1.1, eps_low=0.05, eps_high=0.05),
    # KL
    **{f"kl-{k}": dict(kl_type=k, beta=0.1) for k in ("k1", "k2", "k3")},
    "kl-default-k3": dict(beta=0.3),
    "kl-monitor-only": dict(kl_type="k2"),
    "kl-bias-corrected": dict(beta=0.2, use_bias_correction_kl=True),
    "kl-bias-corrected-seq": dict(beta=0.2, kl_type="k1", use_bias_correction_kl=True, ratio_level="sequence"),
    # entropy
    "entropy-bonus": dict(entropy_coef=0.05),
    "entropy-penalty": dict(entropy_coef=-0.02, loss_type="reinforce"),
    "top-entropy": dict(top_entropy_rho=0.5),
    "top-entropy-0.2": dict(top_entropy_rho=0.2, entropy_coef=0.01, beta=0.1),
    "top-entropy-0.37-seq": dict(top_entropy_rho=0.37, loss_type="gspo"),
    # aggregation
    "agg-seq-mean-token-mean": dict(agg="seq-mean-token-mean", beta=0.1),
    "agg-seq-mean-token-sum": dict(agg="seq-mean-token-sum", entropy_coef=0.01),
    "agg-sum-norm": dict(agg="seq-mean-token-sum-norm", max_completion_length=10),
    "agg-sum-norm-T": dict(agg="seq-mean-token-sum-norm"),
    "num-items": dict(num_items_in_batch=37),
    "num-items-float": dict(num_items_in_batch=12.5, beta=0.1),
    # rollout mismatch correction
    **{f"is-{lvl}-{mode}": dict(is_level=lvl, is_mode=mode, is_cap=1.5)
       for lvl in ("token", "sequence") for mode in ("truncate", "mask")},
    "is-token-mask-min": dict(is_level="token", is_mode="mask", is_cap=1.6, is_min=0.7),
    "is-sequence-mask-min": dict(is_level="sequence", is_mode="mask", is_cap=2.5, is_min=0.6),
    # everything at once
    "kitchen-sink": dict(loss_type="gspo", delta=2.0, clip_ratio_c=3.0, beta=0.05, use_bias_correction_kl=True,
                         entropy_coef=0.01, top_entropy_rho=0.6, agg="seq-mean-token-mean",
                         is_level="token", is_mode="mask", is_min=0.5),
}


@pytest.mark.parametrize("per_token_adv", [False, True], ids=["adv[B]", "adv[B,T]"])
@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference(case, per_token_adv):
    cfg = PolicyLossConfig(**CASES[case])
    check_against_reference(cfg, make_inputs(per_token_adv=per_token_adv, seed=zlib.crc32(case.encode()) % 1000))


def test_cases_exercise_the_clips():
    """The inputs are off-policy enough that clipping really happens (the tests above are not vacuous)."""
    _, metrics = check_against_reference(PolicyLossConfig(), make_inputs())
    assert 0.1 < float(metrics["clip_frac"]) < 0.9
    _, metrics = check_against_reference(PolicyLossConfig(clip_ratio_c=1.4), make_inputs(seed=3))
    assert float(metrics["clip_frac"]) > 0


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum",
                                 "seq-mean-token-sum-norm"])
def test_on_policy_default_old_logp(agg):
    """old_logp omitted: ratio 1 everywhere, nothing clipped."""
    cfg = PolicyLossConfig(agg=agg)
    _, metrics = check_against_reference(cfg, make_inputs(), use=())
    assert float(metrics["ratio_mean"]) == 1.0 and float(metrics["clip_frac"]) == 0.0


def test_num_items_tensor_matches_number():
    inputs = make_inputs()
    a, _ = policy_loss(inputs["logp"], inputs["advantages"], inputs["mask"], old_logp=inputs["old_logp"],
                       config=PolicyLossConfig(num_items_in_batch=torch.tensor(23)))
    b, _ = policy_loss(inputs["logp"], inputs["advantages"], inputs["mask"], old_logp=inputs["old_logp"],
                       config=PolicyLossConfig(num_items_in_batch=23))
    torch.testing.assert_close(a, b)


def test_num_items_sums_to_global_token_mean():
    """Splitting a batch into micro-batches with num_items_in_batch = global count, the losses add up to
    the token-mean of the whole batch (gradient accumulation / data parallel)."""
    inputs = make_inputs(B=6, seed=5)
    full, _ = policy_loss(inputs["logp"], inputs["advantages"], inputs["mask"], old_logp=inputs["old_logp"])
    n = inputs["mask"].sum()
    cfg = PolicyLossConfig(num_items_in_batch=n)
    parts = [policy_loss(inputs["logp"][s], inputs["advantages"][s], inputs["mask"][s],
                         old_logp=inputs["old_logp"][s], config=cfg)[0]
             for s in (slice(0, 2), slice(2, 5), slice(5, 6))]
    torch.testing.assert_close(sum(parts), full)


def test_num_items_zero_tensor_gives_zero():
    inputs = make_inputs()
    mask = torch.zeros_like(inputs["mask"])
    loss, _ = policy_loss(inputs["logp"], inputs["advantages"], mask,
                          config=PolicyLossConfig(num_items_in_batch=torch.tensor(0.0)))
    assert loss.item() == 0.0


# --------------------------------------------------------------------------------------------
# Small cases computed by hand
# --------------------------------------------------------------------------------------------
def test_hand_computed_ppo():
    # One sequence, A = 1, ratios 1.5 and 0.5, eps = 0.2:
    #   token 0: max(-1.5, -1.2) = -1.2 (clipped: r > 1.2 with A > 0), gradient 0
    #   token 1: max(-0.5, -0.8) = -0.5, gradient -r = -0.5
    #   token-mean: (-1.2 - 0.5) / 2 = -0.85; d/dlogp_1 = -0.5 / 2 = -0.25
    #   clip_frac 1/2, ratio_mean 1.0, ratio_max 1.5
    logp = torch.zeros(1, 2, dtype=torch.float64, requires_grad=True)
    old = -torch.tensor([[math.log(1.5), math.log(0.5)]], dtype=torch.float64)
    loss, m = policy_loss(logp, torch.ones(1, dtype=torch.float64), torch.ones(1, 2), old_logp=old)
    loss.backward()
    assert loss.item() == pytest.approx(-0.85)
    assert logp.grad.flatten().tolist() == pytest.approx([0.0, -0.25])
    assert m["clip_frac"].item() == 0.5
    assert m["ratio_mean"].item() == pytest.approx(1.0)
    assert m["ratio_max"].item() == pytest.approx(1.5)


def test_hand_computed_dual_clip():
    # A = -1, r = 5, clip_ratio_c = 3: PPO gives max(5, 1.2) = 5, dual clip caps it at 3.
    logp = torch.zeros(1, 1, dtype=torch.float64, requires_grad=True)
    old = -torch.tensor([[math.log(5.0)]], dtype=torch.float64)
    loss, m = policy_loss(logp, -torch.ones(1, dtype=torch.float64), torch.ones(1, 1), old_logp=old,
                          config=PolicyLossConfig(clip_ratio_c=3.0))
    loss.backward()
    assert loss.item() == pytest.approx(3.0) and logp.grad.item() == 0.0 and m["clip_frac"].item() == 1.0


def test_hand_computed_sapo_on_policy():
    # r = 1: sigmoid(0) = 1/2, L = -(4/tau) * A / 2 = -2A/tau; dL/dlogp = -(4/tau) * tau/4 * A = -A
    # (SAPO reduces to the policy gradient on-policy). A = 1 (tau_pos = 1), A = -2 (tau_neg = 1.05).
    logp = torch.zeros(2, 1, dtype=torch.float64, requires_grad=True)
    adv = torch.tensor([1.0, -2.0], dtype=torch.float64)
    loss, _ = policy_loss(logp, adv, torch.ones(2, 1), config=PolicyLossConfig(loss_type="sapo"))
    loss.backward()
    assert loss.item() == pytest.approx((-2.0 + 4.0 / 1.05) / 2)
    assert logp.grad.flatten().tolist() == pytest.approx([-0.5, 1.0])


def test_hand_computed_gspo_sequence_ratio():
    # log r = (0.2, -0.4) -> s = exp(-0.1) for both tokens; A = 1 inside [0.8, 1.2]: L = -s per token,
    # gradient -s per token / 2 (token-mean)
    logp = torch.zeros(1, 2, dtype=torch.float64, requires_grad=True)
    old = torch.tensor([[-0.2, 0.4]], dtype=torch.float64)
    loss, m = policy_loss(logp, torch.ones(1, dtype=torch.float64), torch.ones(1, 2), old_logp=old,
                          config=PolicyLossConfig(loss_type="gspo"))
    loss.backward()
    s = math.exp(-0.1)
    assert loss.item() == pytest.approx(-s)
    assert logp.grad.flatten().tolist() == pytest.approx([-s / 2, -s / 2])
    assert m["ratio_max"].item() == pytest.approx(s)


def test_hand_computed_k3_and_entropy():
    # d = logp - ref = log 2: k3 = 1/2 + log 2 - 1. reinforce with A = 0 leaves beta * k3 - c * H.
    logp = torch.zeros(1, 1, dtype=torch.float64, requires_grad=True)
    ref = -torch.tensor([[math.log(2.0)]], dtype=torch.float64)
    ent = torch.tensor([[0.7]], dtype=torch.float64)
    cfg = PolicyLossConfig(loss_type="reinforce", beta=0.5, entropy_coef=0.1)
    loss, m = policy_loss(logp, torch.zeros(1, dtype=torch.float64), torch.ones(1, 1), ref_logp=ref,
                          entropy=ent, config=cfg)
    k3 = 0.5 + math.log(2.0) - 1
    assert loss.item() == pytest.approx(0.5 * k3 - 0.07)
    assert m["kl_mean"].item() == pytest.approx(k3) and m["entropy_mean"].item() == pytest.approx(0.7)


def test_hand_computed_tis_sequence():
    # old - rollout = (0.5, 0.5) -> sequence weight exp(1) = 2.718 > cap 2 -> truncated to 2;
    # on-policy ppo with A = 1: L = -1 per token, times 2 -> -2
    logp = torch.zeros(1, 2, dtype=torch.float64, requires_grad=True)
    roll = torch.full((1, 2), -0.5, dtype=torch.float64)
    cfg = PolicyLossConfig(is_level="sequence")
    loss, m = policy_loss(logp, torch.ones(1, dtype=torch.float64), torch.ones(1, 2), rollout_logp=roll, config=cfg)
    assert loss.item() == pytest.approx(-2.0) and m["is_weight_mean"].item() == pytest.approx(2.0)
    cfg = PolicyLossConfig(is_level="sequence", is_mode="mask")  # weight outside [0, 2]: dropped
    loss, m = policy_loss(logp, torch.ones(1, dtype=torch.float64), torch.ones(1, 2), rollout_logp=roll, config=cfg)
    assert loss.item() == 0.0 and m["is_weight_mean"].item() == 0.0


# --------------------------------------------------------------------------------------------
# gradcheck
# --------------------------------------------------------------------------------------------
# Only where the surrogate's gradient is the true derivative of its value: the stop-gradients of
# GSPO's sequence ratio and of CISPO's weight make their gradients differ from finite differences by
# design (those are checked against the loop reference above).
@pytest.mark.parametrize("kwargs", [
    dict(),
    dict(delta=1.3, clip_ratio_c=1.4, beta=0.1, use_bias_correction_kl=True, agg="seq-mean-token-mean"),
    dict(loss_type="sapo", entropy_coef=0.1, kl_type="k2", beta=0.2, agg="seq-mean-token-sum"),
    dict(loss_type="reinforce", is_level="token", top_entropy_rho=0.5, entropy_coef=0.03, kl_type="k1", beta=0.1),
    dict(is_level="sequence", is_mode="mask", is_cap=1.5, agg="seq-mean-token-sum-norm", max_completion_length=7),
])
def test_gradcheck(kwargs):
    cfg = PolicyLossConfig(**kwargs)
    x = make_inputs(B=3, T=4, seed=11)
    x["entropy"] = torch.rand(3, 4, dtype=torch.float64, requires_grad=True)  # no ties: the mask is locally constant

    def fn(logp, entropy):
        return policy_loss(logp, x["advantages"], x["mask"], old_logp=x["old_logp"], ref_logp=x["ref_logp"],
                           entropy=entropy, rollout_logp=x["rollout_logp"], config=cfg)[0]

    assert torch.autograd.gradcheck(fn, (x["logp"], x["entropy"]))


# --------------------------------------------------------------------------------------------
# Empty and padded inputs
# --------------------------------------------------------------------------------------------
FULL_CFG = dict(beta=0.1, entropy_coef=0.01, top_entropy_rho=0.5, is_level="token")


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum",
                                 "seq-mean-token-sum-norm"])
@pytest.mark.parametrize("loss_type", ["ppo", "gspo", "cispo", "sapo", "reinforce"])
def test_all_masked_is_zero(agg, loss_type):
    x = make_inputs()
    x["mask"] = torch.zeros_like(x["mask"], dtype=torch.float32)
    cfg = PolicyLossConfig(agg=agg, loss_type=loss_type, **FULL_CFG)
    loss, metrics = policy_loss(x["logp"], x["advantages"], x["mask"], old_logp=x["old_logp"], ref_logp=x["ref_logp"],
                                entropy=x["entropy"], rollout_logp=x["rollout_logp"], config=cfg)
    loss.backward()
    assert loss.item() == 0.0
    assert not x["logp"].grad.any() and not x["entropy"].grad.any()
    assert all(v.item() == 0.0 for v in metrics.values())


@pytest.mark.parametrize("shape", [(0, 5), (3, 0), (0, 0)])
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum",
                                 "seq-mean-token-sum-norm"])
def test_empty_batch(shape, agg):
    logp = torch.zeros(shape, requires_grad=True)
    t = torch.zeros(shape)
    cfg = PolicyLossConfig(agg=agg, **FULL_CFG)
    loss, metrics = policy_loss(logp, torch.zeros(shape[0]), t.bool(), old_logp=t, ref_logp=t, entropy=t,
                                rollout_logp=t, config=cfg)
    loss.backward()
    assert loss.item() == 0.0 and logp.grad.shape == shape
    assert set(metrics) == set(METRICS) | {"is_weight_mean"}
    assert all(v.item() == 0.0 for v in metrics.values())


def test_garbage_in_padding_is_ignored():
    """-inf log-probs and NaN at padded positions change nothing (not the loss, not the gradient)."""
    x = make_inputs(per_token_adv=True)
    cfg = PolicyLossConfig(loss_type="gspo", **FULL_CFG)
    kwargs = lambda d: dict(old_logp=d["old_logp"], ref_logp=d["ref_logp"], entropy=d["entropy"],  # noqa: E731
                            rollout_logp=d["rollout_logp"], config=cfg)
    clean = clone_inputs(x)
    dirty = clone_inputs(x)
    pad = ~x["mask"]
    with torch.no_grad():
        dirty["logp"][pad] = -math.inf
        for k in ("old_logp", "ref_logp", "rollout_logp", "entropy", "advantages"):
            dirty[k][pad] = math.nan
    a, ma = policy_loss(clean["logp"], clean["advantages"], clean["mask"], **kwargs(clean))
    b, mb = policy_loss(dirty["logp"], dirty["advantages"], dirty["mask"], **kwargs(dirty))
    a.backward()
    b.backward()
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(clean["logp"].grad, dirty["logp"].grad)
    torch.testing.assert_close(clean["entropy"].grad, dirty["entropy"].grad)
    for k in ma:
        torch.testing.assert_close(ma[k], mb[k])


def test_float_mask_and_int_mask_match_bool():
    x = make_inputs()
    out = [policy_loss(x["logp"], x["advantages"], m, old_logp=x["old_logp"])[0]
           for m in (x["mask"], x["mask"].float(), x["mask"].long())]
    torch.testing.assert_close(out[0], out[1])
    torch.testing.assert_close(out[0], out[2])


# --------------------------------------------------------------------------------------------
# Top-entropy quantile
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 2, 7, 100, 1001])
@pytest.mark.parametrize("q", [0.0, 0.2, 0.5, 0.63, 0.8, 1.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_local_quantile_equals_torch_quantile(n, q, dtype):
    g = torch.Generator().manual_seed(n)
    ent = (torch.rand(3, n, generator=g) * 3).round(decimals=1).to(dtype)  # ties
    valid = torch.rand(3, n, generator=g) > 0.3
    valid[1, 0] = True
    got = local_entropy_quantile(ent, valid, q)
    want = torch.quantile(ent[valid], q)
    assert got.dtype == dtype
    assert got.item() == want.item()  # bit-identical


def test_top_entropy_keeps_ties_and_rho_one_keeps_all():
    # entropies 0.1, 0.5, 0.5, 0.9; rho = 0.5 -> q = quantile(0.5) = 0.5: keeps 0.5, 0.5, 0.9 (ties kept)
    logp = torch.zeros(1, 4, dtype=torch.float64, requires_grad=True)
    ent = torch.tensor([[0.1, 0.5, 0.5, 0.9]], dtype=torch.float64)
    adv = torch.ones(1, dtype=torch.float64)
    loss, _ = policy_loss(logp, adv, torch.ones(1, 4), entropy=ent, config=PolicyLossConfig(top_entropy_rho=0.5))
    loss.backward()
    assert logp.grad.flatten().tolist() == pytest.approx([0.0, -0.25, -0.25, -0.25])
    assert loss.item() == pytest.approx(-0.75)
    full, _ = policy_loss(logp, adv, torch.ones(1, 4), entropy=ent, config=PolicyLossConfig(top_entropy_rho=1.0))
    assert full.item() == pytest.approx(-1.0)


def test_entropy_quantile_hook():
    """A caller (e.g. distributed) supplies the threshold; the local quantile is not used."""
    x = make_inputs()
    seen = {}

    def fake_global_quantile(entropy, valid, q):
        seen["q"] = q
        return torch.tensor(1.0, dtype=entropy.dtype)

    cfg = PolicyLossConfig(top_entropy_rho=0.3)
    loss, _ = policy_loss_core(x["logp"], x["advantages"], x["mask"], old_logp=None, ref_logp=None,
                                entropy=x["entropy"], rollout_logp=None, config=cfg,
                                entropy_quantile_fn=fake_global_quantile)
    assert seen["q"] == pytest.approx(0.7)
    keep = x["mask"] & (x["entropy"].detach() >= 1.0)
    adv = x["advantages"][:, None].expand_as(keep)
    torch.testing.assert_close(loss, -(adv * keep).sum() / x["mask"].sum())


def test_core_with_precomputed_kl():
    """The fused op passes its own (e.g. exact "full") KL; the core uses it as given."""
    x = make_inputs()
    kl = torch.rand(x["logp"].shape, dtype=torch.float64, requires_grad=True)
    kl_ref = kl.detach().clone().requires_grad_()
    cfg = PolicyLossConfig(kl_type="full", beta=0.2, use_bias_correction_kl=True)
    loss, metrics = policy_loss_core(x["logp"], x["advantages"], x["mask"], old_logp=x["old_logp"], ref_logp=None,
                                      entropy=None, rollout_logp=None, config=cfg, kl=kl)
    logp_ref = x["logp"].detach().clone().requires_grad_()
    ref_loss, ref_metrics = ref_policy_loss(logp_ref, x["advantages"], x["mask"], cfg, old=x["old_logp"],
                                            kl_in=kl_ref)
    torch.testing.assert_close(loss, ref_loss.detach())
    torch.testing.assert_close(metrics["kl_mean"], torch.tensor(ref_metrics["kl_mean"], dtype=torch.float64))
    loss.backward()
    ref_loss.backward()
    torch.testing.assert_close(kl.grad, kl_ref.grad)
    torch.testing.assert_close(x["logp"].grad, logp_ref.grad)


# --------------------------------------------------------------------------------------------
# dtypes, metrics, registry
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_inputs_compute_in_fp32(dtype):
    x = make_inputs(dtype=dtype)
    cfg = PolicyLossConfig(beta=0.1, entropy_coef=0.01)
    loss, metrics = policy_loss(x["logp"], x["advantages"], x["mask"], old_logp=x["old_logp"],
                                ref_logp=x["ref_logp"], entropy=x["entropy"], config=cfg)
    assert loss.dtype == torch.float32 and all(v.dtype == torch.float32 for v in metrics.values())
    loss.backward()
    assert x["logp"].grad.dtype == dtype
    # the same values as fp64 on the same (rounded) inputs
    x64 = {k: v.detach().double() if v.is_floating_point() else v for k, v in x.items()}
    ref, _ = policy_loss(x64["logp"], x64["advantages"], x64["mask"], old_logp=x64["old_logp"],
                         ref_logp=x64["ref_logp"], entropy=x64["entropy"], config=cfg)
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)


def test_metrics_are_detached_tensors():
    x = make_inputs()
    cfg = PolicyLossConfig(beta=0.1, entropy_coef=0.1, is_level="token")
    _, metrics = policy_loss(x["logp"], x["advantages"], x["mask"], old_logp=x["old_logp"], ref_logp=x["ref_logp"],
                             entropy=x["entropy"], rollout_logp=x["rollout_logp"], config=cfg)
    assert set(metrics) == set(METRICS) | {"is_weight_mean"}
    for v in metrics.values():
        assert isinstance(v, torch.Tensor) and v.dim() == 0 and v.grad_fn is None and not v.requires_grad
    _, metrics = policy_loss(x["logp"], x["advantages"], x["mask"])
    assert set(metrics) == set(METRICS)


def test_registry():
    assert set(policy_loss_names()) >= {"ppo", "gspo", "cispo", "sapo", "reinforce"}
    for name in ("ppo", "gspo", "cispo", "sapo", "reinforce"):
        assert get_policy_loss(name).fn.__doc__


def test_register_custom_loss():
    @register_policy_loss("test_linear_ratio")
    def linear_ratio(logp, ratio, advantages, config):
        """-A * r, no clip."""
        return -advantages * ratio, None

    try:
        x = make_inputs()
        loss, metrics = policy_loss(x["logp"], x["advantages"], x["mask"], old_logp=x["old_logp"],
                                    config=PolicyLossConfig(loss_type="test_linear_ratio"))
        r = (x["logp"] - x["old_logp"]).exp()
        adv = x["advantages"][:, None]
        torch.testing.assert_close(loss, -(adv * r * x["mask"]).sum() / x["mask"].sum())
        assert metrics["clip_frac"].item() == 0.0
    finally:
        pyrl.unregister_policy_loss("test_linear_ratio")


# --------------------------------------------------------------------------------------------
# Argument errors
# --------------------------------------------------------------------------------------------
def _args(**over):
    x = make_inputs(B=3, T=4)
    args = dict(logp=x["logp"], advantages=x["advantages"], mask=x["mask"])
    kwargs = {}
    for k, v in over.items():
        if k in args:
            args[k] = v
        else:
            kwargs[k] = v
    return (args["logp"], args["advantages"], args["mask"]), kwargs


@pytest.mark.parametrize("over, exc, match", [
    (dict(config={"loss_type": "ppo"}), TypeError, r"config must be a PolicyLossConfig, got dict"),
    (dict(logp=[[0.0]]), TypeError, r"logp must be a torch.Tensor, got list"),
    (dict(logp=torch.zeros(3, 4, dtype=torch.int64)), TypeError, r"logp must have dtype in"),
    (dict(logp=torch.zeros(12)), ValueError, r"logp must be 2-D, got shape \[12\]"),
    (dict(advantages=torch.zeros(3, 4, 5)), ValueError,
     r"advantages must have shape \[B\] or \[B, T\].*got \[3, 4, 5\]"),
    (dict(advantages=torch.zeros(4)), ValueError, r"advantages must have shape \[B\] or \[B, T\].*got \[4\]"),
    (dict(advantages=torch.zeros(3, dtype=torch.int64)), TypeError, r"advantages must have dtype"),
    (dict(advantages=None), TypeError, r"advantages must be a torch.Tensor"),
    (dict(mask=torch.ones(3, 5)), ValueError, r"mask must have shape \[3, 4\] \(the \[B, T\] of logp\), got \[3, 5\]"),
    (dict(mask=[[1]]), TypeError, r"mask must be a torch.Tensor"),
    (dict(mask=torch.ones(3, 4, dtype=torch.complex64)), TypeError, r"mask must be a bool, integer or float tensor"),
    (dict(old_logp=torch.zeros(3, 5)), ValueError, r"old_logp must have shape \[3, 4\]"),
    (dict(old_logp=torch.zeros(3, 4, dtype=torch.int32)), TypeError, r"old_logp must have dtype"),
    (dict(ref_logp=torch.zeros(4, 3), config=PolicyLossConfig(beta=0.1)), ValueError, r"ref_logp must have shape"),
    (dict(entropy=torch.zeros(3)), ValueError, r"entropy must have shape \[3, 4\]"),
    (dict(rollout_logp="x"), TypeError, r"rollout_logp must be a torch.Tensor"),
    (dict(old_logp=torch.zeros(3, 4, device="meta")), ValueError, r"old_logp is on meta but logp is on cpu"),
    (dict(config=PolicyLossConfig(num_items_in_batch=torch.tensor(3.0, device="meta"))), ValueError,
     r"config.num_items_in_batch is on meta but logp is on cpu"),
    (dict(config=PolicyLossConfig(beta=0.1)), ValueError, r"ref_logp is required when config.beta > 0"),
    (dict(config=PolicyLossConfig(kl_type="full", beta=0.1)), ValueError, r"kl_type='full'.*fused_linear_policy_loss"),
    (dict(config=PolicyLossConfig(entropy_coef=0.1)), ValueError, r"entropy is required when config.entropy_coef"),
    (dict(config=PolicyLossConfig(top_entropy_rho=0.5)), ValueError,
     r"entropy is required when config.top_entropy_rho"),
    (dict(config=PolicyLossConfig(is_level="token")), ValueError, r"rollout_logp is required when config.is_level"),
])
def test_bad_arguments(over, exc, match):
    args, kwargs = _args(**over)
    with pytest.raises(exc, match=match):
        policy_loss(*args, **kwargs)


def test_config_is_not_mutated_and_default_is_shared_safely():
    cfg = PolicyLossConfig()
    x = make_inputs()
    policy_loss(x["logp"], x["advantages"], x["mask"], config=cfg)
    assert cfg == PolicyLossConfig() and dataclasses.is_dataclass(cfg)


def test_quantile_beyond_torch_quantile_limit():
    """torch.quantile refuses more than 2**24 elements; the sort-based quantile does not.
    On 0, 1, ..., n-1 (exact in fp64) the q quantile is q * (n - 1)."""
    n = 2**24 + 3
    ent = torch.arange(n - 1, -1, -1, dtype=torch.float64).view(1, n)  # descending: the sort has work to do
    got = local_entropy_quantile(ent, torch.ones(1, n, dtype=torch.bool), 0.3)
    assert got.item() == pytest.approx(0.3 * (n - 1), rel=1e-15)


def test_mastered_token_mask_drops_confident_positive_tokens():
    """UloRL (docs/formulas.md §5.1): A > 0 tokens with p > tau leave the policy term; float64."""
    logp = torch.log(torch.tensor([[0.995, 0.5, 0.999, 0.2], [0.999, 0.3, 0.9, 0.1]], dtype=torch.float64))
    logp.requires_grad_()
    adv = torch.tensor([1.0, -1.0], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    cfg = pyrl.PolicyLossConfig(loss_type="reinforce", mastered_token_prob=0.99)
    loss, metrics = pyrl.policy_loss(logp, adv, mask, config=cfg)
    keep = torch.tensor([[0, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.float64)  # row 1 has A < 0: all kept
    m = mask.double()
    want = (-adv[:, None] * logp * keep * m).sum() / m.sum()
    torch.testing.assert_close(loss, want, rtol=1e-12, atol=0)
    g, = torch.autograd.grad(loss, logp)
    assert g[0, 0] == 0 and g[0, 2] == 0 and g[0, 1] != 0
    assert float(metrics["mastered_frac"]) == pytest.approx(2 / 7)
    with pytest.raises(ValueError, match="mastered_token_prob"):
        pyrl.PolicyLossConfig(mastered_token_prob=1.0)


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_mastered_token_mask_runs_the_one_pass_plan(backend):
    g = torch.Generator().manual_seed(0)
    B, T, H, V = 2, 5, 8, 11
    hidden, weight = torch.randn(B, T, H, generator=g) * 3, torch.randn(V, H, generator=g)
    ids, mask, adv = torch.randint(0, V, (B, T), generator=g), torch.ones(B, T), torch.tensor([1.0, -0.5])
    ids[0, :3] = (hidden[0, :3] @ weight.T).argmax(-1)  # likely tokens in the positive row
    cfg = pyrl.PolicyLossConfig(mastered_token_prob=0.6, entropy_coef=0.01)
    assert "passes=one" in pyrl.explain("fused_linear_policy_loss", hidden, weight, ids, mask, adv, config=cfg,
                                        backend=backend)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss, metrics = pyrl.fused_linear_policy_loss(h, w, ids, mask, adv, config=cfg, backend=backend)
    loss.backward()
    hd, wd = hidden.double().requires_grad_(), weight.double().requires_grad_()
    z = hd @ wd.T
    logp = z.log_softmax(-1).gather(-1, ids[..., None]).squeeze(-1)
    ent = -(z.softmax(-1) * z.log_softmax(-1)).sum(-1)
    want, want_m = pyrl.policy_loss(logp, adv.double(), mask, entropy=ent, config=cfg)
    want.backward()
    assert 0 < float(want_m["mastered_frac"]) < 1
    torch.testing.assert_close(loss.double(), want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(metrics["mastered_frac"].double(), want_m["mastered_frac"], rtol=1e-6, atol=0)
    torch.testing.assert_close(h.grad.double(), hd.grad, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(w.grad.double(), wd.grad, rtol=1e-3, atol=1e-4)
