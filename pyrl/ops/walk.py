"""The one chunk walk under every fused op, and the bodies it plugs in.

    for each chunk [s, e) of tokens (Plan.chunk_rows):
        z = head.logits(s, e)            GEMM (padded to Plan.pad_rows), [c, V] fp32 scratch
        step(s, e, z, z_ref)             the op's per-chunk maths: row body, chunk loss, KL, ...
        head.backprop(s, e)              when ``step`` turned z into d logits: the d_hidden and
                                         d_weight GEMMs (and d_bias), d_hidden reduced across
                                         vocabulary shards when the walk has a collective

Log-prob forward and backward, the one-pass policy loss, the exact KL and the vocabulary-parallel
log-probs all run on ``walk``; only their ``step`` differs. At most one chunk of logits (per head)
is alive at a time.

The vocabulary-blocked plan (``Plan.linear == "blocked"``, ``Blocks.walk``) turns the loops round:

    for each tile [s, e) of tokens (Plan.chunk_rows, thousands of rows):
        for each block [c0, c1) of the vocabulary (Plan.block_cols):
            z = h[s:e] @ W[c0:c1].T      GEMM into one reused [rows, block] fp32 buffer
            step(s, e, c0, c1, z)        forward: merge the block's row stats (online log-sum-exp);
                                         backward: z -> d logits, then d_hidden[s:e] += dz @ W[c0:c1]
                                         and d_weight[c0:c1] += dz.T @ h[s:e]

Every GEMM has a large M, N and K (no chunk of a few dozen rows re-streaming the whole head), and
the tile of logits stays small whatever the batch: four GEMMs in all (forward's is recomputed in
backward) against the chunk walk's three, which docs/scaling.md weighs. The bodies:

* ``Head``: the GEMMs of one walk, with ``gemm="acc"`` (operands in the accumulation dtype: the
  reference and CPU; fp64 stays fp64) or ``"lowp"`` (bf16/fp16 operands on the tensor cores, fp32
  logits out of cuBLAS, ``d logits`` rounded to the input dtype for the two gradient GEMMs as
  flash-attention does with P, ``d_weight`` accumulated in the weight's dtype, rounded once per
  chunk: an fp32 accumulator would be 2.5 GB at V=151936, H=4096).
* row bodies (``rows_body``): ``TorchRows`` (``pyrl.kernels.reference``), ``CppRows`` (the C++
  ops) and Triton's ``LogprobRows``, all with the contract in ``pyrl.kernels.reference``.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch

from pyrl.kernels.reference import RowStats, TorchRows, acc_dtype, merge_stats
from pyrl.ops.plan import Plan

__all__ = ["Head", "walk", "Blocks", "block_targets", "merge_block_", "rows_body", "fused_kernel", "CppRows",
           "scale_forward_grads"]


class CppRows:
    """``torch.ops.pyrl.logprobs_fwd/bwd(_)`` and ``sampler_cutoff`` (csrc/logprobs_cpu.cpp), CPU."""

    @staticmethod
    def cutoff(logits, p, sort_top_p: bool = False):
        """The kept-set thresholds (``TorchRows.cutoff``); top-p by the threshold search, or by a sort
        of each row with ``sort_top_p`` (the slower method, kept for the benchmark that chose)."""
        if not p.truncates:
            return None
        return torch.ops.pyrl.sampler_cutoff(logits, float(p.temperature), p.top_k or 0,
                                             1.0 if p.top_p is None else p.top_p, p.min_p or 0.0,
                                             p.sampler_order == "vllm", sort_top_p)

    @staticmethod
    def stats(logits, targets, p, tau=None):
        """One vocabulary block's ``RowStats`` (``TorchRows.stats``; a target id outside the block is 0 here)."""
        if tau is not None:
            raise ValueError("CppRows.stats: truncated rows are never split into vocabulary blocks")
        return RowStats(*torch.ops.pyrl.logprobs_stats(logits, targets, float(p.temperature), int(p.ignore_index),
                                                       bool(p.need_entropy)))

    @staticmethod
    def fwd(logits, targets, p, tau=None):
        return torch.ops.pyrl.logprobs_fwd(logits, targets, float(p.temperature), int(p.ignore_index),
                                           bool(p.need_entropy), tau)

    @staticmethod
    def bwd(logits, targets, lse, ent, g_logp, g_ent, p, out=None, tau=None):
        args = (g_logp, g_ent, logits, targets, lse, ent, float(p.temperature), int(p.ignore_index), tau)
        if out is not None:
            if out is not logits:
                raise ValueError("CppRows.bwd writes its gradient over the logits only (out=logits)")
            torch.ops.pyrl.logprobs_bwd_(*args)
            return logits
        return torch.ops.pyrl.logprobs_bwd(*args)


