"""The policy as one ``nn.Module`` whose forward is the RL loss: backbone -> hidden -> fused loss.

    policy = Policy(lm, PolicyLossConfig(...), value_head=False)
    out = policy(batch, mode="logprobs")          # {"logp": [B, T]} (+ "values") under no_grad
    loss, metrics = policy(batch, mode="loss")     # differentiable scalar, detached metrics
    loss, outputs = policy(batch, mode="preference", preference={"loss_type": "sigmoid", "beta": 0.1})

The loss is computed inside ``forward`` so that DDP and FSDP2 see one forward per backward (their
hooks gather parameters and synchronise gradients around it), and it never materialises the
``[B*T, V]`` logits: ``pyrl.integrations.hf.completion_hidden_states`` runs the decoder stack and
slices out the states that predict the completion tokens (the state at position ``t`` predicts token
``t + 1``), and ``pyrl.fused_linear_policy_loss`` takes them with the LM-head weight.

``batch`` is a dict of tensors (see ``make_batch``): prompts left-padded to ``P`` columns,
completions right-padded to ``T`` columns, concatenated into ``input_ids [B, P + T]``.
"""
from __future__ import annotations

import copy
import dataclasses

import torch
from torch import nn

import pyrl
from pyrl.integrations.hf import LMHead, _same_dtype, completion_hidden_states, lm_head, packed_hidden_states
from pyrl.train.models import backbone, mask_positions
from pyrl.train.shared_prompt import share_prompt_problem, shared_prompt_hidden

__all__ = ["Policy", "LossScale", "TeacherTerm", "clipped_value_loss", "make_batch"]


@dataclasses.dataclass(frozen=True)
class LossScale:
    """How one micro-batch's loss is scaled so that the sum over the micro-batches of every rank is
    the loss of the whole minibatch (see ``pyrl.train.loop.update``).

    ``num_tokens``: completion tokens of the whole minibatch over all ranks (the token mean's
    divisor, ``num_items_in_batch``); ``loss_scale``: the factor on the fused op's loss (the world
    size for the token mean, the micro-batch's share of sequences times it otherwise);
    ``world_size``: undoes DDP/FSDP's gradient averaging for the value loss."""
    num_tokens: torch.Tensor
    loss_scale: float = 1.0
    world_size: int = 1

    @classmethod
    def whole(cls, batch: dict) -> "LossScale":
        """One process, one micro-batch: the plain mean over ``batch``."""
        return cls(batch["completion_mask"].sum().float())


@dataclasses.dataclass(frozen=True)
class TeacherTerm:
    """The on-policy distillation term of the RL loss (``algo.teacher``, docs/trainer.md):
    ``coef * D(policy, teacher)``, the divergence ``pyrl.fused_linear_distillation_loss`` computes
    from both models' hidden states, as a token mean over the minibatch's completion tokens."""
    coef: float = 1.0
    divergence: str = "reverse_kl"
    beta: float = 0.5   # jsd's mixing weight


def make_batch(prompt_ids, prompt_mask, completion_ids, completion_mask, **per_sequence) -> dict:
    """The model input for prompts ``[B, P]`` (left-padded) and completions ``[B, T]`` (right-padded),
    trimmed to the longest prompt and completion present; extra ``[B]``/``[B, T]`` tensors ride along
    (``[B, T]`` ones are trimmed to the same ``T``)."""
    P0 = int((prompt_mask.sum(0) > 0).nonzero().min()) if prompt_mask.any() else prompt_mask.shape[1] - 1
    T = max(int(completion_mask.sum(1).max()), 1)
    T_full = completion_ids.shape[1]
    prompt_ids, prompt_mask = prompt_ids[:, P0:], prompt_mask[:, P0:]
    completion_ids, completion_mask = completion_ids[:, :T], completion_mask[:, :T]
    batch = {
        "input_ids": torch.cat([prompt_ids, completion_ids], 1),
        "attention_mask": torch.cat([prompt_mask, completion_mask], 1).long(),
        "prompt_len": prompt_ids.shape[1],
        "completion_ids": completion_ids,
        "completion_mask": completion_mask,
    }
    for k, v in per_sequence.items():
        if isinstance(v, torch.Tensor) and v.dim() >= 2 and v.shape[1] == T_full:
            v = v[:, :T]
        batch[k] = v
    return batch


def clipped_value_loss(values, old_values, returns, mask, clip: float):
    """PPO's clipped value loss per token (Schulman 2017; as in TRL/verl):
    ``0.5 * max((V - R)^2, (V_old + clip(V - V_old, -c, c) - R)^2)``, 0 where ``mask`` is 0.
    Returns ``(per_token [B, T], clipped [B, T] bool)``."""
    clipped_v = old_values + (values - old_values).clamp(-clip, clip)
    a, b = (values - returns) ** 2, (clipped_v - returns) ** 2
    m = mask.to(values.dtype)
    return 0.5 * torch.maximum(a, b) * m, (b > a) & mask.bool()


