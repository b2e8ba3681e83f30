"""Read `pyrl bench` results and say, row by row, whether the fused loss meets the speed and memory
targets of the engine (issue 15; docs/scaling.md sections 7-9): the default plan against the
three-GEMM floor and its working memory, the best memory-budget row, and the rivals.

    python benchmarks/targets.py OUT/grpo/results.json [OUT/logprobs/results.json ...] [--out targets.md]

Targets (at the issue's shapes, N x H x V; a shape's rows are compared within one run; other
shapes, such as those of the sweep, are not checked):

| op | device, shape | default plan | with a budget | rivals |
|---|---|---|---|---|
| grpo_loss | cuda, 16384 x 4096 x 151936 | <= 1.30x the floor in <= 256 MB | <= 1.15x | - |
| linear_logprobs | cuda, 16384 x 4096 x 151936 | <= 1.40x the floor in <= 256 MB | - | - |
| grpo_loss | cpu, 2048 x 896 x 151936 | <= 1.35x the floor in <= 64 MB | - | >= 1.3x Liger's speed, >= plain PyTorch's |

"The default plan" is the row of the backend pyrl picks by default on that device (``pyrl[triton]``
on CUDA, ``pyrl[cpp]`` on CPU); "with a budget" is the fastest other correct pyrl row of that
backend (``/auto``, ``/chunk=...``, ``/blocked``). A row that is missing or did not PASS the
float64 check fails its target. Exit status 0 when every target checked passes, 1 otherwise.
"""
from __future__ import annotations

import argparse
import json
import sys

TARGETS = {  # (op, device, N, H, V): (default x floor, default work MB, budget x floor or None, Liger ratio or None)
    ("grpo_loss", "cuda", 16384, 4096, 151936): (1.30, 256, 1.15, None),
    ("linear_logprobs", "cuda", 16384, 4096, 151936): (1.40, 256, None, None),
    ("grpo_loss", "cpu", 2048, 896, 151936): (1.35, 64, None, 1.3),
}
DEFAULT_IMPL = {"cuda": "pyrl[triton]", "cpu": "pyrl[cpp]"}


def _ok(row) -> bool:
    return row is not None and row.get("status") == "ok" and row.get("correct") == "PASS"


def check(rows: list[dict]) -> tuple[list[str], bool]:
    """Markdown lines of the checks over one results file's rows, and whether all passed."""
    lines, all_pass = [], True
    groups: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        groups.setdefault((r["op"], r["device"], r["N"], r["H"], r["V"], r["dtype"]), {})[r["impl"]] = r
    for (op, device, n, h, v, dtype), by_impl in sorted(groups.items()):
        target = TARGETS.get((op, device, n, h, v))
        if target is None:
            continue
        max_x, max_mb, budget_x, liger_ratio = target
        shape = f"{op} {n}x{h}x{v} {dtype} on {device}"
        base = DEFAULT_IMPL[device]
        default = by_impl.get(base)

        def verdict(name, passed, detail):
            nonlocal all_pass
            all_pass &= passed
            lines.append(f"| {shape} | {name} | {detail} | {'PASS' if passed else 'FAIL'} |")

        if not _ok(default):
            verdict("default plan", False, f"no correct `{base}` row")
            continue
        x, mb = default["x_floor"], default["working_mem_mb"]
        verdict("default plan", x <= max_x and mb <= max_mb,
                f"`{base}` {default['time_ms_median']:.1f} ms = {x:.2f}x the floor (<= {max_x}), "
                f"{mb:.0f} MB working (<= {max_mb})")
        if budget_x is not None:
            others = [r for name, r in by_impl.items() if name.startswith(base + "/") and _ok(r)]
            best = min(others, key=lambda r: r["x_floor"], default=None)
            if best is None:
                verdict("with a budget", False, f"no correct `{base}/...` row")
            else:
                verdict("with a budget", best["x_floor"] <= budget_x,
                        f"`{best['impl']}` {best['x_floor']:.2f}x the floor (<= {budget_x}), "
                        f"{best['working_mem_mb']:.0f} MB working")
        if liger_ratio is not None:
            for rival, need in (("liger", liger_ratio), ("torch", 1.0)):
                r = by_impl.get(rival)
                if not _ok(r):
                    verdict(f"vs {rival}", False, f"no correct `{rival}` row")
                    continue
                ratio = r["time_ms_median"] / default["time_ms_median"]
                verdict(f"vs {rival}", ratio >= need, f"{rival} / pyrl = {ratio:.2f} (>= {need})")
    return lines, all_pass


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+", help="results.json files written by pyrl bench")
    parser.add_argument("--out", help="also write the table to this markdown file")
    args = parser.parse_args(argv)
    lines = ["| op, shape | target | measured | verdict |", "|---|---|---|---|"]
    all_pass = True
    for path in args.results:
        try:
            with open(path) as f:
                rows = json.load(f)["rows"]
        except (OSError, ValueError, KeyError) as exc:
            lines.append(f"| {path} | - | unreadable: {exc} | FAIL |")
            all_pass = False
            continue
        got, passed = check(rows)
        lines += got
        all_pass &= passed
    text = "\n".join(lines) + "\n"
    print(text, end="")
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    return 0 if all_pass else 1


if __name__ == "__main__":
    sys.exit(main())
