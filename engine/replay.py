"""Replay: a ring buffer preallocated on the training device, sampled as fixed-length sequences.

Storage is time-major per environment, (C, num_envs, ...) with C = capacity // num_envs, so every
environment's stream is contiguous in time. A sequence may cross episode boundaries (`is_first`
resets the RSSM inside it) but never the write head, where the stream jumps from new to old data.
Images stay uint8. Sampling uses only device tensors: no host sync, so it can run inside a CUDA
graph.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

Spec = dict[str, tuple[tuple[int, ...], torch.dtype]]


def transition_spec(
    image_size: int, vector_dim: int, context: tuple[int, int] | None = None
) -> dict[str, tuple[tuple, torch.dtype]]:
    """Field -> (shape, dtype) of one stored environment step: image (uint8 HWC) when
    image_size > 0, vector when vector_dim > 0, and with `context` = (deter size, latents) the
    step's posterior (train.replay_context): deter in bf16 (half the memory; it only seeds the
    next sequence) and the latents' class indices."""
    spec = {
        "action": ((), torch.int64),
        "reward": ((), torch.float32),
        "is_first": ((), torch.bool),
        "is_last": ((), torch.bool),
        "is_terminal": ((), torch.bool),
    }
    if image_size:
        spec["image"] = ((image_size, image_size, 3), torch.uint8)
    if vector_dim:
        spec["vector"] = ((vector_dim,), torch.float32)
    if context:
        spec["deter"] = ((context[0],), torch.bfloat16)
        spec["stoch"] = ((context[1],), torch.int16)
    return spec


def replay_bytes(spec: dict, capacity: int) -> int:
    """Bytes a replay of `capacity` steps with fields `spec` (transition_spec) takes."""
    per_step = sum(
        math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        for shape, dtype in spec.values()
    )
    return per_step * capacity


def _leading_rows(buf: Tensor, rows: int) -> Tensor:
    """buf[:rows] on the CPU for torch.save. A CUDA buffer is copied to the host. A CPU one is
    not copied at all: the rows become a tensor over a slice of the buffer's storage, so that
    torch.save writes those rows and not the whole preallocated buffer (which it would for the
    view buf[:rows]). A copy of a nearly full 12 GB replay beside the replay itself is what got a
    3-member LunarLander population killed for memory on a 24 GB machine."""
    if buf.device.type != "cpu":
        return buf[:rows].to("cpu")
    assert buf.is_contiguous()
    size = buf.element_size()
    start, nbytes = buf.storage_offset() * size, rows * buf.stride(0) * size
    storage = buf.untyped_storage()[start : start + nbytes]
    return torch.empty(0, dtype=buf.dtype).set_(storage, 0, (rows, *buf.shape[1:]))


class Replay:
    """`members` > 1: a population's replay, one ring over all members' envs (member k owns envs
    k*n .. k*n + n - 1, n = num_envs / members; the (C, K*n) storage is the (C, K, n) ring) and
    every member samples only its own envs' data."""

    def __init__(
        self, capacity: int, num_envs: int, spec: Spec, device: torch.device, members: int = 1
    ):
        if members < 1 or num_envs % members:
            raise ValueError(f"{num_envs} envs do not split into {members} members")
        self.num_envs, self.members = num_envs, members
        self.slots = capacity // num_envs
        self.device = device
        self.data = {
            k: torch.zeros(self.slots, num_envs, *shape, dtype=dtype, device=device)
            for k, (shape, dtype) in spec.items()
        }
        self.count = 0  # steps written per environment (host copy, known without a sync)
        self._count = torch.zeros((), dtype=torch.int64, device=device)

    def __len__(self) -> int:
        """Environment steps held (all environments together)."""
        return min(self.count, self.slots) * self.num_envs

    def add(self, step: dict[str, Tensor]) -> None:
        """One time step for every environment: each value is (num_envs, ...)."""
        i = self.count % self.slots
        for k, buf in self.data.items():
            buf[i].copy_(step[k], non_blocking=True)
        self.count += 1
        self._count.add_(1)

    def state_dict(self) -> dict:
        """The rows written so far, in place (the ring order is kept), and the write count."""
        held = min(self.count, self.slots)
        data = {k: _leading_rows(v, held) for k, v in self.data.items()}
        return dict(count=self.count, slots=self.slots, num_envs=self.num_envs, data=data)

    def load_state_dict(self, state: dict) -> None:
        """Restores what state_dict saved; ValueError names the first thing that does not fit
        this buffer (capacity, number of envs, a field's shape or dtype)."""
        for key in ("slots", "num_envs"):
            if state[key] != getattr(self, key):
                raise ValueError(f"{key} {state[key]} != {getattr(self, key)}")
        if set(state["data"]) != set(self.data):
            raise ValueError(f"fields {sorted(state['data'])} != {sorted(self.data)}")
        held = min(state["count"], self.slots)
        for k, v in state["data"].items():
            buf = self.data[k]
            if v.shape != (held, *buf.shape[1:]) or v.dtype != buf.dtype:
                raise ValueError(f"{k}: {tuple(v.shape)} {v.dtype} does not fit {tuple(buf.shape)}")
        for k, v in state["data"].items():
            self.data[k][:held].copy_(v)
        self.count = state["count"]
        self._count.fill_(self.count)

    def can_sample(self, length: int) -> bool:
        return min(self.count, self.slots) >= length

    def sample(
        self, batch: int, length: int, generator: torch.Generator | None = None
    ) -> dict[str, Tensor]:
        """Uniform over every window of `length` steps that does not cross the write head.
        Returns {key: (batch, length, ...)}; with members, (members x batch, length, ...): rows
        k*batch .. k*batch + batch - 1 are member k's, from its own envs."""
        return self.gather(*self.sample_indices(batch, length, generator))

    def sample_indices(
        self, batch: int, length: int, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        """The rows (slot t, env e) of `sample`'s windows, each (members x batch, length)."""
        held = torch.clamp(self._count, max=self.slots)
        oldest = self._count - held  # logical index of the oldest step held
        starts = held - length + 1  # valid window starts per environment
        rows, per_member = self.members * batch, self.num_envs // self.members
        u = torch.rand(rows, device=self.device, generator=generator)
        start = oldest + (u * starts).long().clamp(max=starts - 1)
        env = torch.randint(per_member, (rows,), device=self.device, generator=generator)
        if self.members > 1:  # every member's rows from its own envs
            member = torch.arange(rows, device=self.device) // batch
            env = env + member * per_member
        t = (start[:, None] + torch.arange(length, device=self.device)) % self.slots  # (R, T)
        return t, env[:, None].expand(rows, length)

    def gather(self, t: Tensor, e: Tensor) -> dict[str, Tensor]:
        return {k: v[t, e] for k, v in self.data.items()}

    def write(self, t: Tensor, e: Tensor, values: dict[str, Tensor]) -> None:
        """Overwrites fields of stored rows (the posteriors of replay context), no host sync.
        Where a row appears twice (overlapping windows) one of the values wins."""
        for k, v in values.items():
            self.data[k].index_put_((t, e), v.to(self.data[k].dtype))
