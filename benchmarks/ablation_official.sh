#!/usr/bin/env bash
# The official-details ablation: the engine's first reading of DreamerV3 ("base"), each official
# detail switched on alone, and all of them together, as one engine.sweep with one arm each.
# Every arm spells out all the switched keys, so the command means the same whatever the engine's
# defaults are (since the ablation they are the official ones, i.e. the "all" arm).
#
#   bash benchmarks/ablation_official.sh CONFIG OUT [SEEDS] [MAX_STEPS] [PARALLEL] [extra sweep args]
#   bash benchmarks/ablation_official.sh configs/cartpole_d64.toml sweeps/cp_ablation 2 2500 2
#
# Every switched key is a member setting (config.GRID_KEYS), so `--population 9` after the five
# positional arguments trains all arms of a seed as one population process (extra sweep args
# such as `--set general.compile=true` follow it; a later --set wins over the threads=1 below):
#   bash benchmarks/ablation_official.sh configs/lunarlander_d64.toml sweeps/ll_ablation 1 4000 1 \
#       --population 9 --set general.threads=2 --set train.replay_buffer_size=100000
# and each further seed in another OUT: SEEDS 1 and `--first-seed N` after `--population 9`.
# The table: python -m benchmarks.ablation_table OUT [OUT ...] --from 2000 --to 4000 (its
# docstring says how to re-evaluate the final agents first; --save keeps its inputs to commit).
#
# The base arm's loss scale is beta_dyn 0.5 (the d64 configs before the ablation); the "scales"
# arm is the official 1.0. Runs use one thread each (--parallel of them share the CPU).
set -euo pipefail
config=${1:?config}
out=${2:?output sweep directory}
seeds=${3:-2}
steps=${4:-2500}
parallel=${5:-2}
shift $(( $# < 5 ? $# : 5 ))

engine="models.twohot_space=symlog;models.init=engine"
engine+=";train.optimizer=adam;train.adam_eps=1e-8;train.agc=0"
engine+=";train.wm_grad_clip=1000;train.actor_grad_clip=100;train.critic_grad_clip=100"
engine+=";train.lr_warmup_steps=0;train.retnorm_init=first;train.repval_scale=0"
engine+=";train.replay_context=false;train.beta_dyn=0.5"

# arm name -> the official values it switches on (replacing base's values of those keys)
declare -A official=(
  [real]="models.twohot_space=real"
  [scales]="train.beta_dyn=1.0"
  [repval]="train.repval_scale=0.3"
  [opt]="train.optimizer=laprop;train.adam_eps=1e-20;train.agc=0.3;train.wm_grad_clip=0;train.actor_grad_clip=0;train.critic_grad_clip=0;train.lr_warmup_steps=1000"
  [init]="models.init=official"
  [retnorm0]="train.retnorm_init=zero"
  [context]="train.replay_context=true"
)
order=(real scales repval opt init retnorm0 context)

# base with `changes` applied: a key given in changes replaces base's item for that key.
with() {
  local changes=$1 item key out=()
  IFS=';' read -ra items <<< "$engine"
  for item in "${items[@]}"; do
    key=${item%%=*}
    [[ ";$changes" == *";$key="* ]] || out+=("$item")
  done
  IFS=';' read -ra extra <<< "$changes"
  out+=("${extra[@]}")
  local IFS=';'
  echo "${out[*]}"
}

arms=(--arm "base:$engine")
all=""
for name in "${order[@]}"; do
  arms+=(--arm "$name:$(with "${official[$name]}")")
  all+="${all:+;}${official[$name]}"
done
arms+=(--arm "all:$(with "$all")")

exec python -m engine.sweep --config "$config" --seeds "$seeds" --parallel "$parallel" \
  --max-steps "$steps" --set general.threads=1 --set log.progress=false --out "$out" \
  "${arms[@]}" "$@"
