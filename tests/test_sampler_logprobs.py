"""Log-probs under the sampler's truncated distribution (top_k / top_p / min_p, docs/formulas.md §1.1)
on every backend, against a float64 reference written from HF's warpers (tests/_ref.py) and against
HF's warpers themselves.

Triton runs under its CPU interpreter: ``TRITON_INTERPRET=1`` is set at import, as in test_triton.py.

Tolerances (absolute on log-probs/entropy; gradients relative to their largest entry): fp32 1e-4,
bf16 2e-3 against the reference evaluated on the same rounded inputs (as tests/test_logprobs.py),
gradients 4x that. The kept set itself must match exactly: rows whose reference kept set changes
when top_p / min_p move by 1e-4 (relative) sit on a rounding boundary and are marked ignore_index.
"""
import importlib.util
import math
import os

os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

import pyrl  # noqa: E402
from _ref import sampler_keep_ref, sampler_logprobs_ref  # noqa: E402
from conftest import CPU_BACKENDS  # noqa: E402

HAS_TRITON = importlib.util.find_spec("triton") is not None
if HAS_TRITON:
    from conftest import interpret_triton_stdlib

    interpret_triton_stdlib()

TRITON = pytest.param("triton", marks=pytest.mark.skipif(not HAS_TRITON, reason="no triton"))
BACKENDS = CPU_BACKENDS + [TRITON]
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter evaluates masked lanes

TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-3}

SETTINGS = [
    dict(top_k=5),
    dict(top_p=0.9),
    dict(min_p=0.1),
    dict(top_k=20, top_p=0.8, min_p=0.05),
    dict(top_k=20, top_p=0.8, min_p=0.05, sampler_order="vllm"),
    dict(top_p=0.6, min_p=0.2, sampler_order="vllm"),
]


def _ids(kw):
    return ",".join(f"{k}={v}" for k, v in kw.items())


def _cases(backends, *axes, ids=None):
    """pytest params of every backend (with its skip marks) times the product of ``axes``."""
    import itertools

    out = []
    for b in backends:
        name, marks = (b.values[0], b.marks) if hasattr(b, "values") else (b, ())
        for combo in itertools.product(*axes):
            out.append(pytest.param(name, *combo, marks=marks, id="-".join([name, *map(str, ids(*combo))])))
    return out


# The interpreter runs a Triton kernel ~1000x slower than compiled: Triton gets a subset of the grid.
_DTYPES = (torch.float32, torch.bfloat16)
_LOGITS_IDS = lambda dt, nv, kw: (dt, f"{nv[0]}x{nv[1]}", _ids(kw))  # noqa: E731
LOGITS_CASES = _cases(CPU_BACKENDS, _DTYPES, ((1, 37), (9, 2), (13, 301), (6, 2049)), SETTINGS, ids=_LOGITS_IDS) + \
    _cases([TRITON], _DTYPES, ((1, 37), (9, 2), (13, 301)), (SETTINGS[0], SETTINGS[3], SETTINGS[5]), ids=_LOGITS_IDS)


def _ref_kw(kw):
    return dict(top_k=kw.get("top_k"), top_p=kw.get("top_p"), min_p=kw.get("min_p"),
                order=kw.get("sampler_order", "hf"))


def _robust(logits, temperature, kw):
    """Rows whose reference kept set does not move when top_p and min_p move by 1e-4 (relative)."""
    ref = _ref_kw(kw)
    keep = sampler_keep_ref(logits, temperature, **ref)[1]
    same = torch.ones(keep.shape[0], dtype=torch.bool)
    for f in (1 - 1e-4, 1 + 1e-4):
        moved = dict(ref, top_p=None if ref["top_p"] is None else min(1.0, ref["top_p"] * f),
                     min_p=None if ref["min_p"] is None else min(1.0, ref["min_p"] * f))
        same &= (sampler_keep_ref(logits, temperature, **moved)[1] == keep).all(-1)
    return same


