"""fused_linear_policy_loss against a float64 full-logits computation fed to the per-token loss."""
import math

import pytest
import torch

import pyrl
from _ref import linear_logprobs_ref
from conftest import CPU_BACKENDS

B, T, H, V = 3, 5, 16, 53

CONFIGS = {
    "grpo": dict(),
    "dapo_k3": dict(eps_high=0.28, beta=0.05, kl_type="k3"),
    "gspo_seq": dict(loss_type="gspo", agg="seq-mean-token-mean"),
    "cispo": dict(loss_type="cispo", eps_low=None, eps_high=2.0),
    "sapo": dict(loss_type="sapo"),
    "entropy": dict(entropy_coef=0.01, top_entropy_rho=0.4, agg="seq-mean-token-sum"),
    "full_kl": dict(beta=0.1, kl_type="full", agg="seq-mean-token-sum-norm", max_completion_length=8),
    "tis": dict(is_level="token", is_cap=1.5, temperature=0.8),
    "dual_clip": dict(clip_ratio_c=3.0, delta=1.5),
}


def _batch(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g).to(dtype)
    weight = (torch.randn(V, H, generator=g) / math.sqrt(H)).to(dtype)
    bias = torch.randn(V, generator=g).to(dtype)
    targets = torch.randint(0, V, (B, T), generator=g)
    mask = torch.ones(B, T)
    mask[0, 3:] = 0
    mask[2, 1:] = 0
    targets[mask == 0] = 10_000  # padding may hold any id, even out of range
    adv = torch.randn(B, generator=g)
    noise = lambda: 0.3 * torch.randn(B, T, generator=g)  # noqa: E731
    return hidden, weight, bias, targets, mask, adv, noise


def _full_kl64(hd, wd, bd, rh, rw, targets_valid, temperature):
    zp = (hd @ wd.t() + bd) / temperature
    zq = (rh.double() @ rw.double().t() + bd.detach()) / temperature  # the reference side is constant
    lp, lq = zp.log_softmax(-1), zq.log_softmax(-1)
    return (lp.exp() * (lp - lq)).sum(-1) * targets_valid


