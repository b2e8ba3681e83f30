"""Measuring one implementation on one case: wall time, peak memory and correctness.

* Time: ``time_step`` runs the step ``repeats`` times after the warm-up; on CUDA each run is
  bracketed by CUDA events and synchronised, on CPU by ``time.perf_counter``.
* Memory: ``PeakMemory`` reports the peak over what was allocated when the timed runs began
  (inputs, weights and anything the warm-up kept). CUDA: ``torch.cuda.max_memory_allocated``.
  CPU: the process's peak resident set (``VmHWM``) minus its resident set at the start, after
  ``malloc_trim`` has handed freed heap pages back and the kernel's peak counter was reset through
  ``/proc/self/clear_refs``. The runner does this in a fresh child process per implementation and
  shape, so no other implementation's freed memory is in the process to be reused.
* Correctness: ``check`` compares every output and gradient with the float64 reference on the same
  inputs; the error is ``max |out - ref|`` over the output, relative to ``max |ref|``, and a
  result above the dtype's tolerance (or non-finite, or missing) is a FAIL.
"""
from __future__ import annotations

import ctypes
import gc
import os
import resource
import sys
import time
import traceback
from dataclasses import dataclass

import numpy as np
import torch

from pyrl.bench.cases import flops, make_case, seq_len
from pyrl.bench.impls import REGISTRY, Impl

__all__ = ["Settings", "time_step", "PeakMemory", "check", "measure", "TOLERANCE", "DTYPES", "reset_peak_rss",
           "status_kb"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Largest accepted max|out - ref| / max|ref| per input dtype.
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 5e-3}


@dataclass
class Settings:
    device: str = "cpu"
    dtype: str = "float32"
    warmup: int = 1
    repeats: int = 3
    seed: int = 0
    threads: int | None = None
    deadline: float | None = None  # time.time() after which no new measurement starts


# --------------------------------------------------------------------------------------------
# Time
# --------------------------------------------------------------------------------------------
def time_step(step, repeats: int, device: torch.device) -> tuple[list[float], dict]:
    """Seconds per run of ``step()`` over ``repeats`` runs, and the last run's outputs."""
    times: list[float] = []
    out: dict = {}
    for _ in range(repeats):
        out = {}  # free the previous outputs before the next run, as a training loop would
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = step()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            out = step()
            times.append(time.perf_counter() - t0)
    return times, out


