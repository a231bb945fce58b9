"""The table of an ablation run with `engine.sweep` (benchmarks/ablation_official.sh): per arm and
seed, the greedy evals from update --from on (their mean +- its standard error over the evals,
the difference to the reference arm of the same seed, how the episodes ended), and the
re-evaluation of each final agent, when `engine.evaluate --json` wrote one into the run:

    for d in sweeps/ll_ablation/arm=*; do
        python -m engine.evaluate "$d" --checkpoint latest --episodes 50 --json "$d/reeval.json"
    done
    python -m benchmarks.ablation_table sweeps/ll_ablation --from 2500 --out table.md

`--save DIR` keeps what the table is made of (sweep.json; each run's config.toml, re-evaluation
and the eval records of its metrics.jsonl, a few KB) as a sweep directory the table reads, to
commit beside the results: a table over seeds trained in different sessions is then
`python -m benchmarks.ablation_table SAVED_SEED0 SAVED_SEED1 ...`.
Several sweep directories (seeds run as separate sweeps, `--first-seed`) make one table; with
more than one seed per arm it adds the mean +- std over seeds, the paired difference of the
re-evaluations, and in how many seeds each arm is ahead of the reference. The arms of one seed in
one population see the same environment seeds, so the difference to the reference arm is paired."""

from __future__ import annotations

import argparse
import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.episodes import END_TEXT
from engine.logger import fmt_value, md_table, read_metrics
from engine.rundir import fail


class TableError(Exception):
    pass


@dataclass
class Eval:
    step: int
    returns: list[float]
    ends: dict[str, int]

    @property
    def mean(self) -> float:
        return statistics.fmean(self.returns)


@dataclass
class Run:
    arm: str
    seed: int
    path: Path
    status: str
    evals: list[Eval] = field(default_factory=list)
    steps: int | None = None
    reeval: dict[str, Any] | None = None


def _arm(settings: dict[str, str]) -> str:
    """The run's arm: its `arm` setting, then any other grid setting as key=value."""
    parts = [settings["arm"]] if "arm" in settings else []
    parts += [f"{k}={v}" for k, v in settings.items() if k != "arm"]
    return ",".join(parts) or "run"


def _evals(records: list[dict[str, Any]]) -> list[Eval]:
    out = []
    for r in records:
        returns = r.get("eval_returns")
        if r.get("type") != "eval" or not isinstance(returns, list) or not returns:
            continue
        ends = {k: int(r[f"eval_{k}"]) for k in END_TEXT if isinstance(r.get(f"eval_{k}"), int)}
        out.append(Eval(int(r["step"]), [float(x) for x in returns], ends))
    return out


def load(sweep: Path, reeval_name: str) -> list[Run]:
    """The runs of one engine.sweep --out directory, with their evals and re-evaluation."""
    state = sweep / "sweep.json"
    if not sweep.is_dir():
        raise TableError(f"{sweep}: no such directory")
    try:
        doc = json.loads(state.read_text())
        specs = [(r["name"], r["settings"], int(r["seed"]), r["status"]) for r in doc["runs"]]
    except FileNotFoundError:
        raise TableError(f"{sweep}: holds no sweep.json (not an engine.sweep --out)") from None
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, UnicodeDecodeError) as e:
        raise TableError(f"{state}: unreadable sweep state ({type(e).__name__}: {e})") from None
    runs = []
    for name, settings, seed, status in specs:
        path = sweep / name
        records = read_metrics(path)
        steps = [r["step"] for r in records if isinstance(r.get("step"), int)]
        run = Run(_arm(settings), seed, path, status, _evals(records), max(steps, default=None))
        file = path / reeval_name
        if file.is_file():
            try:
                run.reeval = json.loads(file.read_text())
                float(run.reeval["mean"]), int(run.reeval["episodes"])
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
                raise TableError(f"{file}: not an engine.evaluate --json record ({e})") from None
        runs.append(run)
    return runs


