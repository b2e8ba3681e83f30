"""The Triton backend (kernels/rows.py, kernels/fused_linear.py) against the float64 reference, on CPU via
the interpreter.

``TRITON_INTERPRET=1`` must be set before the kernels are defined (``triton.jit`` decides then
whether a kernel is compiled or interpreted), so it is set here, at import. Under the interpreter
each kernel has one small config (BLOCK_N=16, BLOCK_V=32, BLOCK_H=16, vocabulary slices of 128,
row blocks of 128), so the shapes below cross tile, slice and block boundaries.

Tolerances (absolute on log-probs/entropy; gradients relative to their largest entry): fp32 inputs
are computed in fp32 -> 1e-4; bf16 inputs are compared with the reference evaluated on the *same
rounded* inputs, at 2e-3 (the fused backward also rounds dz to bf16 before its two matmuls).
"""
import math
import os
import subprocess
import sys

os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from conftest import interpret_triton_stdlib  # noqa: E402

interpret_triton_stdlib()  # conftest imported triton before TRITON_INTERPRET=1 was set above

import pyrl  # noqa: E402
from _ref import linear_logprobs_ref, logprobs_ref  # noqa: E402

# The interpreter evaluates masked-out lanes too (e.g. log(0) on padding rows); numpy warns about
# values that the kernels then discard.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-3, torch.float16: 2e-3}


def _targets(n, v, ignore_frac=0.25):
    y = torch.randint(0, v, (n,))
    y[torch.rand(n) < ignore_frac] = -100
    if n > 1:
        y[-1] = -100  # at least one ignored row
    return y


def _grads(fn, inputs, g_logp, g_ent):
    logp, ent = fn()
    loss = (logp.double() * g_logp).sum() + (ent.double() * g_ent).sum()
    grads = torch.autograd.grad(loss, [x for x in inputs if x is not None])
    it = iter(grads)
    return logp, ent, [None if x is None else next(it) for x in inputs]


def _assert_grads_close(grads, rgrads, inputs, tol):
    for g, rg, x in zip(grads, rgrads, inputs):
        if x is None:
            continue
        assert g.dtype == x.dtype
        scale = rg.abs().max().clamp(min=1.0)
        torch.testing.assert_close(g.double() / scale, rg / scale, atol=4 * tol, rtol=0)


def _rounded_leaf(x):
    return x.detach().double().requires_grad_() if x is not None else None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,h,v,use_bias,temperature", [
    (1, 16, 37, False, 1.0),     # one row, V smaller than a vocabulary slice
    (6, 24, 1000, True, 0.7),    # H not a multiple of BLOCK_H, V not a multiple of BLOCK_V, 8 slices
    (17, 16, 130, True, 1.0),    # N crosses a token tile, the last slice holds 2 columns
])
def test_fused_linear_matches_float64(dtype, n, h, v, use_bias, temperature):
    _check_fused_linear(dtype, n, h, v, use_bias, temperature, grad_tol=TOL[dtype])


def _check_fused_linear(dtype, n, h, v, use_bias, temperature, grad_tol, **kw):
    """pyrl.fused_linear_logprobs(backend="triton", **kw): values and gradients against float64."""
    hidden = torch.randn(n, h).to(dtype).requires_grad_()
    weight = (torch.randn(v, h) / math.sqrt(h)).to(dtype).requires_grad_()
    bias = torch.randn(v).to(dtype).requires_grad_() if use_bias else None
    y = _targets(n, v)
    g1, g2 = torch.randn(n, dtype=torch.float64), torch.randn(n, dtype=torch.float64)
    inputs = [hidden, weight, bias]

    logp, ent, grads = _grads(lambda: pyrl.fused_linear_logprobs(
        hidden, weight, y, bias=bias, temperature=temperature, return_entropy=True, backend="triton", **kw),
        inputs, g1, g2)
    assert logp.dtype == torch.float32 and ent.dtype == torch.float32
    ref_inputs = [_rounded_leaf(x) for x in inputs]
    rlogp, rent, rgrads = _grads(lambda: linear_logprobs_ref(*ref_inputs[:2], y, ref_inputs[2], temperature),
                                 ref_inputs, g1, g2)

    tol = TOL[dtype]
    torch.testing.assert_close(logp.double(), rlogp, atol=tol, rtol=tol)
    torch.testing.assert_close(ent.double(), rent, atol=tol, rtol=tol)
    assert (logp <= 0).all() and (ent >= 0).all()
    _assert_grads_close(grads, rgrads, inputs, grad_tol)
    ign = y == -100
    assert (logp[ign] == 0).all() and (ent[ign] == 0).all() and (grads[0][ign] == 0).all()


