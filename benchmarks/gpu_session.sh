#!/usr/bin/env bash
# The GPU checks of the open issues in one prepared run of under 10 minutes, for a session lent
# the H200 (15 device-minutes in all, start-up included). The first H200 session ran an earlier
# version (results/gpu_h200_2026-12-04/); this one asks for what that left unmeasured. The
# correctness tests come first and every step has its own time limit, in priority order; the
# benchmarks write their JSON after every record, so a step cut short keeps what it measured.
# Into $OUT (the device tool's return folder, at most 8 files):
#   gpu_tests.log          pytest -m gpu, 4 workers: Triton kernels vs reference (bf16, fp32), the
#                          fast modes vs eager, the CUDA-graph update (single agent and population)
#                          == eager without a host sync, pinned uploads (the torchrun/NCCL
#                          test passed on the first H200 run and is left out for time)
#   population_d256.json   issue 12: cartpole_d256 at 8 x 25, K = 32, 8, 1, in full mode (compile +
#                          CUDA graphs + bf16), CUDA kernels launched per update. Target: K = 32
#                          costs at most 3x the milliseconds of K = 1
#   run.log                everything printed
# Usage (device tool): bash benchmarks/fetch_gpu_wheels.sh here, then carry [".whl"] and run
#   bash benchmarks/gpu_session.sh        (timeout_s 480, ~7 min); the LunarLander
#   run (gpu_lunarlander.sh) can follow on the still-warm machine with the rest of the 15 minutes
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

# K = 32 first: the first H200 run measured K = 1 (13.0 ms, compile 74.5 s) and ran out of its
# 170 s while K = 32 compiled. Each K compiles its own graphs (~75 s each).
step "population, d256 8x25, full: K = 32, 8, 1"
timeout 320 $py -m benchmarks.throughput --config $d256 --modes full --shapes 8x25 \
  --population 32,8,1 --updates 30 "${small[@]}" --json "$OUT/population_d256.json"
step "done"
ls -la "$OUT"
