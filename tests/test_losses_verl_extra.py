"""verl's policy losses pyrl adds (clip_cov, kl_cov, geo_mean) and verl's further KL modes (abs and the
straight-through k1+/k2+/k3+), each against verl 0.8.0.dev's definition (commit b178a3cd,
verl/trainer/ppo/core_algos.py) re-implemented here in float64, then through the fused op on every
backend and plan against the float64 oracle. verl's own test suite has no inputs for these losses,
so the inputs are seeded random batches with clipped tokens, negative advantages and padding."""
import math

import pytest
import torch

import pyrl
from _ref import assert_fused_matches_float64, linear_logprobs_ref
from conftest import CPU_BACKENDS, triton_on_cpu
from pyrl.integrations import verl as pv

TRITON = triton_on_cpu()
ALL_BACKENDS = CPU_BACKENDS + [pytest.param("triton", marks=pytest.mark.skipif(not TRITON, reason="no triton"))]


# ---------------------------------------------------------------------------------------------
# verl's definitions, written out for the test (float64, no pyrl code)
# ---------------------------------------------------------------------------------------------
def _mmean(x, m):
    return (x * m).sum() / (m.sum() + 1e-8)


def verl_clip_cov(old, logp, adv, mask, lo, hi, ratio_k, lb, ub):
    """Per-token losses of verl's compute_policy_loss_clip_cov (before agg_loss)."""
    m = mask.double()
    r = (logp - old).exp()
    pg1, pg2 = -adv * r, -adv * r.clamp(1 - lo, 1 + hi)
    by_origin = (pg2 > pg1) & mask
    cov = (adv - _mmean(adv, m)) * (logp.detach() - _mmean(logp.detach(), m))
    cov = cov.masked_fill(~mask, -math.inf).masked_fill(by_origin, -math.inf)
    k = max(int(ratio_k * int(m.sum().item())), 1)
    idx = torch.nonzero((cov < ub) & (cov > lb) & mask)
    corr = torch.ones_like(adv)
    if len(idx) > 0:
        idx = idx[torch.randperm(len(idx))[: min(k, len(idx))]]
        corr[idx[:, 0], idx[:, 1]] = 0
    return torch.maximum(pg1, pg2) * corr, corr


def verl_kl_cov(old, logp, adv, mask, ratio_k, coef):
    x = logp - old
    r = x.exp()
    pg = -adv * r
    pg_kl = -adv * r + coef * x.abs()
    flat_valid = torch.nonzero(mask.reshape(-1), as_tuple=True)[0]
    a, lp = adv[mask].detach(), logp[mask].detach()
    out = pg.clone()
    if len(a):
        cov = (a - a.mean()) * (lp - lp.mean())
        top = torch.topk(cov, max(1, int(len(cov) * ratio_k)), largest=True).indices
        pos = flat_valid[top]
        T = adv.shape[1]
        out[pos // T, pos % T] = pg_kl[pos // T, pos % T]
    return out


def verl_geo_mean(old, logp, adv, mask, lo, hi, weights=None):
    """verl's compute_policy_loss_geo_mean: the scalar loss (torch.mean over sequences)."""
    m = mask.double()
    x = logp - old
    s = torch.sign(adv)
    c = s * torch.minimum(s * x, s * x.clamp(-lo, hi))
    n = m.sum(-1)
    ratio = ((c * m).sum(-1) / (n + 1e-8)).exp()
    A = (adv * m).sum(-1) / (n + 1e-8)
    pg = -A * ratio
    if weights is not None:
        pg = pg * (((weights + 1e-10).log() * m).sum(-1) / (n + 1e-8)).exp()
    return pg.mean()


def verl_kl(logp, ref, mode):
    fwd_mode = mode[:-1] if mode.endswith("+") else mode
    d = logp - ref
    if fwd_mode in ("kl", "k1"):
        fwd = d
    elif fwd_mode == "abs":
        fwd = d.abs()
    elif fwd_mode in ("mse", "k2"):
        fwd = 0.5 * d.square()
    else:
        kl = (ref - logp).clamp(-20, 20)
        fwd = (kl.exp() - kl - 1).clamp(-10, 10)
    if not mode.endswith("+") or mode in ("mse+", "k2+"):
        return fwd
    back = 0.5 * d.square()
    return back - back.detach() + fwd.detach()


def _batch(B=5, T=9, seed=0, per_token_adv=False):
    g = torch.Generator().manual_seed(seed)
    logp = (-torch.rand(B, T, generator=g, dtype=torch.float64) * 3).requires_grad_()
    old = logp.detach() + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)
    shape = (B, T) if per_token_adv else (B, 1)
    adv = torch.randn(*shape, generator=g, dtype=torch.float64).expand(B, T).contiguous()
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, 4:] = False
    mask[3] = False  # an all-masked row
    mask[4, 1:] = False  # a row of one token
    return old, logp, adv, mask


