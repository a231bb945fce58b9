"""Searches on the engines the field already runs: `engine.sweep --backend optuna` (an Optuna
study, ask/tell around engine.run processes) and `--backend submitit` (the grid x seeds as a
SLURM job array through submitit). The local backend (engine.sweep itself) stays the default.

Optuna: every worker process (on any host that sees the sweep directory) runs

    python -m engine.sweep --backend optuna --config C --search configs/search/tiny.toml --out D

and they share one study: its storage is a journal file (D/journal.log; no server), or the RDB
URL of `--storage`. A worker asks for a trial, runs it as `engine.run` in D/trial_NNNN, reports
each evaluation's return as an intermediate value (the pruner may stop the run there) and tells
the study the objective (`[study] objective`, eval_return by default: the run's last evaluation;
any logged train metric also works, its last value). `--grid` and `--seeds` become a grid
sampler over those values (the seed is one more dimension). Workers stop when the study holds
`--trials` trials (or the grid is exhausted). D/summary.md and D/summary.csv list every trial.

submitit: `--backend submitit` plans the runs as the local backend does (grid x seeds) and
submits them as one job array (`--cluster slurm`, `local` for a machine without SLURM, `debug`
in-process); a job preempted or timed out is requeued and continues from its checkpoint
(`engine.run --resume`). The summary tables are the local backend's.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

from engine.config import ConfigError, apply_overrides, load_config
from engine.logger import fmt_value

POLL_S = 2.0  # how often a worker reads its trial's metrics.jsonl for new evaluations
SAMPLERS = ("tpe", "random", "grid")
PRUNERS = ("median", "percentile", "none")


class SearchError(Exception):
    """Bad search input: one line, exit 2 (engine.sweep turns it into a SweepError)."""


# ---- The search space ---------------------------------------------------------------------------


def load_search(path: str | None) -> tuple[dict[str, dict], dict[str, Any]]:
    """([space] key -> {low, high, log, step} or {choices}, [study] settings) from a TOML file;
    no file: an empty space (a grid-only search) and the defaults."""
    if path is None:
        return {}, {}
    try:
        raw = tomllib.loads(Path(path).read_text())
    except FileNotFoundError:
        raise SearchError(f"--search {path}: no such file") from None
    except tomllib.TOMLDecodeError as e:
        raise SearchError(f"--search {path}: not valid TOML ({e})") from None
    unknown = set(raw) - {"space", "study"}
    if unknown:
        raise SearchError(f"--search {path}: unknown table(s) {', '.join(sorted(unknown))}")
    space, study = raw.get("space", {}), raw.get("study", {})
    for key, spec in space.items():
        if not isinstance(spec, dict):
            raise SearchError(f"--search {path}: [space] {key} must be a table")
        if "choices" in spec:
            if set(spec) != {"choices"} or not spec["choices"]:
                raise SearchError(f"--search {path}: {key}: choices = [...] stands alone")
        elif not {"low", "high"} <= set(spec) or set(spec) - {"low", "high", "log", "step"}:
            raise SearchError(
                f"--search {path}: {key}: give low and high (and optionally log, step), or choices"
            )
        elif not spec["low"] < spec["high"]:
            raise SearchError(f"--search {path}: {key}: low must be below high")
    allowed = {"objective", "direction", "trials", "sampler", "pruner", "pruner_startup_trials",
               "pruner_warmup_steps", "pruner_percentile", "name"}  # fmt: skip
    if bad := set(study) - allowed:
        raise SearchError(f"--search {path}: unknown [study] key(s) {', '.join(sorted(bad))}")
    return space, study


def check_space(config: str, space: dict[str, dict], fixed: list[str]) -> None:
    """Every key of the space is a config key and every corner of it a valid config."""
    try:
        base = load_config(config, fixed)
    except ConfigError as e:
        raise SearchError(str(e)) from None
    for key, spec in space.items():
        corners = spec["choices"] if "choices" in spec else [spec["low"], spec["high"]]
        for value in corners:
            try:
                apply_overrides(base, [f"{key}={_text(value)}"])
            except ConfigError as e:
                raise SearchError(f"[space] {key}: {e}") from None


def _text(value: Any) -> str:
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value)


def suggest(trial, space: dict[str, dict], grid: list[tuple[str, list[str]]]) -> list[str]:
    """The trial's --set overrides: its grid values (as given) and its draws from the space."""
    out = [f"{key}={trial.suggest_categorical(key, values)}" for key, values in grid]
    for key, spec in space.items():
        if "choices" in spec:
            value = trial.suggest_categorical(key, spec["choices"])
        elif all(isinstance(spec[k], int) for k in ("low", "high")):
            log = spec.get("log", False)
            value = trial.suggest_int(
                key, spec["low"], spec["high"], step=spec.get("step", 1), log=log
            )
        else:
            value = trial.suggest_float(
                key, spec["low"], spec["high"], log=spec.get("log", False), step=spec.get("step")
            )
        out.append(f"{key}={_text(value)}")
    return out


