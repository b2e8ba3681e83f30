"""A group's copies of a prompt computed once: in the rollout (rollout.share_prefill, the prefill)
and in the update (algo.share_prompt, the forward/backward). On a float64 model, so that rounding
cannot flip an argmax or a sampled token: the same tokens as the per-row prefill, the same
log-probs to 1e-9, valid masks, the fallback path; the same hidden states and gradients."""
import copy
import logging

import pytest
import torch

pytest.importorskip("transformers")

import pyrl  # noqa: E402
from pyrl.train import apply_overrides, rollout  # noqa: E402
from pyrl.train.config import TrainConfig  # noqa: E402
from pyrl.train.models import backbone, build_tiny_model, char_tokenizer  # noqa: E402
from pyrl.train.policy import Policy, make_batch  # noqa: E402
from pyrl.train.rollout import _eos_ids, completion_mask_from_ids, generate, shared_prefill_cache  # noqa: E402
from pyrl.train.shared_prompt import share_prompt_problem, shared_prompt_hidden  # noqa: E402
from test_train import _one_thread  # noqa: E402,F401  (fixture)

# Prompts of different lengths (left padding), one of a single token, in groups of 3.
PROMPTS = [p for p in ("3+4=", "12+5=", "7+7=", "1", "99+9=") for _ in range(3)]
ATOL = 1e-9  # float64: the shared rows are computed in a smaller batch, so only summation order differs


@pytest.fixture(scope="module")
def tiny64():
    """A float64 tiny Llama with large random weights, so its greedy and sampled outputs vary."""
    tok = char_tokenizer()
    lm = build_tiny_model(tok, seed=0, hidden_size=64, intermediate_size=128, attn_implementation="sdpa",
                          initializer_range=0.5).double()
    return lm, tok


@pytest.fixture
def counted(monkeypatch):
    """Counts the generate calls that were handed a shared cache."""
    calls = {"shared": 0}
    inner = rollout.shared_prefill_cache

    def wrapped(*a, **kw):
        cache, why = inner(*a, **kw)
        calls["shared"] += cache is not None
        return cache, why

    monkeypatch.setattr(rollout, "shared_prefill_cache", wrapped)
    monkeypatch.setattr(rollout, "_FALLBACK_LOGGED", set())
    return calls


def _assert_same(a, b, tokens=True):
    assert torch.equal(a.prompt_ids, b.prompt_ids) and torch.equal(a.prompt_mask, b.prompt_mask)
    if tokens:
        assert torch.equal(a.completion_ids, b.completion_ids)
        assert torch.equal(a.completion_mask, b.completion_mask) and torch.equal(a.truncated, b.truncated)
        assert a.texts == b.texts
    torch.testing.assert_close(a.rollout_logp, b.rollout_logp, atol=ATOL, rtol=0)


def test_shared_prefill_cache_is_the_per_row_prefill(tiny64):
    """The shared cache holds, row by row, the keys and values a full-batch prefill of the first
    P - 1 columns computes (at the positions the mask keeps)."""
    lm, tok = tiny64
    enc = tok(PROMPTS, return_tensors="pt", padding=True, add_special_tokens=False)
    ids, am = enc["input_ids"], enc["attention_mask"]
    B, P = ids.shape
    with torch.no_grad():
        cache, why = shared_prefill_cache(lm, ids, am)
        assert why is None and cache.get_seq_length() == P - 1
        full = rollout._empty_cache(lm)
        pos = (am[:, :P - 1].cumsum(-1) - 1).clamp(min=0)
        backbone(lm)(input_ids=ids[:, :P - 1], attention_mask=am[:, :P - 1], position_ids=pos, use_cache=True,
                     **{rollout._cache_kwarg(backbone(lm)): full})
    keep = am[:, :P - 1].bool()[:, None, :, None]
    for mine, ref in zip(cache.layers, full.layers):
        assert mine.keys.shape == ref.keys.shape and mine.keys.shape[0] == B
        torch.testing.assert_close(torch.where(keep, mine.keys, 0.0), torch.where(keep, ref.keys, 0.0),
                                   atol=ATOL, rtol=0)
        torch.testing.assert_close(torch.where(keep, mine.values, 0.0), torch.where(keep, ref.values, 0.0),
                                   atol=ATOL, rtol=0)
    # nothing to share: every row distinct, or one-token prompts
    assert shared_prefill_cache(lm, ids[::3], am[::3]) == (None, None)
    one = tok(["1", "2", "1"], return_tensors="pt", padding=True, add_special_tokens=False)
    assert shared_prefill_cache(lm, one["input_ids"], one["attention_mask"]) == (None, None)


@pytest.mark.parametrize("batch_size", [0, 5, 4])  # whole groups per call, and calls that split groups
def test_greedy_tokens_equal_with_and_without_shared_prefill(tiny64, counted, batch_size):
    lm, tok = tiny64
    off = generate(lm, tok, PROMPTS, max_new_tokens=7, greedy=True, batch_size=batch_size, share_prefill=False)
    assert counted["shared"] == 0
    on = generate(lm, tok, PROMPTS, max_new_tokens=7, greedy=True, batch_size=batch_size)
    assert counted["shared"] >= 1
    _assert_same(on, off)
    assert len(set(on.texts)) > 1  # the model's outputs vary: the comparison means something


