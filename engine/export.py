"""A run's agent, small enough to commit: what evaluation needs and nothing else.

`python -m engine.export RUN_DIR OUT_DIR [--checkpoint best|latest]`

Writes OUT_DIR/config.toml (the run's resolved config) and OUT_DIR/agent.safetensors with the
agent's parameters and buffers, and the step / env_steps / wall_time counters and the config as
JSON in its metadata: no optimizer moments, RNG state or replay, so the file is about a third of a
training checkpoint, and safetensors, so loading an agent someone hands on runs no pickle (any
safetensors reader opens it). `python -m engine.evaluate OUT_DIR` and `python -m engine.dream
OUT_DIR` read it as they read a run directory (and still read the earlier exports'
checkpoints/best.pt). Errors print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from engine.rundir import AGENT_FILE, RunError, fail, read_checkpoint, write_agent_file

COUNTERS = ("step", "env_steps", "wall_time")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m engine.export",
        description="Write a run's agent (parameters, counters, config) for re-evaluation.",
    )
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("out_dir", metavar="OUT_DIR", help="new folder (or one without checkpoints)")
    p.add_argument(
        "--checkpoint",
        choices=["best", "latest"],
        help=f"which checkpoint (default best.pt, else latest.pt); written as {AGENT_FILE}",
    )
    return p.parse_args(argv)


def payload(state: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    """What is exported: the agent state, the counters evaluation reports, and the config."""
    agent = state["agent"]
    if not isinstance(agent, dict):
        raise RunError("the checkpoint's agent entry is not a state dict")
    counters = state.get("counters", {})
    return dict(
        agent=agent,
        counters={k: counters[k] for k in COUNTERS if k in counters},
        config=config,
    )


def export(run_dir: Path, out_dir: Path, which: str | None) -> tuple[Path, int, int, Path]:
    """Writes the export; returns (exported file, its size in bytes, its step, source file).
    Raises RunError with a one-line message."""
    from engine.config import save_toml, to_dict

    if out_dir.exists() and not out_dir.is_dir():
        raise RunError(f"{out_dir}: exists and is not a folder")
    if out_dir.is_dir() and run_dir.is_dir() and out_dir.resolve() == run_dir.resolve():
        raise RunError(f"{out_dir}: is the run directory itself; export to another folder")
    held = [out_dir / "checkpoints" / f"{n}.pt" for n in ("best", "latest")]
    held = [out_dir / AGENT_FILE, *held]
    held = [p for p in held if p.exists()]
    if held:
        raise RunError(f"{out_dir}: already holds an agent ({held[0]})")
    path, state, cfg = read_checkpoint(run_dir, which)
    exported = payload(state, to_dict(cfg))
    out = out_dir / AGENT_FILE
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        # config.toml first: an export killed in between leaves no agent file, so it can be rerun.
        save_toml(cfg, out_dir / "config.toml")
        size = write_agent_file(out, **exported)
    except OSError as err:
        raise RunError(f"{err.filename or out_dir}: {err.strerror or err}") from None
    return out, size, int(exported["counters"].get("step", 0)), path


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        out, size, step, source = export(Path(args.run_dir), Path(args.out_dir), args.checkpoint)
    except RunError as err:
        fail(str(err))
    src_size = source.stat().st_size
    print(f"exported {out}: {size} bytes, step {step} (from {source}, {src_size} bytes)")


if __name__ == "__main__":
    main()
