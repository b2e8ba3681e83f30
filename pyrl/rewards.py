"""Rewards, length shaping, dynamic sampling and pass@k.

Text rewards are registered by name, like the advantage estimators::

    R = pyrl.rewards.compute("math_verify", completions, ground_truth=answers)   # float32 [B]
    pyrl.rewards.names()  # ['exact_match', 'format', 'math_verify']

``completions`` is a list of strings (or of chat messages, whose last ``content`` is scored).

Length shaping, dynamic sampling and pass@k are plain tensor functions (tensor in, tensor out),
vectorised over the batch and device-agnostic:

- ``dapo_overlong_penalty``, ``dler_truncation``, ``grpo_lambda_length_penalty``,
  ``cosine_length_reward``, ``HistoryAwareLengthReward`` (HAPO), ``mask_truncated_completions``,
  ``laser_d_length_reward``, ``difficulty_aware_truncation``, ``decaying_budget``,
  ``wrong_answer_length_penalty`` (APO);
- ``filter_zero_variance_groups``, ``zero_variance_group_rate``, ``DynamicSampler`` (DAPO);
- ``pass_at_k`` (Chen et al. 2021).
"""
from __future__ import annotations

import inspect
import math
import re
import threading
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from ._validate import (check_group_size, check_number, check_positive, check_positive_int, check_same_device,
                        check_tensor, shape_str)
from .registry import Registry

__all__ = [
    "compute", "get", "names", "register", "extract_answer",
    "dapo_overlong_penalty", "dler_truncation", "grpo_lambda_length_penalty", "laser_d_length_reward",
    "difficulty_aware_truncation", "decaying_budget", "wrong_answer_length_penalty",
    "cosine_length_reward", "HistoryAwareLengthReward", "mask_truncated_completions",
    "filter_zero_variance_groups", "zero_variance_group_rate", "DynamicSampler", "DynamicSample",
    "pass_at_k", "unregister", "majority_vote", "preference_as_reward",
]

_REWARDS: Registry[Callable] = Registry("reward")

MATH_VERIFY_INSTALL = "pip install math-verify"


def register(name: str, *, replace: bool = False):
    """Decorator: ``@register("name")`` makes ``fn(completions, **kw) -> float tensor [B]``
    selectable by ``compute(name, ...)``. A name already taken raises ``ValueError`` unless
    ``replace=True``."""
    return _REWARDS.register(name, replace=replace)


def unregister(name: str) -> Callable:
    """Remove reward ``name`` and return its function (``ValueError`` if it is not registered)."""
    return _REWARDS.unregister(name)


def names() -> list[str]:
    """The registered reward names, sorted."""
    return _REWARDS.names()


def get(name: str) -> Callable:
    """The function registered as ``name`` (``ValueError`` naming the registered ones otherwise)."""
    return _REWARDS.get(name)


def compute(name: str, completions: Sequence, **kw) -> torch.Tensor:
    """Reward ``name`` of each completion: a float32 tensor ``[B]`` (on ``device`` if given)."""
    if name not in _REWARDS:
        raise ValueError(f"unknown reward {name!r}; available: {', '.join(names())}")
    fn = _REWARDS.get(name)
    texts = _texts(completions)
    device = kw.pop("device", None)
    params = inspect.signature(fn).parameters
    accepted = [p for p, v in params.items() if v.kind is inspect.Parameter.KEYWORD_ONLY]
    for key in kw:
        if key not in accepted:
            raise TypeError(f"reward {name!r} got an unexpected option {key!r}; its options are: "
                            f"{', '.join(accepted + ['device'])}")
    out = fn(texts, **kw)
    return torch.as_tensor(out, dtype=torch.float32, device=device)


def _texts(completions) -> list[str]:
    if isinstance(completions, (str, bytes)) or not isinstance(completions, Sequence):
        raise TypeError(f"completions must be a list of strings, got {type(completions).__name__}")
    texts = []
    for i, c in enumerate(completions):
        if isinstance(c, str):
            texts.append(c)
        elif isinstance(c, Sequence) and c and isinstance(c[-1], dict) and "content" in c[-1]:
            texts.append(str(c[-1]["content"]))  # chat format: score the last message
        else:
            raise TypeError(f"completions[{i}] must be a string or a list of chat messages, got {type(c).__name__}")
    return texts


def _check_answers(name: str, answers, n: int) -> list[str]:
    if isinstance(answers, (str, bytes)) or not isinstance(answers, Sequence):
        raise TypeError(f"{name} must be a list of strings, one per completion, got {type(answers).__name__}")
    if len(answers) != n:
        raise ValueError(f"{name} must have {n} entries (one per completion), got {len(answers)}")
    return [str(a) for a in answers]


# ----------------------------------------------------------------------------------------------
# text rewards

_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+)?|[-+]?\.\d+")


