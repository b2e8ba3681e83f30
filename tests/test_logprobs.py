"""fused_linear_logprobs / logprobs_from_logits on every CPU backend against the float64 reference."""
import math

import pytest
import torch

import pyrl
from _ref import linear_logprobs_ref, logprobs_ref
from conftest import CPU_BACKENDS

# Tolerances (absolute, on log-probs/entropy of O(1..10) magnitude; gradients relative to their max):
# fp32 computes in fp32 -> 1e-4; bf16 inputs are rounded to 8 bits of mantissa before the fp32 math,
# so they are compared with the reference evaluated on the *same rounded* inputs, at 2e-3.
TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-3, torch.float16: 2e-3, torch.float64: 1e-10}

SHAPES = [  # (N, H, V): N=1, V=1, V=2, V not a multiple of any block, V crossing the C++ 2048 block
    (1, 8, 1),
    (1, 4, 2),
    (5, 16, 37),
    (13, 24, 2049),
    (33, 8, 4099),
]


def _targets(n, v, ignore_frac=0.25):
    y = torch.randint(0, v, (n,))
    y[torch.rand(n) < ignore_frac] = -100
    return y


def _grads(fn, inputs, g_logp, g_ent):
    for x in inputs:
        if x is not None:
            x.grad = None
    logp, ent = fn()
    ((logp.double() * g_logp).sum() + (ent.double() * g_ent).sum()).backward()
    return logp, ent, [None if x is None else x.grad for x in inputs]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,h,v", SHAPES)
@pytest.mark.parametrize("use_bias,temperature", [(False, 1.0), (True, 0.7)])
def test_fused_linear_matches_float64(backend, dtype, n, h, v, use_bias, temperature):
    hidden = torch.randn(n, h).to(dtype).requires_grad_()
    weight = (torch.randn(v, h) / math.sqrt(h)).to(dtype).requires_grad_()
    bias = torch.randn(v).to(dtype).requires_grad_() if use_bias else None
    y = _targets(n, v)
    g1, g2 = torch.randn(n, dtype=torch.float64), torch.randn(n, dtype=torch.float64)

    # Small chunks so the chunk loop (and its last partial chunk) is exercised.
    fn = lambda: pyrl.fused_linear_logprobs(hidden, weight, y, bias=bias, temperature=temperature,  # noqa: E731
                                            return_entropy=True, backend=backend, chunk_bytes=4 * v * 4)
    logp, ent, grads = _grads(fn, [hidden, weight, bias], g1, g2)
    assert logp.dtype == torch.float32 and ent.dtype == torch.float32

    hd, wd = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    bd = bias.detach().double().requires_grad_() if use_bias else None
    ref = lambda: linear_logprobs_ref(hd, wd, y, bd, temperature)  # noqa: E731
    rlogp, rent, rgrads = _grads(ref, [hd, wd, bd], g1, g2)

    tol = TOL[dtype]
    torch.testing.assert_close(logp.double(), rlogp, atol=tol, rtol=tol)
    torch.testing.assert_close(ent.double(), rent, atol=tol, rtol=tol)
    assert (logp <= 0).all()
    for g, rg, x in zip(grads, rgrads, [hidden, weight, bias]):
        if x is None:
            continue
        assert g.dtype == x.dtype
        scale = rg.abs().max().clamp(min=1.0)
        torch.testing.assert_close(g.double() / scale, rg / scale, atol=4 * tol, rtol=0)
    # Ignored rows: exactly zero outputs and zero hidden gradient.
    ign = y == -100
    assert (logp[ign] == 0).all() and (ent[ign] == 0).all()
    assert (grads[0][ign] == 0).all()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,v", [(1, 1), (1, 2), (7, 37), (9, 2048), (17, 5000)])
