"""Offline preference optimisation: ``mode: preference`` (docs/trainer.md "Preference optimisation").

One step, on ``preference.batch_size`` rows of a preference task (``PreferencePair`` or KTO's
``Feedback``; this rank's share of them):

    encode      prompt left-padded, completion + EOS right-padded; a pair is two rows, all B chosen
                then all B rejected (the layout of pyrl.fused_linear_preference_loss)
    reference   the frozen initial model's per-token log-probs, once per batch, no grad,
                micro-batched (none for the reference-free simpo / cpo / orpo); KTO: its
                reference point from mismatched completions (``preference.kto_kl``), no grad
    update      micro-batches of ``preference.micro_batch_size`` rows: Policy.forward(mode=
                "preference") = backbone -> hidden states -> fused_linear_preference_loss (never
                the logits), each micro-batch's loss weighted by its share of the rows; backward,
                then ``loop.optimizer_step`` (clip, AdamW, LR schedule)
    record      metrics.jsonl; the held-out preference metrics every ``eval_every`` steps

The model, optimizer, schedule, checkpoints, resume, SIGTERM handling and data-parallel wrapper
are the RL loop's (``pyrl.train.loop``); only the step differs.
"""
from __future__ import annotations

import time

import torch

from pyrl.losses.preference import kto_kl_baseline
from pyrl.train import distributed
from pyrl.train.loop import encode_completions, fifths, model_batch, optimizer_step, select_rows
from pyrl.train.policy import LossScale
from pyrl.train.tasks import Feedback, prompt_text

__all__ = ["step", "evaluate", "encode", "summarize", "check_task", "SHOW"]

SHOW = {"loss": "loss", "acc": "reward_accuracy", "margin": "reward_margin"}  # the progress bar's metrics

# Sums over rows (all ranks) from which the reward metrics are formed.
_SUMS = ("loss", "rows", "correct", "chosen_reward", "chosen_n", "rejected_reward", "rejected_n", "chosen_logp",
         "rejected_logp")


def check_task(cfg, task) -> None:
    """Refuse a loss that does not fit the task's rows (KTO needs ``Feedback``, the others pairs)."""
    kto = cfg.preference.loss.get("loss_type") == "kto"
    unpaired = isinstance(task.example(0), Feedback)
    if kto != unpaired:
        rows = "unpaired {prompt, completion, label} rows" if unpaired else "{prompt, chosen, rejected} pairs"
        want = "loss_type=kto" if unpaired else "a paired loss_type (sigmoid, ipo, simpo, ...)"
        raise ValueError(f"config key 'preference.loss.loss_type' is {cfg.preference.loss.get('loss_type')!r} but "
                         f"task {cfg.task.name!r} gives {rows}: set preference.loss.{want}")


def encode(tokenizer, task, examples: list, device) -> dict:
    """The rows of ``examples`` as token ids: ``prompt_ids``/``prompt_mask`` (left-padded),
    ``completion_ids``/``completion_mask`` (right-padded, EOS included): ``2B`` rows for ``B``
    pairs (chosen then rejected), ``B`` for KTO's rows, with their ``labels`` [B] bool."""
    unpaired = isinstance(examples[0], Feedback)
    prompts = [prompt_text(task, tokenizer, ex) for ex in examples]
    if unpaired:
        completions = [ex.completion for ex in examples]
    else:
        prompts = prompts * 2
        completions = [ex.chosen for ex in examples] + [ex.rejected for ex in examples]
    enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
    ids, mask = encode_completions(tokenizer, completions, device)
    data = {"prompt_ids": enc["input_ids"], "prompt_mask": enc["attention_mask"], "completion_ids": ids,
            "completion_mask": mask}
    if unpaired:
        data["labels"] = torch.tensor([ex.desirable for ex in examples], dtype=torch.bool, device=device)
    return data


