"""pyrl's lean trainer: GRPO-family and PPO on Hugging Face causal LMs, CPU to multi-GPU.

    from pyrl.train import get_preset, train
    train(get_preset("tiny"), "runs/tiny")          # or: pyrl train --preset tiny --out runs/tiny

One loop (``pyrl.train.loop.train``) wires small components that are importable on their own:

    config      TrainConfig dataclasses, YAML/JSON loading, dotted overrides
    presets     tiny, smollm2-arith, qwen2.5-0.5b-gsm8k
    tasks       verifiable tasks addressed by index (addition, arithmetic, gsm8k; jsonl/parquet files)
    recipes     rewards composed from the config, length shaping, group filters, adaptive KL
    models      Hugging Face models, a tiny Llama + character tokenizer, SmolLM2 from GGUF
    rollout     HF generate with the sampler's log-probs; an optional colocated vLLM engine
    policy      Policy: backbone -> last hidden -> fused policy loss (+ value head), never full logits
    checkpoint  atomic safetensors checkpoints, exact resume
    metrics     metrics.jsonl, tqdm, TensorBoard, curves.png
    distributed torchrun: DDP/gloo on CPU, FSDP2 on CUDA

Needs ``transformers`` and ``safetensors`` (``pip install transformers safetensors``); tqdm, pyyaml,
tensorboard and matplotlib are used when installed.
"""
from pyrl.train.config import TrainConfig, apply_overrides, load_config
from pyrl.train.loop import train
from pyrl.train.policy import Policy
from pyrl.train.presets import PRESETS, get_preset

__all__ = ["PRESETS", "Policy", "TrainConfig", "apply_overrides", "get_preset", "load_config", "train"]