def save(sweep: Path, dest: Path, reeval_name: str) -> None:
    """The table's inputs of `sweep` as a sweep directory in `dest` (a new directory)."""
    import shutil

    if dest.exists():
        raise TableError(f"{dest}: exists; --save writes a new directory")
    doc = json.loads((sweep / "sweep.json").read_text())
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    for r in doc["runs"]:
        src, out = sweep / r["name"], tmp / r["name"]
        out.mkdir(parents=True)
        records = read_metrics(src)
        kept = [x for x in records if x.get("type") == "eval"]
        stepped = [x for x in records if isinstance(x.get("step"), int)]
        last = max(stepped, key=lambda x: x["step"], default=None)
        if last is not None and (not kept or last["step"] > kept[-1]["step"]):
            kept.append(last)  # the run's last update
        (out / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in kept))
        for name in ("config.toml", reeval_name):
            if (src / name).is_file():
                shutil.copyfile(src / name, out / name)
    (tmp / "sweep.json").write_text(json.dumps(doc, indent=1) + "\n")
    tmp.rename(dest)


def window(run: Run, first: int, last: int | None) -> list[Eval]:
    return [e for e in run.evals if e.step >= first and (last is None or e.step <= last)]


def mean_se(values: list[float]) -> tuple[float, float | None]:
    """The mean and its standard error (None for one value)."""
    m = statistics.fmean(values)
    return m, (statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else None)


def _pm(m: float | None, s: float | None, digits: int = 1) -> str:
    if m is None:
        return "-"
    return f"{m:.{digits}f}" + ("" if s is None else f" ± {s:.{digits}f}")


def _ends(counts: dict[str, int]) -> str:
    return " / ".join(str(counts.get(k, 0)) for k in counts) if counts else "-"


def _end_kinds(runs: list[Run]) -> list[str]:
    """The end kinds of the evals, in END_TEXT's order. An eval record also counts every
    termination as `eval_terminated`; where terminations are split (LunarLander: rest and
    crash) that count is their sum, and left out."""
    seen = {k for run in runs for e in run.evals for k in e.ends}
    if seen & {"rest", "crash"}:
        seen.discard("terminated")
    return [k for k in END_TEXT if k in seen]


