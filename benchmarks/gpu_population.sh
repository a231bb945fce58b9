#!/usr/bin/env bash
# Population checks for a session lent the H200 (issue 12), as one prepared run: at most 4 files
# into $OUT (the device tool's return folder), each step under its own time limit, in priority
# order, so a run cut short still returns what it finished:
#   population_tests.log   pytest: the population's CUDA-graph update == eager and never syncs,
#                          plus the CPU population tests on the GPU's host
#   population_d256.json   benchmarks.throughput: cartpole_d256 at 8 x 25, K = 1, 8, 32, eager and
#                          full (compile + CUDA graphs + bf16; a population drops Triton and
#                          batched_wgrad with a notice), with the CUDA kernels launched per update
#   run.log                everything printed
# Target (issue 12): K = 32 in full mode costs at most 3x the ms of K = 1.
# Usage (device tool): carry the py3.12 wheels (benchmarks/fetch_gpu_wheels.sh) and run
#   bash benchmarks/gpu_population.sh
set -uo pipefail
source benchmarks/gpu_start.sh gpu_population

step "population tests"
timeout 150 $py -m pytest -q -p no:cacheprovider tests/test_population.py \
  -k "gpu or host_sync or warm_up or each_member or frozen" 2>&1 | tee "$OUT/population_tests.log"

step "population throughput, d256 8x25"
timeout 540 $py -m benchmarks.throughput --config configs/cartpole_d256.toml --modes eager,full \
  --shapes 8x25 --population 1,8,32 --updates 50 --json "$OUT/population_d256.json"
step "done"
ls -la "$OUT"
