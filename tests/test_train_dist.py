"""pyrl.train with 2 CPU processes over gloo, launched by torchrun (this file is also the worker).

One launch checks, for DDP and for FSDP2 (``fully_shard`` works on CPU with gloo):
- the data-parallel update equals the single-process update on the whole batch (token counts are
  summed over ranks, so the token mean is exact), with gradient accumulation over micro-batches;
- the training loop runs end to end, writes metrics and checkpoints, and resumes;
- preference mode (DPO) gives the one-process run's metrics and weights.
The launch has a hard timeout and its whole process group is killed on expiry, so it never hangs.
"""
import contextlib
import json
import os
import signal
import subprocess
import sys

import pytest
import torch

WORLD = 2
AGGS = ("token-mean", "seq-mean-token-mean")


def _update_once(policy_factory, data, agg, *, model_wrapper=None, dist=None):
    """Build, (wrap,) score and update; returns the model (wrapped)."""
    import pyrl
    from pyrl.train import apply_overrides
    from pyrl.train.config import TrainConfig
    from pyrl.train.distributed import DistInfo
    from pyrl.train.loop import _score_old, update

    cfg = apply_overrides(TrainConfig(), ["algo.micro_batch_size=1", "algo.ppo_epochs=2",
                                          f'algo.loss={{"agg": "{agg}"}}'])
    policy = policy_factory(pyrl.PolicyLossConfig(**cfg.algo.loss))
    model = model_wrapper(policy) if model_wrapper else policy
    params = list(policy.parameters())
    opt = torch.optim.SGD(params, lr=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1.0)
    data = dict(data)
    data.update(_score_old(model, None, data, cfg, need_old=True, need_values=False, autocast=contextlib.nullcontext))
    update(model, opt, sched, data, cfg=cfg, dist=dist or DistInfo(0, 1, 0, torch.device("cpu")), params=params,
           autocast=contextlib.nullcontext)
    return model


def _factory(loss_cfg):
    from pyrl.train.models import build_tiny_model, char_tokenizer
    from pyrl.train.policy import Policy

    return Policy(build_tiny_model(char_tokenizer(), seed=0, hidden_size=64, intermediate_size=128,
                                   attn_implementation="sdpa"), loss_cfg)


def _data():
    from test_train import synthetic_data  # noqa: E402  (same folder; sys.path set by the caller)
    from pyrl.train.models import char_tokenizer

    return synthetic_data(char_tokenizer(), B=8)


def _worker(out: str) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from pyrl.train import apply_overrides, distributed, get_preset, train

    torch.set_num_threads(1)
    dist = distributed.setup("cpu")
    full = _data()
    per = full["completion_ids"].shape[0] // dist.world_size
    mine = {k: v[dist.rank * per:(dist.rank + 1) * per] for k, v in full.items()}
    for kind in ("ddp", "fsdp"):
        for agg in AGGS:
            model = _update_once(_factory, mine, agg, model_wrapper=lambda p: distributed.wrap(p, dist, kind),
                                 dist=dist)
            state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
            if dist.is_main:
                torch.save(state, os.path.join(out, f"update-{kind}-{agg}.pt"))

    base = ["warmup.steps=10", "task.eval_size=8", "eval_every=2", "rollout.group_size=4",
            "rollout.prompts_per_step=4", "algo.micro_batch_size=4", "progress=false", "tensorboard=false",
            "plot=false", "threads=1"]
    for kind in ("ddp", "fsdp"):
        cfg = apply_overrides(get_preset("tiny"), base + [f"data_parallel={kind}", "max_steps=2"])
        train(cfg, os.path.join(out, kind))
        cfg = apply_overrides(cfg, ["max_steps=3"])
        train(cfg, os.path.join(out, kind), resume=True)
    # dynamic sampling: ranks that need different numbers of rounds still run them together
    cfg = apply_overrides(get_preset("tiny"), base + ["data_parallel=ddp", "max_steps=2", "save_every=0",
                                                      "algo.dynamic_sampling=true", "algo.max_sample_rounds=3"])
    train(cfg, os.path.join(out, "ddp-dynamic"))
    # preference mode (DPO): each rank takes half of every batch and of the held-out rows
    train(_preference_config("data_parallel=ddp"), os.path.join(out, "ddp-preference"))
    distributed.teardown()


