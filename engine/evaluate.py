"""Evaluation of a trained agent: the episode loop the trainer uses, and a command that re-checks a
saved checkpoint on fresh episodes.

`python -m engine.evaluate RUN_DIR [--checkpoint best|latest] [--episodes 50] [--seed S]
[--policy mode|sample] [--device cpu|cuda|auto] [--json FILE]`

The trainer's evaluations replay the same `log.eval_episodes` start states each time and keep the
best one as best.pt, so the best eval of a long run is the maximum of many noisy figures. This
command plays new episodes (by default seed general.seed + 30000, which no training or eval env
uses) with the checkpoint's policy and prints the mean, spread and how many reach the task's
solved return.
"""

from __future__ import annotations

import argparse
import json
import math
import pickle
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, NoReturn

import numpy as np
import torch
from torch import Tensor

if TYPE_CHECKING:
    from engine.agent import Agent
    from engine.config import Config

EVAL_SEED_OFFSET = 30_000
"""Fresh episodes: training envs use general.seed, eval envs + 10000, dream videos + 20000."""


class RunError(Exception):
    """A run directory or checkpoint that cannot be used: one-line message."""


# --------------------------------------------------------------------------------------------
# Episodes.


class Episodes(NamedTuple):
    """One finished episode per env."""

    returns: np.ndarray
    lengths: np.ndarray
    terminal: np.ndarray  # ended by the task (True) or cut at its time limit (False)
    last_reward: np.ndarray  # the reward of the final step (LunarLander: +100 rest, -100 crash)


def play_episodes(
    agent: Agent,
    env: Any,
    to_device: Callable[[dict[str, np.ndarray]], dict[str, Tensor]],
    greedy: bool,
    record: Callable[[dict[str, np.ndarray], int], bool] | None = None,
) -> Episodes:
    """One episode in each of `env`'s envs, in parallel.

    `record(obs, action)` (optional) sees env 0's observation and the action chosen for it at each
    step until it returns False, then once more with the episode's last observation and action 0
    if env 0's episode ended while it was still recording."""
    obs = env.reset()
    device = next(agent.parameters()).device
    carry = agent.initial_carry(env.num_envs, device)
    returns = np.zeros(env.num_envs)
    lengths = np.zeros(env.num_envs, dtype=np.int64)
    done = np.zeros(env.num_envs, dtype=bool)
    terminal = np.zeros(env.num_envs, dtype=bool)
    last_reward = np.zeros(env.num_envs)
    recording = record is not None
    with torch.no_grad():
        while not done.all():
            action, carry = agent.policy(to_device(obs), carry, greedy)
            action = action.cpu().numpy()
            if recording:
                recording = record(obs, int(action[0]))
            obs = env.step(action)
            returns += np.where(done, 0.0, obs["reward"])
            lengths += ~done
            ending = obs["is_last"] & ~done
            terminal[ending] = obs["is_terminal"][ending]
            last_reward[ending] = obs["reward"][ending]
            done |= ending
    if recording:  # env 0 ended on the last step: its final frame (no action is executed)
        record(obs, 0)
    return Episodes(returns, lengths, terminal, last_reward)


# --------------------------------------------------------------------------------------------
# A run directory's agent.


@dataclass
class LoadedRun:
    cfg: Config
    agent: Agent
    path: Path  # the checkpoint file
    step: int  # the update it was saved at
    device: torch.device
    env: Any  # the envs to play in (the caller closes them)
    seed: int  # their seed


def load_run(
    run_dir: Path,
    which: str | None,
    device_pref: str | None,
    num_envs: int,
    seed: int | None,
    seed_offset: int,
    processes: bool = False,
) -> LoadedRun:
    """The agent of `run_dir`'s checkpoint `which` ("best" or "latest"; default best.pt, else
    latest.pt), in eval mode, eager fp32 on the plain torch kernels (the parameters are the same
    on every path), and `num_envs` envs of the run's task to play in, seeded `seed` (default
    general.seed + seed_offset); worker processes if `processes` and the run used them. Prints
    the device notice, if any; raises RunError with a one-line message."""
    from engine import checkpoint
    from engine.agent import Agent
    from engine.config import ConfigError, from_dict, load_config
    from engine.envs import EnvError, make_env
    from engine.trainer import resolve_device

    if not run_dir.is_dir():
        raise RunError(f"{run_dir}: no such run directory")
    ckpts = run_dir / "checkpoints"
    names = [which] if which else ["best", "latest"]
    found = [ckpts / f"{n}.pt" for n in names if (ckpts / f"{n}.pt").is_file()]
    if not found:
        raise RunError(f"{ckpts}: no {' or '.join(n + '.pt' for n in names)}")
    path = found[0]
    try:
        # On the CPU: load_state_dict copies onto the agent's device, whichever that is.
        state = checkpoint.load(path, torch.device("cpu"))
        if not isinstance(state, dict) or "agent" not in state:
            raise RunError(f"{path}: not a checkpoint of this engine (no agent state)")
        if (run_dir / "config.toml").is_file():
            cfg = load_config(run_dir / "config.toml")
        else:
            cfg = from_dict(state["config"], str(path))
    except ConfigError as err:
        raise RunError(str(err)) from None
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError, KeyError, TypeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise RunError(f"{path}: cannot read the checkpoint: {first}") from None
    device, notice = resolve_device(device_pref or cfg.general.device)
    if notice:  # no CUDA device: training-time notice, printed once here
        print(notice, file=sys.stderr)
    if cfg.general.threads:
        torch.set_num_threads(cfg.general.threads)
    e = cfg.env
    seed = cfg.general.seed + seed_offset if seed is None else seed
    try:
        env = make_env(
            e.name,
            e.backend,
            num_envs,
            seed,
            cfg.image_size,
            e.vector,
            processes=processes and e.processes,
        )
    except EnvError as err:
        raise RunError(str(err)) from None
    agent = Agent(cfg, env.vector_dim, env.num_actions, device)
    try:
        agent.load_state_dict(state["agent"])
    except (RuntimeError, KeyError) as err:
        env.close()
        first = str(err).strip().splitlines()[0]
        raise RunError(f"{path}: does not match {run_dir / 'config.toml'}: {first}") from None
    agent.eval()
    step = int(state.get("counters", {}).get("step", 0))
    return LoadedRun(cfg, agent, path, step, device, env, seed)