def _triton():
    from pyrl import kernels  # lazy: Triton costs start-up time and memory on CPU-only paths

    return kernels


def rows_body(backend: str):
    """The row body of a plan's backend."""
    if backend == "torch":
        return TorchRows
    if backend == "cpp":
        return CppRows
    return _triton().LogprobRows


def fused_kernel():
    """Triton's single fused LM-head kernel (``Plan.linear == "kernel"``)."""
    return _triton().FusedLinear


# The CPU chunk walk's logits GEMM in column blocks this wide (a 14.7 MB slice of a 896-wide fp32
# head, inside a 32 MB L3): at 96 rows x 896 x 151936 fp32 on 2 EPYC cores, 4.9 s per 2048 rows
# against 5.7-8.5 s for one GEMM over all of V (2048 columns: 5.9 s; 8192: 5.6 s). Fixed, never
# sized from the batch, so a logit's rounding does not depend on the rest of the batch.
LOGITS_COL_BLOCK = 4096

# Whether this torch's CUDA GEMMs take out_dtype (16-bit operands, fp32 result): unknown until the first call.
_OUT_DTYPE = {"mm": None, "addmm": None}


def _with_out_dtype(kind: str, a: torch.Tensor, call: Callable):
    """``call()`` (a GEMM with ``out_dtype=torch.float32``) on CUDA where this torch has it, else None."""
    if _OUT_DTYPE[kind] is False or not a.is_cuda:
        return None
    try:
        out = call()
    except torch.cuda.OutOfMemoryError:
        raise  # a real failure, not a missing feature: never fall back to widening the weight
    except (TypeError, RuntimeError, NotImplementedError):
        _OUT_DTYPE[kind] = False
        return None
    _OUT_DTYPE[kind] = True
    return out


def _mm_fp32(a, b):
    """``a @ b`` with an fp32 result from 16-bit operands: cuBLAS accumulates in fp32 and writes fp32
    (``out_dtype``, CUDA); elsewhere, or on a torch without it, the operands are widened first."""
    out = _with_out_dtype("mm", a, lambda: torch.mm(a, b, out_dtype=torch.float32))
    return a.float() @ b.float() if out is None else out


def _reused(owner, attr: str, shape, like: torch.Tensor, dtype=None) -> torch.Tensor:
    """A ``shape`` view into the buffer ``owner.<attr>``, which is (re)allocated like ``like`` only when
    missing or too small, the old one dropped first: one buffer per walk, not one per chunk or block."""
    n = math.prod(shape)
    buf = getattr(owner, attr)
    if buf is None or buf.numel() < n:
        setattr(owner, attr, None)
        buf = like.new_empty(n, dtype=dtype or like.dtype)
        setattr(owner, attr, buf)
    return buf[:n].view(shape)


def _addmm_fp32_(acc, a, b):
    """``acc += a @ b`` for an fp32 ``acc`` and 16-bit operands: one cuBLAS GEMM accumulating into
    ``acc`` (``out_dtype``, CUDA); else the fp32 product of ``_mm_fp32``, added."""
    out = _with_out_dtype("addmm", a, lambda: torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc))
    return acc.add_(_mm_fp32(a, b)) if out is None else out


