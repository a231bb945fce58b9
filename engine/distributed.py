"""Data-parallel training on torch.distributed, launched by torchrun:

    torchrun --standalone --nproc_per_node 2 -m engine.run --config configs/cartpole_d64.toml

Each rank steps its own envs (seeds offset by rank), fills its own replay shard and samples its
own batch, so the global batch is B x world size. Parameters start as rank 0's (broadcast), the
gradients of every optimizer step are averaged in one all-reduce of a flat buffer, and every
host-side decision that steers training (when to start updating, the metric means the health and
early-stop checks read, the evaluation returns, a stop request) is reduced across ranks, so no
rank drifts. The return normaliser's percentiles are taken over the global batch (an all-gather
of the imagined returns). Rank 0 writes metrics and checkpoints; each rank its replay shard.

A population (engine.population, --population K) uses the same job differently: its members are
split over the ranks (K / world size each) and no gradient crosses ranks; the ranks only agree
on their loop steps, gather the members' evaluations and send a member's state for PBT.

Without torchrun (no WORLD_SIZE in the environment) nothing here is used: the single-process
path is the plain one. Under torchrun every world size, 1 included, runs this path (a world of 1
is how its cost is measured).

Collectives run on one process group, "cpu:gloo,cuda:nccl" on CUDA (gradients over NCCL, the
host-side decisions over gloo) and gloo on the CPU. A rank that dies makes the next collective
of the others fail at once (its sockets close); `PeerLost` then names the rank that is gone.
"""

from __future__ import annotations

import datetime
import os
import socket
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor

# A rank waits this long for the others at a collective before giving up (a live but stuck
# peer; a dead one fails the collective at once). Rank 0 writing a large replay checkpoint or
# every rank evaluating long episodes stays well inside it.
TIMEOUT_S = float(os.environ.get("ENGINE_DIST_TIMEOUT_S", "600"))
SEED_STRIDE = 100_003  # rank r's env and sampling seeds start at seed + r x this


class PeerLost(Exception):
    """Another rank is gone (killed, crashed) or a collective failed: one-line message."""


