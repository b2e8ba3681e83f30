"""fused_linear_distillation_loss and the exact divergences of PolicyLossConfig(kl_type=...) against
float64 full-logits computations, on every backend.

The references are written here from the definitions (docs/formulas.md §14), independently of
``pyrl.kernels.reference.divergence_rows``: full float64 logits of both heads, ``log_softmax``,
the divergence summed over the vocabulary, masked and averaged over the valid tokens; gradients by
float64 autograd. Odd shapes: V=37, 2 x 3 tokens with several ignored, chunks of 7 rows (the last
one partial), a teacher with another hidden size.

Tolerances: fp32 inputs 2e-5 relative on the loss and 1e-4 of the largest gradient entry; bf16
1e-3 relative on the loss against the reference on the same rounded inputs, 1e-2 on gradients.
"""
import math

import pytest
import torch

import pyrl
from conftest import CPP, CPU_BACKENDS, triton_on_cpu
from pyrl.ops.plan import DISTILL_CHUNK_SHARE, DISTILL_CPP_CHUNK_SHARE

TRITON = triton_on_cpu()
ALL_BACKENDS = CPU_BACKENDS + [pytest.param("triton", marks=pytest.mark.skipif(not TRITON, reason="no triton"))]
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the Triton interpreter's masked lanes

B, T, H, H_T, V = 3, 7, 8, 12, 37


def _batch(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    hs = torch.randn(B, T, H, generator=g).to(dtype)
    ws = (torch.randn(V, H, generator=g) * 2 / math.sqrt(H)).to(dtype)
    bs = (0.3 * torch.randn(V, generator=g)).to(dtype)
    ht = torch.randn(B, T, H_T, generator=g).to(dtype)
    wt = (torch.randn(V, H_T, generator=g) * 2 / math.sqrt(H_T)).to(dtype)
    bt = (0.3 * torch.randn(V, generator=g)).to(dtype)
    y = torch.randint(0, V, (B, T), generator=g)
    y[0, :3] = -100
    y[2, 5:] = -100
    return hs, ws, bs, ht, wt, bt, y


def _div64(ls, lt, divergence, beta):
    ps, pt = ls.exp(), lt.exp()
    if divergence == "forward_kl":
        return (pt * (lt - ls)).sum(-1)
    if divergence == "reverse_kl":
        return (ps * (ls - lt)).sum(-1)
    m = beta * pt + (1 - beta) * ps
    return beta * (pt * (lt - m.log())).sum(-1) + (1 - beta) * (ps * (ls - m.log())).sum(-1)


def _reference(hs, ws, bs, ht, wt, bt, y, divergence, beta, temperature, soft_w, hard_w):
    zs = hs.double() @ ws.double().t() + bs.double()
    zt = ht.double() @ wt.double().t() + bt.double()
    valid = y != -100
    n = valid.sum().clamp(min=1)
    soft = torch.where(valid, _div64((zs / temperature).log_softmax(-1), (zt / temperature).log_softmax(-1),
                                     divergence, beta), 0.0).sum() / n
    ce = -zs.log_softmax(-1).gather(-1, torch.where(valid, y, 0).unsqueeze(-1)).squeeze(-1)
    hard = torch.where(valid, ce, 0.0).sum() / n
    return soft_w * soft + hard_w * hard, soft, hard


def _share(backend):
    """The plan's split of chunk_bytes per head (so that ``7 * V * 4 * _share(b)`` gives chunks of 7 rows)."""
    return DISTILL_CPP_CHUNK_SHARE if backend == "cpp" else DISTILL_CHUNK_SHARE


def _close_grads(got, want, tol):
    for gg, gw in zip(got, want):
        scale = gw.abs().max().clamp(min=1e-30)
        assert float((gg.double() - gw).abs().max() / scale) < tol


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("divergence,beta", [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.5), ("jsd", 0.2)])
def test_matches_float64(divergence, beta, backend):
    hs, ws, bs, ht, wt, bt, y = _batch()
    leaves = [x.clone().requires_grad_() for x in (hs, ws, bs)]
    loss, out = pyrl.fused_linear_distillation_loss(
        leaves[0], leaves[1], ht, wt, y, student_bias=leaves[2], teacher_bias=bt, divergence=divergence, beta=beta,
        temperature=1.7, soft_weight=0.8, hard_weight=0.3, backend=backend, chunk_bytes=7 * V * 4 * _share(backend))
    leaves64 = [x.double().clone().requires_grad_() for x in (hs, ws, bs)]
    want, soft, hard = _reference(*leaves64, ht, wt, bt, y, divergence, beta, 1.7, 0.8, 0.3)
    assert float(loss.detach()) == pytest.approx(float(want.detach()), rel=2e-5)
    assert float(out["soft_loss"]) == pytest.approx(float(soft.detach()), rel=2e-5, abs=1e-7)
    assert float(out["hard_loss"]) == pytest.approx(float(hard.detach()), rel=2e-5)
    _close_grads(torch.autograd.grad(loss * 2.5, leaves), torch.autograd.grad(want * 2.5, leaves64), 1e-4)