class Head:
    """The GEMMs of one walk over ``hidden [N, H]`` and an LM head ``weight [V, H]`` (+ ``bias``),
    as ``Plan.gemm`` and ``Plan.pad_rows`` say (``Head.of(plan, ...)``).

    ``need``: which of (d_hidden, d_weight, d_bias) ``backprop`` accumulates. ``reduce_d_hidden``:
    a collective applied to each chunk's d_hidden before it is stored (vocabulary-parallel: the sum
    over the shards); with it, d_hidden is computed even where this rank does not need it, because
    the other ranks need this shard's share.
    """

    def __init__(self, hidden, weight, bias, *, gemm: str, pad_rows: int, need=(False, False, False),
                 reduce_d_hidden: Optional[Callable] = None):
        self.gemm, self.pad_rows = gemm, pad_rows
        acc = acc_dtype(hidden.dtype)
        lowp = self.gemm == "lowp"
        self.hidden, self.weight, self.bias = hidden, weight, bias
        self.w = weight if lowp else weight.to(acc)
        self.b = None if bias is None else bias.to(acc)
        need_h, need_w, need_b = need
        self.reduce_d_hidden = reduce_d_hidden
        self.d_hidden = torch.zeros_like(hidden) if need_h else None
        # "acc": the first chunk's d_weight GEMM writes the buffer (no zero fill, no read of zeros)
        self.d_weight = None if not need_w else (torch.zeros_like(weight, dtype=self.w.dtype) if lowp else
                                                 torch.empty_like(weight, dtype=self.w.dtype))
        self._d_weight_written = lowp
        self.d_bias = torch.zeros(weight.shape[0], dtype=acc, device=weight.device) if need_b and bias is not None \
            else None
        self._full = self._h = None
        self._buf = None  # "acc": one logits buffer, reused by every chunk of the walk
        self._d16 = None  # "lowp": one 16-bit d-logits buffer, reused likewise (``d_out``)
        self._dz = None   # the current chunk's d logits in it, once ``d_out`` handed it out
        self._col_block = LOGITS_COL_BLOCK if weight.device.type == "cpu" else 0

    @classmethod
    def of(cls, plan: Plan, hidden, weight, bias, **kw) -> "Head":
        return cls(hidden, weight, bias, gemm=plan.gemm, pad_rows=plan.pad_rows, **kw)

    def logits(self, s: int, e: int) -> torch.Tensor:
        """The chunk's logits ``[e - s, V]``: the first rows of a GEMM over ``h`` zero-padded to a
        multiple of ``pad_rows`` rows (kept for ``backprop``, which may overwrite it)."""
        self.release()  # drop the last chunk before the next is allocated
        h = self.hidden[s:e] if self.gemm == "lowp" else self.hidden[s:e].to(self.w.dtype)
        hp = _padded(h, self.pad_rows)
        if self.gemm == "lowp":
            full = _mm_fp32(hp, self.w.t())
            full = full.add_(self.b) if self.b is not None else full
        else:
            full = self._acc_logits(hp)
        self._full, self._h = full, h
        return full[: e - s]

    def _acc_logits(self, hp: torch.Tensor) -> torch.Tensor:
        """``hp @ w.T (+ b)`` into the walk's one buffer (allocated by the first, largest chunk: no
        allocation, page faults or freed medium blocks for the C allocator to keep per chunk). On CPU
        in column blocks of ``LOGITS_COL_BLOCK``: each block of the head stays in the last-level cache
        while the chunk's rows run through it, where one GEMM over all of V re-reads the head from
        memory in MKL's own panels (see LOGITS_COL_BLOCK)."""
        rows, V = hp.shape[0], self.w.shape[0]
        full = _reused(self, "_buf", (rows, V), hp)
        step = self._col_block or V
        for c0 in range(0, V, step):
            c1 = min(V, c0 + step)
            if self.b is not None:
                torch.addmm(self.b[c0:c1], hp, self.w[c0:c1].t(), out=full[:, c0:c1])
            else:
                torch.mm(hp, self.w[c0:c1].t(), out=full[:, c0:c1])
        return full

    def d_out(self, z: torch.Tensor) -> torch.Tensor:
        """Where a ``step`` has the row body write the chunk's d logits: over the logits ``z`` ("acc"),
        or ("lowp") the 16-bit buffer the gradient GEMMs read, so no fp32 d logits are written and
        no cast pass runs. A step that writes over ``z`` instead is cast in ``backprop``."""
        if self.gemm != "lowp":
            return z
        self._dz = _reused(self, "_d16", self._full.shape, self._full, self.w.dtype)
        return self._dz[: z.shape[0]]

    def backprop(self, s: int, e: int) -> None:
        """Accumulate the chunk's gradients from its d logits: in its logits buffer, or in the
        ``d_out`` buffer (the padding rows are scratch and zeroed here)."""
        full, h, rows = self._full, self._h, e - s
        if self._dz is not None:
            full = self._dz
        if full.shape[0] != rows:
            full[rows:] = 0
        dz = full[:rows]
        if self.d_bias is not None:
            self.d_bias += dz.sum(0, dtype=self.d_bias.dtype)
        if self.gemm == "lowp":
            dz16 = full.to(self.w.dtype)
            want_dh = self.d_hidden is not None or self.reduce_d_hidden is not None
            dh = (dz16 @ self.w)[:rows] if want_dh else None
            if self.d_weight is not None:
                self.d_weight.addmm_(dz16[:rows].t(), h)
        else:
            dh = None
            if self.d_hidden is not None or self.reduce_d_hidden is not None:
                # As (W.T @ full.T).T over the padded rows: with few rows and a large V, MKL streams W
                # through this layout ~1.35x faster than full @ W (87 vs 117 ms at 48 x 151936 x 896
                # fp32 on 2 EPYC cores), and the padding keeps the GEMM's rounding batch-invariant.
                dh = torch.mm(self.w.t(), full.t()).t()[:rows]
            if self.d_weight is not None and self._d_weight_written:
                self.d_weight.addmm_(dz.t(), h)
            elif self.d_weight is not None:
                torch.mm(dz.t(), h, out=self.d_weight)
                self._d_weight_written = True
        if dh is not None:
            self._store_d_hidden(s, e, dh)
        self.release()

    def release(self) -> None:
        """Let the current chunk's buffers go."""
        self._full = self._h = self._dz = None

    def skip(self, s: int, e: int) -> None:
        """A chunk with no gradient: nothing to do, unless d_hidden is reduced across ranks (every
        rank must join each collective, with zeros)."""
        if self.reduce_d_hidden is not None:
            acc = torch.float32 if self.gemm == "lowp" else self.w.dtype
            self._store_d_hidden(s, e, self.hidden.new_zeros(e - s, self.hidden.shape[1], dtype=acc))

    def _store_d_hidden(self, s, e, dh):
        if self.reduce_d_hidden is not None:
            dh = self.reduce_d_hidden(dh.contiguous())
        if self.d_hidden is not None:
            self.d_hidden[s:e] = dh.to(self.hidden.dtype)

    def grads(self):
        """(d_hidden, d_weight, d_bias) in the dtypes of hidden, weight and bias (None if not needed)."""
        if self.d_weight is not None and not self._d_weight_written:  # no chunk had a gradient
            self.d_weight.zero_()
            self._d_weight_written = True
        return _as_inputs(self.d_hidden, self.d_weight, self.d_bias, self.weight, self.bias)


