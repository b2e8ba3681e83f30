"""One measurement in a fresh process, forked from a server that has already imported torch.

``python -m`` start-up costs ~1.5 s per process on a 2-core machine (importing torch), which for the
~30 measurements of ``--quick`` is a third of its time. A ``forkserver`` imports torch once; each
measurement is a fork of it: a new address space that holds no other implementation's memory, so
its peak RSS is its own. The server never runs a torch op, so no OpenMP pool is forked.
"""
from __future__ import annotations

import multiprocessing as mp
import traceback

_PRELOAD = ["numpy", "torch", "pyrl", "pyrl.bench.measure"]
_CONTEXT = None


def _context():
    global _CONTEXT
    if _CONTEXT is None:
        method = "forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn"
        _CONTEXT = mp.get_context(method)
        if method == "forkserver":
            _CONTEXT.set_forkserver_preload(_PRELOAD)
    return _CONTEXT


def start_server() -> None:
    """Start the fork server now, so that it imports the very code the parent imported."""
    if _context().get_start_method() == "forkserver":
        from multiprocessing import forkserver

        forkserver.ensure_running()


def _main(conn, op: str, impl: str, shape, settings: dict, ref_path: str) -> None:
    import torch

    from pyrl.bench.measure import Settings, measure

    try:
        # mmap: the reference's pages are read only when the check touches them, after the timing.
        entry = torch.load(ref_path, mmap=True, weights_only=True)
        conn.send(measure(op, impl, tuple(shape), Settings(**settings), entry))
    except BaseException:  # noqa: BLE001  (reported to the parent as the row's note)
        conn.send({"child_error": traceback.format_exc(limit=3).strip().splitlines()[-1]})
    finally:
        conn.close()


def run_in_child(op: str, impl: str, shape, settings: dict, ref_path: str, timeout: float | None) -> dict:
    """The row of one measurement made in a fresh process, or ``{"child_error": why}``."""
    ctx = _context()
    recv, send = ctx.Pipe(duplex=False)
    # Not a daemon: a measured library may start processes of its own (Inductor's compile workers).
    proc = ctx.Process(target=_main, args=(send, op, impl, list(shape), settings, ref_path))
    proc.start()
    send.close()
    try:
        if recv.poll(timeout):
            return recv.recv()
        return {"child_error": f"killed after {timeout:.0f} s (time budget)"}
    except EOFError:  # the child died without a word: killed for memory, or crashed
        proc.join()
        return {"child_error": f"child process died (exit code {proc.exitcode}; out of memory?)"}
    finally:  # also on Ctrl-C: never leave a measurement running behind the parent
        proc.join(1)
        if proc.is_alive():
            proc.kill()
            proc.join()
        recv.close()
