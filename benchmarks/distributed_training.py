"""Whole training runs, data-parallel under torchrun against one process, in one benchmark run:

    python -m benchmarks.distributed_training --config configs/cartpole_d64.toml \\
        --nproc 2 --updates 400 --skip 100 --json out.json

Each arm is a real `engine.run` (envs, collection, replay, updates, no evaluation) in a fresh
run directory: `torchrun --nproc_per_node N` with one thread per rank, and one process with N
threads. They run in turn, data-parallel / one process / one process / data-parallel (a steady
drift of the machine falls on both alike), and each figure is the mean of its two runs. The
rates come from the runs' own metrics.jsonl, between update --skip and the last update (the
random bootstrap and the first compilations left out): updates/s, replayed steps/s (updates x
ranks x B x T) and env steps/s (every rank's). Time it alone on the machine."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.throughput import _commit
from engine.config import ConfigError, add_set_option, load_config
from engine.logger import read_metrics

ROOT = Path(__file__).resolve().parents[1]


def rates(metrics: list[dict], skip: int) -> dict[str, float]:
    """Updates/s and env steps/s between the first train line at or after update `skip` and
    the last one (their step, env_steps and wall_time)."""
    train = [r for r in metrics if r.get("type") == "train"]
    later = [r for r in train if r["step"] >= skip]
    if len(later) < 2:
        raise ValueError(f"fewer than two train lines at or after update {skip}")
    a, b = later[0], later[-1]
    seconds = b["wall_time"] - a["wall_time"]
    return dict(
        updates=b["step"] - a["step"],
        seconds=seconds,
        updates_per_sec=(b["step"] - a["step"]) / seconds,
        env_steps_per_sec=(b["env_steps"] - a["env_steps"]) / seconds,
    )


def command(arm: str, nproc: int, config: str, run_dir: Path, sets: list[str]) -> list[str]:
    entry = ["-m", "engine.run", "--config", config, "--run-dir", str(run_dir)]
    if arm == "data-parallel":
        launch = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                  f"--nproc_per_node={nproc}"]  # fmt: skip
        threads = 1
    else:
        launch, threads = [sys.executable], nproc
    sets = [*sets, f"general.threads={threads}"]
    return [*launch, *entry, *[x for kv in sets for x in ("--set", kv)]]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.distributed_training", description=__doc__.splitlines()[0]
    )
    p.add_argument("--config", default="configs/cartpole_d64.toml")
    p.add_argument("--nproc", type=int, default=2, help="ranks (the one process: as many threads)")
    p.add_argument("--updates", type=int, default=400, help="updates per run")
    p.add_argument("--skip", type=int, default=100, help="updates left out at the start")
    p.add_argument("--json", help="write the records here")
    add_set_option(p, "config override for both arms")
    args = p.parse_args(argv)
    if args.nproc < 1 or not 0 <= args.skip < args.updates:
        sys.exit("error: need --nproc >= 1 and 0 <= --skip < --updates")
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        sys.exit(f"error: {e}")
    log_every = max(1, min(cfg.log.log_every, (args.updates - args.skip) // 4))
    sets = [*args.overrides, f"train.max_train_steps={args.updates}", "log.eval_every=0",
            f"log.checkpoint_every={args.updates}", f"log.log_every={log_every}",
            "log.progress=false"]  # fmt: skip
    b, t = cfg.train.batch_size, cfg.train.sequence_length
    runs: dict[str, list[dict]] = {"data-parallel": [], "one process": []}
    env = dict(os.environ)
    env.pop("OMP_NUM_THREADS", None)  # each arm sets its threads through general.threads
    with tempfile.TemporaryDirectory(prefix="dist_train_") as tmp:
        for i, arm in enumerate(("data-parallel", "one process", "one process", "data-parallel")):
            run_dir = Path(tmp) / f"{i}_{arm.replace(' ', '_')}"
            cmd = command(arm, args.nproc, args.config, run_dir, sets)
            print(f"[{i + 1}/4] {arm}: {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
            done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
            if done.returncode != 0:
                tail = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
                sys.exit(f"error: the {arm} run failed (exit {done.returncode}): {tail}")
            r = rates(read_metrics(run_dir), args.skip)
            ranks = args.nproc if arm == "data-parallel" else 1
            r["replayed_steps_per_sec"] = r["updates_per_sec"] * ranks * b * t
            runs[arm].append(r)
    records = []
    for arm, rs in runs.items():

        def mean(key: str, rs: list[dict] = rs) -> float:
            return sum(r[key] for r in rs) / len(rs)

        ranks = args.nproc if arm == "data-parallel" else 1
        records.append(dict(
            arm=arm, ranks=ranks, threads_per_rank=1 if ranks > 1 else args.nproc,
            batch_per_update=f"{ranks}x{b}x{t}", updates_per_sec=mean("updates_per_sec"),
            replayed_steps_per_sec=mean("replayed_steps_per_sec"),
            env_steps_per_sec=mean("env_steps_per_sec"), runs=rs,
        ))  # fmt: skip
    print(f"{'arm':<15}{'ranks':>6}{'threads':>8}{'batch':>10}{'updates/s':>11}"
          f"{'replayed/s':>12}{'env steps/s':>13}")  # fmt: skip
    for r in records:
        print(f"{r['arm']:<15}{r['ranks']:>6}{r['threads_per_rank']:>8}"
              f"{r['batch_per_update']:>10}{r['updates_per_sec']:>11.2f}"
              f"{r['replayed_steps_per_sec']:>12.0f}{r['env_steps_per_sec']:>13.1f}")  # fmt: skip
    ratio = {k: records[0][k] / records[1][k] for k in
             ("updates_per_sec", "replayed_steps_per_sec", "env_steps_per_sec")}  # fmt: skip
    print(f"data-parallel / one process: updates {ratio['updates_per_sec']:.2f}x, replayed "
          f"steps {ratio['replayed_steps_per_sec']:.2f}x, env steps "
          f"{ratio['env_steps_per_sec']:.2f}x")  # fmt: skip
    if args.json:
        meta = dict(config=args.config, overrides=args.overrides, nproc=args.nproc,
                    updates=args.updates, skip=args.skip, commit=_commit(),
                    date=time.strftime("%Y-%m-%d %H:%M:%S"), cpus=os.cpu_count())  # fmt: skip
        Path(args.json).write_text(json.dumps(dict(meta, records=records), indent=1))


if __name__ == "__main__":
    main()
