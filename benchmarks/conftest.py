"""pytest-benchmark over the implementation registry of ``pyrl.bench`` (no implementation is
written twice). Each test builds the case, runs one warm-up step, checks it against the float64
reference (a wrong implementation fails its benchmark) and then times the step.

    pytest benchmarks/ --benchmark-only
    PYRL_BENCH_SHAPE=1024,896,151936 PYRL_BENCH_ROUNDS=5 pytest benchmarks/ --benchmark-only

Environment: PYRL_BENCH_DEVICE (cpu | cuda; default cuda when available), PYRL_BENCH_SHAPE (N,H,V;
default 512,896,32000), PYRL_BENCH_DTYPE (default float32 on CPU, bfloat16 on CUDA),
PYRL_BENCH_ROUNDS (timed rounds, default 3).
"""
import os

import pytest
import torch

from pyrl.bench.cases import make_case
from pyrl.bench.measure import DTYPES, Settings, check, ref_key
from pyrl.bench.runner import prepare_reference

DEVICE = os.environ.get("PYRL_BENCH_DEVICE", "cuda" if torch.cuda.is_available() else "cpu")
SHAPE = tuple(int(x) for x in os.environ.get("PYRL_BENCH_SHAPE", "512,896,32000").split(","))
DTYPE = os.environ.get("PYRL_BENCH_DTYPE", "bfloat16" if DEVICE == "cuda" else "float32")
ROUNDS = int(os.environ.get("PYRL_BENCH_ROUNDS", "3"))


@pytest.fixture(scope="session")
def reference_for():
    """``reference_for(op, outputs)``: the run's inputs and float64 reference, computed once per op."""
    settings = Settings(device=DEVICE, dtype=DTYPE)
    cache = {}

    def get(op, outputs):
        key = (op, outputs)
        if key not in cache:
            cache[key] = prepare_reference(op, SHAPE, settings, [outputs])
        return cache[key]
    return get


@pytest.fixture
def bench_impl(benchmark, reference_for):
    """``bench_impl(impl)``: check ``impl`` against the reference, then time it with ``benchmark``."""

    def run(impl):
        device = torch.device(DEVICE)
        why = impl.requires(device)
        if why:
            pytest.skip(why)
        entry = reference_for(impl.op, impl.outputs)
        case = make_case(impl.op, SHAPE, DTYPES[DTYPE], device, 0, extras=entry["extras"])
        try:
            step = impl.build(case)
            out = step()  # warm-up (and torch.compile) outside the timing
        except Exception as exc:  # noqa: BLE001
            if impl.kind == "pyrl":
                raise
            pytest.skip(f"{impl.name} failed: {type(exc).__name__}: {exc}")

        def timed():
            step()
            if device.type == "cuda":
                torch.cuda.synchronize()

        benchmark.group = f"{impl.op} {'x'.join(map(str, SHAPE))} {DTYPE} {DEVICE}"
        benchmark.extra_info.update(op=impl.op, impl=impl.name, kind=impl.kind, shape=list(SHAPE), dtype=DTYPE)
        if impl.kind != "floor":
            result = check(out, entry["refs"][ref_key(impl.outputs)], DTYPES[DTYPE])
            benchmark.extra_info.update(max_rel_err=result["max_rel_err"], correct=result["correct"])
            assert result["correct"] == "PASS", f"{impl.name} is wrong: {result}"
        del out
        benchmark.pedantic(timed, rounds=ROUNDS, iterations=1, warmup_rounds=0)
    return run
