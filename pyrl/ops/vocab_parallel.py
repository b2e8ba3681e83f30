"""Per-token log-prob and entropy with the LM head split by vocabulary across ranks
(docs/formulas.md §1, §11).

Each rank of a ``torch.distributed`` process group holds a contiguous slice of the LM head,
``weight[V_r, H]`` (and ``bias[V_r]``), in rank order: rank ``r`` owns the global ids
``[offset_r, offset_r + V_r)`` with ``offset_r = V_0 + ... + V_{r-1}``. Slices may differ in size.
``hidden [..., H]`` and ``targets [...]`` (GLOBAL ids) are the same on every rank. Every rank
returns the full-vocabulary ``logp`` (and ``entropy``) of every token; the values are bitwise
identical on all ranks (they are computed from the same all-reduced statistics).

Collectives (all on ``group``; every rank must make the same calls in the same order):

* once per call: one ``all_gather`` of a tiny int64 tensor (each rank's ``V_r``, ``N``, ``H``,
  dtype, grad flags, ``chunk_bytes``), so each rank learns its vocabulary offset, the global ``V``
  and a common chunk size, and mismatched calls raise the same clear error on every rank instead
  of hanging;
* forward, per chunk of tokens: each rank computes its shard's row stats with the reference row
  body (``pyrl.kernels.reference.TorchRows.stats``: local max ``m_r``, ``s_r``, ``t_r`` relative
  to it, and the target logit where this rank owns the target), then one ``all_reduce(MAX)`` of
  ``m_r`` and one ``all_reduce(SUM)`` of ONE packed ``[3, chunk]`` tensor of the stats rescaled to
  the global max ``m``: ``s_r exp(m_r - m)``, ``exp(m_r - m) (t_r + s_r (m_r - m))`` and ``z_y``
  (0 on the ranks that do not own it). ``TorchRows.finish`` then forms ``lse = m + log s``,
  ``logp = z_y - lse``, ``entropy = log s - t / s``: the same maths as one process, no copy;
* backward, per chunk: one ``all_reduce(SUM)`` (fp32, or fp64 for fp64 inputs) of the local
  contribution ``dz_r @ W_r`` to ``d_hidden``.

Gradients: ``d_weight``/``d_bias`` are this rank's slice (fp32 accumulation, returned in the input
dtype). **Each rank's ``d_hidden`` is the FULL gradient** (already summed over the vocabulary
shards inside backward): do not all-reduce it again across this group (e.g. a Megatron-style
"copy to tensor-parallel region" in front of the LM head would double-count it). Data-parallel
averaging across *other* groups is unaffected.

This is the chunked plan of ``pyrl.ops.logprobs`` (the same walk and autograd Function) with a
collective hook, on the PyTorch reference body on every device (CPU with gloo, CUDA with NCCL);
``backend`` accepts ``"auto"`` and ``"torch"`` only.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from pyrl._validate import FLOAT_DTYPES, check_bool, check_chunk_bytes, check_linear_args, check_same_device, \
    check_targets
from pyrl.kernels.reference import RowParams, RowStats, rescale_stats
from pyrl.ops.logprobs import LinearCall, run_linear_logprobs
from pyrl.ops.plan import DEFAULT_CHUNK_BYTES, make_plan, resolve_chunk_bytes

__all__ = ["vocab_parallel_linear_logprobs", "VocabShards"]


def _check_group(group):
    if not dist.is_available():
        raise RuntimeError("vocab_parallel_group needs torch.distributed, which this PyTorch build lacks")
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"vocab_parallel_group must be a torch.distributed.ProcessGroup (e.g. dist.group.WORLD "
                        f"or dist.new_group(...)), got {type(group).__name__}")
    if not dist.is_initialized():
        raise RuntimeError("vocab_parallel_group given but torch.distributed is not initialized; "
                           "call torch.distributed.init_process_group first")
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError("this process is not a member of vocab_parallel_group")
    return rank, dist.get_world_size(group)


def _gather_meta(group, world, device, *, v_local, n, h, dtype, grad_needed, need_h, chunk_bytes):
    """One all_gather of a tiny tensor: every rank sees every rank's call signature."""
    mine = torch.tensor([v_local, n, h, FLOAT_DTYPES.index(dtype), int(grad_needed), int(need_h), chunk_bytes],
                        dtype=torch.int64, device=device)
    parts = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(parts, mine, group=group)
    meta = torch.stack(parts).cpu()  # [world, 7]
    # Every rank runs the same checks on the same gathered data, so all raise together (no hang).
    for col, what in ((1, "number of tokens N (hidden.shape[:-1] numel)"), (2, "hidden size H"),
                      (3, "dtype of hidden/weight"),
                      (4, "autograd need (some input requires grad, grad mode on)")):
        if not bool((meta[:, col] == meta[0, col]).all()):
            raise ValueError(f"vocab-parallel ranks disagree on the {what}: per rank {meta[:, col].tolist()}; "
                             "every rank must call with the same hidden/targets and the same grad setup")
    sizes = meta[:, 0].tolist()
    need_h_any = bool(meta[:, 5].any())
    return sizes, need_h_any, int(meta[:, 6].min()), max(sizes)


