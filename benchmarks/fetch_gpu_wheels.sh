#!/usr/bin/env bash
# Downloads, into .whl/ (git-ignored), the py3.12 x86-64 wheels that the H200 test machine lacks
# for benchmarks/gpu_check.sh and benchmarks/gpu_lunarlander.sh: the gymnasium backend with Box2D
# and pygame (LunarLander frames), tomli-w (run configs) and nvtx (named ranges). About 21 MB;
# the device tool carries at most 64 MiB. Run here, then pass carry=[".whl"] to the device run,
# where benchmarks/use_gpu_wheels.sh installs them.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
  -d .whl gymnasium==1.4.0 farama-notifications==0.0.6 box2d==2.3.10 pygame==2.6.1 \
  tomli-w==1.2.0 nvtx==0.2.17
ls -la .whl