@pytest.mark.parametrize("passes", ["auto", "two"])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("name", list(CONFIGS))
def test_matches_float64_reference(backend, name, passes, monkeypatch):
    """Every plan a call can take (one pass where the loss is token-separable, two passes always)
    against the float64 full-logits oracle."""
    if passes == "two":
        monkeypatch.setenv("PYRL_PASSES", "two")
    cfg = pyrl.PolicyLossConfig(**CONFIGS[name])
    hidden, weight, bias, targets, mask, adv, noise = _batch()
    valid = mask.bool()
    safe_t = torch.where(valid, targets, -100)
    with torch.no_grad():
        base, _ = linear_logprobs_ref(hidden, weight, safe_t, bias, cfg.temperature)
    old_logp = (base + noise()).float()
    ref_logp = (base + noise()).float()
    rollout_logp = (base + noise()).float()
    ref_hidden = hidden + 0.2 * torch.randn(B, T, H)
    kw = dict(old_logp=old_logp, ref_logp=ref_logp, rollout_logp=rollout_logp)
    if cfg.kl_type == "full":
        kw.update(ref_hidden=ref_hidden, ref_weight=weight, ref_bias=bias)

    h, w, b = (x.clone().requires_grad_() for x in (hidden, weight, bias))
    loss, metrics = pyrl.fused_linear_policy_loss(h, w, targets, mask, adv, bias=b, config=cfg, backend=backend,
                                                  chunk_bytes=4 * V * 4, **kw)
    loss.backward()

    hd, wd, bd = (x.double().clone().requires_grad_() for x in (hidden, weight, bias))
    logp, ent = linear_logprobs_ref(hd, wd, safe_t, bd, cfg.temperature)
    kl = None
    if cfg.kl_type == "full":
        kl = _full_kl64(hd, wd, bd, ref_hidden, weight, valid.double(), cfg.temperature)
    from pyrl.ops.policy_loss import policy_loss_core

    rloss, rmetrics = policy_loss_core(logp, adv.double(), mask, old_logp=old_logp.double(),
                                        ref_logp=ref_logp.double(), entropy=ent,
                                        rollout_logp=rollout_logp.double(), config=cfg, kl=kl)
    rloss.backward()
    torch.testing.assert_close(loss.double(), rloss, atol=1e-5, rtol=1e-4)
    for k, v in rmetrics.items():
        torch.testing.assert_close(metrics[k].double(), v, atol=1e-4, rtol=1e-4, msg=k)
    for got, want in ((h.grad, hd.grad), (w.grad, wd.grad), (b.grad, bd.grad)):
        scale = want.abs().max().clamp(min=1e-3)
        torch.testing.assert_close(got.double() / scale, want / scale, atol=2e-4, rtol=0)
    assert (h.grad[~valid] == 0).all(), "padding must get no gradient"


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_ref_model_inputs_give_the_same_loss_as_ref_logp(backend):
    hidden, weight, _, targets, mask, adv, _ = _batch()
    ref_hidden = hidden + 0.1
    cfg = pyrl.PolicyLossConfig(beta=0.2, kl_type="k3")
    safe_t = torch.where(mask.bool(), targets, -100)
    ref_logp = pyrl.fused_linear_logprobs(ref_hidden, weight, safe_t, backend=backend)
    a, _ = pyrl.fused_linear_policy_loss(hidden, weight, targets, mask, adv, ref_logp=ref_logp, config=cfg,
                                         backend=backend)
    b, _ = pyrl.fused_linear_policy_loss(hidden, weight, targets, mask, adv, ref_hidden=ref_hidden,
                                         ref_weight=weight, config=cfg, backend=backend)
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"])
def test_all_masked_is_zero_and_finite(backend, agg):
    hidden, weight, _, targets, _, adv, _ = _batch()
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    cfg = pyrl.PolicyLossConfig(agg=agg, entropy_coef=0.1, top_entropy_rho=0.5)
    loss, metrics = pyrl.fused_linear_policy_loss(h, w, targets, torch.zeros(B, T), adv, config=cfg, backend=backend)
    loss.backward()
    assert loss.item() == 0.0
    assert all(torch.isfinite(v) for v in metrics.values())
    assert (h.grad == 0).all() and (w.grad == 0).all()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_bf16_inputs_give_fp32_loss_and_bf16_grads(backend):
    hidden, weight, _, targets, mask, adv, _ = _batch(torch.bfloat16)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss, _ = pyrl.fused_linear_policy_loss(h, w, targets, mask, adv, backend=backend)
    loss.backward()
    assert loss.dtype == torch.float32 and h.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.bfloat16
    hf, wf = hidden.float().requires_grad_(), weight.float().requires_grad_()
    lf, _ = pyrl.fused_linear_policy_loss(hf, wf, targets, mask, adv, backend="torch")
    lf.backward()
    torch.testing.assert_close(loss, lf, atol=1e-5, rtol=1e-4)  # same rounded inputs, fp32 math
    torch.testing.assert_close(w.grad.float(), wf.grad, atol=1e-2, rtol=1e-2)


