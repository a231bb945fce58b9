"""Sweep engine.run over a grid of config values and seeds, resumably, with summary tables.

`python -m engine.sweep --config C --grid train.batch_size=8,16 --seeds 3 [--parallel N]`: every
combination of the `--grid` values times the seeds 0..N-1 (`--first-seed S`: S..S+N-1) is one
`engine.run` process with its own run directory under the sweep directory. `--arm NAME:KEY=V;KEY=V`
(repeatable) adds named sets of overrides as one more grid dimension `arm`, for ablations where
each arm changes several keys at once (`--arm base:` is the config as it is). The state lives in
`sweep.json`, so re-running the same command finishes what is missing (done runs are skipped,
interrupted runs resume from their checkpoint, failed ones restart in a clean directory), and
`summary.csv`/`summary.md` tabulate the losses and returns of every run and the mean +- std over
seeds of every setting.

`--population K` packs the runs that differ only in seed and member settings (config.GRID_KEYS)
into population processes of up to K members (engine.population): one process and one update
for K runs; each run's name links to its member's directory, so the tables read it unchanged.

`--backend optuna` (an Optuna study whose workers share a journal file) and `--backend submitit`
(a SLURM job array) hand the scheduling to those libraries: engine/search.py.

Input errors (a bad key or value in any combination, a sweep directory that holds another sweep)
print one line and exit 2 before any run starts. Ctrl-C/SIGTERM stops the running children with
SIGTERM (each writes its checkpoint) and exits 130; a failed run makes the exit status 1.
"""

from __future__ import annotations

import argparse
import copy
import csv
import dataclasses
import fcntl
import hashlib
import io
import itertools
import json
import math
import os
import re
import shlex
import signal
import statistics
import subprocess
import sys
import threading
import time
import tomllib
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import IO, Any, NoReturn

from engine.config import (
    GRID_KEYS,
    TASK_TARGETS,
    Config,
    ConfigError,
    add_set_option,
    apply_overrides,
    get_key,
    load_config,
    member_configs,
    plain_value,
    save_toml,
    to_dict,
    validate,
)
from engine.logger import fmt_value as _fmt
from engine.logger import md_table as _md_table
from engine.logger import read_metrics as _read_metrics
from engine.logger import write_text_atomic as write_atomic
from engine.report import MAX_IS_BEST, SUMMARY_LOSSES

ROOT = Path(__file__).resolve().parent.parent
SEED_KEY = "general.seed"
ARM_KEY = "arm"  # the grid dimension of --arm: its values are arm names, not config values
STEPS_KEY = "train.max_train_steps"
# Train-record metrics tabulated (final and best) when a run logs them; best is the minimum,
# except for these, where more is better.
METRIC_KEYS = (*SUMMARY_LOSSES, "dream_value", "dream_return")
STATUSES = ("pending", "running", "done", "failed", "interrupted")
STOP_GRACE_S = 120.0  # default --stop-grace: how long stopped children get to checkpoint
MAX_NAME = 180  # run-directory names stay well under the 255-byte file-name limit


class SweepError(Exception):
    """Bad input or an unusable sweep directory: one line, exit 2."""


# --------------------------------------------------------------------------------------------
# The plan: grid expansion, naming and validation (no process is started before all of it passes).


@dataclass
class RunSpec:
    name: str
    settings: dict[str, str]
    """Grid key -> value text as given (passed on unchanged as `--set key=value`)."""
    seed: int
    overrides: list[str]
    job: str | None = None
    """With --population: the population process that trains this run (None: its own)."""
    member: int | None = None
    """Its member index there."""


@dataclass
class Plan:
    config: str
    config_abs: str
    config_hash: str
    grid: list[tuple[str, list[str]]]
    seeds: int
    max_steps: int | None
    overrides: list[str]
    runs: list[RunSpec]
    arms: dict[str, list[str]] = field(default_factory=dict)
    population: int = 1
    """--population: at most this many runs packed into one population process."""
    packs: dict[str, Config] = field(default_factory=dict)
    """Population process name -> its config (population.size and a member grid)."""
    first_seed: int = 0
    """--first-seed: the seeds are first_seed .. first_seed + seeds - 1."""

    def identity(self) -> dict[str, Any]:
        """What must match for a sweep directory to be continued by this command."""
        ident = dict(
            config=self.config_abs,
            config_hash=self.config_hash,
            grid=[[k, list(v)] for k, v in self.grid],
            seeds=self.seeds,
            max_steps=self.max_steps,
            overrides=list(self.overrides),
        )
        if self.arms:  # absent without arms, so older sweep directories still continue
            ident["arms"] = {k: list(v) for k, v in self.arms.items()}
        if self.population > 1:  # the same for --population: its directories differ
            ident["population"] = self.population
        if self.first_seed:  # absent for seeds from 0, so older sweep directories still continue
            ident["first_seed"] = self.first_seed
        return ident


def _seed_range(ident: dict[str, Any]) -> str:
    """The sweep's seeds as its summary names them: 3, or 1..2 from --first-seed."""
    first = ident.get("first_seed", 0)
    return f"{first}..{first + ident['seeds'] - 1}" if first else str(ident["seeds"])


def split_values(text: str) -> list[str]:
    """Split on commas outside brackets and quotes, so `[32,32],[64,64]` is two list values."""
    parts, depth, quote, start = [], 0, "", 0
    for i, ch in enumerate(text):
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "\"'":
            quote = ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(text[start:i].strip())
            start = i + 1
    parts.append(text[start:].strip())
    return parts


