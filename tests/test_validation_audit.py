"""Input-validation audit: every public function rejects bad input with a clear ``ValueError`` or
``TypeError`` that names the offending argument, before any work (never a crash deep inside an op,
never a silent wrong answer).

Covered: ``pyrl.logprobs_from_logits``, ``pyrl.fused_linear_logprobs``, ``pyrl.policy_loss``,
``pyrl.fused_linear_policy_loss``, ``pyrl.PolicyLossConfig``, ``pyrl.nn.FusedLinearGRPOLoss``,
``pyrl.nn.FusedLinearLogProbs``, ``pyrl.advantages.compute`` / ``aggregate_rewards`` and the public
functions of ``pyrl.rewards``: wrong shapes, dtypes and types, devices (the ``meta`` device stands
in for a second device), out-of-range ids, invalid config combinations, missing inputs a config
needs (reference log-probs when ``beta > 0``, entropy, rollout log-probs), mismatched group
sizes, NaN/inf rewards. Each case is ``(call, exception type, regex the message must match)``;
the regex names the argument.
"""
import math

import pytest
import torch

import pyrl
from pyrl import advantages as A
from pyrl import rewards as R

B, T, H, V = 2, 3, 4, 7
META = torch.device("meta")


def _t(*shape, dtype=torch.float32, device="cpu"):
    return torch.randn(*shape, device=device).to(dtype) if device == "cpu" else torch.empty(*shape, dtype=dtype,
                                                                                            device=device)


# shared good inputs
logits = torch.randn(B * T, V)
y = torch.randint(0, V, (B * T,))
hidden = torch.randn(B, T, H)
weight = torch.randn(V, H)
targets = torch.randint(0, V, (B, T))
mask = torch.ones(B, T)
adv = torch.randn(B)
logp = -torch.rand(B, T)
Cfg = pyrl.PolicyLossConfig


def lfl(**kw):
    args = dict(logits=logits, targets=y)
    args.update(kw)
    return lambda: pyrl.logprobs_from_logits(args.pop("logits"), args.pop("targets"), **args)


def fll(**kw):
    args = dict(hidden=hidden.reshape(B * T, H), weight=weight, targets=y)
    args.update(kw)
    return lambda: pyrl.fused_linear_logprobs(args.pop("hidden"), args.pop("weight"), args.pop("targets"), **args)


def pl(**kw):
    args = dict(logp=logp, advantages=adv, mask=mask)
    args.update(kw)
    return lambda: pyrl.policy_loss(args.pop("logp"), args.pop("advantages"), args.pop("mask"), **args)


def flpl(**kw):
    args = dict(hidden=hidden, weight=weight, targets=targets, mask=mask, advantages=adv)
    args.update(kw)
    return lambda: pyrl.fused_linear_policy_loss(args.pop("hidden"), args.pop("weight"), args.pop("targets"),
                                                 args.pop("mask"), args.pop("advantages"), **args)


def grpo_module(**kw):
    return pyrl.nn.FusedLinearGRPOLoss(**kw)


def grpo_fwd(module_kw=None, **kw):
    module = pyrl.nn.FusedLinearGRPOLoss(**(module_kw or {"beta": 0.0}))
    args = dict(_input=hidden, lin_weight=weight, selected_token_ids=targets, attention_mask=mask, advantages=adv)
    args.update(kw)
    return lambda: module(**args)


def adv_call(name="grpo", rewards=None, group_size=2, **opts):
    r = torch.tensor([1.0, 0.0, 0.5, 0.5]) if rewards is None else rewards
    return lambda: A.compute(name, r, group_size=group_size, **opts)


oob = y.clone()
oob[2] = V
neg = y.clone()
neg[0] = -1
oob_bt = targets.clone()
oob_bt[1, 1] = V + 5

