"""pyrl.rewards: text rewards, length shaping, dynamic sampling and pass@k."""
import math
import sys
from fractions import Fraction

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pyrl import rewards


def close(a, b, tol=1e-6):
    torch.testing.assert_close(a, torch.as_tensor(b, dtype=a.dtype, device=a.device), atol=tol, rtol=tol)


# ----------------------------------------------------------------------------------------------
# registry and text rewards

def test_names_and_registry():
    assert {"math_verify", "format", "exact_match"} <= set(rewards.names())

    @rewards.register("_test_len")
    def length(completions, *, scale: float = 1.0):
        return [len(c) * scale for c in completions]

    try:
        r = rewards.compute("_test_len", ["ab", "abcd"], scale=0.5)
        assert r.dtype == torch.float32
        close(r, [1.0, 2.0])
        with pytest.raises(ValueError, match="already registered"):
            rewards.register("_test_len")(lambda c: c)
    finally:
        rewards.unregister("_test_len")
    assert "_test_len" not in rewards.names()


@pytest.mark.parametrize("text, want", [
    (r"so the answer is \boxed{42}.", "42"),
    (r"\boxed{1} then \boxed{\frac{1}{2}}", r"\frac{1}{2}"),         # the last box wins
    (r"\boxed{x^{2} + \sqrt{y_{1}}}", r"x^{2} + \sqrt{y_{1}}"),      # nested braces
    (r"\fbox{7}", "7"),
    (r"\boxed {3}", "3"),
    (r"\boxed{5} and an unclosed \boxed{6", "5"),                     # unclosed box: the earlier one
    ("total: 3,000 apples, i.e. 2.5 crates", "2.5"),                 # the last plain number
    ("it is -12", "-12"),
    ("ratio 3/4", "3/4"),
    ("1,234,567", "1,234,567"),
    ("no answer here", None),
])
def test_extract_answer(text, want):
    assert rewards.extract_answer(text) == want


def test_math_verify_reward():
    pytest.importorskip("math_verify")
    completions = [
        r"... so \boxed{\frac{1}{2}}",       # 1/2 == 0.5
        "the answer is 0.5",                 # plain final number
        r"\boxed{3000}",                     # == 3,000
        r"\boxed{x^2 + 1}",                  # == 1 + x^2
        r"\boxed{7}",                        # != 8
        "I give up",                         # no answer -> 0
        [{"role": "assistant", "content": r"\boxed{4}"}],  # chat format
    ]
    truth = ["0.5", r"\frac12", "3,000", "1 + x^2", "8", "1", r"\boxed{4}"]
    r = rewards.compute("math_verify", completions, ground_truth=truth)
    close(r, [1, 1, 1, 1, 0, 0, 1])


def test_math_verify_missing_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "math_verify", None)  # makes `import math_verify` fail
    with pytest.raises(ImportError, match="pip install math-verify"):
        rewards.compute("math_verify", ["1"], ground_truth=["1"])


def test_format_reward():
    good = "<think>\nsome steps\n</think>\n<answer>4</answer>"
    r = rewards.compute("format", [good, "<answer>4</answer>", "<think>a</think><answer>4</answer> extra", "  " + good + "\n"])
    close(r, [1, 0, 0, 1])
    close(rewards.compute("format", ["Answer: 5", "5"], pattern=r"Answer: \d+"), [1, 0])
    with pytest.raises(ValueError, match="pattern must be a valid regular expression"):
        rewards.compute("format", ["x"], pattern="(")


def test_exact_match_reward():
    close(rewards.compute("exact_match", [" Paris\n", "paris", "Rome"], ground_truth=["Paris", "Paris", "Paris"]), [1, 0, 0])
    close(rewards.compute("exact_match", ["paris"], ground_truth=["PARIS"], ignore_case=True), [1])
    close(rewards.compute("exact_match", [r"so \boxed{12}", "none"], ground_truth=["12", "none"], extract=True), [1, 0])


