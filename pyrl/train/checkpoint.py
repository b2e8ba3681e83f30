"""Checkpoints that are either complete or absent, and that resume a run exactly.

    out/checkpoints/step-000050/
        model.safetensors    the LM (Hugging Face layout: ``from_pretrained`` this folder)
        config.json, generation_config.json, tokenizer files
        critic.safetensors   value head / separate critic (PPO only)
        optimizer.safetensors  AdamW moments and steps, keyed by parameter name
        rng.safetensors      every rank's torch (and CUDA) generator state
        trainer_state.json   step, data position, scheduler, param groups, python RNG, config
        checkpoint.json      manifest, written last: each file's size and sha256
    out/checkpoints/latest   the name of the newest complete checkpoint

Everything is written into a hidden temporary folder next to the final one, fsynced, then renamed
into place with ``os.replace`` (atomic on one filesystem), and only then is ``latest`` switched (again
by rename). A crash leaves at worst a ``.tmp-*`` folder (or, killed between the rename and the
switch, a complete folder newer than ``latest``): ``latest`` ignores both, and ``clean_incomplete``
(called by a resuming run) removes them and says so. Loading checks the manifest and raises
``CheckpointError`` naming what is missing or damaged. ``pyrl.train.faults`` can pause a write at
either point (``PYRL_FAULT_PAUSE_IN_CHECKPOINT``) so that tests can kill it there.

State dicts are taken with ``torch.distributed.checkpoint.state_dict`` (full, on CPU), so the same
code saves a plain module, DDP and FSDP2; rank 0 writes.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import shutil

import torch
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)

from pyrl.train import distributed, faults as _faults

__all__ = ["CheckpointError", "save", "load", "latest", "verify", "clean_incomplete", "save_weights", "load_weights",
           "save_initial", "load_initial"]

MANIFEST = "checkpoint.json"
_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def save_file(tensors: dict, path: str, metadata: dict | None = None) -> None:
    _safetensors().save_file(tensors, path, metadata=metadata)


def load_file(path: str) -> dict:
    return _safetensors().load_file(path)


def _safetensors():
    try:
        import safetensors.torch
    except ImportError as e:
        raise ImportError("pyrl.train's checkpoints need safetensors: pip install safetensors") from e
    return safetensors.torch


class CheckpointError(RuntimeError):
    """A checkpoint folder that is incomplete or damaged (or a ``--resume`` with none to resume)."""


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_text_atomic(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _dedupe(state: dict) -> tuple[dict, dict]:
    """safetensors refuses tensors that share memory (tied embeddings): keep the first name and
    remember the others as aliases."""
    seen, out, aliases = {}, {}, {}
    for k, v in state.items():
        key = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape)) if v.numel() else None
        if key is not None and key in seen:
            aliases[k] = seen[key]
        else:
            if key is not None:
                seen[key] = k
            out[k] = v.contiguous()
    return out, aliases


def _split_model_state(state: dict) -> tuple[dict, dict]:
    """Policy state -> (LM state without the ``lm.`` prefix, critic state)."""
    lm = {k[3:]: v for k, v in state.items() if k.startswith("lm.")}
    critic = {k: v for k, v in state.items() if not k.startswith("lm.")}
    return lm, critic


def save_weights(folder: str, lm_state: dict, *, lm=None, tokenizer=None) -> dict:
    """``model.safetensors`` (+ config and tokenizer when given) in Hugging Face's layout; returns
    the tied-name aliases it dropped."""
    tensors, aliases = _dedupe(lm_state)
    save_file(tensors, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    if lm is not None:
        lm.config.save_pretrained(folder)
        if getattr(lm, "generation_config", None) is not None:
            try:
                lm.generation_config.save_pretrained(folder)
            except Exception:  # noqa: BLE001  (an odd generation config must not block a checkpoint)
                pass
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return aliases


def load_weights(folder: str, aliases: dict | None = None) -> dict:
    state = load_file(os.path.join(folder, "model.safetensors"))
    for alias, name in (aliases or {}).items():
        state[alias] = state[name]
    return state


def save(root: str, step: int, *, model, optimizer, scheduler, data_position: int, config: dict,
         lm=None, tokenizer=None, keep: int = 2, extra: dict | None = None,
         faults: _faults.FaultConfig | None = None) -> str | None:
    """Write ``root/step-{step:06d}`` atomically (collective: call on every rank). Returns its path
    on rank 0. ``extra``: JSON data returned by ``load`` under ``"extra"``. ``faults``: the test
    hook of ``pyrl.train.faults`` (``None``: none)."""
    opts = _FULL
    model_state = get_model_state_dict(model, options=opts)
    optim_state = get_optimizer_state_dict(model, optimizer, options=opts)
    rng = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        rng["cuda"] = torch.cuda.get_rng_state()
    rngs = distributed.all_gather_object(rng)
    path = None
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        path = _write(root, step, model_state, optim_state, rngs, scheduler, data_position, config, lm, tokenizer,
                      keep, extra or {}, faults)
    distributed.barrier()
    return path


def _write(root, step, model_state, optim_state, rngs, scheduler, data_position, config, lm, tokenizer, keep, extra,
           faults=None):
    os.makedirs(root, exist_ok=True)
    name = f"step-{step:06d}"
    final, tmp = os.path.join(root, name), os.path.join(root, f".tmp-{name}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)

    lm_state, critic_state = _split_model_state(model_state)
    aliases = save_weights(tmp, lm_state, lm=lm, tokenizer=tokenizer)
    if critic_state:
        save_file({k: v.contiguous() for k, v in critic_state.items()}, os.path.join(tmp, "critic.safetensors"))
    optim_tensors = {}
    for pname, st in optim_state["state"].items():
        for k, v in st.items():
            optim_tensors[f"{pname}::{k}"] = (v if isinstance(v, torch.Tensor) else torch.tensor(v)).contiguous()
    save_file(optim_tensors, os.path.join(tmp, "optimizer.safetensors"))
    _faults.pause_in_checkpoint(faults, root, step, "write")  # test hook: a half-written folder
    rng_tensors = {}
    for r, st in enumerate(rngs):
        rng_tensors[f"rank{r}.torch"] = st["torch"]
        if "cuda" in st:
            rng_tensors[f"rank{r}.cuda"] = st["cuda"]
    save_file(rng_tensors, os.path.join(tmp, "rng.safetensors"))
    state = {
        "step": step,
        "data_position": data_position,
        "world_size": len(rngs),
        "scheduler": scheduler.state_dict(),
        "param_groups": optim_state["param_groups"],
        "python_rng": [_py_rng_to_json(st["python"]) for st in rngs],
        "tied": aliases,
        "config": config,
        "extra": extra,
    }
    with open(os.path.join(tmp, "trainer_state.json"), "w") as f:
        json.dump(state, f, indent=1)

    _finalize(tmp, final, step=step)
    _faults.pause_in_checkpoint(faults, root, step, "commit")  # test hook: complete, not yet `latest`
    _write_text_atomic(os.path.join(root, "latest"), name + "\n")
    _prune(root, keep, protect=name)
    return final


def _finalize(tmp: str, final: str, **info) -> None:
    """Write the manifest of ``tmp`` (last), then rename it to ``final``."""
    files = {}
    for fname in sorted(os.listdir(tmp)):
        p = os.path.join(tmp, fname)
        if os.path.isfile(p):
            with open(p, "rb") as fh:
                os.fsync(fh.fileno())
            files[fname] = {"bytes": os.path.getsize(p), "sha256": _sha256(p)}
    _write_text_atomic(os.path.join(tmp, MANIFEST), json.dumps({**info, "files": files}, indent=1))
    _fsync_dir(tmp)
    if os.path.exists(final):
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(os.path.dirname(final) or ".")


def save_initial(folder: str, lm_state: dict, *, lm=None, tokenizer=None) -> None:
    """The policy RL starts from (after the supervised warm-up), written atomically: the reference
    model of a resumed run is rebuilt from it."""
    tmp = os.path.join(os.path.dirname(folder) or ".", ".tmp-" + os.path.basename(folder))
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    aliases = save_weights(tmp, lm_state, lm=lm, tokenizer=tokenizer)
    with open(os.path.join(tmp, "tied.json"), "w") as f:
        json.dump(aliases, f)
    _finalize(tmp, folder)


def load_initial(folder: str) -> dict:
    verify(folder)
    with open(os.path.join(folder, "tied.json")) as f:
        return load_weights(folder, json.load(f))


def _prune(root: str, keep: int, protect: str) -> None:
    names = sorted(n for n in os.listdir(root) if n.startswith("step-") and os.path.isdir(os.path.join(root, n)))
    for n in names[:-keep] if keep > 0 else []:
        if n != protect:
            shutil.rmtree(os.path.join(root, n), ignore_errors=True)
    for n in os.listdir(root):  # leftovers of interrupted writes
        if n.startswith(".tmp-") and n != f".tmp-{protect}":
            _remove(os.path.join(root, n))


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)


def clean_incomplete(root: str) -> list[str]:
    """Remove what interrupted writes left under ``root``: ``.tmp-*`` folders and files, a torn
    ``latest.tmp``, and ``step-*`` folders newer than the one ``latest`` names (killed after their
    rename, before ``latest`` switched: never committed). Returns one line per removal, for the log.
    Call on one rank, before anything reads ``root``."""
    if not os.path.isdir(root):
        return []
    removed = []
    committed = None
    pointer = os.path.join(root, "latest")
    if os.path.exists(pointer):
        with open(pointer) as f:
            committed = f.read().strip()
    for n in sorted(os.listdir(root)):
        path = os.path.join(root, n)
        if n.startswith(".tmp-") or n == "latest.tmp":
            why = "an interrupted checkpoint write (never loaded)"
        elif committed and n.startswith("step-") and os.path.isdir(path) and n > committed:
            why = f"a checkpoint written after {committed} but never committed to 'latest' (never loaded)"
        else:
            continue
        _remove(path)
        removed.append(f"removed {path}: {why}")
    if removed:
        _fsync_dir(root)
    return removed


def _py_rng_to_json(st):
    version, internal, gauss = st
    return [version, list(internal), gauss]


def _py_rng_from_json(st):
    version, internal, gauss = st
    return (version, tuple(internal), gauss)


def verify(folder: str) -> dict:
    """Check ``folder`` against its manifest; return the manifest or raise ``CheckpointError``."""
    if not os.path.isdir(folder):
        raise CheckpointError(f"checkpoint {folder} does not exist")
    mpath = os.path.join(folder, MANIFEST)
    if not os.path.exists(mpath):
        raise CheckpointError(f"checkpoint {folder} is incomplete: it has no {MANIFEST} (the write was "
                              f"interrupted). Delete the folder, or point 'latest' at an earlier checkpoint.")
    try:
        with open(mpath) as f:
            manifest = json.load(f)
        files = manifest["files"]
    except (ValueError, KeyError) as e:
        raise CheckpointError(f"checkpoint {folder} has an unreadable {MANIFEST}: {e}") from e
    for fname, meta in files.items():
        p = os.path.join(folder, fname)
        if not os.path.exists(p):
            raise CheckpointError(f"checkpoint {folder} is incomplete: {fname} is missing")
        if os.path.getsize(p) != meta["bytes"]:
            raise CheckpointError(f"checkpoint {folder} is damaged: {fname} has {os.path.getsize(p)} bytes, "
                                  f"the manifest says {meta['bytes']}")
        if _sha256(p) != meta["sha256"]:
            raise CheckpointError(f"checkpoint {folder} is damaged: {fname} does not match its sha256")
    return manifest


def latest(root: str) -> str | None:
    """The newest checkpoint under ``root`` (the one ``latest`` names), verified; ``None`` if there
    is none at all. A ``latest`` that names a bad folder raises ``CheckpointError``."""
    pointer = os.path.join(root, "latest")
    if os.path.exists(pointer):
        with open(pointer) as f:
            name = f.read().strip()
        folder = os.path.join(root, name)
    else:
        names = sorted(n for n in os.listdir(root) if n.startswith("step-")) if os.path.isdir(root) else []
        if not names:
            return None
        folder = os.path.join(root, names[-1])
    verify(folder)
    return folder


def load(folder: str, *, model, optimizer, scheduler, rank: int = 0, world_size: int = 1) -> dict:
    """Restore model, optimizer, scheduler and this rank's RNG from ``folder`` (verified first).
    Returns the trainer state (``step``, ``data_position``, ``config``, ...)."""
    verify(folder)
    with open(os.path.join(folder, "trainer_state.json")) as f:
        state = json.load(f)
    model_state = {f"lm.{k}": v for k, v in load_weights(folder, state.get("tied")).items()}
    critic_path = os.path.join(folder, "critic.safetensors")
    if os.path.exists(critic_path):
        model_state.update(load_file(critic_path))
    set_model_state_dict(model, model_state, options=StateDictOptions(full_state_dict=True))

    flat = load_file(os.path.join(folder, "optimizer.safetensors"))
    optim_state: dict = {"state": {}, "param_groups": state["param_groups"]}
    for key, v in flat.items():
        pname, k = key.split("::", 1)
        optim_state["state"].setdefault(pname, {})[k] = v
    for group in optim_state["param_groups"]:
        if "betas" in group:
            group["betas"] = tuple(group["betas"])
    set_optimizer_state_dict(model, optimizer, optim_state, options=StateDictOptions(full_state_dict=True))
    scheduler.load_state_dict(state["scheduler"])

    if state["world_size"] == world_size:
        rng = load_file(os.path.join(folder, "rng.safetensors"))
        torch.set_rng_state(rng[f"rank{rank}.torch"])
        if f"rank{rank}.cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng[f"rank{rank}.cuda"])
        random.setstate(_py_rng_from_json(state["python_rng"][rank]))
    elif rank == 0:
        print(f"pyrl train: the checkpoint was written by {state['world_size']} ranks, this run has {world_size}: "
              "sampling will not repeat the original run's random draws", flush=True)
    return state
