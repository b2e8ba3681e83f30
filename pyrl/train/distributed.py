"""Data parallelism with ``torch.distributed`` as ``torchrun`` sets it up: DDP over gloo on CPU,
FSDP2 ``fully_shard`` on CUDA. One process per device; nothing here is a framework.

    dist = setup("auto")                 # reads RANK / WORLD_SIZE / LOCAL_RANK (torchrun)
    model = wrap(policy, dist)           # the module itself when world_size == 1
    with grad_sync(model, last_micro):   # skip the all-reduce on all but the last micro-batch
        loss.backward()
"""
from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as tdist

from pyrl._validate import check_number

__all__ = ["DistInfo", "launch_info", "setup", "wrap", "unwrap", "is_fsdp", "grad_sync", "gathered_for_generation",
           "all_reduce_sum", "all_gather_object", "barrier", "any_rank", "teardown"]


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    local_world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def launch_info() -> tuple[int, int, int, int]:
    """``(rank, world_size, local_rank, local_world_size)`` as torchrun describes this process
    (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``; alone: ``(0, 1, 0, 1)``). The
    one place the trainer reads them."""
    env = os.environ
    return (int(env.get("RANK", "0")), int(env.get("WORLD_SIZE", "1")), int(env.get("LOCAL_RANK", "0")),
            int(env.get("LOCAL_WORLD_SIZE", "1")))


def setup(device: str = "auto", timeout_s: float = 900.0) -> DistInfo:
    """Join the process group torchrun describes (gloo on CPU, NCCL on CUDA), or run alone.
    ``timeout_s``: how long start-up and every collective may wait for the other ranks before
    raising (a crashed or stuck rank then ends the job instead of hanging it)."""
    timeout_s = check_number("timeout_s (dist_timeout_s)", timeout_s, low=0, low_open=True,
                             expect="a finite number of seconds > 0")
    rank, world, local, local_world = launch_info()
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("device='cuda' but torch.cuda.is_available() is False")
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    elif device == "cpu":
        dev = torch.device("cpu")
    else:
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}")
    if world > 1 and not tdist.is_initialized():
        tdist.init_process_group("nccl" if dev.type == "cuda" else "gloo", rank=rank, world_size=world,
                                 timeout=datetime.timedelta(seconds=timeout_s),
                                 **({"device_id": dev} if dev.type == "cuda" else {}))
    return DistInfo(rank, world, local, dev, local_world)


def teardown() -> None:
    if tdist.is_initialized():
        tdist.destroy_process_group()


def wrap(policy: torch.nn.Module, dist: DistInfo, kind: str = "auto") -> torch.nn.Module:
    """``kind="fsdp"``: FSDP2 ``fully_shard`` on each decoder layer, then the root; ``"ddp"``:
    ``DistributedDataParallel``; ``"auto"``: FSDP2 on CUDA, DDP on CPU. Alone: ``policy`` itself."""
    if kind not in ("auto", "ddp", "fsdp"):
        raise ValueError(f"data_parallel must be 'auto', 'ddp' or 'fsdp', got {kind!r}")
    if not dist.distributed:
        return policy
    if kind == "fsdp" or (kind == "auto" and dist.device.type == "cuda"):
        from torch.distributed.fsdp import fully_shard

        from pyrl.train.models import backbone

        stacks = [backbone(policy.lm)] + ([policy.critic_backbone] if getattr(policy, "critic_backbone", None) else [])
        for stack in stacks:
            for layer in stack.layers:
                fully_shard(layer)
        fully_shard(policy)
        return policy
    from torch.nn.parallel import DistributedDataParallel as DDP

    # The value head gets no gradient in the supervised warm-up: let DDP tolerate that.
    return DDP(policy, find_unused_parameters=getattr(policy, "value_head", None) is not None)


def is_fsdp(model: torch.nn.Module) -> bool:
    return hasattr(model, "reshard") and hasattr(model, "unshard")


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "module", model)


@contextlib.contextmanager
def grad_sync(model: torch.nn.Module, enabled: bool):
    """Gradient accumulation: synchronise gradients only when ``enabled`` (the last micro-batch)."""
    if hasattr(model, "no_sync") and not enabled:  # DDP
        with model.no_sync():
            yield
    elif hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(enabled)
        yield
    else:
        yield


@contextlib.contextmanager
def gathered_for_generation(model: torch.nn.Module):
    """FSDP2 keeps the root's parameters (embeddings, LM head) sharded outside its forward;
    ``generate`` calls the LM directly, so gather them around it (layers gather themselves)."""
    if is_fsdp(model):
        # The root must be initialised before any layer runs on its own, or that layer would
        # make itself a root (FSDP2 normally does this in the root's first forward).
        model._get_fsdp_state()._lazy_init()
        model.unshard()
        try:
            yield
        finally:
            model.reshard()
    else:
        yield


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if tdist.is_initialized() and tdist.get_world_size() > 1:
        tdist.all_reduce(t, op=tdist.ReduceOp.SUM)
    return t


def all_gather_object(obj) -> list:
    if not (tdist.is_initialized() and tdist.get_world_size() > 1):
        return [obj]
    out = [None] * tdist.get_world_size()
    tdist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if tdist.is_initialized() and tdist.get_world_size() > 1:
        tdist.barrier()


def any_rank(flag: bool) -> bool:
    """Whether ``flag`` is true on any rank (collective; the flag itself when alone)."""
    if not (tdist.is_initialized() and tdist.get_world_size() > 1):
        return bool(flag)
    t = torch.tensor([1.0 if flag else 0.0])
    if tdist.get_backend() == "nccl":
        t = t.cuda()
    tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
    return bool(t.item() > 0)
