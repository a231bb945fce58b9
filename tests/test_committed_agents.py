"""The agent folders under benchmarks/results/agents/: each is an engine.export folder (config,
agent.safetensors) with its 50-episode record, and `python -m engine.evaluate` on the folder
plays the record again, return for return, on any machine."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
AGENTS = ROOT / "benchmarks" / "results" / "agents"
DIRS = sorted(p for p in AGENTS.iterdir() if p.is_dir())


def test_every_agent_dir_is_whole():
    """Each agent has its config, its weights (small: weights only) and its 50-episode record,
    made from those weights."""
    assert DIRS
    for agent in DIRS:
        assert (agent / "config.toml").is_file(), agent.name
        weights = agent / "agent.safetensors"
        assert weights.is_file() and weights.stat().st_size < 8_000_000, agent.name
        record = json.loads((agent / "eval_50.json").read_text())
        assert record["episodes"] == 50 and len(record["returns"]) == 50, agent.name
        assert record["checkpoint"] == str(weights.relative_to(ROOT)), agent.name


@pytest.mark.slow
@pytest.mark.parametrize("agent", DIRS, ids=lambda p: p.name)
def test_committed_agent_replays_its_record(agent, tmp_path):
    """The record's 50 episodes from its seed again (evaluation is eager fp32; the episodes run
    in parallel, so a shorter evaluation would play different ones)."""
    record = json.loads((agent / "eval_50.json").read_text())
    n = record["episodes"]
    out = tmp_path / "eval.json"
    done = subprocess.run(
        [sys.executable, "-m", "engine.evaluate", str(agent), "--episodes", str(n)]
        + ["--seed", str(record["seed"]), "--device", "cpu", "--json", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    got = json.loads(out.read_text())
    assert got["step"] == record["step"]
    assert got["returns"] == pytest.approx(record["returns"], abs=1e-3)