def _div64_masked(ls, lt, divergence, beta):
    """``_div64`` where a zero-probability entry adds exactly 0 (a -inf logit in both heads)."""
    fin = lambda x: torch.where(x.isinf(), -1e300, x)  # noqa: E731
    ls, lt = fin(ls), fin(lt)
    ps, pt = ls.exp(), lt.exp()
    x = lambda p, d: torch.where(p > 0, p * d, 0.0)  # noqa: E731
    if divergence == "forward_kl":
        return x(pt, lt - ls).sum(-1)
    if divergence == "reverse_kl":
        return x(ps, ls - lt).sum(-1)
    lm = torch.logaddexp(ls + math.log1p(-beta), lt + math.log(beta))
    return beta * x(pt, lt - lm).sum(-1) + (1 - beta) * x(ps, ls - lm).sum(-1)


@pytest.mark.skipif(not CPP, reason="pyrl._C not built")
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.float64, 1e-12)])
@pytest.mark.parametrize("kind,divergence,beta", [(0, "forward_kl", 0.5), (1, "reverse_kl", 0.5), (2, "jsd", 0.5),
                                                  (2, "jsd", 0.1)])
def test_cpp_divergence_rows_match_float64(kind, divergence, beta, dtype, tol):
    """torch.ops.pyrl.divergence_rows_ (the cpp backend's divergence, one row at a time) against the
    float64 definitions: rows longer than its 2048-entry blocks, a -inf logit in both heads, a row
    with g = 0 (exactly zero gradient), and each row's result independent of the other rows."""
    g = torch.Generator().manual_seed(3)
    n, v, temp = 5, 4099, 0.7
    zs, zt = (3 * torch.randn(n, v, generator=g, dtype=torch.float64) for _ in range(2))
    zs[:, 7] = zt[:, 7] = -math.inf
    gr = torch.tensor([1.0, -0.5, 0.0, 2.0, 0.25], dtype=torch.float64)
    ls, lt = (zs / temp).log_softmax(-1), (zt / temp).log_softmax(-1)
    want = _div64_masked(ls, lt, divergence, beta)
    leaf = zs.clone().requires_grad_()
    d = _div64_masked((leaf / temp).log_softmax(-1), lt, divergence, beta)
    (want_dz,) = torch.autograd.grad((d * gr).sum(), leaf)
    a, b = zs.to(dtype, copy=True), zt.to(dtype, copy=True)  # both are written over
    value = torch.ops.pyrl.divergence_rows_(a, b, gr.to(dtype), temp, kind, beta)
    torch.testing.assert_close(value.double(), want, rtol=tol, atol=tol)
    assert float((a.double() - want_dz).abs().max() / want_dz.abs().max()) < tol
    assert torch.isfinite(a).all() and (a[2] == 0).all() and (a[:, 7] == 0).all()
    alone = torch.ops.pyrl.divergence_rows_(zs[3:4].to(dtype, copy=True), zt[3:4].to(dtype, copy=True), None, temp,
                                            kind, beta)
    assert torch.equal(alone, value[3:4])  # batch-invariant; without g nothing is written
    c = zs.to(dtype, copy=True)
    torch.ops.pyrl.divergence_rows_(c, zt.to(dtype, copy=True), None, temp, kind, beta)
    assert torch.equal(c, zs.to(dtype))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_sparse_teacher_matches_float64(backend):
    hs, ws, bs, ht, wt, bt, y = _batch()
    k = 5
    zt = ht.double() @ wt.double().t()
    top_lp, top_ids = zt.log_softmax(-1).topk(k, -1)
    top_lp[1, 2, -1] = -math.inf  # an unused slot
    leaves = [x.clone().requires_grad_() for x in (hs, ws)]
    loss, out = pyrl.fused_linear_distillation_loss(leaves[0], leaves[1], targets=y, teacher_topk_ids=top_ids,
                                                    teacher_topk_logprobs=top_lp.float(), temperature=0.9,
                                                    hard_weight=0.5, backend=backend, chunk_bytes=7 * V * 4 * 6)
    leaves64 = [x.double().clone().requires_grad_() for x in (hs, ws)]
    ls = (leaves64[0] @ leaves64[1].t() / 0.9).log_softmax(-1)
    lq = top_lp.float().double().log_softmax(-1)
    q = lq.exp()
    per = torch.where(q > 0, q * (lq - ls.gather(-1, top_ids)), 0.0).sum(-1)
    valid = y != -100
    ce = -(leaves64[0] @ leaves64[1].t()).log_softmax(-1).gather(-1, torch.where(valid, y, 0).unsqueeze(-1)).squeeze(-1)
    want = (torch.where(valid, per, 0.0).sum() + 0.5 * torch.where(valid, ce, 0.0).sum()) / valid.sum()
    assert float(loss.detach()) == pytest.approx(float(want.detach()), rel=2e-5)
    _close_grads(torch.autograd.grad(loss, leaves), torch.autograd.grad(want, leaves64), 1e-4)


