"""The profiling window, the chrome-trace summary and the throughput benchmark's records."""

import json
import subprocess
import sys

import pytest

from profiling import summarize


def ev(name, ts, dur, cat="cpu_op", tid=1):
    return {"ph": "X", "name": name, "ts": ts, "dur": dur, "cat": cat, "tid": tid}


def test_summary_splits_self_time_and_counts_phases():
    events = [
        ev("replay/sample", 0, 100, "user_annotation"),
        ev("world_model/forward", 100, 3000, "user_annotation"),
        ev("aten::linear", 100, 2000),
        ev("aten::addmm", 200, 1500),  # child of linear: linear's self time is 500 us
        ev("aten::mul", 2500, 400),
        ev("gemm_kernel", 150, 700, "kernel"),
        ev("gemm_kernel", 1150, 300, "kernel"),
    ]
    phases = summarize.phase_totals(events)
    assert phases == {"replay/sample": 0.1, "world_model/forward": 3.0}
    ops = {name: (ms, n) for name, ms, n in summarize.top_ops(events, 10)}
    assert ops["aten::linear"] == (0.5, 1) and ops["aten::addmm"] == (1.5, 1)
    total, kernels = summarize.top_kernels(events, 5)
    assert total == 1.0 and kernels == [("gemm_kernel", 1.0, 2)]


def test_profile_window_writes_a_trace_with_the_engine_phases(tmp_path):
    run_dir = tmp_path / "run"
    args = ["--config", "configs/tiny.toml", "--run-dir", str(run_dir), "--profile", "2:4"]
    args += ["--set", "general.trace=true", "--set", "train.max_train_steps=5"]
    out = subprocess.run([sys.executable, "-m", "engine.run", *args], capture_output=True)
    assert out.returncode == 0, out.stderr.decode()[-2000:]
    events = summarize.load_events(str(run_dir / "trace.json"))
    phases = summarize.phase_totals(events)
    for name in ("replay/sample", "world_model/forward", "world_model/backward+optimizer"):
        assert phases.get(name, 0) > 0, name
    # Only updates 3 and 4 are inside the window.
    assert sum(e["name"] == "replay/sample" for e in events) == 2
    text = subprocess.run(
        [sys.executable, "-m", "profiling.summarize", str(run_dir / "trace.json")],
        capture_output=True,
        text=True,
    ).stdout
    assert text.startswith("2 learner updates") and "world_model/forward" in text


def test_throughput_benchmark_records(tmp_path):
    out_json = tmp_path / "bench.json"
    cmd = [sys.executable, "-m", "benchmarks.throughput", "--config", "configs/tiny.toml"]
    cmd += ["--modes", "eager,graphs", "--shapes", "config,4x6", "--updates", "2"]
    cmd += ["--json", str(out_json)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    data = json.loads(out_json.read_text())
    assert data["meta"]["commit"] and data["meta"]["torch"]
    recs = data["records"]
    assert len(recs) == 4 and {r["mode"] for r in recs} == {"eager", "graphs"}
    keys = ("device_name", "batch_size", "sequence_length", "updates_per_sec", "ms_per_update")
    for r in recs:
        assert all(k in r for k in (*keys, "compile_sec", "peak_mem_mb"))
        assert r["updates_per_sec"] > 0 and r["peak_mem_mb"] > 0
    assert {(r["batch_size"], r["sequence_length"]) for r in recs} >= {(4, 6)}
    graphs = [r for r in recs if r["mode"] == "graphs"]
    if not any(r["switches"]["cuda_graphs"] for r in graphs):  # a CPU machine says it dropped them
        assert all(r["dropped"] for r in graphs)
    assert "x eager" in out.stdout


def test_throughput_benchmark_measures_populations_and_separate_processes(tmp_path):
    out_json = tmp_path / "bench.json"
    cmd = [sys.executable, "-m", "benchmarks.throughput", "--config", "configs/tiny.toml"]
    cmd += ["--modes", "eager", "--shapes", "config", "--updates", "2", "--population", "1,2"]
    cmd += ["--separate", "2", "--json", str(out_json)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    recs = json.loads(out_json.read_text())["records"]
    one, two, apart, apart_pops = recs
    assert (one["population"], two["population"]) == (1, 2) and "separate_processes" not in two
    assert two["agent_updates_per_sec"] == pytest.approx(2 * two["updates_per_sec"])
    # Operators per agent-update fall with K (measured on tiny: 4,675 for one agent, 8,728 for
    # two; the stacked optimizers' per-tensor passes are most of the growth).
    assert 0 < two["kernels_per_update"] / 2 < one["kernels_per_update"]
    assert apart["separate_processes"] == 2 and len(apart["each"]) == 2
    assert apart["agent_updates_per_sec"] == pytest.approx(
        sum(r["agent_updates_per_sec"] for r in apart["each"])
    )
    assert all("1 threads" in r["device_name"] for r in apart["each"])
    # And two processes of a population of 2 (engine.sweep --population 2 --parallel 2).
    assert (apart_pops["population"], apart_pops["separate_processes"]) == (2, 2)
    assert apart_pops["agent_updates_per_sec"] == pytest.approx(
        sum(2 * r["updates_per_sec"] for r in apart_pops["each"])
    )
    assert " 2x1 " in out.stdout and " 2x2 " in out.stdout and "PxK: P such" in out.stdout


def test_distributed_training_benchmark_rates_and_commands():
    from benchmarks import distributed_training as dt

    metrics = [
        dict(type="train", step=50, env_steps=1000, wall_time=10.0),
        dict(type="eval", step=100, env_steps=1800, eval_return=9.0),
        dict(type="train", step=100, env_steps=1800, wall_time=20.0),
        dict(type="train", step=300, env_steps=5000, wall_time=60.0),
    ]
    r = dt.rates(metrics, skip=100)  # from update 100 to the last train line
    assert r["updates"] == 200 and r["seconds"] == 40.0
    assert r["updates_per_sec"] == 5.0 and r["env_steps_per_sec"] == 80.0
    with pytest.raises(ValueError, match="fewer than two"):
        dt.rates(metrics, skip=200)
    dp = dt.command("data-parallel", 2, "c.toml", "/r", ["log.eval_every=0"])
    one = dt.command("one process", 2, "c.toml", "/r", ["log.eval_every=0"])
    assert "--nproc_per_node=2" in dp and dp[-1] == "general.threads=1"
    assert "torch.distributed.run" not in one and one[-1] == "general.threads=2"
