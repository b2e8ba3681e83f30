"""The group-level sequence objectives, PACS and DisCO (docs/formulas.md §3.11, §3.12): pyrl's
per-token losses against the papers' objectives written out per group in float64, values and
gradients, with padding, an all-masked row, groups of one and groups without a negative. The
fused op runs them through test_losses_verl_extra's every-backend harness (its CASES)."""
import math

import pytest
import torch

import pyrl

G, B, T = 4, 8, 5


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    logp = (-torch.rand(B, T, generator=g, dtype=torch.float64) * 3).requires_grad_()
    old = logp.detach() + 0.2 * torch.randn(B, T, generator=g, dtype=torch.float64)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, 3:] = False
    mask[5] = False  # an all-masked row
    return logp, old, mask


def _seq_mean(x, m):
    return (x * m).sum(-1) / m.sum(-1).clamp(min=1)


def pacs_oracle(logp, old, mask, reward, beta, group):
    """PACS per completion: BCE of sigmoid(RLOO-centred beta * sum log-ratio) against the reward."""
    m = mask.double()
    rhat = beta * ((logp - old) * m).sum(-1)
    losses = []
    for q in range(0, logp.shape[0], group):
        rows = rhat[q:q + group]
        for i in range(group):
            others = [rows[j] for j in range(group) if j != i]
            p = torch.sigmoid(rows[i] - (sum(others) / len(others) if others else 0.0))
            y = float(reward[q + i])
            losses.append(-(y * torch.log(p) + (1 - y) * torch.log(1 - p)))
    return torch.stack(losses)


def disco_oracle(logp, old, mask, correct, group, *, score, tau, delta, beta):
    """DisCO: -mean over the groups of J_q, plus the squared-hinge KL penalty over the batch."""
    m = mask.double()
    s = _seq_mean((logp - old).exp() if score == "l_ratio" else logp, m)
    js = []
    for q in range(0, logp.shape[0], group):
        rows = [q + i for i in range(group) if mask[q + i].any()]  # a row without tokens has no label
        pos = [s[i] for i in rows if correct[i] > 0]
        neg = [s[i] for i in rows if correct[i] < 0]
        if not pos or not neg:
            js.append(torch.zeros((), dtype=torch.float64))
            continue
        if tau is None:
            neg_term = sum(neg) / len(neg)
        else:
            neg_term = tau * torch.log(sum(torch.exp(x / tau) for x in neg) / len(neg))
        js.append(sum(pos) / len(pos) - neg_term)
    kl = ((old - logp) * m).sum() / m.sum()
    return -torch.stack(js).mean() + beta * torch.clamp(kl - delta, min=0) ** 2


def _check(loss, want, logp):
    torch.testing.assert_close(loss, want, rtol=1e-12, atol=1e-14)
    g1, = torch.autograd.grad(loss, logp, retain_graph=True)
    g2, = torch.autograd.grad(want, logp)
    assert torch.isfinite(g1).all()
    torch.testing.assert_close(g1, g2, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("group", [G, 1, None])
def test_pacs_is_bce_on_the_rloo_centred_log_ratio(group):
    logp, old, mask = _batch()
    reward = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0, 0.0], dtype=torch.float64)
    cfg = pyrl.PolicyLossConfig(loss_type="pacs", group_size=group, pacs_beta=0.7, agg="seq-mean-token-mean")
    loss, metrics = pyrl.policy_loss(logp, reward, mask, old_logp=old, config=cfg)
    per_row = pacs_oracle(logp, old, mask, reward, 0.7, B if group is None else group)
    # seq-mean-token-mean: the mean over the B rows of L_b, which an all-masked row places on no token
    _check(loss, (per_row * mask.any(-1)).sum() / B, logp)
    assert float(metrics["clip_frac"]) == 0


def test_pacs_on_policy_gradient_is_the_rloo_policy_gradient():
    """At ratio 1 (psi = 0) d L_b / d logp[b,t] = beta * (sigmoid(0) - y_b) minus the RLOO share of
    the group's others: PACS recovers a centred REINFORCE gradient."""
    logp = torch.full((2, 3), -1.0, dtype=torch.float64, requires_grad=True)
    reward = torch.tensor([1.0, 0.0], dtype=torch.float64)
    cfg = pyrl.PolicyLossConfig(loss_type="pacs", group_size=2, agg="seq-mean-token-mean")
    loss, _ = pyrl.policy_loss(logp, reward, torch.ones(2, 3), config=cfg)
    g, = torch.autograd.grad(loss, logp)
    # d psi_0 / d logp_0 = 1, d psi_1 / d logp_0 = -1; L_b on each of its tokens, the mean over 2 rows
    e0 = (0.5 - 1.0) - (0.5 - 0.0)
    torch.testing.assert_close(g, torch.tensor([[e0] * 3, [-e0] * 3], dtype=torch.float64) / 2, rtol=1e-14,
                               atol=0)


