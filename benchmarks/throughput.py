"""Learner throughput per fast-path mode: updates/s, replayed steps/s, ms/update, compile time,
peak memory. No environment: the replay buffer is filled with synthetic episodes.

    python -m benchmarks.throughput --config configs/cartpole_d256.toml \
        --modes eager,compile,graphs,full --updates 50 --json out.json
    python -m benchmarks.throughput --config configs/cartpole_d64.toml --modes eager,compile \
        --population 1,4,8,32 --shapes config

With --population, each K measures the update of K agents in one process (engine.population,
B x T per member): agent-updates per second and the kernels one update runs per agent (ATen
operators dispatched on the CPU, plus the kernels inductor generated when compiled; kernels
launched on CUDA), the CPU-measurable figure that predicts a population's gain on a GPU.
--separate P adds, per mode, shape and K, P such processes at once, each with cores / P threads,
the way `engine.sweep --parallel P` runs them (agent-updates/s summed over the processes): with
K = 1 the separate runs a population replaces, with K > 1 `engine.sweep --population K
--parallel P`.

Each (mode, shape) runs in a fresh process, so compile caches and peak memory do not leak from
one measurement into the next. Modes that cannot apply on this machine (graphs or Triton without
CUDA) are run with what does apply, and the record says which switches were dropped.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from engine.config import ConfigError, add_set_option, load_config

MODES = {
    "eager": [],
    "compile": ["general.compile=true"],
    "bf16": ["general.precision=bf16"],
    "triton": ["general.kernels=triton"],
    "graphs": ["general.cuda_graphs=true"],
    "batched": ["general.batched_wgrad=true"],
    "compile_bf16": ["general.compile=true", "general.precision=bf16"],
    "cpu_fast": ["general.compile=true", "general.precision=bf16", "general.batched_wgrad=true"],
    # The full mode without torch.compile: eager kernels captured in CUDA graphs. The second
    # H200 run compiled a population of 32 (d256) for 278 s before its first update.
    "graphs_bf16": [
        "general.cuda_graphs=true",
        "general.precision=bf16",
        "general.kernels=triton",
        "general.batched_wgrad=true",
    ],
    "full": [
        "general.compile=true",
        "general.cuda_graphs=true",
        "general.precision=bf16",
        "general.kernels=triton",
        "general.batched_wgrad=true",
    ],
}
WARMUP = 3  # compile / capture happen in these


def synthetic_replay(
    cfg, agent_device, num_actions: int, vector_dim: int, steps: int, members: int = 1
):
    """Episodes of random length with smooth frames, written the way the trainer writes them
    (`members` > 1: a population's replay, num_envs per member)."""
    import torch

    from engine.replay import Replay, transition_spec

    n = cfg.env.num_envs * members
    s = cfg.image_size
    latents = cfg.models.encoder.mlp.latents
    context = (cfg.deter, latents) if cfg.train.replay_context else None
    spec = transition_spec(s, vector_dim if cfg.env.vector else 0, context)
    capacity = max(steps * n, cfg.train.replay_buffer_size * members)
    replay = Replay(capacity, n, spec, agent_device, members=members)
    g = torch.Generator().manual_seed(0)
    age = torch.zeros(n, dtype=torch.int64)
    for _ in range(steps):
        last = torch.rand(n, generator=g) < 0.02
        step = {
            "action": torch.randint(num_actions, (n,), generator=g),
            "reward": torch.ones(n),
            "is_first": age == 0,
            "is_last": last,
            "is_terminal": last,
        }
        if s:
            ramp = (torch.arange(s) * 3 + age[:, None] * 5) % 256
            step["image"] = ramp[:, None, :, None].expand(n, s, s, 3).to(torch.uint8)
        if cfg.env.vector:
            step["vector"] = torch.randn(n, vector_dim, generator=g)
        if context:
            step["deter"] = torch.randn(n, cfg.deter, generator=g)
            step["stoch"] = torch.randint(cfg.models.encoder.mlp.latent_categories, (n, latents))
        replay.add({k: v.to(agent_device) for k, v in step.items()})
        age = torch.where(last, 0, age + 1)
    return replay


def measure(
    config: str,
    mode: str,
    batch: int,
    length: int,
    updates: int,
    trace_dir: str | None = None,
    extra: list[str] = (),
    population: int = 1,
    data_parallel: bool = False,
) -> dict:
    """One mode at one shape, in this process, with `extra` --set overrides. With `trace_dir`,
    five more updates are then recorded by torch.profiler into TRACE_DIR/trace_MODE_BxT[_kK].json
    (profiling/summarize.py). `population` K > 1: the update of K agents in one
    (engine.population; B x T per member), K = 1 the single agent's. `data_parallel` (under
    torchrun): the update of engine.distributed, B x T per rank (benchmarks/distributed.py)."""
    import torch

    from engine import fast
    from engine.agent import Agent
    from engine.config import load_config, member_configs
    from engine.device import resolve_device, set_threads

    overrides = [
        *extra,
        f"train.batch_size={batch}",
        f"train.sequence_length={length}",
        *MODES[mode],
    ]
    if population > 1:
        overrides.append(f"population.size={population}")
    cfg = load_config(config, overrides)
    device, _ = resolve_device(cfg.general.device)
    set_threads(cfg, device)  # as a training run chooses them (OMP_NUM_THREADS wins)
    opts, notices = fast.resolve(cfg.general, device)
    num_actions, vector_dim = (2, 4) if cfg.env.name == "CartPole-v1" else (4, 8)
    torch.manual_seed(0)
    if population > 1:
        from engine.population_agent import PopulationAgent, population_options

        opts, dropped = population_options(opts)
        notices += dropped
        members = member_configs(cfg)
        agent = PopulationAgent(members, vector_dim, num_actions, device, opts)
    else:
        if data_parallel:
            from engine import distributed

            d = distributed.init(device.type)
            device = d.device
        agent = Agent(cfg, vector_dim, num_actions, device, opts)
        if opts.compile:
            fast.compile_agent(agent)
        if data_parallel:
            d.attach(agent)
    steps = max(4 * length, 200)
    replay = synthetic_replay(cfg, device, num_actions, vector_dim, steps, population)
    learner = fast.Learner(agent, replay, batch, length, opts)
    if opts.compile:
        from torch._inductor import metrics as inductor_metrics

        inductor_metrics.reset()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(WARMUP):
        learner.step(True)
    sync()
    warm = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(updates):
        learner.step(True)
    sync()
    elapsed = time.perf_counter() - t0
    ms = 1000 * elapsed / updates
    kernels = count_kernels(learner, device)
    if opts.compile:
        kernels["inductor_kernels_generated"] = inductor_metrics.generated_kernel_count
    if trace_dir:
        acts = [torch.profiler.ProfilerActivity.CPU]
        if device.type == "cuda":
            acts.append(torch.profiler.ProfilerActivity.CUDA)
        with torch.profiler.profile(activities=acts) as prof:
            for _ in range(5):
                learner.step(True)
            sync()
        Path(trace_dir).mkdir(parents=True, exist_ok=True)
        k = f"_k{population}" if population > 1 else ""
        prof.export_chrome_trace(str(Path(trace_dir) / f"trace_{mode}_{batch}x{length}{k}.json"))
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
        name = torch.cuda.get_device_name()
    else:  # process peak RSS (KiB on Linux): the run is alone in its process
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        name = platform.processor() or platform.machine()
        # The vector ISA too: the machine's CPU model changes between sessions (AVX-512 BF16 one
        # day, AVX2 the next), and bf16 and compiled code depend on it.
        isa = torch.backends.cpu.get_cpu_capability()
        name = f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} threads, {isa}) {name}"
    return dict(
        mode=mode,
        device_name=name,
        population=population,
        data_parallel=data_parallel,
        batch_size=batch,
        sequence_length=length,
        updates=updates,
        updates_per_sec=updates / elapsed,
        agent_updates_per_sec=population * updates / elapsed,
        **kernels,
        replayed_steps_per_sec=updates * batch * length / elapsed,
        ms_per_update=ms,
        compile_sec=max(warm - WARMUP * ms / 1000, 0.0),
        peak_mem_mb=peak,
        params=agent.num_params(),
        switches=dict(
            compile=opts.compile,
            cuda_graphs=opts.cuda_graphs,
            precision=opts.precision,
            kernels=opts.kernels,
            batched_wgrad=opts.batched_wgrad,
        ),
        dropped=notices,
    )


