"""The CUDA path (Triton kernels, compiled for the GPU) against float64, on a CUDA device.

Skipped without a CUDA GPU (so on CI); ``benchmarks/gpu_check.sh`` runs it on the GPU machine.
The CPU suites test the same kernels through Triton's interpreter, which accepts code that the GPU
compiler treats differently (tl.dot precision, shared-memory layouts, specialisation on strides),
so these repeat the checks that matter with the real compiler:

* values and gradients of ``fused_linear_logprobs`` (both bodies of ``backend="triton"``: the
  chunked cuBLAS + row-kernel body and the single fused kernel) and ``logprobs_from_logits`` on odd shapes
  (N=1, V not a multiple of any tile, V=151936, ignored rows, ``-inf`` logits, bias, temperature),
  fp32 and bf16, against a float64 computation of the same (rounded) inputs;
* ``fused_linear_policy_loss`` for every config of the CPU reference test, and at a realistic
  bf16 shape (N=2048, H=4096, V=151936);
* bitwise batch invariance, all-masked batches, and parity with Liger-Kernel on the GPU.

Tolerances, as ``max |out - ref| / max |ref|``: fp32 inputs (3xTF32 dot products) 1e-4 for values
and gradients; bf16 inputs 1e-3 for log-prob/entropy (fp32 math on exactly representable
products) and 2e-2 for gradients (returned in bf16; ``dz`` is rounded to bf16 before the backward
matmuls). One autotune config is pinned here (``PYRL_TRITON_CONFIG``) so each new (H, V) does not
autotune; the benchmark (``pyrl bench --device cuda``) checks the autotuned tilings against float64.
"""
import math
import os

import pytest
import torch

CUDA = torch.cuda.is_available()
if CUDA:  # before pyrl.kernels is imported (it is imported lazily, on the first CUDA call)
    os.environ.setdefault("PYRL_TRITON_CONFIG", "ampere-64x128x64-w4-s3")

import pyrl  # noqa: E402
from _ref import linear_logprobs_ref, logprobs_ref  # noqa: E402
from pyrl.ops.policy_loss import policy_loss_core  # noqa: E402

pytestmark = pytest.mark.skipif(not (CUDA and pyrl.backends()["triton"]["available"]),
                                reason="needs a CUDA GPU and Triton (benchmarks/gpu_check.sh runs these)")

TOL = {torch.float32: dict(value=1e-4, grad=1e-4), torch.bfloat16: dict(value=1e-3, grad=2e-2)}


def rel_err(out, ref) -> float:
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    assert out.shape == ref.shape, (tuple(out.shape), tuple(ref.shape))
    assert torch.isfinite(out).all(), "non-finite output"
    return float((out - ref).abs().max() / ref.abs().max().clamp(min=1e-12))


def norm_err(out, ref) -> float:
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    assert torch.isfinite(out).all(), "non-finite output"
    return float((out - ref).norm() / ref.norm().clamp(min=1e-12))


# --------------------------------------------------------------------------------------------
# Log-probs from hidden states
# --------------------------------------------------------------------------------------------
def _linear_mode(monkeypatch, mode):
    """"chunked" / "fused": PYRL_TRITON_LINEAR; "blocked": the Triton rows on the vocabulary-blocked walk."""
    monkeypatch.setenv("PYRL_TRITON_LINEAR", "chunked" if mode == "blocked" else mode)
    if mode == "blocked":
        monkeypatch.setenv("PYRL_LINEAR", "blocked")


