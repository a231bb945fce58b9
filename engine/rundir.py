"""A run directory read back: its checkpoint and config (`read_checkpoint`), and its agent ready
to play with envs of its task (`load_run`), for engine.evaluate, engine.dream and engine.export.
RUN_DIR is a training run's directory or an agent written by `python -m engine.export`.

torch is imported inside the functions that need it.
"""

from __future__ import annotations

import pickle
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

if TYPE_CHECKING:
    import torch

    from engine.agent import Agent
    from engine.config import Config


class RunError(Exception):
    """A run directory or checkpoint that cannot be used: one-line message."""


@dataclass
class LoadedRun:
    cfg: Config
    agent: Agent
    path: Path  # the checkpoint file
    step: int  # the update it was saved at
    device: torch.device
    env: Any  # the envs to play in (the caller closes them)
    seed: int  # their seed


AGENT_FILE = "agent.safetensors"
"""An exported agent's weights (engine.export): safetensors, so reading one runs no pickle."""
AGENT_FORMAT = "dreamerv3-engine agent 1"


def write_agent_file(path: Path, agent: dict[str, Any], counters: dict, config: dict) -> int:
    """`agent`'s tensors as safetensors at `path` (atomically), the counters and the config as
    JSON in its metadata; returns the file's size in bytes."""
    import json

    import torch
    from safetensors.torch import save

    from engine.checkpoint import atomic_write

    odd = [k for k, v in agent.items() if not torch.is_tensor(v)]
    if odd:
        raise RunError(f"the agent state holds non-tensor entries ({', '.join(odd[:3])})")
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in agent.items()}
    meta = dict(format=AGENT_FORMAT, counters=json.dumps(counters), config=json.dumps(config))
    # As bytes, then written like every other file (safetensors' own save_file makes it 0600).
    atomic_write(path, lambda tmp: tmp.write_bytes(save(tensors, metadata=meta)))
    return path.stat().st_size


def read_agent_file(path: Path) -> dict[str, Any]:
    """An agent file back as a checkpoint-like dict: agent (tensors on the CPU), counters,
    config. Raises RunError (one line) for a file that is not one."""
    import json

    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            if meta.get("format") != AGENT_FORMAT:
                kind = meta.get("format")
                raise RunError(f"{path}: not an agent file of this engine (format {kind!r})")
            agent = {k: f.get_tensor(k) for k in f.keys()}
        counters, config = json.loads(meta["counters"]), json.loads(meta["config"])
        return dict(agent=agent, counters=counters, config=config)
    except (SafetensorError, KeyError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise RunError(f"{path}: cannot read the agent file: {first}") from None


def read_checkpoint(run_dir: Path, which: str | None) -> tuple[Path, dict[str, Any], Config]:
    """`run_dir`'s checkpoint `which` ("best" or "latest"; default best.pt, else latest.pt, else
    an exported agent's agent.safetensors): its path, its contents (on the CPU) and the run's
    config (RUN_DIR/config.toml, else the one saved in the checkpoint). Only the "agent" entry
    is required (and "counters" read if present): an agent written by engine.export has no
    optimizer, RNG or replay state. Raises RunError with a one-line message."""
    import torch

    from engine import checkpoint
    from engine.config import ConfigError, from_dict, load_config

    if not run_dir.is_dir():
        raise RunError(f"{run_dir}: no such run directory")
    ckpts = run_dir / "checkpoints"
    names = [which] if which else ["best", "latest"]
    found = [ckpts / f"{n}.pt" for n in names if (ckpts / f"{n}.pt").is_file()]
    if not which and (run_dir / AGENT_FILE).is_file():
        found.append(run_dir / AGENT_FILE)
    if not found:
        also = "" if which else f", and no {AGENT_FILE}"
        raise RunError(f"{ckpts}: no {' or '.join(n + '.pt' for n in names)}{also}")
    path = found[0]
    try:
        # On the CPU: load_state_dict copies onto the agent's device, whichever that is.
        if path.name == AGENT_FILE:
            state = read_agent_file(path)
        else:
            state = checkpoint.load(path, torch.device("cpu"))
        if not isinstance(state, dict) or "agent" not in state:
            raise RunError(f"{path}: not a checkpoint of this engine (no agent state)")
        if (run_dir / "config.toml").is_file():
            cfg = load_config(run_dir / "config.toml")
        else:
            cfg = from_dict(state["config"], str(path))
    except ConfigError as err:
        raise RunError(str(err)) from None
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError, KeyError, TypeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise RunError(f"{path}: cannot read the checkpoint: {first}") from None
    return path, state, cfg


def load_run(
    run_dir: Path,
    which: str | None,
    device_pref: str | None,
    num_envs: int,
    seed: int | None,
    seed_offset: int,
    processes: bool = False,
) -> LoadedRun:
    """The agent of `run_dir`'s checkpoint `which` ("best" or "latest"; default best.pt, else
    latest.pt; see read_checkpoint), in eval mode, eager fp32 on the plain torch kernels (the
    parameters are the same on every path), and `num_envs` envs of the run's task to play in,
    seeded `seed` (default general.seed + seed_offset); worker processes if `processes` and the
    run used them. Prints the device notice, if any; raises RunError with a one-line message."""
    from engine.agent import Agent
    from engine.device import resolve_device, set_threads
    from engine.envs import EnvError, make_env

    path, state, cfg = read_checkpoint(run_dir, which)
    device, notice = resolve_device(device_pref or cfg.general.device)
    if notice:  # no CUDA device: training-time notice, printed once here
        print(notice, file=sys.stderr)
    set_threads(cfg, device)
    e = cfg.env
    seed = cfg.general.seed + seed_offset if seed is None else seed
    try:
        env = make_env(
            e.name,
            e.backend,
            num_envs,
            seed,
            cfg.image_size,
            e.vector,
            processes=processes and e.processes,
        )
    except EnvError as err:
        raise RunError(str(err)) from None
    agent = Agent(cfg, env.vector_dim, env.num_actions, device)
    try:
        agent.load_state_dict(state["agent"])
    except (RuntimeError, KeyError) as err:
        env.close()
        first = str(err).strip().splitlines()[0]
        raise RunError(f"{path}: does not match {run_dir / 'config.toml'}: {first}") from None
    agent.eval()
    step = int(state.get("counters", {}).get("step", 0))
    return LoadedRun(cfg, agent, path, step, device, env, seed)


def fail(message: str, code: int = 2) -> NoReturn:
    """A command's error: one line on stderr, then exit with `code`."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)
