"""The vocabulary-blocked walk (``Plan.linear == "blocked"``, docs/formulas.md §10.1): the row
bodies on one block of each row's vocabulary (block-local target ids), the online merge of the
blocks' stats, and the whole walk against the float64 oracle with several blocks."""
import math

import pytest
import torch

import pyrl
from pyrl.kernels.reference import RowParams, RowStats, TorchRows, merge_stats
from pyrl.ops import plan as plan_mod
from pyrl.ops import walk as walk_mod
from pyrl.ops.walk import CppRows, block_targets
from _ref import linear_logprobs_ref
from conftest import CPP, triton_on_cpu

TRITON = triton_on_cpu()
BODIES = [TorchRows] + ([CppRows] if CPP else [])
IDS = ["torch"] + (["cpp"] if CPP else [])
if TRITON:
    from pyrl.kernels import LogprobRows

    BODIES, IDS = BODIES + [LogprobRows], IDS + ["triton"]


def _rows(dtype, V=300, n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = (3 * torch.randn(n, V, generator=g, dtype=torch.float64)).to(dtype)
    z[4] = float("-inf")  # a row with no finite logit in this block
    z[5, ::2] = float("-inf")
    # in the block, elsewhere (an id >= V), ignored, in the block, -inf row, in the block
    y = torch.tensor([3, V + 7, -100, V - 1, 0, 1])
    return z, y


@pytest.mark.parametrize("rows", BODIES, ids=IDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_block_stats_match_the_float64_definition(rows, dtype):
    if dtype == torch.float64 and IDS[BODIES.index(rows)] == "triton":
        pytest.skip("the Triton kernels reduce in fp32 and refuse fp64")
    z, y = _rows(dtype)
    p = RowParams(temperature=0.7, ignore_index=-100, need_entropy=True)
    st = rows.stats(z, y, p)
    zz = z.double() / 0.7
    m = zz.amax(-1)
    ms = torch.where(torch.isfinite(m), m, 0.0)
    e = (zz - ms[:, None]).exp()
    d = torch.where(e > 0, zz - ms[:, None], 0.0)
    here = (y >= 0) & (y < z.shape[1])
    zy = torch.where(here, zz.gather(1, y.clamp(0, z.shape[1] - 1)[:, None]).squeeze(1), 0.0)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(st.m.double(), m, **tol)
    torch.testing.assert_close(st.s.double(), e.sum(-1), **tol)
    torch.testing.assert_close(st.t.double(), (e * d).sum(-1), **tol)
    torch.testing.assert_close(st.zy.double(), zy, **tol)
    assert st.s[4] == 0 and st.zy[1] == 0 and st.zy[2] == 0


@pytest.mark.parametrize("rows", BODIES, ids=IDS)
def test_bwd_with_a_target_in_another_block_has_no_one_hot_term(rows):
    z, y = _rows(torch.float64)
    z[4] = torch.randn(z.shape[1], dtype=torch.float64)  # the backward needs a finite lse per row
    p = RowParams(temperature=1.3, ignore_index=-100, need_entropy=True)
    zz = z / 1.3
    lse = torch.logsumexp(zz, -1) + 0.25  # as if the rest of the row were elsewhere: p sums to < 1 here
    prob = (zz - lse[:, None]).exp()
    mu = torch.full_like(lse, 0.4)
    ent = lse - mu
    g1, g2 = torch.randn(6, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    triton = IDS[BODIES.index(rows)] == "triton"  # fp32 only: fp32 inputs, fp32 tolerance
    args = [x.float() if triton else x.clone() for x in (z, lse, ent, g1, g2)]
    got = rows.bwd(args[0], y, *args[1:3], *args[3:], p).double()
    here = (y >= 0) & (y < z.shape[1])
    onehot = torch.zeros_like(z)
    onehot[here.nonzero().squeeze(1), y[here]] = 1.0
    zc = torch.where(torch.isfinite(zz), zz, 0.0)
    want = (g1[:, None] * (onehot - prob) - g2[:, None] * prob * (zc - mu[:, None])) / 1.3
    want[y == -100] = 0
    tol = 1e-5 if triton else 1e-12
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)


def test_merged_block_stats_equal_the_whole_rows():
    z, y = _rows(torch.float64, V=300)
    p = RowParams(temperature=1.0, ignore_index=-100, need_entropy=True)
    whole = TorchRows.stats(z, y, p)
    st = RowStats(torch.full((6,), float("-inf"), dtype=torch.float64), *torch.zeros(3, 6, dtype=torch.float64))
    for c0, c1 in ((0, 64), (64, 128), (128, 299), (299, 300)):  # uneven blocks, one of a single column
        st = merge_stats(st, TorchRows.stats(z[:, c0:c1], block_targets(y, c0, c1, -100), p))
    for a, b in zip(st, whole):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_block_targets_never_collide_with_ignore_index():
    y = torch.tensor([0, 63, 64, 127, 128, -100, 5])
    assert block_targets(y, 64, 128, -100).tolist() == [64, 64, 0, 63, 64, -100, 64]
    # a block as wide as ignore_index: "elsewhere" moves one further
    assert block_targets(torch.tensor([0, 9, 4]), 0, 4, 4).tolist() == [0, 5, 4]


@pytest.mark.parametrize("backend", IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("linear", ["blocked", "chunked"])
def test_fused_linear_logprobs_walks_match_float64(backend, dtype, linear, monkeypatch):
    """Several tiles and blocks (the last block partial), a bias, a temperature, ignored rows and
    a row whose target is the last vocabulary id: values and gradients against the float64 oracle.
    On the chunk walk the same 128-column blocks cut each chunk's logits GEMM (``LOGITS_COL_BLOCK``,
    4096 columns by default: the tests' vocabularies would fit in one). Triton's rows run on either
    walk (PYRL_TRITON_LINEAR=chunked); with bf16 its GEMMs are the 16-bit ("lowp") ones of CUDA,
    the blocked walk's d logits written in bf16 by the row kernel, every tile padded to the full tile."""
    monkeypatch.setenv("PYRL_LINEAR", linear)
    if backend == "triton":
        monkeypatch.setenv("PYRL_TRITON_LINEAR", "chunked")
    lowp = backend == "triton" and dtype == torch.bfloat16
    monkeypatch.setattr(plan_mod, "BLOCK_COLS", 128)
    monkeypatch.setattr(plan_mod, "LOWP_BLOCK_COLS_RANGE", (128, 128))
    monkeypatch.setattr(plan_mod, "MIN_TILE_ROWS", 1)
    monkeypatch.setattr(walk_mod, "LOGITS_COL_BLOCK", 128)
    g = torch.Generator().manual_seed(1)
    n, h, V = 45, 24, 1000
    hidden = torch.randn(n, h, generator=g).to(dtype)
    weight = (torch.randn(V, h, generator=g) / math.sqrt(h)).to(dtype)
    bias = (0.1 * torch.randn(V, generator=g)).to(dtype)
    y = torch.randint(0, V, (n,), generator=g)
    y[[3, 17]] = -100
    y[5] = V - 1
    # tiles (chunks) of 16 tokens: three, the last one partial (a lowp chunk is at least 64 rows)
    if linear == "blocked":  # lowp: the tile's fp32 logits and its fp32 d_hidden accumulator
        cb = 16 * (4 * 128 + 4 * h) if lowp else 16 * 4 * 128
        shape = "tile_rows=16 x block_cols=128"
    else:
        cb, shape = 16 * 4 * V, "chunk_rows=64" if lowp else "chunk_rows=16"
    text = pyrl.explain("fused_linear_logprobs", hidden, weight, y, bias=bias, backend=backend, chunk_bytes=cb)
    assert f"linear={linear}" in text and shape in text and f"gemm={'lowp' if lowp else 'acc'}" in text, text
    hs, ws, bs = (x.clone().requires_grad_() for x in (hidden, weight, bias))
    logp, ent = pyrl.fused_linear_logprobs(hs, ws, y, bias=bs, temperature=0.8, return_entropy=True, backend=backend,
                                           chunk_bytes=cb)
    g1, g2 = torch.randn(n, generator=g), torch.randn(n, generator=g)
    ((logp * g1).sum() + (ent * g2).sum()).backward()
    hd, wd, bd = (x.double().requires_grad_() for x in (hidden, weight, bias))
    lp64, en64 = linear_logprobs_ref(hd, wd, y, bias=bd, temperature=0.8)
    ((lp64 * g1.double()).sum() + (en64 * g2.double()).sum()).backward()
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(logp.double(), lp64.detach(), **tol)
    torch.testing.assert_close(ent.double(), en64.detach(), **tol)
    for got, want in ((hs.grad, hd.grad), (ws.grad, wd.grad), (bs.grad, bd.grad)):
        assert got.dtype == dtype
        scale = want.abs().max()
        torch.testing.assert_close(got.double() / scale, want / scale, **tol)
    assert (hs.grad[[3, 17]] == 0).all(), "an ignored row gets no gradient"


@pytest.mark.parametrize("backend", IDS)
def test_the_preference_loss_runs_on_the_blocked_walk(backend, monkeypatch):
    """The preference loss's two passes take the blocked walk too and agree with the chunk walk."""
    if backend == "triton":
        pytest.skip("float64 inputs: the Triton rows are covered by the walks test above")
    g = torch.Generator().manual_seed(2)
    N, T, h, V = 4, 6, 16, 700
    hidden = torch.randn(N, T, h, generator=g, dtype=torch.float64)
    weight = torch.randn(V, h, generator=g, dtype=torch.float64) / 4
    y = torch.randint(0, V, (N, T), generator=g)
    y[1, 4:] = -100
    ref_logps = torch.randn(N, generator=g, dtype=torch.float64) - 5
    out = {}
    for linear in ("chunked", "blocked"):
        monkeypatch.setenv("PYRL_LINEAR", linear)
        hs, ws = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        kw = dict(backend=backend, chunk_bytes=8 * V * 8, ref_logps=ref_logps)
        assert f"linear={linear}" in pyrl.explain("fused_linear_preference_loss", hs, ws, y, **kw)
        loss = pyrl.fused_linear_preference_loss(hs, ws, y, **kw)[0]
        loss.backward()
        out[linear] = (loss.detach(), hs.grad, ws.grad)
    for a, b in zip(out["chunked"], out["blocked"]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_out_dtype_gemms_are_probed_once_and_oom_is_not_a_fallback(monkeypatch):
    """The 16-bit walks call cuBLAS with out_dtype=float32 where the torch has it; a torch without it
    is detected once per GEMM kind (then the fp32 fallback runs), and an out-of-memory error is raised,
    never taken for a missing feature (the fallback would widen the weight)."""
    monkeypatch.setattr(walk_mod, "_OUT_DTYPE", {"mm": None, "addmm": None})

    class FakeCuda:
        is_cuda = True

    calls = []

    def missing():
        calls.append(1)
        raise TypeError("addmm() got an unexpected keyword argument 'out_dtype'")

    assert walk_mod._with_out_dtype("addmm", FakeCuda(), missing) is None and walk_mod._OUT_DTYPE["addmm"] is False
    assert walk_mod._with_out_dtype("addmm", FakeCuda(), missing) is None and calls == [1]  # not probed again
    assert walk_mod._with_out_dtype("mm", FakeCuda(), lambda: "fp32 out") == "fp32 out"
    assert walk_mod._OUT_DTYPE["mm"] is True

    def oom():
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    with pytest.raises(torch.cuda.OutOfMemoryError):
        walk_mod._with_out_dtype("mm", FakeCuda(), oom)
    assert walk_mod._with_out_dtype("mm", torch.zeros(1), missing) is None and calls == [1]  # CPU: never tried


@pytest.mark.parametrize("rows", BODIES, ids=IDS)
def test_merge_block_over_uneven_blocks_equals_the_whole_rows(rows):
    """``walk.merge_block_`` with each body (Triton: its one-launch kernel, the block's stats and the
    online merge in place; the others: stats on block-local ids, then merge_stats), block by block
    with global target ids, gives the whole rows' stats: -inf rows, a target in each block, ignored."""
    z, _ = _rows(torch.float32, V=300)
    y = torch.tensor([3, 70, -100, 299, 0, 130])
    p = RowParams(temperature=0.7, ignore_index=-100, need_entropy=True)
    st = RowStats(torch.full((6,), float("-inf")), *torch.zeros(3, 6))
    for c0, c1 in ((0, 64), (64, 128), (128, 299), (299, 300)):
        walk_mod.merge_block_(rows, st, z[:, c0:c1], y, c0, c1, p)
    whole = TorchRows.stats(z.double(), y, p)
    for got, want in zip(st, whole):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    assert st.s[4] == 0 and st.zy[2] == 0


def test_lowp_blocks_hold_one_block_of_logits_at_a_time(monkeypatch):
    """The 16-bit blocked walk gets each block's fp32 logits fresh from the GEMM: the previous block's
    must be gone before the next one is made (a tile's working memory is one block, not two)."""
    import weakref

    made = []
    real = walk_mod.Blocks._logits

    def spy(self, hp, c0, c1):
        assert all(ref() is None for ref in made), "an earlier block's logits are still alive"
        out = real(self, hp, c0, c1)
        made.append(weakref.ref(out))
        return out

    monkeypatch.setattr(walk_mod.Blocks, "_logits", spy)
    g = torch.Generator().manual_seed(5)
    hidden = torch.randn(40, 8, generator=g).to(torch.bfloat16)
    weight = torch.randn(300, 8, generator=g).to(torch.bfloat16)
    blocks = walk_mod.Blocks(hidden, weight, None, tile_rows=16, block_cols=64, pad_rows=16, gemm="lowp",
                             need=(True, True, False))

    def step(s, e, c0, c1, z):
        blocks.d_out(z).copy_(z * 1e-3)  # some d logits, written where the gradient GEMMs read them
        return True

    d_hidden, d_weight, _ = blocks.walk(step)
    assert len(made) == 3 * 5  # 3 tiles x 5 blocks (the last one 44 columns)
    dz = (hidden.double() @ weight.double().t() * 1e-3)
    torch.testing.assert_close(d_hidden.double(), dz @ weight.double(), rtol=2e-2, atol=2e-3)
    torch.testing.assert_close(d_weight.double(), dz.t() @ hidden.double(), rtol=2e-2, atol=2e-3)


def test_lowp_chunk_walk_holds_one_chunk_of_logits_at_a_time(monkeypatch):
    """The same for the 16-bit chunk walk (the CUDA default): each chunk's fp32 logits are gone before
    the next chunk's GEMM runs, and its bf16 d logits live in one buffer reused by every chunk."""
    import weakref

    made, d16 = [], set()
    real = walk_mod._mm_fp32

    def spy(a, b):
        assert all(ref() is None for ref in made), "an earlier chunk's logits are still alive"
        out = real(a, b)
        made.append(weakref.ref(out))
        return out

    monkeypatch.setattr(walk_mod, "_mm_fp32", spy)
    g = torch.Generator().manual_seed(6)
    hidden = torch.randn(40, 8, generator=g).to(torch.bfloat16)
    weight = torch.randn(300, 8, generator=g).to(torch.bfloat16)
    head = walk_mod.Head(hidden, weight, None, gemm="lowp", pad_rows=16, need=(True, True, False))

    def step(s, e, z, _):
        out = head.d_out(z)
        d16.add(out.untyped_storage().data_ptr())
        out.copy_(z * 1e-3)
        return True

    d_hidden, d_weight, _ = walk_mod.walk(head, 16, step)
    assert len(made) == 3 and len(d16) == 1  # three chunks, one d-logits buffer
    dz = hidden.double() @ weight.double().t() * 1e-3
    torch.testing.assert_close(d_hidden.double(), dz @ weight.double(), rtol=2e-2, atol=2e-3)
    torch.testing.assert_close(d_weight.double(), dz.t() @ hidden.double(), rtol=2e-2, atol=2e-3)
