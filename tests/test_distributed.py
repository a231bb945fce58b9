"""Data-parallel training (engine.distributed) on gloo with 2 CPU processes: gradients equal to
one process on the global batch, parameters bitwise equal across ranks, the torchrun command
line, a rank killed mid-run and a resume with another world size."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from engine import distributed, dists
from engine.agent import Agent
from engine.config import load_config
from tests.test_population import make_batch

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def join(rank: int, world: int, port: int, device: str = "cpu") -> distributed.Distributed:
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )  # fmt: skip
    torch.set_num_threads(1)
    return distributed.init(device)


def tiny(compile_: bool = False, *extra: str, device: str = "cpu"):
    sets = ["env.image=true", "train.replay_context=false", f"general.device={device}"]
    sets += ["general.compile=true"] if compile_ else []
    return load_config(ROOT / "configs/tiny.toml", [*sets, *extra])


def agent_for(cfg, device="cpu") -> Agent:
    torch.manual_seed(cfg.general.seed)
    agent = Agent(cfg, 4, 2, device)
    if cfg.general.compile:
        from engine import fast

        fast.compile_agent(agent)
    return agent


def recorded_update(agent: Agent, batch, reduce) -> list[torch.Tensor]:
    """One full update (world model, actor, critic); the gradients the optimizers applied."""
    seen: list[torch.Tensor] = []

    def record(grads):
        grads = reduce(grads) if reduce is not None else grads
        seen.extend(g.detach().clone() for g in grads)
        return grads

    agent.grad_reduce = record
    agent.learn(batch, train_behavior=True)
    return seen


def _grad_worker(rank, world, port, compile_, batch, out, device="cpu"):
    # Latents and actions by argmax: the ranks draw other random numbers than one process does.
    dists.sample_index = lambda probs: probs.detach().argmax(-1)
    d = join(rank, world, port, device)
    rows = batch["reward"].shape[0] // world
    half = {k: v[rank * rows : (rank + 1) * rows].to(d.device) for k, v in batch.items()}
    agent = agent_for(tiny(compile_, device=device), d.device)
    d.broadcast_agent(agent)
    agent.behavior.retnorm.gather = d.gather
    grads = [g.cpu() for g in recorded_update(agent, half, d.average_grads)]
    if rank == 0:
        from torch._dynamo.utils import counters

        frames = int(counters["stats"]["unique_graphs"])
        state = {k: v.cpu() for k, v in agent.state_dict().items()}
        torch.save(dict(grads=grads, state=state, frames=frames), out)
    distributed.shutdown()


@pytest.mark.parametrize(
    "compile_", [False, pytest.param(True, marks=pytest.mark.compiled)], ids=["eager", "compiled"]
)
def test_two_ranks_average_to_the_gradient_of_one_process_on_the_global_batch(
    tmp_path, monkeypatch, compile_
):
    monkeypatch.setattr(dists, "sample_index", lambda probs: probs.detach().argmax(-1))
    torch.set_num_threads(1)
    cfg = tiny(compile_)
    batch = make_batch(cfg, 8, 8, seed=3)
    out = tmp_path / "rank0.pt"
    mp.spawn(_grad_worker, args=(2, free_port(), compile_, batch, out), nprocs=2)
    got = torch.load(out, weights_only=False)
    agent = agent_for(cfg)  # rank 0's initial weights (the same seed), on the global batch
    want = recorded_update(agent, batch, None)
    # fp32 sums in another order differ by rounding: the floor is the same process on the
    # same global batch with its rows in another order (rank 1's half first).
    swap = {k: torch.cat([v[4:], v[:4]]) for k, v in batch.items()}
    floor = recorded_update(agent_for(cfg), swap, None)
    rel = lambda a, b: ((a - b).abs().max() / (b.abs().max() + 1e-12)).item()
    assert len(got["grads"]) == len(want) == len(floor)
    worst = max(rel(a, b) for a, b in zip(got["grads"], want))
    noise = max(rel(a, b) for a, b in zip(floor, want))
    print(
        f"gradients, largest difference relative to the tensor's largest entry: 2 ranks "
        f"{worst:.2e}, one process with the rows reordered {noise:.2e}"
    )
    assert worst <= max(1e-6, 2 * noise)
    # The return normaliser's percentiles are the global batch's on every rank.
    state = agent.state_dict()
    for k in ("behavior.retnorm.lo", "behavior.retnorm.hi"):
        torch.testing.assert_close(got["state"][k], state[k], atol=1e-6, rtol=1e-5, msg=k)
    for k, v in state.items():
        torch.testing.assert_close(got["state"][k], v, atol=1e-5, rtol=1e-4, msg=k)
    if compile_:  # compile really compiled (and did not silently run eager)
        assert got["frames"] > 0


def _train_worker(rank, world, port, cfg_path, run_dir, out):
    from engine.trainer import Trainer

    d = join(rank, world, port)
    cfg = load_config(cfg_path, ["train.max_train_steps=100", "log.eval_every=50"])
    trainer = Trainer(cfg, Path(run_dir))
    result = trainer.run()
    trainer.close()
    sums = torch.stack([p.detach().double().sum() for p in trainer.agent.parameters()])
    bits = torch.stack([p.detach().flatten().view(torch.int32).sum() for p in
                        trainer.agent.parameters()]).long()  # fmt: skip
    every = d.gather_rows(torch.cat([sums, bits.double()]))
    if rank == 0:
        torch.save(dict(every=every, n=len(sums), result=result), out)
    distributed.shutdown()


def test_parameters_stay_bitwise_equal_across_ranks_through_100_updates(tmp_path):
    out = tmp_path / "sums.pt"
    run = tmp_path / "run"
    args = (2, free_port(), str(ROOT / "configs/tiny.toml"), str(run), out)
    mp.spawn(_train_worker, args=args, nprocs=2)
    got = torch.load(out, weights_only=False)
    every = got["every"].view(2, -1)
    assert torch.equal(every[0], every[1])  # float sums and integer bit sums, all-gathered
    assert got["result"]["step"] == 100
    # Env steps are the job's: both ranks' 4 envs per loop step.
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert lines and all('"type"' in x for x in lines)
    ckpt = torch.load(run / "checkpoints/latest.pt", weights_only=False)
    assert ckpt["world_size"] == 2 and ckpt["counters"]["env_steps"] % 8 == 0


def torchrun(
    *args: str, nproc: int = 2, launcher: str = "torch.distributed.run", **kw
) -> subprocess.Popen:
    """`launcher` engine.launch: torchrun with the engine's one-line exits."""
    cmd = [sys.executable, "-m", launcher, "--standalone",
           f"--nproc_per_node={nproc}", "-m", "engine.run", *args]  # fmt: skip
    return subprocess.Popen(
        cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw
    )


