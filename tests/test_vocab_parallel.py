"""Vocab-parallel fused_linear_logprobs: 2 gloo CPU processes against the single-process result.

The parent builds every case, spawns 2 ranks once for the whole module (each holds an uneven slice
of the LM head), the ranks write their outputs and gradients to files, and the parent asserts, so a
failure is reported here with a clear message. A collective timeout on the process group and a join
deadline keep a broken collective from hanging CI.
"""
import datetime
import math
import os
import time
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import pyrl
from _ref import linear_logprobs_ref
from pyrl.ops.vocab_parallel import vocab_parallel_linear_logprobs

WORLD = 2
V = 37
SPLIT = (19, 18)  # uneven: rank 0 owns ids [0, 19), rank 1 owns [19, 37)
OFFSETS = (0, 19)
H = 16
TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-3, torch.float64: 1e-10}
TIMEOUT_S = 60


def _make_case(dtype, *, lead=(3, 4), bias=True, temperature=0.7, entropy=True, chunk_bytes=None,
               targets=None, neg_inf_bias=False, public=False, weight_scale=1.0):
    n = math.prod(lead)
    g = torch.Generator().manual_seed(1234 + n)
    hidden = torch.randn(*lead, H, generator=g, dtype=torch.float64).to(dtype)
    weight = (torch.randn(V, H, generator=g, dtype=torch.float64) * weight_scale / math.sqrt(H)).to(dtype)
    b = torch.randn(V, generator=g, dtype=torch.float64).to(dtype) if bias else None
    if neg_inf_bias:
        b[SPLIT[0]:] = float("-inf")  # rank 1's whole slice masked out
        b[[2, 5]] = float("-inf")
    if targets is None:
        targets = torch.randint(0, V, lead, generator=g)
        flat = targets.view(-1)
        flat[0], flat[1] = 3, 30  # at least one id owned by each rank
        flat[2], flat[-1] = -100, -100  # ignored rows
    return dict(hidden=hidden, weight=weight, bias=b, targets=targets, temperature=temperature,
                entropy=entropy, chunk_bytes=chunk_bytes, public=public, large=weight_scale > 1,
                g_logp=torch.randn(lead, generator=g, dtype=torch.float64),
                g_ent=torch.randn(lead, generator=g, dtype=torch.float64))


def _cases():
    ignored_block = torch.randint(0, V, (12,), generator=torch.Generator().manual_seed(7))
    ignored_block[5:10] = -100  # with 5-row chunks, the second chunk is entirely ignored
    ignored_block[0], ignored_block[1] = 18, 19  # the two ids on either side of the rank boundary
    return {
        "fp32_public": _make_case(torch.float32, public=True),
        "fp64": _make_case(torch.float64),
        "fp32_small_chunks": _make_case(torch.float32, lead=(12,), targets=ignored_block.clone(),
                                        chunk_bytes=5 * max(SPLIT) * 4),  # 5 rows per chunk < N = 12
        "fp64_small_chunks": _make_case(torch.float64, lead=(12,), targets=ignored_block.clone(),
                                        chunk_bytes=5 * max(SPLIT) * 4),
        "fp32_nobias_t1_logp_only": _make_case(torch.float32, lead=(2, 3), bias=False, temperature=1.0,
                                               entropy=False),
        "bf16": _make_case(torch.bfloat16, lead=(9,)),
        "fp32_neg_inf": _make_case(torch.float32, lead=(6,), neg_inf_bias=True,
                                   targets=torch.tensor([0, 3, 18, -100, 7, 11])),
        # logits/T in the hundreds (exp overflows fp32 without the max shift), ignored rows included
        "fp32_large_logits": _make_case(torch.float32, lead=(8,), temperature=0.1, weight_scale=8.0),
        # chunk_bytes="auto" with a different free memory on each rank (_auto_budgets): the ranks
        # must still agree on one chunking (the smallest budget), or the collectives would mismatch
        "fp32_auto_ranks_disagree": _make_case(torch.float32, lead=(12,), targets=ignored_block.clone(),
                                               chunk_bytes="auto"),
    }


