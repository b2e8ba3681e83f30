"""The benchmarked ops, their inputs and the scalar each implementation differentiates.

A *case* is one op at one shape ``(N, H, V)`` (tokens, hidden size, vocabulary) on one device and
dtype. Inputs are drawn from a seeded generator on that device (fast for GPU-sized weights), so a
child process that rebuilds a case from ``(op, shape, dtype, device, seed)`` on the same machine
gets bit-identical tensors (the runner checks a fingerprint); the one
input that depends on a model pass (``old_logp`` of the GRPO loss) is computed once by the parent
and handed over in ``extras``.

Every implementation of an op runs forward *and* backward of the same scalar:

* ``linear_logprobs`` / ``logits_logprobs``: ``sum(logp * g_logp) + sum(entropy * g_entropy)``
  with fixed random cotangents, so both outputs and both gradient paths are exercised (an
  implementation without entropy, e.g. Cut Cross-Entropy, drops the second term and is compared
  against a reference of the same scalar);
* ``grpo_loss``: the PPO-clip loss of docs/formulas.md §3 aggregated by ``token-mean`` (Liger's
  ``dapo``), with ``beta = 0`` and ``old_logp`` near the current policy so some tokens clip;
* ``dpo_loss``: the DPO (sigmoid) loss of docs/formulas.md §13, ``beta = DPO_BETA``, over ``N / T``
  sequences (chosen half, then rejected half), the reference's log-probs from its own hidden states
  and head (Liger's ``use_ref_model=True``);
* ``distill_loss``: the generalised JSD (``beta = JSD_BETA``) between the student head and a teacher
  head, docs/formulas.md §14, mean over valid tokens, no hard-label term (Liger's
  ``weight_hard_loss=0, weight_soft_loss=1``).

In ``dpo_loss`` and ``distill_loss`` the tail of every other sequence is ``IGNORE_INDEX``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

__all__ = ["OPS", "Case", "make_case", "logprob_objective", "grpo_loss_from_logp", "flops",
           "seq_len", "EPS_LOW", "EPS_HIGH", "DPO_BETA", "JSD_BETA", "IGNORE_INDEX"]

# name -> what it measures (the README and results.md quote these).
OPS = {
    "linear_logprobs": "per-token log-prob + entropy from hidden states and the LM head, fwd+bwd",
    "logits_logprobs": "per-token log-prob + entropy from materialised logits, fwd+bwd",
    "grpo_loss": "GRPO/PPO-clip loss (token-mean, beta=0) from hidden states and the LM head, fwd+bwd",
    "dpo_loss": "DPO (sigmoid, beta=0.1) loss over chosen/rejected pairs from hidden states, the reference "
                "model's log-probs from its own hidden states and head, fwd+bwd",
    "distill_loss": "generalised JSD (beta=0.5) between student and teacher heads from hidden states, "
                    "mean over valid tokens, fwd+bwd",
}
DPO_BETA = 0.1
JSD_BETA = 0.5
IGNORE_INDEX = -100

EPS_LOW = EPS_HIGH = 0.2
PAD_FRACTION = 0.125  # grpo_loss: the tail of sequences 0, 2, 4, ... is padding (mask 0)


def seq_len(n_tokens: int, device: torch.device, op: str = "grpo_loss") -> int:
    """Tokens per sequence of the sequence ops: N = B * T (T = 256 on CPU, 1024 on GPU); dpo_loss
    needs an even number of sequences (pairs)."""
    t = 1024 if device.type == "cuda" else 256
    if op == "dpo_loss":
        return t if n_tokens % (2 * t) == 0 else max(1, n_tokens // 2)
    return t if n_tokens % t == 0 and n_tokens >= t else n_tokens


@dataclass
class Case:
    op: str
    n: int
    h: int
    v: int
    dtype: torch.dtype
    device: torch.device
    targets: torch.Tensor                    # [N] (grpo: [B, T]) int64
    hidden: torch.Tensor | None = None       # [N, H] (grpo: [B, T, H]), requires grad
    weight: torch.Tensor | None = None       # [V, H], requires grad
    logits: torch.Tensor | None = None       # [N, V], requires grad (logits_logprobs only)
    grad_logp: torch.Tensor | None = None    # [N] fp32 cotangent of logp
    grad_entropy: torch.Tensor | None = None  # [N] fp32 cotangent of entropy
    mask: torch.Tensor | None = None         # [B, T] fp32 in {0, 1}
    advantages: torch.Tensor | None = None   # [B] fp32
    old_logp: torch.Tensor | None = None     # [B, T] fp32
    ref_hidden: torch.Tensor | None = None   # dpo: the reference's [B, T, H]; distill: the teacher's [N, H]
    ref_weight: torch.Tensor | None = None   # [V, H], no gradient
    extras: dict = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.n, self.h, self.v

    def fingerprint(self) -> float:
        """A cheap checksum, so a child process can prove it rebuilt the parent's inputs."""
        tensors = [self.logits, self.hidden, self.weight, self.targets, self.ref_hidden, self.ref_weight]
        return sum(float(t.detach().double().sum()) for t in tensors if t is not None)

    def grad_inputs(self) -> list[torch.Tensor]:
        return [self.logits] if self.logits is not None else [self.hidden, self.weight]


