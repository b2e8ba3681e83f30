"""The installation itself: the extension, the kernels subpackage, the CLI and CI's contract."""
import importlib.util
import json
import pathlib
import subprocess
import sys

import pytest

import pyrl
from conftest import require_extension

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_cpp_extension_is_built():
    info = pyrl.backends()["cpp"]
    if not require_extension():
        pytest.skip("PYRL_ALLOW_NO_EXT=1")
    assert info["available"], info["detail"]
    from pyrl import _C
    import torch

    assert _C.torch_version.split("+")[0] == torch.__version__.split("+")[0], "pyrl._C built for another torch"
    assert hasattr(torch.ops.pyrl, "logprobs_fwd")


def test_backends_report_shape():
    report = pyrl.backends()
    assert set(report) == {"torch", "cpp", "triton"}
    assert report["torch"]["available"] is True
    for entry in report.values():
        assert isinstance(entry["available"], bool) and isinstance(entry["detail"], str) and entry["detail"]


def test_kernels_ship_as_pyrl_subpackage():
    import pyrl.kernels  # noqa: F401

    spec = importlib.util.find_spec("kernels")
    # pyrl must not install (or shadow) a top-level `kernels` module: that name is another package's.
    assert spec is None or "pyrl" not in str(spec.origin or "")


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "pyrl.cli", *args], capture_output=True, text=True, timeout=120)


def test_cli_info_reports_backends():
    out = _cli("info")
    assert out.returncode == 0, out.stderr
    assert set(json.loads(out.stdout)["backends"]) == {"torch", "cpp", "triton"}


def test_cli_unknown_command_fails():
    out = _cli("frobnicate")
    assert out.returncode == 2 and "unknown command" in out.stderr


def test_cli_without_command_prints_usage_and_fails():
    out = _cli()
    assert out.returncode == 2 and "bench" in out.stdout


def test_readme_quickstart_is_what_ci_runs():
    sys.path.insert(0, str(ROOT / ".ci"))
    try:
        from quickstart import quickstart_commands
    finally:
        sys.path.pop(0)
    cmds = quickstart_commands((ROOT / "README.md").read_text())
    assert any(c.startswith("pip install") and "--no-build-isolation" in c for c in cmds)
    assert any(c.startswith("pyrl ") for c in cmds), "the quick start must run pyrl's main job"
    assert cmds[-1] == "pytest"
    ci = (ROOT / ".ci" / "run").read_text()
    assert "quickstart.py" in ci and "python3 -m venv" in ci
