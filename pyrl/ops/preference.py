"""Preference optimisation straight from hidden states and the LM head (docs/formulas.md §13).

    hidden [2B, T, H] --(the fused log-prob walk, pyrl.ops.logprobs)--> logp [2B, T]
                      --(sum or mean over each completion's tokens)--> chosen, rejected [B]
                      --(pyrl.losses.preference: DPO family, SimPO, CPO, ORPO, KTO)--> loss

The per-token log-probs come from the log-prob op's own autograd Function on this call's plan
(every backend; ``[2B*T, V]`` logits never exist), so backward recomputes each chunk's logits once
(two passes, docs/formulas.md §10): a sequence's loss needs its whole sum before any token's
gradient is known. The reference model's log-probs are given, or computed from its hidden states
and head under ``no_grad`` on the same plan. The loss maths runs on ``[B]`` tensors in fp32 (fp64
for fp64 inputs).
"""
from __future__ import annotations

import numbers
from typing import NamedTuple, Optional

import torch

from pyrl._validate import (check_bool, check_chunk_bytes, check_float, check_linear_args, check_number,
                            check_positive, check_ref_model, check_same_device, check_shape, check_targets,
                            check_tensor, shape_str)
from pyrl.kernels.reference import RowParams, acc_dtype
from pyrl.losses.preference import PREFERENCE_LOSS_TYPES, REFERENCE_FREE_LOSS_TYPES, kto_loss, pair_loss
from pyrl.ops.logprobs import LinearCall, run_linear_logprobs
from pyrl.ops.plan import Plan, make_plan

__all__ = ["fused_linear_preference_loss", "plan_fused_linear_preference_loss", "sequence_logit_sums"]

# The losses whose papers score a completion by its mean token log-prob (Liger's defaults).
_MEAN_BY_DEFAULT = ("simpo", "orpo")


class _PreferenceCall(NamedTuple):
    """A validated ``fused_linear_preference_loss`` call and its plan."""

    plan: Plan
    targets: torch.Tensor        # [N, T] int64
    average: bool
    paired: bool


def _check_label_smoothing(loss_type: str, e) -> float:
    if loss_type == "robust":
        return check_number("label_smoothing", e, low=0.0, high=0.5, high_open=True)
    if loss_type == "exo_pair":
        return check_number("label_smoothing", e, low=0.0, high=1.0, low_open=True, high_open=True,
                            expect="in (0, 1) for loss_type='exo_pair' (the EXO paper uses 1e-3)")
    return check_number("label_smoothing", e, low=0.0, high=1.0)