@pytest.mark.parametrize("score", ["l_ratio", "log_l"])
@pytest.mark.parametrize("tau", [None, 10.0, 0.5])
def test_disco_matches_its_objective(score, tau):
    logp, old, mask = _batch(1)
    # group 0: mixed; group 1: no negative (contributes 0); the empty row 5 sits in group 1
    adv = torch.tensor([0.8, -0.4, 0.8, -1.2, 0.5, 0.0, 0.5, 0.0], dtype=torch.float64)
    cfg = pyrl.PolicyLossConfig(loss_type="disco", group_size=G, disco_score=score, disco_tau=tau, disco_delta=1e-3,
                                disco_beta=50.0, agg="seq-mean-token-mean")
    loss, _ = pyrl.policy_loss(logp, adv, mask, old_logp=old, config=cfg)
    want = disco_oracle(logp, old, mask, adv, G, score=score, tau=tau, delta=1e-3, beta=50.0)
    # the empty row 5 carries the penalty on no token: seq-mean-token-mean loses 1/B of it
    m = mask.double()
    kl = ((old - logp) * m).sum() / m.sum()
    want = want - 50.0 * torch.clamp(kl - 1e-3, min=0) ** 2 / B
    _check(loss, want, logp)


def test_disco_inside_the_trust_region_and_bad_groups():
    logp, old, mask = _batch(2)
    adv = torch.tensor([1.0, -1.0] * 4, dtype=torch.float64)
    cfg = pyrl.PolicyLossConfig(loss_type="disco", group_size=2, agg="seq-mean-token-mean", disco_delta=10.0)
    loss, _ = pyrl.policy_loss(logp, adv, mask, old_logp=old, config=cfg)
    want = disco_oracle(logp, old, mask, adv, 2, score="l_ratio", tau=None, delta=10.0, beta=1e3)
    # no penalty; the empty row 5 leaves group 2 without a negative
    torch.testing.assert_close(loss, want, rtol=1e-12, atol=1e-14)
    with pytest.raises(ValueError, match="group_size=3 must divide the batch of 8"):
        pyrl.policy_loss(logp, adv, mask, old_logp=old,
                         config=pyrl.PolicyLossConfig(loss_type="disco", group_size=3))
    with pytest.raises(ValueError, match="disco_tau"):
        pyrl.PolicyLossConfig(loss_type="disco", disco_tau=0.0)
    with pytest.raises(ValueError, match="disco_tau applies to loss_type 'disco' only"):
        pyrl.PolicyLossConfig(loss_type="pacs", disco_tau=1.0)
    with pytest.raises(ValueError, match="pacs_beta"):
        pyrl.PolicyLossConfig(loss_type="pacs", pacs_beta=-1.0)


@pytest.mark.parametrize("name", ["pacs", "disco"])
def test_grouped_losses_in_fp32_and_single_token_rows(name):
    """fp32 inputs against the float64 result; a batch of length-1 rows; never NaN."""
    logp, old, mask = _batch(3)
    adv = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0, 1.0, 0.0, 0.0], dtype=torch.float64)
    extra = {"disco_tau": 10.0} if name == "disco" else {}
    cfg = pyrl.PolicyLossConfig(loss_type=name, group_size=2, agg="seq-mean-token-mean", **extra)
    want, _ = pyrl.policy_loss(logp, adv - (0.5 if name == "disco" else 0.0), mask, old_logp=old, config=cfg)
    lp32 = logp.detach().float().requires_grad_()
    got, _ = pyrl.policy_loss(lp32, (adv - (0.5 if name == "disco" else 0.0)).float(), mask, old_logp=old.float(),
                              config=cfg)
    got.backward()
    assert got.dtype == torch.float32 and torch.isfinite(lp32.grad).all()
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    one = logp.detach()[:, :1].clone().requires_grad_()
    loss, _ = pyrl.policy_loss(one, adv, torch.ones(B, 1), old_logp=old[:, :1], config=cfg)
    loss.backward()
    assert math.isfinite(float(loss.detach())) and torch.isfinite(one.grad).all()