def test_bad_input_errors():
    hidden, weight, _, targets, mask, adv, _ = _batch()
    with pytest.raises(ValueError, match=r"hidden must have shape \[B, T, H\]"):
        pyrl.fused_linear_policy_loss(hidden[0], weight, targets[0], mask[0], adv)
    with pytest.raises(ValueError, match=r"targets must have shape \[3, 5\]"):
        pyrl.fused_linear_policy_loss(hidden, weight, targets[:, :2], mask, adv)
    with pytest.raises(ValueError, match=r"mask must have shape \[3, 5\]"):
        pyrl.fused_linear_policy_loss(hidden, weight, targets, mask[:, :2], adv)
    with pytest.raises(ValueError, match=r"advantages must have shape \[B\] or \[B, T\]"):
        pyrl.fused_linear_policy_loss(hidden, weight, targets, mask, adv[:2])
    with pytest.raises(ValueError, match="ref_logp is required when config.beta > 0"):
        pyrl.fused_linear_policy_loss(hidden, weight, targets, mask, adv, config=pyrl.PolicyLossConfig(beta=0.1))
    with pytest.raises(ValueError, match="kl_type='full' needs ref_hidden"):
        pyrl.fused_linear_policy_loss(hidden, weight, targets, mask, adv,
                                      config=pyrl.PolicyLossConfig(beta=0.1, kl_type="full"))
    with pytest.raises(TypeError, match="config must be a pyrl.PolicyLossConfig"):
        pyrl.fused_linear_policy_loss(hidden, weight, targets, mask, adv, config={"beta": 0.1})
    bad = targets.clone()
    bad[1, 0] = V  # a VALID position with an out-of-range id
    with pytest.raises(ValueError, match=r"ids in \[0, 53\)"):
        pyrl.fused_linear_policy_loss(hidden, weight, bad, mask, adv)


@pytest.mark.parametrize("agg,extra", [
    ("token-mean", {}), ("token-mean", {"num_items_in_batch": 40}), ("seq-mean-token-mean", {}),
    ("seq-mean-token-sum", {}), ("seq-mean-token-sum-norm", {"max_completion_length": 9}),
])
def test_agg_weights_reproduce_every_aggregation(agg, extra):
    from pyrl.ops.policy_loss import agg_weights, aggregate

    cfg = pyrl.PolicyLossConfig(agg=agg, **extra)
    m = (torch.rand(4, 6, dtype=torch.float64) > 0.3).double()
    m[1] = 0  # an empty sequence
    x = torch.randn(4, 6, dtype=torch.float64) * m
    torch.testing.assert_close((x * agg_weights(m, cfg)).sum(), aggregate(x, m, cfg), rtol=1e-12, atol=1e-12)
    # ... and both are the formula of docs/formulas.md §6
    want = {"token-mean": x.sum() / extra.get("num_items_in_batch", m.sum()),
            "seq-mean-token-mean": (x.sum(-1) / m.sum(-1).clamp(min=1)).mean(),
            "seq-mean-token-sum": x.sum(-1).mean(),
            "seq-mean-token-sum-norm": x.sum() / (4 * extra.get("max_completion_length", 6))}[agg]
    torch.testing.assert_close(aggregate(x, m, cfg), want, rtol=1e-12, atol=1e-12)


@pytest.mark.skipif(not pyrl.backends()["cpp"]["available"], reason="pyrl._C not built")
@pytest.mark.parametrize("cfg", [
    dict(), dict(agg="seq-mean-token-mean", beta=0.1, kl_type="k2", entropy_coef=0.05),
    dict(loss_type="cispo", eps_low=None, eps_high=1.0, agg="seq-mean-token-sum"),
    dict(is_level="token", is_mode="mask", is_min=0.5, is_cap=1.5, num_items_in_batch=11),
    dict(loss_type="reinforce", agg="seq-mean-token-sum-norm", max_completion_length=7, use_bias_correction_kl=True,
         beta=0.3),
], ids=["grpo", "k2-entropy", "cispo", "mis-token", "reinforce-norm"])
def test_one_pass_cpp_plan_matches_two_pass_reference(cfg, monkeypatch):
    """backend='cpp' takes the one-pass plan for these token-separable configs (3 GEMMs, gradients
    formed in forward); the torch reference is forced to two passes (PYRL_PASSES=two). Both must
    agree, chunk by chunk."""
    config = pyrl.PolicyLossConfig(**cfg)
    hidden, weight, bias, targets, mask, adv, noise = _batch()
    safe_t = torch.where(mask.bool(), targets, -100)
    base = pyrl.fused_linear_logprobs(hidden, weight, safe_t, bias=bias, temperature=config.temperature).detach()
    kw = dict(old_logp=base + noise(), ref_logp=base + noise(), rollout_logp=base + noise(), bias=None)
    results = []
    for backend in ("torch", "cpp"):
        if backend == "torch":
            monkeypatch.setenv("PYRL_PASSES", "two")
        else:  # the default plan of cpp for these configs
            monkeypatch.delenv("PYRL_PASSES")
        h, w, b = (x.clone().requires_grad_() for x in (hidden, weight, bias))
        kw["bias"] = b
        plan = pyrl.explain("fused_linear_policy_loss", h, w, targets, mask, adv, config=config, backend=backend, **kw)
        assert ("passes=one" if backend == "cpp" else "passes=two") in plan, plan
        loss, metrics = pyrl.fused_linear_policy_loss(h, w, targets, mask, adv, config=config, backend=backend,
                                                      chunk_bytes=3 * V * 4, **kw)
        (2.5 * loss).backward()  # a non-unit upstream gradient must scale the stored gradients
        results.append((loss, metrics, h.grad, w.grad, b.grad))
    (l0, m0, *g0), (l1, m1, *g1) = results
    torch.testing.assert_close(l1, l0, atol=1e-6, rtol=1e-5)
    assert m0.keys() == m1.keys()
    for k in m0:
        torch.testing.assert_close(m1[k], m0[k], atol=1e-6, rtol=1e-5, msg=k)
    for a, b in zip(g1, g0):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


