#!/usr/bin/env bash
# Profile a window of learner updates with Nsight Systems.
#   profiling/nsys.sh [CONFIG] [START:STOP] [extra engine.run args...]
# Only the updates START..STOP are captured (the engine calls cudaProfilerStart/Stop there), with
# CUDA API + kernels, NVTX ranges (collect, replay/sample, world_model/*, behavior/*,
# actor_critic/*, evaluate) and each kernel inside replayed CUDA graphs.
set -euo pipefail
config=${1:-configs/cartpole_d256_gpu.toml}
window=${2:-200:230}
shift $(( $# > 2 ? 2 : $# ))
out=${NSYS_OUT:-profiling/dreamer_$(date +%m-%d_%H%M)}
stop=${window#*:}
nsys profile \
  --capture-range=cudaProfilerApi --capture-range-end=stop \
  --trace=cuda,nvtx,osrt \
  --cuda-graph-trace=node \
  --sample=none --cpuctxsw=none \
  --force-overwrite=true -o "$out" \
  python -m engine.run --config "$config" --profile "$window" \
    --set "train.max_train_steps=$((stop + 1))" --set log.eval_every=0 "$@"
nsys stats --report nvtx_sum,cuda_gpu_kern_sum,cuda_api_sum --format table "$out.nsys-rep" \
  | tee "$out.txt"
echo "report: $out.nsys-rep (open in Nsight Systems), summary: $out.txt"