CASES = {
    # ---------------------------------------------------------------- logprobs_from_logits
    "lfl/logits-list": (lfl(logits=[[0.0, 1.0]]), TypeError, "logits must be a torch.Tensor"),
    "lfl/logits-int": (lfl(logits=torch.ones(B * T, V, dtype=torch.long)), TypeError, "logits must have dtype"),
    "lfl/logits-0d": (lfl(logits=torch.tensor(1.0)), ValueError, "logits must have at least 1 dim"),
    "lfl/logits-V0": (lfl(logits=torch.randn(B * T, 0)), ValueError, "logits must have a vocabulary dimension"),
    "lfl/targets-shape": (lfl(targets=y[:3]), ValueError, r"targets must have shape \[6\]"),
    "lfl/targets-float": (lfl(targets=y.float()), TypeError, "targets must have dtype"),
    "lfl/targets-list": (lfl(targets=y.tolist()), TypeError, "targets must be a torch.Tensor"),
    "lfl/targets-oob": (lfl(targets=oob), ValueError, r"targets must hold ids in \[0, 7\).*found 7"),
    "lfl/targets-neg": (lfl(targets=neg), ValueError, r"targets must hold ids in \[0, 7\).*found -1"),
    "lfl/temperature-0": (lfl(temperature=0.0), ValueError, "temperature must be a finite number > 0"),
    "lfl/temperature-nan": (lfl(temperature=math.nan), ValueError, "temperature must be"),
    "lfl/temperature-str": (lfl(temperature="1"), ValueError, "temperature must be"),
    "lfl/temperature-bool": (lfl(temperature=True), ValueError, "temperature must be"),
    "lfl/ignore_index-float": (lfl(ignore_index=-100.0), TypeError, "ignore_index must be an int"),
    "lfl/device": (lfl(targets=torch.zeros(B * T, dtype=torch.long, device=META)), ValueError,
                   "targets is on meta but logits is on cpu"),
    "lfl/backend": (lfl(backend="cuda"), ValueError, "backend must be one of"),
    "lfl/return_entropy-str": (lfl(return_entropy="yes"), TypeError, "return_entropy must be a bool"),
    "lfl/inplace_backward-int": (lfl(inplace_backward=2), TypeError, "inplace_backward must be a bool"),
    # ---------------------------------------------------------------- fused_linear_logprobs
    "fll/hidden-int": (fll(hidden=torch.ones(B * T, H, dtype=torch.long)), TypeError, "hidden must have dtype"),
    "fll/hidden-0d": (fll(hidden=torch.tensor(1.0)), ValueError, "hidden must have at least 1 dim"),
    "fll/weight-1d": (fll(weight=torch.randn(V)), ValueError, "weight must be 2-D"),
    "fll/weight-H": (fll(weight=torch.randn(V, H + 1)), ValueError, r"weight must have shape \[V, H\] with H"),
    "fll/weight-V0": (fll(weight=torch.randn(0, H)), ValueError, "weight must have at least one vocabulary row"),
    "fll/weight-dtype": (fll(weight=weight.double()), TypeError, "weight must have the dtype of hidden"),
    "fll/bias-shape": (fll(bias=torch.randn(V + 1)), ValueError, r"bias must have shape \[V\]"),
    "fll/bias-dtype": (fll(bias=torch.randn(V).half()), TypeError, "bias must have the dtype of hidden"),
    "fll/bias-list": (fll(bias=[0.0] * V), TypeError, "bias must be a torch.Tensor"),
    "fll/targets-shape": (fll(targets=targets), ValueError, r"targets must have shape \[6\]"),
    "fll/targets-oob": (fll(targets=oob), ValueError, r"targets must hold ids in \[0, 7\)"),
    "fll/temperature": (fll(temperature=-1.0), ValueError, "temperature must be a finite number > 0"),
    "fll/chunk_bytes-0": (fll(chunk_bytes=0), ValueError, "chunk_bytes must be a positive int"),
    "fll/chunk_bytes-bool": (fll(chunk_bytes=True), ValueError, "chunk_bytes must be a positive int"),
    "fll/chunk_bytes-float": (fll(chunk_bytes=1e6), ValueError, "chunk_bytes must be a positive int"),
    "fll/device-weight": (fll(weight=_t(V, H, device=META)), ValueError, "weight is on meta but hidden is on cpu"),
    "fll/device-bias": (fll(bias=_t(V, device=META)), ValueError, "bias is on meta but hidden is on cpu"),
    "fll/device-targets": (fll(targets=torch.zeros(B * T, dtype=torch.long, device=META)), ValueError,
                           "targets is on meta but hidden is on cpu"),
    "fll/group-type": (fll(vocab_parallel_group="world"), TypeError,
                       "vocab_parallel_group must be a torch.distributed.ProcessGroup"),
    "fll/backend": (fll(backend="gpu"), ValueError, "backend must be one of"),
    "fll/return_entropy-str": (fll(return_entropy="no"), TypeError, "return_entropy must be a bool"),
    # ---------------------------------------------------------------- policy_loss
    "pl/config-dict": (pl(config={"beta": 0.1}), TypeError, "config must be a PolicyLossConfig"),
    "pl/logp-1d": (pl(logp=logp[0]), ValueError, "logp must be 2-D"),
    "pl/logp-int": (pl(logp=logp.long()), TypeError, "logp must have dtype"),
    "pl/adv-shape": (pl(advantages=torch.randn(B + 1)), ValueError, r"advantages must have shape \[B\] or \[B, T\]"),
    "pl/adv-3d": (pl(advantages=torch.randn(B, T, 1)), ValueError, "advantages must have shape"),
    "pl/adv-int": (pl(advantages=torch.ones(B, dtype=torch.long)), TypeError, "advantages must have dtype"),
    "pl/mask-shape": (pl(mask=mask[:, :2]), ValueError, r"mask must have shape \[2, 3\]"),
    "pl/mask-list": (pl(mask=mask.tolist()), TypeError, "mask must be a torch.Tensor"),
    "pl/mask-complex": (pl(mask=mask.to(torch.complex64)), TypeError, "mask must be a bool, integer or float"),
    "pl/old-shape": (pl(old_logp=logp[:, :2]), ValueError, r"old_logp must have shape \[2, 3\]"),
    "pl/ref-missing": (pl(config=Cfg(beta=0.1)), ValueError, "ref_logp is required when config.beta > 0"),
    "pl/entropy-missing": (pl(config=Cfg(entropy_coef=0.01)), ValueError, "entropy is required"),
    "pl/entropy-missing-rho": (pl(config=Cfg(top_entropy_rho=0.5)), ValueError, "entropy is required"),
    "pl/rollout-missing": (pl(config=Cfg(is_level="token")), ValueError, "rollout_logp is required"),
    "pl/full-kl": (pl(ref_logp=logp, config=Cfg(beta=0.1, kl_type="full")), ValueError,
                   "kl_type='full' needs the reference model's full distribution"),
    "pl/device-adv": (pl(advantages=_t(B, device=META)), ValueError, "advantages is on meta but logp is on cpu"),
    "pl/device-mask": (pl(mask=_t(B, T, device=META)), ValueError, "mask is on meta but logp is on cpu"),
    "pl/device-ref": (pl(ref_logp=_t(B, T, device=META), config=Cfg(beta=0.1)), ValueError,
                      "ref_logp is on meta but logp is on cpu"),
    "pl/policy_weight-shape": (pl(policy_weight=torch.ones(B + 1)), ValueError, "policy_weight must have shape"),
    "pl/num_items-device": (pl(config=Cfg(num_items_in_batch=torch.tensor(3.0, device=META))), ValueError,
                            "num_items_in_batch is on meta"),
    # ---------------------------------------------------------------- fused_linear_policy_loss
    "flpl/config-dict": (flpl(config={}), TypeError, "config must be a pyrl.PolicyLossConfig"),
    "flpl/hidden-2d": (flpl(hidden=hidden[0]), ValueError, r"hidden must have shape \[B, T, H\]"),
    "flpl/weight-H": (flpl(weight=torch.randn(V, H + 2)), ValueError, r"weight must have shape \[V, H\]"),
    "flpl/targets-shape": (flpl(targets=targets[:, :1]), ValueError, r"targets must have shape \[2, 3\]"),
    "flpl/targets-oob": (flpl(targets=oob_bt), ValueError, r"targets must hold ids in \[0, 7\)"),
    "flpl/targets-float": (flpl(targets=targets.float()), TypeError, "targets must have dtype"),
    "flpl/mask-shape": (flpl(mask=mask[:1]), ValueError, r"mask must have shape \[2, 3\]"),
    "flpl/adv-shape": (flpl(advantages=torch.randn(B, T + 1)), ValueError, "advantages must have shape"),
    "flpl/ref-missing": (flpl(config=Cfg(beta=0.1)), ValueError, "ref_logp is required when config.beta > 0"),
    "flpl/full-kl-missing": (flpl(config=Cfg(beta=0.1, kl_type="full")), ValueError,
                             "kl_type='full' needs ref_hidden"),
    "flpl/ref_hidden-no-weight": (flpl(ref_hidden=hidden, config=Cfg(beta=0.1)), ValueError,
                                  "ref_hidden was given without ref_weight"),
    "flpl/ref_hidden-shape": (flpl(ref_hidden=hidden[:, :2], ref_weight=weight, config=Cfg(beta=0.1)), ValueError,
                              r"ref_hidden must have shape \[2, 3, H_ref\]"),
    "flpl/ref_weight-H": (flpl(ref_hidden=hidden, ref_weight=torch.randn(V, H + 1), config=Cfg(beta=0.1)),
                          ValueError, r"ref_weight must have shape \[V, H\] with H = ref_hidden.shape\[-1\]"),
    "flpl/ref_weight-V": (flpl(ref_hidden=hidden, ref_weight=torch.randn(V - 1, H), config=Cfg(beta=0.1)),
                          ValueError, r"ref_weight must have shape \[V, H_ref\]"),
    "flpl/ref_weight-dtype": (flpl(ref_hidden=hidden, ref_weight=weight.double(), config=Cfg(beta=0.1)),
                              TypeError, "ref_weight must have the dtype of ref_hidden"),
    "flpl/ref_bias-shape": (flpl(ref_hidden=hidden, ref_weight=weight, ref_bias=torch.randn(V + 1),
                                 config=Cfg(beta=0.1)), ValueError, r"ref_bias must have shape \[V\]"),
    "flpl/ref_weight-no-hidden": (flpl(ref_weight=weight, config=Cfg(beta=0.1, kl_type="full")), ValueError,
                                  "kl_type='full' needs ref_hidden"),
    "flpl/full-kl-ref-shape": (flpl(ref_hidden=hidden, ref_weight=torch.randn(V + 1, H),
                                    config=Cfg(beta=0.1, kl_type="full")), ValueError, "ref_weight must have shape"),
    "flpl/device-mask": (flpl(mask=_t(B, T, device=META)), ValueError, "mask is on meta but hidden is on cpu"),
    "flpl/device-targets": (flpl(targets=torch.zeros(B, T, dtype=torch.long, device=META)), ValueError,
                            "targets is on meta but hidden is on cpu"),
    "flpl/device-weight": (flpl(weight=_t(V, H, device=META)), ValueError, "weight is on meta but hidden is on cpu"),
    "flpl/device-ref_hidden": (flpl(ref_hidden=_t(B, T, H, device=META), ref_weight=weight, config=Cfg(beta=0.1)),
                               ValueError, "ref_hidden is on meta but hidden is on cpu"),
    "flpl/ignore_index": (flpl(ignore_index=None), TypeError, "ignore_index must be an int"),
    "flpl/ignore_index-in-vocab": (flpl(ignore_index=0), ValueError, r"ignore_index must lie outside the vocabulary"),
    "flpl/chunk_bytes": (flpl(chunk_bytes=-5), ValueError, "chunk_bytes must be a positive int"),
    "flpl/backend": (flpl(backend="fast"), ValueError, "backend must be one of"),
    # ---------------------------------------------------------------- PolicyLossConfig
    "cfg/loss_type": (lambda: Cfg(loss_type="ppo2"), ValueError, "loss_type must be one of"),
    "cfg/loss_type-type": (lambda: Cfg(loss_type=1), TypeError, "loss_type must be one of"),
    "cfg/eps_low-None": (lambda: Cfg(eps_low=None), ValueError, "eps_low may be None only for loss_type='cispo'"),
    "cfg/eps_high-neg": (lambda: Cfg(eps_high=-0.1), ValueError, "eps_high must be >= 0"),
    "cfg/eps_high-str": (lambda: Cfg(eps_high="0.2"), TypeError, "eps_high must be a finite number"),
    "cfg/delta": (lambda: Cfg(delta=1.0), ValueError, "delta must be > 1"),
    "cfg/delta-sapo": (lambda: Cfg(loss_type="sapo", delta=4.0), ValueError, "delta applies to loss_type"),
    "cfg/clip_c-cispo": (lambda: Cfg(loss_type="cispo", clip_ratio_c=3.0), ValueError, "clip_ratio_c applies"),
    "cfg/ratio_level": (lambda: Cfg(ratio_level="seq"), ValueError, "ratio_level must be one of"),
    "cfg/kl_type": (lambda: Cfg(kl_type="k4"), ValueError, "kl_type must be one of"),
    "cfg/beta-neg": (lambda: Cfg(beta=-0.1), ValueError, "beta must be >= 0"),
    "cfg/beta-nan": (lambda: Cfg(beta=math.nan), ValueError, "beta must be finite"),
    "cfg/beta-bool": (lambda: Cfg(beta=True), TypeError, "beta must be a finite number"),
    "cfg/bias_corr": (lambda: Cfg(use_bias_correction_kl=1), TypeError, "use_bias_correction_kl must be a bool"),
    "cfg/rho-0": (lambda: Cfg(top_entropy_rho=0.0), ValueError, r"top_entropy_rho must be in \(0, 1\]"),
    "cfg/rho-big": (lambda: Cfg(top_entropy_rho=1.5), ValueError, "top_entropy_rho must be in"),
    "cfg/agg": (lambda: Cfg(agg="mean"), ValueError, "agg must be one of"),
    "cfg/mcl-0": (lambda: Cfg(max_completion_length=0), ValueError, "max_completion_length must be > 0"),
    "cfg/mcl-float": (lambda: Cfg(max_completion_length=8.0), TypeError, "max_completion_length must be an int"),
    "cfg/num_items-0": (lambda: Cfg(num_items_in_batch=0), ValueError, "num_items_in_batch must be a finite"),
    "cfg/num_items-agg": (lambda: Cfg(num_items_in_batch=4, agg="seq-mean-token-mean"), ValueError,
                          "num_items_in_batch replaces the denominator"),
    "cfg/num_items-1d": (lambda: Cfg(num_items_in_batch=torch.ones(2)), ValueError,
                         "num_items_in_batch must be a 0-dim tensor"),
    "cfg/temperature": (lambda: Cfg(temperature=0), ValueError, "temperature must be > 0"),
    "cfg/is_level": (lambda: Cfg(is_level="seq"), ValueError, "is_level must be one of"),
    "cfg/is_mode": (lambda: Cfg(is_mode="clip"), ValueError, "is_mode must be one of"),
    "cfg/is_cap": (lambda: Cfg(is_cap=0.0), ValueError, "is_cap must be > 0"),
    "cfg/is_min-truncate": (lambda: Cfg(is_min=0.5), ValueError, "is_min applies to is_mode='mask'"),
    "cfg/is_min-cap": (lambda: Cfg(is_mode="mask", is_min=3.0), ValueError, "is_min must be >= 0 and < is_cap"),
    "cfg/tau": (lambda: Cfg(tau_neg=0.0), ValueError, "tau_neg must be > 0"),
    # ---------------------------------------------------------------- pyrl.nn
    "nn/loss_type": (lambda: grpo_module(loss_type="ppo"), ValueError, "loss_type must be one of"),
    "nn/beta": (lambda: grpo_module(beta=-1.0), ValueError, "beta must be >= 0"),
    "nn/dr_grpo-mcl": (lambda: grpo_module(loss_type="dr_grpo"), ValueError, "needs max_completion_length"),
    "nn/cispo-eps": (lambda: grpo_module(loss_type="cispo", epsilon_high=0.2), ValueError, "epsilon_high"),
    "nn/is-level": (lambda: grpo_module(importance_sampling_level="seq"), ValueError, "importance_sampling_level"),
    "nn/kl_type": (lambda: grpo_module(kl_type="k5"), ValueError, "kl_type must be one of"),
    "nn/backend": (lambda: grpo_module(backend="x"), ValueError, "backend must be one of"),
    "nn/temperature": (lambda: grpo_module(temperature=0.0), ValueError, "temperature must be > 0"),
    "nn/fwd-input-2d": (grpo_fwd(_input=hidden[0]), ValueError, r"_input must be a \[B, T, H\] tensor"),
    "nn/fwd-ids-shape": (grpo_fwd(selected_token_ids=targets[:, :1]), ValueError, "selected_token_ids must have"),
    "nn/fwd-mask-shape": (grpo_fwd(attention_mask=mask[:1]), ValueError, "attention_mask must have shape"),
    "nn/fwd-adv-shape": (grpo_fwd(advantages=torch.randn(B + 1)), ValueError, "advantages must have shape"),
    "nn/fwd-lin_weight-H": (grpo_fwd(lin_weight=torch.randn(V, H + 1)), ValueError,
                            r"lin_weight must have shape \[V, H\]"),
    "nn/fwd-lin_weight-dtype": (grpo_fwd(lin_weight=weight.double()), TypeError,
                                "lin_weight must have the dtype of _input"),
    "nn/fwd-bias-shape": (grpo_fwd(bias=torch.randn(V + 2)), ValueError, r"bias must have shape \[V\]"),
    "nn/fwd-ref-missing": (grpo_fwd(module_kw={"beta": 0.04}), ValueError, "needs ref_per_token_logps"),
    "nn/fwd-ref_input-shape": (grpo_fwd(module_kw={"beta": 0.04}, ref_input=hidden[:, :1], ref_weight=weight),
                               ValueError, "ref_input must have the shape of _input"),
    "nn/fwd-ref_input-no-weight": (grpo_fwd(module_kw={"beta": 0.04}, ref_input=hidden), ValueError,
                                   "ref_input was given without ref_weight"),
    "nn/fwd-num_items": (grpo_fwd(num_items_in_batch="8"), TypeError, "num_items_in_batch must be"),
    "nn/fwd-ids-oob": (grpo_fwd(selected_token_ids=oob_bt), ValueError, r"ids in \[0, 7\)"),
    "nn/fwd-device": (grpo_fwd(attention_mask=_t(B, T, device=META)), ValueError, "is on meta"),
    "nn/logprobs-temperature": (lambda: pyrl.nn.FusedLinearLogProbs(temperature=0.0), ValueError,
                                "temperature must be a finite number > 0"),
    "nn/logprobs-backend": (lambda: pyrl.nn.FusedLinearLogProbs(backend="gpu"), ValueError,
                            "backend must be one of"),
    "nn/logprobs-ignore_index": (lambda: pyrl.nn.FusedLinearLogProbs(ignore_index=1.5), TypeError,
                                 "ignore_index must be an int"),
    "nn/logprobs-fwd-weight": (lambda: pyrl.nn.FusedLinearLogProbs()(hidden, torch.randn(V, H + 1), targets),
                               ValueError, r"weight must have shape \[V, H\]"),
    # ---------------------------------------------------------------- advantages
    "adv/name": (adv_call(name="grpo2"), ValueError, "unknown advantage estimator 'grpo2'"),
    "adv/rewards-list": (lambda: A.compute("grpo", [1.0, 0.0], group_size=2), TypeError,
                         "rewards must be a torch.Tensor"),
    "adv/rewards-int": (adv_call(rewards=torch.tensor([1, 0, 1, 1])), TypeError, "rewards must have dtype"),
    "adv/rewards-2d": (adv_call(rewards=torch.ones(2, 2)), ValueError, r"rewards must be a 1-D tensor"),
    "adv/rewards-empty": (adv_call(rewards=torch.ones(0)), ValueError, "rewards must hold at least one"),
    "adv/rewards-nan": (adv_call(rewards=torch.tensor([1.0, math.nan, 0.0, 0.0])), ValueError,
                        "rewards must be finite"),
    "adv/rewards-inf": (adv_call(rewards=torch.tensor([1.0, math.inf, 0.0, 0.0])), ValueError,
                        "rewards must be finite"),
    "adv/group-0": (adv_call(group_size=0), ValueError, "group_size must be a positive int"),
    "adv/group-bool": (adv_call(group_size=True), ValueError, "group_size must be a positive int"),
    "adv/group-float": (adv_call(group_size=2.0), ValueError, "group_size must be a positive int"),
    "adv/group-mismatch": (adv_call(group_size=3), ValueError, "group_size=3 does not divide the batch of 4"),
    "adv/option-unknown": (adv_call(beta=1.0), TypeError, "got an unexpected option 'beta'"),
    "adv/option-missing": (adv_call(name="remax"), TypeError, "needs option.*greedy_rewards"),
    "adv/option-shape": (adv_call(name="remax", greedy_rewards=torch.ones(3)), ValueError,
                         r"greedy_rewards must have shape \[4\]"),
    "adv/option-nan": (adv_call(name="remax", greedy_rewards=torch.tensor([1.0, math.nan, 0.0, 0.0])), ValueError,
                       "greedy_rewards must be finite"),
    "adv/option-device": (adv_call(name="remax", greedy_rewards=_t(4, device=META)), ValueError,
                          "greedy_rewards is on meta but rewards is on cpu"),
    "adv/mask-shape": (adv_call(mask=torch.ones(3, 5)), ValueError, r"mask must have shape \[B, T\] with B=4"),
    "adv/mask-device": (adv_call(mask=_t(4, 5, device=META)), ValueError, "mask is on meta"),
    "adv/values-T": (adv_call(name="gae", values=torch.ones(4, 5), mask=torch.ones(4, 6)), ValueError,
                     "must have shape"),
    "adv/scale": (adv_call(scale="std"), ValueError, "scale must be one of"),
    "adv/eps": (adv_call(eps=0.0), ValueError, "eps must be a finite number > 0"),
    "adv/gamma": (adv_call(name="gae", values=torch.ones(4, 5), gamma=1.5), ValueError, r"gamma must be a number"),
    "adv/lengths-neg": (adv_call(name="opo", lengths=torch.tensor([1.0, -1.0, 2.0, 2.0])), ValueError,
                        "lengths must be >= 0"),
    "adv/kl_coef-missing": (adv_call(name="reinforce_pp", mask=torch.ones(4, 3), kl=torch.ones(4, 3)), TypeError,
                            "needs option kl_coef"),
    "adv/agg-shape": (lambda: A.aggregate_rewards(torch.ones(4), group_size=2), ValueError,
                      r"rewards must have shape \[B, K\]"),
    "adv/agg-nan": (lambda: A.aggregate_rewards(torch.tensor([[1.0, math.nan]] * 4), group_size=2), ValueError,
                    "rewards must be finite"),
    "adv/agg-weights": (lambda: A.aggregate_rewards(torch.ones(4, 2), [1.0], group_size=2), ValueError,
                        r"weights must have shape \[2\]"),
    "adv/agg-group": (lambda: A.aggregate_rewards(torch.ones(4, 2), group_size=3), ValueError,
                      "group_size=3 does not divide"),
    "adv/agg-mode": (lambda: A.aggregate_rewards(torch.ones(4, 2), group_size=2, mode="sum"), ValueError,
                     "mode must be one of"),
    # ---------------------------------------------------------------- rewards
    "rw/compute-name": (lambda: R.compute("nope", ["a"]), ValueError, "unknown reward 'nope'"),
    "rw/compute-str": (lambda: R.compute("format", "a completion"), TypeError, "completions must be a list"),
    "rw/compute-item": (lambda: R.compute("format", ["ok", 3]), TypeError, r"completions\[1\] must be a string"),
    "rw/compute-option": (lambda: R.compute("format", ["a"], foo=1), TypeError, "unexpected option 'foo'"),
    "rw/exact-gt-len": (lambda: R.compute("exact_match", ["a", "b"], ground_truth=["a"]), ValueError,
                        "ground_truth must have 2 entries"),
    "rw/format-pattern": (lambda: R.compute("format", ["a"], pattern="("), ValueError,
                          "pattern must be a valid regular expression"),
    "rw/extract-type": (lambda: R.extract_answer(42), TypeError, "text must be a string"),
    "rw/overlong-neg": (lambda: R.dapo_overlong_penalty(torch.tensor([-1, 2]), 16, 4), ValueError,
                        "lengths must be >= 0"),
    "rw/overlong-nan": (lambda: R.dapo_overlong_penalty(torch.tensor([math.nan, 2.0]), 16, 4), ValueError,
                        "lengths must be finite"),
    "rw/overlong-2d": (lambda: R.dapo_overlong_penalty(torch.ones(2, 2), 16, 4), ValueError,
                       r"lengths must have shape \[B\]"),
    "rw/overlong-cache": (lambda: R.dapo_overlong_penalty(torch.tensor([1, 2]), 4, 16), ValueError,
                          "cache_len must be <= max_len"),
    "rw/overlong-max": (lambda: R.dapo_overlong_penalty(torch.tensor([1, 2]), 0, 1), ValueError, "max_len must be"),
    "rw/dler-len": (lambda: R.dler_truncation(torch.ones(3), torch.ones(2), 4), ValueError,
                    r"lengths must have shape \[3\]"),
    "rw/dler-nan": (lambda: R.dler_truncation(torch.tensor([math.nan, 1.0]), torch.ones(2), 4), ValueError,
                    "rewards must be finite"),
    "rw/dler-device": (lambda: R.dler_truncation(torch.ones(2), _t(2, device=META), 4), ValueError,
                       "lengths is on meta but rewards is on cpu"),
    "rw/lambda-group": (lambda: R.grpo_lambda_length_penalty(torch.ones(4), torch.ones(4), 3), ValueError,
                        "group_size=3 does not divide"),
    "rw/lambda-threshold": (lambda: R.grpo_lambda_length_penalty(torch.ones(4), torch.ones(4), 2, threshold=2.0),
                            ValueError, r"threshold must be in \[0, 1\]"),
    "rw/lambda-device": (lambda: R.grpo_lambda_length_penalty(torch.ones(4), _t(4, device=META), 2), ValueError,
                         "lengths is on meta but correct is on cpu"),
    "rw/cosine-len": (lambda: R.cosine_length_reward(torch.ones(2), torch.ones(3), 8), ValueError,
                      r"lengths must have shape \[2\]"),
    "rw/cosine-device": (lambda: R.cosine_length_reward(torch.ones(2), _t(2, device=META), 8), ValueError,
                         "lengths is on meta but correct is on cpu"),
    "rw/cosine-max": (lambda: R.cosine_length_reward(torch.ones(2), torch.ones(2), -1), ValueError,
                      "max_len must be"),
    "rw/hapo-ids-float": (lambda: R.HistoryAwareLengthReward()(torch.ones(2), torch.ones(2), torch.ones(2)),
                          TypeError, "prompt_ids must have dtype"),
    "rw/hapo-ids-neg": (lambda: R.HistoryAwareLengthReward()(torch.tensor([0, -1]), torch.ones(2), torch.ones(2)),
                        ValueError, "prompt_ids must be >= 0"),
    "rw/hapo-correct-len": (lambda: R.HistoryAwareLengthReward()(torch.tensor([0, 1]), torch.ones(2), torch.ones(3)),
                            ValueError, r"correct must have shape \[2\]"),
    "rw/hapo-device": (lambda: R.HistoryAwareLengthReward()(torch.tensor([0, 1]), _t(2, device=META), torch.ones(2)),
                       ValueError, "lengths is on meta but prompt_ids is on cpu"),
    "rw/hapo-weight": (lambda: R.HistoryAwareLengthReward(weight=math.inf), ValueError, "weight must be"),
    "rw/hapo-state": (lambda: R.HistoryAwareLengthReward().load_state_dict({"history": torch.ones(2)}), KeyError,
                      "missing"),
    "rw/mask_trunc-shape": (lambda: R.mask_truncated_completions(torch.ones(2, 3), torch.ones(3)), ValueError,
                            r"is_truncated must have shape \[2\]"),
    "rw/mask_trunc-device": (lambda: R.mask_truncated_completions(torch.ones(2, 3), _t(2, device=META)),
                             ValueError, "is_truncated is on meta but mask is on cpu"),
    "rw/zero_var-nan": (lambda: R.filter_zero_variance_groups(torch.tensor([1.0, math.nan]), 2), ValueError,
                        "rewards must be finite"),
    "rw/zero_var-group": (lambda: R.filter_zero_variance_groups(torch.ones(4), 3), ValueError,
                          "group_size=3 does not divide"),
    "rw/zero_var-int": (lambda: R.zero_variance_group_rate(torch.ones(4, dtype=torch.long), 2), TypeError,
                        "rewards must be a float tensor"),
    "rw/sampler-fn": (lambda: R.DynamicSampler(None, group_size=2, target_groups=1), TypeError,
                      "sample_fn must be callable"),
    "rw/sampler-group": (lambda: R.DynamicSampler(lambda: None, group_size=0, target_groups=1), ValueError,
                         "group_size must be a positive int"),
    "rw/sampler-shortfall": (lambda: R.DynamicSampler(lambda: None, group_size=2, target_groups=1,
                                                      on_shortfall="warn"), ValueError, "on_shortfall must be"),
    "rw/sampler-return": (lambda: R.DynamicSampler(lambda: torch.ones(4), group_size=2, target_groups=1).sample(),
                          TypeError, r"sample_fn must return a \(batch, rewards\) tuple"),
    "rw/sampler-batch": (lambda: R.DynamicSampler(lambda: (torch.ones(3), torch.tensor([0.0, 1.0, 0.0, 1.0])),
                                                  group_size=2, target_groups=1).sample(), ValueError,
                         "leading size 4"),
    "rw/pass_at_k-k": (lambda: R.pass_at_k(5, 2, 0), ValueError, "k must be a positive int"),
    "rw/pass_at_k-c": (lambda: R.pass_at_k(5, 6, 1), ValueError, "c must satisfy 0 <= c <= n"),
    "rw/pass_at_k-n": (lambda: R.pass_at_k(2, 1, 3), ValueError, "n must be >= k=3"),
    "rw/pass_at_k-float": (lambda: R.pass_at_k(torch.tensor([2.0]), 1, 1), TypeError, "n must be an int"),
    # the engine's public surface
    "explain/op": (lambda: pyrl.explain("no_such_op"), ValueError, "op must be one of"),
    "explain/args": (lambda: pyrl.explain("fused_linear_logprobs", _t(2, 4), _t(5, 3), torch.zeros(2, dtype=torch.long)),
                     ValueError, r"weight must have shape \[V, H\] with H = hidden.shape\[-1\] = 4"),
    "register/dup": (lambda: pyrl.register_policy_loss("ppo")(lambda *a: None), ValueError,
                     "policy loss named 'ppo' is already registered"),
    "register/separable": (lambda: pyrl.register_policy_loss("x", token_separable=1), TypeError,
                           "token_separable must be a bool"),
    "register/params": (lambda: pyrl.register_policy_loss("x", params={"delta": 3}), TypeError,
                        r"params\['delta'\] must be a validator"),
    "register/fn": (lambda: pyrl.register_policy_loss("x")(None), TypeError, "a policy loss must be callable"),
    "unregister/name": (lambda: pyrl.unregister_policy_loss("no_such_loss"), ValueError,
                        "unknown policy loss 'no_such_loss'"),
    "unregister/estimator": (lambda: A.unregister("no_such_estimator"), ValueError,
                             "unknown advantage estimator 'no_such_estimator'"),
    "unregister/reward": (lambda: R.unregister("no_such_reward"), ValueError, "unknown reward 'no_such_reward'"),
    "get/reward": (lambda: R.get("no_such_reward"), ValueError, "unknown reward 'no_such_reward'"),
    # preference optimisation and distillation (docs/formulas.md §13, §14)
    "pref/loss_type": (lambda: pyrl.fused_linear_preference_loss(hidden, weight, targets, loss_type="nope"), ValueError,
                       "loss_type must be one of"),
    "pref/beta": (lambda: pyrl.fused_linear_preference_loss(hidden, weight, targets, beta=-1.0), ValueError,
                  "beta must be a finite number > 0"),
    "pref/odd": (lambda: pyrl.fused_linear_preference_loss(_t(3, T, H), weight, targets[:1].repeat(3, 1)), ValueError,
                 "hidden must stack B chosen then B rejected"),
    "pref/targets": (lambda: pyrl.fused_linear_preference_loss(hidden, weight, targets.float()), TypeError,
                     "targets must have dtype"),
    "distill/divergence": (lambda: pyrl.fused_linear_distillation_loss(hidden, weight, hidden, weight, targets,
                                                                       divergence="nope"), ValueError,
                           "divergence must be one of"),
    "distill/teacher": (lambda: pyrl.fused_linear_distillation_loss(hidden, weight, hidden[:1], weight, targets),
                        ValueError, r"teacher_hidden must have shape \[2, 3, H_ref\]"),
    "distill/beta": (lambda: pyrl.fused_linear_distillation_loss(hidden, weight, hidden, weight, targets,
                                                                 divergence="jsd", beta=2.0), ValueError,
                     r"beta must be in \(0, 1\) for divergence='jsd'"),
    "nn/dpo": (lambda: pyrl.nn.FusedLinearDPOLoss(use_ref_model=False)(weight, _t(3, T, H), targets[:1].repeat(3, 1)),
               ValueError, "hidden must stack B chosen then B rejected"),
    "nn/dpo-type": (lambda: pyrl.nn.FusedLinearDPOLoss(loss_type="nope"), ValueError, "Unsupported loss_type: nope"),
    "nn/orpo": (lambda: pyrl.nn.FusedLinearORPOLoss()(weight, hidden, targets.float()), TypeError,
                "targets must have dtype"),
    "nn/cpo": (lambda: pyrl.nn.FusedLinearCPOLoss()(weight[:, :3], hidden, targets), ValueError,
               r"lin_weight must have shape \[V, H\] with H = _input.shape\[-1\] = 4"),
    "nn/simpo": (lambda: pyrl.nn.FusedLinearSimPOLoss()(weight, _t(3, T, H), targets[:1].repeat(3, 1)), ValueError,
                 "loss_type='simpo'"),
    "nn/kto": (lambda: pyrl.nn.FusedLinearKTOLoss()(hidden, weight, targets), ValueError,
               "needs preference_labels"),
    "nn/jsd": (lambda: pyrl.nn.FusedLinearJSDLoss(beta=2.0), ValueError, r"beta must be in \[0.0, 1.0\]"),
    # the catalogue's rewards and length shapers (docs/formulas.md §8)
    "rw/decaying_budget": (lambda: R.decaying_budget(3, initial=0), ValueError, "initial must be >= 1"),
    "rw/decaying_budget-step": (lambda: R.decaying_budget(-1, initial=10), ValueError, "step must be >= 0"),
    "rw/difficulty-len": (lambda: R.difficulty_aware_truncation(torch.ones(4), torch.ones(3), 2, budget=4), ValueError,
                          r"lengths must have shape \[4\]"),
    "rw/difficulty-group": (lambda: R.difficulty_aware_truncation(torch.ones(4), torch.ones(4), 3, budget=4),
                            ValueError, "group_size=3 does not divide"),
    "rw/laser_d": (lambda: R.laser_d_length_reward(torch.ones(4), torch.ones(4), 2, budgets=(2,)), ValueError,
                   "budgets must be three lengths"),
    "rw/majority_vote": (lambda: R.majority_vote(["1", "2"], prompts=["a"]), ValueError, "prompts must have 2 entries"),
    "rw/par": (lambda: R.preference_as_reward(torch.ones(2), torch.ones(3)), ValueError, "reference must have shape"),
    "rw/par-nan": (lambda: R.preference_as_reward(torch.tensor([math.nan, 1.0]), 0.0), ValueError,
                   "rewards must be finite"),
    "rw/apo": (lambda: R.wrong_answer_length_penalty(torch.ones(2), torch.ones(2), 0), ValueError,
               "max_len must be a finite number > 0"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_rejects_bad_input_naming_the_argument(name):
    call, exc, match = CASES[name]
    with pytest.raises(exc, match=match):
        call()


def test_every_public_name_is_audited():
    """A new public function must come with audit cases (or be listed here as taking no input)."""
    no_input = {"backends", "names", "register", "advantages", "nn", "rewards", "DynamicSample", "policy_loss_names"}
    covered_prefixes = {
        "logprobs_from_logits": "lfl/", "fused_linear_logprobs": "fll/", "policy_loss": "pl/",
        "fused_linear_policy_loss": "flpl/", "PolicyLossConfig": "cfg/", "FusedLinearGRPOLoss": "nn/fwd",
        "FusedLinearLogProbs": "nn/logprobs", "compute": "adv/", "aggregate_rewards": "adv/agg",
        "extract_answer": "rw/extract", "dapo_overlong_penalty": "rw/overlong", "dler_truncation": "rw/dler",
        "grpo_lambda_length_penalty": "rw/lambda", "cosine_length_reward": "rw/cosine",
        "HistoryAwareLengthReward": "rw/hapo", "mask_truncated_completions": "rw/mask_trunc",
        "filter_zero_variance_groups": "rw/zero_var", "zero_variance_group_rate": "rw/zero_var",
        "DynamicSampler": "rw/sampler", "pass_at_k": "rw/pass_at_k", "explain": "explain/",
        "register_policy_loss": "register/", "unregister_policy_loss": "unregister/", "unregister": "unregister/",
        "get": "get/",
        "fused_linear_preference_loss": "pref/", "fused_linear_distillation_loss": "distill/",
        "FusedLinearDPOLoss": "nn/dpo", "FusedLinearORPOLoss": "nn/orpo", "FusedLinearCPOLoss": "nn/cpo",
        "FusedLinearSimPOLoss": "nn/simpo", "FusedLinearKTOLoss": "nn/kto", "FusedLinearJSDLoss": "nn/jsd",
        "decaying_budget": "rw/decaying_budget", "difficulty_aware_truncation": "rw/difficulty",
        "laser_d_length_reward": "rw/laser_d", "majority_vote": "rw/majority_vote", "preference_as_reward": "rw/par",
        "wrong_answer_length_penalty": "rw/apo",
    }
    public = set(pyrl.__all__) | set(pyrl.nn.__all__) | set(A.__all__) | set(R.__all__)
    missing = sorted(n for n in public - no_input if not any(k.startswith(covered_prefixes.get(n, "\0"))
                                                             for k in CASES))
    assert not missing, f"public names without validation-audit cases: {missing}"


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_bad_targets_at_padding_are_fine_but_not_at_valid_positions(backend):
    """fused_linear_policy_loss ignores ids under mask == 0 (any id allowed) but checks the rest."""
    if not pyrl.backends()[backend]["available"]:
        pytest.skip(f"{backend} not available")
    t = targets.clone()
    m = mask.clone()
    m[0, 2] = 0
    t[0, 2] = 10**6
    loss, _ = pyrl.fused_linear_policy_loss(hidden, weight, t, m, adv, backend=backend)
    assert torch.isfinite(loss)
    m[0, 2] = 1
    with pytest.raises(ValueError, match=r"targets must hold ids in \[0, 7\)"):
        pyrl.fused_linear_policy_loss(hidden, weight, t, m, adv, backend=backend)


def test_errors_happen_before_any_state_change():
    """A rejected HistoryAwareLengthReward call leaves its history untouched."""
    hapo = R.HistoryAwareLengthReward()
    hapo(torch.tensor([0, 1]), torch.tensor([5.0, 7.0]), torch.ones(2))
    before = hapo.state_dict()["history"].clone()
    with pytest.raises(ValueError):
        hapo(torch.tensor([0, 1]), torch.tensor([1.0, -1.0]), torch.ones(2))
    assert torch.equal(hapo.state_dict()["history"], before)
