"""Watching a run: health stops (exit 3, the bad state never checkpointed), early stopping,
TensorBoard scalars and dream videos at evaluation."""

import importlib.util
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from engine import config as config_module
from engine import run as cli_main
from engine.config import load_config
from engine.health import HealthError, TrainingError
from engine.logger import TENSORBOARD_MISSING
from engine.trainer import Trainer

ROOT = Path(__file__).resolve().parent.parent
TIMING = ("train_steps_per_sec", "env_steps_per_sec", "wall_time")
ENV_KEYS = {"image", "vector", "reward", "is_first", "is_last", "is_terminal"}


def cli(run_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    sets = [x for o in overrides for x in ("--set", o)]
    cmd = [sys.executable, "-m", "engine.run", "--config", "configs/tiny.toml"]
    cmd += ["--run-dir", str(run_dir), *sets]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def records(run_dir: Path, kind: str | None = None) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if kind is None or r["type"] == kind]


def saved_step(run_dir: Path, name: str = "latest") -> int:
    ck = torch.load(run_dir / "checkpoints" / f"{name}.pt", weights_only=False)
    return ck["counters"]["step"]


def trainer(run_dir: Path, *overrides: str) -> Trainer:
    return Trainer(load_config("configs/tiny.toml", list(overrides)), run_dir)


# ---- Health stops ----------------------------------------------------------------------------


def test_a_runaway_dream_value_exits_3_and_keeps_the_last_good_checkpoint(tmp_path):
    rd = tmp_path / "r"
    # The actor starts at update 4; the first line with a dream value is at step 6. A bound of
    # 1e-30 is beyond any value an untrained critic produces, so the stop is certain.
    out = cli(
        rd,
        "train.max_abs_dream_value=1e-30",
        "log.log_every=2",
        "log.checkpoint_every=2",
        "log.eval_every=2",
    )
    assert out.returncode == 3, out.stderr
    assert "Traceback" not in out.stderr
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("error: step 6: dream_value ")
    assert "beyond the bound 1e-30 (train.max_abs_dream_value)" in last
    assert f"kept the last good checkpoint {rd / 'checkpoints' / 'latest.pt'} (step 4)" in last
    assert [line for line in out.stderr.splitlines() if line.startswith("error")] == [last]
    (health,) = records(rd, "health")
    assert health["step"] == 6 and health["kept_checkpoint_step"] == 4
    assert abs(health["dream_value"]) > 1e-30 and "dream_value" in health["reason"]
    assert saved_step(rd, "latest") == 4 and saved_step(rd, "best") <= 4
    assert [r["step"] for r in records(rd, "train")] == [2, 4, 6]
    assert not list((rd / "checkpoints").glob(".*tmp*"))


def nan_from(tr: Trainer, step: int) -> None:
    """Make every update from learner step `step` on report a NaN world-model loss."""
    real = tr.learner.step

    def step_fn(train_behavior: bool) -> dict[str, torch.Tensor]:
        metrics = real(train_behavior)
        if tr.counters["step"] >= step:
            metrics = {**metrics, "wm_loss": torch.tensor(float("nan"))}
        return metrics

    tr.learner.step = step_fn


def test_a_nan_between_log_lines_is_caught_before_the_checkpoint(tmp_path):
    # Checkpoints every 3 updates, log lines every 4: the NaN of update 5 would reach the step-6
    # checkpoint before any log line saw it. The pending updates are checked first.
    rd = tmp_path / "r"
    tr = trainer(rd, "log.log_every=4", "log.checkpoint_every=3", "log.eval_every=0")
    nan_from(tr, 4)
    with pytest.raises(HealthError) as e:
        tr.run()
    ckpt = rd / "checkpoints" / "latest.pt"
    assert (
        str(e.value) == f"step 6: non-finite wm_loss; kept the last good checkpoint {ckpt} (step 3)"
    )
    assert saved_step(rd) == 3
    (health,) = records(rd, "health")
    assert health["wm_loss"] == "nan" and health["reason"] == "non-finite wm_loss"
    assert [r["step"] for r in records(rd, "train")] == [4]


def test_non_finite_parameters_are_never_written(tmp_path):
    tr = trainer(tmp_path / "r")
    with torch.no_grad():
        next(tr.agent.parameters())[0].fill_(float("inf"))
    with pytest.raises(
        HealthError, match=r"step 0: non-finite parameters; no checkpoint was written"
    ):
        tr._checkpoint("latest")
    assert not (tmp_path / "r" / "checkpoints" / "latest.pt").exists()


