"""``pyrl bench``: run every registered implementation of each op on the same inputs and report.

For each shape (smallest first, so a time budget cuts the largest) and each op: build the inputs,
compute the float64 reference once, then measure each implementation that can run here, on CPU in
a fresh child process per implementation and shape (forked from a server that imported torch) so that its
peak RSS is its own. Implementations that cannot run (missing package, wrong device, op not there
yet) get a row with the reason. Exit status 1 when a pyrl implementation errors or is wrong.
"""
from __future__ import annotations

import argparse
import fnmatch
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch

from pyrl.bench._child import run_in_child, start_server
from pyrl.bench.cases import OPS, make_case
from pyrl.bench.impls import Impl, implementations
from pyrl.bench.measure import DTYPES, Settings, measure, ref_key, skipped_row
from pyrl.bench.reference import reference, token_stats
from pyrl.bench.report import machine_info, write_report

__all__ = ["run", "parse_args", "DEFAULT_SHAPES", "QUICK_SHAPES"]

# (N tokens, H hidden, V vocabulary). GPU heads: Qwen2.5-0.5B (896, 151936), Qwen2.5-7B
# (3584, 151936), Llama-3-8B (4096, 128256). The CPU keeps Qwen2.5-0.5B's head and a 32k vocabulary.
_GPU_HEADS = [(896, 151936), (3584, 151936), (4096, 128256)]
DEFAULT_SHAPES = {
    "cuda": [(n, h, v) for h, v in _GPU_HEADS for n in (1024, 4096, 16384, 65536)],
    "cpu": [(n, 896, v) for v in (32000, 151936) for n in (256, 1024, 2048)],
}
QUICK_SHAPES = {
    "cuda": [(n, 896, 151936) for n in (1024, 4096)] + [(4096, 4096, 128256)],
    "cpu": [(256, 896, 32000), (512, 896, 32000)],
}
OLD_LOGP_NOISE = 0.1  # old_logp = logp + N(0, 0.1^2): ratios near 1, a few percent clipped


def _shape(text: str) -> tuple[int, int, int]:
    try:
        n, h, v = (int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shapes takes N,H,V triples like 512,896,32000, got {text!r}") from None
    if min(n, h, v) < 1:
        raise argparse.ArgumentTypeError(f"--shapes sizes must be positive, got {text!r}")
    return n, h, v


def _ops(text: str) -> list[str]:
    names = [t for t in text.split(",") if t]
    for name in names:
        if name not in OPS:
            raise argparse.ArgumentTypeError(f"--ops takes names from {', '.join(OPS)}, got {name!r}")
    return names


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="pyrl bench", description="Benchmark pyrl against PyTorch, torch.compile, "
                                "Liger-Kernel and Cut Cross-Entropy on the same inputs: time, peak memory, "
                                "TFLOP/s, ratio to the GEMM floor and a float64 correctness check.")
    p.add_argument("--quick", action="store_true", help="small shapes and few repeats (a few minutes on 2 CPU cores)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu",
                   help="default: cuda when available")
    p.add_argument("--out", default="bench-results",
                   help="folder for results.json, results.md and the plots (default: bench-results)")
    p.add_argument("--ops", nargs="+", type=_ops, default=[list(OPS)], metavar="OP",
                   help=f"ops to run (space- or comma-separated), from {', '.join(OPS)} (default: all)")
    p.add_argument("--shapes", nargs="+", type=_shape, metavar="N,H,V",
                   help="shapes, run smallest first (default: per device, see benchmarks/README.md)")
    p.add_argument("--impls", nargs="+", metavar="PATTERN", help="only implementations matching these fnmatch "
                   "patterns, e.g. 'pyrl*' torch (floors always run)")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="default: float32 on CPU, bfloat16 on CUDA")
    p.add_argument("--repeats", type=int, help="timed runs per measurement (default: 3 on CPU, 10 on CUDA)")
    p.add_argument("--warmup", type=int, help="untimed runs first (default: 1 on CPU, 3 on CUDA)")
    p.add_argument("--seed", type=int, default=0, help="seed of the inputs (default: 0)")
    p.add_argument("--threads", type=int, help="torch.set_num_threads in every measurement")
    p.add_argument("--no-subprocess", action="store_true",
                   help="measure in this process (faster; CPU peak memory is then less exact)")
    p.add_argument("--max-seconds", type=float, help="start no new measurement after this many seconds")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    args = p.parse_args(argv)
    args.ops = list(dict.fromkeys(op for group in args.ops for op in group))  # "a,b c" -> [a, b, c]
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: torch.cuda.is_available() is False on this machine")
    cuda = args.device == "cuda"
    args.dtype = args.dtype or ("bfloat16" if cuda else "float32")
    args.repeats = args.repeats or (10 if cuda else 3)
    args.warmup = args.warmup if args.warmup is not None else (3 if cuda else 1)
    if args.repeats < 1 or args.warmup < 0:
        p.error("--repeats must be >= 1 and --warmup >= 0")
    shapes = args.shapes or (QUICK_SHAPES if args.quick else DEFAULT_SHAPES)[args.device]
    args.shapes = sorted(set(shapes), key=lambda s: (s[0] * s[1] * s[2], s))
    return args


def _selected(impls: list[Impl], patterns) -> list[Impl]:
    if not patterns:
        return impls
    return [i for i in impls if i.kind == "floor" or any(fnmatch.fnmatchcase(i.name, p) for p in patterns)]


