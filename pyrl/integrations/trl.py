"""TRL's ``GRPOTrainer`` with pyrl's loss: ``PyrlGRPOTrainer`` is a drop-in subclass.

    from pyrl.integrations.trl import PyrlGRPOTrainer      # instead of trl.GRPOTrainer
    trainer = PyrlGRPOTrainer(model=model, reward_funcs=reward, args=GRPOConfig(...), train_dataset=ds)

Tested with TRL 1.16.0 (``trl>=1.16,<1.17``); it overrides one method, ``_compute_loss``, and reads
the inputs TRL's ``_generate_and_score_completions`` prepares, so other TRL versions may differ.

Only the training loss changes. Generation, rewards, advantages (``scale_rewards``,
``multi_objective_aggregation``), ``mask_truncated_completions``, the old/reference log-probs and
the vLLM importance ratios are TRL's own, and every ``GRPOConfig`` argument keeps TRL's meaning:

    ==========================================  ===============================================
    GRPOConfig                                  pyrl
    ==========================================  ===============================================
    loss_type grpo / sapo                        agg="seq-mean-token-mean"
    loss_type bnpo                               agg="token-mean" (local token count)
    loss_type dapo / cispo                       agg="token-mean", num_items_in_batch = TRL's
                                                 normaliser (global tokens per accumulation window)
    loss_type dr_grpo                            agg="seq-mean-token-sum-norm",
                                                 max_completion_length=args.max_completion_length
    loss_type luspo                              agg="seq-mean-token-sum"
    epsilon, epsilon_high, delta                 eps_low, eps_high, delta (ppo types)
    epsilon_high for cispo (absolute bound)      loss_type="cispo", eps_low=None, eps_high=epsilon_high-1
    sapo_temperature_pos / _neg                  tau_pos / tau_neg
    importance_sampling_level                    ratio_level
    beta, use_bias_correction_kl                 beta with kl_type="k3", use_bias_correction_kl
    top_entropy_quantile                         TRL's own mask (one quantile over all ranks), given
                                                 to pyrl.policy_loss as ``policy_weight``
    off_policy_mask_threshold                    TRL's own sequence mask, as ``policy_weight``
    vllm_importance_sampling_correction          TRL's ratios, as ``policy_weight``
    entropy_coef, use_adaptive_entropy           TRL's bonus: coef * masked mean entropy, adaptive
                                                 controller included
    gradient accumulation                        TRL's scaling (HF loss auto-scaling is off)
    ==========================================  ===============================================

The log-probs and entropies come from ``pyrl.fused_linear_logprobs`` inside the model's forward
(``pyrl.integrations.hf.add_fused_logprobs_forward``), so DDP/FSDP/DeepSpeed see the LM head used
where they expect it and no ``[B, T, V]`` logits are built; the loss is ``pyrl.policy_loss`` on
them. That pair is exactly what ``pyrl.fused_linear_policy_loss`` runs; it is split here because
TRL's entropy mask is a quantile over *all* ranks and its entropy bonus has its own normaliser,
and both need the entropies before the loss.

Not supported (a clear error at construction or on the first batch): ``loss_type="vespo"``, MoE
router auxiliary losses, multimodal inputs, and models whose logits are soft-capped after the head
(Gemma 2/3: see ``pyrl.integrations.hf``). Constant logit scales (Cohere, Granite) are folded into
the temperature.
"""
from __future__ import annotations

import torch

try:
    from trl import GRPOTrainer
except ImportError as e:  # pragma: no cover - exercised only without trl
    raise ImportError("pyrl.integrations.trl needs TRL: pip install 'trl>=1.16,<1.17'") from e

from pyrl.config import PolicyLossConfig
from pyrl.integrations import hf
from pyrl.losses.aliases import LIGER_LOSS_TYPES, TRL_LOSS_TYPES, liger_config_kwargs
from pyrl.ops.policy_loss import policy_loss

__all__ = ["PyrlGRPOTrainer", "policy_loss_config"]

TESTED_TRL_VERSIONS = ">=1.16,<1.17"

_MULTIMODAL_KEYS = ("pixel_values", "image_grid_thw", "pixel_attention_mask", "spatial_shapes", "image_sizes",
                    "token_type_ids", "mm_token_type_ids", "image_position_ids")


def _loss_type(loss_type):
    """The row of ``pyrl.losses.aliases.LIGER_LOSS_TYPES`` for a loss_type PyrlGRPOTrainer supports."""
    if loss_type not in TRL_LOSS_TYPES:
        raise ValueError(f"PyrlGRPOTrainer does not support loss_type={loss_type!r}; supported: "
                         f"{', '.join(sorted(TRL_LOSS_TYPES))} (use trl.GRPOTrainer for it)")
    return LIGER_LOSS_TYPES[loss_type]


