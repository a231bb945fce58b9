"""The entropy-coefficient schedule and learning-rate scaling: values, validation, the update's
device tensor, and the config's round trip through a run directory (resume reads it back)."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine.agent import Agent
from engine.config import (
    ConfigError,
    Schedule,
    actor_entropy_coef_at,
    effective_lrs,
    load_config,
    lr_factor,
    save_toml,
)
from tests.test_world_model import synthetic_batch

ROOT = Path(__file__).resolve().parent.parent
LINEAR = 'train.actor_entropy_coef={schedule="linear", start=3e-3, end=3e-4, steps=10}'
EXP = 'train.actor_entropy_coef={schedule="exp", start=3e-3, end=3e-4, steps=10}'


def tiny(*overrides: str):
    return load_config("configs/tiny.toml", list(overrides))


@pytest.mark.parametrize(
    "k, linear, exp",
    [
        (-3, 3e-3, 3e-3),  # before the first actor update: start
        (0, 3e-3, 3e-3),
        (5, 1.65e-3, 3e-3 * 0.1**0.5),  # halfway: arithmetic vs geometric mean
        (9, 3e-3 - 0.9 * 2.7e-3, 3e-3 * 0.1**0.9),
        (10, 3e-4, 3e-4),
        (1000, 3e-4, 3e-4),  # stays at end
    ],
)
def test_schedule_values(k, linear, exp):
    assert Schedule("linear", 3e-3, 3e-4, 10).at(k) == pytest.approx(linear, rel=1e-12)
    assert Schedule("exp", 3e-3, 3e-4, 10).at(k) == pytest.approx(exp, rel=1e-12)


def test_schedule_counts_actor_updates_from_the_end_of_the_warm_up():
    cfg = tiny(EXP, "train.actor_warmup_steps=100")
    at = lambda step: actor_entropy_coef_at(cfg.train, step)
    assert at(0) == at(100) == 3e-3  # warm-up updates do not advance it
    assert at(105) == pytest.approx(3e-3 * 0.1**0.5)
    assert at(110) == at(10_000) == 3e-4
    const = tiny("train.actor_entropy_coef=0.002").train
    assert actor_entropy_coef_at(const, 0) == actor_entropy_coef_at(const, 10**6) == 0.002


@pytest.mark.parametrize(
    "table, words",
    [
        ('{schedule="cosine", start=1e-3, end=1e-4, steps=10}', ["schedule", "linear|exp"]),
        ('{schedule="linear", start=1e-3, end=1e-4}', ["missing steps"]),
        ('{schedule="linear", start=1e-3, end=1e-4, steps=10, warm=3}', ["unknown key", "warm"]),
        ('{schedule="linear", start=-1e-3, end=1e-4, steps=10}', ["start", ">= 0"]),
        ('{schedule="linear", start=1e-3, end=-1e-4, steps=10}', ["end", ">= 0"]),
        ('{schedule="exp", start=0, end=1e-4, steps=10}', ["start", "> 0 for an exp"]),
        ('{schedule="exp", start=1e-3, end=0.0, steps=10}', ["end", "> 0 for an exp"]),
        ('{schedule="linear", start=1e-3, end=1e-4, steps=0}', ["steps", ">= 1"]),
        ('{schedule="linear", start=1e-3, end=1e-4, steps=2.5}', ["steps", "must be int"]),
        ("'lots'", ["must be float or a table"]),
        ("-0.1", ["actor_entropy_coef", ">= 0"]),
    ],
)
def test_bad_schedules_get_one_line_naming_the_key(tmp_path, table, words):
    path = tmp_path / "bad.toml"
    path.write_text(f"[train]\nactor_entropy_coef = {table}\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(str(path)) and "train.actor_entropy_coef" in msg
    for w in words:
        assert w in msg, msg


def test_a_linear_schedule_is_fine_with_a_zero_end():
    assert tiny(LINEAR.replace("end=3e-4", "end=0")).train.actor_entropy_coef.at(10) == 0


def test_overrides_set_a_number_a_table_or_one_key():
    assert tiny(LINEAR, "train.actor_entropy_coef=0.001").train.actor_entropy_coef == 0.001
    assert tiny("train.actor_entropy_coef=0.001", EXP).train.actor_entropy_coef.schedule == "exp"
    assert tiny(EXP, "train.actor_entropy_coef.steps=50").train.actor_entropy_coef.steps == 50
    with pytest.raises(ConfigError, match="unknown key 'train.actor_entropy_coef.steps'"):
        tiny("train.actor_entropy_coef.steps=50")  # a number has no keys


def test_schedule_round_trips_through_save_toml(tmp_path):
    cfg = tiny(EXP)
    save_toml(cfg, tmp_path / "config.toml")
    assert "[train.actor_entropy_coef]" in (tmp_path / "config.toml").read_text()
    again = load_config(tmp_path / "config.toml")
    assert again.train == cfg.train and again.train.actor_entropy_coef == Schedule(
        "exp", 3e-3, 3e-4, 10
    )
    assert not list(tmp_path.glob(".*tmp*"))  # the temp file of the atomic write is gone


def test_the_update_reads_the_coefficient_from_one_device_tensor():
    def actor_loss(coef: float) -> tuple[float, torch.Tensor]:
        cfg = tiny()
        torch.manual_seed(0)
        agent = Agent(cfg, vector_dim=4, num_actions=2)
        tensor = agent.entropy_coef
        agent.set_entropy_coef(coef)
        assert agent.entropy_coef is tensor and tensor.dim() == 0  # refilled, not replaced
        torch.manual_seed(1)
        metrics = agent.train_step(synthetic_batch(cfg, 4, 8), train_behavior=True)
        return metrics["actor_loss"].item(), metrics["actor_entropy"]

    (base, entropy), (big, _) = actor_loss(0.0), actor_loss(10.0)
    # actor_loss = -mean(w (logpi adv + coef H)): the entropy term must move it.
    assert big < base - 1.0 and entropy > 0


@pytest.mark.parametrize(
    "scaling, batch, factor",
    [
        ("none", 64, 1.0),
        ("linear", 64, 4.0),
        ("sqrt", 64, 2.0),
        ("sqrt", 4, 0.5),
        ("linear", 8, 0.5),
    ],
)
def test_lr_scaling_factors(scaling, batch, factor):
    cfg = tiny(f"train.lr_scaling={scaling}", f"train.batch_size={batch}", "train.lr_base_batch=16")
    assert lr_factor(cfg.train) == pytest.approx(factor)
    lrs = effective_lrs(cfg.train)
    t = cfg.train
    assert lrs == pytest.approx(
        dict(wm_lr=t.wm_lr * factor, actor_lr=t.actor_lr * factor, critic_lr=t.critic_lr * factor)
    )
    agent = Agent(cfg, vector_dim=4, num_actions=2)
    for name, opt in (("wm_lr", agent.wm_opt), ("actor_lr", agent.actor_opt)):
        assert opt.lr.item() == pytest.approx(lrs[name], rel=1e-6)


def test_lr_scaling_defaults_change_nothing_and_bad_values_are_refused():
    t = tiny().train
    assert (t.lr_scaling, t.lr_base_batch, lr_factor(t)) == ("none", 16, 1.0)
    with pytest.raises(ConfigError, match="train.lr_scaling"):
        tiny("train.lr_scaling=cube")
    with pytest.raises(ConfigError, match="train.lr_base_batch"):
        tiny("train.lr_base_batch=0")
    with pytest.raises(ConfigError, match="train.wm_lr.*must stay < 1"):
        tiny("train.lr_scaling=linear", "train.batch_size=4096", "train.wm_lr=0.01")


def cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "engine.run", *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def train_records(rd: Path) -> dict[int, dict]:
    lines = (rd / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r for r in map(json.loads, lines) if r["type"] == "train"}


def test_a_scheduled_run_logs_its_coefficient_resumes_and_takes_a_number(tmp_path):
    rd = tmp_path / "r"
    sched = 'train.actor_entropy_coef={schedule="linear", start=0.01, end=0.001, steps=6}'
    out = cli("--config", "configs/tiny.toml", "--run-dir", str(rd), "--set", sched)
    assert out.returncode == 0, out.stderr
    s = Schedule("linear", 0.01, 0.001, 6)
    warm = 4  # tiny.toml's actor_warmup_steps; a record holds its interval's last update
    expect = lambda step: s.at(step - 1 - warm)
    recs = train_records(rd)
    assert {k: r["actor_entropy_coef"] for k, r in recs.items()} == pytest.approx(
        {4: expect(4), 8: expect(8), 12: expect(12)}
    )
    assert recs[8]["actor_entropy_coef"] == pytest.approx(0.0055)  # 3 actor updates of 6 done
    # Resume reads the run directory's config.toml back, table included.
    out = cli("--resume", str(rd), "--set", "train.max_train_steps=16")
    assert out.returncode == 0, out.stderr
    assert "[train.actor_entropy_coef]" in (rd / "config.toml").read_text()
    assert train_records(rd)[16]["actor_entropy_coef"] == pytest.approx(0.001)
    # ... and a number replaces the table on a later resume.
    sets = ["--set", "train.max_train_steps=20", "--set", "train.actor_entropy_coef=0.02"]
    out = cli("--resume", str(rd), *sets)
    assert out.returncode == 0, out.stderr
    assert "actor_entropy_coef = 0.02" in (rd / "config.toml").read_text()
    assert train_records(rd)[20]["actor_entropy_coef"] == 0.02
    lrs = [(r["wm_lr"], r["actor_lr"], r["critic_lr"]) for r in train_records(rd).values()]
    assert set(lrs) == {(1e-4, 1e-4, 1e-4)} and not math.isnan(lrs[0][0])


def test_lr_scaling_is_printed_and_logged(tmp_path):
    rd = tmp_path / "r"
    out = cli(
        "--config",
        "configs/tiny.toml",
        "--run-dir",
        str(rd),
        "--set",
        "train.lr_scaling=linear",
        "--set",
        "train.lr_base_batch=2",  # tiny's batch is 4: x2
        "--set",
        "train.max_train_steps=4",
    )
    assert out.returncode == 0, out.stderr
    line = [x for x in out.stderr.splitlines() if x.startswith("learning rates")]
    assert line == [
        "learning rates x2 (train.lr_scaling linear, batch 4 / lr_base_batch 2): "
        "wm_lr 0.0002, actor_lr 0.0002, critic_lr 0.0002"
    ]
    first = train_records(rd)[4]
    assert (first["wm_lr"], first["actor_lr"], first["critic_lr"]) == (2e-4, 2e-4, 2e-4)
    ck = torch.load(rd / "checkpoints" / "latest.pt", weights_only=False)
    assert ck["config"]["train"]["lr_scaling"] == "linear"


@pytest.mark.compiled
def test_a_changing_coefficient_does_not_recompile_the_update(monkeypatch):
    # A Python float argument would be a constant of the compiled graph: a new value, a new
    # compile (and a stale value inside a captured CUDA graph).
    monkeypatch.setattr(torch._dynamo.config, "error_on_recompile", True)
    # Set explicitly: in full CI runs (slow tests included) this inductor entry is found hidden
    # by the time this test compiles (a ConfigModule entry hides on delattr), which breaks
    # inductor; setting it unhides it. Which earlier test hides it was not found yet.
    monkeypatch.setattr(torch._inductor.config, "fallback_random", False, raising=False)
    torch._dynamo.reset()  # graphs other tests compiled for the same code at other shapes
    cfg = tiny()
    torch.manual_seed(0)
    agent = Agent(cfg, vector_dim=4, num_actions=2)
    agent.behavior.losses = torch.compile(agent.behavior.losses)
    batch = synthetic_batch(cfg, 4, 8)
    losses = []
    for coef in (0.0, 3e-3, 10.0):
        agent.set_entropy_coef(coef)
        torch.manual_seed(1)
        losses.append(agent.train_step(batch, train_behavior=True)["actor_loss"].item())
    torch._dynamo.reset()
    assert losses[2] < losses[1] - 1.0  # the compiled graph read the refilled tensor