def extract_answer(text: str) -> str | None:
    """The final answer of a completion: the content of the last ``\\boxed{...}`` (or
    ``\\fbox{...}``; nested braces are matched), else the last plain number (``-12``, ``3,000``,
    ``2.5``, ``3/4``), else ``None``."""
    if not isinstance(text, str):
        raise TypeError(f"text must be a string, got {type(text).__name__}")
    for m in reversed(list(_BOXED.finditer(text))):
        depth, start = 1, m.end()
        for i in range(start, len(text)):
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            if depth == 0:
                return text[start:i].strip()
        # an unclosed \boxed{ : try an earlier one
    numbers = _NUMBER.findall(text)
    return numbers[-1] if numbers else None


def _normalize(ans: str) -> str:
    s = ans.strip().strip("$").strip()
    s = s.replace(",", "").replace(" ", "").rstrip(".")
    try:
        return repr(float(s))
    except ValueError:
        return s


def _math_verify_module():
    try:
        import math_verify
    except ImportError as e:
        raise ImportError(f"the math_verify reward needs the math-verify package: {MATH_VERIFY_INSTALL}") from e
    return math_verify


@register("math_verify")
def math_verify(completions: list[str], *, ground_truth: Sequence[str], timeout_seconds: int = 5) -> list[float]:
    """Verifiable math reward: 1.0 when the completion's final answer (``extract_answer``) is
    mathematically equal to ``ground_truth`` (checked by the ``math-verify`` package: numbers,
    fractions, LaTeX expressions, sets, ...), else 0.0. A ground truth written with ``\\boxed{}``
    is unboxed first. When math-verify cannot parse either side the answers are compared as
    normalised strings. Off the main thread math-verify's signal-based timeout is unavailable and
    is switched off."""
    mv = _math_verify_module()
    answers = _check_answers("ground_truth", ground_truth, len(completions))
    timeout = timeout_seconds if threading.current_thread() is threading.main_thread() else None
    out = []
    for text, gt in zip(completions, answers):
        pred = extract_answer(text)
        if pred is None:
            out.append(0.0)
            continue
        gold = extract_answer(gt) if _BOXED.search(gt) else gt.strip()
        gold = gold if gold is not None else gt.strip()
        try:
            g = mv.parse(f"${gold}$", parsing_timeout=timeout)
            p = mv.parse(f"${pred}$", parsing_timeout=timeout)
            if g and p:
                out.append(1.0 if mv.verify(g, p, timeout_seconds=timeout) else 0.0)
                continue
        except Exception:  # a malformed answer is a wrong answer, never a crashed step
            pass
        out.append(1.0 if _normalize(pred) == _normalize(gold) else 0.0)
    return out


THINK_ANSWER_PATTERN = r"<think>.*?</think>\s*<answer>.*?</answer>"


@register("format")
def format_reward(completions: list[str], *, pattern: str = THINK_ANSWER_PATTERN) -> list[float]:
    """Format reward: 1.0 when the whole completion (surrounding whitespace stripped) matches
    ``pattern`` (``re.fullmatch``, ``re.DOTALL``), else 0.0. The default is DeepSeek-R1's
    ``<think>...</think><answer>...</answer>``."""
    try:
        rx = re.compile(pattern, re.DOTALL)
    except (re.error, TypeError) as e:
        raise ValueError(f"pattern must be a valid regular expression, got {pattern!r}: {e}") from e
    return [1.0 if rx.fullmatch(c.strip()) else 0.0 for c in completions]


@register("exact_match")
def exact_match(completions: list[str], *, ground_truth: Sequence[str], ignore_case: bool = False,
                extract: bool = False) -> list[float]:
    """1.0 when the completion (or, with ``extract=True``, its ``extract_answer``) equals
    ``ground_truth`` after stripping surrounding whitespace (and case with ``ignore_case``)."""
    answers = _check_answers("ground_truth", ground_truth, len(completions))

    def norm(s):
        s = s.strip()
        return s.casefold() if ignore_case else s

    out = []
    for text, gt in zip(completions, answers):
        pred = extract_answer(text) if extract else text
        out.append(1.0 if pred is not None and norm(pred) == norm(gt) else 0.0)
    return out


CONFIDENCE_PATTERN = r"<confidence>\s*([-+]?[0-9]*\.?[0-9]+)\s*</confidence>"


