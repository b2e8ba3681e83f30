"""``PolicyLossConfig``: every knob of the policy loss (docs/formulas.md §2-§6), validated once.

One frozen dataclass names the algorithm; the ops read it and never re-check it. Defaults give
PPO/GRPO with the DAPO token-mean normaliser, as in verl and TRL (``loss_type="dapo"`` there is
``loss_type="ppo", agg="token-mean"`` here):

    ========================  ============================================================
    paper / library name      PolicyLossConfig
    ========================  ============================================================
    PPO / GRPO (verl)         loss_type="ppo", agg="token-mean"
    GRPO (DeepSeekMath)       loss_type="ppo", agg="seq-mean-token-mean"
    DAPO clip-higher          loss_type="ppo", eps_high=0.28
    Dr.GRPO                   loss_type="ppo", agg="seq-mean-token-sum-norm",
                              max_completion_length=L
    GSPO                      loss_type="gspo" (eps ~ 3e-4 / 4e-4), agg="seq-mean-token-mean"
    CISPO (MiniMax-M1)        loss_type="cispo", eps_low=None, eps_high=...
    SAPO (Qwen)               loss_type="sapo", tau_pos=1.0, tau_neg=1.05
    INTELLECT-2               loss_type="ppo", delta=4.0
    dual-clip PPO             loss_type="ppo", clip_ratio_c=3.0
    TIS / MIS / IcePop        is_level="token"|"sequence", is_mode="truncate"|"mask"
    80/20 high-entropy        top_entropy_rho=0.2
    Clip-Cov / KL-Cov         loss_type="clip_cov" | "kl_cov" (Cui et al. 2025)
    GMPO                      loss_type="geo_mean", eps_low=eps_high=0.4 (log-ratio bounds)
    DisCO                     loss_type="disco", group_size=G (disco_tau=10: DisCO, None: DisCO-b)
    PACS                      loss_type="pacs", group_size=G, pacs_beta (advantage = the reward)
    Lp-Reg                    lp_reg_min_p=kappa, lp_reg_coef, lp_reg_rho (fused op only)
    sampler's distribution    top_k=..., top_p=..., min_p=... (docs/formulas.md §1.1)
    ========================  ============================================================
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, fields
from typing import Optional, Union

import torch

from pyrl._validate import check_number, check_sampler
from pyrl.losses import POLICY_LOSSES

__all__ = ["PolicyLossConfig"]

RATIO_LEVELS = ("token", "sequence")
KL_TYPES = (None, "k1", "k2", "k3", "abs", "k1+", "k2+", "k3+", "abs+", "full", "full_forward", "full_jsd")
# The exact full-vocabulary divergences to the reference head and their row maths
# (pyrl.kernels.reference.divergence_rows, docs/formulas.md §4 and §14).
EXACT_KL_KINDS = {"full": "reverse_kl", "full_forward": "forward_kl", "full_jsd": "jsd"}
AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
IS_LEVELS = (None, "token", "sequence")
IS_MODES = ("truncate", "mask")


def _allowed(values) -> str:
    return ", ".join(repr(v) for v in values)


def _number(field: str, x, **kw):
    return check_number(f"PolicyLossConfig.{field}", x, **kw)


def _choice(field: str, x, allowed) -> None:
    if x is not None and not isinstance(x, str):
        raise TypeError(f"PolicyLossConfig.{field} must be one of {_allowed(allowed)}, got {type(x).__name__} {x!r}")
    if x not in allowed:
        raise ValueError(f"PolicyLossConfig.{field} must be one of {_allowed(allowed)}, got {x!r}")


def _names(specs) -> str:
    return " or ".join(repr(s.name) for s in specs)


@dataclass(frozen=True)
class PolicyLossConfig:
    """What the policy loss computes; see docs/formulas.md §2-§6 for the formulas.

    Invalid values and invalid combinations raise ``TypeError``/``ValueError`` at construction,
    naming the field and what was expected.
    """

    loss_type: str = "ppo"
    """The per-token surrogate (docs/formulas.md §3), by registered name.

    ``"ppo"``: the clipped surrogate (Schulman 2017), also GRPO/DAPO/Dr.GRPO/BNPO, which differ
    only in ``agg`` and ``eps_*``. ``"gspo"``: ``"ppo"`` with the sequence-level ratio (Zheng 2025,
    implies ``ratio_level="sequence"``). ``"cispo"``: REINFORCE weighted by the clipped, detached
    ratio (MiniMax-M1 2025). ``"sapo"``: a sigmoid gate instead of a hard clip (Qwen 2025).
    ``"reinforce"``: ``-A * logp``, no ratio. Functions registered with
    ``pyrl.register_policy_loss`` are accepted too; each loss owns and validates the fields it
    uses (``pyrl.losses``)."""

    eps_low: Optional[float] = 0.2
    """Lower clip: the ratio is clipped at ``1 - eps_low`` (``epsilon_low`` in TRL/Liger,
    ``clip_ratio_low`` in verl). ``>= 0``. ``None`` is allowed only for ``loss_type="cispo"`` and
    means no lower bound on the importance weight (the MiniMax-M1 setting)."""

    eps_high: float = 0.2
    """Upper clip: the ratio is clipped at ``1 + eps_high`` (``epsilon_high`` / ``clip_ratio_high``;
    DAPO's clip-higher uses 0.28). ``>= 0``. For ``cispo`` too the bound is ``1 + eps_high``
    (Liger/TRL's ``epsilon_high`` for cispo is the absolute bound, i.e. ``1 + eps_high`` here)."""

    delta: Optional[float] = None
    """Two-sided clipping (INTELLECT-2, TRL ``delta``): the ratio in the *unclipped* PPO term becomes
    ``min(r, delta)``, bounding the update when ``A < 0`` and the ratio is large. ``None`` (off) or a
    number ``> 1`` (usually ``> 1 + eps_high``, e.g. 4). Only for ``ppo``/``gspo``."""

    clip_ratio_c: Optional[float] = None
    """Dual-clip PPO (Ye et al. 2020, verl ``clip_ratio_c``): for ``A < 0`` the per-token loss is
    capped at ``-A * clip_ratio_c``. ``None`` (off) or a number ``> 1`` (verl uses 3). Only for
    ``ppo``/``gspo``."""

    ratio_level: str = "token"
    """``"token"``: ``r = exp(logp - logp_old)`` per token. ``"sequence"``: the GSPO ratio
    ``exp(mean_t log r)`` per sequence (docs/formulas.md §2; TRL/Liger ``importance_sampling_level``).
    ``loss_type="gspo"`` always uses ``"sequence"`` (see ``effective_ratio_level``)."""

    kl_type: Optional[str] = None
    """KL-to-reference estimator (docs/formulas.md §4, Schulman's k1/k2/k3 notation): ``None``, ``"k1"``,
    ``"k2"``, ``"k3"`` (low variance; TRL/Liger/verl ``low_var_kl``), or an exact divergence over the
    whole vocabulary, only computable by ``fused_linear_policy_loss`` from reference hidden states:
    ``"full"`` (reverse ``KL(p || p_ref)``), ``"full_forward"`` (forward ``KL(p_ref || p)``) or
    ``"full_jsd"`` (the Jensen-Shannon divergence, mixing weight 1/2; docs/formulas.md §14).
    ``"abs"`` (``|d|``) and the straight-through ``"k1+"``, ``"k2+"``, ``"k3+"`` (the value of k1/k2/k3
    with the gradient of k2, verl's ``k3+``; ``"abs+"`` likewise) are verl's further ``kl_loss_type`` modes.
    ``None`` with ``beta > 0`` means ``"k3"``, the TRL/Liger estimator (``effective_kl_type``). A
    ``kl_type`` with ``beta == 0`` is computed for the ``kl_mean`` metric only."""

    beta: float = 0.0
    """KL coefficient (``beta`` in TRL/Liger, ``kl_loss_coef`` in verl): ``beta * KL`` is added to
    every valid token's loss. ``>= 0``."""

    use_bias_correction_kl: bool = False
    """Multiply the per-token KL by the (differentiable) policy ratio ``r``, the importance-corrected
    unbiased estimator of DeepSeek-V3.2 (TRL ``use_bias_correction_kl``)."""

    entropy_coef: float = 0.0
    """Entropy bonus: ``entropy_coef * entropy`` is subtracted from every valid token's loss
    (verl ``entropy_coeff``). Any finite number; positive rewards exploration. Needs ``entropy``."""

    top_entropy_rho: float = 1.0
    """Keep only the highest-entropy fraction ``rho`` of the valid tokens in the policy term
    (Wang et al. 2025, "Beyond the 80/20 rule"; TRL ``top_entropy_quantile``). In ``(0, 1]``;
    ``1`` keeps every token. KL and entropy bonus still see every valid token."""

    agg: str = "token-mean"
    """How the masked per-token loss becomes a scalar (docs/formulas.md §6, verl ``loss_agg_mode``):
    ``"token-mean"`` ``sum(m*L) / sum(m)`` (DAPO, verl default; TRL/Liger ``dapo``/``bnpo``),
    ``"seq-mean-token-mean"`` ``mean_b(sum_t m*L / |y_b|)`` (GRPO paper, TRL ``grpo``),
    ``"seq-mean-token-sum"`` ``mean_b(sum_t m*L)``,
    ``"seq-mean-token-sum-norm"`` ``sum(m*L) / (B * max_completion_length)`` (Dr.GRPO)."""

    max_completion_length: Optional[int] = None
    """The constant normaliser of ``"seq-mean-token-sum-norm"`` (Dr.GRPO). ``None`` or an int
    ``> 0``; ``None`` uses ``T``, the padded completion length of the batch. Ignored by the other
    ``agg`` modes."""

    num_items_in_batch: Optional[Union[int, float, torch.Tensor]] = None
    """The global count of valid tokens (over gradient-accumulation micro-batches and data-parallel
    ranks), replacing the local ``sum(m)`` of ``"token-mean"``. The loss is then the *local* sum
    divided by the global count, so summing the losses of all micro-batches and ranks gives the
    global token mean (the HF Trainer convention). A number ``> 0`` or a 0-dim real tensor (its
    value is not checked, to avoid a device sync; a zero count gives loss 0). Only with
    ``agg="token-mean"``."""

    temperature: float = 1.0
    """Sampling temperature the logits are divided by before log-probs/entropy are taken
    (used by the fused ops; ``policy_loss`` receives log-probs already computed with it). ``> 0``."""

    is_level: Optional[str] = None
    """Rollout/train mismatch correction (docs/formulas.md §3, TIS: Yao et al. 2025; TRL
    ``vllm_importance_sampling_correction``): ``None`` (off), ``"token"`` (per-token weight
    ``exp(logp_old - logp_rollout)``) or ``"sequence"`` (the weight of the summed log ratio of the
    sequence, broadcast to its tokens). Needs ``rollout_logp``."""

    is_mode: str = "truncate"
    """``"truncate"`` (TIS): the weight is ``min(w, is_cap)``. ``"mask"`` (MIS / IcePop): tokens or
    sequences with ``w`` outside ``[is_min, is_cap]`` are dropped from the policy term and the others
    keep the weight ``w``."""

    is_cap: float = 2.0
    """Upper bound of the mismatch weight (TRL ``vllm_importance_sampling_cap``; IcePop uses 2).
    ``> 0``."""

    is_min: Optional[float] = None
    """Lower bound of the kept mismatch weight in ``is_mode="mask"`` (IcePop uses 0.5). ``None``
    means no lower bound, as TRL's ``*_mask`` modes. ``>= 0`` and ``< is_cap``; only with
    ``is_mode="mask"``."""

    tau_pos: float = 1.0
    """SAPO gate temperature for ``A > 0`` (TRL/Liger ``sapo_temperature_pos``). ``> 0``."""

    tau_neg: float = 1.05
    """SAPO gate temperature for ``A <= 0`` (TRL/Liger ``sapo_temperature_neg``). ``> 0``."""

    mastered_token_prob: Optional[float] = None
    """UloRL's masking of well-mastered positive tokens (docs/formulas.md §5.1): tokens with
    ``A > 0`` whose probability ``exp(logp)`` exceeds this are dropped from the policy term (they
    are learnt already; pushing them further only collapses the entropy). ``None`` (off) or a
    number in ``(0, 1)`` (UloRL uses 0.99). KL and entropy terms keep every token. Token-separable."""

    lp_reg_min_p: Optional[float] = None
    """Lp-Reg (docs/formulas.md §4.2): regularise the lowest-probability negative tokens towards the
    policy's min-p filtered proxy, ``p_proxy`` = ``p`` without the tokens below ``lp_reg_min_p``
    times the top probability, renormalised. ``None`` (off) or a number in ``(0, 1)``. Needs the
    full distribution: ``fused_linear_policy_loss`` only (one more walk over the head)."""

    lp_reg_coef: float = 1.0
    """Lp-Reg: the coefficient of ``KL(p_proxy || p)`` on the selected tokens. ``>= 0``."""

    lp_reg_rho: float = 0.01
    """Lp-Reg: the fraction of the negative-advantage tokens, those of lowest probability, that
    are regularised (Lp-Reg: 1%). In ``(0, 1]``."""

    clip_cov_ratio: Optional[float] = None
    """``clip_cov`` (docs/formulas.md §3.8): the fraction of valid tokens whose gradient the
    covariance clip may remove. ``None`` means verl's default 2e-4; else a number in ``(0, 1]``.
    Only for ``loss_type="clip_cov"``."""

    clip_cov_lb: Optional[float] = None
    """``clip_cov``: tokens are eligible when their covariance lies strictly between ``clip_cov_lb``
    and ``clip_cov_ub``. ``None`` means verl's default 1.0; ``-inf`` no lower bound. Only for
    ``loss_type="clip_cov"``."""

    clip_cov_ub: Optional[float] = None
    """``clip_cov``: the upper covariance bound (``None``: verl's default 5.0; ``inf``: none). Only for
    ``loss_type="clip_cov"``."""

    kl_cov_ratio: Optional[float] = None
    """``kl_cov`` (docs/formulas.md §3.9): the fraction of valid tokens, those of largest covariance,
    that get the ``|log r|`` penalty. ``None`` means verl's default 2e-4; else in ``(0, 1]``. Only for
    ``loss_type="kl_cov"``."""

    ppo_kl_coef: Optional[float] = None
    """``kl_cov``: the coefficient of the ``|log r|`` penalty (``None``: verl's default 1.0; else
    ``>= 0``). Only for ``loss_type="kl_cov"``."""

    group_size: Optional[int] = None
    """``pacs`` / ``disco`` (docs/formulas.md §3.11, §3.12): the completions per prompt, contiguous
    rows of the batch, that the loss compares. ``None``: the whole call is one group (the trainer
    sets ``rollout.group_size``). An int ``>= 1``; only for ``loss_type="pacs"`` or ``"disco"``."""

    pacs_beta: float = 1.0
    """``pacs``: the scale of the reward proxy ``beta * sum_t log r`` (docs/formulas.md §3.12). ``> 0``."""

    disco_score: str = "l_ratio"
    """``disco``: the completion score, ``"l_ratio"`` (mean token ratio ``r``) or ``"log_l"`` (mean
    token log-prob), docs/formulas.md §3.11."""

    disco_tau: Optional[float] = None
    """``disco``: ``None`` scores the negatives by their mean (DisCO-b); a number ``tau > 0`` by
    ``tau * log mean exp(s / tau)`` (DisCO; the paper uses 10). Only for ``loss_type="disco"``."""

    disco_delta: float = 1e-4
    """``disco``: the trust region, ``KL(pi_old || pi_theta) <= disco_delta`` (DisCO: 1e-4). ``>= 0``."""

    disco_beta: float = 1e3
    """``disco``: the squared-hinge penalty ``disco_beta * max(KL - disco_delta, 0)^2`` (DisCO: 1e3). ``>= 0``."""

    # the sampler's truncation (docs/formulas.md §1.1)
    top_k: Optional[int] = None
    """The sampler's top-k (docs/formulas.md §1.1): the fused ops take log-probs and entropy under the
    distribution renormalised over each row's ``top_k`` largest logits (after ``temperature``), so
    the new and old log-probs and the ratio are those of the distribution the rollout engine drew
    from. An int ``>= 1`` or ``None`` (off). Tokens outside the current policy's kept set
    (``logp = -inf``) are dropped from the policy and KL terms (metric ``outside_kept_frac``)."""

    top_p: Optional[float] = None
    """The sampler's top-p (nucleus; docs/formulas.md §1.1): keep the smallest top set whose
    probability reaches ``top_p``. In ``(0, 1]`` or ``None``; ``1`` keeps every token."""

    min_p: Optional[float] = None
    """The sampler's min-p (docs/formulas.md §1.1): keep the tokens with ``p >= min_p * p_max``. In
    ``[0, 1]`` or ``None``; ``0`` keeps every token."""

    sampler_order: str = "hf"
    """The order of the truncations: ``"hf"`` (HF ``generate``: top-k, top-p, min-p) or ``"vllm"``
    (vLLM v1: min-p, top-k, top-p); they differ only when both ``top_p`` and ``min_p`` are set."""

    def __post_init__(self) -> None:
        _choice("loss_type", self.loss_type, [s.name for s in POLICY_LOSSES.values()])  # registration order
        self._check_loss_params()
        _choice("ratio_level", self.ratio_level, RATIO_LEVELS)
        _choice("kl_type", self.kl_type, KL_TYPES)
        _number("beta", self.beta, low=0)
        if not isinstance(self.use_bias_correction_kl, bool):
            raise TypeError(f"PolicyLossConfig.use_bias_correction_kl must be a bool, "
                            f"got {type(self.use_bias_correction_kl).__name__} {self.use_bias_correction_kl!r}")

        _number("entropy_coef", self.entropy_coef)
        _number("top_entropy_rho", self.top_entropy_rho, low=0, high=1, low_open=True)
        _number("mastered_token_prob", self.mastered_token_prob, low=0, high=1, low_open=True, high_open=True,
                allow_none=True)

        _number("lp_reg_min_p", self.lp_reg_min_p, low=0, high=1, low_open=True, high_open=True, allow_none=True)
        _number("lp_reg_coef", self.lp_reg_coef, low=0)
        _number("lp_reg_rho", self.lp_reg_rho, low=0, high=1, low_open=True)

        _choice("agg", self.agg, AGG_MODES)
        mcl = self.max_completion_length
        if mcl is not None:
            if isinstance(mcl, bool) or not isinstance(mcl, numbers.Integral):
                raise TypeError(f"PolicyLossConfig.max_completion_length must be an int > 0 or None, "
                                f"got {type(mcl).__name__} {mcl!r}")
            if mcl <= 0:
                raise ValueError(f"PolicyLossConfig.max_completion_length must be > 0, got {mcl!r}")

        n = self.num_items_in_batch
        if n is not None:
            if isinstance(n, torch.Tensor):
                if n.dim() != 0:
                    raise ValueError(f"PolicyLossConfig.num_items_in_batch must be a 0-dim tensor, "
                                     f"got shape {list(n.shape)}")
                if n.dtype == torch.bool or n.is_complex():
                    raise TypeError(f"PolicyLossConfig.num_items_in_batch must be a real (int or float) "
                                    f"tensor, got dtype {str(n.dtype).replace('torch.', '')}")
            else:
                if isinstance(n, bool) or not isinstance(n, numbers.Real):
                    raise TypeError(f"PolicyLossConfig.num_items_in_batch must be a number > 0, a 0-dim "
                                    f"tensor or None, got {type(n).__name__} {n!r}")
                if not math.isfinite(n) or n <= 0:
                    raise ValueError(f"PolicyLossConfig.num_items_in_batch must be a finite number > 0, got {n!r}")
            if self.agg != "token-mean":
                raise ValueError(f"PolicyLossConfig.num_items_in_batch replaces the denominator of "
                                 f"agg='token-mean' only, got agg={self.agg!r}")

        _number("temperature", self.temperature, low=0, low_open=True)
        check_sampler(self.top_k, self.top_p, self.min_p, self.sampler_order, "PolicyLossConfig.")

        _choice("is_level", self.is_level, IS_LEVELS)
        _choice("is_mode", self.is_mode, IS_MODES)
        _number("is_cap", self.is_cap, low=0, low_open=True)
        _number("is_min", self.is_min, allow_none=True)
        if self.is_min is not None:
            if self.is_mode != "mask":
                raise ValueError(f"PolicyLossConfig.is_min applies to is_mode='mask' only, "
                                 f"got is_min={self.is_min!r} with is_mode={self.is_mode!r}")
            if not 0 <= self.is_min < self.is_cap:
                raise ValueError(f"PolicyLossConfig.is_min must be >= 0 and < is_cap={self.is_cap!r}, "
                                 f"got {self.is_min!r}")

    def _check_loss_params(self) -> None:
        """The loss-owned fields (docs/formulas.md §3): each is validated by the loss that declares
        it; a ``None``-default field may be set only with a loss that owns it; a field may be
        ``None`` only where the loss declares it nullable."""
        spec = POLICY_LOSSES.get(self.loss_type)
        specs = POLICY_LOSSES.values()
        checked = set()
        for other in [spec, *specs]:  # the chosen loss validates its own fields; the first owner the rest
            for name, check in other.params.items():
                if name not in checked:
                    checked.add(name)
                    check(f"PolicyLossConfig.{name}", getattr(self, name))
        for f in fields(self):
            owners = [o for o in specs if f.name in o.params]
            if not owners:
                continue  # a field every loss shares: validated in __post_init__
            value = getattr(self, f.name)
            if f.default is None and value is not None and f.name not in spec.params:
                raise ValueError(f"PolicyLossConfig.{f.name} applies to loss_type {_names(owners)} only, "
                                 f"got {f.name}={value!r} with loss_type={self.loss_type!r}")
            if f.default is not None and value is None and f.name not in spec.nullable:
                allowing = [o for o in specs if f.name in o.nullable]
                raise ValueError(f"PolicyLossConfig.{f.name} may be None only for loss_type={_names(allowing)}, "
                                 f"got None with loss_type={self.loss_type!r}")

    @property
    def truncates(self) -> bool:
        """Whether the log-probs are taken under a truncated sampler's distribution (top-k/p, min-p)."""
        return check_sampler(self.top_k, self.top_p, self.min_p, self.sampler_order) != (None, None, None,
                                                                                        self.sampler_order)

    @property
    def effective_ratio_level(self) -> str:
        """``"sequence"`` for ``loss_type="gspo"``, else ``ratio_level``."""
        return "sequence" if self.loss_type == "gspo" else self.ratio_level

    @property
    def effective_kl_type(self) -> Optional[str]:
        """``kl_type``, or ``"k3"`` (the TRL/Liger estimator) when ``beta > 0`` and ``kl_type`` is None."""
        if self.kl_type is None and self.beta > 0:
            return "k3"
        return self.kl_type

    @property
    def exact_kl(self) -> Optional[str]:
        """The divergence (``"reverse_kl"``, ``"forward_kl"`` or ``"jsd"``) of an exact ``kl_type``
        (``"full"``, ``"full_forward"``, ``"full_jsd"``), else None (a per-token estimator or none)."""
        return EXACT_KL_KINDS.get(self.kl_type)
