"""verl: pyrl's policy loss in verl's policy-loss registry, and pyrl's fused log-prob kernel for verl's.

**Policy loss.** verl picks its actor loss by name (``actor_rollout_ref.actor.policy_loss.loss_mode``)
from the registry in ``verl.trainer.ppo.core_algos`` (``register_policy_loss``). Importing this
module registers, whenever verl is importable (now, or later when verl's ``core_algos`` is
first imported; verl itself is never needed to import this module):

    =============  ================================================================================
    loss_mode      what (verl's meaning of every argument kept)
    =============  ================================================================================
    pyrl           verl ``vanilla``: PPO clip (``clip_ratio``/``_low``/``_high``) + dual-clip
                   (``clip_ratio_c``, default 3), aggregated by ``loss_agg_mode``
    pyrl_gspo      verl ``gspo``: the sequence-level ratio, aggregated by ``loss_agg_mode``
    pyrl_cispo     verl ``cispo``: ``-sg(clip(r, 1 - low, 1 + high)) * A * logp``, ``loss_agg_mode``
    pyrl_sapo      verl ``sapo``: sigmoid gate (``tau_pos``, ``tau_neg``), always ``seq-mean-token-mean``
    pyrl_gspo_seq  verl <= 0.8 ``gspo``: as ``pyrl_gspo``, always ``seq-mean-token-mean``
    pyrl_clip_cov  verl ``clip_cov`` (``policy_loss.clip_cov_ratio/lb/ub``), ``loss_agg_mode``
    pyrl_kl_cov    verl ``kl_cov`` (``policy_loss.kl_cov_ratio``, ``ppo_kl_coef``), ``loss_agg_mode``
    pyrl_geo_mean  verl ``geo_mean`` (GMPO): the mean of the sequence losses over the micro-batch
    =============  ================================================================================

so a run switches with ``actor_rollout_ref.actor.policy_loss.loss_mode=pyrl`` and
``VERL_USE_EXTERNAL_MODULES=pyrl.integrations.verl`` (verl imports the modules named there in every
worker process, where the registry lives). Target: verl 0.9.1 (the signature is the same since 0.7)::

    fn(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean", config=None,
       rollout_is_weights=None) -> (pg_loss, {"actor/pg_clipfrac", "actor/ppo_kl", "actor/pg_clipfrac_lower"})

aggregated exactly as verl 0.9.1's ``agg_loss`` with ``config.global_batch_info`` (``dp_size``,
``batch_num_tokens``, ``global_batch_size``, ``loss_scale_factor``), all five modes (``token-mean``,
``token-sum``, ``seq-mean-token-mean``, ``seq-mean-token-sum``, ``seq-mean-token-sum-norm``).
verl 0.7 and verl main of January 2026 (0.8.0.dev) differ in ``seq-mean-token-sum-norm`` (there: the
token sum over ``loss_scale_factor``, not divided by the sequence count), and verl <= 0.6 returned
a 4-tuple: neither is supported.
The loss differs from verl's own only where verl divides by zero (pyrl returns 0, verl NaN) and
for GSPO log-ratios above 10 (verl clamps at 10, pyrl at 20).
``actor/pg_clipfrac`` is pyrl's ``clip_frac`` (tokens whose loss a clip bound decided; for ``pyrl``
this includes the dual-clip tokens that ``actor/pg_clipfrac_lower`` counts; for ``pyrl_clip_cov``
the PPO-clipped tokens too, where verl counts the covariance-selected ones only), except where
verl counts otherwise and pyrl follows it: ``pyrl_cispo`` (either bound, whatever the sign of
``A``) and ``pyrl_geo_mean`` (log-ratios outside the bounds, split by the sign of ``A`` into
``pg_clipfrac`` and ``pg_clipfrac_lower``). ``pyrl_kl_cov``'s ``actor/ppo_kl`` is the mean ``|log r|``.
``kl_penalty`` is verl's ``kl_penalty`` (all its names) on pyrl's KL estimators.

verl hands a policy loss log-probs, not hidden states: the registered functions are
``pyrl.policy_loss`` (the loss half of ``pyrl.fused_linear_policy_loss``). The other half is:

**Fused log-probs.** ``linear_cross_entropy`` has the signature of verl's fused kernel
``verl.utils.kernel.linear_cross_entropy.linear_cross_entropy`` (used with
``actor_rollout_ref.model.use_fused_kernels=True``) and computes it with
``pyrl.fused_linear_logprobs``; ``patch_linear_cross_entropy()`` swaps it in.
"""
from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from typing import Any, Optional

