"""The registry: every implementation the suite runs, by op and name.

An implementation is ``build(case) -> step``: ``build`` does the one-time work (imports, module
construction, ``torch.compile`` wrapping) and ``step()`` runs forward and backward once and
returns its outputs and gradients (``logp``, ``entropy``, ``loss``, ``d_hidden``, ``d_weight``,
``d_logits``) for the correctness check. ``requires(device)`` returns why it cannot run here, or
None. Optional packages are imported inside ``build``/``requires`` only.

Kinds: ``pyrl`` (ours, a failure is an error), ``baseline`` (plain PyTorch and torch.compile),
``third-party`` (a failure or a missing package is a skip with a note), ``floor`` (the matmuls or
memory traffic alone: the time no implementation can beat; no correctness check).
"""
from __future__ import annotations

import contextlib
import importlib.util
import math
import os
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from pyrl.bench.cases import (DPO_BETA, EPS_HIGH, EPS_LOW, IGNORE_INDEX, JSD_BETA, Case, grpo_loss_from_logp,
                              logprob_objective)

__all__ = ["Impl", "REGISTRY", "register", "implementations", "logprob_outputs", "loss_outputs",
           "plain_linear_logprobs", "plain_logprobs_from_logits", "plain_grpo_loss", "plain_dpo_loss",
           "plain_distill_loss"]

Step = Callable[[], dict]


@dataclass(frozen=True)
class Impl:
    op: str
    name: str
    build: Callable[[Case], Step]
    requires: Callable[[torch.device], str | None] = lambda device: None
    kind: str = "pyrl"                                # pyrl | baseline | third-party | floor
    outputs: tuple[str, ...] = ("logp", "entropy")    # what a log-prob op's objective includes
    note: str = ""


REGISTRY: dict[tuple[str, str], Impl] = {}


def register(impl: Impl) -> Impl:
    REGISTRY[(impl.op, impl.name)] = impl
    return impl


def implementations(op: str) -> list[Impl]:
    return [impl for (o, _), impl in REGISTRY.items() if o == op]


# --------------------------------------------------------------------------------------------
# Shared pieces
# --------------------------------------------------------------------------------------------
def logprob_outputs(case: Case, logp, entropy) -> dict:
    """Backward of the log-prob objective; the outputs the checker compares."""
    grads = torch.autograd.grad(logprob_objective(case, logp, entropy), case.grad_inputs())
    out = {"logp": logp.detach()}
    if entropy is not None:
        out["entropy"] = entropy.detach()
    if case.logits is not None:
        out["d_logits"] = grads[0]
    else:
        out["d_hidden"], out["d_weight"] = grads
    return out


def loss_outputs(case: Case, loss) -> dict:
    d_hidden, d_weight = torch.autograd.grad(loss, [case.hidden, case.weight])
    return {"loss": loss.detach(), "d_hidden": d_hidden, "d_weight": d_weight}


def _missing(module: str, pip_name: str) -> str | None:
    if importlib.util.find_spec(module) is None:
        return f"{pip_name} is not installed (pip install {pip_name})"
    return None


def _cuda_only(what: str):
    return lambda device: None if device.type == "cuda" else f"{what} runs on CUDA only"


def _pyrl_backend(backend: str, attr: str | None = None):
    def requires(device: torch.device) -> str | None:
        import pyrl

        if attr is not None and not hasattr(pyrl, attr):
            return f"pyrl.{attr} is not available in this build yet"
        info = pyrl.backends()[backend]
        if not info["available"]:
            return info["detail"]
        if backend == "triton" and device.type != "cuda":
            return "the Triton backend runs on CPU only under TRITON_INTERPRET=1, which is not benchmarked"
        if backend == "cpp" and device.type != "cpu":
            return "pyrl._C has CPU kernels only (CUDA tensors take backend='triton')"
        return None
    return requires


# --------------------------------------------------------------------------------------------
# Plain PyTorch: what a user writes without a fused kernel (full [N, V] logits)
# --------------------------------------------------------------------------------------------
def plain_logprobs_from_logits(logits, targets):
    # Upcast 16-bit logits as TRL does (log_softmax in fp32); float64 stays float64.
    logp_all = torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
    logp = logp_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp, entropy


