"""Population training: K agents in one process, one env pool, one replay and one update.

`PopulationTrainer` is the trainer of a population: the members' envs (member k acts in envs
k*N .. k*N + N - 1 of one pool), their directories (member_00/ ... in a single run's format), their
health, evaluations and solved stops one by one, their checkpoints (a set that resumes whole, also
under torchrun), population-based training (`[population.pbt]`: exploit and explore) and the
tables (population.csv, population.md). The stacked agent it trains, and why it is built on
torch.func.vmap, is engine.population_agent's `PopulationAgent`.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import math
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch.utils._pytree import tree_map

from engine import checkpoint, distributed
from engine.config import (
    MEMBER_KEYS,
    SWITCH_KEYS,
    Config,
    ConfigError,
    Schedule,
    actor_entropy_coef_at,
    effective_lrs,
    from_dict,
    get_key,
    member_configs,
    mixed_switches,
    plain_value,
    save_toml,
    set_key,
    to_dict,
    validate,
)
from engine.episodes import Episodes
from engine.health import (
    HealthError,
    TrainingError,
    confirm_rounds,
    confirmation,
    early_stop_reason,
    solved_reason,
    unhealthy,
)
from engine.logger import MetricsLog, truncate_metrics
from engine.population_agent import PopulationAgent, population_options
from engine.trainer import BEHAVIOR_KEYS, Trainer


def write_population_tables(run_dir: Path, rows: list[dict], counters: dict) -> None:
    """population.csv (one row per member) and population.md (the same as a table, then the
    mean +- std of the last and best eval returns), each written atomically."""
    if not rows:
        return
    keys = list(rows[0])

    def write_csv(f):
        w = csv.DictWriter(f, keys)
        w.writeheader()
        w.writerows(rows)

    checkpoint.atomic_write(run_dir / "population.csv", lambda p: _write_text(p, write_csv))

    def cell(v) -> str:  # returns to one decimal; settings (learning rates of 1e-4) to 4 digits
        if not isinstance(v, float):
            return str(v)
        return f"{v:.1f}" if abs(v) >= 10 else f"{v:.4g}"

    lines = [
        f"# Population: {len(rows)} members, {counters['step']:,} updates, "
        f"{counters['env_steps']:,} env steps per member",
        "",
        "| " + " | ".join(keys) + " |",
        "|" + "---|" * len(keys),
    ]
    lines += ["| " + " | ".join(cell(r[k]) for k in keys) + " |" for r in rows]
    for key in ("last_eval", "best_eval"):
        values = np.array([r[key] for r in rows], dtype=float)
        values = values[np.isfinite(values)]
        if len(values):
            lines.append("")
            lines.append(
                f"{key}: {values.mean():.1f} +- {values.std():.1f} over {len(values)} members "
                f"(min {values.min():.1f}, max {values.max():.1f})"
            )
    text = "\n".join(lines) + "\n"
    checkpoint.atomic_write(
        run_dir / "population.md", lambda p: _write_text(p, lambda f: f.write(text))
    )


def _write_text(path, write) -> None:
    with open(path, "w", newline="") as f:
        write(f)


def member_dir_name(k: int) -> str:
    return f"member_{k:02d}"


class PopulationTrainer(Trainer):
    """Trainer for a population (population.size > 1): one env pool of K x N envs (member k acts
    in envs k*N .. k*N + N - 1), one replay ring with each member sampling its own envs, one
    update for all members. Each member's directory (member_00/ ...) holds what a single run's
    does (config.toml with its resolved settings, metrics.jsonl, checkpoints/ in a single
    agent's format), so engine.report, engine.evaluate and engine.dream work on it, and a member
    resumes as a single run. The run directory holds the population's config.toml, its own
    metrics.jsonl (speed and membership events), checkpoints/population.pt (counters, members'
    status, RNG) and replay.pt, and population.csv / population.md.

    A member that diverges (non-finite metric or parameter, runaway dream value) is frozen: its
    updates are masked, its envs keep stepping with its last weights, and the others train on.
    A member that meets train.stop_solved_evals or train.early_stop_patience stops the same
    way. The run ends when no member trains; it exits 3 only when every member has failed.

    Under torchrun the members are split over the ranks, K / W each (rank r trains members
    r*K/W .. (r+1)*K/W - 1, in their own directories): no gradient crosses ranks. The ranks
    step in lockstep (the same updates, evaluations and checkpoints), agree once per loop step
    whether every member of the job has stopped, gather the members' evals for the job's line
    and tables (rank 0 writes them), and PBT ranks the whole population, a member's state
    crossing ranks when its source trains elsewhere. Each rank checkpoints its members and
    its own counters (population.pt on rank 0, population.rank<r>.pt)."""

    ranks_share_agent = False
    resume_file = "population.pt"

    def __init__(self, cfg: Config, run_dir: Path, resume: bool = False):
        dist, total = distributed.current(), cfg.population.size
        world, rank = (dist.world, dist.rank) if dist is not None else (1, 0)
        if total % world:
            raise TrainingError(
                f"population.size {total} does not split over {world} ranks: make it a "
                f"multiple of --nproc_per_node"
            )
        self.members = total // world  # this rank's
        self.first = rank * self.members  # the job-wide index of this rank's first member
        # Every member's config on every rank (PBT's explore reads a source trained elsewhere).
        self.all_member_cfgs = member_configs(cfg)
        self.member_cfgs = self.all_member_cfgs[self.first : self.first + self.members]
        self.member_dirs = [run_dir / member_dir_name(self.first + k) for k in range(self.members)]
        self.member_counters = [_member_counters() for _ in range(self.members)]
        self.member_logs: list[MetricsLog] = []
        super().__init__(cfg, run_dir, resume)
        for d in self.member_dirs:
            (d / "checkpoints").mkdir(parents=True, exist_ok=True)
        if not resume:
            for member, d in zip(self.member_cfgs, self.member_dirs):
                save_toml(member, d / "config.toml")
        self.member_logs = [MetricsLog(d / "metrics.jsonl") for d in self.member_dirs]
        self.member_lrs = [effective_lrs(m.train) for m in self.member_cfgs]
        self._rank_done = ""  # under torchrun: "stopped" or "failed" once no member here trains
        self._stops: list[dict] = []  # member_stopped records not yet in the run's metrics
        if self.dreams:
            self.dreams = False
            self.progress.write("note: log.dream_video: no dream videos in a population run")
        self._refresh_active()

    # ---- Building ---------------------------------------------------------------------------

    def _make_agent(self) -> PopulationAgent:
        self.opts, notices = population_options(self.opts)
        for line in notices:
            self.progress.write(line)
        env = self.env
        # Under torchrun a rank holds some members, and PBT may hand one a switch value only
        # another rank's members have: the switches mixed in the whole population are flags.
        mixed = mixed_switches(self.all_member_cfgs)
        return PopulationAgent(
            self.member_cfgs, env.vector_dim, env.num_actions, self.device, self.opts, mixed
        )

    def _entropy_coef_at(self, step: int) -> list[float]:
        return [actor_entropy_coef_at(m.train, step) for m in self.member_cfgs]

    def param_summary(self) -> str:
        ranks = f" on each of {self.world} ranks" if self.world > 1 else ""
        return f"{self.members} members{ranks} x {self.agent.num_params():,}"

    def _job(self, values: list) -> list:
        """Every member's value in the job (each rank's `values` in rank order)."""
        if self.dist is None:
            return list(values)
        return [v for part in self.dist.gather_objects(list(values), "member gather") for v in part]

    # ---- Members ----------------------------------------------------------------------------

    def _member_write(self, k: int, kind: str, **fields) -> None:
        if self.member_logs:
            self.member_logs[k].write(self._fields(kind, **fields))

    def _episode_end(self, env: int, ret: float, length: int) -> None:
        k = env // self.cfg.env.num_envs
        self.counters["episodes"] += 1
        mc = self.member_counters[k]
        mc["episodes"] += 1
        self.last_return = ret
        self._member_write(k, "episode", episode_return=ret, episode_length=length)

    def _refresh_active(self) -> None:
        with torch.no_grad():
            for k, mc in enumerate(self.member_counters):
                if mc["status"] != "training":
                    self.agent.freeze(k)

    def _stop_member(self, k: int, status: str, reason: str, **values) -> None:
        """Member k stops training: "failed" (diverged), "solved" or "early stop"."""
        mc = self.member_counters[k]
        if mc["status"] != "training":
            return
        # Its weights stop here: every later checkpoint of it says so (engine.evaluate's step,
        # the env steps and wall time it took), not the step the population was saved at.
        stopped = dict(self.counters, wall_time=self._wall_time())
        mc.update(status=status, reason=reason, stopped_counters=stopped)
        self.agent.freeze(k)
        kind = {"failed": "health", "solved": "solved", "early stop": "early_stop"}[status]
        self._member_write(k, kind, reason=reason, **values)
        self._stops.append(
            self._fields("member_stopped", member=self.first + k, status=status, reason=reason)
        )
        # Every rank's line: under torchrun a member trained on rank 1 stops in rank 1 only.
        self.progress.write(
            f"member {self.first + k}: {status} at step {self.counters['step']}: {reason}"
            + ("; the others train on" if status == "failed" else ""),
            every_rank=True,
        )
        if any(m["status"] == "training" for m in self.member_counters):
            return
        failed = all(m["status"] == "failed" for m in self.member_counters)
        if self.dist is not None:  # the job ends when no rank has a member training (_agreed)
            self._rank_done = "failed" if failed else "stopped"
            return
        if failed:
            raise HealthError(f"step {self.counters['step']}: every member failed ({reason})")
        self.stop_reason = (
            "no member is training ("
            + ", ".join(f"{i}: {m['status']}" for i, m in enumerate(self.member_counters))
            + ")"
        )
        self.stop_kind = "all members stopped"

    def _flush_stops(self) -> None:
        """The job's member stops into the run's metrics.jsonl, which rank 0 writes: a member
        stopped on another rank reaches it here, at the next log line, evaluation or summary
        (points every rank passes in step)."""
        stops, self._stops = self._stops, []
        for record in self._job(stops):
            self.log.write(record)

    def _flags(self) -> tuple[bool, ...]:
        return bool(self._rank_done), self._rank_done == "failed"

    def _agreed(self, flags: list[bool]) -> None:
        """Under torchrun: a rank whose members have all stopped keeps stepping (its updates
        masked) until every rank's have, so that the ranks stay in step."""
        all_done, all_failed = flags
        if all_failed:
            raise HealthError(f"step {self.counters['step']}: every member on every rank failed")
        if all_done and self.stop_reason is None:
            self.stop_reason = f"no member is training on any of the {self.world} ranks"
            self.stop_kind = "all members stopped"

    # ---- Logging ----------------------------------------------------------------------------

    def _log_train(self) -> None:
        if not self.meter:
            return
        c = self.counters
        means = self._means()  # key -> [one value per member]
        now, rate, env_rate = self.meter.rates(c["step"], c["env_steps"])
        speed = dict(
            train_steps_per_sec=rate,
            agent_updates_per_sec=rate * self.members,  # this rank's (the job's: x world)
            env_steps_per_sec=env_rate,  # per member
        )
        training = [m["status"] == "training" for m in self.member_counters]
        total = dict(
            speed,
            agent_updates_per_sec=speed["agent_updates_per_sec"] * self.world,
            env_steps_per_sec=speed["env_steps_per_sec"] * self.members * self.world,
        )
        members_training = sum(self._job([sum(training)]))
        self._record("train", wall_time=self._wall_time(now), members_training=members_training,
                     **total)  # fmt: skip
        for k in range(self.members):
            if not training[k]:
                continue
            record = {key: None for key in BEHAVIOR_KEYS}
            record.update({key: values[k] for key, values in means.items()})
            self._member_write(
                k,
                "train",
                wall_time=self._wall_time(now),
                **record,
                **speed,
                actor_entropy_coef=self._entropy_coef[k],
                **self.member_lrs[k],
            )
            member_means = {key: values[k] for key, values in means.items()}
            self._check_member_health(k, member_means)
            mc, wm_loss = self.member_counters[k], member_means.get("wm_loss")
            reason = early_stop_reason(self.cfg.train, wm_loss, mc, c["step"])
            if reason is not None:
                self._stop_member(k, "early stop", reason)
        self._flush_stops()

    def _check_member_health(self, k: int, means: dict[str, float]) -> None:
        found = unhealthy(means, self.cfg.train.max_abs_dream_value)
        if found is not None:
            reason, values = found
            self._stop_member(k, "failed", reason, **values)

    # ---- Population-based training ----------------------------------------------------------

    def _update(self) -> None:
        super()._update()
        every = self.cfg.population.pbt.every
        if every and self.counters["step"] % every == 0 and self.stop_reason is None:
            self.exploit_and_explore()

    def exploit_and_explore(self) -> None:
        """[population.pbt]: each training member in the bottom `quantile` of the last eval
        returns takes the state of a random one in the top `quantile` (copy_member) and that
        member's grid settings, each multiplied by a random factor of `perturb` (a value the
        config would refuse keeps the source's). Members are ranked only once evaluated after
        their last exploit. Both members' metrics get a record. Under torchrun the whole
        population is ranked (every rank draws the same pairs) and a source on another rank
        sends its state there."""
        pbt, c = self.cfg.population.pbt, self.counters
        evals = self._job(
            mc["last_eval"] if mc["status"] == "training" else math.nan
            for mc in self.member_counters
        )
        ranked = sorted((v, k) for k, v in enumerate(evals) if math.isfinite(v))
        n = int(pbt.quantile * len(ranked))
        if n < 1:
            return
        rng = np.random.default_rng(self.cfg.general.seed * 1_000_003 + c["step"])
        bottom, top = [k for _, k in ranked[:n]], [k for _, k in ranked[-n:]]
        for dst in bottom:
            src = top[int(rng.integers(len(top)))]
            self._copy_member(src, dst)
            member = explore(
                self.all_member_cfgs[src],
                self.all_member_cfgs[dst].general.seed,
                [k for k in self.cfg.population.grid if k in MEMBER_KEYS],
                pbt.perturb,
                rng,
            )
            self.all_member_cfgs[dst] = member
            settings = {key: plain_value(get_key(member, key)) for key in self.cfg.population.grid}
            mine = self._local(dst)
            if mine is not None:
                self.agent.set_member_config(mine, member)  # also self.member_cfgs[mine]
                self.member_lrs[mine] = effective_lrs(member.train)
                save_toml(member, self.member_dirs[mine] / "config.toml")
                self.member_counters[mine]["last_eval"] = math.nan  # ranked again once evaluated
                self._member_write(mine, "pbt_exploit", source=src, source_eval=evals[src],
                                   eval_return_before=evals[dst], settings=settings)  # fmt: skip
            if (theirs := self._local(src)) is not None:
                self._member_write(theirs, "pbt_source", target=dst, eval_return=evals[src])
            self._record("pbt_exploit", source=src, target=dst, settings=settings)
            self.progress.write(
                f"pbt at step {c['step']}: member {dst} ({evals[dst]:.1f}) takes member {src}'s "
                f"state ({evals[src]:.1f}), settings {settings}"
            )
        self._entropy_coef = self._entropy_coef_at(c["step"])
        self.agent.set_entropy_coef(self._entropy_coef)
        self.write_summary()

    def _local(self, k: int) -> int | None:
        """This rank's index of the job's member k (None: it trains on another rank)."""
        return k - self.first if self.first <= k < self.first + self.members else None

    def _copy_member(self, src: int, dst: int) -> None:
        """Member dst (job-wide index) takes member src's state: in place when both train here,
        else sent from src's rank (weights, buffers, moments, on the CPU) to every rank."""
        s, d = self._local(src), self._local(dst)
        if s is not None and d is not None:
            self.agent.copy_member(s, d)
            return
        state = None
        if s is not None:
            state = tree_map(lambda t: t.cpu(), self.agent.member_state(s))
        state = self.dist.broadcast_object(state, "PBT member copy", src=src // self.members)
        if d is not None:
            agent, optim = tree_map(lambda t: t.to(self.device), state)
            self.agent.load_member_state(d, agent, optim)

    # ---- Evaluation -------------------------------------------------------------------------

    def _evaluate(self) -> float:
        c, n = self.counters, self.cfg.log.eval_episodes
        episodes, _ = self.evaluator.play()
        evals, solved = [], {}
        for k, mc in enumerate(self.member_counters):
            fields = episodes.rows(self._eval_rows(k)).record("eval", self.cfg.env.name)
            mc["last_eval"] = fields["eval_return"]
            evals.append(mc["last_eval"])
            self._member_write(k, "eval", **fields)
            if mc["status"] != "training":
                continue
            if mc["last_eval"] > mc["best_eval"]:
                mc["best_eval"] = mc["last_eval"]
                self._checkpoint_member(k, "best")
            reason = solved_reason(self.cfg, mc["last_eval"], mc)
            if reason is not None:
                solved[k] = reason
        self._stop_solved(solved)
        self._flush_stops()
        # The job's: every rank's members (in one process, this population).
        evals, bests = zip(*self._job(zip(evals, (m["best_eval"] for m in self.member_counters))))
        self.last_eval = float(np.mean(evals))
        c["best_eval"] = max(bests)
        self._record("eval", eval_returns=list(evals), eval_return=self.last_eval)
        self.progress.write(
            f"step {c['step']} env_steps {c['env_steps']}: eval return "
            f"{self.last_eval:.1f} +- {float(np.std(evals)):.1f} over {len(evals)} members "
            f"({' '.join(f'{v:.0f}' for v in evals)}; {n} episodes each)"
        )
        self.write_summary()
        return self.last_eval

    def _eval_rows(self, k: int) -> slice:
        """Member k's rows of an evaluation's episodes (log.eval_episodes envs each)."""
        n = self.cfg.log.eval_episodes
        return slice(k * n, (k + 1) * n)

    def _stop_solved(self, solved: dict[int, str]) -> None:
        """Stops the members whose solved streak is complete ({member: reason}), each once its
        own rows of train.stop_confirm_episodes fresh episodes confirm it when that is set
        (the rounds are played once for all of them)."""
        n = self.cfg.log.eval_episodes
        rounds = confirm_rounds(self.cfg.train, n) if solved else 0
        parts = self.evaluator.rounds(rounds)
        for k, reason in solved.items():
            if parts:
                mine = Episodes.join([p.rows(self._eval_rows(k)) for p in parts])
                confirm = confirmation(self.cfg, mine)
                self._member_write(k, "solve_confirm", **confirm)
                if not confirm["passed"]:
                    self.progress.write(
                        f"member {self.first + k}: not stopped at step {self.counters['step']}: "
                        f"{reason}, but {confirm['reason']}; it trains on",
                        every_rank=True,
                    )
                    continue
                reason = f"{reason}; {confirm['reason']}"
            self._stop_member(k, "solved", reason, eval_return=self.member_counters[k]["last_eval"])

    # ---- Checkpoints ------------------------------------------------------------------------

    def _checkpoint(self, name: str) -> int:
        """checkpoints/population.pt (and replay.pt) in the run directory, and each member's
        `name`.pt in its own directory but a failed one's. A member whose state is not finite
        is stopped (its last good checkpoint kept) instead of ending the run.

        The set that resumes (members' latest.pt, replay.pt, population.pt) is written in two
        phases: the members' files as latest.pt.next, then replay.pt.next and
        population.pt.next, then (under torchrun once every rank has written its set)
        population.pt.next, each member's .next and replay.pt.next renamed into place. A process
        killed while the set is written (torchrun gives its ranks 30 s after a Ctrl-C before
        SIGKILL; the LunarLander population of 4 took 14-25 s here, and 31 s when the Ctrl-C
        came during the first update's compile) leaves the previous set whole, replay
        included, on every rank: _restore resumes the latest step whose set every rank holds,
        committed or staged, and drops the rest (Trainer._restore_replay the replay's)."""
        if self.meter:  # updates since the last log line are checked first
            means = self._means()
            for k, mc in enumerate(self.member_counters):
                if mc["status"] == "training":
                    self._check_member_health(k, {key: v[k] for key, v in means.items()})
        size = 0
        for k, mc in enumerate(self.member_counters):
            # A solved or early-stopped member's final weights are saved too; a failed one
            # keeps its last good checkpoint.
            if mc["status"] != "failed":
                size += self._checkpoint_member(k, name, staged=name == "latest")
        if name == "latest":
            self._save_replay()
            state = dict(
                counters=dict(self.counters, wall_time=self._wall_time()),
                members=self.member_counters,
                rng=checkpoint.rng_state(),
                config=to_dict(self.cfg),
                world_size=self.world,
                # PBT may have changed members trained on other ranks too: every rank's view.
                member_configs=[to_dict(m) for m in self.all_member_cfgs],
            )
            path = self._population_path()
            size += checkpoint.save(checkpoint.staged_path(path), state)
            if self.dist is not None:
                # Every rank's set is on disk before any rank commits its own, so a resume
                # finds each rank's set of this step committed or staged (_settle_population).
                self.dist.all_of(True, what="checkpoint commit")
            os.replace(checkpoint.staged_path(path), path)
            self._commit_members()
            self._commit_replay()
            self.saved_step[name] = self.counters["step"]
        return size

    def _staged(self) -> Iterator[Path]:
        """The members' latest.pt.next files on disk."""
        for d in self.member_dirs:
            if (staged := checkpoint.staged_path(d / "checkpoints" / "latest.pt")).is_file():
                yield staged

    def _commit_members(self) -> None:
        """Each member's latest.pt.next becomes its latest.pt (population.pt is written)."""
        for staged in self._staged():
            os.replace(staged, staged.with_name("latest.pt"))

    def _drop_uncommitted(self, step: int) -> None:
        """On resume: a latest.pt.next written for another step than population.pt's belongs
        to a set a kill cut off before population.pt; the previous set stays whole."""
        for staged in list(self._staged()):
            # An unreadable one is never part of a completed set.
            if (checkpoint.peek(staged) or {}).get("saved_at") != step:
                staged.unlink()

    def _checkpoint_member(self, k: int, name: str, staged: bool = False) -> int:
        agent, optim = self.agent.member_state(k)
        if not all(v.isfinite().all() for v in agent.values() if v.is_floating_point()):
            self._stop_member(k, "failed", "non-finite parameters")
            return 0
        mc = self.member_counters[k]
        counters = mc.get("stopped_counters") or dict(self.counters, wall_time=self._wall_time())
        counters.update({key: mc[key] for key in SINGLE_RUN_COUNTERS})
        payload = dict(
            agent=agent,
            optim=optim,
            counters=counters,
            rng=checkpoint.rng_state(),
            config=to_dict(self.member_cfgs[k]),
        )
        path = self.member_dirs[k] / "checkpoints" / f"{name}.pt"
        if staged:  # part of the resume set: latest.pt once population.pt is written
            payload["saved_at"] = self.counters["step"]
            path = checkpoint.staged_path(path)
        return checkpoint.save(path, payload)

    def _population_path(self) -> Path:
        """This rank's counters, members' status and RNG: population.pt, population.rank<r>.pt."""
        return checkpoint.rank_path(self.ckpt_dir, "population", self.rank)

    def _settle_population(self, path: Path) -> None:
        """Make this rank's population file the one of the latest step whose set every rank
        holds on disk, committed or staged (a kill can stop one rank between the commit
        barrier and its renames, or before its staged files are complete)."""
        staged = checkpoint.staged_path(path)
        mine = (_saved_step(path), _saved_step(staged))
        everyone = self.dist.gather_objects(mine, "checkpoint agreement") if self.dist else [mine]
        target = _complete_step(everyone)
        if target is None:
            if any(step is not None for pair in everyone for step in pair):
                held = "; ".join(
                    f"rank {r}: {_steps_held(c, s)}" for r, (c, s) in enumerate(everyone)
                )
                raise TrainingError(
                    f"{path.parent}: the ranks hold no checkpoint of the same step ({held}); "
                    "cannot resume them together"
                )
            return  # no checkpoint at all: _restore says so
        if mine[0] != target:
            os.replace(staged, path)  # a set the kill left staged after every rank wrote it
        elif staged.exists():
            staged.unlink()  # a later set that not every rank finished

    def _restore(self) -> None:
        path = self._population_path()
        self._settle_population(path)
        if not path.is_file():
            raise TrainingError(f"{path}: no population checkpoint to resume from")
        state = checkpoint.load(path, self.device)
        saved = len(state["members"])
        if saved != self.members:
            raise TrainingError(
                f"{path}: holds a population of {saved}, not {self.members} (population.size)"
            )
        if self.cfg.population.pbt.every and "member_configs" in state:
            self._restore_pbt_settings(state["member_configs"])
        self._drop_uncommitted(state["counters"]["step"])  # a set cut off by a kill
        self._commit_members()  # one killed after population.pt, before its renames
        for k, d in enumerate(self.member_dirs):
            member_path = d / "checkpoints" / "latest.pt"
            if not member_path.is_file():
                raise TrainingError(
                    f"{member_path}: missing; cannot resume member {self.first + k}"
                )
            member = checkpoint.load(member_path, self.device)
            step, held = state["counters"]["step"], member.get("counters", {}).get("step")
            if state["members"][k]["status"] == "training" and held != step:
                # engine.run --resume on the member's directory continued it alone since.
                raise TrainingError(
                    f"{member_path}: holds update {held}, the population {step} (was "
                    f"{d.name} resumed alone?); resume that member on its own, or the "
                    "population from a copy made before"
                )
            try:
                self.agent.load_member_state(k, member["agent"], member["optim"])
            except (KeyError, ValueError) as e:
                raise TrainingError(
                    f"{member_path}: does not match the config (were models.* changed?): {e}"
                ) from None
        self.counters.update(state["counters"])
        self.member_counters = state["members"]
        checkpoint.set_rng_state(state["rng"])
        step = self.counters["step"]
        if self.is_main:
            save_toml(self.cfg, self.run_dir / "config.toml")
            truncate_metrics(self.run_dir / "metrics.jsonl", step)
        for member, d in zip(self.member_cfgs, self.member_dirs):
            save_toml(member, d / "config.toml")
            truncate_metrics(d / "metrics.jsonl", step)
        # The job's members (under torchrun, every rank's), as the eval lines count them.
        stopped = self._job([m["status"] != "training" for m in self.member_counters])
        self.progress.write(
            f"resumed {path} at step {step}, env steps {self.counters['env_steps']} "
            f"({len(stopped)} members, {sum(stopped)} stopped)"
        )

    def _restore_pbt_settings(self, saved: list[dict]) -> None:
        """The grid settings PBT gave each member (saved with the counters), over the grid's
        own: a resumed PBT run goes on with the perturbed learning rates, not the first ones."""
        keys = [key for key in self.cfg.population.grid if key in (*MEMBER_KEYS, *SWITCH_KEYS)]
        for member, raw in zip(self.all_member_cfgs, saved):
            before = from_dict(raw)
            for key in keys:
                set_key(member, key, get_key(before, key), "population checkpoint")
        for k, member in enumerate(self.member_cfgs):
            self.agent.set_member_config(k, member)

    # ---- The end ----------------------------------------------------------------------------

    def run(self) -> dict:
        try:
            result = super().run()
        except BaseException:
            # Under torchrun the other ranks may be gone: the last evaluation's tables stay.
            if self.dist is None:
                self.write_summary()
            raise
        finally:
            for log in self.member_logs:
                log.close()
        self.write_summary()
        return result

    def write_summary(self) -> None:
        """population.csv and population.md: each member's seed, grid settings, status, last and
        best eval, and the mean +- std over the members."""
        self._flush_stops()
        rows = []
        for k, (member, mc) in enumerate(zip(self.member_cfgs, self.member_counters)):
            row = {"member": member_dir_name(self.first + k), "seed": member.general.seed}
            grid = [key for key in self.cfg.population.grid if key != "general.seed"]
            row.update({key: get_key(member, key) for key in grid})
            row.update(
                status=mc["status"] + (f" ({mc['reason']})" if mc["reason"] else ""),
                episodes=mc["episodes"],
                last_eval=mc["last_eval"],
                best_eval=mc["best_eval"],
            )
            rows.append(row)
        rows = self._job(rows)  # under torchrun, every rank's members: rank 0 writes them
        if self.is_main:
            write_population_tables(self.run_dir, rows, self.counters)


def explore(
    source: Config, seed: int, keys: list[str], factors: list[float], rng: np.random.Generator
) -> Config:
    """PBT's explore step: a copy of `source` with the member's own `seed` and each of `keys`
    multiplied by a random one of `factors` (a schedule's start and end alike); a value the
    config refuses (e.g. gamma >= 1) keeps the source's."""
    cfg = copy.deepcopy(source)
    cfg.general.seed = seed
    for key in keys:
        old = get_key(cfg, key)
        factor = float(factors[int(rng.integers(len(factors)))])
        if isinstance(old, Schedule):
            new = dataclasses.replace(old, start=old.start * factor, end=old.end * factor)
        else:
            new = old * factor
        try:
            set_key(cfg, key, new, "population.pbt")
            validate(cfg, "population.pbt")
        except ConfigError:
            set_key(cfg, key, old, "population.pbt")
    return cfg


SINGLE_RUN_COUNTERS = ("episodes", "best_eval", "es_best", "es_best_step", "es_stale",
                       "solved_streak")  # fmt: skip


def _member_counters() -> dict:
    return dict(
        episodes=0,
        best_eval=-math.inf,
        last_eval=math.nan,
        es_best=math.inf,
        es_best_step=0,
        es_stale=0,
        solved_streak=0,
        status="training",
        reason="",
        stopped_counters=None,  # the counters at the stop (its step...), for later checkpoints
    )


def _saved_step(path: Path) -> int | None:
    """The step a population file was saved at; None when it is missing or unreadable."""
    state = checkpoint.peek(path)
    return None if state is None else int(state["counters"]["step"])


def _complete_step(held: list[tuple[int | None, int | None]]) -> int | None:
    """The latest step whose population file every rank holds, as (committed, staged) steps
    per rank; None when there is none."""
    steps = sorted({s for pair in held for s in pair if s is not None}, reverse=True)
    return next((s for s in steps if all(s in pair for pair in held)), None)


def _steps_held(committed: int | None, staged: int | None) -> str:
    parts = [f"step {committed}" if committed is not None else "no checkpoint"]
    if staged is not None:
        parts.append(f"step {staged} staged")
    return ", ".join(parts)
