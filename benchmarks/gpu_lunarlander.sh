#!/usr/bin/env bash
# LunarLander-v3 from image + vector on the H200 test machine, as one prepared run under 10
# minutes: trains configs/lunarlander_d64_gpu.toml for BUDGET seconds of wall time (default 420),
# then writes into $OUT (at most 8 files, the device tool's limit):
#   run.log          everything printed (eval lines: "step N env_steps M: eval return R ...")
#   metrics.jsonl    the run's metrics, for `python -m engine.report` here
#   config.toml      the resolved config it ran
#   eval.png, losses.png, behavior.png, summary.txt   python -m engine.report of the run
#   reeval.json      python -m engine.evaluate of its best.pt on 30 fresh episodes (90 s at most)
# envpool is too big to carry, so the envs are gymnasium's, one worker process per env
# (env.processes) on the machine's 16 cores. If the fast run fails in its first 3 minutes (the CUDA
# graphs or compile path has never run on this machine before), the rest of the budget goes to a
# run without graphs, and if that fails too, to an eager fp32 run; run.log says which ran.
# Usage, from a machine with network (once): bash benchmarks/fetch_gpu_wheels.sh
# then with the device tool:  carry [".whl"], command "bash benchmarks/gpu_lunarlander.sh",
# timeout_s 590.
set -uo pipefail
OUT=${OUT:-benchmarks/results/gpu_lunarlander_$(date +%F)}
BUDGET=${BUDGET:-420}
CONFIG=${CONFIG:-configs/lunarlander_d64_gpu.toml}
mkdir -p "$OUT"
RUNS=$(mktemp -d /tmp/gpu_lunarlander.XXXX)  # fresh run dirs, also when run again on a warm machine
export PYTHONUNBUFFERED=1
exec > >(tee "$OUT/run.log") 2>&1
start=$(date +%s)
source benchmarks/use_gpu_wheels.sh
py=python3
$py -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
git rev-parse --short HEAD 2>/dev/null || true
envs=(--set env.backend=gymnasium --set env.processes=true --set general.threads=4)

attempt() {  # attempt NAME [--set ...]: train until the budget is spent; echo the exit status
  local name=$1 left
  shift
  left=$((start + BUDGET - $(date +%s)))
  if [ "$left" -lt 30 ]; then return 124; fi
  echo "=== $name: $left s left ($(date +%T))"
  timeout -s TERM -k 20 "$left" $py -m engine.run --config "$CONFIG" --run-dir "$RUNS/$name" \
    "${envs[@]}" "$@"
}
ran=fast
attempt fast
rc=$?
if [ $rc -ne 0 ] && [ $rc -ne 124 ] && [ $rc -ne 130 ] && [ $(($(date +%s) - start)) -lt 180 ]; then
  ran=nographs
  attempt nographs --set general.cuda_graphs=false
  rc=$?
  if [ $rc -ne 0 ] && [ $rc -ne 124 ] && [ $rc -ne 130 ]; then
    ran=eager
    attempt eager --set general.cuda_graphs=false --set general.compile=false \
      --set 'general.precision="fp32"' --set general.batched_wgrad=false
    rc=$?
  fi
fi
echo "=== $ran run ended with exit status $rc after $(($(date +%s) - start)) s"
run=$RUNS/$ran
cp "$run/metrics.jsonl" "$run/config.toml" "$OUT/" 2>/dev/null
$py -m engine.report "$run" --out "$OUT" --target 200 || true
# The run's config.toml holds the gymnasium worker-process envs it trained with.
timeout -k 10 90 $py -m engine.evaluate "$run" --episodes 30 --json "$OUT/reeval.json" ||
  echo "=== engine.evaluate did not finish"
grep "eval return" "$OUT/run.log" | tail -n 3
ls -la "$OUT"