def test_sampled_rollout_with_shared_prefill_is_valid(tiny64, counted):
    """Sampling under a fixed seed: the shapes, the EOS mask and the truncation flags are
    consistent, the log-probs are those the policy computes for the sampled tokens, and (float64,
    the same seed draws the same numbers) the tokens are those of the per-row prefill."""
    lm, tok = tiny64
    kw = dict(max_new_tokens=6, temperature=0.7, top_k=12)
    torch.manual_seed(3)
    on = generate(lm, tok, PROMPTS, **kw)
    assert counted["shared"] == 1
    B, T = on.completion_ids.shape
    assert B == len(PROMPTS) and T <= 6 and on.rollout_logp.shape == on.completion_mask.shape == (B, T)
    assert on.rollout_logp.dtype == torch.float32 and len(on.texts) == B
    mask, truncated = completion_mask_from_ids(on.completion_ids, _eos_ids(tok, lm))
    assert torch.equal(mask, on.completion_mask) and torch.equal(truncated, on.truncated)
    assert (on.rollout_logp[on.completion_mask == 0] == 0).all() and (on.rollout_logp <= 0).all()
    assert torch.isfinite(on.rollout_logp).all()
    assert torch.equal(on.truncated, on.completion_mask.sum(1) == T) or T == 0  # truncated rows are full
    assert (on.completion_ids[on.completion_mask == 0] == tok.pad_token_id).all()
    policy = Policy(lm, pyrl.PolicyLossConfig(temperature=0.7, top_k=12))
    batch = make_batch(on.prompt_ids, on.prompt_mask, on.completion_ids, on.completion_mask)
    with torch.no_grad():
        logp = policy(batch, mode="logprobs")["logp"]
    m = on.completion_mask[:, :logp.shape[1]].bool()
    torch.testing.assert_close(logp[m].float(), on.rollout_logp[:, :logp.shape[1]][m], atol=1e-5, rtol=0)
    torch.manual_seed(3)
    off = generate(lm, tok, PROMPTS, share_prefill=False, **kw)
    _assert_same(on, off)
    assert len(set(on.texts)) > 3


def test_shared_prefill_falls_back_and_says_why(tiny64, counted, monkeypatch, caplog):
    lm, tok = tiny64
    ref = generate(lm, tok, PROMPTS, max_new_tokens=5, greedy=True, share_prefill=False)
    # a generation config that asks for another cache: the old path, reason logged once
    static = copy.deepcopy(lm)
    static.generation_config.cache_implementation = "static"
    with caplog.at_level(logging.WARNING, logger="pyrl.train.rollout"):
        a = generate(static, tok, PROMPTS, max_new_tokens=5, greedy=True)
        generate(static, tok, PROMPTS, max_new_tokens=5, greedy=True)
    assert counted["shared"] == 0
    said = [r.getMessage() for r in caplog.records if "cache_implementation='static'" in r.getMessage()]
    assert len(said) == 1 and "no shared prefill" in said[0]
    _assert_same(a, ref)
    # a prefill that does not leave a DynamicCache: detected after the prefill, the old path
    from transformers import StaticCache

    caplog.clear()
    monkeypatch.setattr(rollout, "_empty_cache", lambda m: StaticCache(config=m.config, max_cache_len=16))
    with caplog.at_level(logging.WARNING, logger="pyrl.train.rollout"):
        b = generate(lm, tok, PROMPTS, max_new_tokens=5, greedy=True, batch_size=6)
    assert counted["shared"] == 0
    said = [r.getMessage() for r in caplog.records if "StaticCache" in r.getMessage()]
    assert len(said) == 1, [r.getMessage() for r in caplog.records]
    _assert_same(b, ref)


def test_share_prefill_is_a_config_key():
    assert TrainConfig().rollout.share_prefill is True
    assert apply_overrides(TrainConfig(), ["rollout.share_prefill=false"]).rollout.share_prefill is False


# ------------------------------------------------------------------------------------------------
# the update: algo.share_prompt

def _rl_batch(lm, tok, seed=0):
    torch.manual_seed(seed)
    roll = generate(lm, tok, PROMPTS, max_new_tokens=6, temperature=1.0)
    g = torch.Generator().manual_seed(seed)
    adv = torch.randn(len(PROMPTS), 1, generator=g, dtype=torch.float64).expand(-1, roll.completion_ids.shape[1])
    return make_batch(roll.prompt_ids, roll.prompt_mask, roll.completion_ids, roll.completion_mask,
                      advantages=adv.contiguous(), old_logp=roll.rollout_logp + 0.05)


