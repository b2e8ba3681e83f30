"""Advantage estimators, registered by name (docs/formulas.md §7).

    A = pyrl.advantages.compute("grpo", rewards, group_size=8)                  # [B]
    A = pyrl.advantages.compute("grpo", rewards, group_size=8, mask=mask)       # [B, T]
    A, returns = pyrl.advantages.compute("gae", rewards, group_size=1, values=v, mask=mask)

``rewards[b]`` is the scalar reward of completion ``b``; completions of one prompt are contiguous,
``group_size`` (``G``) of them, so the batch is ``[B // G groups, G]``. Every estimator is a small
pure function of torch ops, vectorised over the whole batch (no Python loop over samples or
tokens), and runs on any device. Each docstring names its paper and formula.

Common rules:
- Every estimator accepts ``mask`` ``[B, T]`` (nonzero = a valid completion token). Sequence-level
  advantages are then broadcast to ``[B, T]`` and are 0 at masked positions; the token-level
  estimators (``reinforce_pp``, ``reinforce_pp_baseline``, ``gae``) use the mask in their maths.
- Group-relative estimators give exactly 0 to groups of size 1 and to groups whose rewards are all
  equal, never NaN. (``remax``, ``reinforce_pp`` and ``gae`` use no group baseline, so
  ``group_size`` is only checked for them.)
- Outputs are float32, or float64 when ``rewards`` is float64.

A new estimator is one function::

    @register("my_estimator")
    def my_estimator(rewards, group_size, *, my_option=1.0):
        ...

A name is registered once (``replace=True`` overrides on purpose); ``unregister(name)`` removes one.
"""
from __future__ import annotations

import inspect
import math
from typing import Callable

import torch

from ._validate import check_float, check_group_size, check_number, check_positive, check_tensor, shape_str
from .registry import Registry

__all__ = ["compute", "names", "register", "aggregate_rewards", "unregister"]

_ESTIMATORS: Registry[Callable] = Registry("advantage estimator")

# Options whose dimensions are [B] (sequence) or [B, T] (token); compute() checks them by name.
_SEQ_OPTIONS = ("greedy_rewards", "lengths", "correct", "scores", "metric")
_TOKEN_OPTIONS = ("mask", "kl", "values", "token_rewards")


def register(name: str, *, replace: bool = False):
    """Decorator: ``@register("name")`` makes ``fn(rewards, group_size, *, options...)`` selectable
    by ``compute(name, ...)``. Options must be keyword-only parameters. A name already taken raises
    ``ValueError`` unless ``replace=True``."""
    return _ESTIMATORS.register(name, replace=replace)


def unregister(name: str) -> Callable:
    """Remove estimator ``name`` and return its function (``ValueError`` if it is not registered)."""
    return _ESTIMATORS.unregister(name)


def names() -> list[str]:
    """The registered estimator names, sorted."""
    return _ESTIMATORS.names()


def compute(name: str, rewards: torch.Tensor, *, group_size: int, **options):
    """Advantages of estimator ``name`` for ``rewards`` ``[B]`` in groups of ``group_size``.

    Returns ``[B]``, or ``[B, T]`` when a ``mask`` is given or the estimator is token-level;
    ``gae`` returns ``(advantages, returns)``. Raises ``ValueError`` for an unknown name or bad
    input, ``TypeError`` for an unknown or missing option.
    """
    if name not in _ESTIMATORS:
        raise ValueError(f"unknown advantage estimator {name!r}; available: {', '.join(names())}")
    fn = _ESTIMATORS.get(name)
    rewards = _check_rewards(rewards)
    check_group_size(group_size, rewards.shape[0])
    params = inspect.signature(fn).parameters
    accepted = [p for p, v in params.items() if v.kind is inspect.Parameter.KEYWORD_ONLY]
    for key in options:
        if key not in accepted and key != "mask":
            raise TypeError(
                f"advantage estimator {name!r} got an unexpected option {key!r}; "
                f"its options are: {', '.join(accepted + ([] if 'mask' in accepted else ['mask']))}")
    missing = [p for p in accepted if params[p].default is inspect.Parameter.empty and p not in options]
    if missing:
        raise TypeError(f"advantage estimator {name!r} needs option(s): {', '.join(missing)}")
    _check_options(rewards, options)
    mask = options.get("mask")
    if "mask" not in accepted:
        options.pop("mask", None)
    out = fn(rewards, group_size, **options)
    if mask is not None and "mask" not in accepted:
        out = torch.where(mask != 0, out[:, None], torch.zeros((), dtype=out.dtype, device=out.device))
    return out


# ----------------------------------------------------------------------------------------------
# validation

def _check_rewards(rewards) -> torch.Tensor:
    check_float("rewards", rewards)
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be a 1-D tensor of shape [B], got {shape_str(rewards)}")
    if rewards.shape[0] == 0:
        raise ValueError("rewards must hold at least one reward, got shape [0]")
    if not bool(torch.isfinite(rewards).all()):
        raise ValueError("rewards must be finite, found NaN or inf")
    return rewards.to(_out_dtype(rewards))