def _micro_rows(data: dict, size: int) -> list[tuple[int, torch.Tensor]]:
    """``(examples, rows)`` per micro-batch of ``size`` examples: a pair's two rows stay together."""
    unpaired = "labels" in data
    n = data["completion_ids"].shape[0] if unpaired else data["completion_ids"].shape[0] // 2
    device = data["completion_ids"].device
    parts = torch.arange(n, device=device).split(size)
    return [(len(p), p if unpaired else torch.cat([p, p + n])) for p in parts]


@torch.no_grad()
def _token_logps(model, data: dict, micro: list, autocast) -> torch.Tensor:
    """``[rows, T]`` fp32 per-token log-probs of the completions under ``model`` (0 on padding)."""
    out = torch.zeros(data["completion_ids"].shape, dtype=torch.float32, device=data["completion_ids"].device)
    for _, rows in micro:
        with autocast():
            logp = model(model_batch(select_rows(data, rows)), mode="logprobs")["logp"]
        out[rows, :logp.shape[1]] = logp.float()
    return out


def _kto_reference_point(run, data: dict, micro: list, average: bool) -> torch.Tensor:
    """KTO's ``z_0``: ``max(0, mean(logp - logp_ref))`` over mismatched rows (each prompt with the
    next row's completion, as TRL), no grad, averaged over ranks."""
    shifted = dict(data, completion_ids=data["completion_ids"].roll(1, 0),
                   completion_mask=data["completion_mask"].roll(1, 0))
    mask = shifted["completion_mask"].float()
    seq = lambda lp: (lp * mask).sum(1) / (mask.sum(1).clamp(min=1) if average else 1)  # noqa: E731
    z0 = kto_kl_baseline(seq(_token_logps(run.model, shifted, micro, run.autocast)),
                         seq(_token_logps(run.ref, shifted, micro, run.autocast)))
    return distributed.all_reduce_sum(z0.float()) / run.dist.world_size


def _options(run, data: dict, micro: list) -> dict:
    """The preference op's keyword arguments of this batch: ``preference.loss``, and KTO's reference
    point. Adds the reference log-probs to ``data``."""
    options = dict(run.cfg.preference.loss)
    if run.ref is not None:
        data["ref_logp"] = _token_logps(run.ref, data, micro, run.autocast)
        if options.get("loss_type") == "kto" and run.cfg.preference.kto_kl:
            options["kl"] = _kto_reference_point(run, data, micro, bool(options.get("average_log_prob")))
    return options


def _sums(loss: torch.Tensor, out: dict, labels) -> torch.Tensor:
    """The ``_SUMS`` of one micro-batch's outputs (pairs: chosen and rejected rewards; KTO: each
    row's reward, desirable or not; a row is "correct" when its reward orders it rightly: chosen
    above rejected, or a desirable row's reward above 0 and an undesirable one's below)."""
    if labels is None:
        r_w, r_l = out["chosen_rewards"], out["rejected_rewards"]
        values = (r_w.numel(), (r_w > r_l).sum(), r_w.sum(), r_w.numel(), r_l.sum(), r_l.numel(),
                  out["chosen_logps"].sum(), out["rejected_logps"].sum())
    else:
        r, lp = out["rewards"], out["logps"]
        correct = torch.where(labels, r > 0, r < 0).sum()
        values = (r.numel(), correct, r[labels].sum(), labels.sum(), r[~labels].sum(), (~labels).sum(),
                  lp[labels].sum(), lp[~labels].sum())
    return torch.stack([loss.detach().double()] + [torch.as_tensor(v, device=loss.device).double() for v in values])


