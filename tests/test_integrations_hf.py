"""pyrl.integrations.hf on tiny randomly initialised models built from configs (no downloads)."""
import pytest
import torch

transformers = pytest.importorskip("transformers")

import pyrl  # noqa: E402
from pyrl.integrations import hf  # noqa: E402

V, H = 96, 32


def _tiny(kind, **extra):
    common = dict(vocab_size=V, hidden_size=H, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1,
                  eos_token_id=2)
    if kind == "llama":
        cfg, cls = transformers.LlamaConfig(**common, **extra), transformers.LlamaForCausalLM
    elif kind == "qwen2":
        cfg, cls = transformers.Qwen2Config(**common, **extra), transformers.Qwen2ForCausalLM
    elif kind == "gpt2":  # tied embeddings, biased layer norms
        cfg = transformers.GPT2Config(vocab_size=V, n_embd=H, n_layer=2, n_head=4, n_positions=64,
                                      bos_token_id=1, eos_token_id=2, pad_token_id=0, **extra)
        cls = transformers.GPT2LMHeadModel
    elif kind == "cohere":  # logits * logit_scale
        cfg, cls = transformers.CohereConfig(**common, logit_scale=0.5, **extra), transformers.CohereForCausalLM
    elif kind == "granite":  # logits / logits_scaling
        cfg, cls = transformers.GraniteConfig(**common, logits_scaling=4.0, **extra), transformers.GraniteForCausalLM
    elif kind == "gemma2":  # tanh soft-cap
        cfg = transformers.Gemma2Config(**common, head_dim=8, final_logit_softcapping=30.0, **extra)
        cls = transformers.Gemma2ForCausalLM
    else:
        raise AssertionError(kind)
    torch.manual_seed(0)
    model = cls(cfg).eval()
    # larger-than-init head weights give peaked distributions, so errors in the scaling would show
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(8.0)
    return model


def _batch(B=3, P=5, C=7):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, V, (B, P + C), generator=g)
    mask = torch.ones(B, P + C, dtype=torch.long)
    mask[0, :2] = 0  # left padding of the prompt
    mask[1, -3:] = 0  # right padding of the completion
    return ids, mask, C


def _reference_logp(model, ids, mask, C, temperature=1.0):
    logits = model(input_ids=ids, attention_mask=mask).logits[:, -C - 1:-1].double() / temperature
    return torch.log_softmax(logits, -1).gather(-1, ids[:, -C:, None]).squeeze(-1)


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gpt2", "cohere", "granite"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_hidden_state_logprobs_equal_model_logits(kind, temperature):
    model = _tiny(kind)
    ids, mask, C = _batch()
    with torch.no_grad():
        hidden, head = hf.completion_hidden_states(model, ids, mask, logits_to_keep=C)
        assert hidden.shape == (ids.shape[0], C, H)
        logp = pyrl.fused_linear_logprobs(hidden, head.weight, ids[:, -C:], bias=head.bias,
                                          temperature=head.temperature(temperature))
        ref = _reference_logp(model, ids, mask, C, temperature)
    valid = mask[:, -C:].bool()
    torch.testing.assert_close(logp.double()[valid], ref[valid], atol=1e-5, rtol=0)
    assert hf.check_fused_head(model, ids, mask) < 1e-4


def test_tied_embeddings_get_gradients():
    model = _tiny("gpt2")
    assert model.config.tie_word_embeddings
    ids, mask, C = _batch()
    hidden, head = hf.completion_hidden_states(model, ids, mask, logits_to_keep=C)
    assert head.weight is model.transformer.wte.weight
    loss, _ = pyrl.fused_linear_policy_loss(hidden, head.weight, ids[:, -C:], mask[:, -C:], torch.randn(3))
    loss.backward()
    assert model.transformer.wte.weight.grad is not None and model.transformer.wte.weight.grad.abs().sum() > 0


def test_fused_loss_gradients_match_logits_path():
    model = _tiny("qwen2")
    ids, mask, C = _batch()
    adv = torch.tensor([1.0, -0.5, 0.25])
    cfg = pyrl.PolicyLossConfig(temperature=0.9)
    hidden, head = hf.completion_hidden_states(model, ids, mask, logits_to_keep=C)
    loss, _ = pyrl.fused_linear_policy_loss(hidden, head.weight, ids[:, -C:], mask[:, -C:], adv, config=cfg)
    grads = torch.autograd.grad(loss, [model.lm_head.weight, model.model.norm.weight])
    logits = model(input_ids=ids, attention_mask=mask).logits[:, -C - 1:-1]
    logp = pyrl.logprobs_from_logits(logits, ids[:, -C:], temperature=0.9)
    ref_loss, _ = pyrl.policy_loss(logp, adv, mask[:, -C:], config=cfg)
    ref_grads = torch.autograd.grad(ref_loss, [model.lm_head.weight, model.model.norm.weight])
    torch.testing.assert_close(loss, ref_loss, atol=1e-6, rtol=1e-5)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, atol=1e-6, rtol=1e-4)