def plain_linear_logprobs(hidden, weight, targets):
    return plain_logprobs_from_logits(hidden @ weight.t(), targets)


def plain_grpo_loss(hidden, weight, targets, mask, advantages, old_logp):
    logp, _ = plain_linear_logprobs(hidden, weight, targets)
    return grpo_loss_from_logp(logp, old_logp, advantages, mask)


def _sequence_logps(hidden, weight, targets):
    valid = targets != IGNORE_INDEX
    logp, _ = plain_linear_logprobs(hidden, weight, torch.where(valid, targets, 0))
    return torch.where(valid, logp, 0.0).sum(-1)


def plain_dpo_loss(hidden, weight, targets, ref_hidden, ref_weight):
    with torch.no_grad():
        ref = _sequence_logps(ref_hidden, ref_weight, targets)
    a = _sequence_logps(hidden, weight, targets) - ref
    b = a.shape[0] // 2
    return -F.logsigmoid(DPO_BETA * (a[:b] - a[b:])).mean()


def plain_distill_loss(hidden, weight, targets, teacher_hidden, teacher_weight):
    acc = torch.promote_types(hidden.dtype, torch.float32)
    lp = torch.log_softmax((hidden @ weight.t()).to(acc), -1)
    with torch.no_grad():
        lq = torch.log_softmax((teacher_hidden @ teacher_weight.t()).to(acc), -1)
    lm = torch.logaddexp(lp + math.log(1 - JSD_BETA), lq + math.log(JSD_BETA))
    per = JSD_BETA * (lq.exp() * (lq - lm)).sum(-1) + (1 - JSD_BETA) * (lp.exp() * (lp - lm)).sum(-1)
    valid = targets != IGNORE_INDEX
    return torch.where(valid, per, 0.0).sum() / valid.sum().clamp(min=1)


_COMPILED: dict = {}


def _compile(fn):
    # One wrapper per function and process: a later shape reuses Dynamo's cache (after one
    # recompile with dynamic sizes) instead of compiling from scratch for every shape on a GPU.
    if fn not in _COMPILED:
        _COMPILED[fn] = torch.compile(fn)
    return _COMPILED[fn]


def _register_plain(op: str, fn):
    def build_for(wrap):
        def build(case: Case) -> Step:
            f = wrap(fn)
            if op == "grpo_loss":
                return lambda: loss_outputs(case, f(case.hidden, case.weight, case.targets, case.mask,
                                                     case.advantages, case.old_logp))
            if op in ("dpo_loss", "distill_loss"):
                return lambda: loss_outputs(case, f(case.hidden, case.weight, case.targets, case.ref_hidden,
                                                     case.ref_weight))
            if op == "logits_logprobs":
                return lambda: logprob_outputs(case, *f(case.logits, case.targets))
            return lambda: logprob_outputs(case, *f(case.hidden, case.weight, case.targets))
        return build

    register(Impl(op, "torch", build_for(lambda f: f), kind="baseline",
                  note="plain PyTorch, full logits"))
    register(Impl(op, "torch.compile", build_for(_compile), kind="baseline",
                  note="torch.compile of the plain PyTorch code"))


# --------------------------------------------------------------------------------------------
# Floors: the unavoidable work, measured on the same inputs
# --------------------------------------------------------------------------------------------
def _gemm_floor(case: Case) -> Step:
    h = case.hidden.detach().reshape(-1, case.h)
    w = case.weight.detach()

    def step():
        logits = h @ w.t()              # forward
        d_hidden = logits @ w           # backward: the logits buffer stands in for d_logits
        d_weight = logits.t() @ h
        return {"d_hidden": d_hidden, "d_weight": d_weight}
    return step


def _copy_floor(case: Case) -> Step:
    logits = case.logits.detach()
    return lambda: {"d_logits": logits.clone()}  # one read and one write of [N, V]


# --------------------------------------------------------------------------------------------
# pyrl
# --------------------------------------------------------------------------------------------
def _pyrl_linear_logprobs(backend, chunk_bytes=None, linear=None):
    def build(case: Case) -> Step:
        import pyrl

        def step():
            with _linear_knob(linear):
                logp, ent = pyrl.fused_linear_logprobs(case.hidden, case.weight, case.targets,
                                                       return_entropy=True, backend=backend, chunk_bytes=chunk_bytes)
            return logprob_outputs(case, logp, ent)
        return step
    return build


