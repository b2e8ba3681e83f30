"""The benchmark runner end to end on a tiny shape: outputs, one row per implementation, and a
deliberately wrong implementation flagged as FAIL (a fast wrong kernel must show as wrong)."""
import importlib.util
import json

import pytest
import torch

from pyrl.bench import REGISTRY, Impl, implementations, run
from pyrl.bench.impls import logprob_outputs, plain_linear_logprobs
from pyrl.bench.runner import parse_args

TINY = ["--device", "cpu", "--shapes", "16,8,50", "--repeats", "1", "--warmup", "0"]
# torch.compile is left out: a cold compile alone takes longer than this test may.
IMPLS = ["--impls", "pyrl*", "torch", "liger", "wrong*"]


def _wrong(case):
    def step():
        logp, entropy = plain_linear_logprobs(case.hidden, case.weight, case.targets)
        return logprob_outputs(case, logp * 1.01, entropy)  # right shapes, 1% off
    return step


@pytest.fixture
def wrong_impls(monkeypatch):
    for name, kind in (("wrong", "baseline"), ("wrong-pyrl", "pyrl")):
        monkeypatch.setitem(REGISTRY, ("linear_logprobs", name), Impl("linear_logprobs", name, _wrong, kind=kind))


def test_runner_tiny_in_process(tmp_path, wrong_impls):
    status = run(TINY + IMPLS + ["--no-subprocess", "--out", str(tmp_path)])
    assert status == 1, "a wrong pyrl implementation must make the run fail"

    doc = json.loads((tmp_path / "results.json").read_text())
    md = (tmp_path / "results.md").read_text()
    assert {"cpu", "cores", "torch", "threads", "date"} <= set(doc["machine"])
    assert doc["settings"]["dtype"] == "float32" and doc["settings"]["shapes"] == [[16, 8, 50]]

    rows = {(r["op"], r["impl"]): r for r in doc["rows"]}
    selected = {"pyrl[torch]", "pyrl[cpp]", "pyrl[triton]", "torch", "liger", "wrong", "wrong-pyrl"}
    for op in ("linear_logprobs", "logits_logprobs", "grpo_loss"):
        for impl in implementations(op):
            if impl.kind == "floor" or impl.name in selected:
                assert (op, impl.name) in rows, f"no row for {op} / {impl.name}"

    measured = [r for r in doc["rows"] if r["status"] == "ok"]
    assert measured
    for r in measured:
        assert r["time_ms_median"] > 0 and r["peak_mem_mb"] >= 0
        if r["kind"] == "floor":
            assert r["correct"] == "n/a" and r["x_floor"] == pytest.approx(1.0)
        else:
            assert isinstance(r["max_rel_err"], float) and isinstance(r["max_abs_err"], float)
            assert r["correct"] in ("PASS", "FAIL")
    for impl in ("pyrl[torch]", "torch"):
        assert rows[("linear_logprobs", impl)]["correct"] == "PASS"
        assert rows[("logits_logprobs", impl)]["correct"] == "PASS"
    for name in ("wrong", "wrong-pyrl"):
        wrong = rows[("linear_logprobs", name)]
        assert wrong["status"] == "ok" and wrong["correct"] == "FAIL", wrong
        assert wrong["max_rel_err"] > wrong["tolerance"]
    assert "| wrong |" in md and "FAIL" in md

    if importlib.util.find_spec("matplotlib") is None:
        assert "matplotlib" in doc["plot_note"]
    else:
        assert doc["plots"] and all((tmp_path / p).is_file() for p in doc["plots"])


def test_runner_child_process_memory(tmp_path, capsys):
    status = run(TINY + ["--ops", "logits_logprobs", "--impls", "pyrl?torch?", "--out", str(tmp_path), "--no-plots"])
    assert status == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert "plot" in last and "not drawn" in last and "and plots" not in last, last  # says no plot was drawn
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    ours = next(r for r in rows if r["impl"] == "pyrl[torch]")
    assert ours["status"] == "ok" and ours["correct"] == "PASS"
    assert ours["peak_mem_mb"] >= 0 and ours["memory_method"]


def test_shapes_flag():
    args = parse_args(["--device", "cpu", "--shapes", "512,896,32000", "16,8,50"])
    assert args.shapes == [(16, 8, 50), (512, 896, 32000)]  # smallest first
    with pytest.raises(SystemExit):
        parse_args(["--device", "cpu", "--shapes", "512,896"])
    assert parse_args(["--device", "cpu", "--quick"]).shapes[0][0] <= 512


def test_reference_matches_autograd_float64():
    """The chunked two-pass reference equals plain float64 autograd on the full logits."""
    from pyrl.bench.cases import make_case
    from pyrl.bench.reference import reference

    case = make_case("linear_logprobs", (12, 6, 40), torch.float64, "cpu", seed=3)
    ref = reference(case)
    logp, entropy = plain_linear_logprobs(case.hidden, case.weight, case.targets)
    out = logprob_outputs(case, logp, entropy)
    for key in ("logp", "entropy", "d_hidden", "d_weight"):
        torch.testing.assert_close(out[key], ref[key], rtol=1e-10, atol=1e-12)


def _targets_module():
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "targets.py"
    spec = importlib.util.spec_from_file_location("bench_targets", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _row(impl, ms, work=10.0, floor=100.0, correct="PASS", device="cuda", n=16384, h=4096, v=151936,
         op="grpo_loss"):
    return dict(op=op, device=device, N=n, H=h, V=v, dtype="bfloat16", impl=impl, status="ok", correct=correct,
                time_ms_median=ms, x_floor=ms / floor, working_mem_mb=work)


def test_targets_read_the_results_row_by_row(tmp_path):
    """benchmarks/targets.py (run by gpu_check.sh): the default row against its floor and memory
    targets, the best budget row, the rivals on CPU; a failed float64 check or a missing row fails,
    and shapes outside the targets are not judged."""
    t = _targets_module()
    rows = [_row("gemm-floor", 100.0), _row("pyrl[triton]", 125.0, work=200),  # 1.25x in 200 MB
            _row("pyrl[triton]/auto", 110.0, work=3700), _row("pyrl[triton]/blocked", 105.0, correct="FAIL"),
            _row("pyrl[triton]", 900.0, n=2048)]  # a sweep shape: not judged
    lines, ok = t.check(rows)
    assert ok and len(lines) == 2, lines
    assert "`pyrl[triton]/auto` 1.10x" in lines[1]  # the blocked row did not PASS its check: not the best
    lines, ok = t.check([_row("pyrl[triton]", 125.0, work=300), _row("pyrl[triton]/auto", 120.0)])
    assert not ok and "FAIL" in lines[0] and "FAIL" in lines[1]  # 300 MB > 256; 1.20x > 1.15x
    cpu = dict(device="cpu", n=2048, h=896)
    lines, ok = t.check([_row("pyrl[cpp]", 100.0, work=56, **cpu), _row("liger", 125.0, **cpu),
                         _row("torch", 200.0, **cpu)])
    assert not ok and [line.endswith("FAIL |") for line in lines] == [False, True, False]  # Liger 1.25 < 1.3
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"rows": [_row("pyrl[triton]", 125.0, correct="FAIL")]}))
    assert t.main([str(path), "--out", str(tmp_path / "t.md")]) == 1
    assert "no correct `pyrl[triton]` row" in (tmp_path / "t.md").read_text()
