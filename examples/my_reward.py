"""A reward function of your own, for ``task.reward`` (see docs/trainer.md, "Your data and rewards").

    pyrl train --preset tiny --out runs/mine --set task.name=jsonl \
        --set task.options.path=examples/data/addition.jsonl --set task.options.eval_fraction=0.2 \
        --set task.reward=examples/my_reward.py:sum_reward

The trainer calls it with the decoded completions and, as keywords it declares, ``ground_truth``
(each row's ``"answer"``) and ``prompts`` (the exact prompt texts); it returns one float per
completion.
"""
import re


def sum_reward(completions: list[str], *, ground_truth: list[str]) -> list[float]:
    """1 for exactly the answer; 0.2 when the reply's leading number is the answer but more follows
    (partial credit: the model has found the sum and must still learn to stop); else 0."""
    out = []
    for text, answer in zip(completions, ground_truth):
        text = text.strip()
        leading = re.match(r"\d+", text)
        out.append(1.0 if text == answer else 0.2 if leading and leading.group() == answer else 0.0)
    return out
