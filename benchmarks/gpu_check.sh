#!/usr/bin/env bash
# Every check that needs a GPU, as one prepared run for a session lent the H200 (15 device-minutes
# in all). Writes at most 8 files into $OUT (the device tool's return folder), each step under
# its own time limit, in priority order, so a run cut short still returns what it finished:
#   gpu_tests.log       pytest -m gpu: Triton kernels vs reference in bf16 and fp32, fast modes vs
#                       eager, CUDA-graph update == eager with torch.cuda.set_sync_debug_mode("error"),
#                       pinned uploads
#   throughput.json     benchmarks.throughput, all modes, batch 8x25 (cartpole_d256) and 16x64
#   kernels.json        pytest-benchmark of each kernel vs its reference and torch.compile
#   profile_full.txt    profiling.summarize of a torch.profiler trace of the full mode (8x25)
#   profile_eager.txt   the same for eager, to see what the fast path removed
#   run.log             everything printed
# Usage (device tool): carry .whl (tomli_w, gymnasium, ... py3.12 wheels) and run
#   bash benchmarks/gpu_check.sh
set -uo pipefail
source benchmarks/gpu_start.sh gpu
$py -c "import triton; print('triton', triton.__version__)"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader || true

step "GPU tests"
timeout 200 $py -m pytest -q -m gpu -p no:cacheprovider tests/test_kernel_block_gru.py \
  tests/test_kernel_twohot.py tests/test_fast.py tests/test_transfer.py 2>&1 | tee "$OUT/gpu_tests.log"

step "throughput, both shapes"
timeout 330 $py -m benchmarks.throughput --config configs/cartpole_d256.toml \
  --modes eager,bf16,triton,graphs,compile,full --shapes config,16x64 --updates 200 \
  --json "$OUT/throughput.json"

step "kernel benchmarks"
timeout 90 $py -m pytest -q -p no:cacheprovider benchmarks/test_bench_kernels.py \
  --benchmark-only -k "not envpool" --benchmark-json "$OUT/kernels.json"

step "where the time goes"
timeout 120 $py -m benchmarks.throughput --config configs/cartpole_d256.toml --modes full,eager \
  --shapes config --updates 50 --trace-dir /tmp/traces
for m in full eager; do
  [ -f "/tmp/traces/trace_${m}_8x25.json" ] &&
    $py -m profiling.summarize "/tmp/traces/trace_${m}_8x25.json" --top 25 > "$OUT/profile_${m}.txt"
done
step "done"
ls -la "$OUT"
