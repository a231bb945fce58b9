"""Environment observations to the device, once per step.

On CUDA each observation is copied into a page-locked (pinned) host buffer and sent with a
non-blocking copy, so the upload overlaps whatever the GPU is doing. Two buffer sets alternate;
before a set is refilled, the event recorded after its last upload is waited on, so a copy still
in flight is never overwritten. On the CPU the arrays are wrapped without a copy."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


class ObsUploader:
    def __init__(self, device: torch.device, slots: int = 2):
        self.device = device
        self.pinned = device.type == "cuda"
        self._bufs: list[dict[str, Tensor]] = [{} for _ in range(slots)]
        self._events: list[torch.cuda.Event | None] = [None] * slots
        self._next = 0

    def __call__(self, obs: dict[str, np.ndarray]) -> dict[str, Tensor]:
        if not self.pinned:
            return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in obs.items()}
        i = self._next
        self._next = (i + 1) % len(self._bufs)
        if self._events[i] is not None:
            self._events[i].synchronize()  # that set's previous upload has left the buffers
        bufs, out = self._bufs[i], {}
        for k, v in obs.items():
            src = torch.from_numpy(np.ascontiguousarray(v))
            buf = bufs.get(k)
            if buf is None or buf.shape != src.shape or buf.dtype != src.dtype:
                buf = bufs[k] = torch.empty(src.shape, dtype=src.dtype, pin_memory=True)
            buf.copy_(src)
            out[k] = buf.to(self.device, non_blocking=True)
        event = self._events[i] = torch.cuda.Event()
        event.record()
        return out
