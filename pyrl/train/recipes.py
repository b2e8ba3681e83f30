"""The recipes the loop wires in, each built from the config and usable alone.

    reward = Reward.from_config(cfg, task)        # task.reward + task.length_shaping
    r = reward(texts, answers, prompts, lengths=..., truncated=..., prompt_index=..., group_size=G)
    keep = group_keep_mask(r, G, dynamic=True, band=(0.1, 0.9), threshold=0.5)   # [B / G] bool
    kl = AdaptiveKL(beta=0.04, target=0.05, horizon=10000); kl.update(measured_kl, n_sequences)

**Rewards** (``task.reward``): a name of ``pyrl.rewards`` (``math_verify``, ``exact_match``,
``format``), a user function ``"module:function"`` or ``"path/to/file.py:function"``, or a list of
terms ``{"name": ..., "weight": 1.0, "options": {...}}`` whose weighted rewards are summed. A user
function has the signature

    def my_reward(completions: list[str], *, ground_truth: list[str], prompts: list[str], **options)
        -> list[float] | torch.Tensor     # B rewards, one per completion

and receives each keyword only when it declares it (or ``**kwargs``); ``options`` come from the
term's ``options``. ``completions`` are the decoded completions, ``ground_truth`` the examples'
answers, ``prompts`` the exact prompt texts the model saw.

**Length shaping** (``task.length_shaping``), applied in order to the summed reward ``R`` with the
completion lengths ``L`` in tokens (formulas in docs/formulas.md §8):

    overlong     R + dapo_overlong_penalty(L, max_len, cache_len)      DAPO (Yu et al. 2025)
    dler         dler_truncation(R, L, budget)                          DLER (Liu et al. 2025)
    grpo_lambda  grpo_lambda_length_penalty(R, L, G, ...)               GRPO-lambda (Dai et al. 2025)
    cosine       cosine_length_reward(R, L, max_len, ...)               Yeo et al. 2025
    hapo         R + HistoryAwareLengthReward(...)(prompt_index, L, R)  HAPO (Huang et al. 2025)
    laser_d      laser_d_length_reward(R, L, G, budgets=[e, m, h], ...)   LASER-D (Liu et al. 2025)
    dler_difficulty  difficulty_aware_truncation(R, L, G, budget, ...)  difficulty-aware DLER
    budget_decay dler_truncation(R, L, decaying_budget(step, ...))      Train Long, Think Short (2025)
    apo          wrong_answer_length_penalty(R, L, max_len, coef)       APO: wrong answers only
    par          preference_as_reward(R, reference)                      PAR (Fu et al. 2025; not a length)

The trainer passes each shaper the step (``ShapeContext.step``, ``.progress``), so a budget can follow
a schedule (``budget_decay``'s ``initial`` defaults to ``max_len``).

``max_len`` defaults to ``rollout.max_new_tokens``; the shapers that need correctness read it as
``R > 0.5``.
"""
from __future__ import annotations

import importlib
import importlib.util
import inspect
import math
import os
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from pyrl import rewards as _rewards
from pyrl.registry import Registry

__all__ = ["Reward", "RewardTerm", "load_function", "SHAPERS", "group_keep_mask", "AdaptiveKL"]


def load_function(spec: str, *, key: str = "task.reward") -> Callable:
    """The function named by ``"package.module:function"`` or ``"path/to/file.py:function"``."""
    module_name, _, attr = spec.rpartition(":")
    if not module_name or not attr:
        raise ValueError(f"{key}: a user function is given as 'module:function', got {spec!r}")
    if module_name.endswith(".py") or os.sep in module_name:
        if not os.path.exists(module_name):
            raise ValueError(f"{key}: no such file {module_name!r} (in {spec!r})")
        loader_spec = importlib.util.spec_from_file_location(f"pyrl_user_{abs(hash(module_name))}", module_name)
        module = importlib.util.module_from_spec(loader_spec)
        loader_spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(module_name)
        except ImportError as e:
            raise ValueError(f"{key}: cannot import {module_name!r} (in {spec!r}): {e}") from e
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ValueError(f"{key}: {module_name!r} has no function {attr!r}")
    return fn


@dataclass(frozen=True)
class RewardTerm:
    """One weighted reward: ``weight * fn(completions, **context, **options)``."""
    name: str
    fn: Callable
    weight: float = 1.0
    options: dict = field(default_factory=dict)

    def __call__(self, completions: list[str], ground_truth: list[str], prompts: list[str]) -> torch.Tensor:
        params = inspect.signature(self.fn).parameters
        takes_all = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        context = {k: v for k, v in (("ground_truth", ground_truth), ("prompts", prompts))
                   if takes_all or k in params}
        out = torch.as_tensor(self.fn(completions, **context, **self.options), dtype=torch.float32).flatten()
        if out.shape[0] != len(completions):
            raise ValueError(f"reward {self.name!r} returned {out.shape[0]} values for {len(completions)} completions")
        if not bool(torch.isfinite(out).all()):
            raise ValueError(f"reward {self.name!r} returned NaN or inf")
        return out * self.weight


