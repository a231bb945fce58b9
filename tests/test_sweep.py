"""The sweep runner: grid expansion and naming, input errors, and real sweeps of tiny runs
(parallel, a failing run, resume of a half-finished sweep, SIGTERM)."""

import csv
import json
import math
import os
import signal
import subprocess
import sys
import time
import tomllib
from datetime import datetime
from pathlib import Path

import pytest

from engine import sweep as sweep_module
from engine.sweep import (
    MAX_NAME,
    RunRecord,
    SweepError,
    SweepState,
    _seed_range,
    _still_running,
    build_plan,
    run_names,
    short_keys,
    split_values,
    summarize,
)

ROOT = Path(__file__).resolve().parent.parent
# Tiny runs that take a few seconds, most of it importing torch: 40 bootstrap env steps (10
# collection steps of 4 envs) instead of 64, and an eval every 2 updates so returns get logged.
FAST = [
    "--config",
    "configs/tiny.toml",
    "--set",
    "train.bootstrap_steps=40",
    "--set",
    "log.eval_every=2",
]


def sweep(*args, timeout=300):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "engine.sweep", *map(str, args)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def state(out):
    return json.loads((out / "sweep.json").read_text())


def runs(out):
    return {r["name"]: r for r in state(out)["runs"]}


def csv_rows(out):
    with open(out / "summary.csv", newline="") as f:
        return {f"batch_size={r['batch_size']},seed={r['seed']}": r for r in csv.DictReader(f)}


# ---- Planning (no processes) ---------------------------------------------------------------


def test_split_values_keeps_lists_and_quoted_commas_whole():
    assert split_values("8,16, 32") == ["8", "16", "32"]
    assert split_values("[32,32],[64,64]") == ["[32,32]", "[64,64]"]
    assert split_values('"a,b",c') == ['"a,b"', "c"]


def test_grid_expansion_names_and_overrides():
    plan = build_plan(
        "configs/tiny.toml",
        ["train.batch_size=2,4", "models.d_hidden=16,32"],
        seeds=2,
        max_steps=3,
        overrides=["log.eval_every=2"],
    )
    names = [r.name for r in plan.runs]
    assert names == [
        f"batch_size={b},d_hidden={d},seed={s}" for b in (2, 4) for d in (16, 32) for s in (0, 1)
    ]
    first = plan.runs[0]
    assert first.overrides == [
        "log.eval_every=2",
        "train.max_train_steps=3",
        "train.batch_size=2",
        "models.d_hidden=16",
        "general.seed=0",
    ]
    assert plan.runs[-1].settings == {"train.batch_size": "4", "models.d_hidden": "32"}
    assert plan.runs[-1].seed == 1


def test_arms_are_one_more_grid_dimension_with_their_own_overrides():
    plan = build_plan(
        "configs/tiny.toml",
        ["train.batch_size=2,4"],
        seeds=2,
        max_steps=None,
        overrides=[],
        arm_specs=["base:", "opt:train.optimizer=laprop;train.agc=0.3"],
    )
    assert [r.name for r in plan.runs][:4] == [
        "arm=base,batch_size=2,seed=0",
        "arm=base,batch_size=2,seed=1",
        "arm=base,batch_size=4,seed=0",
        "arm=base,batch_size=4,seed=1",
    ]
    opt = [r for r in plan.runs if r.settings["arm"] == "opt"][0]
    assert opt.overrides == [
        "train.optimizer=laprop",
        "train.agc=0.3",
        "train.batch_size=2",
        "general.seed=0",
    ]
    assert plan.identity()["arms"] == {
        "base": [],
        "opt": ["train.optimizer=laprop", "train.agc=0.3"],
    }
    assert "arms" not in build_plan("configs/tiny.toml", [], 1, None, []).identity()


@pytest.mark.parametrize(
    "arms, words",
    [
        (["a:train.optimizer=sgd"], "must be adam|laprop"),
        (["a:train.nope=1"], "unknown key"),
        (["a:train.agc=0.3", "a:train.agc=0.1"], "another arm is named 'a'"),
        (["a b:train.agc=0.3"], "needs a name"),
        (["a:train.agc=0.3;train.agc=0.1"], "set twice"),
        (["a:train.batch_size=4"], "also given by --grid or --set"),
        (["a:general.seed=3"], "seeds come from --seeds"),
    ],
)
def test_bad_arms_are_refused_before_any_run(arms, words):
    with pytest.raises(SweepError, match=words):
        build_plan("configs/tiny.toml", ["train.batch_size=2,4"], 1, None, [], arms)