def parse_grid(spec: str, base: Config) -> tuple[str, list[str]]:
    """`key=v1,v2`: each value is checked like a `--set` value (known key, right type)."""
    src = f"--grid {spec}"
    if "=" not in spec:
        raise SweepError(f"{src}: expected KEY=VALUE,VALUE,...")
    key, text = (s.strip() for s in spec.split("=", 1))
    values = split_values(text)
    if not key or any(not v for v in values):
        raise SweepError(f"{src}: empty key or value")
    for v in values:
        if values.count(v) > 1:
            raise SweepError(f"{src}: value {v!r} is listed twice")
        item = f"{key}={v}"
        try:
            apply_overrides(copy.deepcopy(base), [item])
        except ConfigError as e:
            msg = str(e).removeprefix(f"--set {item}: ")
            raise SweepError(f"{src}: {msg}") from None
    return key, values


def parse_arm(spec: str, base: Config) -> tuple[str, list[str]]:
    """`NAME:KEY=V;KEY=V` -> (NAME, ["KEY=V", ...]); each item checked like a `--set`."""
    src = f"--arm {spec}"
    name, _, body = spec.partition(":")
    name = name.strip()
    if not name or safe_value(name) != name:
        raise SweepError(f"{src}: the arm needs a name of [A-Za-z0-9._+-] before ':'")
    items = [item.strip() for item in body.split(";") if item.strip()]
    keys = [_key_of(item) for item in items]
    for item, key in zip(items, keys):
        if "=" not in item:
            raise SweepError(f"{src}: expected KEY=VALUE, got {item!r}")
        if keys.count(key) > 1:
            raise SweepError(f"{src}: '{key}' is set twice")
        try:
            apply_overrides(copy.deepcopy(base), [item])
        except ConfigError as e:
            raise SweepError(f"{src}: {str(e).removeprefix(f'--set {item}: ')}") from None
    return name, items


def short_keys(keys: list[str]) -> dict[str, str]:
    """The shortest dotted suffix of each key that no other key ends with (usually the leaf)."""
    out = {}
    for key in keys:
        parts = key.split(".")
        for n in range(1, len(parts) + 1):
            short = ".".join(parts[-n:])
            if not any(o != key and (o == short or o.endswith("." + short)) for o in keys):
                break
        out[key] = short
    return out


def safe_value(text: str) -> str:
    """A value as it may stand in a directory name: [A-Za-z0-9._+-] only, no quotes."""
    cleaned = re.sub(r"[^A-Za-z0-9._+-]+", "_", text.strip().strip("\"'")).strip("_")
    return cleaned or "_"


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def run_names(grid_keys: list[str], combos: list[tuple[dict[str, str], int]]) -> list[str]:
    """`batch_size=8,d_hidden=64,seed=0`; names made equal by cleaning get a hash suffix."""
    shorts = short_keys(grid_keys + [SEED_KEY])
    names = []
    for settings, seed in combos:
        parts = [f"{shorts[k]}={safe_value(settings[k])}" for k in grid_keys]
        names.append(",".join(parts + [f"{shorts[SEED_KEY]}={seed}"]))
    raw = [json.dumps([settings, seed], sort_keys=True) for settings, seed in combos]
    counts = Counter(names)
    return [
        f"{name[:MAX_NAME]}~{_digest(r)}" if counts[name] > 1 or len(name) > MAX_NAME else name
        for name, r in zip(names, raw)
    ]


def expand(
    grid: list[tuple[str, list[str]]],
    seeds: int,
    fixed: list[str],
    arms: dict[str, list[str]] | None = None,
    first_seed: int = 0,
) -> list[RunSpec]:
    """Cartesian product of the grid values, seeds (first_seed ..) innermost; each run's full
    `--set` list. The `arm` dimension's values name entries of `arms`, whose overrides stand
    in for them."""
    keys = [k for k, _ in grid]
    combos = [
        (dict(zip(keys, values)), seed)
        for values in itertools.product(*(v for _, v in grid))
        for seed in range(first_seed, first_seed + seeds)
    ]
    names = run_names(keys, combos)

    def items(k: str, v: str) -> list[str]:
        return list(arms[v]) if k == ARM_KEY else [f"{k}={v}"]

    return [
        RunSpec(
            name=name,
            settings=settings,
            seed=seed,
            overrides=fixed
            + [i for k, v in settings.items() for i in items(k, v)]
            + [f"{SEED_KEY}={seed}"],
        )
        for name, (settings, seed) in zip(names, combos)
    ]


def plain_settings(config: str) -> dict[str, Any]:
    """The config file's settings as written (TOML or the archive's JSON), without defaults."""
    path = Path(config)
    text = path.read_text()
    return json.loads(text) if path.suffix == ".json" else tomllib.loads(text)


def _key_of(item: str) -> str:
    return item.split("=", 1)[0].strip()


