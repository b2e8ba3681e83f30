"""Where a run reports: ``metrics.jsonl`` (always), a tqdm bar, TensorBoard and a PNG of the curves
(each when its package is installed).

    log = MetricsLogger(out_dir, total_steps=100, start_step=0)
    log.log(step, {"reward_mean": 0.4, ...})      # one JSON object per line, "step" first
    log.close()                                     # and plot_curves(out_dir) -> curves.png
"""
from __future__ import annotations

import json
import math
import os
import sys

__all__ = ["MetricsLogger", "read_metrics", "plot_curves", "plot_preference_curves", "REQUIRED_FIELDS",
           "wilson_interval", "gain_interval"]

REQUIRED_FIELDS = ("step", "reward_mean", "loss", "kl_mean", "entropy_mean", "clip_frac", "completion_len_mean",
                   "tokens_per_s")


def wilson_interval(p: float, n: int, z: float = 1.959964) -> tuple[float, float]:
    """The Wilson score interval (95% by default) of a proportion ``p`` observed on ``n`` trials
    (docs/trainer.md, "Greedy evaluation"); ``(nan, nan)`` for ``n = 0``."""
    if n <= 0:
        return float("nan"), float("nan")
    d = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / d
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return max(0.0, centre - half), min(1.0, centre + half)


def gain_interval(before: float, after: float, n: int, z: float = 1.959964) -> tuple[float, float]:
    """A 95% interval of ``after - before``, two accuracies on ``n`` prompts each: Newcombe's hybrid
    score interval from the two Wilson intervals. It treats the two evaluations as independent; on
    the same prompts (positively correlated) the true interval is narrower, so this one is
    conservative."""
    l1, u1 = wilson_interval(before, n, z)
    l2, u2 = wilson_interval(after, n, z)
    d = after - before
    return d - math.sqrt((after - l2) ** 2 + (u1 - before) ** 2), d + math.sqrt((u2 - after) ** 2 + (before - l1) ** 2)


def read_metrics(path: str) -> list[dict]:
    """The records of a ``metrics.jsonl`` (a torn last line, from a killed run, is skipped)."""
    out = []
    if not os.path.exists(path):
        return out
    with open(path) as f:
        for line in f:
            try:
                out.append(json.loads(line))
            except ValueError:
                break
    return out