def _token_mean(x, mask):
    m = mask.double()
    return (x * m).sum() / m.sum()


# ---------------------------------------------------------------------------------------------
# the losses on log-probs, float64, against verl's definitions
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("bounds", [(1.0, 5.0), (-0.05, 0.5), (-math.inf, math.inf)], ids=["verl", "narrow", "all"])
@pytest.mark.parametrize("ratio_k", [2e-4, 0.25])
def test_clip_cov_matches_verl(seed, bounds, ratio_k):
    old, logp, adv, mask = _batch(seed=seed, per_token_adv=seed % 2 == 1)
    lb, ub = bounds
    cfg = pyrl.PolicyLossConfig(loss_type="clip_cov", eps_high=0.28, clip_cov_ratio=ratio_k, clip_cov_lb=lb,
                                clip_cov_ub=ub)
    torch.manual_seed(100 + seed)
    ours, metrics = pyrl.policy_loss(logp, adv, mask, old_logp=old, config=cfg)
    torch.manual_seed(100 + seed)  # verl draws its pick from torch's global generator: so does pyrl
    theirs_tok, corr = verl_clip_cov(old, logp, adv, mask, 0.2, 0.28, ratio_k, lb, ub)
    theirs = _token_mean(theirs_tok, mask)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-14)
    g_ours, = torch.autograd.grad(ours, logp)
    g_theirs, = torch.autograd.grad(theirs, logp)
    torch.testing.assert_close(g_ours, g_theirs, rtol=1e-12, atol=1e-14)
    assert torch.isfinite(g_ours).all() and (g_ours[~mask] == 0).all()
    r = (logp.detach() - old).exp()
    by_clip = (((adv > 0) & (r > 1.28)) | ((adv < 0) & (r < 0.8))) & mask
    want = ((corr == 0) | by_clip) & mask
    assert float(metrics["clip_frac"]) == pytest.approx(float(want.sum() / mask.sum()))