def make_case(op: str, shape, dtype: torch.dtype, device, seed: int = 0, extras: dict | None = None) -> Case:
    """Seeded inputs of ``op`` at ``shape = (N, H, V)``. ``extras`` supplies ``old_logp`` for grpo_loss."""
    if op not in OPS:
        raise ValueError(f"op must be one of {sorted(OPS)}, got {op!r}")
    n, h, v = (int(s) for s in shape)
    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(seed)

    def randn(*size):
        return torch.randn(*size, generator=gen, device=device)

    def draw(*size, scale=1.0):
        return (randn(*size) * scale).to(dtype)

    targets = torch.randint(0, v, (n,), generator=gen, device=device)
    case = Case(op, n, h, v, dtype, device, targets=targets, extras=dict(extras or {}))
    # Logits with standard deviation ~2, peaked enough that the softmax is not uniform.
    if op == "logits_logprobs":
        case.logits = draw(n, v, scale=2.0).requires_grad_()
    else:
        case.hidden = draw(n, h).requires_grad_()
        case.weight = draw(v, h, scale=2.0 / h ** 0.5).requires_grad_()
    if op in ("linear_logprobs", "logits_logprobs"):
        case.grad_logp, case.grad_entropy = randn(n), randn(n)
    elif op == "grpo_loss":
        t = seq_len(n, device)
        b = n // t
        case.hidden = case.hidden.detach().view(b, t, h).requires_grad_()
        case.targets = case.targets.view(b, t)
        lengths = torch.full((b,), t)
        lengths[::2] = t - int(t * PAD_FRACTION)
        case.mask = (torch.arange(t)[None, :] < lengths[:, None]).float().to(device)
        case.advantages = randn(b)
        if "old_logp" in case.extras:
            case.old_logp = case.extras["old_logp"].to(device=device, dtype=torch.float32).view(b, t)
    elif op in ("dpo_loss", "distill_loss"):
        t = seq_len(n, device, op)
        b = n // t
        case.ref_hidden = (case.hidden.detach() + 0.3 * randn(n, h).to(dtype)).to(dtype)
        case.ref_weight = (case.weight.detach() + randn(v, h).to(dtype) * (0.3 / h ** 0.5)).to(dtype)
        targets = case.targets.view(b, t).clone()
        targets[::2, t - int(t * PAD_FRACTION):] = IGNORE_INDEX
        if op == "dpo_loss":
            case.hidden = case.hidden.detach().view(b, t, h).requires_grad_()
            case.ref_hidden = case.ref_hidden.view(b, t, h)
            case.targets = targets
        else:
            case.targets = targets.view(n)
    return case


def logprob_objective(case: Case, logp: torch.Tensor, entropy: torch.Tensor | None) -> torch.Tensor:
    """The scalar the log-prob ops differentiate (entropy=None: the log-prob term alone)."""
    g_logp, g_ent = case.grad_logp.to(logp.dtype), case.grad_entropy
    out = (logp.reshape(-1) * g_logp).sum()
    if entropy is not None:
        out = out + (entropy.reshape(-1) * g_ent.to(entropy.dtype)).sum()
    return out


def grpo_loss_from_logp(logp, old_logp, advantages, mask, eps_low=EPS_LOW, eps_high=EPS_HIGH):
    """PPO-clip loss (docs/formulas.md §3) aggregated by token-mean (§6); ``logp`` is ``[B, T]``."""
    ratio = torch.exp((logp - old_logp.to(logp.dtype)).clamp(-20.0, 20.0))
    adv = advantages.to(logp.dtype)[:, None]
    per_token = torch.maximum(-adv * ratio, -adv * ratio.clamp(1.0 - eps_low, 1.0 + eps_high))
    mask = mask.to(logp.dtype)
    return (per_token * mask).sum() / mask.sum().clamp(min=1.0)


def flops(op: str, shape) -> float | None:
    """Matmul FLOPs of fwd+bwd: logits, d_hidden and d_weight are 2*N*H*V each."""
    n, h, v = shape
    if op in ("dpo_loss", "distill_loss"):
        return 8.0 * n * h * v  # + the reference's (teacher's) logits
    return 6.0 * n * h * v if op in ("linear_logprobs", "grpo_loss") else None