def test_the_dream_value_bound_applies_to_magnitude_and_zero_disables_it(tmp_path):
    tr = trainer(tmp_path / "a", "train.max_abs_dream_value=1e4")
    tr._check_health({"wm_loss": 1.0, "dream_value": -9e3})
    with pytest.raises(HealthError, match=r"dream_value -8.9e7 beyond the bound 1e4"):
        tr._check_health({"wm_loss": 1.0, "dream_value": -8.9e7})
    off = trainer(tmp_path / "b", "train.max_abs_dream_value=0")
    off._check_health({"dream_value": 8.9e7})
    with pytest.raises(HealthError, match="non-finite critic_grad_norm"):
        off._check_health({"dream_value": 1.0, "critic_grad_norm": float("inf")})


# ---- Early stopping --------------------------------------------------------------------------


def test_early_stop_ends_a_run_normally(tmp_path):
    rd = tmp_path / "r"
    # Only a 99% drop of wm_loss counts: the second log line cannot improve enough.
    out = cli(
        rd,
        "train.max_train_steps=400",
        "log.log_every=2",
        "log.eval_every=0",
        "train.early_stop_patience=1",
        "train.early_stop_min_delta=0.99",
    )
    assert out.returncode == 0, out.stderr
    assert "done (early stop): 4 updates" in out.stdout
    assert "early stop at step 4: wm_loss has not improved on its best" in out.stderr
    (rec,) = records(rd, "early_stop")
    assert rec["step"] == 4 and "train.early_stop_patience" in rec["reason"]
    assert rec["best_wm_loss"] == records(rd, "train")[0]["wm_loss"]
    assert saved_step(rd) == 4


def test_early_stop_counts_intervals_without_enough_relative_improvement(tmp_path):
    tr = trainer(tmp_path / "r", "train.early_stop_patience=2", "train.early_stop_min_delta=0.1")
    for loss in (10.0, 9.5, 8.9, 8.5):  # 9.5 is not 10% better; 8.9 is; 8.5 is not
        tr._check_early_stop(loss)
        assert tr.stop_reason is None
    assert (tr.counters["es_best"], tr.counters["es_stale"]) == (8.9, 1)
    tr._check_early_stop(8.02)  # a second interval in a row above 8.9 - 0.89
    assert tr.stop_reason is not None and "best 8.9" in tr.stop_reason
    assert tr._done()
    off = trainer(tmp_path / "off")
    for loss in (1.0, 2.0, 3.0, 4.0):
        off._check_early_stop(loss)
    assert off.stop_reason is None


def test_stop_solved_evals_ends_the_run_after_enough_evals_in_a_row(tmp_path):
    tr = trainer(tmp_path / "r", "train.stop_solved_evals=2")
    for ret in (460.0, 300.0, 450.0):  # CartPole's solved return is 450: the streak restarts
        tr.last_eval = ret
        tr._check_solved(10)
        assert tr.stop_reason is None
    tr.last_eval = 500.0
    tr._check_solved(10)
    assert tr.counters["solved_streak"] == 2 and tr._done()
    assert "2 evaluations in a row reached the solved return 450" in tr.stop_reason
    (rec,) = records(tmp_path / "r", "solved")
    assert rec["eval_return"] == 500.0
    off = trainer(tmp_path / "off")
    off.last_eval = 500.0
    off._check_solved(10)
    assert off.stop_reason is None


def fixed_rounds(returns_per_round: list[list[float]], played: list[int]):
    """An Evaluator.rounds stand-in: round i's episodes have returns_per_round[i]; `played`
    collects the round counts asked for."""
    from engine.episodes import Episodes

    def rounds(count: int) -> list[Episodes]:
        played.append(count)
        out = []
        for returns in returns_per_round[:count]:
            r = np.asarray(returns, dtype=float)
            # CartPole ends: the pole falls (terminal) unless the episode reached 500.
            out.append(Episodes(r, r.astype(np.int64), r < 500, np.ones_like(r)))
        return out

    return rounds