def test_compute_bad_input():
    with pytest.raises(ValueError, match="unknown reward 'bleu'; available: brier, exact_match, format, majority_vote, math_verify"):
        rewards.compute("bleu", ["a"])
    with pytest.raises(TypeError, match="unexpected option 'answers'.*ground_truth"):
        rewards.compute("exact_match", ["a"], answers=["a"])
    with pytest.raises(ValueError, match="ground_truth must have 2 entries \\(one per completion\\), got 1"):
        rewards.compute("exact_match", ["a", "b"], ground_truth=["a"])
    with pytest.raises(TypeError, match="completions must be a list of strings"):
        rewards.compute("format", "just one string")
    with pytest.raises(TypeError, match="completions\\[1\\] must be a string"):
        rewards.compute("format", ["a", 3])
    assert rewards.compute("format", ["a"], device="cpu").device.type == "cpu"


# ----------------------------------------------------------------------------------------------
# length shaping

def test_dapo_overlong_penalty():
    # L_max = 20, L_cache = 4: 0 up to 16; (16 - |y|) / 4 on (16, 20]; -1 beyond
    p = rewards.dapo_overlong_penalty(torch.tensor([0, 10, 16, 17, 18, 20, 21, 100]), max_len=20, cache_len=4)
    close(p, [0, 0, 0, -0.25, -0.5, -1, -1, -1])
    assert p.dtype == torch.float32
    with pytest.raises(ValueError, match="cache_len must be <= max_len"):
        rewards.dapo_overlong_penalty(torch.tensor([1]), max_len=4, cache_len=8)
    with pytest.raises(ValueError, match="lengths must be >= 0"):
        rewards.dapo_overlong_penalty(torch.tensor([-1]), max_len=4, cache_len=2)


def test_dler_truncation():
    r = rewards.dler_truncation(torch.tensor([1.0, 1.0, 0.5, 0.0]), torch.tensor([10, 11, 3, 50]), budget=10)
    close(r, [1.0, 0.0, 0.5, 0.0])
    with pytest.raises(ValueError, match="lengths must have shape \\[4\\] \\(one per completion\\), got \\[3\\]"):
        rewards.dler_truncation(torch.ones(4), torch.ones(3), budget=10)


def test_grpo_lambda_length_penalty():
    correct = torch.tensor([1, 1, 0, 0, 1, 0, 0, 0])
    lengths = torch.tensor([10, 20, 30, 40, 10, 20, 30, 40])
    # group 1: accuracy 0.5 >= 0.5 -> penalised. lam = 0.5 - (L - 10) / 30 = [0.5, 1/6, -1/6, -0.5]
    #   correct: 1 + lam -> [1.5, 7/6]; wrong: min(0, lam) -> [-1/6, -0.5]
    # group 2: accuracy 0.25 < 0.5 -> plain 0/1 reward
    want = [1.5, 7 / 6, -1 / 6, -0.5, 1, 0, 0, 0]
    close(rewards.grpo_lambda_length_penalty(correct, lengths, 4), want)
    # top-lambda selection: ceil(0.5 * 2 groups) = 1 group, the most accurate one -> same result
    close(rewards.grpo_lambda_length_penalty(correct, lengths, 4, top_fraction=0.5), want)
    # top_fraction 1 selects both; group 2: lam = [0.5, 1/6, -1/6, -0.5] -> [1.5, 0, -1/6, -0.5]
    close(rewards.grpo_lambda_length_penalty(correct, lengths, 4, top_fraction=1.0, length_coef=1.0),
          want[:4] + [1.5, 0, -1 / 6, -0.5])
    # equal lengths -> no length term
    close(rewards.grpo_lambda_length_penalty(torch.tensor([1, 0]), torch.tensor([5, 5]), 2), [1, 0])
    with pytest.raises(ValueError, match="group_size=3 does not divide the batch of 8"):
        rewards.grpo_lambda_length_penalty(correct, lengths, 3)


def test_cosine_length_reward():
    c = torch.tensor([1, 1, 1, 0, 0, 0, 1, 0])
    L = torch.tensor([0, 50, 100, 0, 50, 100, 150, 150])
    # correct: 1 at 0, 0.5 at max_len, midpoint 0.75 at half; wrong: -1 at 0, -0.5 at max, -0.75 at half
    close(rewards.cosine_length_reward(c, L, 100), [1, 0.75, 0.5, -1, -0.75, -0.5, 0.5, -0.5])
    # `exceed` applies from max_len on (a completion that reached the cap was cut off)
    close(rewards.cosine_length_reward(c, L, 100, exceed=-10.0), [1, 0.75, -10, -1, -0.75, -10, -10, -10])
    # the paper's values: correct 2 -> 1, wrong -10 -> 0; at t = T/4, cos(pi t / T) = cos(pi / 4):
    # correct 1 + (2 - 1)(1 + cos) / 2; wrong 0 + (-10 - 0)(1 + cos) / 2
    close(rewards.cosine_length_reward(torch.tensor([1, 0]), torch.tensor([25, 25]), 100, correct_short=2.0,
                                       correct_long=1.0, wrong_short=-10.0, wrong_long=0.0),
          [1 + 0.5 * (1 + math.cos(math.pi / 4)), -5 * (1 + math.cos(math.pi / 4))])


