"""Where a run computes: the device a preference resolves to, the memory free on it, and the
threads the run uses."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import torch

from engine.envs import available_cores, local_ranks

if TYPE_CHECKING:
    from engine.config import Config


def resolve_device(pref: str) -> tuple[torch.device, str | None]:
    """Returns the device and a notice to print when the preference could not be met."""
    if pref == "cpu":
        return torch.device("cpu"), None
    if torch.cuda.is_available():
        return torch.device("cuda"), None
    what = "general.device = cuda" if pref == "cuda" else "device auto"
    return torch.device("cpu"), f"notice: {what}: no CUDA device found, training on the CPU"


def free_memory(device: torch.device) -> int:
    """Bytes free on `device` (CUDA: the driver's count; CPU: MemAvailable), 0 if unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def thread_summary(cfg: Config, stepping: str) -> str:
    """One line: the threads this run uses, and what they were chosen from; `stepping` is the
    env's own account of how it steps (VecEnv.stepping)."""
    how = "general.threads" if cfg.general.threads else "all available"
    wait = os.environ.get("OMP_WAIT_POLICY", "(OpenMP default)").lower()
    ranks = local_ranks()
    share = f" to each of {ranks} ranks on this host" if ranks > 1 else ""
    return (
        f"threads: {torch.get_num_threads()} intra-op ({how}; {available_cores()} cores "
        f"available{share}), OpenMP wait policy {wait}, env stepping: {stepping}"
    )
