"""Evaluation of a trained agent: the episode loop the trainer uses, and a command that re-checks a
saved checkpoint on fresh episodes.

`python -m engine.evaluate RUN_DIR [--checkpoint best|latest] [--episodes 50] [--seed S]
[--policy mode|sample] [--device cpu|cuda|auto] [--json FILE]`

RUN_DIR is a training run's directory or an agent written by `python -m engine.export`.

The trainer's evaluations replay the same `log.eval_episodes` start states each time and keep the
best one as best.pt, so the best eval of a long run is the maximum of many noisy figures. This
command plays new episodes (by default seed general.seed + 30000, which no training or eval env
uses) with the checkpoint's policy and prints the mean, spread and how many reach the task's
solved return, and how the episodes ended (`episode_ends`).

torch is imported inside the functions that need it: engine.report reads `END_KINDS` and
`END_TEXT` from here and never imports torch.
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

if TYPE_CHECKING:
    import torch
    from torch import Tensor

    from engine.agent import Agent
    from engine.config import Config

EVAL_SEED_OFFSET = 30_000
"""Fresh episodes: training envs use general.seed, eval envs + 10000, dream videos + 20000."""


class RunError(Exception):
    """A run directory or checkpoint that cannot be used: one-line message."""


# --------------------------------------------------------------------------------------------
# Episodes.


# How an episode ended, in display order. LunarLander-v3 ends by termination when the lander
# comes to rest (the last reward is +100: it replaces that step's shaping) or crashes / flies off
# the sides (-100); a CartPole-v1 termination is the pole falling (or the cart leaving the
# track). Both are cut at their time limit (1,000 and 500 steps), where the last reward is
# LunarLander's shaping (a few units either way) or CartPole's 1.
END_KINDS: dict[str, tuple[str, ...]] = {"LunarLander-v3": ("rest", "crash", "time_limit")}
DEFAULT_END_KINDS = ("terminated", "time_limit")
END_TEXT = {
    "rest": "rest",
    "crash": "crash",
    "terminated": "terminated",
    "time_limit": "at the time limit",
}


def end_kinds(task: str) -> tuple[str, ...]:
    """The ways an episode of `task` can end, in display order."""
    return END_KINDS.get(task, DEFAULT_END_KINDS)


def episode_ends(task: str, terminal: np.ndarray, last_reward: np.ndarray) -> dict[str, Any]:
    """How each episode ended: {kind: boolean mask over the episodes}, keys `end_kinds(task)` in
    order; every episode is in exactly one. LunarLander-v3: "rest" (terminated, last reward > 0),
    "crash" (terminated, last reward <= 0), "time_limit"; other tasks: "terminated",
    "time_limit". `terminal`: ended by the task (True) or cut at its time limit (False)."""
    terminal = np.asarray(terminal, dtype=bool)
    last_reward = np.asarray(last_reward, dtype=float)
    if terminal.shape != last_reward.shape:
        raise ValueError(f"terminal {terminal.shape} and last_reward {last_reward.shape} differ")
    kinds = end_kinds(task)
    if "rest" in kinds:
        masks = dict(rest=terminal & (last_reward > 0), crash=terminal & ~(last_reward > 0))
    else:
        masks = dict(terminated=terminal)
    masks["time_limit"] = ~terminal
    return {k: masks[k] for k in kinds}


def end_labels(ends: dict[str, Any]) -> list[str]:
    """Per episode, the kind of its end, from `episode_ends`' masks."""
    n = len(next(iter(ends.values())))
    labels = [""] * n
    for kind, mask in ends.items():
        for i in np.flatnonzero(mask):
            labels[i] = kind
    return labels


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
    import torch

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


def read_checkpoint(run_dir: Path, which: str | None) -> tuple[Path, dict[str, Any], Config]:
    """`run_dir`'s checkpoint `which` ("best" or "latest"; default best.pt, else latest.pt): its
    path, its contents (on the CPU) and the run's config (RUN_DIR/config.toml, else the one
    saved in the checkpoint). Only the "agent" entry is required (and "counters" read if
    present): an agent written by engine.export has no optimizer, RNG or replay state. Raises
    RunError with a one-line message."""
    import torch

    from engine import checkpoint
    from engine.config import ConfigError, from_dict, load_config

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
    return path, state, cfg


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
    latest.pt; see read_checkpoint), in eval mode, eager fp32 on the plain torch kernels (the
    parameters are the same on every path), and `num_envs` envs of the run's task to play in,
    seeded `seed` (default general.seed + seed_offset); worker processes if `processes` and the
    run used them. Prints the device notice, if any; raises RunError with a one-line message."""
    import torch

    from engine.agent import Agent
    from engine.envs import EnvError, make_env
    from engine.trainer import resolve_device

    path, state, cfg = read_checkpoint(run_dir, which)
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


def summary(episodes: Episodes, target: float, task: str = "") -> dict[str, Any]:
    """The figures of `episodes` of `task`, as the JSON record carries them: per end kind (see
    episode_ends) its count `KIND` and mean return `KIND_mean` (None without episodes), also as
    `end_counts`; per episode `end`. `terminated`/`terminated_mean` are there for every task."""
    returns, lengths, terminal, last = episodes
    ends = episode_ends(task, terminal, last)
    groups = dict(ends, terminated=terminal)

    def mean(x: np.ndarray) -> float | None:
        return float(x.mean()) if len(x) else None

    s = dict(
        episodes=len(returns),
        mean=float(returns.mean()),
        std=float(returns.std()),
        min=float(returns.min()),
        median=float(np.median(returns)),
        max=float(returns.max()),
        target=target,
        at_target=int((returns >= target).sum()),
        mean_length=float(lengths.mean()),
    )
    for kind, mask in groups.items():
        s[kind] = int(mask.sum())
        s[f"{kind}_mean"] = mean(returns[mask])
    s["end_counts"] = {kind: int(mask.sum()) for kind, mask in ends.items()}
    s.update(
        returns=[float(r) for r in returns],
        lengths=[int(n) for n in lengths],
        terminal=[bool(t) for t in terminal],
        last_rewards=[float(r) for r in last],
        end=end_labels(ends),
    )
    return s


def ends_text(s: dict[str, Any]) -> str:
    """'ends: 35 rest (mean return 206.2), 8 crash (mean -66.1), 7 at the time limit (mean
    29.2)' from summary's figures, the kinds in `end_counts`' order."""
    parts, what = [], "mean return"  # the first mean says what it is
    for kind in s["end_counts"]:
        n, m = s[kind], s[f"{kind}_mean"]
        parts.append(f"{n} {END_TEXT[kind]}" + (f" ({what} {m:.1f})" if n else ""))
        what = "mean" if n else what
    return "ends: " + ", ".join(parts)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.episodes < 1:
        fail(f"--episodes must be >= 1, got {args.episodes}")
    if args.target is not None and not math.isfinite(args.target):
        fail(f"--target must be a finite number, got {args.target}")
    import torch

    from engine.config import TASK_TARGETS
    from engine.report import DEFAULT_TARGET
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
    s = summary(episodes, target, e.name)
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