class _auto_budgets:
    """chunk_bytes="auto" resolves to 512 bytes (6 rows of a 19-column slice) on rank 0 and to 1024
    (13 rows: one chunk for N = 12) on rank 1, from faked free memory."""

    def __init__(self, rank):
        from pyrl.ops import plan

        self.plan, self.rank = plan, rank

    def __enter__(self):
        p = self.plan
        self.saved = p.free_memory, p.DEFAULT_CHUNK_BYTES, p.AUTO_MAX_CHUNK_BYTES
        p.free_memory = lambda device: 512 * p.AUTO_FREE_SHARE * (1 + self.rank)
        p.DEFAULT_CHUNK_BYTES, p.AUTO_MAX_CHUNK_BYTES = 1, {"cpu": 2**40, "cuda": 2**40}

    def __exit__(self, *exc):
        self.plan.free_memory, self.plan.DEFAULT_CHUNK_BYTES, self.plan.AUTO_MAX_CHUNK_BYTES = self.saved


def _run(case, rank, group):
    """The vocab-parallel call on one rank, then backward; returns outputs and grads."""
    lo, hi = OFFSETS[rank], OFFSETS[rank] + SPLIT[rank]
    hidden = case["hidden"].clone().requires_grad_()
    weight = case["weight"][lo:hi].clone().requires_grad_()
    bias = None if case["bias"] is None else case["bias"][lo:hi].clone().requires_grad_()
    kw = dict(bias=bias, temperature=case["temperature"], return_entropy=case["entropy"])
    if case["public"]:
        out = pyrl.fused_linear_logprobs(hidden, weight, case["targets"], vocab_parallel_group=group, **kw)
    else:
        if case["chunk_bytes"] is not None:
            kw["chunk_bytes"] = case["chunk_bytes"]
        if case["chunk_bytes"] == "auto":
            with _auto_budgets(rank):
                assert pyrl.ops.plan.resolve_chunk_bytes("auto", hidden.device)[0] == 512 * (1 + rank)
                out = vocab_parallel_linear_logprobs(hidden, weight, case["targets"], group=group, **kw)
        else:
            out = vocab_parallel_linear_logprobs(hidden, weight, case["targets"], group=group, **kw)
    return _backward(case, out, hidden, weight, bias)


def _backward(case, out, hidden, weight, bias):
    """Backward of the case's fixed objective through ``out``; the outputs and the gradients."""
    logp, ent = out if case["entropy"] else (out, None)
    loss = (logp.double() * case["g_logp"]).sum()
    if ent is not None:
        loss = loss + (ent.double() * case["g_ent"]).sum()
    loss.backward()
    return dict(logp=logp.detach(), ent=None if ent is None else ent.detach(), d_hidden=hidden.grad,
                d_weight=weight.grad, d_bias=None if bias is None else bias.grad)


def _error(fn):
    try:
        fn()
    except Exception as exc:  # noqa: BLE001
        return (type(exc).__name__, str(exc))
    return None


def _bad_inputs(rank, group):
    h = torch.randn(4, H)
    w = torch.randn(SPLIT[rank], H)
    call = lambda y, **kw: vocab_parallel_linear_logprobs(h, w, y, group=group, **kw)  # noqa: E731
    return {
        # id 37 is out of the GLOBAL vocabulary; id 20 (>= rank 0's V_r but < V) is fine on every rank
        "target_out_of_range": _error(lambda: call(torch.tensor([0, 20, 37, -100]))),
        "global_id_accepted": _error(lambda: call(torch.tensor([0, 20, 36, -100]))),
        "backend_cpp": _error(lambda: call(torch.tensor([0, 1, 2, 3]), backend="cpp")),
        "not_a_group": _error(lambda: vocab_parallel_linear_logprobs(h, w, torch.zeros(4, dtype=torch.long),
                                                                    group="world")),
        # ranks disagree on N: every rank raises (no hang)
        "mismatched_n": _error(lambda: vocab_parallel_linear_logprobs(
            torch.randn(4 + rank, H), w, torch.zeros(4 + rank, dtype=torch.long), group=group)),
    }