def test_a_seed_only_sweep_needs_no_grid():
    plan = build_plan("configs/tiny.toml", [], seeds=3, max_steps=None, overrides=[])
    assert [r.name for r in plan.runs] == ["seed=0", "seed=1", "seed=2"]


def test_population_packs_runs_that_share_shapes_and_keeps_each_runs_config():
    plan = build_plan(
        "configs/tiny.toml",
        ["train.actor_lr=1e-4,3e-4", "train.batch_size=2,4"],
        seeds=2,
        max_steps=3,
        overrides=["train.gamma=0.98"],
        population=4,
    )
    # batch_size changes shapes: two populations (one per batch size), each holding both
    # learning rates x both seeds; gamma is the same for all, so it is no grid key.
    assert sorted(plan.packs) == ["population_00", "population_01"]
    assert plan.identity()["population"] == 4
    by_job = {}
    for run in plan.runs:
        by_job.setdefault(run.job, []).append(run)
    for name, runs in by_job.items():
        cfg = plan.packs[name]
        assert cfg.population.size == 4 and [r.member for r in runs] == [0, 1, 2, 3]
        assert {r.settings["train.batch_size"] for r in runs} == {str(cfg.train.batch_size)}
        assert cfg.population.grid == {
            "general.seed": [r.seed for r in runs],
            "train.actor_lr": [float(r.settings["train.actor_lr"]) for r in runs],
        }
        assert cfg.train.gamma == 0.98 and cfg.train.max_train_steps == 3
    # Without --population nothing is packed and the identity is as before.
    plain = build_plan("configs/tiny.toml", ["train.actor_lr=1e-4,3e-4"], 2, None, [])
    assert not plain.packs and all(r.job is None for r in plain.runs)
    assert "population" not in plain.identity()


def test_arms_differing_in_the_official_switches_pack_into_one_population():
    """README's ablation (benchmarks/ablation_official.sh) with --population: every arm's keys
    are member settings or switches, so all its arms train as one population."""
    arms = [
        "base:models.twohot_space=symlog;train.optimizer=adam;train.replay_context=false",
        "real:models.twohot_space=real;train.optimizer=adam;train.replay_context=false",
        "opt:models.twohot_space=symlog;train.optimizer=laprop;train.replay_context=false",
        "ctx:models.twohot_space=symlog;train.optimizer=adam;train.replay_context=true",
    ]
    plan = build_plan("configs/tiny.toml", [], 1, None, [], arm_specs=arms, population=4)
    assert list(plan.packs) == ["population_00"]
    grid = plan.packs["population_00"].population.grid
    assert grid["models.twohot_space"] == ["symlog", "real", "symlog", "symlog"]
    assert grid["train.optimizer"] == ["adam", "adam", "laprop", "adam"]
    assert grid["train.replay_context"] == [False, False, False, True]


def test_first_seed_adds_seeds_to_a_study_in_another_directory():
    """--first-seed S: seeds S..S+N-1, named and set as such, packed like any seeds, and part of
    the identity (a directory of seeds 0.. is not continued by it); 0 leaves the identity as
    before, so older sweep directories still continue."""
    arms = ["a:train.gamma=0.99", "b:train.gamma=0.95"]
    plan = build_plan("configs/tiny.toml", [], 2, 3, [], arms, population=4, first_seed=1)
    assert [r.name for r in plan.runs] == [
        "arm=a,seed=1",
        "arm=a,seed=2",
        "arm=b,seed=1",
        "arm=b,seed=2",
    ]
    assert [r.overrides[-1] for r in plan.runs] == [f"general.seed={s}" for s in (1, 2, 1, 2)]
    assert plan.packs["population_00"].population.grid["general.seed"] == [1, 2, 1, 2]
    assert plan.identity()["first_seed"] == 1
    assert "first_seed" not in build_plan("configs/tiny.toml", [], 2, 3, [], arms).identity()
    assert _seed_range(plan.identity()) == "1..2"  # how summary.md names them
    with pytest.raises(SweepError, match="--first-seed -1: must be >= 0"):
        build_plan("configs/tiny.toml", [], 2, 3, [], first_seed=-1)