# ---- Optuna -------------------------------------------------------------------------------------


def _optuna():
    try:
        import optuna
    except ImportError:
        raise SearchError("--backend optuna needs optuna: pip install optuna") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


def storage_for(optuna, out: Path, url: str | None):
    """An RDB URL (sqlite:///..., postgresql://...) as given; otherwise a journal file that
    every worker appends to under a file lock (no server)."""
    if url and "://" in url:
        return url
    path = Path(url) if url else out / "journal.log"
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    return JournalStorage(JournalFileBackend(str(path)))


def make_study(optuna, out, args, settings, grid, seeds):
    sampler_name = settings.get("sampler", "grid" if grid and not args.space else "tpe")
    if sampler_name not in SAMPLERS:
        raise SearchError(f"[study] sampler {sampler_name!r}: choose from {', '.join(SAMPLERS)}")
    if sampler_name == "grid":
        if args.space:
            raise SearchError("[study] sampler grid takes no [space]: use --grid values")
        sampler = _grid_sampler(optuna)({k: v for k, v in grid})
    elif sampler_name == "random":
        sampler = optuna.samplers.RandomSampler()
    else:
        sampler = optuna.samplers.TPESampler()
    pruner_name = settings.get("pruner", "median")
    if pruner_name not in PRUNERS:
        raise SearchError(f"[study] pruner {pruner_name!r}: choose from {', '.join(PRUNERS)}")
    # median: stop a trial whose evaluation is below the median of earlier trials' at the same
    # update; percentile: below their pruner_percentile-th percentile (50 is the median).
    when = dict(
        n_startup_trials=int(settings.get("pruner_startup_trials", 2)),
        n_warmup_steps=int(settings.get("pruner_warmup_steps", 0)),
    )
    if pruner_name == "median":
        pruner = optuna.pruners.MedianPruner(**when)
    elif pruner_name == "percentile":
        pruner = optuna.pruners.PercentilePruner(
            float(settings.get("pruner_percentile", 50)), **when
        )
    else:
        pruner = optuna.pruners.NopPruner()
    direction = settings.get("direction")
    if direction is None:
        from engine.report import MAX_IS_BEST

        direction = "maximize" if args.objective in MAX_IS_BEST else "minimize"
    if direction not in ("maximize", "minimize"):
        raise SearchError(f"[study] direction {direction!r}: maximize or minimize")
    name = settings.get("name", out.name)
    storage = storage_for(optuna, out, args.storage)
    study = optuna.create_study(
        study_name=name,
        storage=storage,
        sampler=sampler,
        pruner=pruner,
        direction=direction,
        load_if_exists=True,
    )
    return study, sampler_name


def _grid_sampler(optuna):
    """GridSampler without its stop: it ends an optimize() loop once the grid is used up, and
    raises outside one; the workers here stop on the trial count instead."""

    class Grid(optuna.samplers.GridSampler):
        def after_trial(self, study, trial, state, values) -> None:
            pass

    return Grid