@pytest.mark.parametrize("mode", ["chunked", "fused", "blocked"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("n,h,v", [(1, 64, 1000), (257, 128, 32003), (600, 896, 151936)])
@pytest.mark.parametrize("with_bias,temperature", [(False, 1.0), (True, 0.7)], ids=["plain", "bias-temp"])
def test_fused_linear_logprobs_matches_float64(monkeypatch, mode, dtype, n, h, v, with_bias, temperature):
    # "chunked": cuBLAS GEMMs around the row kernels (the default for bf16); "fused": one Triton
    # kernel (the default for fp32); "blocked": token tiles x vocabulary blocks (2^25/H columns in bf16), the
    # Triton row kernels on each block. n=600 at V=151936 walks three 256-row chunks.
    _linear_mode(monkeypatch, mode)
    g = torch.Generator().manual_seed(n * 7 + v)
    hidden = torch.randn(n, h, generator=g).to(dtype)
    weight = (torch.randn(v, h, generator=g) * 2 / math.sqrt(h)).to(dtype)
    bias = torch.randn(v, generator=g).to(dtype) if with_bias else None
    targets = torch.randint(0, v, (n,), generator=g)
    if n > 2:
        targets[1::3] = -100
    g_logp, g_ent = torch.randn(n, generator=g), torch.randn(n, generator=g)

    hd, wd = hidden.cuda().requires_grad_(), weight.cuda().requires_grad_()
    bd = bias.cuda().requires_grad_() if with_bias else None
    logp, ent = pyrl.fused_linear_logprobs(hd, wd, targets.cuda(), bias=bd, temperature=temperature,
                                           return_entropy=True, backend="triton")
    ((logp * g_logp.cuda()).sum() + (ent * g_ent.cuda()).sum()).backward()

    h64, w64 = hidden.double().requires_grad_(), weight.double().requires_grad_()
    b64 = bias.double().requires_grad_() if with_bias else None
    rl, re = linear_logprobs_ref(h64, w64, targets, b64, temperature)
    ((rl * g_logp.double()).sum() + (re * g_ent.double()).sum()).backward()

    tol = TOL[dtype]
    assert logp.dtype == ent.dtype == torch.float32
    assert rel_err(logp, rl) <= tol["value"] and rel_err(ent, re) <= tol["value"]
    assert (logp <= 0).all() and (ent >= 0).all()
    ignored = (targets == -100).cuda()
    assert (logp[ignored] == 0).all() and (ent[ignored] == 0).all() and (hd.grad[ignored] == 0).all()
    assert hd.grad.dtype == wd.grad.dtype == dtype
    if mode in ("chunked", "blocked") and dtype == torch.bfloat16:
        assert norm_err(wd.grad, w64.grad) <= 1e-2, "d_weight (accumulated in bf16 across chunks or tiles)"
    assert rel_err(hd.grad, h64.grad) <= tol["grad"], "d_hidden"
    assert rel_err(wd.grad, w64.grad) <= tol["grad"], "d_weight"
    if with_bias:
        assert rel_err(bd.grad, b64.grad) <= tol["grad"], "d_bias"


def test_fused_linear_logprobs_auto_backend_is_triton_on_cuda():
    h = torch.randn(4, 32, device="cuda")
    w = torch.randn(100, 32, device="cuda")
    y = torch.randint(0, 100, (4,), device="cuda")
    a = pyrl.fused_linear_logprobs(h, w, y)
    b = pyrl.fused_linear_logprobs(h, w, y, backend="triton")
    assert torch.equal(a, b)


# --------------------------------------------------------------------------------------------
# Log-probs from logits (row kernels)
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("n,v", [(1, 2), (300, 32003), (16, 151936)])
@pytest.mark.parametrize("inplace", [False, True], ids=["copy", "inplace"])
def test_logprobs_from_logits_matches_float64(dtype, n, v, inplace):
    g = torch.Generator().manual_seed(n + v)
    logits = (3 * torch.randn(n, v, generator=g)).to(dtype)
    targets = torch.randint(0, v, (n,), generator=g)
    if v > 2:
        logits[0, : v // 2] = float("-inf")  # masked vocabulary entries contribute nothing
        targets[0] = v - 1
    if n > 2:
        targets[2::5] = -100
    g_logp, g_ent = torch.randn(n, generator=g), torch.randn(n, generator=g)

    x = logits.cuda().requires_grad_()
    logp, ent = pyrl.logprobs_from_logits(x, targets.cuda(), return_entropy=True, inplace_backward=inplace,
                                          backend="triton")
    ((logp * g_logp.cuda()).sum() + (ent * g_ent.cuda()).sum()).backward()

    x64 = logits.double().requires_grad_()
    rl, re = logprobs_ref(x64, targets)
    ((rl * g_logp.double()).sum() + (re * g_ent.double()).sum()).backward()
    tol = TOL[dtype]
    assert rel_err(logp, rl) <= tol["value"] and rel_err(ent, re) <= tol["value"]
    assert rel_err(x.grad, x64.grad) <= tol["grad"]
    if v > 2:
        assert (x.grad[0, : v // 2] == 0).all()


# --------------------------------------------------------------------------------------------
# The policy loss
# --------------------------------------------------------------------------------------------
def test_policy_loss_matches_float64_every_config():
    """Every config of the CPU reference test (tests/test_fused_policy_loss.py), on the GPU."""
    from test_fused_policy_loss import CONFIGS, _batch, _full_kl64

    failures = []
    for name, kwargs in CONFIGS.items():
        cfg = pyrl.PolicyLossConfig(**kwargs)
        hidden, weight, bias, targets, mask, adv, noise = _batch()
        valid = mask.bool()
        safe_t = torch.where(valid, targets, -100)
        with torch.no_grad():
            base, _ = linear_logprobs_ref(hidden, weight, safe_t, bias, cfg.temperature)
        old_logp, ref_logp, rollout_logp = ((base + noise()).float() for _ in range(3))
        ref_hidden = hidden + 0.2 * torch.randn(hidden.shape, generator=torch.Generator().manual_seed(1))
        kw = dict(old_logp=old_logp, ref_logp=ref_logp, rollout_logp=rollout_logp)
        if cfg.kl_type == "full":
            kw.update(ref_hidden=ref_hidden, ref_weight=weight, ref_bias=bias)
        cuda_kw = {k: t.cuda() for k, t in kw.items()}
        h, w, b = (x.cuda().requires_grad_() for x in (hidden, weight, bias))
        loss, metrics = pyrl.fused_linear_policy_loss(h, w, targets.cuda(), mask.cuda(), adv.cuda(), bias=b,
                                                      config=cfg, backend="triton", **cuda_kw)
        loss.backward()

        hd, wd, bd = (x.double().clone().requires_grad_() for x in (hidden, weight, bias))
        logp, ent = linear_logprobs_ref(hd, wd, safe_t, bd, cfg.temperature)
        kl = _full_kl64(hd, wd, bd, ref_hidden, weight, valid.double(), cfg.temperature) \
            if cfg.kl_type == "full" else None
        rloss, rmetrics = policy_loss_core(logp, adv.double(), mask, old_logp=old_logp.double(),
                                            ref_logp=ref_logp.double(), entropy=ent,
                                            rollout_logp=rollout_logp.double(), config=cfg, kl=kl)
        rloss.backward()
        errs = {"loss": abs(float(loss) - float(rloss)) / max(abs(float(rloss)), 1e-3)}
        errs.update({k: abs(float(metrics[k]) - float(v)) / max(abs(float(v)), 1e-3) for k, v in rmetrics.items()})
        errs.update(d_hidden=rel_err(h.grad, hd.grad), d_weight=rel_err(w.grad, wd.grad), d_bias=rel_err(b.grad, bd.grad))
        bad = {k: e for k, e in errs.items() if not e <= 2e-4}
        if bad:
            failures.append(f"{name}: {bad}")
        if not (h.grad[~valid.cuda()] == 0).all():
            failures.append(f"{name}: padding got a gradient")
    assert not failures, "\n".join(failures)


def test_policy_loss_realistic_bf16_shape():
    """bf16 at a Qwen-scale head: B=2, T=1024, H=4096, V=151936, against float64 on the GPU."""
    B, T, H, V = 2, 1024, 4096, 151936
    g = torch.Generator(device="cuda").manual_seed(0)
    hidden = torch.randn(B, T, H, device="cuda", generator=g).to(torch.bfloat16)
    weight = (torch.randn(V, H, device="cuda", generator=g) * 2 / math.sqrt(H)).to(torch.bfloat16)
    targets = torch.randint(0, V, (B, T), device="cuda", generator=g)
    mask = torch.ones(B, T, device="cuda")
    mask[0, 900:] = 0
    adv = torch.tensor([0.7, -1.1], device="cuda")
    cfg = pyrl.PolicyLossConfig(eps_high=0.28, beta=0.04, kl_type="k3", entropy_coef=0.01, agg="token-mean")
    safe_t = torch.where(mask.bool(), targets, -100)

    h64, w64 = hidden.double().requires_grad_(), weight.double().requires_grad_()
    logp64, ent64 = linear_logprobs_ref(h64, w64, safe_t)
    old_logp = (logp64.detach() + 0.2 * torch.randn(B, T, device="cuda", generator=g)).float()
    ref_logp = (logp64.detach() + 0.2 * torch.randn(B, T, device="cuda", generator=g)).float()
    rloss, _ = policy_loss_core(logp64, adv.double(), mask, old_logp=old_logp.double(), ref_logp=ref_logp.double(),
                                 entropy=ent64, rollout_logp=None, config=cfg)
    rloss.backward()
    ref_dh, ref_dw = h64.grad.cpu(), w64.grad.cpu()
    del h64, w64, logp64, ent64
    torch.cuda.empty_cache()

    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss, metrics = pyrl.fused_linear_policy_loss(h, w, targets, mask, adv, old_logp=old_logp, ref_logp=ref_logp,
                                                  config=cfg, backend="triton")
    loss.backward()
    assert abs(float(loss) - float(rloss)) <= 1e-3 * max(abs(float(rloss)), 1e-3)
    assert all(bool(torch.isfinite(m)) for m in metrics.values())
    assert norm_err(h.grad, ref_dh) <= 1e-2 and norm_err(w.grad, ref_dw) <= 1e-2
    assert rel_err(h.grad, ref_dh) <= 2e-2 and rel_err(w.grad, ref_dw) <= 2e-2


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"])
def test_policy_loss_all_masked_is_zero_and_finite(agg):
    B, T, H, V = 2, 9, 64, 1003
    h = torch.randn(B, T, H, device="cuda", requires_grad=True)
    w = torch.randn(V, H, device="cuda", requires_grad=True)
    y = torch.randint(0, V, (B, T), device="cuda")
    cfg = pyrl.PolicyLossConfig(agg=agg, entropy_coef=0.1, top_entropy_rho=0.5, max_completion_length=T)
    loss, metrics = pyrl.fused_linear_policy_loss(h, w, y, torch.zeros(B, T, device="cuda"),
                                                  torch.randn(B, device="cuda"), config=cfg, backend="triton")
    loss.backward()
    assert float(loss) == 0.0 and all(bool(torch.isfinite(m)) for m in metrics.values())
    assert (h.grad == 0).all() and (w.grad == 0).all()


# --------------------------------------------------------------------------------------------
# Batch invariance
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["chunked", "fused", "blocked"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_batch_invariance_bitwise(monkeypatch, mode, dtype):
    _linear_mode(monkeypatch, mode)
    g = torch.Generator(device="cuda").manual_seed(3)
    n, h, v = 3000, 128, 32003  # chunked: 1280-row chunks, so the slices below cross chunks
    hidden = torch.randn(n, h, device="cuda", generator=g).to(dtype)
    weight = torch.randn(v, h, device="cuda", generator=g).to(dtype) / math.sqrt(h)
    y = torch.randint(0, v, (n,), device="cuda", generator=g)
    full = pyrl.fused_linear_logprobs(hidden, weight, y, return_entropy=True, backend="triton")
    for rows in (slice(0, 1), slice(0, 37), slice(100, 300), slice(1200, 3000)):
        part = pyrl.fused_linear_logprobs(hidden[rows], weight, y[rows], return_entropy=True, backend="triton")
        assert torch.equal(part[0], full[0][rows]) and torch.equal(part[1], full[1][rows]), rows
    logits = (hidden @ weight.t()).contiguous()
    full = pyrl.logprobs_from_logits(logits, y, return_entropy=True, backend="triton")
    alone = pyrl.logprobs_from_logits(logits[5:6], y[5:6], return_entropy=True, backend="triton")
    assert torch.equal(alone[0], full[0][5:6]) and torch.equal(alone[1], full[1][5:6])


# --------------------------------------------------------------------------------------------
# Liger-Kernel parity on the GPU
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo"])
def test_fused_linear_grpo_loss_matches_liger_on_cuda(loss_type):
    liger = pytest.importorskip("liger_kernel.chunked_loss", reason="liger-kernel is not installed")
    from pyrl.nn import FusedLinearGRPOLoss

    B, T, H, V = 4, 64, 256, 4099
    g = torch.Generator(device="cuda").manual_seed(11)
    x = torch.randn(B, T, H, device="cuda", generator=g)
    w = torch.randn(V, H, device="cuda", generator=g) * 2 / math.sqrt(H)
    ids = torch.randint(0, V, (B, T), device="cuda", generator=g)
    mask = torch.ones(B, T, device="cuda")
    mask[0, 40:] = 0
    adv = torch.randn(B, device="cuda", generator=g)
    with torch.no_grad():
        base = pyrl.fused_linear_logprobs(x, w, ids, backend="torch")
    old = base + 0.3 * torch.randn(B, T, device="cuda", generator=g)
    ref = base + 0.3 * torch.randn(B, T, device="cuda", generator=g)
    kw = dict(beta=0.04, loss_type=loss_type, temperature=0.9)
    if loss_type == "dr_grpo":
        kw["max_completion_length"] = T
    if loss_type == "cispo":
        kw["epsilon_high"] = 3.0  # CISPO's bound is absolute (pyrl refuses one below 1)
    results = []
    for module in (FusedLinearGRPOLoss(**kw), liger.LigerFusedLinearGRPOLoss(compiled=False, **kw)):
        xi, wi = x.clone().requires_grad_(), w.clone().requires_grad_()
        loss, _ = module(xi, wi, ids, mask, adv, ref_per_token_logps=ref, old_per_token_logps=old)
        loss.backward()
        results.append((loss.detach(), xi.grad, wi.grad))
    (l1, dx1, dw1), (l2, dx2, dw2) = results
    # fp32 on tensor cores (pyrl: 3xTF32; Liger: torch matmuls at the default TF32 setting)
    torch.testing.assert_close(l1, l2, rtol=1e-3, atol=1e-5)
    assert norm_err(dx1, dx2) <= 5e-3 and norm_err(dw1, dw2) <= 5e-3