def test_population_packs_in_chunks_and_a_lone_run_stays_plain():
    plan = build_plan("configs/tiny.toml", [], seeds=5, max_steps=None, overrides=[], population=2)
    assert [(r.job, r.member) for r in plan.runs] == [
        ("population_00", 0),
        ("population_00", 1),
        ("population_01", 0),
        ("population_01", 1),
        (None, None),
    ]
    assert plan.packs["population_01"].population.grid == {"general.seed": [2, 3]}


@pytest.mark.parametrize(
    "population, overrides, words",
    [
        (0, [], "--population 0: must be >= 1"),
        (2, ["population.size=2"], "is itself a population"),
    ],
)
def test_bad_population_packing_is_refused(population, overrides, words):
    with pytest.raises(SweepError, match=words):
        build_plan("configs/tiny.toml", [], 2, None, overrides, population=population)


def test_short_keys_lengthen_only_where_leaves_collide():
    keys = ["a.b.x", "c.d.x", "e.y", "general.seed"]
    assert short_keys(keys) == {"a.b.x": "b.x", "c.d.x": "d.x", "e.y": "y", "general.seed": "seed"}
    assert short_keys(["env.name", "name"]) == {"env.name": "env.name", "name": "name"}


def test_run_names_are_filesystem_safe_and_unique():
    combos = [
        ({"env.name": '"a b"'}, 0),
        ({"env.name": "a_b"}, 0),  # cleans to the same text as the first
        ({"env.name": "../up/and/away"}, 0),
        ({"env.name": "x" * 400}, 0),
    ]
    names = run_names(["env.name"], combos)
    assert len(set(names)) == len(names)
    for name in names:
        assert "/" not in name and '"' not in name and " " not in name
        assert len(name) <= MAX_NAME + 9
    assert names[0].startswith("name=a_b,seed=0~") and names[1].startswith("name=a_b,seed=0~")
    assert names[2] == "name=.._up_and_away,seed=0"


def test_summary_takes_final_best_and_mean_std_over_seeds(tmp_path, monkeypatch):
    lines = {
        0: [
            dict(type="train", step=2, env_steps=40, wm_loss=5.0, train_steps_per_sec=2.0),
            dict(type="eval", step=2, env_steps=40, eval_return=10.0),
            dict(type="train", step=4, env_steps=80, wm_loss=3.0, train_steps_per_sec=4.0),
            dict(type="train", step=6, env_steps=96, wm_loss=4.0, train_steps_per_sec=6.0),
            dict(type="eval", step=6, env_steps=96, eval_return=8.0),
        ],
        1: [
            dict(type="train", step=6, env_steps=96, wm_loss=2.0, train_steps_per_sec=4.0),
            dict(type="eval", step=6, env_steps=96, eval_return=12.0),
            dict(type="early_stop", step=6),
        ],
    }
    records = []
    for seed, recs in lines.items():
        name = f"batch_size=4,seed={seed}"
        (tmp_path / name).mkdir()
        text = "\n".join(json.dumps(r) for r in recs) + "\n{truncated"
        (tmp_path / name / "metrics.jsonl").write_text(text)
        task = "CartPole-v1" if seed == 0 else "LunarLander-v3"
        (tmp_path / name / "config.toml").write_text(f'[env]\nname = "{task}"\n')
        records.append(
            RunRecord(name, {"train.batch_size": "4"}, seed, [], status="done", wall_time=3.0)
        )
    identity = dict(
        config="c.toml", grid=[["train.batch_size", ["4"]]], seeds=2, max_steps=6, overrides=[]
    )
    csv_text, md = summarize(tmp_path, SweepState(identity, records))
    rows = list(csv.DictReader(csv_text.splitlines()))
    a, b = rows
    assert (a["final_wm_loss"], a["best_wm_loss"]) == ("4.0", "3.0")
    assert (a["final_eval_return"], a["best_eval_return"]) == ("8.0", "10.0")
    assert a["last5_eval_return"] == "9.0" and a["first_solved_step"] == ""  # CartPole: 450
    assert (a["train_steps"], a["env_steps"], a["train_steps_per_sec"]) == ("6", "96", "4.0")
    assert a["status"] == "done" and b["status"] == "done, early stop at step 6"
    assert "final_image_loss" not in a  # not logged by any run
    assert a["checkpoint_bytes"] == ""
    # Over seeds: final eval 8 and 12 -> 10 +- 2.83; final wm_loss 4 and 2 -> 3 +- 1.41.
    assert "| 4 | 2/2 | 0/2 | 10 ± 2.83 | 10.5 ± 2.12 | 11 ± 1.41 | - | 3 ± 1.41 | 4 ± 0 |" in md
    # A LunarLander run is solved at 200: seed 1 with a target of 10 instead.
    monkeypatch.setitem(sweep_module.TASK_TARGETS, "LunarLander-v3", 10.0)
    csv_text, md = summarize(tmp_path, SweepState(identity, records))
    assert list(csv.DictReader(csv_text.splitlines()))[1]["first_solved_step"] == "6"
    assert "| 4 | 2/2 | 1/2 |" in md


