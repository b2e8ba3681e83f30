"""The training loop: rollout -> reward -> advantage -> micro-batched policy update, repeated.

    from pyrl.train import get_preset, train
    summary = train(get_preset("tiny"), "runs/tiny")

Read ``train`` top to bottom; each stage is one call into a component you can use on its own
(``rollout.generate``, ``Task.score``, ``pyrl.advantages.compute``, ``Policy``, ``checkpoint``).
Launch with ``torchrun --nproc-per-node N`` for data parallelism: every rank samples its own share
of the prompts (whole groups), token counts are summed over ranks so the loss is the exact global
token mean, and DDP/FSDP2 average the gradients.
"""
from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import random
import sys
import time
from collections import defaultdict

import torch

import pyrl
from pyrl.integrations.hf import lm_head
from pyrl.train import checkpoint, distributed, faults
from pyrl.train.config import TrainConfig
from pyrl.train.metrics import MetricsLogger, plot_curves, read_metrics
from pyrl.train.models import load_model
from pyrl.train.policy import Policy, make_batch
from pyrl.train.rollout import VLLMEngine, generate
from pyrl.train.tasks import Task, make_task, prompt_text

__all__ = ["train", "update", "lr_lambda", "warmup_sft", "evaluate", "fifths"]

_EVAL_OFFSET = 10**9      # evaluation prompts come from their own index range ...
_WARMUP_OFFSET = 2 * 10**9  # ... and so do the warm-up's, so the RL data position is untouched


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
        local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        threads = max(1, cores // local)
    torch.set_num_threads(threads)
    if cfg.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    torch.manual_seed(cfg.seed + dist.rank)  # sampling differs per rank; model init does not (seeded)
    random.seed(cfg.seed + dist.rank)


def _autocast(cfg: TrainConfig, device: torch.device):
    on = cfg.bf16 == "on" or (cfg.bf16 == "auto" and device.type == "cuda")
    return (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if on else contextlib.nullcontext


def _encode_completions(tokenizer, texts: list[str], device) -> tuple[torch.Tensor, torch.Tensor]:
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
    policy = Policy(lm, pyrl.PolicyLossConfig(), backend=cfg.backend)
    opt = torch.optim.AdamW(lm.parameters(), lr=w.lr, weight_decay=0.0)
    losses = []
    autocast = _autocast(cfg, device)
    for s in range(w.steps):
        examples = task.examples(_WARMUP_OFFSET + s * w.batch_size, w.batch_size)
        prompts = tokenizer([prompt_text(task, tokenizer, ex) for ex in examples], return_tensors="pt",
                            padding=True, add_special_tokens=False).to(device)
        ids, mask = _encode_completions(tokenizer, [ex.solution for ex in examples], device)
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
def evaluate(lm, tokenizer, task: Task, cfg: TrainConfig, dist) -> float:
    """Greedy accuracy on ``task.eval_size`` prompts of their own index range, split over ranks."""
    n = cfg.task.eval_size
    per_rank = math.ceil(n / dist.world_size)
    start = dist.rank * per_rank
    examples = task.examples(_EVAL_OFFSET + start, max(0, min(per_rank, n - start)))
    total = torch.zeros(2, dtype=torch.float64, device=dist.device)
    if examples:
        roll = generate(lm, tokenizer, [prompt_text(task, tokenizer, ex) for ex in examples],
                        max_new_tokens=cfg.rollout.max_new_tokens, greedy=True, batch_size=cfg.rollout.batch_size)
        score = task.score(roll.texts, [ex.answer for ex in examples])
        total += torch.tensor([float(score.sum()), len(examples)], dtype=torch.float64, device=dist.device)
    distributed.all_reduce_sum(total)
    return float(total[0] / total[1].clamp(min=1))


def _rows(data: dict, idx: torch.Tensor) -> dict:
    return {k: v[idx] for k, v in data.items()}


def _model_batch(rows: dict) -> dict:
    extra = {k: v for k, v in rows.items()
             if k not in ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask")}
    return make_batch(rows["prompt_ids"], rows["prompt_mask"], rows["completion_ids"], rows["completion_mask"],
                      **extra)


@torch.no_grad()
def _score_old(model, ref, data: dict, cfg: TrainConfig, *, need_old: bool, need_values: bool, autocast) -> dict:
    """The behaviour policy's log-probs (and values), and the reference's, in micro-batches."""
    need_ref = ref is not None and pyrl.PolicyLossConfig(**cfg.algo.loss).effective_kl_type not in (None, "full")
    out = defaultdict(list)
    B, T = data["completion_ids"].shape
    size = cfg.algo.micro_batch_size
    for s in range(0, B, size):
        batch = _model_batch(_rows(data, torch.arange(s, min(B, s + size))))
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
    return {k: torch.cat(v) for k, v in out.items()}


def update(model, optimizer, scheduler, data: dict, *, cfg: TrainConfig, dist, params, autocast, ref=None,
           seed: int = 0) -> dict:
    """PPO-style update on one rollout batch: ``ppo_epochs`` passes, ``minibatches`` optimizer steps
    per pass, each accumulated over micro-batches of ``micro_batch_size`` sequences.

    The loss of one micro-batch is scaled so that the sum over the micro-batches of every rank is
    the loss of the whole minibatch: with ``agg="token-mean"`` the fused op divides by the global
    token count (``num_items_in_batch``), and the factor ``world_size`` undoes the gradient averaging
    of DDP/FSDP; other ``agg`` modes are means over sequences, weighted by their share. Returns
    token-weighted means of the loss metrics over the whole update."""
    algo = cfg.algo
    policy = distributed.unwrap(model)
    B = data["completion_ids"].shape[0]
    if B % algo.minibatches:
        raise ValueError(f"algo.minibatches={algo.minibatches} must divide the {B} sequences per rank")
    mb = B // algo.minibatches
    W = dist.world_size
    token_mean = policy.loss_config.agg == "token-mean"
    # The exact KL needs the reference's hidden states whenever it is computed: as a penalty
    # (beta > 0) or for the kl_mean metric only (beta == 0).
    full_kl = ref is not None and policy.loss_config.effective_kl_type == "full"
    gen = torch.Generator().manual_seed(seed)
    dev = dist.device
    sums = defaultdict(lambda: torch.zeros((), dtype=torch.float64, device=dev))
    ratio_max = torch.zeros((), device=dev)
    grad_norms = []
    for _ in range(algo.ppo_epochs):
        order = torch.randperm(B, generator=gen) if algo.minibatches > 1 else torch.arange(B)
        for m in range(algo.minibatches):
            idx = order[m * mb:(m + 1) * mb]
            n_tokens = distributed.all_reduce_sum(data["completion_mask"][idx].sum().to(torch.float32))
            micro = list(idx.split(algo.micro_batch_size))
            for i, mi in enumerate(micro):
                batch = _model_batch(_rows(data, mi))
                scale = float(W) if token_mean else float(W) * len(mi) / (mb * W)
                batch.update(num_tokens=n_tokens, loss_scale=torch.tensor(scale, device=dev), world_size=float(W))
                if full_kl:
                    with torch.no_grad(), autocast():
                        batch["ref_hidden"] = ref(batch, mode="hidden")
                    batch["ref_weight"] = lm_head(ref.lm).weight
                with distributed.grad_sync(model, i == len(micro) - 1):
                    with autocast():
                        loss, metrics = model(batch, mode="loss")
                    loss.backward()
                n = batch["completion_mask"].sum().double()
                sums["loss"] += loss.detach().double() / W
                sums["tokens"] += n
                for k, v in metrics.items():
                    if k == "ratio_max":
                        ratio_max = torch.maximum(ratio_max, v.float())
                    else:
                        sums[k] += v.double() * n
            norm = torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else math.inf)
            grad_norms.append(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
    keys = sorted(sums)
    totals = distributed.all_reduce_sum(torch.stack([sums[k] for k in keys]))
    if dist.distributed:
        torch.distributed.all_reduce(ratio_max, op=torch.distributed.ReduceOp.MAX)
    got = dict(zip(keys, totals.tolist()))
    n_opt = algo.ppo_epochs * algo.minibatches
    out = {k: v / max(got["tokens"], 1.0) for k, v in got.items() if k not in ("loss", "tokens")}
    out["loss"] = got["loss"] / n_opt
    out["ratio_max"] = float(ratio_max)
    out["grad_norm"] = float(torch.stack([g.float() for g in grad_norms]).mean())
    return out


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
    return pyrl.advantages.compute(name, rewards, group_size=cfg.rollout.group_size, mask=mask, **opts), None


def _rollout_stats(roll, rewards, old_logp, G: int, dev) -> tuple[dict, float]:
    """Reward, length and mismatch statistics of one rollout batch over all ranks, and the number of
    completion tokens."""
    lengths = roll.completion_mask.sum(1).double()
    mismatch = 0.0
    if old_logp is not None:
        mismatch = float(((old_logp - roll.rollout_logp).abs() * roll.completion_mask).sum())
    zero_var = float((rewards.view(-1, G).std(1) == 0).sum()) if G > 1 else 0.0
    s = distributed.all_reduce_sum(torch.tensor(
        [float(rewards.double().sum()), float((rewards.double() ** 2).sum()), float(len(rewards)), float(lengths.sum()),
         float(roll.truncated.sum()), mismatch, zero_var], dtype=torch.float64, device=dev)).tolist()
    n = s[2]
    mean = s[0] / n
    out = {"reward_mean": mean, "reward_std": math.sqrt(max(s[1] / n - mean ** 2, 0.0)),
           "completion_len_mean": s[3] / n, "truncated_frac": s[4] / n, "zero_variance_frac": s[6] / (n / G)}
    if old_logp is not None:  # mean |behaviour - sampler| log-prob per token: the rollout/train mismatch
        out["rollout_logp_abs_diff"] = s[5] / max(s[3], 1.0)
    return out, s[3]


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
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return
    rank = os.environ.get("RANK", "?")
    at = f" in step {step}" if step is not None else ""
    hint = ""
    if isinstance(e, torch.distributed.DistError) or "gloo" in str(e).lower() or "nccl" in str(e).lower():
        hint = (f" (a collective failed: another rank probably crashed or is stuck, see its message; a rank "
                f"waits at most dist_timeout_s={cfg.dist_timeout_s:g} s)")
    print(f"pyrl train: rank {rank} of {world} failed{at}: {type(e).__name__}: {e}{hint}", file=sys.stderr,
          flush=True)


def _train(cfg: TrainConfig, out_dir: str, resume: bool, fault_cfg: faults.FaultConfig, where: dict) -> dict:
    t_start = time.time()
    dist = distributed.setup(cfg.device, cfg.dist_timeout_s)
    _setup_torch(cfg, dist)
    dev = dist.device
    ckpt_root = os.path.join(out_dir, "checkpoints")
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

    G = cfg.rollout.group_size
    if cfg.rollout.prompts_per_step % dist.world_size:
        raise ValueError(f"rollout.prompts_per_step={cfg.rollout.prompts_per_step} must be a multiple of the "
                         f"world size {dist.world_size}")
    local_prompts = cfg.rollout.prompts_per_step // dist.world_size
    task = make_task(cfg.task.name, seed=cfg.seed, **cfg.task.options)
    loss_cfg = pyrl.PolicyLossConfig(**{**cfg.algo.loss, "temperature": cfg.rollout.temperature})
    use_critic = cfg.algo.advantage == "gae"
    autocast = _autocast(cfg, dev)

    # 1. The model RL starts from: built or loaded, then (once) the supervised warm-up.
    lm, tokenizer = load_model(cfg.model, device=dev, seed=cfg.seed)
    initial_dir = os.path.join(out_dir, "initial")
    if cfg.warmup.steps > 0:
        if ckpt is not None and os.path.exists(os.path.join(initial_dir, checkpoint.MANIFEST)):
            lm.load_state_dict(checkpoint.load_initial(initial_dir), strict=False)
        else:
            losses = warmup_sft(lm, tokenizer, task, cfg, dev)
            if dist.is_main:
                print(f"pyrl train: supervised warm-up, {len(losses)} steps, loss {losses[0]:.3f} -> "
                      f"{losses[-1]:.3f}", file=sys.stderr)
                checkpoint.save_initial(initial_dir, {k: v.detach().cpu() for k, v in lm.state_dict().items()},
                                        lm=lm, tokenizer=tokenizer)
            distributed.barrier()
    ref = None
    if loss_cfg.effective_kl_type is not None:  # a KL penalty, or a kl_type for the kl_mean metric
        ref = Policy(copy.deepcopy(lm).eval().requires_grad_(False), loss_cfg, backend=cfg.backend)

    # 2. Policy (+ critic), data parallel wrapper, optimizer, schedule; restore a checkpoint.
    policy = Policy(lm, loss_cfg, value_head=use_critic, separate_critic=cfg.algo.critic == "separate",
                    vf_coef=cfg.algo.vf_coef, value_clip=cfg.algo.value_clip, backend=cfg.backend)
    model = distributed.wrap(policy, dist, cfg.data_parallel)
    if ref is not None and distributed.is_fsdp(model):  # shard the reference model the same way
        if loss_cfg.effective_kl_type == "full":
            raise ValueError("kl_type='full' needs the reference LM head outside its forward, which FSDP2 "
                             "keeps sharded: use kl_type 'k1'/'k2'/'k3', or data_parallel='ddp'")
        ref = distributed.wrap(ref, dist, "fsdp")
    named = list(distributed.unwrap(model).named_parameters())
    critic = [p for n, p in named if n.startswith(("value_head", "critic_backbone"))]
    actor = [p for n, p in named if not n.startswith(("value_head", "critic_backbone"))]
    o = cfg.optim
    groups = [{"params": actor, "lr": o.lr}] + ([{"params": critic, "lr": o.critic_lr or o.lr}] if critic else [])
    optimizer = torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)
    total_opt_steps = cfg.max_steps * cfg.algo.ppo_epochs * cfg.algo.minibatches
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(o, total_opt_steps))
    params = [p for _, p in named]
    start_step, data_position, initial_eval = 0, 0, None
    if ckpt is not None:
        state = checkpoint.load(ckpt, model=model, optimizer=optimizer, scheduler=scheduler, rank=dist.rank,
                                world_size=dist.world_size)
        start_step, data_position = state["step"], state["data_position"]
        initial_eval = state.get("extra", {}).get("initial_eval")
        if dist.is_main:
            print(f"pyrl train: resumed from {ckpt} (step {start_step})", file=sys.stderr)

    engine = None
    if cfg.rollout.engine == "vllm":
        engine = VLLMEngine(cfg.model.name, tokenizer, seed=cfg.seed + dist.rank)
    elif cfg.rollout.engine != "hf":
        raise ValueError(f"rollout.engine must be 'hf' or 'vllm', got {cfg.rollout.engine!r}")

    log = MetricsLogger(out_dir, total_steps=cfg.max_steps, start_step=start_step, enabled=dist.is_main,
                        progress=cfg.progress, tensorboard=cfg.tensorboard)
    if dist.is_main:
        with open(os.path.join(out_dir, "config.json"), "w") as f:
            json.dump(cfg.to_dict(), f, indent=1)
    if cfg.task.eval_size and start_step == 0:
        with distributed.gathered_for_generation(model):
            initial_eval = evaluate(policy.lm, tokenizer, task, cfg, dist)
        if dist.is_main:
            print(f"pyrl train: greedy eval accuracy before RL: {initial_eval:.3f}", file=sys.stderr)

    # 3. The loop. A SIGTERM (faults.handle_sigterm) is honoured between steps, on all ranks at once.
    if distributed.any_rank(faults.stop_requested()):
        log.close()
        raise faults.Stopped(f"stopped by SIGTERM before step {start_step + 1}; --resume continues from the "
                             "newest checkpoint")
    for step in range(start_step, cfg.max_steps):
        where["step"] = step + 1
        faults.maybe_crash(fault_cfg, step + 1, dist.rank)
        t0 = time.time()
        # rollout: this rank's prompts, each repeated G times (a group)
        examples = task.examples(data_position + dist.rank * local_prompts, local_prompts)
        data_position += cfg.rollout.prompts_per_step
        prompts = [prompt_text(task, tokenizer, ex) for ex in examples for _ in range(G)]
        answers = [ex.answer for ex in examples for _ in range(G)]
        if engine is not None:
            engine.sync(policy.lm)
            roll = engine.generate(prompts, max_new_tokens=cfg.rollout.max_new_tokens,
                                   temperature=cfg.rollout.temperature, device=dev)
        else:
            with distributed.gathered_for_generation(model):
                roll = generate(policy.lm, tokenizer, prompts, max_new_tokens=cfg.rollout.max_new_tokens,
                                temperature=cfg.rollout.temperature, batch_size=cfg.rollout.batch_size)
        t_roll = time.time()

        # reward -> behaviour/reference log-probs -> advantages
        rewards = task.score(roll.texts, answers).to(dev)
        data = {"prompt_ids": roll.prompt_ids, "prompt_mask": roll.prompt_mask,
                "completion_ids": roll.completion_ids, "completion_mask": roll.completion_mask}
        if loss_cfg.is_level is not None:
            data["rollout_logp"] = roll.rollout_logp
        off_policy = cfg.algo.ppo_epochs > 1 or cfg.algo.minibatches > 1 or loss_cfg.is_level is not None
        data.update(_score_old(model, ref, data, cfg, need_old=off_policy, need_values=use_critic,
                               autocast=autocast))
        advantages, returns = _advantages(cfg, rewards * cfg.algo.scale_rewards, roll.completion_mask,
                                          data.get("old_values"))
        data["advantages"] = advantages.float()
        if returns is not None:
            data["returns"] = returns.float()

        # policy update
        stats = update(model, optimizer, scheduler, data, cfg=cfg, dist=dist, params=params, autocast=autocast,
                       ref=ref, seed=cfg.seed * 1_000_003 + step)
        t_end = time.time()

        rollout_stats, n_tokens = _rollout_stats(roll, rewards, data.get("old_logp"), G, dev)
        record = {**rollout_stats, **stats, "tokens_per_s": n_tokens / max(t_end - t0, 1e-9),
                  "lr": scheduler.get_last_lr()[0], "rollout_s": t_roll - t0, "update_s": t_end - t_roll}
        if cfg.task.eval_size and cfg.eval_every and ((step + 1) % cfg.eval_every == 0 or step + 1 == cfg.max_steps):
            with distributed.gathered_for_generation(model):
                record["eval_accuracy"] = evaluate(policy.lm, tokenizer, task, cfg, dist)
        log.log(step + 1, record)

        last = step + 1 == cfg.max_steps
        stop = not last and distributed.any_rank(faults.stop_requested())  # all ranks agree
        if stop or last or (cfg.save_every and (step + 1) % cfg.save_every == 0):
            checkpoint.save(ckpt_root, step + 1, model=model, optimizer=optimizer, scheduler=scheduler,
                            data_position=data_position, config=cfg.to_dict(), lm=policy.lm, tokenizer=tokenizer,
                            keep=cfg.keep_checkpoints, extra={"initial_eval": initial_eval}, faults=fault_cfg)
            if not stop and not last:  # a SIGTERM during that write: it completed, so stop here
                stop = distributed.any_rank(faults.stop_requested())
        if stop:
            log.close()
            raise faults.Stopped(f"stopped by SIGTERM after step {step + 1}: the checkpoint "
                                 f"{os.path.join(ckpt_root, f'step-{step + 1:06d}')} is complete; "
                                 "--resume continues from it")
    where["step"] = None

    log.close()
    summary = {}
    if dist.is_main:
        records = read_metrics(os.path.join(out_dir, "metrics.jsonl"))
        rewards_curve = [r["reward_mean"] for r in records]
        first, last = fifths(rewards_curve) if rewards_curve else (float("nan"), float("nan"))
        evals = [r["eval_accuracy"] for r in records if r.get("eval_accuracy") is not None]
        summary = {"steps": len(records), "reward_first_fifth": first, "reward_last_fifth": last,
                   "reward_gain": last - first, "eval_accuracy_before": initial_eval,
                   "eval_accuracy_after": evals[-1] if evals else None,
                   "wall_s_this_run": time.time() - t_start, "world_size": dist.world_size}
        if cfg.plot:
            summary["plot"] = plot_curves(out_dir, initial_eval=initial_eval)
        with open(os.path.join(out_dir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=1)
        print("pyrl train: " + json.dumps(summary), file=sys.stderr)
    distributed.barrier()
    return summary
