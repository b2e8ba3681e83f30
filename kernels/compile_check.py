"""Compile every Triton kernel of ``pyrl.kernels`` (``rows``, ``fused_linear``) for an NVIDIA target without a GPU.

The CPU tests run the kernels under ``TRITON_INTERPRET=1``, which accepts code the GPU compiler
rejects; this compiles each kernel and autotune config ahead of time (Triton's bundled ``ptxas``)
and reports what it costs: registers per thread, bytes spilled to local memory, shared memory.

    python -m pyrl.kernels.compile_check [--arch 90] [--dtype bf16 fp32] [--quick]

Exits non-zero if any kernel fails to compile. ``--quick`` compiles the first config of each
kernel only. Pointers, strides and ``H`` are assumed 16-divisible, as Triton specializes them at
run time for ordinary tensors (e.g. H=4096), so the report matches what a real launch compiles.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from pyrl.kernels import fused_linear as F
from pyrl.kernels import rows as R

_ROW_I32 = ("stride_x", "stride_out", "n_rows", "V", "c0", "ignore_index")


def _signatures(dt: str) -> list[tuple[object, dict, list[dict]]]:
    """(jit function, argument types, [constexpr values of each config]) for every kernel."""
    prec = F._dot_precision(torch.float32 if dt == "fp32" else torch.bfloat16)
    block, warps = R._row_config(151936)
    block_b, warps_b = R._row_config(8192)  # a block of the 16-bit blocked walk (8192 columns at H=4096)
    row_types = dict(x_ptr=f"*{dt}", out_ptr=f"*{dt}", y_ptr="*i64", logp_ptr="*fp32", ent_ptr="*fp32",
                     lse_ptr="*fp32", g_logp_ptr="*fp32", g_ent_ptr="*fp32", tau_ptr="*fp32", temperature="fp32",
                     top_k="fp32", top_p="fp32", log_min_p="fp32", m_ptr="*fp32", s_ptr="*fp32", t_ptr="*fp32",
                     zy_ptr="*fp32", **{name: "i32" for name in _ROW_I32})
    # the 16-bit walks' backward: fp32 logits in, d logits written in the GEMMs' 16-bit dtype
    to_lowp = dict(row_types, x_ptr="*fp32", out_ptr=f"*{dt}")
    fused_types = dict(h_ptr=f"*{dt}", w_ptr=f"*{dt}", b_ptr=f"*{dt}", y_ptr="*i32", zy_ptr="*fp32",
                       m_part_ptr="*fp32", s_part_ptr="*fp32", t_part_ptr="*fp32", lse_ptr="*fp32", ent_ptr="*fp32",
                       logp_ptr="*fp32", g_logp_ptr="*fp32", g_ent_ptr="*fp32", dh_ptr="*fp32", dw_ptr="*fp32",
                       db_ptr="*fp32", temperature="fp32",
                       **{name: "i32" for name in ("stride_h", "stride_w", "stride_dh", "stride_dw", "N", "H", "V",
                                                   "n_splits", "ignore_index")})

    def cfgs(named, **const):
        return [dict(const, **c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages) for c in named.values()]

    return [
        (R._rows_fwd_kernel, row_types, [dict(NEED_ENTROPY=True, HAS_TAU=tau, BLOCK_V=block, num_warps=warps,
                                              num_stages=3) for tau in (True, False)]),
        (R._rows_bwd_kernel, row_types, [dict(HAS_G_ENT=True, HAS_TAU=tau, BLOCK_V=block, num_warps=warps,
                                              num_stages=3) for tau in (True, False)]),
        (R._rows_bwd_kernel, to_lowp, [dict(HAS_G_ENT=True, HAS_TAU=False, BLOCK_V=block, num_warps=warps,
                                            num_stages=3)]),
        (R._rows_stats_kernel, dict(row_types, x_ptr="*fp32"), [dict(NEED_ENTROPY=True, BLOCK_V=block_b,
                                                                     num_warps=warps_b, num_stages=3)]),
        (R._cutoff_kernel, row_types, [dict(HAS_K=True, HAS_P=True, MIN_P_FIRST=False, BLOCK_V=block, num_warps=warps,
                                            num_stages=3)]),
        (F._fused_fwd_kernel.fn, fused_types,
         cfgs(F._FWD_CONFIGS, HAS_BIAS=True, NEED_ENTROPY=True, DOT_PRECISION=prec, VOCAB_SPLIT=F._VOCAB_SPLIT,
              GROUP_N=F._GROUP_N)),
        (F._fused_combine_kernel, fused_types, [dict(NEED_ENTROPY=True, BLOCK=128, num_warps=4, num_stages=1)]),
        (F._fused_bwd_hidden_kernel.fn, fused_types,
         cfgs(F._BWD_HIDDEN_CONFIGS, HAS_BIAS=True, HAS_G_ENT=True, DOT_PRECISION=prec)),
        (F._fused_bwd_weight_kernel.fn, fused_types,
         cfgs(F._BWD_WEIGHT_CONFIGS, HAS_BIAS=True, HAS_G_ENT=True, DOT_PRECISION=prec, NEED_DW=True, NEED_DB=True)),
    ]


def _resource_usage(cubin: bytes) -> str:
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True).stdout
    for line in out.splitlines():
        if "REG:" in line:
            fields = dict(item.split(":", 1) for item in line.split() if ":" in item)
            return f"regs {fields.get('REG', '?'):>3}  spill {fields.get('STACK', '?'):>5} B"
    return "(no resource report)"


def compile_all(arch: int, dtypes: list[str], quick: bool) -> int:
    target = GPUTarget("cuda", arch, 32)
    failures = 0
    for dt in dtypes:
        for fn, types, configs in _signatures(dt):
            for const in configs[:1] if quick else configs:
                const = dict(const)
                options = {"num_warps": const.pop("num_warps"), "num_stages": const.pop("num_stages")}
                signature = {name: "constexpr" if name in const else types[name] for name in fn.arg_names}
                attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names)
                         if name.endswith("_ptr") or name.startswith("stride") or name == "H"}
                blocks = "x".join(str(v) for k, v in const.items() if k.startswith("BLOCK"))
                launch = f"w{options['num_warps']} s{options['num_stages']}"
                label = f"sm{arch} {dt:4s} {fn.__name__:26s} {blocks:12s} {launch}"
                try:
                    kernel = triton.compile(ASTSource(fn, signature, constexprs=const, attrs=attrs), target=target,
                                            options=options)
                except Exception as exc:  # noqa: BLE001 - reported, counted, and turned into the exit status
                    failures += 1
                    print(f"{label}  FAILED: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}", flush=True)
                    continue
                usage = _resource_usage(kernel.asm["cubin"])
                print(f"{label}  {usage}  smem {kernel.metadata.shared // 1024:>3} KB", flush=True)
    return failures


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability x10 (80: A100, 90: H100)")
    parser.add_argument("--dtype", nargs="+", default=["bf16", "fp32"], choices=["bf16", "fp16", "fp32"])
    parser.add_argument("--quick", action="store_true", help="first config of each kernel only")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        parser.error("unset TRITON_INTERPRET: the interpreter does not compile kernels")
    return 1 if compile_all(args.arch, args.dtype, args.quick) else 0


if __name__ == "__main__":
    sys.exit(main())