@register("brier")
def brier_calibration(completions: list[str], *, ground_truth: Sequence[str],
                      pattern: str = CONFIDENCE_PATTERN) -> list[float]:
    """Calibration reward (Damani et al. 2025, "Beyond Binary Rewards: Training LMs to Reason About
    Their Uncertainty", RLCR; docs/formulas.md §8.1): correctness plus the Brier score of the
    completion's stated confidence ``q``::

        R = c - (q - c)^2,    c = 1 if the answer is right else 0

    ``q`` is the number captured by ``pattern`` (the last match; default ``<confidence>0.8</confidence>``),
    clipped to ``[0, 1]``; a completion that states none gets ``q = 0``. The answer is
    ``extract_answer`` of the completion with the confidence tags removed, compared with
    ``ground_truth`` as normalised strings (numbers by value). ``R`` lies in ``[-1, 1]``."""
    try:
        rx = re.compile(pattern, re.DOTALL)
    except (re.error, TypeError) as e:
        raise ValueError(f"pattern must be a valid regular expression, got {pattern!r}: {e}") from e
    if rx.groups < 1:
        raise ValueError(f"pattern must capture the confidence in a group, got {pattern!r}")
    answers = _check_answers("ground_truth", ground_truth, len(completions))
    out = []
    for text, gt in zip(completions, answers):
        found = rx.findall(text)
        q = min(max(float(found[-1] if isinstance(found[-1], str) else found[-1][0]), 0.0), 1.0) if found else 0.0
        pred = extract_answer(rx.sub(" ", text))
        c = 1.0 if pred is not None and _normalize(pred) == _normalize(gt) else 0.0
        out.append(c - (q - c) ** 2)
    return out


@register("majority_vote")
def majority_vote(completions: list[str], *, prompts: Sequence[str]) -> list[float]:
    """Label-free pseudo-labels by majority vote (Co-Reward, Zhang et al. 2025, "Co-Reward:
    Self-supervised Reinforcement Learning for Large Language Model Reasoning via Contrastive
    Agreement"; docs/formulas.md §8.3): the completions of one prompt (equal ``prompts`` entries)
    vote with their ``extract_answer``; each scores 1 when its answer is the group's most common
    one (ties: the answer that appeared first), else 0. No answer scores 0 and casts no vote."""
    keys = _check_answers("prompts", prompts, len(completions))
    answers = [extract_answer(t) for t in completions]
    votes: dict = {}
    for key, a in zip(keys, answers):
        if a is not None:
            tally = votes.setdefault(key, {})
            tally[_normalize(a)] = tally.get(_normalize(a), 0) + 1
    winner = {key: max(tally, key=tally.get) for key, tally in votes.items()}  # max keeps the first of equals
    return [1.0 if a is not None and _normalize(a) == winner.get(key) else 0.0 for key, a in zip(keys, answers)]


def preference_as_reward(rewards: torch.Tensor, reference) -> torch.Tensor:
    """Preference as reward, PAR (Fu et al. 2025, "Reward Shaping to Mitigate Reward Hacking in
    RLHF"; docs/formulas.md §8.3): the reward model's score becomes the probability that the
    completion is preferred to a reference one, bounded and steepest near the reference::

        R' = mean_m sigmoid(R - R_ref_m)

    ``rewards`` ``[B]``; ``reference`` ``[B]``, ``[B, M]`` (M reference completions per prompt) or a
    number. Returns ``[B]``."""
    _check_1d("rewards", rewards)
    r = rewards.to(_float_out(rewards))
    if isinstance(reference, torch.Tensor):
        check_same_device(rewards=rewards, reference=reference)
        check_tensor("reference", reference)
        ref = reference.to(r.dtype)
        if ref.dim() == 1:
            ref = ref.unsqueeze(1)
        if ref.dim() != 2 or ref.shape[0] != r.shape[0] or ref.shape[1] == 0:
            raise ValueError(f"reference must have shape [{r.shape[0]}] or [{r.shape[0]}, M] with M >= 1, "
                             f"got {shape_str(reference)}")
        if not bool(torch.isfinite(ref).all()):
            raise ValueError("reference must be finite, found NaN or inf")
    else:
        ref = torch.full((r.shape[0], 1), check_number("reference", reference), dtype=r.dtype, device=r.device)
    return torch.sigmoid(r.unsqueeze(1) - ref).mean(1)


# ----------------------------------------------------------------------------------------------
# length shaping (tensor in, tensor out)

def _float_out(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _check_1d(name: str, t, n: int | None = None) -> torch.Tensor:
    check_tensor(name, t)
    if t.dim() != 1:
        raise ValueError(f"{name} must have shape [B], got {shape_str(t)}")
    if n is not None and t.shape[0] != n:
        raise ValueError(f"{name} must have shape [{n}] (one per completion), got {shape_str(t)}")
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} must be finite, found NaN or inf")
    return t


def _check_lengths(lengths, n: int | None = None) -> torch.Tensor:
    _check_1d("lengths", lengths, n)
    if bool((lengths < 0).any()):
        raise ValueError("lengths must be >= 0")
    return lengths


def dapo_overlong_penalty(lengths: torch.Tensor, max_len: int, cache_len: int) -> torch.Tensor:
    """DAPO's soft overlong punishment (Yu et al. 2025; docs/formulas.md §8), added to the reward:
    ``0`` if ``|y| <= L_max - L_cache``; ``(L_max - L_cache - |y|) / L_cache`` if ``|y| <= L_max``;
    ``-1`` beyond. ``lengths`` ``[B]`` -> float ``[B]``."""
    _check_lengths(lengths)
    max_len = check_positive("max_len", max_len)
    cache_len = check_positive("cache_len", cache_len)
    if cache_len > max_len:
        raise ValueError(f"cache_len must be <= max_len, got cache_len={cache_len:g} > max_len={max_len:g}")
    L = lengths.to(_float_out(lengths))
    soft = (max_len - cache_len - L) / cache_len
    return torch.where(L <= max_len - cache_len, torch.zeros_like(L),
                       torch.where(L <= max_len, soft, torch.full_like(L, -1.0)))