def build_plan(
    config: str,
    grid_specs: list[str],
    seeds: int,
    max_steps: int | None,
    overrides: list[str],
    arm_specs: list[str] = (),
    population: int = 1,
    first_seed: int = 0,
) -> Plan:
    """Parse and validate everything, every combination included, before anything runs."""
    if seeds < 1:
        raise SweepError(f"--seeds {seeds}: must be >= 1")
    if first_seed < 0:
        raise SweepError(f"--first-seed {first_seed}: must be >= 0")
    if population < 1:
        raise SweepError(f"--population {population}: must be >= 1")
    if max_steps is not None and max_steps < 0:
        raise SweepError(f"--max-steps {max_steps}: must be >= 0")
    fixed = list(overrides) + ([f"{STEPS_KEY}={max_steps}"] if max_steps is not None else [])
    for item in overrides:
        if _key_of(item) == SEED_KEY:
            raise SweepError(f"--set {item}: the seeds come from --seeds (0..N-1)")
        if max_steps is not None and _key_of(item) == STEPS_KEY:
            raise SweepError(f"--set {item}: conflicts with --max-steps")
    try:
        base = load_config(config, fixed)
    except ConfigError as e:
        raise SweepError(str(e)) from None
    grid: list[tuple[str, list[str]]] = []
    for spec in grid_specs:
        key, values = parse_grid(spec, base)
        if key == SEED_KEY:
            raise SweepError(f"--grid {spec}: the seeds come from --seeds (0..N-1)")
        if key in (k for k, _ in grid):
            raise SweepError(f"--grid {spec}: '{key}' is given by another --grid too")
        if key in (_key_of(o) for o in fixed):
            what = "--max-steps" if key == STEPS_KEY and max_steps is not None else "--set"
            raise SweepError(f"--grid {spec}: '{key}' is also given by {what}")
        grid.append((key, values))
    arms: dict[str, list[str]] = {}
    for spec in arm_specs:
        name, items = parse_arm(spec, base)
        if name in arms:
            raise SweepError(f"--arm {spec}: another arm is named '{name}'")
        for item in items:
            key = _key_of(item)
            if key in (k for k, _ in grid) or key in (_key_of(o) for o in fixed):
                raise SweepError(f"--arm {spec}: '{key}' is also given by --grid or --set")
            if key == SEED_KEY:
                raise SweepError(f"--arm {spec}: the seeds come from --seeds (0..N-1)")
        arms[name] = items
    if arms:
        grid.insert(0, (ARM_KEY, list(arms)))
    runs = expand(grid, seeds, fixed, arms, first_seed)
    checked = set()
    for run in runs:
        combo = tuple(run.settings.items())
        if combo in checked:
            continue  # the seed does not change what is valid
        checked.add(combo)
        try:
            load_config(config, run.overrides)
        except ConfigError as e:
            setting = ",".join(f"{k}={v}" for k, v in combo) or "(no grid)"
            raise SweepError(f"--grid setting {setting}: {e}") from None
    packs = pack(config, runs, population, base) if population > 1 else {}
    # The file's own settings, as parsed: a default added to the engine later (a new config key)
    # does not make an unchanged file's sweep a different one.
    raw = plain_settings(config)
    digest = hashlib.sha256(json.dumps(raw, sort_keys=True).encode()).hexdigest()
    return Plan(
        config=config,
        config_abs=str(Path(config).resolve()),
        config_hash=digest,
        grid=grid,
        seeds=seeds,
        max_steps=max_steps,
        overrides=list(overrides),
        runs=runs,
        arms=arms,
        population=population,
        packs=packs,
        first_seed=first_seed,
    )


def pack(config: str, runs: list[RunSpec], size: int, base: Config) -> dict[str, Config]:
    """--population: runs that differ only in their seed and member settings (GRID_KEYS: learning
    rates, loss scales, gamma, ...) train together, up to `size` per process, as one population
    whose member grid holds each run's seed and settings. Runs whose other settings differ (the
    model size, the batch, the env) go to different populations; a population of one is a plain
    run. Sets each run's `job` and `member`; returns each population's config, checked to give
    every member exactly the config its run would have had alone."""
    if base.population.size > 1:
        raise SweepError(
            f"--population {size}: {config} is itself a population (population.size "
            f"{base.population.size}); --population packs single runs"
        )
    groups: dict[tuple[str, ...], list[RunSpec]] = {}
    for run in runs:
        shared = tuple(o for o in run.overrides if _key_of(o) not in GRID_KEYS)
        groups.setdefault(shared, []).append(run)
    packs: dict[str, Config] = {}
    for shared, group in groups.items():
        for start in range(0, len(group), size):
            chunk = group[start : start + size]
            if len(chunk) == 1:
                continue  # runs as itself
            name = f"population_{len(packs):02d}"
            alone = [load_config(config, run.overrides) for run in chunk]
            keys = sorted({_key_of(o) for run in chunk for o in run.overrides} & set(GRID_KEYS))
            grid = {SEED_KEY: [run.seed for run in chunk]}
            cfg = load_config(config, list(shared))
            for key in keys:
                values = [plain_value(get_key(c, key)) for c in alone]
                if key == SEED_KEY:
                    continue
                if all(v == values[0] for v in values):
                    apply_overrides(cfg, [o for o in chunk[0].overrides if _key_of(o) == key])
                else:
                    grid[key] = values
            cfg.population.size, cfg.population.grid = len(chunk), grid
            try:
                validate(cfg, f"--population {name}")
                members = member_configs(cfg, f"--population {name}")
            except ConfigError as e:
                raise SweepError(str(e)) from None
            for k, (run, member, own) in enumerate(zip(chunk, members, alone)):
                if to_dict(member) != to_dict(own):  # a packing bug, never the user's input
                    raise SweepError(f"--population: {run.name} would not train as configured")
                run.job, run.member = name, k
            packs[name] = cfg
    return packs