def count_kernels(learner, device) -> dict:
    """Kernels one update runs, from torch.profiler. CUDA: the kernels launched. CPU: the ATen
    operators dispatched at top level (forward and backward; not the ops an op calls inside
    itself) plus the compiled-graph calls (inductor's fused C++ kernels run inside those calls,
    which the profiler does not split; `inductor_kernels_generated` counts the kernels it
    generated). On a GPU an update of this size is launch-bound, so kernels per agent-update
    is what predicts a population's gain there."""
    import torch

    acts = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=acts) as prof:
        learner.step(True)
        if device.type == "cuda":
            torch.cuda.synchronize()
    events = prof.events()
    if device.type == "cuda":
        launched = sum(1 for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
        return dict(kernels_per_update=launched, kernel_count="cuda kernels launched")

    def top_level_aten(e) -> bool:
        if not e.name.startswith("aten::"):
            return False
        parent = e.cpu_parent
        while parent is not None:
            if parent.name.startswith("aten::"):
                return False
            parent = parent.cpu_parent
        return True

    aten = sum(1 for e in events if top_level_aten(e))
    graphs = sum(1 for e in events if e.name.startswith("## Call CompiledFxGraph"))
    return dict(
        kernels_per_update=aten + graphs,
        aten_ops_per_update=aten,
        compiled_graph_calls_per_update=graphs,
        kernel_count="top-level aten ops + compiled-graph calls",
    )


def _commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).parent,
            check=True,
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).parent,
        )
        return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _table(records: list[dict]) -> str:
    head = (
        f"{'mode':<13} {'shape':>7} {'K':>3} {'upd/s':>8} {'agent-upd/s':>11} {'ms/upd':>8} "
        f"{'compile s':>9} {'peak MB':>8} {'kernels/agent':>13} {'x eager':>7}"
    )
    lines = [head, "-" * len(head)]

    def key(r: dict) -> tuple:
        k = r.get("population", 1)
        return r["batch_size"], r["sequence_length"], k, r.get("separate_processes", 0)

    eager = {key(r): r["ms_per_update"] for r in records if r["mode"] == "eager"}
    for r in records:
        k = r.get("population", 1)
        shape = key(r)
        ratio = eager[shape] / r["ms_per_update"] if shape in eager else float("nan")
        per_agent = r.get("kernels_per_update", float("nan")) / k
        n = r.get("separate_processes")
        label = f"{n}x{k}" if n else str(k)  # P separate processes of K agents each
        lines.append(
            f"{r['mode']:<13} {shape[0]:>3}x{shape[1]:<3} {label:>3} {r['updates_per_sec']:>8.2f} "
            f"{r.get('agent_updates_per_sec', r['updates_per_sec']):>11.2f} "
            f"{r['ms_per_update']:>8.1f} {r['compile_sec']:>9.1f} {r['peak_mem_mb']:>8.0f} "
            f"{per_agent:>13.0f} {ratio:>7.2f}"
        )
    if any(r.get("separate_processes") for r in records):
        lines.append("K: agents in one process; PxK: P such processes at once (summed)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.throughput", description=__doc__)
    p.add_argument("--config", default="configs/cartpole_d256.toml")
    p.add_argument(
        "--modes",
        default="eager,compile,graphs,full",
        help=f"comma-separated, from: {', '.join(MODES)}",
    )
    p.add_argument(
        "--shapes",
        default="config,16x64",
        help="BxT list; 'config' is the config's batch x sequence length",
    )
    p.add_argument("--updates", type=int, default=20, help="timed updates per mode")
    p.add_argument(
        "--population",
        default="1",
        help="population sizes K to measure, e.g. 1,4,8,32: the update of K agents in one "
        "(B x T per member); K = 1 is the single agent",
    )
    p.add_argument(
        "--separate",
        type=int,
        default=0,
        metavar="P",
        help="also measure P processes of each K at once (cores / P threads each, as "
        "engine.sweep --parallel P runs them): their summed agent-updates/s",
    )
    p.add_argument("--json", help="write the records here")
    p.add_argument(
        "--warm-cache",
        action="store_true",
        help="reuse torch.compile's on-disk cache (compile_sec then measures a warm start)",
    )
    p.add_argument(
        "--trace-dir",
        help="also record 5 updates per run with torch.profiler: DIR/trace_MODE_BxT[_kK].json",
    )
    add_set_option(p, "config override for every measurement (e.g. train.optimizer=laprop)")
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: "mode,B,T" in this process
    args = p.parse_args(argv)

    if args.one:
        mode, b, t, k = args.one.split(",")
        rec = measure(
            args.config,
            mode,
            int(b),
            int(t),
            args.updates,
            args.trace_dir,
            args.overrides,
            int(k),
        )
        print(json.dumps(rec))
        return

    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        sys.exit(f"error: {e}")
    modes = args.modes.split(",")
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        sys.exit(f"error: unknown mode(s) {', '.join(unknown)}; choose from {', '.join(MODES)}")
    shapes = []
    for s in args.shapes.split(","):
        shape = (
            (cfg.train.batch_size, cfg.train.sequence_length)
            if s == "config"
            else tuple(int(x) for x in s.split("x"))
        )
        if shape not in shapes:
            shapes.append(shape)
    try:
        sizes = [int(k) for k in args.population.split(",")]
    except ValueError:
        sys.exit(f"error: --population {args.population!r}: expected sizes like 1,4,8,32")
    if any(k < 1 for k in sizes):
        sys.exit(f"error: --population {args.population!r}: sizes must be >= 1")
    if args.separate < 0:
        sys.exit(f"error: --separate {args.separate}: must be >= 0")

    def launch(mode: str, b: int, t: int, k: int, threads: int | None = None):
        cmd = [
            sys.executable,
            "-m",
            "benchmarks.throughput",
            "--config",
            args.config,
            "--updates",
            str(args.updates),
            "--one",
            f"{mode},{b},{t},{k}",
        ]
        if args.trace_dir:
            cmd += ["--trace-dir", args.trace_dir]
        for item in args.overrides:
            cmd += ["--set", item]
        env = dict(os.environ)
        if threads is not None:  # as engine.sweep --parallel sets it for its children
            env["OMP_NUM_THREADS"] = str(threads)
        if not args.warm_cache:  # compile_sec is a cold compile unless asked otherwise
            env["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="inductor_")
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=env)  # fmt: skip

    def result(proc, what: str) -> dict | None:
        out, err = proc.communicate()
        if proc.returncode != 0:
            tail = err.strip().splitlines()[-1:] or ["(no output)"]
            print(f"{what}: failed: {tail[0]}", file=sys.stderr)
            return None
        return json.loads(out.strip().splitlines()[-1])

    records = []

    def save() -> None:  # after every record: a run stopped by a time limit keeps what it measured
        if not args.json:
            return
        import torch

        from engine.checkpoint import atomic_write

        meta = dict(
            config=args.config,
            overrides=args.overrides,
            date=time.strftime("%Y-%m-%d %H:%M:%S"),
            commit=_commit(),
            torch=torch.__version__,
            python=platform.python_version(),
            machine=platform.node(),
            device_name=records[0]["device_name"] if records else None,
        )
        text = json.dumps(dict(meta=meta, records=records), indent=1)
        atomic_write(Path(args.json), lambda tmp: tmp.write_text(text))

    for (b, t), mode in ((s, m) for s in shapes for m in modes):
        for k in sizes:
            rec = result(launch(mode, b, t, k), f"{mode} {b}x{t} K={k}")
            if rec is None:
                continue
            records.append(rec)
            save()
            print(
                f"{mode} {b}x{t} K={k}: {rec['ms_per_update']:.1f} ms/update",
                file=sys.stderr,
                flush=True,
            )
        for k in sizes if args.separate else []:
            n = args.separate
            threads = max(1, (os.cpu_count() or 1) // n)
            procs = [launch(mode, b, t, k, threads) for _ in range(n)]
            what = f"{mode} {b}x{t} {n} separate processes of K={k}"
            each = [result(proc, what) for proc in procs]
            if any(r is None for r in each):
                continue
            rec = dict(
                each[0],
                population=k,
                separate_processes=n,
                threads_per_process=threads,
                updates_per_sec=sum(r["updates_per_sec"] for r in each),
                agent_updates_per_sec=sum(r["agent_updates_per_sec"] for r in each),
                ms_per_update=sum(r["ms_per_update"] for r in each) / n,
                compile_sec=max(r["compile_sec"] for r in each),
                peak_mem_mb=sum(r["peak_mem_mb"] for r in each),
                each=each,
            )
            records.append(rec)
            save()
            print(
                f"{what}: {rec['agent_updates_per_sec']:.2f} agent-updates/s together",
                file=sys.stderr,
                flush=True,
            )
    print(_table(records))
    save()


if __name__ == "__main__":
    main()