@settings(max_examples=50, deadline=None)
@given(st.integers(0, 200), st.integers(0, 200))
def test_cosine_length_reward_orders(a, b):
    short, long = min(a, b), max(a, b)
    L = torch.tensor([short, long, short, long])
    r = rewards.cosine_length_reward(torch.tensor([1, 1, 0, 0]), L, 200)
    assert r[0] >= r[1] and r[3] >= r[2]          # correct short >= correct long; wrong long >= wrong short
    assert r[:2].min() > r[2:].max()              # any correct beats any wrong


def _hapo_scalar(h, L, correct, floor=-0.7):
    """HAPO's per-completion length reward, as in the authors' code."""
    if h is None:
        return 0.0
    r = math.cos(L / h * math.pi / 2) if L < 2 * h else -1.0
    return max(floor, r) if correct else min(0.0, r)


def test_history_aware_length_reward_hand():
    hapo = rewards.HistoryAwareLengthReward()
    ids = torch.tensor([0, 0, 1, 1])
    # first visit: no history -> 0; then h[0] = 50 (min correct length), h[1] stays unset (no correct)
    close(hapo(ids, torch.tensor([100, 50, 30, 40]), torch.tensor([1, 1, 0, 0])), [0, 0, 0, 0])
    assert hapo.history(torch.tensor([0, 1, 7])).tolist() == [50.0, math.inf, math.inf]
    # second visit to prompt 0 with h = 50:
    # correct 25 -> cos(pi/4); correct 50 -> 0; correct 150 -> max(cos(3pi/4), -0.7) = -0.7
    # wrong 25 -> min(cos(pi/4), 0) = 0; wrong 100 -> cos(pi) = -1
    r = hapo(torch.tensor([0] * 5), torch.tensor([25, 50, 150, 25, 100]), torch.tensor([1, 1, 1, 0, 0]), update=False)
    close(r, [math.cos(math.pi / 4), 0, -0.7, 0, -1])
    assert hapo.history(torch.tensor([0])).item() == 50.0  # update=False left it alone
    hapo.update(torch.tensor([0]), torch.tensor([25]), torch.tensor([True]))
    assert hapo.history(torch.tensor([0])).item() == 25.0


def test_history_aware_length_reward_matches_loop_and_checkpoints():
    gen = torch.Generator().manual_seed(0)
    weight = 0.5
    hapo = rewards.HistoryAwareLengthReward(weight=weight)
    ref_hist: dict = {}
    for step in range(6):
        ids = torch.randint(0, 12, (16,), generator=gen)
        L = torch.randint(1, 300, (16,), generator=gen)
        c = torch.rand(16, generator=gen) < 0.5
        got = hapo(ids, L, c)
        want = [weight * _hapo_scalar(ref_hist.get(int(i)), int(l), bool(ok)) for i, l, ok in zip(ids, L, c)]
        close(got, want, 1e-6)
        for i, l, ok in zip(ids.tolist(), L.tolist(), c.tolist()):
            if ok:
                ref_hist[i] = min(ref_hist.get(i, math.inf), l)
        if step == 2:
            state = hapo.state_dict()
            restored = rewards.HistoryAwareLengthReward(weight=0.1)
            restored.load_state_dict(state)
            probe = (ids, L, c)
            close(restored.reward(*probe), hapo.reward(*probe))
    with pytest.raises(ValueError, match="prompt_ids must be >= 0"):
        hapo(torch.tensor([-1]), torch.tensor([3]), torch.tensor([True]))
    with pytest.raises(TypeError, match="prompt_ids must have dtype"):
        hapo(torch.tensor([0.0]), torch.tensor([3]), torch.tensor([True]))
    with pytest.raises(KeyError, match="missing history"):
        hapo.load_state_dict({"weight": 1.0, "correct_floor": -0.7})


