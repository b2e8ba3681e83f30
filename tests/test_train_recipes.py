"""pyrl.train for real work: config fixes, your data and rewards, the recipes, the memory options."""
import copy
import json
import os
import sys
import types

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

import pyrl  # noqa: E402
from pyrl.train import apply_overrides, cli, load_config, train  # noqa: E402
from pyrl.train import loop, recipes, tasks  # noqa: E402
from pyrl.train.config import ModelConfig, TrainConfig, validate  # noqa: E402
from pyrl.train.distributed import DistInfo  # noqa: E402
from pyrl.train.loop import micro_batches  # noqa: E402
from pyrl.train.metrics import REQUIRED_FIELDS, read_metrics  # noqa: E402
from pyrl.train.models import load_model  # noqa: E402
from pyrl.train.policy import LossScale, Policy, make_batch  # noqa: E402
from test_train import FAST, _one_thread, _one_update, fast_config, seed_resume_dir, synthetic_data, tiny  # noqa: E402,F401  (fixtures)

CPU = DistInfo(0, 1, 0, torch.device("cpu"))
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE_DATA = os.path.join(ROOT, "examples", "data", "addition.jsonl")
EXAMPLE_REWARD = os.path.join(ROOT, "examples", "my_reward.py")


# ------------------------------------------------------------------------------------------------
# 1. config fixes

def test_bf16_accepts_yaml_booleans_and_names_the_key(tmp_path):
    cfg = TrainConfig()
    assert apply_overrides(cfg, ["bf16=off"]).bf16 == "off"  # YAML reads `off` as False
    assert apply_overrides(cfg, ["bf16=on"]).bf16 == "on"
    assert apply_overrides(cfg, ["bf16=true"]).bf16 == "on"
    assert apply_overrides(cfg, ["bf16=auto"]).bf16 == "auto"
    with pytest.raises(ValueError, match="'bf16' must be one of auto, on, off"):
        apply_overrides(cfg, ["bf16=sometimes"])
    pytest.importorskip("yaml")
    (tmp_path / "c.yaml").write_text("bf16: off\n")
    assert load_config(str(tmp_path / "c.yaml")).bf16 == "off"


