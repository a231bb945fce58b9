"""Evaluation during training: the eval envs' episodes with the current policy and, with
log.dream_video, the first eval episode beside the world model's open-loop prediction as a GIF.
The trainer records the figures, keeps the best checkpoint and checks for a solved task;
`python -m engine.evaluate` re-checks a saved checkpoint instead."""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from engine.episodes import Episodes, play_episodes

if TYPE_CHECKING:
    from engine.agent import Agent
    from engine.config import Config

# The first eval env's (obs_t, action_t) pairs, as the replay stores them, for a dream.
Clip = tuple[list[dict[str, np.ndarray]], list[int]]


def dream_unavailable() -> str | None:
    """engine.dream is imported at evaluation; a run asking for dream videos fails at start
    rather than at its first evaluation when the module is missing: why, or None."""
    try:
        importlib.import_module("engine.dream")
    except ImportError as e:
        return f"log.dream_video = true needs engine.dream: {e}"
    return None


class Evaluator:
    """Plays one episode in each of `env`'s envs (log.eval_episodes) with `agent`'s policy
    (log.eval_policy), observations sent by `to_device` to `device`, and writes dream videos
    under `run_dir`/dreams; `note` prints a line. `cfg` is read at each call."""

    def __init__(
        self,
        cfg: Config,
        agent: Agent,
        env: Any,
        to_device: Callable[[dict[str, np.ndarray]], dict[str, Tensor]],
        device: torch.device,
        run_dir: Path,
        note: Callable[[str], None],
        members: int = 1,
    ):
        self.cfg, self.agent, self.env, self.to_device = cfg, agent, env, to_device
        self.device, self.run_dir, self.note = device, run_dir, note
        # The policy acts on batches of training's shape (members x env.num_envs rows): a
        # compiled policy is not recompiled for the eval batch (play_episodes' rows).
        self.rows = (members, cfg.env.num_envs)

    def play(self, record: bool = False) -> tuple[Episodes, Clip | None]:
        """The episodes and, with `record`, the first eval env's first episode up to and
        including the is_last observation, at most log.dream_steps (for `dream`)."""
        greedy = self.cfg.log.eval_policy == "mode"
        clip: Clip | None = ([], []) if record else None
        recorder = None
        if clip is not None:
            recorder = functools.partial(self._record_frame, *clip)
        episodes = play_episodes(
            self.agent, self.env, self.to_device, greedy, recorder, rows=self.rows
        )
        return episodes, clip

    def rounds(self, count: int) -> list[Episodes]:
        """`count` more rounds of play(): fresh episodes with the same weights (the confirmation
        of a solved stop, train.stop_confirm_episodes)."""
        return [self.play()[0] for _ in range(count)]

    def _record_frame(
        self, frames: list, actions: list[int], obs: dict[str, np.ndarray], action: int
    ) -> bool:
        """Appends env 0's observation and action; False once the recording is complete."""
        frames.append({k: np.array(v[0]) for k, v in obs.items()})
        actions.append(action)
        return not obs["is_last"][0] and len(frames) < self.cfg.log.dream_steps

    def dream(self, clip: Clip, step: int) -> None:
        """The recorded eval episode beside the world model's open-loop prediction, as a GIF."""
        frames, actions = clip
        ctx = self.cfg.log.dream_context
        if len(frames) < ctx + 1:
            self.note(
                f"note: step {step}: no dream video: the first eval episode lasted "
                f"{len(frames)} steps, fewer than log.dream_context + 1 = {ctx + 1}"
            )
            return
        dream = importlib.import_module("engine.dream")
        obs = {k: torch.from_numpy(np.stack([f[k] for f in frames])) for k in frames[0]}
        obs = {k: v.to(self.device) for k, v in obs.items()}  # (T, ...)
        acts = torch.tensor(actions, dtype=torch.long, device=self.device)  # (T,)
        path = self.run_dir / "dreams" / f"dream_{step:07d}.gif"
        # The dream samples latents: its own RNG stream leaves the training run unchanged.
        devices = [self.device] if self.device.type == "cuda" else []
        try:
            with torch.random.fork_rng(devices=devices):
                pred = dream.open_loop(self.agent, obs, acts, ctx)  # (T, 64, 64, 3) uint8
            path.parent.mkdir(exist_ok=True)
            truth = obs["image"].cpu().numpy()
            dream.write_gif(path, truth, pred.cpu().numpy(), context=ctx)  # atomic itself
        except Exception as e:  # a diagnostic: a failing video must not end a long run
            first = (str(e).strip().splitlines() or [""])[0]
            self.note(f"notice: step {step}: dream video failed: {type(e).__name__}: {first}")