POLICY_CFG = dict(beta=0.05, kl_type="k3", entropy_coef=0.01, top_entropy_rho=0.5, agg="seq-mean-token-mean",
                  temperature=0.8)


def _policy_case():
    """fused_linear_policy_loss with a vocab-split head: KL to a reference head (split too), the
    entropy bonus and the top-entropy mask (which need the entropy over the whole vocabulary)."""
    g = torch.Generator().manual_seed(99)
    B, T = 2, 5
    hidden = torch.randn(B, T, H, generator=g, dtype=torch.float64)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64) / math.sqrt(H)
    targets = torch.randint(0, V, (B, T), generator=g)
    targets[0, 0], targets[1, 1] = 3, 30  # ids owned by each rank
    mask = torch.ones(B, T)
    mask[1, 3:] = 0
    targets[1, 4] = 10_000  # padding may hold any id
    return dict(hidden=hidden, weight=weight, targets=targets, mask=mask,
                adv=torch.tensor([0.7, -1.2], dtype=torch.float64),
                old=-3 * torch.rand(B, T, generator=g, dtype=torch.float64),
                ref_hidden=hidden + 0.1 * torch.randn(B, T, H, generator=g, dtype=torch.float64))


def _policy_run(case, lo, hi, group):
    h = case["hidden"].clone().requires_grad_()
    w = case["weight"][lo:hi].clone().requires_grad_()
    loss, metrics = pyrl.fused_linear_policy_loss(
        h, w, case["targets"], case["mask"], case["adv"], old_logp=case["old"], ref_hidden=case["ref_hidden"],
        ref_weight=case["weight"][lo:hi], config=pyrl.PolicyLossConfig(**POLICY_CFG), vocab_parallel_group=group)
    loss.backward()
    return dict(loss=loss.detach(), metrics=metrics, d_hidden=h.grad, d_weight=w.grad)