def _preference_config(*extra):
    """tiny-dpo in fp64 (the two runs then differ only by rounding far below the tolerances): 3 steps
    of 16 pairs in micro-batches of 4, 40 held-out pairs (an even split over 2 ranks)."""
    from pyrl.train import apply_overrides, get_preset

    return apply_overrides(get_preset("tiny-dpo"), [
        "model.dtype=float64", "max_steps=3", "save_every=3", "eval_every=1", "task.eval_size=40",
        "preference.batch_size=16", "preference.micro_batch_size=4", "progress=false", "tensorboard=false",
        "plot=false", "threads=1", *extra])


@pytest.fixture(scope="module")
def launch(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("dist"))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.path.dirname(__file__) + os.pathsep
           + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={WORLD}",
           __file__, out]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, start_new_session=True,
                            text=True)
    try:
        log, _ = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        log, _ = proc.communicate()
        pytest.fail(f"the 2-process run timed out:\n{log[-4000:]}")
    assert proc.returncode == 0, log[-6000:]
    return out


@pytest.mark.parametrize("kind", ["ddp", "fsdp"])
@pytest.mark.parametrize("agg", AGGS)
def test_data_parallel_update_equals_single_process(launch, kind, agg):
    sys.path.insert(0, os.path.dirname(__file__))
    torch.set_num_threads(1)
    want = _update_once(_factory, _data(), agg).state_dict()
    got = torch.load(os.path.join(launch, f"update-{kind}-{agg}.pt"))
    assert set(got) == set(want)
    moved = 0
    start = _factory(__import__("pyrl").PolicyLossConfig()).state_dict()
    for name, w in want.items():
        torch.testing.assert_close(got[name], w, atol=2e-6, rtol=1e-5, msg=name)
        moved += int(not torch.equal(w, start[name]))
    assert moved > 0  # the update did something


@pytest.mark.parametrize("kind", ["ddp", "fsdp"])
def test_two_process_training_runs_and_resumes(launch, kind):
    from pyrl.train import checkpoint
    from pyrl.train.metrics import REQUIRED_FIELDS, read_metrics

    out = os.path.join(launch, kind)
    records = read_metrics(os.path.join(out, "metrics.jsonl"))
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all(set(REQUIRED_FIELDS) <= set(r) for r in records)
    assert json.load(open(os.path.join(out, "summary.json")))["world_size"] == WORLD
    assert checkpoint.latest(os.path.join(out, "checkpoints")).endswith("step-000003")


def test_two_process_dynamic_sampling(launch):
    from pyrl.train.metrics import read_metrics

    records = read_metrics(os.path.join(launch, "ddp-dynamic", "metrics.jsonl"))
    assert [r["step"] for r in records] == [1, 2]
    assert all(1 <= r["sample_rounds"] <= 3 and 0 <= r["groups_kept_frac"] <= 1 for r in records)


def test_two_process_preference_mode_equals_single_process(launch, tmp_path):
    """DPO over 2 ranks: the loss is each rank's mean over its half of the pairs, DDP averages the
    gradients, so with equal halves the update is the one-process update on the whole batch: the
    same losses, reward metrics and held-out metrics at every step, and the same weights after 3."""
    from pyrl.train import checkpoint, train
    from pyrl.train.metrics import read_metrics

    torch.set_num_threads(1)
    one = str(tmp_path / "one")
    train(_preference_config(), one)
    two = os.path.join(launch, "ddp-preference")
    r1, r2 = read_metrics(os.path.join(one, "metrics.jsonl")), read_metrics(os.path.join(two, "metrics.jsonl"))
    assert [r["step"] for r in r2] == [1, 2, 3]
    keys = ["loss", "reward_accuracy", "reward_margin", "chosen_logp", "rejected_logp", "grad_norm",
            "eval_loss", "eval_reward_accuracy", "eval_reward_margin"]
    for a, b in zip(r1, r2):
        for k in keys:
            assert b[k] == pytest.approx(a[k], rel=1e-9, abs=1e-12), (a["step"], k)
    assert r2[-1]["eval_reward_accuracy"] > r2[0]["eval_reward_accuracy"] or r2[-1]["eval_reward_margin"] > 0
    assert json.load(open(os.path.join(two, "summary.json")))["world_size"] == WORLD
    w1 = checkpoint.load_weights(os.path.join(one, "checkpoints", "step-000003"), {})
    w2 = checkpoint.load_weights(os.path.join(two, "checkpoints", "step-000003"), {})
    assert set(w1) == set(w2)
    for name, w in w1.items():
        assert w2[name].dtype == torch.float64, name
        torch.testing.assert_close(w2[name], w, atol=1e-12, rtol=1e-10, msg=name)


if __name__ == "__main__":
    _worker(sys.argv[1])
