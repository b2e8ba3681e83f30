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