def test_torchrun_trains_resumes_and_refuses_another_world_size(tmp_path):
    run = tmp_path / "run"
    p = torchrun("--config", "configs/tiny.toml", "--run-dir", str(run))
    out, err = p.communicate(timeout=600)
    assert p.returncode == 0, err[-2000:]
    assert out.count("done:") == 1  # rank 0 speaks for the job
    # Resumed with one process (no torchrun): one line, exit 2, checkpoint untouched.
    before = (run / "checkpoints/latest.pt").read_bytes()
    r = subprocess.run(
        [sys.executable, "-m", "engine.run", "--resume", str(run)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "2 rank(s)" in r.stderr, r.stderr
    assert (run / "checkpoints/latest.pt").read_bytes() == before
    p = torchrun("--resume", str(run), "--set", "train.max_train_steps=18")
    out, err = p.communicate(timeout=600)
    assert p.returncode == 0, err[-2000:]
    assert "done: 18 updates" in out


def test_torchrun_splits_a_population_over_the_ranks_with_pbt_across_them(tmp_path):
    """--population 2 on 2 ranks: one member per rank, no gradient shared, the job's tables
    on rank 0, and PBT's copy necessarily crossing ranks (1 bottom, 1 top member)."""
    run = tmp_path / "pop"
    grid = 'population.grid={"train.actor_lr" = [1e-4, 1e-3]}'
    pbt = ("population.pbt.every=6", "population.pbt.quantile=0.5")
    sets = [x for kv in (grid, "env.image=false", *pbt) for x in ("--set", kv)]
    p = torchrun("--config", "configs/tiny.toml", "--population", "2", "--run-dir", str(run),
                 *sets, "--set", "train.max_train_steps=6")  # fmt: skip
    out, err = p.communicate(timeout=600)
    assert p.returncode == 0, err[-2000:]
    assert out.count("done") == 1 and "(mean of 2 members)" in out
    for k in range(2):
        cfg = load_config(run / f"member_{k:02d}" / "config.toml")
        assert cfg.general.seed == k and cfg.population.size == 1
    assert len((run / "population.csv").read_text().splitlines()) == 3
    evals = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [len(r["eval_returns"]) for r in evals if r["type"] == "eval"] == [2]
    ckpt = lambda path: torch.load(path, weights_only=False)  # noqa: E731
    assert ckpt(run / "checkpoints/population.pt")["world_size"] == 2
    assert (run / "checkpoints/population.rank1.pt").is_file()
    # The exploit at step 6 (the last update): the bottom member holds the top one's weights,
    # sent from the other rank (they started from other seeds).
    (exploit,) = [r for r in evals if r["type"] == "pbt_exploit"]
    src, dst = exploit["source"], exploit["target"]
    assert {src, dst} == {0, 1}
    weights = [ckpt(run / f"member_{k:02d}/checkpoints/latest.pt")["agent"] for k in (0, 1)]
    first = [ckpt(run / f"member_{k:02d}/checkpoints/best.pt")["agent"] for k in (0, 1)]
    name = "behavior.actor.out.weight"
    assert not torch.equal(first[0][name], first[1][name])
    for n, v in weights[src].items():
        if v.is_floating_point() and "weight" in n:
            assert torch.equal(weights[dst][n], v), n
    member = f"member_{dst:02d}"
    (mine,) = [r for r in map(json.loads, (run / member / "metrics.jsonl").read_text()
               .splitlines()) if r["type"] == "pbt_exploit"]  # fmt: skip
    assert mine["source"] == src
    lr = exploit["settings"]["train.actor_lr"]
    rank1 = [run / "checkpoints/population.rank1.pt", run / "member_01/checkpoints/latest.pt"]
    at_6 = [f.read_bytes() for f in rank1]
    # Resumed with torchrun (to before the next exploit): the perturbed learning rate stays
    # the member's, not the grid's.
    p = torchrun("--resume", str(run), "--set", "train.max_train_steps=10")
    out, err = p.communicate(timeout=600)
    assert p.returncode == 0, err[-2000:]
    assert "done" in out and "10 updates" in out
    assert "(2 members, 0 stopped)" in err  # the job's members, not rank 0's
    assert load_config(run / member / "config.toml").train.actor_lr == pytest.approx(lr)
    # Rank 1 'killed' after the commit barrier of step 10, before its renames: its step-10
    # files are still staged (.next) and its committed ones are step 6's. Both ranks resume at
    # 10 (rank 1 completes its renames), so they stay in step to the end.
    for f, old in zip(rank1, at_6):
        f.rename(f.with_name(f.name + ".next"))
        f.write_bytes(old)
    p = torchrun("--resume", str(run), "--set", "train.max_train_steps=12")
    out, err = p.communicate(timeout=600)
    assert p.returncode == 0, err[-2000:]
    assert "resumed" in err and "at step 10" in err and "12 updates" in out
    assert all(not f.with_name(f.name + ".next").exists() for f in rank1)
    assert ckpt(rank1[0])["counters"]["step"] == ckpt(rank1[1])["counters"]["step"] == 12
    # Without torchrun: one line, exit 2. A population that does not split: one line, exit 2.
    before = (run / "checkpoints/population.pt").read_bytes()
    r = subprocess.run([sys.executable, "-m", "engine.run", "--resume", str(run)], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)  # fmt: skip
    assert r.returncode == 2 and "2 rank(s)" in r.stderr and r.stderr.count("\n") == 1, r.stderr
    assert (run / "checkpoints/population.pt").read_bytes() == before
    p = torchrun("--config", "configs/tiny.toml", "--population", "3", "--run-dir",
                 str(tmp_path / "odd"), "--set", "env.image=false",
                 launcher="engine.launch")  # fmt: skip
    out, err = p.communicate(timeout=600)
    assert p.returncode == 2, err[-2000:]  # engine.launch: the ranks' status, no torchrun wall
    assert "error: population.size 3 does not split over 2 ranks" in err, err[-2000:]
    assert err.count("error: population.size") == 1  # rank 0 speaks for the job
    assert "Traceback" not in err and "ChildFailedError" not in err, err[-2000:]


def _ranks(parent: int) -> dict[int, int]:
    """rank -> pid of torchrun's worker processes."""
    out = {}
    for pid in subprocess.run(["pgrep", "-P", str(parent)], capture_output=True,
                              text=True).stdout.split():  # fmt: skip
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        for kv in env:
            if kv.startswith(b"RANK="):
                out[int(kv[5:])] = int(pid)
    return out


def test_a_member_stopped_on_rank_1_is_said_and_recorded_by_the_job(tmp_path):
    """Member 1 (on rank 1) diverges: rank 1 prints its line, rank 0 writes its member_stopped
    record into the run's metrics.jsonl, and member 0 trains on to the end."""
    run = tmp_path / "pop"
    grid = 'population.grid={"train.vector_scale" = [1.0, 1e38]}'
    p = torchrun("--config", "configs/tiny.toml", "--population", "2", "--run-dir", str(run),
                 "--set", grid, "--set", "env.image=false")  # fmt: skip
    out, err = p.communicate(timeout=600)
    assert p.returncode == 0, err[-2000:]
    assert "member 1: failed" in err, err[-2000:]
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    (stop,) = [r for r in records if r["type"] == "member_stopped"]
    assert stop["member"] == 1 and stop["status"] == "failed"
    train = [r for r in records if r["type"] == "train"]
    assert train[-1]["step"] == 12 and train[-1]["members_training"] == 1


def long_launched_run(run: Path, **kw) -> tuple[subprocess.Popen, Path]:
    """A tiny 2-rank job under engine.launch that trains until stopped, once its first
    periodic checkpoint is written (and a second after it)."""
    long_run = ["--set", "train.max_train_steps=100000", "--set", "log.checkpoint_every=20"]
    p = torchrun("--config", "configs/tiny.toml", "--run-dir", str(run), *long_run,
                 launcher="engine.launch", **kw)  # fmt: skip
    latest = run / "checkpoints/latest.pt"
    deadline = time.time() + 300
    while not latest.exists() and time.time() < deadline:
        time.sleep(0.5)
    assert latest.exists(), "no checkpoint within 300 s"
    time.sleep(1.0)
    return p, latest


def test_a_killed_rank_ends_the_job_with_one_line_and_an_intact_checkpoint(tmp_path):
    run = tmp_path / "run"
    p, latest = long_launched_run(run)
    ranks = _ranks(p.pid)
    assert set(ranks) == {0, 1}, ranks
    os.kill(ranks[1], signal.SIGKILL)
    killed = time.time()
    out, err = p.communicate(timeout=120)
    took = time.time() - killed
    assert took < 30, took
    # Rank 0's line (its peer is gone) and engine.launch's (which rank died, how): no wall.
    assert f"error: rank 1 (pid {ranks[1]}) was killed by SIGKILL" in err, err[-3000:]
    assert p.returncode == 128 + signal.SIGKILL
    assert len([x for x in err.splitlines() if x.startswith("error: ")]) <= 2, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    # The checkpoint loads and the run continues from it.
    state = torch.load(latest, weights_only=False)
    step = state["counters"]["step"]
    p = torchrun("--resume", str(run), "--set", f"train.max_train_steps={step + 4}")
    out, err = p.communicate(timeout=600)
    assert p.returncode == 0, err[-2000:]
    assert f"done: {step + 4} updates" in out


def test_ctrl_c_on_a_launched_job_writes_its_checkpoint_and_exits_130_in_one_line(tmp_path):
    """Ctrl-C in a terminal reaches the launcher and every rank (the process group). Under
    plain torchrun the ranks stop cleanly but torchrun raises SignalException over it."""
    p, latest = long_launched_run(tmp_path / "run", start_new_session=True)
    periodic = latest.stat().st_mtime_ns
    os.killpg(p.pid, signal.SIGINT)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 130, err[-3000:]
    assert f"interrupted: checkpoint written to {latest}" in err, err[-3000:]
    assert "Traceback" not in err and "SignalException" not in err, err[-3000:]
    assert latest.stat().st_mtime_ns > periodic  # the stop's own checkpoint
    assert "python -m engine.launch --standalone --nproc_per_node 2" in err


needs_2_gpus = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2+ CUDA GPUs"
)


@pytest.mark.gpu
@needs_2_gpus
def test_nccl_two_gpus_average_gradients_as_gloo_does(tmp_path, monkeypatch):
    """NCCL, one GPU per rank: the ranks' averaged gradients equal gloo's on the CPU (the same
    batch halves and initial weights), up to the GPU's own rounding."""
    monkeypatch.setattr(dists, "sample_index", lambda probs: probs.detach().argmax(-1))
    batch = make_batch(tiny(), 8, 8, seed=3)
    outs = {dev: tmp_path / f"{dev}.pt" for dev in ("cpu", "cuda")}
    for dev, out in outs.items():
        mp.spawn(_grad_worker, args=(2, free_port(), False, batch, out, dev), nprocs=2)
    cpu, gpu = (torch.load(outs[d], weights_only=False) for d in ("cpu", "cuda"))
    rel = lambda a, b: ((a - b).abs().max() / (b.abs().max() + 1e-12)).item()
    assert max(rel(a, b) for a, b in zip(gpu["grads"], cpu["grads"])) <= 1e-4


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_torchrun_on_cuda_with_graphs_trains(tmp_path):
    """Every GPU of the machine a rank (NCCL), the update captured in a CUDA graph with its
    gradient all-reduce and return all-gather inside."""
    n = torch.cuda.device_count()
    run = tmp_path / "run"
    # gymnasium's envs: the GPU machine has no envpool
    sets = ["general.device=cuda", "general.cuda_graphs=true", "train.max_train_steps=12"]
    sets.append("env.backend=gymnasium")
    p = torchrun("--config", "configs/tiny.toml", "--run-dir", str(run),
                 *[x for s in sets for x in ("--set", s)], nproc=n)  # fmt: skip
    out, err = p.communicate(timeout=600)
    assert p.returncode == 0, err[-3000:]
    assert "done: 12 updates" in out
