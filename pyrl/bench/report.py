"""Writing the results: ``results.json`` (every row plus the machine), ``results.md`` and PNG plots."""
from __future__ import annotations

import json
import os
import platform
from collections import defaultdict
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import torch

from pyrl.bench.cases import OPS

__all__ = ["machine_info", "write_report", "headline", "cpu_model"]

OPTIONAL_PACKAGES = ("liger-kernel", "triton", "cut-cross-entropy", "matplotlib", "pytest-benchmark")
# What pyrl is compared against in the headline, in order.
RIVALS = ("torch", "torch.compile", "liger", "liger.triton_grpo_loss", "cut-cross-entropy")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_gb() -> float | None:
    try:
        with open("/proc/meminfo") as f:
            return round(int(f.readline().split()[1]) / 2**20, 1)
    except (OSError, ValueError, IndexError):
        return None


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def machine_info(device: torch.device) -> dict:
    import pyrl

    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    info = {
        "cpu": cpu_model(), "cores": os.cpu_count(), "cores_usable": usable, "memory_gb": _memory_gb(),
        "torch": torch.__version__, "threads": torch.get_num_threads(), "python": platform.python_version(),
        "platform": platform.platform(), "pyrl": getattr(pyrl, "__version__", None),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "backends": {name: b["detail"] for name, b in pyrl.backends().items() if b["available"]},
        "packages": {name: _version(name) for name in OPTIONAL_PACKAGES},
    }
    where = f"{info['cpu']} ({usable} cores, {info['threads']} threads)"
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
        where = f"{info['gpu']} (CUDA {info['cuda']}), host {where}"
    info["summary"] = f"{where}, torch {torch.__version__}"
    return info


# --------------------------------------------------------------------------------------------
# Derived columns
# --------------------------------------------------------------------------------------------
def _shape_key(row) -> tuple:
    return row["op"], row["N"], row["H"], row["V"]


def _add_floor_ratio(rows: list[dict]) -> None:
    floors = {_shape_key(r): r["time_ms_median"] for r in rows if r["kind"] == "floor" and r["status"] == "ok"}
    for r in rows:
        floor = floors.get(_shape_key(r))
        r["x_floor"] = r["time_ms_median"] / floor if floor and r["status"] == "ok" else None


def headline(rows: list[dict]) -> list[dict]:
    """Per op and shape: the fastest correct pyrl row and how much time/memory each rival takes."""
    groups = defaultdict(list)
    for r in rows:
        if r["status"] == "ok":
            groups[_shape_key(r)].append(r)
    out = []
    for key, rs in groups.items():
        ours = [r for r in rs if r["kind"] == "pyrl" and r.get("correct") == "PASS"]
        if not ours:
            continue
        best = min(ours, key=lambda r: r["time_ms_median"])
        line = {"op": key[0], "N": key[1], "H": key[2], "V": key[3], "pyrl": best["impl"],
                "time_ms": best["time_ms_median"], "peak_mem_mb": best["peak_mem_mb"],
                "x_floor": best.get("x_floor"), "vs": {}}
        for r in rs:
            if r["impl"] in RIVALS:
                line["vs"][r["impl"]] = {
                    "speedup": r["time_ms_median"] / best["time_ms_median"],
                    # Below 1 MB the RSS counter's page granularity is all there is to see.
                    "memory_ratio": r["peak_mem_mb"] / best["peak_mem_mb"] if best["peak_mem_mb"] >= 1 else None,
                    "working_memory_ratio": (r["working_mem_mb"] / best["working_mem_mb"]
                                             if best.get("working_mem_mb", 0) >= 1 else None),
                    "correct": r.get("correct")}
        out.append(line)
    return out


# --------------------------------------------------------------------------------------------
# Writers
# --------------------------------------------------------------------------------------------
def write_report(out: Path, rows: list[dict], meta: dict, *, plots: bool = True) -> tuple[list[str], str]:
    """Write results.json and results.md (and the plots when ``plots``); returns the plot files
    written and the note on them (why none were drawn)."""
    out = Path(out)
    _add_floor_ratio(rows)
    heads = headline(rows)
    if plots:
        plot_files, plot_note = _write_plots(out, rows)
    else:
        plot_files, plot_note = [], "plots not drawn (--no-plots, or the run had not finished)"
    doc = {**meta, "headline": heads, "plots": plot_files, "plot_note": plot_note, "rows": rows}
    (out / "results.json").write_text(json.dumps(doc, indent=1, default=str) + "\n")
    (out / "results.md").write_text(_markdown(rows, meta, heads, plot_files, plot_note))
    return plot_files, plot_note


def _fmt(x, spec=".1f", none="—") -> str:
    return none if x is None else format(x, spec)


def _shape_label(r) -> str:
    return f"{r['N']}×{r['V']}" if r["H"] is None else f"{r['N']}×{r['H']}×{r['V']}"