def _targets(logits, temperature, kw, outside_frac=0.25, ignore_frac=0.15):
    """Targets drawn from the reference's truncated distribution, some replaced by uniform ids (most
    of them outside the kept set), some ignored, and every non-robust row ignored."""
    z, keep = sampler_keep_ref(logits, temperature, **_ref_kw(kw))
    n, v = z.shape
    y = torch.multinomial(torch.softmax(z.masked_fill(~keep, float("-inf")), -1), 1).squeeze(1)
    y = torch.where(torch.rand(n) < outside_frac, torch.randint(0, v, (n,)), y)
    y[torch.rand(n) < ignore_frac] = -100
    y[~_robust(logits, temperature, kw)] = -100
    return y


def _loss(logp, ent, g1, g2):
    """A weighted sum of the finite log-probs and the entropies (a -inf log-prob has no gradient)."""
    return (torch.where(torch.isfinite(logp), logp.double(), 0.0) * g1).sum() + (ent.double() * g2).sum()


def _check(logp, ent, rlogp, rent, tol):
    fin = torch.isfinite(rlogp)
    assert torch.equal(torch.isfinite(logp), fin), "the kept sets differ"
    assert not torch.isnan(logp).any() and (logp <= 0).all() and (ent >= 0).all()
    torch.testing.assert_close(logp.double()[fin], rlogp[fin], atol=tol, rtol=tol)
    torch.testing.assert_close(ent.double(), rent, atol=tol, rtol=tol)


def _assert_grad_close(g, rg, tol):
    assert torch.isfinite(g).all()
    scale = rg.abs().max().clamp(min=1.0)
    torch.testing.assert_close(g.double() / scale, rg / scale, atol=4 * tol, rtol=0)


