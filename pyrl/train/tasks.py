"""Verifiable tasks: prompts with checkable answers, addressed by index so a run can resume exactly.

    task = make_task("addition", seed=0, max_operand=9)
    ex = task.example(17)          # Example(prompt="4+8=", answer="12", solution="12")
    task.score(["12", "13"], ["12", "12"])  ->  tensor([1., 0.])

``example(i)`` is a pure function of ``(seed, i)``: the trainer's data position is just the next
index, saved with each checkpoint. ``score`` calls a reward of ``pyrl.rewards`` by name.
A new task is one class with ``example`` and ``reward`` registered with ``@register``; a name is
registered once (``replace=True`` overrides on purpose) and ``unregister(name)`` removes one.

Your own data needs no code: ``jsonl``, ``parquet`` and ``file`` read rows
``{"prompt", "answer"[, "solution"]}`` from a local file (``FileTask``), with a held-out split for
the greedy evaluation (``eval_path`` or ``eval_fraction``).

Preference tasks (``Task.preference``, for ``mode: preference``) give ``PreferencePair`` rows
(prompt, chosen, rejected) or KTO's unpaired ``Feedback`` rows (prompt, completion, desirable):
``addition_preference`` generates them, ``preference`` reads them from a file
(``PreferenceFileTask``).
"""
from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from pyrl import rewards as _rewards
from pyrl.registry import Registry

__all__ = ["Example", "Task", "AdditionTask", "ArithmeticTask", "GSM8KTask", "FileTask", "read_rows", "make_task",
           "PreferencePair", "Feedback", "AdditionPreferenceTask", "PreferenceFileTask", "names", "register", "unregister", "prompt_text", "EVAL_OFFSET"]

EVAL_OFFSET = 10**9  # a generated task's evaluation prompts come from their own index range

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
    prompt: Any        # the text the model continues (or the user message when the task is chat), or a
    #                    list of chat messages [{"role": ..., "content": ...}]
    answer: str        # ground truth for the reward
    solution: str      # a reference completion, for the supervised warm-up


@dataclass(frozen=True)
class PreferencePair:
    """A prompt with a preferred (``chosen``) and a dispreferred (``rejected``) completion."""
    prompt: Any
    chosen: str
    rejected: str

    @property
    def solution(self) -> str:  # the supervised warm-up's target
        return self.chosen


@dataclass(frozen=True)
class Feedback:
    """KTO's unpaired row: a prompt, a completion, and whether it is desirable."""
    prompt: Any
    completion: str
    desirable: bool


class Task:
    """Base: ``example(i)``, ``score(completions, answers)``; ``chat`` says whether the prompt is a
    user message to wrap in the tokenizer's chat template."""

    reward: str = "exact_match"
    reward_options: dict = {}
    chat: bool = False
    preference: bool = False
    """True: ``example(i)`` is a ``PreferencePair`` or ``Feedback`` (``mode: preference``)."""

    def __init__(self, seed: int = 0):
        self.seed = seed

    def example(self, index: int) -> Example:
        raise NotImplementedError

    def _rng(self, index: int) -> random.Random:
        return random.Random(f"{type(self).__name__}-{self.seed}-{index}")  # str seeds hash stably

    def examples(self, start: int, count: int) -> list[Example]:
        return [self.example(i) for i in range(start, start + count)]

    def example_id(self, index: int) -> int:
        """Which prompt ``example(index)`` is, as an integer that repeats when the prompt does (a
        file's row number; here the index itself): HAPO's per-prompt history is keyed by it."""
        return index

    num_eval: Optional[int] = None
    """How many distinct evaluation examples there are (``None``: unbounded)."""

    def eval_examples(self, start: int, count: int) -> list[Example]:
        """Held-out examples ``start .. start + count - 1`` (default: their own index range)."""
        return self.examples(EVAL_OFFSET + start, count)

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


