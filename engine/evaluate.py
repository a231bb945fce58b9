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

`--values` also checks the critic and the world model against what happened: the critic's value
of each episode's first state against the episode's real discounted return (gamma of the run),
the reward head's prediction at each step against the real reward, and the world model's
imagination: from every state the policy acted from, the horizon's imagined steps (the prior
rolled forward with the same policy, as training imagines) and the discounted reward the reward
head expects along them, against the real discounted reward of the episode's next steps. A
critic that values a policy far above what it earns is how a LunarLander run falls into
hovering until the time limit; an imagination that pays more than the real steps is what feeds
that critic (the critic learns from imagined returns). `--policy sample` imagines and plays
with the sampled policy, as training's imagination does. For a task whose reward is a
potential's change (LunarLander, engine.episodes.POTENTIALS) with the state vector observed, the
imagination's excess is split in two by the decoded state vector: where the imagined states go
(dynamics) and what the reward head pays beyond what they show (reward head).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from engine.episodes import (
    END_TEXT,
    POTENTIALS,
    Episodes,
    end_labels,
    episode_ends,
    play_episodes,
)
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
        "return, the reward head's predictions with the real rewards, and the rewards imagined "
        "over the horizon from each state with the real next steps",
    )
    return p.parse_args(argv)


class ValueProbe:
    """play_episodes' probe for --values: at each step the critic's value of the state the
    policy acted from and the reward head's prediction there (of the reward that led to it),
    beside the real reward of the step and which envs were playing; and from that state the
    training horizon of imagined steps (Behavior.imagine, acting with the same policy, `greedy`
    or sampled) with the discounted reward the reward head expects along them, each imagined
    reward weighted as in training's lambda-return: gamma^k times the imagined probability
    that the episode is still running. Arrays (T, N) by `arrays`.

    The imagination draws from its own random stream (seeded `seed` + step), so the episodes
    played are those of the same command without the probe."""

    def __init__(
        self,
        agent: Any,
        gamma: float,
        greedy: bool = False,
        seed: int = 0,
        potential: Any = None,
    ) -> None:
        self.agent = agent
        self.gamma = gamma
        self.greedy = greedy
        self.seed = seed
        self.potential = potential
        self.steps: list[tuple[np.ndarray, ...]] = []
        self.shaping: list[tuple[np.ndarray, np.ndarray]] = []
        self.targets: list[np.ndarray] = []

    def __call__(self, carry: Any, playing: np.ndarray, reward: np.ndarray) -> None:
        wm, behavior = self.agent.wm, self.agent.behavior
        feat = wm.feat(carry[0], carry[1])
        value = behavior.value(behavior.critic(feat).float())
        predicted = wm.reward(feat)
        feats, weight = self.rollout(carry[0], carry[1])
        dreamed = self.paid(feats, weight)
        self.steps.append(
            (value.cpu().numpy(), predicted.cpu().numpy(), playing, reward, dreamed.cpu().numpy())
        )
        self.targets.append(self.target(feats).cpu().numpy())
        if self.potential is not None:
            # The decoded state vector's potential along the imagined states; at the start (the
            # posterior of the real state) it is the real state's, as the decoder reads it.
            phi = self.potential(wm.decode_vector(feats))  # (H+1, N)
            rise = (weight * (phi[1:] - phi[:-1])).sum(0)
            self.shaping.append((phi[0].cpu().numpy(), rise.cpu().numpy()))

    def rollout(self, deter: Any, stoch: Any) -> tuple[Any, Any]:
        """The imagined feats (H+1, N, F) from each state and each imagined reward's weight
        (H, N): gamma^k times the probability the episode ran through the steps before k."""
        import torch

        wm = self.agent.wm
        devices = [deter.device] if deter.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.seed + len(self.steps))
            feats, _ = self.agent.behavior.imagine(wm, deter, stoch, self.greedy)
        cont = wm.cont_prob(feats[1:])  # (H, N)
        live = torch.cat([torch.ones_like(cont[:1]), self.gamma * cont[:-1]])
        return feats, torch.cumprod(live, 0)

    def paid(self, feats: Any, weight: Any) -> Any:
        """(N,) what the reward head pays along a rollout's feats, with its weights."""
        return (weight * self.agent.wm.reward(feats[1:])).sum(0)

    def target(self, feats: Any) -> Any:
        """(N,) the critic's training target from each state: the lambda-return over a rollout's
        imagined steps (the reward head's rewards, the continue head's flags, the critic's values
        of the imagined states), as training computes it, from a state known to be running."""
        import torch

        from engine.behavior import lambda_returns

        wm, behavior = self.agent.wm, self.agent.behavior
        reward = wm.reward(feats)
        cont = torch.cat([torch.ones_like(reward[:1]), wm.cont_prob(feats[1:])])
        value = behavior.value(behavior.critic(feats).float())
        return lambda_returns(reward, cont, value, self.gamma, behavior.lam)[0]

    def imagine(self, deter: Any, stoch: Any) -> Any:
        """(N,) discounted reward over the horizon's imagined steps from each state."""
        return self.paid(*self.rollout(deter, stoch))

    def arrays(self) -> tuple[np.ndarray, ...]:
        """(values, predicted rewards, playing, rewards, imagined discounted rewards), (T, N)."""
        return tuple(np.stack(x) for x in zip(*self.steps))

    def target_arrays(self) -> np.ndarray:
        """(T, N): the imagined lambda-return target from each state acted from (`target`)."""
        return np.stack(self.targets)

    def shaping_arrays(self) -> tuple[np.ndarray, np.ndarray] | None:
        """With a `potential`: (the potential of each state acted from, the weighted rise of
        the potential along its imagined steps), (T, N); else None."""
        if self.potential is None:
            return None
        phi, rise = zip(*self.shaping)
        return np.stack(phi), np.stack(rise)