class _AskLock:
    """Counting the study's trials and asking for a new one happen under one file lock, so two
    workers never both take the last trial."""

    def __init__(self, out: Path):
        self.path = out / ".ask.lock"

    def __enter__(self):
        self.f = open(self.path, "w")
        fcntl.flock(self.f, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        self.f.close()


def objective_of(records: list[dict], metric: str) -> float | None:
    """The run's objective: the last value of `metric` in its eval (eval_*) or train lines."""
    kind = "eval" if metric.startswith("eval_") else "train"
    values = [
        r[metric]
        for r in records
        if r.get("type") == kind and isinstance(r.get(metric), (int, float))
    ]
    finite = [float(v) for v in values if math.isfinite(float(v))]
    return finite[-1] if finite else None


def optuna_search(args, config: str, fixed: list[str], grid, seeds: int, out: Path) -> int:
    """One worker of the study in `out`; returns the exit status (1 if a trial failed)."""
    from engine.logger import md_table, read_metrics, write_text_atomic

    optuna = _optuna()
    space, settings = load_search(args.search)
    args.space = space
    args.objective = settings.get("objective", "eval_return")
    check_space(config, space, fixed)
    # --seeds is one more grid dimension (general.seed); --seeds 1 keeps the config's seed.
    grid = list(grid) + ([("general.seed", [str(s) for s in range(seeds)])] if seeds > 1 else [])
    out.mkdir(parents=True, exist_ok=True)
    study, sampler_name = make_study(optuna, out, args, settings, grid, seeds)
    total = args.trials or settings.get("trials")
    if sampler_name == "grid":
        size = math.prod(len(v) for _, v in grid)
        total = min(total, size) if total else size
    if not total:
        raise SearchError("how many trials? give --trials N or [study] trials")
    T = optuna.trial.TrialState
    failed = 0
    while True:
        with _AskLock(out):
            if len(study.get_trials(deepcopy=False)) >= total:
                break
            trial = study.ask()
            sets = suggest(trial, space, grid)
        run_dir = out / f"trial_{trial.number:04d}"
        trial.set_user_attr("run_dir", run_dir.name)
        trial.set_user_attr("overrides", sets)
        print(f"trial {trial.number}: {' '.join(sets) or '(the config)'}", flush=True)
        state, value, note = _run_trial(trial, config, fixed + sets, run_dir, args.objective)
        if state == T.COMPLETE:
            study.tell(trial, value)
        else:
            study.tell(trial, state=state)
            failed += state == T.FAIL
        print(f"trial {trial.number}: {note}", flush=True)
    csv_text, md = optuna_summary(study, out, args.objective, read_metrics, md_table)
    write_text_atomic(out / "summary.csv", csv_text)
    write_text_atomic(out / "summary.md", md)
    print(md, end="")
    return 1 if failed else 0


def _run_trial(trial, config, sets, run_dir: Path, metric: str):
    """Runs engine.run for the trial, reporting each evaluation as it lands; (state, value,
    what happened)."""
    import optuna

    from engine.logger import read_metrics as _read_metrics

    T = optuna.trial.TrialState
    cmd = [sys.executable, "-m", "engine.run", "--config", config, "--run-dir", str(run_dir)]
    for item in sets:
        cmd += ["--set", item]
    run_dir.mkdir(parents=True, exist_ok=True)
    log = open(run_dir / "stdout.log", "ab")
    child = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    reported: set[int] = set()
    pruned = None  # (update, value) where the pruner stopped the trial
    try:
        while pruned is None:
            done = child.poll() is not None
            if metric.startswith("eval_"):  # only evaluations are intermediate values
                pruned = _report(trial, _read_metrics(run_dir), metric, reported, done)
            if done:
                break
            time.sleep(POLL_S)
    except BaseException:
        _stop(child)
        raise
    finally:
        log.close()
    if pruned is not None:
        _stop(child)
        return T.PRUNED, None, f"pruned at update {pruned[0]} ({metric} {pruned[1]:.4g})"
    if child.returncode != 0:
        return T.FAIL, None, f"failed (engine.run exit {child.returncode}; {run_dir}/stdout.log)"
    value = objective_of(_read_metrics(run_dir), metric)
    if value is None:
        return T.FAIL, None, f"no {metric} logged (is log.eval_every > 0?)"
    return T.COMPLETE, value, f"{metric} {value:.4g}"


def _report(trial, records: list[dict], metric: str, reported: set[int], done: bool):
    """Reports the evaluations not reported yet; (update, value) if the pruner stops the trial
    at one (never once the run has ended), else None."""
    for rec in records:
        step, value = rec.get("step"), rec.get(metric)
        if rec.get("type") != "eval" or step in reported or not isinstance(value, (int, float)):
            continue
        if not math.isfinite(value):
            continue
        reported.add(step)
        trial.report(float(value), step)
        if not done and trial.should_prune():
            return step, float(value)
    return None


def _stop(child: subprocess.Popen) -> None:
    """SIGTERM (the run writes its checkpoint), then SIGKILL after 60 s."""
    if child.poll() is None:
        child.send_signal(signal.SIGTERM)
        try:
            child.wait(60)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


def optuna_summary(study, out: Path, metric: str, read_metrics, md_table) -> tuple[str, str]:
    """(summary.csv, summary.md): every trial (state, its settings, objective, evaluations)."""
    import csv
    import io

    trials = sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)
    keys = sorted({k for t in trials for k in t.params})
    header = ["trial", "state", *keys, metric, "evals", "last update", "run"]
    rows = []
    for t in trials:
        run = t.user_attrs.get("run_dir", "")
        records = read_metrics(out / run) if run else []
        evals = [r for r in records if r.get("type") == "eval"]
        steps = [r.get("step", 0) for r in records if isinstance(r.get("step"), int)]
        value = "-" if t.value is None else f"{t.value:.4g}"
        rows.append([
            str(t.number), t.state.name.lower(),
            *[fmt_value(t.params.get(k)) for k in keys],
            value, str(len(evals)), str(max(steps) if steps else "-"), run,
        ])  # fmt: skip
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(header)
    w.writerows(rows)
    states = [t.state.name.lower() for t in trials]
    counts = ", ".join(f"{states.count(s)} {s}" for s in dict.fromkeys(states))
    md = f"# Optuna study {study.study_name}: {len(trials)} trials ({counts})\n\n"
    md += md_table(header, rows)
    done = [t for t in trials if t.value is not None]
    if done:
        best = study.best_trial
        md += (
            f"\nbest: trial {best.number}, {metric} {best.value:.4g}, "
            + ", ".join(f"{k} {fmt_value(v)}" for k, v in best.params.items())
            + "\n"
        )
    return buf.getvalue(), md


