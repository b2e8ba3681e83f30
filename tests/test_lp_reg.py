"""Lp-Reg (docs/formulas.md §4.2): the fused op's walk over the policy head against a float64 oracle
that holds the full logits, on every backend's plan, fp32 and bf16, with a length-1 batch and an
all-masked row; the trainer selects it by name."""
import math

import pytest
import torch

import pyrl
from _ref import assert_fused_matches_float64, fused_with_grads
from conftest import CPU_BACKENDS, triton_on_cpu

TRITON = triton_on_cpu()
ALL_BACKENDS = CPU_BACKENDS + [pytest.param("triton", marks=pytest.mark.skipif(not TRITON, reason="no triton"))]
H = 16


def lp_reg_oracle(hidden, weight, targets, mask, adv, old, cfg):
    """The PPO loss of ``cfg`` plus ``coef * KL(proxy || p)`` on the selected tokens, token-mean,
    from float64 logits of the whole batch (``-log Z`` with the filter held constant has the
    gradient ``p - p_proxy``)."""
    z = (hidden.double() @ weight.double().T) / cfg.temperature
    lp = z.log_softmax(-1)
    valid = mask.bool()
    logp = lp.gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1)
    keep = (lp >= lp.amax(-1, keepdim=True) + math.log(cfg.lp_reg_min_p)).detach()
    kl = -torch.log((lp.exp() * keep).sum(-1))
    kept_y = keep.gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1)
    B, T = mask.shape
    cand = [(float(logp[b, t].detach()), b * T + t) for b in range(B) for t in range(T) if valid[b, t] and adv[b] < 0]
    k = max(1, math.floor(len(cand) * cfg.lp_reg_rho))
    sel = torch.zeros(B, T, dtype=torch.bool)
    for _, i in sorted(cand)[:k]:
        sel[i // T, i % T] = bool(kept_y[i // T, i % T])
    plain = pyrl.PolicyLossConfig(eps_low=cfg.eps_low, eps_high=cfg.eps_high)
    base, _ = pyrl.policy_loss(torch.where(valid, logp, 0.0), adv.double(), mask, old_logp=old, config=plain)
    n = mask.sum().clamp(min=1)
    return base + cfg.lp_reg_coef * torch.where(sel, kl, 0.0).sum() / n, sel


SHAPES = {"batch": (3, 6, 41), "one-token": (1, 1, 41), "all-masked-row": (3, 4, 41)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("shape", list(SHAPES))
def test_fused_lp_reg_matches_float64_on_every_backend(shape, backend, dtype):
    b, t, v = SHAPES[shape]
    g = torch.Generator().manual_seed(11)
    hidden = (2 * torch.randn(b, t, H, generator=g)).to(dtype)
    weight = (torch.randn(v, H, generator=g) / math.sqrt(H)).to(dtype)
    targets = torch.randint(0, v, (b, t), generator=g)
    mask = torch.ones(b, t)
    if shape == "all-masked-row":
        mask[1] = 0
    adv = torch.tensor([-1.0, 0.5, -0.7][:b])
    cfg = pyrl.PolicyLossConfig(lp_reg_min_p=0.004, lp_reg_coef=2.0, lp_reg_rho=0.5)
    hd, wd = hidden.double().requires_grad_(), weight.double().requires_grad_()
    with torch.no_grad():
        z = hd @ wd.T
        old = z.log_softmax(-1).gather(-1, targets[..., None]).squeeze(-1) + 0.1 * torch.randn(b, t, generator=g,
                                                                                              dtype=torch.float64)
    want, sel = lp_reg_oracle(hd, wd, targets, mask, adv, old, cfg)
    want.backward()
    got, metrics, dh, dw = fused_with_grads(hidden, weight, targets, mask, adv, old_logp=old.float(), config=cfg,
                                            backend=backend, chunk_bytes=2 * v * 4)
    assert_fused_matches_float64(got, metrics, want, ((dh, hd.grad), (dw, wd.grad)), dtype)
    if dtype == torch.float32:
        assert float(metrics["lp_reg_frac"]) == pytest.approx(float(sel.sum() / mask.sum().clamp(min=1)))
    if shape == "batch":
        assert sel.any(), "the case must regularise some token"
    if shape == "all-masked-row":
        assert (dh[1] == 0).all()


def test_lp_reg_needs_the_full_distribution_and_plans_two_passes():
    cfg = pyrl.PolicyLossConfig(lp_reg_min_p=0.1)
    with pytest.raises(ValueError, match="lp_reg_min_p .*use fused_linear_policy_loss"):
        pyrl.policy_loss(torch.zeros(1, 2), torch.ones(1), torch.ones(1, 2), config=cfg)
    hidden, weight = torch.randn(2, 3, H), torch.randn(37, H)
    text = pyrl.explain("fused_linear_policy_loss", hidden, weight, torch.randint(0, 37, (2, 3)), torch.ones(2, 3),
                        -torch.ones(2), config=cfg, backend="cpp")
    assert "passes=two" in text and "Lp-Reg: a walk over the policy head" in text
    for bad in ({"lp_reg_min_p": 1.0}, {"lp_reg_min_p": 0.1, "lp_reg_rho": 0.0}, {"lp_reg_coef": -1.0}):
        with pytest.raises(ValueError, match=next(iter(bad)) if len(bad) == 1 else "lp_reg_rho"):
            pyrl.PolicyLossConfig(**bad)


def test_proxy_rows_keep_at_least_the_top_token_and_give_zero_kl_without_filtering():
    from pyrl.ops.fused_policy_loss import proxy_kl_rows_bwd, proxy_kl_rows_fwd
    z = torch.tensor([[3.0, 0.0, -2.0, -9.0], [1.0, 1.0, 1.0, 1.0]], dtype=torch.float64)
    kl, kept = proxy_kl_rows_fwd(z, torch.tensor([3, 2]), 0.04, 1.0)
    p = z[0].softmax(-1)
    assert kept.tolist() == [False, True]
    torch.testing.assert_close(kl, torch.stack([-torch.log(p[:2].sum()), torch.zeros((), dtype=torch.float64)]),
                               rtol=1e-14, atol=1e-15)
    dz = proxy_kl_rows_bwd(z, torch.ones(2, dtype=torch.float64), 0.04, 1.0)
    assert dz[1].abs().max() == 0 and abs(float(dz[0].sum())) < 1e-15  # a softmax gradient sums to 0


def test_lp_reg_by_name_from_the_trainer_config():
    pytest.importorskip("transformers")
    import json

    from pyrl.train import apply_overrides, loop
    from pyrl.train.config import TrainConfig, validate
    loss = {"loss_type": "ppo", "lp_reg_min_p": 0.02, "lp_reg_coef": 1.0, "lp_reg_rho": 0.01}
    cfg = apply_overrides(TrainConfig(), [f"algo.loss={json.dumps(loss)}"])
    validate(cfg)
    assert pyrl.PolicyLossConfig(**loop.loss_options(cfg)).lp_reg_min_p == 0.02