def test_clip_cov_defaults_are_verls_and_pick_at_least_one_token():
    old, logp, adv, mask = _batch(seed=2, per_token_adv=True)
    # make a few unclipped tokens eligible under verl's default bounds (1, 5)
    b, t = 0, 2
    old[b, t] = logp.detach()[b, t]
    adv = adv.clone()
    adv[b, t] = adv[mask].mean() + 2.0 / (logp.detach()[b, t] - logp.detach()[mask].mean())
    torch.manual_seed(0)
    loss, _ = pyrl.policy_loss(logp, adv, mask, old_logp=old, config=pyrl.PolicyLossConfig(loss_type="clip_cov"))
    g, = torch.autograd.grad(loss, logp)
    cov = pyrl.losses.covariance.token_covariance(logp, adv, mask)
    eligible = (cov > 1) & (cov < 5) & (adv != 0)
    assert eligible.sum() > 1
    assert ((g == 0) & eligible).sum() == 1  # max(int(2e-4 * n), 1) = 1 token loses its gradient
    torch.manual_seed(0)
    theirs, _ = verl_clip_cov(old, logp, adv, mask, 0.2, 0.2, 2e-4, 1.0, 5.0)
    torch.testing.assert_close(loss, _token_mean(theirs, mask), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("ratio_k,coef", [(2e-4, 1.0), (0.3, 0.5), (1.0, 2.0)])
def test_kl_cov_matches_verl(seed, ratio_k, coef):
    old, logp, adv, mask = _batch(seed=seed, per_token_adv=seed % 2 == 1)
    cfg = pyrl.PolicyLossConfig(loss_type="kl_cov", kl_cov_ratio=ratio_k, ppo_kl_coef=coef)
    ours, metrics = pyrl.policy_loss(logp, adv, mask, old_logp=old, config=cfg)
    theirs = _token_mean(verl_kl_cov(old, logp, adv, mask, ratio_k, coef), mask)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-14)
    g_ours, = torch.autograd.grad(ours, logp)
    g_theirs, = torch.autograd.grad(theirs, logp)
    torch.testing.assert_close(g_ours, g_theirs, rtol=1e-12, atol=1e-14)
    assert float(metrics["clip_frac"]) == 0.0


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("eps", [(0.4, 0.4), (0.2, 0.28), (0.05, 0.05)])
def test_geo_mean_matches_verl(seed, eps):
    old, logp, adv, mask = _batch(seed=seed, per_token_adv=seed % 2 == 1)
    lo, hi = eps
    cfg = pyrl.PolicyLossConfig(loss_type="geo_mean", eps_low=lo, eps_high=hi, agg="seq-mean-token-mean")
    ours, metrics = pyrl.policy_loss(logp, adv, mask, old_logp=old, config=cfg)
    theirs = verl_geo_mean(old, logp, adv, mask, lo, hi)
    # rtol 1e-7: verl divides by |y| + 1e-8, pyrl by |y| (a relative 1e-8 / |y|)
    torch.testing.assert_close(ours, theirs, rtol=1e-7, atol=1e-14)
    g_ours, = torch.autograd.grad(ours, logp)
    g_theirs, = torch.autograd.grad(theirs, logp)
    torch.testing.assert_close(g_ours, g_theirs, rtol=1e-7, atol=1e-14)
    x = logp.detach() - old
    flagged = (((adv > 0) & (x > hi)) | ((adv < 0) & (x < -lo))) & mask
    assert float(metrics["clip_frac"]) == pytest.approx(float(flagged.sum() / mask.sum()))


@pytest.mark.parametrize("mode", ["kl", "k1", "abs", "mse", "k2", "low_var_kl", "k3",
                                  "k1+", "k2+", "k3+", "low_var_kl+", "abs+"])
def test_kl_modes_match_verl(mode):
    old, logp, _, mask = _batch(seed=1)
    ref = old.clone()
    ref[0, :2] = logp.detach()[0, :2] + torch.tensor([30.0, -30.0], dtype=torch.float64)  # beyond both clamps
    ours = pv.kl_penalty(logp, ref, mode)
    theirs = verl_kl(logp, ref, mode)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
    g = torch.randn(ours.shape, dtype=torch.float64)
    g_ours, = torch.autograd.grad(ours, logp, g)
    g_theirs, = torch.autograd.grad(theirs, logp, g)
    torch.testing.assert_close(g_ours, g_theirs, rtol=1e-12, atol=1e-12)
    # pyrl's own estimators: the same, except k3's extra clamp of the estimate at 10 (docs/integrations.md)
    kl_type = pyrl.losses.aliases.VERL_KL_TYPES[mode]
    cfg = pyrl.PolicyLossConfig(loss_type="reinforce", beta=1.0, kl_type=kl_type)
    zero = torch.zeros(logp.shape[0], dtype=torch.float64)
    loss, metrics = pyrl.policy_loss(logp, zero, mask, old_logp=old, ref_logp=ref, config=cfg)
    inside = mask.clone()
    inside[0, :2] = False
    loss_in, _ = pyrl.policy_loss(logp, zero, inside, old_logp=old, ref_logp=ref, config=cfg)
    want_in = _token_mean(verl_kl(logp, ref, mode), inside)
    torch.testing.assert_close(loss_in, want_in, rtol=1e-12, atol=1e-12)
    g_in, = torch.autograd.grad(loss_in, logp)
    g_want, = torch.autograd.grad(want_in, logp)
    torch.testing.assert_close(g_in, g_want, rtol=1e-12, atol=1e-12)
    assert torch.isfinite(loss) and float(metrics["kl_mean"]) == pytest.approx(float(loss.detach()))


