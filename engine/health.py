"""When a run stops before its budget: diverged (a non-finite metric, a runaway dream value),
early-stopped (train.early_stop_patience) or solved (train.stop_solved_evals, confirmed on
train.stop_confirm_episodes fresh episodes when set). Pure decisions
on the config and a run's (or a population member's) counters; the trainer acts on them."""

from __future__ import annotations

import math
from typing import Any

from engine.config import TASK_TARGETS, Config, TrainConfig


class TrainingError(Exception):
    """A run that cannot go on (non-finite loss, checkpoint mismatch): one-line message."""


class HealthError(TrainingError):
    """Training diverged (a non-finite metric or parameter, a runaway dream value). The bad
    state is never checkpointed; engine.run exits with status 3."""


def short(x: float) -> str:
    """8.9e7 rather than 89000000.0 or 8.9e+07, for one-line messages."""
    return f"{x:.3g}".replace("e+0", "e").replace("e+", "e").replace("e-0", "e-")


def unhealthy(means: dict[str, float], max_abs_dream_value: float) -> tuple[str, dict] | None:
    """A diverged metric in a log interval's `means`: (reason, the offending values), or None.
    `max_abs_dream_value` is train.max_abs_dream_value (0: no bound)."""
    bad = [k for k, v in means.items() if not math.isfinite(v)]
    bound, value = max_abs_dream_value, means.get("dream_value")
    if bad:
        return f"non-finite {', '.join(bad)}", {k: means[k] for k in bad}
    if bound > 0 and value is not None and abs(value) > bound:
        return (
            f"dream_value {short(value)} beyond the bound {short(bound)} "
            "(train.max_abs_dream_value)",
            {"dream_value": value},
        )
    return None


def early_stop_reason(t: TrainConfig, wm_loss: float | None, c: dict, step: int) -> str | None:
    """train.early_stop_patience on the counters `c` (the run's, or a member's), updated in
    place, at update `step`: why to stop, or None."""
    if not t.early_stop_patience or wm_loss is None:
        return None
    best = c["es_best"]
    if not math.isfinite(best) or wm_loss < best - t.early_stop_min_delta * abs(best):
        c.update(es_best=wm_loss, es_best_step=step, es_stale=0)
        return None
    c["es_stale"] += 1
    if c["es_stale"] < t.early_stop_patience:
        return None
    return (
        f"wm_loss has not improved on its best {short(best)} (step {c['es_best_step']}) by "
        f"{short(t.early_stop_min_delta)} relative for {c['es_stale']} log intervals "
        "(train.early_stop_patience)"
    )


def solved_reason(cfg: Config, last_eval: float, c: dict) -> str | None:
    """train.stop_solved_evals on the counters `c`, updated in place: the reason to end the run
    after that many evaluations in a row at or above the task's solved return, or None."""
    need = cfg.train.stop_solved_evals
    if not need:
        return None
    target = TASK_TARGETS[cfg.env.name]
    c["solved_streak"] = c["solved_streak"] + 1 if last_eval >= target else 0
    if c["solved_streak"] < need:
        return None
    return (
        f"{c['solved_streak']} evaluations in a row reached the solved return "
        f"{target:g} (train.stop_solved_evals)"
    )


def confirm_rounds(t: TrainConfig, per_round: int) -> int:
    """How many evaluation rounds of `per_round` episodes each the confirmation of a solved
    stop plays: enough for at least train.stop_confirm_episodes; 0 when it is off."""
    return -(-t.stop_confirm_episodes // per_round) if t.stop_confirm_episodes else 0


def confirm_verdict(cfg: Config, mean: float, count: int) -> tuple[bool, str]:
    """train.stop_confirm_episodes: whether the mean return of the `count` fresh greedy
    episodes played with the weights a solved streak ended on reaches the task's solved
    return, and why."""
    target = TASK_TARGETS[cfg.env.name]
    passed = mean >= target
    return passed, (
        f"{count} fresh greedy episodes with the same weights averaged {mean:.1f}, "
        f"{'at or above' if passed else 'below'} the solved return {target:g} "
        "(train.stop_confirm_episodes)"
    )


def confirmation(cfg: Config, episodes: Any) -> dict:
    """The solve_confirm record of a solved streak's confirmation `episodes` (engine.episodes'
    Episodes): whether they `passed`, the `reason`, their returns and how they ended."""
    fields = episodes.record("confirm", cfg.env.name)
    passed, why = confirm_verdict(cfg, fields["confirm_return"], fields["confirm_episodes"])
    return dict(reason=why, passed=passed, **fields)