def test_sparse_teacher_with_full_support_is_the_forward_kl():
    hs, ws, bs, ht, wt, bt, y = _batch(dtype=torch.float64)
    zt = ht @ wt.t()
    ids = torch.arange(V).expand(B, T, V)
    dense, _ = pyrl.fused_linear_distillation_loss(hs, ws, ht, wt, y, temperature=1.0)
    sparse, _ = pyrl.fused_linear_distillation_loss(hs, ws, targets=y, teacher_topk_ids=ids,
                                                    teacher_topk_logprobs=zt.log_softmax(-1))
    assert float(dense) == pytest.approx(float(sparse), rel=1e-12)


def test_bf16_accumulates_in_fp32():
    hs, ws, bs, ht, wt, bt, y = _batch(dtype=torch.bfloat16)
    leaves = [x.clone().requires_grad_() for x in (hs, ws)]
    loss, _ = pyrl.fused_linear_distillation_loss(leaves[0], leaves[1], ht, wt, y, divergence="jsd",
                                                  hard_weight=0.5)
    assert loss.dtype == torch.float32
    leaves64 = [x.double().clone().requires_grad_() for x in (hs, ws)]
    want, _, _ = _reference(leaves64[0], leaves64[1], torch.zeros(V), ht, wt, torch.zeros(V), y, "jsd", 0.5, 1.0,
                            1.0, 0.5)
    assert float(loss.detach()) == pytest.approx(float(want.detach()), rel=1e-3)
    _close_grads(torch.autograd.grad(loss, leaves), torch.autograd.grad(want, leaves64), 1e-2)


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
def test_all_ignored_gives_zero_and_no_nan(divergence):
    hs, ws, bs, ht, wt, bt, y = _batch()
    y[:] = -100
    wt = wt.clone()
    wt[3] = 0
    bt = bt.clone()
    bt[3] = -math.inf  # a token the teacher never emits
    h, w = hs.clone().requires_grad_(), ws.clone().requires_grad_()
    loss, _ = pyrl.fused_linear_distillation_loss(h, w, ht, wt, y, teacher_bias=bt, divergence=divergence,
                                                  hard_weight=1.0)
    loss.backward()
    assert float(loss.detach()) == 0.0 and (h.grad == 0).all() and (w.grad == 0).all()


