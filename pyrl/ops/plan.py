"""Which implementation an op call runs, decided in one place and returned as data.

Every public op validates its arguments, then calls ``make_plan`` once; the ``Plan`` it gets back
says everything the engine (``pyrl.ops.walk``) needs to run the call:

* ``backend``: the row body: ``"torch"`` (the plain-PyTorch reference, ``pyrl.kernels.reference``),
  ``"cpp"`` (``torch.ops.pyrl.logprobs_*``, csrc/logprobs_cpu.cpp) or ``"triton"``
  (``pyrl.kernels.rows``);
* ``linear``: how logits come to exist: ``"given"`` (``logprobs_from_logits``), ``"chunked"``
  (one GEMM per token chunk, then the row body, the chunk's logits dropped after use),
  ``"blocked"`` (the vocabulary-blocked walk, ``pyrl.ops.walk.Blocks``: large token tiles against
  blocks of ``block_cols`` vocabulary rows, row stats merged online; the CPU default when
  ``chunk_bytes`` holds fewer than ``CHUNKED_MIN_ROWS`` rows of logits, docs/formulas.md §10.1;
  on CUDA with 16-bit GEMMs, ``PYRL_LINEAR=blocked``: tiles of up to ``LOWP_MAX_TILE_ROWS`` tokens x
  blocks of ``LOWP_COLS_X_H / H`` columns)
  or ``"kernel"`` (Triton's single fused kernel, ``pyrl.kernels.fused_linear``: logits tiles never
  leave the chip);
* ``passes`` (the policy loss): ``"one"`` (gradients formed in forward, three GEMMs per chunk; only
  for token-separable losses on a chunked body) or ``"two"`` (log-probs first, loss on the whole
  batch, logits recomputed in backward), docs/formulas.md §10;
  the preference loss always takes ``"two"`` (a sequence's loss needs its whole sum), the
  distillation loss ``"one"`` (its divergence is per token; always a chunk walk over both heads,
  whose rows get ``1 / DISTILL_CHUNK_SHARE`` of ``chunk_bytes``, ``1 / DISTILL_CPP_CHUNK_SHARE``
  with the cpp backend's divergence kernel);
* ``gemm``: ``"acc"`` (GEMM operands in the accumulation dtype, fp32 or fp64) or ``"lowp"``
  (bf16/fp16 tensor-core GEMMs with fp32 output, CUDA);
* ``chunk_rows`` / ``pad_rows``: tokens per chunk (per tile, when blocked), and the multiple every
  chunk GEMM is padded to (batch invariance: a token's logits never depend on how many tokens share
  its chunk); ``block_cols``: the vocabulary block of the blocked plan (from ``chunk_bytes`` only,
  never from the batch, so a row's reduction order is the same in every batch);
* ``vocab_parallel``: the LM head is split by vocabulary across ranks (collectives per chunk);
* ``sampler``: the sampler's truncation (top-k / top-p / min-p, docs/formulas.md §1.1), or ``""``:
  each row's kept-set threshold is found by the row body on the chunk's full-vocabulary logits,
  so it rules out Triton's fused kernel (which never holds a whole row).

``make_plan`` is a pure function of its arguments and of the environment knobs, which only
``env_knobs`` reads, and, for ``chunk_bytes="auto"`` only, of the device's free memory
(``resolve_chunk_bytes``, docs/scaling.md section 8). ``pyrl.explain(op, *args, **kwargs)`` shows
the plan of a call as text.

| knob | values | effect |
|---|---|---|
| ``PYRL_TRITON_LINEAR`` | ``chunked`` \\| ``fused`` | the ``linear`` of ``backend="triton"`` (default: chunked for bf16/fp16 on CUDA, the fused kernel otherwise) |
| ``PYRL_PASSES`` | ``one`` \\| ``two`` | force the policy loss's plan (``one`` is refused where it cannot run) |
| ``PYRL_LINEAR`` | ``chunked`` \\| ``blocked`` | force the walk of the ``torch``/``cpp`` bodies and of Triton's chunked body (default: blocked on CPU when ``chunk_bytes`` holds fewer than 32 rows of logits, chunked elsewhere; ``blocked`` is refused where it cannot run) |
| ``PYRL_TRITON_CONFIG`` | a config name | pin one tiling of the fused Triton kernel (read by ``pyrl.kernels.fused_linear``) |
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from pyrl._backend import BACKENDS, resolve_backend

__all__ = ["Plan", "EnvKnobs", "env_knobs", "make_plan", "chunk_bytes_default", "resolve_chunk_bytes",
           "free_memory", "GEMM_ROW_QUANTUM", "DEFAULT_CHUNK_BYTES", "DEFAULT_CUDA_CHUNK_BYTES", "BLOCK_COLS",
           "AUTO_FREE_SHARE", "AUTO_MAX_CHUNK_BYTES"]

# Rows per chunk are chosen so one chunk of fp32 logits stays under this many bytes (CPU). 64 MiB is
# 96 rows at V=151936: the GRPO loss at 2048 x 896 x 151936 fp32 (2 EPYC cores) runs at 0.99-1.13x
# its three GEMMs alone (three runs) in 56 MB of working memory, against 1.19-1.28x in 28 MB at
# 32 MiB (48-row chunks) and 0.91-0.93x in 252 MB at 256 MiB (docs/scaling.md section 7).
DEFAULT_CHUNK_BYTES = 64 * 2**20
# On CUDA a chunk must be large for the GEMMs to fill the GPU: 160 MB of fp32 logits is 256 rows at
# V=151936 (with the chunk's bf16 copy, ~240 MB of working memory).
DEFAULT_CUDA_CHUNK_BYTES = 160 * 2**20
# chunk_bytes="auto", the memory-budget knob: 1/AUTO_FREE_SHARE of the memory free on the device
# (a CUDA chunk holds its fp32 logits and their 16-bit copy, ~1.5x chunk_bytes), rounded down to a
# power of two (a token's chunking, hence its bits, changes only when free memory halves or doubles),
# never below the default and at most AUTO_MAX_CHUNK_BYTES: on CPU 256 MiB (0.90-1.02x the GEMM floor
# at 2048 x 896 x 151936 fp32 in 253 MB, the 64 MiB default 0.87-1.13x in 56 MB; docs/scaling.md
# section 7: more rows buy little there); on CUDA
# 4 GiB (a lowp chunk is at most 4096 rows, 2.5 GB of logits at V=151936).
AUTO_FREE_SHARE = 8
AUTO_MAX_CHUNK_BYTES = {"cpu": 256 * 2**20, "cuda": 4 * 2**30}
# Batch invariance of the GEMMs. A BLAS may give a row of ``h @ W.T`` other last bits depending on
# how many rows the call has: MKL (PyTorch's x86 BLAS) does whenever M is not a multiple of 4 (its
# edge kernels sum in another order). Every "acc" chunk GEMM therefore runs on a multiple of
# GEMM_ROW_QUANTUM rows, zero-padding the last chunk, so a token's logits (and its log-prob,
# entropy and d_hidden) are bitwise the same whatever else is in the batch. 16 covers microkernel
# heights 1, 2, 4, 8 and 16. (The "lowp" GEMMs are all padded to the full chunk instead.)
GEMM_ROW_QUANTUM = 16
_LOWP = (torch.bfloat16, torch.float16)
# The vocabulary block of the blocked plan: BLOCK_COLS columns, fewer only when chunk_bytes cannot
# hold MIN_TILE_ROWS rows of them. (2048 x 896 fp32 is a 7 MB slice of the head, and a tile of 2048
# tokens x 2048 columns is 16 MB: both stay in a 32 MB L3 between the block's GEMMs.)
BLOCK_COLS = 2048
MIN_TILE_ROWS = 256
# The blocked plan with 16-bit GEMMs (CUDA): tiles of at most LOWP_MAX_TILE_ROWS tokens against blocks
# of LOWP_COLS_X_H / H vocabulary columns (a power of two within LOWP_BLOCK_COLS_RANGE). Every tile is
# padded to its full height (batch invariance), so a short batch pays for up to a tile of padding
# rows: 1024 keeps that near the chunk walk's 255, while its GEMMs stay compute-bound on Hopper (the
# d_weight GEMM's inner dimension is the tile height: ~430 FLOP per byte at 1024 x 8192 x 4096, the
# H200's ridge is ~185). The block width keeps each (tile, block) GEMM at ~70 GFLOP (~90 us on an
# H200) whatever H, more than the Python and launch cost of a block's row kernel and bookkeeping:
# 8192 columns at H=4096, 32768 at H=896, 4096 at H=8192. At H=4096 a tile holds ~70 MB (the
# block's 34 MB of fp32 logits, 17 MB of bf16 d logits, the 17 MB fp32 d_hidden accumulator); at
# H=896 ~205 MB (a 134 MB block of logits).
LOWP_MAX_TILE_ROWS = 1024
LOWP_COLS_X_H = 8192 * 4096
LOWP_BLOCK_COLS_RANGE = (2048, 32768)
# The chunk walk re-reads the whole head for every chunk; when chunk_bytes holds fewer rows than
# this, its three small-M GEMMs cost more than the blocked walk's four large ones (2 EPYC cores, fp32,
# GRPO loss at 2048 x 896 x 151936: chunks of 16 rows 27-33 s, of 32 rows 19-20 s, of 48 rows 19.2 s,
# the blocked walk 20-21 s; docs/scaling.md section 7), so on CPU the blocked walk takes over below it.
CHUNKED_MIN_ROWS = 32
_OPS = ("logprobs_from_logits", "fused_linear_logprobs", "fused_linear_policy_loss", "fused_linear_preference_loss",
        "fused_linear_distillation_loss")
# A distillation chunk holds two heads' fp32 logits and ~4 more [rows, V] temporaries of the
# divergence maths in PyTorch: its rows get this fraction of the chunk budget. The C++ row kernel
# (backend cpp) works inside the two heads' chunks, which then get half the budget each.
DISTILL_CHUNK_SHARE = 6
DISTILL_CPP_CHUNK_SHARE = 2


@dataclass(frozen=True)
class EnvKnobs:
    """Every environment variable that changes what an op runs; ``env_knobs()`` is their only reader."""

    triton_linear: Optional[str]   # PYRL_TRITON_LINEAR: "chunked" | "fused" | None (automatic)
    triton_config: Optional[str]   # PYRL_TRITON_CONFIG: one named tiling of the fused Triton kernel
    passes: Optional[str]          # PYRL_PASSES: "one" | "two" | None (automatic)
    linear: Optional[str] = None   # PYRL_LINEAR: "chunked" | "blocked" | None (automatic)


def env_knobs() -> EnvKnobs:
    get = lambda k: os.environ.get(k) or None  # noqa: E731
    knobs = EnvKnobs(triton_linear=get("PYRL_TRITON_LINEAR"), triton_config=get("PYRL_TRITON_CONFIG"),
                     passes=get("PYRL_PASSES"), linear=get("PYRL_LINEAR"))
    if knobs.linear not in (None, "chunked", "blocked"):
        raise ValueError(f"PYRL_LINEAR must be 'chunked' or 'blocked', got {knobs.linear!r}")
    if knobs.triton_linear not in (None, "chunked", "fused"):
        raise ValueError(f"PYRL_TRITON_LINEAR must be 'fused' or 'chunked', got {knobs.triton_linear!r}")
    if knobs.passes not in (None, "one", "two"):
        raise ValueError(f"PYRL_PASSES must be 'one' or 'two', got {knobs.passes!r}")
    return knobs


@dataclass(frozen=True)
class Plan:
    """What one op call runs (see the module docstring); ``str(plan)`` is a readable summary."""

    op: str
    backend: str
    linear: str = "given"
    passes: str = "-"
    gemm: str = "-"
    chunk_rows: int = 0
    pad_rows: int = 1
    chunk_bytes: int = 0
    kl_chunk_rows: int = 0
    vocab_parallel: bool = False
    block_cols: int = 0
    reasons: Tuple[str, ...] = ()
    sampler: str = ""

    def __str__(self) -> str:
        head = f"{self.op}: backend={self.backend}, linear={self.linear}"
        if self.linear == "blocked":
            head += (f", gemm={self.gemm}, tile_rows={self.chunk_rows} x block_cols={self.block_cols} "
                     f"(GEMMs padded to a multiple of {self.pad_rows})")
        elif self.linear != "given":
            head += f", gemm={self.gemm}, chunk_rows={self.chunk_rows} (GEMMs padded to a multiple of {self.pad_rows})"
        if self.passes != "-":
            head += f", passes={self.passes}"
        if self.kl_chunk_rows:
            head += f", exact-KL chunk_rows={self.kl_chunk_rows}"
        if self.vocab_parallel:
            head += ", vocab_parallel"
        if self.sampler:
            head += f", sampler: {self.sampler}"
        return "\n".join([head, *("  - " + r for r in self.reasons)])


def chunk_bytes_default(device: torch.device) -> int:
    return DEFAULT_CUDA_CHUNK_BYTES if device.type == "cuda" else DEFAULT_CHUNK_BYTES


def free_memory(device: torch.device) -> int:
    """Bytes the process could still allocate on ``device``: on CUDA the driver's free memory plus what
    PyTorch's caching allocator holds unused; elsewhere the host's available memory (``MemAvailable``
    of /proc/meminfo, else the free physical pages)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 0  # unknown: "auto" falls back to the default


