"""PyrlGRPOTrainer: the same loss as TRL's GRPOTrainer on the same batch, and training steps that run.

Everything is local: a tiny Llama built from a config, a word-level tokenizer built in memory, a
trivial reward and an in-memory dataset.
"""
import warnings

import pytest
import torch

trl = pytest.importorskip("trl")
transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")
tokenizers = pytest.importorskip("tokenizers")

from pyrl.integrations.trl import PyrlGRPOTrainer, policy_loss_config  # noqa: E402

WORDS = ["a", "b", "c", "d", "e", "f", "g", "h", "yes", "no"]


def _tokenizer():
    vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2, "<unk>": 3, **{w: i + 4 for i, w in enumerate(WORDS)}}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    tok.decoder = tokenizers.decoders.WordPiece(prefix="##")  # joins words with spaces
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>",
                                                eos_token="<eos>", unk_token="<unk>")


def _model():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=len(WORDS) + 4, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return transformers.LlamaForCausalLM(cfg)


def _reward(completions, **kwargs):
    return [float(c.split().count("yes")) for c in completions]


def _trainer(tmp_path, model=None, **overrides):
    args = dict(output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=4, max_completion_length=6,
                max_steps=2, learning_rate=1e-3, logging_steps=1, save_strategy="no", report_to="none",
                use_cpu=True, bf16=False, temperature=1.0, seed=0, dataloader_num_workers=0)
    args.update(overrides)
    dataset = datasets.Dataset.from_dict({"prompt": ["a b c", "d e f", "g h a", "b c d"] * 2})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return PyrlGRPOTrainer(model=model if model is not None else _model(), reward_funcs=_reward,
                               args=trl.GRPOConfig(**args), train_dataset=dataset, processing_class=_tokenizer())


@pytest.fixture(scope="module")
def trainer(tmp_path_factory):
    return _trainer(tmp_path_factory.mktemp("trl"))


