#!/usr/bin/env bash
# Everything pyrl checks on one CUDA GPU, in one call of under 10 minutes: install, GPU tests,
# the GRPO-loss benchmark against Liger-Kernel and plain PyTorch, log-prob benchmarks, a trainer
# smoke run. Stages run in priority order, each under its own time cap and the whole under BUDGET
# seconds; a stage that fails is reported and the next one still runs.
#
#   bash benchmarks/gpu_check.sh OUT_DIR [BUDGET_SECONDS]    (default 480)
#   GPU_CHECK_STAGES="install gpu-tests bench-grpo" PYRL_SKIP_EXT=1 bash benchmarks/gpu_check.sh OUT 270
#
# --impls takes fnmatch patterns: 'pyrl*' (brackets would be a character class).
#
# Optional third-party wheels (liger-kernel, cut-cross-entropy) are installed from ./.whl if that
# folder exists (machines without a package registry). Writes to OUT_DIR: log.txt, gpu_tests.xml,
# grpo/results.{json,md}, logprobs/results.{json,md}, sweep/ (with plots), train_tiny.jsonl, and
# targets.md (benchmarks/targets.py: the engine's speed and memory targets, PASS or FAIL per row).
set -uo pipefail
out=${1:?usage: benchmarks/gpu_check.sh OUT_DIR [BUDGET_SECONDS]}
budget=${2:-480}
cd "$(dirname "$0")/.."
mkdir -p "$out"
out=$(cd "$out" && pwd)
log="$out/log.txt"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}

say() { echo "[gpu_check $(printf '%4d' "$SECONDS")s] $*" | tee -a "$log"; }
left() { echo $((budget - SECONDS)); }
# run_stage NAME CAP_SECONDS RESERVE_PERCENT CMD...: runs CMD (if NAME is in STAGES) under
# t = min(CAP, time left - RESERVE_PERCENT of the budget).
run_stage() {
  local name=$1 cap=$2 reserve=$(( budget * $3 / 100 )); shift 3
  case " $STAGES " in *" $name "*) ;; *) say "SKIP $name (not in STAGES)"; return 0 ;; esac
  local t=$(( $(left) - reserve )); (( t > cap )) && t=$cap
  if (( t < 20 )); then say "SKIP $name: $(left) s left"; return 0; fi
  say "START $name (cap ${t}s)"
  # "bench ARGS": the benchmark runner, which starts no new measurement after --max-seconds
  if [ "$1" = bench ]; then shift; set -- $PY -m pyrl.cli bench --device cuda --max-seconds $(( t * 3 / 4 )) "$@"; fi
  timeout --kill-after=10 "$t" "$@" 2>&1 | tee -a "$log"
  local rc=${PIPESTATUS[0]}
  say "END $name rc=$rc"
  return 0
}
STAGES=${GPU_CHECK_STAGES:-install gpu-tests bench-grpo bench-logprobs bench-sweep train-tiny}

say "machine: $(nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader 2>&1)"
$PY - <<'PY' 2>&1 | tee -a "$log"
import sys, torch, triton
print(f"python {sys.version.split()[0]}, torch {torch.__version__} (CUDA {torch.version.cuda}), triton {triton.__version__}, "
      f"cuda available: {torch.cuda.is_available()}")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"device {p.name}: {p.multi_processor_count} SMs, {p.total_memory / 2**30:.1f} GiB")
PY

if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    2>&1 | tail -3 | tee -a "$log"
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

# Install pyrl (builds pyrl._C against this torch; the CUDA path itself needs only Triton).
run_stage install 200 55 env MAX_JOBS=16 CMAKE_BUILD_PARALLEL_LEVEL=16 \
  $PY -m pip install -q --no-deps --no-build-isolation -e .
$PY -c "import pyrl, json; print(json.dumps(pyrl.backends(), indent=1))" 2>&1 | tee -a "$log"
$PY -c "import liger_kernel, cut_cross_entropy; print('third parties: liger-kernel and cut-cross-entropy import')" \
  2>&1 | tail -1 | tee -a "$log"

# 1. Correctness on the GPU (the Triton kernels compiled for real, against float64).
xdist=(); $PY -c "import xdist" 2>/dev/null && xdist=(-n 4)
run_stage gpu-tests 150 45 $PY -m pytest -q -rf -p no:cacheprovider "${xdist[@]}" --junitxml="$out/gpu_tests.xml" \
  tests/test_gpu.py tests/test_advantages.py -k "gpu or cuda"

# 2. The engine's GRPO target: loss fwd+bwd at N=16384 (B=16, T=1024), H=4096, V=151936, bf16: the
#    default plan, chunk_bytes="auto", the blocked walk and 1 GiB chunks beside Liger and PyTorch.
run_stage bench-grpo 200 12 bench --ops grpo_loss --shapes 16384,4096,151936 \
  --impls 'pyrl[[]triton[]]*' torch 'liger*' --warmup 2 --repeats 5 --no-plots --out "$out/grpo"

# 3. Log-prob ops at the target shape (16k tokens, a 4096-wide head), bf16.
run_stage bench-logprobs 100 8 bench --ops linear_logprobs logits_logprobs \
  --shapes 16384,4096,151936 --impls 'pyrl[[]triton[]]*' torch cut-cross-entropy \
  --warmup 2 --repeats 5 --no-plots --out "$out/logprobs"

# 4. The sweep: GRPO loss time and memory against N, H and V (plots drawn), pyrl's default and the
#    blocked walk beside the GEMM floor: no cliff up to N = 131072 (grid limits, int32 offsets).
run_stage bench-sweep 150 10 bench --ops grpo_loss --impls 'pyrl[[]triton[]]' 'pyrl[[]triton[]]/blocked' \
  --shapes 2048,896,151936 16384,896,151936 131072,896,151936 16384,4096,32000 16384,4096,131072 \
  16384,4096,262144 16384,8192,151936 65536,4096,151936 --warmup 1 --repeats 3 --out "$out/sweep"

# 5. The trainer on one GPU (tiny preset, built-in model and task).
run_stage train-tiny 40 0 $PY -m pyrl.cli train --preset tiny --device cuda --max-steps 40 --out /tmp/pyrl-tiny \
  --no-progress
ls /tmp/pyrl-tiny >>"$log" 2>&1
cp /tmp/pyrl-tiny/metrics.jsonl "$out/train_tiny.jsonl" 2>/dev/null || true

for f in "$out/grpo/results.md" "$out/logprobs/results.md" "$out/sweep/results.md"; do [ -f "$f" ] && cat "$f"; done
# Issue 15's targets, row by row (default plan, memory budget), from the two benchmark stages.
$PY benchmarks/targets.py "$out/grpo/results.json" "$out/logprobs/results.json" --out "$out/targets.md" 2>&1 \
  | tee -a "$log" || true
say "done"
