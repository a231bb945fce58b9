"""NVTX ranges for Nsight Systems and the profiling window (general.profile = "START:STOP").

Ranges are opened at the Python level only, around calls into compiled functions, never inside
them (a range call inside a compiled region would break its graph). Under CUDA graphs the ranges
mark the capture; replays show as graph launches (nsys --cuda-graph-trace=node lists the kernels).
Without CUDA a range only names its span for torch.profiler (a few microseconds)."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

_push = _pop = None
if torch.cuda.is_available():
    try:  # the nvtx package, when installed; torch's own binding otherwise
        import nvtx as _nvtx

        _push, _pop = (lambda name: _nvtx.push_range(name)), _nvtx.pop_range
    except ImportError:
        _push, _pop = torch.cuda.nvtx.range_push, torch.cuda.nvtx.range_pop


@contextlib.contextmanager
def nvtx_range(name: str):
    """An NVTX range (CUDA) that also names the span in torch.profiler traces (any device)."""
    if _push is not None:
        _push(name)
    try:
        with torch.profiler.record_function(name):
            yield
    finally:
        if _pop is not None:
            _pop()


class ProfileWindow:
    """Starts profiling at learner step `start` and stops at `stop`: cudaProfilerStart/Stop for
    `nsys --capture-range=cudaProfilerApi`, and optionally a torch.profiler chrome trace."""

    def __init__(self, window: tuple[int, int] | None, trace_path: Path | None):
        self.window, self.trace_path = window, trace_path
        self.torch_prof = None
        self.active = False

    def at_step(self, step: int) -> None:
        """Call before the update that will become learner step `step + 1`."""
        if self.window is None:
            return
        start, stop = self.window
        if step == start and not self.active:
            self._start()
        elif step == stop and self.active:
            self.stop()

    def _start(self) -> None:
        self.active = True
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.profiler.start()
        if self.trace_path is not None:
            acts = [torch.profiler.ProfilerActivity.CPU]
            if torch.cuda.is_available():
                acts.append(torch.profiler.ProfilerActivity.CUDA)
            self.torch_prof = torch.profiler.profile(activities=acts, record_shapes=False)
            self.torch_prof.__enter__()

    def stop(self) -> None:
        if not self.active:
            return
        self.active = False
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.profiler.stop()
        if self.torch_prof is not None:
            self.torch_prof.__exit__(None, None, None)
            self.torch_prof.export_chrome_trace(str(self.trace_path))
            self.torch_prof = None