import torch

from pyrl.config import PolicyLossConfig
from pyrl.losses import get_policy_loss
from pyrl.losses.aliases import VERL_KL_TYPES, VERL_LOSS_MODES, verl_config_kwargs
from pyrl.losses.surrogates import ppo_clipped_flags
from pyrl.ops.logprobs import fused_linear_logprobs
from pyrl.ops.policy_loss import kl_estimate, policy_loss

__all__ = ["compute_policy_loss", "LOSS_MODES", "register", "kl_penalty", "linear_cross_entropy",
           "patch_linear_cross_entropy"]

VERL_CORE_ALGOS = "verl.trainer.ppo.core_algos"

# registered name -> (pyrl loss_type, the aggregation verl forces for it, or None for loss_agg_mode);
# the table itself, with what else each mode takes, is pyrl.losses.aliases.VERL_LOSS_MODES
# (docs/formulas.md §12).
LOSS_MODES = {name: (mode.loss_type, mode.agg) for name, mode in VERL_LOSS_MODES.items()}


def _get(config, name: str, default=None):
    """``config.name`` for verl's dataclass configs, ``config[name]`` for DictConfig/dicts."""
    if config is None:
        return default
    value = config.get(name, default) if isinstance(config, dict) else getattr(config, name, default)
    return default if value is None else value


def _clip_bounds(config) -> tuple[float, float]:
    clip = _get(config, "clip_ratio", 0.2)
    return float(_get(config, "clip_ratio_low", clip)), float(_get(config, "clip_ratio_high", clip))


def _aggregation(agg: str, mask: torch.Tensor, info: dict):
    """verl's ``agg_loss(..., **global_batch_info)`` as ``(pyrl config fields, factor)`` with
    ``verl loss = factor * pyrl loss`` (every mode is a linear map of the masked token losses)."""
    dp = info.get("dp_size") or 1
    B, T = mask.shape

    def tensor(x):
        return torch.as_tensor(x, dtype=torch.float32, device=mask.device).reshape(())

    if agg in ("token-mean", "token-sum"):
        if agg == "token-sum":  # sum * dp_size, i.e. the sum over the global batch after DP averaging
            tokens = 1.0
        else:
            tokens = info.get("batch_num_tokens")
            if tokens is None:
                if dp > 1:
                    raise ValueError("(global) batch_num_tokens is required when dp_size > 1")
                tokens = mask.sum()
        return {"agg": "token-mean", "num_items_in_batch": tensor(tokens) / dp}, 1.0
    if agg not in ("seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"):
        raise ValueError(f"Invalid loss_agg_mode: {agg!r}; verl's modes are token-mean, token-sum, "
                         f"seq-mean-token-mean, seq-mean-token-sum, seq-mean-token-sum-norm")
    # verl divides by the global (or local non-empty) sequence count and multiplies by dp_size; pyrl by B
    seqs = info.get("global_batch_size")
    if seqs is None:
        if dp > 1:
            raise ValueError("global_batch_size is required when dp_size > 1")
        seqs = (mask.sum(-1) > 0).sum()
    factor = B * dp / tensor(seqs).clamp(min=1)
    if agg == "seq-mean-token-mean":
        return {"agg": agg}, factor
    if agg == "seq-mean-token-sum-norm":  # seq-mean-token-sum / loss_scale_factor (default: T)
        factor = factor / (info.get("loss_scale_factor") or T)
    return {"agg": "seq-mean-token-sum"}, factor