def _inputs(trainer, B=4, P=4, C=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    V = trainer.model.config.vocab_size
    prompt_ids = torch.randint(4, V, (B, P), generator=g)
    prompt_mask = torch.ones(B, P, dtype=torch.long)
    prompt_mask[0, :2] = 0  # left padding
    completion_ids = torch.randint(4, V, (B, C), generator=g)
    completion_mask = torch.ones(B, C, dtype=torch.long)
    completion_mask[1, 3:] = 0
    completion_mask[2, 5:] = 0
    completion_ids[completion_mask == 0] = 0
    noise = lambda s: s * torch.randn(B, C, generator=g)  # noqa: E731
    # log-probs near the model's (so ratios sit around the clip bounds), from TRL's own head
    with torch.no_grad():
        logp, _, _ = trainer._get_per_token_logps_and_entropies(
            trainer.model, torch.cat([prompt_ids, completion_ids], 1), torch.cat([prompt_mask, completion_mask], 1), C)
    return {
        "prompt_ids": prompt_ids, "prompt_mask": prompt_mask,
        "completion_ids": completion_ids, "completion_mask": completion_mask,
        "advantages": torch.tensor([1.0, -0.7, 0.4, -1.2]),
        "old_per_token_logps": logp + noise(0.3), "ref_per_token_logps": logp + noise(0.5),
        "sampling_per_token_logps": logp + noise(0.4),
        "importance_sampling_ratio": torch.exp(noise(0.2)).clamp(max=2.0),
        "num_items_in_batch": completion_mask.sum().float() * 2,
    }


# (attributes set on the trainer, GRPOConfig attributes) for each case
CASES = {
    "grpo": ({"loss_type": "grpo"}, {}),
    "bnpo": ({"loss_type": "bnpo"}, {}),
    "dapo": ({"loss_type": "dapo"}, {}),
    "dr_grpo": ({"loss_type": "dr_grpo"}, {}),
    "luspo_seq": ({"loss_type": "luspo", "importance_sampling_level": "sequence"}, {}),
    "gspo": ({"loss_type": "grpo", "importance_sampling_level": "sequence", "epsilon_low": 3e-4,
              "epsilon_high": 4e-4}, {}),
    "dapo_clip_higher_beta": ({"loss_type": "dapo", "epsilon_high": 0.28, "beta": 0.04}, {}),
    "grpo_beta_bias_corr": ({"loss_type": "grpo", "beta": 0.1}, {"use_bias_correction_kl": True}),
    "delta": ({"loss_type": "bnpo"}, {"delta": 1.5}),
    "cispo": ({"loss_type": "cispo", "epsilon_high": 1.3}, {}),
    "sapo": ({"loss_type": "sapo"}, {"sapo_temperature_pos": 1.0, "sapo_temperature_neg": 1.05}),
    "top_entropy": ({"loss_type": "dapo", "top_entropy_quantile": 0.5}, {}),
    "entropy_bonus": ({"loss_type": "grpo", "entropy_coef": 0.01, "_entropy_bonus_enabled": True}, {}),
    "entropy_bonus_top_entropy": ({"loss_type": "bnpo", "entropy_coef": 0.05, "_entropy_bonus_enabled": True,
                                   "top_entropy_quantile": 0.3}, {}),
    "off_policy_mask": ({"loss_type": "dapo", "off_policy_mask_threshold": 0.05}, {}),
    "vllm_is_ratio": ({"loss_type": "grpo", "use_vllm": True, "vllm_importance_sampling_correction": True}, {}),
    "grad_accum": ({"loss_type": "dapo", "current_gradient_accumulation_steps": 2}, {}),
    "grad_accum_grpo": ({"loss_type": "grpo", "current_gradient_accumulation_steps": 2}, {}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_loss_and_grads_equal_trl(trainer, case, monkeypatch):
    attrs, arg_attrs = CASES[case]
    monkeypatch.setattr(trainer, "current_gradient_accumulation_steps", 1, raising=False)
    for k, v in attrs.items():
        monkeypatch.setattr(trainer, k, v, raising=False)
    for k, v in arg_attrs.items():
        monkeypatch.setattr(trainer.args, k, v)
    inputs = _inputs(trainer)
    params = [trainer.model.lm_head.weight, trainer.model.model.layers[0].mlp.up_proj.weight]

    trainer.model.zero_grad()
    ours = trainer._compute_loss(trainer.model, inputs)
    ours_grads = torch.autograd.grad(ours, params)
    theirs = trl.GRPOTrainer._compute_loss(trainer, trainer.model, inputs)
    theirs_grads = torch.autograd.grad(theirs, params)

    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-6)
    for a, b in zip(ours_grads, theirs_grads):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-6)
    # our metrics are logged under TRL's names with TRL's values (ours first, then TRL's)
    for name in ("entropy", "kl", "clip_ratio/region_mean", "cispo_clip_ratio"):
        logged = trainer._metrics["train"].get(name, [])
        if len(logged) >= 2:
            assert logged[-2] == pytest.approx(logged[-1], rel=1e-4, abs=1e-6), name


def test_config_mapping(trainer, monkeypatch):
    monkeypatch.setattr(trainer, "loss_type", "dr_grpo")
    cfg = policy_loss_config(trainer)
    assert (cfg.loss_type, cfg.agg, cfg.max_completion_length) == ("ppo", "seq-mean-token-sum-norm", 6)
    monkeypatch.setattr(trainer, "loss_type", "cispo")
    monkeypatch.setattr(trainer, "epsilon_high", 5.0)
    cfg = policy_loss_config(trainer)
    assert (cfg.loss_type, cfg.eps_low, cfg.eps_high) == ("cispo", None, 4.0)
    monkeypatch.setattr(trainer, "loss_type", "vespo")
    with pytest.raises(ValueError, match="vespo"):
        policy_loss_config(trainer)


def test_refuses_multimodal_inputs(trainer):
    inputs = _inputs(trainer)
    inputs["pixel_values"] = torch.zeros(1)
    with pytest.raises(NotImplementedError, match="pixel_values"):
        trainer._compute_loss(trainer.model, inputs)


def test_training_steps_run(tmp_path):
    trainer = _trainer(tmp_path, loss_type="dapo", top_entropy_quantile=0.5, entropy_coef=0.01, max_steps=2)
    before = trainer.model.lm_head.weight.detach().clone()
    result = trainer.train()
    assert trainer.state.global_step == 2
    assert torch.isfinite(torch.tensor(result.training_loss))
    assert not torch.equal(before, trainer.model.lm_head.weight.detach())
    logged = [h for h in trainer.state.log_history if "entropy" in h]
    assert logged and all(0 <= h["entropy"] <= 3.0 for h in logged)


def test_training_with_reference_model(tmp_path):
    model_dir = tmp_path / "tiny"
    _model().save_pretrained(model_dir)
    trainer = _trainer(tmp_path / "out", model=str(model_dir), loss_type="grpo", beta=0.04, max_steps=1)
    assert trainer.ref_model is not None
    trainer.train()
    assert any("kl" in h for h in trainer.state.log_history)