def plan_fused_linear_preference_loss(hidden, weight, targets, *, bias=None, loss_type="sigmoid", beta=0.1,
                                      preference_labels=None, ref_logps=None, ref_hidden=None, ref_weight=None,
                                      ref_bias=None, average_log_prob=None, alpha=0.0, nll_targets=None,
                                      label_smoothing=0.0, gamma=0.5, discopop_tau=0.05, kl=None,
                                      desirable_weight=1.0, undesirable_weight=1.0, temperature=1.0,
                                      ignore_index=-100, backend="auto", chunk_bytes=None) -> _PreferenceCall:
    """Validate a ``fused_linear_preference_loss`` call and plan it."""
    if loss_type not in PREFERENCE_LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {PREFERENCE_LOSS_TYPES}, got {loss_type!r}")
    check_linear_args(hidden, weight, bias, temperature, ignore_index)
    if hidden.dim() != 3:
        raise ValueError(f"hidden must have shape [N, T, H], got {shape_str(hidden)}")
    N, T, _ = hidden.shape
    paired = loss_type != "kto"
    if paired and (N == 0 or N % 2):
        raise ValueError(f"hidden must stack B chosen then B rejected completions ([2B, T, H], B >= 1) for "
                         f"loss_type={loss_type!r}, got {N} sequences")
    targets = check_targets("targets", targets, (N, T), weight.shape[0], ignore_index)
    check_positive("beta", beta)
    _check_label_smoothing(loss_type, label_smoothing)
    check_number("gamma", gamma)
    check_positive("discopop_tau", discopop_tau)
    check_number("alpha", alpha)
    check_number("desirable_weight", desirable_weight, low=0.0)
    check_number("undesirable_weight", undesirable_weight, low=0.0)
    if average_log_prob is not None:
        check_bool("average_log_prob", average_log_prob)
    if chunk_bytes is not None:
        check_chunk_bytes(chunk_bytes)
    if not paired:
        if preference_labels is None:
            raise ValueError("loss_type='kto' needs preference_labels [B] (True: desirable completion)")
        check_tensor("preference_labels", preference_labels, dtypes=(torch.bool,))
        check_shape("preference_labels", preference_labels, (N,), "(one label per sequence of hidden)")
        if alpha != 0 or nll_targets is not None:
            raise ValueError("alpha/nll_targets (the NLL term on chosen completions) need a paired loss, not 'kto'")
        if kl is not None and not isinstance(kl, numbers.Real):
            check_float("kl", kl)
            if kl.dim() > 1 or (kl.dim() == 1 and kl.shape[0] not in (1, N)):
                raise ValueError(f"kl must be a number, a scalar tensor or shape [{N}], got {shape_str(kl)}")
        elif kl is not None:
            check_number("kl", kl)
    else:
        if preference_labels is not None or kl is not None:
            raise ValueError(f"preference_labels and kl belong to loss_type='kto', not {loss_type!r}")
        if nll_targets is not None:
            nll_targets = check_targets("nll_targets", nll_targets, (N, T), weight.shape[0], ignore_index)
    has_ref = ref_logps is not None or ref_hidden is not None
    if loss_type in REFERENCE_FREE_LOSS_TYPES and has_ref:
        raise ValueError(f"loss_type={loss_type!r} is reference-free: pass neither ref_logps nor ref_hidden")
    if ref_logps is not None and ref_hidden is not None:
        raise ValueError("pass ref_logps or ref_hidden/ref_weight, not both")
    if ref_logps is not None:
        check_float("ref_logps", ref_logps)
        if tuple(ref_logps.shape) not in ((N,), (N, T)):
            raise ValueError(f"ref_logps must have shape [{N}] (per sequence) or [{N}, {T}] (per token), "
                             f"got {shape_str(ref_logps)}")
    if ref_hidden is not None:
        check_ref_model(ref_hidden, ref_weight, ref_bias, (N, T), weight.shape[0], ignore_index)
    elif ref_weight is not None:
        raise ValueError("ref_weight was given without ref_hidden: pass both (or ref_logps)")
    check_same_device(hidden=hidden, weight=weight, bias=bias, targets=targets, ref_logps=ref_logps,
                      ref_hidden=ref_hidden, ref_weight=ref_weight, ref_bias=ref_bias,
                      preference_labels=preference_labels, nll_targets=nll_targets)
    plan = make_plan("fused_linear_preference_loss", device=hidden.device, dtype=hidden.dtype, n_rows=N * T,
                     vocab=weight.shape[0], hidden_size=weight.shape[1], backend=backend, chunk_bytes=chunk_bytes)
    average = loss_type in _MEAN_BY_DEFAULT if average_log_prob is None else average_log_prob
    return _PreferenceCall(plan, targets, average, paired)


def sequence_logit_sums(hidden: torch.Tensor, weight: torch.Tensor, bias=None) -> torch.Tensor:
    """``sum_t sum_v logits[n, t, v]`` per sequence ``[N]`` (a metric), without the logits:
    ``(sum_t h_t) . (sum_v W_v) + T sum_v b_v``."""
    acc = acc_dtype(hidden.dtype)
    with torch.no_grad():
        out = hidden.sum(1, dtype=acc) @ weight.sum(0, dtype=acc)
        return out if bias is None else out + hidden.shape[1] * bias.sum(dtype=acc)


def _token_logps(plan, hidden, weight, bias, targets, temperature, ignore_index):
    N, T, H = hidden.shape
    call = LinearCall(plan, hidden.reshape(N * T, H), weight, bias, targets.reshape(-1),
                      RowParams(float(temperature), ignore_index, False), (N, T))
    return run_linear_logprobs(call)[0].reshape(N, T)


