#!/usr/bin/env bash
# Data-parallel checks for a session lent the H200 (issue 13), as one prepared run: files into
# $OUT (the device tool's return folder), each step under its own time limit, so a run cut short
# still returns what it finished:
#   distributed_tests.log  pytest tests/test_distributed.py: the gloo tests on the GPU's host,
#                          the NCCL ones (marked gpu; those needing 2+ GPUs skip on one H200)
#   distributed_ws1.json   benchmarks.distributed under torchrun --nproc_per_node 1 (NCCL):
#                          the cartpole_d256 update plain and data-parallel, eager and full
#                          (compile + CUDA graphs + bf16; the gradient all-reduce and the return
#                          all-gather are captured in the graph)
#   run.log                everything printed
# Target (issue 13): the distributed path at world size 1 costs under 5% against the plain one.
# Usage (device tool): carry the py3.12 wheels (benchmarks/fetch_gpu_wheels.sh) and run
#   bash benchmarks/gpu_distributed.sh
set -uo pipefail
source benchmarks/gpu_start.sh gpu_distributed

step "distributed tests"
timeout 240 $py -m pytest -q -p no:cacheprovider tests/test_distributed.py \
  2>&1 | tee "$OUT/distributed_tests.log"

step "world size 1 over NCCL against the plain update, d256 8x25"
timeout 420 $py -m torch.distributed.run --standalone --nproc_per_node 1 -m benchmarks.distributed \
  --config configs/cartpole_d256.toml --modes eager,full --shape 8x25 --updates 50 \
  --json "$OUT/distributed_ws1.json"
step "done"
ls -la "$OUT"
