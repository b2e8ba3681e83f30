"""Verifiable tasks: prompts with checkable answers, addressed by index so a run can resume exactly.

    task = make_task("addition", seed=0, max_operand=9)
    ex = task.example(17)          # Example(prompt="4+8=", answer="12", solution="12")
    task.score(["12", "13"], ["12", "12"])  ->  tensor([1., 0.])

``example(i)`` is a pure function of ``(seed, i)``: the trainer's data position is just the next
index, saved with each checkpoint. ``score`` calls a reward of ``pyrl.rewards`` by name.
A new task is one class with ``example`` and ``reward`` registered with ``@register``; a name is
registered once (``replace=True`` overrides on purpose) and ``unregister(name)`` removes one.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from pyrl import rewards as _rewards
from pyrl.registry import Registry

__all__ = ["Example", "Task", "AdditionTask", "ArithmeticTask", "GSM8KTask", "make_task", "names", "register",
           "unregister"]

_TASKS: Registry[Callable[..., "Task"]] = Registry("task")


def register(name: str, *, replace: bool = False):
    """Decorator: ``@register("name")`` makes a ``Task`` subclass selectable by ``make_task(name)``
    (and ``task.name`` in the config). A name already taken raises ``ValueError`` unless
    ``replace=True``."""
    return _TASKS.register(name, replace=replace)


def unregister(name: str) -> Callable[..., "Task"]:
    """Remove task ``name`` and return its class (``ValueError`` if it is not registered)."""
    return _TASKS.unregister(name)


def names() -> list[str]:
    """The registered task names, sorted."""
    return _TASKS.names()


def make_task(name: str, *, seed: int = 0, **options) -> "Task":
    if name not in _TASKS:
        raise ValueError(f"unknown task {name!r}; available: {', '.join(names())}")
    return _TASKS.get(name)(seed=seed, **options)


@dataclass(frozen=True)
class Example:
    prompt: str        # the text the model continues (or the user message when the task is chat)
    answer: str        # ground truth for the reward
    solution: str      # a reference completion, for the supervised warm-up


class Task:
    """Base: ``example(i)``, ``score(completions, answers)``; ``chat`` says whether the prompt is a
    user message to wrap in the tokenizer's chat template."""

    reward: str = "exact_match"
    reward_options: dict = {}
    chat: bool = False

    def __init__(self, seed: int = 0):
        self.seed = seed

    def example(self, index: int) -> Example:
        raise NotImplementedError

    def _rng(self, index: int) -> random.Random:
        return random.Random(f"{type(self).__name__}-{self.seed}-{index}")  # str seeds hash stably

    def examples(self, start: int, count: int) -> list[Example]:
        return [self.example(i) for i in range(start, start + count)]

    def score(self, completions: list[str], answers: list[str]) -> torch.Tensor:
        """float32 ``[B]`` rewards of ``completions`` against ``answers``."""
        return _rewards.compute(self.reward, completions, ground_truth=answers, **self.reward_options)


@register("addition")
class AdditionTask(Task):
    """``"a+b="`` -> ``"c"`` with ``0 <= a, b <= max_operand``: the ``tiny`` preset's task. The reward
    is an exact match of the whole completion (so the model must also learn to stop)."""

    def __init__(self, seed: int = 0, max_operand: int = 9):
        super().__init__(seed)
        self.max_operand = max_operand

    def example(self, index: int) -> Example:
        rng = self._rng(index)
        a, b = rng.randint(0, self.max_operand), rng.randint(0, self.max_operand)
        return Example(prompt=f"{a}+{b}=", answer=str(a + b), solution=str(a + b))


@register("arithmetic")
class ArithmeticTask(Task):
    """2-3 digit addition and subtraction (``nonnegative``: no negative differences) as a chat
    question, scored with ``math_verify`` on the last number of the answer: the ``smollm2-arith``
    preset's task."""

    reward = "math_verify"
    chat = True

    def __init__(self, seed: int = 0, min_digits: int = 2, max_digits: int = 3, ops: str = "+-",
                 nonnegative: bool = True):
        super().__init__(seed)
        self.min_digits, self.max_digits, self.ops, self.nonnegative = min_digits, max_digits, ops, nonnegative

    def _number(self, rng: random.Random) -> int:
        digits = rng.randint(self.min_digits, self.max_digits)
        return rng.randint(10 ** (digits - 1), 10 ** digits - 1)

    def example(self, index: int) -> Example:
        rng = self._rng(index)
        a, b, op = self._number(rng), self._number(rng), rng.choice(self.ops)
        if op == "-" and self.nonnegative and b > a:
            a, b = b, a
        value = {"+": a + b, "-": a - b, "*": a * b}[op]
        prompt = f"What is {a} {op} {b}? Reply with only the final number."
        return Example(prompt=prompt, answer=str(value), solution=str(value))


@register("gsm8k")
class GSM8KTask(Task):
    """GSM8K grade-school maths (Cobbe et al. 2021) from the Hugging Face hub (needs ``datasets`` and
    network access); the answer after ``####`` is the ground truth, scored with ``math_verify``."""

    reward = "math_verify"
    chat = True
    INSTRUCTION = "Solve the problem step by step, then give the final answer as \\boxed{{number}}.\n\n{question}"

    def __init__(self, seed: int = 0, split: str = "train", dataset: str = "openai/gsm8k"):
        super().__init__(seed)
        try:
            import datasets
        except ImportError as e:
            raise ImportError("the gsm8k task needs the datasets package: pip install datasets") from e
        self.data = datasets.load_dataset(dataset, "main", split=split)
        self.order = list(range(len(self.data)))
        random.Random(seed).shuffle(self.order)

    def example(self, index: int) -> Example:
        row = self.data[self.order[index % len(self.order)]]
        answer = row["answer"].split("####")[-1].strip().replace(",", "")
        return Example(prompt=self.INSTRUCTION.format(question=row["question"]), answer=answer,
                       solution=row["answer"])


def prompt_text(task: Task, tokenizer, example: Example, system: Optional[str] = None) -> str:
    """The exact text the model is given: the chat template for chat tasks, else the prompt."""
    if not task.chat or getattr(tokenizer, "chat_template", None) is None:
        return example.prompt
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": example.prompt})
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