def test_a_solved_streak_stops_only_once_fresh_episodes_confirm_it(tmp_path):
    """train.stop_confirm_episodes = 25 after evals of 10 episodes: 3 rounds (30 fresh
    episodes) with the same weights; a mean under 450 keeps the run training with its streak,
    so the next eval at the target confirms again."""
    tr = trainer(tmp_path / "r", "train.stop_solved_evals=2", "train.stop_confirm_episodes=25")
    played: list[int] = []
    low = [[500.0] * 5 + [300.0] * 5] * 3  # mean 400
    tr.evaluator.rounds = fixed_rounds(low, played)
    for ret in (460.0, 470.0):
        tr.last_eval = ret
        tr._check_solved(10)
    assert played == [3] and tr.stop_reason is None and not tr._done()
    (rec,) = records(tmp_path / "r", "solve_confirm")
    assert rec["passed"] is False and rec["confirm_episodes"] == 30
    assert rec["confirm_return"] == pytest.approx(400.0)
    assert rec["confirm_terminated"] == 15 and rec["confirm_time_limit"] == 15
    assert "30 fresh greedy episodes with the same weights averaged 400.0, below" in rec["reason"]
    assert not records(tmp_path / "r", "solved")
    high = [[500.0] * 10, [500.0] * 10, [450.0] * 10]
    tr.evaluator.rounds = fixed_rounds(high, played)
    tr.last_eval = 455.0  # the streak goes on (3 evals at 450+): confirmed again
    tr._check_solved(10)
    assert played == [3, 3] and tr._done()
    assert "averaged 483.3, at or above the solved return 450" in tr.stop_reason
    (rec,) = records(tmp_path / "r", "solved")
    assert rec["eval_return"] == 455.0 and "fresh greedy episodes" in rec["reason"]
    assert [r["passed"] for r in records(tmp_path / "r", "solve_confirm")] == [False, True]


def test_a_confirmed_solved_stop_plays_real_fresh_episodes(tmp_path, monkeypatch):
    """The whole loop: a target of -1 makes every evaluation solved, and the confirmation's
    5 episodes (3 rounds of the 2 eval envs: 6) are played by the eval envs."""
    monkeypatch.setitem(config_module.TASK_TARGETS, "CartPole-v1", -1.0)
    rd = tmp_path / "r"
    tr = trainer(rd, "train.stop_solved_evals=1", "train.stop_confirm_episodes=5",
                 "train.max_train_steps=40", "log.eval_every=6")  # fmt: skip
    try:
        result = tr.run()
    finally:
        tr.close()
    assert result["step"] == 6 and result["stop_kind"] == "solved"
    (rec,) = records(rd, "solve_confirm")
    assert rec["passed"] is True and rec["confirm_episodes"] == 6
    returns = rec["confirm_returns"]
    assert len(returns) == 6 and all(r >= 8 for r in returns)  # CartPole episodes last 8+ steps
    assert rec["confirm_terminated"] + rec["confirm_time_limit"] == 6


def test_a_solved_run_ends_at_the_evaluation_that_completes_the_streak(tmp_path, monkeypatch):
    # A target of -1 makes every evaluation count as solved: the run ends at the second one.
    monkeypatch.setitem(config_module.TASK_TARGETS, "CartPole-v1", -1.0)
    rd = tmp_path / "r"
    tr = trainer(rd, "train.stop_solved_evals=2", "train.max_train_steps=40", "log.eval_every=6")
    try:
        result = tr.run()
    finally:
        tr.close()
    assert result["step"] == 12 and result["stop_kind"] == "solved"
    assert [r["step"] for r in records(rd, "eval")] == [6, 12]
    assert saved_step(rd) == 12


# ---- TensorBoard -----------------------------------------------------------------------------


