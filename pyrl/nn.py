"""``torch.nn.Module`` forms of pyrl's ops, with the argument names users of Liger-Kernel/TRL know."""
from __future__ import annotations

import dataclasses
import math
import numbers
import warnings
from typing import Optional

import torch

from pyrl._backend import BACKENDS
from pyrl._validate import (NumberTypeError, check_bool, check_chunk_bytes, check_linear_args, check_number,
                            check_positive, shape_str)
from pyrl.config import EXACT_KL_KINDS, PolicyLossConfig
from pyrl.losses.aliases import LIGER_LOSS_TYPES, liger_config_kwargs
from pyrl.losses.vespo import vespo_log_weight, vespo_weight
from pyrl.ops.fused_policy_loss import fused_linear_policy_loss
from pyrl.ops.distill import fused_linear_distillation_loss
from pyrl.ops.logprobs import fused_linear_logprobs
from pyrl.ops.preference import fused_linear_preference_loss

__all__ = ["FusedLinearGRPOLoss", "FusedLinearLogProbs", "FusedLinearDPOLoss", "FusedLinearORPOLoss",
           "FusedLinearCPOLoss", "FusedLinearSimPOLoss", "FusedLinearKTOLoss", "FusedLinearJSDLoss"]


def _check_backend(backend: str, chunk_bytes=None) -> None:
    """The two engine arguments every module takes: ``backend`` and ``chunk_bytes`` (None: the
    device's default; an int; or ``"auto"``, sized from free memory: docs/scaling.md section 8)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(map(repr, BACKENDS))}, got {backend!r}")
    if chunk_bytes is not None:
        check_chunk_bytes(chunk_bytes)


class FusedLinearLogProbs(torch.nn.Module):
    """Module form of :func:`pyrl.fused_linear_logprobs`.

    ``forward(hidden [..., H], weight [V, H], targets [...], bias=None)`` returns ``logp [...]``
    (or ``(logp, entropy)`` when ``return_entropy=True``), never holding ``[N, V]`` logits.
    """

    def __init__(self, temperature: float = 1.0, ignore_index: int = -100, return_entropy: bool = False,
                 backend: str = "auto", chunk_bytes=None):
        super().__init__()
        # checked here, not only at the first forward, so a bad module fails where it is built
        check_positive("temperature", temperature)
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
            raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__} {ignore_index!r}")
        check_bool("return_entropy", return_entropy)
        _check_backend(backend, chunk_bytes)
        self.temperature = temperature
        self.ignore_index = ignore_index
        self.return_entropy = return_entropy
        self.backend, self.chunk_bytes = backend, chunk_bytes

    def forward(self, hidden, weight, targets, bias=None):
        return fused_linear_logprobs(hidden, weight, targets, bias=bias, temperature=self.temperature,
                                     ignore_index=self.ignore_index, return_entropy=self.return_entropy,
                                     backend=self.backend, chunk_bytes=self.chunk_bytes)

    def extra_repr(self) -> str:
        return (f"temperature={self.temperature}, ignore_index={self.ignore_index}, "
                f"return_entropy={self.return_entropy}, backend={self.backend!r}, chunk_bytes={self.chunk_bytes!r}")


# The Liger/TRL loss_type names and what each is in pyrl: pyrl.losses.aliases (docs/formulas.md §12).
_KL_TYPES = ("k1", "k2", "k3", "abs", "k1+", "k2+", "k3+", "abs+", "full", "full_forward", "full_jsd")


def _number(name: str, x, **kw) -> None:
    """``pyrl._validate.check_number``, except that a non-finite value is reported as a value that is
    not a finite number (``NumberTypeError``, a ``TypeError``), as this module always did."""
    if isinstance(x, numbers.Real) and not isinstance(x, bool) and not math.isfinite(x):
        raise NumberTypeError(f"{name} must be a finite number{' or None' if kw.get('allow_none') else ''}, "
                              f"got {type(x).__name__} {x!r}")
    check_number(name, x, **kw)


def _check_per_sequence(name: str, t, B: int, T: int, shapes: tuple) -> None:
    if t is None:
        return
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    allowed = {"B": (B,), "B1": (B, 1), "BT": (B, T)}
    if tuple(t.shape) not in [allowed[s] for s in shapes]:
        want = " or ".join("[" + ", ".join(str(d) for d in allowed[s]) + "]" for s in shapes)
        raise ValueError(f"{name} must have shape {want} (B={B}, T={T} from _input), got {shape_str(t)}")


class FusedLinearGRPOLoss(torch.nn.Module):
    """A drop-in for ``liger_kernel.chunked_loss.LigerFusedLinearGRPOLoss`` (Liger-Kernel 0.8.5),
    computed by :func:`pyrl.fused_linear_policy_loss`.

    The constructor takes Liger's arguments, in Liger's order, with Liger's defaults; ``forward`` takes
    Liger's arguments and returns Liger's ``(loss, metrics)``, with the same loss and gradients to
    float tolerance (``tests/test_nn_liger_parity.py`` checks it against Liger itself). pyrl adds
    keyword-only arguments: ``entropy_coef`` (entropy bonus), ``top_entropy_quantile`` (train only on
    the top-``rho`` highest-entropy tokens, TRL's name for ``PolicyLossConfig.top_entropy_rho``),
    ``kl_type`` (``"k1"``, ``"k2"``, ``"k3"`` (Liger's only estimator, the default), ``"abs"``, the
    straight-through ``"k1+"``/``"k2+"``/``"k3+"``/``"abs+"`` (docs/formulas.md §4.1), or ``"full"``,
    ``"full_forward"``, ``"full_jsd"``, the exact divergences over the vocabulary, which need
    ``ref_input``/``ref_weight``) and ``backend``.

    How each Liger ``loss_type`` maps onto :class:`pyrl.PolicyLossConfig` (the table is
    ``pyrl.losses.aliases.LIGER_LOSS_TYPES``, docs/formulas.md §12; ``N`` = valid tokens of the
    micro-batch, ``B`` = sequences, ``T`` = padded length, ``W`` = the world size):

    ===========  ===============================================  ==========================================
    loss_type    PolicyLossConfig                                 denominator of the summed token losses
    ===========  ===============================================  ==========================================
    grpo         ppo, agg="seq-mean-token-mean"                   ``|y_b|`` per sequence, then ``B``
    bnpo         ppo, agg="token-mean"                            ``N`` (``num_items_in_batch`` ignored)
    dr_grpo      ppo, agg="seq-mean-token-sum-norm",              ``B * max_completion_length`` (required)
                 max_completion_length
    dapo         ppo, agg="token-mean"                            ``max(num_items_in_batch / W, 1)``, else
                                                                  ``max(all-reduced N / W, 1)``
    cispo        cispo, eps_low=None, eps_high=epsilon_high - 1   as dapo
    sapo         sapo, tau_pos/neg = sapo_temperature_pos/neg     as grpo
    luspo        ppo, agg="seq-mean-token-sum"                    ``B`` (see the note below)
    vespo        reinforce, policy_weight = VESPO's gamma weight  as dapo
                 (``pyrl.losses.vespo.vespo_weight``)
    ===========  ===============================================  ==========================================

    The other arguments: ``epsilon_low``/``epsilon_high`` -> ``eps_low``/``eps_high`` (for ``cispo``,
    ``epsilon_high`` is the absolute upper bound of the importance weight, so it must be ``>= 1``, e.g.
    5.0, and ``epsilon_low`` is unused), ``importance_sampling_level`` -> ``ratio_level`` (GSPO),
    ``delta`` -> ``delta`` (``ppo`` only; ignored with a warning for cispo/sapo/vespo, as Liger ignores
    it), ``beta``/``use_bias_correction_kl``/``temperature`` -> the same fields, ``vllm_is_ratio`` ->
    ``policy_weight`` of ``fused_linear_policy_loss`` (multiplies the policy term, not the KL),
    ``num_items_in_batch`` -> ``num_items_in_batch`` (after Liger's ``/ W`` and clamp to ``>= 1``).
    ``compiled`` and ``chunk_size`` are accepted and ignored (pyrl's kernels chunk by themselves);
    pyrl's own keywords ``backend`` and ``chunk_bytes`` (the memory budget of one chunk of logits: None
    for the device's default, bytes, or ``"auto"`` from free memory, docs/scaling.md section 8) pass
    to ``fused_linear_policy_loss``.
    With ``use_ref_model=False`` the KL term is zero, as in Liger (which then takes the policy itself
    as the reference). ``ref_per_token_logps`` wins over ``ref_input``/``ref_weight`` when both are
    given (with Liger's warning), except for ``kl_type="full"``, which needs the reference head.

    ``metrics`` is Liger's tuple of detached 0-dim tensors: ``(kl_mean, clip_ratio)`` when
    ``beta != 0``, else ``(clip_ratio,)``. ``kl_mean`` is the mean over valid tokens of the per-token
    KL (times the ratio with ``use_bias_correction_kl``; 0 with ``use_ref_model=False``);
    ``clip_ratio`` the fraction of valid tokens with ``A > 0`` and ``r > 1 + epsilon_high`` or
    ``A < 0`` and ``r < 1 - epsilon_low`` (cispo: ``A > 0`` and ``r > epsilon_high``; always 0 for
    sapo and vespo). pyrl's full metrics dict of the last call (``entropy_mean``, ``ratio_mean``,
    ``ratio_max``, ...) is kept in ``self.last_metrics``.

    Where pyrl differs from Liger 0.8.5 on purpose (pinned by ``tests/test_nn_liger_parity.py``):

    * ``clip_ratio`` with ``delta``: pyrl also counts the tokens with ``A < 0`` and ``r > delta``,
      whose gradient ``delta`` cuts; Liger does not.
    * ``luspo`` follows TRL >= 1.10, ``sum_b sum_t m*L / B``. Liger equals it for sequence-level
      ratios with ``beta=0`` and a per-sequence ``vllm_is_ratio``; otherwise Liger sums ``|y_b| * L``
      over all ``T`` positions, padding included, and divides by ``B*T``, TRL's older formula.
    * ``use_bias_correction_kl`` with ``importance_sampling_level="sequence"``: the loss is Liger's,
      but pyrl's gradient of the corrected KL uses each token's own ratio (GSPO-token, docs/formulas.md §2),
      ``s_b * (d kl_t + kl_t d logp_t)``, where Liger differentiates the sequence ratio,
      ``s_b * (d kl_t + mean_t(kl) d logp_t)``.
    * ``vespo`` with a ``[B, T]`` ``vllm_is_ratio``: padded positions do not enter the sequence weight.
    * ``importance_sampling_level="sequence"`` with cispo, sapo or vespo is refused when the module
      is built (a ``ValueError`` naming the argument); Liger raises at the first ``forward``, with its
      own message.
    * ``k3`` at extreme log-ratios: pyrl clamps ``d = logp - logp_ref`` to ``[-20, 20]`` before the
      ``exp`` (so the KL stays finite, at most ``e^20 - 21`` per token, and has no gradient beyond);
      Liger does not clamp (``exp(27)`` is ``5.3e11`` per token, and ``inf`` in fp32 beyond ``d = -88``).
      verl clamps the estimate itself to 10 (docs/integrations.md has the three numbers).
    * ``kl_type`` accepts pyrl's other estimators too (``k1``, ``k2``, ``abs``, the straight-through
      ``k1+``/``k2+``/``k3+`` and ``full``); Liger has ``k3`` only (the default here).

    Cost note: VESPO with ``old_per_token_logps`` needs the current log-probs before the loss, so it
    runs one more forward sweep (no gradient) over the vocabulary.

    A sequence-level ratio with a per-token ``vllm_is_ratio [B, T]`` uses each sequence's mean ratio
    over its valid tokens, which gives exactly Liger's loss and gradient (Liger multiplies the
    sequence's loss by every token's ratio, and every aggregation weighs a sequence's tokens alike).
    """

    def __init__(
        self,
        beta: float = 0.04,
        compiled: bool = True,
        use_ref_model: bool = True,
        chunk_size: int = 1,
        epsilon_low: float = 0.2,
        epsilon_high: float = 0.2,
        loss_type: str = "dapo",
        max_completion_length: Optional[int] = None,
        importance_sampling_level: str = "token",
        sapo_temperature_pos: float = 1.0,
        sapo_temperature_neg: float = 1.05,
        temperature: float = 1.0,
        delta: Optional[float] = None,
        use_bias_correction_kl: bool = False,
        vespo_k_pos: float = 2.0,
        vespo_lambda_pos: float = 3.0,
        vespo_k_neg: float = 3.0,
        vespo_lambda_neg: float = 2.0,
        *,
        entropy_coef: float = 0.0,
        top_entropy_quantile: float = 1.0,
        kl_type: str = "k3",
        backend: str = "auto",
        chunk_bytes=None,
    ):
        super().__init__()
        if loss_type not in LIGER_LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {', '.join(map(repr, LIGER_LOSS_TYPES))}, got {loss_type!r}")
        alias = LIGER_LOSS_TYPES[loss_type]
        if importance_sampling_level not in ("token", "sequence"):
            raise ValueError(f"importance_sampling_level must be 'token' or 'sequence', "
                             f"got {importance_sampling_level!r}")
        if importance_sampling_level == "sequence" and alias.token_level_only:
            raise ValueError(f"importance_sampling_level='sequence' is not supported for loss_type={loss_type!r} "
                             f"(nor by Liger or TRL): use importance_sampling_level='token'")
        _number("beta", beta, low=0.0)
        for name, value in (("compiled", compiled), ("use_ref_model", use_ref_model),
                            ("use_bias_correction_kl", use_bias_correction_kl)):
            check_bool(name, value)
        try:
            check_number("chunk_size", chunk_size, low=1, integer=True)
        except ValueError:  # NumberTypeError (not an int) is a ValueError too
            raise ValueError(f"chunk_size must be an int >= 1, got {chunk_size!r}") from None
        _number("epsilon_low", epsilon_low, low=0.0)
        _number("epsilon_high", epsilon_high, low=0.0)
        if alias.absolute_eps_high and epsilon_high < 1:
            raise ValueError(
                f"loss_type={loss_type!r} reads epsilon_high as the absolute upper bound of the importance weight "
                f"(MiniMax-M1 and TRL use e.g. 5.0), so it must be >= 1; got epsilon_high={epsilon_high!r}, "
                f"which would shrink every token's weight below 1")
        if alias.needs_max_completion_length:
            try:
                check_number("max_completion_length", max_completion_length, low=0, low_open=True, integer=True)
            except ValueError:  # None, a bool, a float or <= 0
                raise ValueError(f"loss_type={loss_type!r} needs max_completion_length, an int > 0 (its constant "
                                 f"normaliser B * max_completion_length), got {max_completion_length!r}") from None
        _number("sapo_temperature_pos", sapo_temperature_pos, low=0.0, low_open=True)
        _number("sapo_temperature_neg", sapo_temperature_neg, low=0.0, low_open=True)
        _number("temperature", temperature, low=0.0, low_open=True)
        _number("delta", delta, allow_none=True)
        if delta is not None:
            if not alias.takes_delta:
                warnings.warn(f"delta={delta!r} is ignored for loss_type={loss_type!r} (it bounds the PPO ratio only), "
                              f"as in Liger", stacklevel=2)
                delta = None
            elif delta <= 1:
                raise ValueError(f"delta (two-sided clipping, INTELLECT-2) must be > 1, usually > 1 + epsilon_high "
                                 f"(e.g. 4), got {delta!r}")
        for name, value in (("vespo_k_pos", vespo_k_pos), ("vespo_lambda_pos", vespo_lambda_pos),
                            ("vespo_k_neg", vespo_k_neg), ("vespo_lambda_neg", vespo_lambda_neg)):
            _number(name, value)
        _number("entropy_coef", entropy_coef)
        _number("top_entropy_quantile", top_entropy_quantile, low=0, high=1, low_open=True,
                expect="in (0, 1] (the fraction of highest-entropy tokens kept)")
        if kl_type not in _KL_TYPES:
            raise ValueError(f"kl_type must be one of {', '.join(map(repr, _KL_TYPES))}, got {kl_type!r}")
        _check_backend(backend, chunk_bytes)

        # Liger's attribute names, for code that reads them.
        self.beta = beta
        self.compiled = compiled
        self.use_ref_model = use_ref_model
        self.chunk_size = chunk_size
        self.epsilon_low = epsilon_low
        self.epsilon_high = epsilon_high
        self.loss_type = loss_type
        self.max_completion_length = max_completion_length
        self.importance_sampling_level = importance_sampling_level
        self.sapo_temperature_pos = sapo_temperature_pos
        self.sapo_temperature_neg = sapo_temperature_neg
        self.temperature = temperature
        self.delta = delta
        self.use_bias_correction_kl = use_bias_correction_kl
        self.vespo_k_pos = vespo_k_pos
        self.vespo_lambda_pos = vespo_lambda_pos
        self.vespo_k_neg = vespo_k_neg
        self.vespo_lambda_neg = vespo_lambda_neg
        self.entropy_coef = entropy_coef
        self.top_entropy_quantile = top_entropy_quantile
        self.kl_type = kl_type
        self.backend, self.chunk_bytes = backend, chunk_bytes
        self.last_metrics: dict = {}

        # Without a reference model Liger takes the policy itself as the reference: the KL is 0.
        self._kl_on = beta != 0 and use_ref_model
        # The PolicyLossConfig this module computes; forward sets num_items_in_batch per call.
        self._alias = alias
        self.config = PolicyLossConfig(
            **liger_config_kwargs(alias, epsilon_low=epsilon_low, epsilon_high=epsilon_high,
                                  importance_sampling_level=importance_sampling_level, delta=delta,
                                  max_completion_length=max_completion_length,
                                  sapo_temperature_pos=sapo_temperature_pos,
                                  sapo_temperature_neg=sapo_temperature_neg),
            kl_type=kl_type if self._kl_on else None, beta=float(beta) if self._kl_on else 0.0,
            use_bias_correction_kl=use_bias_correction_kl, entropy_coef=entropy_coef,
            top_entropy_rho=top_entropy_quantile, temperature=temperature)

    def forward(self, _input, lin_weight, selected_token_ids, attention_mask, advantages, bias=None,
                ref_per_token_logps=None, old_per_token_logps=None, ref_input=None, ref_weight=None, ref_bias=None,
                vllm_is_ratio=None, num_items_in_batch=None):
        """Args (Liger's names and shapes):
            _input: ``[B, T, H]`` hidden states that predict ``selected_token_ids``.
            lin_weight: ``[V, H]`` LM head; ``bias`` optional ``[V]``.
            selected_token_ids: ``[B, T]`` sampled token ids; attention_mask: ``[B, T]`` 1 for
                completion tokens, 0 for padding.
            advantages: ``[B]`` (pyrl also takes ``[B, T]``, except for vespo).
            ref_per_token_logps, old_per_token_logps: ``[B, T]`` (constants).
            ref_input, ref_weight, ref_bias: the reference model's ``[B, T, H]`` hidden states and head,
                to compute the reference log-probs (or the exact KL with ``kl_type="full"``).
            vllm_is_ratio: ``[B]``, ``[B, 1]`` or ``[B, T]`` importance ratio of the rollout engine.
            num_items_in_batch: the global valid-token count (int, float or 0-dim tensor).

        Returns ``(loss, metrics)``: the 0-dim fp32 loss and Liger's metrics tuple (class docstring).
        """
        if not isinstance(_input, torch.Tensor) or _input.dim() != 3:
            got = shape_str(_input) if isinstance(_input, torch.Tensor) else type(_input).__name__
            raise ValueError(f"_input must be a [B, T, H] tensor, got {got}")
        B, T = _input.shape[:2]
        check_linear_args(_input, lin_weight, bias, self.temperature, -100, names=("_input", "lin_weight", "bias"))
        _check_per_sequence("selected_token_ids", selected_token_ids, B, T, ("BT",))
        _check_per_sequence("attention_mask", attention_mask, B, T, ("BT",))
        _check_per_sequence("advantages", advantages, B, T, ("B",) if self.loss_type == "vespo" else ("B", "BT"))
        _check_per_sequence("old_per_token_logps", old_per_token_logps, B, T, ("BT",))
        _check_per_sequence("ref_per_token_logps", ref_per_token_logps, B, T, ("BT",))
        _check_per_sequence("vllm_is_ratio", vllm_is_ratio, B, T, ("B", "B1", "BT"))
        if ref_input is not None and (not isinstance(ref_input, torch.Tensor) or ref_input.shape != _input.shape):
            got = shape_str(ref_input) if isinstance(ref_input, torch.Tensor) else type(ref_input).__name__
            raise ValueError(f"ref_input must have the shape of _input {shape_str(_input)}, got {got}")
        valid = attention_mask != 0

        ref_logp = ref_hidden = None
        if self._kl_on:
            full = self.kl_type in EXACT_KL_KINDS
            if ref_per_token_logps is not None and not full:
                if ref_input is not None:
                    warnings.warn("Both ref_per_token_logps and ref_input are provided. Using ref_per_token_logps.",
                                  stacklevel=2)
                ref_logp = ref_per_token_logps
            elif ref_input is not None:
                if ref_weight is None:
                    raise ValueError("ref_input was given without ref_weight: pass the reference model's LM head "
                                     "ref_weight [V, H] (and ref_bias if it has one)")
                ref_hidden = ref_input
            elif full:
                raise ValueError(f"kl_type={self.kl_type!r} (the exact KL over the vocabulary) needs ref_input [B, T, H] and "
                                 "ref_weight [V, H]; ref_per_token_logps is not enough")
            else:
                raise ValueError(f"beta={self.beta!r} with use_ref_model=True needs ref_per_token_logps [B, T] or "
                                 f"ref_input [B, T, H] with ref_weight [V, H]")

        if self.loss_type == "vespo":
            policy_weight = self._vespo_weight(_input, lin_weight, selected_token_ids, valid, advantages, bias,
                                               old_per_token_logps, vllm_is_ratio)
        else:
            policy_weight = vllm_is_ratio
            if policy_weight is not None and policy_weight.dim() == 2 and policy_weight.shape[1] == T \
                    and self.importance_sampling_level == "sequence":
                # Liger scales the sequence's loss by every token's ratio: the same as the sequence's
                # mean ratio on each token, the form whose gradient is the sequence ratio's.
                w = torch.where(valid, policy_weight.detach().float(), 0.0)
                policy_weight = w.sum(-1, keepdim=True) / valid.sum(-1, keepdim=True).clamp(min=1)

        config = self.config
        if self._alias.global_normaliser:
            count = _dapo_normaliser(attention_mask, num_items_in_batch)
            if count is not None:
                config = dataclasses.replace(config, num_items_in_batch=count)

        loss, metrics = fused_linear_policy_loss(
            _input, lin_weight, selected_token_ids, attention_mask, advantages, bias=bias,
            old_logp=old_per_token_logps, ref_logp=ref_logp, ref_hidden=ref_hidden,
            ref_weight=ref_weight if ref_hidden is not None else None,
            ref_bias=ref_bias if ref_hidden is not None else None,
            policy_weight=policy_weight, config=config, backend=self.backend, chunk_bytes=self.chunk_bytes)
        self.last_metrics = metrics
        if self.beta != 0:
            return loss, (metrics["kl_mean"], metrics["clip_frac"])
        return loss, (metrics["clip_frac"],)

    @torch.no_grad()
    def _vespo_weight(self, _input, lin_weight, targets, valid, advantages, bias, old_logp, vllm_is_ratio):
        """VESPO's detached per-sequence weight ``phi(w)`` ``[B, 1]`` (``pyrl.losses.vespo``), ``w`` the
        sequence's importance weight ``prod_t r_t`` times the rollout ratio. ``r_t`` needs the current
        log-probs: one more forward sweep over the vocabulary, without gradient."""
        log_ratio = None
        if old_logp is not None:
            logp = fused_linear_logprobs(_input.detach(), lin_weight.detach(), torch.where(valid, targets, -100),
                                         bias=None if bias is None else bias.detach(), temperature=self.temperature,
                                         backend=self.backend, chunk_bytes=self.chunk_bytes)
            log_ratio = logp - old_logp.float()
        log_w = vespo_log_weight(valid, log_ratio, vllm_is_ratio)
        return vespo_weight(log_w, advantages, k_pos=self.vespo_k_pos, lambda_pos=self.vespo_lambda_pos,
                            k_neg=self.vespo_k_neg, lambda_neg=self.vespo_lambda_neg)

    def extra_repr(self) -> str:
        return (f"loss_type={self.loss_type!r}, beta={self.beta}, epsilon_low={self.epsilon_low}, "
                f"epsilon_high={self.epsilon_high}, importance_sampling_level={self.importance_sampling_level!r}, "
                f"temperature={self.temperature}, backend={self.backend!r}, chunk_bytes={self.chunk_bytes!r}")


def _dapo_normaliser(attention_mask, num_items_in_batch):
    """Liger's denominator for dapo/cispo/vespo as a ``num_items_in_batch`` for the config:
    ``max(num_items_in_batch / W, 1)``, or ``max(all-reduced token count / W, 1)`` under
    ``torch.distributed`` (W ranks); ``None`` (the local count) on a single process."""
    dist = torch.distributed
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    if num_items_in_batch is not None:
        if isinstance(num_items_in_batch, torch.Tensor):
            if num_items_in_batch.dim() != 0 or num_items_in_batch.dtype == torch.bool \
                    or num_items_in_batch.is_complex():
                raise ValueError(f"num_items_in_batch must be a number or a 0-dim real tensor, got a "
                                 f"{str(num_items_in_batch.dtype).replace('torch.', '')} tensor of shape "
                                 f"{shape_str(num_items_in_batch)}")
            count = num_items_in_batch.to(device=attention_mask.device, dtype=torch.float32)
        elif isinstance(num_items_in_batch, bool) or not isinstance(num_items_in_batch, numbers.Real) \
                or not math.isfinite(num_items_in_batch):
            raise TypeError(f"num_items_in_batch must be a finite number or a 0-dim tensor, "
                            f"got {type(num_items_in_batch).__name__} {num_items_in_batch!r}")
        else:
            count = torch.tensor(float(num_items_in_batch), dtype=torch.float32, device=attention_mask.device)
    elif world > 1:
        count = (attention_mask != 0).sum().to(torch.float32)
        dist.all_reduce(count)
    else:
        return None
    return (count / world).clamp(min=1.0)


# --------------------------------------------------------------------------------------------
# Preference optimisation and distillation: drop-ins for liger_kernel.chunked_loss 0.8.5
# --------------------------------------------------------------------------------------------
# Liger's DPO module accepts these loss types (IPO is refused there: it needs completion lengths,
# which pyrl.fused_linear_preference_loss has; use the op for it).
LIGER_DPO_LOSS_TYPES = ("sigmoid", "hinge", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "apo_zero",
                        "apo_down", "discopop")


def _paired(module, loss_type, lin_weight, _input, target, bias, *, alpha, compute_nll_loss, extra=(), **kw):
    """Liger's paired return ``(loss, (chosen_logps, rejected_logps, chosen_logits_mean,
    rejected_logits_mean, nll_loss, chosen_rewards, rejected_rewards, *extra))``; the NLL term is
    computed (and weighted by ``alpha``) only with ``compute_nll_loss``, else reported as 0."""
    check_linear_args(_input, lin_weight, bias, 1.0, module.ignore_index, names=("_input", "lin_weight", "bias"))
    loss, out = fused_linear_preference_loss(_input, lin_weight, target, bias=bias, loss_type=loss_type,
                                             beta=module.beta, alpha=alpha if compute_nll_loss else 0.0,
                                             ignore_index=module.ignore_index, backend=module.backend,
                                             chunk_bytes=module.chunk_bytes, **kw)
    nll = out["nll_loss"] if compute_nll_loss else torch.zeros_like(out["nll_loss"])
    keys = ("chosen_logps", "rejected_logps", "chosen_logits_mean", "rejected_logits_mean")
    return loss, (*(out[k] for k in keys), nll, out["chosen_rewards"], out["rejected_rewards"],
                  *(out[k] for k in extra))


def _reference_model(use_ref_model, ref_input, ref_weight, ref_bias) -> dict:
    if not use_ref_model:
        return {}
    if ref_input is None or ref_weight is None:
        raise ValueError("use_ref_model=True needs ref_input [2B, T, H] and ref_weight [V, H] (the reference "
                         "model's hidden states and head)")
    return dict(ref_hidden=ref_input, ref_weight=ref_weight, ref_bias=ref_bias)


class FusedLinearDPOLoss(torch.nn.Module):
    """A drop-in for ``liger_kernel.chunked_loss.LigerFusedLinearDPOLoss`` (Liger-Kernel 0.8.5),
    computed by :func:`pyrl.fused_linear_preference_loss` (docs/formulas.md §13).

    The same constructor (arguments, order, defaults, checks), ``forward(lin_weight, _input, target,
    bias=None, ref_input=None, ref_weight=None, ref_bias=None)`` with ``_input`` ``[2B, T, H]`` (the
    chosen completions, then the rejected ones) and the same return ``(loss, (chosen_logps,
    rejected_logps, chosen_logits_mean, rejected_logits_mean, nll_loss, chosen_rewards,
    rejected_rewards))``. ``compiled`` and ``chunk_size`` are accepted and ignored; ``backend`` and
    ``chunk_bytes`` (as :class:`FusedLinearGRPOLoss`; every module here takes both) are pyrl's.
    With ``use_ref_model=True`` the reference's ``ref_input``/``ref_weight`` are required.
    """

    def __init__(self, ignore_index: int = -100, beta: float = 0.1, alpha: float = 1.0,
                 compute_nll_loss: bool = False, compiled: bool = True, use_ref_model: bool = True,
                 average_log_prob: bool = False, chunk_size: int = 1, loss_type: str = "sigmoid",
                 label_smoothing: float = 0.0, discopop_tau: float = 0.05, *, backend: str = "auto",
                 chunk_bytes=None):
        super().__init__()
        if loss_type not in LIGER_DPO_LOSS_TYPES:
            raise ValueError(f"Unsupported loss_type: {loss_type}. Supported types are: {set(LIGER_DPO_LOSS_TYPES)}")
        if loss_type == "exo_pair" and label_smoothing <= 0.0:
            raise ValueError("label_smoothing must be > 0 for loss_type='exo_pair'. The EXO paper recommends 1e-3.")
        if loss_type == "robust" and not (0.0 <= label_smoothing < 0.5):
            raise ValueError(f"label_smoothing must lie in [0.0, 0.5) for loss_type='robust'. Got {label_smoothing}.")
        _check_backend(backend, chunk_bytes)
        self.chunk_bytes = chunk_bytes
        self.ignore_index, self.beta, self.alpha = ignore_index, beta, alpha
        self.compute_nll_loss, self.compiled, self.use_ref_model = compute_nll_loss, compiled, use_ref_model
        self.average_log_prob, self.chunk_size, self.loss_type = average_log_prob, chunk_size, loss_type
        self.label_smoothing, self.discopop_tau, self.backend = label_smoothing, discopop_tau, backend

    def forward(self, lin_weight, _input, target, bias=None, ref_input=None, ref_weight=None, ref_bias=None):
        return _paired(self, self.loss_type, lin_weight, _input, target, bias, alpha=self.alpha,
                       compute_nll_loss=self.compute_nll_loss, average_log_prob=self.average_log_prob,
                       label_smoothing=self.label_smoothing, discopop_tau=self.discopop_tau,
                       **_reference_model(self.use_ref_model, ref_input, ref_weight, ref_bias))


class FusedLinearORPOLoss(torch.nn.Module):
    """A drop-in for ``liger_kernel.chunked_loss.LigerFusedLinearORPOLoss`` (Liger-Kernel 0.8.5):
    ``forward(lin_weight, _input, target, bias=None, nll_target=None)`` returns ``(loss,
    (chosen_logps, rejected_logps, chosen_logits_mean, rejected_logits_mean, nll_loss,
    chosen_rewards, rejected_rewards, log_odds_ratio, log_odds_chosen))``; the log-probs are per-token
    means, the NLL weight is 1 (docs/formulas.md §13). ``compiled``/``chunk_size`` are ignored."""

    def __init__(self, ignore_index: int = -100, beta: float = 0.1, compute_nll_loss: bool = True,
                 compiled: bool = True, chunk_size: int = 1, *, backend: str = "auto", chunk_bytes=None):
        super().__init__()
        _check_backend(backend, chunk_bytes)
        self.chunk_bytes = chunk_bytes
        self.ignore_index, self.beta, self.compute_nll_loss = ignore_index, beta, compute_nll_loss
        self.compiled, self.chunk_size, self.backend = compiled, chunk_size, backend

    def forward(self, lin_weight, _input, target, bias=None, nll_target=None):
        return _paired(self, "orpo", lin_weight, _input, target, bias, alpha=1.0,
                       compute_nll_loss=self.compute_nll_loss, extra=("log_odds_ratio", "log_odds_chosen"),
                       nll_targets=nll_target if self.compute_nll_loss else None)


class FusedLinearCPOLoss(torch.nn.Module):
    """A drop-in for ``liger_kernel.chunked_loss.LigerFusedLinearCPOLoss`` (Liger-Kernel 0.8.5):
    ``forward(lin_weight, _input, target, bias=None)`` returns Liger's 7-tuple as
    :class:`FusedLinearDPOLoss` does (docs/formulas.md §13). ``compiled``/``chunk_size`` are ignored."""

    def __init__(self, ignore_index: int = -100, beta: float = 0.1, alpha: float = 1.0,
                 label_smoothing: float = 0.0, compute_nll_loss: bool = True, compiled: bool = True,
                 average_log_prob: bool = False, chunk_size: int = 1, *, backend: str = "auto", chunk_bytes=None):
        super().__init__()
        _check_backend(backend, chunk_bytes)
        self.chunk_bytes = chunk_bytes
        self.ignore_index, self.beta, self.alpha, self.label_smoothing = ignore_index, beta, alpha, label_smoothing
        self.compute_nll_loss, self.compiled, self.average_log_prob = compute_nll_loss, compiled, average_log_prob
        self.chunk_size, self.backend = chunk_size, backend

    def forward(self, lin_weight, _input, target, bias=None):
        return _paired(self, "cpo", lin_weight, _input, target, bias, alpha=self.alpha,
                       compute_nll_loss=self.compute_nll_loss, label_smoothing=self.label_smoothing,
                       average_log_prob=self.average_log_prob)


class FusedLinearSimPOLoss(torch.nn.Module):
    """A drop-in for ``liger_kernel.chunked_loss.LigerFusedLinearSimPOLoss`` (Liger-Kernel 0.8.5):
    ``forward(lin_weight, _input, target, bias=None)`` returns Liger's 7-tuple as
    :class:`FusedLinearDPOLoss` does; the log-probs are per-token means (docs/formulas.md §13).
    ``compiled``/``chunk_size`` are ignored."""

    def __init__(self, ignore_index: int = -100, beta: float = 0.1, alpha: float = 1.0,
                 label_smoothing: float = 0.0, compute_nll_loss: bool = True, compiled: bool = True,
                 gamma: float = 0.5, chunk_size: int = 1, *, backend: str = "auto", chunk_bytes=None):
        super().__init__()
        _check_backend(backend, chunk_bytes)
        self.chunk_bytes = chunk_bytes
        self.ignore_index, self.beta, self.alpha, self.label_smoothing = ignore_index, beta, alpha, label_smoothing
        self.compute_nll_loss, self.compiled, self.gamma = compute_nll_loss, compiled, gamma
        self.chunk_size, self.backend = chunk_size, backend

    def forward(self, lin_weight, _input, target, bias=None):
        return _paired(self, "simpo", lin_weight, _input, target, bias, alpha=self.alpha,
                       compute_nll_loss=self.compute_nll_loss, label_smoothing=self.label_smoothing, gamma=self.gamma)


class FusedLinearKTOLoss(torch.nn.Module):
    """A drop-in for ``liger_kernel.chunked_loss.LigerFusedLinearKTOLoss`` (Liger-Kernel 0.8.5):
    ``forward(_input, lin_weight, target, bias=None, preference_labels=None, ref_input=None,
    ref_weight=None, ref_bias=None, kl=None)`` (the input first, as Liger) returns ``(loss,
    (chosen_logps_sum, rejected_logps_sum, chosen_logits_sum, rejected_logits_sum,
    chosen_rewards_sum, rejected_rewards_sum))`` (docs/formulas.md §13). ``compiled``/``chunk_size``
    are ignored."""

    def __init__(self, ignore_index: int = -100, beta: float = 0.1, compiled: bool = True,
                 use_ref_model: bool = False, average_log_prob: bool = False, chunk_size: int = 1, *,
                 backend: str = "auto", chunk_bytes=None):
        super().__init__()
        _check_backend(backend, chunk_bytes)
        self.chunk_bytes = chunk_bytes
        self.ignore_index, self.beta, self.compiled, self.use_ref_model = ignore_index, beta, compiled, use_ref_model
        self.average_log_prob, self.chunk_size, self.backend = average_log_prob, chunk_size, backend

    def forward(self, _input, lin_weight, target, bias=None, preference_labels=None, ref_input=None, ref_weight=None,
                ref_bias=None, kl=None):
        check_linear_args(_input, lin_weight, bias, 1.0, self.ignore_index, names=("_input", "lin_weight", "bias"))
        loss, out = fused_linear_preference_loss(
            _input, lin_weight, target, bias=bias, loss_type="kto", beta=self.beta,
            preference_labels=preference_labels, kl=kl, average_log_prob=self.average_log_prob,
            ignore_index=self.ignore_index, backend=self.backend, chunk_bytes=self.chunk_bytes,
            **_reference_model(self.use_ref_model, ref_input, ref_weight, ref_bias))
        keys = ("chosen_logps_sum", "rejected_logps_sum", "chosen_logits_sum", "rejected_logits_sum",
                "chosen_rewards_sum", "rejected_rewards_sum")
        return loss, tuple(out[k] for k in keys)


class FusedLinearJSDLoss(torch.nn.Module):
    """A drop-in for ``liger_kernel.chunked_loss.LigerFusedLinearJSDLoss`` (Liger-Kernel 0.8.5),
    computed by :func:`pyrl.fused_linear_distillation_loss` (docs/formulas.md §14).

    ``forward(student_input, student_weight, teacher_input, teacher_weight, true_labels,
    student_bias=None, teacher_bias=None)`` returns the loss, or ``(loss, soft_loss, hard_loss)``
    with ``return_soft_hard_loss=True``. ``beta`` is the generalised JSD's teacher weight: 0 gives
    the forward ``KL(teacher || student)``, 1 the reverse ``KL(student || teacher)``, as Liger.
    ``compiled``/``chunk_size`` are ignored. One difference: the teacher's vocabulary must be the
    student's (Liger pads a smaller student's logits with zeros; pyrl raises a ``ValueError``).
    """

    def __init__(self, weight_hard_loss: float = 0.5, weight_soft_loss: float = 0.5, beta: float = 0.5,
                 ignore_index: int = -100, temperature: float = 1.0, compiled: bool = True, chunk_size: int = 1024,
                 return_soft_hard_loss: bool = False, *, backend: str = "auto", chunk_bytes=None):
        super().__init__()
        check_positive("temperature", temperature)
        _number("beta", beta, low=0.0, high=1.0)
        _check_backend(backend, chunk_bytes)
        self.chunk_bytes = chunk_bytes
        self.weight_hard_loss, self.weight_soft_loss, self.beta = weight_hard_loss, weight_soft_loss, beta
        self.ignore_index, self.temperature, self.compiled = ignore_index, temperature, compiled
        self.chunk_size, self.return_soft_hard_loss, self.backend = chunk_size, return_soft_hard_loss, backend

    def forward(self, student_input, student_weight, teacher_input, teacher_weight, true_labels, student_bias=None,
                teacher_bias=None):
        divergence = {0.0: "forward_kl", 1.0: "reverse_kl"}.get(float(self.beta), "jsd")
        loss, out = fused_linear_distillation_loss(
            student_input, student_weight, teacher_input, teacher_weight, true_labels, student_bias=student_bias,
            teacher_bias=teacher_bias, divergence=divergence, beta=self.beta if divergence == "jsd" else 0.5,
            temperature=self.temperature, ignore_index=self.ignore_index, soft_weight=self.weight_soft_loss,
            hard_weight=self.weight_hard_loss, backend=self.backend, chunk_bytes=self.chunk_bytes)
        return (loss, out["soft_loss"], out["hard_loss"]) if self.return_soft_hard_loss else loss