def test_mask_truncated_completions():
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    for m in (mask, mask.float(), mask.bool()):
        out = rewards.mask_truncated_completions(m, torch.tensor([False, True]))
        assert out.dtype == m.dtype
        assert out.long().tolist() == [[1, 1, 0], [0, 0, 0]]
    with pytest.raises(ValueError, match="is_truncated must have shape \\[2\\]"):
        rewards.mask_truncated_completions(mask, torch.tensor([True]))
    with pytest.raises(ValueError, match="mask must have shape \\[B, T\\]"):
        rewards.mask_truncated_completions(torch.ones(3), torch.tensor([True]))


# ----------------------------------------------------------------------------------------------
# dynamic sampling

def test_zero_variance_filter_and_rate():
    r = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.5, 0.25])
    keep = rewards.filter_zero_variance_groups(r, 2)
    assert keep.dtype == torch.bool
    assert keep.tolist() == [False, False, True, True, False, False, True, True]
    assert rewards.zero_variance_group_rate(r, 2) == 0.5
    assert rewards.zero_variance_group_rate(r, 1) == 1.0  # a group of one never varies
    with pytest.raises(ValueError, match="group_size=3 does not divide the batch of 8 rewards"):
        rewards.filter_zero_variance_groups(r, 3)
    with pytest.raises(TypeError, match="rewards must be a float tensor"):
        rewards.zero_variance_group_rate(torch.tensor([1, 0]), 2)


def _scripted(rounds):
    """sample_fn that returns the given reward lists in turn, with a dict batch naming each row."""
    it = iter(rounds)
    counter = {"n": 0}

    def sample_fn():
        r = torch.tensor(next(it))
        base = counter["n"]
        counter["n"] += len(r)
        ids = list(range(base, base + len(r)))
        return {"ids": torch.tensor(ids), "text": [f"c{i}" for i in ids]}, r

    return sample_fn


def test_dynamic_sampler_collects_exactly_target():
    # round 1: groups [1,1] (drop), [0,1] (keep); round 2: [0,0] (drop), [1,0] (keep), [0.5,0] (extra, dropped)
    sampler = rewards.DynamicSampler(_scripted([[1.0, 1.0, 0.0, 1.0], [0.0, 0.0, 1.0, 0.0, 0.5, 0.0]]),
                                     group_size=2, target_groups=2)
    out = sampler.sample()
    assert out.complete and out.num_groups == 2 and out.rounds == 2
    assert out.batch["ids"].tolist() == [2, 3, 6, 7]
    assert out.batch["text"] == ["c2", "c3", "c6", "c7"]
    close(out.rewards, [0.0, 1.0, 1.0, 0.0])
    assert out.zero_variance_rate == 2 / 5


def test_dynamic_sampler_shortfall():
    # only the second group of round 1 is informative
    rounds = [[1.0, 1.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]]
    with pytest.raises(RuntimeError, match="found 1 of 2 groups .* after 2 rounds"):
        rewards.DynamicSampler(_scripted(rounds), group_size=2, target_groups=2, max_rounds=2).sample()
    out = rewards.DynamicSampler(_scripted(rounds), group_size=2, target_groups=2, max_rounds=2,
                                 on_shortfall="return")()
    assert not out.complete and out.num_groups == 1 and out.rounds == 2 and out.batch["ids"].tolist() == [2, 3]
    assert out.zero_variance_rate == 3 / 4
    none = rewards.DynamicSampler(_scripted([[1.0, 1.0]]), group_size=2, target_groups=1, max_rounds=1,
                                  on_shortfall="return")()
    assert none.num_groups == 0 and none.batch is None and none.rewards.numel() == 0
    with pytest.raises(ValueError, match="target_groups must be a positive int"):
        rewards.DynamicSampler(lambda: None, group_size=2, target_groups=0)
    with pytest.raises(TypeError, match="sample_fn must return a \\(batch, rewards\\) tuple"):
        rewards.DynamicSampler(lambda: torch.ones(2), group_size=2, target_groups=1).sample()
    with pytest.raises(ValueError, match="leading size 4"):
        rewards.DynamicSampler(lambda: (torch.ones(3), torch.tensor([0.0, 1, 0, 1])), group_size=2,
                               target_groups=1).sample()


# ----------------------------------------------------------------------------------------------
# pass@k

