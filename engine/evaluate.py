"""Re-checking a saved checkpoint on fresh episodes.

`python -m engine.evaluate RUN_DIR [--checkpoint best|latest] [--episodes 50] [--seed S]
[--policy mode|sample] [--device cpu|cuda|auto] [--json FILE]`

RUN_DIR is a training run's directory or an agent written by `python -m engine.export`.

The trainer's evaluations replay the same `log.eval_episodes` start states each time and keep the
best one as best.pt, so the best eval of a long run is the maximum of many noisy figures. This
command plays new episodes (by default seed general.seed + 30000, which no training or eval env
uses) with the checkpoint's policy and prints the mean, spread and how many reach the task's
solved return, and how the episodes ended (engine.episodes.episode_ends). The run directory is
read by engine.rundir, the episodes played by engine.episodes.play_episodes.

`--values` also checks the critic and the reward head against what happened: the critic's value
of each episode's first state against the episode's real discounted return (gamma of the run),
and the reward head's prediction at each step against the real reward. A critic that values a
policy far above what it earns is how a LunarLander run falls into hovering until the time limit.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from engine.episodes import END_TEXT, Episodes, end_labels, episode_ends, play_episodes
from engine.rundir import RunError, fail, load_run

EVAL_SEED_OFFSET = 30_000
"""Fresh episodes: training envs use general.seed, eval envs + 10000, dream videos + 20000."""


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
    p.add_argument(
        "--values",
        action="store_true",
        help="also compare the critic's value of each first state with the real discounted "
        "return, and the reward head's predictions with the real rewards",
    )
    return p.parse_args(argv)


class ValueProbe:
    """play_episodes' probe for --values: at each step the critic's value of the state the
    policy acted from and the reward head's prediction there (of the reward that led to it),
    beside the real reward of the step and which envs were playing. Arrays (T, N) by `arrays`."""

    def __init__(self, agent: Any) -> None:
        self.agent = agent
        self.steps: list[tuple[np.ndarray, ...]] = []

    def __call__(self, carry: Any, playing: np.ndarray, reward: np.ndarray) -> None:
        wm, behavior = self.agent.wm, self.agent.behavior
        feat = wm.feat(carry[0], carry[1])
        value = behavior.value(behavior.critic(feat).float())
        predicted = wm.reward(feat)
        self.steps.append((value.cpu().numpy(), predicted.cpu().numpy(), playing, reward))

    def arrays(self) -> tuple[np.ndarray, ...]:
        """(values, predicted rewards, playing, rewards), each (T, N)."""
        return tuple(np.stack(x) for x in zip(*self.steps))


def value_check(
    values: np.ndarray,
    predicted: np.ndarray,
    playing: np.ndarray,
    rewards: np.ndarray,
    gamma: float,
    ends: dict[str, np.ndarray],
) -> dict[str, Any]:
    """--values' figures from ValueProbe's arrays (T, N): per episode the critic's value of its
    first state and its real discounted return from there (cut where the episode ended: a
    time-limit episode's tail, weight gamma^length, is not in it); their mean difference, also
    per end kind (`ends`: episode_ends' masks); the same over every state the policy acted from
    (value against the discounted return to go, pooled over the states, so long episodes weigh
    more; cut the same way, more so late in a time-limit episode); and the reward head's mean
    prediction against the mean real reward over the steps it predicts (the reward that led to
    each observed state; the last step's leads to no observed state)."""
    real = np.where(playing, rewards, 0.0)
    to_go, later = np.zeros_like(real), np.zeros(real.shape[1])
    for t in range(len(real) - 1, -1, -1):
        later = real[t] + gamma * later
        to_go[t] = later
    start_return, start_value = to_go[0], values[0]
    bias = start_value - start_return
    gap = values - to_go

    def pooled(x: np.ndarray, m: np.ndarray) -> float:  # over the states of episodes m
        return float(x[playing & m].mean())

    every = np.ones(len(bias), dtype=bool)
    seen = playing[1:]  # state t (t >= 1) was observed: its prediction is of reward t-1
    return dict(
        gamma=gamma,
        value_start=[float(v) for v in start_value],
        return_start=[float(g) for g in start_return],
        value_start_mean=float(start_value.mean()),
        return_start_mean=float(start_return.mean()),
        value_bias=float(bias.mean()),
        value_bias_by_end={k: float(bias[m].mean()) for k, m in ends.items() if m.any()},
        states=int(playing.sum()),
        value_states_mean=pooled(values, every),
        return_states_mean=pooled(to_go, every),
        value_bias_states=pooled(gap, every),
        value_bias_states_by_end={k: pooled(gap, m) for k, m in ends.items() if m.any()},
        reward_predicted_mean=float(predicted[1:][seen].mean()) if seen.any() else None,
        reward_real_mean=float(rewards[:-1][seen].mean()) if seen.any() else None,
    )


def values_text(v: dict[str, Any], s: dict[str, Any]) -> str:
    """The --values line from value_check's figures and summary's (for the end counts)."""
    by_end = ", ".join(f"{s[k]} {END_TEXT[k]} {b:+.1f}" for k, b in v["value_bias_by_end"].items())
    by_state = v["value_bias_states_by_end"].items()
    by_state = ", ".join(f"{END_TEXT[k]} {b:+.1f}" for k, b in by_state)
    text = (
        f"values: the critic values the first state at {v['value_start_mean']:.1f} against a "
        f"real discounted return of {v['return_start_mean']:.1f} (gamma {v['gamma']:g}): "
        f"{v['value_bias']:+.1f} ({by_end}); over the {v['states']} states it acted from, "
        f"{v['value_states_mean']:.1f} against {v['return_states_mean']:.1f} to go: "
        f"{v['value_bias_states']:+.1f} ({by_state})"
    )
    if v["reward_predicted_mean"] is not None:
        pred, real = v["reward_predicted_mean"], v["reward_real_mean"]
        text += f"; reward head {pred:.3f} per step against {real:.3f} real ({pred - real:+.3f})"
    limited = [n for n, e in zip(s["lengths"], s["end"]) if e == "time_limit"]
    if limited:
        text += (
            f"; a time-limit episode's return stops at its limit (the rest weighs gamma^"
            f"{max(limited)} = {v['gamma'] ** max(limited):.3f} or less)"
        )
    return text


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

    from engine.config import DEFAULT_TARGET, TASK_TARGETS
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
        probe = ValueProbe(run.agent) if args.values else None
        episodes = play_episodes(run.agent, run.env, ObsUploader(run.device), greedy, probe=probe)
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
    if probe is not None:
        ends = episode_ends(e.name, episodes.terminal, episodes.last_reward)
        s["values"] = value_check(*probe.arrays(), cfg.train.gamma, ends)
        print(values_text(s["values"], s))
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
