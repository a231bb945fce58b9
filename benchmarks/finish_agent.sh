#!/usr/bin/env bash
# A solved run's final agent as a committed agent folder, checked twice:
#   bash benchmarks/finish_agent.sh RUN_DIR benchmarks/results/agents/NAME [SEED]
# 1. exports RUN_DIR's latest.pt (the run's final checkpoint: a run stopped by
#    train.stop_solved_evals ends on the agent its confirmation judged) to AGENT_DIR
#    (config.toml + agent.safetensors, weights only);
# 2. evaluates it on 50 fresh greedy episodes from the default eval seed into AGENT_DIR/eval_50.json
#    (tests/test_committed_agents.py plays these again, return for return);
# 3. evaluates it on 50 more from SEED (default 40000 + general.seed) into
#    AGENT_DIR/eval_50_seed<SEED>.json: episodes no stopping rule saw.
# Paths are taken from the repository root (the records name the agent file as given).
# Then commit AGENT_DIR: git add AGENT_DIR (5.3 MB at d64).
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: bash benchmarks/finish_agent.sh RUN_DIR AGENT_DIR [SEED]" >&2
  exit 2
fi
run=$1 agent=$2
cd "$(dirname "$0")/.."
python -m engine.export "$run" "$agent" --checkpoint latest
python -m engine.evaluate "$agent" --episodes 50 --json "$agent/eval_50.json"
seed=${3:-$(python -c "from engine.config import load_config; print(40000 + load_config('$agent/config.toml').general.seed)")}
python -m engine.evaluate "$agent" --episodes 50 --seed "$seed" --json "$agent/eval_50_seed$seed.json"