def _pass_at_k_exact(n, c, k):
    if n - c < k:
        return 1.0
    return float(1 - Fraction(math.comb(n - c, k), math.comb(n, k)))


def test_pass_at_k_hand_and_grid():
    # n = 10, c = 3, k = 1 -> 3/10; k = 2 -> 1 - C(7,2)/C(10,2) = 1 - 21/45
    assert math.isclose(float(rewards.pass_at_k(10, 3, 1)), 0.3)
    assert math.isclose(float(rewards.pass_at_k(10, 3, 2)), 1 - 21 / 45)
    ns = torch.tensor([n for n in range(1, 13) for c in range(n + 1)])
    cs = torch.tensor([c for n in range(1, 13) for c in range(n + 1)])
    for k in (1, 2, 5):
        sel = ns >= k
        got = rewards.pass_at_k(ns[sel], cs[sel], k)
        want = [_pass_at_k_exact(int(n), int(c), k) for n, c in zip(ns[sel], cs[sel])]
        close(got, torch.tensor(want, dtype=torch.float64), 1e-12)


def test_pass_at_k_large_and_broadcast():
    got = rewards.pass_at_k(torch.tensor([1000, 1000]), torch.tensor([10, 0]), 100)
    close(got, [_pass_at_k_exact(1000, 10, 100), 0.0], 1e-12)
    grid = rewards.pass_at_k(torch.tensor([[16], [32]]), torch.tensor([0, 4, 16]), 8)
    assert grid.shape == (2, 3) and grid[0, 2] == 1.0 and grid[0, 0] == 0.0
    with pytest.raises(ValueError, match="n must be >= k=5"):
        rewards.pass_at_k(4, 1, 5)
    with pytest.raises(ValueError, match="c must satisfy 0 <= c <= n"):
        rewards.pass_at_k(4, 5, 1)
    with pytest.raises(TypeError, match="n must be an int or an integer tensor"):
        rewards.pass_at_k(torch.tensor([4.0]), 1, 1)
    with pytest.raises(ValueError, match="k must be a positive int"):
        rewards.pass_at_k(4, 1, 0)


def test_brier_calibration_reward():
    """RLCR (docs/formulas.md §8.1): R = c - (q - c)^2, float64 by hand."""
    from pyrl import rewards as rw
    texts = ["the answer is 12 <confidence>0.75</confidence>",
             "13 <confidence> 0.25 </confidence>",
             "12",                                        # no confidence stated: q = 0
             "\\boxed{12} <confidence>1.7</confidence>",   # clipped to 1
             "<confidence>0.5</confidence> 12 <confidence>0.9</confidence>"]  # the last one counts
    got = rw.compute("brier", texts, ground_truth=["12"] * 5).double()
    want = torch.tensor([1 - 0.25 ** 2, -(0.25 ** 2), 1 - 1.0, 1.0, 1 - 0.1 ** 2], dtype=torch.float64)
    torch.testing.assert_close(got, want.to(got.dtype), rtol=0, atol=1e-7)
    with pytest.raises(ValueError, match="capture the confidence"):
        rw.compute("brier", texts, ground_truth=["12"] * 5, pattern="<c>")
    with pytest.raises(ValueError, match="ground_truth must have 5 entries"):
        rw.compute("brier", texts, ground_truth=["12"])


def test_laser_d_bonus_within_the_budget_of_the_difficulty():
    """LASER-D (docs/formulas.md §8.2), float64 by hand: group accuracies 1 (easy), 1/2 (medium), 0 (hard)."""
    from pyrl import rewards as rw
    r = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    L = torch.tensor([5, 9, 5, 5, 5, 50])
    got = rw.laser_d_length_reward(r, L, 2, budgets=(6, 8, 40), alpha=0.5)
    torch.testing.assert_close(got, torch.tensor([1.5, 1.0, 1.5, 0.0, 0.0, 0.0], dtype=torch.float64), rtol=0, atol=0)
    got = rw.laser_d_length_reward(r[:4], L[:4], 4, budgets=(6, 8, 40), easy=0.75)  # accuracy 3/4: easy
    torch.testing.assert_close(got, torch.tensor([1.5, 1.0, 1.5, 0.0], dtype=torch.float64), rtol=0, atol=0)
    with pytest.raises(ValueError, match="budgets must be three lengths"):
        rw.laser_d_length_reward(r, L, 2, budgets=(6, 8))
    with pytest.raises(ValueError, match="easy must be in"):
        rw.laser_d_length_reward(r, L, 2, budgets=(6, 8, 9), easy=0.2, hard=0.5)