def compute_policy_loss(old_log_prob: torch.Tensor, log_prob: torch.Tensor, advantages: torch.Tensor,
                        response_mask: torch.Tensor, loss_agg_mode: str = "token-mean", config: Any = None,
                        rollout_is_weights: Optional[torch.Tensor] = None, *,
                        loss_mode: str = "pyrl") -> tuple[torch.Tensor, dict[str, float]]:
    """A verl policy-loss function (verl >= 0.7 signature) computed by ``pyrl.policy_loss``.

    Args (verl's): ``old_log_prob``, ``log_prob``, ``advantages``, ``response_mask`` ``[B, T]``;
    ``loss_agg_mode`` one of verl's five modes (``token-sum`` and the four ``PolicyLossConfig.agg`` names);
    ``config`` verl's ``ActorConfig`` (or any object/dict with ``clip_ratio``, ``clip_ratio_low``,
    ``clip_ratio_high``, ``clip_ratio_c``, ``tau_pos``, ``tau_neg``, ``global_batch_info``);
    ``rollout_is_weights`` optional ``[B, T]`` rollout-correction weights on the policy term.
    ``loss_mode`` selects the row of ``LOSS_MODES`` (bound by ``register``).

    Returns ``(pg_loss, metrics)``: the loss aggregated as verl's ``agg_loss`` does with
    ``config.global_batch_info``, and verl's three metric names as floats.
    """
    mode = VERL_LOSS_MODES[loss_mode]
    agg = mode.agg or loss_agg_mode
    mask = response_mask.bool()
    info = dict(_get(config, "global_batch_info", None) or {})
    if mode.sequence_mean:  # verl: torch.mean over the micro-batch's per-sequence losses
        agg_fields, factor = {"agg": "seq-mean-token-mean"}, 1.0
        if rollout_is_weights is not None:
            rollout_is_weights = _sequence_geometric_mean(rollout_is_weights, mask)
    else:
        agg_fields, factor = _aggregation(agg, mask, info)
    low, high = _clip_bounds(config)
    sub = _get(config, "policy_loss", None)
    cfg = PolicyLossConfig(**verl_config_kwargs(
        mode, clip_ratio_low=low, clip_ratio_high=high, clip_ratio_c=float(_get(config, "clip_ratio_c", 3.0)),
        tau_pos=float(_get(config, "tau_pos", 1.0)), tau_neg=float(_get(config, "tau_neg", 1.05)),
        verl_params={name: _get(sub, name) for name in mode.verl_params}), **agg_fields)
    loss, metrics = policy_loss(log_prob, advantages, mask, old_logp=old_log_prob,
                                policy_weight=rollout_is_weights, config=cfg)
    loss = loss * factor

    with torch.no_grad():
        count = mask.sum().clamp(min=1)
        log_ratio = (log_prob.detach() - old_log_prob).float().clamp(-20.0, 20.0)
        ppo_kl = (torch.where(mask, -log_ratio, 0.0)).sum() / count
        lower = torch.zeros((), device=log_prob.device)
        clip_frac = metrics["clip_frac"]
        A = advantages.detach().float()
        A = A.unsqueeze(-1) if A.dim() == 1 else A
        if cfg.loss_type == "kl_cov":  # verl reports the mean |log r| for kl_cov
            ppo_kl = (torch.where(mask, log_ratio.abs(), 0.0)).sum() / count
        elif cfg.loss_type == "cispo":  # verl counts either bound, whatever the advantage's sign
            r = log_ratio.exp()
            clip_frac = (((r < 1.0 - cfg.eps_low) | (r > 1.0 + cfg.eps_high)) & mask).float().sum() / count
        elif cfg.loss_type == "geo_mean":  # verl: log r outside the bounds, split by the advantage's sign
            outside = ((log_ratio < -cfg.eps_low) | (log_ratio > cfg.eps_high)) & mask
            clip_frac = (outside & (A > 0)).float().sum() / count
            lower = (outside & (A < 0)).float().sum() / count
        if cfg.clip_ratio_c is not None:  # tokens where dual-clip capped the loss (verl's pg_clipfrac_lower)
            r = log_ratio.exp()
            # The registered surrogate flags the tokens a bound decided: the clip range's and, for A < 0,
            # the cap's. The cap binds only where the loss exceeds -A * clip_ratio_c > -A, never on a token
            # below 1 - clip_ratio_low, the only A < 0 tokens the clip range flags (verl has no delta):
            # the capped tokens are the flagged A < 0 ones that the clip range alone does not flag.
            _, flagged = get_policy_loss(cfg.loss_type).fn(log_prob.detach(), r, A, cfg)
            by_clip = ppo_clipped_flags(r, A, 1.0 - cfg.eps_low, 1.0 + cfg.eps_high, cfg.delta)
            capped = (A < 0) & flagged & ~by_clip & mask
            lower = capped.float().sum() / count
    return loss, {"actor/pg_clipfrac": float(clip_frac), "actor/ppo_kl": float(ppo_kl),
                  "actor/pg_clipfrac_lower": float(lower)}


