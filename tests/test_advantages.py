"""pyrl.advantages: hand-computed cases, float64 loop references, properties and bad input."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pyrl import advantages

DEV = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]
GROUP_ESTIMATORS = ["grpo", "rloo", "grpo_passk", "gpg", "reinforce_pp_baseline", "positive_amplification", "canon"]


def t64(*xs):
    return torch.tensor(xs, dtype=torch.float64)


def close(a, b, tol=1e-9):
    torch.testing.assert_close(a, torch.as_tensor(b, dtype=a.dtype, device=a.device), atol=tol, rtol=tol)


# ----------------------------------------------------------------------------------------------
# float64 loop references (deliberately naive)

def gae_loop(values, token_rewards, mask, gamma, lam):
    """GAE with an explicit reverse loop over time; masked positions are skipped (the next value
    is that of the next valid token, 0 after the last one)."""
    B, T = values.shape
    adv = torch.zeros(B, T, dtype=torch.float64)
    for b in range(B):
        next_v, next_a = 0.0, 0.0
        for t in reversed(range(T)):
            if not mask[b, t]:
                continue
            delta = float(token_rewards[b, t]) + gamma * next_v - float(values[b, t])
            next_a = delta + gamma * lam * next_a
            next_v = float(values[b, t])
            adv[b, t] = next_a
    returns = (adv + values) * mask
    return adv, returns


def seq_reward_at_last_valid(rewards, mask):
    r = torch.zeros(mask.shape, dtype=torch.float64)
    for b in range(mask.shape[0]):
        idx = [t for t in range(mask.shape[1]) if mask[b, t]]
        if idx:
            r[b, idx[-1]] = rewards[b]
    return r


def whiten_loop(x, mask, eps=1e-8):
    vals = [float(x[b, t]) for b in range(x.shape[0]) for t in range(x.shape[1]) if mask[b, t]]
    n = len(vals)
    mean = sum(vals) / n
    var = sum((v - mean) ** 2 for v in vals) / (n - 1)
    return torch.where(mask.bool(), (x - mean) / math.sqrt(var + eps), torch.zeros_like(x))


def return_to_go_loop(r, mask, gamma):
    out = torch.zeros_like(r)
    for b in range(r.shape[0]):
        running = 0.0
        for t in reversed(range(r.shape[1])):
            if mask[b, t]:
                running = float(r[b, t]) + gamma * running
                out[b, t] = running
    return out


def random_mask(B, T, gen):
    """Right padding plus some holes in the middle and a fully masked row."""
    lengths = torch.randint(1, T + 1, (B,), generator=gen)
    mask = (torch.arange(T)[None, :] < lengths[:, None]).long()
    holes = torch.rand(B, T, generator=gen) < 0.2
    mask = mask * (~holes)
    mask[0] = 0
    return mask


# ----------------------------------------------------------------------------------------------
# registry

def test_names_and_registry():
    expected = {"grpo", "rloo", "remax", "opo", "reinforce_pp", "reinforce_pp_baseline", "gae",
                "grpo_passk", "gpg", "drpo"}
    assert expected <= set(advantages.names())
    assert advantages.names() == sorted(advantages.names())
    assert set(advantages.__all__) >= {"compute", "names", "register", "aggregate_rewards"}

    @advantages.register("_test_double")
    def double(rewards, group_size, *, factor: float = 2.0):
        return rewards * factor

    try:
        close(advantages.compute("_test_double", t64(1, 2), group_size=1, factor=3.0), [3.0, 6.0])
        with pytest.raises(ValueError, match="already registered"):
            advantages.register("_test_double")(lambda r, g: r)
    finally:
        advantages.unregister("_test_double")
    assert "_test_double" not in advantages.names()


# ----------------------------------------------------------------------------------------------
# hand-computed cases

def test_grpo_group_scale():
    # group [1, 0, 1, 0]: mean 0.5, Bessel std sqrt(4 * 0.25 / 3) = sqrt(1/3); A = +-0.5 / (sqrt(1/3) + 1e-6)
    # group [3, 3, 3, 3]: constant -> 0
    a = advantages.compute("grpo", t64(1, 0, 1, 0, 3, 3, 3, 3), group_size=4)
    s = 0.5 / (math.sqrt(1 / 3) + 1e-6)
    close(a, [s, -s, s, -s, 0, 0, 0, 0])


def test_grpo_batch_and_none_scale():
    r = t64(1, 0, 2, 2)
    # centred by group: [0.5, -0.5, 0, 0]; batch std of [1, 0, 2, 2]: mean 1.25,
    # var = (0.0625 + 1.5625 + 0.5625 + 0.5625) / 3 = 0.916667
    std = math.sqrt(2.75 / 3)
    close(advantages.compute("grpo", r, group_size=2, scale="batch"), [0.5 / (std + 1e-6), -0.5 / (std + 1e-6), 0, 0])
    # Dr. GRPO: no division
    close(advantages.compute("grpo", r, group_size=2, scale="none"), [0.5, -0.5, 0, 0])


def test_rloo():
    # [1, 0, 1, 0]: A_0 = 1 - (0 + 1 + 0) / 3 = 2/3, A_1 = 0 - 2/3 = -2/3
    # [0, 3]: A_0 = 0 - 3 = -3, A_1 = 3
    close(advantages.compute("rloo", t64(1, 0, 1, 0), group_size=4), [2 / 3, -2 / 3, 2 / 3, -2 / 3])
    close(advantages.compute("rloo", t64(0, 3), group_size=2), [-3, 3])


def test_remax():
    close(advantages.compute("remax", t64(1, 0.5, 0), group_size=1, greedy_rewards=t64(0.5, 0.5, 0.5)),
          [0.5, 0.0, -0.5])


def test_opo():
    # rewards [1, 0], lengths [1, 3]: baseline (1*1 + 3*0) / 4 = 0.25 -> [0.75, -0.25]
    close(advantages.compute("opo", t64(1, 0), group_size=2, lengths=torch.tensor([1, 3])), [0.75, -0.25])
    # zero total length falls back to the plain mean
    close(advantages.compute("opo", t64(1, 0), group_size=2, lengths=torch.tensor([0, 0])), [0.5, -0.5])


def test_grpo_passk():
    # best 0.9, second 0.5 -> only index 1 gets 0.4; a tie at the top gives 0 to all
    close(advantages.compute("grpo_passk", t64(0.2, 0.9, 0.5, 0.1, 0.2, 0.9, 0.5, 0.9), group_size=4),
          [0, 0.4, 0, 0, 0, 0, 0, 0])


def test_gpg():
    # groups [1, 0] (valid) and [1, 1] (zero std): B = 4, M = 2 -> alpha = 4 / 2 = 2
    # A = 2 * (R - mean_g R) = [1, -1, 0, 0]
    close(advantages.compute("gpg", t64(1, 0, 1, 1), group_size=2), [1, -1, 0, 0])
    # all groups valid -> alpha = 1; with group std: 0.5 / (sqrt(0.5) + 1e-6)
    s = 0.5 / (math.sqrt(0.5) + 1e-6)
    close(advantages.compute("gpg", t64(1, 0, 0, 1), group_size=2, scale="group"), [s, -s, -s, s])


def test_drpo():
    # correct {0, 1} with lengths 10, 20, C = 20, lam = 0.5: w ∝ exp(-L / 10) = e^-1, e^-2
    # -> w0 = 1 / (1 + e^-1) = 0.731059, w1 = 0.268941; two negatives share -1/2
    a = advantages.compute("drpo", t64(1, 1, 0, 0), group_size=4, lengths=torch.tensor([10, 20, 5, 5]),
                           max_length=20, lam=0.5)
    w0 = 1 / (1 + math.exp(-1))
    close(a, [w0, 1 - w0, -0.5, -0.5])
    # with scores and tau = 1, negatives follow -softmax(s): s = [-1, -2] -> -[w0, 1 - w0]
    a = advantages.compute("drpo", t64(1, 1, 0, 0), group_size=4, lengths=torch.tensor([10, 20, 5, 5]),
                           max_length=20, lam=0.5, scores=t64(0, 0, -1, -2), tau=1.0)
    close(a, [w0, 1 - w0, -w0, -(1 - w0)])
    # all-correct / all-wrong groups contribute nothing; `correct` overrides rewards > 0
    a = advantages.compute("drpo", t64(1, 1, 0, 0), group_size=2, lengths=torch.tensor([1, 2, 3, 4]))
    close(a, [0, 0, 0, 0])
    a = advantages.compute("drpo", t64(1, 1), group_size=2, lengths=torch.tensor([3, 3]),
                           correct=torch.tensor([True, False]))
    close(a, [1, -1])


def test_reinforce_pp_hand():
    # T = 3, mask [1, 1, 0], R = 1, kl [0.1, 0.2, 0.3], kl_coef 0.5, gamma 1:
    # r = [-0.05, 1 - 0.1, 0] -> return-to-go [0.85, 0.9, 0]; whitened over the 2 valid tokens:
    # mean 0.875, unbiased var 2 * 0.025^2 / 1 = 0.00125 -> [-0.025, 0.025] / sqrt(0.00125 + 1e-8)
    a = advantages.compute("reinforce_pp", t64(1), group_size=1, mask=torch.tensor([[1, 1, 0]]),
                           kl=t64(0.1, 0.2, 0.3)[None], kl_coef=0.5)
    s = 0.025 / math.sqrt(0.00125 + 1e-8)
    close(a, [[-s, s, 0]])


def test_reinforce_pp_matches_loop():
    gen = torch.Generator().manual_seed(1)
    B, T = 6, 37
    mask = random_mask(B, T, gen)
    R = torch.randn(B, generator=gen, dtype=torch.float64)
    kl = torch.randn(B, T, generator=gen, dtype=torch.float64) * 0.1
    for gamma in (1.0, 0.9):
        got = advantages.compute("reinforce_pp", R, group_size=1, mask=mask, kl=kl, kl_coef=0.2, gamma=gamma)
        r = seq_reward_at_last_valid(R, mask) - 0.2 * kl * mask
        want = whiten_loop(return_to_go_loop(r, mask, gamma), mask)
        close(got, want, 1e-10)


def test_reinforce_pp_baseline_hand():
    # groups [1, 0] and [0, 0]: centred [0.5, -0.5, 0, 0]; batch mean 0,
    # unbiased var (0.25 + 0.25) / 3 = 1/6 -> +-0.5 / sqrt(1/6 + 1e-8)
    s = 0.5 / math.sqrt(1 / 6 + 1e-8)
    close(advantages.compute("reinforce_pp_baseline", t64(1, 0, 0, 0), group_size=2), [s, -s, 0, 0])


def test_reinforce_pp_baseline_mask_matches_loop():
    gen = torch.Generator().manual_seed(2)
    mask = random_mask(8, 9, gen)
    R = torch.tensor([1.0, 0, 0, 1, 1, 1, 0.5, 0], dtype=torch.float64)
    got = advantages.compute("reinforce_pp_baseline", R, group_size=2, mask=mask)
    centred = R.view(4, 2) - R.view(4, 2).mean(1, keepdim=True)
    want = whiten_loop(centred.reshape(-1)[:, None] * mask, mask)
    want[4:6] = 0  # the constant group [1, 1] (rows 4, 5) is exactly 0
    close(got, want, 1e-10)


def test_gae_hand():
    # V = [0.5, 0.2], R = 1 on the last token, gamma = lam = 1:
    # delta_1 = 1 + 0 - 0.2 = 0.8, delta_0 = 0 + 0.2 - 0.5 = -0.3; A = [0.5, 0.8]; returns = [1, 1]
    adv, ret = advantages.compute("gae", t64(1), group_size=1, values=t64(0.5, 0.2)[None], gamma=1.0, lam=1.0)
    close(adv, [[0.5, 0.8]])
    close(ret, [[1.0, 1.0]])
    # gamma = 0.9, lam = 0.5: delta_1 = 0.8, delta_0 = 0.9 * 0.2 - 0.5 = -0.32; A_0 = -0.32 + 0.45 * 0.8
    adv, ret = advantages.compute("gae", t64(1), group_size=1, values=t64(0.5, 0.2)[None], gamma=0.9, lam=0.5)
    close(adv, [[-0.32 + 0.45 * 0.8, 0.8]])
    # a hole in the middle is skipped: V_{next} of t=0 is V_2, and the hole is 0
    adv, ret = advantages.compute("gae", t64(1), group_size=1, values=t64(0.5, 9.0, 0.2)[None],
                                  mask=torch.tensor([[1, 0, 1]]), gamma=1.0, lam=1.0)
    close(adv, [[0.5, 0.0, 0.8]])
    close(ret, [[1.0, 0.0, 1.0]])


@pytest.mark.parametrize("T", [1, 5, 64, 1000])
def test_gae_matches_loop(T):
    gen = torch.Generator().manual_seed(T)
    B = 5
    mask = random_mask(B, T, gen)
    V = torch.randn(B, T, generator=gen, dtype=torch.float64)
    tok = torch.randn(B, T, generator=gen, dtype=torch.float64) * 0.1
    R = torch.randn(B, generator=gen, dtype=torch.float64)
    for gamma, lam in [(1.0, 0.95), (0.99, 0.9), (0.5, 0.0), (0.0, 1.0), (1.0, 1.0)]:
        adv, ret = advantages.compute("gae", R, group_size=1, values=V, token_rewards=tok, mask=mask,
                                      gamma=gamma, lam=lam)
        want_adv, want_ret = gae_loop(V, tok + seq_reward_at_last_valid(R, mask), mask, gamma, lam)
        close(adv, want_adv, 1e-9)
        close(ret, want_ret, 1e-9)


def test_gae_right_padding_matches_classic_recursion():
    # TRL/verl: nextvalues = values[:, t + 1] (padded values are 0), lastgaelam carried through padding
    gen = torch.Generator().manual_seed(3)
    B, T, gamma, lam = 4, 12, 0.95, 0.9
    lengths = torch.tensor([12, 7, 3, 1])
    mask = (torch.arange(T)[None, :] < lengths[:, None]).double()
    V = torch.randn(B, T, generator=gen, dtype=torch.float64) * mask
    r = torch.randn(B, T, generator=gen, dtype=torch.float64) * mask
    last, rev = 0.0, []
    for t in reversed(range(T)):
        nv = V[:, t + 1] if t < T - 1 else 0.0
        last = r[:, t] + gamma * nv - V[:, t] + gamma * lam * last
        rev.append(last)
    classic = torch.stack(rev[::-1], 1) * mask
    adv, _ = advantages.compute("gae", torch.zeros(B, dtype=torch.float64), group_size=1, values=V,
                                token_rewards=r, mask=mask, gamma=gamma, lam=lam)
    close(adv, classic, 1e-10)


def test_gae_whiten_and_float32():
    gen = torch.Generator().manual_seed(4)
    mask = random_mask(4, 10, gen)
    V = torch.randn(4, 10, generator=gen)
    adv, ret = advantages.compute("gae", torch.ones(4), group_size=1, values=V, mask=mask, whiten=True)
    assert adv.dtype == torch.float32 and ret.dtype == torch.float32
    valid = adv[mask.bool()]
    assert abs(float(valid.mean())) < 1e-5 and abs(float(valid.std()) - 1) < 1e-3
    assert torch.all(adv[~mask.bool()] == 0)


def test_discounted_scan_long_sequence():
    # the two-level scan against a float64 loop on an uneven length (T not a square)
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(3, 2003, generator=gen, dtype=torch.float64)
    got = advantages._discounted_reverse_cumsum(x, 0.997)
    want = torch.zeros_like(x)
    run = torch.zeros(3, dtype=torch.float64)
    for t in reversed(range(x.shape[1])):
        run = x[:, t] + 0.997 * run
        want[:, t] = run
    close(got, want, 1e-9)


@pytest.mark.parametrize("device", DEV)
def test_mask_broadcast_and_device(device):
    r = torch.tensor([1.0, 0.0, 0.5, 0.5], device=device)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1], [0, 0, 0]], device=device)
    a = advantages.compute("grpo", r, group_size=2, mask=mask)
    assert a.shape == (4, 3) and a.device.type == device
    s = 0.5 / (math.sqrt(0.5) + 1e-6)
    close(a.cpu(), [[s, s, 0], [-s, 0, 0], [0, 0, 0], [0, 0, 0]], 1e-6)
    for name in advantages.names():
        opts = _required_options(name, r, mask)
        out = advantages.compute(name, r, group_size=2, **opts)
        out = out[0] if isinstance(out, tuple) else out
        assert out.device.type == device and torch.isfinite(out).all()


def _required_options(name, r, mask):
    B, T = r.shape[0], 3 if mask is None else mask.shape[1]
    d = r.device
    return {
        "remax": dict(greedy_rewards=torch.zeros(B, device=d)),
        "opo": dict(lengths=torch.arange(1, B + 1, device=d)),
        "drpo": dict(lengths=torch.arange(1, B + 1, device=d)),
        "canon": dict(metric=torch.arange(B, 0, -1, device=d)),
        "reinforce_pp": dict(mask=torch.ones(B, T, device=d) if mask is None else mask),
        "gae": dict(values=torch.zeros(B, T, device=d, dtype=r.dtype)),
    }.get(name, {})


def test_half_precision_inputs_give_float32():
    a = advantages.compute("grpo", torch.tensor([1.0, 0.0], dtype=torch.bfloat16), group_size=2)
    assert a.dtype == torch.float32


# ----------------------------------------------------------------------------------------------
# multi-reward aggregation

def test_aggregate_sum_then_normalize():
    r = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.0, 0.0]], dtype=torch.float64)
    # weighted sum with w = [2, 1]: [2, 1, 3, 0] -> mean 1.5, Bessel std sqrt(5/3)
    got = advantages.aggregate_rewards(r, [2.0, 1.0], mode="sum_then_normalize", group_size=4)
    s = math.sqrt(5 / 3) + 1e-6
    close(got, [0.5 / s, -0.5 / s, 1.5 / s, -1.5 / s])


def test_aggregate_normalize_then_sum():
    # group of 4, rewards r1 = [1, 0, 1, 0], r2 = [0, 1, 1, 0]
    # z1 = z2-pattern: each column is +-0.5 / (sqrt(1/3) + eps) = +-k
    # sum = [k - k, -k + k, 2k, -2k] = [0, 0, 2k, -2k]; batch mean 0, std = sqrt(8 k^2 / 3)
    # -> [0, 0, 2k / (std + eps), -2k / (std + eps)]
    r = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.0, 0.0]], dtype=torch.float64)
    k = 0.5 / (math.sqrt(1 / 3) + 1e-6)
    std = math.sqrt(8 * k * k / 3)
    got = advantages.aggregate_rewards(r, mode="normalize_then_sum", group_size=4)
    close(got, [0, 0, 2 * k / (std + 1e-6), -2 * k / (std + 1e-6)])
    # a group where every reward is constant stays exactly 0
    r2 = torch.cat([r, torch.ones(4, 2, dtype=torch.float64)])
    got = advantages.aggregate_rewards(r2, [1.0, 0.5], mode="normalize_then_sum", group_size=4)
    assert torch.all(got[4:] == 0) and torch.isfinite(got).all()


def test_gdpo_keeps_combinations_apart():
    # GRPO on the sum maps (1, 0) and (0, 1) to the same advantage; GDPO with unequal spreads does not
    r = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0], [0.0, 0.0],
                      [1.0, 0.0], [1.0, 0.0], [0.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    summed = advantages.aggregate_rewards(r, mode="sum_then_normalize", group_size=4)
    assert torch.isclose(summed[0], summed[1])
    decoupled = advantages.aggregate_rewards(r, mode="normalize_then_sum", group_size=4)
    assert not torch.isclose(decoupled[4], decoupled[7])


# ----------------------------------------------------------------------------------------------
# properties

rewards_st = st.integers(1, 4).flatmap(lambda groups: st.integers(1, 6).flatmap(
    lambda G: st.tuples(st.just(G), st.lists(st.sampled_from([0.0, 0.25, 0.5, 1.0, -1.0, 3.0]),
                                             min_size=groups * G, max_size=groups * G))))


@settings(max_examples=60, deadline=None)
@given(rewards_st)
def test_group_advantages_sum_to_zero(case):
    G, values = case
    r = torch.tensor(values, dtype=torch.float64)
    for name, opts in [("grpo", {}), ("grpo", {"scale": "none"}), ("grpo", {"scale": "batch"}),
                       ("rloo", {}), ("gpg", {})]:
        a = advantages.compute(name, r, group_size=G, **opts)
        assert torch.allclose(a.view(-1, G).sum(1), torch.zeros(len(values) // G, dtype=torch.float64), atol=1e-9)


@settings(max_examples=60, deadline=None)
@given(rewards_st, st.sampled_from([-2.0, 0.5, 7.0]))
def test_invariant_to_constant_shift(case, c):
    G, values = case
    r = torch.tensor(values, dtype=torch.float64)
    lengths = torch.arange(1, len(values) + 1)
    for name, opts in [("grpo", {}), ("grpo", {"scale": "none"}), ("grpo", {"scale": "batch"}), ("rloo", {}),
                       ("gpg", {}), ("grpo_passk", {}), ("reinforce_pp_baseline", {}), ("opo", {"lengths": lengths})]:
        a = advantages.compute(name, r, group_size=G, **opts)
        b = advantages.compute(name, r + c, group_size=G, **opts)
        assert torch.allclose(a, b, atol=1e-7), name


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 5), st.integers(1, 4), st.sampled_from([0.0, 1.0, -3.5]))
def test_constant_groups_and_singletons_give_zero(G, groups, value):
    r = torch.full((G * groups,), value, dtype=torch.float64)
    for name in advantages.names():
        a = advantages.compute(name, r, group_size=G, **_required_options(name, r, None))
        a = a[0] if isinstance(a, tuple) else a
        assert torch.isfinite(a).all(), name
        if name in GROUP_ESTIMATORS + ["opo", "drpo"]:
            assert torch.all(a == 0), name
    # groups of size 1 with distinct rewards: every group-relative estimator gives exactly 0
    r = torch.arange(groups, dtype=torch.float64) * 1.5 - 1
    for name in GROUP_ESTIMATORS + ["opo", "drpo"]:
        a = advantages.compute(name, r, group_size=1, **_required_options(name, r, None))
        assert torch.all(a == 0), name


@settings(max_examples=40, deadline=None)
@given(st.lists(st.booleans(), min_size=4, max_size=4), st.lists(st.integers(1, 50), min_size=4, max_size=4))
def test_drpo_signs_and_sums(correct, lengths):
    r = torch.tensor(correct, dtype=torch.float64)
    a = advantages.compute("drpo", r, group_size=4, lengths=torch.tensor(lengths))
    if any(correct) and not all(correct):
        assert torch.all(a[r > 0] > 0) and torch.all(a[r == 0] < 0)
        assert math.isclose(float(a[r > 0].sum()), 1.0) and math.isclose(float(a[r == 0].sum()), -1.0)
        # shorter correct completions get at least as much credit
        pos = [(lengths[i], float(a[i])) for i in range(4) if correct[i]]
        pos.sort()
        assert all(x[1] >= y[1] - 1e-12 for x, y in zip(pos, pos[1:]))
    else:
        assert torch.all(a == 0)


# ----------------------------------------------------------------------------------------------
# bad input

def test_bad_rewards():
    with pytest.raises(ValueError, match="rewards must be a 1-D tensor of shape \\[B\\], got \\[2, 2\\]"):
        advantages.compute("grpo", torch.zeros(2, 2), group_size=2)
    with pytest.raises(TypeError, match="rewards must have dtype"):
        advantages.compute("grpo", torch.zeros(4, dtype=torch.long), group_size=2)
    with pytest.raises(TypeError, match="rewards must be a torch.Tensor"):
        advantages.compute("grpo", [1.0, 0.0], group_size=2)
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="rewards must be finite"):
            advantages.compute("grpo", torch.tensor([1.0, bad]), group_size=2)


def test_bad_group_size():
    with pytest.raises(ValueError, match="group_size=3 does not divide the batch of 8 rewards"):
        advantages.compute("grpo", torch.zeros(8), group_size=3)
    for bad in (0, -2, 2.0, True, None):
        with pytest.raises(ValueError, match="group_size must be a positive int"):
            advantages.compute("grpo", torch.zeros(8), group_size=bad)


def test_unknown_name_and_options():
    with pytest.raises(ValueError, match="unknown advantage estimator 'ppo'; available: .*grpo.*rloo"):
        advantages.compute("ppo", torch.zeros(2), group_size=2)
    with pytest.raises(TypeError, match="unexpected option 'sclae'.*scale"):
        advantages.compute("grpo", torch.zeros(2), group_size=2, sclae="none")
    with pytest.raises(TypeError, match="'opo' needs option\\(s\\): lengths"):
        advantages.compute("opo", torch.zeros(2), group_size=2)
    with pytest.raises(ValueError, match="scale must be one of 'group', 'batch', 'none', got 'std'"):
        advantages.compute("grpo", torch.zeros(2), group_size=2, scale="std")
    with pytest.raises(ValueError, match="gamma must be a number in \\[0, 1\\]"):
        advantages.compute("gae", torch.zeros(2), group_size=1, values=torch.zeros(2, 3), gamma=1.5)
    with pytest.raises(TypeError, match="needs option kl_coef"):
        advantages.compute("reinforce_pp", torch.zeros(2), group_size=1, mask=torch.ones(2, 3), kl=torch.zeros(2, 3))


def test_shape_mismatches():
    with pytest.raises(ValueError, match="lengths must have shape \\[8\\] \\(one per reward\\), got \\[7\\]"):
        advantages.compute("opo", torch.zeros(8), group_size=2, lengths=torch.ones(7))
    with pytest.raises(ValueError, match="greedy_rewards must have shape \\[4\\]"):
        advantages.compute("remax", torch.zeros(4), group_size=2, greedy_rewards=torch.zeros(4, 1))
    with pytest.raises(ValueError, match="mask must have shape \\[B, T\\] with B=4"):
        advantages.compute("grpo", torch.zeros(4), group_size=2, mask=torch.ones(3, 5))
    with pytest.raises(ValueError, match="values must have shape \\[4, 5\\]"):
        advantages.compute("gae", torch.zeros(4), group_size=1, mask=torch.ones(4, 5), values=torch.zeros(4, 6))
    with pytest.raises(ValueError, match="values must be finite"):
        advantages.compute("gae", torch.zeros(1), group_size=1, values=torch.tensor([[float("nan")]]))
    with pytest.raises(ValueError, match="weights must have shape \\[2\\]"):
        advantages.aggregate_rewards(torch.zeros(4, 2), [1.0, 2.0, 3.0], group_size=2)
    with pytest.raises(ValueError, match="rewards must have shape \\[B, K\\]"):
        advantages.aggregate_rewards(torch.zeros(4), group_size=2)
    with pytest.raises(ValueError, match="mode must be one of"):
        advantages.aggregate_rewards(torch.zeros(4, 2), group_size=2, mode="mean")
    with pytest.raises(ValueError, match="group_size=3 does not divide the batch of 4 rewards"):
        advantages.aggregate_rewards(torch.zeros(4, 2), group_size=3)


# ----------------------------------------------------------------------------------------------
# verl's behaviours, offered as options (verl 0.8.0.dev, commit b178a3cd; docs/formulas.md §7.1).
# verl's functions are written out here in float64 with its Python loops.
def _verl_whiten(values, mask):
    m = mask.double()
    n = m.sum()
    mean = (values * m).sum() / (n + 1e-8)
    var = (((values - mean) ** 2) * m).sum() / (n + 1e-8) * (n / (n - 1))
    return (values - mean) * torch.rsqrt(var + 1e-8)


def _verl_rpp_baseline(scores, G, mask):
    scores = scores.clone()
    groups = scores.view(-1, G)
    means = groups.mean(1) if G > 1 else torch.zeros(groups.shape[0], dtype=scores.dtype)
    for i in range(scores.shape[0]):
        scores[i] = scores[i] - means[i // G]
    tok = scores[:, None].expand(mask.shape) * mask
    return _verl_whiten(tok, mask) * mask


def _verl_rpp(token_rewards, mask, gamma):
    returns = torch.zeros_like(token_rewards)
    running = torch.zeros(token_rewards.shape[0], dtype=token_rewards.dtype)
    for t in reversed(range(token_rewards.shape[1])):
        running = token_rewards[:, t] + gamma * running
        returns[:, t] = running
        running = running * mask[:, t]
    return _verl_whiten(returns, mask) * mask


@pytest.mark.parametrize("G", [1, 2, 4])
def test_reinforce_pp_baseline_whiten_option_is_verls(G):
    rewards = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0, 1.0, 0.5, 0.0], dtype=torch.float64)
    mask = torch.ones(8, 5, dtype=torch.float64)
    mask[2, 3:] = 0
    mask[5, 1:] = 0
    ours = advantages.compute("reinforce_pp_baseline", rewards, group_size=G, mask=mask, constant_groups="whiten")
    # verl divides its means by n + 1e-8: agreement to ~1e-9 relative
    torch.testing.assert_close(ours, _verl_rpp_baseline(rewards, G, mask), rtol=1e-7, atol=1e-8)
    default = advantages.compute("reinforce_pp_baseline", rewards, group_size=G, mask=mask)
    if G == 4:  # the first group is constant: verl gives it a nonzero advantage (-mean/std), pyrl 0
        assert (default[:4] == 0).all() and (ours[:4][mask[:4] > 0] != 0).all()
    with pytest.raises(ValueError, match="constant_groups must be one of"):
        advantages.compute("reinforce_pp_baseline", rewards, group_size=G, constant_groups="verl")


@pytest.mark.parametrize("gamma", [1.0, 0.9])
def test_reinforce_pp_reset_option_is_verls(gamma):
    g = torch.Generator().manual_seed(0)
    B, T = 4, 9
    mask = torch.ones(B, T, dtype=torch.float64)
    mask[0, 3:5] = 0   # a masked tool turn in the middle
    mask[1, 6:] = 0    # right padding
    mask[2, 0] = 0     # masked first token
    mask[3, 2] = 0
    mask[3, 7] = 0
    rewards = torch.randn(B, generator=g, dtype=torch.float64)
    kl = torch.randn(B, T, generator=g, dtype=torch.float64) * 0.1
    ours = advantages.compute("reinforce_pp", rewards, group_size=1, mask=mask, kl=kl, kl_coef=0.5, gamma=gamma,
                              masked="reset")
    last = (T - 1) - mask.flip(1).argmax(1)
    token_rewards = -0.5 * kl * mask
    token_rewards[torch.arange(B), last] += rewards
    torch.testing.assert_close(ours, _verl_rpp(token_rewards, mask, gamma), rtol=1e-7, atol=1e-8)  # verl: n + 1e-8
    skip = advantages.compute("reinforce_pp", rewards, group_size=1, mask=mask, kl=kl, kl_coef=0.5, gamma=gamma)
    assert not torch.allclose(skip[0], ours[0])  # the masked span cuts row 0's early turn off in verl's form
    right_padded = mask.clone()
    right_padded[0], right_padded[2], right_padded[3] = 1, 1, 1
    a = advantages.compute("reinforce_pp", rewards, group_size=1, mask=right_padded, gamma=gamma, masked="reset")
    b = advantages.compute("reinforce_pp", rewards, group_size=1, mask=right_padded, gamma=gamma)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)  # identical for right padding


def test_grpo_passk_group_scale_is_verls_default():
    rewards = torch.tensor([0.0, 1.0, 0.5, 0.2, 1.0, 1.0, 0.0, 0.0], dtype=torch.float64)
    ours = advantages.compute("grpo_passk", rewards, group_size=4, scale="group")
    want = torch.zeros(8, dtype=torch.float64)
    g0 = rewards[:4]
    want[1] = (1.0 - 0.5) / (g0.std() + 1e-6)  # the second group ties at the top: 0
    torch.testing.assert_close(ours, want, rtol=1e-12, atol=0)
    torch.testing.assert_close(advantages.compute("grpo_passk", rewards, group_size=4)[1], torch.tensor(0.5, dtype=torch.float64))


def test_gpg_nonzero_rewards_alpha_is_verls():
    rewards = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 2.0, 0.0], dtype=torch.float64)
    ours = advantages.compute("gpg", rewards, group_size=2, alpha="nonzero_rewards")
    centered = (rewards.view(-1, 2) - rewards.view(-1, 2).mean(1, keepdim=True)).reshape(-1)
    torch.testing.assert_close(ours, 8 / 4 * centered, rtol=1e-12, atol=0)
    paper = advantages.compute("gpg", rewards, group_size=2)
    torch.testing.assert_close(paper, 8 / 4 * centered, rtol=1e-12, atol=0)  # 2 mixed groups of 2 = 4 valid
    rewards[2:4] = 1.0
    rewards[0:2] = torch.tensor([1.0, 1.0], dtype=torch.float64)  # a constant group with nonzero rewards
    ours = advantages.compute("gpg", rewards, group_size=2, alpha="nonzero_rewards")
    paper = advantages.compute("gpg", rewards, group_size=2)
    assert float(ours.abs().max()) != float(paper.abs().max())


def test_w_reinforce_weights_positive_against_negative_samples():
    r = t64(1.0, 0.0, 1.0, 0.0)
    close(advantages.compute("w_reinforce", r, group_size=2), [0.1, -1.0, 0.1, -1.0], 0)
    close(advantages.compute("w_reinforce", r, group_size=2, positive_weight=0.0), [0.0, -1.0, 0.0, -1.0], 0)
    close(advantages.compute("w_reinforce", t64(1.0, -1.0), group_size=1, positive_weight=1.0, threshold=0.0),
          [1.0, -1.0], 0)
    with pytest.raises(ValueError, match="positive_weight"):
        advantages.compute("w_reinforce", r, group_size=2, positive_weight=-1.0)


def test_reward_ensembles_and_gated_accumulation():
    g = torch.Generator().manual_seed(0)
    r = torch.rand(8, 3, generator=g, dtype=torch.float64)

    def grpo64(x):
        x = x.view(-1, 4)
        return ((x - x.mean(1, keepdim=True)) / (x.std(1, keepdim=True) + 1e-6)).reshape(-1)

    close(advantages.aggregate_rewards(r, mode="ensemble_min", group_size=4), grpo64(r.min(1).values), 1e-12)
    close(advantages.aggregate_rewards(r, mode="ensemble_mean_std", lam=0.5, group_size=4),
          grpo64(r.mean(1) - 0.5 * r.std(1)), 1e-12)
    w = t64(7.0, 2.0, -1.0)  # weights[0] unused by the gate
    gated = advantages.aggregate_rewards(r, w, mode="gated", gate=0.5, group_size=4)
    close(gated, grpo64(r[:, 0] + (r[:, 0] >= 0.5).double() * (2.0 * r[:, 1] - r[:, 2])), 1e-12)
    par = advantages.aggregate_rewards(r, mode="par", group_size=4)  # PAR: column 0 against references 1, 2
    close(par, grpo64(0.5 * (torch.sigmoid(r[:, 0] - r[:, 1]) + torch.sigmoid(r[:, 0] - r[:, 2]))), 1e-12)
    with pytest.raises(ValueError, match="mode='par' needs"):
        advantages.aggregate_rewards(r[:, :1], mode="par", group_size=4)
    one = advantages.aggregate_rewards(r[:, :1], mode="ensemble_mean_std", group_size=4)
    close(one, grpo64(r[:, 0]), 1e-12)  # K = 1: std 0
    with pytest.raises(ValueError, match="mode must be one of"):
        advantages.aggregate_rewards(r, mode="max", group_size=4)


def test_positive_amplification_scales_better_than_average_completions():
    """R^3L (docs/formulas.md §7.3), float64 by hand."""
    r = t64(1.0, 0.0, 0.0, 0.0, 2.0, 2.0, 1.0, 1.0, 5.0, 5.0)
    got = advantages.compute("positive_amplification", r, group_size=2)
    close(got, [1.5, -0.5, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0], 1e-15)
    got = advantages.compute("positive_amplification", r[:4], group_size=4, alpha=2.0)
    close(got, [2 * 0.75, -0.25, -0.25, -0.25], 1e-15)
    close(advantages.compute("positive_amplification", r, group_size=1), [0.0] * 10, 0)
    with pytest.raises(ValueError, match="alpha"):
        advantages.compute("positive_amplification", r, group_size=2, alpha=0.5)


def test_canon_compares_across_and_within_metric_halves():
    """CANON (docs/formulas.md §7.3): a float64 loop over the groups against the vectorised one."""
    g = torch.Generator().manual_seed(3)
    for G in (2, 3, 4, 5):
        r = torch.randint(0, 2, (4 * G,), generator=g).double()
        metric = torch.randint(0, 4, (4 * G,), generator=g)  # ties on purpose
        for w in (0.0, 0.3, 1.0):
            got = advantages.compute("canon", r, group_size=G, metric=metric, inter_weight=w)
            want = torch.zeros_like(r)
            for q in range(4):
                rows = list(range(q * G, (q + 1) * G))
                ranked = sorted(rows, key=lambda i: (int(metric[i]), i))
                low = set(ranked[:(G + 1) // 2])
                for i in rows:
                    own = [j for j in rows if (j in low) == (i in low)]
                    other = [j for j in rows if (j in low) != (i in low)]
                    mean = lambda js: sum(float(r[j]) for j in js) / len(js)  # noqa: E731
                    want[i] = w * (r[i] - mean(other)) + (1 - w) * (r[i] - mean(own))
                if len(set(r[rows].tolist())) == 1:
                    want[rows] = 0.0
            close(got, want, 1e-12)
    r = t64(1.0, 0.0, 1.0, 1.0)
    drgrpo = advantages.compute("grpo", r, group_size=4, scale="none")
    close(advantages.compute("canon", r, group_size=4, metric=t64(3, 1, 2, 0)), drgrpo, 1e-15)  # G even, w = 0.5
    with pytest.raises(TypeError, match="needs option.*metric"):
        advantages.compute("canon", r, group_size=4)
    with pytest.raises(ValueError, match="metric must have shape"):
        advantages.compute("canon", r, group_size=4, metric=t64(1, 2))
    with pytest.raises(ValueError, match="inter_weight"):
        advantages.compute("canon", r, group_size=4, metric=t64(3, 1, 2, 0), inter_weight=2.0)


def test_reward_estimator_is_the_identity():
    r = t64(0.0, 1.0, 0.25)
    close(advantages.compute("reward", r, group_size=1), r, 0)
    a = advantages.compute("reward", r, group_size=1, mask=torch.tensor([[1, 0], [1, 1], [0, 0]]))
    close(a, [[0.0, 0.0], [1.0, 1.0], [0.0, 0.0]], 0)
