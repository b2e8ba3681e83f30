"""Fault injection for the trainer: real signals during a checkpoint write, a failing rank in a
2-process gloo run, and bitwise determinism (docs/reliability.md, "Fault injection").

Runs are ``python -m pyrl.cli train --preset tiny`` subprocesses shrunk to a few seconds (``ARGS``);
the injection points are the ``PYRL_FAULT_*`` hooks of ``pyrl.train.faults``. Every subprocess has
a hard timeout and its whole process group is killed on expiry, so no test can hang.
"""
import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from pyrl.train import apply_overrides, checkpoint, cli, distributed, faults, get_preset, train  # noqa: E402
from pyrl.train.metrics import read_metrics  # noqa: E402

STEPS, SAVE_EVERY = 6, 2
SMALL = ["warmup.steps=20", "task.eval_size=0", "rollout.group_size=4", "rollout.prompts_per_step=4",
         "algo.micro_batch_size=8", "tensorboard=false", "plot=false", "threads=1"]
# wall-clock fields: the only ones allowed to differ
TIMING = ("tokens_per_s", "rollout_s", "score_s", "update_s", "eval_s")
STATE_FILES = ("model.safetensors", "optimizer.safetensors", "rng.safetensors")
TIMEOUT = 120


def _cli_args(out, *, seed=0, steps=STEPS):
    args = ["--preset", "tiny", "--out", str(out), "--max-steps", str(steps), "--save-every", str(SAVE_EVERY),
            "--seed", str(seed), "--deterministic", "--no-progress"]
    for item in SMALL:
        args += ["--set", item]
    return args


def _env(**faults_env):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYRL_FAULT_")}
    env.update(OMP_NUM_THREADS="1", **{k: str(v) for k, v in faults_env.items()})
    return env


def _start(cmd, env):
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True,
                            start_new_session=True)


def _finish(proc, timeout=TIMEOUT):
    """(returncode, output, seconds); on timeout the process group is killed and the test fails."""
    t0 = time.monotonic()
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"{proc.args} did not end within {timeout} s:\n{out[-4000:]}")
    return proc.returncode, out, time.monotonic() - t0


def _train_cli(out, *extra, env=None, seed=0):
    proc = _start([sys.executable, "-m", "pyrl.cli", "train", *_cli_args(out, seed=seed), *extra], env or _env())
    return _finish(proc)


def _wait_for(path, proc, timeout=TIMEOUT):
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if proc.poll() is not None:
            pytest.fail(f"the run ended (status {proc.returncode}) before {path} appeared:\n{proc.stdout.read()}")
        if time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail(f"{path} did not appear within {timeout} s")
        time.sleep(0.02)


def _sha(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def _metrics(out):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in read_metrics(os.path.join(out, "metrics.jsonl"))]


def _final(out, steps=STEPS):
    folder = os.path.join(out, "checkpoints", f"step-{steps:06d}")
    checkpoint.verify(folder)
    return {name: _sha(os.path.join(folder, name)) for name in STATE_FILES}