# ---- Input errors: one line, exit 2, nothing started ----------------------------------------


@pytest.mark.parametrize(
    "args, words",
    [
        (["--grid", "train.bogus=1,2"], ["--grid train.bogus=1,2", "unknown key 'train.bogus'"]),
        (["--grid", "train.batch_size=8,eight"], ["train.batch_size", "must be int"]),
        (["--grid", "train.batch_size=8,0"], ["train.batch_size=0", "must be >= 1"]),
        (["--grid", "models.d_hidden=16,12"], ["models.d_hidden", "multiple of 8"]),
        (["--grid", "train.batch_size"], ["expected KEY=VALUE"]),
        (["--grid", "train.batch_size=8,8"], ["listed twice"]),
        (["--grid", "general.seed=1,2"], ["--seeds"]),
        (["--grid", "train.max_train_steps=2,4", "--max-steps", "3"], ["--max-steps"]),
        (["--set", "train.batch_size=2", "--grid", "train.batch_size=2,4"], ["--set"]),
        (["--set", "train.nope=1"], ["unknown key 'train.nope'"]),
        (["--seeds", "0"], ["--seeds"]),
        (["--parallel", "0"], ["--parallel"]),
        (["--parallel", "two"], ["--parallel"]),
        (["--stop-grace", "-1"], ["--stop-grace -1.0", ">= 0"]),
        (["--stop-grace", "nan"], ["--stop-grace nan"]),
    ],
)
def test_bad_input_exits_2_with_one_line_before_any_run(tmp_path, args, words):
    out = tmp_path / "s"
    res = sweep("--config", "configs/tiny.toml", "--out", out, *args)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    for w in words:
        assert w in lines[0]
    assert not out.exists()


def test_missing_config_and_foreign_out_dir_are_refused(tmp_path):
    res = sweep("--config", "configs/nope.toml", "--out", tmp_path / "s")
    assert res.returncode == 2 and "file not found" in res.stderr
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    res = sweep(*FAST, "--out", tmp_path / "busy")
    assert res.returncode == 2 and "holds no sweep.json" in res.stderr


# ---- Real sweeps of tiny runs ---------------------------------------------------------------


def _max_overlap(recs):
    spans = [
        (datetime.fromisoformat(r["started"]), datetime.fromisoformat(r["finished"])) for r in recs
    ]
    return max(sum(s <= t < e for s, e in spans) for t, _ in spans)


