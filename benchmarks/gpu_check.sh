#!/usr/bin/env bash
# The benchmark suite on one CUDA GPU, in under 10 minutes; results go to the folder given.
#
#   bash benchmarks/gpu_check.sh benchmarks/results/h100 [extra pyrl bench flags]
#
# Shapes: the Qwen2.5-0.5B head (H=896, V=151936) and the Llama-3-8B head (H=4096, V=128256) from
# 4k to 64k tokens, bf16. The runner starts no new measurement after --max-seconds and rewrites
# results.json/results.md after every shape, so even the hard timeout below leaves results behind.
set -euo pipefail
out=${1:?usage: benchmarks/gpu_check.sh OUT_DIR [pyrl bench flags...]}
shift
cd "$(dirname "$0")/.."
mkdir -p "$out"

python - <<'PY'
import sys
import torch
if not torch.cuda.is_available():
    sys.exit("gpu_check: torch.cuda.is_available() is False; this script needs a CUDA GPU")
print(f"gpu_check: {torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA {torch.version.cuda}")
import pyrl
for name, b in pyrl.backends().items():
    print(f"gpu_check: backend {name}: {'available' if b['available'] else 'unavailable'} ({b['detail']})")
PY

if command -v pyrl >/dev/null 2>&1 && pyrl bench --help >/dev/null 2>&1; then
  bench=(pyrl bench)
else
  bench=(python -m pyrl.bench)
fi

status=0
timeout --kill-after=20 570 "${bench[@]}" --device cuda --out "$out" \
  --shapes 4096,896,151936 16384,896,151936 65536,896,151936 4096,4096,128256 16384,4096,128256 65536,4096,128256 \
  --warmup 2 --repeats 5 --max-seconds 420 "$@" || status=$?
[ -f "$out/results.md" ] && cat "$out/results.md"
exit "$status"