def dler_truncation(rewards: torch.Tensor, lengths: torch.Tensor, budget: int) -> torch.Tensor:
    """DLER's truncation penalty (Liu et al. 2025, "DLER: Doing Length pEnalty Right"): a
    completion longer than the length ``budget`` gets reward 0, any other keeps its reward.
    ``rewards``, ``lengths`` ``[B]`` -> ``[B]``."""
    check_same_device(rewards=rewards, lengths=lengths)
    _check_1d("rewards", rewards)
    _check_lengths(lengths, rewards.shape[0])
    budget = check_positive("budget", budget)
    r = rewards.to(_float_out(rewards))
    return torch.where(lengths > budget, torch.zeros_like(r), r)


def grpo_lambda_length_penalty(correct: torch.Tensor, lengths: torch.Tensor, group_size: int, *,
                               threshold: float = 0.5, top_fraction: float | None = None,
                               length_coef: float = 1.0) -> torch.Tensor:
    """GRPO-lambda (Dai, Liu, Si 2025, "Stable Reinforcement Learning for Efficient Reasoning"):
    the length penalty is switched on only for groups that are already accurate enough.

    Returns the reward ``[B]``: ``c_i + length_coef * l_i`` in a selected group, ``c_i`` (the 0/1
    correctness) in the others. ``l_i`` is Kimi k1.5's length reward within the group,
    ``lam_i = 0.5 - (L_i - L_min) / (L_max - L_min)``, ``l_i = lam_i`` if correct else
    ``min(0, lam_i)`` (0 when all lengths are equal). A group is selected when its fraction of
    correct completions is ``>= threshold``; with ``top_fraction`` set instead, the
    ``ceil(top_fraction * groups)`` groups of highest accuracy in the batch are selected (the
    paper's batch-wise top-lambda rule; ties broken by position).
    """
    check_same_device(correct=correct, lengths=lengths)
    _check_1d("correct", correct)
    n = correct.shape[0]
    _check_lengths(lengths, n)
    G = check_group_size(group_size, n)
    length_coef = check_number("length_coef", length_coef)
    c = (correct.to(torch.float32) > 0.5) if correct.is_floating_point() else correct.bool()
    dtype = torch.float64 if lengths.dtype == torch.float64 else torch.float32
    cf = c.to(dtype).view(-1, G)
    L = lengths.to(dtype).view(-1, G)
    lo, hi = L.amin(1, keepdim=True), L.amax(1, keepdim=True)
    span = hi - lo
    lam = torch.where(span > 0, 0.5 - (L - lo) / span.clamp(min=1e-30), torch.zeros_like(L))
    length_reward = torch.where(c.view(-1, G), lam, lam.clamp(max=0))
    accuracy = cf.mean(1)
    if top_fraction is None:
        selected = accuracy >= check_number("threshold", threshold, low=0, high=1)
    else:
        frac = check_number("top_fraction", top_fraction, low=0, high=1)
        k = min(accuracy.shape[0], math.ceil(frac * accuracy.shape[0]))
        order = torch.sort(accuracy, descending=True, stable=True).indices
        selected = torch.zeros_like(accuracy, dtype=torch.bool).scatter(0, order[:k], True)
    return (cf + length_coef * length_reward * selected[:, None]).reshape(-1)


def cosine_length_reward(correct: torch.Tensor, lengths: torch.Tensor, max_len: int, *,
                         correct_short: float = 1.0, correct_long: float = 0.5,
                         wrong_short: float = -1.0, wrong_long: float = -0.5,
                         exceed: float | None = None) -> torch.Tensor:
    """Cosine length-scaled reward (Yeo et al. 2025, "Demystifying Long Chain-of-Thought Reasoning
    in LLMs"): ``CosFn(t, T, r_T, r_0) = r_T + (r_0 - r_T)(1 + cos(pi t / T)) / 2`` with ``t`` the
    length and ``T = max_len``, going from ``r_0`` at length 0 to ``r_T`` at ``max_len``.

    Correct completions go from ``correct_short`` down to ``correct_long`` (short correct beats
    long correct); wrong ones from ``wrong_short`` up to ``wrong_long`` (long wrong beats short
    wrong: keep thinking when unsure). Lengths at or beyond ``max_len`` get ``exceed`` when given
    (the paper's ``r_e``), else the ``max_len`` value. The paper's values are 2, 1, -10, 0,
    ``exceed=-10``; the defaults here are open-r1's milder 1, 0.5, -1, -0.5.
    """
    check_same_device(correct=correct, lengths=lengths)
    _check_1d("correct", correct)
    _check_lengths(lengths, correct.shape[0])
    T = check_positive("max_len", max_len)
    vals = {k: check_number(k, v) for k, v in dict(correct_short=correct_short, correct_long=correct_long,
                                                   wrong_short=wrong_short, wrong_long=wrong_long).items()}
    c = (correct > 0.5) if correct.is_floating_point() else correct.bool()
    dtype = torch.float64 if lengths.dtype == torch.float64 else torch.float32
    L = lengths.to(dtype)
    cos = torch.cos(math.pi * (L / T).clamp(max=1.0))
    r0 = torch.where(c, vals["correct_short"], vals["wrong_short"]).to(dtype)
    rT = torch.where(c, vals["correct_long"], vals["wrong_long"]).to(dtype)
    out = rT + 0.5 * (r0 - rT) * (1 + cos)
    if exceed is not None:
        out = torch.where(L >= T, torch.full_like(out, check_number("exceed", exceed)), out)
    return out