class Policy(nn.Module):
    """A Hugging Face causal LM (+ an optional value head) with the RL loss as its forward.

    Args:
        lm: a ``transformers`` causal LM (``get_decoder()`` and ``get_output_embeddings()``).
        loss_config: the ``pyrl.PolicyLossConfig`` of ``mode="loss"`` (its ``temperature`` and
            ``top_k``/``top_p``/``min_p`` are the sampler's, and ``mode="logprobs"`` uses them too);
            ``num_items_in_batch`` is filled in per call from the batch.
        value_head: add a critic ``Linear(H, 1)`` (PPO). ``separate_critic``: on a copy of the
            decoder stack instead of the policy's own.
        vf_coef, value_clip: weight and clip range of the value loss.
        policy_coef: weight of the policy loss; teacher_term: the distillation term (a
            ``TeacherTerm``), applied when ``forward`` is given the teacher's hidden states.
        backend: the pyrl op backend; chunk_bytes: the ops' memory budget per chunk of logits (None,
            bytes, or ``"auto"``: docs/scaling.md section 8).
        packed: run the decoder padding-free, each micro-batch's sequences concatenated into one row
            (``pyrl.integrations.hf.packed_hidden_states``; ``algo.packed``).
        share_prompt: compute each distinct prompt of a batch once (``pyrl.train.shared_prompt``;
            ``algo.share_prompt``), where the backbone allows it; the same states and gradients.
    """

    def __init__(self, lm, loss_config: pyrl.PolicyLossConfig = pyrl.PolicyLossConfig(), *, value_head=False,
                 separate_critic=False, vf_coef=0.5, value_clip=0.2, policy_coef=1.0, teacher_term=None,
                 backend="auto", chunk_bytes=None, packed=False, share_prompt=False):
        super().__init__()
        self.lm = lm
        self.packed = packed
        self.share_prompt = share_prompt and not packed
        self.loss_config = loss_config
        self.policy_coef, self.teacher_term = policy_coef, teacher_term
        self.backend, self.chunk_bytes = backend, chunk_bytes
        self.vf_coef, self.value_clip = vf_coef, value_clip
        hidden = lm.get_output_embeddings().weight.shape[1]
        self.critic_backbone = copy.deepcopy(backbone(lm)) if value_head and separate_critic else None
        self.value_head = None
        if value_head:
            self.value_head = nn.Linear(hidden, 1)
            nn.init.zeros_(self.value_head.weight)  # start at V = 0: GAE then begins as plain REINFORCE
            nn.init.zeros_(self.value_head.bias)
            self.value_head.to(lm.get_output_embeddings().weight.device)

    def _hidden(self, batch):
        """``(hidden [B, T, H], head)``: the state at column ``t`` predicts completion token ``t``."""
        mask, T = batch["attention_mask"], batch["completion_ids"].shape[1]
        if self.packed:
            return completion_hidden_states(self.lm, batch["input_ids"], mask, logits_to_keep=T, packed=True)
        if self.share_prompt and self._share_problem() is None:
            h = shared_prompt_hidden(backbone(self.lm), batch["input_ids"], mask, batch["prompt_len"], T)
            if h is not None:
                head = lm_head(self.lm)
                h, weight, bias = _same_dtype(h, head)
                return h, LMHead(weight, bias, head.logit_scale, head.vocab_parallel_group)
        # Position ids from the mask, exactly as `generate` computes them for left-padded prompts.
        position_ids = mask_positions(mask)
        return completion_hidden_states(self.lm, batch["input_ids"], mask, position_ids=position_ids,
                                        logits_to_keep=T)

    def _share_problem(self):
        if not hasattr(self, "_share_why"):
            self._share_why = share_prompt_problem(backbone(self.lm))
        return self._share_why

    def _values(self, h, batch):
        if self.critic_backbone is not None and self.packed:
            h = packed_hidden_states(self.critic_backbone, batch["input_ids"], batch["attention_mask"],
                                     logits_to_keep=batch["completion_ids"].shape[1])
        elif self.critic_backbone is not None:
            mask = batch["attention_mask"]
            out = self.critic_backbone(input_ids=batch["input_ids"], attention_mask=mask,
                                       position_ids=mask_positions(mask), use_cache=False)
            T = batch["completion_ids"].shape[1]
            h = out.last_hidden_state[:, -T - 1:-1]
        return self.value_head(h.to(self.value_head.weight.dtype)).squeeze(-1).float()

    def forward(self, batch: dict, mode: str = "loss", scale: "LossScale | None" = None,
                reference: "tuple | None" = None, teacher: "tuple | None" = None, preference: "dict | None" = None):
        """``mode="loss"``: ``(loss, metrics)`` of the micro-batch, scaled by ``scale`` (default: the
        whole batch in one process); ``reference``: ``(hidden [B, T, H], head weight [V, H])`` of the
        reference model, for the exact ``kl_type`` (``full``, ``full_forward``, ``full_jsd``);
        ``teacher``: ``(hidden [B, T, H_t], LMHead)`` of the teacher, for ``teacher_term``.
        ``"preference"``: ``(loss * scale.loss_scale, outputs)`` of
        ``pyrl.fused_linear_preference_loss`` with the keyword arguments ``preference``; the batch
        holds chosen then rejected rows (or KTO's rows with ``labels`` [B] bool), and ``ref_logp``
        [B, T] when the loss has a reference. ``"logprobs"``: ``{"logp" [B, T], "values"}``;
        ``"hidden"``: the completion hidden states."""
        h, head = self._hidden(batch)
        if mode == "hidden":
            return h
        targets, mask = batch["completion_ids"], batch["completion_mask"]
        # A logit scale after the head (Cohere, Granite...) is folded into the temperature.
        temperature = head.temperature(self.loss_config.temperature)
        values = self._values(h, batch) if self.value_head is not None else None
        # pyrl's ops compute in fp32; under autocast their matmuls would silently drop to bf16.
        no_autocast = torch.autocast(h.device.type, enabled=False)
        scale = scale or LossScale.whole(batch)
        if mode == "preference":
            with no_autocast:
                loss, outputs = pyrl.fused_linear_preference_loss(
                    h, head.weight, torch.where(mask.bool(), targets, -100), bias=head.bias,
                    ref_logps=batch.get("ref_logp"), preference_labels=batch.get("labels"), temperature=temperature,
                    backend=self.backend, chunk_bytes=self.chunk_bytes, **(preference or {}))
            return loss * scale.loss_scale, outputs
        if mode == "logprobs":
            c = self.loss_config
            with no_autocast:
                logp = pyrl.fused_linear_logprobs(h, head.weight, torch.where(mask.bool(), targets, -100),
                                                  bias=head.bias, temperature=temperature, top_k=c.top_k,
                                                  top_p=c.top_p, min_p=c.min_p, sampler_order=c.sampler_order,
                                                  backend=self.backend, chunk_bytes=self.chunk_bytes)
            return {"logp": logp} if values is None else {"logp": logp, "values": values}
        if mode != "loss":
            raise ValueError(f"mode must be 'loss', 'preference', 'logprobs' or 'hidden', got {mode!r}")

        cfg = self.loss_config
        ref_hidden, ref_weight = reference if reference is not None else (None, None)
        if cfg.agg == "token-mean":
            cfg = dataclasses.replace(cfg, num_items_in_batch=scale.num_tokens)
        if temperature != cfg.temperature:
            cfg = dataclasses.replace(cfg, temperature=temperature)
        with no_autocast:
            loss, metrics = pyrl.fused_linear_policy_loss(
                h, head.weight, targets, mask, batch["advantages"], bias=head.bias, old_logp=batch.get("old_logp"),
                ref_logp=batch.get("ref_logp"), ref_hidden=ref_hidden, ref_weight=ref_weight,
                rollout_logp=batch.get("rollout_logp"), config=cfg, backend=self.backend,
                chunk_bytes=self.chunk_bytes)
        loss = loss * (scale.loss_scale * self.policy_coef)
        if teacher is not None:
            t_hidden, t_head = teacher
            term = self.teacher_term or TeacherTerm()
            valid = mask.bool()
            with no_autocast:
                div, _ = pyrl.fused_linear_distillation_loss(
                    h, head.weight, t_hidden, t_head.weight, torch.where(valid, targets, -100), student_bias=head.bias,
                    teacher_bias=t_head.bias, divergence=term.divergence, beta=term.beta, temperature=temperature,
                    backend=self.backend, chunk_bytes=self.chunk_bytes)
            # the micro-batch's token mean, weighted as its share of the minibatch's tokens
            loss = loss + term.coef * div * (valid.sum() / scale.num_tokens * scale.world_size)
            metrics = {**metrics, "teacher_div_mean": div.detach()}
        if values is not None:
            per_token, clipped = clipped_value_loss(values, batch["old_values"], batch["returns"], mask,
                                                    self.value_clip)
            value_loss = per_token.sum() / scale.num_tokens
            loss = loss + self.vf_coef * value_loss * scale.world_size
            n = mask.sum().clamp(min=1)
            metrics = {**metrics, "value_loss": (value_loss * scale.num_tokens / n).detach(),
                       "value_clip_frac": (clipped.sum() / n).detach()}
        return loss, metrics