def _pass(run, data: dict, *, train: bool) -> dict:
    """The loss over ``data`` in micro-batches (``train``: with backward, gradients synchronised on
    the last one), and its reward metrics over all ranks."""
    micro = _micro_rows(data, run.cfg.preference.micro_batch_size)
    options = _options(run, data, micro)
    n = sum(k for k, _ in micro)
    sums = torch.zeros(len(_SUMS), dtype=torch.float64, device=run.dist.device)
    for i, (k, rows) in enumerate(micro):
        batch = model_batch(select_rows(data, rows))
        scale = LossScale(torch.ones((), device=run.dist.device), loss_scale=k / n)
        sync = distributed.grad_sync(run.model, i == len(micro) - 1) if train else torch.no_grad()
        with sync:
            with run.autocast():
                loss, out = run.model(batch, mode="preference", scale=scale, preference=options)
            if train:
                loss.backward()
        sums += _sums(loss, out, batch.get("labels"))
    s = dict(zip(_SUMS, distributed.all_reduce_sum(sums).tolist()))
    chosen, rejected = s["chosen_reward"] / max(s["chosen_n"], 1), s["rejected_reward"] / max(s["rejected_n"], 1)
    metrics = {"loss": s["loss"] / run.dist.world_size, "reward_accuracy": s["correct"] / max(s["rows"], 1),
               "reward_margin": chosen - rejected, "chosen_reward": chosen, "rejected_reward": rejected,
               "chosen_logp": s["chosen_logp"] / max(s["chosen_n"], 1),
               "rejected_logp": s["rejected_logp"] / max(s["rejected_n"], 1)}
    if "kl" in options:
        metrics["kto_kl"] = float(options["kl"])
    return metrics


def evaluate(run) -> dict:
    """The preference metrics (``eval_`` + ``loss``, ``reward_accuracy``, ``reward_margin``,
    ``chosen_reward``, ...) on ``task.eval_size`` held-out rows (at most the task's), split over
    ranks."""
    cfg, dist = run.cfg, run.dist
    n = min(cfg.task.eval_size, run.task.num_eval or cfg.task.eval_size)
    per_rank = n // dist.world_size
    if per_rank < 1:
        raise ValueError(f"task.eval_size={cfg.task.eval_size} leaves no held-out row for each of the "
                         f"{dist.world_size} ranks")
    examples = run.task.eval_examples(dist.rank * per_rank, per_rank)
    metrics = _pass(run, encode(run.tokenizer, run.task, examples, dist.device), train=False)
    return {f"eval_{k}": v for k, v in metrics.items()}


def step(run, step_index: int) -> None:
    """One optimizer step on the next ``preference.batch_size`` rows, and its line of metrics.jsonl
    (with the held-out metrics when ``eval_every`` says so)."""
    cfg, dist = run.cfg, run.dist
    t0 = time.time()
    per_rank = cfg.preference.batch_size // dist.world_size
    examples = run.task.examples(run.data_position + dist.rank * per_rank, per_rank)
    run.data_position += cfg.preference.batch_size
    data = encode(run.tokenizer, run.task, examples, dist.device)
    rec = _pass(run, data, train=True)
    rec["grad_norm"] = float(optimizer_step(run.params, run.optimizer, run.scheduler, cfg.optim.grad_clip))
    rec["lr"] = run.scheduler.get_last_lr()[0]
    rec["update_s"] = time.time() - t0
    last = step_index + 1 == cfg.max_steps
    if cfg.task.eval_size and cfg.eval_every and ((step_index + 1) % cfg.eval_every == 0 or last):
        t = time.time()
        rec.update(evaluate(run))
        rec["eval_s"] = time.time() - t
    run.log.log(step_index + 1, rec)


def summarize(records: list, initial) -> dict:
    """summary.json of a preference run: the loss over the first and last fifth of the steps, the
    held-out accuracy and margin before and after."""
    initial = initial or {}
    first, last = fifths([r["loss"] for r in records]) if records else (float("nan"), float("nan"))
    evals = [r for r in records if r.get("eval_reward_accuracy") is not None]
    after = evals[-1] if evals else {}
    return {"steps": len(records), "loss_first_fifth": first, "loss_last_fifth": last,
            **{f"{key}_{when}": source.get(key) for key in ("eval_reward_accuracy", "eval_reward_margin")
               for when, source in (("before", initial), ("after", after))}}