def test_sweep_in_parallel_then_resume_only_what_is_unfinished(tmp_path):
    out = tmp_path / "s"
    args = [*FAST, "--grid", "train.batch_size=2,4", "--seeds", "2", "--max-steps", "2"]
    args += ["--parallel", "2", "--out", out]
    res = sweep(*args)
    assert res.returncode == 0, res.stderr
    names = [f"batch_size={b},seed={s}" for b in (2, 4) for s in (0, 1)]
    first = runs(out)
    assert list(first) == names
    for name, r in first.items():
        assert (r["status"], r["exit_code"], r["attempts"]) == ("done", 0, 1), r
        assert (out / "logs" / f"{name}.log").is_file()
        cfg = (out / name / "config.toml").read_text()
        assert f"batch_size = {name[11]}" in cfg and f"seed = {name[-1]}" in cfg
    assert _max_overlap(first.values()) == 2  # two at a time, never more

    rows = csv_rows(out)
    assert list(rows) == names
    for name, row in rows.items():
        assert row["status"] == "done" and row["train_steps"] == "2"
        assert math.isfinite(float(row["final_wm_loss"])) and row["best_wm_loss"]
        assert row["final_eval_return"] and float(row["train_steps_per_sec"]) > 0
        size = (out / name / "checkpoints" / "latest.pt").stat().st_size
        assert int(row["checkpoint_bytes"]) == size
    md = (out / "summary.md").read_text()
    assert "| 2 | 2/2 |" in md and "| 4 | 2/2 |" in md and "| 2 | 1 | done |" in md
    assert "## Over seeds" in res.stdout and "| 4 | 1 | done |" in res.stdout

    # Half-finished: one run interrupted (it has a checkpoint: resumed), one failed (its
    # directory is moved aside and it starts again); the other two must not run.
    doc = state(out)
    for r in doc["runs"]:
        if r["name"] == "batch_size=2,seed=1":
            r["status"] = "interrupted"
        if r["name"] == "batch_size=4,seed=0":
            r["status"], r["exit_code"], r["error"] = "failed", 3, "error: boom"
    (out / "sweep.json").write_text(json.dumps(doc))
    with open(out / "batch_size=4,seed=1" / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"type": "early_stop", "step": 2}) + "\n")
    untouched = ["batch_size=2,seed=0", "batch_size=4,seed=1"]
    mtimes = {n: (out / "logs" / f"{n}.log").stat().st_mtime_ns for n in untouched}

    res = sweep(*args)
    assert res.returncode == 0, res.stderr
    second = runs(out)
    assert all(r["status"] == "done" for r in second.values())
    resumed, restarted = second["batch_size=2,seed=1"], second["batch_size=4,seed=0"]
    assert resumed["attempts"] == 2 and resumed["resumed"] is True
    assert "resumed" in (out / "logs" / "batch_size=2,seed=1.log").read_text()
    assert restarted["attempts"] == 2 and restarted["resumed"] is False
    assert restarted["error"] is None and restarted["exit_code"] == 0
    assert (out / "aside" / "batch_size=4,seed=0.1" / "metrics.jsonl").is_file()
    for n in untouched:
        assert second[n] == first[n]
        assert (out / "logs" / f"{n}.log").stat().st_mtime_ns == mtimes[n]
    assert csv_rows(out)["batch_size=4,seed=1"]["status"] == "done, early stop at step 2"

    # Same --out, different grid: refused, nothing touched.
    res = sweep(
        *FAST, "--grid", "train.batch_size=2,8", "--seeds", "2", "--max-steps", "2", "--out", out
    )
    assert res.returncode == 2 and "holds a different sweep (grid" in res.stderr
    assert runs(out) == second


def test_a_failing_run_is_recorded_and_the_others_finish(tmp_path):
    # image_scale 1e308 passes validation (finite, >= 0) but makes the first losses infinite,
    # so that run stops with a one-line error; it goes first, the other must still run.
    out = tmp_path / "s"
    res = sweep(*FAST, "--grid", "train.image_scale=1e308,1", "--max-steps", "2", "--out", out)
    assert res.returncode == 1, res.stderr
    recs = runs(out)
    bad, good = recs["image_scale=1e308,seed=0"], recs["image_scale=1,seed=0"]
    assert bad["status"] == "failed" and bad["exit_code"] not in (0, None)
    assert bad["error"].startswith("error: ") and "non-finite" in bad["error"]
    assert good["status"] == "done" and good["exit_code"] == 0
    assert "1 of 2 runs failed" in res.stderr
    with open(out / "summary.csv", newline="") as f:
        rows = {r["image_scale"]: r for r in csv.DictReader(f)}
    assert rows["1e308"]["status"] == "failed" and rows["1"]["status"] == "done"
    assert rows["1"]["final_wm_loss"] and not rows["1e308"]["final_wm_loss"]