@pytest.mark.parametrize("backend,dtype,nv,kw", LOGITS_CASES)
def test_logprobs_from_logits_match_float64(backend, dtype, nv, kw):
    n, v = nv
    temperature = 0.8
    logits = (3 * torch.randn(n, v)).to(dtype)
    y = _targets(logits, temperature, kw)
    g1, g2 = torch.randn(n, dtype=torch.float64), torch.randn(n, dtype=torch.float64)
    x = logits.clone().requires_grad_()
    logp, ent = pyrl.logprobs_from_logits(x, y, temperature=temperature, return_entropy=True, backend=backend, **kw)
    (grad,) = torch.autograd.grad(_loss(logp, ent, g1, g2), [x])
    xd = logits.double().requires_grad_()
    rlogp, rent = sampler_logprobs_ref(xd, y, temperature, **_ref_kw(kw))
    (rgrad,) = torch.autograd.grad(_loss(rlogp, rent, g1, g2), [xd])
    _check(logp, ent, rlogp, rent, TOL[dtype])
    _assert_grad_close(grad, rgrad, TOL[dtype])
    # the gradient lives on the kept set only (and on no ignored row)
    keep = sampler_keep_ref(logits, temperature, **_ref_kw(kw))[1]
    assert (grad[~keep] == 0).all() and (grad[y == -100] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kw", [SETTINGS[3], SETTINGS[5]], ids=["hf", "vllm"])
def test_fused_linear_matches_float64(backend, dtype, kw):
    n, h, v, temperature = 19, 16, 301, 0.9
    hidden = torch.randn(n, h).to(dtype).requires_grad_()
    weight = (3 * torch.randn(v, h) / math.sqrt(h)).to(dtype).requires_grad_()
    bias = torch.randn(v).to(dtype).requires_grad_()
    hd, wd, bd = (t.detach().double().requires_grad_() for t in (hidden, weight, bias))
    y = _targets((hd @ wd.t() + bd).detach(), temperature, kw)
    g1, g2 = torch.randn(n, dtype=torch.float64), torch.randn(n, dtype=torch.float64)
    # chunks of 4 rows: the kept sets are found chunk by chunk, and the last chunk is partial
    logp, ent = pyrl.fused_linear_logprobs(hidden, weight, y, bias=bias, temperature=temperature, return_entropy=True,
                                           backend=backend, chunk_bytes=4 * v * 4, **kw)
    grads = torch.autograd.grad(_loss(logp, ent, g1, g2), [hidden, weight, bias])
    rlogp, rent = sampler_logprobs_ref(hd @ wd.t() + bd, y, temperature, **_ref_kw(kw))
    rgrads = torch.autograd.grad(_loss(rlogp, rent, g1, g2), [hd, wd, bd])
    _check(logp, ent, rlogp, rent, TOL[dtype])
    for g, rg, t in zip(grads, rgrads, (hidden, weight, bias)):
        assert g.dtype == t.dtype
        _assert_grad_close(g, rg, TOL[dtype])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kw", SETTINGS, ids=_ids)
def test_matches_hf_warpers(backend, kw):
    """HF's own warpers on fp32 logits, in HF generate's order, or in vLLM v1's (min-p first)."""
    from transformers.generation.logits_process import (LogitsProcessorList, MinPLogitsWarper,
                                                        TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)

    n, v, temperature = (24, 997, 0.7) if backend != "triton" else (6, 300, 0.7)
    logits = 3 * torch.randn(n, v)
    warpers = {"top_k": lambda: TopKLogitsWarper(kw["top_k"]), "top_p": lambda: TopPLogitsWarper(kw["top_p"]),
               "min_p": lambda: MinPLogitsWarper(kw["min_p"])}
    order = ("top_k", "top_p", "min_p") if kw.get("sampler_order", "hf") == "hf" else ("min_p", "top_k", "top_p")
    procs = LogitsProcessorList([TemperatureLogitsWarper(temperature)] + [warpers[k]() for k in order if k in kw])
    want_all = torch.log_softmax(procs(None, logits.clone()), -1)
    sampled = torch.multinomial(want_all.exp(), 1).squeeze(1)
    for y in (sampled, want_all.argmax(-1), torch.randint(0, v, (n,))):
        y = torch.where(_robust(logits, temperature, kw), y, -100)
        got = pyrl.logprobs_from_logits(logits, y, temperature=temperature, backend=backend, **kw)
        want = torch.where(y != -100, want_all.gather(1, torch.where(y != -100, y, 0)[:, None])[:, 0], 0.0)
        assert torch.equal(torch.isfinite(got), torch.isfinite(want))
        fin = torch.isfinite(want)
        torch.testing.assert_close(got[fin], want[fin], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_edge_rows(backend):
    """Ties, top_k >= V, top_p = 1, one token holding all the mass, an all -inf row, length 1."""
    v = 8
    plain = lambda x, y, **kw: pyrl.logprobs_from_logits(x, y, return_entropy=True, backend=backend, **kw)  # noqa
    x = torch.randn(3, v)
    y = torch.tensor([0, 5, -100])
    for kw in (dict(top_k=v), dict(top_k=v + 10), dict(top_p=1.0), dict(min_p=0.0), dict(top_p=1.0, top_k=v)):
        for a, b in zip(plain(x, y, **kw), plain(x, y)):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    # ties: 4 tokens at the top share the mass; top_k=2 and top_p=0.3 keep all four (HF's top-p keeps
    # the two of them its sort puts last; pyrl keeps every token tied with the boundary, §1.1)
    tied = torch.tensor([[2.0, 2.0, 2.0, 2.0, 0.0, -1.0, -1.0, -3.0]])
    for kw in (dict(top_k=2), dict(top_p=0.3), dict(top_k=4, top_p=0.01)):
        logp, ent = plain(tied, torch.tensor([1]), **kw)
        torch.testing.assert_close(logp, torch.tensor([math.log(0.25)]))
        torch.testing.assert_close(ent, torch.tensor([math.log(4.0)]))
    # one token holds (nearly) all the mass: the others are outside every truncation's kept set
    peaked = torch.full((2, v), -40.0)
    peaked[:, 3] = 10.0
    x = peaked.clone().requires_grad_()
    logp, ent = plain(x, torch.tensor([3, 4]), top_p=0.95)
    assert logp[0] == 0 and logp[1] == float("-inf") and (ent == 0).all()
    (logp.sum() + ent.sum()).backward()  # a -inf log-prob backpropagates zero, never NaN
    assert (x.grad == 0).all()
    # an all -inf row (nothing to sample) and a row with -inf logits: no NaN anywhere
    x = torch.tensor([[float("-inf")] * 4, [0.0, float("-inf"), 1.0, 2.0]]).requires_grad_()
    logp, ent = plain(x, torch.tensor([1, 3]), top_k=2, top_p=0.5, min_p=0.1)
    assert logp[0] == float("-inf") and logp[1] == 0 and (ent == 0).all()
    (torch.where(torch.isfinite(logp), logp, 0).sum() + ent.sum()).backward()
    assert torch.isfinite(x.grad).all()
    # length 1 and an empty batch
    one = pyrl.logprobs_from_logits(torch.tensor([[1.0, 3.0, 2.0]]), torch.tensor([2]), top_k=2, backend=backend)
    torch.testing.assert_close(one, torch.log_softmax(torch.tensor([3.0, 2.0]), 0)[1:])
    assert pyrl.logprobs_from_logits(torch.zeros(0, 5), torch.zeros(0, dtype=torch.long), top_p=0.5,
                                     backend=backend).shape == (0,)


@pytest.mark.skipif(not pyrl.backends()["cpp"]["available"], reason="pyrl._C not built")
def test_cpp_top_p_search_equals_sort():
    """The C++ threshold search and the sort it was measured against find the same thresholds."""
    from pyrl.kernels.reference import RowParams
    from pyrl.ops.walk import CppRows

    x = torch.randn(6, 20011) * 4
    x[0, ::3] = 1.5  # large tie groups
    for kw in (dict(top_p=0.9), dict(top_p=0.5, top_k=100), dict(top_p=0.99, min_p=0.01)):
        p = RowParams(0.9, -100, False, kw.get("top_k"), kw["top_p"], kw.get("min_p"))
        assert torch.equal(CppRows.cutoff(x, p), CppRows.cutoff(x, p, sort_top_p=True))


def test_bad_values_and_plans():
    x, y = torch.randn(2, 5), torch.tensor([0, 1])
    bad = [(dict(top_k=0), "top_k must be an int >= 1"), (dict(top_k=-3), "top_k must be an int >= 1"),
           (dict(top_p=0.0), r"top_p must be in \(0, 1\]"), (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
           (dict(min_p=-0.1), r"min_p must be in \[0, 1\]"), (dict(min_p=2.0), r"min_p must be in \[0, 1\]"),
           (dict(sampler_order="sglang"), "sampler_order must be one of 'hf', 'vllm'")]
    for kw, msg in bad:
        with pytest.raises(ValueError, match=msg):
            pyrl.logprobs_from_logits(x, y, **kw)
        with pytest.raises(ValueError, match=msg):
            pyrl.fused_linear_logprobs(torch.randn(2, 3), torch.randn(5, 3), y, **kw)
        with pytest.raises(ValueError, match="PolicyLossConfig." + msg):
            pyrl.PolicyLossConfig(**kw)
    with pytest.raises(TypeError, match="top_k must be an int"):
        pyrl.logprobs_from_logits(x, y, top_k=2.0)
    with pytest.raises(ValueError, match="not supported with vocab_parallel_group"):
        pyrl.fused_linear_logprobs(torch.randn(2, 3), torch.randn(5, 3), y, top_p=0.9, vocab_parallel_group=object())
    if HAS_TRITON:
        text = pyrl.explain("fused_linear_logprobs", torch.randn(2, 3), torch.randn(5, 3), y, top_p=0.9,
                            backend="triton")
        assert "linear=chunked" in text and "sampler: top_p=0.9" in text and "never holds a whole row" in text
        os.environ["PYRL_TRITON_LINEAR"] = "fused"
        try:
            with pytest.raises(ValueError, match="PYRL_TRITON_LINEAR=fused cannot run this call"):
                pyrl.fused_linear_logprobs(torch.randn(2, 3), torch.randn(5, 3), y, top_p=0.9, backend="triton")
        finally:
            del os.environ["PYRL_TRITON_LINEAR"]


# ------------------------------------------------------------------------------------------------
# The policy loss under the sampler's distribution (docs/formulas.md §3.1)

@pytest.mark.parametrize("backend,passes,dtype", _cases(CPU_BACKENDS, ("one", "two"), _DTYPES, ids=lambda *c: c) + [
    pytest.param("triton", "one", torch.float32, marks=TRITON.marks, id="triton-one-fp32"),
    pytest.param("triton", "two", torch.bfloat16, marks=TRITON.marks, id="triton-two-bf16")])
def test_fused_policy_loss_under_the_sampler(backend, passes, dtype, monkeypatch):
    monkeypatch.setenv("PYRL_PASSES", passes)
    B, T, H, V, temperature = 3, 5, 16, 211, 0.9
    kw = dict(top_k=30, top_p=0.85)
    cfg = pyrl.PolicyLossConfig(temperature=temperature, entropy_coef=0.01, eps_high=0.28, **kw)
    hidden = torch.randn(B, T, H).to(dtype).requires_grad_()
    weight = (3 * torch.randn(V, H) / math.sqrt(H)).to(dtype).requires_grad_()
    hd, wd = (t.detach().double().requires_grad_() for t in (hidden, weight))
    logits = (hd @ wd.t()).detach().reshape(B * T, V)
    y = _targets(logits, temperature, kw, ignore_frac=0.0)
    mask = (y != -100).reshape(B, T)
    y = torch.where(y == -100, 0, y).reshape(B, T)
    mask[2, 3:] = False
    adv = torch.randn(B)
    with torch.no_grad():  # the behaviour policy: the same head under the same sampler, slightly off
        old = sampler_logprobs_ref(logits, y.reshape(-1), temperature, **_ref_kw(kw))[0].reshape(B, T)
        old = torch.where(torch.isfinite(old), old + 0.05 * torch.randn(B, T, dtype=torch.float64), old)
    loss, metrics = pyrl.fused_linear_policy_loss(hidden, weight, y, mask, adv, old_logp=old.float(), config=cfg,
                                                  backend=backend)
    grads = torch.autograd.grad(loss, [hidden, weight])
    rlogp, rent = sampler_logprobs_ref((hd @ wd.t()).reshape(B * T, V), y.reshape(-1), temperature, **_ref_kw(kw))
    rloss, rmetrics = pyrl.policy_loss(rlogp.reshape(B, T), adv.double(), mask, old_logp=old,
                                       entropy=rent.reshape(B, T), config=cfg)
    rgrads = torch.autograd.grad(rloss, [hd, wd])
    tol = TOL[dtype]
    outside = (mask & ~torch.isfinite(rlogp.reshape(B, T))).sum() / mask.sum()
    assert outside > 0  # some targets fell outside the kept set: they are dropped, not NaN
    torch.testing.assert_close(metrics["outside_kept_frac"].double(), outside.double())
    torch.testing.assert_close(loss.double(), rloss, atol=tol, rtol=tol)
    for k in rmetrics:
        torch.testing.assert_close(metrics[k].double(), rmetrics[k], atol=tol, rtol=tol)
    for g, rg in zip(grads, rgrads):
        _assert_grad_close(g, rg, tol)


def test_policy_loss_drops_tokens_outside_the_kept_set():
    """A -inf log-prob (current or behaviour policy) leaves the policy and KL terms; the entropy bonus
    keeps it; without a sampler setting nothing changes."""
    logp = torch.tensor([[-0.5, float("-inf"), -1.0, -2.0]], requires_grad=True)
    old = torch.tensor([[-0.4, -0.3, float("-inf"), -2.1]])
    ref = torch.tensor([[-0.6, -0.2, -0.9, -1.9]])
    ent = torch.tensor([[1.0, 2.0, 3.0, 4.0]], requires_grad=True)
    mask, adv = torch.ones(1, 4), torch.tensor([1.0])
    cfg = pyrl.PolicyLossConfig(top_p=0.9, beta=0.1, entropy_coef=0.1, loss_type="reinforce")
    loss, metrics = pyrl.policy_loss(logp, adv, mask, old_logp=old, ref_logp=ref, entropy=ent, config=cfg)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logp.grad).all() and (logp.grad[0, 1:3] == 0).all()
    keep = torch.tensor([[True, False, False, True]])
    kl = torch.exp(ref - logp.detach()) - (ref - logp.detach()) - 1
    want = (torch.where(keep, -logp.detach() + 0.1 * kl, 0.0) - 0.1 * ent.detach()).sum() / 4
    torch.testing.assert_close(loss.detach(), want)
    assert metrics["outside_kept_frac"] == 0.25
    assert "outside_kept_frac" not in pyrl.policy_loss(logp.detach(), adv, mask)[1]
