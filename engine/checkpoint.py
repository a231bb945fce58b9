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


def world_size_mismatch(path: Path, world: int) -> str | None:
    """Why the checkpoint at `path` cannot resume in a job of `world` ranks, or None. A checkpoint
    resumes with the world size that wrote it (each rank's replay shard and envs belong to its
    rank); a missing or unreadable one is left to the restore to report."""
    state = peek(path)
    if state is None or (saved := state.get("world_size", 1)) == world:
        return None
    how = f"torchrun --nproc_per_node {saved}" if saved > 1 else "one process (no torchrun)"
    return (
        f"{path}: written by a job of {saved} rank(s), this one has {world}: resume it with {how}"
    )


class ReplayFile:
    """A run's replay on disk beside its latest.pt (log.checkpoint_replay): replay.pt, or
    replay.rank<r>.pt for torchrun rank r's shard. It is staged as replay.pt.next and renamed
    once the checkpoint it goes with is written (`commit`): a run killed in between keeps the
    replay.pt of the checkpoint it resumes from, and a resume commits a staged replay of its
    checkpoint's step and drops any other (`settle`)."""

    def __init__(self, ckpt_dir: Path, rank: int):
        self.path = rank_path(ckpt_dir, "replay", rank)
        self.staged = staged_path(self.path)

    def stage(self, state: dict, step: int, env_steps: int) -> None:
        """Writes a replay's state_dict, tagged with the counters of the checkpoint it goes with."""
        save(self.staged, dict(step=step, env_steps=env_steps, **state))

    def commit(self) -> None:
        if self.staged.is_file():
            os.replace(self.staged, self.path)

    def settle(self, step: int, env_steps: int) -> None:
        """A replay.pt.next left by a run killed before its commit: the replay of the checkpoint
        just loaded (killed after latest.pt was written) is committed, any other dropped."""
        if self.staged.is_file():
            if _written_with(peek(self.staged) or {}, step, env_steps):
                os.replace(self.staged, self.path)
            else:
                self.staged.unlink()

    def restore(
        self, replay, step: int, env_steps: int, member_dir: Path | None = None
    ) -> tuple[Path, str | None]:
        """Loads the replay written with the checkpoint at (`step`, `env_steps`) into `replay`:
        (the file read, None), or (the file, why it was not). `member_dir`: a population
        member's directory resumed as a single run, which has no replay.pt of its own and
        takes its envs' slice of the population's replay."""
        self.settle(step, env_steps)
        path, member = self.path, None
        found = member_replay(member_dir) if member_dir and not path.is_file() else None
        if found is not None and found[0].is_file():
            path, member = found[0], found[1:]
        if not path.is_file():
            return path, f"no {path.name} beside the checkpoint"
        try:
            state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
            if not _written_with(state, step, env_steps):
                return path, (
                    f"{path.name} holds update {state['step']} (env step {state['env_steps']}), "
                    f"the checkpoint {step} ({env_steps})"
                )
            replay.load_state_dict(state if member is None else _member_slice(state, *member))
        except ValueError as e:
            return path, f"{path.name} does not fit this replay ({e})"
        except Exception as e:  # unreadable or not ours: the checkpoint itself is fine
            return path, f"{path.name} unreadable ({type(e).__name__})"
        return path, None


def _written_with(state: dict, step: int, env_steps: int) -> bool:
    """Whether a saved replay was written with the checkpoint at (step, env_steps): both
    counters, since during the random bootstrap every checkpoint is at update 0."""
    return (state.get("step"), state.get("env_steps")) == (step, env_steps)


def _member_slice(state: dict, member: int, members: int) -> dict:
    """A population replay's state_dict (its (C, members x n) storage is the (C, members, n)
    ring) cut down to one member's n envs, as a single run's replay holds them."""
    n = state["num_envs"] // members
    envs = slice(member * n, (member + 1) * n)
    data = {k: v[:, envs] for k, v in state["data"].items()}
    return dict(state, num_envs=n, data=data)