def _worker(rank, tmp):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{os.path.join(tmp, 'store')}", rank=rank,
                            world_size=WORLD, timeout=datetime.timedelta(seconds=TIMEOUT_S))
    try:
        cases = torch.load(os.path.join(tmp, "cases.pt"), weights_only=False)
        group = dist.new_group([0, 1])  # an explicit group; the public case uses the default WORLD
        out = {}
        for name, case in cases.items():
            try:
                out[name] = _run(case, rank, dist.group.WORLD if case["public"] else group)
            except Exception:  # noqa: BLE001  (report it in the parent, keep the other cases going)
                out[name] = {"error": traceback.format_exc()}
        out["bad_inputs"] = _bad_inputs(rank, group)
        try:
            out["policy_loss"] = _policy_run(_policy_case(), OFFSETS[rank], OFFSETS[rank] + SPLIT[rank], group)
        except Exception:  # noqa: BLE001
            out["policy_loss"] = {"error": traceback.format_exc()}
        torch.save(out, os.path.join(tmp, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("vocab_parallel"))
    cases = _cases()
    torch.save(cases, os.path.join(tmp, "cases.pt"))
    ctx = mp.start_processes(_worker, args=(tmp,), nprocs=WORLD, join=False, start_method="spawn")
    deadline = time.monotonic() + 2 * TIMEOUT_S
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.terminate()
            pytest.fail(f"vocab-parallel workers did not finish within {2 * TIMEOUT_S} s")
    ranks = [torch.load(os.path.join(tmp, f"rank{r}.pt"), weights_only=False) for r in range(WORLD)]
    return cases, ranks


def _single_process(case):
    """pyrl.fused_linear_logprobs(backend="torch") on the whole head: values and grads."""
    hidden = case["hidden"].clone().requires_grad_()
    weight = case["weight"].clone().requires_grad_()
    bias = None if case["bias"] is None else case["bias"].clone().requires_grad_()
    kw = dict(bias=bias, temperature=case["temperature"], return_entropy=case["entropy"], backend="torch")
    if case["chunk_bytes"] not in (None, "auto"):
        kw["chunk_bytes"] = case["chunk_bytes"]
    out = pyrl.fused_linear_logprobs(hidden, weight, case["targets"], **kw)
    return _backward(case, out, hidden, weight, bias)


def _ref64_grads(case):
    """Gradients of the float64 reference (full logits, plain autograd)."""
    f64 = lambda t: t.to(torch.float64, copy=True).requires_grad_()  # noqa: E731  (never alias the case)
    hidden, weight = f64(case["hidden"]), f64(case["weight"])
    bias = None if case["bias"] is None else f64(case["bias"])
    logp, ent = linear_logprobs_ref(hidden, weight, case["targets"], bias, case["temperature"])
    loss = (logp * case["g_logp"]).sum()
    if case["entropy"]:
        loss = loss + (ent * case["g_ent"]).sum()
    loss.backward()
    return dict(d_hidden=hidden.grad, d_weight=weight.grad, d_bias=None if bias is None else bias.grad)


def _close(name, got, want, tol):
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    got, want = got.double(), want.double()
    same_inf = (got == want) | (torch.isfinite(got) & torch.isfinite(want))
    assert bool(same_inf.all()), f"{name}: infinities differ: {got} vs {want}"
    fin = torch.isfinite(want)
    scale = max(1.0, float(want[fin].abs().max())) if bool(fin.any()) else 1.0
    err = float((got[fin] - want[fin]).abs().max()) if bool(fin.any()) else 0.0
    assert err <= tol * scale, f"{name}: max abs error {err:.3g} > {tol * scale:.3g}"


CASE_NAMES = list(_cases())


@pytest.mark.parametrize("name", CASE_NAMES)
def test_matches_single_process(results, name):
    cases, ranks = results
    case = cases[name]
    for r in range(WORLD):
        assert "error" not in ranks[r][name], f"rank {r} failed:\n{ranks[r][name].get('error')}"
    tol = TOL[case["hidden"].dtype]
    ref = _single_process(case)
    ref64 = _ref64_grads(case)
    logp64, ent64 = linear_logprobs_ref(case["hidden"], case["weight"], case["targets"], case["bias"],
                                        case["temperature"])
    valid = case["targets"] != -100
    for r in range(WORLD):
        got = ranks[r][name]
        lo, hi = OFFSETS[r], OFFSETS[r] + SPLIT[r]
        assert got["logp"].dtype == ref["logp"].dtype
        _close(f"rank {r} logp", got["logp"], ref["logp"], tol)
        assert bool((got["logp"][~valid] == 0).all()) and bool((got["logp"] <= 0).all())
        # (bf16: the float64 reference is evaluated on the same bf16-rounded inputs)
        _close(f"rank {r} logp vs float64", got["logp"], logp64, tol)
        if case["entropy"]:
            _close(f"rank {r} entropy", got["ent"], ref["ent"], tol)
            _close(f"rank {r} entropy vs float64", got["ent"], ent64, tol)
            assert bool((got["ent"][~valid] == 0).all())
        # gradients: this rank's rows of d_weight / d_bias, and the FULL d_hidden on every rank,
        # against the single-process op and the float64 autograd reference
        assert got["d_hidden"].dtype == case["hidden"].dtype and got["d_weight"].dtype == case["weight"].dtype
        # (the single-process torch body's backward gives NaN for ignored rows with logits/T > ~88 in
        # fp32; the large-logits case is checked against the float64 reference only)
        refs = [("float64", ref64)] + ([] if case["large"] else [("single-process", ref)])
        # (as in test_logprobs: gradients at 4x the value tolerance, relative to their max, which
        # covers rounding the gradient to bf16)
        for what, want in refs:
            _close(f"rank {r} d_hidden vs {what}", got["d_hidden"], want["d_hidden"], 4 * tol)
            _close(f"rank {r} d_weight vs {what}", got["d_weight"], want["d_weight"][lo:hi], 4 * tol)
            if case["bias"] is not None:
                _close(f"rank {r} d_bias vs {what}", got["d_bias"], want["d_bias"][lo:hi], 4 * tol)
        for k in ("d_hidden", "d_weight") + (("d_bias",) if case["bias"] is not None else ()):
            assert bool(torch.isfinite(got[k]).all()), f"rank {r} {k} not finite"
    # every rank gets bitwise the same results (computed from the same all-reduced statistics)
    assert torch.equal(ranks[0][name]["logp"], ranks[1][name]["logp"])
    if case["entropy"]:
        assert torch.equal(ranks[0][name]["ent"], ranks[1][name]["ent"])
    assert torch.equal(ranks[0][name]["d_hidden"], ranks[1][name]["d_hidden"])


def test_bad_inputs(results):
    _, ranks = results
    for r in range(WORLD):
        bad = ranks[r]["bad_inputs"]
        kind, msg = bad["target_out_of_range"]
        assert kind == "ValueError" and "[0, 37)" in msg and "37" in msg, (r, kind, msg)
        assert bad["global_id_accepted"] is None, (r, bad["global_id_accepted"])
        kind, msg = bad["backend_cpp"]
        assert kind == "RuntimeError" and "vocab-parallel" in msg, (r, kind, msg)
        kind, msg = bad["not_a_group"]
        assert kind == "TypeError" and "ProcessGroup" in msg, (r, kind, msg)
        kind, msg = bad["mismatched_n"]
        assert kind == "ValueError" and "disagree" in msg, (r, kind, msg)


def test_not_a_group_in_this_process():
    h, w = torch.randn(2, H), torch.randn(5, H)
    with pytest.raises(TypeError, match="ProcessGroup"):
        pyrl.fused_linear_logprobs(h, w, torch.tensor([0, 1]), vocab_parallel_group=object())


def test_policy_loss_matches_single_process(results):
    _, ranks = results
    case = _policy_case()
    ref = _policy_run(case, 0, V, None)
    for r in range(WORLD):
        got = ranks[r]["policy_loss"]
        assert "error" not in got, f"rank {r} failed:\n{got.get('error')}"
        lo, hi = OFFSETS[r], OFFSETS[r] + SPLIT[r]
        _close(f"rank {r} loss", got["loss"], ref["loss"], 1e-10)
        for k, v in ref["metrics"].items():
            _close(f"rank {r} {k}", got["metrics"][k], v, 1e-10)
        _close(f"rank {r} d_hidden", got["d_hidden"], ref["d_hidden"], 1e-10)
        _close(f"rank {r} d_weight", got["d_weight"], ref["d_weight"][lo:hi], 1e-10)
    assert torch.equal(ranks[0]["policy_loss"]["loss"], ranks[1]["policy_loss"]["loss"])


def test_policy_loss_full_kl_is_refused_with_a_group():
    case = _policy_case()
    cfg = pyrl.PolicyLossConfig(beta=0.1, kl_type="full")
    with pytest.raises(ValueError, match="kl_type='full' is not supported with vocab_parallel_group"):
        pyrl.fused_linear_policy_loss(case["hidden"], case["weight"], case["targets"], case["mask"], case["adv"],
                                      ref_hidden=case["ref_hidden"], ref_weight=case["weight"], config=cfg,
                                      vocab_parallel_group=object())
