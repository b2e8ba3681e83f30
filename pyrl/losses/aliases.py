"""The loss names of Liger-Kernel/TRL and verl, and what each one is in pyrl (docs/formulas.md §12).

One table per client family, read by ``pyrl.nn.FusedLinearGRPOLoss`` (every Liger ``loss_type``),
``pyrl.integrations.trl`` (the TRL ``loss_type`` names it supports, a subset) and
``pyrl.integrations.verl`` (the ``loss_mode`` names it registers):

* ``LIGER_LOSS_TYPES``: Liger/TRL ``loss_type`` -> :class:`LigerLossType`, in Liger's order;
  ``TRL_LOSS_TYPES`` the names ``PyrlGRPOTrainer`` accepts.
* ``VERL_LOSS_MODES``: pyrl's verl ``loss_mode`` -> :class:`VerlLossMode`.

``liger_config_kwargs`` and ``verl_config_kwargs`` turn a row and the client's arguments into the
loss-specific ``PolicyLossConfig`` keyword arguments. They set only the fields the pyrl loss owns
(its registration's ``params``, see ``pyrl.losses``): the clip range for ``ppo``/``cispo``/``gspo``,
``delta`` for ``ppo``, the SAPO temperatures for ``sapo``. The KL, entropy and temperature fields
are the same for every loss and are left to the caller, as are the clients' own argument checks
and error messages.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from pyrl.losses import get_policy_loss

__all__ = ["LigerLossType", "LIGER_LOSS_TYPES", "TRL_LOSS_TYPES", "liger_config_kwargs",
           "VerlLossMode", "VERL_LOSS_MODES", "VERL_KL_TYPES", "verl_config_kwargs"]


@dataclass(frozen=True)
class LigerLossType:
    """A Liger-Kernel/TRL ``loss_type`` as pyrl computes it.

    Attributes:
        name: the Liger/TRL name.
        loss_type: ``PolicyLossConfig.loss_type`` (the per-token surrogate).
        agg: ``PolicyLossConfig.agg``.
        global_normaliser: the denominator is the global valid-token count (Liger/TRL's
            ``num_items_in_batch`` or the all-reduced count, over the world size): dapo, cispo, vespo.
        token_level_only: sequence-level ratios (``importance_sampling_level="sequence"``) are
            refused, as Liger and TRL do: cispo, sapo, vespo.
        absolute_eps_high: ``epsilon_high`` is the absolute upper bound of the importance weight
            (so ``eps_high = epsilon_high - 1``, no lower bound): cispo.
        needs_max_completion_length: the constant normaliser ``B * max_completion_length``: dr_grpo.
        trl: ``pyrl.integrations.trl.PyrlGRPOTrainer`` supports it (vespo is Liger-only in pyrl).
    """

    name: str
    loss_type: str
    agg: str
    global_normaliser: bool = False
    token_level_only: bool = False
    absolute_eps_high: bool = False
    needs_max_completion_length: bool = False
    trl: bool = True

    @property
    def takes_delta(self) -> bool:
        """``delta`` (two-sided clipping) applies: the surrogate owns it (the PPO ratio only)."""
        return "delta" in get_policy_loss(self.loss_type).params


def _liger_table(*rows: LigerLossType) -> dict:
    return {row.name: row for row in rows}


LIGER_LOSS_TYPES = _liger_table(
    LigerLossType("grpo", "ppo", "seq-mean-token-mean"),
    LigerLossType("bnpo", "ppo", "token-mean"),
    LigerLossType("dr_grpo", "ppo", "seq-mean-token-sum-norm", needs_max_completion_length=True),
    LigerLossType("dapo", "ppo", "token-mean", global_normaliser=True),
    LigerLossType("cispo", "cispo", "token-mean", global_normaliser=True, token_level_only=True,
                  absolute_eps_high=True),
    LigerLossType("sapo", "sapo", "seq-mean-token-mean", token_level_only=True),
    LigerLossType("luspo", "ppo", "seq-mean-token-sum"),
    # VESPO's gamma weight (pyrl.losses.vespo) is the policy_weight of a REINFORCE term
    LigerLossType("vespo", "reinforce", "token-mean", global_normaliser=True, token_level_only=True, trl=False),
)
TRL_LOSS_TYPES = tuple(name for name, row in LIGER_LOSS_TYPES.items() if row.trl)


def liger_config_kwargs(row: LigerLossType, *, epsilon_low: Optional[float], epsilon_high: float,
                        importance_sampling_level: str = "token", delta: Optional[float] = None,
                        max_completion_length: Optional[int] = None, sapo_temperature_pos: float = 1.0,
                        sapo_temperature_neg: float = 1.05) -> dict:
    """The ``PolicyLossConfig`` keyword arguments of a Liger/TRL ``loss_type`` (its surrogate, clip
    range, ``delta``, SAPO temperatures, ratio level, aggregation and Dr.GRPO normaliser), from the
    Liger/TRL argument values. Arguments the surrogate does not own are dropped (``delta`` for
    cispo/sapo/vespo, the clip range for sapo/vespo, the temperatures for all but sapo); nothing is
    validated here beyond what ``PolicyLossConfig`` checks.
    """
    owned = get_policy_loss(row.loss_type).params
    kw = dict(loss_type=row.loss_type, agg=row.agg, ratio_level=importance_sampling_level)
    if "eps_high" in owned:
        if row.absolute_eps_high:
            kw.update(eps_low=None, eps_high=epsilon_high - 1.0)
        else:
            kw.update(eps_low=epsilon_low, eps_high=epsilon_high)
    if "delta" in owned:
        kw["delta"] = delta
    if "tau_pos" in owned:
        kw.update(tau_pos=sapo_temperature_pos, tau_neg=sapo_temperature_neg)
    if row.needs_max_completion_length:
        kw["max_completion_length"] = max_completion_length
    return kw


@dataclass(frozen=True)
class VerlLossMode:
    """A verl ``loss_mode`` that ``pyrl.integrations.verl`` registers.

    Attributes:
        name: the registered name.
        loss_type: ``PolicyLossConfig.loss_type``.
        agg: the aggregation verl forces for this mode, or ``None`` for verl's ``loss_agg_mode``.
        dual_clip: verl's ``clip_ratio_c`` (dual-clip PPO) applies, as in verl's ``vanilla``.
        verl_name: verl's own loss mode that this one reproduces.
        sequence_mean: verl returns the plain mean of per-sequence losses over the micro-batch
            (``torch.mean``, no ``global_batch_info``) and folds ``rollout_is_weights`` into one
            geometric-mean weight per sequence: geo_mean.
        verl_params: the ``policy_loss`` sub-config fields of verl's actor config this mode reads,
            each the ``PolicyLossConfig`` field of the same name.
    """

    name: str
    loss_type: str
    agg: Optional[str] = None
    dual_clip: bool = False
    verl_name: str = ""
    sequence_mean: bool = False
    verl_params: tuple = ()


VERL_LOSS_MODES = {row.name: row for row in (
    VerlLossMode("pyrl", "ppo", dual_clip=True, verl_name="vanilla"),
    VerlLossMode("pyrl_gspo", "gspo", verl_name="gspo"),
    VerlLossMode("pyrl_cispo", "cispo", verl_name="cispo"),
    VerlLossMode("pyrl_sapo", "sapo", agg="seq-mean-token-mean", verl_name="sapo"),
    # verl <= 0.8's gspo aggregates seq-mean-token-mean whatever loss_agg_mode says
    VerlLossMode("pyrl_gspo_seq", "gspo", agg="seq-mean-token-mean", verl_name="gspo"),
    VerlLossMode("pyrl_clip_cov", "clip_cov", verl_name="clip_cov",
                 verl_params=("clip_cov_ratio", "clip_cov_lb", "clip_cov_ub")),
    VerlLossMode("pyrl_kl_cov", "kl_cov", verl_name="kl_cov", verl_params=("kl_cov_ratio", "ppo_kl_coef")),
    VerlLossMode("pyrl_geo_mean", "geo_mean", agg="seq-mean-token-mean", verl_name="geo_mean", sequence_mean=True),
)}

# verl's kl_loss_type / kl_penalty names -> PolicyLossConfig.kl_type (docs/formulas.md §4.1)
VERL_KL_TYPES = {"kl": "k1", "k1": "k1", "abs": "abs", "mse": "k2", "k2": "k2", "low_var_kl": "k3", "k3": "k3",
                 "kl+": "k1+", "k1+": "k1+", "abs+": "abs+", "mse+": "k2", "k2+": "k2", "low_var_kl+": "k3+",
                 "k3+": "k3+", "full": "full"}


def verl_config_kwargs(mode: VerlLossMode, *, clip_ratio_low: float, clip_ratio_high: float,
                       clip_ratio_c: float = 3.0, tau_pos: float = 1.0, tau_neg: float = 1.05,
                       verl_params: Optional[dict] = None) -> dict:
    """The loss-specific ``PolicyLossConfig`` keyword arguments of a verl ``loss_mode`` from verl's
    actor config values: the clip range ``[1 - clip_ratio_low, 1 + clip_ratio_high]`` (cispo too:
    verl's cispo has both bounds), ``clip_ratio_c`` for dual-clip modes, ``tau_pos``/``tau_neg``
    for sapo, and the mode's ``verl_params`` found in ``verl_params`` (verl's ``policy_loss``
    sub-config; a missing or ``None`` one keeps verl's default). The aggregation is the caller's
    (it depends on verl's ``global_batch_info``)."""
    owned = get_policy_loss(mode.loss_type).params
    kw = dict(loss_type=mode.loss_type)
    for name in mode.verl_params:
        if (verl_params or {}).get(name) is not None:
            kw[name] = float(verl_params[name])
    if "eps_high" in owned:
        kw.update(eps_low=clip_ratio_low, eps_high=clip_ratio_high)
    if mode.dual_clip:
        kw["clip_ratio_c"] = clip_ratio_c
    if "tau_pos" in owned:
        kw.update(tau_pos=tau_pos, tau_neg=tau_neg)
    return kw
