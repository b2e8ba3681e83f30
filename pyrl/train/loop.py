"""The training loop: rollout -> reward -> advantage -> micro-batched policy update, repeated.

    from pyrl.train import get_preset, train
    summary = train(get_preset("tiny"), "runs/tiny")

``train`` is setup (``_setup``: model, optimizer, checkpoint) and then, per step, five named
stages, each a function you can read on its own:

    rollout     prompts -> completions -> rewards (task.reward, length shaping) -> group filters
                (dynamic sampling, pass-rate band), in rounds until the batch is full
    advantages  behaviour / reference log-probs (no grad) -> advantages (by name)
    optimize    PPO-style minibatch updates over micro-batches (``update``), adaptive KL, reference reset
    record      metrics.jsonl (and greedy eval every ``eval_every`` steps)
    save        a checkpoint every ``save_every`` steps; honour a SIGTERM

Launch with ``torchrun --nproc-per-node N`` for data parallelism: every rank samples its own share
of the prompts (whole groups), token counts are summed over ranks so the loss is the exact global
token mean, and DDP/FSDP2 average the gradients.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import os
import random
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Optional

import torch

import pyrl
from pyrl.integrations.hf import lm_head
from pyrl.train import checkpoint, distributed, faults
from pyrl.losses.preference import REFERENCE_FREE_LOSS_TYPES
from pyrl.train.config import GROUPED_LOSSES, TrainConfig, teacher_model_config, validate
from pyrl.train.metrics import (MetricsLogger, gain_interval, plot_curves, plot_preference_curves, read_metrics,
                                wilson_interval)
from pyrl.train.models import load_model
from pyrl.train.policy import LossScale, Policy, TeacherTerm, make_batch
from pyrl.train.recipes import AdaptiveKL, Reward, group_keep_mask
from pyrl.train.rollout import VLLMEngine, generate
from pyrl.train.tasks import Task, make_task, prompt_text

__all__ = ["train", "update", "optimizer_step", "micro_batches", "lr_lambda", "warmup_sft", "evaluate", "fifths",
           "encode_completions", "model_batch", "select_rows"]

_WARMUP_OFFSET = 2 * 10**9  # the warm-up's prompts come from their own index range: the RL data position is untouched


def lr_lambda(optim_cfg, total_steps: int):
    """The LR multiplier after ``i`` optimizer steps: linear warm-up, then constant/linear/cosine."""
    warm, floor, kind = optim_cfg.warmup_steps, optim_cfg.min_lr_ratio, optim_cfg.schedule
    if kind not in ("constant", "linear", "cosine"):
        raise ValueError(f"optim.schedule must be 'constant', 'linear' or 'cosine', got {kind!r}")

    def f(i: int) -> float:
        if i < warm:
            return (i + 1) / (warm + 1)
        p = min(1.0, (i - warm) / max(1, total_steps - warm))
        if kind == "linear":
            return 1.0 - (1.0 - floor) * p
        if kind == "cosine":
            return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * p))
        return 1.0

    return f


def _setup_torch(cfg: TrainConfig, dist) -> None:
    threads = cfg.threads
    if threads <= 0:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        threads = max(1, cores // dist.local_world_size)
    torch.set_num_threads(threads)
    if cfg.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    torch.manual_seed(cfg.seed + dist.rank)  # sampling differs per rank; model init does not (seeded)
    random.seed(cfg.seed + dist.rank)


def _autocast(cfg: TrainConfig, device: torch.device):
    if cfg.bf16 not in ("auto", "on", "off"):
        raise ValueError(f"config key 'bf16' must be auto, on or off, got {cfg.bf16!r}")
    on = cfg.bf16 == "on" or (cfg.bf16 == "auto" and device.type == "cuda")
    return (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if on else contextlib.nullcontext


def encode_completions(tokenizer, texts: list[str], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``[B, T]`` ids of ``text + EOS`` and their mask (the warm-up's targets)."""
    rows = [tokenizer(t, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for t in texts]
    T = max(len(r) for r in rows)
    ids = torch.tensor([r + [tokenizer.pad_token_id] * (T - len(r)) for r in rows], device=device)
    mask = torch.tensor([[1] * len(r) + [0] * (T - len(r)) for r in rows], device=device)
    return ids, mask


def warmup_sft(lm, tokenizer, task: Task, cfg: TrainConfig, device) -> list[float]:
    """A few steps of supervised fine-tuning on the task's reference solutions (negative
    log-likelihood from hidden states through ``fused_linear_logprobs``; no full logits). Returns
    the losses."""
    w = cfg.warmup
    policy = Policy(lm, pyrl.PolicyLossConfig(), backend=cfg.backend, chunk_bytes=cfg.chunk_bytes)
    opt = torch.optim.AdamW(lm.parameters(), lr=w.lr, weight_decay=0.0)
    losses = []
    autocast = _autocast(cfg, device)
    for s in range(w.steps):
        examples = task.examples(_WARMUP_OFFSET + s * w.batch_size, w.batch_size)
        prompts = tokenizer([prompt_text(task, tokenizer, ex) for ex in examples], return_tensors="pt",
                            padding=True, add_special_tokens=False).to(device)
        ids, mask = encode_completions(tokenizer, [ex.solution for ex in examples], device)
        batch = make_batch(prompts["input_ids"], prompts["attention_mask"], ids, mask)
        with autocast():
            logp = policy(batch, mode="logprobs")["logp"]
        loss = -(logp * mask).sum() / mask.sum()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(lm.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


@torch.no_grad()
def eval_count(cfg: TrainConfig, task: Task) -> int:
    """How many held-out prompts the greedy eval scores."""
    return min(cfg.task.eval_size, task.num_eval or cfg.task.eval_size)


def evaluate(lm, tokenizer, task: Task, cfg: TrainConfig, dist) -> float:
    """Greedy accuracy on ``eval_count`` held-out prompts (``task.eval_examples``; at most
    ``task.num_eval`` of them), split over ranks."""
    n = eval_count(cfg, task)
    per_rank = math.ceil(n / dist.world_size)
    start = dist.rank * per_rank
    examples = task.eval_examples(start, max(0, min(per_rank, n - start)))
    total = torch.zeros(2, dtype=torch.float64, device=dist.device)
    if examples:
        roll = generate(lm, tokenizer, [prompt_text(task, tokenizer, ex) for ex in examples],
                        max_new_tokens=cfg.rollout.max_new_tokens, greedy=True, batch_size=cfg.rollout.batch_size)
        score = task.score(roll.texts, [ex.answer for ex in examples])
        total += torch.tensor([float(score.sum()), len(examples)], dtype=torch.float64, device=dist.device)
    distributed.all_reduce_sum(total)
    return float(total[0] / total[1].clamp(min=1))




def select_rows(data: dict, idx: torch.Tensor) -> dict:
    """The rows ``idx`` of every ``[B, ...]`` tensor of ``data``."""
    return {k: v[idx] for k, v in data.items()}


def model_batch(rows: dict) -> dict:
    """``make_batch`` of rows holding ``prompt_ids``/``prompt_mask``/``completion_ids``/
    ``completion_mask`` (the other tensors ride along)."""
    extra = {k: v for k, v in rows.items()
             if k not in ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask")}
    return make_batch(rows["prompt_ids"], rows["prompt_mask"], rows["completion_ids"], rows["completion_mask"],
                      **extra)


def _by_prompt(data: dict, idx: torch.Tensor, length: torch.Tensor) -> torch.Tensor:
    """An order of the rows ``idx`` that keeps the rows of one prompt together (``algo.share_prompt``
    computes a prompt once per micro-batch): prompts by their longest row, longest first, then the
    rows of each by length. With no prompt repeated it is the plain sort by length."""
    ids = data["prompt_ids"][idx]
    key = torch.unique(torch.cat([ids, data["prompt_mask"][idx].to(ids.dtype)], 1), dim=0, return_inverse=True)[1]
    n = int(key.max()) + 1
    first = torch.full((n,), len(idx), dtype=torch.long).scatter_reduce_(0, key, torch.arange(len(idx)), reduce="amin")
    longest = torch.zeros(n, dtype=length.dtype).scatter_reduce_(0, key, length, reduce="amax")
    order = torch.sort(length, descending=True, stable=True).indices  # least significant key first
    order = order[torch.sort(first[key][order], stable=True).indices]
    return order[torch.sort(longest[key][order], descending=True, stable=True).indices]


def micro_batches(data: dict, idx: torch.Tensor, algo) -> list[torch.Tensor]:
    """The rows ``idx`` of ``data`` split into micro-batches: ``algo.micro_batch_size`` rows each,
    sorted by length first (prompt + completion, longest first) so that each pads to rows of similar
    length (with ``algo.share_prompt``, a prompt's rows kept together, ``_by_prompt``); in order for
    the losses that compare a prompt's completions (``GROUPED_LOSSES``: a group must stay in one
    micro-batch). Or, with ``algo.max_tokens_per_micro_batch``, rows sorted by length
    and packed while ``rows x (longest prompt + longest completion)``, the padded size
    ``make_batch`` computes, stays within the budget (a row longer than it goes alone). With
    ``algo.packed`` the budget counts real tokens (the sum of the rows' lengths), which is what the
    padding-free update computes."""
    budget = algo.max_tokens_per_micro_batch
    p_len, c_len = data["prompt_mask"][idx].sum(1), data["completion_mask"][idx].sum(1)
    order = torch.sort(p_len + c_len, descending=True, stable=True).indices
    if not budget:
        if algo.loss.get("loss_type") in GROUPED_LOSSES:
            return list(idx.split(algo.micro_batch_size))
        if getattr(algo, "share_prompt", False) and not algo.packed:
            order = _by_prompt(data, idx, p_len + c_len)
        return list(idx[order].split(algo.micro_batch_size))
    out, current, p_max, c_max, used = [], [], 0, 0, 0
    for j in order.tolist():
        p, c = max(p_max, int(p_len[j])), max(c_max, max(int(c_len[j]), 1))
        cost = used + int(p_len[j]) + max(int(c_len[j]), 1) if algo.packed else (len(current) + 1) * (p + c)
        if current and cost > budget:
            out.append(current)
            current, p, c, used = [], int(p_len[j]), max(int(c_len[j]), 1), 0
        current.append(j)
        p_max, c_max, used = p, c, used + int(p_len[j]) + max(int(c_len[j]), 1)
    out.append(current)
    return [idx[torch.tensor(m, dtype=torch.long)] for m in out]


@torch.no_grad()
def _score_old(model, ref, data: dict, cfg: TrainConfig, *, need_old: bool, need_values: bool, autocast) -> dict:
    """The behaviour policy's log-probs (and values), and the reference's, in micro-batches."""
    ref_cfg = distributed.unwrap(ref).loss_config if ref is not None else None
    need_ref = ref_cfg is not None and ref_cfg.effective_kl_type is not None and ref_cfg.exact_kl is None
    out = defaultdict(list)
    B, T = data["completion_ids"].shape
    parts = micro_batches(data, torch.arange(B), cfg.algo)
    for mi in parts:
        batch = model_batch(select_rows(data, mi))
        t = batch["completion_ids"].shape[1]
        pad = lambda x: torch.nn.functional.pad(x.float(), (0, T - t))  # noqa: E731
        if need_old or need_values:
            with autocast():
                res = model(batch, mode="logprobs")
            if need_old:
                out["old_logp"].append(pad(res["logp"]))
            if need_values:
                out["old_values"].append(pad(res["values"]))
        if need_ref:
            with autocast():
                out["ref_logp"].append(pad(ref(batch, mode="logprobs")["logp"]))
    inverse = torch.argsort(torch.cat(parts))  # back to row order (a token budget sorts the rows)
    return {k: torch.cat(v)[inverse] for k, v in out.items()}


def update(model, optimizer, scheduler, data: dict, *, cfg: TrainConfig, dist, params, autocast, ref=None,
           teacher=None, seed: int = 0) -> dict:
    """PPO-style update on one rollout batch: ``ppo_epochs`` passes, ``minibatches`` optimizer steps
    per pass, each accumulated over micro-batches (``micro_batches``).

    The loss of one micro-batch is scaled (``LossScale``) so that the sum over the micro-batches of
    every rank is the loss of the whole minibatch: with ``agg="token-mean"`` the fused op divides by
    the global token count (``num_items_in_batch``), and the factor ``world_size`` undoes the
    gradient averaging of DDP/FSDP; other ``agg`` modes are means over sequences, weighted by their
    share. However the rows are split, the update is the same. ``teacher``: the distillation
    teacher (a frozen ``Policy``), whose hidden states join each micro-batch. Returns
    token-weighted means of the loss metrics over the whole update."""
    algo = cfg.algo
    B = data["completion_ids"].shape[0]
    if B % algo.minibatches:
        raise ValueError(f"algo.minibatches={algo.minibatches} must divide the {B} sequences per rank")
    mb = B // algo.minibatches
    gen = torch.Generator().manual_seed(seed)
    sums = defaultdict(lambda: torch.zeros((), dtype=torch.float64, device=dist.device))
    sums["ratio_max"] = torch.zeros((), device=dist.device)
    grad_norms = []
    for _ in range(algo.ppo_epochs):
        order = torch.randperm(B, generator=gen) if algo.minibatches > 1 else torch.arange(B)
        for m in range(algo.minibatches):
            _accumulate_minibatch(model, ref, data, order[m * mb:(m + 1) * mb], cfg, dist, autocast, sums, teacher)
            grad_norms.append(optimizer_step(params, optimizer, scheduler, cfg.optim.grad_clip))
    ratio_max = sums.pop("ratio_max")
    keys = sorted(sums)
    totals = distributed.all_reduce_sum(torch.stack([sums[k] for k in keys]))
    if dist.distributed:
        torch.distributed.all_reduce(ratio_max, op=torch.distributed.ReduceOp.MAX)
    got = dict(zip(keys, totals.tolist()))
    n_opt = algo.ppo_epochs * algo.minibatches
    out = {k: v / max(got["tokens"], 1.0) for k, v in got.items() if k not in ("loss", "tokens", "positions", "real")}
    out["loss"] = got["loss"] / n_opt
    out["padding_frac"] = 1.0 - got["real"] / max(got["positions"], 1.0)  # of the positions the update computed
    out["ratio_max"] = float(ratio_max)
    out["grad_norm"] = float(torch.stack([g.float() for g in grad_norms]).mean())
    return out


def optimizer_step(params, optimizer, scheduler, grad_clip: float) -> torch.Tensor:
    """Clip the gradients' global norm (``grad_clip``; 0: no clipping), step the optimizer and the LR
    schedule, clear the gradients. Returns the norm before clipping."""
    norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else math.inf)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


def _accumulate_minibatch(model, ref, data: dict, idx: torch.Tensor, cfg: TrainConfig, dist, autocast,
                          sums: dict, teacher=None) -> None:
    """Forward and backward of the minibatch ``idx`` over its micro-batches (gradients synchronised
    on the last one), adding the loss metrics (token-weighted) into ``sums``."""
    policy, W = distributed.unwrap(model), dist.world_size
    token_mean = policy.loss_config.agg == "token-mean"
    # The exact KL needs the reference's hidden states whenever it is computed: as a penalty
    # (beta > 0) or for the kl_mean metric only (beta == 0).
    full_kl = ref is not None and policy.loss_config.exact_kl is not None
    n_tokens = distributed.all_reduce_sum(data["completion_mask"][idx].sum().to(torch.float32)).clamp(min=1)
    micro = micro_batches(data, idx, cfg.algo)
    for i, mi in enumerate(micro):
        batch = model_batch(select_rows(data, mi))
        scale = LossScale(n_tokens, float(W) if token_mean else float(W) * len(mi) / (len(idx) * W), W)
        reference = None
        if full_kl:
            with torch.no_grad(), autocast():
                reference = (ref(batch, mode="hidden"), lm_head(distributed.unwrap(ref).lm).weight)
        from_teacher = None
        if teacher is not None:
            with torch.no_grad(), autocast():
                from_teacher = (teacher(batch, mode="hidden"), lm_head(teacher.lm))
        with distributed.grad_sync(model, i == len(micro) - 1):
            with autocast():
                loss, metrics = model(batch, mode="loss", scale=scale, reference=reference, teacher=from_teacher)
            loss.backward()
        n = batch["completion_mask"].sum().double()
        real = batch["attention_mask"].sum().double()
        sums["positions"] += real if policy.packed else batch["attention_mask"].numel()  # packed: no padding
        sums["real"] += real
        sums["loss"] += loss.detach().double() / W
        sums["tokens"] += n
        for k, v in metrics.items():
            if k == "ratio_max":
                sums["ratio_max"] = torch.maximum(sums["ratio_max"], v.float())
            else:
                sums[k] += v.double() * n


def fifths(values: list[float]) -> tuple[float, float]:
    """Mean of the first and of the last fifth of ``values`` (the tiny preset's learning check)."""
    k = max(1, len(values) // 5)
    return sum(values[:k]) / k, sum(values[-k:]) / k


def _advantages(cfg: TrainConfig, rewards, mask, old_values):
    name, opts = cfg.algo.advantage, dict(cfg.algo.advantage_options)
    if name == "gae":
        opts.setdefault("gamma", cfg.algo.gae_gamma)
        opts.setdefault("lam", cfg.algo.gae_lambda)
        return pyrl.advantages.compute("gae", rewards, group_size=1, values=old_values, mask=mask, **opts)
    if name in ("opo", "drpo"):
        opts.setdefault("lengths", mask.sum(1))
    if name == "canon":  # CANON conditioned on the response length unless told otherwise
        opts.setdefault("metric", mask.sum(1))
    return pyrl.advantages.compute(name, rewards, group_size=cfg.rollout.group_size, mask=mask, **opts), None



# ------------------------------------------------------------------------------------------------
# the run: what setup builds, and the stages of one step

@dataclass
class Run:
    """Everything setup builds and the stages of a step read; plain state, no behaviour."""
    cfg: TrainConfig
    dist: Any
    out_dir: str
    fault_cfg: Any
    task: Task
    reward: Optional[Reward]          # None in mode "preference"
    tokenizer: Any
    policy: Policy                    # the unwrapped policy (its loss_config holds the current beta)
    model: Any                        # the policy as DDP / FSDP2 wrapped it (itself when alone)
    ref: Optional[Any]
    optimizer: Any
    scheduler: Any
    params: list
    autocast: Any
    engine: Optional[Any] = None
    kl: Optional[AdaptiveKL] = None
    teacher: Optional[Policy] = None  # algo.teacher, frozen
    log: Optional[MetricsLogger] = None
    start_step: int = 0
    data_position: int = 0
    initial_eval: Any = None          # greedy accuracy (RL) or the held-out preference metrics, before training
    teacher_eval: Optional[float] = None

    @property
    def ckpt_root(self) -> str:
        return os.path.join(self.out_dir, "checkpoints")


@dataclass
class Samples:
    """What the rollout stage returns: the rows of the kept groups (``prompt_ids``, ``prompt_mask``,
    ``completion_ids``, ``completion_mask``, ``rollout_logp``, ``truncated``, ``rewards``) and sums over
    every completion sampled in the step (kept or not), for the metrics."""
    rows: dict
    counts: torch.Tensor    # float64 [len(_COUNTS)]
    rounds: int
    score_s: float


_COUNTS = ("reward_sum", "reward_sq", "completions", "tokens", "truncated", "groups", "zero_variance_groups",
           "kept_groups", "topped_up_groups")
_LEFT_PADDED, _RIGHT_PADDED = ("prompt_ids", "prompt_mask"), ("completion_ids", "completion_mask", "rollout_logp")


def _cat_rows(parts: list[dict], pad_id: int) -> dict:
    """Rows of several rounds in one batch: prompts left-padded, completions right-padded to the widest."""
    if len(parts) == 1:
        return parts[0]
    out = {}
    for k in parts[0]:
        ts = [p[k] for p in parts]
        if k in _LEFT_PADDED + _RIGHT_PADDED:
            width = max(t.shape[1] for t in ts)
            value = pad_id if k.endswith("_ids") else 0
            ts = [torch.nn.functional.pad(t, (width - t.shape[1], 0) if k in _LEFT_PADDED else (0, width - t.shape[1]),
                                          value=value) for t in ts]
        out[k] = torch.cat(ts)
    return out


def _groups(rows: dict, groups: torch.Tensor, G: int) -> dict:
    idx = (groups[:, None] * G + torch.arange(G, device=groups.device)).flatten()
    return {k: v[idx.to(v.device)] for k, v in rows.items()}


def _generate_round(run: Run, start: int, count: int, step: int) -> tuple[dict, float]:
    """``count`` prompts from data index ``start``, G completions each, scored (the reward's scheduled
    shapers see ``step``, 0-based, of ``max_steps``): ``(rows, score_s)``."""
    cfg, G = run.cfg, run.cfg.rollout.group_size
    examples = run.task.examples(start, count)
    prompts = [prompt_text(run.task, run.tokenizer, ex) for ex in examples for _ in range(G)]
    answers = [ex.answer for ex in examples for _ in range(G)]
    r = cfg.rollout
    if run.engine is not None:
        roll = run.engine.generate(prompts, max_new_tokens=r.max_new_tokens, temperature=r.temperature,
                                   top_k=r.top_k, top_p=r.top_p, min_p=r.min_p, device=run.dist.device)
    else:
        with distributed.gathered_for_generation(run.model):
            roll = generate(run.policy.lm, run.tokenizer, prompts, max_new_tokens=r.max_new_tokens,
                            temperature=r.temperature, top_k=r.top_k, top_p=r.top_p, min_p=r.min_p,
                            batch_size=r.batch_size, share_prefill=r.share_prefill)
    t = time.time()
    rewards = run.reward(roll.texts, answers, prompts, lengths=roll.completion_mask.sum(1),
                         prompt_index=torch.tensor([run.task.example_id(i) for i in range(start, start + count)])
                         .repeat_interleave(G), group_size=G, step=step, total_steps=cfg.max_steps)
    rows = {"prompt_ids": roll.prompt_ids, "prompt_mask": roll.prompt_mask, "completion_ids": roll.completion_ids,
            "completion_mask": roll.completion_mask, "rollout_logp": roll.rollout_logp,
            "truncated": roll.truncated, "rewards": rewards.to(run.dist.device)}
    return rows, time.time() - t


def rollout(run: Run, step: int) -> Samples:
    """This rank's ``prompts_per_step / world`` groups. With ``algo.dynamic_sampling`` or
    ``algo.pass_rate_band`` only groups passing ``group_keep_mask`` are kept, sampling rounds of
    ``oversample`` times as many prompts (all ranks together) until the batch is full or
    ``max_sample_rounds`` ran; a batch still short is topped up with the most recently dropped
    groups."""
    cfg, G, a = run.cfg, run.cfg.rollout.group_size, run.cfg.algo
    want = cfg.rollout.prompts_per_step // run.dist.world_size
    filtering = a.dynamic_sampling or a.pass_rate_band is not None
    per_round = math.ceil(want * a.oversample) if filtering else want
    kept, dropped, counts = [], [], torch.zeros(len(_COUNTS), dtype=torch.float64)
    have, rounds, score_s = 0, 0, 0.0
    if run.engine is not None:
        run.engine.sync(run.policy.lm)  # the weights of the last update, once for every round
    for i in range(a.max_sample_rounds if filtering else 1):
        if i and not distributed.any_rank(have < want):  # every rank runs the same rounds
            break
        start = run.data_position + run.dist.rank * per_round
        run.data_position += per_round * run.dist.world_size
        rounds += 1
        if have >= want:
            continue
        rows, dt = _generate_round(run, start, per_round, step)
        score_s += dt
        r = rows["rewards"]
        keep = group_keep_mask(r, G, dynamic=a.dynamic_sampling, band=a.pass_rate_band, threshold=a.pass_threshold)
        take = keep.nonzero().squeeze(1)[:want - have]
        kept.append(_groups(rows, take, G))
        dropped.append(_groups(rows, (~keep).nonzero().squeeze(1), G))
        have += len(take)
        zero_var = (r.view(-1, G).amax(1) == r.view(-1, G).amin(1)).sum() if G > 1 else 0
        counts += torch.tensor([float(r.double().sum()), float((r.double() ** 2).sum()), len(r),
                                float(rows["completion_mask"].sum()), float(rows["truncated"].sum()), len(r) // G,
                                float(zero_var), float(keep.sum()), 0.0], dtype=torch.float64)
    for part in reversed(dropped):  # top up a short batch, newest dropped groups first
        n = min(want - have, part["rewards"].shape[0] // G)
        if n > 0:
            kept.append(_groups(part, torch.arange(n), G))
            have += n
            counts[_COUNTS.index("topped_up_groups")] += n
    return Samples(_cat_rows(kept, run.tokenizer.pad_token_id), counts, rounds, score_s)


def advantages(run: Run, samples: Samples) -> dict:
    """The update's data: the kept rows (``mask_truncated``: truncated completions leave the loss),
    behaviour / reference log-probs and values when needed (no grad), and the advantages."""
    cfg, rows = run.cfg, samples.rows
    mask = rows["completion_mask"]
    if cfg.algo.mask_truncated:
        mask = pyrl.rewards.mask_truncated_completions(mask, rows["truncated"])
    data = {"prompt_ids": rows["prompt_ids"], "prompt_mask": rows["prompt_mask"],
            "completion_ids": rows["completion_ids"], "completion_mask": mask}
    loss_cfg = run.policy.loss_config
    if loss_cfg.is_level is not None:
        data["rollout_logp"] = rows["rollout_logp"]
    off_policy = cfg.algo.ppo_epochs > 1 or cfg.algo.minibatches > 1 or loss_cfg.is_level is not None
    data.update(_score_old(run.model, run.ref, data, cfg, need_old=off_policy, need_values=run.policy.value_head
                           is not None, autocast=run.autocast))
    adv, returns = _advantages(cfg, rows["rewards"] * cfg.algo.scale_rewards, mask, data.get("old_values"))
    data["advantages"] = adv.float()
    if returns is not None:
        data["returns"] = returns.float()
    return data


def optimize(run: Run, data: dict, step: int) -> dict:
    """The policy update, then the recipes that act between steps: the adaptive KL coefficient
    (``algo.kl_target``) and the reference reset (``algo.ref_reset_every``, ProRL)."""
    cfg = run.cfg
    stats = update(run.model, run.optimizer, run.scheduler, data, cfg=cfg, dist=run.dist, params=run.params,
                   autocast=run.autocast, ref=run.ref, teacher=run.teacher, seed=cfg.seed * 1_000_003 + step)
    if run.kl is not None:
        stats["kl_coef"] = run.kl.beta  # the coefficient this step used
        beta = run.kl.update(stats["kl_mean"], cfg.rollout.prompts_per_step * cfg.rollout.group_size)
        run.policy.loss_config = dataclasses.replace(run.policy.loss_config, beta=beta)
    if cfg.algo.ref_reset_every and (step + 1) % cfg.algo.ref_reset_every == 0:
        _reset_reference(run)
        stats["ref_reset"] = 1.0
    return stats


def _reset_reference(run: Run) -> None:
    distributed.unwrap(run.ref).lm.load_state_dict(run.policy.lm.state_dict())
    if run.cfg.algo.ref_reset_optimizer:
        run.optimizer.state.clear()


def record(run: Run, step: int, samples: Samples, data: dict, stats: dict, t0: float, t1: float, t2: float) -> None:
    """One line of metrics.jsonl: rollout statistics over every completion sampled (all ranks),
    the update's, the timings (see docs/trainer.md), and the greedy eval when it is due."""
    cfg, rows = run.cfg, samples.rows
    mismatch = torch.zeros(2, dtype=torch.float64)
    if "old_logp" in data:  # mean |behaviour - sampler| log-prob per kept token: the rollout/train mismatch
        m = rows["completion_mask"]
        mismatch += torch.tensor([float(((data["old_logp"] - rows["rollout_logp"]).abs() * m).sum()), float(m.sum())],
                                 dtype=torch.float64)
    s = dict(zip(_COUNTS + ("mismatch", "kept_tokens"), distributed.all_reduce_sum(
        torch.cat([samples.counts, mismatch]).to(run.dist.device)).tolist()))
    n = s["completions"]
    mean = s["reward_sum"] / n
    rec = {"reward_mean": mean, "reward_std": math.sqrt(max(s["reward_sq"] / n - mean ** 2, 0.0)),
           "completion_len_mean": s["tokens"] / n, "truncated_frac": s["truncated"] / n,
           "zero_variance_frac": s["zero_variance_groups"] / s["groups"], **stats,
           "tokens_per_s": s["tokens"] / max(t2 - t0, 1e-9), "lr": run.scheduler.get_last_lr()[0],
           "rollout_s": t1 - t0, "score_s": samples.score_s, "update_s": t2 - t1}
    if "old_logp" in data:
        rec["rollout_logp_abs_diff"] = s["mismatch"] / max(s["kept_tokens"], 1.0)
    if cfg.algo.dynamic_sampling or cfg.algo.pass_rate_band is not None:
        batch_groups = cfg.rollout.prompts_per_step
        rec.update(sample_rounds=samples.rounds, groups_kept_frac=s["kept_groups"] / s["groups"],
                   sample_shortfall_frac=s["topped_up_groups"] / batch_groups)
    if cfg.task.eval_size and cfg.eval_every and ((step + 1) % cfg.eval_every == 0 or step + 1 == cfg.max_steps):
        t = time.time()
        with distributed.gathered_for_generation(run.model):
            rec["eval_accuracy"] = evaluate(run.policy.lm, run.tokenizer, run.task, cfg, run.dist)
        rec["eval_ci95"] = list(wilson_interval(rec["eval_accuracy"], eval_count(cfg, run.task)))
        rec["eval_s"] = time.time() - t
    run.log.log(step + 1, rec)


def save(run: Run, step: int) -> None:
    """A checkpoint every ``save_every`` steps and at the end (none with ``save_every=0``); a
    SIGTERM (on any rank) stops the run here, after the checkpoint of this step."""
    cfg = run.cfg
    last = step + 1 == cfg.max_steps
    stop = not last and distributed.any_rank(faults.stop_requested())  # all ranks agree
    if cfg.save_every and (stop or last or (step + 1) % cfg.save_every == 0):
        extra = {"initial_eval": run.initial_eval,
                 "reward_state": run.reward.state_dict() if run.reward is not None else {}}
        if run.kl is not None:
            extra["kl_coef"] = run.kl.beta
        checkpoint.save(run.ckpt_root, step + 1, model=run.model, optimizer=run.optimizer, scheduler=run.scheduler,
                        data_position=run.data_position, config=cfg.to_dict(), lm=run.policy.lm,
                        tokenizer=run.tokenizer, keep=cfg.keep_checkpoints, extra=extra, faults=run.fault_cfg)
        if not stop and not last:  # a SIGTERM during that write: it completed, so stop here
            stop = distributed.any_rank(faults.stop_requested())
    if stop:
        run.log.close()
        if not cfg.save_every:
            raise faults.Stopped(f"stopped by SIGTERM after step {step + 1}; no checkpoint was written "
                                 "(save_every=0)")
        raise faults.Stopped(f"stopped by SIGTERM after step {step + 1}: the checkpoint "
                             f"{os.path.join(run.ckpt_root, f'step-{step + 1:06d}')} is complete; "
                             "--resume continues from it")


def train(cfg: TrainConfig, out_dir: str, *, resume: bool = False) -> dict:
    """Run ``cfg`` into ``out_dir`` (``metrics.jsonl``, ``checkpoints/``, ``curves.png``,
    ``summary.json``); with ``resume`` continue from the newest checkpoint there. Returns the summary
    (empty on ranks other than 0). Torch's thread count and determinism switch are restored after.

    A SIGTERM stops the run after the current step and a checkpoint of it (``faults.Stopped``). With
    several ranks, a rank that fails says so (rank, step, error) on stderr before raising."""
    fault_cfg = faults.from_env()  # test hooks; all off unless PYRL_FAULT_* is set
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    where = {"step": None}
    try:
        with faults.handle_sigterm():
            return _train(cfg, out_dir, resume, fault_cfg, where)
    except faults.Stopped:
        raise
    except Exception as e:
        _report_rank_failure(e, cfg, where["step"])
        raise
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)




def _report_rank_failure(e: Exception, cfg: TrainConfig, step) -> None:
    """One line naming this rank, the step and the error (torchrun's summary shows only exit codes)."""
    rank, world, _, _ = distributed.launch_info()
    if world <= 1:
        return
    at = f" in step {step}" if step is not None else ""
    hint = ""
    if isinstance(e, torch.distributed.DistError) or "gloo" in str(e).lower() or "nccl" in str(e).lower():
        hint = (f" (a collective failed: another rank probably crashed or is stuck, see its message; a rank "
                f"waits at most dist_timeout_s={cfg.dist_timeout_s:g} s)")
    print(f"pyrl train: rank {rank} of {world} failed{at}: {type(e).__name__}: {e}{hint}", file=sys.stderr,
          flush=True)


def _train(cfg: TrainConfig, out_dir: str, resume: bool, fault_cfg: faults.FaultConfig, where: dict) -> dict:
    t_start = time.time()
    run = _setup(cfg, out_dir, resume, fault_cfg)
    # A SIGTERM (faults.handle_sigterm) is honoured between steps, on all ranks at once.
    if distributed.any_rank(faults.stop_requested()):
        run.log.close()
        raise faults.Stopped(f"stopped by SIGTERM before step {run.start_step + 1}; --resume continues from the "
                             "newest checkpoint")
    if cfg.mode == "preference":
        from pyrl.train import preference

        one_step = preference.step
    else:
        one_step = rl_step
    for step in range(run.start_step, cfg.max_steps):
        where["step"] = step + 1
        faults.maybe_crash(fault_cfg, step + 1, run.dist.rank)
        one_step(run, step)
        save(run, step)
    where["step"] = None
    run.log.close()
    return _summarize(run, t_start)


def rl_step(run: Run, step: int) -> None:
    """One RL step: the stages rollout -> advantages -> optimize -> record."""
    t0 = time.time()
    samples = rollout(run, step)       # generation + reward scoring + group filters: rollout_s
    t1 = time.time()
    data = advantages(run, samples)    # behaviour/reference log-probs, advantages ...
    stats = optimize(run, data, step)  # ... and the optimizer steps: update_s
    record(run, step, samples, data, stats, t0, t1, time.time())


def _summarize(run: Run, t_start: float) -> dict:
    summary = {}
    if run.dist.is_main:
        records = read_metrics(os.path.join(run.out_dir, "metrics.jsonl"))
        if run.cfg.mode == "preference":
            from pyrl.train import preference

            summary = preference.summarize(records, run.initial_eval)
            plot = lambda: plot_preference_curves(run.out_dir, initial=run.initial_eval)  # noqa: E731
        else:
            rewards_curve = [r["reward_mean"] for r in records]
            first, last = fifths(rewards_curve) if rewards_curve else (float("nan"), float("nan"))
            evals = [r["eval_accuracy"] for r in records if r.get("eval_accuracy") is not None]
            summary = {"steps": len(records), "reward_first_fifth": first, "reward_last_fifth": last,
                       "reward_gain": last - first, "eval_accuracy_before": run.initial_eval,
                       "eval_accuracy_after": evals[-1] if evals else None}
            if evals and run.initial_eval is not None:
                n = eval_count(run.cfg, run.task)
                summary.update(eval_n=n, eval_ci95_before=list(wilson_interval(run.initial_eval, n)),
                               eval_ci95_after=list(wilson_interval(evals[-1], n)),
                               eval_gain=evals[-1] - run.initial_eval,
                               eval_gain_ci95=list(gain_interval(run.initial_eval, evals[-1], n)))
            if run.teacher_eval is not None:
                summary["teacher_eval_accuracy"] = run.teacher_eval
            eval_n = eval_count(run.cfg, run.task) if run.cfg.task.eval_size else None
            plot = lambda: plot_curves(run.out_dir, initial_eval=run.initial_eval, eval_n=eval_n,  # noqa: E731
                                       teacher_eval=run.teacher_eval)
        summary.update(wall_s_this_run=time.time() - t_start, world_size=run.dist.world_size)
        if run.cfg.plot:
            summary["plot"] = plot()
        with open(os.path.join(run.out_dir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=1)
        print("pyrl train: " + json.dumps(summary), file=sys.stderr)
    distributed.barrier()
    return summary


# ------------------------------------------------------------------------------------------------
# setup

def _setup(cfg: TrainConfig, out_dir: str, resume: bool, fault_cfg) -> Run:
    """Process group, torch settings, task and reward, model (+ warm-up, reference), optimizer,
    checkpoint restore, rollout engine, metrics, and the greedy eval before RL."""
    validate(cfg)
    dist = distributed.setup(cfg.device, cfg.dist_timeout_s)
    _setup_torch(cfg, dist)
    ckpt = _checkpoint_to_resume(os.path.join(out_dir, "checkpoints"), resume, dist)
    preference_mode = cfg.mode == "preference"
    key, per_step = (("preference.batch_size", cfg.preference.batch_size) if preference_mode else
                     ("rollout.prompts_per_step", cfg.rollout.prompts_per_step))
    if per_step % dist.world_size:
        raise ValueError(f"{key}={per_step} must be a multiple of the world size {dist.world_size}")
    task = make_task(cfg.task.name, seed=cfg.seed, **cfg.task.options)
    if task.preference and not preference_mode:
        raise ValueError(f"task {cfg.task.name!r} gives preference rows, which mode {cfg.mode!r} does not sample "
                         "from: set mode=preference")
    if preference_mode and not task.preference:
        raise ValueError(f"mode 'preference' needs a preference task (task.name=addition_preference or preference), "
                         f"not {cfg.task.name!r}; or set mode=rl")
    if preference_mode:
        from pyrl.train import preference

        preference.check_task(cfg, task)
    run = _build_models(cfg, out_dir, dist, task, None if preference_mode else Reward.from_config(cfg, task), ckpt,
                        fault_cfg)
    if ckpt is not None:
        _restore(run, ckpt)
    if cfg.rollout.engine == "vllm":
        run.engine = VLLMEngine(cfg.model.name, run.tokenizer, seed=cfg.seed + dist.rank)
    elif cfg.rollout.engine != "hf":
        raise ValueError(f"rollout.engine must be 'hf' or 'vllm', got {cfg.rollout.engine!r}")
    run.log = MetricsLogger(out_dir, total_steps=cfg.max_steps, start_step=run.start_step, enabled=dist.is_main,
                            progress=cfg.progress, tensorboard=cfg.tensorboard,
                            show=preference.SHOW if preference_mode else None)
    if dist.is_main:
        with open(os.path.join(out_dir, "config.json"), "w") as f:
            json.dump(cfg.to_dict(), f, indent=1)
    if cfg.task.eval_size and run.start_step == 0:
        if preference_mode:
            run.initial_eval = preference.evaluate(run)
            message = "held-out preference metrics before training: " + json.dumps(run.initial_eval)
        else:
            with distributed.gathered_for_generation(run.model):
                run.initial_eval = evaluate(run.policy.lm, run.tokenizer, task, cfg, dist)
            message = f"greedy eval accuracy before RL: {run.initial_eval:.3f}"
        if dist.is_main:
            print(f"pyrl train: {message}", file=sys.stderr)
    if run.teacher is not None and cfg.task.eval_size:
        run.teacher_eval = evaluate(run.teacher.lm, run.tokenizer, task, cfg, dist)
        if dist.is_main:
            print(f"pyrl train: the teacher's greedy eval accuracy: {run.teacher_eval:.3f}", file=sys.stderr)
    return run


def _checkpoint_to_resume(ckpt_root: str, resume: bool, dist) -> Optional[str]:
    if resume and dist.is_main:  # what a killed checkpoint write left is never loaded: remove it, say so
        for line in checkpoint.clean_incomplete(ckpt_root):
            print(f"pyrl train: {line}", file=sys.stderr, flush=True)
    if resume:
        distributed.barrier()
    ckpt = checkpoint.latest(ckpt_root) if resume else None
    if not resume and checkpoint.latest(ckpt_root) is not None:
        raise checkpoint.CheckpointError(f"{ckpt_root} already holds checkpoints: pass --resume to continue "
                                         "that run, or choose another --out")
    if resume and ckpt is None and dist.is_main:
        print(f"pyrl train: --resume but no checkpoint in {ckpt_root}; starting from step 0", file=sys.stderr)
    return ckpt


def loss_options(cfg: TrainConfig) -> dict:
    """``PolicyLossConfig`` keywords of the run: ``algo.loss``, the sampler's settings, and for the
    losses that compare a prompt's completions (``pacs``, ``disco``) the rollout's group size."""
    r = cfg.rollout
    # the loss scores tokens under the distribution the engine sampled them from (docs/formulas.md §1.1)
    opts = {**cfg.algo.loss, "temperature": r.temperature, "top_k": r.top_k, "top_p": r.top_p, "min_p": r.min_p,
            "sampler_order": "vllm" if r.engine == "vllm" else "hf"}
    if opts.get("loss_type") in GROUPED_LOSSES:
        opts.setdefault("group_size", cfg.rollout.group_size)
    return opts


def _build_models(cfg: TrainConfig, out_dir: str, dist, task: Task, reward: Reward, ckpt, fault_cfg) -> Run:
    """The model RL starts from (built or loaded, then once the supervised warm-up), the reference,
    the policy (+ critic) in its data-parallel wrapper, the optimizer and the LR schedule."""
    dev, autocast = dist.device, _autocast(cfg, dist.device)
    a = cfg.algo
    if cfg.mode == "preference":  # the preference op takes its options per call; the head's temperature is 1
        loss_cfg = pyrl.PolicyLossConfig()
        need_ref = cfg.preference.loss.get("loss_type", "sigmoid") not in REFERENCE_FREE_LOSS_TYPES
        total_opt_steps = cfg.max_steps
    else:
        loss_cfg = pyrl.PolicyLossConfig(**loss_options(cfg))
        need_ref = loss_cfg.effective_kl_type is not None  # a KL penalty, or a kl_type for the kl_mean metric
        total_opt_steps = cfg.max_steps * a.ppo_epochs * a.minibatches
    lm, tokenizer = load_model(cfg.model, device=dev, seed=cfg.seed)
    if cfg.warmup.steps > 0:
        _warm_up(cfg, os.path.join(out_dir, "initial"), lm, tokenizer, task, dist, resuming=ckpt is not None)
    ref = None
    if need_ref:  # the frozen initial model
        # the reference's log-probs stay under the full softmax: a truncated one could exclude a sampled token
        ref = Policy(copy.deepcopy(lm).eval().requires_grad_(False),
                     dataclasses.replace(loss_cfg, top_k=None, top_p=None, min_p=None), backend=cfg.backend,
                     chunk_bytes=cfg.chunk_bytes,
                     packed=a.packed, share_prompt=a.share_prompt and cfg.mode == "rl")
    teacher = _load_teacher(cfg, lm, loss_cfg, dev) if a.teacher is not None else None
    policy = Policy(lm, loss_cfg, value_head=a.advantage == "gae" and cfg.mode == "rl",
                    separate_critic=a.critic == "separate", vf_coef=a.vf_coef, value_clip=a.value_clip,
                    policy_coef=a.policy_coef, teacher_term=TeacherTerm(a.teacher_coef, a.teacher_divergence,
                                                                        a.teacher_beta), backend=cfg.backend,
                    chunk_bytes=cfg.chunk_bytes,
                    packed=a.packed, share_prompt=a.share_prompt and cfg.mode == "rl")
    model = distributed.wrap(policy, dist, cfg.data_parallel)
    if ref is not None and distributed.is_fsdp(model):  # shard the reference model the same way
        if loss_cfg.exact_kl is not None:
            raise ValueError(f"kl_type={loss_cfg.kl_type!r} needs the reference LM head outside its forward, which FSDP2 "
                             "keeps sharded: use kl_type 'k1'/'k2'/'k3', or data_parallel='ddp'")
        ref = distributed.wrap(ref, dist, "fsdp")
    if teacher is not None and distributed.is_fsdp(model):
        raise ValueError("algo.teacher needs the policy's LM head outside its forward, which FSDP2 keeps sharded: "
                         "use data_parallel='ddp'")
    named = [(n, p) for n, p in distributed.unwrap(model).named_parameters() if p.requires_grad]  # LoRA: adapters
    critic = [p for n, p in named if n.startswith(("value_head", "critic_backbone"))]
    actor = [p for n, p in named if not n.startswith(("value_head", "critic_backbone"))]
    o = cfg.optim
    groups = [{"params": actor, "lr": o.lr}] + ([{"params": critic, "lr": o.critic_lr or o.lr}] if critic else [])
    optimizer = torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(o, total_opt_steps))
    kl = AdaptiveKL(loss_cfg.beta, cfg.algo.kl_target, cfg.algo.kl_horizon) if cfg.algo.kl_target else None
    return Run(cfg=cfg, dist=dist, out_dir=out_dir, fault_cfg=fault_cfg, task=task, reward=reward,
               tokenizer=tokenizer, policy=policy, model=model, ref=ref, optimizer=optimizer, scheduler=scheduler,
               params=[p for _, p in named], autocast=autocast, kl=kl, teacher=teacher)


def _load_teacher(cfg: TrainConfig, lm, loss_cfg, device) -> Policy:
    """``algo.teacher``, frozen, on ``device``: a model folder, a run's ``checkpoints/`` folder (its
    newest checkpoint), or any ``model.name``. It must share the policy's vocabulary and logit
    scale (the divergence takes one temperature for both heads)."""
    mc = teacher_model_config(cfg.algo.teacher, cfg.model.dtype)
    if os.path.isdir(mc.name) and not os.path.exists(os.path.join(mc.name, "config.json")):
        newest = checkpoint.latest(mc.name)
        if newest is None:
            raise ValueError(f"config key 'algo.teacher': {mc.name} holds neither a model (config.json) nor "
                             "checkpoints")
        mc = dataclasses.replace(mc, name=newest)
    t_lm, _ = load_model(mc, device=device, seed=cfg.seed)
    t_lm.eval().requires_grad_(False)
    head, t_head = lm_head(lm), lm_head(t_lm)
    if t_head.weight.shape[0] != head.weight.shape[0]:
        raise ValueError(f"config key 'algo.teacher': the teacher {mc.name!r} has a vocabulary of "
                         f"{t_head.weight.shape[0]} tokens, the policy {head.weight.shape[0]}: they must share one")
    if t_head.logit_scale != head.logit_scale:
        raise ValueError(f"config key 'algo.teacher': the teacher scales its logits by {t_head.logit_scale}, the "
                         f"policy by {head.logit_scale}; the divergence needs the same scale")
    return Policy(t_lm, loss_cfg, backend=cfg.backend, chunk_bytes=cfg.chunk_bytes)


def _warm_up(cfg: TrainConfig, initial_dir: str, lm, tokenizer, task: Task, dist, *, resuming: bool) -> None:
    """The supervised warm-up, once: a resumed run reloads its result from ``initial/`` (written
    only when checkpoints are, ``save_every > 0``)."""
    if resuming and os.path.exists(os.path.join(initial_dir, checkpoint.MANIFEST)):
        lm.load_state_dict(checkpoint.load_initial(initial_dir), strict=False)
        return
    losses = warmup_sft(lm, tokenizer, task, cfg, dist.device)
    if dist.is_main:
        print(f"pyrl train: supervised warm-up, {len(losses)} steps, loss {losses[0]:.3f} -> {losses[-1]:.3f}",
              file=sys.stderr)
        if cfg.save_every:
            checkpoint.save_initial(initial_dir, {k: v.detach().cpu() for k, v in lm.state_dict().items()},
                                    lm=lm, tokenizer=tokenizer)
    distributed.barrier()


def _restore(run: Run, ckpt: str) -> None:
    """Model, optimizer, schedule, RNG and data position from ``ckpt``, and the recipes' state
    (KL coefficient, HAPO history). After a reference reset the reference is rebuilt from the
    resumed policy (exact when the checkpoint's step is a reset step)."""
    state = checkpoint.load(ckpt, model=run.model, optimizer=run.optimizer, scheduler=run.scheduler,
                            rank=run.dist.rank, world_size=run.dist.world_size)
    run.start_step, run.data_position = state["step"], state["data_position"]
    extra = state.get("extra", {})
    run.initial_eval = extra.get("initial_eval")
    if run.reward is not None:
        run.reward.load_state_dict(extra.get("reward_state", {}))
    if run.kl is not None and "kl_coef" in extra:
        run.kl.beta = extra["kl_coef"]
        run.policy.loss_config = dataclasses.replace(run.policy.loss_config, beta=run.kl.beta)
    every = run.cfg.algo.ref_reset_every
    if every and run.start_step >= every:
        distributed.unwrap(run.ref).lm.load_state_dict(run.policy.lm.state_dict())
        if run.start_step % every and run.dist.is_main:
            print(f"pyrl train: the reference model is the resumed policy of step {run.start_step}, not of the "
                  f"last reset (step {run.start_step // every * every})", file=sys.stderr)
    if run.dist.is_main:
        print(f"pyrl train: resumed from {ckpt} (step {run.start_step})", file=sys.stderr)
