"""The cost of the data-parallel path (engine.distributed): the learner update measured plain and
with gradients averaged over ranks, in the same processes, under torchrun:

    torchrun --standalone --nproc_per_node 1 -m benchmarks.distributed \\
        --config configs/cartpole_d256.toml --modes eager --updates 20

The two are measured in turn, twice each (plain, data-parallel, data-parallel, plain: a steady
drift cancels), and averaged. With one rank this is what the distributed path costs on top of
the plain update (the all-reduce of a world of 1, the all-gather of the return normaliser, the
flat gradient buffer).
With N ranks each rank updates on its own B x T, so the job trains on N x B x T per update:
agent-updates/s stays one per update, replayed steps/s grows N-fold. Rank 0 prints the table and
writes --json. On CUDA use one GPU per rank (NCCL); on the CPU gloo."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from benchmarks.throughput import MODES, _commit, measure
from engine.checkpoint import atomic_write
from engine.config import ConfigError, add_set_option, load_config


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.distributed", description=__doc__)
    p.add_argument("--config", default="configs/cartpole_d256.toml")
    p.add_argument("--modes", default="eager", help=f"comma-separated, from: {', '.join(MODES)}")
    p.add_argument("--shape", default="config", help="BxT per rank; 'config': the config's")
    p.add_argument("--updates", type=int, default=20, help="timed updates per measurement")
    p.add_argument("--json", help="rank 0 writes the records here")
    add_set_option(p, "config override for every measurement")
    args = p.parse_args(argv)

    from engine import distributed

    if not distributed.launched():
        sys.exit("error: run this under torchrun (torchrun --standalone --nproc_per_node N -m "
                 "benchmarks.distributed ...)")  # fmt: skip
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        sys.exit(f"error: {e}")
    modes = args.modes.split(",")
    if unknown := [m for m in modes if m not in MODES]:
        sys.exit(f"error: unknown mode(s) {', '.join(unknown)}; choose from {', '.join(MODES)}")
    if args.shape == "config":
        b, t = cfg.train.batch_size, cfg.train.sequence_length
    else:
        b, t = (int(x) for x in args.shape.split("x"))
    records = []
    for mode in modes:
        # In turn, plain / data-parallel / data-parallel / plain, so that what the order changes
        # (warm-up, allocator, caches, a drift over time) falls on both alike: each figure is the
        # mean of its two measurements. Plain runs on every rank at once, with no collectives.
        runs = {False: [], True: []}
        for dp in (False, True, True, False):
            runs[dp].append(measure(args.config, mode, b, t, args.updates, extra=args.overrides,
                                    data_parallel=dp))  # fmt: skip
        ms = {dp: sum(r["ms_per_update"] for r in rs) / len(rs) for dp, rs in runs.items()}
        d = distributed.current()
        records.append(dict(
            mode=mode, world_size=d.world, backend=d.backend, batch_per_rank=b,
            sequence_length=t, plain_ms=ms[False], data_parallel_ms=ms[True],
            plain=runs[False], data_parallel=runs[True], overhead=ms[True] / ms[False] - 1,
        ))  # fmt: skip
        if d.rank == 0 and args.json:  # after every mode: a run cut short keeps what it measured
            _save(args, records)
    d = distributed.current()
    if d.rank == 0:
        print(f"{'mode':<12}{'ranks':>6}{'B x T/rank':>12}{'plain ms':>10}{'dist ms':>10}"
              f"{'overhead':>10}")  # fmt: skip
        for r in records:
            print(f"{r['mode']:<12}{r['world_size']:>6}{f'{b}x{t}':>12}"
                  f"{r['plain_ms']:>10.1f}{r['data_parallel_ms']:>10.1f}"
                  f"{100 * r['overhead']:>9.1f}%")  # fmt: skip
    distributed.shutdown()


def _save(args: argparse.Namespace, records: list[dict]) -> None:
    import time

    name = records[0]["plain"][0]["device_name"] if records else None
    meta = dict(config=args.config, overrides=args.overrides, commit=_commit(),
                date=time.strftime("%Y-%m-%d %H:%M:%S"), device_name=name)  # fmt: skip
    text = json.dumps(dict(meta, records=records), indent=1)
    atomic_write(Path(args.json), lambda tmp: tmp.write_text(text))


if __name__ == "__main__":
    main()