@register("addition_preference")
class AdditionPreferenceTask(Task):
    """Preference rows for ``"a+b="`` (``0 <= a, b <= max_operand``): chosen is the sum, rejected a
    wrong sum (the sum plus an offset in ``+-1 .. +-max_offset``, never negative): the ``tiny-dpo``
    preset's task. A fixed ``eval_fraction`` of the prompts (the same for every run seed) is held
    out, training never sees them; the held-out rows are each of those prompts with each of its
    wrong sums. ``kto=True`` gives the rows unpaired (``Feedback``): even indices the correct sum
    (desirable), odd ones a wrong one."""

    preference = True

    def __init__(self, seed: int = 0, max_operand: int = 9, max_offset: int = 3, eval_fraction: float = 0.2,
                 kto: bool = False):
        super().__init__(seed)
        if not isinstance(max_operand, int) or max_operand < 1:
            raise ValueError(f"task.options.max_operand must be an integer >= 1, got {max_operand!r}")
        if not isinstance(max_offset, int) or max_offset < 1:
            raise ValueError(f"task.options.max_offset must be an integer >= 1, got {max_offset!r}")
        if not isinstance(eval_fraction, (int, float)) or isinstance(eval_fraction, bool) or not 0 < eval_fraction < 1:
            raise ValueError(f"task.options.eval_fraction must be a number in (0, 1), got {eval_fraction!r}")
        prompts = [(a, b) for a in range(max_operand + 1) for b in range(max_operand + 1)]
        random.Random("pyrl-eval-split").shuffle(prompts)
        k = max(1, round(eval_fraction * len(prompts)))
        self.train_prompts = prompts[k:]
        self.max_offset, self.kto = max_offset, kto
        self.eval_rows = [(a, b, a + b + o) for a, b in prompts[:k] for o in self._offsets(a + b)]
        self.num_eval = len(self.eval_rows) * (2 if kto else 1)

    def _offsets(self, total: int) -> list[int]:
        return [o for o in range(-self.max_offset, self.max_offset + 1) if o and total + o >= 0]

    def _row(self, a: int, b: int, wrong: int, index: int):
        if self.kto:
            good = index % 2 == 0
            return Feedback(prompt=f"{a}+{b}=", completion=str(a + b if good else wrong), desirable=good)
        return PreferencePair(prompt=f"{a}+{b}=", chosen=str(a + b), rejected=str(wrong))

    def example(self, index: int):
        rng = self._rng(index)
        a, b = rng.choice(self.train_prompts)
        return self._row(a, b, a + b + rng.choice(self._offsets(a + b)), index)

    def eval_examples(self, start: int, count: int) -> list:
        rows = []
        for i in range(start, start + count):
            j = i % self.num_eval
            rows.append(self._row(*self.eval_rows[j // 2 if self.kto else j], j))
        return rows


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
    """The exact text the model is given: the chat template for chat tasks (and for prompts given as
    chat messages) when the tokenizer has one, else the prompt (messages' contents joined by
    newlines)."""
    has_template = getattr(tokenizer, "chat_template", None) is not None
    if isinstance(example.prompt, list):
        if not has_template:
            return "\n".join(str(m["content"]) for m in example.prompt)
        messages = list(example.prompt)
    elif not task.chat or not has_template:
        return example.prompt
    else:
        messages = [{"role": "user", "content": example.prompt}]
    if system:
        messages = [{"role": "system", "content": system}] + messages
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


# ------------------------------------------------------------------------------------------------
# your own data

_FORMATS = {".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet", ".pq": "parquet"}


def read_rows(path: str, format: Optional[str] = None) -> list[dict]:
    """The rows of a local file as dicts: ``jsonl`` (one JSON object a line), ``parquet`` (needs
    pyarrow or pandas) or ``datasets`` (a ``save_to_disk`` folder, needs datasets); ``format=None``
    picks by extension (a folder: ``datasets``)."""
    if not isinstance(path, str) or not path:
        raise ValueError(f"task.options.path must be a file path, got {path!r}")
    if not os.path.exists(path):
        raise FileNotFoundError(f"task.options.path: no such file: {path}")
    if format is None:
        format = "datasets" if os.path.isdir(path) else _FORMATS.get(os.path.splitext(path)[1].lower())
        if format is None:
            raise ValueError(f"cannot tell the format of {path} from its extension; use a .jsonl or .parquet file, "
                             "or task.name=jsonl / parquet")
    if format == "jsonl":
        rows = []
        with open(path) as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except ValueError as e:
                        raise ValueError(f"{path}, line {n}: not valid JSON ({e})") from None
        return rows
    if format == "parquet":
        try:
            import pyarrow.parquet as pq

            return pq.read_table(path).to_pylist()
        except ImportError:
            pass
        try:
            import pandas
        except ImportError:
            raise ImportError(f"reading the Parquet file {path} needs pyarrow or pandas: pip install pyarrow") from None
        return pandas.read_parquet(path).to_dict("records")
    if format == "datasets":
        try:
            import datasets
        except ImportError:
            raise ImportError(f"reading the datasets folder {path} needs datasets: pip install datasets") from None
        return list(datasets.load_from_disk(path))
    raise ValueError(f"format must be 'jsonl', 'parquet' or 'datasets', got {format!r}")


def _check_row(row, where: str, prompt_key: str, keys: tuple):
    """The prompt of ``row`` (text, or a list of chat messages), after checking that ``row`` is an
    object holding ``prompt_key`` and ``keys``."""
    if not isinstance(row, dict):
        raise ValueError(f"{where} must be an object with {', '.join(map(repr, (prompt_key,) + keys))}, got {row!r:.80}")
    for key in (prompt_key,) + keys:
        if row.get(key) is None:
            raise ValueError(f"{where} has no {key!r} field (it has: {', '.join(map(str, row))})")
    prompt = row[prompt_key]
    if hasattr(prompt, "tolist") and not isinstance(prompt, str):  # a numpy array from pandas
        prompt = prompt.tolist()
    if isinstance(prompt, (list, tuple)):  # chat messages (Parquet gives numpy arrays via pandas: list them)
        prompt = [dict(m) for m in prompt]
        if not prompt or not all("role" in m and "content" in m for m in prompt):
            raise ValueError(f"{where}: {prompt_key!r} as chat messages must be a non-empty list of "
                             "{'role': ..., 'content': ...}")
    elif not isinstance(prompt, str):
        raise ValueError(f"{where}: {prompt_key!r} must be a string or a list of chat messages, got "
                         f"{type(prompt).__name__}")
    return prompt


def _check_rows(rows: list, path: str, prompt_key: str, answer_key: str, solution_key: str) -> list[Example]:
    if not rows:
        raise ValueError(f"{path} holds no rows")
    out = []
    for i, row in enumerate(rows):
        prompt = _check_row(row, f"{path}, row {i}", prompt_key, (answer_key,))
        answer = str(row[answer_key])
        solution = row.get(solution_key)
        out.append(Example(prompt=prompt, answer=answer, solution=answer if solution is None else str(solution)))
    return out


class FileTask(Task):
    """Rows ``{"prompt", "answer"[, "solution"]}`` of a local file (``jsonl``, ``parquet``, or ``file``:
    by extension). ``prompt`` is text (wrapped in the tokenizer's chat template when it has one and
    ``chat`` is true) or a list of chat messages; ``answer`` is the ground truth given to the
    reward; ``solution`` (default: the answer) is the supervised warm-up's target.

    Options: ``path``; ``eval_path`` (a held-out file) or ``eval_fraction`` (that share of the rows,
    chosen once with a fixed seed, held out from training); without either, evaluation draws from
    the training rows. ``prompt_key``/``answer_key``/``solution_key`` rename the fields; ``chat``.
    Training visits the rows in a shuffled order (``seed``), reshuffled every epoch; the reward is
    ``math_verify`` unless ``task.reward`` says otherwise."""

    reward = "math_verify"
    chat = True
    format: Optional[str] = None

    def __init__(self, seed: int = 0, path: Optional[str] = None, eval_path: Optional[str] = None,
                 eval_fraction: float = 0.0, prompt_key: str = "prompt", answer_key: str = "answer",
                 solution_key: str = "solution", chat: bool = True):
        super().__init__(seed)
        self.chat = chat
        keys = (prompt_key, answer_key, solution_key)
        self._load(path, eval_path, eval_fraction, lambda rows, where: _check_rows(rows, where, *keys))

    def _load(self, path, eval_path, eval_fraction, parse: Callable[[list, str], list]) -> None:
        """``self.rows`` and ``self.eval_rows``: the parsed rows of ``path``, with the held-out ones
        (``eval_path``'s, or an ``eval_fraction`` of them chosen with a fixed seed) apart."""
        if path is None:
            raise ValueError(f"task {type(self).__name__} needs task.options.path (a file of rows)")
        rows = parse(read_rows(path, self.format), path)
        if not isinstance(eval_fraction, (int, float)) or isinstance(eval_fraction, bool) or not 0 <= eval_fraction < 1:
            raise ValueError(f"task.options.eval_fraction must be a number in [0, 1), got {eval_fraction!r}")
        self.eval_rows: list = []
        if eval_path is not None:
            self.eval_rows = parse(read_rows(eval_path, None), eval_path)
        elif eval_fraction > 0:
            order = list(range(len(rows)))
            random.Random("pyrl-eval-split").shuffle(order)  # the same split whatever the run's seed
            k = max(1, round(eval_fraction * len(rows)))
            if k >= len(rows):
                raise ValueError(f"task.options.eval_fraction={eval_fraction} leaves no training rows of {len(rows)}")
            held = set(order[:k])
            self.eval_rows = [rows[i] for i in sorted(held)]
            rows = [r for i, r in enumerate(rows) if i not in held]
        self.rows = rows
        self.num_eval = len(self.eval_rows) if self.eval_rows else None
        self._epoch: tuple[int, list[int]] = (-1, [])

    def example_id(self, index: int) -> int:
        epoch, pos = divmod(index, len(self.rows))
        if self._epoch[0] != epoch:
            order = list(range(len(self.rows)))
            random.Random(f"FileTask-{self.seed}-{epoch}").shuffle(order)  # jsonl/parquet/file alike
            self._epoch = (epoch, order)
        return self._epoch[1][pos]

    def example(self, index: int) -> Example:
        return self.rows[self.example_id(index)]

    def eval_examples(self, start: int, count: int) -> list[Example]:
        if not self.eval_rows:
            return super().eval_examples(start, count)
        return [self.eval_rows[i % len(self.eval_rows)] for i in range(start, start + count)]


register("file")(FileTask)


@register("jsonl")
class JSONLTask(FileTask):
    """``FileTask`` on a JSON-lines file whatever its extension."""
    format = "jsonl"


@register("parquet")
class ParquetTask(FileTask):
    """``FileTask`` on a Parquet file (needs pyarrow or pandas)."""
    format = "parquet"


def _preference_rows(rows: list, path: str, prompt_key: str, chosen_key: str, rejected_key: str,
                     completion_key: str, label_key: str) -> list:
    """``PreferencePair`` rows (with ``chosen_key`` and ``rejected_key``) or ``Feedback`` rows (with
    ``completion_key`` and a true/false or 1/0 ``label_key``), one kind per file."""
    if not rows:
        raise ValueError(f"{path} holds no rows")
    paired = isinstance(rows[0], dict) and chosen_key in rows[0]
    out = []
    for i, row in enumerate(rows):
        where = f"{path}, row {i}"
        if paired:
            prompt = _check_row(row, where, prompt_key, (chosen_key, rejected_key))
            out.append(PreferencePair(prompt, str(row[chosen_key]), str(row[rejected_key])))
            continue
        prompt = _check_row(row, where, prompt_key, (completion_key, label_key))
        label = row[label_key]
        if label not in (True, False):  # 1/0 compare equal to True/False
            raise ValueError(f"{where}: {label_key!r} must be true/false (or 1/0), got {label!r}")
        out.append(Feedback(prompt, str(row[completion_key]), bool(label)))
    return out


@register("preference")
class PreferenceFileTask(FileTask):
    """Preference rows of a local file (``.jsonl``/``.json``/``.ndjson``, ``.parquet``, a
    ``datasets`` folder): ``{"prompt", "chosen", "rejected"}`` pairs, or KTO's unpaired
    ``{"prompt", "completion", "label"}`` (label true: desirable). Options as ``FileTask``
    (``path``, ``eval_path`` or ``eval_fraction``: the held-out rows of the preference metrics,
    ``chat``) and the field names ``prompt_key``, ``chosen_key``, ``rejected_key``,
    ``completion_key``, ``label_key``."""

    preference = True

    def __init__(self, seed: int = 0, path: Optional[str] = None, eval_path: Optional[str] = None,
                 eval_fraction: float = 0.0, prompt_key: str = "prompt", chosen_key: str = "chosen",
                 rejected_key: str = "rejected", completion_key: str = "completion", label_key: str = "label",
                 chat: bool = True):
        Task.__init__(self, seed)
        self.chat = chat
        keys = (prompt_key, chosen_key, rejected_key, completion_key, label_key)
        self._load(path, eval_path, eval_fraction, lambda rows, where: _preference_rows(rows, where, *keys))
        if len({type(r) for r in self.rows + self.eval_rows}) > 1:
            raise ValueError(f"{path} and task.options.eval_path hold different kinds of rows: pairs "
                             f"({chosen_key!r}/{rejected_key!r}) in one, {completion_key!r}/{label_key!r} in the other")

    def eval_examples(self, start: int, count: int) -> list:
        if not self.eval_rows:
            raise ValueError("the preference task's held-out rows are missing: set task.options.eval_fraction "
                             "or task.options.eval_path (or task.eval_size=0)")
        return super().eval_examples(start, count)
