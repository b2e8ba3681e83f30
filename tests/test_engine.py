"""The engine: one plan per call (pyrl.explain), losses that declare what they are, and every plan
held to the float64 oracle on every backend."""
import math

import pytest
import torch

import pyrl
from pyrl.ops import plan as plan_mod
from _ref import assert_fused_matches_float64, fused_with_grads, linear_logprobs_ref
from conftest import CPU_BACKENDS, triton_on_cpu

B, T, H, V = 3, 8, 16, 37
TRITON = triton_on_cpu()
ALL_BACKENDS = CPU_BACKENDS + [pytest.param("triton", marks=pytest.mark.skipif(not TRITON, reason="no triton"))]


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g)
    weight = torch.randn(V, H, generator=g) / math.sqrt(H)
    targets = torch.randint(0, V, (B, T), generator=g)
    mask = torch.ones(B, T)
    mask[0, 5:] = 0
    mask[2, 2:] = 0
    adv = torch.randn(B, generator=g)
    old = 0.3 * torch.randn(B, T, generator=g)
    return hidden, weight, targets, mask, adv, old


@pytest.fixture
def registered():
    """Register losses for one test and always remove them again (public API only)."""
    names = []

    def register(name, **kw):
        names.append(name)
        return pyrl.register_policy_loss(name, **kw)

    yield register
    for name in names:
        if name in pyrl.policy_loss_names():
            pyrl.unregister_policy_loss(name)