def _padded(h: torch.Tensor, pad_rows: int) -> torch.Tensor:
    """``h`` with zero rows appended up to a multiple of ``pad_rows`` (the GEMMs' batch invariance)."""
    pad = -h.shape[0] % pad_rows
    return torch.cat([h, h.new_zeros(pad, h.shape[1])]) if pad else h


def _as_inputs(d_hidden, d_weight, d_bias, weight, bias):
    """(d_hidden, d_weight, d_bias) in the dtypes of weight and bias (None where not computed)."""
    return (d_hidden, None if d_weight is None else d_weight.to(weight.dtype),
            None if d_bias is None else d_bias.to(bias.dtype))


def scale_forward_grads(grads, g_loss: torch.Tensor) -> list:
    """The gradients a one-pass walk formed in forward (the op's own buffers), times the upstream
    gradient of its scalar loss, in place; returned as they are when it is 1 (``loss.backward()``),
    which spares a pass over the whole d_weight."""
    if bool(g_loss == 1):
        return list(grads)
    return [None if g is None else g.mul_(g_loss.to(g.dtype)) for g in grads]


def walk(head: Head, chunk_rows: int, step: Callable, *, ref: Optional[Head] = None,
         active: Optional[torch.Tensor] = None):
    """Run ``step(s, e, z, z_ref)`` on every token chunk; where it returns True (``z`` now holds
    d logits), ``head.backprop`` consumes the chunk. ``active`` [N] bool: chunks with no active
    row get no GEMM at all (their gradient is exactly zero). Returns ``head.grads()``."""
    n = head.hidden.shape[0]
    for s in range(0, n, chunk_rows):
        e = min(n, s + chunk_rows)
        if active is not None and not bool(active[s:e].any()):
            head.skip(s, e)
            continue
        z = head.logits(s, e)
        z_ref = None if ref is None else ref.logits(s, e)
        if step(s, e, z, z_ref):
            head.backprop(s, e)
        del z, z_ref  # one chunk of logits alive at a time, not two
        head.release()
        if ref is not None:
            ref.release()
    return head.grads()


