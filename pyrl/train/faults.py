"""Stopping cleanly on SIGTERM, and the fault-injection hooks the reliability tests use.

**SIGTERM** (a scheduler's preemption, ``kill``, ``torchrun`` forwarding its own SIGTERM) no longer
kills a run mid-write. While ``train`` runs, the first SIGTERM only sets a flag; the run finishes
the step it is in (and a checkpoint write in progress), writes a checkpoint of that step if it was
not one already, and stops with ``Stopped`` (``pyrl train`` exits with status 143 = 128 + SIGTERM
and says which checkpoint ``--resume`` will continue from). With several ranks the flag is
all-reduced at the end of every step, so all ranks stop after the same step. A second SIGTERM
stops at once (``Stopped`` raised where the process is; the last complete checkpoint stays the
newest). SIGKILL cannot be caught: checkpoints are atomic, so it leaves at worst a ``.tmp-*``
folder, which ``--resume`` removes and reports.

**Fault injection** (tests only; inert unless the variable is set; read by ``from_env`` when a run
starts, a malformed value is a ``ValueError`` naming the variable):

``PYRL_FAULT_PAUSE_IN_CHECKPOINT=STEP[:PHASE]``
    Rank 0 pauses (up to 300 s, or until a SIGTERM) while it writes the checkpoint of step ``STEP``,
    after writing ``<checkpoints>/.tmp-step-NNNNNN.paused`` (its pid) as a marker for the test to
    wait on. ``PHASE`` ``write`` (default): the temporary folder holds the model and optimizer files
    but not the RNG state, trainer state or manifest. ``commit``: the folder is complete and renamed
    into place, but ``latest`` still names the previous checkpoint.
``PYRL_FAULT_CRASH_RANK=R``, ``PYRL_FAULT_CRASH_STEP=K`` (both needed), ``PYRL_FAULT_CRASH_MODE``
    Rank ``R`` fails when it starts step ``K`` (1-based, as in ``metrics.jsonl``): ``raise`` (default)
    raises ``InjectedFault``; ``exit`` calls ``os._exit(13)`` (a hard crash, no Python cleanup);
    ``hang`` sleeps (a stuck rank, until a signal ends it), so the other ranks block in their next
    collective until ``dist_timeout_s``.
"""
from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from typing import Optional

__all__ = ["Stopped", "InjectedFault", "FaultConfig", "from_env", "stop_requested", "handle_sigterm",
           "pause_in_checkpoint", "maybe_crash", "EXIT_STOPPED", "EXIT_CRASH", "PAUSE_S"]

EXIT_STOPPED = 128 + signal.SIGTERM  # what a shell reports for a process ended by SIGTERM
EXIT_CRASH = 13                      # PYRL_FAULT_CRASH_MODE=exit
PAUSE_S = 300.0
_PHASES = ("write", "commit")
_MODES = ("raise", "exit", "hang")


class Stopped(RuntimeError):
    """The run stopped on a SIGTERM (after a complete checkpoint, unless it was the second one)."""


class InjectedFault(RuntimeError):
    """The failure ``PYRL_FAULT_CRASH_*`` asked for."""


@dataclass(frozen=True)
class FaultConfig:
    pause_step: Optional[int] = None
    pause_phase: str = "write"
    crash_rank: Optional[int] = None
    crash_step: Optional[int] = None
    crash_mode: str = "raise"


def _int(name: str, text: str, minimum: int) -> int:
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {text!r}")
    return value


def from_env(environ=None) -> FaultConfig:
    """The fault-injection settings of the environment (all off when no ``PYRL_FAULT_*`` is set)."""
    env = os.environ if environ is None else environ
    cfg = {}
    pause = env.get("PYRL_FAULT_PAUSE_IN_CHECKPOINT", "").strip()
    if pause:
        step, _, phase = pause.partition(":")
        cfg["pause_step"] = _int("PYRL_FAULT_PAUSE_IN_CHECKPOINT", step, 1)
        phase = phase or "write"
        if phase not in _PHASES:
            raise ValueError(f"PYRL_FAULT_PAUSE_IN_CHECKPOINT: the phase after ':' must be one of "
                             f"{', '.join(_PHASES)}, got {phase!r}")
        cfg["pause_phase"] = phase
    rank, step = env.get("PYRL_FAULT_CRASH_RANK", "").strip(), env.get("PYRL_FAULT_CRASH_STEP", "").strip()
    mode = env.get("PYRL_FAULT_CRASH_MODE", "").strip()
    if rank or step or mode:
        if not (rank and step):
            raise ValueError("PYRL_FAULT_CRASH_RANK and PYRL_FAULT_CRASH_STEP must be set together "
                             f"(got PYRL_FAULT_CRASH_RANK={rank!r}, PYRL_FAULT_CRASH_STEP={step!r})")
        cfg["crash_rank"] = _int("PYRL_FAULT_CRASH_RANK", rank, 0)
        cfg["crash_step"] = _int("PYRL_FAULT_CRASH_STEP", step, 1)
        mode = mode or "raise"
        if mode not in _MODES:
            raise ValueError(f"PYRL_FAULT_CRASH_MODE must be one of {', '.join(_MODES)}, got {mode!r}")
        cfg["crash_mode"] = mode
    return FaultConfig(**cfg)


# --------------------------------------------------------------------------------------------------
# SIGTERM

_stop = threading.Event()


def stop_requested() -> bool:
    """Whether a SIGTERM arrived while ``handle_sigterm`` was active (this process only)."""
    return _stop.is_set()


def _on_sigterm(signum, frame):
    if _stop.is_set():
        raise Stopped("a second SIGTERM: stopped at once; the newest complete checkpoint is the one "
                      "--resume continues from")
    _stop.set()
    print("pyrl train: SIGTERM received: finishing this step and writing a checkpoint, then stopping "
          "(a second SIGTERM stops at once)", file=sys.stderr, flush=True)


@contextlib.contextmanager
def handle_sigterm():
    """Turn SIGTERM into a stop request for the duration (main thread only; elsewhere a no-op)."""
    _stop.clear()
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
        _stop.clear()


# --------------------------------------------------------------------------------------------------
# Injection points

def pause_in_checkpoint(faults: Optional[FaultConfig], root: str, step: int, phase: str) -> None:
    """Called by ``checkpoint._write`` at each ``phase``; pauses there when asked to (see above)."""
    if faults is None or faults.pause_step != step or faults.pause_phase != phase:
        return
    marker = os.path.join(root, f".tmp-step-{step:06d}.paused")
    with open(marker, "w") as f:
        f.write(f"{os.getpid()}\n")
    print(f"pyrl train: fault injection: pausing in the checkpoint of step {step} ({phase}); marker {marker}",
          file=sys.stderr, flush=True)
    deadline = time.monotonic() + PAUSE_S
    while time.monotonic() < deadline and not stop_requested():
        time.sleep(0.02)
    os.remove(marker)


def maybe_crash(faults: Optional[FaultConfig], step: int, rank: int) -> None:
    """Called at the start of every step (1-based ``step``); fails this rank when asked to."""
    if faults is None or faults.crash_step != step or faults.crash_rank != rank:
        return
    what = f"fault injection: rank {rank} fails at step {step} (PYRL_FAULT_CRASH_MODE={faults.crash_mode})"
    print(f"pyrl train: {what}", file=sys.stderr, flush=True)
    if faults.crash_mode == "exit":
        os._exit(EXIT_CRASH)
    if faults.crash_mode == "hang":
        while not stop_requested():
            time.sleep(0.05)
        raise InjectedFault(f"{what}: the hung rank got SIGTERM")
    raise InjectedFault(what)
