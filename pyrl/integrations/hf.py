"""Hugging Face causal LMs: completion hidden states + the LM head, without computing the logits.

    hidden, head = completion_hidden_states(model, input_ids, attention_mask, logits_to_keep=T_c)
    loss, metrics = pyrl.fused_linear_policy_loss(
        hidden, head.weight, completion_ids, completion_mask, advantages, bias=head.bias,
        config=PolicyLossConfig(temperature=head.temperature(sampling_temperature), ...))

``model(...).logits`` of a causal LM is ``lm_head(backbone(...))``, ``[B, L, V]``. The fused losses
want the two halves apart: the backbone's last hidden states at the positions that *predict* the
completion tokens (position ``t`` predicts token ``t + 1``, so the completion tokens
``input_ids[:, -T_c:]`` are predicted by ``hidden[:, -T_c - 1:-1]``; the same slicing as the
models' own ``logits_to_keep=T_c + 1`` followed by ``logits[:, :-1]``) and the head's weight.

What the helper takes care of:

* **Tied embeddings** (GPT-2, Qwen2-0.5B, Llama-3.2-1B...): the head is
  ``model.get_output_embeddings()``, whose weight *is* the embedding matrix; gradients reach it.
* **Logits transformed after the head.** A constant factor (Cohere/Cohere2 ``logit_scale``,
  Granite/MiniCPM3 ``1 / logits_scaling``, HyperCLOVA X ``logits_scaling``, Falcon-H1
  ``lm_head_multiplier``, Inkling ``1 / logits_mup_width_multiplier``) is folded into the
  temperature: ``softmax(s * z / T) = softmax(z / (T / s))``, so ``head.temperature(T)`` returns
  ``T / s``. A vocabulary truncation (Inkling ``unpadded_vocab_size``) slices the head. A tanh
  soft-cap (Gemma 2/3/4, VaultGemma, T5Gemma, Mistral-Large-4, nanochat ``final_logit_softcapping``;
  RecurrentGemma ``logits_soft_cap``) is *not* a linear map of the logits, so the fused path would
  compute a different distribution: it is refused with a ``ValueError`` naming the attribute.
  ``check_fused_head`` compares the two paths numerically for models this list does not know.
* **Sharded heads.** An FSDP2 / DTensor head is gathered with ``full_tensor()`` (differentiable:
  the gradient flows back to the shards). A head split by vocabulary over a tensor-parallel mesh
  (``Shard(0)`` on a 1-D mesh whose ranks all hold the *same* tokens) can instead stay split:
  ``lm_head(model, vocab_parallel=True)`` returns the local slice and ``vocab_parallel_group`` for
  ``pyrl.fused_linear_logprobs`` (never use it for an FSDP data-parallel shard: the ranks of a
  data-parallel group hold different tokens).
* **Wrapped models** (DDP, FSDP1, DeepSpeed, PEFT): the head must be used inside the wrapper's
  forward. ``add_fused_logprobs_forward(model)`` adds a ``pyrl_completion_ids=`` keyword to
  ``model.forward`` that returns the completion log-probs and entropies computed inside it.
"""
from __future__ import annotations

import math
import types
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch

__all__ = ["LMHead", "FusedLogprobs", "lm_head", "completion_hidden_states", "packed_hidden_states",
           "check_fused_head", "add_fused_logprobs_forward"]

# Config attributes of a tanh soft-cap applied to the logits after the head (a nonlinear map: the
# fused path, which only sees the head's weight, cannot reproduce it).
_SOFTCAP_ATTRS = ("final_logit_softcapping", "logits_soft_cap")

# Model types whose config has one of the scale attributes below but whose forward ignores it.
_SCALE_IGNORED = {"mpt": ("logit_scale",)}


@dataclass(frozen=True)
class LMHead:
    """The LM head as the fused ops need it.

    ``weight [V, H]`` and ``bias [V]`` (or None) are plain tensors (gathered from DTensor shards),
    differentiable w.r.t. the model's parameters. With ``vocab_parallel_group`` set, they are this
    rank's contiguous vocabulary slice (pass the group to ``pyrl.fused_linear_logprobs``).
    ``logit_scale`` is the constant the model multiplies its logits by after the head.
    """

    weight: torch.Tensor
    bias: Optional[torch.Tensor] = None
    logit_scale: float = 1.0
    vocab_parallel_group: object = None

    def temperature(self, sampling_temperature: float = 1.0) -> float:
        """The temperature to give pyrl so its distribution is the model's ``softmax(logits / T)``:
        ``T / logit_scale``."""
        return float(sampling_temperature) / self.logit_scale


