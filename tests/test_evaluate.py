"""engine.evaluate: the shared episode loop, and the command that re-checks a checkpoint."""

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.agent import Agent
from engine.config import load_config
from engine.envs import make_env
from engine.evaluate import Episodes, RunError, ends_text, load_run, play_episodes, summary
from engine.transfer import ObsUploader
from tests.helpers import run_module, tiny_run


def cli(*args: str) -> subprocess.CompletedProcess:
    return run_module("engine.evaluate", *args)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return tiny_run(tmp_path_factory.mktemp("evaluate") / "tiny")


def test_play_episodes_counts_each_episode_once_and_records_env_0():
    cfg = load_config("configs/tiny.toml")
    env = make_env("CartPole-v1", cfg.env.backend, 3, 5, cfg.image_size, True)
    torch.manual_seed(0)
    agent = Agent(cfg, env.vector_dim, env.num_actions)
    seen = []

    def record(obs, action):
        seen.append((bool(obs["is_first"][0]), bool(obs["is_last"][0]), action))
        return not obs["is_last"][0]

    class Env1Truncated:
        """env 1's episode end reported as a time-limit cut, as a time limit would."""

        num_envs = env.num_envs

        def reset(self):
            return env.reset()

        def step(self, action):
            obs = env.step(action)
            return {**obs, "is_terminal": obs["is_terminal"] & (np.arange(3) != 1)}

    try:
        returns, lengths, terminal, last = play_episodes(
            agent, Env1Truncated(), ObsUploader(torch.device("cpu")), True, record
        )
    finally:
        env.close()
    # How each episode ended: CartPole's untrained episodes end by the pole falling, reward 1.
    np.testing.assert_array_equal(terminal, [True, False, True])
    np.testing.assert_array_equal(last, [1.0, 1.0, 1.0])
    # CartPole pays 1 per step: each env's return is its episode's length, counted once even
    # though the envs that end first keep stepping (auto-reset) until the last one ends.
    assert returns.shape == lengths.shape == (3,)
    np.testing.assert_array_equal(returns, lengths)
    assert (lengths >= 1).all()
    # env 0's episode from its first observation to its last, one action each.
    assert seen[0][0] and seen[-1][1] and not any(last for _, last, _ in seen[:-1])
    assert len(seen) == lengths[0] + 1


def test_summary_figures():
    episodes = Episodes(
        np.array([100.0, 250.0, 300.0, -50.0]),
        np.array([1000, 20, 30, 40]),
        np.array([False, True, True, True]),
        np.array([-0.3, 100.0, 100.0, -100.0]),
    )
    s = summary(episodes, 200.0)
    assert s["mean"] == 150.0 and s["median"] == 175.0 and (s["min"], s["max"]) == (-50.0, 300.0)
    assert s["at_target"] == 2 and s["episodes"] == 4 and s["mean_length"] == 272.5
    assert (s["terminated"], s["terminated_mean"]) == (3, 500.0 / 3)
    assert (s["time_limit"], s["time_limit_mean"]) == (1, 100.0)
    assert s["terminal"] == [False, True, True, True] and s["last_rewards"][3] == -100.0
    assert (
        ends_text(s)
        == "ends: 3 terminated (mean return 166.7), 1 at the time limit (mean return 100.0)"
    )
    s = summary(episodes._replace(terminal=np.ones(4, dtype=bool)), 200.0)
    assert s["time_limit_mean"] is None and ends_text(s).endswith(", 0 at the time limit")


def test_load_run_errors(tmp_path):
    with pytest.raises(RunError, match="no such run directory"):
        load_run(tmp_path / "nope", None, None, 1, None, 0)
    (tmp_path / "empty").mkdir()
    with pytest.raises(RunError, match="no best.pt or latest.pt"):
        load_run(tmp_path / "empty", None, None, 1, None, 0)
    bad = tmp_path / "bad" / "checkpoints"
    bad.mkdir(parents=True)
    (bad / "latest.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(RunError, match="cannot read the checkpoint"):
        load_run(tmp_path / "bad", None, None, 1, None, 0)
    with pytest.raises(RunError, match="no best.pt"):
        load_run(tmp_path / "bad", "best", None, 1, None, 0)


@pytest.mark.slow
def test_cli_prints_and_writes_the_figures(run_dir, tmp_path):
    out = tmp_path / "eval.json"
    done = cli(str(run_dir), "--episodes", "6", "--json", str(out))
    assert done.returncode == 0, done.stderr
    line = done.stdout.strip()
    assert line.startswith(f"{run_dir / 'checkpoints' / 'best.pt'} (step 12), 6 greedy episodes")
    assert "from seed 30000" in line and "/6 >= 450" in line
    record = json.loads(out.read_text())
    assert record["episodes"] == 6 and len(record["returns"]) == 6 and record["step"] == 12
    assert record["policy"] == "greedy" and record["task"] == "CartPole-v1"
    assert record["mean"] == pytest.approx(np.mean(record["returns"]))
    assert record["mean"] == pytest.approx(record["mean_length"])  # CartPole: 1 per step
    assert f"return {record['mean']:.1f} +- {record['std']:.1f}" in line
    # Untrained CartPole episodes end by the pole falling, long before the 500-step limit.
    assert line.endswith(
        f"ends: 6 terminated (mean return {record['mean']:.1f}), 0 at the time limit"
    )
    assert record["terminal"] == [True] * 6 and record["lengths"] == [
        int(r) for r in record["returns"]
    ]
    # The same command gives the same figures; another seed, other episodes.
    again = cli(str(run_dir), "--episodes", "6")
    assert again.stdout == done.stdout
    other = cli(str(run_dir), "--episodes", "6", "--seed", "7", "--policy", "sample")
    assert other.returncode == 0 and "from seed 7" in other.stdout and "sampled" in other.stdout


@pytest.mark.slow
@pytest.mark.parametrize(
    "args, message",
    [
        (["--episodes", "0"], "--episodes must be >= 1, got 0"),
        (["--target", "nan"], "--target must be a finite number"),
        (["--checkpoint", "latest", "--json", "/proc/no/such/dir/x.json"], "/proc/no/such"),
    ],
)
def test_cli_bad_input_is_one_line(run_dir, args, message):
    done = cli(str(run_dir), *args)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("error: ") and message in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