# ---- submitit -----------------------------------------------------------------------------------


class RunJob:
    """One run of a job array: `engine.run` in its run directory, resumed from its checkpoint
    when the directory holds one (a requeued job). On preemption or timeout submitit calls
    `checkpoint`: the run is stopped with SIGTERM (it writes its checkpoint) and the same job is
    requeued."""

    def __init__(self):
        self.child: subprocess.Popen | None = None

    def __call__(self, run_dir: str, config: str, sets: list[str]) -> int:
        d = Path(run_dir)
        if (d / "checkpoints" / "latest.pt").is_file():
            cmd = [sys.executable, "-m", "engine.run", "--resume", run_dir]
        else:
            cmd = [sys.executable, "-m", "engine.run", "--config", config, "--run-dir", run_dir]
            if (d / "metrics.jsonl").exists():  # a start that died before its first checkpoint
                (d / "metrics.jsonl").unlink()
        for item in sets:
            cmd += ["--set", item]
        d.mkdir(parents=True, exist_ok=True)
        with open(d / "stdout.log", "ab") as log:
            self.child = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                          cwd=os.getcwd())  # fmt: skip
            rc = self.child.wait()
        if rc != 0:
            raise RuntimeError(f"engine.run exited with {rc} ({d}/stdout.log)")
        return rc

    def checkpoint(self, run_dir: str, config: str, sets: list[str]):
        import submitit

        if self.child is not None:
            _stop(self.child)
        return submitit.helpers.DelayedSubmission(RunJob(), run_dir, config, sets)


def submitit_sweep(args, plan, out: Path, state, save_state) -> int:
    """The plan's runs as one submitit job array; statuses (written by `save_state`, the
    sweep's) and summary as the local backend."""
    try:
        import submitit
    except ImportError:
        raise SearchError("--backend submitit needs submitit: pip install submitit") from None
    from engine.logger import read_metrics as _read_metrics

    todo = [r for r in state.runs if r.status != "done"]
    if plan.population > 1:
        raise SearchError("--backend submitit runs one process per run: drop --population")
    executor = submitit.AutoExecutor(folder=str(out / "submitit"), cluster=args.cluster)
    params = dict(timeout_min=args.timeout_min, slurm_array_parallelism=args.parallel)
    for item in args.slurm:
        key, _, value = item.partition("=")
        params[key] = _slurm_value(value)
    try:
        executor.update_parameters(**params)
    except (ValueError, TypeError) as e:
        raise SearchError(f"--slurm: {e}") from None
    config = plan.config_abs
    specs = [(str(out / r.name), config, list(r.overrides)) for r in todo]
    if not specs:
        return 0
    jobs = executor.map_array(RunJob(), *zip(*specs))
    for rec, job in zip(todo, jobs):
        rec.status = "running"
        rec.job = f"submitit {job.job_id}"
    save_state(out, state)
    print(f"submitted {len(jobs)} runs as job array {jobs[0].job_id.split('_')[0]} "
          f"({executor.cluster}); waiting", flush=True)  # fmt: skip
    code = 0
    for rec, job in zip(todo, jobs):
        try:
            job.result()
            rec.status = "done"
        except Exception as e:  # the run's own failure, with submitit's report around it
            rec.status, code = "failed", 1
            rec.error = str(e).strip().splitlines()[-1][:300] if str(e).strip() else repr(e)
        # The run's own training time over its attempts (a requeued job resumes it).
        times = [r.get("wall_time") for r in _read_metrics(out / rec.name)]
        rec.wall_time = max((t for t in times if isinstance(t, (int, float))), default=0.0)
        save_state(out, state)
    return code


def _slurm_value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text