def block_targets(targets: torch.Tensor, c0: int, c1: int, ignore_index: int) -> torch.Tensor:
    """Targets as ids local to the vocabulary block ``[c0, c1)``: ``y - c0`` inside it; a valid target
    elsewhere becomes an id >= the block's width (valid, not here, never equal to ``ignore_index``);
    ignored rows keep ``ignore_index``. The row bodies take these (``TorchRows`` contract)."""
    width = c1 - c0
    elsewhere = width if ignore_index != width else width + 1
    local = targets - c0
    valid = targets != ignore_index
    local = torch.where(valid & (local >= 0) & (local < width), local, elsewhere)
    return torch.where(valid, local, ignore_index)


def merge_block_(rows, st: RowStats, z: torch.Tensor, targets: torch.Tensor, c0: int, c1: int, p) -> None:
    """Merge the stats of the vocabulary block ``[c0, c1)`` of some rows (their logits ``z``, global
    ``targets``) into those rows' running ``st``, in place (docs/formulas.md §10.1): the row body's
    own one-launch ``merge_block_`` where it has one (Triton), else its ``stats`` on block-local ids
    and ``merge_stats``."""
    fused = getattr(rows, "merge_block_", None)
    if fused is not None:
        fused(st, z, targets, c0, p)
        return
    here = rows.stats(z, block_targets(targets, c0, c1, p.ignore_index), p)
    for mine, new in zip(st, merge_stats(st, here)):
        mine.copy_(new)