class FusedLogprobs(NamedTuple):
    """What ``model(..., pyrl_completion_ids=ids)`` returns after ``add_fused_logprobs_forward``."""

    logp: torch.Tensor  # [B, T_c] fp32, log-prob of each completion token
    entropy: torch.Tensor  # [B, T_c] fp32, entropy of the distribution that predicted it


def _unwrap(model):
    """The ``transformers`` model under a PEFT / DDP / FSDP1 wrapper (the attributes live there)."""
    seen = set()
    while id(model) not in seen:
        seen.add(id(model))
        if hasattr(model, "get_base_model"):  # peft.PeftModel
            model = model.get_base_model()
        elif hasattr(model, "module") and isinstance(model.module, torch.nn.Module):  # DDP, FSDP1, DeepSpeed
            model = model.module
        elif hasattr(model, "_orig_mod"):  # torch.compile's OptimizedModule
            model = model._orig_mod
    return model


def _model_name(model) -> str:
    config = getattr(model, "config", None)
    kind = getattr(config, "model_type", None)
    return f"{type(model).__name__} (model_type={kind!r})" if kind else type(model).__name__


def _text_config(model):
    config = getattr(model, "config", None)
    if config is None:
        raise ValueError(f"{type(model).__name__} has no .config: pass a transformers PreTrainedModel")
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _logit_transform(model) -> tuple[float, Optional[int]]:
    """``(scale, vocab_limit)`` with ``logits = scale * (lm_head(h))[..., :vocab_limit]``; raises for a
    transform that is not of that form."""
    config = _text_config(model)
    kind = getattr(config, "model_type", None)
    for attr in _SOFTCAP_ATTRS:
        cap = getattr(config, attr, None)
        if cap is not None:
            raise ValueError(
                f"{_model_name(model)} soft-caps its logits after the LM head (config.{attr}={cap!r}: "
                f"logits = cap * tanh(logits / cap)); the fused losses only see the head's weight and would "
                f"compute a different distribution. Use the model's logits with pyrl.logprobs_from_logits "
                f"instead, or set config.{attr}=None if you trained without the cap")
    ignored = _SCALE_IGNORED.get(kind, ())
    scale = 1.0

    def factor(attr, invert):
        nonlocal scale
        value = getattr(config, attr, None)
        if value is None or attr in ignored:
            return
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise ValueError(f"{_model_name(model)} scales its logits by config.{attr}={value!r}, which pyrl can "
                             f"only fold into the temperature when it is a finite number > 0")
        scale = scale / value if invert else scale * value

    factor("logit_scale", False)  # Cohere, Cohere2, Cohere2-MoE, Cohere-Compass: logits * logit_scale
    factor("lm_head_multiplier", False)  # Falcon-H1
    factor("output_multiplier", False)  # MuseGlimmer/MuseSpark (always with a soft-cap, refused above)
    # Granite*, MiniCPM3 divide by logits_scaling (MiniCPM3 divides the hidden states: the same, no bias);
    # HyperCLOVA X multiplies by it.
    factor("logits_scaling", kind not in ("hyperclovax", "hyperclovax_vision_v2"))
    factor("logits_mup_width_multiplier", True)  # Inkling divides the hidden states
    limit = getattr(config, "unpadded_vocab_size", None)  # Inkling drops the padded vocabulary rows
    return scale, (int(limit) if limit is not None else None)


def _local_or_full(t: Optional[torch.Tensor], vocab_parallel: bool, what: str):
    """A DTensor gathered with ``full_tensor()`` or, for a vocab-parallel head, its local slice + group."""
    if t is None:
        return None, None
    try:
        from torch.distributed.tensor import DTensor, Shard
    except ImportError:  # torch built without distributed
        return t, None
    if not isinstance(t, DTensor):
        if vocab_parallel:
            raise ValueError(f"vocab_parallel=True needs the LM head {what} to be a DTensor sharded on the "
                             f"vocabulary (Shard(0)); got a plain tensor. Pass vocab_parallel_group to "
                             f"pyrl.fused_linear_logprobs yourself for a hand-split head")
        return t, None
    if not vocab_parallel:
        return t.full_tensor(), None
    if t.device_mesh.ndim != 1 or not (isinstance(t.placements[0], Shard) and t.placements[0].dim == 0):
        raise ValueError(f"vocab_parallel=True needs the LM head {what} sharded as [Shard(0)] on a 1-D mesh, "
                         f"got placements {t.placements} on a {t.device_mesh.ndim}-D mesh")
    return t.to_local(), t.device_mesh.get_group()