def test_teacher_masked_token_stays_finite_forward_kl():
    """A -inf teacher logit adds nothing to the forward KL (q = 0 there): finite loss and gradients."""
    hs, ws, bs, ht, wt, bt, y = _batch()
    bt = bt.clone()
    bt[3] = -math.inf
    h = hs.clone().requires_grad_()
    loss, _ = pyrl.fused_linear_distillation_loss(h, ws, ht, wt, y, teacher_bias=bt, divergence="forward_kl")
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(h.grad).all()


@pytest.mark.parametrize("kwargs, match", [
    (dict(divergence="kl"), "divergence must be one of"),
    (dict(divergence="jsd", beta=1.0), "beta must be in \\(0, 1\\)"),
    (dict(teacher_weight=torch.zeros(V + 1, H_T)), "teacher_weight must have shape \\[V, H_ref\\] with V = 37"),
    (dict(teacher_hidden=torch.zeros(B, T + 1, H_T)), "teacher_hidden must have shape \\[3, 7, H_ref\\]"),
    (dict(teacher_topk_ids=torch.zeros(B, T, 2, dtype=torch.long)), "not both"),
])
def test_rejects_bad_input_naming_the_argument(kwargs, match):
    hs, ws, bs, ht, wt, bt, y = _batch()
    args = dict(teacher_hidden=ht, teacher_weight=wt)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        pyrl.fused_linear_distillation_loss(hs, ws, targets=y, **args)
    with pytest.raises(ValueError, match="forward_kl' only"):
        pyrl.fused_linear_distillation_loss(hs, ws, targets=y, teacher_topk_ids=torch.zeros(B, T, 2, dtype=torch.long),
                                            teacher_topk_logprobs=torch.zeros(B, T, 2), divergence="jsd")


# ------------------------------------------------------------------------------------------------
# PolicyLossConfig(kl_type="full_forward" | "full_jsd"): the exact divergence to the reference head
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("kl_type,divergence", [("full", "reverse_kl"), ("full_forward", "forward_kl"),
                                                ("full_jsd", "jsd")])
def test_policy_loss_exact_kl_types(kl_type, divergence, backend):
    hs, ws, bs, ht, wt, bt, y = _batch()
    mask = (y != -100).float()
    adv = torch.tensor([0.5, -1.0, 0.25])
    ref_h = hs + 0.3 * torch.randn(B, T, H)
    cfg = pyrl.PolicyLossConfig(beta=0.2, kl_type=kl_type, temperature=1.3)
    leaves = [x.clone().requires_grad_() for x in (hs, ws)]
    loss, metrics = pyrl.fused_linear_policy_loss(leaves[0], leaves[1], y, mask, adv, ref_hidden=ref_h, ref_weight=ws,
                                                  config=cfg, backend=backend, chunk_bytes=5 * V * 4)
    leaves64 = [x.double().clone().requires_grad_() for x in (hs, ws)]
    zs = leaves64[0] @ leaves64[1].t() / 1.3
    zr = ref_h.double() @ ws.double().t() / 1.3
    kl = _div64(zs.log_softmax(-1), zr.log_softmax(-1), divergence, 0.5)
    valid = mask.bool()
    logp = zs.log_softmax(-1).gather(-1, torch.where(valid, y, 0).unsqueeze(-1)).squeeze(-1)
    # on-policy PPO: ratio 1, per-token loss -A * exp(logp - sg(logp)); token-mean aggregation
    per = -adv.double().unsqueeze(1) * torch.exp(logp - logp.detach()) + 0.2 * kl
    want = torch.where(valid, per, 0.0).sum() / valid.sum()
    assert float(loss.detach()) == pytest.approx(float(want.detach()), rel=2e-5)
    assert metrics["kl_mean"] == pytest.approx(float((kl * valid).sum() / valid.sum()), rel=2e-5)
    _close_grads(torch.autograd.grad(loss, leaves), torch.autograd.grad(want, leaves64), 1e-4)


def test_policy_loss_exact_kl_needs_the_reference_head():
    hs, ws, bs, ht, wt, bt, y = _batch()
    with pytest.raises(ValueError, match="kl_type='full_jsd' needs"):
        pyrl.policy_loss(torch.zeros(B, T), torch.zeros(B), torch.ones(B, T), ref_logp=torch.zeros(B, T),
                         config=pyrl.PolicyLossConfig(beta=0.1, kl_type="full_jsd"))
