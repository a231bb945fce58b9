"""Run reports: loss, evaluation and behaviour plots plus a text summary, from metrics.jsonl.

`python -m engine.report RUN_DIR [RUN_DIR ...] [--out DIR] [--target R] [--ylim LO:HI]`

Several runs are overlaid in every plot (one colour per run, labelled by the run directory's
name). matplotlib is imported only when plotting, so training never needs it. The report reads
only metrics.jsonl (and never torch), so it runs in a second on a run that is still training.

Evaluation and episode lines carry no wall time of their own; their wall time is interpolated
from the training lines' (step, wall_time) and (env_steps, wall_time) points, which the trainer
writes every `log.log_every` updates and once more at the end.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import tomllib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

# The eval return each task counts as solved (TASK_TARGETS: the summary's "first eval >= R" and
# the dashed line in eval.png) unless --target says otherwise; DEFAULT_TARGET for an unknown task.
from engine.config import DEFAULT_TARGET, TASK_TARGETS

# engine.episodes imports torch only inside its functions: the report stays torch-free.
from engine.episodes import DEFAULT_END_KINDS, END_KINDS, END_TEXT, end_kinds

# (panel title, metric keys drawn in it). Keys after the first are drawn dashed/dotted.
LOSS_PANELS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("wm_loss", ("wm_loss",)),
    ("image_loss (MSE per pixel)", ("image_loss",)),
    ("vector_loss (symlog, per dim)", ("vector_loss",)),
    ("reward_loss", ("reward_loss",)),
    ("reward_loss_excess (above two-hot floor)", ("reward_loss_excess",)),
    ("continue_loss", ("continue_loss",)),
    ("kl_dyn (solid) / kl_rep (dashed)", ("kl_dyn", "kl_rep")),
    ("critic_loss", ("critic_loss",)),
    ("actor_loss", ("actor_loss",)),
    ("wm_grad_norm", ("wm_grad_norm",)),
    ("actor_grad_norm", ("actor_grad_norm",)),
    ("critic_grad_norm", ("critic_grad_norm",)),
)
BEHAVIOR_PANELS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("actor_entropy", ("actor_entropy",)),
    ("dream_value", ("dream_value",)),
    ("dream_return", ("dream_return",)),
    ("return_scale", ("return_scale",)),
    ("advantage_std", ("advantage_std",)),
    ("dream_reward", ("dream_reward",)),
    ("dream_cont", ("dream_cont",)),
)
# Metrics where more is better (a summary's best is their maximum; for every other, the minimum).
MAX_IS_BEST = ("dream_value", "dream_return", "eval_return")
# The train-record metrics that summaries tabulate (here and in engine.sweep): the losses the
# archive's tables tracked.
SUMMARY_LOSSES = (
    "wm_loss",
    "image_loss",
    "vector_loss",
    "reward_loss",
    "reward_loss_excess",
    "continue_loss",
    "kl_dyn",
    "kl_rep",
    "actor_loss",
    "actor_entropy",
    "critic_loss",
)
LINE_STYLES = ("-", "--", ":", "-.")
# ends.png: one colour per way an eval episode can end (engine.episodes.episode_ends).
END_COLORS = {"rest": "C2", "crash": "C3", "terminated": "C4", "time_limit": "C1"}
# Log scale once a panel's positive values span more than this factor.
LOG_RATIO = 30.0
# The records a population member writes when it stops training (engine.population).
STOP_KINDS = ("solved", "early_stop", "health")


class ReportError(Exception):
    """Input the report cannot use; the message is one line for a human."""


@dataclass
class Run:
    """One run's records, split by type; `notes` says what was skipped while reading."""

    path: Path
    label: str = ""
    task: str = ""
    """env.name from the run's config.toml ("" when it cannot be read)."""
    train: list[dict[str, Any]] = field(default_factory=list)
    evals: list[dict[str, Any]] = field(default_factory=list)
    episodes: list[dict[str, Any]] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    """Lines of other types (e.g. "health", "early_stop"): listed in the summary."""
    notes: list[str] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not (self.train or self.evals or self.episodes)

    @property
    def stop_step(self) -> float | None:
        """The step a population member stopped training at (solved, early stop, failed), when
        records go on after it: its envs and evaluations continue with its frozen weights
        while the others train, but it logs no training line after its stop. None otherwise
        (a single run ends at its stop; a run resumed and trained on past one has no stop)."""
        for ev in self.events:
            step = num(ev.get("step"))
            if ev.get("type") in STOP_KINDS and math.isfinite(step):
                if any(num(r.get("step")) > step for r in self.train):
                    return None
                later = any(num(r.get("step")) > step for r in self.evals + self.episodes)
                return step if later else None
        return None

    def until_stop(self, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The records up to the member's stop (all of them without one)."""
        stop = self.stop_step
        return records if stop is None else [r for r in records if num(r.get("step")) <= stop]

    def after_stop(self, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The records after the member's stop: its frozen final agent's."""
        stop = self.stop_step
        return [] if stop is None else [r for r in records if num(r.get("step")) > stop]

    def target(self, override: float | None = None) -> float:
        """The eval return that counts as solved: `override`, else the task's own."""
        if override is not None:
            return override
        return TASK_TARGETS.get(self.task, DEFAULT_TARGET)


# --------------------------------------------------------------------------------------------
# Reading.


def num(value: Any) -> float:
    """A metric value as a float; null, missing and non-numbers are NaN. The logger writes
    non-finite floats as the strings "nan"/"inf" (JSON has none), which are read back here."""
    if isinstance(value, bool):
        return math.nan
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str) and value.strip().lower() in ("nan", "inf", "-inf", "+inf"):
        return float(value)
    return math.nan


def _task_of(path: Path) -> str:
    """env.name from RUN_DIR/config.toml, "" if there is none or it cannot be read."""
    try:
        with open(path / "config.toml", "rb") as f:
            name = tomllib.load(f).get("env", {}).get("name", "")
    except (OSError, tomllib.TOMLDecodeError, AttributeError):
        return ""
    return name if isinstance(name, str) else ""


def load_run(path: str | Path) -> Run:
    """Read RUN_DIR/metrics.jsonl. Unreadable lines are skipped and counted in `notes`; a
    missing directory or file raises ReportError."""
    path = Path(path)
    if not path.is_dir():
        raise ReportError(f"{path}: no such run directory")
    metrics = path / "metrics.jsonl"
    if not metrics.is_file():
        raise ReportError(f"{path}: not a run directory (no metrics.jsonl)")
    run = Run(path, _absolute(path).name, task=_task_of(path))
    bad = []
    try:
        text = metrics.read_text(errors="replace")
    except OSError as e:
        raise ReportError(f"{metrics}: cannot read: {e.strerror or e}") from None
    kinds = {"train": run.train, "eval": run.evals, "episode": run.episodes}
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            bad.append(i)
            continue
        if not isinstance(rec, dict) or not math.isfinite(num(rec.get("step"))):
            bad.append(i)
            continue
        kinds.get(rec.get("type"), run.events).append(rec)
    if bad:
        shown = ", ".join(map(str, bad[:5])) + (", ..." if len(bad) > 5 else "")
        run.notes.append(f"skipped {len(bad)} unreadable line(s) of {metrics} (line {shown})")
    return run


def population_members(path: Path) -> list[Path]:
    """The member directories of a population run (member_00/ ...), [] for any other run."""
    if not path.is_dir():
        return []
    return sorted(p for p in path.glob("member_*") if (p / "metrics.jsonl").is_file())


MEAN_STYLES = ("-", "--", ":", "-.")
"""Line styles of the population means in eval.png, in the order the populations are given."""


def population_names(populations: Sequence[Sequence[Run]]) -> list[str]:
    """Each population by its run directory's name (the members' parent), with as much of its
    path as tells it from the others (short_names)."""
    return short_names([g[0].path.parent if g else Path("?") for g in populations])


def member_mean(runs: Sequence[Run]) -> tuple[Any, Any, Any] | None:
    """A population's members' eval returns, mean and std across the members at each eval
    step they all reached: (env steps, mean, std), or None with fewer than two members. A
    member stopped early counts with its frozen agent's evals after its stop."""
    if len(runs) < 2:
        return None
    by_step = []
    for run in runs:
        by_step.append({
            int(num(r.get("step"))): (num(r.get("env_steps")), num(r.get("eval_return")))
            for r in run.evals
        })  # fmt: skip
    common = sorted(set.intersection(*(set(d) for d in by_step)))
    if not common:
        return None
    env = np.array([by_step[0][s][0] for s in common])
    values = np.array([[d[s][1] for d in by_step] for s in common])  # (evals, members)
    return env, values.mean(1), values.std(1)


def series(records: Sequence[dict[str, Any]], key: str, x: str = "step") -> tuple[Any, Any]:
    """(x, y) arrays of the records where both are finite."""
    xs = np.array([num(r.get(x)) for r in records], dtype=float)
    ys = np.array([num(r.get(key)) for r in records], dtype=float)
    ok = np.isfinite(xs) & np.isfinite(ys)
    return xs[ok], ys[ok]


def wall_times(run: Run, records: Sequence[dict[str, Any]], by: str) -> Any:
    """Wall time of each record: its own `wall_time` if logged, else interpolated from the
    training lines along `by` ("step" or "env_steps"), starting from (0, 0 s). NaN without any
    training line."""
    own = np.array([num(r.get("wall_time")) for r in records], dtype=float)
    at = np.array([num(r.get(by)) for r in records], dtype=float)
    kx, ky = series(run.train, "wall_time", by)
    if len(kx) == 0:
        return own
    order = np.argsort(kx, kind="stable")
    kx, ky = kx[order], ky[order]
    if kx[0] > 0:
        kx, ky = np.concatenate([[0.0], kx]), np.concatenate([[0.0], ky])
    guess = np.interp(at, kx, ky)
    return np.where(np.isfinite(own), own, np.where(np.isfinite(at), guess, np.nan))


def run_end_kinds(run: Run) -> tuple[str, ...] | None:
    """The end kinds whose counts (`eval_<kind>`) the run's eval lines carry: its task's
    (engine.episodes.end_kinds), else (no config.toml, or a task logged without them) any known
    set, longest first; None when they carry none (runs logged before these fields)."""
    known = sorted({*END_KINDS.values(), DEFAULT_END_KINDS}, key=len, reverse=True)
    own = [end_kinds(run.task)] if run.task else []
    for kinds in (*own, *known):
        if any(all(f"eval_{k}" in r for k in kinds) for r in run.evals):
            return kinds
    return None


def end_counts(run: Run) -> tuple[tuple[str, ...], Any, Any, list[dict[str, Any]]]:
    """(kinds, env steps (n,), counts (n, len(kinds)), records) of the eval lines that carry
    every kind's count as a finite number with at least one episode; empty without any."""
    kinds = run_end_kinds(run)
    if kinds is None:
        return (), np.zeros(0), np.zeros((0, 0)), []
    rows, xs, recs = [], [], []
    for r in run.evals:
        counts = [num(r.get(f"eval_{k}")) for k in kinds]
        if all(math.isfinite(c) and c >= 0 for c in counts) and sum(counts) > 0:
            rows.append(counts)
            xs.append(num(r.get("env_steps")))
            recs.append(r)
    return kinds, np.array(xs, dtype=float), np.array(rows, dtype=float), recs


# --------------------------------------------------------------------------------------------
# Summary.


def _fmt(v: float) -> str:
    if not math.isfinite(v):
        return str(v)
    if v == int(v) and abs(v) < 1e9:
        return f"{int(v):,}"
    return f"{v:.4g}"


def _last(records: Sequence[dict[str, Any]], key: str) -> float:
    for r in reversed(records):
        v = num(r.get(key))
        if not math.isnan(v):
            return v
    return math.nan


def summarize(run: Run, target: float | None = None) -> str:
    """The run's numbers as a few indented lines; `target` overrides the task's solved return."""
    target = run.target(target)
    # A population member stopped early: its own numbers end at its stop; what its frozen
    # agent did while the others trained is a line of its own below.
    recs = run.until_stop(run.train + run.evals + run.episodes)
    steps = max((num(r.get("step")) for r in recs), default=math.nan)
    env_steps = max((num(r.get("env_steps")) for r in recs), default=math.nan)
    wall = _last(run.train, "wall_time")
    lines = [f"run {run.path} ({run.label})"]
    # The rate of the last train line's own step: a member stopped in a population keeps
    # evaluation and episode lines after its last train line, and its wall time ends there.
    rate = _last(run.train, "step") / wall if wall > 0 else math.nan
    lines.append(
        f"  steps {_fmt(steps)}, env steps {_fmt(env_steps)}, wall time {wall:.1f} s, "
        f"{rate:.3g} steps/s"
    )
    ok = [r for r in run.until_stop(run.evals) if math.isfinite(num(r.get("eval_return")))]
    ev = np.array([num(r.get("eval_return")) for r in ok])
    if ok:
        walls = wall_times(run, ok, "step")
        final = ok[-1]
        i_best = int(np.argmax(ev))
        best = ok[i_best]
        lines.append(
            f"  eval: {len(ok)} evaluations, final {num(final.get('eval_return')):.1f} "
            f"(step {_fmt(num(final.get('step')))}, env step {_fmt(num(final.get('env_steps')))})"
            f", best {ev[i_best]:.1f} (step {_fmt(num(best.get('step')))}, "
            f"env step {_fmt(num(best.get('env_steps')))}, {walls[i_best]:.0f} s)"
        )
        hit = np.flatnonzero(ev >= target)
        if len(hit):
            r = ok[hit[0]]
            lines.append(
                f"  first eval >= {target:g}: {ev[hit[0]]:.1f} at env step "
                f"{_fmt(num(r.get('env_steps')))}, {walls[hit[0]]:.0f} s wall "
                f"(step {_fmt(num(r.get('step')))})"
            )
        else:
            lines.append(f"  first eval >= {target:g}: never")
    else:
        lines.append("  eval: none")
    kinds, _, counts, recs = end_counts(run)
    own = len(run.until_stop(recs))  # end_counts keeps the eval lines' order
    if own:
        last, n = recs[own - 1], counts[own - 1]
        split = ", ".join(f"{int(c)} {END_TEXT[k]}" for k, c in zip(kinds, n))
        lines.append(
            f"  ends of the last eval (step {_fmt(num(last.get('step')))}, env step "
            f"{_fmt(num(last.get('env_steps')))}): {split} (of {int(n.sum())} episodes)"
        )
    _, ep = series(run.until_stop(run.episodes), "episode_return")
    if len(ep):
        lines.append(
            f"  training episodes: {len(ep)}, last {ep[-1]:.1f}, mean of last 10 "
            f"{ep[-10:].mean():.1f}, best {ep.max():.1f}"
        )
    finals = [(k, _last(run.train, k)) for k in SUMMARY_LOSSES]
    finals = [f"{k} {_fmt(v)}" for k, v in finals if not math.isnan(v)]
    if finals:
        lines.append("  final: " + ", ".join(finals))
    for ev in run.events:
        reason = ev.get("reason")
        lines.append(
            f"  {ev.get('type')} at step {_fmt(num(ev.get('step')))}"
            + (f": {reason}" if isinstance(reason, str) else "")
        )
    if run.stop_step is not None:
        lines.append(_after_stop(run, target))
    for note in run.notes:
        lines.append(f"  note: {note}")
    return "\n".join(lines)


def _after_stop(run: Run, target: float) -> str:
    """A stopped member's frozen final agent, evaluated while the population trained on: every
    later eval's episodes pooled (many more than any one eval), and its training episodes."""
    evals = run.after_stop(run.evals)
    returns = [num(x) for r in evals for x in (r.get("eval_returns") or [])]
    returns = np.array([x for x in returns if math.isfinite(x)])
    text = (
        f"  after its stop at step {_fmt(run.stop_step)} (weights frozen, the others trained on):"
    )
    if len(returns):
        text += (
            f" {len(evals)} evals, {len(returns)} episodes of its final agent: mean "
            f"{returns.mean():.1f} +- {returns.std():.1f}, median {np.median(returns):.1f}, "
            f"{int((returns >= target).sum())}/{len(returns)} >= {target:g}"
        )
    else:
        text += f" {len(evals)} evals"
    _, ep = series(run.after_stop(run.episodes), "episode_return")
    if len(ep):
        text += f"; {len(ep)} training episodes (sampled actions), mean {ep.mean():.1f}"
    return text


# --------------------------------------------------------------------------------------------
# Plots.


def _figure_api() -> tuple[Any, Any]:
    """matplotlib's Figure and Agg canvas, imported here so training never needs matplotlib.
    Figure + FigureCanvasAgg (not pyplot) leaves no global backend or figure state behind."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise ReportError("engine.report needs matplotlib: pip install matplotlib") from None
    return Figure, FigureCanvasAgg


def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Write through a temp file in the same folder, then rename: readers never see half a
    file (report folders are often watched or synced while a run trains)."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _save(fig: Any, canvas_cls: Any, path: Path) -> None:
    canvas_cls(fig)
    _atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))


def _grid_figure(Figure: Any, n: int, cols: int = 3) -> tuple[Any, list[Any]]:
    rows = max(1, math.ceil(n / cols))
    cols = min(cols, max(n, 1))
    fig = Figure(figsize=(5.0 * cols, 3.3 * rows + 0.6), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel().tolist()
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, axes[:n]


def _use_log(values: list[Any]) -> bool:
    allv = np.concatenate(values) if values else np.array([])
    return bool(len(allv) and (allv > 0).all() and allv.max() / allv.min() > LOG_RATIO)


def _panel_plot(
    runs: Sequence[Run], panels: Sequence[tuple[str, tuple[str, ...]]], title: str, path: Path
) -> bool:
    """A grid with one panel per metric that has data in any run; False when none has."""
    Figure, canvas = _figure_api()
    present = [
        (name, keys)
        for name, keys in panels
        if any(len(series(r.train, k)[0]) for r in runs for k in keys)
    ]
    if not present:
        return False
    fig, axes = _grid_figure(Figure, len(present))
    for ax, (name, keys) in zip(axes, present):
        drawn = []
        for i, run in enumerate(runs):
            for j, key in enumerate(keys):
                x, y = series(run.train, key)
                if len(x):
                    style = LINE_STYLES[j % len(LINE_STYLES)]
                    ax.plot(x, y, style, color=f"C{i}", lw=1.3, marker="." if len(x) < 30 else "")
                    drawn.append(y)
        if _use_log(drawn):
            ax.set_yscale("log")
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("learner step", fontsize=8)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
    _run_legend(fig, runs)
    fig.suptitle(title, fontsize=12)
    _save(fig, canvas, path)
    return True


def _run_legend(fig: Any, runs: Sequence[Run]) -> None:
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=f"C{i}", lw=2) for i in range(len(runs))]
    fig.legend(
        handles,
        [r.label for r in runs],
        loc="outside lower center",
        ncols=min(len(runs), 4),
        fontsize=9,
        frameon=False,
    )


# eval.png's automatic y-range: the returns between the OUTLIER_QUANTILE and 1 - OUTLIER_QUANTILE
# quantiles are the central range; a tail that reaches further than OUTLIER_SPAN times that range
# beyond it (LunarLander's -2,000 crash-and-spin evals beside a 0-250 learning curve) is cut
# off at the axis, and its points are drawn on the edge as triangles. Where a run ended up is
# never a tail: each run's last eval stays in view (cartpole_d256's 1,000 training episodes of
# 10-50 and its last 20 of 500 would otherwise cut the axis at 260, under the solved curve).
OUTLIER_QUANTILE = 0.02
OUTLIER_SPAN = 1.0


def eval_ylim(values: Sequence[float], keep: Sequence[float] = ()) -> tuple[float, float] | None:
    """The y-range eval.png zooms to, or None when no tail needs cutting off; `keep` (each
    run's last eval) stays inside it."""
    v = np.sort(np.asarray([x for x in values if math.isfinite(x)], dtype=float))
    if v.size < 10:
        return None
    k = max(1, int(OUTLIER_QUANTILE * v.size))
    lo_q, hi_q = float(v[k]), float(v[-k - 1])
    span = max(hi_q - lo_q, 1e-9)
    lo = float(v[0]) if v[0] >= lo_q - OUTLIER_SPAN * span else lo_q - 0.05 * span
    hi = float(v[-1]) if v[-1] <= hi_q + OUTLIER_SPAN * span else hi_q + 0.05 * span
    kept = [float(x) for x in keep if math.isfinite(x)]
    if kept and min(kept) < lo:
        lo = max(min(kept) - 0.05 * span, float(v[0]))
    if kept and max(kept) > hi:
        hi = min(max(kept) + 0.05 * span, float(v[-1]))
    if lo <= v[0] and hi >= v[-1]:
        return None
    return lo, hi


def parse_ylim(text: str) -> tuple[float, float]:
    """`LO:HI` (either may be empty for 'automatic') as given to --ylim."""
    parts = text.split(":")
    try:
        if len(parts) != 2:
            raise ValueError
        lo, hi = (float(p) if p.strip() else math.nan for p in parts)
    except ValueError:
        raise ReportError(f"--ylim {text!r}: expected LO:HI, e.g. --ylim=-300:320") from None
    if math.isfinite(lo) and math.isfinite(hi) and lo >= hi:
        raise ReportError(f"--ylim {text!r}: LO must be below HI")
    return lo, hi


def plot_eval(
    runs: Sequence[Run],
    path: Path,
    target: float | None = None,
    ylim: tuple[float, float] | None = None,
    populations: Sequence[Sequence[Run]] = (),
) -> bool:
    """Eval return against env steps and against wall time, mean line with the per-eval std
    band, the training episodes' returns faint behind, each run's target return dashed. False
    when no run has either. The y-range is `ylim` (NaN for an automatic end), else eval_ylim's
    zoom when a few outliers would squash the curves; points outside it are drawn at its
    edge as triangles and counted in the title."""
    Figure, canvas = _figure_api()
    if not any(r.evals or r.episodes for r in runs):
        return False
    every = [
        num(r.get(k))
        for run in runs
        for recs, k in ((run.evals, "eval_return"), (run.episodes, "episode_return"))
        for r in recs
    ]
    every = [v for v in every if math.isfinite(v)]
    last = [  # each run's latest eval (by update, not by line)
        num(max(evs, key=lambda r: num(r.get("step"))).get("eval_return"))
        for evs in (run.until_stop(run.evals) for run in runs)
        if evs
    ]
    clip = eval_ylim(every, keep=last)
    if ylim is not None:  # a NaN end takes the automatic one (or the data's own)
        auto = clip or (min(every, default=0.0), max(every, default=1.0))
        lo, hi = (given if math.isfinite(given) else a for given, a in zip(ylim, auto))
        clip = (lo, hi) if lo < hi else None
    outside = 0
    fig = Figure(figsize=(13, 4.8), layout="constrained")
    ax_env, ax_wall = fig.subplots(1, 2)
    for i, run in enumerate(runs):
        color = f"C{i}"
        # A stopped member's frozen agent after its stop: faint and dashed, against env steps
        # only (its own wall-time axis ends at its stop).
        eps = [
            r for r in run.until_stop(run.episodes) if math.isfinite(num(r.get("episode_return")))
        ]
        if eps:
            ret = np.array([num(r.get("episode_return")) for r in eps])
            env = np.array([num(r.get("env_steps")) for r in eps])
            wall = wall_times(run, eps, "env_steps")
            outside += _count_beyond(ret, clip)
            for ax, x in ((ax_env, env), (ax_wall, wall)):
                ax.plot(x, ret, ".", color=color, alpha=0.3, ms=4, zorder=1)
                _edge_markers(ax, x, ret, clip, color, alpha=0.3, ms=4)
        outside += _plot_after_stop(ax_env, run, color, clip)
        evs = [r for r in run.until_stop(run.evals) if math.isfinite(num(r.get("eval_return")))]
        if not evs:
            continue
        mean = np.array([num(r.get("eval_return")) for r in evs])
        std = np.array([num(r.get("eval_return_std")) for r in evs])
        env = np.array([num(r.get("env_steps")) for r in evs])
        wall = wall_times(run, evs, "step")
        outside += _count_beyond(mean, clip)
        for ax, x in ((ax_env, env), (ax_wall, wall)):
            ax.plot(x, mean, "-o", color=color, ms=3.5, lw=1.6, zorder=3)
            _edge_markers(ax, x, mean, clip, color, alpha=1.0, ms=6)
            band = np.isfinite(std) & np.isfinite(x)
            if band.any():
                ax.fill_between(
                    x[band],
                    (mean - std)[band],
                    (mean + std)[band],
                    color=color,
                    alpha=0.2,
                    lw=0,
                    zorder=2,
                )
    names = population_names(populations)
    for i, members in enumerate(populations):
        mean = member_mean(members)
        if mean is None:
            continue
        env, mu, sd = mean
        label = f"mean of {len(members)} members"
        if len(populations) > 1:  # one black line each, told apart by its dash and name
            label = f"{names[i]}: {label}"
        style = MEAN_STYLES[i % len(MEAN_STYLES)]
        ax_env.plot(env, mu, linestyle=style, color="black", lw=2.4, zorder=4, label=label)
        ax_env.fill_between(env, mu - sd, mu + sd, color="0.3", alpha=0.18, lw=0, zorder=2)
        ax_env.legend(loc="lower right", fontsize=8)
    for ax, xlabel in ((ax_env, "env steps"), (ax_wall, "wall time (s)")):
        ax.set_xlabel(xlabel)
        ax.set_ylabel("return")
        ax.grid(alpha=0.3)
        if clip is not None:
            ax.set_ylim(*clip)
        for goal in sorted({r.target(target) for r in runs}):
            lo, hi = ax.get_ylim()  # keep the line in view when the runs are far below it
            pad = 0.05 * (max(hi, goal) - min(lo, goal))
            ax.set_ylim(min(lo, goal - pad), max(hi, goal + pad))
            ax.axhline(goal, color="0.35", ls="--", lw=1, zorder=0)
            ax.annotate(
                f"target {goal:g}",
                (0.005, goal),
                xycoords=("axes fraction", "data"),
                xytext=(0, 3),
                textcoords="offset points",
                fontsize=8,
                color="0.35",
            )
    ax_env.set_title("eval return (line, ±std band) and training episodes (dots) vs env steps")
    if outside:
        fig.suptitle(
            f"y-axis {clip[0]:.4g} to {clip[1]:.4g}: {outside} returns beyond it drawn at its "
            "edge (triangles); --ylim sets it",
            fontsize=9,
        )
    ax_wall.set_title("the same vs wall time")
    _run_legend(fig, runs)
    _save(fig, canvas, path)
    return True


def _plot_after_stop(ax: Any, run: Run, color: str, clip: tuple[float, float] | None) -> int:
    """A stopped member's records after its stop on the env-steps axis: its training episodes
    as fainter dots, its evals as a faint dashed line. Returns how many fell beyond `clip`."""
    outside = 0
    for key, recs, style in (
        ("episode_return", run.after_stop(run.episodes), "."),
        ("eval_return", run.after_stop(run.evals), "--"),
    ):
        recs = [r for r in recs if math.isfinite(num(r.get(key)))]
        if recs:
            y = np.array([num(r.get(key)) for r in recs])
            x = np.array([num(r.get("env_steps")) for r in recs])
            ax.plot(x, y, style, color=color, alpha=0.15 if style == "." else 0.4, ms=3, lw=1)
            _edge_markers(ax, x, y, clip, color, alpha=0.15, ms=3)
            outside += _count_beyond(y, clip)
    return outside


def _count_beyond(y: Any, clip: tuple[float, float] | None) -> int:
    return 0 if clip is None else int(((y < clip[0]) | (y > clip[1])).sum())


def _edge_markers(
    ax: Any, x: Any, y: Any, clip: tuple[float, float] | None, color: str, alpha: float, ms: float
) -> None:
    """Points of (x, y) beyond the y-range `clip`, drawn on its edge as triangles."""
    if clip is None:
        return
    for beyond, edge, marker in ((y < clip[0], clip[0], "v"), (y > clip[1], clip[1], "^")):
        if beyond.any():
            ax.plot(
                x[beyond],
                np.full(int(beyond.sum()), edge),
                marker,
                color=color,
                alpha=alpha,
                ms=ms,
                clip_on=False,
                zorder=4,
            )


def _bar_widths(x: Any) -> Any:
    """The gap to the nearer neighbouring eval (evals need not be evenly spaced), 0.9 of it for
    up to 40 evals (apart bars), all of it beyond (touching bars, no moire); a lone eval, or two
    at one env step, 5% of the largest env step."""
    gaps = np.diff(x)
    near = np.minimum(np.concatenate([[np.inf], gaps]), np.concatenate([gaps, [np.inf]]))
    fallback = 0.05 * max(float(np.abs(x).max()), 1.0) if len(x) else 1.0
    frac = 0.9 if len(x) <= 40 else 1.0
    return np.where(np.isfinite(near) & (near > 0), frac * near, fallback)


def plot_ends(runs: Sequence[Run], path: Path) -> bool:
    """How the eval episodes ended: per run a panel of stacked bars, the share of each eval's
    episodes that came to rest / crashed / ran into the time limit (LunarLander) or terminated /
    ran into the time limit (CartPole), against env steps; one colour per kind. False when no
    run's eval lines carry the counts."""
    Figure, canvas = _figure_api()
    drawn = [(run, end_counts(run)) for run in runs]
    drawn = [(run, data) for run, data in drawn if len(data[3])]
    if not drawn:
        return False
    fig, axes = _grid_figure(Figure, len(drawn), cols=2)
    shown: dict[str, Any] = {}
    for ax, (run, (kinds, x, counts, _)) in zip(axes, drawn):
        ok = np.isfinite(x)
        x, counts = x[ok], counts[ok]
        order = np.argsort(x, kind="stable")
        x, counts = x[order], counts[order]
        shares = counts / counts.sum(1, keepdims=True)
        width, bottom = _bar_widths(x), np.zeros(len(x))
        for j, kind in enumerate(kinds):
            bars = ax.bar(x, shares[:, j], width, bottom=bottom, color=END_COLORS[kind], lw=0)
            shown.setdefault(kind, bars)
            bottom += shares[:, j]
        ax.set_ylim(0, 1)
        ax.set_title(f"{run.label}: how the eval episodes ended", fontsize=10)
        ax.set_xlabel("env steps", fontsize=8)
        ax.set_ylabel("share of eval episodes", fontsize=8)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3, axis="y")
    order = [k for k in END_COLORS if k in shown]
    fig.legend(
        [shown[k] for k in order],
        [END_TEXT[k] for k in order],
        loc="outside lower center",
        ncols=len(order),
        fontsize=9,
        frameon=False,
    )
    _save(fig, canvas, path)
    return True


# --------------------------------------------------------------------------------------------
# The report.


def default_out(run_dirs: Sequence[Path]) -> Path:
    if len(run_dirs) == 1:
        return run_dirs[0] / "report"
    base = Path.cwd() / f"report_{time.strftime('%Y%m%d_%H%M%S')}"
    path, i = base, 1
    while path.exists():
        i += 1
        path = base.with_name(f"{base.name}_{i}")
    return path


def label_runs(runs: Sequence[Run]) -> None:
    """Label by directory name; where two runs share one, by as many of the path's last parts
    as tell them apart (two populations' members: ll_pbt/member_00, ll_plain/member_00)."""
    for run, label in zip(runs, short_names([r.path for r in runs])):
        run.label = label


def _absolute(path: Path) -> Path:
    """The path made absolute without following links: a sweep's run named `arm=real,seed=0`
    that links to `population_00/member_01` is labelled by its own name."""
    return Path(os.path.abspath(path))


def short_names(paths: Sequence[Path]) -> list[str]:
    """Each path by its shortest tail of parts that no other path ends with; a path given twice
    by itself, as given."""
    parts = [_absolute(p).parts for p in paths]
    names = []
    for i, mine in enumerate(parts):
        others = [q for j, q in enumerate(parts) if j != i]
        for n in range(1, len(mine) + 1):
            if all(q[-n:] != mine[-n:] for q in others):
                names.append("/".join(mine[-n:]))
                break
        else:
            names.append(str(paths[i]))
    return names


def write_report(
    runs: Sequence[Run],
    out: Path,
    target: float | None = None,
    ylim: tuple[float, float] | None = None,
    populations: Sequence[Sequence[Run]] = (),
) -> tuple[list[Path], str]:
    """Plots and summary.txt into `out`. Returns the files written and the summary text.
    `target` overrides each run's task target (TASK_TARGETS); `ylim` is eval.png's y-range;
    `populations`: groups of `runs` that are one population's members, drawn with their mean
    and its std band across the members."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, draw in (
        ("losses.png", lambda p: _panel_plot(runs, LOSS_PANELS, "world model and losses", p)),
        ("eval.png", lambda p: plot_eval(runs, p, target, ylim, populations)),
        ("behavior.png", lambda p: _panel_plot(runs, BEHAVIOR_PANELS, "behaviour", p)),
        ("ends.png", lambda p: plot_ends(runs, p)),
    ):
        if draw(out / name):
            written.append(out / name)
    text = "\n\n".join(summarize(r, target) for r in runs) + "\n"
    _atomic_write(out / "summary.txt", lambda tmp: tmp.write_text(text))
    written.append(out / "summary.txt")
    return written, text


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m engine.report",
        description="Plots (losses.png, eval.png, behavior.png, ends.png) and summary.txt.",
    )
    p.add_argument(
        "run_dirs",
        nargs="+",
        metavar="RUN_DIR",
        help="run directories to overlay; a population run stands for its members, drawn "
        "with their mean and std band",
    )
    p.add_argument(
        "--out",
        help="output folder (default: RUN_DIR/report for one run, report_<time> in the cwd for "
        "several)",
    )
    p.add_argument(
        "--target",
        type=float,
        default=None,
        help="eval return counted as solved: the summary reports its first crossing and eval.png "
        "draws it (default: by the run's env.name, CartPole-v1 450, LunarLander-v3 200)",
    )
    p.add_argument(
        "--ylim",
        metavar="LO:HI",
        help="eval.png's y-range, written --ylim=LO:HI, either end may be empty (default: "
        "the central 96%% of the returns when a few outliers would squash the curves)",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        _figure_api()  # fail before reading anything when matplotlib is missing
        ylim = parse_ylim(args.ylim) if args.ylim is not None else None
        runs, groups = [], []
        for d in args.run_dirs:
            members = population_members(Path(d))
            if members:  # a population: its members, and their mean
                groups.append([load_run(m) for m in members])
                runs += groups[-1]
            else:
                runs.append(load_run(d))
        for run in runs:
            for note in run.notes:
                print(f"note: {note}", file=sys.stderr)
        empty = [r for r in runs if r.empty]
        if len(empty) == len(runs):
            raise ReportError(f"{empty[0].path / 'metrics.jsonl'}: no metric records yet")
        for run in empty:
            print(f"note: {run.path}: no metric records yet; left out", file=sys.stderr)
        runs = [r for r in runs if not r.empty]
        label_runs(runs)
        one = len(args.run_dirs) == 1
        dirs = [Path(args.run_dirs[0])] if one else [r.path for r in runs]
        out = Path(args.out) if args.out else default_out(dirs)
        if out.exists() and not out.is_dir():
            raise ReportError(f"--out {out}: exists and is not a folder")
        groups = [[r for r in g if not r.empty] for g in groups]
        written, text = write_report(runs, out, args.target, ylim, groups)
    except ReportError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:
        print(f"error: {e.filename or 'output'}: {e.strerror or e}", file=sys.stderr)
        sys.exit(2)
    print(text, end="")
    print(f"report: {out} ({', '.join(p.name for p in written)})", file=sys.stderr)


if __name__ == "__main__":
    main()