def lm_head(model, *, vocab_parallel: bool = False) -> LMHead:
    """The LM head of ``model`` (``get_output_embeddings()``, tied or not) as an ``LMHead``.

    Raises ``ValueError`` for a model without an output embedding, a head that is not a plain
    linear layer (e.g. a LoRA adapter on ``lm_head``), or logits transformed after the head in a way
    the fused path cannot reproduce (see the module docstring).
    """
    base = _unwrap(model)
    scale, limit = _logit_transform(base)
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if head is None:
        raise ValueError(f"{_model_name(base)} has no output embedding (get_output_embeddings() is None): "
                         f"not a causal LM with an LM head")
    if hasattr(head, "base_layer") or not isinstance(getattr(head, "weight", None), torch.Tensor):
        raise ValueError(f"the LM head of {_model_name(base)} is a {type(head).__name__}, not a plain linear "
                         f"layer (an adapter on lm_head?): its .weight is not the whole head. Merge the adapter "
                         f"or leave lm_head out of the adapter's target modules")
    weight, group = _local_or_full(head.weight, vocab_parallel, "weight")
    bias, _ = _local_or_full(getattr(head, "bias", None), vocab_parallel, "bias")
    if limit is not None and limit < weight.shape[0]:
        if group is not None:
            raise ValueError(f"{_model_name(base)} truncates its vocabulary (unpadded_vocab_size={limit}): "
                             f"not supported with vocab_parallel=True")
        weight = weight[:limit]
        bias = None if bias is None else bias[:limit]
    return LMHead(weight=weight, bias=bias, logit_scale=scale, vocab_parallel_group=group)


def _backbone(model):
    base = model.base_model if hasattr(model, "base_model") else None
    if base is None or base is model:
        raise ValueError(f"{_model_name(model)} exposes no backbone (model.base_model is the model itself): "
                         f"pass a *ForCausalLM model")
    return base


def _backbone_hidden(model, input_ids, attention_mask, logits_to_keep, model_kwargs):
    if not isinstance(logits_to_keep, int) or isinstance(logits_to_keep, bool) or logits_to_keep <= 0:
        raise ValueError(f"logits_to_keep must be an int > 0 (the number of completion tokens), got {logits_to_keep!r}")
    if input_ids is not None and logits_to_keep >= input_ids.shape[-1]:
        raise ValueError(f"logits_to_keep={logits_to_keep} must be smaller than the sequence length "
                         f"{input_ids.shape[-1]} (the first token has no predicting position)")
    model_kwargs = dict(model_kwargs)
    model_kwargs["use_cache"] = False
    out = _backbone(model)(input_ids=input_ids, attention_mask=attention_mask, **model_kwargs)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    return hidden[:, -logits_to_keep - 1:-1]


def _same_dtype(hidden: torch.Tensor, head: LMHead):
    """pyrl wants hidden and weight in one dtype; promote the narrower (e.g. an fp32 head, bf16 states)."""
    if hidden.dtype == head.weight.dtype:
        return hidden, head.weight, head.bias
    dtype = torch.promote_types(hidden.dtype, head.weight.dtype)
    bias = None if head.bias is None else head.bias.to(dtype)
    return hidden.to(dtype), head.weight.to(dtype), bias