class MetricsLogger:
    """Writes only on the main rank (``enabled=False`` elsewhere). On resume (``start_step > 0``)
    the records after ``start_step`` (written after the checkpoint) are dropped first, so the file
    always describes exactly one run."""

    def __init__(self, out_dir: str, *, total_steps: int, start_step: int = 0, enabled: bool = True,
                 progress: bool = True, tensorboard: bool = True,
                 show: dict | None = None):
        self.enabled = enabled
        # what the progress bar (or, without tqdm, a line every 10 steps) shows: {label: metric}
        self.show = show or {"reward": "reward_mean", "loss": "loss", "len": "completion_len_mean"}
        self.path = os.path.join(out_dir, "metrics.jsonl")
        self.bar = self.tb = None
        if not enabled:
            return
        os.makedirs(out_dir, exist_ok=True)
        kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= start_step] if start_step else []
        with open(self.path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in kept)
        self.file = open(self.path, "a")
        if progress:
            try:
                from tqdm.auto import tqdm

                self.bar = tqdm(total=total_steps, initial=start_step, desc="train", dynamic_ncols=True,
                                file=sys.stderr)
            except ImportError:
                pass
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(os.path.join(out_dir, "tensorboard"), purge_step=start_step + 1)
            except Exception:  # noqa: BLE001  (tensorboard not installed)
                self.tb = None

    def log(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        record = {"step": step, **{k: _clean(v) for k, v in metrics.items()}}
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(f"train/{k}", v, step)
        shown = {label: f"{record.get(key) or 0:.3f}" for label, key in self.show.items()}
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(shown, refresh=False)
        elif step % 10 == 0:
            print(f"step {step}: " + " ".join(f"{k} {v}" for k, v in shown.items()), file=sys.stderr)

    def close(self) -> None:
        if not self.enabled:
            return
        self.file.close()
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()


def _clean(v):
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None  # JSON has no NaN/inf
    return v


def _moving_average(xs: list, window: int) -> list:
    return [sum(xs[max(0, i - window + 1):i + 1]) / len(xs[max(0, i - window + 1):i + 1]) for i in range(len(xs))]


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def _curve(ax, records: list, key: str, label: str, window: int, **style) -> None:
    """A per-step metric, faint, and its ``window``-step moving average."""
    steps = [r["step"] for r in records]
    values = [r.get(key) or 0.0 for r in records]
    ax.plot(steps, values, alpha=0.35, **style)
    ax.plot(steps, _moving_average(values, window), label=label, **style)


def _evals(ax, records: list, key: str, label: str, initial=None, n: int | None = None, **style) -> None:
    """A metric logged on eval steps only, with its value before training at step 0; an accuracy
    on ``n`` prompts gets its 95% Wilson interval as error bars."""
    points = [(r["step"], r[key]) for r in records if r.get(key) is not None]
    if initial is not None:
        points.insert(0, (0, initial))
    if points and n:
        xs, ys = zip(*points)
        cis = [wilson_interval(y, n) for y in ys]
        ax.errorbar(xs, ys, yerr=[[y - lo for y, (lo, _) in zip(ys, cis)], [hi - y for y, (_, hi) in zip(ys, cis)]],
                    fmt="o-", capsize=3, label=f"{label} ({n} prompts, 95% CI)", **style)
    elif points:
        ax.plot(*zip(*points), "o-", label=label, **style)


def _finish(plt, fig, axes, labels, path: str) -> str:
    for ax, ylabel in zip(axes, labels):
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_curves(out_dir: str, *, window: int = 0, initial_eval: float | None = None, eval_n: int | None = None,
                teacher_eval: float | None = None, path: str | None = None) -> str | None:
    """``out_dir/curves.png`` (or ``path``): reward (batch mean, moving average, greedy eval accuracy
    when logged, ``initial_eval`` at step 0, the teacher's accuracy ``teacher_eval`` as a line) and
    completion length per step. Returns the path, or ``None`` without matplotlib or metrics."""
    records = read_metrics(os.path.join(out_dir, "metrics.jsonl"))
    plt = _pyplot()
    if not records or plt is None:
        return None
    window = window or max(1, len(records) // 20)
    distill = any(r.get("teacher_div_mean") is not None for r in records)
    fig, axes = plt.subplots(1, 3 if distill else 2, figsize=(16 if distill else 11, 4))
    ax1, ax2 = axes[0], axes[1]
    _curve(ax1, records, "reward_mean", f"reward ({window}-step mean of the batch means)", window)
    _evals(ax1, records, "eval_accuracy", "greedy eval accuracy", initial_eval, eval_n)
    if teacher_eval is not None:
        ax1.axhline(teacher_eval, color="tab:red", linestyle="--", label="the teacher's greedy eval accuracy")
    _curve(ax2, records, "completion_len_mean", f"{window}-step mean", window, color="tab:green")
    labels = ["reward", "completion length (tokens)"]
    if distill:  # on-policy distillation (algo.teacher): the divergence to the teacher per token
        _curve(axes[2], records, "teacher_div_mean", f"{window}-step mean", window, color="tab:purple")
        labels.append("divergence to the teacher per token")
    return _finish(plt, fig, axes, labels, path or os.path.join(out_dir, "curves.png"))


def plot_preference_curves(out_dir: str, *, window: int = 0, initial: dict | None = None,
                           path: str | None = None) -> str | None:
    """``out_dir/curves.png`` (or ``path``) of a preference run: the loss; the preference accuracy
    (training batches, and held-out with ``initial`` at step 0); the held-out chosen and rejected
    rewards and their margin. Returns the path, or ``None`` without matplotlib or metrics."""
    records = read_metrics(os.path.join(out_dir, "metrics.jsonl"))
    plt = _pyplot()
    if not records or plt is None:
        return None
    initial = initial or {}
    window = window or max(1, len(records) // 20)
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(15, 4))
    _curve(ax1, records, "loss", f"loss ({window}-step mean)", window)
    _curve(ax2, records, "reward_accuracy", f"training batches ({window}-step mean)", window)
    _evals(ax2, records, "eval_reward_accuracy", "held-out", initial.get("eval_reward_accuracy"))
    for key, label in (("eval_chosen_reward", "chosen"), ("eval_rejected_reward", "rejected"),
                       ("eval_reward_margin", "margin")):
        _evals(ax3, records, key, f"held-out {label}", initial.get(key))
    return _finish(plt, fig, (ax1, ax2, ax3), ("loss", "preference accuracy", "implicit reward"),
                   path or os.path.join(out_dir, "curves.png"))
