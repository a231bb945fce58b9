"""The driver: collect with the policy, store in replay, train at a fixed ratio of replayed to
environment steps, evaluate, log and checkpoint. The agent math lives in agent.py; acting in the
training envs in collect.py, evaluation episodes and dream videos in evaluation.py, the
stopping decisions (health, early stop, solved) in health.py."""

from __future__ import annotations

import functools
import math
import random
import signal
import time
from pathlib import Path

import numpy as np
import torch

from engine import checkpoint, distributed, fast
from engine.agent import Agent
from engine.collect import Collector
from engine.config import (
    Config,
    actor_entropy_coef_at,
    effective_lrs,
    lr_factor,
    profile_window,
    save_toml,
    to_dict,
)
from engine.device import free_memory, resolve_device, set_threads, thread_summary
from engine.envs import make_env
from engine.episodes import Episodes
from engine.evaluation import Evaluator, dream_unavailable
from engine.health import (
    HealthError,
    TrainingError,
    confirm_rounds,
    confirmation,
    early_stop_reason,
    short,
    solved_reason,
    unhealthy,
)
from engine.launch import interrupt, stop_signals
from engine.logger import (
    Meter,
    MetricsLog,
    NullLog,
    Progress,
    require_tensorboard,
    truncate_metrics,
)
from engine.nvtx import ProfileWindow, nvtx_range
from engine.replay import Replay, replay_bytes, transition_spec

# Training-line keys that exist only once the actor trains; logged as null during warm-up.
BEHAVIOR_KEYS = ("actor_loss", "actor_entropy", "critic_loss", "dream_reward", "dream_value")