def completion_hidden_states(model, input_ids, attention_mask=None, *, logits_to_keep: int,
                             vocab_parallel: bool = False, packed: bool = False, **model_kwargs):
    """Run ``model``'s backbone; return ``(hidden [B, T_c, H], head: LMHead)``.

    ``hidden[:, t]`` is the last hidden state that predicts ``input_ids[:, L - T_c + t]``
    (``T_c = logits_to_keep``, the completion length), so
    ``log_softmax(model(input_ids).logits[:, -T_c - 1:-1] / T)`` gathered at the completion ids equals
    ``pyrl.fused_linear_logprobs(hidden, head.weight, input_ids[:, -T_c:], bias=head.bias,
    temperature=head.temperature(T))``. The LM head is never applied. ``hidden`` is cast to the
    head's dtype where they differ (e.g. an fp32 head). Extra keyword arguments go to the backbone
    (``position_ids``, ``pixel_values``...). ``packed=True``: the backbone runs padding-free on the
    rows' real tokens (``packed_hidden_states``; needs the trainer's prompt/completion layout).

    Call it on the unwrapped model in single-process loops; under DDP/FSDP/DeepSpeed use
    ``add_fused_logprobs_forward`` so the head is used inside the wrapper's forward.
    """
    base = _unwrap(model)
    head = lm_head(base, vocab_parallel=vocab_parallel)  # refuse before running the backbone
    if packed:
        if attention_mask is None:
            raise ValueError("packed=True needs the attention_mask (it says where the padding is)")
        hidden = packed_hidden_states(_backbone(base), input_ids, attention_mask, logits_to_keep=logits_to_keep)
    else:
        hidden = _backbone_hidden(base, input_ids, attention_mask, logits_to_keep, model_kwargs)
    hidden, weight, bias = _same_dtype(hidden, head)
    return hidden, LMHead(weight, bias, head.logit_scale, head.vocab_parallel_group)


def packed_hidden_states(backbone, input_ids, attention_mask, *, logits_to_keep: int) -> torch.Tensor:
    """The completion hidden states of a padded batch, computed padding-free: ``[B, T_c, H]`` as
    ``completion_hidden_states`` returns them (``T_c = logits_to_keep``), but the backbone runs once
    on all the rows' real tokens concatenated into one row, with position ids restarting at 0 for
    each sequence and no attention mask. transformers (>= 4.56) reads such position ids as packed
    sequences: flash-attention takes its variable-length path, SDPA and eager attention a
    block-diagonal mask over the packed row (docs/trainer.md, "Memory and throughput").

    The batch must be laid out as pyrl's trainer builds it: the first ``L - T_c`` columns a
    left-padded prompt of at least one token, the last ``T_c`` a right-padded completion. States of
    padded completion positions are 0 (and get no gradient)."""
    if not isinstance(logits_to_keep, int) or isinstance(logits_to_keep, bool) or logits_to_keep <= 0:
        raise ValueError(f"logits_to_keep must be an int > 0 (the number of completion tokens), got {logits_to_keep!r}")
    B, L = input_ids.shape
    T, P = logits_to_keep, input_ids.shape[1] - logits_to_keep
    if P < 1:
        raise ValueError(f"logits_to_keep={T} must be smaller than the sequence length {L}")
    m = attention_mask.bool()
    p_len, c_len = m[:, :P].sum(1), m[:, P:].sum(1)
    cols = torch.arange(L, device=m.device)
    layout = (cols >= P - p_len[:, None]) & (cols < P + c_len[:, None])
    if not torch.equal(layout, m) or bool((p_len == 0).any()):
        raise ValueError("packed_hidden_states: attention_mask must be a left-padded prompt of at least one token "
                         "followed by a right-padded completion in every row")
    position_ids = (m.long().cumsum(1) - 1)[m]
    out = backbone(input_ids=input_ids[m][None], position_ids=position_ids[None], attention_mask=None,
                   use_cache=False)
    flat = (out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0])[0]  # [sum of lengths, H]
    start = torch.cumsum(p_len + c_len, 0) - (p_len + c_len)
    t = torch.arange(T, device=m.device)
    valid = t[None, :] < c_len[:, None]
    # completion token t of row b is predicted by the state of that row's token p_len + t - 1
    idx = torch.where(valid, start[:, None] + p_len[:, None] - 1 + t[None, :], 0)
    return torch.where(valid[..., None], flat[idx], flat.new_zeros(()))