def _check_options(rewards: torch.Tensor, options: dict) -> None:
    B = rewards.shape[0]
    T = None
    for key in _TOKEN_OPTIONS:
        t = options.get(key)
        if t is None:
            continue
        check_tensor(key, t)
        if t.dim() != 2 or t.shape[0] != B:
            raise ValueError(f"{key} must have shape [B, T] with B={B} (one row per reward), got {shape_str(t)}")
        if T is not None and t.shape[1] != T:
            raise ValueError(f"{key} must have shape [{B}, {T}] like the other per-token options, got {shape_str(t)}")
        T = t.shape[1]
    for key in _SEQ_OPTIONS:
        t = options.get(key)
        if t is None:
            continue
        check_tensor(key, t)
        if tuple(t.shape) != (B,):
            raise ValueError(f"{key} must have shape [{B}] (one per reward), got {shape_str(t)}")
    for key in _SEQ_OPTIONS + _TOKEN_OPTIONS:
        t = options.get(key)
        if t is None:
            continue
        if t.device != rewards.device:
            raise ValueError(f"{key} is on {t.device} but rewards is on {rewards.device}; all inputs must be on one device")
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ValueError(f"{key} must be finite, found NaN or inf")


def _check_choice(name: str, x, choices) -> str:
    if x not in choices:
        raise ValueError(f"{name} must be one of {', '.join(repr(c) for c in choices)}, got {x!r}")
    return x


# ----------------------------------------------------------------------------------------------
# shared pieces

def _out_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _expand(per_group: torch.Tensor, G: int) -> torch.Tensor:
    """[B // G] -> [B]: one value per group repeated for each of its completions."""
    return per_group.repeat_interleave(G)


def _constant_groups(rewards: torch.Tensor, G: int) -> torch.Tensor:
    """[B] bool: the completion's group has all-equal rewards (this includes groups of size 1)."""
    g = rewards.view(-1, G)
    return _expand(g.amax(1) == g.amin(1), G)


