"""The driver: collect with the policy, store in replay, train at a fixed ratio of replayed to
environment steps, evaluate, log and checkpoint. The agent math lives in agent.py."""

from __future__ import annotations

import math
import random
import signal
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from engine import checkpoint, dists, fast
from engine.agent import Agent
from engine.config import Config, profile_window, save_toml, to_dict
from engine.envs import make_env
from engine.logger import MetricsLog, Progress, truncate_metrics
from engine.nvtx import ProfileWindow, nvtx_range
from engine.replay import Replay, transition_spec
from engine.transfer import ObsUploader

# Training-line keys that exist only once the actor trains; logged as null during warm-up.
BEHAVIOR_KEYS = ("actor_loss", "actor_entropy", "critic_loss", "dream_reward", "dream_value")


class TrainingError(Exception):
    """A run that cannot go on (non-finite loss, checkpoint mismatch): one-line message."""


def resolve_device(pref: str) -> tuple[torch.device, str | None]:
    """Returns the device and a notice to print when the preference could not be met."""
    if pref == "cpu":
        return torch.device("cpu"), None
    if torch.cuda.is_available():
        return torch.device("cuda"), None
    what = "general.device = cuda" if pref == "cuda" else "device auto"
    return torch.device("cpu"), f"notice: {what}: no CUDA device found, training on the CPU"