def _pyrl_logits_logprobs(backend):
    def build(case: Case) -> Step:
        import pyrl

        def step():
            logp, ent = pyrl.logprobs_from_logits(case.logits, case.targets, return_entropy=True,
                                                  backend=backend)
            return logprob_outputs(case, logp, ent)
        return step
    return build


def _pyrl_grpo_loss(backend, chunk_bytes=None, linear=None):
    """``linear``: force the walk (``PYRL_LINEAR``) for this implementation's calls only."""
    def build(case: Case) -> Step:
        import pyrl

        config = pyrl.PolicyLossConfig(loss_type="ppo", eps_low=EPS_LOW, eps_high=EPS_HIGH, beta=0.0,
                                       agg="token-mean")

        def step():
            with _linear_knob(linear):
                loss, _ = pyrl.fused_linear_policy_loss(case.hidden, case.weight, case.targets, case.mask,
                                                        case.advantages, old_logp=case.old_logp, config=config,
                                                        backend=backend, chunk_bytes=chunk_bytes)
            return loss_outputs(case, loss)
        return step
    return build


@contextlib.contextmanager
def _linear_knob(linear):
    """``PYRL_LINEAR=linear`` inside the block (nothing when None), the old value restored after."""
    if linear is None:
        yield
        return
    old = os.environ.get("PYRL_LINEAR")
    os.environ["PYRL_LINEAR"] = linear
    try:
        yield
    finally:
        if old is None:
            del os.environ["PYRL_LINEAR"]
        else:
            os.environ["PYRL_LINEAR"] = old


def _pyrl_pair_loss(op: str, backend: str):
    """pyrl's dpo_loss / distill_loss: the same call shape, (hidden, weight, targets, reference side)."""
    def build(case: Case) -> Step:
        import pyrl

        def step():
            if op == "dpo_loss":
                loss, _ = pyrl.fused_linear_preference_loss(case.hidden, case.weight, case.targets,
                                                            loss_type="sigmoid", beta=DPO_BETA,
                                                            ref_hidden=case.ref_hidden, ref_weight=case.ref_weight,
                                                            backend=backend)
            else:
                loss, _ = pyrl.fused_linear_distillation_loss(case.hidden, case.weight, case.ref_hidden,
                                                              case.ref_weight, case.targets, divergence="jsd",
                                                              beta=JSD_BETA, backend=backend)
            return loss_outputs(case, loss)
        return step
    return build


# --------------------------------------------------------------------------------------------
# Third parties
# --------------------------------------------------------------------------------------------
def _liger_grpo(case: Case) -> Step:
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

    # "dapo" is Liger's token-mean (sum(m*L) / sum(m)); compiled=True torch.compiles only the loss
    # math, which on CPU costs a long C++ build for no gain, so CPU runs it eagerly.
    loss_fn = LigerFusedLinearGRPOLoss(beta=0.0, compiled=case.device.type == "cuda", use_ref_model=False,
                                       epsilon_low=EPS_LOW, epsilon_high=EPS_HIGH, loss_type="dapo",
                                       temperature=1.0)

    def step():
        loss, _ = loss_fn(case.hidden, case.weight, case.targets, case.mask, case.advantages,
                          old_per_token_logps=case.old_logp)
        return loss_outputs(case, loss)
    return step


def _liger_triton_grpo(case: Case) -> Step:
    from liger_kernel.transformers.grpo_loss import triton_grpo_loss

    def step():
        # It takes [B, T+1, V] logits (position t scores token t) and drops the last position.
        logits = F.pad(case.hidden, (0, 0, 0, 1)) @ case.weight.t()
        loss, _ = triton_grpo_loss(logits, case.old_logp, None, case.targets, case.advantages, case.mask,
                                   temperature=1.0, beta=0.0, eps_low=EPS_LOW, eps_high=EPS_HIGH,
                                   inplace=True, loss_type="dapo", reduce=True)
        return loss_outputs(case, loss)
    return step


def _liger_dpo(case: Case) -> Step:
    from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss

    loss_fn = LigerFusedLinearDPOLoss(beta=DPO_BETA, compiled=case.device.type == "cuda", use_ref_model=True)

    def step():
        loss, _ = loss_fn(case.weight, case.hidden, case.targets, None, case.ref_hidden, case.ref_weight)
        return loss_outputs(case, loss)
    return step