def resolve_chunk_bytes(chunk_bytes, device: torch.device) -> Tuple[int, str]:
    """The chunk budget of a call as bytes, and how it was chosen: ``None`` is the device's default,
    ``"auto"`` the memory-budget rule above (AUTO_FREE_SHARE), an int itself."""
    if chunk_bytes is None:
        return chunk_bytes_default(device), ""
    if chunk_bytes != "auto":
        return chunk_bytes, ""
    free = free_memory(device)
    share = free // AUTO_FREE_SHARE
    pow2 = 1 << (share.bit_length() - 1) if share > 0 else 0
    cap = AUTO_MAX_CHUNK_BYTES["cuda" if device.type == "cuda" else "cpu"]
    got = max(chunk_bytes_default(device), min(cap, pow2))
    return got, (f"chunk_bytes='auto': {free / 2**30:.1f} GiB free on {device.type} -> {got // 2**20} MiB "
                 f"(1/{AUTO_FREE_SHARE} of it rounded down to a power of two, between the default "
                 f"{chunk_bytes_default(device) // 2**20} MiB and {cap // 2**20} MiB)")


def _acc_chunk_rows(n_rows: int, vocab: int, chunk_bytes: int) -> int:
    rows = chunk_bytes // max(1, vocab * 4)
    if rows >= GEMM_ROW_QUANTUM:
        rows -= rows % GEMM_ROW_QUANTUM  # full chunks need no padding
    return max(1, min(n_rows, rows))