def _correct_and_group_accuracy(rewards, lengths, group_size):
    """``(R float, L float, correct [B] bool, p [B])``: ``correct = R > 0.5`` and ``p`` the
    fraction of correct completions in the completion's group."""
    check_same_device(rewards=rewards, lengths=lengths)
    _check_1d("rewards", rewards)
    _check_lengths(lengths, rewards.shape[0])
    G = check_group_size(group_size, rewards.shape[0])
    r = rewards.to(_float_out(rewards))
    c = r > 0.5
    p = c.to(r.dtype).view(-1, G).mean(1).repeat_interleave(G)
    return r, lengths.to(r.dtype), c, p


def laser_d_length_reward(rewards: torch.Tensor, lengths: torch.Tensor, group_size: int, *, budgets,
                          alpha: float = 0.5, easy: float = 2 / 3, hard: float = 1 / 3) -> torch.Tensor:
    """LASER-D (Liu et al. 2025, "Learn to Reason Efficiently with Adaptive Length-based Reward
    Shaping"; docs/formulas.md §8.2): a correct completion within the length budget of its prompt's
    difficulty earns a bonus::

        p_g = accuracy of the group      easy: p_g >= easy,  hard: p_g <= hard,  else medium
        R'  = R + alpha * [R > 0.5] * [L <= budgets[d]]          budgets = (easy, medium, hard)

    ``rewards``, ``lengths`` ``[B]`` -> ``[B]``. The budgets are the caller's (LASER-D re-estimates
    them during training; set them between steps)."""
    r, L, c, p = _correct_and_group_accuracy(rewards, lengths, group_size)
    if not isinstance(budgets, (list, tuple)) or len(budgets) != 3:
        raise ValueError(f"budgets must be three lengths (easy, medium, hard), got {budgets!r}")
    b_easy, b_mid, b_hard = (check_positive(f"budgets[{i}]", b) for i, b in enumerate(budgets))
    alpha = check_number("alpha", alpha)
    hard = check_number("hard", hard, low=0, high=1)
    easy = check_number("easy", easy, low=hard, high=1, expect=f"in [hard={hard:g}, 1]")
    budget = torch.where(p >= easy, b_easy, torch.where(p <= hard, b_hard, b_mid)).to(r.dtype)
    return r + alpha * (c & (L <= budget)).to(r.dtype)


def difficulty_aware_truncation(rewards: torch.Tensor, lengths: torch.Tensor, group_size: int, *, budget: int,
                                shrink: float = 0.5) -> torch.Tensor:
    """Difficulty-aware DLER (Liu et al. 2025, "DLER: Doing Length pEnalty Right"; docs/formulas.md
    §8.2): DLER's truncation with a budget that tightens on the prompts the model already solves::

        budget_g = budget * (1 - shrink * p_g)        p_g = accuracy of the group, shrink in [0, 1)
        R'       = 0 if L > budget_g else R
    """
    r, L, _, p = _correct_and_group_accuracy(rewards, lengths, group_size)
    budget = check_positive("budget", budget)
    shrink = check_number("shrink", shrink, low=0, high=1, high_open=True)
    return torch.where(L > budget * (1 - shrink * p), torch.zeros_like(r), r)