# --------------------------------------------------------------------------------------------
# State: sweep.json, written atomically after every change.


@dataclass
class RunRecord:
    name: str
    settings: dict[str, str]
    seed: int
    overrides: list[str]
    status: str = "pending"
    exit_code: int | None = None
    error: str | None = None
    """The last stderr line of a failed attempt."""
    wall_time: float = 0.0
    """Seconds over all attempts."""
    attempts: int = 0
    resumed: bool = False
    """Whether the last attempt continued from the run's checkpoint."""
    started: str | None = None
    finished: str | None = None
    pid: int | None = None
    early_stop_step: int | None = None
    job: str | None = None
    """With --population: the population process (its directory) that trains this run, whose
    member `member` this run's directory links to."""
    member: int | None = None

    @classmethod
    def from_spec(cls, spec: RunSpec) -> RunRecord:
        return cls(
            spec.name,
            dict(spec.settings),
            spec.seed,
            list(spec.overrides),
            job=spec.job,
            member=spec.member,
        )


@dataclass
class SweepState:
    identity: dict[str, Any]
    runs: list[RunRecord]
    created: str = field(default_factory=lambda: _now())


def _now() -> str:
    return datetime.now().isoformat(timespec="milliseconds")


def save_state(out: Path, state: SweepState) -> None:
    doc = dict(
        **state.identity,
        config_name=Path(state.identity["config"]).name,
        created=state.created,
        updated=_now(),
        counts={s: sum(r.status == s for r in state.runs) for s in STATUSES},
        runs=[dataclasses.asdict(r) for r in state.runs],
    )
    write_atomic(out / "sweep.json", json.dumps(doc, indent=1) + "\n")


def open_sweep(out: Path, plan: Plan) -> SweepState:
    """Continue the sweep in `out` if it is this plan's, start one if `out` is new or empty."""
    path = out / "sweep.json"
    fresh = SweepState(plan.identity(), [RunRecord.from_spec(r) for r in plan.runs])
    if not path.exists():
        if out.exists() and (not out.is_dir() or any(x.name != ".lock" for x in out.iterdir())):
            raise SweepError(f"{out}: exists and holds no sweep.json; choose another --out")
        return fresh
    try:
        doc = json.loads(path.read_text())
        old = {r["name"]: r for r in doc["runs"]}
        known = {f.name for f in dataclasses.fields(RunRecord)}
        identity = {k: doc.get(k) for k in fresh.identity}
        kept = {n: RunRecord(**{k: v for k, v in r.items() if k in known}) for n, r in old.items()}
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise SweepError(f"{path}: unreadable sweep state ({type(e).__name__}: {e})") from None
    for key, now in fresh.identity.items():
        if identity[key] != now:
            what = (
                "the config file's settings have changed"
                if key == "config_hash"
                else f"{key} {identity[key]!r} there, {now!r} here"
            )
            raise SweepError(f"{out}: holds a different sweep ({what}); choose another --out")
    runs = [kept.get(rec.name, rec) for rec in fresh.runs]
    return SweepState(fresh.identity, runs, doc.get("created", _now()))


def _still_running(pid: int, run_dir: Path) -> bool:
    """A child left by an earlier sweep process that was killed outright."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return True
    return str(run_dir) in cmdline


# --------------------------------------------------------------------------------------------
# Running: child processes, their logs, signals.


@dataclass
class Child:
    name: str
    """The process's name: its run's, or its population's (the runs it trains in `records`)."""
    records: list[RunRecord]
    proc: subprocess.Popen
    reader: threading.Thread
    last_err: list[str]
    t0: float


def _pump(stream: IO[bytes], log: IO[bytes], last: list[str]) -> None:
    """Copy the child's stderr into its log, keeping the last non-empty line for the record;
    the log is closed here, once the child (and anything holding its stderr) is gone."""
    with stream, log:
        for line in stream:
            log.write(line)
            log.flush()
            text = line.decode(errors="replace").strip()
            if text:
                last[0] = text


STOP_RECORDS = {"early_stop": "early stop", "solved": "solved"}  # record type -> status words


def _stop(records: list[dict[str, Any]]) -> tuple[str, int] | None:
    """(what, step) of the record that ended the run early (early stop or solved), if any."""
    stops = [r for r in records if r.get("type") in STOP_RECORDS]
    return (STOP_RECORDS[stops[-1]["type"]], stops[-1].get("step")) if stops else None


