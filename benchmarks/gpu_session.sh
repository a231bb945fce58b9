#!/usr/bin/env bash
# The GPU checks of the open issues in one prepared run of under 10 minutes, for a session lent
# the H200 (15 device-minutes in all, start-up included). The first two H200 sessions ran earlier
# versions (results/gpu_h200_2026-12-04/ and _04b/); this one asks for what they left unmeasured. The
# correctness tests come first and every step has its own time limit, in priority order; the
# benchmarks write their JSON after every record, so a step cut short keeps what it measured.
# Into $OUT (the device tool's return folder, at most 8 files):
#   gpu_tests.log          pytest -m gpu, 4 workers: Triton kernels vs reference (bf16, fp32), the
#                          fast modes vs eager, the CUDA-graph update (single agent and population)
#                          == eager without a host sync, pinned uploads (the torchrun/NCCL test
#                          passed on the first H200 run and is left out for time)
#   population_d256_graphs.json  issue 12: cartpole_d256 at 8 x 25, K = 32, 8, 1, CUDA graphs +
#                          bf16 without compile. Target: K = 32 at most 3x the ms of K = 1
#   population_k32_kernels.txt   the top kernels of K = 32 by device time (eager bf16, profiled)
#   population_d256_full.json    the same in full mode (compile too) for K = 8 (the H200 runs
#                          measured K = 1 full: 13.0 ms, K = 32 full: 123.6 ms)
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
timeout 100 $py -m pytest -q -m gpu -p no:cacheprovider -n 4 tests/test_kernel_block_gru.py \
  tests/test_kernel_twohot.py tests/test_fast.py tests/test_transfer.py tests/test_population.py \
  2>&1 | tee "$OUT/gpu_tests.log"

# The second H200 run measured K = 32 in full mode (123.6 ms, compile 277.8 s) and nothing else
# in its 320 s. Without compile a population is captured in seconds, so K = 32, 8, 1 first.
step "population, d256 8x25, CUDA graphs + bf16 without compile: K = 32, 8, 1"
timeout 150 $py -m benchmarks.throughput --config $d256 --modes graphs_bf16 --shapes 8x25 \
  --population 32,8,1 --updates 30 "${small[@]}" --json "$OUT/population_d256_graphs.json"

# Where a population of 32 spends the device's time (123.6 ms for 3.71 TFLOP, ~30 TFLOP/s: not
# arithmetic-bound): eager bf16 kernels, their device time by kernel, from 5 profiled updates.
step "population K = 32, eager bf16, kernels by device time"
tr=$(mktemp -d)
timeout 90 $py -m benchmarks.throughput --config $d256 --modes bf16 --shapes 8x25 \
  --population 32 --updates 5 "${small[@]}" --trace-dir "$tr" &&
  $py -m profiling.summarize "$tr"/trace_bf16_8x25_k32.json --top 30 | tee "$OUT/population_k32_kernels.txt"

# K = 1 (13.0 ms) and K = 32 (123.6 ms) in full mode are measured; K = 8 compiles for minutes.
step "population, d256 8x25, full (compile): K = 8"
timeout 240 $py -m benchmarks.throughput --config $d256 --modes full --shapes 8x25 \
  --population 8 --updates 30 "${small[@]}" --json "$OUT/population_d256_full.json"
step "done"
ls -la "$OUT"
