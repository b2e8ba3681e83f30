"""torch.compile(fullgraph=False) around a model forward + pyrl's fused loss, on CPU, equals eager.

pyrl's ops are custom autograd Functions over ``torch.ops.pyrl`` kernels with fake implementations,
so Dynamo traces around them; the only graph breaks are pyrl's data-dependent argument checks
(e.g. target ids in range), which is why ``fullgraph=True`` is not claimed.
"""
import pytest
import torch

transformers = pytest.importorskip("transformers")

import pyrl  # noqa: E402

C = 6


def _setup():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   pad_token_id=0)
    model = transformers.LlamaForCausalLM(cfg)
    ids = torch.randint(1, 64, (4, 12))
    mask = torch.ones(4, C, dtype=torch.bool)
    mask[1, 4:] = False
    old_logp = -torch.rand(4, C) * 4
    return model, ids, mask, torch.tensor([1.0, -0.5, 0.3, -1.1]), old_logp


def _check(compile_backend, op_backend):
    model, ids, mask, adv, old_logp = _setup()
    config = pyrl.PolicyLossConfig(eps_high=0.28, entropy_coef=0.01, top_entropy_rho=0.5, temperature=0.8)
    params = [model.lm_head.weight, model.model.norm.weight, model.model.layers[0].mlp.up_proj.weight]

    def step(ids):
        hidden = model.model(input_ids=ids).last_hidden_state[:, -C - 1:-1]
        loss, metrics = pyrl.fused_linear_policy_loss(hidden, model.lm_head.weight, ids[:, -C:], mask, adv,
                                                      old_logp=old_logp, config=config, backend=op_backend)
        return loss, metrics["entropy_mean"], metrics["clip_frac"]

    eager = step(ids)
    eager_grads = torch.autograd.grad(eager[0], params)
    torch._dynamo.reset()
    compiled = torch.compile(step, backend=compile_backend, fullgraph=False)
    for _ in range(2):  # the second call reuses the compiled graphs
        out = compiled(ids)
        grads = torch.autograd.grad(out[0], params)
        for a, b in zip(out, eager):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        for a, b in zip(grads, eager_grads):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)

    # and a whole optimizer step through the compiled function trains like eager
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = compiled(ids)[0].item()
    for _ in range(3):
        opt.zero_grad()
        compiled(ids)[0].backward()
        opt.step()
    assert compiled(ids)[0].item() < before


def test_compile_aot_eager():
    _check("aot_eager", "auto")  # the C++ kernels (torch.ops.pyrl) where built, else the reference


@pytest.mark.slow
def test_compile_inductor():
    _check("inductor", "auto")
