"""The cost of the sampler's truncation (top_k / top_p / min_p, docs/formulas.md §1.1) on CPU.

    python benchmarks/sampler_cost.py OUT_DIR [REPEATS]

At V = 151936, fp32, backend="cpp", times (median of REPEATS after a warm-up):

Every table's methods run interleaved, round by round (a shared machine's slow spells hit all alike).

1. the kept-set threshold alone, ``[R, V]`` logits: top-k by the C++ heap selection vs
   ``torch.topk``; top-p by the C++ threshold search vs a C++ sort of each row (``std::sort``) vs
   the PyTorch reference (``torch.sort`` + ``cumsum``), on two kinds of rows: "peaked" (``4 * randn``,
   the top-p=0.9 nucleus a few hundred tokens) and "flat" (``randn``, a nucleus of most of V);
2. each option against plain log-probs: ``logprobs_from_logits`` (``[R, V]`` logits) and
   ``fused_linear_logprobs`` (``[N, H] x [V, H]``), forward + backward with entropy.

Writes OUT_DIR/results.json and OUT_DIR/results.md (machine, torch, threads, shapes, times, ratios).
"""
import json
import os
import statistics
import sys
import time

import torch

from pyrl.bench.report import cpu_model

import pyrl
from pyrl.kernels.reference import RowParams, TorchRows
from pyrl.ops.walk import CppRows

V, R, N, H = 151936, 64, 64, 896
OPTIONS = {"plain": {}, "top_k=50": dict(top_k=50), "top_p=0.9": dict(top_p=0.9), "min_p=0.05": dict(min_p=0.05),
           "top_k=50, top_p=0.9, min_p=0.05": dict(top_k=50, top_p=0.9, min_p=0.05)}


def machine() -> str:
    model = cpu_model()
    return f"{model}, {os.cpu_count()} logical CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads"


def interleaved(fns: dict, reps: int) -> dict:
    """Median time of each ``fns[name]()``, run once per round, round after round (round 0 warms
    up), so that a busy machine's slow spells fall on every method alike."""
    times = {name: [] for name in fns}
    for rnd in range(reps + 1):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            if rnd:
                times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def thresholds(reps):
    rows = {}
    for kind, scale in (("peaked", 4.0), ("flat", 1.0)):
        x = torch.randn(R, V) * scale
        p_k = RowParams(top_k=50)
        p_p = RowParams(top_p=0.9)
        kept = (x >= CppRows.cutoff(x, p_p)[:, None]).sum(1).float().median().item()
        rows[kind] = {"top-p nucleus (median tokens kept)": kept, **interleaved({
            "top_k=50: C++ heap selection": lambda: CppRows.cutoff(x, p_k),
            "top_k=50: torch.topk": lambda: torch.topk(x, 50, dim=-1),
            "top_p=0.9: C++ threshold search": lambda: CppRows.cutoff(x, p_p),
            "top_p=0.9: C++ std::sort per row": lambda: CppRows.cutoff(x, p_p, sort_top_p=True),
            "top_p=0.9: torch.sort + cumsum (reference body)": lambda: TorchRows.cutoff(x, p_p),
        }, reps)}
    return rows


def options(reps):
    torch.manual_seed(0)
    logits = torch.randn(R, V) * 4
    y = torch.multinomial(torch.softmax(logits, -1), 1).squeeze(1)  # sampled: inside every kept set
    h = torch.randn(N, H) * 0.5
    w = torch.randn(V, H) * (4 / H ** 0.5)
    yh = torch.multinomial(torch.softmax((h @ w.t())[:8], -1), 1).squeeze(1).repeat(N // 8)

    def from_logits(kw):
        x = logits.clone().requires_grad_()
        lp, ent = pyrl.logprobs_from_logits(x, y, return_entropy=True, backend="cpp", **kw)
        (torch.where(torch.isfinite(lp), lp, 0).sum() + ent.sum()).backward()

    def linear(kw):
        hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
        lp, ent = pyrl.fused_linear_logprobs(hh, ww, yh, return_entropy=True, backend="cpp", **kw)
        (torch.where(torch.isfinite(lp), lp, 0).sum() + ent.sum()).backward()

    fns = {(name, op): (lambda fn=fn, kw=kw: fn(kw)) for name, kw in OPTIONS.items()
           for op, fn in (("logprobs_from_logits", from_logits), ("fused_linear_logprobs", linear))}
    t = interleaved(fns, reps)
    return {name: {op: t[(name, op)] for op in ("logprobs_from_logits", "fused_linear_logprobs")} for name in OPTIONS}


def main():
    out_dir, reps = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 5
    os.makedirs(out_dir, exist_ok=True)
    res = {"machine": machine(), "dtype": "float32", "backend": "cpp", "V": V, "threshold_rows": R,
           "linear_shape": {"N": N, "H": H, "V": V}, "repeats": reps,
           "thresholds_s": thresholds(reps), "options_s": options(reps)}
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(res, f, indent=1)
    lines = [f"# Cost of the sampler's truncation (CPU, {res['dtype']}, backend=cpp)", "",
             f"Machine: {res['machine']}. Median of {reps} interleaved rounds (every method once per round) after a warm-up "
             f"(`python benchmarks/sampler_cost.py OUT {reps}`).", "",
             f"## Kept-set thresholds alone, [{R}, {V}] fp32 logits", "",
             "| rows | method | time (ms) | ms per row |", "|---|---|---|---|"]
    for kind, r in res["thresholds_s"].items():
        lines.append(f"| {kind} | top-p nucleus: median {r['top-p nucleus (median tokens kept)']:.0f} tokens | | |")
        for k, t in r.items():
            if k.startswith("top"):
                if "nucleus" in k:
                    continue
                lines.append(f"| {kind} | {k} | {1e3 * t:.1f} | {1e3 * t / R:.3f} |")
    lines += ["", f"## Each option against plain log-probs (forward + backward, entropy on)", "",
              f"| option | logprobs_from_logits [{R}, {V}] (ms) | x plain | "
              f"fused_linear_logprobs N={N}, H={H}, V={V} (ms) | x plain |", "|---|---|---|---|---|"]
    base = res["options_s"]["plain"]
    for name, r in res["options_s"].items():
        a, b = r["logprobs_from_logits"], r["fused_linear_logprobs"]
        lines.append(f"| {name} | {1e3 * a:.1f} | {a / base['logprobs_from_logits']:.2f} | {1e3 * b:.1f} | "
                     f"{b / base['fused_linear_logprobs']:.2f} |")
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
