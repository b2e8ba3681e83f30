"""Numerics under stress: extreme and degenerate inputs never give NaN or out-of-range results.

For ``logprobs_from_logits``, ``fused_linear_logprobs``, ``policy_loss`` and
``fused_linear_policy_loss`` on every backend (torch, cpp, and triton interpreted on CPU when
available): logits of +-1e4, ``-inf`` entries (a banned-token mask; the sampled token itself at
``-inf``), every token masked, length-1 sequences, vocabularies of 1 and 2, a huge vocabulary
(200k) with 1-2 tokens, bf16/fp16 inputs. Invariants: no NaN anywhere, ``logp <= 0``, entropy in
``[0, log V]`` (+ rounding), finite losses, metrics and gradients. Plus advantages and rewards on
constant groups, groups of one and extreme magnitudes.
"""
import math

import pytest
import torch

import pyrl
from pyrl import advantages as adv_mod
from pyrl import rewards
from conftest import CPP, triton_on_cpu

TRITON = triton_on_cpu()
if TRITON:
    pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

BACKENDS = ["torch"] + (["cpp"] if CPP else []) + (["triton"] if TRITON else [])
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
ENT_TOL = 1e-4


def _skip_unsupported(backend, dtype):
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("the Triton backend refuses float64 (documented)")


def _check_outputs(logp, ent, vocab, y, ignore_index=-100):
    assert not torch.isnan(logp).any(), "NaN log-prob"
    assert not torch.isnan(ent).any(), "NaN entropy"
    assert (logp <= 0).all(), f"log-prob > 0: {logp.max()}"
    assert torch.isfinite(ent).all()
    assert (ent >= 0).all() and (ent <= math.log(vocab) * (1 + ENT_TOL) + ENT_TOL).all(), \
        f"entropy outside [0, log V={math.log(vocab):.4f}]: [{ent.min()}, {ent.max()}]"
    ign = y == ignore_index
    assert (logp[ign] == 0).all() and (ent[ign] == 0).all()


def _check_grads(*tensors):
    for x in tensors:
        if x is not None and x.requires_grad:
            assert x.grad is not None, "missing gradient"
            assert torch.isfinite(x.grad).all(), "non-finite gradient"
            assert x.grad.dtype == x.dtype


def _backward(logp, ent):
    """Backward with upstream gradients of +-3 (an entropy coefficient or a loss weight above 1 is
    what overflowed ``c * (z - mu)`` at -inf logits in the C++ backward). -inf log-probs (a sampled
    token at -inf) carry no gradient: select, never multiply."""
    finite = torch.isfinite(logp)
    sign = 1.0 - 2.0 * (torch.arange(logp.numel()) % 2).reshape(logp.shape)
    (torch.where(finite, logp, 0.0) * 3 * sign).sum().add((ent * -3 * sign).sum()).backward()


# ----------------------------------------------------------------------------------------------
# logits cases: name -> (logits [N, V] float32, targets [N]) before the dtype cast
# ----------------------------------------------------------------------------------------------
def _logits_case(name, g):
    if name == "pm1e4":
        n, v = 6, 50
        z = torch.where(torch.rand(n, v, generator=g) < 0.5, 1e4, -1e4)
        z[0] = 1e4  # a row of ties at +1e4
        y = torch.randint(0, v, (n,), generator=g)
    elif name == "neg_inf":
        n, v = 6, 40
        z = torch.randn(n, v, generator=g) * 3
        y = torch.randint(0, v, (n,), generator=g)
        z[torch.rand(n, v, generator=g) < 0.5] = float("-inf")
        z[1] = float("-inf")  # a row that is -inf everywhere but at its target
        z[torch.arange(n), y] = torch.randn(n, generator=g)
        z[2] = float("-inf")  # a row that is -inf everywhere, its token ignored
        y[2] = -100
        banned = [c for c in range(v) if c not in y.tolist()][:5]
        z[:, banned] = float("-inf")  # tokens banned for every row (a -inf bias in the fused op)
    elif name == "target_neg_inf":  # the sampled token has -inf logit (e.g. a sampler/trainer mismatch)
        n, v = 4, 30
        z = torch.randn(n, v, generator=g)
        y = torch.randint(0, v, (n,), generator=g)
        z[torch.arange(n), y] = float("-inf")
    elif name == "all_masked":
        n, v = 5, 17
        z = torch.randn(n, v, generator=g)
        y = torch.full((n,), -100)
    elif name == "length_1":
        n, v = 1, 33
        z = torch.randn(n, v, generator=g) * 5
        y = torch.randint(0, v, (n,), generator=g)
    elif name == "vocab_2":
        n, v = 7, 2
        z = torch.randn(n, v, generator=g) * 20
        y = torch.randint(0, v, (n,), generator=g)
    elif name == "vocab_1":
        n, v = 3, 1
        z = torch.randn(n, v, generator=g)
        y = torch.zeros(n, dtype=torch.long)
    elif name == "huge_vocab":
        n, v = 2, 200_000
        z = torch.randn(n, v, generator=g) * 4
        y = torch.randint(0, v, (n,), generator=g)
    else:
        raise KeyError(name)
    return z, y