def _term(item, where: str) -> RewardTerm:
    if isinstance(item, str):
        item = {"name": item}
    if not isinstance(item, dict) or "name" not in item:
        raise ValueError(f"{where} must be a reward name, 'module:function', or {{name, weight, options}}, "
                         f"got {item!r}")
    unknown = set(item) - {"name", "weight", "options"}
    if unknown:
        raise ValueError(f"{where} has unknown keys {sorted(unknown)}; a term has name, weight, options")
    name, weight, options = item["name"], item.get("weight", 1.0), item.get("options", {}) or {}
    if not isinstance(weight, (int, float)) or isinstance(weight, bool) or not math.isfinite(weight):
        raise ValueError(f"{where}.weight must be a finite number, got {weight!r}")
    if not isinstance(options, dict):
        raise ValueError(f"{where}.options must be a mapping, got {options!r}")
    if not isinstance(name, str):
        raise ValueError(f"{where}.name must be a string, got {name!r}")
    if ":" in name:
        return RewardTerm(name, load_function(name, key=f"{where}.name"), float(weight), dict(options))
    if name not in _rewards.names():
        raise ValueError(f"{where}: unknown reward {name!r}; available: {', '.join(_rewards.names())}, or a "
                         "user function as 'module:function'")
    fn = _rewards.get(name)
    accepted = {p for p, v in inspect.signature(fn).parameters.items() if v.kind is inspect.Parameter.KEYWORD_ONLY}
    bad = set(options) - (accepted - {"ground_truth"})
    if bad:
        raise ValueError(f"{where}: reward {name!r} has no option {sorted(bad)[0]!r}; its options are: "
                         f"{', '.join(sorted(accepted - {'ground_truth'})) or 'none'}")
    return RewardTerm(name, fn, float(weight), dict(options))


# ------------------------------------------------------------------------------------------------
# length shapers: name -> factory(options, max_new_tokens) -> shape(R, ctx) -> R

SHAPERS: Registry[Callable] = Registry("length shaper")


@dataclass
class ShapeContext:
    """What a shaper sees besides the reward: the batch, and where training is (``step``, 0-based,
    of ``total_steps``: ``progress = step / total_steps``) for the shapers that follow a schedule."""
    lengths: torch.Tensor        # [B] completion tokens
    prompt_index: torch.Tensor   # [B] data index of each completion's prompt
    group_size: int
    step: int = 0
    total_steps: Optional[int] = None

    @property
    def progress(self) -> float:
        """``step / total_steps`` in ``[0, 1]`` (0 when the length of the run is unknown)."""
        return min(1.0, self.step / self.total_steps) if self.total_steps else 0.0


def _with_max_len(opts: dict, max_new_tokens: int) -> dict:
    return {"max_len": max_new_tokens, **opts}


@SHAPERS.register("overlong")
def _overlong(opts, max_new_tokens):
    opts = _with_max_len(opts, max_new_tokens)
    return lambda r, c: r + _rewards.dapo_overlong_penalty(c.lengths, **opts).to(r.dtype)


def _tensor_shaper(fn, *, per_group: bool = False, max_len: bool = False):
    """The factory of a shaper that is one ``pyrl.rewards`` function ``fn(R, L[, G], **options)``;
    ``max_len`` defaults to ``rollout.max_new_tokens`` where the function takes one."""
    def factory(opts, max_new_tokens):
        opts = _with_max_len(opts, max_new_tokens) if max_len else opts
        if per_group:
            return lambda r, c: fn(r, c.lengths, c.group_size, **opts).to(r.dtype)
        return lambda r, c: fn(r, c.lengths, **opts).to(r.dtype)
    return factory


for _name, _fn, _kw in (("dler", _rewards.dler_truncation, {}),
                        ("grpo_lambda", _rewards.grpo_lambda_length_penalty, {"per_group": True}),
                        ("cosine", _rewards.cosine_length_reward, {"max_len": True}),
                        ("laser_d", _rewards.laser_d_length_reward, {"per_group": True}),
                        ("dler_difficulty", _rewards.difficulty_aware_truncation, {"per_group": True}),
                        ("apo", _rewards.wrong_answer_length_penalty, {"max_len": True})):
    SHAPERS.register(_name, _tensor_shaper(_fn, **_kw))


@SHAPERS.register("budget_decay")
def _budget_decay(opts, max_new_tokens):
    opts = {"initial": max_new_tokens, **opts}  # a budget that starts at the generation limit
    return lambda r, c: _rewards.dler_truncation(r, c.lengths, _rewards.decaying_budget(c.step, **opts)).to(r.dtype)


@SHAPERS.register("par")
def _par(opts, max_new_tokens):
    return lambda r, c: _rewards.preference_as_reward(r, **opts).to(r.dtype)


class _HAPO:
    def __init__(self, opts, max_new_tokens):
        self.history = _rewards.HistoryAwareLengthReward(**opts)

    def __call__(self, r, c):
        return r + self.history(c.prompt_index.long(), c.lengths, r).to(r.dtype)


SHAPERS.register("hapo", _HAPO)