def _loss_and_grads(lm, batch, share, checkpointing=False):
    m = copy.deepcopy(lm)
    if checkpointing:
        enable = getattr(m, "activation_checkpointing_enable", None)  # the transformers 5.x name
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    m.train()
    policy = Policy(m, pyrl.PolicyLossConfig(loss_type="ppo", eps_low=0.2, eps_high=0.2), share_prompt=share)
    with torch.no_grad():
        logp = policy(batch, mode="logprobs")["logp"]
        hidden = policy(batch, mode="hidden")
    loss, _ = policy(batch, mode="loss")
    loss.backward()
    return loss.detach(), logp, hidden, {n: p.grad for n, p in m.named_parameters()}


@pytest.mark.parametrize("checkpointing", [False, True])
def test_shared_prompt_update_has_the_same_states_and_gradients(tiny64, monkeypatch, checkpointing):
    """The update's forward with each prompt computed once gives the full forward's hidden states,
    log-probs and loss, and its gradients. Llama's RMSNorm computes in float32 even in a float64
    model, and the shared path sums a prompt's G gradients before that norm's backward instead of
    after, so the gradients agree to float32 rounding (relative 1e-5; a missing or doubled path
    would be off by O(1))."""
    lm, tok = tiny64
    assert share_prompt_problem(backbone(lm)) is None
    batch = _rl_batch(lm, tok)
    used = []
    import pyrl.train.policy as policy_mod

    inner = policy_mod.shared_prompt_hidden
    monkeypatch.setattr(policy_mod, "shared_prompt_hidden", lambda *a: used.append(1) or inner(*a))
    ref = _loss_and_grads(lm, batch, share=False)
    assert not used
    got = _loss_and_grads(lm, batch, share=True, checkpointing=checkpointing)
    assert len(used) == 3  # logprobs, hidden, loss
    torch.testing.assert_close(got[2], ref[2], atol=1e-12, rtol=0)  # hidden states
    torch.testing.assert_close(got[1], ref[1], atol=1e-9, rtol=0)   # log-probs (the fused op's fp32)
    torch.testing.assert_close(got[0], ref[0], atol=1e-9, rtol=0)   # loss
    for name, g in ref[3].items():
        scale = g.abs().max().clamp(min=1e-3)
        assert (got[3][name] - g).abs().max() <= 1e-5 * scale, name


def test_shared_prompt_hidden_edges(tiny64):
    lm, tok = tiny64
    batch = _rl_batch(lm, tok)
    dec, P, T = backbone(lm), batch["prompt_len"], batch["completion_ids"].shape[1]
    rows = torch.arange(0, len(PROMPTS), 3)  # one row per prompt: nothing to share
    assert shared_prompt_hidden(dec, batch["input_ids"][rows], batch["attention_mask"][rows], P, T) is None
    # one completion token: only the prompt pass
    with torch.no_grad():
        one = shared_prompt_hidden(dec, batch["input_ids"][:, :P + 1], batch["attention_mask"][:, :P + 1], P, 1)
        full = Policy(lm)._hidden({**batch, "input_ids": batch["input_ids"][:, :P + 1],
                                   "attention_mask": batch["attention_mask"][:, :P + 1],
                                   "completion_ids": batch["completion_ids"][:, :1]})[0]
    torch.testing.assert_close(one, full, atol=1e-12, rtol=0)
    # a sliding-window model is not given the shared forward
    cfg = copy.deepcopy(lm.config)
    cfg.layer_types = ["sliding_attention"] * cfg.num_hidden_layers
    assert "full attention" in share_prompt_problem(types_only(cfg))


class types_only(torch.nn.Module):
    """A stand-in backbone with only a config (what share_prompt_problem reads first)."""

    def __init__(self, config):
        super().__init__()
        self.config = config


def test_micro_batches_keep_a_prompts_rows_together():
    from pyrl.train.config import AlgoConfig
    from pyrl.train.loop import micro_batches

    G, n = 4, 4
    g = torch.Generator().manual_seed(0)
    prompt_ids = torch.randint(5, 30, (n, 3), generator=g).repeat_interleave(G, 0)
    c_len = torch.randint(1, 6, (n * G,), generator=g)
    data = {"prompt_ids": prompt_ids, "prompt_mask": torch.ones_like(prompt_ids),
            "completion_mask": (torch.arange(6)[None] < c_len[:, None]).long()}
    parts = micro_batches(data, torch.arange(n * G), AlgoConfig(micro_batch_size=8))
    for part in parts:  # two whole groups each, longest completion first within a group
        assert len({int(i) // G for i in part}) == 2
        for grp in {int(i) // G for i in part}:
            lens = [int(c_len[i]) for i in part if int(i) // G == grp]
            assert lens == sorted(lens, reverse=True)
    parts = micro_batches(data, torch.arange(n * G), AlgoConfig(micro_batch_size=8, share_prompt=False))
    lens = [int(c_len[i]) for p in parts for i in p]
    assert lens == sorted(lens, reverse=True)  # without it: by length over the whole minibatch