def _block_shape(n_rows: int, chunk_bytes: int) -> Tuple[int, int]:
    """``(tile_rows, block_cols)`` of the blocked plan: a tile of fp32 logits within ``chunk_bytes``.
    ``block_cols`` depends on ``chunk_bytes`` alone (batch invariance); the tile takes every row up
    to what the budget allows."""
    cols = BLOCK_COLS
    if chunk_bytes // (4 * cols) < MIN_TILE_ROWS:
        cols = max(64, (chunk_bytes // (4 * MIN_TILE_ROWS)) // 64 * 64)
    rows = max(GEMM_ROW_QUANTUM, chunk_bytes // (4 * cols) // GEMM_ROW_QUANTUM * GEMM_ROW_QUANTUM)
    return max(1, min(n_rows, rows)), cols


def _lowp_block_shape(hidden_size: int, chunk_bytes: int) -> Tuple[int, int]:
    """``(tile_rows, block_cols)`` of the blocked plan with 16-bit GEMMs (CUDA): a tile's fp32 logits
    ``[rows, block_cols]`` and its fp32 d_hidden accumulator ``[rows, H]`` within ``chunk_bytes``
    (its 16-bit d logits add half the logits), rows a power of two (every tile is padded to the full
    tile, as the lowp chunks are, so cuBLAS meets one GEMM shape whatever the batch; a power of two
    divides the usual batch sizes, where padding would waste GEMM work), at most LOWP_MAX_TILE_ROWS;
    ``block_cols`` from H alone (see LOWP_COLS_X_H)."""
    lo, hi = LOWP_BLOCK_COLS_RANGE
    want = LOWP_COLS_X_H // max(1, hidden_size)
    cols = min(hi, max(lo, 1 << (want.bit_length() - 1) if want > 0 else lo))
    rows = max(GEMM_ROW_QUANTUM, chunk_bytes // (4 * cols + 4 * max(0, hidden_size)))
    return min(LOWP_MAX_TILE_ROWS, 1 << (rows.bit_length() - 1)), cols


def _lowp_chunk_rows(vocab: int, chunk_bytes: int) -> int:
    """Rows of every lowp chunk GEMM: a multiple of 64 in [64, 4096] (tensor-core tiles)."""
    rows = chunk_bytes // max(1, vocab * 4)
    return int(min(4096, max(64, rows - rows % 64)))


def make_plan(op: str, *, device: torch.device, dtype: torch.dtype, n_rows: int = 0, vocab: int = 0,
              backend: str = "auto", chunk_bytes: Optional[int] = None, separable: Optional[str] = None,
              full_kl: bool = False, vocab_parallel: bool = False, proxy_kl: bool = False,
              sampler: str = "", sparse_teacher: bool = False, hidden_size: int = 0) -> Plan:
    """The plan of one call. ``separable``: for the policy loss, ``None`` when the loss is
    token-separable, else the reason it is not (which rules out the one-pass plan). ``sampler``:
    the sampler's truncation as text (``"top_p=0.9"``), ``""`` when off. ``sparse_teacher``: the
    distillation loss's teacher is given as top-k log-probs (its divergence stays in PyTorch).
    ``hidden_size``: H, which sizes the blocked plan's tiles with 16-bit GEMMs (their fp32 d_hidden
    accumulator is ``[tile_rows, H]``)."""
    if op not in _OPS:
        raise ValueError(f"op must be one of {_OPS}, got {op!r}")
    knobs = env_knobs()
    reasons = []
    if vocab_parallel:
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if backend not in ("auto", "torch"):
            raise RuntimeError(f"backend={backend!r} is not implemented for the vocab-parallel path "
                               "(vocab_parallel_group): it runs the PyTorch body plus collectives on every device; "
                               "use backend='auto' or 'torch'")
        name = "torch"
        reasons.append("vocab_parallel_group: the reference row body, its stats merged across ranks per chunk")
    else:
        name = resolve_backend(backend, device)
        reasons.append(f"backend={backend!r} on {device.type} -> the {name} row body")
    if sampler:
        if vocab_parallel:
            raise ValueError(f"{sampler} is not supported with vocab_parallel_group: a row's kept set needs the "
                             "whole vocabulary's logits, which no rank holds")
        reasons.append(f"sampler truncation ({sampler}): each row's kept-set threshold is found on its full "
                       "logits by the row body (top-k by a selection, min-p in closed form, top-p by "
                       + ("a sort" if name == "torch" else "a threshold search") + "), then the row is "
                       "renormalised over the kept tokens")
    if op == "logprobs_from_logits":
        return Plan(op, name, reasons=tuple(reasons), sampler=sampler)

    chunk_bytes, how = resolve_chunk_bytes(chunk_bytes, device)
    if how:
        reasons.append(how)
    asked_bytes = chunk_bytes
    low = dtype in _LOWP
    linear, gemm = "chunked", "acc"
    if op == "fused_linear_distillation_loss":
        # two heads in lockstep: only a chunk walk can hold both chunks' logits side by side
        share = DISTILL_CPP_CHUNK_SHARE if name == "cpp" and not sparse_teacher else DISTILL_CHUNK_SHARE
        how = ("the divergence in C++ one row at a time, inside the two chunks" if share == DISTILL_CPP_CHUNK_SHARE
               else "the divergence maths in PyTorch")
        reasons.append(f"distillation: student and teacher heads walked in lockstep, 1/{share} of chunk_bytes per "
                       f"head chunk ({how}); d logits formed in forward (one pass)")
        chunk_bytes //= share
    if name == "triton" and op == "fused_linear_distillation_loss":
        gemm = "lowp" if low and device.type == "cuda" else "acc"
        reasons.append("triton: GEMMs per token chunk around the Triton row kernel (hard-label term)")
    elif name == "triton":
        mode = knobs.triton_linear or ("chunked" if low and device.type == "cuda" or sampler else "fused")
        if mode == "fused" and sampler:
            raise ValueError(f"PYRL_TRITON_LINEAR=fused cannot run this call: {sampler} needs each row's full "
                             "logits, and the fused kernel streams vocabulary tiles")
        if mode == "fused":
            linear = "kernel"
            reasons.append("triton " + ("(PYRL_TRITON_LINEAR=fused)" if knobs.triton_linear else
                                        f"with {str(dtype).replace('torch.', '')}") +
                           ": one fused kernel over the whole batch, logits tiles never stored")
        else:
            gemm = "lowp" if low else "acc"
            why = ("(PYRL_TRITON_LINEAR=chunked)" if knobs.triton_linear else
                   "with the sampler's truncation (the fused kernel never holds a whole row)" if sampler else
                   f"with {str(dtype).replace('torch.', '')} on cuda")
            reasons.append(f"triton {why}: cuBLAS GEMMs per token chunk around the Triton row kernels")
    if linear == "kernel":
        chunk_rows, pad_rows = max(1, n_rows), 1
    elif gemm == "lowp":
        chunk_rows = pad_rows = _lowp_chunk_rows(vocab, chunk_bytes)
        reasons.append(f"{str(dtype).replace('torch.', '')} GEMMs on the tensor cores with fp32 output; every GEMM "
                       f"padded to the full chunk")
    else:
        chunk_rows, pad_rows = _acc_chunk_rows(n_rows, vocab, chunk_bytes), GEMM_ROW_QUANTUM
    block_cols = 0
    why_not_blocked = _why_not_blocked(op, linear, sampler, vocab_parallel)
    if knobs.linear == "blocked" and why_not_blocked is not None:
        raise ValueError(f"PYRL_LINEAR=blocked cannot run this call: {why_not_blocked}")
    # automatic: on CPU when chunk_bytes holds fewer than CHUNKED_MIN_ROWS rows of logits, unless
    # PYRL_PASSES=one asks for the chunk walk's one-pass plan. The choice never looks at the batch
    # size: a token's bits must not depend on how many tokens share its call (docs/reliability.md).
    budget_rows = chunk_bytes // max(1, vocab * 4)
    auto_blocked = (knobs.linear is None and device.type == "cpu" and budget_rows < CHUNKED_MIN_ROWS
                    and not (op == "fused_linear_policy_loss" and knobs.passes == "one"))
    if why_not_blocked is None and (knobs.linear == "blocked" or auto_blocked):
        linear = "blocked"
        why = ("PYRL_LINEAR=blocked" if knobs.linear else
               f"chunk_bytes holds {budget_rows} rows of [{vocab}] logits (< {CHUNKED_MIN_ROWS}): the chunk walk "
               "would re-read the head for every few dozen tokens")
        if gemm == "lowp":
            chunk_rows, block_cols = _lowp_block_shape(hidden_size, asked_bytes)
            pad_rows = chunk_rows
            tile = (f"tiles of {chunk_rows} tokens (each padded to it) x {block_cols} vocabulary columns of fp32 "
                    f"logits and an fp32 d_hidden accumulator [{chunk_rows}, {hidden_size}]")
        else:
            chunk_rows, block_cols = _block_shape(n_rows, asked_bytes)
            tile = f"tiles of {chunk_rows} tokens x {block_cols} vocabulary columns of fp32 logits"
        reasons.append(f"vocabulary-blocked walk ({why}): {tile} (chunk_bytes={asked_bytes}); the head streamed "
                       "once per tile in forward and once per tile in backward, 4 GEMMs per (tile, block)")
    elif gemm == "acc" and linear == "chunked":
        reasons.append(f"GEMMs in {'fp64' if dtype == torch.float64 else 'fp32'}; chunk_bytes={chunk_bytes} "
                       f"-> {chunk_rows} rows of [{vocab}] fp32 logits per chunk")

    passes, kl_rows = "-", 0
    if op == "fused_linear_preference_loss":
        passes = "two"
        reasons.append("two passes: per-sequence log-prob sums first, the pairwise loss on [B] sequences, "
                       "logits recomputed in backward")
    if op == "fused_linear_distillation_loss":
        passes = "one"
    if op == "fused_linear_policy_loss":
        why_not = separable
        if why_not is None and linear == "kernel":
            why_not = "the fused Triton kernel is not a chunk walk"
        if why_not is None and linear == "blocked":
            why_not = "the vocabulary-blocked walk forms a row's d logits only once all its blocks are seen"
        if why_not is None and vocab_parallel:
            why_not = "vocab_parallel_group (the log-prob op owns the collectives)"
        if why_not is None and n_rows == 0:
            why_not = "an empty batch"
        if knobs.passes == "one" and why_not is not None:
            raise ValueError(f"PYRL_PASSES=one cannot run this call: {why_not}")
        if knobs.passes == "two":
            passes = "two"
            reasons.append("two passes (PYRL_PASSES=two)")
        elif why_not is None:
            passes = "one"
            reasons.append("one pass: the loss is token-separable, so d logits are formed in forward "
                           "(3 GEMMs per chunk, backward only scales)")
        else:
            passes = "two"
            reasons.append(f"two passes: {why_not}")
        if full_kl or proxy_kl:
            kl_rows = _acc_chunk_rows(n_rows, vocab, chunk_bytes // 2)
        if full_kl:
            reasons.append(f"exact KL: a second walk over both heads, {kl_rows} rows per chunk")
        if proxy_kl:
            reasons.append(f"Lp-Reg: a walk over the policy head for KL(proxy || p), {kl_rows} rows per chunk")
    return Plan(op, name, linear, passes, gemm, chunk_rows, pad_rows, asked_bytes, kl_rows, vocab_parallel,
                block_cols, tuple(reasons), sampler)


def _why_not_blocked(op, linear, sampler, vocab_parallel) -> Optional[str]:
    """Why the vocabulary-blocked walk cannot run a call (None: it can)."""
    if op not in ("fused_linear_logprobs", "fused_linear_policy_loss", "fused_linear_preference_loss"):
        return f"{op} walks its heads in token chunks"
    if linear != "chunked":
        return "Triton's fused kernel is a walk of its own (PYRL_TRITON_LINEAR=chunked puts the Triton rows on a walk)"
    if sampler:
        return f"{sampler} needs each row's whole vocabulary at once"
    if vocab_parallel:
        return "vocab_parallel_group splits the vocabulary across ranks already"
    return None
