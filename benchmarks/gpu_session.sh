#!/usr/bin/env bash
# The GPU checks of the open issues in one prepared run of under 10 minutes, for a session lent
# the H200 (15 device-minutes in all, start-up included). The first two H200 sessions ran earlier
# versions (results/gpu_h200_2026-12-04/ and _04b/). Their full-mode population figures (K = 1:
# 13.0 ms, K = 32: 123.6 ms) came before the image layers became patch matmuls (commit b83fb30:
# under vmap the convolutions had been grouped ones, 1.33x of a d64 K = 8 update on the CPU), so
# this run measures that pair again first. The correctness tests come first; every step has its
# own time limit, in priority order, and the last takes what is left of the 575 s; the benchmarks
# write their JSON after every record, so a step cut short keeps what it measured.
# Into $OUT (the device tool's return folder, at most 8 files):
#   gpu_tests.log          pytest -m gpu, 4 workers: Triton kernels vs reference (bf16, fp32), the
#                          fast modes vs eager, the CUDA-graph update (single agent and population)
#                          == eager without a host sync, pinned uploads (the torchrun/NCCL test
#                          passed on the first H200 run and is left out for time)
#   population_d256_full.json    issue 12's must-show 5: cartpole_d256 at 8 x 25, compile + CUDA
#                          graphs + bf16, K = 32 then K = 1. Target: K = 32 at most 3x the ms of K = 1
#   population_d256_graphs.json  the same with CUDA graphs + bf16 without compile (captured in
#                          seconds), K = 32, 8, 1
#   population_k32_kernels.txt   the top kernels of K = 32 by device time (eager bf16, profiled)
#   run.log                everything printed
# Usage (device tool): bash benchmarks/fetch_gpu_wheels.sh here, then carry [".whl"] and run
#   bash benchmarks/gpu_session.sh        (timeout_s 590)
set -uo pipefail
source benchmarks/gpu_start.sh gpu_session
$py -c "import triton; print('triton', triton.__version__)"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader || true
d256=configs/cartpole_d256.toml
small=(--set train.replay_buffer_size=20000)  # the update samples a ring of any size: K = 32 x
# the config's 100k frames would take 39 GB of the GPU for nothing

step "GPU tests (-m gpu)"
timeout 75 $py -m pytest -q -m gpu -p no:cacheprovider -n 4 tests/test_kernel_block_gru.py \
  tests/test_kernel_twohot.py tests/test_fast.py tests/test_transfer.py tests/test_population.py \
  2>&1 | tee "$OUT/gpu_tests.log"

# Full mode compiles for minutes (K = 32: 277.8 s on the second H200 run, K = 1: 74.5 s).
step "population, d256 8x25, full (compile + CUDA graphs + bf16): K = 32, 1"
timeout 380 $py -m benchmarks.throughput --config $d256 --modes full --shapes 8x25 \
  --population 32,1 --updates 30 "${small[@]}" --json "$OUT/population_d256_full.json"

step "population, d256 8x25, CUDA graphs + bf16 without compile: K = 32, 8, 1"
timeout 90 $py -m benchmarks.throughput --config $d256 --modes graphs_bf16 --shapes 8x25 \
  --population 32,8,1 --updates 30 "${small[@]}" --json "$OUT/population_d256_graphs.json"

# Where a population of 32 spends the device's time: eager bf16 kernels, their device time by
# kernel, from 5 profiled updates, in whatever is left of the run's 575 s.
left=$((575 - SECONDS))
if [ "$left" -gt 30 ]; then
  step "population K = 32, eager bf16, kernels by device time (${left} s left)"
  tr=$(mktemp -d)
  timeout "$left" $py -m benchmarks.throughput --config $d256 --modes bf16 --shapes 8x25 \
    --population 32 --updates 5 "${small[@]}" --trace-dir "$tr" &&
    $py -m profiling.summarize "$tr"/trace_bf16_8x25_k32.json --top 30 |
    tee "$OUT/population_k32_kernels.txt"
fi
step "done"
ls -la "$OUT"
