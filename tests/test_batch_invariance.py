"""Batch invariance: a token's log-prob and entropy are bitwise identical whatever other rows share
its batch and wherever it sits (a prefix of the batch, alone, at a shuffled position, among other
rows), on every backend, for ``logprobs_from_logits`` and ``fused_linear_logprobs``.

Why it matters: when the rollout engine's log-probs and the trainer's differ only because the
batches were composed differently, every ratio ``exp(logp - logp_old)`` drifts away from 1 and the
clip fires on noise (TRL users report 8% of tokens outside a +-10% ratio band from batching
alone). See docs/reliability.md for what is guaranteed and its limits.

How pyrl gets it (and what these tests pin): the row kernels reduce each row in a fixed order
(C++: one row per thread; torch body: fixed-size blocks, so ATen never splits a single row across
threads); the fused op runs every logits GEMM on a multiple of ``GEMM_ROW_QUANTUM`` rows (MKL
rounds a row differently when the GEMM's row count is not a multiple of 4) and, for the same
reason, the d_hidden GEMM, so a token's d_hidden is batch-invariant too.
"""
import math

import pytest
import torch

import pyrl
from pyrl.ops import plan as plan_mod
from pyrl.ops import walk as walk_mod
from conftest import CPP, triton_on_cpu

TRITON = triton_on_cpu()
if TRITON:
    pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

CPU = ["torch"] + (["cpp"] if CPP else [])
BACKENDS = CPU + (["triton"] if TRITON else [])


def _dtypes(backend):
    return [torch.float32, torch.bfloat16] + ([] if backend == "triton" else [torch.float64])


PARAMS = [pytest.param(b, d, id=f"{b}-{str(d)[6:]}") for b in BACKENDS for d in _dtypes(b)]


def _assert_rows_equal(got, want, what):
    """Bitwise, and NaN-free (NaN != NaN would hide nothing here, but say so clearly)."""
    for g, w, name in zip(got, want, ("logp", "entropy")):
        assert not torch.isnan(g).any()
        if not torch.equal(g, w):
            bad = (g != w).nonzero().flatten().tolist()
            raise AssertionError(f"{what}: {name} differs at rows {bad[:10]} "
                                 f"(max |diff| {(g.double() - w.double()).abs().max().item():.3g})")


def _check_invariance(run, n, seed, sizes, *, alone=6, mixes=3):
    """``run(idx)`` computes (logp, entropy) for the rows ``idx`` of a fixed pool; compare with the
    full batch ``range(n)``: prefixes, rows alone, a shuffled batch, rows among other rows."""
    g = torch.Generator().manual_seed(seed)
    full = run(torch.arange(n))
    for k in sizes:  # prefix of the batch
        if k <= n:
            _assert_rows_equal(run(torch.arange(k)), [x[:k] for x in full], f"prefix of {k} rows")
    for i in torch.randperm(n, generator=g)[:alone].tolist():  # alone
        _assert_rows_equal(run(torch.tensor([i])), [x[i:i + 1] for x in full], f"row {i} alone")
    perm = torch.randperm(n, generator=g)  # shuffled
    _assert_rows_equal(run(perm), [x[perm] for x in full], "shuffled batch")
    for _ in range(mixes):  # a subset, in random order, with repeats, at a random size
        k = int(torch.randint(1, 2 * n, (1,), generator=g))
        idx = torch.randint(0, n, (k,), generator=g)
        _assert_rows_equal(run(idx), [x[idx] for x in full], f"{k} random rows")


# ----------------------------------------------------------------------------------------------
# logprobs_from_logits
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend,dtype", PARAMS)
@pytest.mark.parametrize("vocab", [37, 300, 2049, 70_000])
def test_logprobs_from_logits_batch_invariant(backend, dtype, vocab):
    if backend == "triton" and vocab > 300:
        pytest.skip("interpreted Triton: small vocabularies only (300 spans several vocabulary slices)")
    n = 12 if backend == "triton" else (40 if vocab < 10_000 else 6)
    g = torch.Generator().manual_seed(vocab)
    pool = (torch.randn(n, vocab, generator=g) * 3).to(dtype)
    y = torch.randint(0, vocab, (n,), generator=g)
    y[::7] = -100
    pool[1, ::3] = float("-inf")

    def run(idx):
        return pyrl.logprobs_from_logits(pool[idx], y[idx], temperature=0.8, return_entropy=True, backend=backend)

    # V = 70k > ATen's grain size: a single row alone used to be reduced by several threads
    _check_invariance(run, n, seed=1, sizes=[1, 2, 3, 5, 17, 33])