def test_difficulty_aware_truncation_tightens_on_solved_prompts():
    from pyrl import rewards as rw
    r = torch.tensor([1.0, 1.0, 1.0, 0.0], dtype=torch.float64)
    L = torch.tensor([6, 4, 6, 6])
    # group 0 solved (p = 1): budget 10 * (1 - 0.5) = 5; group 1 p = 1/2: budget 7.5
    got = rw.difficulty_aware_truncation(r, L, 2, budget=10, shrink=0.5)
    torch.testing.assert_close(got, torch.tensor([0.0, 1.0, 1.0, 0.0], dtype=torch.float64), rtol=0, atol=0)
    same = rw.difficulty_aware_truncation(r, L, 2, budget=10, shrink=0.0)
    torch.testing.assert_close(same, rw.dler_truncation(r, L, 10), rtol=0, atol=0)  # shrink 0 is DLER
    with pytest.raises(ValueError, match="shrink"):
        rw.difficulty_aware_truncation(r, L, 2, budget=10, shrink=1.0)


def test_decaying_budget_and_wrong_answer_length_penalty():
    from pyrl import rewards as rw
    assert [rw.decaying_budget(s, initial=1000, decay=0.5, every=10, minimum=200) for s in (0, 9, 10, 25, 99)] == \
        [1000, 1000, 500, 250, 200]
    with pytest.raises(ValueError, match="minimum"):
        rw.decaying_budget(0, initial=10, minimum=20)
    r = torch.tensor([1.0, 0.0, 0.0, 0.25], dtype=torch.float64)
    got = rw.wrong_answer_length_penalty(r, torch.tensor([80, 50, 200, 0]), 100, coef=0.5)
    torch.testing.assert_close(got, torch.tensor([1.0, -0.25, -0.5, 0.25], dtype=torch.float64), rtol=0, atol=0)
    with pytest.raises(ValueError, match="lengths must have shape"):
        rw.wrong_answer_length_penalty(r, torch.tensor([1, 2]), 100)


def test_majority_vote_scores_against_the_groups_most_common_answer():
    """Co-Reward (docs/formulas.md §8.3): groups are the completions of one prompt."""
    from pyrl import rewards as rw
    texts = ["it is 12", "\\boxed{12}", "13", "no idea",   # prompt a: 12 wins 2 to 1
             "5", "6",                                  # prompt b: a tie, the first answer (5) wins
             "nothing", "still nothing"]                # prompt c: no votes
    prompts = ["a"] * 4 + ["b"] * 2 + ["c"] * 2
    got = rw.compute("majority_vote", texts, prompts=prompts).double()
    want = torch.tensor([1, 1, 0, 0, 1, 0, 0, 0], dtype=torch.float64)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert rw.compute("majority_vote", ["1.0", "1", "2"], prompts=["p"] * 3).tolist() == [1.0, 1.0, 0.0]  # by value
    with pytest.raises(ValueError, match="prompts must have 8 entries"):
        rw.compute("majority_vote", texts, prompts=["a"])


def test_preference_as_reward_is_a_sigmoid_of_the_margin():
    from pyrl import rewards as rw
    r = torch.tensor([2.0, -1.0, 0.5], dtype=torch.float64)
    ref = torch.tensor([[0.0, 1.0], [0.0, -3.0], [0.5, 0.5]], dtype=torch.float64)
    want = torch.stack([torch.sigmoid(r[i] - ref[i]).mean() for i in range(3)])
    torch.testing.assert_close(rw.preference_as_reward(r, ref), want, rtol=1e-15, atol=0)
    torch.testing.assert_close(rw.preference_as_reward(r, ref[:, 0]), torch.sigmoid(r - ref[:, 0]), rtol=1e-15, atol=0)
    torch.testing.assert_close(rw.preference_as_reward(r, 0.5), torch.sigmoid(r - 0.5), rtol=1e-15, atol=0)
    with pytest.raises(ValueError, match=r"reference must have shape \[3\] or \[3, M\]"):
        rw.preference_as_reward(r, torch.zeros(2))
