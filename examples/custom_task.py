"""Add your own verifiable task and train on it: a new task is one class.

    python examples/custom_task.py --out runs/reverse

The task below asks the tiny model to reverse a 3-letter string ("abc=" -> "cba"); the reward is an
exact match (``pyrl.rewards``' ``exact_match``). Everything else is the `tiny` preset; in 150 steps
(about 30 s on 2 cores) greedy accuracy goes from 0.41 to 0.96.
"""
import argparse
import json

from pyrl.train import apply_overrides, get_preset, train
from pyrl.train.tasks import Example, Task, register


@register("reverse")
class ReverseTask(Task):
    """``"abc="`` -> ``"cba"``: ``example(i)`` is a pure function of (seed, i), so runs resume exactly."""

    reward = "exact_match"

    def __init__(self, seed: int = 0, length: int = 3, letters: str = "abcdef"):
        super().__init__(seed)
        self.length, self.letters = length, letters

    def example(self, index: int) -> Example:
        rng = self._rng(index)
        word = "".join(rng.choice(self.letters) for _ in range(self.length))
        return Example(prompt=word + "=", answer=word[::-1], solution=word[::-1])


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="runs/reverse")
    p.add_argument("--steps", type=int, default=150)
    args = p.parse_args()
    cfg = apply_overrides(get_preset("tiny"), [
        "task.name=reverse", 'task.options={"length": 3}', f"max_steps={args.steps}",
        "rollout.max_new_tokens=5", "warmup.steps=30"])
    print(json.dumps(train(cfg, args.out), indent=1))


if __name__ == "__main__":
    main()
