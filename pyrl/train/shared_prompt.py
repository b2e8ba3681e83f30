"""The update's forward with a group's prompt computed once (``algo.share_prompt``).

A micro-batch of GRPO rows holds G completions of each prompt. ``shared_prompt_hidden`` runs the
decoder on each distinct prompt once, keeping every layer's keys and values, then on the completion
tokens alone, each row attending to its prompt's keys and values (gathered, differentiably, to the
rows that share it). The completion hidden states are those of the full-sequence forward, and so
is the gradient: autograd sums the rows' contributions to the shared prompt's activations. With
prompts of ~50 tokens and completions of ~30, the decoder sees about half the tokens.

Gradient checkpointing (non-reentrant) works: the prompt pass records each layer's keys/values by
overwriting (a replay records the same ones again), the completion pass reads them without storing
anything, so transformers can be told that its layers may keep the cache under checkpointing.

Used where it is known to be exact: a plain attention backbone (every layer full attention, SDPA
or eager), one process (FSDP2 would gather each layer twice per forward), not the packed update.
``None`` otherwise, and the caller runs the ordinary forward.
"""
from __future__ import annotations

import contextlib

import torch

__all__ = ["shared_prompt_hidden", "share_prompt_problem"]


def share_prompt_problem(backbone) -> str | None:
    """Why ``backbone`` cannot run the shared-prompt forward, or ``None``."""
    from pyrl.train.rollout import _cache_kwarg

    cfg = getattr(backbone, "config", None)
    if cfg is None:
        return "no config"
    if getattr(cfg, "is_encoder_decoder", False):
        return "an encoder-decoder model"
    attn = getattr(cfg, "_attn_implementation", None)
    if attn not in ("sdpa", "eager"):
        return f"attention {attn!r} (the shared-prompt forward is used with sdpa and eager)"
    types = getattr(cfg, "layer_types", None)
    if types is not None and any(t != "full_attention" for t in types):
        return "layers other than full attention (sliding window, linear attention)"
    if types is None and getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", True):
        return "sliding-window attention"
    if _cache_kwarg(backbone) is None:
        return f"{type(backbone).__name__}.forward takes no cache"
    layers = getattr(backbone, "layers", None)
    if layers is None or len(layers) != getattr(cfg, "num_hidden_layers", -1):
        return "no .layers list of num_hidden_layers decoder layers"
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return "distributed (each layer would run twice per forward under FSDP)"
    return None


def _layers():
    from transformers.cache_utils import DynamicLayer

    class Record(DynamicLayer):
        """Keeps the last keys/values it was given (overwritten, not appended)."""

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            self.keys, self.values = key_states, value_states
            return key_states, value_states

    class Prefix(DynamicLayer):
        """Holds the prompt's keys/values; returns them with the new ones appended, storing nothing."""

        def __init__(self, keys, values):
            super().__init__()
            self.lazy_initialization(keys, values)
            self.keys, self.values = keys, values

        def update(self, key_states, value_states, *args, **kwargs):
            return torch.cat([self.keys, key_states], -2), torch.cat([self.values, value_states], -2)

    return Record, Prefix


@contextlib.contextmanager
def _keep_cache_under_checkpointing(layers):
    saved = [layer.__dict__.get("_can_checkpoint_with_cache") for layer in layers]
    for layer in layers:
        layer._can_checkpoint_with_cache = True
    try:
        yield
    finally:
        for layer, s in zip(layers, saved):
            if s is None:
                del layer._can_checkpoint_with_cache
            else:
                layer._can_checkpoint_with_cache = s


def _rows(prompt_ids, prompt_mask):
    """``(distinct prompt ids [U, P], their masks, inverse [B])`` by ids and mask."""
    key = torch.cat([prompt_ids, prompt_mask.to(prompt_ids.dtype)], 1)
    uniq, inverse = torch.unique(key, dim=0, return_inverse=True)
    P = prompt_ids.shape[1]
    return uniq[:, :P], uniq[:, P:].to(prompt_mask.dtype), inverse


def shared_prompt_hidden(backbone, input_ids, attention_mask, prompt_len: int, T: int):
    """``hidden [B, T, H]`` (the state at column ``t`` predicts completion token ``t``) of the batch
    ``input_ids [B, prompt_len + T]`` (left-padded prompts, right-padded completions), with each
    distinct prompt computed once; ``None`` when no prompt repeats (nothing to gain)."""
    from transformers import DynamicCache

    from pyrl.train.models import mask_positions

    P = prompt_len
    if T < 1 or P < 1:
        return None
    p_ids, p_mask, inverse = _rows(input_ids[:, :P], attention_mask[:, :P])
    if p_ids.shape[0] == input_ids.shape[0]:
        return None
    Record, Prefix = _layers()
    kw = {"use_cache": True}
    name = "cache" if "cache" in __import__("inspect").signature(backbone.forward).parameters else "past_key_values"
    n = len(backbone.layers)
    record = DynamicCache()
    record.layers = [Record() for _ in range(n)]
    with _keep_cache_under_checkpointing(backbone.layers):
        pos = mask_positions(p_mask)
        out = backbone(input_ids=p_ids, attention_mask=p_mask, position_ids=pos, **{name: record}, **kw)
        h_prompt = out.last_hidden_state[:, -1]  # predicts completion token 0 (prompts are left-padded)
        prefix = DynamicCache()
        prefix.layers = [Prefix(x.keys[inverse], x.values[inverse]) for x in record.layers]
        hidden = [h_prompt[inverse][:, None]]
        if T > 1:  # completion tokens 0..T-2 predict tokens 1..T-1
            mask = attention_mask[:, :P + T - 1]
            pos = mask_positions(mask)[:, P:]
            out = backbone(input_ids=input_ids[:, P:P + T - 1], attention_mask=mask, position_ids=pos,
                           **{name: prefix}, **kw)
            hidden.append(out.last_hidden_state)
    return torch.cat(hidden, 1)