def value_check(
    values: np.ndarray,
    predicted: np.ndarray,
    playing: np.ndarray,
    rewards: np.ndarray,
    gamma: float,
    ends: dict[str, np.ndarray],
    dreamed: np.ndarray | None = None,
    horizon: int = 0,
    shaping: tuple[np.ndarray, np.ndarray] | None = None,
    targets: np.ndarray | None = None,
    lam: float = 0.95,
) -> dict[str, Any]:
    """--values' figures from ValueProbe's arrays (T, N): per episode the critic's value of its
    first state and its real discounted return from there (cut where the episode ended: a
    time-limit episode's tail, weight gamma^length, is not in it); their mean difference, also
    per end kind (`ends`: episode_ends' masks); the same over every state the policy acted from
    (value against the discounted return to go, pooled over the states, so long episodes weigh
    more; cut the same way, more so late in a time-limit episode); and the reward head's mean
    prediction against the mean real reward over the steps it predicts (the reward that led to
    each observed state; the last step's leads to no observed state).

    With `dreamed` (ValueProbe's imagined discounted rewards over `horizon` steps from each
    state): their mean against the real discounted reward of the episode's next `horizon` steps
    (0 after its end), pooled over the states whose window the episode ran through or ended in
    (a time-limit episode's last `horizon` - 1 states are left out: their real window is cut),
    and the difference per end kind. With `shaping` too (ValueProbe.shaping_arrays, for a task
    in POTENTIALS), `dream_split`'s figures; with `targets` (ValueProbe.target_arrays, the
    lambda-returns with `lam`), `target_check`'s."""
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
    out = dict(
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
    if dreamed is not None:
        out.update(dream_check(dreamed, real, playing, gamma, horizon, ends))
        if shaping is not None:
            out.update(dream_split(dreamed, real, playing, gamma, horizon, *shaping))
        if targets is not None:
            out.update(target_check(values, real, playing, targets, gamma, lam, horizon))
    return out


def dream_check(
    dreamed: np.ndarray,
    real: np.ndarray,
    playing: np.ndarray,
    gamma: float,
    horizon: int,
    ends: dict[str, np.ndarray],
) -> dict[str, Any]:
    """value_check's imagination figures (see there); real: the rewards, 0 where not playing."""
    steps = len(real)
    window = horizon_sums(real, gamma, horizon)
    cut = ends.get("time_limit", np.zeros(real.shape[1], dtype=bool))
    t = np.arange(steps)[:, None]
    ok = playing & ((t + horizon <= playing.sum(0)) | ~cut)
    if not ok.any():
        return dict(dream_horizon=horizon, dream_states=0)
    gap = dreamed - window

    def pooled(x: np.ndarray, m: np.ndarray) -> float:
        return float(x[ok & m].mean())

    every = np.ones(real.shape[1], dtype=bool)
    return dict(
        dream_horizon=horizon,
        dream_states=int(ok.sum()),
        dream_reward_mean=pooled(dreamed, every),
        dream_real_mean=pooled(window, every),
        dream_gap=pooled(gap, every),
        dream_gap_by_end={k: pooled(gap, m) for k, m in ends.items() if (ok & m).any()},
    )


def horizon_sums(x: np.ndarray, gamma: float, horizon: int) -> np.ndarray:
    """(T, N): at each t, the sum over k < horizon of gamma^k x[t + k] (0 past the end)."""
    out = np.zeros_like(x)
    for k in range(horizon):
        out[: len(x) - k] += gamma**k * x[k:]
    return out


def later(x: np.ndarray, k: int) -> np.ndarray:
    """x[t + k] at every t along the first axis (zero past the end)."""
    out = np.zeros_like(x)
    out[: max(len(x) - k, 0)] = x[k:]
    return out


def windows_inside(playing: np.ndarray, horizon: int) -> np.ndarray:
    """(T, N): the states whose window of `horizon` steps lies inside their episode (the state
    `horizon` steps on was observed)."""
    return later(playing, horizon)


def dream_split(
    dreamed: np.ndarray,
    real: np.ndarray,
    playing: np.ndarray,
    gamma: float,
    horizon: int,
    phi: np.ndarray,
    rise: np.ndarray,
) -> dict[str, Any]:
    """For a reward that is a potential's change less costs (LunarLander), the imagination's
    excess split in two, over the windows that lie inside their episode (the state `horizon`
    steps on was observed): `dream_dynamics`, how much more the potential rises along the
    imagined states than along the real ones (where the imagination takes the lander), and
    `dream_head`, how much more the reward head pays beyond the imagined states' rise than the
    real rewards pay beyond the real rise (in reality that is minus the fuel; a head that pays
    for what the imagined states do not show). The two add up to the windows' gap. `phi`: the
    potential of each state acted from (T, N); `rise`: the weighted rise along its imagined
    steps (ValueProbe.shaping_arrays). The real side weighs step k by gamma^k, as dream_check."""
    step_rise = np.zeros_like(real)
    step_rise[:-1] = phi[1:] - phi[:-1]
    real_rise = horizon_sums(step_rise, gamma, horizon)
    window = horizon_sums(real, gamma, horizon)
    inside = windows_inside(playing, horizon)
    if not inside.any():
        return dict(dream_split_states=0)

    def mean(x: np.ndarray) -> float:
        return float(x[inside].mean())

    beyond, beyond_real = dreamed - rise, window - real_rise
    return dict(
        dream_split_states=int(inside.sum()),
        dream_split_gap=mean(dreamed - window),
        dream_rise=mean(rise),
        dream_rise_real=mean(real_rise),
        dream_dynamics=mean(rise - real_rise),
        dream_beyond=mean(beyond),
        dream_beyond_real=mean(beyond_real),
        dream_head=mean(beyond - beyond_real),
    )


def target_check(
    values: np.ndarray,
    real: np.ndarray,
    playing: np.ndarray,
    targets: np.ndarray,
    gamma: float,
    lam: float,
    horizon: int,
) -> dict[str, Any]:
    """The critic against its training target and against the same target built from what
    happened, over the windows inside their episode (the state `horizon` steps on was
    observed). `targets` (T, N): the imagined lambda-returns from each state
    (ValueProbe.target_arrays); the real one runs the same recursion over the real rewards
    `real` and the critic's `values` of the real states that followed (the episode ran on:
    continue 1). `target_residual`, the critic's value less the real target, is the imagined
    target's excess (`target_gap`) plus the critic's distance from its own target
    (`value_vs_target`). A target keeps `target_keep` (c: the lambda-return of no reward and
    values of 1) of the values it bootstraps from, so the residual d is what a critic d / (1 - c)
    above the real values leaves (`target_settle`): every unit of residual per target is about
    32 units of overvaluation at gamma 0.997, lambda 0.95 over 15 steps."""
    import torch

    from engine.behavior import lambda_returns

    inside = windows_inside(playing, horizon)
    if not inside.any():
        return dict(target_states=0)

    # Training's recursion over the real windows: the reward into state k is real[t + k - 1],
    # the value of state k is values[t + k], and the episode runs on (continue 1).
    reward = torch.from_numpy(
        np.stack([np.zeros_like(real)] + [later(real, k) for k in range(horizon)])
    ).double()
    value = torch.from_numpy(np.stack([later(values, k) for k in range(horizon + 1)])).double()
    ret = lambda_returns(reward, torch.ones_like(value), value, gamma, lam)[0].numpy()
    none = torch.zeros(horizon + 1, 1, dtype=torch.float64)  # no reward, values of 1
    keep = float(lambda_returns(none, none + 1, none + 1, gamma, lam)[0, 0])

    def mean(x: np.ndarray) -> float:
        return float(x[inside].mean())

    residual = mean(values - ret)
    return dict(
        target_states=int(inside.sum()),
        target_lambda=lam,
        target_value=mean(values),
        target_imagined=mean(targets),
        target_real=mean(ret),
        target_gap=mean(targets - ret),
        value_vs_target=mean(values - targets),
        target_residual=residual,
        target_keep=keep,
        target_settle=residual / (1 - keep),
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
    if v.get("dream_states"):
        by_end = ", ".join(f"{END_TEXT[k]} {b:+.2f}" for k, b in v["dream_gap_by_end"].items())
        text += (
            f"; imagined {v['dream_horizon']} steps ahead from {v['dream_states']} states, the "
            f"reward head expects {v['dream_reward_mean']:.2f} (discounted) against "
            f"{v['dream_real_mean']:.2f} real: {v['dream_gap']:+.2f} ({by_end})"
        )
    if v.get("dream_split_states"):
        text += (
            f"; of that, over the {v['dream_split_states']} windows inside an episode "
            f"({v['dream_split_gap']:+.2f}): the shaping potential of the decoded state rises "
            f"{v['dream_rise']:.2f} along the imagined steps against {v['dream_rise_real']:.2f} "
            f"along the real ones, dynamics {v['dream_dynamics']:+.2f}; the reward head pays "
            f"{v['dream_beyond']:+.2f} beyond the imagined rise against "
            f"{v['dream_beyond_real']:+.2f} real (fuel), reward head {v['dream_head']:+.2f}"
        )
    if v.get("target_states"):
        text += (
            f"; over the {v['target_states']} windows inside an episode the critic values the "
            f"states at {v['target_value']:.2f}, its lambda-return target (lambda "
            f"{v['target_lambda']:g}) is {v['target_imagined']:.2f} imagined against "
            f"{v['target_real']:.2f} from the real steps and the critic's values of the real "
            f"states: {v['target_residual']:+.2f} above the real target (imagination "
            f"{v['target_gap']:+.2f}, critic above its own target {v['value_vs_target']:+.2f}); "
            f"a target keeps {v['target_keep']:.3f} of the values it bootstraps from, so that "
            f"residual is what a critic {v['target_residual']:+.2f} / "
            f"{1 - v['target_keep']:.3f} = {v['target_settle']:+.1f} above the real values leaves"
        )
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
        probe = None
        if args.values:
            potential = POTENTIALS.get(e.name) if e.vector else None
            probe = ValueProbe(run.agent, cfg.train.gamma, greedy, seed, potential)
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
        values, predicted, playing, rewards, dreamed = probe.arrays()
        s["values"] = value_check(
            values,
            predicted,
            playing,
            rewards,
            cfg.train.gamma,
            ends,
            dreamed,
            run.agent.behavior.horizon,
            probe.shaping_arrays(),
            probe.target_arrays(),
            run.agent.behavior.lam,
        )
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