def prepare_reference(op: str, shape, settings: Settings, variants) -> dict:
    """The inputs' fingerprint, the extra inputs (old_logp) and the float64 reference per variant."""
    device, dtype = torch.device(settings.device), DTYPES[settings.dtype]
    case = make_case(op, shape, dtype, device, settings.seed)
    # pass 1 does not depend on old_logp: shared by every variant (distill_loss has its own reference)
    stats = None if op == "distill_loss" else token_stats(case)
    extras = {}
    if op == "grpo_loss":
        noise = torch.randn(case.n, generator=torch.Generator().manual_seed(settings.seed + 1))
        extras["old_logp"] = (stats[0].cpu() + OLD_LOGP_NOISE * noise.double()).float()
        case = make_case(op, shape, dtype, device, settings.seed, extras=extras)
    refs = {ref_key(v): reference(case, v, stats) for v in variants}
    return {"fingerprint": case.fingerprint(), "extras": extras, "refs": refs}


def _run_child(op, impl: Impl, shape, settings: Settings, ref_path: Path) -> dict:
    timeout = None if settings.deadline is None else max(60.0, settings.deadline - time.time() + 120.0)
    row = run_in_child(op, impl.name, shape, asdict(settings), str(ref_path), timeout)
    if "child_error" not in row:
        return row
    row = skipped_row(impl, shape, settings, f"failed in child process: {row['child_error'][:300]}")
    row["status"] = "error" if impl.kind == "pyrl" else "skipped"
    return row


def _describe(row: dict) -> str:
    if row["status"] != "ok":
        return f"{row['status']}: {row['note']}"
    parts = [f"{row['time_ms_median']:.1f} ms", f"{row['peak_mem_mb']:.0f} MB"]
    if row.get("correct") != "n/a":
        parts.append(f"{row['correct']} (rel err {row['max_rel_err']:.1e})")
    return ", ".join(parts)


def run(argv=None) -> int:
    """Entry point of ``pyrl bench``; returns the process exit status."""
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    settings = Settings(device=args.device, dtype=args.dtype, warmup=args.warmup, repeats=args.repeats,
                        seed=args.seed, threads=args.threads,
                        deadline=None if args.max_seconds is None else start + args.max_seconds)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    use_children = device.type == "cpu" and not args.no_subprocess
    if use_children:
        start_server()
    meta = {"machine": machine_info(device), "settings": {**asdict(settings), "quick": args.quick,
            "shapes": [list(s) for s in args.shapes], "ops": args.ops, "subprocess": use_children}}
    print(f"pyrl bench: {meta['machine']['summary']}; {args.dtype}; {len(args.shapes)} shape(s); "
          f"ops {', '.join(args.ops)}", flush=True)
    rows: list[dict] = []
    seen: set = set()
    with tempfile.TemporaryDirectory(prefix="pyrl-bench-") as tmp:
        workdir = Path(tmp)
        for shape in args.shapes:
            for op in args.ops:
                key = _distinct(op, shape)
                if key in seen:
                    continue
                seen.add(key)
                rows += _run_op(op, shape, settings, _selected(implementations(op), args.impls),
                                use_children, workdir, start)
            write_report(out, rows, meta, plots=False)  # partial results survive a kill
    plot_files, plot_note = write_report(out, rows, meta, plots=not args.no_plots)
    drawn = f" and {len(plot_files)} plot(s)" if plot_files else f" ({plot_note})"
    print(f"pyrl bench: wrote {out}/results.json, results.md{drawn} in {time.time() - start:.0f} s", flush=True)
    bad = [r for r in rows if r["kind"] == "pyrl" and (r["status"] == "error" or r.get("correct") == "FAIL")]
    return 1 if bad else 0


def _run_op(op, shape, settings: Settings, impls: list[Impl], use_children: bool, workdir: Path, start: float):
    """One row per implementation, in registry order: measured, or skipped with the reason."""
    device = torch.device(settings.device)
    why_not = {impl.name: impl.requires(device) for impl in impls}
    runnable = [impl for impl in impls if not why_not[impl.name]]
    entry, ref_path = None, workdir / f"ref-{op}.pt"
    if runnable and not _out_of_time(settings):
        variants = sorted({impl.outputs for impl in runnable if impl.kind != "floor"}) or [("logp", "entropy")]
        entry = prepare_reference(op, shape, settings, variants)
        if use_children:
            torch.save(entry, ref_path)
    label = "x".join(map(str, shape))
    rows = []
    for impl in impls:
        if why_not[impl.name]:
            row = skipped_row(impl, shape, settings, why_not[impl.name])
        elif entry is None or _out_of_time(settings):
            row = skipped_row(impl, shape, settings, "time budget (--max-seconds) exhausted")
        elif use_children:
            row = _run_child(op, impl, shape, settings, ref_path)
        else:
            row = measure(op, impl.name, shape, settings, entry)
            if device.type == "cuda":
                torch.cuda.empty_cache()  # no fragmentation left over for the next implementation
        rows.append(row)
        print(f"[{time.time() - start:6.1f}s] {op:16s} {label:18s} {impl.name:24s} {_describe(row)}", flush=True)
    ref_path.unlink(missing_ok=True)
    return rows


def _distinct(op: str, shape) -> tuple:
    """logits_logprobs has no H: it runs once per distinct (N, V)."""
    if op == "logits_logprobs":
        return op, shape[0], shape[2]
    return (op, *shape)


def _out_of_time(settings: Settings) -> bool:
    return settings.deadline is not None and time.time() > settings.deadline
