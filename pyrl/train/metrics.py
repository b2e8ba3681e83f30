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

__all__ = ["MetricsLogger", "read_metrics", "plot_curves", "REQUIRED_FIELDS", "wilson_interval", "gain_interval"]

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
                 progress: bool = True, tensorboard: bool = True):
        self.enabled = enabled
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
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(reward=f"{record.get('reward_mean', 0):.3f}",
                                 len=f"{record.get('completion_len_mean', 0):.1f}", refresh=False)
        elif step % 10 == 0:
            print(f"step {step}: reward {record.get('reward_mean', 0):.3f} "
                  f"loss {record.get('loss', 0):.4f} len {record.get('completion_len_mean', 0):.1f}", file=sys.stderr)

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


def plot_curves(out_dir: str, *, window: int = 0, initial_eval: float | None = None, eval_n: int | None = None,
                path: str | None = None) -> str | None:
    """``out_dir/curves.png`` (or ``path``): reward (batch mean, moving average, greedy eval accuracy
    when logged, ``initial_eval`` at step 0) and completion length per step. Returns the path, or
    ``None`` without matplotlib or metrics."""
    records = read_metrics(os.path.join(out_dir, "metrics.jsonl"))
    if not records:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    steps = [r["step"] for r in records]
    reward = [r.get("reward_mean") or 0.0 for r in records]
    length = [r.get("completion_len_mean") or 0.0 for r in records]
    window = window or max(1, len(records) // 20)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    ax1.plot(steps, reward, alpha=0.35, label="reward (batch mean)")
    ax1.plot(steps, _moving_average(reward, window), label=f"reward ({window}-step mean)")
    evals = [(r["step"], r["eval_accuracy"]) for r in records if r.get("eval_accuracy") is not None]
    if initial_eval is not None:
        evals.insert(0, (0, initial_eval))
    if evals and eval_n:
        xs, ys = zip(*evals)
        cis = [wilson_interval(y, eval_n) for y in ys]
        ax1.errorbar(xs, ys, yerr=[[y - lo for y, (lo, _) in zip(ys, cis)], [hi - y for y, (_, hi) in zip(ys, cis)]],
                     fmt="o-", capsize=3, label=f"greedy eval accuracy ({eval_n} prompts, 95% CI)")
    elif evals:
        ax1.plot(*zip(*evals), "o-", label="greedy eval accuracy")
    ax1.set_xlabel("step")
    ax1.set_ylabel("reward")
    ax1.legend()
    ax1.grid(alpha=0.3)
    ax2.plot(steps, length, color="tab:green", alpha=0.35)
    ax2.plot(steps, _moving_average(length, window), color="tab:green")
    ax2.set_xlabel("step")
    ax2.set_ylabel("completion length (tokens)")
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    path = path or os.path.join(out_dir, "curves.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