def _reference_loss(fn_config, hidden, weight, targets, mask, adv, old):
    """float64: full logits -> per-token log-probs -> pyrl.policy_loss (which sees [B, T])."""
    hd, wd = hidden.double().requires_grad_(), weight.double().requires_grad_()
    safe = torch.where(mask.bool(), targets, -100)
    logp, _ = linear_logprobs_ref(hd, wd, safe)
    loss, _ = pyrl.policy_loss(logp, adv.double(), mask, old_logp=(logp.detach() + old.double()), config=fn_config)
    loss.backward()
    return loss, hd.grad, wd.grad


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_sequence_normalising_loss_is_the_same_on_every_backend(backend, registered, monkeypatch):
    """A registered loss that normalises over its sequence: with the default token_separable=False it
    must always see [B, T] (the one-pass plan once called it on [1, chunk] slices on cpp: loss rel.
    error 1.2, d_hidden rel. error 0.75)."""
    seen = []

    @registered("test_seq_normalised")
    def seq_normalised(logp, ratio, advantages, config):
        seen.append(tuple(logp.shape))
        # each token's weight is its ratio relative to the sequence's mean ratio
        share = ratio / ratio.detach().mean(-1, keepdim=True)
        return -advantages * share, None

    cfg = pyrl.PolicyLossConfig(loss_type="test_seq_normalised")
    hidden, weight, targets, mask, adv, old = _batch()
    assert "passes=two" in pyrl.explain("fused_linear_policy_loss", hidden, weight, targets, mask, adv, config=cfg,
                                        backend=backend)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    safe = torch.where(mask.bool(), targets, -100)
    with torch.no_grad():
        base = pyrl.fused_linear_logprobs(hidden, weight, safe, backend="torch")
    loss, _ = pyrl.fused_linear_policy_loss(h, w, targets, mask, adv, old_logp=base + old, config=cfg, backend=backend,
                                            chunk_bytes=5 * V * 4)
    loss.backward()
    assert seen and all(s == (B, T) for s in seen), seen
    ref, gh, gw = _reference_loss(cfg, hidden, weight, targets, mask, adv, old)
    torch.testing.assert_close(loss.double(), ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(h.grad.double(), gh, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(w.grad.double(), gw, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_a_separable_loss_takes_the_one_pass_plan_on_flat_chunks(backend, registered, monkeypatch):
    seen = []

    @registered("test_separable", token_separable=True)
    def separable(logp, ratio, advantages, config):
        seen.append(tuple(logp.shape))
        return -advantages * ratio.clamp(0.5, 1.5), None

    monkeypatch.setenv("PYRL_LINEAR", "chunked")  # the one-pass plan is the chunk walk's
    cfg = pyrl.PolicyLossConfig(loss_type="test_separable")
    hidden, weight, targets, mask, adv, old = _batch()
    kw = dict(config=cfg, backend=backend, chunk_bytes=5 * V * 4)
    assert "passes=one" in pyrl.explain("fused_linear_policy_loss", hidden, weight, targets, mask, adv, **kw)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    safe = torch.where(mask.bool(), targets, -100)
    with torch.no_grad():
        base = pyrl.fused_linear_logprobs(hidden, weight, safe, backend="torch")
    loss, _ = pyrl.fused_linear_policy_loss(h, w, targets, mask, adv, old_logp=base + old, **kw)
    loss.backward()
    assert seen and all(s[0] == 1 and s[1] < B * T for s in seen), seen  # flat chunks, not [B, T]
    ref, gh, gw = _reference_loss(cfg, hidden, weight, targets, mask, adv, old)
    torch.testing.assert_close(loss.double(), ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(h.grad.double(), gh, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(w.grad.double(), gw, atol=1e-5, rtol=1e-4)


def test_registry_refuses_duplicates_and_bad_declarations(registered):
    with pytest.raises(ValueError, match="policy loss named 'ppo' is already registered"):
        pyrl.register_policy_loss("ppo")(lambda logp, ratio, advantages, config: (-advantages * ratio, None))
    with pytest.raises(TypeError, match="token_separable must be a bool"):
        pyrl.register_policy_loss("test_bad", token_separable="yes")
    with pytest.raises(ValueError, match="unknown policy loss 'never_registered'"):
        pyrl.unregister_policy_loss("never_registered")

    @registered("test_twice")
    def first(logp, ratio, advantages, config):
        return -advantages * ratio, None

    with pytest.raises(ValueError, match="already registered"):
        pyrl.register_policy_loss("test_twice")(first)
    assert "test_twice" in pyrl.policy_loss_names()


def test_a_loss_owns_and_validates_its_parameters(registered):
    from pyrl._validate import check_number

    # delta belongs to ppo/gspo: another loss that does not own it refuses it
    with pytest.raises(ValueError, match="delta applies to loss_type 'ppo' or 'gspo' only"):
        pyrl.PolicyLossConfig(loss_type="reinforce", delta=4.0)

    @registered("test_owns_delta", params={"delta": lambda name, x: check_number(name, x, low=10, allow_none=True)})
    def owns(logp, ratio, advantages, config):
        return -advantages * ratio.clamp(max=config.delta), None

    assert pyrl.PolicyLossConfig(loss_type="test_owns_delta", delta=11.0).delta == 11.0
    # ... and its own validator now runs for the field too
    with pytest.raises(ValueError, match="delta must be >= 10"):
        pyrl.PolicyLossConfig(loss_type="test_owns_delta", delta=4.0)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_the_reference_runs_both_plans(backend, monkeypatch):
    hidden, weight, targets, mask, adv, old = _batch()
    cfg = pyrl.PolicyLossConfig(eps_high=0.28, entropy_coef=0.01, agg="seq-mean-token-mean")
    out = {}
    for passes in ("one", "two"):
        monkeypatch.setenv("PYRL_PASSES", passes)
        assert f"passes={passes}" in pyrl.explain(pyrl.fused_linear_policy_loss, hidden, weight, targets, mask, adv,
                                                  config=cfg, backend=backend)
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        loss, metrics = pyrl.fused_linear_policy_loss(h, w, targets, mask, adv, old_logp=old - 2, config=cfg,
                                                      backend=backend, chunk_bytes=4 * V * 4)
        (3.0 * loss).backward()
        out[passes] = (loss, metrics, h.grad, w.grad)
    (l1, m1, *g1), (l2, m2, *g2) = out["one"], out["two"]
    torch.testing.assert_close(l1, l2, atol=1e-6, rtol=1e-5)
    for k in m2:
        torch.testing.assert_close(m1[k], m2[k], atol=1e-6, rtol=1e-5, msg=k)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


def test_forcing_one_pass_where_it_cannot_run_says_why(monkeypatch):
    hidden, weight, targets, mask, adv, _ = _batch()
    monkeypatch.setenv("PYRL_PASSES", "one")
    with pytest.raises(ValueError, match="PYRL_PASSES=one cannot run this call: a sequence-level ratio"):
        pyrl.fused_linear_policy_loss(hidden, weight, targets, mask, adv,
                                      config=pyrl.PolicyLossConfig(ratio_level="sequence"), backend="torch")
    monkeypatch.setenv("PYRL_PASSES", "three")
    with pytest.raises(ValueError, match="PYRL_PASSES must be 'one' or 'two'"):
        pyrl.fused_linear_logprobs(hidden, weight, targets, backend="torch")


@pytest.mark.parametrize("dtype,chunk_bytes", [(torch.float32, None), (torch.float64, 7 * V * 8)])
def test_explain_describes_the_call(dtype, chunk_bytes, monkeypatch):
    monkeypatch.setenv("PYRL_LINEAR", "chunked")
    hidden, weight, targets, mask, adv, _ = (x.to(dtype) if x.is_floating_point() else x for x in _batch())
    text = pyrl.explain("fused_linear_logprobs", hidden, weight, targets, backend="torch", chunk_bytes=chunk_bytes)
    assert text.startswith("fused_linear_logprobs: backend=torch, linear=chunked, gemm=acc")
    rows = B * T if chunk_bytes is None else 16  # 7*V*8 bytes hold 14 rows of fp32 logits -> 14, padded to 16
    if chunk_bytes is not None:
        assert "chunk_rows=14 " in text
    else:
        assert f"chunk_rows={rows} " in text
    reasons = pyrl.explain("fused_linear_policy_loss", hidden, weight, targets, mask, adv,
                           config=pyrl.PolicyLossConfig(top_entropy_rho=0.5), backend="torch")
    assert "two passes: the top-entropy mask" in reasons
    with pytest.raises(ValueError, match="op must be one of"):
        pyrl.explain("not_an_op", hidden)
    # explain validates exactly as the op does
    with pytest.raises(ValueError, match=r"mask must have shape \[3, 8\]"):
        pyrl.explain("fused_linear_policy_loss", hidden, weight, targets, mask[:, :2], adv)


def test_the_blocked_walk_is_chosen_from_the_budget_never_the_batch(monkeypatch):
    """On CPU the blocked walk takes over when chunk_bytes holds fewer than CHUNKED_MIN_ROWS rows of
    logits, whatever the batch size; PYRL_LINEAR forces either walk and refuses what cannot run."""
    hidden, weight, targets, mask, adv, _ = _batch()
    small = (plan_mod.CHUNKED_MIN_ROWS - 1) * V * 4
    for n in (1, B * T):  # one token or the whole batch: the same walk
        text = pyrl.explain("fused_linear_logprobs", hidden.reshape(-1, H)[:n], weight, targets.reshape(-1)[:n],
                            backend="torch", chunk_bytes=small)
        assert "linear=blocked" in text and "vocabulary-blocked walk (chunk_bytes holds" in text, text
    big = plan_mod.CHUNKED_MIN_ROWS * V * 4
    assert "linear=chunked" in pyrl.explain("fused_linear_logprobs", hidden, weight, targets, backend="torch",
                                            chunk_bytes=big)
    text = pyrl.explain("fused_linear_policy_loss", hidden, weight, targets, mask, adv, backend="torch",
                        chunk_bytes=small)
    assert "linear=blocked" in text and "passes=two" in text and "forms a row's d logits only once" in text, text
    monkeypatch.setenv("PYRL_PASSES", "one")  # asks for the chunk walk's one-pass plan
    assert "linear=chunked" in pyrl.explain("fused_linear_policy_loss", hidden, weight, targets, mask, adv,
                                            backend="torch", chunk_bytes=small)
    monkeypatch.delenv("PYRL_PASSES")
    monkeypatch.setenv("PYRL_LINEAR", "chunked")
    assert "linear=chunked" in pyrl.explain("fused_linear_logprobs", hidden, weight, targets, backend="torch",
                                            chunk_bytes=small)
    monkeypatch.setenv("PYRL_LINEAR", "blocked")
    text = pyrl.explain("fused_linear_logprobs", hidden, weight, targets, backend="torch", chunk_bytes=big)
    assert "linear=blocked" in text and "PYRL_LINEAR=blocked" in text
    with pytest.raises(ValueError, match="PYRL_LINEAR=blocked cannot run this call: top_k=5 needs each row's whole"):
        pyrl.explain("fused_linear_logprobs", hidden, weight, targets, backend="torch", top_k=5)
    if TRITON:
        with pytest.raises(ValueError, match="PYRL_LINEAR=blocked cannot run this call: Triton's fused kernel is a "
                                             "walk of its own"):
            pyrl.explain("fused_linear_logprobs", hidden, weight, targets, backend="triton")
        monkeypatch.setenv("PYRL_TRITON_LINEAR", "chunked")  # the Triton rows on the blocked walk
        text = pyrl.explain("fused_linear_logprobs", hidden, weight, targets, backend="triton")
        assert "backend=triton, linear=blocked" in text, text
        monkeypatch.delenv("PYRL_TRITON_LINEAR")
    monkeypatch.setenv("PYRL_LINEAR", "tiled")
    with pytest.raises(ValueError, match="PYRL_LINEAR must be 'chunked' or 'blocked'"):
        pyrl.explain("fused_linear_logprobs", hidden, weight, targets, backend="torch")


# Every plan on every backend against the float64 oracle, on the odd shapes: one token, a vocabulary
# that is no multiple of any block (and a vocabulary of one), all-masked rows, bf16 inputs.
ODD = {
    "one-token": dict(B=1, T=1, V=37),
    "vocab-129": dict(B=2, T=5, V=129),
    "vocab-1": dict(B=2, T=3, V=1),
    "all-masked-row": dict(B=3, T=4, V=37, masked_row=1),
}
PLANS = [("torch", "chunked"), ("torch", "blocked"), ("cpp", "chunked"), ("cpp", "blocked"), ("triton", "fused"),
         ("triton", "chunked"), ("triton", "blocked")]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("passes", ["one", "two"])
@pytest.mark.parametrize("backend,linear", PLANS, ids=["torch", "torch-blocked", "cpp", "cpp-blocked", "triton-kernel",
                                                       "triton-chunked", "triton-blocked"])
@pytest.mark.parametrize("case", list(ODD))
def test_every_plan_matches_float64_on_odd_shapes(case, backend, linear, passes, dtype, monkeypatch):
    if backend == "cpp" and not pyrl.backends()["cpp"]["available"]:
        pytest.skip("pyrl._C not built")
    if backend == "triton" and not TRITON:
        pytest.skip("no triton")
    if linear in ("fused", "blocked") and passes == "one":
        pytest.skip("the fused Triton kernel and the blocked walk have the two-pass plan only")
    if backend == "triton":  # the Triton rows on the blocked walk: with the chunked body's GEMMs
        monkeypatch.setenv("PYRL_TRITON_LINEAR", "chunked" if linear == "blocked" else linear)
    if backend != "triton" or linear == "blocked":
        monkeypatch.setenv("PYRL_LINEAR", linear)
        monkeypatch.setattr(plan_mod, "BLOCK_COLS", 64)  # several blocks, the last one partial, at V=129
        monkeypatch.setattr(plan_mod, "LOWP_BLOCK_COLS_RANGE", (64, 64))
    monkeypatch.setenv("PYRL_PASSES", passes)
    c = ODD[case]
    b, t, v = c["B"], c["T"], c["V"]
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(b, t, H, generator=g).to(dtype)
    weight = (torch.randn(v, H, generator=g) / math.sqrt(H)).to(dtype)
    targets = torch.randint(0, v, (b, t), generator=g)
    mask = torch.ones(b, t)
    if "masked_row" in c:
        mask[c["masked_row"]] = 0
    adv = torch.randn(b, generator=g)
    old = 0.2 * torch.randn(b, t, generator=g)
    cfg = pyrl.PolicyLossConfig(eps_high=0.28, entropy_coef=0.05, agg="seq-mean-token-mean")
    plan = pyrl.explain("fused_linear_policy_loss", hidden, weight, targets, mask, adv, config=cfg, backend=backend)
    assert f"passes={passes}" in plan and f"backend={backend}" in plan, plan

    safe = torch.where(mask.bool(), targets, -100)
    hd, wd = hidden.double().requires_grad_(), weight.double().requires_grad_()
    logp64, ent64 = linear_logprobs_ref(hd, wd, safe)
    old_logp = (logp64.detach() + old.double())
    ref, _ = pyrl.policy_loss(logp64, adv.double(), mask, old_logp=old_logp, entropy=ent64, config=cfg)
    ref.backward()

    loss, metrics, dh, dw = fused_with_grads(hidden, weight, targets, mask, adv, old_logp=old_logp.float(), config=cfg,
                                             backend=backend, chunk_bytes=2 * v * 4)
    assert_fused_matches_float64(loss, metrics, ref, ((dh, hd.grad), (dw, wd.grad)), dtype)
    if "masked_row" in c:
        assert (dh[c["masked_row"]] == 0).all(), "a masked row gets no gradient"


@pytest.mark.parametrize("free,expect_mib", [(0, 64), (600 * 2**20, 64), (2**30, 128), (1536 * 2**20, 128),
                                              (100 * 2**30, 256)])
def test_chunk_bytes_auto_is_a_power_of_two_share_of_free_memory(free, expect_mib, monkeypatch):
    """chunk_bytes="auto" (CPU): 1/AUTO_FREE_SHARE of the free memory, rounded down to a power of two,
    between the default and AUTO_MAX_CHUNK_BYTES; the plan says how it was chosen."""
    monkeypatch.setattr(plan_mod, "free_memory", lambda device: free)
    got, how = plan_mod.resolve_chunk_bytes("auto", torch.device("cpu"))
    assert got == expect_mib * 2**20 and f"-> {expect_mib} MiB" in how, how
    assert plan_mod.resolve_chunk_bytes(None, torch.device("cpu")) == (plan_mod.DEFAULT_CHUNK_BYTES, "")
    assert plan_mod.resolve_chunk_bytes(12345, torch.device("cpu")) == (12345, "")
    hidden, weight, targets, *_ = _batch()
    plan = pyrl.explain("fused_linear_logprobs", hidden, weight, targets, backend="torch", chunk_bytes="auto")
    assert f"chunk_bytes='auto': {free / 2**30:.1f} GiB free on cpu -> {expect_mib} MiB" in plan, plan


def test_cuda_auto_budget_counts_the_caching_allocators_unused_memory(monkeypatch):
    """On CUDA the free memory is the driver's plus what PyTorch's caching allocator reserved but
    does not use; the budget is capped at 4 GiB (faked device queries: no GPU needed)."""
    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (10 * 2**30, 80 * 2**30))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 7 * 2**30)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 1 * 2**30)
    assert plan_mod.free_memory(cuda) == 16 * 2**30
    assert plan_mod.resolve_chunk_bytes("auto", cuda)[0] == 2 * 2**30  # 16 GiB / 8
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (140 * 2**30, 141 * 2**30))
    assert plan_mod.resolve_chunk_bytes("auto", cuda)[0] == plan_mod.AUTO_MAX_CHUNK_BYTES["cuda"]
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (2**30, 141 * 2**30))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 1 * 2**30)  # none unused
    assert plan_mod.resolve_chunk_bytes("auto", cuda)[0] == plan_mod.DEFAULT_CUDA_CHUNK_BYTES  # never below


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_chunk_bytes_auto_runs_the_same_walk_as_its_bytes(backend, monkeypatch):
    """Every fused op and module takes chunk_bytes="auto" and then computes exactly what the resolved
    budget computes (a budget small enough here to split the batch into several chunks)."""
    budget = 16 * V * 4  # the default floor is lowered so that "auto" lands on a multi-chunk budget
    monkeypatch.setattr(plan_mod, "DEFAULT_CHUNK_BYTES", budget // 4)
    monkeypatch.setattr(plan_mod, "AUTO_MAX_CHUNK_BYTES", {"cpu": budget, "cuda": budget})
    monkeypatch.setattr(plan_mod, "free_memory", lambda device: 10**12)
    assert plan_mod.resolve_chunk_bytes("auto", torch.device("cpu"))[0] == budget
    hidden, weight, targets, mask, adv, old = _batch()
    cfg = pyrl.PolicyLossConfig(eps_high=0.28)
    outs = {}
    for cb in ("auto", budget):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        logp, ent = pyrl.fused_linear_logprobs(h, w, targets, return_entropy=True, backend=backend, chunk_bytes=cb)
        loss, _ = pyrl.fused_linear_policy_loss(h, w, targets, mask, adv, old_logp=old, config=cfg, backend=backend,
                                                chunk_bytes=cb)
        (logp.sum() + ent.sum() + loss).backward()
        outs[cb] = (logp, ent, loss, h.grad, w.grad)
    for a, b in zip(outs["auto"], outs[budget]):
        assert torch.equal(a, b)
    seen = []
    real = plan_mod.resolve_chunk_bytes
    monkeypatch.setattr(plan_mod, "resolve_chunk_bytes", lambda cb, device: seen.append(cb) or real(cb, device))
    pyrl.nn.FusedLinearLogProbs(chunk_bytes="auto", backend=backend)(hidden, weight, targets)
    pyrl.nn.FusedLinearGRPOLoss(beta=0.0, chunk_bytes=budget, backend=backend)(hidden, weight, targets, mask, adv)
    assert seen == ["auto", budget]
    assert "chunk_bytes='auto'" in repr(pyrl.nn.FusedLinearLogProbs(chunk_bytes="auto"))
    assert f"chunk_bytes={budget}" in repr(pyrl.nn.FusedLinearGRPOLoss(chunk_bytes=budget))


@pytest.mark.parametrize("bad", ["big", 0, -1, True, 1.5, "AUTO"])
def test_bad_chunk_bytes_names_the_argument(bad):
    hidden, weight, targets, mask, adv, _ = _batch()
    with pytest.raises(ValueError, match=r"chunk_bytes must be a positive int or 'auto'"):
        pyrl.fused_linear_logprobs(hidden, weight, targets, chunk_bytes=bad)
    for module in (pyrl.nn.FusedLinearLogProbs, pyrl.nn.FusedLinearGRPOLoss, pyrl.nn.FusedLinearDPOLoss,
                   pyrl.nn.FusedLinearKTOLoss, pyrl.nn.FusedLinearJSDLoss):
        with pytest.raises(ValueError, match=r"chunk_bytes must be a positive int or 'auto'"):
            module(chunk_bytes=bad)


@pytest.mark.parametrize("hidden_size,budget,rows,cols", [
    (4096, 160 * 2**20, 1024, 8192), (896, 160 * 2**20, 1024, 32768), (8192, 160 * 2**20, 1024, 4096),
    (64, 16 * 2**10, 16, 32768), (4096, 32 * 2**20, 512, 8192), (4096, 4 * 2**30, 1024, 8192),
    (3584, 160 * 2**20, 1024, 8192), (16384, 160 * 2**20, 1024, 2048)])
def test_lowp_blocked_tiles_fit_the_budget(hidden_size, budget, rows, cols):
    """The 16-bit blocked plan's tile: a power of two of tokens whose fp32 logits block and fp32
    d_hidden accumulator fit chunk_bytes, at most LOWP_MAX_TILE_ROWS, every tile padded to it; the
    block width from H alone (rows x cols x H about constant, within LOWP_BLOCK_COLS_RANGE)."""
    assert plan_mod._lowp_block_shape(hidden_size, budget) == (rows, cols)
    assert rows * (4 * cols + 4 * hidden_size) <= max(budget, 16 * (4 * cols + 4 * hidden_size))
    if TRITON:
        with pytest.MonkeyPatch.context() as m:
            m.setenv("PYRL_LINEAR", "blocked")
            m.setenv("PYRL_TRITON_LINEAR", "chunked")
            hidden = torch.zeros(3, hidden_size, dtype=torch.bfloat16)
            weight = torch.zeros(5000, hidden_size, dtype=torch.bfloat16)
            text = pyrl.explain("fused_linear_logprobs", hidden, weight, torch.zeros(3, dtype=torch.long),
                                backend="triton", chunk_bytes=budget)
            assert (f"linear=blocked, gemm=lowp, tile_rows={rows} x block_cols={cols} (GEMMs padded to a multiple "
                    f"of {rows})") in text, text
