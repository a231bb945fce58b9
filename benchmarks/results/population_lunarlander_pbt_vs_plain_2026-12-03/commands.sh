#!/bin/bash
# PBT vs plain population on LunarLander-v3 (d64, image+state), 4 members each, same grid.
cd /work/main
GRID='population.grid={"train.actor_lr" = [5e-5, 1e-4, 2e-4, 4e-4], "train.actor_entropy_coef" = [1e-3, 3e-3, 3e-3, 1e-2]}'
COMMON=(--config configs/lunarlander_d64.toml --population 4 --set general.threads=1
        --set train.replay_buffer_size=50000 --set log.eval_every=100 --set log.eval_episodes=5 --set log.checkpoint_every=200
        --set "$GRID")
nohup nice -n 5 python -m engine.run "${COMMON[@]}" --run-dir /work/runs/ll_pbt \
    --set population.pbt.every=200 > /work/runs/ll_pbt.log 2>&1 &
echo $! > /work/runs/ll_pbt.pid
nohup nice -n 5 python -m engine.run "${COMMON[@]}" --run-dir /work/runs/ll_plain \
    > /work/runs/ll_plain.log 2>&1 &
echo $! > /work/runs/ll_plain.pid
