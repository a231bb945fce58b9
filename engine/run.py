"""Command line: `python -m engine.run --config configs/cartpole_d256.toml [--set KEY=VALUE ...]`.

Config and input errors print one line and exit with status 2; a run stopped by a health check
(diverged training) prints one line and exits with status 3; no traceback. Under torchrun
(engine.distributed) one agent trains data-parallel over the ranks, or a population's members
are split over them (--population K: K / ranks each); rank 0 speaks for the job, and a rank
whose peer is gone prints one line naming that rank and exits with status 4."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from engine.config import ConfigError, add_set_option, load_config


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m engine.run", description=__doc__.splitlines()[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--config", help="a .toml config, or the archive's .json format")
    src.add_argument(
        "--resume",
        metavar="DIR",
        help="continue the run in DIR from its latest checkpoint (its config.toml, plus any --set)",
    )
    add_set_option(p, "override a config key, e.g. --set train.batch_size=16 (repeatable)")
    p.add_argument("--run-dir", help="run directory (default runs/<MM-DD_HHMM>_<config name>)")
    p.add_argument(
        "--population",
        type=int,
        metavar="K",
        help="train K agents in one process, seeds general.seed .. general.seed + K - 1 "
        "(overrides population.size; on --resume it must match the run's)",
    )
    p.add_argument("--device", choices=["cpu", "cuda", "auto"], help="overrides general.device")
    p.add_argument(
        "--profile",
        metavar="START:STOP",
        help="profile learner steps START..STOP "
        "(NVTX + cudaProfilerStart/Stop; overrides general.profile)",
    )
    return p.parse_args(argv)


_QUIET = False  # a torchrun rank other than 0: rank 0 prints the job's errors


def fail(message: str, status: int = 2) -> None:
    if not _QUIET:
        print(f"error: {message}", file=sys.stderr)
    sys.exit(status)


def default_run_dir(name: str) -> Path:
    base = Path("runs") / f"{time.strftime('%m-%d_%H%M')}_{name}"
    path, i = base, 1
    while path.exists():
        i += 1
        path = base.with_name(f"{base.name}_{i}")
    return path


def main(argv: list[str] | None = None) -> None:
    from engine import distributed

    try:
        _main(argv)
    finally:
        distributed.shutdown()


def _start_distributed(cfg):
    """Joins the torchrun job (None without torchrun); only rank 0 prints from here on."""
    global _QUIET
    from engine import distributed

    if not distributed.launched():
        return None
    from engine.device import resolve_device

    try:
        d = distributed.init(resolve_device(cfg.general.device)[0].type)
    except (RuntimeError, ValueError) as e:
        fail(f"torch.distributed could not start: {str(e).strip().splitlines()[0]}")
    _QUIET = d.rank != 0
    return d


def _main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    overrides = list(args.overrides) + ([f"general.device={args.device}"] if args.device else [])
    overrides += [f'general.profile="{args.profile}"'] if args.profile else []
    overrides += [f"population.size={args.population}"] if args.population is not None else []
    try:
        if args.resume:
            run_dir = Path(args.resume)
            if not (run_dir / "config.toml").is_file():
                fail(f"{run_dir}: not a run directory (no config.toml)")
            if args.population is not None:
                size = load_config(run_dir / "config.toml").population.size
                if size != args.population:
                    fail(
                        f"{run_dir}: holds a population of {size}, not {args.population} "
                        "(--population); a run resumes with its own members"
                    )
            cfg = load_config(run_dir / "config.toml", overrides)
            dist = _start_distributed(cfg)
        else:
            cfg = load_config(args.config, overrides)
            dist = _start_distributed(cfg)
            run_dir = Path(args.run_dir) if args.run_dir else default_run_dir(cfg.name)
            taken = (run_dir / "metrics.jsonl").exists()
            if dist is not None:  # rank 0's choice and check, for every rank
                run_dir, taken = dist.broadcast_object((run_dir, taken), "run directory")
            if taken:
                fail(f"{run_dir}: already holds a run; continue it with --resume {run_dir}")
    except ConfigError as e:
        fail(str(e))
    # Imported after the config is known good: torch and the envs take seconds to import.
    from engine.distributed import PeerLost
    from engine.envs import EnvError
    from engine.health import HealthError, TrainingError
    from engine.logger import require_tensorboard
    from engine.trainer import Trainer

    population = cfg.population.size > 1
    # A population's checkpoint is population.pt plus member_*/checkpoints/latest.pt.
    saved = run_dir / "checkpoints" / ("population.pt" if population else "latest.pt")
    members = f"; members in {run_dir}/member_*/" if population else ""
    try:
        if cfg.log.tensorboard:
            require_tensorboard()  # before the run directory is made
        run_dir.mkdir(parents=True, exist_ok=True)
        if population:
            from engine.population import PopulationTrainer as Trainer
        trainer = Trainer(cfg, run_dir, resume=bool(args.resume))
        try:
            result = trainer.run()
        finally:
            trainer.close()
    except PeerLost as e:
        print(f"error: {e}; the last checkpoint in {saved.parent} is intact", file=sys.stderr)
        sys.exit(4)
    except HealthError as e:
        fail(str(e), status=3)
    except (EnvError, TrainingError) as e:
        fail(str(e))
    except KeyboardInterrupt:
        if _QUIET:
            sys.exit(130)
        print(
            f"\ninterrupted: checkpoint written to {saved}; "
            f"continue with: {_resume_command(run_dir)}",
            file=sys.stderr,
        )
        sys.exit(130)
    if _QUIET:
        return
    mb = result["checkpoint_bytes"] / 1e6
    early = f" ({result['stop_kind']})" if result["stop_reason"] else ""
    k = cfg.population.size
    mean, best = (f" (mean of {k} members)", " (best member)") if population else ("", "")
    print(
        f"done{early}: {result['step']} updates, {result['env_steps']} env steps, "
        f"{result['wall_time']:.0f} s, last eval {result['last_eval']:.1f}{mean}, "
        f"best eval {result['best_eval']:.1f}{best}, checkpoint {mb:.1f} MB "
        f"({saved}){members}"
    )


def _resume_command(run_dir: Path) -> str:
    """The command that continues this run: under torchrun, with the same number of ranks (a
    checkpoint resumed with another world size is refused)."""
    from engine.envs import local_ranks

    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return f"python -m engine.run --resume {run_dir}"
    if local_ranks() == world:
        return (
            f"python -m engine.launch --standalone --nproc_per_node {world} -m engine.run "
            f"--resume {run_dir}"
        )
    return f"torchrun (the same {world} ranks) -m engine.run --resume {run_dir}"


if __name__ == "__main__":
    main()
