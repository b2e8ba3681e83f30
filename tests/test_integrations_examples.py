"""The examples run: each as a subprocess with a tiny step count."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_plain_pytorch_grpo_runs():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(EXAMPLES.parent),
                                                                     os.environ.get("PYTHONPATH")]))}
    out = subprocess.run([sys.executable, str(EXAMPLES / "plain_pytorch_grpo.py"), "--steps", "2", "--prompts", "2",
                          "--group-size", "4"], capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    assert [line.split()[:2] for line in lines[:2]] == [["step", "0"], ["step", "1"]], out.stdout
    assert lines[-1].startswith("mean reward: first"), out.stdout


def test_dpo_and_distill_runs():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(EXAMPLES.parent),
                                                                     os.environ.get("PYTHONPATH")]))}
    out = subprocess.run([sys.executable, str(EXAMPLES / "dpo_and_distill.py"), "--steps", "2", "--pairs", "2"],
                         capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    assert lines[0].startswith("dpo step 0") and lines[-1].startswith("chosen log-prob: student"), out.stdout