def build(
    runs: list[Run], first: int, last: int | None, reference: str, title: str | None = None
) -> str:
    """The markdown: per run, over seeds (when an arm has several), and every eval."""
    if not runs:
        raise TableError("no runs")
    arms = list(dict.fromkeys(r.arm for r in runs))
    kinds = _end_kinds(runs)
    ends_head = "/".join(END_TEXT[k].replace("at the ", "") for k in kinds) or "ends"
    span = f"{first:,}" + (f"-{last:,}" if last is not None else " on")
    scores: dict[tuple[str, int], float] = {}
    for run in runs:
        evals = window(run, first, last)
        if evals:
            scores[run.arm, run.seed] = statistics.fmean(e.mean for e in evals)

    reevals = {(r.arm, r.seed): float(r.reeval["mean"]) for r in runs if r.reeval}

    def vs_ref(run: Run, of: dict[tuple[str, int], float]) -> float | None:
        """The run's figure in `of` minus the reference arm's of the same seed."""
        own, ref = of.get((run.arm, run.seed)), of.get((reference, run.seed))
        return None if own is None or ref is None or run.arm == reference else own - ref

    md = [f"# {title}\n"] if title else []
    md.append(
        f"Greedy evals from update {span}: the mean of the evals' mean returns ± its standard "
        f"error over the evals; `vs {reference}`: that mean minus the `{reference}` arm's of the "
        f"same seed; ends ({ends_head}): how the window's eval episodes ended. Re-eval: "
        "`engine.evaluate --json` of the final agent (mean ± std over its episodes).\n"
    )
    header = ["arm", "seed", "status", "last step", "evals", "mean", f"vs {reference}"]
    header += [f"ends ({ends_head})", "final eval", "re-eval", "re-eval >= target", "re-eval ends"]
    rows = []
    for run in sorted(runs, key=lambda r: (arms.index(r.arm), r.seed)):
        evals = window(run, first, last)
        counts = {k: sum(e.ends.get(k, 0) for e in evals) for k in kinds}
        m, se = mean_se([e.mean for e in evals]) if evals else (None, None)
        diff = vs_ref(run, scores)
        re = run.reeval
        rows.append(
            [run.arm, str(run.seed), run.status, fmt_value(run.steps), str(len(evals))]
            + [_pm(m, se), "-" if diff is None else f"{diff:+.1f}"]
            + [_ends(counts) if evals else "-"]
            + [f"{run.evals[-1].mean:.1f}" if run.evals else "-"]
            + (
                [
                    f"{re['mean']:.1f} ± {re.get('std', float('nan')):.1f} "
                    f"({re['episodes']} ep, update {fmt_value(re.get('step'))})",
                    f"{re.get('at_target', '-')}/{re['episodes']}",
                    _ends(re.get("end_counts") or {}),
                ]
                if re
                else ["-", "-", "-"]
            )
        )
    md.append(md_table(header, rows))

    seeds_of = {a: sorted({r.seed for r in runs if r.arm == a}) for a in arms}
    if any(len(s) > 1 for s in seeds_of.values()):
        md.append(
            "## Over seeds\n\nMean ± std over the seeds of each arm of the per-run figures above; "
            f"`re-eval vs {reference}`: the paired difference of the re-evaluations; "
            f"`seeds ahead`: in how many seeds the arm is above `{reference}` of the same seed, "
            "in the window's mean and in the re-evaluation.\n"
        )
        rows = []
        for arm in arms:
            mine = [r for r in runs if r.arm == arm]
            cells = [arm, ", ".join(map(str, seeds_of[arm]))]
            diffs = [d for d in (vs_ref(r, scores) for r in mine) if d is not None]
            re_diffs = [d for d in (vs_ref(r, reevals) for r in mine) if d is not None]
            for values in (
                [scores[arm, r.seed] for r in mine if (arm, r.seed) in scores],
                diffs,
                [reevals[arm, r.seed] for r in mine if (arm, r.seed) in reevals],
                re_diffs,
            ):
                sd = statistics.stdev(values) if len(values) > 1 else None
                cells.append(_pm(statistics.fmean(values), sd) if values else "-")
            hits = [(r.reeval.get("at_target", 0), r.reeval["episodes"]) for r in mine if r.reeval]
            cells.append(f"{sum(h for h, _ in hits)}/{sum(n for _, n in hits)}" if hits else "-")
            ahead = [
                f"{sum(d > 0 for d in values)}/{len(values)}" if values else "-"
                for values in (diffs, re_diffs)
            ]
            cells.append("-" if arm == reference else " and ".join(ahead))
            rows.append(cells)
        head = ["arm", "seeds", f"mean from {first:,}", f"vs {reference}", "re-eval"]
        head += [f"re-eval vs {reference}", "re-eval >= target", "seeds ahead (window and re-eval)"]
        md.append(md_table(head, rows))

    steps = sorted({e.step for r in runs for e in r.evals})
    md.append("## Every eval\n\nThe mean return of each greedy eval, by update.\n")
    rows = []
    for run in sorted(runs, key=lambda r: (arms.index(r.arm), r.seed)):
        at = {e.step: e.mean for e in run.evals}
        rows.append([run.arm, str(run.seed)] + [f"{at[s]:.0f}" if s in at else "" for s in steps])
    md.append(md_table(["arm", "seed"] + [f"{s:,}" for s in steps], rows))
    return "\n".join(md)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.ablation_table", description=__doc__)
    p.add_argument("sweeps", nargs="+", metavar="SWEEP", help="engine.sweep --out directories")
    p.add_argument("--from", dest="first", type=int, default=0, help="first update of the window")
    p.add_argument("--to", dest="last", type=int, help="last update of the window (default: all)")
    p.add_argument("--reference", default="base", help="the arm others are compared to")
    p.add_argument("--reeval", default="reeval.json", help="the re-evaluation's file in each run")
    p.add_argument("--title", help="a heading for the markdown")
    p.add_argument("--out", help="also write the markdown here")
    p.add_argument("--save", metavar="DIR", help="keep the table's inputs (one SWEEP) in DIR")
    args = p.parse_args(argv)
    try:
        if args.last is not None and args.last < args.first:
            raise TableError(f"--to {args.last} is before --from {args.first}")
        if args.save and len(args.sweeps) != 1:
            raise TableError(f"--save takes one SWEEP, got {len(args.sweeps)}")
        runs = [run for s in args.sweeps for run in load(Path(s), args.reeval)]
        text = build(runs, args.first, args.last, args.reference, args.title)
        if args.save:
            save(Path(args.sweeps[0]), Path(args.save), args.reeval)
    except TableError as e:
        fail(str(e))
    except OSError as e:
        fail(f"{e.filename}: {e.strerror or e}")
    print(text)
    if args.out:
        from engine.checkpoint import atomic_write

        try:
            atomic_write(Path(args.out), lambda tmp: tmp.write_text(text))
        except OSError as e:
            fail(f"{args.out}: {e.strerror or e}")


if __name__ == "__main__":
    main()