def fused_linear_preference_loss(hidden, weight, targets, *, bias=None, loss_type="sigmoid", beta=0.1,
                                 preference_labels=None, ref_logps=None, ref_hidden=None, ref_weight=None,
                                 ref_bias=None, average_log_prob=None, alpha=0.0, nll_targets=None,
                                 label_smoothing=0.0, gamma=0.5, discopop_tau=0.05, kl=None, desirable_weight=1.0,
                                 undesirable_weight=1.0, temperature=1.0, ignore_index=-100, backend="auto",
                                 chunk_bytes=None):
    """A preference-optimisation loss from hidden states and the LM head. Returns ``(loss, outputs)``.

    Args:
        hidden: ``[2B, T, H]``: the ``B`` chosen completions, then the ``B`` rejected ones of the same
            prompts (Liger's layout); ``[B, T, H]`` for ``loss_type="kto"``. Row ``t`` is the state
            that predicts ``targets[:, t]``.
        weight: ``[V, H]`` LM head; ``bias`` optional ``[V]``.
        targets: ``[2B, T]`` (``[B, T]``) int64 completion ids; ``ignore_index`` marks prompt and padding.
        loss_type: ``"sigmoid"`` (DPO), ``"hinge"``, ``"ipo"``, ``"robust"``, ``"exo_pair"``,
            ``"nca_pair"``, ``"bco_pair"``, ``"sppo_hard"``, ``"apo_zero"``, ``"apo_down"``,
            ``"discopop"``, ``"simpo"``, ``"cpo"``, ``"orpo"`` or ``"kto"`` (docs/formulas.md §13).
        beta: > 0, the loss's temperature/strength (ORPO: the weight of the odds-ratio term).
        preference_labels: ``[B]`` bool, KTO only: True for a desirable completion.
        ref_logps: the reference model's log-probs, per sequence ``[2B]`` (reduced as the policy's:
            sums, or means with ``average_log_prob``) or per token ``[2B, T]`` (reduced here).
        ref_hidden, ref_weight, ref_bias: or the reference model's hidden states ``[2B, T, H_ref]``
            and head ``[V, H_ref]``, whose log-probs are computed here without gradient. With no
            reference at all the DPO family uses 0 (Liger's ``use_ref_model=False``).
        average_log_prob: score a completion by its mean token log-prob instead of the sum
            (default: True for ``simpo`` and ``orpo``, False otherwise, as Liger).
        alpha: weight of the NLL of the chosen completions (RPO; ORPO and CPO use 1):
            ``-sum(logp of chosen tokens) / (number of chosen tokens)``.
        nll_targets: ``[2B, T]`` other labels for the NLL term (its chosen half is used; Liger's
            ORPO ``nll_target``); default ``targets``.
        label_smoothing: ``robust``: in [0, 0.5); ``exo_pair``: in (0, 1); ``cpo``/``simpo``: in [0, 1].
        gamma: SimPO's target margin. ``discopop_tau``: DiscoPOP's modulation temperature.
        kl: KTO's reference point (a number, or a detached tensor ``[]``/``[B]``; see
            ``pyrl.losses.preference.kto_kl_baseline``); default 0.
        desirable_weight, undesirable_weight: KTO's class weights (TRL).
        temperature: > 0, divides the logits of both models.
        backend: ``"auto" | "triton" | "cpp" | "torch"``; chunk_bytes: fp32 logits per token chunk
            (an int, or ``"auto"`` from free memory, docs/scaling.md section 8).

    Returns:
        ``loss`` (a scalar: the mean over pairs, plus ``alpha * nll``; KTO: the mean over
        completions) and ``outputs``, a dict of detached tensors: ``chosen_logps``,
        ``rejected_logps``, ``chosen_rewards``, ``rejected_rewards`` ``[B]``, ``reward_accuracy``,
        ``reward_margin``, ``chosen_logits_mean``, ``rejected_logits_mean``, ``nll_loss`` (and for
        ORPO ``log_odds_ratio``, ``log_odds_chosen``); KTO: ``logps``, ``rewards`` ``[B]``, the
        sums ``chosen_logps_sum``, ``rejected_logps_sum``, ``chosen_logits_sum``,
        ``rejected_logits_sum``, ``chosen_rewards_sum``, ``rejected_rewards_sum``, and ``kl``. A
        completion with no tokens scores 0 and never produces NaN.
    """
    call = plan_fused_linear_preference_loss(
        hidden, weight, targets, bias=bias, loss_type=loss_type, beta=beta, preference_labels=preference_labels,
        ref_logps=ref_logps, ref_hidden=ref_hidden, ref_weight=ref_weight, ref_bias=ref_bias,
        average_log_prob=average_log_prob, alpha=alpha, nll_targets=nll_targets, label_smoothing=label_smoothing,
        gamma=gamma, discopop_tau=discopop_tau, kl=kl, desirable_weight=desirable_weight,
        undesirable_weight=undesirable_weight, temperature=temperature, ignore_index=ignore_index, backend=backend,
        chunk_bytes=chunk_bytes)
    plan, targets = call.plan, call.targets
    N, T, _ = hidden.shape
    valid = targets != ignore_index
    lengths = valid.sum(-1)

    def reduce(per_token):
        total = torch.where(valid, per_token, 0.0).sum(-1)
        return total / lengths.clamp(min=1).to(total.dtype) if call.average else total

    token_logp = _token_logps(plan, hidden, weight, bias, targets, temperature, ignore_index)
    logps = reduce(token_logp)
    ref = None
    if ref_hidden is not None:
        with torch.no_grad():
            ref = reduce(_token_logps(plan, ref_hidden.detach(), ref_weight.detach(),
                                      None if ref_bias is None else ref_bias.detach(), targets, temperature,
                                      ignore_index))
    elif ref_logps is not None:
        ref = ref_logps.detach().to(logps.dtype)
        ref = reduce(ref) if ref.dim() == 2 else ref
    logit_sums = sequence_logit_sums(hidden, weight, bias)

    if not call.paired:
        kl_t = None if kl is None else torch.as_tensor(kl, dtype=logps.dtype, device=logps.device).detach()
        losses, rewards = kto_loss(logps, preference_labels, ref_logps=ref, kl=kl_t, beta=beta,
                                   desirable_weight=desirable_weight, undesirable_weight=undesirable_weight)
        good, bad = preference_labels, ~preference_labels
        d = lambda x, m: torch.where(m, x.detach(), 0.0).sum()  # noqa: E731
        outputs = dict(logps=logps.detach(), rewards=rewards.detach(), chosen_logps_sum=d(logps, good),
                       rejected_logps_sum=d(logps, bad), chosen_logits_sum=d(logit_sums, good),
                       rejected_logits_sum=d(logit_sums, bad), chosen_rewards_sum=d(rewards, good),
                       rejected_rewards_sum=d(rewards, bad),
                       kl=torch.zeros((), dtype=logps.dtype) if kl_t is None else kl_t.mean())
        return losses.sum() / N, outputs

    B = N // 2
    if nll_targets is None:
        chosen_token_logp = token_logp[:B]
        chosen_valid = valid[:B]
    else:
        nll_t = nll_targets.long()[:B]
        chosen_token_logp = _token_logps(plan, hidden[:B], weight, bias, nll_t, temperature, ignore_index)
        chosen_valid = nll_t != ignore_index
    nll = -torch.where(chosen_valid, chosen_token_logp, 0.0).sum() / chosen_valid.sum().clamp(min=1)
    losses, r_w, r_l, extras = pair_loss(
        loss_type, logps[:B], logps[B:], ref_chosen_logps=None if ref is None else ref[:B],
        ref_rejected_logps=None if ref is None else ref[B:], beta=beta, label_smoothing=label_smoothing, gamma=gamma,
        discopop_tau=discopop_tau, chosen_lengths=lengths[:B], rejected_lengths=lengths[B:])
    loss = losses.mean() + alpha * nll if alpha != 0 else losses.mean()
    per_logit = B * T * weight.shape[0]
    outputs = dict(chosen_logps=logps[:B].detach(), rejected_logps=logps[B:].detach(), chosen_rewards=r_w.detach(),
                   rejected_rewards=r_l.detach(), reward_accuracy=(r_w > r_l).to(logps.dtype).mean().detach(),
                   reward_margin=(r_w - r_l).mean().detach(), chosen_logits_mean=logit_sums[:B].sum() / per_logit,
                   rejected_logits_mean=logit_sums[B:].sum() / per_logit, nll_loss=nll.detach())
    if "log_odds" in extras:
        log_odds = extras["log_odds"].detach()
        outputs.update(log_odds_ratio=torch.nn.functional.logsigmoid(log_odds).mean(),
                       log_odds_chosen=log_odds.mean())
    return loss, outputs
