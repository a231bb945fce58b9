"""Acting in the training envs: the policy (or the random bootstrap policy) picks each env's
action, the step is stored in the replay, and the envs step, inline or in a background thread.
The trainer decides when to collect and counts the env steps; this module does the acting."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from engine import dists
from engine.transfer import ObsUploader

if TYPE_CHECKING:
    from engine.agent import Agent
    from engine.replay import Replay


class Collector:
    """Steps the training envs `env` with `agent`'s policy, storing each (obs_t, action_t) in
    `replay`; with `store_context` (train.replay_context) also the posterior at that step, which
    seeds the next sequence. `rng` draws the random bootstrap policy's actions.
    `on_episode_end(env, ret, length)` is called for each training episode that ends. The
    observation upload (`to_device`) is shared with the trainer's evaluations."""

    def __init__(
        self,
        agent: Agent,
        env: Any,
        replay: Replay,
        device: torch.device,
        rng: np.random.Generator,
        store_context: bool,
        on_episode_end: Callable[[int, float, int], None],
    ):
        self.agent, self.env, self.replay, self.device = agent, env, replay, device
        self.rng, self.store_context, self.on_episode_end = rng, store_context, on_episode_end
        self.uploader = ObsUploader(device)
        self._thread: ThreadPoolExecutor | None = None
        self._pending: Future | None = None

    def to_device(self, obs: dict[str, np.ndarray]) -> dict[str, Tensor]:
        return self.uploader(obs)

    def start(self, async_stepping: bool) -> None:
        """Resets the envs and the policy's carry. With `async_stepping` (train.async_collection)
        the envs step in a background thread while the learner updates (envpool and numpy
        release the GIL): the data are the same as stepping inline, since (obs_t, action_t) is
        stored before the step is sent and obs_{t+1} is only needed to act again."""
        self._obs = self.env.reset()
        self._carry = self.agent.initial_carry(self.env.num_envs, self.device)
        self._ep_ret = np.zeros(self.env.num_envs)
        self._ep_len = np.zeros(self.env.num_envs, dtype=np.int64)
        if async_stepping:
            self._thread = ThreadPoolExecutor(1, thread_name_prefix="env-step")

    def stop(self) -> None:
        """Lets the step in flight finish (or raise) first, then ends the stepping thread."""
        if self._pending is not None:
            self._pending.exception()
        self._pending = None
        if self._thread is not None:
            self._thread.shutdown()
            self._thread = None

    def step(self, random_policy: bool) -> None:
        """One step of every training env: act (uniformly at random with `random_policy`, the
        bootstrap), store (obs_t, action_t), step the envs."""
        if self._pending is not None:
            self._obs, self._pending = self._pending.result(), None
        obs_t = self.to_device(self._obs)
        action, self._carry = self.agent.policy(obs_t, self._carry)
        if random_policy:
            action = torch.from_numpy(self.rng.integers(self.env.num_actions, size=len(action)))
            action = action.to(self.device)
            self._carry = self._carry[:2] + (dists.onehot(action, self.env.num_actions),)
        step = {**obs_t, "action": action}
        if self.store_context:  # the posterior at this step seeds the next sequence
            step.update(deter=self._carry[0], stoch=self._carry[1].argmax(-1))
        self.replay.add(step)
        self._track_episodes(self._obs)
        action = action.cpu().numpy()
        if self._thread is None:
            self._obs = self.env.step(action)
        else:
            self._pending = self._thread.submit(self.env.step, action)

    def _track_episodes(self, obs: dict[str, np.ndarray]) -> None:
        ep_ret = self._ep_ret = np.where(obs["is_first"], 0.0, self._ep_ret) + obs["reward"]
        ep_len = self._ep_len = np.where(obs["is_first"], 0, self._ep_len + 1)
        for i in np.flatnonzero(obs["is_last"]):
            self.on_episode_end(int(i), float(ep_ret[i]), int(ep_len[i]))