def policy_loss_config(trainer, num_items_in_batch=None) -> PolicyLossConfig:
    """The ``PolicyLossConfig`` of a ``GRPOTrainer``'s loss arguments (the table in the module docstring;
    the names are ``pyrl.losses.aliases.TRL_LOSS_TYPES``, docs/formulas.md §12).

    The entropy mask, entropy bonus and sequence masks are applied by ``PyrlGRPOTrainer`` around the
    loss, so they are not in the config.
    """
    args, loss_type = trainer.args, trainer.loss_type
    alias = _loss_type(loss_type)
    if alias.absolute_eps_high and trainer.epsilon_high < 1:
        raise ValueError(f"loss_type={loss_type!r} clips the ratio at epsilon_high (an absolute bound, e.g. 5.0), "
                         f"got epsilon_high={trainer.epsilon_high!r} < 1")
    kw = liger_config_kwargs(alias, epsilon_low=trainer.epsilon_low, epsilon_high=trainer.epsilon_high,
                             importance_sampling_level=trainer.importance_sampling_level, delta=args.delta,
                             max_completion_length=trainer.max_completion_length,
                             sapo_temperature_pos=args.sapo_temperature_pos,
                             sapo_temperature_neg=args.sapo_temperature_neg)
    kw.update(beta=float(trainer.beta), kl_type="k3" if trainer.beta != 0.0 else None,
              use_bias_correction_kl=bool(args.use_bias_correction_kl))
    if num_items_in_batch is not None:
        kw["num_items_in_batch"] = num_items_in_batch
    return PolicyLossConfig(**kw)