def test_k3_clamping_choices_pinned():
    """The k3 difference at an extreme log-ratio, as docs/integrations.md lists it: d = logp - ref = -27
    on one token of four (a token-mean of exp(-d) + d - 1 and zeros)."""
    d = torch.tensor([-27.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    liger = ((-d).exp() + d - 1).mean()                 # no clamp
    verl = verl_kl(d, torch.zeros_like(d), "k3").mean()  # the estimate clamped at 10
    ours = pyrl.policy_loss(d[None], torch.zeros(1, dtype=torch.float64), torch.ones(1, 4),
                            ref_logp=torch.zeros(1, 4, dtype=torch.float64),
                            config=pyrl.PolicyLossConfig(loss_type="reinforce", beta=1.0))[0]
    assert float(liger) == pytest.approx(1.33e11, rel=1e-2)
    assert float(verl) == pytest.approx(2.5)
    assert float(ours) == pytest.approx((math.exp(20) - 21) / 4)  # the log-ratio clamped at 20: 1.2e8


def test_config_validates_the_new_fields():
    with pytest.raises(ValueError, match="clip_cov_ratio applies to loss_type 'clip_cov' only"):
        pyrl.PolicyLossConfig(clip_cov_ratio=0.1)
    with pytest.raises(ValueError, match="ppo_kl_coef applies to loss_type 'kl_cov' only"):
        pyrl.PolicyLossConfig(loss_type="clip_cov", ppo_kl_coef=1.0)
    with pytest.raises(ValueError, match=r"PolicyLossConfig.kl_cov_ratio must be in \(0, 1\]"):
        pyrl.PolicyLossConfig(loss_type="kl_cov", kl_cov_ratio=0.0)
    with pytest.raises(ValueError, match="PolicyLossConfig.ppo_kl_coef must be >= 0"):
        pyrl.PolicyLossConfig(loss_type="kl_cov", ppo_kl_coef=-1.0)
    with pytest.raises(ValueError, match="kl_type must be one of"):
        pyrl.PolicyLossConfig(kl_type="k4+")
    with pytest.raises(ValueError, match="needs_mask=True sees the whole"):
        pyrl.register_policy_loss("never_registered", token_separable=True, needs_mask=True)
    with pytest.raises(ValueError, match="kl_penalty must be one of"):
        pv.kl_penalty(torch.zeros(1, 1), torch.zeros(1, 1), "k5")
    with pytest.raises(NotImplementedError):
        pv.kl_penalty(torch.zeros(1, 1), torch.zeros(1, 1), "full")


def test_all_masked_batch_gives_zero_not_nan():
    old, logp, adv, _ = _batch()
    mask = torch.zeros(logp.shape, dtype=torch.bool)
    for cfg in (pyrl.PolicyLossConfig(loss_type="clip_cov"), pyrl.PolicyLossConfig(loss_type="kl_cov"),
                pyrl.PolicyLossConfig(loss_type="geo_mean"), pyrl.PolicyLossConfig(beta=0.1, kl_type="k3+")):
        loss, metrics = pyrl.policy_loss(logp, adv, mask, old_logp=old, ref_logp=old, config=cfg)
        g, = torch.autograd.grad(loss, logp)
        assert float(loss.detach()) == 0.0 and (g == 0).all() and all(torch.isfinite(v) for v in metrics.values())


# ---------------------------------------------------------------------------------------------
# fused: every backend runs the two-pass plan for these batch-global losses
# ---------------------------------------------------------------------------------------------
H = 16
CASES = {
    "clip_cov": dict(loss_type="clip_cov", clip_cov_ratio=0.3, clip_cov_lb=-math.inf, clip_cov_ub=math.inf),
    "kl_cov": dict(loss_type="kl_cov", kl_cov_ratio=0.3, ppo_kl_coef=0.5),
    "geo_mean": dict(loss_type="geo_mean", eps_low=0.4, eps_high=0.4, agg="seq-mean-token-mean"),
    "k3+": dict(loss_type="ppo", beta=0.2, kl_type="k3+"),
    "abs": dict(loss_type="ppo", beta=0.2, kl_type="abs"),
    # the group objectives of tests/test_losses_grouped.py, one group per call (docs/formulas.md §3.11, §3.12)
    "pacs": dict(loss_type="pacs", pacs_beta=0.5, agg="seq-mean-token-mean"),
    "disco": dict(loss_type="disco", disco_tau=10.0, disco_delta=0.0, disco_beta=5.0, agg="seq-mean-token-mean"),
}
SHAPES = {"one-token": (1, 1, 37), "vocab-129": (2, 5, 129), "all-masked-row": (3, 4, 37)}


def test_explain_says_two_passes_for_the_batch_global_losses():
    hidden, weight = torch.randn(2, 3, H), torch.randn(37, H)
    ids, mask, adv = torch.randint(0, 37, (2, 3)), torch.ones(2, 3), torch.randn(2)
    for name in ("clip_cov", "kl_cov", "geo_mean", "pacs", "disco"):
        for backend in ("torch", "cpp"):
            text = pyrl.explain("fused_linear_policy_loss", hidden, weight, ids, mask, adv, backend=backend,
                                config=pyrl.PolicyLossConfig(loss_type=name))
            assert "passes=two" in text and f"loss_type={name!r} is not registered as token-separable" in text
    text = pyrl.explain("fused_linear_policy_loss", hidden, weight, ids, mask, adv, backend="torch",
                        ref_logp=torch.zeros(2, 3), config=pyrl.PolicyLossConfig(beta=0.1, kl_type="k3+"))
    assert "passes=one" in text  # the KL modes stay token-separable


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("case", list(CASES))
def test_fused_matches_float64_on_every_backend(case, shape, backend, dtype):
    b, t, v = SHAPES[shape]
    g = torch.Generator().manual_seed(5)
    hidden = torch.randn(b, t, H, generator=g).to(dtype)
    weight = (torch.randn(v, H, generator=g) / math.sqrt(H)).to(dtype)
    targets = torch.randint(0, v, (b, t), generator=g)
    mask = torch.ones(b, t)
    if t > 1:
        mask[0, 0] = 0  # padding at the front (its target id is never read)
    if shape == "all-masked-row":
        mask[1] = 0
    adv = torch.randn(b, t, generator=g)
    old_shift = 0.3 * torch.randn(b, t, generator=g)
    ref_shift = 0.5 * torch.randn(b, t, generator=g)
    cfg = pyrl.PolicyLossConfig(**CASES[case])

    safe = torch.where(mask.bool(), targets, -100)
    hd, wd = hidden.double().requires_grad_(), weight.double().requires_grad_()
    logp64, _ = linear_logprobs_ref(hd, wd, safe)
    old = logp64.detach() + old_shift.double()
    ref = logp64.detach() + ref_shift.double()
    torch.manual_seed(7)
    want, _ = pyrl.policy_loss(logp64, adv.double(), mask, old_logp=old, ref_logp=ref, config=cfg)
    want.backward()
    if case in ("clip_cov", "kl_cov"):  # the selection must not sit on a tie the fp32 log-probs could flip
        cov = pyrl.losses.covariance.token_covariance(logp64, adv.double(), mask.bool())[mask.bool()]
        if cov.numel() > 1:
            gaps = cov.sort().values.diff()
            assert gaps.min() > 1e-3

    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    torch.manual_seed(7)
    got, metrics = pyrl.fused_linear_policy_loss(h, w, torch.where(mask.bool(), targets, 0), mask, adv,
                                                 old_logp=old.float(), ref_logp=ref.float(), config=cfg,
                                                 backend=backend, chunk_bytes=2 * v * 4)
    got.backward()
    assert_fused_matches_float64(got, metrics, want, ((h.grad, hd.grad), (w.grad, wd.grad)), dtype)
    if shape == "all-masked-row":
        assert (h.grad[1] == 0).all()


# ---------------------------------------------------------------------------------------------
# the verl integration: pyrl_clip_cov, pyrl_kl_cov, pyrl_geo_mean, pyrl_gspo_seq
# ---------------------------------------------------------------------------------------------
class _Cfg:
    def __init__(self, **policy_loss):
        self.clip_ratio, self.clip_ratio_low, self.clip_ratio_high, self.clip_ratio_c = 0.2, None, 0.28, 3.0
        self.global_batch_info = {}
        self.policy_loss = policy_loss


def test_verl_modes_match_verl():
    old, logp, adv, mask = _batch(seed=3, per_token_adv=True)
    w = torch.rand(logp.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) + 0.5
    cfg = _Cfg(clip_cov_ratio=0.2, clip_cov_lb=-1.0, clip_cov_ub=5.0)
    torch.manual_seed(3)
    ours, m_ours = pv.compute_policy_loss(old, logp, adv, mask, "token-mean", cfg, w, loss_mode="pyrl_clip_cov")
    torch.manual_seed(3)
    tok, _ = verl_clip_cov(old, logp, adv, mask, 0.2, 0.28, 0.2, -1.0, 5.0)
    torch.testing.assert_close(ours, _token_mean(tok * w, mask), rtol=1e-12, atol=1e-14)

    cfg = _Cfg(kl_cov_ratio=0.3, ppo_kl_coef=None)  # None: verl's default coefficient 1
    ours, m_ours = pv.compute_policy_loss(old, logp, adv, mask, "seq-mean-token-sum", cfg, None,
                                          loss_mode="pyrl_kl_cov")
    tok = verl_kl_cov(old, logp, adv, mask, 0.3, 1.0)
    rows = mask.any(-1)
    torch.testing.assert_close(ours, (tok * mask).sum(-1)[rows].sum() / rows.sum(), rtol=1e-12, atol=1e-14)
    x = (logp.detach() - old)
    assert m_ours["actor/ppo_kl"] == pytest.approx(float(_token_mean(x.abs(), mask)))

    ours, m_ours = pv.compute_policy_loss(old, logp, adv, mask, "token-mean", _Cfg(), w, loss_mode="pyrl_geo_mean")
    theirs = verl_geo_mean(old, logp, adv, mask, 0.2, 0.28, w)
    torch.testing.assert_close(ours, theirs, rtol=1e-7, atol=1e-14)
    g_ours, = torch.autograd.grad(ours, logp)
    g_theirs, = torch.autograd.grad(theirs, logp)
    torch.testing.assert_close(g_ours, g_theirs, rtol=1e-7, atol=1e-14)
    outside = ((x < -0.2) | (x > 0.28)) & mask
    assert m_ours["actor/pg_clipfrac"] == pytest.approx(float(_token_mean((outside & (adv > 0)).double(), mask)))
    assert m_ours["actor/pg_clipfrac_lower"] == pytest.approx(float(_token_mean((outside & (adv < 0)).double(), mask)))