@pytest.mark.parametrize("item, key", [
    ("algo.pass_rate_band=[0.9, 0.1]", "algo.pass_rate_band"),
    ("algo.kl_target=0.1", "algo.kl_target"),                 # needs beta > 0
    ("algo.ref_reset_every=5", "algo.ref_reset_every"),       # needs a reference model
    ("algo.max_tokens_per_micro_batch=-1", "algo.max_tokens_per_micro_batch"),
    ("save_every=-1", "save_every"),
    ('algo={"dynamic_sampling": true}', "algo.dynamic_sampling"),  # with group_size 1 below
])
def test_bad_recipe_values_name_the_key(item, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        validate(apply_overrides(TrainConfig(), [item, "rollout.group_size=1"]))
    assert cli.run(["--preset", "tiny", "--out", "x", "--set", item, "--set", "rollout.group_size=1"]) == 2


def test_save_every_zero_writes_no_checkpoint_and_timings_are_honest(tmp_path):
    out = str(tmp_path / "run")
    train(fast_config("max_steps=2", "save_every=0", "plot=false", "task.eval_size=4"), out)
    assert not os.path.exists(os.path.join(out, "checkpoints"))
    assert not os.path.exists(os.path.join(out, "initial"))  # the warm-up's copy serves resuming only
    for r in read_metrics(os.path.join(out, "metrics.jsonl")):
        assert 0 <= r["score_s"] <= r["rollout_s"] and r["update_s"] > 0  # scoring is part of the rollout
        assert r["tokens_per_s"] == pytest.approx(r["completion_len_mean"] * 16 / (r["rollout_s"] + r["update_s"]),
                                                  rel=0.05)
    assert "eval_s" in r


# ------------------------------------------------------------------------------------------------
# 2. your data and rewards

def _write_jsonl(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


ROWS = [{"prompt": f"{a}+{b}=", "answer": str(a + b)} for a in range(5) for b in range(4)] + [
    {"prompt": [{"role": "user", "content": "1+1="}], "answer": 2, "solution": "2"}]


def test_jsonl_task_rows_split_and_errors(tmp_path):
    path = str(tmp_path / "d.jsonl")
    _write_jsonl(path, ROWS)
    task = tasks.make_task("jsonl", seed=1, path=path, eval_fraction=0.25)
    assert task.num_eval == 5 and len(task.rows) == 16
    train_prompts = {str(task.example(i).prompt) for i in range(16)}
    assert len(train_prompts) == 16  # one epoch visits every training row once
    assert not train_prompts & {str(e.prompt) for e in task.eval_examples(0, 5)}  # held out
    assert task.example(3) == tasks.make_task("jsonl", seed=1, path=path, eval_fraction=0.25).example(3)
    assert [task.example(i) for i in range(16)] != [task.example(i) for i in range(16, 32)]  # reshuffled epochs
    assert sorted(task.example_id(i) for i in range(16, 32)) == list(range(16))  # row numbers, for HAPO
    assert all(task.rows[task.example_id(i)] == task.example(i) for i in range(40))
    chat = next(e for e in task.rows + task.eval_rows if isinstance(e.prompt, list))
    assert chat.answer == "2"
    tok = types.SimpleNamespace(chat_template=None)
    assert tasks.prompt_text(task, tok, chat) == "1+1="  # no template: the messages' contents

    _write_jsonl(path, [{"prompt": "1+1="}])
    with pytest.raises(ValueError, match="row 0 has no 'answer'"):
        tasks.make_task("jsonl", path=path)
    with pytest.raises(ValueError, match="task.options.path"):
        tasks.make_task("jsonl")
    with pytest.raises(ValueError, match="eval_fraction"):
        tasks.make_task("file", path=EXAMPLE_DATA, eval_fraction=1.5)


def test_parquet_and_file_tasks_read_the_same_rows(tmp_path, monkeypatch):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    rows = [r for r in ROWS if isinstance(r["prompt"], str)]
    jsonl, parquet = str(tmp_path / "d.jsonl"), str(tmp_path / "d.parquet")
    _write_jsonl(jsonl, rows)
    pq.write_table(pa.Table.from_pylist(rows), parquet)
    a = tasks.make_task("jsonl", path=jsonl)
    for name in ("parquet", "file"):
        b = tasks.make_task(name, path=parquet)
        assert [b.example(i) for i in range(len(rows))] == [a.example(i) for i in range(len(rows))]
    assert tasks.make_task("file", path=jsonl).rows == a.rows
    # without pyarrow and pandas: a clear error
    real_import = __import__
    monkeypatch.setattr("builtins.__import__", lambda name, *args, **kw: (_ for _ in ()).throw(ImportError(name))
                        if name.split(".")[0] in ("pyarrow", "pandas") else real_import(name, *args, **kw))
    with pytest.raises(ImportError, match="needs pyarrow or pandas: pip install pyarrow"):
        tasks.make_task("parquet", path=parquet)


def _reward(spec, shaping=(), **cfg_items):
    cfg = apply_overrides(TrainConfig(), [f"task.reward={json.dumps(spec)}",
                                          f"task.length_shaping={json.dumps(list(shaping))}"])
    return recipes.Reward.from_config(cfg, tasks.AdditionTask())


def _call(reward, texts, answers, lengths=None, G=None):
    n = len(texts)
    lengths = torch.tensor(lengths if lengths is not None else [len(t) for t in texts])
    return reward(texts, answers, ["p"] * n, lengths=lengths, prompt_index=torch.arange(n) // (G or n),
                  group_size=G or n)


def test_rewards_by_name_composed_with_weights_and_user_functions(tmp_path):
    r = _reward([{"name": "exact_match", "weight": 1.0},
                 {"name": "format", "weight": 0.5, "options": {"pattern": r"\d+"}}])
    assert _call(r, ["7", "7x", "8"], ["7"] * 3).tolist() == [1.5, 0.0, 0.5]
    assert _call(_reward("math_verify"), ["it is 12", "13"], ["12", "12"]).tolist() == [1.0, 0.0]
    # a user function, by file path and by module name; it gets the keywords it declares
    user = _reward([{"name": f"{EXAMPLE_REWARD}:sum_reward", "weight": 2.0}])
    assert _call(user, ["7", "7+", "8"], ["7"] * 3).tolist() == pytest.approx([2.0, 0.4, 0.0])
    (tmp_path / "myrewards_mod.py").write_text(
        "def rw(completions, *, prompts, **options):\n    return [len(p) + options['bonus'] for p in prompts]\n")
    sys.path.insert(0, str(tmp_path))
    try:
        r = _reward({"name": "myrewards_mod:rw", "options": {"bonus": 1}})
        assert _call(r, ["a", "b"], ["x", "y"]).tolist() == [2.0, 2.0]
    finally:
        sys.path.remove(str(tmp_path))
    for spec, msg in ((["exact_match", {"name": "nope"}], r"task.reward\[1\]: unknown reward 'nope'"),
                      ({"name": "exact_match", "options": {"pattern": "x"}}, "has no option 'pattern'"),
                      ({"name": "exact_match", "wieght": 1}, "unknown keys"),
                      ("no_such_module_xyz:f", "cannot import 'no_such_module_xyz'"),
                      (f"{EXAMPLE_REWARD}:nope", "has no function 'nope'")):
        with pytest.raises(ValueError, match=msg):
            _reward(spec)
    assert cli.run(["--preset", "tiny", "--out", "x", "--set", "task.reward=nope"]) == 2


def test_length_shapers_by_name():
    texts, answers = ["7", "7", "7", "8"], ["7"] * 4
    lengths = [2, 7, 9, 2]
    base = _call(_reward("exact_match"), texts, answers, lengths).tolist()
    assert base == [1.0, 1.0, 1.0, 0.0]
    over = _reward("exact_match", [{"name": "overlong", "max_len": 8, "cache_len": 4}])
    want = (torch.tensor(base) + pyrl.rewards.dapo_overlong_penalty(torch.tensor(lengths), 8, 4)).tolist()
    assert _call(over, texts, answers, lengths).tolist() == want
    dler = _reward("exact_match", [{"name": "dler", "budget": 6}])
    assert _call(dler, texts, answers, lengths).tolist() == [1.0, 0.0, 0.0, 0.0]
    cos = _reward("exact_match", [{"name": "cosine", "max_len": 9}])
    got = _call(cos, texts, answers, lengths)
    assert got[0] > got[1] > got[2] and got[3] < 0  # short correct best, wrong negative
    lam = _reward("exact_match", [{"name": "grpo_lambda", "threshold": 0.5}])
    assert _call(lam, texts, answers, lengths, G=4).tolist() == pyrl.rewards.grpo_lambda_length_penalty(
        torch.tensor(base), torch.tensor(lengths), 4, threshold=0.5).tolist()
    hapo = _reward("exact_match", [{"name": "hapo"}])
    first = _call(hapo, texts, answers, lengths, G=4)
    assert first.tolist() == base  # no history yet
    state = hapo.state_dict()
    again = _reward("exact_match", [{"name": "hapo"}])
    again.load_state_dict(json.loads(json.dumps(state)))  # it travels in trainer_state.json
    assert _call(again, texts, answers, lengths, G=4).tolist() == _call(hapo, texts, answers, lengths, G=4).tolist()
    with pytest.raises(ValueError, match=r"task.length_shaping\[0\]: unknown length shaper 'nope'"):
        _reward("exact_match", [{"name": "nope"}])
    with pytest.raises(ValueError, match=r"task.length_shaping\[0\] \(overlong\).*cache_len"):
        _reward("exact_match", [{"name": "overlong"}])  # a missing option fails at start, not mid-run


@pytest.mark.parametrize("loss", [
    {"loss_type": "clip_cov", "clip_cov_ratio": 0.01},
    {"loss_type": "kl_cov", "kl_cov_ratio": 0.01, "ppo_kl_coef": 0.5},
    {"loss_type": "geo_mean", "eps_low": 0.4, "eps_high": 0.4, "agg": "seq-mean-token-mean"},
    {"loss_type": "ppo", "beta": 0.01, "kl_type": "k3+"},
    {"loss_type": "ppo", "beta": 0.01, "kl_type": "abs"},
    {"loss_type": "reinforce", "mastered_token_prob": 0.99},
    {"loss_type": "pacs", "pacs_beta": 1.0, "agg": "seq-mean-token-mean"},
    {"loss_type": "disco", "disco_tau": 10.0, "agg": "seq-mean-token-mean"},
])
def test_catalogue_losses_by_name_from_the_trainer_config(loss):
    cfg = apply_overrides(TrainConfig(), [f"algo.loss={json.dumps(loss)}"])
    validate(cfg)
    assert pyrl.PolicyLossConfig(**loop.loss_options(cfg)).loss_type == loss["loss_type"]
    with pytest.raises(ValueError, match="loss_type must be one of"):
        pyrl.PolicyLossConfig(**dict(loss, loss_type=loss["loss_type"] + "_typo"))


def test_grouped_losses_get_the_group_size_and_whole_groups_per_micro_batch():
    cfg = apply_overrides(TrainConfig(), ['algo.loss={"loss_type": "disco"}', "rollout.group_size=4",
                                          "algo.micro_batch_size=8"])
    validate(cfg)
    assert loop.loss_options(cfg)["group_size"] == 4
    for items, key in ((["algo.micro_batch_size=6"], "multiple of rollout.group_size=4"),
                       (["algo.minibatches=2"], "algo.minibatches=1"),
                       (['algo.loss={"loss_type": "pacs", "group_size": 2}'], "algo.loss.group_size")):
        with pytest.raises(ValueError, match=key):
            validate(apply_overrides(cfg, items))


@pytest.mark.parametrize("name, options", [
    ("w_reinforce", {"positive_weight": 0.1}),
    ("reinforce_pp_baseline", {"constant_groups": "whiten"}),
    ("reinforce_pp", {"masked": "reset"}),
    ("grpo_passk", {"scale": "group"}),
    ("gpg", {"alpha": "nonzero_rewards"}),
    ("positive_amplification", {"alpha": 3.0}),
    ("canon", {"inter_weight": 1.0}),  # conditioned on the completion length by default
    ("reward", {}),
])
def test_catalogue_estimators_by_name_from_the_trainer_config(name, options):
    cfg = apply_overrides(TrainConfig(), [f"algo.advantage={name}", f"algo.advantage_options={json.dumps(options)}"])
    validate(cfg)
    G = cfg.rollout.group_size
    rewards = torch.arange(2 * G, dtype=torch.float32) % 3
    mask = torch.ones(2 * G, 4)
    adv, _ = loop._advantages(cfg, rewards, mask, None)
    assert adv.shape == (2 * G, 4) and torch.isfinite(adv).all()


def test_catalogue_length_shapers_by_name_and_the_step_they_see():
    texts, answers = ["7", "7", "7", "8"], ["7"] * 4
    lengths = [2, 7, 9, 2]
    n = len(texts)

    def call(reward, step):
        return reward(texts, answers, ["p"] * n, lengths=torch.tensor(lengths), prompt_index=torch.arange(n) // 2,
                      group_size=2, step=step, total_steps=100).tolist()

    laser = _reward("exact_match", [{"name": "laser_d", "budgets": [4, 8, 16], "alpha": 0.5}])
    assert call(laser, 0) == [1.5, 1.0, 1.0, 0.0]  # group 0 easy (budget 4), group 1 medium (budget 8)
    dler = _reward("exact_match", [{"name": "dler_difficulty", "budget": 8, "shrink": 0.5}])
    assert call(dler, 0) == [1.0, 0.0, 0.0, 0.0]  # group 0 solved: budget 4
    decay = _reward("exact_match", [{"name": "budget_decay", "initial": 16, "decay": 0.5, "every": 10}])
    assert call(decay, 0) == [1.0, 1.0, 1.0, 0.0] and call(decay, 10) == [1.0, 1.0, 0.0, 0.0]
    assert call(decay, 20) == [1.0, 0.0, 0.0, 0.0]  # budget 4 at step 20
    apo = _reward("exact_match", [{"name": "apo", "max_len": 4, "coef": 1.0}])
    assert call(apo, 0) == [1.0, 1.0, 1.0, -0.5]
    with pytest.raises(ValueError, match=r"\(laser_d\).*budgets"):
        _reward("exact_match", [{"name": "laser_d"}])


def test_majority_vote_reward_and_par_shaper_by_name():
    r = _reward("majority_vote")
    assert r(["7", "7", "8", "9"], [""] * 4, ["p", "p", "p", "q"], lengths=torch.ones(4), prompt_index=torch.zeros(4),
             group_size=2).tolist() == [1.0, 1.0, 0.0, 1.0]
    par = _reward("exact_match", [{"name": "par", "reference": 0.5}])
    got = _call(par, ["7", "8"], ["7", "7"])
    torch.testing.assert_close(got, torch.sigmoid(torch.tensor([0.5, -0.5])))


def test_brier_reward_by_name():
    r = _reward("brier")
    got = _call(r, ["7 <confidence>0.5</confidence>", "8 <confidence>0.5</confidence>"], ["7", "7"])
    assert got.tolist() == [0.75, -0.25]


def test_readme_example_trains_on_a_jsonl_with_a_user_reward(tmp_path):
    """The README's command: the tiny preset's model on examples/data/addition.jsonl, scored by
    examples/my_reward.py, a held-out fifth for the greedy eval."""
    out = str(tmp_path / "run")
    args = ["--preset", "tiny", "--out", out, "--max-steps", "2", "--set", "task.name=jsonl",
            "--set", f"task.options.path={EXAMPLE_DATA}", "--set", "task.options.eval_fraction=0.2",
            "--set", f"task.reward={EXAMPLE_REWARD}:sum_reward", "--set", "save_every=0", "--set", "plot=false"]
    for item in FAST:
        args += ["--set", item]
    assert cli.run(args) == 0
    records = read_metrics(os.path.join(out, "metrics.jsonl"))
    assert [r["step"] for r in records] == [1, 2]
    assert all(set(REQUIRED_FIELDS) <= set(r) for r in records)
    assert "eval_accuracy" in records[1]
    assert json.load(open(os.path.join(out, "config.json")))["task"]["name"] == "jsonl"


# ------------------------------------------------------------------------------------------------
# 3. recipes

def test_group_keep_mask():
    r = torch.tensor([1., 1., 1., 1., 0., 1., 0., 0., 0., 0., 0., 0., 1., 1., 1., 0.])
    assert recipes.group_keep_mask(r, 4).tolist() == [True] * 4
    assert recipes.group_keep_mask(r, 4, dynamic=True).tolist() == [False, True, False, True]
    # pass rates 1, 0.25, 0, 0.75
    assert recipes.group_keep_mask(r, 4, band=(0.2, 0.8)).tolist() == [False, True, False, True]
    assert recipes.group_keep_mask(r, 4, band=(0.5, 1.0)).tolist() == [True, False, False, True]


def _fake_run(algo_items, rounds_rewards, monkeypatch, G=2, prompts=2):
    """A run whose rounds return the given rewards (one list per round), to test the sampling loop."""
    cfg = apply_overrides(TrainConfig(), [f"rollout.group_size={G}", f"rollout.prompts_per_step={prompts}",
                                          *algo_items])
    calls = []

    def fake_round(run, start, count, step):
        r = torch.tensor(rounds_rewards[len(calls)], dtype=torch.float32)
        calls.append(start)
        B = count * G
        ids = torch.arange(B)[:, None] + 100 * len(calls)  # which round a row came from
        return {"prompt_ids": ids, "prompt_mask": torch.ones(B, 1, dtype=torch.long),
                "completion_ids": ids.repeat(1, 1 + len(calls)), "completion_mask": torch.ones(B, 1 + len(calls)),
                "rollout_logp": torch.zeros(B, 1 + len(calls)), "truncated": torch.zeros(B, dtype=torch.bool),
                "rewards": r}, 0.0

    monkeypatch.setattr(loop, "_generate_round", fake_round)
    run = types.SimpleNamespace(cfg=cfg, dist=CPU, data_position=0, engine=None,
                                tokenizer=types.SimpleNamespace(pad_token_id=0))
    return run, calls


def test_dynamic_sampling_refills_the_batch_with_groups_that_carry_signal(monkeypatch):
    run, calls = _fake_run(["algo.dynamic_sampling=true", "algo.max_sample_rounds=3"],
                           [[1, 1, 0, 1], [0, 0, 1, 0], [1, 0, 1, 0]], monkeypatch)
    s = loop.rollout(run, 0)
    assert calls == [0, 2] and run.data_position == 4 and s.rounds == 2  # stopped once full
    assert s.rows["rewards"].tolist() == [0, 1, 1, 0]  # round 1's second group, round 2's second
    assert s.rows["prompt_ids"][:, 0].tolist() == [102, 103, 202, 203]
    assert s.rows["completion_ids"].shape == (4, 3)  # completions right-padded to the widest round
    counts = dict(zip(loop._COUNTS, s.counts.tolist()))
    assert counts["groups"] == 4 and counts["zero_variance_groups"] == 2 and counts["topped_up_groups"] == 0


def test_dynamic_sampling_is_bounded_and_tops_up(monkeypatch):
    run, calls = _fake_run(["algo.dynamic_sampling=true", "algo.max_sample_rounds=2"],
                           [[1, 1, 0, 1], [0, 0, 0, 0]], monkeypatch)
    s = loop.rollout(run, 0)
    assert len(calls) == 2 and s.rows["rewards"].shape == (4,)
    counts = dict(zip(loop._COUNTS, s.counts.tolist()))
    assert counts["kept_groups"] == 1 and counts["topped_up_groups"] == 1
    assert s.rows["rewards"].tolist()[:2] == [0, 1]


def test_oversampling_fills_the_batch_in_one_round(monkeypatch):
    run, calls = _fake_run(["algo.dynamic_sampling=true", "algo.oversample=2"],
                           [[1, 1, 0, 1, 1, 0, 0, 1], [0, 1, 0, 1, 0, 1, 0, 1]], monkeypatch)
    s = loop.rollout(run, 0)
    assert calls == [0] and run.data_position == 4  # 4 prompts sampled for a batch of 2
    assert s.rows["prompt_ids"][:, 0].tolist() == [102, 103, 104, 105]  # the first two kept groups
    assert dict(zip(loop._COUNTS, s.counts.tolist()))["kept_groups"] == 3


def test_pass_rate_band_filter(monkeypatch):
    run, calls = _fake_run(["algo.pass_rate_band=[0.4, 0.6]", "algo.max_sample_rounds=4"],
                           [[1, 1, 0, 1], [0, 0, 1, 1], [1, 0, 1, 1]], monkeypatch)
    s = loop.rollout(run, 0)
    assert len(calls) == 3 and s.rows["rewards"].tolist() == [0, 1, 1, 0]


def test_adaptive_kl_follows_ziegler():
    kl = recipes.AdaptiveKL(beta=0.1, target=0.05, horizon=100)
    assert kl.update(0.05, 10) == pytest.approx(0.1)              # on target: unchanged
    assert kl.update(1.0, 10) == pytest.approx(0.1 * 1.02)        # error clipped to +0.2
    assert kl.update(0.0, 10) == pytest.approx(0.1 * 1.02 * 0.98)  # and to -0.2
    assert kl.update(0.055, 100) == pytest.approx(0.1 * 1.02 * 0.98 * 1.1)


def test_recipes_run_end_to_end(tmp_path):
    cfg = fast_config("max_steps=3", "plot=false", "save_every=0", "task.eval_size=0", "algo.minibatches=1",
                      "algo.dynamic_sampling=true",
                      "algo.max_sample_rounds=2", "algo.pass_rate_band=[0.0, 0.9]", "algo.mask_truncated=true",
                      'task.length_shaping=[{"name": "overlong", "cache_len": 2}]',
                      'algo.loss={"beta": 0.05, "kl_type": "k3"}', "algo.kl_target=0.001", "algo.kl_horizon=10",
                      "algo.ref_reset_every=2", "algo.ref_reset_optimizer=true")
    train(cfg, str(tmp_path / "run"))
    records = read_metrics(str(tmp_path / "run" / "metrics.jsonl"))
    for r in records:
        assert 1 <= r["sample_rounds"] <= 2 and 0 <= r["groups_kept_frac"] <= 1 and 0 <= r["sample_shortfall_frac"] <= 1
    assert records[0]["kl_coef"] == pytest.approx(0.05)
    assert records[1]["kl_coef"] != records[0]["kl_coef"]  # adapted
    assert records[1].get("ref_reset") == 1.0 and "ref_reset" not in records[0]
    assert records[2]["kl_mean"] == pytest.approx(0.0, abs=1e-5)  # the reference was reset to the policy


def test_recipes_resume_exactly(tmp_path):
    """Adaptive KL, HAPO's history and dynamic sampling's data position survive a resume."""
    cfg = fast_config("max_steps=2", "save_every=1", "keep_checkpoints=3", "deterministic=true", "plot=false",
                      "task.eval_size=0", "warmup.steps=5", 'algo.loss={"beta": 0.05, "kl_type": "k3"}',
                      "algo.kl_target=0.001", "algo.kl_horizon=10", 'task.length_shaping=[{"name": "hapo"}]',
                      "algo.dynamic_sampling=true", "algo.max_sample_rounds=3")
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    train(cfg, a)
    seed_resume_dir(a, b, 1)
    train(cfg, b, resume=True)
    ra, rb = read_metrics(os.path.join(a, "metrics.jsonl")), read_metrics(os.path.join(b, "metrics.jsonl"))
    assert rb[-1]["kl_coef"] == ra[-1]["kl_coef"] and rb[-1]["loss"] == ra[-1]["loss"]
    assert rb[-1]["reward_mean"] == ra[-1]["reward_mean"] and rb[-1]["sample_rounds"] == ra[-1]["sample_rounds"]


# ------------------------------------------------------------------------------------------------
# 4. memory

def test_token_budget_micro_batches_pack_by_length(tiny):
    _, tok = tiny
    data = synthetic_data(tok, B=8, T=5)
    algo = apply_overrides(TrainConfig(), ["algo.max_tokens_per_micro_batch=24"]).algo
    parts = micro_batches(data, torch.arange(8), algo)
    assert sorted(torch.cat(parts).tolist()) == list(range(8))
    for mi in parts:
        batch = make_batch(data["prompt_ids"][mi], data["prompt_mask"][mi], data["completion_ids"][mi],
                           data["completion_mask"][mi])
        assert len(mi) == 1 or batch["input_ids"].numel() <= 24
    total = lambda i: int(data["prompt_mask"][i].sum() + data["completion_mask"][i].sum())  # noqa: E731
    lengths = [[total(i) for i in mi.tolist()] for mi in parts]
    assert all(a >= b for m in lengths for a, b in zip(m, m[1:]))  # grouped by length, longest first


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
def test_token_budget_update_is_exact(tiny, agg):
    """One micro-batch of 8 sequences, or micro-batches by a token budget: the same update."""
    lm, tok = tiny
    data = synthetic_data(tok)
    params, padding = [], []
    for item in ("algo.micro_batch_size=8", "algo.max_tokens_per_micro_batch=20"):
        cfg = apply_overrides(TrainConfig(), [item, "algo.ppo_epochs=2", f'algo.loss={{"agg": "{agg}"}}'])
        p, stats = _one_update(Policy(copy.deepcopy(lm), pyrl.PolicyLossConfig(**cfg.algo.loss)), data, cfg)
        params.append(p)
        padding.append(stats["padding_frac"])
    torch.testing.assert_close(params[0], params[1], atol=2e-6, rtol=1e-5)
    assert 0 <= padding[1] < padding[0]  # grouped by length: less padding computed


def test_gradient_checkpointing_gives_the_same_gradients(tiny):
    _, tok = tiny
    data = synthetic_data(tok)
    grads = []
    for on in (False, True):
        lm, _ = load_model(ModelConfig(name="tiny", gradient_checkpointing=on, tiny={"hidden_size": 64}),
                           device=torch.device("cpu"), seed=0)
        modules = [m for m in lm.modules() if hasattr(m, "gradient_checkpointing")]
        assert modules and all(m.gradient_checkpointing == on for m in modules)
        policy = Policy(lm, pyrl.PolicyLossConfig())
        batch = make_batch(data["prompt_ids"], data["prompt_mask"], data["completion_ids"], data["completion_mask"],
                           advantages=data["advantages"])
        calls, mlp = [], lm.model.layers[0].mlp
        real_forward = mlp.forward
        mlp.forward = lambda x: calls.append(1) or real_forward(x)  # (module hooks do not see the recompute)
        loss, _ = policy(batch, mode="loss", scale=LossScale.whole(batch))
        loss.backward()
        assert len(calls) == (2 if on else 1)  # checkpointed: the layer runs again in the backward
        grads.append(torch.cat([p.grad.flatten() for p in lm.parameters() if p.grad is not None]))
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-5)


def test_lora_needs_peft(monkeypatch):
    import builtins

    real_import = builtins.__import__
    monkeypatch.setattr(builtins, "__import__", lambda name, *a, **k: (_ for _ in ()).throw(ImportError(name))
                        if name == "peft" else real_import(name, *a, **k))
    with pytest.raises(ImportError, match="model.lora needs peft: pip install peft"):
        load_model(ModelConfig(name="tiny", lora={"r": 4}), device=torch.device("cpu"))


def test_lora_trains_only_the_adapters(tiny, tmp_path):
    pytest.importorskip("peft")
    _, tok = tiny
    lora = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}
    lm, _ = load_model(ModelConfig(name="tiny", lora=lora), device=torch.device("cpu"), seed=0)
    trainable = {n for n, p in lm.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    data = synthetic_data(tok)
    batch = make_batch(data["prompt_ids"], data["prompt_mask"], data["completion_ids"], data["completion_mask"],
                       advantages=data["advantages"])
    loss, _ = Policy(lm, pyrl.PolicyLossConfig())(batch)
    loss.backward()
    grads = {n: p.grad for n, p in lm.named_parameters() if p.grad is not None}
    assert set(grads) <= trainable  # the base weights get no gradient
    assert any(float(g.abs().sum()) > 0 for n, g in grads.items() if "lora_B" in n)  # B starts at 0, A does not
    # and the trainer runs with it
    cfg = fast_config("max_steps=1", "plot=false", "save_every=0", "task.eval_size=0", "warmup.steps=0",
                      "model.lora=" + json.dumps(lora))
    train(cfg, str(tmp_path / "run"))
    assert len(read_metrics(str(tmp_path / "run" / "metrics.jsonl"))) == 1


def test_example_config_resolves(monkeypatch, capsys):
    pytest.importorskip("yaml")
    monkeypatch.chdir(ROOT)  # its paths are relative to the repository
    assert cli.run(["--preset", "tiny", "--config", "examples/configs/jsonl_tiny.yaml", "--print-config"]) == 0
    cfg = json.loads(capsys.readouterr().out)
    assert cfg["bf16"] == "off" and cfg["task"]["name"] == "jsonl" and cfg["algo"]["dynamic_sampling"] is True


def test_packed_update_matches_the_padded_one(tiny):
    """algo.packed: the decoder runs once on the micro-batch's real tokens (position ids restarting per
    sequence, transformers' block-diagonal mask under SDPA); hidden states, log-probs and the update are
    those of the padded batch, and the update reports no padding."""
    lm, tok = tiny
    data = synthetic_data(tok)
    batch = make_batch(data["prompt_ids"], data["prompt_mask"], data["completion_ids"], data["completion_mask"])
    assert (batch["attention_mask"] == 0).any()  # there is padding to skip
    padded, packed = Policy(lm), Policy(lm, packed=True)
    m = batch["completion_mask"].bool()
    h_pad, h_pack = padded(batch, mode="hidden"), packed(batch, mode="hidden")
    torch.testing.assert_close(h_pack[m], h_pad[m], atol=2e-5, rtol=1e-4)
    assert (h_pack[~m] == 0).all()
    params, padding = [], []
    for on in (False, True):
        cfg = apply_overrides(TrainConfig(), ["algo.max_tokens_per_micro_batch=40", f"algo.packed={str(on).lower()}"])
        p, stats = _one_update(Policy(copy.deepcopy(lm), pyrl.PolicyLossConfig(), packed=on), data, cfg)
        params.append(p)
        padding.append(stats["padding_frac"])
    torch.testing.assert_close(params[1], params[0], atol=2e-5, rtol=1e-4)
    assert padding[1] == 0.0 < padding[0]


def test_packed_hidden_states_refuses_another_layout(tiny):
    from pyrl.integrations.hf import packed_hidden_states
    lm, _ = tiny
    ids = torch.ones(2, 6, dtype=torch.long)
    holes = torch.tensor([[1, 0, 1, 1, 1, 0], [1, 1, 1, 1, 0, 0]])  # a hole inside the first prompt
    with pytest.raises(ValueError, match="left-padded prompt"):
        packed_hidden_states(lm.model, ids, holes, logits_to_keep=2)
    with pytest.raises(ValueError, match="logits_to_keep"):
        packed_hidden_states(lm.model, ids, torch.ones_like(ids), logits_to_keep=0)
    with pytest.raises(ValueError, match="algo.packed"):
        validate(apply_overrides(TrainConfig(), ["algo.packed=1"]))


def test_eval_intervals():
    """Wilson's interval of a proportion and Newcombe's interval of a difference of two (95%)."""
    from pyrl.train.metrics import gain_interval, wilson_interval
    lo, hi = wilson_interval(0.5, 100)
    assert abs(lo - 0.4038) < 1e-3 and abs(hi - 0.5962) < 1e-3  # the textbook value
    lo, hi = wilson_interval(0.0, 20)
    assert lo == 0.0 and 0.15 < hi < 0.17  # no symmetric-Wald collapse to [0, 0] at p = 0
    lo, hi = gain_interval(0.3, 0.5, 200)
    assert lo < 0.2 < hi and 0.10 < lo and hi < 0.30
    lo, hi = gain_interval(0.3, 0.35, 200)
    assert lo < 0 < hi  # a 5-point change on 200 prompts is within noise
    assert all(x != x for x in wilson_interval(0.5, 0))  # nan for no prompts


def test_fixed_size_micro_batches_are_grouped_by_length(tiny):
    """micro_batch_size: the same number of rows per micro-batch, sorted by length so each pads to
    rows of similar length; the grouped losses (a prompt's completions compared) keep the order."""
    _, tok = tiny
    data = synthetic_data(tok, B=8, T=5)
    total = (data["prompt_mask"].sum(1) + data["completion_mask"].sum(1)).tolist()
    algo = apply_overrides(TrainConfig(), ["algo.micro_batch_size=3"]).algo
    parts = micro_batches(data, torch.arange(8), algo)
    assert [len(m) for m in parts] == [3, 3, 2] and sorted(torch.cat(parts).tolist()) == list(range(8))
    flat = [total[i] for i in torch.cat(parts).tolist()]
    assert flat == sorted(total, reverse=True)
    algo = apply_overrides(TrainConfig(), ["algo.micro_batch_size=4", 'algo.loss={"loss_type": "pacs"}']).algo
    assert [m.tolist() for m in micro_batches(data, torch.arange(8), algo)] == [[0, 1, 2, 3], [4, 5, 6, 7]]