def test_logprobs_from_logits_matches_float64(backend, dtype, n, v):
    logits = (3 * torch.randn(n, v)).to(dtype).requires_grad_()
    y = _targets(n, v)
    g1, g2 = torch.randn(n, dtype=torch.float64), torch.randn(n, dtype=torch.float64)
    fn = lambda: pyrl.logprobs_from_logits(logits, y, temperature=1.3, return_entropy=True, backend=backend)  # noqa: E731
    logp, ent, (grad,) = _grads(fn, [logits], g1, g2)
    ld = logits.detach().double().requires_grad_()
    rlogp, rent, (rgrad,) = _grads(lambda: logprobs_ref(ld, y, 1.3), [ld], g1, g2)
    tol = TOL[dtype]
    torch.testing.assert_close(logp.double(), rlogp, atol=tol, rtol=tol)
    torch.testing.assert_close(ent.double(), rent, atol=tol, rtol=tol)
    assert grad.dtype == dtype
    torch.testing.assert_close(grad.double(), rgrad, atol=4 * tol, rtol=4 * tol)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_gradcheck_float64(backend):
    n, h, v = 6, 5, 23
    hidden = torch.randn(n, h, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(v, h, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(v, dtype=torch.float64, requires_grad=True)
    y = _targets(n, v)
    y[0] = -100

    def fused(hh, ww, bb):
        return pyrl.fused_linear_logprobs(hh, ww, y, bias=bb, temperature=0.8, return_entropy=True,
                                          backend=backend, chunk_bytes=2 * v * 4)

    assert torch.autograd.gradcheck(fused, (hidden, weight, bias))
    logits = torch.randn(n, v, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x: pyrl.logprobs_from_logits(x, y, temperature=1.7, return_entropy=True, backend=backend), (logits,))
    assert torch.autograd.gradcheck(lambda x: pyrl.logprobs_from_logits(x, y, backend=backend), (logits,))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_shapes_and_return_forms(backend):
    b, t, h, v = 2, 3, 4, 11
    hidden = torch.randn(b, t, h)
    weight = torch.randn(v, h)
    y = torch.randint(0, v, (b, t))
    logp = pyrl.fused_linear_logprobs(hidden, weight, y, backend=backend)
    assert logp.shape == (b, t)
    logp2, ent = pyrl.fused_linear_logprobs(hidden, weight, y, return_entropy=True, backend=backend)
    torch.testing.assert_close(logp, logp2)
    assert ent.shape == (b, t)
    # Zero tokens: empty outputs, no error.
    empty = pyrl.fused_linear_logprobs(torch.randn(0, h), weight, torch.zeros(0, dtype=torch.long), backend=backend)
    assert empty.shape == (0,)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_all_rows_ignored_is_zero_and_finite(backend):
    hidden = torch.randn(4, 8, requires_grad=True)
    weight = torch.randn(19, 8, requires_grad=True)
    y = torch.full((4,), -100)
    logp, ent = pyrl.fused_linear_logprobs(hidden, weight, y, return_entropy=True, backend=backend)
    assert (logp == 0).all() and (ent == 0).all()
    (logp.sum() + ent.sum()).backward()
    assert (hidden.grad == 0).all() and (weight.grad == 0).all()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_neg_inf_and_extreme_logits_stay_finite(backend):
    v = 3000
    logits = torch.randn(4, v) * 1e4  # +-1e4 logits
    logits[1, : v // 2] = float("-inf")  # half the vocabulary masked out
    logits[2, 5:] = float("-inf")  # all but five tokens masked out
    logits = logits.requires_grad_()
    y = torch.tensor([0, v - 1, 3, 7])
    logp, ent = pyrl.logprobs_from_logits(logits, y, return_entropy=True, backend=backend)
    rlogp, rent = logprobs_ref(logits.detach(), y)
    assert torch.isfinite(logp).all() and torch.isfinite(ent).all()
    assert (logp <= 0).all() and (ent >= 0).all() and (ent <= math.log(v) + 1e-4).all()
    torch.testing.assert_close(logp.double(), rlogp, atol=1e-2, rtol=1e-6)
    torch.testing.assert_close(ent.double(), rent, atol=1e-3, rtol=1e-4)
    (logp.sum() + ent.sum()).backward()
    assert torch.isfinite(logits.grad).all()
    assert (logits.grad[1, : v // 2] == 0).all()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_target_at_neg_inf_gives_neg_inf_not_nan(backend):
    logits = torch.randn(2, 10)
    logits[0, 3] = float("-inf")
    logits[1, :] = float("-inf")  # no token possible at all
    logits.requires_grad_()
    logp, ent = pyrl.logprobs_from_logits(logits, torch.tensor([3, 4]), return_entropy=True, backend=backend)
    assert logp[0] == float("-inf") and logp[1] == float("-inf")
    assert not torch.isnan(ent).any() and ent[1] == 0
    (ent.sum()).backward()
    assert torch.isfinite(logits.grad).all()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_inplace_backward_matches_and_reuses_buffer(backend):
    logits = torch.randn(6, 300)
    y = _targets(6, 300)
    a = logits.clone().requires_grad_()
    pyrl.logprobs_from_logits(a, y, return_entropy=True, backend=backend)[1].sum().backward()
    leaf = logits.clone().requires_grad_()
    b = leaf * 1.0  # a non-leaf buffer the op may overwrite
    lp, en = pyrl.logprobs_from_logits(b, y, return_entropy=True, inplace_backward=True, backend=backend)
    en.sum().backward()
    torch.testing.assert_close(leaf.grad, a.grad)
    torch.testing.assert_close(b.detach(), a.grad)  # the buffer now holds the gradient


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_logits_path_is_batch_invariant_bitwise(backend):
    logits = torch.randn(16, 3001)
    y = torch.randint(0, 3001, (16,))
    full_lp, full_ent = pyrl.logprobs_from_logits(logits, y, return_entropy=True, backend=backend)
    for i in (0, 5, 15):
        lp, en = pyrl.logprobs_from_logits(logits[i:i + 1], y[i:i + 1], return_entropy=True, backend=backend)
        assert torch.equal(lp[0], full_lp[i]) and torch.equal(en[0], full_ent[i])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_chunk_size_does_not_change_results(backend):
    hidden, weight = torch.randn(37, 16), torch.randn(101, 16)
    y = _targets(37, 101)
    a = pyrl.fused_linear_logprobs(hidden, weight, y, return_entropy=True, backend=backend, chunk_bytes=1)
    b = pyrl.fused_linear_logprobs(hidden, weight, y, return_entropy=True, backend=backend)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_backends_agree_with_each_other():
    if not pyrl.backends()["cpp"]["available"]:
        pytest.skip("pyrl._C not built")
    logits = torch.randn(64, 4097) * 5
    y = _targets(64, 4097)
    a = pyrl.logprobs_from_logits(logits, y, return_entropy=True, backend="torch")
    b = pyrl.logprobs_from_logits(logits, y, return_entropy=True, backend="cpp")
    torch.testing.assert_close(a, b, atol=2e-5, rtol=2e-5)


def test_auto_backend_picks_cpp_on_cpu_when_built():
    expected = "cpp" if pyrl.backends()["cpp"]["available"] else "torch"
    plan = pyrl.explain("logprobs_from_logits", torch.randn(2, 5), torch.zeros(2, dtype=torch.long))
    assert plan.startswith(f"logprobs_from_logits: backend={expected},")


@pytest.mark.parametrize("compile_backend", ["aot_eager"])
def test_cpp_op_traces_under_torch_compile(compile_backend):
    if not pyrl.backends()["cpp"]["available"]:
        pytest.skip("pyrl._C not built")
    logits = torch.randn(5, 50, requires_grad=True)
    y = torch.randint(0, 50, (5,))

    def step(x):
        lp, en = pyrl.logprobs_from_logits(x * 2.0, y, return_entropy=True, backend="cpp")
        return (lp + 0.1 * en).sum()

    compiled = torch.compile(step, backend=compile_backend, fullgraph=False)
    out = compiled(logits)
    out.backward()
    g_compiled = logits.grad.clone()
    logits.grad = None
    step(logits).backward()
    torch.testing.assert_close(out, step(logits))
    torch.testing.assert_close(g_compiled, logits.grad)


# ---------------------------------------------------------------- validation: clear errors
def _good():
    return torch.randn(3, 4), torch.randn(7, 4), torch.tensor([0, 6, -100])


@pytest.mark.parametrize("mutate,exc,match", [
    (lambda h, w, y: (h.long(), w, y), TypeError, "hidden must have dtype"),
    (lambda h, w, y: (h, w[:, :3], y), ValueError, r"weight must have shape \[V, H\] with H = hidden.shape\[-1\] = 4"),
    (lambda h, w, y: (h, w.double(), y), TypeError, "weight must have the dtype of hidden"),
    (lambda h, w, y: (h, w[0], y), ValueError, "weight must be 2-D"),
    (lambda h, w, y: (h, w, y.float()), TypeError, "targets must have dtype"),
    (lambda h, w, y: (h, w, y[:2]), ValueError, r"targets must have shape \[3\]"),
    (lambda h, w, y: (h, w, torch.tensor([0, 7, 1])), ValueError, r"ids in \[0, 7\).*found 7"),
    (lambda h, w, y: (h, w, torch.tensor([0, -1, 1])), ValueError, "found -1"),
    (lambda h, w, y: ("h", w, y), TypeError, "hidden must be a torch.Tensor"),
])
def test_fused_linear_rejects_bad_input(mutate, exc, match):
    h, w, y = mutate(*_good())
    with pytest.raises(exc, match=match):
        pyrl.fused_linear_logprobs(h, w, y)


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(temperature=0.0), ValueError, "temperature must be a finite number > 0"),
    (dict(temperature=float("nan")), ValueError, "temperature"),
    (dict(backend="cuda"), ValueError, "backend must be one of"),
    (dict(bias=torch.randn(6)), ValueError, r"bias must have shape \[V\] = \[7\]"),
    (dict(ignore_index=-100.0), TypeError, "ignore_index must be an int"),
])
def test_fused_linear_rejects_bad_options(kwargs, exc, match):
    h, w, y = _good()
    with pytest.raises(exc, match=match):
        pyrl.fused_linear_logprobs(h, w, y, **kwargs)


def test_logits_rejects_bad_input():
    with pytest.raises(ValueError, match=r"targets must have shape \[2\]"):
        pyrl.logprobs_from_logits(torch.randn(2, 5), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="vocabulary dimension"):
        pyrl.logprobs_from_logits(torch.randn(2, 0), torch.zeros(2, dtype=torch.long))
    with pytest.raises(TypeError, match="logits must have dtype"):
        pyrl.logprobs_from_logits(torch.ones(2, 5, dtype=torch.long), torch.zeros(2, dtype=torch.long))


def test_unavailable_backend_says_why(monkeypatch):
    import pyrl._backend as be

    monkeypatch.setattr(be, "_C", None)
    monkeypatch.setattr(be, "_C_ERROR", "ImportError: simulated")
    with pytest.raises(RuntimeError, match="backend='cpp' is not available: pyrl._C did not import"):
        pyrl.logprobs_from_logits(torch.randn(2, 5), torch.zeros(2, dtype=torch.long), backend="cpp")
    # auto falls back to the reference
    out = pyrl.logprobs_from_logits(torch.randn(2, 5), torch.zeros(2, dtype=torch.long), backend="auto")
    assert torch.isfinite(out).all()
    assert be.backends()["cpp"]["available"] is False


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_ignored_rows_with_huge_logits_keep_gradients_finite(backend):
    # Regression: an ignored row used lse=0 in backward, so exp(z) overflowed and inf*0 gave NaN.
    hidden = torch.randn(4, 8, requires_grad=True)
    weight = (torch.randn(30, 8) * 30).requires_grad_()
    y = torch.tensor([1, -100, 3, -100])
    lp, en = pyrl.fused_linear_logprobs(hidden, weight, y, temperature=0.1, return_entropy=True, backend=backend)
    (lp.sum() + en.sum()).backward()
    assert torch.isfinite(weight.grad).all() and torch.isfinite(hidden.grad).all()
    assert (hidden.grad[1] == 0).all() and (hidden.grad[3] == 0).all()


def test_fused_linear_cpp_op_traces_under_torch_compile():
    if not pyrl.backends()["cpp"]["available"]:
        pytest.skip("pyrl._C not built")
    hidden = torch.randn(9, 8, requires_grad=True)
    weight = torch.randn(31, 8, requires_grad=True)
    y = _targets(9, 31)

    def step(h, w):
        lp, en = pyrl.fused_linear_logprobs(h, w, y, return_entropy=True, backend="cpp", chunk_bytes=4 * 31 * 4)
        return (lp - 0.1 * en).sum()

    out = torch.compile(step, backend="aot_eager", fullgraph=False)(hidden, weight)
    out.backward()
    gh, gw = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    ref = step(hidden, weight)
    ref.backward()
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(gh, hidden.grad)
    torch.testing.assert_close(gw, weight.grad)
