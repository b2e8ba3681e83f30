#!/usr/bin/env bash
# The third-party wheels benchmarks/gpu_check.sh compares against, for a GPU machine without a
# package index: downloads them into ./.whl (ignored by git through .git/info/exclude), where
# gpu_check.sh installs them from. Run once in the repository root on a machine that can reach PyPI;
# then carry .whl to the GPU machine with the checkout (about 1 MB).
#
#   bash benchmarks/gpu_wheels.sh            # liger-kernel 0.8.5 (the parity version), cut-cross-entropy
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
# Both are pure-Python wheels; the platform flags only keep pip from picking a source build.
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl "liger-kernel==0.8.5" "cut-cross-entropy==25.1.1"
ls -l .whl