def launched() -> bool:
    """Whether this process was started by torchrun (or another env:// launcher)."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


class Distributed:
    """This rank's view of the job: rank, world size, device, and the collectives the trainer
    and the agent use. Built once per process by `init`."""

    def __init__(self, device_type: str):
        self.rank = int(os.environ["RANK"])
        self.world = int(os.environ["WORLD_SIZE"])
        self.local_rank = int(os.environ.get("LOCAL_RANK", self.rank))
        cuda = device_type == "cuda"
        if cuda:
            torch.cuda.set_device(self.local_rank)
        backend = "cpu:gloo,cuda:nccl" if cuda else "gloo"
        self.backend = "nccl" if cuda else "gloo"
        if not dist.is_initialized():
            dist.init_process_group(backend, timeout=datetime.timedelta(seconds=TIMEOUT_S))
        self.device = torch.device("cuda", self.local_rank) if cuda else torch.device("cpu")
        self._where: dict[int, str] = {}
        # One flat gradient buffer per gradient list (world model; actor + critic), made at the
        # first update and reused: no allocation per update, the same memory under a CUDA graph.
        self._flat: dict[tuple, tuple[Tensor, list[Tensor]]] = {}
        self._register()

    # ---- Failure reporting ------------------------------------------------------------------

    def _register(self) -> None:
        """Every rank's host and pid, so that a survivor can say which rank is gone."""
        me = f"{socket.gethostname()}:{os.getpid()}"
        everyone: list[str | None] = [None] * self.world
        dist.all_gather_object(everyone, me)
        self._where = dict(enumerate(everyone))

    def gone(self) -> list[int]:
        """Ranks on this host whose process no longer runs (or is a zombie)."""
        host, out = socket.gethostname(), []
        for rank, where in self._where.items():
            h, _, pid = where.rpartition(":")
            if rank == self.rank or h != host:
                continue
            try:
                state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            except (OSError, IndexError):
                state = "gone"
            if state in ("gone", "Z", "X"):
                out.append(rank)
        return out

    def lost(self, what: str, error: BaseException) -> PeerLost:
        """The PeerLost for a collective `what` that failed with `error`."""
        gone = self.gone()
        if gone:
            who = ", ".join(f"rank {r} (pid {self._where[r].rpartition(':')[2]})" for r in gone)
            verb = "is" if len(gone) == 1 else "are"
            return PeerLost(f"{who} {verb} gone: rank {self.rank} stopped at the {what}")
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        return PeerLost(f"rank {self.rank}: the {what} failed ({first[:160]})")

    def _call(self, what: str, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (RuntimeError, dist.DistError) as e:
            raise self.lost(what, e) from None

    # ---- Start: identical parameters --------------------------------------------------------

    @torch.no_grad()
    def broadcast_agent(self, agent) -> None:
        """Rank 0's parameters, buffers and optimizer state on every rank."""
        tensors = list(agent.state_dict().values())
        for opt in agent.optimizers().values():
            tensors += [opt.count, *opt.m, *opt.v]
        # Integer and flag buffers come from the config and are equal on every rank already.
        for t in tensors:
            if t.is_floating_point():
                self._call("start-up broadcast", dist.broadcast, t, 0)

    def attach(self, agent) -> None:
        """Makes `agent` data-parallel: rank 0's weights everywhere, gradients averaged over
        ranks, the return normaliser's percentiles over the global batch."""
        self.broadcast_agent(agent)
        agent.grad_reduce = self.average_grads
        agent.behavior.retnorm.gather = self.gather

    # ---- Inside the update ------------------------------------------------------------------

    def average_grads(self, grads: list[Tensor]) -> list[Tensor]:
        """The mean of every rank's gradients, in one all-reduce of a flat buffer (the same
        collective on every device; on CUDA it is captured inside the update's graph)."""
        key = tuple((tuple(g.shape), g.dtype, g.device) for g in grads)
        if key not in self._flat:
            flat = torch.empty(sum(g.numel() for g in grads), dtype=grads[0].dtype,
                               device=grads[0].device)  # fmt: skip
            parts = flat.split([g.numel() for g in grads])
            self._flat[key] = (flat, [part.view(g.shape) for part, g in zip(parts, grads)])
        flat, views = self._flat[key]
        torch._foreach_copy_(views, grads)
        self._call("gradient all-reduce", dist.all_reduce, flat)
        flat.div_(self.world)
        return views

    @torch.compiler.disable
    def gather(self, x: Tensor) -> Tensor:
        """Every rank's `x` stacked along a new first dim (W, ...), the same on every rank (the
        return normaliser's percentiles of the global batch). Left out of compiled graphs."""
        x = x.contiguous()
        out = torch.empty((self.world * x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device)
        self._call("return all-gather", _all_gather_single, out, x)
        return out.view(self.world, *x.shape)

    # ---- Host-side decisions (CPU tensors: gloo) --------------------------------------------

    def all_of(self, *flags: bool, what: str = "loop-step agreement") -> list[bool]:
        """For each flag, whether it holds on every rank: one small all-reduce."""
        t = torch.tensor([int(bool(f)) for f in flags], dtype=torch.int32)
        self._call(what, dist.all_reduce, t, op=dist.ReduceOp.MIN)
        return [bool(v) for v in t.tolist()]

    def mean(self, values: list[float], what: str = "metric reduction") -> list[float]:
        """The mean over ranks of each value (a NaN on any rank is a NaN on every rank)."""
        t = torch.tensor(values, dtype=torch.float64)
        self._call(what, dist.all_reduce, t)
        return (t / self.world).tolist()

    def gather_rows(self, x: Tensor, what: str = "evaluation gather") -> Tensor:
        """Every rank's 1-D CPU tensor `x` (same length on every rank), concatenated in rank
        order."""
        x = x.detach().cpu().double().contiguous()
        out = [torch.empty_like(x) for _ in range(self.world)]
        self._call(what, dist.all_gather, out, x)
        return torch.cat(out)

    def gather_objects(self, obj, what: str = "gather") -> list:
        """Every rank's picklable `obj`, in rank order, on every rank."""
        out: list = [None] * self.world
        self._call(what, dist.all_gather_object, out, obj)
        return out

    def broadcast_object(self, obj, what: str = "broadcast", src: int = 0):
        """Rank `src`'s picklable `obj` on every rank (tensors in it travel on the CPU)."""
        box = [obj]
        self._call(what, dist.broadcast_object_list, box, src)
        return box[0]

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


# torch 2.13 names it all_gather_single; earlier versions all_gather_into_tensor.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor

_CURRENT: Distributed | None = None


def init(device_type: str) -> Distributed | None:
    """The job's Distributed when launched by torchrun (made once), else None."""
    global _CURRENT
    if _CURRENT is None and launched():
        _CURRENT = Distributed(device_type)
    return _CURRENT


def current() -> Distributed | None:
    return _CURRENT


def shutdown() -> None:
    global _CURRENT
    if _CURRENT is not None:
        _CURRENT.close()
        _CURRENT = None