def _zero_where(cond: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return torch.where(cond, torch.zeros_like(x), x)


def _group_centered(rewards: torch.Tensor, G: int) -> torch.Tensor:
    """``R - mean_g R``, exactly 0 for constant groups."""
    g = rewards.view(-1, G)
    centered = (g - g.mean(1, keepdim=True)).reshape(-1)
    return _zero_where(_constant_groups(rewards, G), centered)


def _group_std(rewards: torch.Tensor, G: int) -> torch.Tensor:
    """[B]: Bessel-corrected std of the completion's group (as ``torch.std``); 0 for G = 1."""
    if G == 1:
        return torch.zeros_like(rewards)
    return _expand(rewards.view(-1, G).std(1), G)


def _masked_whiten(x: torch.Tensor, valid: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """``(x - mean) / sqrt(var + eps)`` over the valid entries, with the unbiased variance
    (verl's ``masked_whiten``); 0 at invalid entries, and 0 everywhere when fewer than two entries
    are valid (never NaN).

    Computed on shifted, scaled data: x minus the midrange of its valid entries (so constant data
    gives exactly 0, where ``sum(x) / n != x`` in floating point would whiten rounding noise into
    O(1) advantages), divided by a power of two >= 1 (so squares cannot overflow for large
    values; ``eps`` is scaled alike). Both leave the formula unchanged in exact arithmetic."""
    m = valid.to(x.dtype)
    n = m.sum()
    if x.numel() == 0:
        return torch.zeros_like(x)
    inf = torch.tensor(float("inf"), dtype=x.dtype, device=x.device)
    lo, hi = torch.where(valid, x, inf).amin(), torch.where(valid, x, -inf).amax()
    mid = torch.where(n > 0, lo * 0.5 + hi * 0.5, 0.0)
    d = torch.where(valid, x - mid, 0.0)
    one = torch.ones((), dtype=x.dtype, device=x.device)
    scale = torch.ldexp(one, torch.frexp(d.abs().amax()).exponent.clamp(min=0))
    d = d / scale
    mean = (d * m).sum() / n.clamp(min=1)
    var = ((d - mean) ** 2 * m).sum() / (n - 1).clamp(min=1)
    return torch.where(valid, (d - mean) * torch.rsqrt(var + eps / scale / scale), torch.zeros_like(x))


def _last_valid_index(valid: torch.Tensor) -> torch.Tensor:
    """[B] index of the last valid token of each row (0 for rows with none)."""
    T = valid.shape[1]
    return (T - 1) - valid.flip(1).to(torch.int8).argmax(1)


def _place_at_last_valid(values: torch.Tensor, valid: torch.Tensor, dtype) -> torch.Tensor:
    """[B] -> [B, T]: ``values[b]`` at the last valid token of row b, 0 elsewhere and on empty rows."""
    out = torch.zeros(valid.shape, dtype=dtype, device=valid.device)
    if valid.shape[1] == 0:
        return out
    vals = values.to(dtype) * valid.any(1).to(dtype)
    return out.scatter(1, _last_valid_index(valid)[:, None], vals[:, None])


def _valid_first(valid: torch.Tensor) -> torch.Tensor:
    """[B, T] permutation of each row that lists its valid positions first, in order."""
    return torch.sort((~valid).to(torch.int8), dim=1, stable=True).indices


def _discounted_reverse_cumsum(x: torch.Tensor, discount: float) -> torch.Tensor:
    """``y[:, t] = sum_{s >= t} discount^(s - t) * x[:, s]`` for ``x`` ``[B, T]``, without a loop.

    Two-level matrix-of-powers scan: the T positions are cut into ``nb`` blocks of
    ``C = ceil(sqrt(T))``; one ``[C, C]`` upper-triangular matrix of powers gives every block's
    local discounted suffix sums (one batched matmul), one ``[nb, nb]`` matrix of powers of
    ``discount^C`` carries the block totals backwards, and the carry enters each position with
    ``discount^(C - j)``. Memory is O(B*T + T), not O(T^2); every weight is a power of a number in
    [0, 1], so nothing overflows and no division amplifies rounding.
    """
    B, T = x.shape
    if T == 0 or discount == 1.0:
        return x.flip(1).cumsum(1).flip(1)
    C = max(1, math.isqrt(T - 1) + 1)
    nb = -(-T // C)
    xb = torch.nn.functional.pad(x, (0, nb * C - T)).view(B, nb, C)
    # the weights are formed in float64 (they are tiny matrices) so long scans keep their precision
    d = torch.tensor(discount, dtype=torch.float64, device=x.device)

    def powers(n: int, base: torch.Tensor) -> torch.Tensor:
        # P[j, i] = base^(i - j) for i >= j, else 0 (torch.pow gives 0^0 = 1)
        idx = torch.arange(n, device=x.device, dtype=torch.float64)
        e = idx[None, :] - idx[:, None]
        P = torch.where(e >= 0, base.pow(e.clamp(min=0)), torch.zeros((), dtype=torch.float64, device=x.device))
        return P.to(x.dtype)

    local = xb @ powers(C, d).T                           # [B, nb, C] suffix sums within a block
    starts = local[:, :, 0] @ powers(nb, d.pow(C)).T      # [B, nb] full suffix sum at each block start
    carry = torch.cat([starts[:, 1:], starts.new_zeros(B, 1)], dim=1)
    j = torch.arange(C, device=x.device, dtype=torch.float64)
    out = local + d.pow(C - j).to(x.dtype)[None, None, :] * carry[:, :, None]
    return out.reshape(B, nb * C)[:, :T]


def _valid_token_scan(x: torch.Tensor, valid: torch.Tensor, discount: float) -> torch.Tensor:
    """Discounted reverse cumulative sum over the VALID tokens of each row only: masked positions
    are skipped (neither contribute nor count as a discount step) and come out 0."""
    order = _valid_first(valid)
    n = valid.sum(1, keepdim=True)
    packed_valid = torch.arange(x.shape[1], device=x.device)[None, :] < n
    packed = x.gather(1, order) * packed_valid
    scanned = _discounted_reverse_cumsum(packed, discount) * packed_valid
    return torch.zeros_like(x).scatter(1, order, scanned)


# ----------------------------------------------------------------------------------------------
# estimators

@register("grpo")
def grpo(rewards, group_size, *, scale: str = "group", eps: float = 1e-6):
    """GRPO (Shao et al. 2024, DeepSeekMath): ``A_i = (R_i - mean_g R) / (std R + eps)``.

    ``scale="group"``: std of the group (Bessel-corrected, as ``torch.std``); ``"batch"``: std of
    all rewards of the batch (TRL's ``scale_rewards="batch"``); ``"none"``: no division, which is
    Dr. GRPO (Liu et al. 2025, "Understanding R1-Zero-Like Training"). ``eps`` = 1e-6.
    """
    _check_choice("scale", scale, ("group", "batch", "none"))
    eps = check_positive("eps", eps)
    G = group_size
    centered = _group_centered(rewards, G)
    if scale == "group":
        centered = centered / (_group_std(rewards, G) + eps)
    elif scale == "batch" and rewards.shape[0] > 1:
        centered = centered / (rewards.std() + eps)
    return centered


@register("rloo")
def rloo(rewards, group_size):
    """RLOO (Kool et al. 2019; Ahmadian et al. 2024): leave-one-out baseline,
    ``A_i = R_i - mean_{j != i} R_j = (G R_i - sum_j R_j) / (G - 1)``."""
    G = group_size
    if G == 1:
        return torch.zeros_like(rewards)
    g = rewards.view(-1, G)
    # R_i - (S - R_i) / (G - 1): the same as (G R_i - S) / (G - 1) without forming G * R_i, which
    # overflows for rewards within a factor G of the dtype's largest value
    adv = (g - (g.sum(1, keepdim=True) - g) / (G - 1)).reshape(-1)
    return _zero_where(_constant_groups(rewards, G), adv)


@register("remax")
def remax(rewards, group_size, *, greedy_rewards):
    """ReMax (Li et al. 2024): the reward of the greedy completion of the same prompt is the
    baseline, ``A_i = R_i - R_greedy_i``. ``greedy_rewards`` ``[B]`` (repeat it within a group)."""
    return rewards - greedy_rewards.to(rewards.dtype)


@register("opo")
def opo(rewards, group_size, *, lengths):
    """OPO (Hao et al. 2025, "On-Policy RL with Optimal Reward Baseline"): the length-weighted
    group baseline ``A_i = R_i - sum_j |y_j| R_j / sum_j |y_j|``. ``lengths`` ``[B]`` >= 0; a group
    whose lengths are all 0 falls back to the plain mean."""
    if bool((lengths < 0).any()):
        raise ValueError("lengths must be >= 0")
    G = group_size
    g = rewards.view(-1, G)
    w = lengths.to(rewards.dtype).view(-1, G)
    wsum = w.sum(1, keepdim=True)
    baseline = torch.where(wsum > 0, (w * g).sum(1, keepdim=True) / wsum.clamp(min=1e-30),
                           g.mean(1, keepdim=True))
    return _zero_where(_constant_groups(rewards, G), (g - baseline).reshape(-1))


def _segment_token_scan(x: torch.Tensor, valid: torch.Tensor, discount: float) -> torch.Tensor:
    """Discounted reverse cumulative sum that restarts at every masked token (verl's REINFORCE++
    return): ``y_t = x_t + discount * y_{t+1}`` inside a run of valid tokens, cut where the next
    token is masked; masked positions come out 0. Without a loop: with ``Y`` the uncut scan and
    ``e`` the first masked position after ``t``, ``y_t = Y_t - discount^(e - t) * Y_e``."""
    B, T = x.shape
    x = torch.where(valid, x, torch.zeros_like(x))
    Y = _discounted_reverse_cumsum(x, discount)
    idx = torch.arange(T, device=x.device)
    cut = torch.where(valid, torch.full_like(idx, T).expand(B, T), idx.expand(B, T))
    nxt = cut.flip(1).cummin(1).values.flip(1)                      # first masked position >= t, or T
    Y_pad = torch.cat([Y, Y.new_zeros(B, 1)], dim=1)
    tail = Y_pad.gather(1, nxt)
    steps = (nxt - idx).to(x.dtype)
    d = torch.tensor(discount, dtype=x.dtype, device=x.device)
    return torch.where(valid, Y - d.pow(steps) * tail, torch.zeros_like(x))


@register("reinforce_pp")
def reinforce_pp(rewards, group_size, *, mask, kl=None, kl_coef=None, gamma: float = 1.0, masked: str = "skip"):
    """REINFORCE++ (Hu et al. 2025): token-level return-to-go of a KL-penalised reward, whitened.

    Per-token reward ``r_t = R * [t = last valid token] - kl_coef * kl_t`` on valid tokens;
    ``G_t = sum_{s >= t, valid} gamma^(k_s - k_t) r_s`` where ``k`` counts valid tokens (masked
    positions are skipped, which for right padding is the usual reset at EOS); the advantage is
    ``G`` whitened over all valid tokens of the batch (``(G - mean) / sqrt(var + 1e-8)``, unbiased
    var, as verl). ``kl`` ``[B, T]`` is a per-token KL estimate (e.g. ``logp_old - logp_ref``);
    ``kl_coef`` is required with it. Returns ``[B, T]``, 0 at masked positions.

    ``masked="skip"`` (default): the return flows across masked tokens (a multi-turn rollout's
    tool or user turns do not cut a turn off from the final reward). ``masked="reset"``: verl's
    recursion, which restarts the return at every masked token, so a turn before a masked span sees
    only its own per-token rewards (docs/formulas.md §7.1). The two agree for right padding.
    """
    gamma = check_number("gamma", gamma, low=0, high=1, expect="a number in [0, 1]")
    _check_choice("masked", masked, ("skip", "reset"))
    valid = mask != 0
    dtype = rewards.dtype
    r = _place_at_last_valid(rewards, valid, dtype)
    if kl is not None:
        if kl_coef is None:
            raise TypeError("reinforce_pp needs option kl_coef when kl is given")
        r = r - check_number("kl_coef", kl_coef) * kl.to(dtype) * valid
    elif kl_coef is not None:
        raise TypeError("reinforce_pp got kl_coef without kl")
    scan = _valid_token_scan if masked == "skip" else _segment_token_scan
    return _masked_whiten(scan(r, valid, gamma), valid)


@register("reinforce_pp_baseline")
def reinforce_pp_baseline(rewards, group_size, *, mask=None, constant_groups: str = "zero"):
    """REINFORCE++-baseline (Hu et al. 2025): ``A = R - mean_g R``, then whitened over the batch
    (``(A - mean) / sqrt(var + 1e-8)``, unbiased var). With ``mask`` ``[B, T]`` the advantage is
    broadcast to the valid tokens first and the whitening statistics are over valid tokens (verl);
    the result is ``[B, T]``.

    ``constant_groups="zero"`` (default): groups of size 1 or with all-equal rewards get exactly 0
    (they carry no preference between completions). ``"whiten"``: verl's behaviour, where their
    centred reward (0, or ``R`` itself for a group of one, whose baseline verl takes as 0) enters
    the whitening like any other and comes out as ``-mean / std``, not 0 (docs/formulas.md §7.1).
    """
    _check_choice("constant_groups", constant_groups, ("zero", "whiten"))
    G = group_size
    if constant_groups == "whiten":
        g = rewards.view(-1, G)
        centered = (g - g.mean(1, keepdim=True)).reshape(-1) if G > 1 else rewards
        keep = torch.ones_like(rewards, dtype=torch.bool)
    else:
        centered = _group_centered(rewards, G)
        keep = ~_constant_groups(rewards, G)
    if mask is None:
        return _masked_whiten(centered, torch.ones_like(keep)) * keep
    valid = mask != 0
    tokens = centered[:, None] * valid
    return _masked_whiten(tokens, valid) * keep[:, None]


@register("gae")
def gae(rewards, group_size, *, values, mask=None, token_rewards=None, gamma: float = 1.0,
        lam: float = 0.95, whiten: bool = False):
    """GAE (Schulman et al. 2016): ``delta_t = r_t + gamma V_{t+1} - V_t``,
    ``A_t = delta_t + gamma lam A_{t+1}``, ``returns = A + V``. Returns ``(advantages, returns)``,
    both ``[B, T]`` and 0 at masked positions.

    - Per-token reward: ``r_t = token_rewards_t + R * [t = last valid token]`` (``token_rewards``
      defaults to 0, so by default the sequence reward ``rewards`` sits on the last valid token;
      pass ``rewards = 0`` if ``token_rewards`` already holds it).
    - Masked positions are skipped: ``V_{t+1}`` is the value of the next VALID token, ``A_{t+1}``
      its advantage, and one skipped run of padding is not a discount step. After the last valid
      token the episode ends (``V = 0``). For right padding this is TRL's/verl's recursion.
    - The reverse scan is a discounted cumulative sum with discount ``gamma * lam`` over the
      packed valid tokens, computed with a two-level matrix of powers (no loop over time).
    - ``whiten=True`` whitens the advantages over valid tokens (verl does); returns are unwhitened.
    """
    gamma = check_number("gamma", gamma, low=0, high=1, expect="a number in [0, 1]")
    lam = check_number("lam", lam, low=0, high=1, expect="a number in [0, 1]")
    dtype = rewards.dtype
    valid = torch.ones(values.shape, dtype=torch.bool, device=values.device) if mask is None else mask != 0
    V = values.to(dtype) * valid
    r = _place_at_last_valid(rewards, valid, dtype)
    if token_rewards is not None:
        r = r + token_rewards.to(dtype) * valid
    # pack valid tokens to the front so "next valid token" is simply the next column
    order = _valid_first(valid)
    packed_valid = torch.arange(V.shape[1], device=V.device)[None, :] < valid.sum(1, keepdim=True)
    Vp = V.gather(1, order) * packed_valid
    rp = r.gather(1, order) * packed_valid
    V_next = torch.cat([Vp[:, 1:], Vp.new_zeros(Vp.shape[0], 1)], dim=1)
    delta = (rp + gamma * V_next - Vp) * packed_valid
    adv_p = _discounted_reverse_cumsum(delta, gamma * lam) * packed_valid
    adv = torch.zeros_like(V).scatter(1, order, adv_p)
    returns = (adv + V) * valid
    if whiten:
        adv = _masked_whiten(adv, valid)
    return adv, returns


@register("grpo_passk")
def grpo_passk(rewards, group_size, *, scale: str = "none", eps: float = 1e-6):
    """Pass@k-style max-reward advantage (credit only for the best of the group, as in pass@k /
    best-of-N training, e.g. Chen et al. 2025 "Pass@k Training for Adaptively Balancing Exploration
    and Exploitation"; Tang et al. 2025 "Optimizing Language Models for Inference Time
    Objectives using Reinforcement Learning"): the best completion of a group gets
    ``r_max - r_second``, every other completion 0. Ties at the top give 0 to everyone.

    ``scale="none"`` (default): the raw gap. ``scale="group"``: the gap divided by the group's std
    + ``eps`` (Bessel-corrected), verl's default ``norm_adv_by_std_in_grpo=True``. Groups of one
    give 0 (verl refuses them)."""
    _check_choice("scale", scale, ("none", "group"))
    eps = check_positive("eps", eps)
    G = group_size
    if G == 1:
        return torch.zeros_like(rewards)
    g = rewards.view(-1, G)
    top = g.topk(2, dim=1)
    gap = top.values[:, 0] - top.values[:, 1]
    if scale == "group":
        gap = gap / (g.std(1) + eps)
    adv = torch.zeros_like(g).scatter(1, top.indices[:, :1], gap[:, None])
    return adv.reshape(-1)


@register("gpg")
def gpg(rewards, group_size, *, scale: str = "none", eps: float = 1e-6, alpha: str = "valid_groups"):
    """GPG (Chu et al. 2025, "GPG: A Simple and Strong Reinforcement Learning Baseline for Model
    Reasoning"): ``A_i = alpha * (R_i - mean_g R) / F_norm`` with the gradient-bias correction
    ``alpha = B / (B - M)``, ``M`` = number of completions in groups with zero reward std (which,
    for equal-size groups, is the inverse of the fraction of valid groups; ``alpha = 1`` when every
    group is invalid, whose advantages are 0 anyway). ``F_norm = 1`` (``scale="none"``, the
    paper's default) or the group std + eps (``scale="group"``).

    ``alpha="valid_groups"`` (default) follows the paper. ``alpha="nonzero_rewards"`` is verl's
    ``gpg``: ``alpha = B / max(#(R != 0), 1)``, which equals the paper's only for 0/1 rewards where
    every group with a success is also mixed (docs/formulas.md §7.1).
    """
    _check_choice("scale", scale, ("none", "group"))
    _check_choice("alpha", alpha, ("valid_groups", "nonzero_rewards"))
    eps = check_positive("eps", eps)
    G = group_size
    invalid = _constant_groups(rewards, G)
    B = rewards.shape[0]
    if alpha == "nonzero_rewards":
        alpha = B / (rewards != 0).sum().to(rewards.dtype).clamp(min=1)
    else:
        n_valid = (~invalid).sum().to(rewards.dtype)
        alpha = torch.where(n_valid > 0, B / n_valid.clamp(min=1), torch.ones_like(n_valid))
    adv = _group_centered(rewards, G)
    if scale == "group":
        adv = adv / (_group_std(rewards, G) + eps)
    return alpha * adv


@register("w_reinforce")
def w_reinforce(rewards, group_size, *, positive_weight: float = 0.1, threshold: float = 0.5):
    """Weighted REINFORCE (Zhu et al. 2025, "The Surprising Effectiveness of Negative Reinforcement in
    LLM Reasoning"): with the REINFORCE loss (``loss_type="reinforce"``) the objective is
    ``positive_weight * PSR + NSR``, positive-sample reinforcement down-weighted against
    negative-sample reinforcement (docs/formulas.md §7.2)::

        A_i = positive_weight   if R_i > threshold   (a correct completion)
        A_i = -1                otherwise

    ``positive_weight`` ``>= 0`` (the paper's lambda, 0.1); ``0`` is pure NSR, ``1`` plain
    REINFORCE on +-1 rewards. No group baseline (``group_size`` is only checked)."""
    lam = check_number("positive_weight", positive_weight, low=0)
    threshold = check_number("threshold", threshold)
    return torch.where(rewards > threshold, torch.full_like(rewards, lam), torch.full_like(rewards, -1.0))


@register("positive_amplification")
def positive_amplification(rewards, group_size, *, alpha: float = 3.0):
    """R^3L's positive amplification (Shi et al. 2026, "R^3L: Reflect-then-Retry Reinforcement
    Learning with Language-Guided Exploration, Pivotal Credit, and Positive Amplification";
    docs/formulas.md §7.3): on hard prompts failures dominate a group and drown the few successes,
    so the group-centred advantage of a better-than-average completion is scaled up::

        c_i = R_i - mean_g R            (no std division: R^3L's OPMD-style baseline)
        A_i = alpha * c_i   if c_i > 0   else   c_i

    ``alpha`` ``>= 1`` (R^3L: 3). Constant groups and groups of one give 0."""
    alpha = check_number("alpha", alpha, low=1)
    c = _group_centered(rewards, group_size)
    return torch.where(c > 0, alpha * c, c)


@register("canon")
def canon(rewards, group_size, *, metric, inter_weight: float = 0.5):
    """CANON (Chen et al. 2025, "Conditional Advantage Estimation for Reinforcement Learning in Large
    Reasoning Models"; docs/formulas.md §7.3): each group is split by a target ``metric`` ``[B]``
    (response length, mean entropy, ...) into its lower and its higher half, without presuming which
    direction is better::

        inter_i = R_i - mean(R of the other half)     # which metric trend pays
        intra_i = R_i - mean(R of its own half)       # the better response within the trend
        A_i     = inter_weight * inter_i + (1 - inter_weight) * intra_i

    The halves: the ``ceil(G / 2)`` completions of smallest metric (ties: the earlier one) and the
    rest. With ``G`` even, ``inter_weight = 0.5`` is Dr.GRPO's ``R_i - mean_g R`` exactly;
    ``inter_weight`` in ``[0, 1]`` (the paper anneals it between the two). Constant groups and
    groups of one give 0."""
    w = check_number("inter_weight", inter_weight, low=0, high=1)
    G = group_size
    if G == 1:
        return torch.zeros_like(rewards)
    g = rewards.view(-1, G)
    order = torch.sort(metric.to(rewards.dtype).view(-1, G), dim=1, stable=True).indices
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(G, device=order.device).expand_as(order))
    low = rank < (G + 1) // 2                                            # [B // G, G] bool
    lowf = low.to(rewards.dtype)
    n_low, n_high = (G + 1) // 2, G // 2
    mean_low = (g * lowf).sum(1, keepdim=True) / n_low
    mean_high = (g * (1 - lowf)).sum(1, keepdim=True) / n_high
    own = torch.where(low, mean_low, mean_high)
    other = torch.where(low, mean_high, mean_low)
    adv = (w * (g - other) + (1 - w) * (g - own)).reshape(-1)
    return _zero_where(_constant_groups(rewards, G), adv)


@register("reward")
def reward_as_advantage(rewards, group_size):
    """The reward itself, ``A_i = R_i`` (no baseline; ``group_size`` is only checked): for the
    losses that read the reward as a label, ``pacs`` (docs/formulas.md §3.12)."""
    return rewards.clone()


@register("drpo")
def drpo(rewards, group_size, *, lengths, max_length=None, lam: float = 0.1, correct=None,
         scores=None, tau: float = 10.0):
    """DRPO (Li, Chen, Lin, Yang 2025, "DRPO: Efficient Reasoning via Decoupled Reward Policy
    Optimization"): length credit normalised only among the group's correct completions.

    DRPO minimises, per prompt, ``-sum_{i in P} w_i s_i + tau log mean_{i in N} exp(s_i / tau)``
    with ``s_i`` the completion's mean token log-prob, ``P``/``N`` the correct/incorrect
    completions and ``w_i = exp(-L_i / (C lam)) / sum_{j in P} exp(-L_j / (C lam))`` (the official
    code's ``exp((1 - L/C) / tau2)``, normalised). Its gradient is ``-sum_i A_i grad s_i`` with

        A_i = w_i                                  for correct i   (sums to +1 over P)
        A_i = -softmax_{j in N}(s_j / tau)_i       for incorrect i (sums to -1 over N)

    which is what this returns: a correct completion never gets a negative advantage, shorter
    correct ones get more. Without ``scores`` ``[B]`` (the detached ``s_i``) the negatives share
    ``-1 / |N|`` (the ``tau -> inf`` limit, and exact when the scores are equal, e.g. on-policy at
    the first step). Groups without both a correct and an incorrect completion get 0, as in DRPO.
    Used with a REINFORCE loss and ``seq-mean-token-mean`` aggregation it reproduces DRPO's
    gradient up to the constant factor ``group_size``.

    Options: ``lengths`` ``[B]``; ``max_length`` ``C`` (default: the longest completion of the
    batch; DRPO uses the maximum response length); ``lam`` (DRPO's ``tau2``, 0.1); ``correct``
    ``[B]`` bool (default ``rewards > 0``); ``scores`` ``[B]``; ``tau`` (10).
    """
    lam = check_positive("lam", lam)
    tau = check_positive("tau", tau)
    if bool((lengths < 0).any()):
        raise ValueError("lengths must be >= 0")
    G = group_size
    dtype = rewards.dtype
    L = lengths.to(dtype)
    C = float(L.max()) if max_length is None else check_positive("max_length", max_length)
    C = max(C, 1.0)
    pos = (rewards > 0) if correct is None else correct.bool()
    pos = pos.view(-1, G)
    neg = ~pos
    has_both = pos.any(1, keepdim=True) & neg.any(1, keepdim=True)
    neg_inf = torch.tensor(float("-inf"), dtype=dtype, device=rewards.device)
    w = torch.softmax(torch.where(pos, -L.view(-1, G) / (C * lam), neg_inf), dim=1)
    logits_neg = torch.zeros_like(L).view(-1, G) if scores is None else scores.to(dtype).view(-1, G) / tau
    q = torch.softmax(torch.where(neg, logits_neg, neg_inf), dim=1)
    adv = torch.where(pos, w, -q)
    adv = torch.where(has_both, adv, torch.zeros_like(adv))  # also clears the NaN of empty softmaxes
    return adv.reshape(-1)


# ----------------------------------------------------------------------------------------------
# multi-reward aggregation

AGGREGATION_MODES = ("sum_then_normalize", "normalize_then_sum", "ensemble_min", "ensemble_mean_std", "gated", "par")

def aggregate_rewards(rewards: torch.Tensor, weights=None, *, mode: str = "sum_then_normalize",
                      group_size: int, eps: float = 1e-6, lam: float = 1.0, gate: float = 0.5) -> torch.Tensor:
    """Advantages ``[B]`` from ``K`` rewards per completion, ``rewards`` ``[B, K]``.

    - ``"sum_then_normalize"`` (GRPO with a summed reward): ``R = sum_k w_k r_k``, then
      ``(R - mean_g R) / (std_g R + eps)``.
    - ``"ensemble_min"`` / ``"ensemble_mean_std"`` (Coste et al. 2024, "Reward Model Ensembles Help
      Mitigate Overoptimization"): the ``K`` columns are an ensemble of reward models scoring the
      same completion; ``R = min_k r_k`` (worst case) or ``R = mean_k r_k - lam * std_k r_k``
      (uncertainty-weighted, Bessel std, 0 for ``K = 1``), then GRPO-normalised. ``weights`` are
      not used.
    - ``"gated"`` (2025, "Stabilizing Long-term Multi-turn Reinforcement Learning with
      Gated Rewards", G-RA): column 0 is the outcome reward, the others step/auxiliary rewards,
      which count only when the outcome reaches ``gate``: ``R = r_0 + [r_0 >= gate] sum_{k>0} w_k
      r_k`` (``weights[0]`` is ignored), then GRPO-normalised.
    - ``"par"`` (Fu et al. 2025, "Reward Shaping to Mitigate Reward Hacking in RLHF"): column 0 is
      the completion's reward, the other ``K - 1 >= 1`` columns the rewards of reference completions
      of the same prompt; ``R = mean_{k>0} sigmoid(r_0 - r_k)`` (``pyrl.rewards.preference_as_reward``),
      then GRPO-normalised. ``weights`` are not used.
    - ``"normalize_then_sum"`` (GDPO, Liu et al. 2026, "Group reward-Decoupled Normalization Policy
      Optimization"): each reward is normalised within its group on its own,
      ``z_k = (r_k - mean_g r_k) / (std_g r_k + eps)`` (0 for constant groups), then
      ``A = sum_k w_k z_k`` is normalised over the batch, ``(A - mean A) / (std A + eps)``. Distinct
      reward combinations keep distinct advantages instead of collapsing.

    ``weights`` ``[K]`` defaults to all ones. Groups where every reward is constant get 0.
    """
    check_float("rewards", rewards)
    if rewards.dim() != 2:
        raise ValueError(f"rewards must have shape [B, K], got {shape_str(rewards)}")
    B, K = rewards.shape
    if B == 0 or K == 0:
        raise ValueError(f"rewards must have shape [B, K] with B, K >= 1, got {shape_str(rewards)}")
    if not bool(torch.isfinite(rewards).all()):
        raise ValueError("rewards must be finite, found NaN or inf")
    check_group_size(group_size, B)
    _check_choice("mode", mode, AGGREGATION_MODES)
    eps = check_positive("eps", eps)
    lam = check_number("lam", lam, low=0)
    gate = check_number("gate", gate)
    dtype = _out_dtype(rewards)
    r = rewards.to(dtype)
    if weights is None:
        w = torch.ones(K, dtype=dtype, device=r.device)
    else:
        w = torch.as_tensor(weights, dtype=dtype, device=r.device)
        if tuple(w.shape) != (K,):
            raise ValueError(f"weights must have shape [{K}] (one per reward column), got {shape_str(w)}")
        if not bool(torch.isfinite(w).all()):
            raise ValueError("weights must be finite, found NaN or inf")
    G = group_size
    if mode == "sum_then_normalize":
        return grpo(r @ w, G, scale="group", eps=eps)
    if mode == "ensemble_min":
        return grpo(r.amin(1), G, scale="group", eps=eps)
    if mode == "ensemble_mean_std":
        std = r.std(1) if K > 1 else torch.zeros(B, dtype=dtype, device=r.device)
        return grpo(r.mean(1) - lam * std, G, scale="group", eps=eps)
    if mode == "par":
        if K < 2:
            raise ValueError(f"mode='par' needs the completion's reward and at least one reference reward "
                             f"(rewards [B, K >= 2]), got K={K}")
        return grpo(torch.sigmoid(r[:, :1] - r[:, 1:]).mean(1), G, scale="group", eps=eps)
    if mode == "gated":
        outcome = r[:, 0]
        return grpo(outcome + (outcome >= gate).to(dtype) * (r[:, 1:] @ w[1:]), G, scale="group", eps=eps)
    g = r.view(-1, G, K)
    constant = g.amax(1) == g.amin(1)                                   # [B // G, K]
    std = g.std(1) if G > 1 else torch.zeros_like(constant, dtype=dtype)
    z = (g - g.mean(1, keepdim=True)) / (std[:, None, :] + eps)
    z = torch.where(constant[:, None, :], torch.zeros_like(z), z)
    total = z.reshape(B, K) @ w
    if B > 1:
        total = (total - total.mean()) / (total.std() + eps)
    return _zero_where(_expand(constant.all(1), G), total)
