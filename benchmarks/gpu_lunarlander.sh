#!/usr/bin/env bash
# LunarLander-v3 from image + vector on the H200 test machine, as one prepared run under 10
# minutes: trains configs/lunarlander_d64_gpu.toml for BUDGET seconds of wall time (default 420),
# then writes into $OUT (at most 8 files, the device tool's limit):
#   run.log          everything printed (eval lines: "step N env_steps M: eval return R ...")
#   run.tar.gz       the run directory without its checkpoints (config.toml, metrics.jsonl, and
#                    with POP > 1 population.md/.csv and member_*/), for `python -m engine.report` here
#   eval.png, losses.png, behavior.png, ends.png, summary.txt   python -m engine.report of the run
#   reeval.json      python -m engine.evaluate of its best.pt on 30 fresh episodes (90 s at most;
#                    with POP > 1 one record per member, {"member_00": {...}, ...})
# POP (default 1) > 1 trains that many seeds (general.seed .. + POP-1) as one population: stacked
# weights, one update, one CUDA graph (README, "Populations").
# envpool is too big to carry, so the envs are gymnasium's, one worker process per env
# (env.processes) on the machine's 16 cores. MODE (default graphs) picks the speed switches:
#   graphs  CUDA graphs + bf16 without torch.compile. The second H200 run (POP=3, MODE=full,
#           results/gpu_h200_2026-12-04b/) spent ~230 s of its 282 s compiling and made 100
#           updates; a graph of eager kernels is captured in seconds, and the run is bound by the
#           gymnasium envs anyway (1,249 env steps/s from 48 worker processes: 6.5 updates/s at
#           POP=3, train_ratio 2), not by the update.
#   full    the config's switches (compile + CUDA graphs + bf16): for budgets of 15 minutes or more.
# If the first run fails in its first 3 minutes (a path never run on this machine), the rest of
# the budget goes to an eager fp32 run; run.log says which ran.
# Usage, from a machine with network (once): bash benchmarks/fetch_gpu_wheels.sh
# then with the device tool:  carry [".whl"], command "bash benchmarks/gpu_lunarlander.sh",
# timeout_s 590.
set -uo pipefail
OUT=${OUT:-benchmarks/results/gpu_lunarlander_$(date +%F)}
BUDGET=${BUDGET:-420}
CONFIG=${CONFIG:-configs/lunarlander_d64_gpu.toml}
POP=${POP:-1}
MODE=${MODE:-graphs}
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
if [ "$POP" -gt 1 ]; then envs+=(--population "$POP"); fi

attempt() {  # attempt NAME [--set ...]: train until the budget is spent; echo the exit status
  local name=$1 left
  shift
  left=$((start + BUDGET - $(date +%s)))
  if [ "$left" -lt 30 ]; then return 124; fi
  echo "=== $name: $left s left ($(date +%T))"
  timeout -s TERM -k 20 "$left" $py -m engine.run --config "$CONFIG" --run-dir "$RUNS/$name" \
    "${envs[@]}" "$@"
}
ran=$MODE
if [ "$MODE" = graphs ]; then
  attempt graphs --set general.compile=false
else
  attempt full
fi
rc=$?
if [ $rc -ne 0 ] && [ $rc -ne 124 ] && [ $rc -ne 130 ] && [ $(($(date +%s) - start)) -lt 180 ]; then
  ran=eager
  attempt eager --set general.cuda_graphs=false --set general.compile=false \
    --set 'general.precision="fp32"' --set general.batched_wgrad=false
  rc=$?
fi
echo "=== $ran run ended with exit status $rc after $(($(date +%s) - start)) s"
run=$RUNS/$ran
tar -czf "$OUT/run.tar.gz" -C "$RUNS" --exclude=checkpoints "$ran" 2>/dev/null ||
  echo "=== no run directory to pack"
$py -m engine.report "$run" --out "$OUT" --target 200 || true
# The run's config.toml holds the gymnasium worker-process envs it trained with.
if [ "$POP" -gt 1 ]; then
  for m in "$run"/member_*; do
    timeout -k 10 $((90 / POP + 10)) $py -m engine.evaluate "$m" --episodes 30 \
      --json "$RUNS/reeval_$(basename "$m").json" || echo "=== engine.evaluate of $m did not finish"
  done
  $py - "$RUNS" "$OUT/reeval.json" <<'PY'
import json, pathlib, sys
runs, out = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
merged = {p.stem[len("reeval_"):]: json.loads(p.read_text()) for p in sorted(runs.glob("reeval_*.json"))}
out.write_text(json.dumps(merged, indent=1))
print("reeval:", {k: round(v["mean"], 1) for k, v in merged.items()})
PY
else
  timeout -k 10 90 $py -m engine.evaluate "$run" --episodes 30 --json "$OUT/reeval.json" ||
    echo "=== engine.evaluate did not finish"
fi
grep "eval return" "$OUT/run.log" | tail -n 3
ls -la "$OUT"