def test_population_sweep_trains_packed_runs_in_one_process_and_resumes(tmp_path):
    out = tmp_path / "s"
    args = [*FAST, "--grid", "train.actor_lr=1e-4,3e-4", "--seeds", "2", "--max-steps", "2"]
    args += ["--population", "4", "--out", out]
    res = sweep(*args)
    assert res.returncode == 0, res.stderr
    assert "4 runs, 0 done already, 4 to run as 1 processes (1 populations)" in res.stderr
    recs = runs(out)
    assert [r["member"] for r in recs.values()] == [0, 1, 2, 3]
    assert {r["job"] for r in recs.values()} == {"population_00"}
    assert all(r["status"] == "done" and r["exit_code"] == 0 for r in recs.values())
    assert (out / "population_00" / "population.csv").is_file()
    assert (out / "logs" / "population_00.log").is_file()
    for name, r in recs.items():
        link = out / name
        assert (
            link.is_symlink()
            and link.resolve() == (out / "population_00" / f"member_{r['member']:02d}").resolve()
        )
        cfg = tomllib.loads((link / "config.toml").read_text())
        assert cfg["general"]["seed"] == r["seed"] and cfg["population"]["size"] == 1
        assert cfg["train"]["actor_lr"] == float(r["settings"]["train.actor_lr"])
    with open(out / "summary.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["actor_lr"], r["seed"], r["status"]) for r in rows] == [
        ("1e-4", "0", "done"),
        ("1e-4", "1", "done"),
        ("3e-4", "0", "done"),
        ("3e-4", "1", "done"),
    ]
    assert all(r["train_steps"] == "2" and r["final_wm_loss"] for r in rows)

    # Interrupted: the population resumes as a whole from population.pt.
    doc = state(out)
    doc["runs"][2]["status"] = "interrupted"
    (out / "sweep.json").write_text(json.dumps(doc))
    res = sweep(*args)
    assert res.returncode == 0, res.stderr
    assert "resume population_00 (4 runs as one population)" in res.stderr
    assert all(r["status"] == "done" and r["attempts"] == 2 for r in runs(out).values())
    assert "resumed" in (out / "logs" / "population_00.log").read_text()


def _train_logged(run_dir):
    path = run_dir / "metrics.jsonl"
    return path.exists() and '"type": "train"' in path.read_text()


@pytest.mark.parametrize("ignores_sigterm, grace", [(True, 0.5), (False, 30.0)])
def test_stop_grace_bounds_the_wait_for_a_child_that_ignores_sigterm(
    tmp_path, ignores_sigterm, grace
):
    """A child that does not exit on SIGTERM is killed once --stop-grace has passed, not
    before; one that exits on SIGTERM is never waited on for the whole grace."""
    ignore = "import signal; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
    code = (ignore if ignores_sigterm else "") + "import time; print('ready', flush=True); "
    code += "time.sleep(120)"
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"  # its handler is installed
    child = sweep_module.Child("run", [], proc, None, [""], time.monotonic())
    sweeper = sweep_module.Sweeper(tmp_path, None, None, 1, stop_grace=grace)
    sweeper.running = {"run": child}
    finished = []
    sweeper.finish = lambda c, stopping: finished.append((c.name, stopping))
    t0 = time.monotonic()
    try:
        sweeper.stop_all()
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stdout.close()
    waited = time.monotonic() - t0
    if ignores_sigterm:  # killed after the grace
        assert proc.returncode == -signal.SIGKILL and grace <= waited < grace + 10, waited
    else:  # exited on SIGTERM at once, long before the grace
        assert proc.returncode == -signal.SIGTERM and waited < grace / 2, waited
    assert finished == [("run", True)]


def test_sigterm_stops_the_runs_with_checkpoints_and_exits_130(tmp_path):
    out = tmp_path / "s"
    cmd = [sys.executable, "-m", "engine.sweep", *FAST, "--seeds", "2", "--parallel", "2"]
    cmd += ["--max-steps", "100000", "--set", "log.log_every=2", "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.time() + 120
        dirs = [out / "seed=0", out / "seed=1"]
        while time.time() < deadline and not all(_train_logged(d) for d in dirs):
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
            for name, r in runs(out).items():  # the runs live in their own sessions
                if r["pid"] and _still_running(r["pid"], (out / name).resolve()):
                    os.kill(r["pid"], signal.SIGKILL)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "interrupted (SIGTERM)" in err
    for name, r in runs(out).items():
        assert (r["status"], r["exit_code"], r["pid"]) == ("interrupted", 130, None), r
        assert (out / name / "checkpoints" / "latest.pt").is_file()
    assert "interrupted" in (out / "summary.md").read_text()