class Trainer:
    """One agent's training run. engine.population.PopulationTrainer extends it to K agents in
    one process: `members` multiplies the envs and the replay, and the hooks marked below are
    where the two differ."""

    members = 1  # agents trained together (a population's size)
    # Under torchrun: the ranks train one agent together (data-parallel: averaged gradients,
    # replay shards, the job's env steps and metric means). A population's ranks each train
    # their own members instead, in step with each other but sharing no gradients.
    ranks_share_agent = True
    resume_file = "latest.pt"  # the checkpoint a resume reads (hook: a population's)

    def __init__(self, cfg: Config, run_dir: Path, resume: bool = False):
        self.cfg, self.run_dir = cfg, run_dir
        # Data-parallel training under torchrun (engine.distributed): this rank's share.
        self.dist = distributed.current()
        self.rank, self.world = (self.dist.rank, self.dist.world) if self.dist else (0, 1)
        self.is_main = self.rank == 0
        self.dp = self.dist if self.ranks_share_agent else None  # data-parallel collectives
        self.shards = self.world if self.dp is not None else 1  # the replay's shards
        # A checkpoint resumes with the world size that wrote it: checked before anything is built.
        resume_path = run_dir / "checkpoints" / self.resume_file
        if resume and (why := checkpoint.world_size_mismatch(resume_path, self.world)):
            raise TrainingError(why)
        # Optional packages first: a missing one fails before anything is built or written.
        writer_cls = require_tensorboard() if cfg.log.tensorboard else None
        if cfg.log.dream_video and (why := dream_unavailable()):
            raise TrainingError(why)
        self.device, notice = resolve_device(cfg.general.device)
        if self.dist is not None and self.device.type == "cuda":
            self.device = self.dist.device  # one GPU per rank
        self.threads_chosen = set_threads(cfg, self.device)
        # Other ranks than 0 stay silent (their lines would repeat rank 0's).
        self.progress = Progress(cfg.train.max_train_steps, 0, cfg.log.progress, self.is_main)
        if notice:
            self.progress.write(notice)
        # Each rank steps other envs and samples other batches; rank 0's weights are broadcast.
        seed = cfg.general.seed + self.rank * distributed.SEED_STRIDE
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        e = cfg.env
        envs = functools.partial(
            make_env,
            e.name,
            e.backend,
            image_size=cfg.image_size,
            use_vector=e.vector,
            processes=e.processes,
        )
        k = self.members
        self.env = envs(e.num_envs * k, seed)
        self.eval_env = envs(cfg.log.eval_episodes * k, seed + 10_000)
        self.opts, notices = fast.resolve(cfg.general, self.device)
        for line in notices:
            self.progress.write(line)
        self.agent = self._make_agent()
        if self.dp is not None:
            self.dp.attach(self.agent)
        # Under torchrun each rank holds a shard of the replay: replay_buffer_size / world.
        capacity, spec = self._shard_size() * k, self._replay_spec()
        self._check_replay_memory(capacity, spec)
        self.replay = Replay(capacity, e.num_envs * k, spec, self.device, members=k)
        t = cfg.train
        self.learner = fast.Learner(
            self.agent, self.replay, t.batch_size, t.sequence_length, self.opts
        )
        self.counters = dict(
            step=0, env_steps=0, episodes=0, budget=0.0, wall_time=0.0, best_eval=-math.inf
        )
        # Early-stop state, checkpointed with the counters so a resumed search run keeps it.
        self.counters.update(es_best=math.inf, es_best_step=0, es_stale=0)
        self.counters.update(solved_streak=0)  # evaluations in a row at the solved return
        self._all_ready = False  # every rank's replay is ready (data-parallel training)
        self._stop_requested = False  # SIGINT / SIGTERM under torchrun, acted on by all ranks
        self.saved_step: dict[str, int] = {}  # checkpoint name -> step it holds
        self.ckpt_dir = run_dir / "checkpoints"
        self.ckpt_dir.mkdir(parents=True, exist_ok=True)
        self.replay_file = checkpoint.ReplayFile(self.ckpt_dir, self.rank)
        if resume:
            self._restore()
            self.saved_step["latest"] = self.counters["step"]
        elif self.is_main:
            save_toml(cfg, run_dir / "config.toml")
        # Training (re)starts once the replay holds bootstrap_steps: random-policy data on a fresh
        # run; on resume it is refilled with the loaded policy, unless the checkpointed replay
        # (log.checkpoint_replay) was restored.
        c = self.counters
        restored = resume and self._restore_replay()
        self.random_policy = c["step"] == 0
        fill = min(cfg.train.bootstrap_steps, cfg.train.replay_buffer_size)  # env steps, all ranks
        # A restored replay holds every env step so far (up to its capacity): a run stopped
        # during its random bootstrap only completes it.
        self.train_from = max(c["env_steps"], fill) if restored else c["env_steps"] + fill
        self.episodes_at_start = 0 if restored else c["episodes"]  # for min_buffer_episodes
        tb = None
        if writer_cls is not None and self.is_main:
            # On resume, events past the checkpoint (logged, then lost with the run) are hidden.
            purge = c["step"] + 1 if resume else None
            tb = writer_cls(log_dir=str(run_dir / "tensorboard"), purge_step=purge)
        self.log = MetricsLog(run_dir / "metrics.jsonl", tb) if self.is_main else NullLog()
        # Acting in the training envs; its RNG draws the random bootstrap policy's actions.
        self.collector = Collector(
            self.agent,
            self.env,
            self.replay,
            self.device,
            np.random.default_rng(seed + c["env_steps"]),
            self.agent.replay_context,
            self._episode_end,
        )
        self.evaluator = Evaluator(
            cfg,
            self.agent,
            self.eval_env,
            self.collector.to_device,
            self.device,
            run_dir,
            self.progress.write,
            members=k,
        )
        self.meter = Meter()  # the metrics and rates of the current log interval
        trace = run_dir / "trace.json" if cfg.general.trace else None
        self.window = ProfileWindow(profile_window(cfg.general.profile), trace)
        self.last_return = float("nan")
        self.last_eval = float("nan")
        self._started: float | None = None  # perf_counter() when this segment began training
        self.lrs = effective_lrs(cfg.train)
        self._entropy_coef = self._entropy_coef_at(c["step"])
        self.agent.set_entropy_coef(self._entropy_coef)
        self.stop_reason: str | None = None
        self.stop_kind = ""  # "early stop" or "solved", with stop_reason
        self.dreams = cfg.log.dream_video and cfg.env.image and cfg.log.eval_every > 0
        self.dreams = self.dreams and self.is_main
        if cfg.log.dream_video and not self.dreams:
            why = "env.image = false" if not cfg.env.image else "log.eval_every = 0"
            self.progress.write(f"note: log.dream_video: no dream videos with {why}")

    def _make_agent(self):
        """The learner (hook: a population builds a PopulationAgent)."""
        env = self.env
        agent = Agent(self.cfg, env.vector_dim, env.num_actions, self.device, self.opts)
        if self.opts.compile:
            fast.compile_agent(agent)
        return agent

    def _check_replay_memory(self, capacity: int, spec) -> None:
        """Says what the replay will take and, before it is allocated, refuses one that would
        not fit in the device's free memory (a population's is K times a member's)."""
        need, free = replay_bytes(spec, capacity), free_memory(self.device)
        k, per = self.members, self._shard_size()
        what = f"{k} members x {per:,} steps" if k > 1 else f"{per:,} steps"
        if self.shards > 1:
            what += f" (this rank's shard of {self.cfg.train.replay_buffer_size:,})"
        where = f"{self.device.type}, {free / 1e9:.1f} GB free" if free else self.device.type
        self.progress.write(f"replay: {what} = {need / 1e9:.2f} GB on the device ({where})")
        if free and need > 0.9 * free:
            whose = f"{k} members x " if k > 1 else ""
            lower = " or population.size" if k > 1 else ""
            raise TrainingError(
                f"the replay needs {need / 1e9:.1f} GB ({whose}train.replay_buffer_size "
                f"{per:,}) but the {self.device.type} has {free / 1e9:.1f} GB free: lower "
                f"train.replay_buffer_size{lower}"
            )

    def _shard_size(self) -> int:
        """The replay steps this rank holds."""
        return max(1, self.cfg.train.replay_buffer_size // self.shards)

    def _replay_spec(self):
        cfg = self.cfg
        context = (cfg.deter, cfg.models.encoder.mlp.latents) if self.agent.replay_context else None
        return transition_spec(
            cfg.image_size, self.env.vector_dim if cfg.env.vector else 0, context
        )

    # ---- The loop -----------------------------------------------------------------------------

    def close(self) -> None:
        """Stop the environments (worker processes with env.processes)."""
        self.env.close()
        self.eval_env.close()

    def run(self) -> dict:
        try:
            return self._run()
        finally:
            self.log.close_writer()  # also on a health stop or an interrupt

    def _run(self) -> dict:
        c, t = self.counters, self.cfg.train
        n = self.param_summary()
        self.progress.write(f"parameters: {n}")
        self.progress.write(thread_summary(self.env.stepping, self.threads_chosen))
        self.progress.write(f"run directory: {self.run_dir}")
        if t.lr_scaling != "none":
            lrs = ", ".join(f"{k} {short(v)}" for k, v in self.lrs.items())
            self.progress.write(
                f"learning rates x{lr_factor(t):.3g} (train.lr_scaling {t.lr_scaling}, batch "
                f"{t.batch_size} / lr_base_batch {t.lr_base_batch}): {lrs}"
            )
        per_update = t.batch_size * t.sequence_length
        self.collector.start(t.async_collection)
        self._started = time.perf_counter()
        self.meter.start(c["step"], c["env_steps"])
        with self._stop_signals():
            try:
                while not self._done():
                    self._loop_step(per_update)
            except KeyboardInterrupt:
                self._end_segment()
                self._checkpoint("latest")
                self.progress.close()
                raise
            finally:
                self.collector.stop()  # the env step in flight finishes (or raises) first
        self._end_segment()
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
            stop_reason=self.stop_reason,
            stop_kind=self.stop_kind,
        )

    def _loop_step(self, per_update: int) -> None:
        """One step of the training envs, then the updates the train ratio owes."""
        c, t = self.counters, self.cfg.train
        self._agree()
        with nvtx_range("collect"):
            # The random policy until the replay holds bootstrap_steps (a fresh run).
            self.collector.step(self.random_policy and c["env_steps"] < self.train_from)
        # Counted per agent: a population's member steps env.num_envs of the K x N envs, so its
        # train ratio, bootstrap and env-step limits are a single run's. Data-parallel, every
        # rank's envs count: env steps are the job's.
        c["env_steps"] += self.cfg.env.num_envs * self.shards
        if self._ready():
            c["budget"] += self.cfg.env.num_envs * t.train_ratio / per_update
            while c["budget"] >= 1 and not self._done():
                self._update()
                c["budget"] -= 1
        ret, ev = f"{self.last_return:.0f}", f"{self.last_eval:.0f}"
        self.progress.update(c["step"], env=c["env_steps"], ret=ret, eval=ev)

    def _stop_signals(self):
        """SIGTERM ends a single run like Ctrl-C, its final checkpoint written first. Under
        torchrun, SIGINT and SIGTERM (Ctrl-C, or the launcher stopping the job) ask for a stop
        that every rank makes at the same loop step (_agree): no rank is left waiting in a
        collective, and rank 0 writes the checkpoint of a finished update."""
        if self.dist is None:
            return stop_signals(interrupt, (signal.SIGTERM,))
        return stop_signals(self._request_stop, (signal.SIGINT, signal.SIGTERM))

    def _request_stop(self, signum, frame) -> None:
        self._stop_requested = True

    def _wall_time(self, now: float | None = None) -> float:
        """Training seconds so far: the earlier segments (before a resume) plus this one."""
        if self._started is None:
            return self.counters["wall_time"]
        now = time.perf_counter() if now is None else now
        return self.counters["wall_time"] + now - self._started

    def _end_segment(self) -> None:
        self.counters["wall_time"] = self._wall_time()
        self._started = None

    def _agree(self) -> None:
        """Under torchrun, one collective per loop step (not per update): the ranks agree on a
        stop request (a signal reaches each rank at its own moment) and on when every replay is
        ready to train from, so all of them take the same updates."""
        if self.dist is None:
            return
        ready = self._all_ready or self._local_ready()
        flags = self._flags()
        self._all_ready, go_on, *agreed = self.dist.all_of(ready, not self._stop_requested, *flags)
        if not go_on:
            raise KeyboardInterrupt
        self._agreed(agreed)

    def _flags(self) -> tuple[bool, ...]:
        """Hook: more flags the ranks agree on each loop step (each: does it hold on all)."""
        return ()

    def _agreed(self, flags: list[bool]) -> None:
        """Hook: what the ranks agreed on for `_flags`."""

    def _done(self) -> bool:
        c, t = self.counters, self.cfg.train
        return (
            c["step"] >= t.max_train_steps
            or 0 < t.max_env_steps <= c["env_steps"]
            or self.stop_reason is not None
        )

    def _ready(self) -> bool:
        if self.dist is not None:
            return self._all_ready  # agreed at the start of this loop step
        return self._local_ready()

    def _local_ready(self) -> bool:
        c, t = self.counters, self.cfg.train
        return (
            c["env_steps"] >= self.train_from
            and c["episodes"] - self.episodes_at_start >= t.min_buffer_episodes
            and self.replay.can_sample(t.sequence_length + self.agent.replay_context)
        )

    def _episode_end(self, env: int, ret: float, length: int) -> None:
        """Hook: a training episode ended in env `env` (called by the Collector)."""
        self.counters["episodes"] += 1
        self.last_return = ret
        self._record("episode", episode_return=ret, episode_length=length)

    def _entropy_coef_at(self, step: int):
        """Hook: the actor's entropy coefficient at `step` (a population's, one per member)."""
        return actor_entropy_coef_at(self.cfg.train, step)

    # ---- Learning -----------------------------------------------------------------------------

    def _update(self) -> None:
        cfg, c = self.cfg, self.counters
        self.window.at_step(c["step"])
        coef = self._entropy_coef_at(c["step"])
        if coef != self._entropy_coef:  # refilled in place: no recompile, graphs read it
            self.agent.set_entropy_coef(coef)
            self._entropy_coef = coef
        self.meter.add(self.learner.step(c["step"] >= cfg.train.actor_warmup_steps))
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

    def _means(self) -> dict[str, float]:
        """The interval's metric means (the one host sync per log interval)."""
        means = self.meter.means()
        if self.dp is not None:  # the means over ranks: every rank's checks see the same
            means = dict(zip(means, self.dp.mean(list(means.values()))))
        return means

    def _log_train(self) -> None:
        if not self.meter:
            return
        c = self.counters
        means = self._means()
        now, updates, env_steps = self.meter.rates(c["step"], c["env_steps"])
        record = self._fields("train", wall_time=self._wall_time(now))
        record.update({k: None for k in BEHAVIOR_KEYS}, **means)
        record.update(
            train_steps_per_sec=updates,
            env_steps_per_sec=env_steps,
            actor_entropy_coef=self._entropy_coef,
            **self.lrs,
        )
        self.log.write(record)
        self._check_health(means)
        self._check_early_stop(means.get("wm_loss"))

    # ---- Health and early stopping ------------------------------------------------------------

    def _check_health(self, means: dict[str, float]) -> None:
        """Stops the run on a diverged metric, read from the means a log line already holds."""
        found = unhealthy(means, self.cfg.train.max_abs_dream_value)
        if found is not None:
            self._stop_unhealthy(*found)

    def _stop_unhealthy(self, reason: str, values: dict[str, float]) -> None:
        step = self.counters["step"]
        kept = self.saved_step.get("latest")
        where = (
            f"kept the last good checkpoint {self.ckpt_dir / 'latest.pt'} (step {kept})"
            if kept is not None
            else "no checkpoint was written"
        )
        self._record("health", reason=reason, kept_checkpoint_step=kept, **values)
        raise HealthError(f"step {step}: {reason}; {where}")

    def _check_early_stop(self, wm_loss: float | None) -> None:
        c = self.counters
        reason = early_stop_reason(self.cfg.train, wm_loss, c, c["step"])
        if reason is None:
            return
        self.stop_reason, self.stop_kind = reason, "early stop"
        self._record("early_stop", reason=reason, best_wm_loss=c["es_best"])
        self.progress.write(f"early stop at step {c['step']}: {reason}")

    def _check_solved(self, played: int) -> None:
        """train.stop_solved_evals after an evaluation of `played` episodes, confirmed on
        train.stop_confirm_episodes fresh ones when set."""
        reason = solved_reason(self.cfg, self.last_eval, self.counters)
        if reason is None:
            return
        if rounds := confirm_rounds(self.cfg.train, played):
            parts = [e.gathered(self.dp) for e in self.evaluator.rounds(rounds)]
            confirm = confirmation(self.cfg, Episodes.join(parts))
            self._record("solve_confirm", **confirm)
            if not confirm["passed"]:
                self.progress.write(
                    f"not stopped at step {self.counters['step']}: {reason}, but "
                    f"{confirm['reason']}; training goes on"
                )
                return
            reason = f"{reason}; {confirm['reason']}"
        self.stop_reason, self.stop_kind = reason, "solved"
        self._record("solved", reason=reason, eval_return=self.last_eval)
        self.progress.write(f"solved at step {self.counters['step']}: {reason}")

    @torch.no_grad()
    def evaluate(self) -> float:
        """Run `eval_episodes` episodes in parallel, one per eval environment."""
        with nvtx_range("evaluate"):
            return self._evaluate()

    def _evaluate(self) -> float:
        c = self.counters
        # With dream videos, the first eval env's first episode is recorded for a dream.
        episodes, clip = self.evaluator.play(record=self.dreams)
        episodes = episodes.gathered(self.dp)
        fields = episodes.record("eval", self.cfg.env.name)
        self.last_eval = fields["eval_return"]
        self._record("eval", **fields)
        self.progress.write(
            f"step {c['step']} env_steps {c['env_steps']}: "
            f"eval return {self.last_eval:.1f} over {fields['eval_episodes']} episodes"
        )
        if self.last_eval > c["best_eval"]:
            c["best_eval"] = self.last_eval
            self._checkpoint("best")
        self._check_solved(fields["eval_episodes"])
        if clip is not None:
            self.evaluator.dream(clip, c["step"])
        return self.last_eval

    # ---- Checkpoints --------------------------------------------------------------------------

    def _checkpoint(self, name: str) -> int:
        """Writes `name`.pt unless the state is unhealthy: updates since the last log line are
        checked first (checkpoint_every need not be a multiple of log_every)."""
        if self.meter:
            self._check_health(self._means())
        params = [p.detach() for p in self.agent.parameters()]
        if not torch.stack([p.isfinite().all() for p in params]).all():
            self._stop_unhealthy("non-finite parameters", {})
        if name == "latest":
            self._save_replay()
        payload = dict(
            agent=self.agent.state_dict(),
            optim={k: o.state_dict() for k, o in self.agent.optimizers().items()},
            # Periodic checkpoints too carry this segment's time: a run resumed from one
            # continues the wall-time axis instead of jumping back to the segment's start.
            counters=dict(self.counters, wall_time=self._wall_time()),
            rng=checkpoint.rng_state(),
            config=to_dict(self.cfg),
            world_size=self.world,
        )
        path = self.ckpt_dir / f"{name}.pt"
        # Under torchrun the weights are the same on every rank: rank 0 writes them.
        size = checkpoint.save(path, payload) if self.is_main else 0
        if name == "latest":
            self._commit_replay()
        self.saved_step[name] = self.counters["step"]
        return size

    def _save_replay(self) -> None:
        """checkpoints/replay.pt under log.checkpoint_replay, staged until the checkpoint it goes
        with is written (_commit_replay; checkpoint.ReplayFile)."""
        if self.cfg.log.checkpoint_replay:
            c = self.counters
            self.replay_file.stage(self.replay.state_dict(), c["step"], c["env_steps"])

    def _commit_replay(self) -> None:
        self.replay_file.commit()

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
        if not self.is_main:
            # The checkpoint holds rank 0's random state: the others draw new streams.
            torch.manual_seed(
                self.cfg.general.seed + self.rank * distributed.SEED_STRIDE + self.counters["step"]
            )
            return
        save_toml(self.cfg, self.run_dir / "config.toml")
        dropped = truncate_metrics(self.run_dir / "metrics.jsonl", self.counters["step"])
        self.progress.write(
            f"resumed {path} at step {self.counters['step']}, env steps "
            f"{self.counters['env_steps']} ({dropped} later metric lines dropped)"
        )

    def _restore_replay(self) -> bool:
        """Loads checkpoints/replay.pt into the replay when log.checkpoint_replay is on and the
        file was written with the checkpoint just loaded; otherwise says why it refills."""
        if not self.cfg.log.checkpoint_replay:
            return False
        c = self.counters
        # A population member resumed as a single run reads its slice of the population's.
        alone = self.world == 1 and self.cfg.population.size == 1
        member_dir = self.run_dir if alone else None
        path, why = self.replay_file.restore(self.replay, c["step"], c["env_steps"], member_dir)
        if why is not None:
            self.progress.write(f"notice: {why}: refilling the replay")
            return False
        of = "" if path == self.replay_file.path else f" of {self.run_dir.name}"
        self.progress.write(f"restored the replay: {len(self.replay):,} env steps{of} from {path}")
        return True

    def param_summary(self) -> str:
        a = self.agent
        count = lambda m: sum(p.numel() for p in m.parameters() if p.requires_grad)
        return (
            f"{a.num_params():,} (world model {count(a.wm) / 1e6:.2f}M, actor "
            f"{count(a.behavior.actor) / 1e6:.2f}M, critic {count(a.behavior.critic) / 1e6:.2f}M)"
        )
