"""Searches on existing engines (engine.search): an Optuna study shared by two workers through a
journal file, Optuna's grid sampler for --grid/--seeds, a submitit job array on the local
executor, requeue through --resume, and bad input."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from engine.search import RunJob

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow
optuna = pytest.importorskip("optuna")

SPACE = """
[study]
objective = "eval_return"
trials = 8
pruner = "percentile"      # prune below the 90th percentile: most trials after the first two
pruner_percentile = 90
pruner_startup_trials = 2

[space]
"train.actor_lr" = { low = 1e-5, high = 1e-3, log = true }
"train.gamma" = { choices = [0.99, 0.997] }
"""


def sweep(*args: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "engine.sweep", "--config", "configs/tiny.toml", *args]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)  # fmt: skip


def study_of(out: Path):
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    storage = JournalStorage(JournalFileBackend(str(out / "journal.log")))
    return optuna.load_study(study_name=out.name, storage=storage)


def test_two_optuna_workers_share_one_study_of_8_trials(tmp_path):
    space = tmp_path / "space.toml"
    space.write_text(SPACE)
    out = tmp_path / "study"
    args = ["--backend", "optuna", "--search", str(space), "--max-steps", "36", "--out", str(out)]
    workers = [sweep(*args) for _ in range(2)]
    for w in workers:
        stdout, stderr = w.communicate(timeout=900)
        assert w.returncode == 0, stderr[-2000:]
    trials = study_of(out).get_trials()
    states = [t.state.name for t in trials]
    assert len(trials) == 8, states  # both workers together, none over
    assert states.count("PRUNED") >= 1 and states.count("COMPLETE") >= 2, states
    # Each trial ran as its own engine.run with its drawn settings, and the summary lists all.
    for t in trials:
        cfg = (out / t.user_attrs["run_dir"] / "config.toml").read_text()
        assert f"gamma = {t.params['train.gamma']}" in cfg
    md = (out / "summary.md").read_text()
    assert "8 trials" in md and md.count("| pruned |") == states.count("PRUNED")
    assert (out / "summary.csv").read_text().count("\n") == 9


def test_optuna_grid_and_seeds_become_a_grid_sampler(tmp_path):
    out = tmp_path / "grid"
    args = ["--backend", "optuna", "--grid", "train.actor_lr=1e-4,3e-4", "--seeds", "2",
            "--max-steps", "6", "--out", str(out)]  # fmt: skip
    for p in [sweep(*args) for _ in range(2)]:  # two workers split the grid
        stdout, stderr = p.communicate(timeout=600)
        assert p.returncode == 0, stderr[-2000:]
    trials = study_of(out).get_trials()
    combos = [(t.params["train.actor_lr"], t.params["general.seed"]) for t in trials]
    assert len(combos) == 4 and set(combos) == {
        (lr, s) for lr in ("1e-4", "3e-4") for s in ("0", "1")
    }


def test_submitit_runs_the_grid_as_a_local_job_array(tmp_path):
    pytest.importorskip("submitit")
    out = tmp_path / "array"
    p = sweep("--backend", "submitit", "--cluster", "local", "--seeds", "4", "--parallel", "2",
              "--max-steps", "6", "--out", str(out))  # fmt: skip
    stdout, stderr = p.communicate(timeout=900)
    assert p.returncode == 0, stderr[-2000:]
    assert "submitted 4 runs as job array" in stdout
    md = (out / "summary.md").read_text()
    assert "4 done" in md and "| 4/4 |" in md
    for seed in range(4):
        assert (out / f"seed={seed}" / "checkpoints" / "latest.pt").is_file()


def test_a_requeued_job_resumes_its_run(tmp_path):
    run = tmp_path / "run"
    first = subprocess.run(
        [sys.executable, "-m", "engine.run", "--config", "configs/tiny.toml", "--run-dir",
         str(run), "--set", "train.max_train_steps=6"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert first.returncode == 0, first.stderr
    job = RunJob()
    assert job(str(run), str(ROOT / "configs/tiny.toml"), ["train.max_train_steps=12"]) == 0
    assert "resumed" in (run / "stdout.log").read_text()
    assert '"step": 12' in (run / "metrics.jsonl").read_text()
    # Preemption: the running child is stopped (SIGTERM) and the same job comes back.
    job.child = subprocess.Popen(["sleep", "60"])
    again = job.checkpoint(str(run), "c.toml", [])
    assert job.child.returncode is not None
    assert again.args == (str(run), "c.toml", [])


@pytest.mark.parametrize(
    "args, message",
    [
        (["--trials", "3"], "--trials belongs to --backend optuna"),
        (["--backend", "optuna", "--search", "nope.toml"], "nope.toml: no such file"),
        (["--backend", "submitit", "--population", "2", "--seeds", "2"], "local-only"),
        (["--backend", "optuna", "--stop-grace", "600"], "local-only"),
        (["--cluster", "local"], "belong to --backend submitit"),
        (["--backend", "optuna", "--first-seed", "2"], "--first-seed: not for --backend optuna"),
    ],
)
def test_bad_search_input_is_one_line_and_exit_2(tmp_path, args, message):
    p = sweep(*args, "--out", str(tmp_path / "x"))
    _, stderr = p.communicate(timeout=120)
    assert p.returncode == 2
    assert stderr.strip().count("\n") == 0 and message in stderr, stderr


def test_a_space_key_that_is_not_a_config_key_is_refused(tmp_path):
    space = tmp_path / "space.toml"
    space.write_text('[space]\n"train.no_such" = { low = 1, high = 2 }\n')
    p = sweep("--backend", "optuna", "--search", str(space), "--trials", "1",
              "--out", str(tmp_path / "s"))  # fmt: skip
    _, stderr = p.communicate(timeout=120)
    assert p.returncode == 2 and "train.no_such" in stderr and stderr.count("\n") == 1, stderr


def test_the_shipped_search_space_is_valid():
    from engine.search import check_space, load_search

    space, study = load_search(str(ROOT / "configs/search/tiny.toml"))
    assert study["trials"] == 8 and "train.actor_lr" in space
    check_space(str(ROOT / "configs/tiny.toml"), space, [])