CASES = ["pm1e4", "neg_inf", "target_neg_inf", "all_masked", "length_1", "vocab_2", "vocab_1", "huge_vocab"]


def _case_params():
    for backend in BACKENDS:
        for dtype in DTYPES:
            for case in CASES:
                marks = ()
                if case == "huge_vocab" and (backend == "triton" or dtype in (torch.float16, torch.float64)):
                    continue  # interpreted Triton is too slow for V = 200k; two dtypes are enough
                yield pytest.param(backend, dtype, case, marks=marks, id=f"{backend}-{str(dtype)[6:]}-{case}")


@pytest.mark.parametrize("backend,dtype,case", list(_case_params()))
def test_logprobs_from_logits_stress(backend, dtype, case):
    _skip_unsupported(backend, dtype)
    z, y = _logits_case(case, torch.Generator().manual_seed(0))
    x = z.to(dtype).requires_grad_()
    logp, ent = pyrl.logprobs_from_logits(x, y, return_entropy=True, temperature=0.5, backend=backend)
    _check_outputs(logp, ent, z.shape[1], y)
    if case == "target_neg_inf":
        assert (logp == float("-inf")).all()
    if case == "vocab_1":
        assert (logp == 0).all() and (ent == 0).all()
    _backward(logp, ent)
    _check_grads(x)
    if case == "all_masked":
        assert (x.grad == 0).all()


def _linear_from_logits(z, dtype):
    """hidden [N, H=N] (one-hot rows), weight [V, N], bias [V] whose logits ``h @ W.T + b`` are z:
    row n of hidden picks column n of weight, which holds row n of z. A -inf shared by a whole
    column of z becomes a -inf bias; a per-row -inf (not expressible that way) becomes -1e4 (small enough that
    an fp16 gradient through it stays finite)."""
    n, v = z.shape
    finite = torch.isfinite(z)
    hidden = torch.eye(n)                       # [N, H=N]: row n picks column n of weight
    weight = torch.where(finite, z, 0.0).t().contiguous()  # [V, N]
    # -inf entries that are shared by a whole column become a -inf bias; per-row ones cannot be
    # expressed by a bias, so they become a very negative finite logit
    col_all = (~finite).all(0)
    bias = torch.where(col_all, float("-inf"), 0.0)
    weight = torch.where((~finite & ~col_all).t(), -1e4, weight)
    return hidden.to(dtype), weight.to(dtype), bias.to(dtype)


