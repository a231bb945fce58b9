#!/usr/bin/env bash
# A torch.profiler chrome trace of a window of learner updates; works on a CPU too.
#   profiling/trace.sh [CONFIG] [START:STOP] [extra engine.run args...]
# Writes RUN_DIR/trace.json: open it in https://ui.perfetto.dev or chrome://tracing.
set -euo pipefail
config=${1:-configs/cartpole_d64.toml}
window=${2:-20:25}
shift $(( $# > 2 ? 2 : $# ))
stop=${window#*:}
run_dir=${RUN_DIR:-runs/trace_$(date +%m-%d_%H%M%S)}
python -m engine.run --config "$config" --run-dir "$run_dir" --profile "$window" \
  --set general.trace=true --set "train.max_train_steps=$((stop + 1))" --set log.eval_every=0 "$@"
python -m profiling.summarize "$run_dir/trace.json"
