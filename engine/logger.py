"""metrics.jsonl and the terminal progress bar."""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Any

from engine.checkpoint import atomic_write


class MetricsLog:
    """One JSON object per line, flushed as written so a killed run keeps what it logged."""

    def __init__(self, path: Path):
        self.path = path
        self.file = open(path, "a")

    def write(self, record: dict[str, Any]) -> None:
        clean = {k: _jsonable(v) for k, v in record.items()}
        self.file.write(json.dumps(clean) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


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
