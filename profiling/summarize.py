"""Where the time goes in a torch.profiler chrome trace written by the engine (general.trace):
time per engine phase (the NVTX / record_function ranges) and the top operators by self time.

    python -m profiling.summarize RUN_DIR/trace.json [--top 15]
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict

PHASES = ("collect", "replay/", "world_model/", "behavior/", "actor_critic/", "evaluate")


def load_events(path: str) -> list[dict]:
    with open(path) as f:
        trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    return [e for e in events if e.get("ph") == "X" and "dur" in e]


def phase_totals(events: list[dict]) -> dict[str, float]:
    """Wall time (ms) per engine range, summed over its occurrences."""
    out: dict[str, float] = defaultdict(float)
    for e in events:
        if e.get("name", "").startswith(PHASES) and e.get("cat") == "user_annotation":
            out[e["name"]] += e["dur"] / 1000
    return dict(out)


def top_ops(events: list[dict], top: int) -> list[tuple[str, float, int]]:
    """CPU operators by self time (ms): an op's duration minus its direct children's."""
    ops = sorted((e for e in events if e.get("cat") == "cpu_op"), key=lambda e: (e["tid"], e["ts"]))
    self_time: dict[str, float] = defaultdict(float)
    count: dict[str, int] = defaultdict(int)
    stack: list[tuple[dict, list[float]]] = []
    for e in ops:
        while stack and stack[-1][0]["ts"] + stack[-1][0]["dur"] <= e["ts"]:
            done, child = stack.pop()
            self_time[done["name"]] += (done["dur"] - child[0]) / 1000
        if stack:
            stack[-1][1][0] += e["dur"]
        stack.append((e, [0.0]))
        count[e["name"]] += 1
    for done, child in stack:
        self_time[done["name"]] += (done["dur"] - child[0]) / 1000
    ranked = sorted(self_time.items(), key=lambda kv: -kv[1])[:top]
    return [(name, ms, count[name]) for name, ms in ranked]


def top_kernels(events: list[dict], top: int) -> tuple[float, list[tuple[str, float, int]]]:
    """GPU kernels (cat "kernel") by device time (ms): the total and the top `top`."""
    total: dict[str, float] = defaultdict(float)
    count: dict[str, int] = defaultdict(int)
    for e in events:
        if e.get("cat") == "kernel":
            total[e["name"]] += e["dur"] / 1000
            count[e["name"]] += 1
    ranked = sorted(total.items(), key=lambda kv: -kv[1])[:top]
    return sum(total.values()), [(name, ms, count[name]) for name, ms in ranked]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m profiling.summarize", description=__doc__)
    p.add_argument("trace")
    p.add_argument("--top", type=int, default=15)
    args = p.parse_args(argv)
    events = load_events(args.trace)
    phases = phase_totals(events)
    updates = max(1, sum(1 for e in events if e.get("name") == "replay/sample"))
    total = sum(v for k, v in phases.items() if k not in ("collect", "evaluate"))
    print(f"{updates} learner updates, {total / updates:.1f} ms per update in named phases")
    print(f"{'phase':<34} {'ms/update':>10} {'share':>7}")
    for name, ms in sorted(phases.items(), key=lambda kv: -kv[1]):
        share = f"{100 * ms / total:6.1f}%" if name not in ("collect", "evaluate") else "      -"
        print(f"{name:<34} {ms / updates:>10.2f} {share}")
    print(f"\n{'operator (self time)':<40} {'ms total':>9} {'calls':>7}")
    for name, ms, n in top_ops(events, args.top):
        print(f"{name[:40]:<40} {ms:>9.1f} {n:>7}")
    gpu_ms, kernels = top_kernels(events, args.top)
    if kernels:
        launches = sum(1 for e in events if e.get("cat") == "kernel")
        print(
            f"\nGPU kernels: {gpu_ms / updates:.2f} ms of device time and "
            f"{launches / updates:.0f} launches per update"
        )
        print(f"{'kernel':<60} {'ms total':>9} {'calls':>7}")
        for name, ms, n in kernels:
            print(f"{name[:60]:<60} {ms:>9.2f} {n:>7}")


if __name__ == "__main__":
    main()