class Sweeper:
    """Runs the sweep's processes: one per run, or with --population one per population of
    packed runs (`RunRecord.job`), whose members' directories the runs' names link to."""

    def __init__(
        self,
        out: Path,
        plan: Plan,
        state: SweepState,
        parallel: int,
        stop_grace: float = STOP_GRACE_S,
    ):
        self.out, self.plan, self.state, self.parallel = out, plan, state, parallel
        self.stop_grace = stop_grace
        self.running: dict[str, Child] = {}
        self.stop_signal: int | None = None
        self.force = False

    def run_dir(self, rec: RunRecord) -> Path:
        return (self.out / rec.name).resolve()

    def job_dir(self, name: str) -> Path:
        """The directory a process writes: its run's, or its population's."""
        return (self.out / name).resolve()

    def save(self) -> None:
        save_state(self.out, self.state)

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self.stop_signal is None:
            self.stop_signal = signum
        else:
            self.force = True

    def todo(self) -> list[tuple[str, list[RunRecord]]]:
        """(process name, its runs) for every process with a run to do. A population runs again
        as a whole (resumed when it was interrupted) unless it ended normally: a member that
        failed in a population that finished stays failed (re-running it would retrain the
        others too)."""
        jobs: dict[str, list[RunRecord]] = {}
        for rec in self.state.runs:
            jobs.setdefault(rec.job or rec.name, []).append(rec)
        out = []
        for name, recs in jobs.items():
            for rec in recs:
                if rec.status == "done" and not self.run_dir(rec).is_dir():
                    rec.status = "pending"  # its directory was removed: run it again
            finished = recs[0].job is not None and all(
                r.exit_code == 0 and r.status in ("done", "failed") for r in recs
            )
            if any(rec.status != "done" for rec in recs) and not finished:
                out.append((name, recs))
        return out

    def run(self) -> int:
        """Run what is missing; 130 when stopped by a signal, 1 when a run failed, else 0."""
        for rec in self.state.runs:
            if rec.status == "running":
                where = self.job_dir(rec.job or rec.name)
                if rec.pid and _still_running(rec.pid, where):
                    raise SweepError(
                        f"{where}: still running as pid {rec.pid} (started by an earlier sweep "
                        "process); wait for it or stop it, then re-run"
                    )
                rec.status, rec.pid = "interrupted", None
        todo = self.todo()
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "logs").mkdir(exist_ok=True)
        self.save()
        total = len(self.state.runs)
        left = sum(len(recs) for _, recs in todo)
        packed = sum(len(recs) > 1 for _, recs in todo)
        how = f" as {len(todo)} processes ({packed} populations)" if packed else ""
        _say(f"{total} runs, {total - left} done already, {left} to run{how} in {self.out}")
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            while (todo or self.running) and self.stop_signal is None:
                while todo and len(self.running) < self.parallel:
                    self.start(*todo.pop(0))
                for child in list(self.running.values()):
                    if child.proc.poll() is not None:
                        self.finish(child)
                time.sleep(0.1)
            if self.stop_signal is not None:
                self.stop_all()
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
        if self.stop_signal is not None:
            _say(
                f"interrupted ({signal.Signals(self.stop_signal).name}); re-run the same command "
                "to finish the sweep"
            )
            return 130
        failed = [r.name for r in self.state.runs if r.status == "failed"]
        if failed:
            _say(f"{len(failed)} of {total} runs failed: {', '.join(failed)} (see {self.out}/logs)")
            return 1
        return 0

    def command(self, name: str, recs: list[RunRecord]) -> list[str]:
        """Resume an interrupted process from its checkpoint; otherwise start it in a clean
        directory. A population's config (population.size, its member grid) is written under
        populations/ first; a run trained by one links its name to its member's directory."""
        run_dir, population = self.job_dir(name), recs[0].job is not None
        exe = [sys.executable, "-m", "engine.run"]
        saved = run_dir / "checkpoints" / ("population.pt" if population else "latest.pt")
        interrupted = any(r.status == "interrupted" for r in recs)
        # A population killed between writing its first set and committing it holds only the
        # staged population.pt.next, which the resume commits.
        held = saved.is_file() or saved.with_name(saved.name + ".next").is_file()
        resume = interrupted and held and (run_dir / "config.toml").is_file()
        for rec in recs:
            rec.resumed = resume
        sets = [] if population else [x for o in recs[0].overrides for x in ("--set", o)]
        if resume:
            return exe + ["--resume", str(run_dir), *sets]
        if run_dir.exists():
            aside = self.out / "aside"
            aside.mkdir(exist_ok=True)
            k = 1
            while (aside / f"{name}.{k}").exists():
                k += 1
            os.replace(run_dir, aside / f"{name}.{k}")
            _say(f"moved the {recs[0].status} run's directory to {aside / f'{name}.{k}'}")
        if not population:
            return exe + ["--config", self.plan.config_abs, "--run-dir", str(run_dir), *sets]
        configs = self.out / "populations"
        configs.mkdir(exist_ok=True)
        save_toml(self.plan.packs[name], configs / f"{name}.toml")
        for rec in recs:
            link = self.out / rec.name
            if link.is_symlink():
                link.unlink()
            link.symlink_to(Path(name) / _member_dir(rec.member))
        return exe + [
            "--config",
            str((configs / f"{name}.toml").resolve()),
            "--run-dir",
            str(run_dir),
        ]

    def start(self, name: str, recs: list[RunRecord]) -> None:
        cmd = self.command(name, recs)
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        if self.parallel > 1 and "OMP_NUM_THREADS" not in env:
            # Runs side by side share the cores instead of each starting one thread per core.
            env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // self.parallel))
        log = open(self.out / "logs" / f"{name}.log", "ab")
        for rec in recs:
            rec.attempts += 1
        log.write(f"=== {_now()} attempt {recs[0].attempts}: {shlex.join(cmd)}\n".encode())
        log.flush()
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.PIPE,
            env=env,
            start_new_session=True,  # a terminal's Ctrl-C reaches the sweep only; it stops them
        )
        last = [""]
        reader = threading.Thread(target=_pump, args=(proc.stderr, log, last), daemon=True)
        reader.start()
        for rec in recs:
            rec.status, rec.pid, rec.exit_code, rec.error = "running", proc.pid, None, None
            rec.started, rec.finished, rec.early_stop_step = _now(), None, None
        self.running[name] = Child(name, recs, proc, reader, last, time.perf_counter())
        self.save()
        how = "resume" if recs[0].resumed else "start"
        what = f" ({len(recs)} runs as one population)" if recs[0].job else ""
        _say(f"{how} {name}{what} (attempt {recs[0].attempts}, log logs/{name}.log)")

    def finish(self, child: Child, stopping: bool = False) -> None:
        rc = child.proc.returncode
        child.reader.join(timeout=10)
        del self.running[child.name]
        members = _member_status(self.job_dir(child.name)) if child.records[0].job else {}
        for rec in child.records:
            rec.wall_time += time.perf_counter() - child.t0
            rec.exit_code, rec.pid, rec.finished = rc, None, _now()
            failed = members.get(rec.member, "")
            if rc == 0 and failed.startswith("failed"):  # frozen while the others trained on
                rec.status, rec.error = "failed", f"member {rec.member}: {failed}"
            elif rc == 0:
                rec.status, rec.error = "done", None
                stop = _stop(_read_metrics(self.run_dir(rec)))
                rec.early_stop_step = stop[1] if stop else None
            elif stopping or rc in (130, -signal.SIGINT, -signal.SIGTERM):
                rec.status, rec.error = "interrupted", None
            else:
                rec.status = "failed"
                rec.error = child.last_err[0] or _describe_exit(rc)
        self.save()
        write_summary(self.out, self.state)
        for rec in child.records:
            extra = f": {rec.error}" if rec.error else ""
            _say(f"{rec.status} {rec.name} in {rec.wall_time:.0f} s (exit {rc}){extra}")

    def stop_all(self) -> None:
        """SIGTERM every child (each checkpoints and exits 130); SIGKILL after the grace time
        or on a second Ctrl-C."""
        children = list(self.running.values())
        if children:
            _say(
                f"stopping {len(children)} runs (they write their checkpoints; SIGKILL after "
                f"{self.stop_grace:g} s or a second Ctrl-C)"
            )
        for child in children:
            if child.proc.poll() is None:
                child.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.stop_grace
        killed = False
        while any(c.proc.poll() is None for c in children):
            if not killed and (self.force or time.monotonic() > deadline):
                for child in children:
                    if child.proc.poll() is None:
                        child.proc.kill()
                killed = True
            time.sleep(0.1)
        for child in children:
            self.finish(child, stopping=child.proc.returncode != 0)


