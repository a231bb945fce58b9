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


# Below this width (d_hidden, times the members of a population, whose ops are K members' at
# once) a CPU update runs faster on one intra-op thread than on several: its ops are too small to
# split (each parallel region wakes sleeping OpenMP threads), and the other cores step the envs
# meanwhile. Measured alone on the 2-core CPU, one thread against two
# (benchmarks/results/cpu_threads_2026-12-05): lunarlander_d64 8x16 compiled bf16 183.4 and
# 190.3 ms per update against 293.4 and 303.6, eager 266.3 and 292.5 against 338.8 and 351.7;
# cartpole_d256 8x25 is faster on two, 893.9 against 994.5 ms compiled, 1,374.1 against
# 1,878.0 eager. d_hidden 128 (lunarlander_d64 with d_hidden=128) is faster on one thread
# compiled, 293.7 and 295.5 against 426.2 and 375.0 ms; eager it is a draw (475.9 and 519.5
# against 472.3 and 480.2). Populations of cartpole_d64 8x16, compiled bf16
# (benchmarks/results/population_cpu_2026-12-06): one agent 127.8 ms on one thread against
# 160.8 on two, K = 2 249.1 against 265.8, K = 4 517.7 against 437.3, K = 8 996.7 against 846.4.
ONE_THREAD_BELOW = 256


def choose_threads(cfg: Config, device: torch.device) -> tuple[int, str]:
    """torch's intra-op threads for a run on `device`: (the count to set, 0 to leave torch's
    default; why). general.threads when set; else OMP_NUM_THREADS when the environment sets it
    (engine.sweep --parallel and torchrun do); else, on a CPU, one thread for a model whose
    d_hidden x population.size is below ONE_THREAD_BELOW; else torch's default, one per core."""
    if cfg.general.threads:
        return cfg.general.threads, "general.threads"
    if os.environ.get("OMP_NUM_THREADS"):
        return 0, "OMP_NUM_THREADS"
    d, k = cfg.models.d_hidden, cfg.population.size
    if device.type != "cpu" or d >= ONE_THREAD_BELOW:
        return 0, "all available"
    width = f"d_hidden {d}" if k == 1 else f"d_hidden {d} x {k} members = {d * k}"
    if d * k < ONE_THREAD_BELOW:
        return 1, f"auto: {width} < {ONE_THREAD_BELOW} updates faster on one"
    return 0, f"auto: {width} >= {ONE_THREAD_BELOW}, all available"


def set_threads(cfg: Config, device: torch.device) -> str:
    """Sets the intra-op threads `choose_threads` picks; returns why, for `thread_summary`."""
    count, why = choose_threads(cfg, device)
    if count:
        torch.set_num_threads(count)
    return why


def thread_summary(stepping: str, how: str) -> str:
    """One line: the threads this run uses, and what they were chosen from (`how`, from
    set_threads); `stepping` is the env's own account of how it steps (VecEnv.stepping)."""
    wait = os.environ.get("OMP_WAIT_POLICY", "(OpenMP default)").lower()
    ranks = local_ranks()
    share = f" to each of {ranks} ranks on this host" if ranks > 1 else ""
    return (
        f"threads: {torch.get_num_threads()} intra-op ({how}; {available_cores()} cores "
        f"available{share}), OpenMP wait policy {wait}, env stepping: {stepping}"
    )