def test_tensorboard_scalars_are_written(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    rd = tmp_path / "r"
    out = cli(rd, "log.tensorboard=true")
    assert out.returncode == 0, out.stderr
    assert list((rd / "tensorboard").glob("events.out.tfevents.*"))
    acc = EventAccumulator(str(rd / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/wm_loss", "train/actor_entropy_coef", "eval/eval_return"} <= tags
    assert not any(t.endswith("/step") or t.endswith("/eval_returns") for t in tags)
    wm = acc.Scalars("train/wm_loss")
    train = records(rd, "train")
    assert [e.step for e in wm] == [4, 8, 12]
    assert [e.value for e in wm] == pytest.approx([r["wm_loss"] for r in train])
    assert [e.step for e in acc.Scalars("eval/eval_return")] == [6, 12]


def test_tensorboard_missing_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys):
    monkeypatch.delitem(sys.modules, "torch.utils.tensorboard", raising=False)
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # `import tensorboard` fails
    rd = tmp_path / "r"
    argv = ["--config", "configs/tiny.toml", "--run-dir", str(rd), "--set", "log.tensorboard=true"]
    with pytest.raises(SystemExit) as e:
        cli_main.main(argv)
    assert e.value.code == 2
    assert capsys.readouterr().err == f"error: {TENSORBOARD_MISSING}\n"
    assert not rd.exists()  # failed before anything was written


# ---- Dream videos ----------------------------------------------------------------------------


def stand_in_dream(calls: list) -> types.ModuleType:
    """engine.dream's contract: open_loop(agent, obs, actions, context) -> (T, 64, 64, 3) uint8,
    write_gif(path, truth, pred, scale, fps, context), atomic."""
    mod = types.ModuleType("engine.dream")

    def open_loop(agent, obs, actions, context=5):
        calls.append(dict(obs=obs, actions=actions, context=context))
        torch.rand(16)  # a real dream samples latents; the run must not notice
        return obs["image"].flip(0)

    def write_gif(path, truth, pred, scale=2, fps=10, context=5):
        assert truth.shape == pred.shape and truth.dtype == pred.dtype == np.uint8
        frames = [Image.fromarray(np.concatenate([t, p], 1)) for t, p in zip(truth, pred)]
        tmp = path.with_name(f".{path.name}.tmp")
        frames[0].save(tmp, format="GIF", save_all=True, append_images=frames[1:])
        os.replace(tmp, path)

    mod.open_loop, mod.write_gif = open_loop, write_gif
    return mod


def strip(recs: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING} for r in recs]


def test_dream_video_at_each_evaluation_with_a_stand_in(tmp_path, monkeypatch):
    calls: list = []
    monkeypatch.setitem(sys.modules, "engine.dream", stand_in_dream(calls))
    dream = ("log.dream_video=true", "log.dream_steps=8", "log.dream_context=3")
    trainer(tmp_path / "on", *dream).run()
    trainer(tmp_path / "off").run()
    gifs = sorted((tmp_path / "on" / "dreams").iterdir())
    assert [g.name for g in gifs] == ["dream_0000006.gif", "dream_0000012.gif"]
    assert len(calls) == 2
    for call, gif in zip(calls, gifs):
        obs, actions = call["obs"], call["actions"]
        T = len(actions)
        assert call["context"] == 3 and 3 < T <= 8
        assert set(obs) == ENV_KEYS and all(len(v) == T for v in obs.values())
        assert obs["image"].shape == (T, 64, 64, 3) and obs["image"].dtype == torch.uint8
        assert actions.dtype == torch.int64 and actions.shape == (T,)
        assert obs["is_first"][0] and not obs["is_first"][1:].any()  # one episode, from its start
        assert not obs["is_last"][:-1].any()
        assert Image.open(gif).n_frames == T
    # The dream runs on its own random stream: training is the same with or without it.
    assert strip(records(tmp_path / "on")) == strip(records(tmp_path / "off"))


def test_the_recording_is_one_whole_episode_cut_at_dream_steps(tmp_path, monkeypatch):
    calls: list = []
    monkeypatch.setitem(sys.modules, "engine.dream", stand_in_dream(calls))
    tr = trainer(tmp_path / "r", "log.dream_video=true", "log.dream_steps=400")
    tr.evaluate()
    whole = calls[-1]["obs"]
    T = len(whole["is_last"])
    assert whole["is_last"][-1] and not whole["is_last"][:-1].any() and whole["is_first"][0]
    assert T > 5  # the greedy untrained policy still balances a few steps
    tr.cfg.log.dream_steps = 7
    tr.evaluate()
    cut = calls[-1]["obs"]
    assert len(calls) == 2 and len(cut["image"]) == 7 and not cut["is_last"].any()
    assert cut["is_first"][0] and not cut["is_first"][1:].any()


def test_dream_notes_for_a_short_episode_and_for_no_image(tmp_path, monkeypatch, capsys):
    calls: list = []
    monkeypatch.setitem(sys.modules, "engine.dream", stand_in_dream(calls))
    # An untrained greedy CartPole policy drops the pole in ~10 steps: fewer than 40 + 1.
    tr = trainer(
        tmp_path / "short",
        "log.dream_video=true",
        "log.dream_steps=60",
        "log.dream_context=40",
        "train.max_train_steps=6",
    )
    tr.run()
    err = capsys.readouterr().err
    assert "note: step 6: no dream video: the first eval episode lasted" in err
    assert "fewer than log.dream_context + 1 = 41" in err
    assert not calls and not (tmp_path / "short" / "dreams").exists()
    trainer(tmp_path / "noimg", "log.dream_video=true", "env.image=false")
    assert (
        "note: log.dream_video: no dream videos with env.image = false" in capsys.readouterr().err
    )


def test_dream_video_without_engine_dream_fails_at_start(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "engine.dream", None)
    with pytest.raises(TrainingError, match="log.dream_video = true needs engine.dream"):
        trainer(tmp_path / "r", "log.dream_video=true")
    assert not (tmp_path / "r").exists()


@pytest.mark.skipif(
    importlib.util.find_spec("engine.dream") is None, reason="engine/dream.py not written yet"
)
def test_dream_video_with_the_real_module(tmp_path):
    rd = tmp_path / "r"
    out = cli(rd, "log.dream_video=true", "log.dream_steps=8", "log.dream_context=3")
    assert out.returncode == 0, out.stderr
    assert "dream video failed" not in out.stderr
    gif = rd / "dreams" / "dream_0000006.gif"
    assert gif.is_file() and Image.open(gif).n_frames >= 4
