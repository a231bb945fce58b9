"""Shared by the tests that drive the real command lines."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_module(module: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """`python -m module args...` from the repository root, output captured as text."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def tiny_run(run_dir: Path, *overrides: str) -> Path:
    """Trains configs/tiny.toml into run_dir (12 updates, a few seconds) and returns run_dir;
    `overrides` are --set values, e.g. 'env.name="LunarLander-v3"'."""
    sets = [arg for item in overrides for arg in ("--set", item)]
    args = ("--config", "configs/tiny.toml", "--run-dir", str(run_dir), *sets)
    done = run_module("engine.run", *args)
    assert done.returncode == 0, done.stderr
    return run_dir


class Killed(Exception):
    """A process kill in the middle of writing a checkpoint, raised by a kill_when wrapper."""


def kill_when(fn, condition):
    """fn, except that a call whose arguments meet condition raises Killed instead."""

    def wrapper(*args):
        if condition(*args):
            raise Killed
        return fn(*args)

    return wrapper


def run_until_killed(trainer, monkeypatch) -> None:
    """Trains until a kill_when wrapper raises Killed (pytest fails the test if none does), then
    closes the trainer and undoes the patches, as a restarted process would find things."""
    import pytest

    try:
        with pytest.raises(Killed):
            trainer.run()
    finally:
        trainer.close()
    monkeypatch.undo()