@torch.no_grad()
def check_fused_head(model, input_ids, attention_mask=None, *, logits_to_keep: Optional[int] = None,
                     atol: Optional[float] = None) -> float:
    """Check numerically that the fused path reproduces ``model``'s own logits; return the max error.

    Compares ``log_softmax(model(...).logits)`` with the log-softmax of
    ``head.logit_scale * (hidden @ head.weight.T + bias)`` over the last ``logits_to_keep`` predicting
    positions (default: all but the first). Raises ``ValueError`` when they differ by more than
    ``atol`` (default 1e-3 for fp32/fp64 models, 5e-2 for half precision): the model transforms its
    logits in a way this module does not know, and the fused losses would be wrong for it. Run it
    once on a short input; it costs one forward with logits.
    """
    base = _unwrap(model)
    k = logits_to_keep if logits_to_keep is not None else input_ids.shape[-1] - 1
    hidden, head = completion_hidden_states(model, input_ids, attention_mask, logits_to_keep=k)
    if head.vocab_parallel_group is not None:
        raise ValueError("check_fused_head does not support vocab-parallel heads")
    z = torch.nn.functional.linear(hidden.float(), head.weight.float(),
                                   None if head.bias is None else head.bias.float()) * head.logit_scale
    ours = torch.log_softmax(z, -1)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits[:, -k - 1:-1]
    theirs = torch.log_softmax(logits.float(), -1)
    if theirs.shape != ours.shape:
        raise ValueError(f"{_model_name(base)}: the model's logits have shape {list(theirs.shape)} but the fused "
                         f"head gives {list(ours.shape)}; the fused losses cannot be used with this model")
    valid = torch.ones(theirs.shape[:-1], dtype=torch.bool, device=theirs.device)
    if attention_mask is not None:
        valid = attention_mask[:, -k - 1:-1].bool()
    err = float((ours - theirs).abs().amax(-1)[valid].max()) if bool(valid.any()) else 0.0
    if atol is None:
        atol = 1e-3 if hidden.dtype in (torch.float32, torch.float64) else 5e-2
    if not err <= atol:
        raise ValueError(f"{_model_name(base)}: log-probs from the LM head weight differ from the model's own by "
                         f"{err:.3g} (> atol={atol:g}): the model transforms its logits after the head in a way "
                         f"pyrl does not know; use its logits with pyrl.logprobs_from_logits instead")
    return err


def add_fused_logprobs_forward(model, *, vocab_parallel: bool = False, backend: str = "auto") -> None:
    """Let ``model(input_ids, attention_mask, pyrl_completion_ids=ids, pyrl_temperature=T)`` return
    ``FusedLogprobs(logp [B, T_c], entropy [B, T_c])`` of the completion ``ids [B, T_c]`` (the last
    ``T_c`` tokens of ``input_ids``), computed by ``pyrl.fused_linear_logprobs`` inside the forward.

    Use it when the model is wrapped (DDP, FSDP, DeepSpeed, PEFT): the wrapper's forward then covers
    the LM head as it expects, and the ``[B, T_c, V]`` logits are never built. Without the keyword,
    the forward is the original one (generation is unchanged). Patch the unwrapped model before
    wrapping it; a PEFT model is patched on its base model. ``logp`` is 0 where ``ids`` is -100.
    """
    from pyrl.ops.logprobs import fused_linear_logprobs

    target = model.get_base_model() if hasattr(model, "get_base_model") else model
    lm_head(target, vocab_parallel=vocab_parallel)  # refuse unsupported heads now, not mid-training
    original_forward = target.forward

    def forward(self, *args, pyrl_completion_ids=None, pyrl_temperature=1.0, **kwargs):
        if pyrl_completion_ids is None:
            return original_forward(*args, **kwargs)
        input_ids = kwargs.pop("input_ids", args[0] if args else None)
        attention_mask = kwargs.pop("attention_mask", args[1] if len(args) > 1 else None)
        kwargs.pop("logits_to_keep", None)
        ids = pyrl_completion_ids
        hidden, head = completion_hidden_states(self, input_ids, attention_mask, logits_to_keep=ids.shape[-1],
                                                vocab_parallel=vocab_parallel, **kwargs)
        # pyrl computes in fp32 whatever the input dtype; autocast would run its matmuls in half precision
        with torch.autocast(hidden.device.type, enabled=False):
            logp, entropy = fused_linear_logprobs(hidden, head.weight, ids.to(hidden.device), bias=head.bias,
                                                  temperature=head.temperature(pyrl_temperature),
                                                  return_entropy=True, vocab_parallel_group=head.vocab_parallel_group,
                                                  backend=backend)
        return FusedLogprobs(logp, entropy)

    target.forward = types.MethodType(forward, target)
