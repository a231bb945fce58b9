"""engine.export: a run's agent alone, re-evaluated exactly as the run's own checkpoint."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine import export
from engine.config import load_config
from engine.rundir import read_agent_file
from tests.helpers import run_module, tiny_run


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return tiny_run(tmp_path_factory.mktemp("export") / "tiny")


def run_main(args: list, capsys) -> tuple[int, str, str]:
    try:
        export.main([str(a) for a in args])
        code = 0
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def evaluate_json(run: Path, out: Path, *args: str) -> dict:
    done = run_module("engine.evaluate", str(run), "--episodes", "4", "--json", str(out), *args)
    assert done.returncode == 0, done.stderr
    return json.loads(out.read_text())


@pytest.mark.slow
def test_export_is_small_and_evaluates_like_the_run(run_dir, tmp_path):
    out = tmp_path / "agent"
    done = run_module("engine.export", str(run_dir), str(out))
    assert done.returncode == 0, done.stderr
    exported = out / "agent.safetensors"
    source = run_dir / "checkpoints" / "best.pt"
    size = exported.stat().st_size
    full = torch.load(source, weights_only=False)
    step = full["counters"]["step"]
    assert done.stdout == (
        f"exported {exported}: {size} bytes, step {step} (from {source}, "
        f"{source.stat().st_size} bytes)\n"
    )
    # No optimizer moments (two per parameter), RNG state or replay: about a third of latest.pt.
    assert size < 0.5 * (run_dir / "checkpoints" / "latest.pt").stat().st_size
    assert sorted(p.name for p in out.rglob("*")) == ["agent.safetensors", "config.toml"]
    # Any safetensors reader opens it (no pickle): the agent's tensors, bit for bit.
    tensors = load_file(exported)
    assert tensors.keys() == full["agent"].keys()
    assert all(torch.equal(tensors[k], v) for k, v in full["agent"].items())
    state = read_agent_file(exported)
    assert set(state) == {"agent", "counters", "config"}
    assert set(state["counters"]) == {"step", "env_steps", "wall_time"}
    assert state["counters"] == {k: full["counters"][k] for k in state["counters"]}
    assert "optim" in full and "rng" in full  # what the export leaves out
    assert all(torch.equal(state["agent"][k], v) for k, v in full["agent"].items())
    assert load_config(out / "config.toml") == load_config(run_dir / "config.toml")
    # engine.evaluate reads the export as it reads the run: the same episodes, the same line.
    for seed in ([], ["--seed", "7"]):
        a = evaluate_json(run_dir, tmp_path / "run.json", *seed)
        b = evaluate_json(out, tmp_path / "export.json", *seed)
        assert b["checkpoint"] == str(exported) and a["checkpoint"] == str(source)
        assert a["step"] == b["step"] == step
        for key in ("returns", "lengths", "end", "seed", "policy", "task"):
            assert a[key] == b[key], key
    line_run = run_module("engine.evaluate", str(run_dir), "--episodes", "4", "--seed", "7").stdout
    line_out = run_module("engine.evaluate", str(out), "--episodes", "4", "--seed", "7").stdout
    assert line_out == line_run.replace(str(source), str(exported))
    # Without config.toml the checkpoint's own config is used.
    (out / "config.toml").unlink()
    assert evaluate_json(out, tmp_path / "noconf.json", "--seed", "7")["returns"] == a["returns"]


@pytest.mark.slow
def test_export_of_the_latest_checkpoint(run_dir, tmp_path, capsys):
    out = tmp_path / "latest"
    code, stdout, err = run_main([run_dir, out, "--checkpoint", "latest"], capsys)
    assert code == 0, err
    assert "step 12 (from " in stdout and str(run_dir / "checkpoints" / "latest.pt") in stdout
    assert read_agent_file(out / "agent.safetensors")["counters"]["step"] == 12


@pytest.mark.slow
def test_bad_input_is_one_line(run_dir, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "file").write_text("x")
    done = tmp_path / "done"
    assert run_main([run_dir, done], capsys)[0] == 0
    cases = [
        ([tmp_path / "nope", tmp_path / "o1"], "no such run directory"),
        ([tmp_path / "empty", tmp_path / "o2"], "no best.pt or latest.pt"),
        ([done, tmp_path / "o3", "--checkpoint", "latest"], "no latest.pt"),
        ([run_dir, done], f"{done}: already holds an agent"),
        ([run_dir, run_dir], "is the run directory itself"),
        ([run_dir, tmp_path / "file"], "exists and is not a folder"),
    ]
    for args, message in cases:
        code, stdout, err = run_main(args, capsys)
        assert code == 2 and stdout == "", (args, err)
        assert err.startswith("error: ") and message in err, (args, err)
        assert len(err.strip().splitlines()) == 1, err
    # Nothing was written where the export failed.
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()
    # The command line itself: the same line, status 2.
    failed = run_module("engine.export", str(tmp_path / "nope"), str(tmp_path / "o4"))
    assert failed.returncode == 2 and failed.stdout == ""
    assert failed.stderr == f"error: {tmp_path / 'nope'}: no such run directory\n"


@pytest.mark.slow
def test_agent_files_that_are_not_ones_and_earlier_exports(run_dir, tmp_path, capsys):
    """A damaged or foreign agent.safetensors is one line, status 2; an export of the earlier
    format (checkpoints/best.pt, weights-only torch.save) still plays."""
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "agent.safetensors").write_bytes(b"not a safetensors file")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    save_file({"w": torch.zeros(2)}, str(foreign / "agent.safetensors"))
    for agent, message in [(bad, "cannot read the agent file"), (foreign, "not an agent file")]:
        done = run_module("engine.evaluate", str(agent), "--episodes", "2")
        assert done.returncode == 2 and done.stdout == "", done.stderr
        assert done.stderr.startswith("error: ") and message in done.stderr, done.stderr
        assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    old = tmp_path / "old"
    full = torch.load(run_dir / "checkpoints" / "best.pt", weights_only=False)
    (old / "checkpoints").mkdir(parents=True)
    keep = dict(agent=full["agent"], counters=full["counters"], config=full["config"])
    torch.save(keep, old / "checkpoints" / "best.pt")
    a = evaluate_json(run_dir, tmp_path / "run.json", "--seed", "3")
    b = evaluate_json(old, tmp_path / "old.json", "--seed", "3")
    assert a["returns"] == b["returns"] and a["step"] == b["step"]