def _liger_jsd(case: Case) -> Step:
    from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

    loss_fn = LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=JSD_BETA,
                                      compiled=case.device.type == "cuda")

    def step():
        return loss_outputs(case, loss_fn(case.hidden, case.weight, case.ref_hidden, case.ref_weight, case.targets))
    return step


def _cut_cross_entropy(case: Case) -> Step:
    from cut_cross_entropy import linear_cross_entropy

    def step():
        # Default settings (filter_eps="high": backward skips small-gradient vocabulary tiles).
        nll = linear_cross_entropy(case.hidden, case.weight, case.targets, reduction="none")
        return logprob_outputs(case, -nll.float(), None)
    return step


def _requires_all(*checks):
    def requires(device):
        for check in checks:
            why = check(device)
            if why:
                return why
        return None
    return requires


def _not_runnable(case: Case) -> Step:
    raise RuntimeError("this implementation's requires() always gives a reason; build is never called")


# --------------------------------------------------------------------------------------------
# The registry
# --------------------------------------------------------------------------------------------
for _op in ("linear_logprobs", "grpo_loss", "dpo_loss", "distill_loss"):
    register(Impl(_op, "gemm-floor", _gemm_floor, kind="floor",
                  note="the three matmuls alone (logits, d_hidden, d_weight)" +
                  ("; the reference's/teacher's logits GEMM is not counted" if _op in ("dpo_loss", "distill_loss")
                   else "")))
register(Impl("logits_logprobs", "copy-floor", _copy_floor, kind="floor",
              note="one read and one write of the logits"))

for _backend in ("torch", "cpp", "triton"):
    register(Impl("linear_logprobs", f"pyrl[{_backend}]", _pyrl_linear_logprobs(_backend),
                  requires=_pyrl_backend(_backend)))
    register(Impl("logits_logprobs", f"pyrl[{_backend}]", _pyrl_logits_logprobs(_backend),
                  requires=_pyrl_backend(_backend)))
    register(Impl("grpo_loss", f"pyrl[{_backend}]", _pyrl_grpo_loss(_backend),
                  requires=_pyrl_backend(_backend, "fused_linear_policy_loss")))
    for _op, _fn in (("dpo_loss", "fused_linear_preference_loss"), ("distill_loss", "fused_linear_distillation_loss")):
        register(Impl(_op, f"pyrl[{_backend}]", _pyrl_pair_loss(_op, _backend), requires=_pyrl_backend(_backend, _fn)))

# CPU: the vocabulary-blocked walk at the default budget (four large GEMMs in a small tile), half the
# default budget (the chunk walk with 48 rows at V=151936: more passes over the weight, half the chunk
# memory), and 256 MiB chunks.
register(Impl("grpo_loss", "pyrl[cpp]/blocked", _pyrl_grpo_loss("cpp", linear="blocked"),
              requires=_pyrl_backend("cpp", "fused_linear_policy_loss"),
              note="PYRL_LINEAR=blocked (the vocabulary-blocked walk)"))
register(Impl("grpo_loss", "pyrl[cpp]/chunk=32MiB", _pyrl_grpo_loss("cpp", 32 * 2**20),
              requires=_pyrl_backend("cpp", "fused_linear_policy_loss"), note="chunk_bytes=32 MiB"))
register(Impl("grpo_loss", "pyrl[cpp]/chunk=256MiB", _pyrl_grpo_loss("cpp", 256 * 2**20),
              requires=_pyrl_backend("cpp", "fused_linear_policy_loss"), note="chunk_bytes=256 MiB"))
# The memory-budget knob: chunk_bytes="auto" sized from free memory (pyrl.ops.plan.resolve_chunk_bytes;
# 256 MiB on a CPU with 2 GiB or more available, up to 4 GiB on a GPU).
_AUTO_NOTE = "chunk_bytes='auto' (1/8 of free memory, a power of two; pyrl.explain shows it)"
register(Impl("grpo_loss", "pyrl[cpp]/auto", _pyrl_grpo_loss("cpp", "auto"),
              requires=_pyrl_backend("cpp", "fused_linear_policy_loss"), note=_AUTO_NOTE))
