"""Checkpoints: everything needed to continue a run, written atomically (temp file + rename), so
a process killed mid-write never leaves a truncated checkpoint behind."""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch


def atomic_write(path: Path, write) -> None:
    """Call write(tmp_path), fsync, then rename over `path` (atomic on POSIX)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def rng_state() -> dict[str, Any]:
    state = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(path: Path, payload: dict[str, Any]) -> int:
    """Write a checkpoint; returns its size in bytes."""
    atomic_write(path, lambda tmp: torch.save(payload, tmp))
    return path.stat().st_size


def load(path: Path, device: torch.device) -> dict[str, Any]:
    # weights_only=False: the payload holds numpy/python RNG states, written by this engine.
    return torch.load(path, map_location=device, weights_only=False)


def peek(path: Path) -> dict[str, Any] | None:
    """A checkpoint's contents memory-mapped on the CPU, to read a field or two without loading
    its tensors; None when it is missing or unreadable."""
    try:
        return torch.load(path, map_location="cpu", mmap=True, weights_only=False)
    except Exception:
        return None


def staged_path(path: Path) -> Path:
    """Where a checkpoint of a multi-file set is written before the set is committed:
    NAME.pt.next, renamed over NAME.pt once every file of the set is on disk."""
    return path.with_name(path.name + ".next")


def rank_path(directory: Path, name: str, rank: int) -> Path:
    """A torchrun rank's own file of a checkpoint set: NAME.pt on rank 0, NAME.rank<r>.pt on
    rank r (replay shards, a population's counters)."""
    return directory / (f"{name}.pt" if rank == 0 else f"{name}.rank{rank}.pt")


def member_replay(run_dir: Path) -> tuple[Path, int, int] | None:
    """Where a population member's replay lives when its directory (POP/member_XX) is resumed as
    a single run: (the population's replay file holding its envs, its index among that file's
    members, how many members the file holds). None when run_dir is not a member of a population
    whose checkpoint is readable. Under torchrun each rank wrote its own members' envs
    (replay.pt on rank 0, replay.rank<r>.pt)."""
    name, pop = run_dir.name, run_dir.parent / "checkpoints"
    if not (name.startswith("member_") and name[7:].isdigit()):
        return None
    state = peek(pop / "population.pt")
    if state is None:
        return None
    try:
        size, world = state["config"]["population"]["size"], state.get("world_size", 1)
    except (KeyError, TypeError):
        return None
    member, per_rank = int(name[7:]), size // world
    if not per_rank or member >= size:
        return None
    rank, index = divmod(member, per_rank)
    return rank_path(pop, "replay", rank), index, per_rank