@pytest.mark.skipif(not pyrl.backends()["cpp"]["available"], reason="pyrl._C not built")
def test_one_pass_without_grad_and_with_frozen_head():
    hidden, weight, _, targets, mask, adv, _ = _batch()
    with torch.no_grad():
        a, _ = pyrl.fused_linear_policy_loss(hidden, weight, targets, mask, adv, backend="cpp")
    b, _ = pyrl.fused_linear_policy_loss(hidden, weight, targets, mask, adv, backend="torch")
    torch.testing.assert_close(a, b)
    h = hidden.clone().requires_grad_()  # only hidden needs a gradient (frozen LM head, e.g. LoRA)
    loss, _ = pyrl.fused_linear_policy_loss(h, weight, targets, mask, adv, backend="cpp")
    loss.backward()
    h2 = hidden.clone().requires_grad_()
    pyrl.fused_linear_policy_loss(h2, weight, targets, mask, adv, backend="torch")[0].backward()
    torch.testing.assert_close(h.grad, h2.grad, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_entropy_quantile_fn_sets_the_threshold(backend):
    # The hook decides the top-entropy threshold (e.g. one quantile over every data-parallel rank):
    # a threshold of -inf keeps every token, which is the loss with no entropy mask.
    hidden, weight, _, targets, mask, adv, noise = _batch()
    old = (noise() - 3).float()
    seen = {}

    def keep_all(entropy, valid, q):
        seen.update(shape=tuple(entropy.shape), valid=valid.dtype, q=q)
        return torch.tensor(float("-inf"))

    masked = pyrl.PolicyLossConfig(top_entropy_rho=0.3)
    a, _ = pyrl.fused_linear_policy_loss(hidden, weight, targets, mask, adv, old_logp=old, config=masked,
                                         backend=backend, entropy_quantile_fn=keep_all)
    b, _ = pyrl.fused_linear_policy_loss(hidden, weight, targets, mask, adv, old_logp=old,
                                         config=pyrl.PolicyLossConfig(), backend=backend)
    c, _ = pyrl.fused_linear_policy_loss(hidden, weight, targets, mask, adv, old_logp=old, config=masked,
                                         backend=backend)
    assert seen == dict(shape=(B, T), valid=torch.bool, q=pytest.approx(0.7))
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, c)  # the default (local quantile) masks some tokens
    with pytest.raises(TypeError, match="entropy_quantile_fn must be callable"):
        pyrl.fused_linear_policy_loss(hidden, weight, targets, mask, adv, config=masked, backend=backend,
                                      entropy_quantile_fn=0.5)