def test_softcap_refused():
    model = _tiny("gemma2")
    ids, mask, C = _batch()
    with pytest.raises(ValueError, match="final_logit_softcapping"):
        hf.completion_hidden_states(model, ids, mask, logits_to_keep=C)
    with pytest.raises(ValueError, match="final_logit_softcapping"):
        hf.add_fused_logprobs_forward(model)


def test_unknown_logit_transform_caught_by_check():
    model = _tiny("llama")
    ids, mask, _ = _batch()
    original = model.forward

    def doubled(*args, **kwargs):  # a transform no config attribute announces
        out = original(*args, **kwargs)
        out.logits = out.logits * 2.0
        return out

    model.forward = doubled
    with pytest.raises(ValueError, match="differ from the model's own"):
        hf.check_fused_head(model, ids, mask)


def test_scale_folded_into_temperature():
    assert hf.lm_head(_tiny("cohere")).logit_scale == 0.5
    head = hf.lm_head(_tiny("granite"))
    assert head.logit_scale == 0.25 and head.temperature(0.5) == 2.0


def test_bad_arguments():
    model = _tiny("llama")
    ids, mask, C = _batch()
    with pytest.raises(ValueError, match="logits_to_keep"):
        hf.completion_hidden_states(model, ids, mask, logits_to_keep=0)
    with pytest.raises(ValueError, match="logits_to_keep"):
        hf.completion_hidden_states(model, ids, mask, logits_to_keep=ids.shape[1])
    with pytest.raises(ValueError, match="vocab_parallel"):
        hf.lm_head(model, vocab_parallel=True)  # a plain tensor is not a vocabulary-sharded DTensor
    with pytest.raises(ValueError, match="no backbone|no output embedding|no .config"):
        hf.lm_head(torch.nn.Linear(2, 2))


def test_fused_forward_matches_and_keeps_generation():
    model = _tiny("llama")
    ids, mask, C = _batch()
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=mask).logits
    hf.add_fused_logprobs_forward(model)
    out = model(input_ids=ids, attention_mask=mask, pyrl_completion_ids=ids[:, -C:], pyrl_temperature=0.7)
    assert isinstance(out, hf.FusedLogprobs) and out.logp.shape == (3, C) and out.entropy.shape == (3, C)
    valid = mask[:, -C:].bool()
    torch.testing.assert_close(out.logp.double()[valid], _reference_logp(model, ids, mask, C, 0.7)[valid],
                               atol=1e-5, rtol=0)
    out.logp[valid].sum().backward()
    assert model.lm_head.weight.grad is not None
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits, before)
    gen = model.generate(ids[:1, :5], max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert gen.shape == (1, 8)


def test_dtensor_head_gathered_and_vocab_parallel():
    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available():
        pytest.skip("torch.distributed unavailable")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    import os
    import socket

    own = not dist.is_initialized()
    if own:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ["MASTER_PORT"] = str(port)
        dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        model = _tiny("llama")
        ids, mask, C = _batch()
        with torch.no_grad():
            ref = _reference_logp(model, ids, mask, C)
        model.lm_head.weight = torch.nn.Parameter(distribute_tensor(model.lm_head.weight.detach(), mesh, [Shard(0)]))
        valid = mask[:, -C:].bool()
        for vp in (False, True):
            hidden, head = hf.completion_hidden_states(model, ids, mask, logits_to_keep=C, vocab_parallel=vp)
            assert (head.vocab_parallel_group is not None) == vp
            logp = pyrl.fused_linear_logprobs(hidden, head.weight, ids[:, -C:], bias=head.bias,
                                              vocab_parallel_group=head.vocab_parallel_group)
            torch.testing.assert_close(logp.double()[valid], ref[valid], atol=1e-5, rtol=0)
            logp[valid].sum().backward()
            assert model.lm_head.weight.grad is not None
            model.lm_head.weight.grad = None
    finally:
        if own:
            dist.destroy_process_group()