def _markdown(rows, meta, heads, plot_files, plot_note) -> str:
    m, s = meta["machine"], meta["settings"]
    lines = [
        "# pyrl bench results", "",
        f"- **Machine:** {m['summary']}; {m.get('memory_gb')} GB RAM; {m['platform']}",
        f"- **Date:** {m['date']}; pyrl {m['pyrl']}; Python {m['python']}",
        f"- **Dtype:** {s['dtype']}; device {s['device']}; warm-up {s['warmup']}, timed repeats {s['repeats']}"
        f"{' (--quick)' if s.get('quick') else ''}",
        "- **Shapes (N tokens × H hidden × V vocabulary):** "
        + ", ".join("×".join(map(str, sh)) for sh in s["shapes"]),
        "- **Optional packages:** " + ", ".join(f"{k} {v or 'not installed'}" for k, v in m["packages"].items()),
        "- **Time:** median of the timed runs (IQR and min–max alongside); **memory:** peak above the "
        "inputs and weights" + (", each measurement in a fresh child process (peak RSS)"
                                if s.get("subprocess") else f" ({_memory_method(rows)})")
        + "; **work MB:** that peak minus the outputs and gradients the step returns",
        "- **TFLOP/s:** 6·N·H·V matmul FLOPs of fwd+bwd over the median time; **× floor:** time over the "
        "floor row (the same matmuls alone, or one copy of the logits); **max rel err:** max |out − ref| / "
        "max |ref| over every output and gradient vs float64 (FAIL above the tolerance).", "",
    ]
    rivals = [r for r in RIVALS if any(r in h["vs"] for h in heads)]
    if heads:
        lines += ["## Headline", "",
                  "Each rival's median time and peak memory divided by the fastest correct pyrl backend's "
                  "(time ratio, memory ratio): above 1 means pyrl is faster / leaner.", "",
                  "| op | shape | pyrl (fastest) | ms | × floor | " + " | ".join(rivals) + " |",
                  "|" + "---|" * (5 + len(rivals))]
        for h in heads:
            cells = []
            for rival in rivals:
                v = h["vs"].get(rival)
                if v is None:
                    cells.append("—")
                else:
                    cells.append(f"{v['speedup']:.2f}, {_fmt(v['memory_ratio'], '.2f')}"
                                 + (" (FAIL)" if v["correct"] == "FAIL" else ""))
            lines.append(f"| {h['op']} | {_shape_label(h)} | {h['pyrl']} | {h['time_ms']:.1f} | "
                         f"{_fmt(h['x_floor'], '.2f')} | " + " | ".join(cells) + " |")
        lines.append("")
    for op in OPS:
        op_rows = [r for r in rows if r["op"] == op]
        if not op_rows:
            continue
        lines += [f"## {op}", "", OPS[op], "",
                  "| shape | impl | median ms | IQR ms | min–max ms | peak MB | work MB | TFLOP/s | × floor "
                  "| max rel err | max abs err | check | note |", "|" + "---|" * 13]
        for r in op_rows:
            if r["status"] != "ok":
                shape = _shape_label(r) if r["N"] else "—"
                lines.append(f"| {shape} | {r['impl']} |" + " — |" * 9 + f" {r['status']} | {r['note']} |")
                continue
            lines.append(
                f"| {_shape_label(r)} | {r['impl']} | {r['time_ms_median']:.1f} | "
                f"{r['time_ms_q1']:.1f}–{r['time_ms_q3']:.1f} | {r['time_ms_min']:.1f}–{r['time_ms_max']:.1f} | "
                f"{r['peak_mem_mb']:.0f} | {_fmt(r.get('working_mem_mb'), '.0f')} | {_fmt(r['tflops'], '.3f')} | "
                f"{_fmt(r['x_floor'], '.2f')} | "
                f"{_fmt(r.get('max_rel_err'), '.1e')} | {_fmt(r.get('max_abs_err'), '.1e')} | "
                f"{r.get('correct', 'n/a')} | {r.get('check_note', r['note'])} |")
        lines.append("")
    lines += ["## Plots", ""]
    lines += [f"![{p}]({p})" for p in plot_files] or [plot_note]
    return "\n".join(lines) + "\n"


def _memory_method(rows) -> str:
    methods = {r.get("memory_method") for r in rows if r.get("memory_method")}
    return "; ".join(sorted(methods)) or "n/a"


def _write_plots(out: Path, rows: list[dict]) -> tuple[list[str], str]:
    """Time and memory vs tokens, one PNG per op and (H, V)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return [], "plots skipped: matplotlib is not installed (pip install matplotlib)"
    groups = defaultdict(list)
    for r in rows:
        if r["status"] == "ok":
            groups[(r["op"], r["H"], r["V"])].append(r)
    files = []
    for (op, h, v), rs in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1] or 0, kv[0][2])):
        fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.2))
        by_impl = defaultdict(list)
        for r in rs:
            by_impl[r["impl"]].append(r)
        for name, pts in sorted(by_impl.items()):
            pts.sort(key=lambda r: r["N"])
            n = [r["N"] for r in pts]
            style = {"linestyle": "--", "color": "grey"} if pts[0]["kind"] == "floor" else {}
            ax_t.plot(n, [r["time_ms_median"] for r in pts], marker="o", label=name, **style)
            ax_m.plot(n, [max(r["peak_mem_mb"], 1e-3) for r in pts], marker="o", label=name, **style)
        for ax, what in ((ax_t, "median time (ms)"), (ax_m, "peak memory above inputs (MB)")):
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("tokens N")
            ax.set_ylabel(what)
            ax.grid(True, which="both", alpha=0.3)
        ax_t.legend(fontsize=8)
        dims = f"V={v}" if h is None else f"H={h}, V={v}"
        fig.suptitle(f"{op} ({dims}, {rs[0]['dtype']}, {rs[0]['device']})")
        fig.tight_layout()
        name = f"{op}-V{v}.png" if h is None else f"{op}-H{h}-V{v}.png"
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        files.append(name)
    return files, "" if files else "no successful rows to plot"
