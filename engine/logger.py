"""metrics.jsonl and the terminal progress bar."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from engine.checkpoint import atomic_write
from engine.health import TrainingError


class MetricsLog:
    """One JSON object per line, flushed as written so a killed run keeps what it logged; with a
    TensorBoard `writer` (log.tensorboard), train and eval lines as scalars too."""

    def __init__(self, path: Path, writer: Any = None):
        self.path, self.writer = path, writer
        self.file = open(path, "a")

    def write(self, record: dict[str, Any]) -> None:
        clean = {k: _jsonable(v) for k, v in record.items()}
        self.file.write(json.dumps(clean) + "\n")
        self.file.flush()
        kind = record["type"]
        if self.writer is None or kind not in ("train", "eval"):
            return
        for k, v in record.items():
            if k not in ("type", "step") and isinstance(v, int | float) and not isinstance(v, bool):
                self.writer.add_scalar(f"{kind}/{k}", v, record["step"])
        self.writer.flush()

    def close_writer(self) -> None:
        """Ends the TensorBoard writer (again: nothing). A run does so on every way out, health
        stops included; the file stays open for what a population writes after its run."""
        if self.writer is not None:
            self.writer.close()

    def close(self) -> None:
        self.file.close()
        self.close_writer()


class Meter:
    """The training metrics of the updates since the last train line, summed on the device so
    that reading them (`means`) is the one host sync per line, and the update and env-step rates
    over the same stretch (`rates`)."""

    def __init__(self):
        self.sums: dict[str, tuple[Tensor, int]] = {}
        self.since = (time.perf_counter(), 0, 0)

    def __bool__(self) -> bool:
        return bool(self.sums)

    def start(self, step: int, env_steps: int) -> None:
        self.since = (time.perf_counter(), step, env_steps)

    def add(self, metrics: dict[str, Tensor]) -> None:
        """Adds one update's metrics in place: no tensor allocated per update once a metric has
        its sum (the first is a copy: a CUDA graph's outputs are overwritten by its next replay)."""
        for k, v in metrics.items():
            if k in self.sums:
                total, count = self.sums[k]
                self.sums[k] = (total.add_(v.detach()), count + 1)
            else:
                self.sums[k] = (v.detach().float().clone(), 1)

    def means(self) -> dict[str, Any]:
        """Each metric's mean over the updates (a list per member for a population's (K,)
        metrics), all in one transfer."""
        keys = list(self.sums)
        values = torch.stack([self.sums[k][0] / self.sums[k][1] for k in keys]).cpu().tolist()
        return dict(zip(keys, values))

    def rates(self, step: int, env_steps: int) -> tuple[float, float, float]:
        """(now, updates per second, env steps per second) since the last call (or `start`),
        which closes the stretch: its sums are cleared and the next one begins."""
        now = time.perf_counter()
        t0, step0, env0 = self.since
        self.since = (now, step, env_steps)
        self.sums.clear()
        seconds = max(now - t0, 1e-9)
        return now, (step - step0) / seconds, (env_steps - env0) / seconds


class NullLog:
    """metrics.jsonl of a rank other than 0: rank 0 writes the job's."""

    def write(self, record: dict) -> None:
        pass

    def close_writer(self) -> None:
        pass

    def close(self) -> None:
        pass


TENSORBOARD_MISSING = (
    "log.tensorboard = true needs the tensorboard package: pip install tensorboard"
)


def require_tensorboard() -> type:
    """torch's SummaryWriter, or a TrainingError naming the missing package (checked at start,
    so a run does not fail at its first log line)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise TrainingError(TENSORBOARD_MISSING) from None
    return SummaryWriter


def _jsonable(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no NaN/inf; keep it visible rather than invalid
    return v


def truncate_metrics(path: Path, step: int) -> int:
    """Keep the lines logged up to learner step `step` (a resumed run continues from its last
    checkpoint, so later lines would be logged twice). Returns the number of lines dropped."""
    if not path.exists():
        return 0
    keep, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:  # a line cut off by a kill
            dropped += 1
            continue
        if rec.get("step", 0) <= step:
            keep.append(line)
        else:
            dropped += 1
    atomic_write(path, lambda tmp: tmp.write_text("".join(x + "\n" for x in keep)))
    return dropped


class Progress:
    """tqdm bar over learner steps on a TTY; silent otherwise."""

    def __init__(self, total: int, initial: int, enabled: bool, lines: bool = True):
        """`lines` False: silent altogether (a torchrun rank other than 0)."""
        self.bar, self.lines = None, lines
        if enabled and lines and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(
                total=total, initial=initial, unit="upd", dynamic_ncols=True, file=sys.stderr
            )

    def update(self, step: int, **fields: Any) -> None:
        if self.bar is None:
            return
        self.bar.n = step
        self.bar.set_postfix(fields, refresh=False)
        self.bar.refresh()

    def write(self, text: str, every_rank: bool = False) -> None:
        """`every_rank`: printed by a torchrun rank other than 0 too (a rare event of its own)."""
        if not self.lines and not every_rank:
            return
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def write_text_atomic(path: Path, text: str) -> None:
    """Temp file in the same folder, fsync, rename: readers never see a half-written file."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:  # a line cut off by a kill
            continue
        if isinstance(rec, dict):
            out.append(rec)
    return out


def md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def fmt_value(v: Any) -> str:
    """A table cell: '-' for none, 4 significant digits for a float."""
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)
