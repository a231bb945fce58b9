"""The fast path, as switches around the eager fp32 reference: torch.compile of the hot functions,
bf16 autocast, Triton kernels (chosen when the agent is built) and CUDA-graph capture of the
whole learner update. A switch that cannot apply on this device is reported once and dropped."""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass

import torch
from torch import Tensor

from engine.config import GeneralConfig
from engine.nvtx import nvtx_range


@dataclass(frozen=True)
class FastOptions:
    compile: bool = False
    cuda_graphs: bool = False
    precision: str = "fp32"
    kernels: str = "torch"
    batched_wgrad: bool = False


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices in hardware (AVX-512 BF16 or AMX). Without
    either, oneDNN falls back to a slow path: on a 2-core AVX2-only AMD EPYC a cartpole_d256
    update (8 x 25) took 48,494 ms in eager bf16 against 2,305 ms in fp32, its block-GRU bmm
    (4 x 200 x 512 @ 512 x 1536) ~980 ms a call."""
    cpu = torch.cpu
    return bool(cpu._is_avx512_bf16_supported() or cpu._is_amx_tile_supported())


def resolve(general: GeneralConfig, device: torch.device) -> tuple[FastOptions, list[str]]:
    """The switches that apply on `device`, and a notice for each one dropped."""
    notices = []
    cuda = device.type == "cuda"
    precision = general.precision
    if precision == "bf16" and device.type == "cpu" and not cpu_has_native_bf16():
        notices.append(
            "notice: general.precision = bf16 needs a CPU with AVX-512 BF16 or AMX (this one "
            f"has {torch.backends.cpu.get_cpu_capability()}: bf16 matmuls run ~20x slower than "
            "fp32 on it); training in fp32"
        )
        precision = "fp32"
    graphs, kernels = general.cuda_graphs, general.kernels
    if graphs and not cuda:
        notices.append("notice: general.cuda_graphs needs CUDA; running without graphs")
        graphs = False
    if kernels == "triton":
        from kernels.twohot import HAS_TRITON

        if not cuda or not HAS_TRITON:
            why = "needs CUDA" if not cuda else "triton is not installed"
            notices.append(f"notice: general.kernels = triton {why}; using the torch kernels")
            kernels = "torch"
    opts = FastOptions(general.compile, graphs, precision, kernels, general.batched_wgrad)
    return opts, notices


def autocast(opts: FastOptions, device: torch.device):
    """bf16 autocast for forward passes; fp32 master weights, losses and optimizer stay fp32.
    The cast cache (each weight cast once per region, not per use: without it casts were 40% of
    a d256 CPU update) is off under CUDA graphs, where a cached cast would be stale on replay."""
    if opts.precision != "bf16":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=not opts.cuda_graphs)


def compile_agent(agent) -> None:
    """Compile per function, not the program: the T-step observe and H-step imagination loops
    call one compiled step graph each, and the loss tails are one graph each. A whole-update graph
    unrolls every step and took minutes to compile on a CPU."""
    wm, beh = agent.wm, agent.behavior
    for obj, name in (
        (wm, "encode"),
        (wm, "obs_step"),
        (wm, "obs_step_tapped"),
        (wm, "img_step"),
        (wm, "loss_terms"),
        (beh, "act"),
        (beh, "losses"),
        (agent, "_policy"),
    ):
        setattr(obj, name, torch.compile(getattr(obj, name)))
    # The optimizer is left out: it is already one fused kernel (torch._fused_adam_), which
    # has no fake-tensor implementation for the compiler to trace.


class Learner:
    """One learner update: sample a batch from replay and train on it. Eagerly, or replayed from
    a CUDA graph captured per behaviour phase (world-model-only warm-up, then full updates)."""

    def __init__(self, agent, replay, batch_size: int, length: int, opts: FastOptions):
        self.agent, self.replay = agent, replay
        self.batch_size, self.length = batch_size, length
        # Replay context: one more step whose stored posterior starts the sequence (when the
        # replay stores posteriors: the trainer's does under train.replay_context).
        self.context = int(agent.replay_context and "deter" in replay.data)
        self.graphs: dict[bool, tuple[torch.cuda.CUDAGraph, dict[str, Tensor]]] = {}
        self.use_graphs = opts.cuda_graphs

    def step(self, train_behavior: bool) -> dict[str, Tensor]:
        if not self.use_graphs:
            return self._run(train_behavior)
        self.capture(train_behavior)
        graph, out = self.graphs[train_behavior]
        graph.replay()
        return out

    def capture(self, train_behavior: bool) -> None:
        """Capture this phase's update graph now, if not yet: the agent's state is left as it was
        (no update applied). step() captures on first use and then replays once; a test that
        compares a graphed update with an eager one captures first, so both apply one update."""
        if train_behavior not in self.graphs:
            self.graphs[train_behavior] = self._capture(train_behavior)

    def _run(self, train_behavior: bool) -> dict[str, Tensor]:
        with nvtx_range("replay/sample"):
            t, e = self.replay.sample_indices(self.batch_size, self.length + self.context)
            batch = self.replay.gather(t, e)
        metrics, (deter, stoch) = self.agent.learn(batch, train_behavior)
        if self.context:
            # The fresher posteriors replace the stored ones (official replay_context).
            with nvtx_range("replay/write_context"):
                rows = (t[:, 1:], e[:, 1:])
                self.replay.write(*rows, {"deter": deter, "stoch": stoch.argmax(-1)})
        return metrics

    def _capture(self, train_behavior: bool):
        # Warm-up iterations (needed before capture: lazy init, compilation, allocator) are real
        # updates; the agent's state is restored after them so no update is applied twice.
        saved = _snapshot(self.agent)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):
                self._run(train_behavior)
        torch.cuda.current_stream().wait_stream(stream)
        _restore(self.agent, saved)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = self._run(train_behavior)
        return graph, out


def _snapshot(agent) -> dict:
    return {
        "agent": copy.deepcopy(agent.state_dict()),
        "optim": {k: copy.deepcopy(o.state_dict()) for k, o in agent.optimizers().items()},
    }


def _restore(agent, saved: dict) -> None:
    # In place: the graph will read these very tensors.
    with torch.no_grad():
        for k, v in agent.state_dict().items():
            v.copy_(saved["agent"][k])
    for k, o in agent.optimizers().items():
        o.load_state_dict(saved["optim"][k])