# --------------------------------------------------------------------------------------------
# The command line.


def fail(message: str, code: int = 2) -> NoReturn:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m engine.evaluate",
        description="Re-evaluate a run's checkpoint on fresh episodes.",
    )
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument(
        "--checkpoint",
        choices=["best", "latest"],
        help="which checkpoint (default best.pt, else latest.pt)",
    )
    p.add_argument("--episodes", type=int, default=50, help="episodes, in parallel (default 50)")
    p.add_argument("--seed", type=int, help=f"env seed (default general.seed + {EVAL_SEED_OFFSET})")
    p.add_argument(
        "--policy",
        choices=["mode", "sample"],
        help="greedy (mode) or sampled actions (default: the run's log.eval_policy)",
    )
    p.add_argument("--device", choices=["cpu", "cuda", "auto"], help="overrides general.device")
    p.add_argument("--target", type=float, help="solved return (default: the task's)")
    p.add_argument("--json", metavar="FILE", help="also write the figures and returns as JSON")
    return p.parse_args(argv)


def summary(episodes: Episodes, target: float) -> dict[str, Any]:
    returns, lengths, terminal, last = episodes
    cut = ~terminal

    def mean(x: np.ndarray) -> float | None:
        return float(x.mean()) if len(x) else None

    return dict(
        episodes=len(returns),
        mean=float(returns.mean()),
        std=float(returns.std()),
        min=float(returns.min()),
        median=float(np.median(returns)),
        max=float(returns.max()),
        target=target,
        at_target=int((returns >= target).sum()),
        mean_length=float(lengths.mean()),
        terminated=int(terminal.sum()),
        terminated_mean=mean(returns[terminal]),
        time_limit=int(cut.sum()),
        time_limit_mean=mean(returns[cut]),
        returns=[float(r) for r in returns],
        lengths=[int(n) for n in lengths],
        terminal=[bool(t) for t in terminal],
        last_rewards=[float(r) for r in last],
    )


def ends_text(s: dict[str, Any]) -> str:
    """'ends: 31 terminated (mean return 160.2), 19 at the time limit (mean 95.0)'."""
    parts = []
    for n, m, what in (
        (s["terminated"], s["terminated_mean"], "terminated"),
        (s["time_limit"], s["time_limit_mean"], "at the time limit"),
    ):
        parts.append(f"{n} {what}" + (f" (mean return {m:.1f})" if n else ""))
    return "ends: " + ", ".join(parts)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.episodes < 1:
        fail(f"--episodes must be >= 1, got {args.episodes}")
    if args.target is not None and not math.isfinite(args.target):
        fail(f"--target must be a finite number, got {args.target}")
    from engine.report import DEFAULT_TARGET, TASK_TARGETS
    from engine.transfer import ObsUploader

    try:
        run = load_run(
            Path(args.run_dir),
            args.checkpoint,
            args.device,
            args.episodes,
            args.seed,
            EVAL_SEED_OFFSET,
            processes=True,
        )
    except RunError as err:
        fail(str(err))
    cfg, e, seed = run.cfg, run.cfg.env, run.seed
    torch.manual_seed(seed)  # sampled latents and actions: the same command, the same figures
    try:
        greedy = (args.policy or cfg.log.eval_policy) == "mode"
        episodes = play_episodes(run.agent, run.env, ObsUploader(run.device), greedy)
    finally:
        run.env.close()
    target = args.target if args.target is not None else TASK_TARGETS.get(e.name, DEFAULT_TARGET)
    s = summary(episodes, target)
    policy = "greedy" if greedy else "sampled"
    print(
        f"{run.path} (step {run.step}), {s['episodes']} {policy} episodes of {e.name} from seed "
        f"{seed}: return {s['mean']:.1f} +- {s['std']:.1f} (min {s['min']:.1f}, median "
        f"{s['median']:.1f}, max {s['max']:.1f}); {s['at_target']}/{s['episodes']} >= "
        f"{target:g}; mean length {s['mean_length']:.1f}; {ends_text(s)}"
    )
    if args.json:
        from engine.checkpoint import atomic_write

        record = dict(checkpoint=str(run.path), step=run.step, task=e.name, seed=seed, **s)
        record["policy"] = policy
        try:
            atomic_write(Path(args.json), lambda tmp: tmp.write_text(json.dumps(record) + "\n"))
        except OSError as err:
            fail(f"{args.json}: {err.strerror or err}")


if __name__ == "__main__":
    main()