def test_fused_linear_logp_only_and_partial_grads():
    # No entropy requested (its accumulators are skipped), hidden without grad, [B, T, H] input.
    b, t, h, v = 2, 3, 16, 77
    hidden = torch.randn(b, t, h)
    weight = (torch.randn(v, h) / 4).requires_grad_()
    bias = torch.randn(v).requires_grad_()
    y = torch.randint(0, v, (b, t))
    logp = pyrl.fused_linear_logprobs(hidden, weight, y, bias=bias, temperature=0.7, backend="triton")
    assert logp.shape == (b, t)
    g = torch.randn(b, t, dtype=torch.float64)
    dw, db = torch.autograd.grad((logp.double() * g).sum(), [weight, bias])
    wd, bd = _rounded_leaf(weight), _rounded_leaf(bias)
    rlogp, _ = linear_logprobs_ref(hidden.double(), wd, y, bd, 0.7)
    rdw, rdb = torch.autograd.grad((rlogp * g).sum(), [wd, bd])
    torch.testing.assert_close(logp.double(), rlogp, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(dw.double(), rdw, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(db.double(), rdb, atol=1e-4, rtol=1e-4)
    # Entropy only: the log-prob output gets no gradient (g_logp is None in backward).
    hidden.requires_grad_()
    _, ent = pyrl.fused_linear_logprobs(hidden, weight, y, return_entropy=True, backend="triton")
    (dh,) = torch.autograd.grad(ent.sum(), [hidden])
    hd = _rounded_leaf(hidden)
    (rdh,) = torch.autograd.grad(linear_logprobs_ref(hd, weight.double(), y)[1].sum(), [hd])
    torch.testing.assert_close(dh.double(), rdh, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,v", [(1, 37), (7, 1000), (3, 129)])
def test_logprobs_from_logits_matches_float64(dtype, n, v):
    logits = (3 * torch.randn(n, v)).to(dtype).requires_grad_()
    y = _targets(n, v)
    g1, g2 = torch.randn(n, dtype=torch.float64), torch.randn(n, dtype=torch.float64)
    logp, ent, (grad,) = _grads(lambda: pyrl.logprobs_from_logits(
        logits, y, temperature=0.7, return_entropy=True, backend="triton"), [logits], g1, g2)
    ld = _rounded_leaf(logits)
    rlogp, rent, (rgrad,) = _grads(lambda: logprobs_ref(ld, y, 0.7), [ld], g1, g2)
    tol = TOL[dtype]
    torch.testing.assert_close(logp.double(), rlogp, atol=tol, rtol=tol)
    torch.testing.assert_close(ent.double(), rent, atol=tol, rtol=tol)
    assert grad.dtype == dtype
    torch.testing.assert_close(grad.double(), rgrad, atol=4 * tol, rtol=4 * tol)
    assert (logp <= 0).all() and (ent >= 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inplace_backward_writes_the_gradient_into_the_logits(dtype):
    logits = (2 * torch.randn(6, 300)).to(dtype)
    y = _targets(6, 300)
    a = logits.clone().requires_grad_()
    lp, en = pyrl.logprobs_from_logits(a, y, temperature=0.7, return_entropy=True, backend="triton")
    (en + lp).sum().backward()
    leaf = logits.clone().requires_grad_()
    buf = leaf * 1.0  # a non-leaf buffer the op may overwrite
    lp, en = pyrl.logprobs_from_logits(buf, y, temperature=0.7, return_entropy=True, inplace_backward=True,
                                       backend="triton")
    (en + lp).sum().backward()
    assert torch.equal(leaf.grad, a.grad)
    assert torch.equal(buf.detach(), a.grad)  # the buffer now holds the gradient


def test_neg_inf_logits_stay_finite():
    v = 300
    logits = torch.randn(5, v) * 30
    logits[1, : v // 2] = float("-inf")  # half the vocabulary masked out
    logits[2, 5:] = float("-inf")  # all but five tokens masked out
    logits[3, 7] = float("-inf")  # the target itself is masked: logp = -inf
    logits[4, :] = float("-inf")  # no token possible at all
    logits = logits.requires_grad_()
    y = torch.tensor([0, v - 1, 3, 7, 4])
    logp, ent = pyrl.logprobs_from_logits(logits, y, return_entropy=True, backend="triton")
    rlogp, rent = logprobs_ref(logits.detach(), y)
    assert logp[3] == float("-inf") and logp[4] == float("-inf") and ent[4] == 0
    assert not torch.isnan(logp).any() and not torch.isnan(ent).any()
    assert (logp <= 0).all() and (ent >= 0).all()
    torch.testing.assert_close(logp[:4].double(), rlogp[:4], atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(ent[:4].double(), rent[:4], atol=1e-4, rtol=1e-5)
    (logp[:3].sum() + ent.sum()).backward()
    assert torch.isfinite(logits.grad).all()
    assert (logits.grad[1, : v // 2] == 0).all() and (logits.grad[4] == 0).all()


def test_fused_neg_inf_bias_masks_tokens():
    h, v = 16, 200
    hidden = torch.randn(3, h, requires_grad=True)
    weight = (torch.randn(v, h) / 4).requires_grad_()
    bias = torch.zeros(v)
    bias[150:] = float("-inf")  # tokens 150.. are banned (a whole vocabulary slice and a half)
    y = torch.tensor([3, 149, 170])
    logp, ent = pyrl.fused_linear_logprobs(hidden, weight, y, bias=bias, return_entropy=True, backend="triton")
    rlogp, rent = linear_logprobs_ref(hidden.detach(), weight.detach(), y, bias)
    assert logp[2] == float("-inf")
    torch.testing.assert_close(logp[:2].double(), rlogp[:2], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ent.double(), rent, atol=1e-4, rtol=1e-4)
    (logp[:2].sum() + ent.sum()).backward()
    assert torch.isfinite(hidden.grad).all() and torch.isfinite(weight.grad).all()
    assert (weight.grad[150:] == 0).all()


def test_all_rows_ignored_is_zero_and_finite():
    hidden = torch.randn(4, 16, requires_grad=True)
    weight = torch.randn(37, 16, requires_grad=True)
    bias = torch.randn(37, requires_grad=True)
    y = torch.full((4,), -100)
    logp, ent = pyrl.fused_linear_logprobs(hidden, weight, y, bias=bias, return_entropy=True, backend="triton")
    assert (logp == 0).all() and (ent == 0).all()
    (logp.sum() + ent.sum()).backward()
    assert (hidden.grad == 0).all() and (weight.grad == 0).all() and (bias.grad == 0).all()
    logits = (100 * torch.randn(4, 37)).requires_grad_()  # exp(logit) overflows: must not leak NaN
    logp, ent = pyrl.logprobs_from_logits(logits, y, return_entropy=True, backend="triton")
    assert (logp == 0).all() and (ent == 0).all()
    (logp.sum() + ent.sum()).backward()
    assert (logits.grad == 0).all()


def test_logits_path_is_batch_invariant_bitwise():
    logits = torch.randn(16, 301) * 4
    y = torch.randint(0, 301, (16,))
    full_lp, full_ent = pyrl.logprobs_from_logits(logits, y, return_entropy=True, backend="triton")
    for i in (0, 5, 15):
        lp, en = pyrl.logprobs_from_logits(logits[i:i + 1], y[i:i + 1], return_entropy=True, backend="triton")
        assert torch.equal(lp[0], full_lp[i]) and torch.equal(en[0], full_ent[i])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_path_is_batch_invariant_bitwise(dtype):
    hidden = torch.randn(16, 24).to(dtype)
    weight = (torch.randn(301, 24) / 4).to(dtype)
    bias = torch.randn(301).to(dtype)
    y = torch.randint(0, 301, (16,))
    full_lp, full_ent = pyrl.fused_linear_logprobs(hidden, weight, y, bias=bias, return_entropy=True,
                                                   backend="triton")
    for i in (0, 5, 15):
        lp, en = pyrl.fused_linear_logprobs(hidden[i:i + 1], weight, y[i:i + 1], bias=bias, return_entropy=True,
                                            backend="triton")
        assert torch.equal(lp[0], full_lp[i]) and torch.equal(en[0], full_ent[i])


def test_float64_is_refused_with_a_clear_error():
    with pytest.raises(TypeError, match="backend='triton' does not support float64; use backend='torch'"):
        pyrl.logprobs_from_logits(torch.randn(2, 5, dtype=torch.float64), torch.zeros(2, dtype=torch.long),
                                  backend="triton")
    with pytest.raises(TypeError, match="backend='triton' does not support float64"):
        pyrl.fused_linear_logprobs(torch.randn(2, 4, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64),
                                   torch.zeros(2, dtype=torch.long), backend="triton")


def test_empty_batch():
    weight = torch.randn(11, 16)
    out = pyrl.fused_linear_logprobs(torch.randn(0, 16), weight, torch.zeros(0, dtype=torch.long), backend="triton")
    assert out.shape == (0,)
    out = pyrl.logprobs_from_logits(torch.randn(0, 11), torch.zeros(0, dtype=torch.long), backend="triton")
    assert out.shape == (0,)


def test_importing_pyrl_does_not_import_triton():
    code = "import sys, pyrl, pyrl.kernels; assert 'triton' not in sys.modules, 'triton imported'"
    env = {k: val for k, val in os.environ.items() if k != "TRITON_INTERPRET"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


def test_kernels_compile_for_hopper():
    # The interpreter accepts code that the GPU compiler rejects: compile each kernel for sm90
    # ahead of time (Triton bundles ptxas; no GPU needed). `python -m pyrl.kernels.compile_check`
    # without --quick compiles every autotune config and reports registers, spills, shared memory.
    import triton

    if not os.path.exists(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")):
        pytest.skip("this Triton has no bundled ptxas")
    env = {k: val for k, val in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-m", "pyrl.kernels.compile_check", "--arch", "90", "--dtype", "bf16",
                          "--quick"], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    # the row kernels (forward, backward, the backward into 16-bit d logits, the block stats), the
    # sampler cutoff, 4 fused
    assert out.stdout.count("sm90") == 9, out.stdout


# --------------------------------------------------------------------------------------------
# The chunked body of backend="triton" (cuBLAS GEMMs per token chunk around the row kernels; the
# default for bf16/fp16 on CUDA), forced on CPU tensors with PYRL_TRITON_LINEAR=chunked.
# --------------------------------------------------------------------------------------------
@pytest.fixture
def chunked(monkeypatch):
    monkeypatch.setenv("PYRL_TRITON_LINEAR", "chunked")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,h,v,use_bias,temperature", [(1, 16, 37, False, 1.0), (70, 24, 1000, True, 0.7)])
def test_chunked_linear_matches_float64(chunked, dtype, n, h, v, use_bias, temperature):
    # 64 rows per chunk (the smallest): n=70 walks two chunks, the second padded to 64 rows. bf16:
    # d logits is rounded to bf16 before the gradient GEMMs and d_weight accumulates in bf16.
    _check_fused_linear(dtype, n, h, v, use_bias, temperature,
                        grad_tol=TOL[dtype] if dtype == torch.float32 else 4 * TOL[dtype], chunk_bytes=64 * v * 4)


def test_chunked_linear_is_batch_invariant_bitwise(chunked):
    # Every chunk GEMM is padded to the same row count, so a row's result never depends on N.
    n, h, v = 150, 16, 300
    hidden = torch.randn(n, h).to(torch.bfloat16)
    weight = torch.randn(v, h).to(torch.bfloat16)
    y = torch.randint(0, v, (n,))
    kw = dict(return_entropy=True, backend="triton", chunk_bytes=64 * v * 4)
    full = pyrl.fused_linear_logprobs(hidden, weight, y, **kw)
    for rows in (slice(0, 1), slice(64, 150), slice(3, 70)):
        part = pyrl.fused_linear_logprobs(hidden[rows], weight, y[rows], **kw)
        assert torch.equal(part[0], full[0][rows]) and torch.equal(part[1], full[1][rows])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_one_pass_policy_loss_matches_two_pass(chunked, dtype):
    # The token-separable config takes the one-pass plan on the chunked body; the torch backend's
    # two-pass plan on the same (rounded) inputs in float64 is the reference.
    B, T, H, V = 3, 50, 16, 300
    hidden = torch.randn(B, T, H).to(dtype)
    weight = (torch.randn(V, H) / math.sqrt(H)).to(dtype)
    y = torch.randint(0, V, (B, T))
    mask = torch.ones(B, T)
    mask[0, 30:] = 0
    adv = torch.randn(B)
    old = -torch.rand(B, T) * 5
    cfg = pyrl.PolicyLossConfig(eps_high=0.28, beta=0.05, kl_type="k3", entropy_coef=0.01, agg="seq-mean-token-mean")
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss, metrics = pyrl.fused_linear_policy_loss(h, w, y, mask, adv, old_logp=old, ref_logp=old - 0.1, config=cfg,
                                                  backend="triton", chunk_bytes=64 * V * 4)
    loss.backward()
    hd, wd = hidden.double().requires_grad_(), weight.double().requires_grad_()
    rloss, rmetrics = pyrl.fused_linear_policy_loss(hd, wd, y, mask, adv, old_logp=old.double(),
                                                    ref_logp=old.double() - 0.1, config=cfg, backend="torch")
    rloss.backward()
    tol = TOL[dtype]
    torch.testing.assert_close(loss.double(), rloss, atol=tol, rtol=tol)
    for k, v in rmetrics.items():
        torch.testing.assert_close(metrics[k].double(), v, atol=tol, rtol=tol, msg=k)
    for g, r in ((h.grad, hd.grad), (w.grad, wd.grad)):
        assert g.dtype == dtype
        scale = r.abs().max()
        assert float((g.double() - r).abs().max() / scale) <= (1e-4 if dtype == torch.float32 else 2e-2)


def test_unknown_triton_linear_mode_is_refused(monkeypatch):
    monkeypatch.setenv("PYRL_TRITON_LINEAR", "fast")
    with pytest.raises(ValueError, match="PYRL_TRITON_LINEAR must be"):
        pyrl.fused_linear_logprobs(torch.randn(2, 16), torch.randn(30, 16), torch.tensor([1, 2]), backend="triton")