@pytest.mark.parametrize("backend,dtype,case", list(_case_params()))
def test_fused_linear_logprobs_stress(backend, dtype, case):
    _skip_unsupported(backend, dtype)
    z, y = _logits_case(case, torch.Generator().manual_seed(0))
    hidden, weight, bias = _linear_from_logits(z, dtype)
    h, w, b = (t.clone().requires_grad_() for t in (hidden, weight, bias))
    logp, ent = pyrl.fused_linear_logprobs(h, w, y, bias=b, return_entropy=True, backend=backend)
    _check_outputs(logp, ent, z.shape[1], y)
    _backward(logp, ent)
    _check_grads(h, w, b)
    if case == "all_masked":
        assert (h.grad == 0).all() and (w.grad == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_linear_logprobs_huge_hidden_values(backend, dtype):
    """Logits of +-1e4 reached through the matmul (hidden and weight entries of +-100)."""
    g = torch.Generator().manual_seed(1)
    n, hdim, v = 5, 1, 64
    hidden = torch.where(torch.rand(n, hdim, generator=g) < 0.5, 100.0, -100.0).to(dtype).requires_grad_()
    weight = torch.where(torch.rand(v, hdim, generator=g) < 0.5, 100.0, -100.0).to(dtype).requires_grad_()
    y = torch.randint(0, v, (n,), generator=g)
    logp, ent = pyrl.fused_linear_logprobs(hidden, weight, y, return_entropy=True, temperature=0.3,
                                           backend=backend)
    _check_outputs(logp, ent, v, y)
    _backward(logp, ent)
    _check_grads(hidden, weight)


# ----------------------------------------------------------------------------------------------
# losses
# ----------------------------------------------------------------------------------------------
LOSS_CONFIGS = {
    "grpo": dict(),
    "dapo_k3": dict(eps_high=0.28, beta=0.04),
    "k1_k2": dict(beta=0.1, kl_type="k2", use_bias_correction_kl=True),
    "gspo": dict(loss_type="gspo", eps_low=3e-4, eps_high=4e-4, agg="seq-mean-token-mean"),
    "cispo": dict(loss_type="cispo", eps_low=None, eps_high=4.0),
    "sapo": dict(loss_type="sapo"),
    "reinforce": dict(loss_type="reinforce", agg="seq-mean-token-sum"),
    "dual_clip_delta": dict(clip_ratio_c=3.0, delta=4.0),
    "entropy_8020": dict(entropy_coef=0.01, top_entropy_rho=0.2, agg="seq-mean-token-sum-norm"),
    "tis_seq_mask": dict(is_level="sequence", is_mode="mask", is_min=0.5, temperature=0.7),
    "tis_token": dict(is_level="token", num_items_in_batch=7),
}


def _loss_inputs(case, g, b=3, t=4):
    """(logits z [B, T, V], targets [B, T], mask [B, T]) for a loss stress case."""
    if case == "pm1e4":
        v = 20
        z = torch.where(torch.rand(b, t, v, generator=g) < 0.5, 1e4, -1e4)
    elif case == "neg_inf":
        v = 20
        z = torch.randn(b, t, v, generator=g)
        z[torch.rand(b, t, v, generator=g) < 0.5] = float("-inf")
    elif case == "vocab_2":
        v = 2
        z = torch.randn(b, t, v, generator=g) * 10
    elif case == "length_1":
        v, t = 11, 1
        z = torch.randn(b, t, v, generator=g)
    elif case == "all_masked":
        v = 9
        z = torch.randn(b, t, v, generator=g)
    elif case == "huge_vocab":
        b, t, v = 1, 2, 200_000
        z = torch.randn(b, t, v, generator=g) * 4
    else:
        raise KeyError(case)
    y = torch.randint(0, v, (b, t), generator=g)
    if case == "neg_inf":  # banned tokens are never sampled
        z[torch.arange(b)[:, None], torch.arange(t)[None, :], y] = torch.randn(b, t, generator=g)
    mask = torch.ones(b, t)
    if case == "all_masked":
        mask.zero_()
    elif t > 1:
        mask[0, t // 2:] = 0
    return z, y, mask


LOSS_CASES = ["pm1e4", "neg_inf", "vocab_2", "length_1", "all_masked", "huge_vocab"]


def _side_inputs(logp, mask, g, far=False):
    """old/ref/rollout log-probs around logp; ``far``: 50 nats away (ratio and KL clamps)."""
    shift = 50.0 if far else 0.3
    noise = lambda: shift * torch.randn(logp.shape, generator=g)  # noqa: E731
    return dict(old_logp=(logp + noise()).clamp(max=0), ref_logp=(logp + noise()).clamp(max=0),
                rollout_logp=(logp + noise()).clamp(max=0))


def _check_loss(loss, metrics):
    assert loss.dim() == 0 and torch.isfinite(loss), f"loss {loss}"
    for k, v in metrics.items():
        assert torch.isfinite(v), f"metric {k} = {v}"
    assert 0 <= metrics["clip_frac"] <= 1


@pytest.mark.parametrize("far", [False, True], ids=["near", "far_off_policy"])
@pytest.mark.parametrize("case", LOSS_CASES)
@pytest.mark.parametrize("name", list(LOSS_CONFIGS))
def test_policy_loss_stress(name, case, far):
    cfg = pyrl.PolicyLossConfig(**LOSS_CONFIGS[name])
    g = torch.Generator().manual_seed(2)
    z, y, mask = _loss_inputs(case, g)
    logits = z.clone().requires_grad_()
    logp, ent = pyrl.logprobs_from_logits(logits, y, return_entropy=True, temperature=cfg.temperature)
    side = _side_inputs(logp.detach(), mask, g, far)
    # padded positions hold garbage the loss must never see
    for k in side:
        side[k] = torch.where(mask.bool(), side[k], float("nan"))
    adv = torch.randn(z.shape[0], generator=g) * 5
    loss, metrics = pyrl.policy_loss(logp, adv, mask, entropy=ent, config=cfg, **side)
    _check_loss(loss, metrics)
    loss.backward()
    _check_grads(logits)
    if not mask.any():
        assert loss.item() == 0.0 and (logits.grad == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", LOSS_CASES + ["bf16", "sampled_neg_inf"])
@pytest.mark.parametrize("name", ["grpo", "dapo_k3", "gspo", "cispo", "sapo", "entropy_8020", "tis_seq_mask",
                                  "full_kl"])
def test_fused_linear_policy_loss_stress(backend, case, name):
    if backend == "triton" and case == "huge_vocab":
        pytest.skip("interpreted Triton is too slow for V = 200k")
    cfg_kw = dict(beta=0.05, kl_type="full") if name == "full_kl" else LOSS_CONFIGS[name]
    cfg = pyrl.PolicyLossConfig(**cfg_kw)
    g = torch.Generator().manual_seed(3)
    dtype = torch.bfloat16 if case == "bf16" else torch.float32
    base = "pm1e4" if case == "bf16" else ("neg_inf" if case == "sampled_neg_inf" else case)
    z, y, mask = _loss_inputs(base, g)
    if case == "sampled_neg_inf":  # the sampled token itself at -inf: logp = -inf must not poison the loss
        if name in ("cispo", "full_kl"):
            pytest.skip("-A * logp (cispo) and KL(p || p_ref) are legitimately infinite at logp = -inf")
        z[0, 0, y[0, 0]] = float("-inf")
    b, t, v = z.shape
    hidden, weight, bias = _linear_from_logits(z.reshape(b * t, v), dtype)
    hidden = hidden.reshape(b, t, -1)
    h, w, bb = (x.clone().requires_grad_() for x in (hidden, weight, bias))
    with torch.no_grad():
        logp0 = pyrl.logprobs_from_logits(z.reshape(b * t, v), y.reshape(-1), temperature=cfg.temperature)
    side = _side_inputs(torch.where(torch.isfinite(logp0), logp0, -30.0).reshape(b, t), mask, g)
    kw = dict(old_logp=side["old_logp"], rollout_logp=side["rollout_logp"])
    if name == "full_kl":
        kw.update(ref_hidden=hidden.detach(), ref_weight=weight.detach().flip(0), ref_bias=bias.detach().flip(0))
    elif cfg.effective_kl_type is not None:
        kw.update(ref_logp=side["ref_logp"])
    adv = torch.randn(b, generator=g) * 5
    loss, metrics = pyrl.fused_linear_policy_loss(h, w, y, mask, adv, bias=bb, config=cfg, backend=backend, **kw)
    _check_loss(loss, metrics)
    loss.backward()
    _check_grads(h, w, bb)
    if not mask.any():
        assert loss.item() == 0.0 and (h.grad == 0).all() and (w.grad == 0).all()


# ----------------------------------------------------------------------------------------------
# advantages and rewards
# ----------------------------------------------------------------------------------------------
GROUP_RELATIVE = ["grpo", "rloo", "opo", "reinforce_pp_baseline", "grpo_passk", "gpg", "drpo"]


def _adv_options(name, rewards_, mask):
    B, T = mask.shape
    return {
        "remax": dict(greedy_rewards=rewards_.flip(0)),
        "opo": dict(lengths=torch.zeros(B)),
        "drpo": dict(lengths=torch.arange(B).float()),
        "reinforce_pp": dict(mask=mask, kl=torch.randn(B, T), kl_coef=0.1),
        "reinforce_pp_baseline": dict(mask=mask),
        "gae": dict(values=torch.randn(B, T), mask=mask),
        "canon": dict(metric=torch.arange(B).float()),
    }.get(name, {})


REWARD_CASES = {
    "constant": lambda B: torch.full((B,), 0.3),
    "constant_one": lambda B: torch.ones(B),
    "constant_large": lambda B: torch.full((B,), 1e30),
    "tiny_spread": lambda B: 1.0 + 1e-7 * (torch.arange(B) % 2),
    "huge_spread": lambda B: 1e37 * torch.tensor([1.0, -1.0]).repeat(B // 2),
    "f64_huge": lambda B: 1e300 * torch.tensor([1.0, -1.0], dtype=torch.float64).repeat(B // 2),
}


@pytest.mark.parametrize("group_size", [1, 4])
@pytest.mark.parametrize("case", list(REWARD_CASES))
@pytest.mark.parametrize("name", adv_mod.names())
def test_advantages_stress(name, case, group_size):
    B, T = 8, 5
    R = REWARD_CASES[case](B)
    mask = torch.ones(B, T)
    mask[0, 2:] = 0
    mask[1] = 0  # an empty completion
    out = adv_mod.compute(name, R, group_size=group_size, **_adv_options(name, R, mask))
    outs = out if isinstance(out, tuple) else (out,)
    for o in outs:
        assert torch.isfinite(o).all(), f"{name}/{case}: {o}"
    constant = case.startswith("constant")
    if (constant or group_size == 1) and name in GROUP_RELATIVE:
        assert (outs[0] == 0).all(), f"{name}: constant group / group of one must give exactly 0, got {outs[0]}"
    if constant and name == "reinforce_pp_baseline":
        assert (outs[0] == 0).all()


@pytest.mark.parametrize("value", [0.3, 7.3, 1e10, 1e30])
def test_reinforce_pp_constant_returns_whiten_to_zero(value):
    """Whitening identical returns gives exactly 0 (not rounding noise blown up to O(1))."""
    B, T = 8, 50
    mask = (torch.rand(B, T, generator=torch.Generator().manual_seed(0)) < 0.8).float()
    mask[:, -1] = 1
    out = adv_mod.compute("reinforce_pp", torch.full((B,), value), group_size=1, mask=mask)
    assert (out == 0).all(), out.abs().max()


def test_aggregate_rewards_constant_columns():
    r = torch.stack([torch.ones(8), torch.full((8,), 2.0)], dim=1)
    for mode in ("sum_then_normalize", "normalize_then_sum"):
        out = adv_mod.aggregate_rewards(r, mode=mode, group_size=4)
        assert torch.isfinite(out).all() and (out == 0).all()


def test_reward_shaping_degenerate_inputs():
    B = 8
    const = torch.full((B,), 0.5)
    keep = rewards.filter_zero_variance_groups(const, 4)
    assert not keep.any() and rewards.zero_variance_group_rate(const, 4) == 1.0
    assert rewards.filter_zero_variance_groups(torch.tensor([1.0]), 1).tolist() == [False]
    lengths = torch.zeros(B, dtype=torch.long)
    for out in (rewards.dapo_overlong_penalty(lengths, 16, 4),
                rewards.dapo_overlong_penalty(torch.full((B,), 10**9), 16, 16),
                rewards.dler_truncation(const, lengths, 1),
                rewards.grpo_lambda_length_penalty(torch.ones(B), lengths, 4),
                rewards.grpo_lambda_length_penalty(torch.zeros(B), torch.full((B,), 7), 4, top_fraction=1.0),
                rewards.cosine_length_reward(torch.ones(B), lengths, 1),
                rewards.cosine_length_reward(torch.zeros(B), torch.full((B,), 10**9), 5, exceed=-2.0),
                rewards.pass_at_k(torch.tensor([1, 5, 5]), torch.tensor([0, 0, 5]), 1)):
        assert torch.isfinite(out).all()
    hapo = rewards.HistoryAwareLengthReward()
    ids = torch.arange(B) // 4
    for _ in range(2):
        out = hapo(ids, lengths, torch.ones(B))
        assert torch.isfinite(out).all()
    sampler = rewards.DynamicSampler(lambda: (torch.arange(B), const), group_size=4, target_groups=1, max_rounds=3)
    with pytest.raises(RuntimeError, match="non-constant rewards"):
        sampler.sample()
    sampler = rewards.DynamicSampler(lambda: (torch.arange(B), const), group_size=4, target_groups=1, max_rounds=2,
                                     on_shortfall="return")
    got = sampler.sample()
    assert got.num_groups == 0 and not got.complete and got.batch is None