register(Impl("linear_logprobs", "pyrl[triton]/auto", _pyrl_linear_logprobs("triton", "auto"),
              requires=_pyrl_backend("triton"), note=_AUTO_NOTE))
register(Impl("grpo_loss", "pyrl[triton]/auto", _pyrl_grpo_loss("triton", "auto"),
              requires=_pyrl_backend("triton", "fused_linear_policy_loss"), note=_AUTO_NOTE))
# CUDA: the Triton rows on the vocabulary-blocked walk (4 bf16 GEMMs per tile of up to 1024 tokens
# and block of 2^25 / H columns, d logits written in bf16 by the row kernel), and the chunk walk with
# 1 GiB chunks (fewer, larger chunk GEMMs for more working memory).
_BLOCKED_NOTE = "PYRL_LINEAR=blocked (the vocabulary-blocked walk; on CUDA 1024-token tiles x 2^25/H-column blocks)"
register(Impl("linear_logprobs", "pyrl[triton]/blocked", _pyrl_linear_logprobs("triton", linear="blocked"),
              requires=_pyrl_backend("triton"), note=_BLOCKED_NOTE))
register(Impl("grpo_loss", "pyrl[triton]/blocked", _pyrl_grpo_loss("triton", linear="blocked"),
              requires=_pyrl_backend("triton", "fused_linear_policy_loss"), note=_BLOCKED_NOTE))
register(Impl("linear_logprobs", "pyrl[triton]/chunk=1GiB", _pyrl_linear_logprobs("triton", 2**30),
              requires=_pyrl_backend("triton"), note="chunk_bytes=1 GiB"))
register(Impl("grpo_loss", "pyrl[triton]/chunk=1GiB", _pyrl_grpo_loss("triton", 2**30),
              requires=_pyrl_backend("triton", "fused_linear_policy_loss"), note="chunk_bytes=1 GiB"))

_register_plain("linear_logprobs", plain_linear_logprobs)
_register_plain("logits_logprobs", plain_logprobs_from_logits)
_register_plain("grpo_loss", plain_grpo_loss)
_register_plain("dpo_loss", plain_dpo_loss)
_register_plain("distill_loss", plain_distill_loss)

register(Impl("linear_logprobs", "liger", _not_runnable, kind="third-party",
              requires=lambda device: "Liger-Kernel has no log-prob + entropy op from hidden states "
                                      "(its fused linear cross-entropy returns a reduced loss)"))
register(Impl("logits_logprobs", "liger", _not_runnable, kind="third-party",
              requires=lambda device: "Liger-Kernel has no differentiable log-prob + entropy op from logits "
                                      "(fused_selective_log_softmax is forward-only)"))
register(Impl("linear_logprobs", "cut-cross-entropy", _cut_cross_entropy, kind="third-party",
              outputs=("logp",), note="log-prob only (no entropy); default filter_eps",
              requires=_requires_all(_cuda_only("cut-cross-entropy's kernel"),
                                     lambda d: _missing("cut_cross_entropy", "cut-cross-entropy"))))
register(Impl("grpo_loss", "liger", _liger_grpo, kind="third-party",
              note="LigerFusedLinearGRPOLoss(loss_type='dapo')",
              requires=_requires_all(lambda d: _missing("liger_kernel", "liger-kernel"),
                                     lambda d: _missing("triton", "triton"))))
register(Impl("grpo_loss", "liger.triton_grpo_loss", _liger_triton_grpo, kind="third-party",
              note="Liger's Triton GRPO loss on full [B, T+1, V] logits",
              requires=_requires_all(_cuda_only("triton_grpo_loss"),
                                     lambda d: _missing("liger_kernel", "liger-kernel"))))
_LIGER = _requires_all(lambda d: _missing("liger_kernel", "liger-kernel"), lambda d: _missing("triton", "triton"))
register(Impl("dpo_loss", "liger", _liger_dpo, kind="third-party", requires=_LIGER,
              note="LigerFusedLinearDPOLoss(loss_type='sigmoid', use_ref_model=True), chunk_size=1 (its default)"))
register(Impl("distill_loss", "liger", _liger_jsd, kind="third-party", requires=_LIGER,
              note="LigerFusedLinearJSDLoss(weight_hard_loss=0, weight_soft_loss=1), chunk_size=1024"))
