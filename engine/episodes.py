"""Episodes of a trained agent: one per env, played in parallel (`play_episodes`, which the
trainer's evaluations, the population's and `python -m engine.evaluate` share), and how each
ended (`episode_ends`).

torch is imported inside the functions that need it: engine.report reads `END_KINDS` and
`END_TEXT` from here and never imports torch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

if TYPE_CHECKING:
    from torch import Tensor

    from engine.agent import Agent

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


def lunar_potential(v: Any) -> Any:
    """LunarLander-v3's shaping potential of state vectors (..., 8), numpy or torch: a step pays
    the potential's change, less 0.3 for the main engine's fuel and 0.03 for a side engine's
    (and a final +100 or -100 instead on a rest or a crash). Distance to the pad, speed and tilt
    each cost 100 per unit; each leg on the ground pays 10."""
    x, y, vx, vy, angle, _, leg1, leg2 = (v[..., i] for i in range(8))
    distance, speed = (x * x + y * y) ** 0.5, (vx * vx + vy * vy) ** 0.5
    return -100 * distance - 100 * speed - 100 * abs(angle) + 10 * leg1 + 10 * leg2


# Tasks whose reward is a potential's change (less costs): --values splits the imagination's
# excess into where the imagined states go and what the reward head pays beyond that.
POTENTIALS: dict[str, Callable[[Any], Any]] = {"LunarLander-v3": lunar_potential}


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

    def rows(self, rows: slice) -> Episodes:
        """The episodes of `rows` (a population member's block of envs)."""
        return Episodes(*(x[rows] for x in self))

    def record(self, prefix: str, task: str) -> dict[str, Any]:
        """The metrics-record fields of these episodes, named `prefix`_...: the mean return, its
        std, every return, the mean length, the count, how many the task ended, and how many
        ended each way of `episode_ends` (the eval and solve_confirm records)."""
        ends = episode_ends(task, self.terminal, self.last_reward)
        ends.pop("terminated", None)  # the count below, for every task
        return {
            f"{prefix}_return": float(self.returns.mean()),
            f"{prefix}_return_std": float(self.returns.std()),
            f"{prefix}_returns": self.returns.tolist(),
            f"{prefix}_length": float(self.lengths.mean()),
            f"{prefix}_episodes": len(self.returns),
            f"{prefix}_terminated": int(self.terminal.sum()),
            **{f"{prefix}_{kind}": int(mask.sum()) for kind, mask in ends.items()},
        }

    @staticmethod
    def join(parts: list[Episodes]) -> Episodes:
        """The episodes of several rounds of play, in order."""
        return Episodes(*(np.concatenate(xs) for xs in zip(*parts)))

    def gathered(self, dist: Any) -> Episodes:
        """Under torchrun (`dist`, engine.distributed's), every rank's episodes in rank order,
        the same on every rank; without (None), these."""
        if dist is None:
            return self
        import torch

        def every(x: np.ndarray) -> np.ndarray:
            return dist.gather_rows(torch.as_tensor(x, dtype=torch.float64)).numpy().astype(x.dtype)

        return Episodes(*(every(np.asarray(x)) for x in self))


def play_episodes(
    agent: Agent,
    env: Any,
    to_device: Callable[[dict[str, np.ndarray]], dict[str, Tensor]],
    greedy: bool,
    record: Callable[[dict[str, np.ndarray], int], bool] | None = None,
    rows: tuple[int, int] | None = None,
    probe: Callable[[Any, np.ndarray, np.ndarray], None] | None = None,
) -> Episodes:
    """One episode in each of `env`'s envs, in parallel.

    `probe(carry, playing, reward)` (optional) sees each step: the policy's carry after it
    observed the step's observation (its posterior; with `rows` padding, the padded batch's
    rows), which envs were still in their episode (N,), and the reward of the step it acted on
    (N, 0 where not playing).

    `record(obs, action)` (optional) sees env 0's observation and the action chosen for it at each
    step until it returns False, then once more with the episode's last observation and action 0
    if env 0's episode ended while it was still recording.

    `rows` = (groups, n): the policy runs on batches shaped as in training, `groups` blocks of `n`
    rows (a population's members, each acting in n envs), each block's envs first and zero rows
    after them, whose actions are dropped. A compiled policy then meets the shape it was compiled
    for instead of recompiling for the eval batch (and turning dynamic). Rows never mix, so the
    envs' actions are those of the unpadded batch."""
    import torch

    obs = env.reset()
    device = next(agent.parameters()).device
    pad, unpad, batch = _row_padding(env.num_envs, rows)
    carry = agent.initial_carry(batch, device)
    returns = np.zeros(env.num_envs)
    lengths = np.zeros(env.num_envs, dtype=np.int64)
    done = np.zeros(env.num_envs, dtype=bool)
    terminal = np.zeros(env.num_envs, dtype=bool)
    last_reward = np.zeros(env.num_envs)
    recording = record is not None
    with torch.no_grad():
        while not done.all():
            action, carry = agent.policy(pad(to_device(obs)), carry, greedy)
            action = unpad(action).cpu().numpy()
            if recording:
                recording = record(obs, int(action[0]))
            obs = env.step(action)
            if probe is not None:
                probe(carry, ~done, np.where(done, 0.0, obs["reward"]))
            returns += np.where(done, 0.0, obs["reward"])
            lengths += ~done
            ending = obs["is_last"] & ~done
            terminal[ending] = obs["is_terminal"][ending]
            last_reward[ending] = obs["reward"][ending]
            done |= ending
    if recording:  # env 0 ended on the last step: its final frame (no action is executed)
        record(obs, 0)
    return Episodes(returns, lengths, terminal, last_reward)


def _row_padding(envs: int, rows: tuple[int, int] | None) -> tuple[Callable, Callable, int]:
    """play_episodes' (pad the observations, unpad the actions, policy batch size): `envs` in
    `groups` blocks padded to `n` rows each; no padding when rows is None or the envs fill it."""
    groups, n = rows or (1, 0)
    if envs % groups:
        raise ValueError(f"{envs} envs do not split into {groups} groups")
    per = envs // groups
    if n <= per:
        return (lambda obs: obs), (lambda a: a), envs
    import torch

    def pad(obs: dict[str, Tensor]) -> dict[str, Tensor]:
        def one(x: Tensor) -> Tensor:
            x = x.reshape(groups, per, *x.shape[1:])
            zeros = x.new_zeros(groups, n - per, *x.shape[2:])
            return torch.cat([x, zeros], 1).flatten(0, 1)

        return {k: one(v) for k, v in obs.items()}

    def unpad(action: Tensor) -> Tensor:
        return action.reshape(groups, n)[:, :per].flatten()

    return pad, unpad, groups * n