def decaying_budget(step: int, *, initial: int, decay: float = 0.5, every: int = 100, minimum: int = 1) -> int:
    """The token budget of training step ``step`` (0-based) in "Train Long, Think Short" (Hammoud et
    al. 2025, "Train Long, Think Short: Curriculum Learning for Efficient Reasoning"; docs/formulas.md
    §8.2): generous at first, shrinking geometrically::

        B(step) = max(minimum, floor(initial * decay ** (step // every)))
    """
    step = check_number("step", step, low=0, integer=True)
    initial = check_number("initial", initial, low=1, integer=True)
    decay = check_number("decay", decay, low=0, high=1, low_open=True)
    every = check_number("every", every, low=1, integer=True)
    minimum = check_number("minimum", minimum, low=1, high=initial, integer=True)
    return max(minimum, math.floor(initial * decay ** (step // every)))


def wrong_answer_length_penalty(rewards: torch.Tensor, lengths: torch.Tensor, max_len: int, *,
                                coef: float = 1.0) -> torch.Tensor:
    """APO's length penalty on wrong answers only (docs/formulas.md §8.2): correct completions keep
    their reward, so brevity is never traded against correctness; wrong ones pay for their length::

        R' = R - coef * min(L / max_len, 1) * [R <= 0.5]
    """
    check_same_device(rewards=rewards, lengths=lengths)
    _check_1d("rewards", rewards)
    _check_lengths(lengths, rewards.shape[0])
    max_len = check_positive("max_len", max_len)
    coef = check_number("coef", coef, low=0)
    r = rewards.to(_float_out(rewards))
    frac = (lengths.to(r.dtype) / max_len).clamp(max=1.0)
    return r - coef * frac * (r <= 0.5).to(r.dtype)


class HistoryAwareLengthReward:
    """HAPO (Huang, Zhang, Cardie 2025, "HAPO: Training Language Models to Reason Concisely via
    History-Aware Policy Optimization"): a length reward relative to ``h``, the shortest correct
    completion seen so far for the same prompt (tracked across training steps).

    ``r = cos(min(L / h, 2) * pi / 2)`` (1 at length 0, 0 at ``h``, -1 from ``2h`` on), then
    ``max(r, correct_floor)`` for a correct completion (so a correct one always beats a wrong one
    once added to the 0/1 correctness reward) and ``min(r, 0)`` for a wrong one (short wrong
    completions are not punished, to keep exploring); 0 for a prompt without any correct
    completion yet; times ``weight``. Add it to the correctness reward.

    Prompts are identified by non-negative integer ids (e.g. dataset indices), ``[B]``; ``h`` is
    kept in a dense tensor indexed by id, so lookups and updates are vectorised. Calling the
    object rewards with the history *before* this batch and then (``update=True``) records this
    batch's correct lengths, as HAPO does. ``state_dict()`` / ``load_state_dict()`` let a trainer
    checkpoint the history.
    """

    def __init__(self, weight: float = 1.0, correct_floor: float = -0.7):
        self.weight = check_number("weight", weight)
        self.correct_floor = check_number("correct_floor", correct_floor)
        self._history = torch.empty(0, dtype=torch.float64)  # inf: no correct completion yet

    def _inputs(self, prompt_ids, lengths, correct):
        check_tensor("prompt_ids", prompt_ids, dtypes=(torch.int64, torch.int32))
        check_same_device(prompt_ids=prompt_ids, lengths=lengths, correct=correct)
        _check_1d("prompt_ids", prompt_ids)
        n = prompt_ids.shape[0]
        _check_lengths(lengths, n)
        _check_1d("correct", correct, n)
        if n and bool((prompt_ids < 0).any()):
            raise ValueError("prompt_ids must be >= 0")
        c = (correct > 0.5) if correct.is_floating_point() else correct.bool()
        ids = prompt_ids.long()
        need = int(ids.max()) + 1 if n else 0
        if need > self._history.numel():
            grown = torch.full((need,), math.inf, dtype=torch.float64, device=ids.device)
            grown[: self._history.numel()] = self._history.to(ids.device)
            self._history = grown
        self._history = self._history.to(ids.device)
        return ids, lengths.to(torch.float64), c

    def history(self, prompt_ids: torch.Tensor) -> torch.Tensor:
        """``h`` for each id, ``inf`` where no correct completion has been recorded."""
        check_tensor("prompt_ids", prompt_ids, dtypes=(torch.int64, torch.int32))
        ids = prompt_ids.long()
        h = torch.full(ids.shape, math.inf, dtype=torch.float64, device=ids.device)
        known = ids < self._history.numel()
        h[known] = self._history.to(ids.device)[ids[known]]
        return h

    def reward(self, prompt_ids: torch.Tensor, lengths: torch.Tensor, correct: torch.Tensor) -> torch.Tensor:
        """The length reward ``[B]`` (float32) under the current history, without updating it."""
        ids, L, c = self._inputs(prompt_ids, lengths, correct)
        h = self._history[ids]
        seen = torch.isfinite(h)
        ratio = (L / h.clamp(min=1.0)).clamp(max=2.0)
        r = torch.cos(ratio * (math.pi / 2))
        r = torch.where(c, r.clamp(min=self.correct_floor), r.clamp(max=0.0))
        return (torch.where(seen, r, torch.zeros_like(r)) * self.weight).float()

    def update(self, prompt_ids: torch.Tensor, lengths: torch.Tensor, correct: torch.Tensor) -> None:
        """Record the batch: ``h[id] = min(h[id], lengths of its correct completions)``."""
        ids, L, c = self._inputs(prompt_ids, lengths, correct)
        self._history.scatter_reduce_(0, ids[c], L[c], reduce="amin", include_self=True)

    def __call__(self, prompt_ids, lengths, correct, *, update: bool = True) -> torch.Tensor:
        r = self.reward(prompt_ids, lengths, correct)
        if update:
            self.update(prompt_ids, lengths, correct)
        return r

    def state_dict(self) -> dict:
        return {"history": self._history.detach().cpu().clone(), "weight": self.weight,
                "correct_floor": self.correct_floor}

    def load_state_dict(self, state: dict) -> None:
        missing = {"history", "weight", "correct_floor"} - set(state)
        if missing:
            raise KeyError(f"HistoryAwareLengthReward state is missing {', '.join(sorted(missing))}")
        h = state["history"]
        check_tensor("history", h)
        if h.dim() != 1:
            raise ValueError(f"history must be 1-D, got {shape_str(h)}")
        self._history = h.detach().to(torch.float64).clone()
        self.weight = float(state["weight"])
        self.correct_floor = float(state["correct_floor"])


def mask_truncated_completions(mask: torch.Tensor, is_truncated: torch.Tensor) -> torch.Tensor:
    """Drop truncated completions (no EOS) from the loss (DAPO; docs/formulas.md §8): ``mask``
    ``[B, T]`` with the rows of ``is_truncated`` ``[B]`` set to 0, same dtype as ``mask``."""
    check_tensor("mask", mask)
    if mask.dim() != 2:
        raise ValueError(f"mask must have shape [B, T], got {shape_str(mask)}")
    check_same_device(mask=mask, is_truncated=is_truncated)
    _check_1d("is_truncated", is_truncated, mask.shape[0])
    keep = is_truncated == 0
    return mask * keep[:, None].to(mask.dtype) if mask.dtype != torch.bool else mask & keep[:, None]


# ----------------------------------------------------------------------------------------------
# dynamic sampling (DAPO)

def _group_rewards(rewards, group_size) -> torch.Tensor:
    _check_1d("rewards", rewards)
    if rewards.shape[0] == 0:
        raise ValueError("rewards must hold at least one reward, got shape [0]")
    if not rewards.is_floating_point():
        raise TypeError(f"rewards must be a float tensor, got {str(rewards.dtype).replace('torch.', '')}")
    G = check_group_size(group_size, rewards.shape[0])
    return rewards.view(-1, G)


def filter_zero_variance_groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """DAPO dynamic sampling (Yu et al. 2025): a keep mask ``[B]`` (bool) that is False for every
    completion of a group whose rewards are all equal (such a group has zero advantage and no
    gradient). Whole groups are kept or dropped."""
    g = _group_rewards(rewards, group_size)
    return (g.amax(1) != g.amin(1)).repeat_interleave(g.shape[1])


def zero_variance_group_rate(rewards: torch.Tensor, group_size: int) -> float:
    """Fraction of groups whose rewards are all equal (a metric to log every step)."""
    g = _group_rewards(rewards, group_size)
    return float((g.amax(1) == g.amin(1)).to(torch.float32).mean())


@dataclass
class DynamicSample:
    """What ``DynamicSampler.sample`` returns: the informative groups, in sampling order."""
    batch: Any                 # the user's batch restricted to the kept completions
    rewards: torch.Tensor      # [num_groups * group_size]
    num_groups: int
    rounds: int                # calls made to sample_fn
    complete: bool             # num_groups == target_groups
    zero_variance_rate: float  # over every group sampled in those rounds


def _select(batch, idx: torch.Tensor, n: int):
    """Rows ``idx`` of a batch: a tensor / list / tuple with leading size ``n``, or a dict / tuple
    of those (recursively). ``None`` stays ``None``."""
    if batch is None:
        return None
    if isinstance(batch, torch.Tensor):
        if batch.dim() == 0 or batch.shape[0] != n:
            raise ValueError(f"every tensor in the batch must have leading size {n} (one row per reward), "
                             f"got {shape_str(batch)}")
        return batch[idx.to(batch.device)]
    if isinstance(batch, dict):
        return {k: _select(v, idx, n) for k, v in batch.items()}
    if isinstance(batch, tuple):
        return tuple(_select(v, idx, n) for v in batch)
    if isinstance(batch, list):
        if len(batch) != n:
            raise ValueError(f"every list in the batch must have {n} entries (one per reward), got {len(batch)}")
        return [batch[i] for i in idx.tolist()]
    raise TypeError(f"the batch must be built from tensors, lists, tuples and dicts, got {type(batch).__name__}")


def _concat(parts: list):
    first = parts[0]
    if first is None:
        return None
    if isinstance(first, torch.Tensor):
        return torch.cat(parts, dim=0)
    if isinstance(first, dict):
        return {k: _concat([p[k] for p in parts]) for k in first}
    if isinstance(first, tuple):
        return tuple(_concat([p[i] for p in parts]) for i in range(len(first)))
    return [x for p in parts for x in p]


class DynamicSampler:
    """DAPO's dynamic sampling loop: call ``sample_fn() -> (batch, rewards)`` until
    ``target_groups`` groups with non-constant rewards are collected, then return exactly that many
    (extras from the last round are dropped, as DAPO does).

    ``rewards`` is ``[B]`` in groups of ``group_size``; ``batch`` holds the matching rows (tensors
    with leading size ``B``, lists of length ``B``, or dicts / tuples of them). After
    ``max_rounds`` calls without enough groups: ``on_shortfall="raise"`` (default) raises a
    ``RuntimeError`` saying how many were found; ``"return"`` returns what it has with
    ``complete=False`` (zero groups give ``batch=None`` and empty rewards).
    """

    def __init__(self, sample_fn: Callable[[], tuple], *, group_size: int, target_groups: int,
                 max_rounds: int = 10, on_shortfall: str = "raise"):
        if not callable(sample_fn):
            raise TypeError(f"sample_fn must be callable, got {type(sample_fn).__name__}")
        for name, v in (("group_size", group_size), ("target_groups", target_groups), ("max_rounds", max_rounds)):
            check_positive_int(name, v)
        if on_shortfall not in ("raise", "return"):
            raise ValueError(f"on_shortfall must be 'raise' or 'return', got {on_shortfall!r}")
        self.sample_fn = sample_fn
        self.group_size = group_size
        self.target_groups = target_groups
        self.max_rounds = max_rounds
        self.on_shortfall = on_shortfall

    def sample(self) -> DynamicSample:
        G = self.group_size
        batches, rewards = [], []
        have = seen = zero = 0
        rounds = 0
        while have < self.target_groups and rounds < self.max_rounds:
            rounds += 1
            out = self.sample_fn()
            if not isinstance(out, tuple) or len(out) != 2:
                raise TypeError("sample_fn must return a (batch, rewards) tuple")
            batch, r = out
            keep = filter_zero_variance_groups(r, G)
            n_groups = r.shape[0] // G
            kept_groups = int(keep.sum()) // G
            seen += n_groups
            zero += n_groups - kept_groups
            take = min(kept_groups, self.target_groups - have)
            if take == 0:
                continue
            idx = keep.nonzero().squeeze(1)[: take * G]
            batches.append(_select(batch, idx, r.shape[0]))
            rewards.append(r[idx.to(r.device)])
            have += take
        complete = have >= self.target_groups
        if not complete and self.on_shortfall == "raise":
            raise RuntimeError(
                f"dynamic sampling found {have} of {self.target_groups} groups with non-constant rewards "
                f"after {rounds} rounds ({seen} groups sampled, {zero} with all-equal rewards); raise "
                "max_rounds, or use on_shortfall='return', or check that the prompts are not all too easy or too hard")
        return DynamicSample(
            batch=_concat(batches) if batches else None,
            rewards=torch.cat(rewards) if rewards else torch.empty(0),
            num_groups=have, rounds=rounds, complete=complete,
            zero_variance_rate=zero / seen if seen else 0.0)

    __call__ = sample


# ----------------------------------------------------------------------------------------------
# evaluation

def pass_at_k(n, c, k: int) -> torch.Tensor:
    """Unbiased pass@k (Chen et al. 2021, "Evaluating Large Language Models Trained on Code"):
    with ``n`` samples of which ``c`` are correct, ``1 - C(n - c, k) / C(n, k)``, computed in the
    stable product form ``1 - prod_{i = n - c + 1}^{n} (1 - k / i)`` (1 when ``n - c < k``).

    ``n`` and ``c`` are ints or integer tensors (broadcast together); returns a float64 tensor of
    their broadcast shape (0-d for scalars). The product runs over a ``[..., max n]`` mask, not a
    Python loop.
    """
    check_positive_int("k", k)
    n_t = torch.as_tensor(n)
    c_t = torch.as_tensor(c, device=n_t.device)
    for name, t in (("n", n_t), ("c", c_t)):
        if t.is_floating_point() or t.dtype == torch.bool or t.is_complex():
            raise TypeError(f"{name} must be an int or an integer tensor, got {str(t.dtype).replace('torch.', '')}")
    n_t, c_t = torch.broadcast_tensors(n_t.long(), c_t.long())
    if n_t.numel() == 0:
        return torch.empty(n_t.shape, dtype=torch.float64, device=n_t.device)
    if bool((c_t < 0).any()) or bool((c_t > n_t).any()):
        raise ValueError("c must satisfy 0 <= c <= n")
    if bool((n_t < k).any()):
        raise ValueError(f"n must be >= k={k} (pass@k needs at least k samples), got n={int(n_t.min())}")
    i = torch.arange(1, int(n_t.max()) + 1, device=n_t.device, dtype=torch.float64)
    # i > k keeps every factor in (0, 1); rows with n - c < k are 1 and set below
    in_range = (i > (n_t - c_t)[..., None]) & (i <= n_t[..., None]) & (i > k)
    log_terms = torch.where(in_range, torch.log1p(-k / i), torch.zeros((), dtype=torch.float64, device=i.device))
    p = -torch.expm1(log_terms.sum(-1)) + 0.0  # + 0.0 turns -0.0 into 0.0
    return torch.where(n_t - c_t < k, torch.ones_like(p), p)