def _member_dir(k: int | None) -> str:
    return f"member_{k:02d}"  # engine.population.member_dir_name, without importing torch


def _member_status(run_dir: Path) -> dict[int, str]:
    """Member index -> its status in the population's population.csv ("failed (...)", ...)."""
    try:
        with open(run_dir / "population.csv", newline="") as f:
            return {
                int(r["member"].removeprefix("member_")): r.get("status", "")
                for r in csv.DictReader(f)
            }
    except (OSError, KeyError, ValueError):
        return {}


def _describe_exit(rc: int) -> str:
    if rc < 0:
        try:
            return f"killed by {signal.Signals(-rc).name}"
        except ValueError:
            return f"killed by signal {-rc}"
    return f"exit code {rc}"


def _say(text: str) -> None:
    print(f"sweep: {text}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# Summaries.


def _best(key: str, values: list[float]) -> float:
    return max(values) if key in MAX_IS_BEST else min(values)


def _numbers(records: list[dict[str, Any]], key: str) -> list[float]:
    out = []
    for r in records:
        v = r.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            out.append(float(v))
    return out


def run_row(out: Path, rec: RunRecord) -> dict[str, Any]:
    """One run's numbers from its metrics.jsonl and checkpoint; None where it has none."""
    run_dir = out / rec.name
    records = _read_metrics(run_dir)
    train = [r for r in records if r.get("type") == "train"]
    eval_records = [r for r in records if r.get("type") == "eval"]
    evals = _numbers(eval_records, "eval_return")
    row: dict[str, Any] = {}
    for key in METRIC_KEYS:
        values = _numbers(train, key)
        row[f"final_{key}"] = values[-1] if values else None
        row[f"best_{key}"] = _best(key, values) if values else None
    row["final_eval_return"] = evals[-1] if evals else None
    row["best_eval_return"] = max(evals) if evals else None
    row["last5_eval_return"] = statistics.fmean(evals[-5:]) if evals else None
    target = TASK_TARGETS.get(_task(run_dir, rec))
    solved = [
        r.get("step") for r in eval_records if target and r.get("eval_return", -1e9) >= target
    ]
    row["first_solved_step"] = solved[0] if solved else None
    steps, env_steps = _numbers(records, "step"), _numbers(records, "env_steps")
    row["train_steps"] = int(max(steps)) if steps else None
    row["env_steps"] = int(max(env_steps)) if env_steps else None
    sps = _numbers(train, "train_steps_per_sec")
    row["train_steps_per_sec"] = statistics.fmean(sps) if sps else None
    row["wall_time_s"] = round(rec.wall_time, 1)
    ckpt = run_dir / "checkpoints" / "latest.pt"
    row["checkpoint_bytes"] = ckpt.stat().st_size if ckpt.is_file() else None
    stop = _stop(records)
    row["status"] = rec.status + (f", {stop[0]} at step {stop[1]}" if stop is not None else "")
    return row


def _task(run_dir: Path, rec: RunRecord) -> str | None:
    """The run's env.name, from its config.toml (a grid may set env.name)."""
    try:
        raw = tomllib.loads((run_dir / "config.toml").read_text())
        return raw["env"]["name"]
    except (OSError, KeyError, TypeError, tomllib.TOMLDecodeError):
        return None


def _mean_std(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return _fmt(values[0])
    return f"{statistics.fmean(values):.4g} ± {statistics.stdev(values):.3g}"


def summarize(out: Path, state: SweepState) -> tuple[str, str]:
    """(summary.csv, summary.md) text: every run, then mean +- std over seeds per setting."""
    keys = [k for k, _ in state.identity["grid"]]
    shorts = short_keys(keys + [SEED_KEY])
    rows = [(rec, run_row(out, rec)) for rec in state.runs]
    present = [k for k in METRIC_KEYS if any(row[f"final_{k}"] is not None for _, row in rows)]
    metric_cols = [f"{w}_{k}" for k in present for w in ("final", "best")]
    tail = ["final_eval_return", "best_eval_return", "last5_eval_return", "first_solved_step"]
    tail += ["train_steps", "env_steps"]
    tail += ["train_steps_per_sec", "wall_time_s", "checkpoint_bytes"]
    header = [shorts[k] for k in keys] + ["seed", "status"] + metric_cols + tail
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    for rec, row in rows:
        grid_cells = [rec.settings.get(k, "") for k in keys]
        cells = [row[c] for c in metric_cols + tail]
        writer.writerow(
            grid_cells + [rec.seed, row["status"]] + ["" if c is None else c for c in cells]
        )

    ident = state.identity
    counts = {s: sum(r.status == s for r in state.runs) for s in STATUSES}
    md = [
        f"# Sweep {out.name}\n",
        f"config `{ident['config']}`, seeds {_seed_range(ident)}, max steps "
        f"{_fmt(ident['max_steps'])}, overrides "
        f"{' '.join(f'`{o}`' for o in ident['overrides']) or '-'}; runs: "
        + ", ".join(f"{n} {s}" for s, n in counts.items() if n)
        + "\n",
        "## Runs\n",
        "Losses from the train records as final (best); best is the minimum, the maximum for "
        "dream_value, dream_return and eval_return.\n",
    ]
    run_header = [shorts[k] for k in keys] + ["seed", "status"] + present
    run_header += ["eval_return", "last 5 evals", "first solved", "train steps", "env steps"]
    run_header += ["steps/s", "wall s", "ckpt MB"]
    table = []
    for rec, row in rows:
        cells = [rec.settings.get(k, "") for k in keys] + [str(rec.seed), row["status"]]
        for k in present + ["eval_return"]:
            final, best = row[f"final_{k}"], row[f"best_{k}"]
            cells.append("-" if final is None else f"{_fmt(final)} ({_fmt(best)})")
        size = row["checkpoint_bytes"]
        cells += [_fmt(row[c]) for c in ("last5_eval_return", "first_solved_step")]
        cells += [_fmt(row[c]) for c in ("train_steps", "env_steps", "train_steps_per_sec")]
        cells += [_fmt(row["wall_time_s"]), "-" if size is None else f"{size / 1e6:.2f}"]
        table.append(cells)
    md.append(_md_table(run_header, table))

    md.append("## Over seeds\n")
    md.append(
        "Mean ± std over the done runs of each setting; first solved: the update of the first "
        "eval at the task's solved return (CartPole-v1 450, LunarLander-v3 200), over the runs "
        "that reached it (solved k/n).\n"
    )
    groups: dict[tuple[str, ...], list[tuple[RunRecord, dict[str, Any]]]] = {}
    for rec, row in rows:
        groups.setdefault(tuple(rec.settings.get(k, "") for k in keys), []).append((rec, row))
    cols = ("final_eval_return", "last5_eval_return", "best_eval_return", "first_solved_step")
    cols += ("final_wm_loss", "train_steps_per_sec")
    group_header = [shorts[k] for k in keys] + ["done", "solved"]
    group_header += ["final eval_return", "last 5 evals", "best eval_return", "first solved"]
    group_header += ["final wm_loss", "steps/s"]
    gtable = []
    for setting, members in groups.items():
        done = [row for rec, row in members if rec.status == "done"]
        solved = sum(r["first_solved_step"] is not None for r in done)
        cells = list(setting) + [f"{len(done)}/{len(members)}", f"{solved}/{len(done)}"]
        cells += [_mean_std([r[c] for r in done if r[c] is not None]) for c in cols]
        gtable.append(cells)
    md.append(_md_table(group_header, gtable))
    return buf.getvalue(), "\n".join(md)


def write_summary(out: Path, state: SweepState) -> str:
    csv_text, md_text = summarize(out, state)
    write_atomic(out / "summary.csv", csv_text)
    write_atomic(out / "summary.md", md_text)
    return md_text


# --------------------------------------------------------------------------------------------
# Command line.


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise SweepError(message)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = _Parser(prog="python -m engine.sweep", description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, help="the base config (.toml or archive .json)")
    p.add_argument(
        "--grid",
        action="append",
        default=[],
        metavar="KEY=V1,V2,...",
        help="values of one key to sweep, parsed like --set values (repeatable: cartesian product)",
    )
    p.add_argument(
        "--arm",
        action="append",
        default=[],
        metavar="NAME:KEY=V;KEY=V",
        help="a named set of overrides (repeatable): the arms are one more grid dimension",
    )
    p.add_argument("--seeds", type=int, default=1, help="seeds 0..N-1 per setting (default 1)")
    p.add_argument(
        "--first-seed",
        type=int,
        default=0,
        metavar="S",
        help="seeds S..S+N-1 instead (more seeds for a finished sweep, in another --out)",
    )
    p.add_argument("--parallel", type=int, default=1, help="processes at a time (default 1)")
    p.add_argument(
        "--population",
        type=int,
        default=1,
        metavar="K",
        help="train up to K runs that differ only in seed and member settings (learning rates, "
        "loss scales, gamma, ...) as one population process (default 1: a process per run)",
    )
    p.add_argument("--max-steps", type=int, help="train.max_train_steps of every run")
    p.add_argument(
        "--stop-grace",
        type=float,
        metavar="SECONDS",
        help="local backend: on Ctrl-C/SIGTERM, how long the runs get to write their checkpoints "
        f"before SIGKILL (default {STOP_GRACE_S:g}; raise it for log.checkpoint_replay with a "
        "big replay)",
    )
    p.add_argument("--out", help="sweep directory (default sweeps/<config stem>_<date-time>)")
    add_set_option(p, "a fixed override for every run (repeatable)")
    p.add_argument(
        "--backend",
        choices=("local", "optuna", "submitit"),
        default="local",
        help="local (default): this process runs the runs; optuna: a worker of an Optuna study "
        "(engine.search); submitit: the runs as a SLURM job array",
    )
    p.add_argument("--search", metavar="TOML", help="optuna: the search space and study settings")
    p.add_argument("--trials", type=int, help="optuna: trials in the study, all workers together")
    p.add_argument(
        "--storage",
        help="optuna: an RDB URL (sqlite:///x.db, postgresql://...) or a journal file "
        "(default OUT/journal.log)",
    )
    p.add_argument(
        "--cluster",
        choices=("slurm", "local", "debug"),
        help="submitit: where the job array runs (default: SLURM when sbatch is found, else "
        "local processes)",
    )
    p.add_argument("--timeout-min", type=int, default=24 * 60, help="submitit: per job")
    p.add_argument(
        "--slurm",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="submitit: a job parameter, e.g. slurm_partition=gpu, gpus_per_node=1 (repeatable)",
    )
    return p.parse_args(argv)


def _lock(out: Path) -> IO[str]:
    """One sweep process per directory; the lock goes with the process."""
    out.mkdir(parents=True, exist_ok=True)
    f = open(out / ".lock", "w")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        raise SweepError(f"{out}: another sweep process is running there") from None
    return f


def sweep(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.parallel < 1:
        raise SweepError(f"--parallel {args.parallel}: must be >= 1")
    if args.stop_grace is not None and not args.stop_grace >= 0:  # also refuses nan
        raise SweepError(f"--stop-grace {args.stop_grace}: must be a number of seconds >= 0")
    optuna_only = dict(search=args.search, trials=args.trials, storage=args.storage)
    if args.backend != "optuna" and (given := [k for k, v in optuna_only.items() if v]):
        raise SweepError(f"--{given[0]} belongs to --backend optuna")
    if args.backend != "submitit" and (args.cluster or args.slurm):
        raise SweepError("--cluster and --slurm belong to --backend submitit")
    if args.backend != "local" and (args.population > 1 or args.arm or args.stop_grace is not None):
        raise SweepError(
            f"--backend {args.backend}: --population, --arm and --stop-grace are local-only"
        )
    if args.backend == "optuna" and args.first_seed:
        raise SweepError("--first-seed: not for --backend optuna (its seeds are a grid dimension)")
    plan = build_plan(
        args.config,
        args.grid,
        args.seeds,
        args.max_steps,
        args.overrides,
        args.arm,
        args.population,
        args.first_seed,
    )
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = Path(args.out) if args.out else Path("sweeps") / f"{Path(args.config).stem}_{stamp}"
    if args.backend == "optuna":  # workers share the directory: the study keeps the state
        from engine import search

        fixed = list(args.overrides) + (
            [f"{STEPS_KEY}={args.max_steps}"] if args.max_steps is not None else []
        )
        return search.optuna_search(args, args.config, fixed, plan.grid, args.seeds, out)
    open_sweep(out, plan)  # refuses a foreign directory before touching it
    lock = _lock(out)
    try:
        state = open_sweep(out, plan)  # again, now that no other sweep process can write it
        if args.backend == "submitit":
            from engine import search

            code = search.submitit_sweep(args, plan, out, state, save_state)
        else:
            grace = STOP_GRACE_S if args.stop_grace is None else args.stop_grace
            code = Sweeper(out, plan, state, args.parallel, grace).run()
        print(write_summary(out, state), end="")
    finally:
        lock.close()
    return code


def main(argv: list[str] | None = None) -> None:
    from engine.search import SearchError

    try:
        code = sweep(argv)
    except (SweepError, SearchError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:  # before the runs started (e.g. while validating)
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code)


if __name__ == "__main__":
    main()