class PyrlGRPOTrainer(GRPOTrainer):
    """``trl.GRPOTrainer`` whose loss is computed by pyrl (see the module docstring).

    Extra keyword arguments: ``pyrl_backend`` (``"auto" | "triton" | "cpp" | "torch"``) and
    ``pyrl_check_head`` (default True: compare the fused head with the model's own logits once,
    on a short synthetic input, before training; turn it off for models already sharded at
    construction, e.g. DeepSpeed ZeRO-3 ``zero.Init``).
    """

    def __init__(self, *args, pyrl_backend: str = "auto", pyrl_check_head: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        _loss_type(self.loss_type)
        if self.aux_loss_enabled:
            raise ValueError("PyrlGRPOTrainer does not support the MoE router auxiliary loss "
                             "(router_aux_loss_coef != 0); set router_aux_loss_coef=0.0 or use trl.GRPOTrainer")
        policy_loss_config(self)  # invalid argument combinations fail now, not at the first step
        if pyrl_check_head:
            base = hf._unwrap(self.model)
            device = next(base.parameters()).device
            vocab = hf.lm_head(base).weight.shape[0]
            ids = (torch.arange(1, 9, device=device) * 7919 % vocab).unsqueeze(0)
            hf.check_fused_head(base, ids)
        hf.add_fused_logprobs_forward(self.model, backend=pyrl_backend)

    def _compute_loss(self, model, inputs):
        present = [k for k in _MULTIMODAL_KEYS if inputs.get(k) is not None]
        if present:
            raise NotImplementedError(f"PyrlGRPOTrainer handles text-only batches; got {', '.join(present)} "
                                      f"(use trl.GRPOTrainer for multimodal models)")
        prompt_ids, prompt_mask = inputs["prompt_ids"], inputs["prompt_mask"]
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
        attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
        mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
        mode = "train" if self.model.training else "eval"
        accumulation = self.current_gradient_accumulation_steps if mode == "train" else 1.0

        with self.accelerator.autocast():
            logp, entropies = model(input_ids=input_ids, attention_mask=attention_mask,
                                    pyrl_completion_ids=completion_ids, pyrl_temperature=self.temperature)

        advantages = inputs["advantages"]
        if advantages.dim() == 1:
            advantages = advantages.unsqueeze(1)
        old_logp = inputs.get("old_per_token_logps")
        old_logp = logp.detach() if old_logp is None else old_logp

        # Everything TRL multiplies the policy term by, before the KL is added: pyrl's policy_weight.
        entropy_mask = None
        if self.top_entropy_quantile < 1.0:
            entropy_mask = self.get_high_entropy_mask(entropies.detach(), mask, 1 - self.top_entropy_quantile)
        weights = [] if entropy_mask is None else [entropy_mask.to(logp.dtype)]
        if self.off_policy_mask_threshold is not None:
            sampling_logp = inputs.get("sampling_per_token_logps", old_logp)
            weights.append(self.get_off_policy_mask(advantages=advantages, per_token_logps=logp,
                                                    sampling_per_token_logps=sampling_logp, mask=mask,
                                                    off_policy_threshold=self.off_policy_mask_threshold))
        if self.use_vllm and self.vllm_importance_sampling_correction:
            weights.append(inputs["importance_sampling_ratio"])
        policy_weight = None
        for w in weights:
            w = w.to(logp.dtype)
            policy_weight = w if policy_weight is None else policy_weight * w

        num_items = None
        if _loss_type(self.loss_type).global_normaliser:
            # TRL's normaliser: num_items_in_batch spans the generation batch; rescale it to one window
            num_items = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
            if mode == "train":
                num_items = num_items * self.current_gradient_accumulation_steps / self.args.steps_per_generation
            num_items = num_items.to(torch.float32)
        config = policy_loss_config(self, num_items)
        ref_logp = inputs["ref_per_token_logps"] if self.beta != 0.0 else None
        loss, metrics = policy_loss(logp, advantages.expand_as(logp).contiguous(), mask, old_logp=old_logp,
                                    ref_logp=ref_logp, policy_weight=policy_weight, config=config)
        if num_items is None:
            loss = loss / accumulation
        policy_loss_value = loss.detach() * (1.0 if num_items is not None else accumulation)

        if self._entropy_bonus_enabled:
            loss = loss - self._entropy_bonus(entropies, mask, entropy_mask, accumulation, mode, policy_loss_value)

        self._log_loss_metrics(mode, logp.detach(), old_logp, advantages, entropies.detach(), mask, metrics)
        return loss

    def _entropy_bonus(self, entropies, mask, entropy_mask, accumulation, mode, policy_loss_value):
        """TRL's bonus ``coef * sum(H * m') / sum(m') / accumulation`` (``m'``: the tokens the policy term
        acts on) with its adaptive controller, so ``entropy_coef``/``use_adaptive_entropy`` keep TRL's meaning."""
        effective_mask = mask if entropy_mask is None else mask * entropy_mask
        entropy_loss = (entropies * effective_mask).sum() / effective_mask.sum().clamp(min=1.0) / accumulation
        if self.use_adaptive_entropy:
            coef = self.entropy_coef if self._last_world_entropy <= self.args.entropy_target else 0.0
        else:
            coef = self.entropy_coef
        self._metrics[mode]["policy_loss"].append(self.accelerator.gather(policy_loss_value).nanmean().item())
        if self.use_adaptive_entropy and mode == "train":
            stats = torch.stack([(entropies * effective_mask).sum(), effective_mask.sum()]).detach()
            self._entropy_window_stats = stats if self._entropy_window_stats is None else self._entropy_window_stats + stats
            if self.accelerator.sync_gradients:
                window = self.accelerator.reduce(self._entropy_window_stats, reduction="sum")
                world_entropy = (window[0] / window[1].clamp(min=1.0)).item()
                step = self.args.entropy_coef_delta
                if world_entropy <= self.args.entropy_target:
                    self.entropy_coef = min(self.entropy_coef + step, self.args.entropy_coef_max)
                else:
                    self.entropy_coef = max(self.entropy_coef - step, self.args.entropy_coef_min)
                self._last_world_entropy = world_entropy
                self._entropy_window_stats = None
        if mode == "train" and self.accelerator.sync_gradients:
            self._metrics[mode]["entropy_coef"].append(self.entropy_coef)
        return coef * entropy_loss

    @torch.no_grad()
    def _log_loss_metrics(self, mode, logp, old_logp, advantages, entropies, mask, metrics):
        """TRL's loss metrics (kl, entropy, clip ratios) under TRL's names, from detached [B, T] tensors."""
        mask = mask.to(logp.dtype)

        def global_masked_mean(x):
            if x.shape[1] == 1:  # sequence-level ratios: TRL averages over sequences, not tokens
                local = torch.stack([x.sum(), torch.tensor(float(x.shape[0]), device=x.device)])
            else:
                local = torch.stack([(x * mask).sum(), mask.sum()])
            totals = self.accelerator.reduce(local, reduction="sum")
            return (totals[0] / totals[1].clamp(min=1.0)).item()

        log_ratio = logp - old_logp
        if self.importance_sampling_level == "sequence":
            log_ratio = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
        ratio = torch.exp(log_ratio)
        if self.beta != 0.0:
            count = mask.sum()
            totals = self.accelerator.reduce(torch.stack([metrics["kl_mean"].to(count.dtype) * count, count]),
                                             reduction="sum")
            self._metrics[mode]["kl"].append((totals[0] / totals[1].clamp(min=1.0)).item())
        self._metrics[mode]["entropy"].append(global_masked_mean(entropies))
        surrogate = _loss_type(self.loss_type).loss_type
        if surrogate == "ppo":
            low = ((ratio < 1 - self.epsilon_low) & (advantages < 0)).to(mask.dtype)
            high = ((ratio > 1 + self.epsilon_high) & (advantages > 0)).to(mask.dtype)
            self._metrics[mode]["clip_ratio/low_mean"].append(global_masked_mean(low))
            self._metrics[mode]["clip_ratio/high_mean"].append(global_masked_mean(high))
            self._metrics[mode]["clip_ratio/region_mean"].append(global_masked_mean(torch.maximum(low, high)))
        elif surrogate == "cispo":
            clipped = ((ratio > self.epsilon_high) & (advantages > 0)).to(mask.dtype)
            self._metrics[mode]["cispo_clip_ratio"].append(global_masked_mean(clipped))