class Reward:
    """The step's reward: the weighted sum of ``terms``, then the length ``shapers`` in order.
    ``state_dict``/``load_state_dict`` carry the shapers' state (HAPO's history) in checkpoints."""

    def __init__(self, terms: list[RewardTerm], shapers: Optional[list] = None):
        self.terms = terms
        self.shapers = shapers or []

    @classmethod
    def from_config(cls, cfg, task) -> "Reward":
        spec = cfg.task.reward
        if spec is None:
            def task_score(completions, *, ground_truth):  # the task's own (its score() may be overridden)
                return task.score(completions, ground_truth)

            terms = [RewardTerm(task.reward, task_score)]
        else:
            items = spec if isinstance(spec, list) else [spec]
            if not items:
                raise ValueError("task.reward is an empty list: name at least one reward")
            terms = [_term(item, f"task.reward[{i}]" if isinstance(spec, list) else "task.reward")
                     for i, item in enumerate(items)]
        shapers = []
        for i, item in enumerate(cfg.task.length_shaping):
            where = f"task.length_shaping[{i}]"
            if not isinstance(item, dict) or "name" not in item:
                raise ValueError(f"{where} must be a mapping with a 'name', got {item!r}")
            opts = {k: v for k, v in item.items() if k != "name"}
            if item["name"] not in SHAPERS:
                raise ValueError(f"{where}: unknown length shaper {item['name']!r}; available: "
                                 f"{', '.join(SHAPERS.names())}")
            G = cfg.rollout.group_size
            try:
                shape = SHAPERS.get(item["name"])(opts, cfg.rollout.max_new_tokens)
                if not isinstance(shape, _HAPO):  # a dry run, so a missing or bad option fails now, not mid-run
                    ones = torch.ones(G, dtype=torch.long)
                    shape(torch.zeros(G), ShapeContext(ones, 0 * ones, G))
            except (TypeError, ValueError) as e:
                raise ValueError(f"{where} ({item['name']}): {e}") from e
            shapers.append(shape)
        return cls(terms, shapers)

    def __call__(self, completions, ground_truth, prompts, *, lengths, prompt_index, group_size, step: int = 0,
                 total_steps: Optional[int] = None) -> torch.Tensor:
        """``step`` (0-based) of ``total_steps``: where training is, for the scheduled shapers."""
        r = sum(t(completions, ground_truth, prompts) for t in self.terms)
        ctx = ShapeContext(lengths.to(r.device), prompt_index.to(r.device), group_size, step, total_steps)
        for shape in self.shapers:
            r = shape(r, ctx)
        return r.float()

    def state_dict(self) -> dict:
        return {str(i): {"history": s.history.state_dict()["history"].tolist()}
                for i, s in enumerate(self.shapers) if isinstance(s, _HAPO)}

    def load_state_dict(self, state: dict) -> None:
        for i, s in enumerate(self.shapers):
            if isinstance(s, _HAPO) and str(i) in state:
                h = s.history
                h.load_state_dict({"history": torch.tensor(state[str(i)]["history"], dtype=torch.float64),
                                   "weight": h.weight, "correct_floor": h.correct_floor})


# ------------------------------------------------------------------------------------------------
# group filters (dynamic sampling, pass-rate band)

def group_keep_mask(rewards: torch.Tensor, group_size: int, *, dynamic: bool = False,
                    band: Optional[tuple] = None, threshold: float = 0.5) -> torch.Tensor:
    """``[B / G]`` bool: the groups to train on. ``dynamic``: only groups whose rewards are not all
    equal (DAPO's dynamic sampling; ``pyrl.rewards.filter_zero_variance_groups``). ``band=(low,
    high)``: only groups whose pass rate, the fraction of rewards ``>= threshold``, lies in
    ``[low, high]`` (Online Difficulty Filtering, Bae et al. 2025)."""
    keep = torch.ones(rewards.shape[0] // group_size, dtype=torch.bool, device=rewards.device)
    if dynamic:
        keep &= _rewards.filter_zero_variance_groups(rewards, group_size).view(-1, group_size)[:, 0]
    if band is not None:
        rate = (rewards >= threshold).float().view(-1, group_size).mean(1)
        keep &= (rate >= band[0]) & (rate <= band[1])
    return keep


class AdaptiveKL:
    """The adaptive KL coefficient of Ziegler et al. 2019 ("Fine-Tuning Language Models from Human
    Preferences", §2.2): after a step that measured ``KL`` over ``n`` sequences,
    ``e = clip(KL / target - 1, -0.2, 0.2)`` and ``beta <- beta * (1 + e * n / horizon)``, so beta
    grows while the policy drifts faster than ``target`` and shrinks while it stays closer."""

    def __init__(self, beta: float, target: float, horizon: int):
        if beta <= 0 or target <= 0 or horizon <= 0:
            raise ValueError(f"AdaptiveKL needs beta, target and horizon > 0, got {beta}, {target}, {horizon}")
        self.beta, self.target, self.horizon = float(beta), float(target), int(horizon)

    def update(self, kl: float, n: int) -> float:
        error = min(max(kl / self.target - 1.0, -0.2), 0.2)
        self.beta *= 1.0 + error * n / self.horizon
        return self.beta