class VocabShards:
    """The collective hook of the chunk walk for a vocabulary-split head (module docstring)."""

    def __init__(self, group, need_d_hidden: bool):
        self.group, self.need_d_hidden = group, need_d_hidden

    def merge(self, st: RowStats) -> RowStats:
        m = st.m.clone()
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=self.group)
        packed = torch.stack([*rescale_stats(st, m), st.zy])
        dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=self.group)
        return RowStats(m, packed[0], packed[1], packed[2])

    def reduce_d_hidden(self, dh: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(dh, op=dist.ReduceOp.SUM, group=self.group)
        return dh


def vocab_parallel_linear_logprobs(hidden, weight, targets, *, group, bias=None, temperature=1.0,
                                   ignore_index=-100, return_entropy=False, backend="auto",
                                   chunk_bytes: int = DEFAULT_CHUNK_BYTES, sampler: str = ""):
    """``fused_linear_logprobs`` with the LM head split by vocabulary across ``group``'s ranks.

    Args:
        hidden: ``[..., H]`` fp32/bf16/fp16/fp64, the same on every rank.
        weight: ``[V_r, H]``, this rank's contiguous vocabulary slice (rank order; sizes may differ).
        targets: ``[...]`` int64 GLOBAL ids in ``[0, V)`` (``V = sum_r V_r``) or ``ignore_index``,
            the same on every rank.
        group: the ``torch.distributed.ProcessGroup`` the head is split across.
        bias: optional ``[V_r]``, this rank's slice.
        temperature: > 0, divides the logits.
        return_entropy: also return each token's (full-vocabulary) entropy.
        backend: ``"auto"`` or ``"torch"`` (this path always runs the PyTorch body plus collectives).
        chunk_bytes: bound on one chunk of fp32 local logits ``[chunk, V_r]``; the chunk size is
            computed from the largest slice and the smallest ``chunk_bytes`` over the ranks, so every
            rank runs the same number of chunks (``"auto"``: each rank's own free memory, then the
            smallest).
        sampler: the sampler's truncation as text (``RowParams.sampler_text``): refused, since a
            row's kept set needs the whole vocabulary (docs/formulas.md §1.1).

    Returns:
        ``logp [...]`` fp32 (fp64 for fp64 input), or ``(logp, entropy)``; identical on every rank.
        In backward, ``weight``/``bias`` get this rank's slice of the gradient and ``hidden`` gets
        the FULL gradient on every rank (already all-reduced over ``group``; do not reduce again).

    Every rank must call this with the same ``hidden``/``targets`` shapes and backpropagate through
    the outputs, as for any tensor-parallel op; mismatched shapes raise on every rank.
    """
    temperature = check_linear_args(hidden, weight, bias, temperature, ignore_index)
    check_bool("return_entropy", return_entropy)
    check_same_device(hidden=hidden, weight=weight, bias=bias, targets=targets)
    # "auto" from this rank's free memory; the ranks then agree on the smallest budget (_gather_meta)
    chunk_bytes = resolve_chunk_bytes(check_chunk_bytes(chunk_bytes), hidden.device)[0]
    # the plan's backend check runs before any collective, so a bad backend raises on every rank
    make_plan("fused_linear_logprobs", device=hidden.device, dtype=hidden.dtype, backend=backend,
              vocab_parallel=True, sampler=sampler)
    rank, world = _check_group(group)
    lead = hidden.shape[:-1]
    h2 = hidden.reshape(-1, hidden.shape[-1])
    grad_needed = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (hidden, weight, bias))
    sizes, need_h_any, chunk_bytes, v_max = _gather_meta(
        group, world, hidden.device, v_local=weight.shape[0], n=h2.shape[0], h=h2.shape[1], dtype=hidden.dtype,
        grad_needed=grad_needed, need_h=torch.is_grad_enabled() and hidden.requires_grad, chunk_bytes=chunk_bytes)
    vocab_start, vocab_total = sum(sizes[:rank]), sum(sizes)
    targets = check_targets("targets", targets, lead, weight.shape[0], ignore_index,
                            vocab_start=vocab_start, vocab_total=vocab_total).reshape(-1)
    # Local ids: this shard's targets in [0, V_r); a valid target another shard owns becomes an id
    # >= V_r (valid, but not here), never one that could equal ignore_index.
    v_local = weight.shape[0]
    elsewhere = v_local if ignore_index != v_local else v_local + 1
    local = targets - vocab_start
    valid = targets != ignore_index
    local = torch.where(valid & (local >= 0) & (local < v_local), local, elsewhere)
    local = torch.where(valid, local, ignore_index)
    # every rank plans with the same (largest) slice and the smallest chunk_bytes: the same chunks
    plan = make_plan("fused_linear_logprobs", device=hidden.device, dtype=hidden.dtype, n_rows=h2.shape[0],
                     vocab=v_max, backend=backend, chunk_bytes=chunk_bytes, vocab_parallel=True)
    call = LinearCall(plan, h2, weight, bias, local, RowParams(temperature, ignore_index, bool(return_entropy)),
                      lead)
    logp, ent = run_linear_logprobs(call, VocabShards(group, need_h_any))
    logp = logp.reshape(lead)
    return (logp, ent.reshape(lead)) if return_entropy else logp
