"""The real command line, end to end, on the tiny config."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.helpers import kill_when, run_until_killed

ROOT = Path(__file__).resolve().parent.parent
TRAIN_KEYS = (
    "step",
    "env_steps",
    "wm_loss",
    "image_loss",
    "vector_loss",
    "reward_loss",
    "continue_loss",
    "kl_dyn",
    "kl_rep",
    "actor_loss",
    "actor_entropy",
    "critic_loss",
    "dream_reward",
    "dream_value",
    "train_steps_per_sec",
    "reward_loss_excess",
)
TIMING = ("train_steps_per_sec", "env_steps_per_sec", "wall_time")


def run(*args, timeout=300):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "engine.run", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def spawn(run_dir, *overrides, **popen):
    """Start a tiny training run in the background (to be killed)."""
    sets = [x for o in overrides for x in ("--set", o)]
    cmd = [sys.executable, "-m", "engine.run", "--config", "configs/tiny.toml"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(cmd + ["--run-dir", str(run_dir), *sets], cwd=ROOT, env=env, **popen)


def records(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def test_tiny_run_end_to_end(tmp_path):
    out = run("--config", "configs/tiny.toml", "--run-dir", str(tmp_path / "r"))
    assert out.returncode == 0, out.stderr
    assert "parameters: " in out.stderr and "done: 12 updates" in out.stdout
    rd = tmp_path / "r"
    assert (rd / "config.toml").is_file()
    assert (rd / "checkpoints" / "latest.pt").is_file() and (
        rd / "checkpoints" / "best.pt"
    ).is_file()
    recs = records(rd)
    train = [r for r in recs if r["type"] == "train"]
    assert [r["step"] for r in train] == [4, 8, 12]
    for key in TRAIN_KEYS:
        assert key in train[-1] and train[-1][key] is not None, key
    assert train[0]["actor_loss"] is None  # still in actor warm-up at step 4
    assert any(r["type"] == "episode" and r["episode_return"] > 0 for r in recs)
    evals = [r for r in recs if r["type"] == "eval"]
    assert [r["step"] for r in evals] == [6, 12] and len(evals[0]["eval_returns"]) == 2


def test_same_seed_same_run_on_cpu_with_or_without_overlapped_collection(tmp_path):
    # Stepping the envs in a background thread while the learner updates changes no data.
    a = run("--config", "configs/tiny.toml", "--run-dir", str(tmp_path / "a"))
    b = run(
        "--config",
        "configs/tiny.toml",
        "--run-dir",
        str(tmp_path / "b"),
        "--set",
        "train.async_collection=false",
    )
    assert a.returncode == 0 and b.returncode == 0
    strip = lambda rs: [{k: v for k, v in r.items() if k not in TIMING} for r in rs]
    assert strip(records(tmp_path / "a")) == strip(records(tmp_path / "b"))


def test_archive_json_config_runs_as_is(tmp_path):
    # The archive's own file (d_hidden 256, device "cuda"); only the run length is cut short.
    out = run(
        "--config",
        "configs/archive_recommended.json",
        "--run-dir",
        str(tmp_path / "j"),
        "--set",
        "train.bootstrap_steps=40",
        "--set",
        "train.max_train_steps=2",
        "--set",
        "env.num_envs=2",
        "--set",
        "log.eval_every=0",
        "--set",
        "log.log_every=1",
    )
    assert out.returncode == 0, out.stderr
    assert "parameters: 15," in out.stderr  # d256: the size12m-like model
    if not torch.cuda.is_available():
        assert "no CUDA device found, training on the CPU" in out.stderr
    assert [r["step"] for r in records(tmp_path / "j") if r["type"] == "train"] == [1, 2]


@pytest.mark.parametrize(
    "args, words",
    [
        (["--config", "configs/nope.toml"], ["configs/nope.toml", "file not found"]),
        (["--config", "configs/tiny.toml", "--set", "train.batch_size=0"], ["train.batch_size"]),
        (["--config", "configs/tiny.toml", "--set", "train.gamma=1.5"], ["train.gamma"]),
        (["--config", "configs/tiny.toml", "--set", "train.bogus=3"], ["unknown key"]),
        (["--config", "configs/tiny.toml", "--set", "env.name=Pong-v5"], ["env.name"]),
        (["--resume", "/nonexistent/run"], ["not a run directory"]),
    ],
)
def test_bad_input_exits_2_with_one_line(args, words):
    out = run(*args)
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    for w in words:
        assert w in lines[0]


def test_resume_continues_steps_and_metrics(tmp_path):
    rd = tmp_path / "r"
    assert run("--config", "configs/tiny.toml", "--run-dir", str(rd)).returncode == 0
    out = run("--resume", str(rd), "--set", "train.max_train_steps=20")
    assert out.returncode == 0, out.stderr
    assert "resumed" in out.stderr and "done: 20 updates" in out.stdout
    steps = [r["step"] for r in records(rd) if r["type"] == "train"]
    assert steps == [4, 8, 12, 16, 20]
    assert "max_train_steps = 20" in (rd / "config.toml").read_text()
    env_steps = [r["env_steps"] for r in records(rd)]
    assert env_steps == sorted(env_steps)
    ck = torch.load(rd / "checkpoints" / "latest.pt", weights_only=False)
    assert ck["counters"]["step"] == 20


def test_a_killed_run_resumes_from_its_last_checkpoint(tmp_path):
    rd = tmp_path / "r"
    proc = spawn(
        rd,
        "train.max_train_steps=100000",
        "log.checkpoint_every=10",
        "log.log_every=2",
        "log.eval_every=0",
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    ckpt = rd / "checkpoints" / "latest.pt"
    deadline = time.time() + 120
    # Killed once a line past a checkpoint is logged (not at a multiple of 10): killed right
    # after the checkpoint at 30 was written, the run had logged nothing past it (a flake).
    while time.time() < deadline and not (
        ckpt.exists() and _train_steps(rd) >= 24 and _train_steps(rd) % 10
    ):
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    counters = torch.load(ckpt, weights_only=False)["counters"]
    saved = counters["step"]
    assert saved >= 10 and saved % 10 == 0
    assert max(_train_steps_list(rd)) > saved  # lines past the checkpoint were logged, then lost
    # A periodic checkpoint carries the time trained so far (the line at its step is logged
    # just before it is written), so the resumed run's time axis goes on from there.
    logged = {r["step"]: r["wall_time"] for r in records(rd) if r["type"] == "train"}
    assert counters["wall_time"] >= logged[saved] > 0
    out = run("--resume", str(rd), "--set", f"train.max_train_steps={saved + 6}")
    assert out.returncode == 0, out.stderr
    steps = _train_steps_list(rd)
    assert steps == sorted(set(steps)) and steps[-1] == saved + 6  # no step logged twice
    walls = [r["wall_time"] for r in records(rd) if r["type"] == "train"]
    assert walls == sorted(walls) and walls[-1] > counters["wall_time"]


def _train_steps_list(rd):
    path = rd / "metrics.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            continue
        if r["type"] == "train":
            out.append(r["step"])
    return out


def _train_steps(rd):
    steps = _train_steps_list(rd)
    return steps[-1] if steps else 0


def test_sigterm_writes_a_checkpoint_and_exits_130(tmp_path):
    rd = tmp_path / "r"
    proc = spawn(
        rd,
        "train.max_train_steps=100000",
        "log.checkpoint_every=100000",
        "log.eval_every=0",
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 120
    while time.time() < deadline and _train_steps(rd) < 8:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert f"continue with: python -m engine.run --resume {rd}" in err and "Traceback" not in err
    assert torch.load(rd / "checkpoints" / "latest.pt", weights_only=False)["counters"]["step"] >= 8


def test_the_resume_hint_under_torchrun_keeps_the_world_size(monkeypatch):
    from engine.run import _resume_command

    for key in ("WORLD_SIZE", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    assert _resume_command(Path("runs/a")) == "python -m engine.run --resume runs/a"
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert _resume_command(Path("runs/a")) == (
        "python -m engine.launch --standalone --nproc_per_node 2 -m engine.run --resume runs/a"
    )
    monkeypatch.setenv("WORLD_SIZE", "16")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    same = "torchrun (the same 16 ranks) -m engine.run --resume runs/a"
    assert _resume_command(Path("runs/a")) == same


@pytest.mark.parametrize(
    "codes, want",
    [
        ([130, 130], (130, None)),  # a stop on request: the ranks said so
        ([4, 130], (4, None)),
        ([2], (2, None)),
        ([130, -9], (137, 1)),  # rank 1 killed: that is the line to print
        ([1, 4], (1, 0)),  # a crash
        ([-15], (143, 0)),
        ([-15, 2], (2, None)),  # rank 1's bad input; torchrun then stopped rank 0
        ([-15, -9], (137, 1)),
    ],
)
def test_a_launched_jobs_status_is_its_ranks_own(codes, want):
    from engine.launch import job_status

    assert job_status(codes) == want


def test_engine_launch_gives_the_ranks_time_to_write_their_checkpoint(monkeypatch):
    """torchrun SIGKILLs its ranks 30 s after a stop by default; engine.launch makes torchrun's
    own config carry SHUTDOWN_GRACE_S, unless --shutdown-timeout or the env var says otherwise."""
    import torch.distributed.run as torchrun

    from engine import launch

    seen = []

    def fake_torchrun(args):
        config, _, _ = torchrun.config_from_args(torchrun.parse_args(args))
        seen.append(config.shutdown_timeout)

    monkeypatch.setattr(torchrun, "main", fake_torchrun)
    job = ["--standalone", "--nproc_per_node", "2", "-m", "engine.run", "--resume", "runs/a"]
    for env, flags in (({}, []), ({}, ["--shutdown-timeout", "45"]),
                       ({"TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "60"}, [])):  # fmt: skip
        monkeypatch.setattr(os, "environ", dict(env))
        launch.main([*flags, *job])
    assert seen == [launch.SHUTDOWN_GRACE_S, 45, 60] and launch.SHUTDOWN_GRACE_S > 30


def test_existing_run_dir_is_not_overwritten(tmp_path):
    rd = tmp_path / "r"
    assert run("--config", "configs/tiny.toml", "--run-dir", str(rd)).returncode == 0
    out = run("--config", "configs/tiny.toml", "--run-dir", str(rd))
    assert out.returncode == 2 and "--resume" in out.stderr


def test_resume_with_the_checkpointed_replay_continues_without_refilling(tmp_path):
    # tiny: 4 envs, 1 env step per update, bootstrap_steps 64; 12 updates then 8 more.
    rd, plain = tmp_path / "r", tmp_path / "plain"
    for d in (rd, plain):
        out = run(
            "--config",
            "configs/tiny.toml",
            "--run-dir",
            str(d),
            "--set",
            f"log.checkpoint_replay={'true' if d == rd else 'false'}",
        )
        assert out.returncode == 0, out.stderr
    assert not (plain / "checkpoints" / "replay.pt").exists()

    def counters(d):
        return torch.load(d / "checkpoints" / "latest.pt", weights_only=False)["counters"]

    saved = torch.load(rd / "checkpoints" / "replay.pt", weights_only=True)
    env_steps = counters(rd)["env_steps"]
    assert saved["step"] == 12 and saved["count"] * 4 == env_steps
    assert saved["data"]["is_first"][0].all()  # row 0: the first step of every env

    kept = tmp_path / "replay_at_12.pt"
    kept.write_bytes((rd / "checkpoints" / "replay.pt").read_bytes())
    out = run("--resume", str(rd), "--set", "train.max_train_steps=20")
    assert out.returncode == 0, out.stderr
    assert f"restored the replay: {env_steps:,} env steps" in out.stderr
    after = counters(rd)
    assert after["step"] == 20 and after["env_steps"] - env_steps < 64  # no refill
    assert torch.load(rd / "checkpoints" / "replay.pt", weights_only=True)["step"] == 20

    out = run("--resume", str(plain), "--set", "train.max_train_steps=20")
    plain_after = counters(plain)
    assert "restored the replay" not in out.stderr
    assert plain_after["env_steps"] - env_steps >= 64  # refilled bootstrap_steps first

    # A replay.pt left from another checkpoint, or one that does not fit, is not used.
    (rd / "checkpoints" / "replay.pt").write_bytes(kept.read_bytes())
    out = run("--resume", str(rd), "--set", "train.max_train_steps=24")
    assert out.returncode == 0, out.stderr
    stale = (
        f"notice: replay.pt holds update 12 (env step {env_steps}), the checkpoint 20 "
        f"({after['env_steps']}): refilling the replay"
    )
    assert stale in out.stderr
    resize = ("--set", "train.max_train_steps=28", "--set", "train.replay_buffer_size=2048")
    out = run("--resume", str(rd), *resize)
    assert out.returncode == 0, out.stderr
    assert "notice: replay.pt does not fit this replay (slots 256 != 512)" in out.stderr


@pytest.mark.parametrize("killed", ["before latest.pt", "before the replay's rename"])
def test_a_run_killed_while_checkpointing_keeps_the_replay_of_the_step_it_resumes(
    tmp_path, monkeypatch, killed
):
    """replay.pt.next is written, then latest.pt, then the replay renamed: a kill (an exception
    out of the save) before latest.pt resumes at 6 with step 6's replay (the staged one of 12
    dropped); after it, at 12 with step 12's (the staged one committed). Before staging, the
    first case found a replay.pt of step 12 beside latest.pt of 6 and refilled."""
    from engine import checkpoint
    from engine.config import load_config
    from engine.trainer import Trainer

    rd = tmp_path / "r"
    sets = ["train.max_train_steps=12", "log.checkpoint_every=6", "log.checkpoint_replay=true"]
    tr = Trainer(load_config("configs/tiny.toml", sets), rd)
    at_12 = lambda *_: tr.counters["step"] == 12  # noqa: E731
    if killed == "before latest.pt":
        latest = lambda path, _: path.name == "latest.pt" and at_12()  # noqa: E731
        monkeypatch.setattr(checkpoint, "save", kill_when(checkpoint.save, latest))
    else:
        monkeypatch.setattr(Trainer, "_commit_replay", kill_when(Trainer._commit_replay, at_12))
    run_until_killed(tr, monkeypatch)
    assert (rd / "checkpoints" / "replay.pt.next").is_file()
    back = Trainer(load_config(rd / "config.toml"), rd, resume=True)
    try:
        assert back.counters["step"] == (6 if killed == "before latest.pt" else 12)
        assert back.replay.count * back.cfg.env.num_envs == back.counters["env_steps"] > 0
        assert back.train_from == back.counters["env_steps"]  # restored, not refilled
        assert not (rd / "checkpoints" / "replay.pt.next").exists()
    finally:
        back.close()