def _sequence_geometric_mean(weights: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """verl's geo_mean weight per sequence: ``exp(sum_t m log(w + 1e-10) / (|y| + 1e-8))`` ``[B, 1]``."""
    w = weights.detach()
    if w.dim() == 1:
        w = w.unsqueeze(-1).expand(mask.shape)
    m = mask.to(w.dtype)
    log_w = torch.where(mask, (w + 1e-10).log(), 0.0)
    return ((log_w * m).sum(-1, keepdim=True) / (m.sum(-1, keepdim=True) + 1e-8)).exp()


def kl_penalty(logprob: torch.Tensor, ref_logprob: torch.Tensor, kl_penalty: str) -> torch.Tensor:
    """verl's ``core_algos.kl_penalty`` (per-token KL estimate ``[B, T]``) computed by pyrl's estimators
    (docs/formulas.md §4, §4.1), with verl's names (``VERL_KL_TYPES``: ``kl``/``k1``, ``abs``,
    ``mse``/``k2``, ``low_var_kl``/``k3`` and each with a trailing ``+``, the straight-through form).
    ``k3`` keeps verl's extra clamp of the estimate to ``[-10, 10]`` (pyrl's own ``k3`` only clamps the
    log-ratio to ``[-20, 20]``; docs/integrations.md lists the difference). ``full`` is refused, as
    verl refuses it (it needs the distributions, not log-probs).
    """
    if kl_penalty not in VERL_KL_TYPES:
        raise ValueError(f"kl_penalty must be one of {', '.join(map(repr, VERL_KL_TYPES))}, got {kl_penalty!r}")
    kl_type = VERL_KL_TYPES[kl_penalty]
    if kl_type == "full":
        raise NotImplementedError("kl_penalty='full' needs the two distributions over the vocabulary; use "
                                  "pyrl.fused_linear_policy_loss with kl_type='full' and the reference head")
    kl = kl_estimate(logprob, ref_logprob, kl_type)
    if kl_type == "k3":  # verl clamps the k3 estimate to [-10, 10] (no gradient beyond)
        return kl.clamp(-10.0, 10.0)
    if kl_type == "k3+":  # the clamped value, k2's gradient
        return kl + (kl.detach().clamp(-10.0, 10.0) - kl.detach())
    return kl


def _bound(loss_mode: str):
    def fn(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean", config=None,
           rollout_is_weights=None):
        return compute_policy_loss(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config,
                                   rollout_is_weights, loss_mode=loss_mode)

    fn.__name__ = f"compute_policy_loss_{loss_mode}"
    fn.__doc__ = f"verl policy loss {loss_mode!r}: pyrl.integrations.verl.compute_policy_loss(loss_mode={loss_mode!r})."
    return fn


def register(core_algos=None) -> list[str]:
    """Register ``LOSS_MODES`` in verl's policy-loss registry; return the names registered.

    ``core_algos`` defaults to ``verl.trainer.ppo.core_algos`` (imported). Idempotent.
    """
    if core_algos is None:
        core_algos = importlib.import_module(VERL_CORE_ALGOS)
    for name in LOSS_MODES:
        core_algos.register_policy_loss(name)(_bound(name))
    return list(LOSS_MODES)


class _RegisterOnImport(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Registers pyrl's losses right after verl's ``core_algos`` module is executed, so importing
    pyrl never imports verl (which is heavy) and the order of imports does not matter."""

    def find_spec(self, fullname, path, target=None):
        if fullname != VERL_CORE_ALGOS:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                self._loader = spec.loader
                spec.loader = self
                return spec
        return None

    def create_module(self, spec):
        return self._loader.create_module(spec) if hasattr(self._loader, "create_module") else None

    def exec_module(self, module):
        self._loader.exec_module(module)
        sys.meta_path[:] = [f for f in sys.meta_path if f is not self]
        register(module)


def _install() -> None:
    loaded = sys.modules.get(VERL_CORE_ALGOS)
    if loaded is not None:
        register(loaded)
    elif importlib.util.find_spec("verl") is not None and not any(isinstance(f, _RegisterOnImport)
                                                                 for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterOnImport())


_install()


# ------------------------------------------------------------------------------------------------
# The fused log-prob kernel
# ------------------------------------------------------------------------------------------------
class _PartialHiddenGrad(torch.autograd.Function):
    """Identity forward; backward divides by the group size. pyrl's vocab-parallel op returns the
    *full* ``d_hidden`` on every rank (identical on all), verl's kernel this rank's share, which the
    caller then sums over the tensor-parallel group: ``full / world`` summed ``world`` times is full."""

    @staticmethod
    def forward(ctx, hidden, world):
        ctx.world = world
        return hidden.view_as(hidden)

    @staticmethod
    def backward(ctx, grad):
        return grad / ctx.world, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                         temperature: float = 1.0, reduction: str = "none", dist_process_group=None):
    """Drop-in for verl's fused ``linear_cross_entropy``: ``(logprobs [N], entropy [N])`` fp32.

    ``hidden`` ``[..., H]`` is flattened to ``N`` rows and ``labels`` ``[...]`` to ``[N]``, as verl's
    kernel does. With ``dist_process_group`` (Megatron tensor parallelism) ``weight`` is this rank's
    vocabulary slice and ``labels`` are global ids; the gradient of ``hidden`` follows verl's
    convention (this rank's share, summed by the caller over the group). Only ``reduction="none"``.
    """
    if reduction != "none":
        raise ValueError(f"pyrl's linear_cross_entropy supports reduction='none' only (verl's default), "
                         f"got {reduction!r}")
    hidden2 = hidden.reshape(-1, hidden.shape[-1])
    if dist_process_group is not None:
        world = torch.distributed.get_world_size(dist_process_group)
        if world > 1:
            hidden2 = _PartialHiddenGrad.apply(hidden2, world)
    return fused_linear_logprobs(hidden2, weight, labels.reshape(-1), temperature=float(temperature),
                                 return_entropy=True, vocab_parallel_group=dist_process_group)


def patch_linear_cross_entropy() -> list[str]:
    """Make verl's fused-kernel path use ``linear_cross_entropy``; return the modules patched.

    Replaces ``verl.utils.kernel.linear_cross_entropy.linear_cross_entropy`` (looked up at call time
    by verl's Hugging Face model forwards) and the copies already bound by ``from ... import`` in
    loaded modules (verl's Megatron forwards). Call it in every worker before the models are built,
    e.g. from a module named in ``VERL_USE_EXTERNAL_MODULES``.
    """
    kernel = importlib.import_module("verl.utils.kernel.linear_cross_entropy")
    original = kernel.linear_cross_entropy
    patched = []
    for name, module in list(sys.modules.items()):
        if name.startswith("verl") and getattr(module, "linear_cross_entropy", None) is original:
            module.linear_cross_entropy = linear_cross_entropy
            patched.append(name)
    return patched