@pytest.mark.parametrize("backend", BACKENDS)
def test_logprobs_from_logits_lead_shape_invariant(backend):
    """[B, T, V] gives the same bits as the flattened [B*T, V] and as each sequence alone."""
    g = torch.Generator().manual_seed(0)
    z = torch.randn(3, 5, 97, generator=g)
    y = torch.randint(0, 97, (3, 5), generator=g)
    lp3, en3 = pyrl.logprobs_from_logits(z, y, return_entropy=True, backend=backend)
    lp2, en2 = pyrl.logprobs_from_logits(z.reshape(15, 97), y.reshape(15), return_entropy=True, backend=backend)
    assert torch.equal(lp3.reshape(15), lp2) and torch.equal(en3.reshape(15), en2)
    for b in range(3):
        lpb, enb = pyrl.logprobs_from_logits(z[b], y[b], return_entropy=True, backend=backend)
        assert torch.equal(lpb, lp3[b]) and torch.equal(enb, en3[b])


# ----------------------------------------------------------------------------------------------
# fused_linear_logprobs
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend,dtype", PARAMS)
@pytest.mark.parametrize("h,vocab,use_bias", [(16, 37, False), (24, 300, True), (64, 1000, True), (256, 4099, False)],
                         ids=["small", "bias", "medium", "wide"])
def test_fused_linear_logprobs_batch_invariant(backend, dtype, h, vocab, use_bias):
    if backend == "triton" and vocab > 300:
        pytest.skip("interpreted Triton: small shapes only")
    n = 10 if backend == "triton" else 67
    g = torch.Generator().manual_seed(h)
    pool = torch.randn(n, h, generator=g).to(dtype)
    weight = (torch.randn(vocab, h, generator=g) / math.sqrt(h)).to(dtype)
    bias = torch.randn(vocab, generator=g).to(dtype) if use_bias else None
    y = torch.randint(0, vocab, (n,), generator=g)
    y[::5] = -100

    def run(idx):
        return pyrl.fused_linear_logprobs(pool[idx], weight, y[idx], bias=bias, temperature=0.7,
                                          return_entropy=True, backend=backend)

    _check_invariance(run, n, seed=2, sizes=[1, 2, 3, 4, 5, 7, 15, 16, 17, 33, 64])


@pytest.mark.parametrize("backend", CPU)
@pytest.mark.parametrize("chunk_rows", [1, 5, 16, 20, 48])
@pytest.mark.parametrize("col_block", [4096, 64], ids=["one-gemm", "col-blocks"])
def test_fused_linear_logprobs_invariant_to_chunking(backend, chunk_rows, col_block, monkeypatch):
    """The chunk walk's chunk sizes (from chunk_bytes) change how the batch is cut, never a token's
    bits: the same as the default (one chunk) and as the token alone; also with each chunk's logits
    GEMM cut into column blocks of the head (``LOGITS_COL_BLOCK``; 300 = 4 x 64 + 44)."""
    monkeypatch.setenv("PYRL_LINEAR", "chunked")
    monkeypatch.setattr(walk_mod, "LOGITS_COL_BLOCK", col_block)
    g = torch.Generator().manual_seed(3)
    n, h, vocab = 53, 32, 300
    pool = torch.randn(n, h, generator=g)
    weight = torch.randn(vocab, h, generator=g) / math.sqrt(h)
    y = torch.randint(0, vocab, (n,), generator=g)
    ref = pyrl.fused_linear_logprobs(pool, weight, y, return_entropy=True, backend=backend)

    def run(idx):
        return pyrl.fused_linear_logprobs(pool[idx], weight, y[idx], return_entropy=True, backend=backend,
                                          chunk_bytes=chunk_rows * vocab * 4)

    _assert_rows_equal(run(torch.arange(n)), ref, f"chunks of {chunk_rows} rows vs one chunk")
    _check_invariance(run, n, seed=4, sizes=[1, 3, 16, 21])