# --------------------------------------------------------------------------------------------
# Memory
# --------------------------------------------------------------------------------------------
def status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def _malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakMemory:
    """``with PeakMemory(device) as mem: ...`` -> ``mem.peak_bytes`` above the level at entry."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak_bytes: int | None = None
        self.method = ""

    def __enter__(self):
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            self.method = "torch.cuda.max_memory_allocated delta"
        else:
            _malloc_trim()
            self.reset = reset_peak_rss()
            rss = status_kb("VmRSS")
            if self.reset and rss is not None:
                self.base = rss * 1024
                self.method = "VmHWM delta (peak RSS reset via clear_refs)"
            else:  # lifetime peak: includes anything before, e.g. the warm-up
                self.base = (rss or 0) * 1024
                self.method = "ru_maxrss delta (lifetime peak; includes warm-up)"
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - self.base
        else:
            hwm = status_kb("VmHWM") if self.reset else None
            if hwm is None:
                scale = 1 if sys.platform == "darwin" else 1024
                hwm_bytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
            else:
                hwm_bytes = hwm * 1024
            self.peak_bytes = max(0, hwm_bytes - self.base)
        return False


# --------------------------------------------------------------------------------------------
# Correctness
# --------------------------------------------------------------------------------------------
def _max_abs_diff(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.detach().reshape(-1), ref.reshape(-1)
    worst, step = 0.0, 1 << 24
    for s in range(0, ref.numel(), step):
        o = out[s:s + step].double().cpu()
        if not torch.isfinite(o).all():
            return float("inf")
        worst = max(worst, float((o - ref[s:s + step]).abs().max()))
    return worst


def check(out: dict, ref: dict, dtype: torch.dtype) -> dict:
    """Compare outputs with the float64 reference; returns the error columns of a result row."""
    tol = TOLERANCE.get(dtype, 1e-4)
    worst = {"max_abs_err": 0.0, "max_rel_err": 0.0, "worst_output": None, "tolerance": tol}
    problems = []
    for key, r in ref.items():
        if key == "rows":
            continue
        o = out.get(key)
        if o is None:
            problems.append(f"missing output {key}")
            continue
        if key == "d_logits":
            o = o[ref["rows"].to(o.device)]
        if tuple(o.shape) != tuple(r.shape):
            problems.append(f"{key} has shape {tuple(o.shape)}, expected {tuple(r.shape)}")
            continue
        abs_err = _max_abs_diff(o, r)
        scale = float(r.abs().max())
        rel_err = abs_err / scale if scale > 0 else abs_err
        if rel_err >= worst["max_rel_err"]:
            worst.update(max_rel_err=rel_err, worst_output=key)
        worst["max_abs_err"] = max(worst["max_abs_err"], abs_err)
    ok = not problems and worst["max_rel_err"] <= tol
    worst["correct"] = "PASS" if ok else "FAIL"
    if problems:
        worst["check_note"] = "; ".join(problems)
    return worst


# --------------------------------------------------------------------------------------------
# One implementation x one shape
# --------------------------------------------------------------------------------------------
def base_row(impl: Impl, shape, settings: Settings) -> dict:
    n, h, v = shape
    device = torch.device(settings.device)
    row = {"op": impl.op, "impl": impl.name, "kind": impl.kind, "N": n,
           "H": None if impl.op == "logits_logprobs" else h, "V": v,
           "dtype": settings.dtype, "device": settings.device, "status": "ok", "note": impl.note}
    if impl.op in ("grpo_loss", "dpo_loss"):
        t = seq_len(n, device, impl.op)
        row.update(B=n // t, T=t)
    return row


def skipped_row(impl: Impl, shape, settings: Settings, why: str) -> dict:
    return {**base_row(impl, shape, settings), "status": "skipped", "note": why, "correct": "n/a"}


def ref_key(outputs: tuple[str, ...]) -> str:
    return ",".join(outputs)


def measure(op: str, impl_name: str, shape, settings: Settings, ref_entry: dict) -> dict:
    """Build the case, warm up, time (while tracking peak memory), then check the last outputs.

    ``ref_entry``: ``{"fingerprint", "extras", "refs": {ref_key(outputs): reference dict}}`` as
    made by ``runner.prepare_reference``.
    """
    impl = REGISTRY[(op, impl_name)]
    device = torch.device(settings.device)
    dtype = DTYPES[settings.dtype]
    row = base_row(impl, shape, settings)
    if settings.threads:
        torch.set_num_threads(settings.threads)
    torch.manual_seed(settings.seed)
    case = make_case(op, shape, dtype, device, settings.seed, extras=ref_entry["extras"])
    if abs(case.fingerprint() - ref_entry["fingerprint"]) > 1e-6 * max(1.0, abs(ref_entry["fingerprint"])):
        raise RuntimeError("the inputs rebuilt from the seed differ from the reference's inputs")
    try:
        step = impl.build(case)
        for _ in range(settings.warmup):
            step()
        with PeakMemory(device) as mem:
            times, out = time_step(step, settings.repeats, device)
    except Exception as exc:  # noqa: BLE001  (a failure is a result, not a crash of the suite)
        # A backend that says it lacks this op is a skip; any other failure of ours is an error.
        unsupported = isinstance(exc, RuntimeError) and "not implemented" in str(exc)
        status = "error" if impl.kind == "pyrl" and not unsupported else "skipped"
        first_line = (str(exc).strip().splitlines() or [""])[0]
        why = f"{type(exc).__name__}: {first_line}"
        if os.environ.get("PYRL_BENCH_DEBUG"):
            traceback.print_exc()
        return {**row, "status": status, "note": f"failed: {why[:300]}", "correct": "n/a"}
    t = np.asarray(times) * 1e3
    row.update(time_ms_median=float(np.median(t)), time_ms_q1=float(np.percentile(t, 25)),
               time_ms_q3=float(np.percentile(t, 75)), time_ms_min=float(t.min()), time_ms_max=float(t.max()),
               repeats=settings.repeats, warmup=settings.warmup,
               peak_mem_mb=mem.peak_bytes / 2**20, memory_method=mem.method)
    # What the step hands back (gradients of the weight and hidden states, ...) is unavoidable;
    # the rest of the peak is the implementation's working memory.
    out_bytes = sum(t.numel() * t.element_size() for t in out.values() if torch.is_tensor(t))
    row.update(outputs_mb=out_bytes / 2**20, working_mem_mb=max(0, mem.peak_bytes - out_bytes) / 2**20)
    f = flops(op, shape)
    row["tflops"] = f / (row["time_ms_median"] / 1e3) / 1e12 if f else None
    if impl.kind == "floor":
        row["correct"] = "n/a"
    else:
        row.update(check(out, ref_entry["refs"][ref_key(impl.outputs)], dtype))
    return row
