"""Is a task inside a model's competence band? Measure before training (docs/trainer.md).

    python benchmarks/probe_task.py --preset smollm2-arith --prompts 64 --out probe.json

For the preset's model, task and sampling settings, on the first ``--prompts`` held-out prompts:
greedy accuracy (with its 95% Wilson interval), the sampled accuracy and pass@k over ``group_size``
samples at the preset's temperature, the share of groups that carry signal (rewards not all equal:
what GRPO learns from and dynamic sampling keeps), and the share of completions truncated at
``max_new_tokens``. A task is a good RL target when greedy accuracy is well below 1, pass@k well above
it, and most groups carry signal.
"""
from __future__ import annotations

import argparse
import json
import time

import torch


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="smollm2-arith")
    p.add_argument("--set", action="append", default=[], help="config overrides, as pyrl train --set")
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", help="write the result as JSON here")
    args = p.parse_args(argv)

    from pyrl import rewards
    from pyrl.train import apply_overrides, get_preset
    from pyrl.train.metrics import wilson_interval
    from pyrl.train.models import load_model
    from pyrl.train.recipes import Reward
    from pyrl.train.rollout import generate
    from pyrl.train.tasks import make_task, prompt_text

    torch.set_num_threads(args.threads)
    cfg = apply_overrides(get_preset(args.preset), args.set)
    task = make_task(cfg.task.name, seed=cfg.seed, **cfg.task.options)
    score = Reward.from_config(cfg, task)
    lm, tok = load_model(cfg.model, device=torch.device("cpu"), seed=cfg.seed)
    examples = task.eval_examples(0, args.prompts)
    prompts = [prompt_text(task, tok, ex) for ex in examples]
    answers = [ex.answer for ex in examples]
    G, r = cfg.rollout.group_size, cfg.rollout
    t = time.time()
    greedy = generate(lm, tok, prompts, max_new_tokens=r.max_new_tokens, greedy=True, batch_size=r.batch_size)
    greedy_acc = float(task.score(greedy.texts, answers).mean())
    t_greedy = time.time() - t
    t = time.time()
    sampled = generate(lm, tok, [q for q in prompts for _ in range(G)], max_new_tokens=r.max_new_tokens,
                       temperature=r.temperature, batch_size=r.batch_size)
    t_sampled = time.time() - t
    truth = [a for a in answers for _ in range(G)]
    correct = task.score(sampled.texts, truth).view(-1, G)
    reward = score(sampled.texts, truth, [q for q in prompts for _ in range(G)],
                   lengths=sampled.completion_mask.sum(1), prompt_index=torch.arange(len(truth)) // G,
                   group_size=G).view(-1, G)  # the trainer's reward (terms + length shapers)
    n_correct = (correct >= 0.5).sum(1)
    result = {
        "preset": args.preset, "overrides": args.set, "prompts": args.prompts, "group_size": G,
        "temperature": r.temperature, "max_new_tokens": r.max_new_tokens,
        "greedy_accuracy": greedy_acc, "greedy_ci95": list(wilson_interval(greedy_acc, args.prompts)),
        "greedy_truncated_frac": float(greedy.truncated.float().mean()),
        "sampled_accuracy": float(correct.mean()),
        f"pass@{G}": float(rewards.pass_at_k(torch.full_like(n_correct, G), n_correct, G).mean()),
        "pass@1": float(rewards.pass_at_k(torch.full_like(n_correct, G), n_correct, 1).mean()),
        "signal_groups_frac": float((reward.std(1) > 0).float().mean()),
        "sampled_truncated_frac": float(sampled.truncated.float().mean()),
        "sampled_len_mean": float(sampled.completion_mask.sum(1).float().mean()),
        "greedy_s": t_greedy, "sampled_s": t_sampled,
        "example_completions": [{"prompt": examples[i].prompt, "answer": answers[i], "greedy": greedy.texts[i]}
                                for i in range(min(4, len(examples)))],
    }
    print(json.dumps(result, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