class Blocks:
    """The GEMMs of the vocabulary-blocked plan (module docstring): ``hidden [N, H]`` in token tiles
    of ``tile_rows`` (each GEMM zero-padded to a multiple of ``pad_rows`` rows, for batch invariance
    as ``Head``), against blocks of ``block_cols`` rows of ``weight [V, H]`` (+ ``bias``). The block
    boundaries depend on ``block_cols`` alone, never on N, so a row's reduction order is the same in
    any batch. ``gemm`` as ``Head``: ``"acc"`` (operands in the accumulation dtype) or ``"lowp"``
    (16-bit operands on the tensor cores, fp32 logits, 16-bit d logits written by the row body
    straight into their own buffer (``d_out``), d_hidden accumulated in fp32 per tile, d_weight in
    the weight's dtype, rounded once per tile).

    ``need``: which of (d_hidden, d_weight, d_bias) a backward walk accumulates."""

    def __init__(self, hidden, weight, bias, *, tile_rows: int, block_cols: int, pad_rows: int, gemm: str = "acc",
                 need=(False, False, False)):
        acc = acc_dtype(hidden.dtype)
        self.lowp = gemm == "lowp"
        self.hidden, self.weight, self.bias = hidden, weight, bias
        self.tile_rows, self.block_cols, self.pad_rows = tile_rows, block_cols, pad_rows
        self.w = weight if self.lowp else weight.to(acc)
        self.b = None if bias is None else bias.to(acc)
        need_h, need_w, need_b = need
        self.need_h = need_h
        self.d_hidden = torch.zeros_like(hidden) if need_h else None
        self.d_weight = torch.zeros_like(self.w) if need_w else None
        self.d_bias = torch.zeros(weight.shape[0], dtype=acc, device=weight.device) if need_b and bias is not None \
            else None
        self._buf = self._d16 = None  # the walk's fp32 logits ("acc") and 16-bit d logits ("lowp") buffers
        self._z = self._dz = None     # the current block's logits, and its d logits once ``d_out`` gave them

    @classmethod
    def of(cls, plan: Plan, hidden, weight, bias, **kw) -> "Blocks":
        return cls(hidden, weight, bias, tile_rows=plan.chunk_rows, block_cols=plan.block_cols, pad_rows=plan.pad_rows,
                   gemm=plan.gemm, **kw)

    def d_out(self, z: torch.Tensor) -> torch.Tensor:
        """Where a backward ``step`` has the row body write the block's d logits: over ``z`` itself
        ("acc"), or ("lowp") the 16-bit buffer the gradient GEMMs read, so no fp32 d logits are
        written and no cast pass runs (a step that writes over ``z`` instead is cast here)."""
        if not self.lowp:
            return z
        self._dz = _reused(self, "_d16", self._z.shape, self._z, self.w.dtype)
        return self._dz[: z.shape[0]]

    def _logits(self, hp: torch.Tensor, c0: int, c1: int):
        """The block's fp32 logits ``hp @ W[c0:c1].T (+ b)``, in the walk's buffer ("acc") or a new
        tensor from cuBLAS ("lowp")."""
        if self.lowp:
            z = _mm_fp32(hp, self.w[c0:c1].t())
        else:
            z = _reused(self, "_buf", (hp.shape[0], c1 - c0), hp)
            torch.mm(hp, self.w[c0:c1].t(), out=z)
        if self.b is not None:
            z += self.b[c0:c1]
        return z

    def walk(self, step: Callable, active: Optional[torch.Tensor] = None):
        """Run ``step(s, e, c0, c1, z)`` on every (token tile, vocabulary block); ``z`` is the tile's
        ``[e - s, c1 - c0]`` fp32 logits. Where ``step`` returns True it has written d logits (into
        ``d_out(z)``) and the block's gradient GEMMs consume them. ``active`` [N] bool: tiles with no
        active row are skipped (their gradient is exactly zero). Returns the gradients as
        ``Head.grads``."""
        n, V = self.hidden.shape[0], self.w.shape[0]
        for s in range(0, n, self.tile_rows):
            e = min(n, s + self.tile_rows)
            if active is not None and not bool(active[s:e].any()):
                continue
            rows = e - s
            h = self.hidden[s:e] if self.lowp else self.hidden[s:e].to(self.w.dtype)
            hp = _padded(h, self.pad_rows)
            pad = hp.shape[0] - rows
            dh = None
            if self.need_h:
                dh = hp.new_zeros(hp.shape, dtype=torch.float32 if self.lowp else hp.dtype)
            for c0 in range(0, V, self.block_cols):
                c1 = min(V, c0 + self.block_cols)
                z = dz = self._z = self._dz = None  # "lowp": the last block's logits go before the next's exist
                z = self._z = self._logits(hp, c0, c1)
                if not step(s, e, c0, c1, z[:rows]):
                    continue
                dz = z if self._dz is None else self._dz  # d logits over z, or in d_out's buffer
                if pad:
                    dz[rows:] = 0
                if self.lowp and dz is z:
                    dz = z.to(self.w.dtype)
                if self.d_bias is not None:
                    self.d_bias[c0:c1] += dz[:rows].sum(0, dtype=self.d_bias.dtype)
                if dh is not None:  # all padded rows: the rounding of a row is batch-invariant
                    if self.lowp:
                        _addmm_fp32_(dh, dz, self.w[c0:c1])
                    else:
                        dh.addmm_(dz, self.w[c0:c1])
                if self.d_weight is not None:
                    self.d_weight[c0:c1].addmm_(dz[:rows].t(), h)
            if dh is not None:
                self.d_hidden[s:e] = dh[:rows].to(self.hidden.dtype)
        self._buf = self._d16 = self._z = self._dz = None
        return _as_inputs(self.d_hidden, self.d_weight, self.d_bias, self.weight, self.bias)