class Trainer:
    def __init__(self, cfg: Config, run_dir: Path, resume: bool = False):
        self.cfg, self.run_dir = cfg, run_dir
        self.device, notice = resolve_device(cfg.general.device)
        if cfg.general.threads:
            torch.set_num_threads(cfg.general.threads)
        self.progress = Progress(cfg.train.max_train_steps, 0, cfg.log.progress)
        if notice:
            self.progress.write(notice)
        seed = cfg.general.seed
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        e = cfg.env
        self.env = make_env(e.name, e.backend, e.num_envs, seed, cfg.image_size, e.vector)
        self.eval_env = make_env(
            e.name, e.backend, cfg.log.eval_episodes, seed + 10_000, cfg.image_size, e.vector
        )
        self.opts, notices = fast.resolve(cfg.general, self.device)
        for line in notices:
            self.progress.write(line)
        self.agent = Agent(cfg, self.env.vector_dim, self.env.num_actions, self.device, self.opts)
        if self.opts.compile:
            fast.compile_agent(self.agent)
        self.replay = Replay(
            cfg.train.replay_buffer_size, e.num_envs, self._replay_spec(), self.device
        )
        t = cfg.train
        self.learner = fast.Learner(
            self.agent, self.replay, t.batch_size, t.sequence_length, self.opts
        )
        self.counters = dict(
            step=0, env_steps=0, episodes=0, budget=0.0, wall_time=0.0, best_eval=-math.inf
        )
        self.ckpt_dir = run_dir / "checkpoints"
        self.ckpt_dir.mkdir(parents=True, exist_ok=True)
        if resume:
            self._restore()
        else:
            save_toml(cfg, run_dir / "config.toml")
        # Training (re)starts once the replay holds bootstrap_steps: random-policy data on a fresh
        # run; on resume it is refilled with the loaded policy (replay is not checkpointed).
        c = self.counters
        self.random_policy = c["step"] == 0
        fill = min(cfg.train.bootstrap_steps, cfg.train.replay_buffer_size)
        self.train_from = c["env_steps"] + fill
        self.episodes_at_start = c["episodes"]
        self.log = MetricsLog(run_dir / "metrics.jsonl")
        self.rng = np.random.default_rng(seed + c["env_steps"])
        self._acc: dict[str, tuple[Tensor, int]] = {}
        trace = run_dir / "trace.json" if cfg.general.trace else None
        self.window = ProfileWindow(profile_window(cfg.general.profile), trace)
        self.last_return = float("nan")
        self.last_eval = float("nan")
        self.uploader = ObsUploader(self.device)
        self._env_thread: ThreadPoolExecutor | None = None
        self._pending: Future | None = None

    def _replay_spec(self):
        return transition_spec(
            self.cfg.image_size, self.env.vector_dim if self.cfg.env.vector else 0
        )

    # ---- The loop -----------------------------------------------------------------------------

    def run(self) -> dict:
        c, t = self.counters, self.cfg.train
        n = self.param_summary()
        self.progress.write(f"parameters: {n}")
        self.progress.write(f"run directory: {self.run_dir}")
        per_update = t.batch_size * t.sequence_length
        self._obs = self.env.reset()
        self._carry = self.agent.initial_carry(self.env.num_envs, self.device)
        self._ep_ret = np.zeros(self.env.num_envs)
        self._ep_len = np.zeros(self.env.num_envs, dtype=np.int64)
        start = self._started = time.perf_counter()
        self._interval = (start, c["step"], c["env_steps"])
        previous = _install_sigterm()
        if t.async_collection:
            # The envs step in a background thread while the learner updates (envpool and numpy
            # release the GIL): the data are the same as stepping inline, since (obs_t, action_t)
            # is stored before the step is sent and obs_{t+1} is only needed to act again.
            self._env_thread = ThreadPoolExecutor(1, thread_name_prefix="env-step")
        try:
            while not self._done():
                with nvtx_range("collect"):
                    self._collect()
                c["env_steps"] += self.env.num_envs
                if self._ready():
                    c["budget"] += self.env.num_envs * t.train_ratio / per_update
                    while c["budget"] >= 1 and c["step"] < t.max_train_steps:
                        self._update()
                        c["budget"] -= 1
                self.progress.update(
                    c["step"],
                    env=c["env_steps"],
                    ret=f"{self.last_return:.0f}",
                    eval=f"{self.last_eval:.0f}",
                )
        except KeyboardInterrupt:
            c["wall_time"] += time.perf_counter() - start
            self._checkpoint("latest")
            self.progress.close()
            raise
        finally:
            if self._pending is not None:  # let the step in flight finish (or raise) first
                self._pending.exception()
            self._pending = None
            if self._env_thread is not None:
                self._env_thread.shutdown()
                self._env_thread = None
            if previous is not None:
                try:
                    signal.signal(signal.SIGTERM, previous)
                except ValueError:
                    pass
        c["wall_time"] += time.perf_counter() - start
        self.window.stop()
        self._log_train()
        size = self._checkpoint("latest")
        self.progress.close()
        self.log.close()
        return dict(
            step=c["step"],
            env_steps=c["env_steps"],
            wall_time=c["wall_time"],
            last_eval=self.last_eval,
            best_eval=c["best_eval"],
            checkpoint_bytes=size,
        )

    def _collect(self) -> None:
        """One step of every training env: act, store (obs_t, action_t), step the envs."""
        c = self.counters
        if self._pending is not None:
            self._obs, self._pending = self._pending.result(), None
        obs_t = self._to_device(self._obs)
        action, self._carry = self.agent.policy(obs_t, self._carry)
        if self.random_policy and c["env_steps"] < self.train_from:
            action = torch.from_numpy(self.rng.integers(self.env.num_actions, size=len(action)))
            action = action.to(self.device)
            self._carry = self._carry[:2] + (dists.onehot(action, self.env.num_actions),)
        self.replay.add({**obs_t, "action": action})
        self._track_episodes(self._obs)
        action = action.cpu().numpy()
        if self._env_thread is None:
            self._obs = self.env.step(action)
        else:
            self._pending = self._env_thread.submit(self.env.step, action)

    def _done(self) -> bool:
        c, t = self.counters, self.cfg.train
        return c["step"] >= t.max_train_steps or 0 < t.max_env_steps <= c["env_steps"]

    def _ready(self) -> bool:
        c, t = self.counters, self.cfg.train
        return (
            c["env_steps"] >= self.train_from
            and c["episodes"] - self.episodes_at_start >= t.min_buffer_episodes
            and self.replay.can_sample(t.sequence_length)
        )

    def _to_device(self, obs: dict[str, np.ndarray]) -> dict[str, Tensor]:
        return self.uploader(obs)

    def _track_episodes(self, obs) -> None:
        ep_ret = self._ep_ret = np.where(obs["is_first"], 0.0, self._ep_ret) + obs["reward"]
        ep_len = self._ep_len = np.where(obs["is_first"], 0, self._ep_len + 1)
        c = self.counters
        for i in np.flatnonzero(obs["is_last"]):
            c["episodes"] += 1
            self.last_return = float(ep_ret[i])
            self._record("episode", episode_return=self.last_return, episode_length=int(ep_len[i]))

    # ---- Learning -----------------------------------------------------------------------------

    def _update(self) -> None:
        cfg, c = self.cfg, self.counters
        self.window.at_step(c["step"])
        metrics = self.learner.step(c["step"] >= cfg.train.actor_warmup_steps)
        for k, v in metrics.items():
            total, count = self._acc.get(k, (torch.zeros((), device=self.device), 0))
            self._acc[k] = (total + v.detach().float(), count + 1)
        c["step"] += 1
        step = c["step"]
        if step % cfg.log.log_every == 0:
            self._log_train()
        if cfg.log.eval_every and step % cfg.log.eval_every == 0:
            self.evaluate()
        if step % cfg.log.checkpoint_every == 0:
            self._checkpoint("latest")

    def _fields(self, kind: str, **fields) -> dict:
        return dict(
            type=kind, step=self.counters["step"], env_steps=self.counters["env_steps"], **fields
        )

    def _record(self, kind: str, **fields) -> None:
        self.log.write(self._fields(kind, **fields))

    def _log_train(self) -> None:
        if not self._acc:
            return
        c = self.counters
        keys = list(self._acc)
        # The one host sync per log interval: all metrics come over in a single transfer.
        values = torch.stack([self._acc[k][0] / self._acc[k][1] for k in keys]).cpu().tolist()
        self._acc.clear()
        now = time.perf_counter()
        t0, step0, env0 = self._interval
        self._interval = (now, c["step"], c["env_steps"])
        record = self._fields(
            "train",
            wall_time=c["wall_time"] + now - self._started,
            **{k: None for k in BEHAVIOR_KEYS},
        )
        record.update(zip(keys, values))
        record.update(
            train_steps_per_sec=(c["step"] - step0) / max(now - t0, 1e-9),
            env_steps_per_sec=(c["env_steps"] - env0) / max(now - t0, 1e-9),
        )
        self.log.write(record)
        bad = [k for k, v in zip(keys, values) if not math.isfinite(v)]
        if bad:
            raise TrainingError(
                f"non-finite {', '.join(bad)} at step {c['step']}; the last good checkpoint is "
                f"{self.ckpt_dir / 'latest.pt'}"
            )

    @torch.no_grad()
    def evaluate(self) -> float:
        """Run `eval_episodes` episodes in parallel, one per eval environment."""
        with nvtx_range("evaluate"):
            return self._evaluate()

    def _evaluate(self) -> float:
        env, c = self.eval_env, self.counters
        greedy = self.cfg.log.eval_policy == "mode"
        obs = env.reset()
        carry = self.agent.initial_carry(env.num_envs, self.device)
        returns = np.zeros(env.num_envs)
        lengths = np.zeros(env.num_envs, dtype=np.int64)
        done = np.zeros(env.num_envs, dtype=bool)
        while not done.all():
            action, carry = self.agent.policy(self._to_device(obs), carry, greedy)
            obs = env.step(action.cpu().numpy())
            returns += np.where(done, 0.0, obs["reward"])
            lengths += ~done
            done |= obs["is_last"]
        self.last_eval = float(returns.mean())
        self._record(
            "eval",
            eval_return=self.last_eval,
            eval_return_std=float(returns.std()),
            eval_returns=returns.tolist(),
            eval_length=float(lengths.mean()),
        )
        self.progress.write(
            f"step {c['step']} env_steps {c['env_steps']}: "
            f"eval return {self.last_eval:.1f} over {env.num_envs} episodes"
        )
        if self.last_eval > c["best_eval"]:
            c["best_eval"] = self.last_eval
            self._checkpoint("best")
        return self.last_eval

    # ---- Checkpoints --------------------------------------------------------------------------

    def _checkpoint(self, name: str) -> int:
        params = [p.detach() for p in self.agent.parameters()]
        if not torch.stack([p.isfinite().all() for p in params]).all():
            raise TrainingError(
                f"non-finite parameters at step {self.counters['step']}; kept the "
                f"last good checkpoint {self.ckpt_dir / 'latest.pt'}"
            )
        payload = dict(
            agent=self.agent.state_dict(),
            optim={k: o.state_dict() for k, o in self.agent.optimizers().items()},
            counters=dict(self.counters),
            rng=checkpoint.rng_state(),
            config=to_dict(self.cfg),
        )
        return checkpoint.save(self.ckpt_dir / f"{name}.pt", payload)

    def _restore(self) -> None:
        path = self.ckpt_dir / "latest.pt"
        if not path.is_file():
            raise TrainingError(f"{path}: no checkpoint to resume from")
        state = checkpoint.load(path, self.device)
        try:
            self.agent.load_state_dict(state["agent"])
            for k, opt in self.agent.optimizers().items():
                opt.load_state_dict(state["optim"][k])
        except (RuntimeError, KeyError, ValueError) as e:
            first = str(e).strip().splitlines()[0]
            raise TrainingError(
                f"{path}: does not match the config (were models.* changed?): {first}"
            ) from None
        # The learning rates come from the config, so --set can change them on resume.
        self.counters.update(state["counters"])
        checkpoint.set_rng_state(state["rng"])
        save_toml(self.cfg, self.run_dir / "config.toml")
        dropped = truncate_metrics(self.run_dir / "metrics.jsonl", self.counters["step"])
        self.progress.write(
            f"resumed {path} at step {self.counters['step']}, env steps "
            f"{self.counters['env_steps']} ({dropped} later metric lines dropped)"
        )

    def param_summary(self) -> str:
        a = self.agent
        count = lambda m: sum(p.numel() for p in m.parameters() if p.requires_grad)
        return (
            f"{a.num_params():,} (world model {count(a.wm) / 1e6:.2f}M, actor "
            f"{count(a.behavior.actor) / 1e6:.2f}M, critic {count(a.behavior.critic) / 1e6:.2f}M)"
        )


def _install_sigterm():
    """SIGTERM ends the run like Ctrl-C: a final checkpoint is written before exiting."""

    def handler(signum, frame):
        raise KeyboardInterrupt

    try:
        return signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave signals alone
        return signal.getsignal(signal.SIGTERM)