def _assert_same_run(got, want, steps=STEPS):
    """Bitwise: every saved tensor of the last checkpoint, and every logged metric of every step."""
    from safetensors.torch import load_file

    a = load_file(os.path.join(got, "checkpoints", f"step-{steps:06d}", "model.safetensors"))
    b = load_file(os.path.join(want, "checkpoints", f"step-{steps:06d}", "model.safetensors"))
    assert set(a) == set(b)
    for name in a:
        assert torch.equal(a[name], b[name]), f"parameter {name} differs"
    assert _final(got, steps) == _final(want, steps)
    mg, mw = _metrics(got), _metrics(want)
    assert [r["step"] for r in mg] == list(range(1, steps + 1))
    assert mg == mw


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run every interrupted one must reproduce bit for bit."""
    out = str(tmp_path_factory.mktemp("faults") / "reference")
    rc, log, _ = _train_cli(out)
    assert rc == 0, log[-4000:]
    assert any(r["loss"] != 0 for r in _metrics(out))  # it really trained
    return out


def _checkpoints(out):
    return os.path.join(out, "checkpoints")


def _resume(out):
    rc, log, _ = _train_cli(out, "--resume")
    assert rc == 0, log[-4000:]
    return log


# ------------------------------------------------------------------------------------------------
# 1. a real signal while a checkpoint is being written

@pytest.mark.parametrize("phase", ["write", "commit"])
def test_sigkill_during_checkpoint_write_then_resume_is_exact(tmp_path, reference, phase):
    """SIGKILL with step 4's checkpoint half written (``write``) or complete but not yet committed to
    ``latest`` (``commit``): step 2 stays the newest checkpoint, --resume removes the leftover with a
    log line, never loads it, and finishes bit-identical to the uninterrupted run."""
    out = str(tmp_path / "run")
    proc = _start([sys.executable, "-m", "pyrl.cli", "train", *_cli_args(out)],
                  _env(PYRL_FAULT_PAUSE_IN_CHECKPOINT=f"4:{phase}"))
    _wait_for(os.path.join(_checkpoints(out), ".tmp-step-000004.paused"), proc)
    os.killpg(proc.pid, signal.SIGKILL)
    rc, log, _ = _finish(proc)
    assert rc == -signal.SIGKILL, log[-4000:]

    root = _checkpoints(out)
    assert open(os.path.join(root, "latest")).read().strip() == "step-000002"
    assert checkpoint.latest(root) == os.path.join(root, "step-000002")  # verified, and what --resume picks
    if phase == "write":
        partial = os.path.join(root, ".tmp-step-000004")
        assert not os.path.exists(os.path.join(partial, checkpoint.MANIFEST))
        assert os.path.exists(os.path.join(partial, "model.safetensors"))
        with pytest.raises(checkpoint.CheckpointError, match="incomplete"):
            checkpoint.verify(partial)
    else:
        partial = os.path.join(root, "step-000004")
        checkpoint.verify(partial)  # complete, but never committed: not loaded either

    log = _resume(out)
    assert f"removed {partial}" in log, log[-4000:]
    assert "never loaded" in log
    assert "resumed from " + os.path.join(root, "step-000002") + " (step 2)" in log, log[-4000:]
    assert not any(n.startswith(".tmp-") for n in os.listdir(root))
    _assert_same_run(out, reference)


def test_sigterm_during_checkpoint_write_finishes_it_and_stops(tmp_path, reference):
    """SIGTERM mid-write: the write completes (manifest, rename, ``latest``), the run stops with
    status 143 and says which checkpoint --resume continues from; resuming is exact."""
    out = str(tmp_path / "run")
    proc = _start([sys.executable, "-m", "pyrl.cli", "train", *_cli_args(out)],
                  _env(PYRL_FAULT_PAUSE_IN_CHECKPOINT="4"))
    _wait_for(os.path.join(_checkpoints(out), ".tmp-step-000004.paused"), proc)
    os.kill(proc.pid, signal.SIGTERM)
    rc, log, _ = _finish(proc)
    root = _checkpoints(out)
    assert rc == faults.EXIT_STOPPED == 143, log[-4000:]
    assert "SIGTERM received" in log
    assert f"stopped by SIGTERM after step 4: the checkpoint {os.path.join(root, 'step-000004')} is complete" in log
    assert checkpoint.latest(root) == os.path.join(root, "step-000004")  # verified against its manifest
    assert not any(n.startswith(".tmp-") for n in os.listdir(root))
    assert [r["step"] for r in _metrics(out)] == [1, 2, 3, 4]

    log = _resume(out)
    assert "resumed from " + os.path.join(root, "step-000004") + " (step 4)" in log
    assert "removed" not in log
    _assert_same_run(out, reference)


def _fast_cfg(*extra):
    return apply_overrides(get_preset("tiny"), SMALL + [f"max_steps={STEPS}", f"save_every={SAVE_EVERY}",
                                                        "deterministic=true", "progress=false", *extra])


def test_sigterm_mid_step_saves_that_step(tmp_path, reference, monkeypatch):
    """A SIGTERM that arrives in step 3 (not a checkpoint step) ends the run after step 3 with a
    checkpoint of step 3; a second SIGTERM stops at once, leaving the newest complete checkpoint."""
    real = faults.maybe_crash

    def sigterm_at(step_wanted, times):
        def hook(fault_cfg, step, rank):
            if step == step_wanted:
                # never signal the test process itself unless train() installed its handler
                assert signal.getsignal(signal.SIGTERM) is faults._on_sigterm
                for _ in range(times):
                    os.kill(os.getpid(), signal.SIGTERM)
                    time.sleep(0.05)  # let the handler run
            return real(fault_cfg, step, rank)
        return hook

    before = signal.getsignal(signal.SIGTERM)
    out = str(tmp_path / "once")
    monkeypatch.setattr(faults, "maybe_crash", sigterm_at(3, 1))
    with pytest.raises(faults.Stopped, match="after step 3"):
        train(_fast_cfg(), out)
    assert signal.getsignal(signal.SIGTERM) == before and not faults.stop_requested()
    assert checkpoint.latest(_checkpoints(out)).endswith("step-000003")
    monkeypatch.setattr(faults, "maybe_crash", real)
    train(_fast_cfg(), out, resume=True)
    _assert_same_run(out, reference)

    out = str(tmp_path / "twice")
    monkeypatch.setattr(faults, "maybe_crash", sigterm_at(3, 2))
    with pytest.raises(faults.Stopped, match="second SIGTERM"):
        train(_fast_cfg(), out)
    assert checkpoint.latest(_checkpoints(out)).endswith("step-000002")
    assert signal.getsignal(signal.SIGTERM) == before


# ------------------------------------------------------------------------------------------------
# 2. a failing rank in a 2-process gloo run ends the job, with the rank and the reason

def _torchrun(out, *extra, env):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "pyrl.cli",
           "train", *_cli_args(out, steps=3), *extra]
    return _finish(_start(cmd, env))


@pytest.mark.parametrize("mode", ["raise", "exit"])
def test_crashed_rank_ends_the_job_with_a_clear_error(tmp_path, mode):
    rc, log, seconds = _torchrun(str(tmp_path / "run"), "--set", "dist_timeout_s=60",
                                 env=_env(PYRL_FAULT_CRASH_RANK=1, PYRL_FAULT_CRASH_STEP=2, PYRL_FAULT_CRASH_MODE=mode))
    assert rc != 0, log[-6000:]
    assert seconds < 60 + 30, seconds  # ended by the failure (or at worst the timeout), not hung
    assert f"fault injection: rank 1 fails at step 2 (PYRL_FAULT_CRASH_MODE={mode})" in log, log[-6000:]
    if mode == "raise":
        assert "pyrl train: rank 1 of 2 failed in step 2: InjectedFault" in log, log[-6000:]
    else:  # no Python cleanup in the crashed rank: torchrun's summary names it and its exit code
        assert "rank      : 1" in log and f"exitcode  : {faults.EXIT_CRASH}" in log, log[-6000:]
    # the survivor did not carry on: no step 2 was logged
    assert [r["step"] for r in read_metrics(str(tmp_path / "run" / "metrics.jsonl"))] == [1]


def test_sigterm_to_torchrun_stops_every_rank_after_a_complete_checkpoint(tmp_path):
    """``kill <torchrun>`` while rank 0 writes step 2's checkpoint (rank 1 waits for it): torchrun
    forwards SIGTERM, the write completes, both ranks agree to stop after step 2, and --resume
    under torchrun continues from it to the end."""
    out = str(tmp_path / "run")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "pyrl.cli",
           "train", *_cli_args(out, steps=3)]
    proc = _start(cmd, _env(PYRL_FAULT_PAUSE_IN_CHECKPOINT=2))
    _wait_for(os.path.join(_checkpoints(out), ".tmp-step-000002.paused"), proc)
    os.kill(proc.pid, signal.SIGTERM)
    rc, log, seconds = _finish(proc)
    assert rc != 0 and seconds < 30, (rc, seconds, log[-6000:])  # torchrun's own SIGKILL comes after 30 s
    assert log.count("stopped by SIGTERM after step 2") == 2, log[-6000:]
    assert checkpoint.latest(_checkpoints(out)).endswith("step-000002")
    rc, log, _ = _torchrun(out, "--resume", env=_env())
    assert rc == 0, log[-6000:]
    assert [r["step"] for r in read_metrics(os.path.join(out, "metrics.jsonl"))] == [1, 2, 3]
    checkpoint.verify(os.path.join(_checkpoints(out), "step-000003"))


def test_stuck_rank_ends_the_job_after_dist_timeout(tmp_path):
    """Rank 1 hangs (alive, silent): rank 0 waits in its next collective for ``dist_timeout_s`` only,
    then fails naming itself, the step and the likely cause; torchrun then ends rank 1."""
    timeout_s = 8
    rc, log, seconds = _torchrun(str(tmp_path / "run"), "--set", f"dist_timeout_s={timeout_s}",
                                 env=_env(PYRL_FAULT_CRASH_RANK=1, PYRL_FAULT_CRASH_STEP=2,
                                          PYRL_FAULT_CRASH_MODE="hang"))
    assert rc != 0, log[-6000:]
    assert "fault injection: rank 1 fails at step 2 (PYRL_FAULT_CRASH_MODE=hang)" in log, log[-6000:]
    assert "pyrl train: rank 0 of 2 failed in step 2" in log, log[-6000:]
    assert f"dist_timeout_s={timeout_s} s" in log
    assert seconds < 90, seconds


# ------------------------------------------------------------------------------------------------
# 3. determinism

def test_deterministic_runs_are_bitwise_identical_and_seed_dependent(tmp_path, reference):
    """Two separate processes, same seed, --deterministic: the same bits everywhere; another seed:
    other metrics and parameters (so this test can fail)."""
    again = str(tmp_path / "again")
    rc, log, _ = _train_cli(again)
    assert rc == 0, log[-4000:]
    _assert_same_run(again, reference)

    other = str(tmp_path / "seed1")
    rc, log, _ = _train_cli(other, seed=1)
    assert rc == 0, log[-4000:]
    assert _metrics(other) != _metrics(reference)
    assert _final(other)["model.safetensors"] != _final(reference)["model.safetensors"]
    assert json.load(open(os.path.join(other, "config.json")))["seed"] == 1


# ------------------------------------------------------------------------------------------------
# 4. KL with beta = 0 (the kl_mean metric only)

@pytest.mark.parametrize("kl_type", ["full", "k3"])
def test_kl_metric_without_penalty(tmp_path, kl_type):
    """``kl_type`` with ``beta = 0``: the reference model is built and ``kl_mean`` measured (the
    exact KL used to raise for want of ``ref_hidden``; k1/k2/k3 silently logged 0)."""
    cfg = _fast_cfg("max_steps=2", "save_every=0", "warmup.steps=5",
                    f'algo.loss={{"beta": 0.0, "kl_type": "{kl_type}"}}')
    train(cfg, str(tmp_path / "run"))
    records = read_metrics(str(tmp_path / "run" / "metrics.jsonl"))
    assert records[0]["kl_mean"] == pytest.approx(0.0, abs=1e-6)  # the policy is the reference at step 1
    assert records[1]["kl_mean"] > 0


# ------------------------------------------------------------------------------------------------
# the hooks and the timeout are validated, and inert by default

def test_fault_settings_are_validated_and_off_by_default(monkeypatch, capsys):
    assert faults.from_env({}) == faults.FaultConfig()
    got = faults.from_env({"PYRL_FAULT_PAUSE_IN_CHECKPOINT": "4:commit", "PYRL_FAULT_CRASH_RANK": "1",
                           "PYRL_FAULT_CRASH_STEP": "2", "PYRL_FAULT_CRASH_MODE": "hang"})
    assert got == faults.FaultConfig(4, "commit", 1, 2, "hang")
    bad = [({"PYRL_FAULT_PAUSE_IN_CHECKPOINT": "x"}, "PYRL_FAULT_PAUSE_IN_CHECKPOINT must be an integer >= 1"),
           ({"PYRL_FAULT_PAUSE_IN_CHECKPOINT": "0"}, "PYRL_FAULT_PAUSE_IN_CHECKPOINT must be an integer >= 1"),
           ({"PYRL_FAULT_PAUSE_IN_CHECKPOINT": "3:later"}, "PYRL_FAULT_PAUSE_IN_CHECKPOINT: the phase"),
           ({"PYRL_FAULT_CRASH_RANK": "1"}, "PYRL_FAULT_CRASH_RANK and PYRL_FAULT_CRASH_STEP must be set together"),
           ({"PYRL_FAULT_CRASH_RANK": "-1", "PYRL_FAULT_CRASH_STEP": "2"}, "PYRL_FAULT_CRASH_RANK must be"),
           ({"PYRL_FAULT_CRASH_RANK": "0", "PYRL_FAULT_CRASH_STEP": "2.5"}, "PYRL_FAULT_CRASH_STEP must be"),
           ({"PYRL_FAULT_CRASH_RANK": "0", "PYRL_FAULT_CRASH_STEP": "2", "PYRL_FAULT_CRASH_MODE": "boom"},
            "PYRL_FAULT_CRASH_MODE must be one of")]
    for env, msg in bad:
        with pytest.raises(ValueError, match=msg):
            faults.from_env(env)
    faults.maybe_crash(faults.FaultConfig(), 2, 1)  # inert
    faults.maybe_crash(None, 2, 1)
    with pytest.raises(faults.InjectedFault, match="rank 1 fails at step 2"):
        faults.maybe_crash(faults.FaultConfig(crash_rank=1, crash_step=2), 2, 1)

    monkeypatch.setenv("PYRL_FAULT_CRASH_MODE", "boom")
    assert cli.run(["--preset", "tiny", "--out", "x"]) == 2
    assert "PYRL_FAULT_CRASH_RANK and PYRL_FAULT_CRASH_STEP" in capsys.readouterr().err
    monkeypatch.delenv("PYRL_FAULT_CRASH_MODE")
    for value in ("0", "-1", "inf"):
        assert cli.run(["--preset", "tiny", "--out", "x", "--set", f"dist_timeout_s={value}"]) == 2
        assert "dist_timeout_s must be a finite number of seconds > 0" in capsys.readouterr().err
    with pytest.raises(ValueError, match="timeout_s"):
        distributed.setup("cpu", timeout_s=0)


def test_clean_incomplete(tmp_path):
    root = tmp_path / "ckpt"
    assert checkpoint.clean_incomplete(str(root)) == []
    for name in ("step-000002", "step-000004", ".tmp-step-000006"):
        (root / name).mkdir(parents=True)
    (root / ".tmp-step-000006.paused").write_text("1\n")
    (root / "latest.tmp").write_text("step-0000")
    (root / "latest").write_text("step-000002\n")
    lines = checkpoint.clean_incomplete(str(root))
    assert sorted(os.listdir(root)) == ["latest", "step-000002"]
    assert len(lines) == 4 and all("never" in line for line in lines)