@pytest.mark.parametrize("backend", CPU)
@pytest.mark.parametrize("tile_rows", [1, 5, 16, 20, 48])
def test_blocked_walk_invariant_to_tiles_and_batch(backend, tile_rows, monkeypatch):
    """The vocabulary-blocked walk: its blocks depend on chunk_bytes alone, so the token tile's size
    (and the batch) never changes a token's bits: every tile size gives the bits of one tile, and a
    token alone or among others the same. (The blocks and the chunk walk sum a row in different
    orders, so the two walks agree to rounding, not bit for bit: docs/reliability.md.)"""
    monkeypatch.setenv("PYRL_LINEAR", "blocked")
    monkeypatch.setattr(plan_mod, "BLOCK_COLS", 64)
    monkeypatch.setattr(plan_mod, "MIN_TILE_ROWS", 1)
    g = torch.Generator().manual_seed(3)
    n, h, vocab = 53, 32, 300  # 4 blocks of 64 columns and one of 44
    pool = torch.randn(n, h, generator=g)
    weight = torch.randn(vocab, h, generator=g) / math.sqrt(h)
    y = torch.randint(0, vocab, (n,), generator=g)
    one_tile = pyrl.fused_linear_logprobs(pool, weight, y, return_entropy=True, backend=backend,
                                          chunk_bytes=64 * 64 * 4)
    plan = pyrl.explain("fused_linear_logprobs", pool, weight, y, backend=backend, chunk_bytes=tile_rows * 64 * 4)
    assert "linear=blocked" in plan and "block_cols=64" in plan, plan

    def run(idx):
        return pyrl.fused_linear_logprobs(pool[idx], weight, y[idx], return_entropy=True, backend=backend,
                                          chunk_bytes=tile_rows * 64 * 4)

    _assert_rows_equal(run(torch.arange(n)), one_tile, f"tiles of {tile_rows} rows vs one tile")
    _check_invariance(run, n, seed=4, sizes=[1, 3, 16, 21])


@pytest.mark.parametrize("backend", CPU)
@pytest.mark.parametrize("linear", ["chunked", "blocked"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_linear_d_hidden_batch_invariant(backend, dtype, linear, monkeypatch):
    """A token's d_hidden (for a fixed upstream gradient) does not depend on its batch either, on
    both walks (the blocked one with several blocks: 501 columns in blocks of 64)."""
    monkeypatch.setenv("PYRL_LINEAR", linear)
    monkeypatch.setattr(plan_mod, "BLOCK_COLS", 64)
    g = torch.Generator().manual_seed(5)
    n, h, vocab = 37, 24, 501
    pool = torch.randn(n, h, generator=g).to(dtype)
    weight = (torch.randn(vocab, h, generator=g) / math.sqrt(h)).to(dtype)
    y = torch.randint(0, vocab, (n,), generator=g)
    g1, g2 = torch.randn(n, generator=g), torch.randn(n, generator=g)

    def d_hidden(idx):
        x = pool[idx].clone().requires_grad_()
        logp, ent = pyrl.fused_linear_logprobs(x, weight, y[idx], return_entropy=True, backend=backend)
        ((logp * g1[idx]).sum() + (ent * g2[idx]).sum()).backward()
        return x.grad

    full = d_hidden(torch.arange(n))
    for idx in (torch.arange(5), torch.tensor([9]), torch.randperm(n, generator=g), torch.tensor([3, 3, 30])):
        assert torch.equal(d_hidden(idx), full[idx]), idx


@pytest.mark.parametrize("backend", CPU)
def test_rollout_vs_training_batches_give_ratio_exactly_one(backend):
    """The scenario behind the TRL report: the same completions scored in the rollout batch and
    again in differently composed training micro-batches. Every ratio is exactly 1."""
    g = torch.Generator().manual_seed(6)
    B, T, h, vocab = 12, 9, 32, 700
    hidden = torch.randn(B, T, h, generator=g)
    weight = torch.randn(vocab, h, generator=g) / math.sqrt(h)
    y = torch.randint(0, vocab, (B, T), generator=g)
    rollout = pyrl.fused_linear_logprobs(hidden, weight, y, backend=backend)          # one big batch
    order = torch.randperm(B, generator=g)
    for micro in order.split(5):                                                       # shuffled micro-batches
        train = pyrl.fused_linear_logprobs(hidden[micro], weight, y[micro], backend=backend)
        assert torch.equal(torch.exp(train - rollout[micro]), torch.ones_like(train))


def test_gemm_row_quantum_is_what_the_blas_needs():
    """The premise of the padding: on this BLAS, a row of ``h @ W.T`` computed in a GEMM whose row
    count is a multiple of GEMM_ROW_QUANTUM is bitwise the same as in any other such GEMM (if this
    fails on a new platform, raise the quantum; see docs/reliability.md)."""
    q = plan_mod.GEMM_ROW_QUANTUM
    g = torch.Generator().manual_seed(7)
    for dtype in (torch.float32, torch.float64):
        x = torch.randn(8 * q, 96, generator=g, dtype=dtype)
        w = torch.randn(777, 96, generator=g, dtype=dtype)
        ref = x @ w.t()
        for m in range(q, 8 * q, q):
            assert torch.equal(x[:m] @ w.t(), ref[:m]), (dtype, m)
