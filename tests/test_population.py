"""PopulationAgent: K stacked agents updated under vmap. Member k must behave exactly as a
single Agent with member k's config: same initial weights, same update of the same batch (with
its own grid settings), same actions; a frozen member does not change."""

import copy
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from engine import dists, fast
from engine.agent import Agent
from engine.config import SWITCH_KEYS, load_config, member_configs
from engine.fast import FastOptions
from engine.population_agent import MEMBER_CALLS, PopulationAgent
from engine.replay import Replay, transition_spec
from tests.helpers import kill_when, run_module, run_until_killed

GRID = {
    "train.actor_lr": [1e-4, 3e-3, 4e-5, 2e-4],
    "train.wm_grad_clip": [1000.0, 0.05, 0.0, 100.0],
    "train.gamma": [0.99, 0.9, 0.997, 0.95],
    "train.lam": [0.95, 0.5, 0.95, 0.8],
    "train.beta_rep": [0.1, 0.5, 1.0, 0.3],
    "train.image_scale": [1.0, 0.5, 2.0, 1.5],
    "train.slow_critic_rate": [0.02, 0.5, 0.1, 0.05],
    "train.retnorm_limit": [1.0, 0.01, 5.0, 2.0],
    "models.free_bits": [1.0, 0.1, 3.0, 0.5],
    "models.unimix": [0.01, 0.1, 0.0, 0.05],
    "train.actor_entropy_coef": [3e-4, 0.1, 0.0, 1e-2],
}
K = 4  # member i of a population of 4 against a single agent (issue 12's equivalence)


def population_config(*overrides, grid=GRID):
    grid = "{" + ", ".join(f'"{k}" = {json.dumps(v)}' for k, v in grid.items()) + "}"
    sets = [f"population.size={K}", f"population.grid={grid}", "env.image=true", *overrides]
    cfg = load_config("configs/tiny.toml", sets)
    return cfg, member_configs(cfg)


@pytest.fixture
def greedy_sampling(monkeypatch):
    """Latents and actions by argmax: the population draws its members' random numbers from
    other streams than single agents do, so exact comparisons need sampling without them."""
    monkeypatch.setattr(dists, "sample_index", lambda probs: probs.detach().argmax(-1))


def single(cfg, vector_dim=4, actions=2):
    torch.manual_seed(cfg.general.seed)
    return Agent(cfg, vector_dim, actions)


def make_batch(cfg, rows, steps, seed=0):
    g = torch.Generator().manual_seed(seed)
    spec = transition_spec(64, 4)
    batch = {}
    for k, (shape, dtype) in spec.items():
        full = (rows, steps, *shape)
        if dtype == torch.bool:
            batch[k] = torch.rand(full, generator=g) < 0.1
        elif dtype == torch.uint8:
            batch[k] = torch.randint(0, 256, full, generator=g, dtype=torch.uint8)
        elif dtype == torch.int64:
            batch[k] = torch.randint(0, 2, full, generator=g)
        else:
            batch[k] = torch.randn(full, generator=g) * 3
    batch["is_last"] |= batch["is_terminal"]
    return batch


def assert_member_equals(pop, k, agent, exact=False):
    """Weights to 1e-5; optimizer moments to 0.3% of each tensor's largest entry (vmap's batched
    matmuls and grouped convs sum in another order: the d64 gradients of a random batch reach
    norms of thousands, and small entries of a moment differ by rounding; measured at K = 4: one
    entry of 512 in an unclipped member's world-model moment off by 0.12% of the tensor's max)."""
    state, optim = pop.member_state(k)
    for name, value in agent.state_dict().items():
        atol, rtol = (0, 0) if exact else (1e-5, 1e-4)
        torch.testing.assert_close(state[name], value, atol=atol, rtol=rtol, msg=name)
    for group, opt in agent.optimizers().items():
        torch.testing.assert_close(optim[group]["count"], opt.count)
        for a, b in zip(optim[group]["m"] + optim[group]["v"], opt.m + opt.v):
            atol = 0 if exact else 3e-3 * b.abs().max().item()
            torch.testing.assert_close(a, b, atol=atol, rtol=0)


def test_members_start_as_single_runs_with_their_seeds():
    cfg, members = population_config()
    pop = PopulationAgent(members, 4, 2)
    assert pop.size == K and pop.num_params() == single(members[0]).num_params()
    for k, member in enumerate(members):
        assert member.general.seed == cfg.general.seed + k
        assert_member_equals(pop, k, single(member), exact=True)
    # Different seeds, different weights.
    a, b = pop.member_state(0)[0], pop.member_state(1)[0]
    assert not torch.equal(a["wm.prior_net.out.weight"], b["wm.prior_net.out.weight"])


@pytest.mark.usefixtures("greedy_sampling")
def test_each_member_updates_as_a_single_agent_with_its_settings():
    _, members = population_config()
    pop = PopulationAgent(members, 4, 2)
    agents = [single(m) for m in members]
    for a, m in zip(agents, members):
        a.set_entropy_coef(m.train.actor_entropy_coef)
    pop.set_entropy_coef([m.train.actor_entropy_coef for m in members])
    B, T = members[0].train.batch_size, members[0].train.sequence_length
    for update, behavior in enumerate((False, True, True)):
        batch = make_batch(members[0], K * B, T, seed=update)
        metrics, (deter, stoch) = pop.learn(batch, behavior)
        for k, agent in enumerate(agents):
            rows = slice(k * B, (k + 1) * B)
            mine, (d, s) = agent.learn({n: v[rows] for n, v in batch.items()}, behavior)
            assert set(metrics) == set(mine)
            for name, value in mine.items():
                # A gradient norm sums ~1e5 squares of gradients that vmap's batched matmuls
                # sum in another order: on an AMX / AVX-512 CPU the third update's world-model
                # norm was 1116.525 against 1116.682 (1.4e-4 relative); the weights and moments
                # after it still agree to assert_member_equals' tolerances.
                rtol = 1e-3 if name.endswith("grad_norm") else 1e-4
                torch.testing.assert_close(
                    metrics[name][k], value, atol=1e-4, rtol=rtol, msg=f"update {update} {name}"
                )
            torch.testing.assert_close(deter[rows], d, atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(stoch[rows], s)
            assert_member_equals(pop, k, agent)
    # The grid settings made a difference: the members' losses differ.
    assert metrics["kl_rep"].unique().numel() == K


# The official-detail switches (README's ablation arms), each member its own mix.
SWITCHES = {
    "models.twohot_space": ["real", "symlog", "symlog", "real"],
    "models.init": ["official", "engine", "official", "engine"],
    "train.optimizer": ["laprop", "adam", "adam", "laprop"],
    "train.lr_warmup_steps": [0, 2, 0, 3],
    "train.retnorm_init": ["zero", "first", "zero", "first"],
    "train.replay_context": [False, True, False, True],  # member 0's is not the population's
    "train.agc": [0.3, 0.0, 0.0, 0.3],
}


def switch_members():
    grid = "{" + ", ".join(f'"{k}" = {json.dumps(v)}' for k, v in SWITCHES.items()) + "}"
    sets = [f"population.size={K}", f"population.grid={grid}", "env.image=true"]
    return member_configs(load_config("configs/tiny.toml", sets))


@pytest.mark.usefixtures("greedy_sampling")
def test_members_differing_in_the_official_switches_update_as_single_agents():
    """An ablation of the official details is one population: each member's two-hot space,
    optimizer, warm-up, replay context, initialisation and return-normaliser start act as in a
    single agent with its config, on its rows of the same batch (a member without context gets
    the batch without the context step, as its own replay would give it)."""
    members = switch_members()
    pop = PopulationAgent(members, 4, 2)
    assert pop.replay_context and pop.template.context_members.tolist() == [0, 1, 0, 1]
    agents = [single(m) for m in members]
    for k, agent in enumerate(agents):
        assert_member_equals(pop, k, agent, exact=True)  # initialised as its own config says
    cfg = members[0]
    B, T, L = cfg.train.batch_size, cfg.train.sequence_length, cfg.models.encoder.mlp.latents
    g = torch.Generator().manual_seed(11)
    for update, behavior in enumerate((False, True, True)):  # inside both warm-ups
        batch = make_batch(cfg, K * B, T + 1, seed=update)
        batch["deter"] = torch.randn(K * B, T + 1, cfg.deter, generator=g).bfloat16()
        classes = cfg.models.encoder.mlp.latent_categories
        batch["stoch"] = torch.randint(0, classes, (K * B, T + 1, L), generator=g).short()
        metrics, (deter, _) = pop.learn(batch, behavior)
        for k, agent in enumerate(agents):
            rows = slice(k * B, (k + 1) * B)
            mine = {n: v[rows] for n, v in batch.items()}
            if not members[k].train.replay_context:
                mine = {n: v[:, 1:] for n, v in mine.items() if n not in ("deter", "stoch")}
            own, (d, _) = agent.learn(mine, behavior)
            for name, value in own.items():
                torch.testing.assert_close(
                    metrics[name][k], value, atol=1e-4, rtol=1e-4, msg=f"update {update} {name}"
                )
            torch.testing.assert_close(deter[rows], d, atol=1e-5, rtol=1e-4)
            assert_member_equals(pop, k, agent)
    # PBT's exploit hands a member another's switches: set_member_config sets each in place.
    pop.set_member_config(1, members[0])
    assert pop.buffers["wm.space"][1] and pop.buffers["behavior.space"][1]
    assert torch.equal(pop.buffers["wm.bins"][1], pop.buffers["wm.bins"][0])
    assert pop.template.context_members[1] == 0
    assert pop.wm_opt.laprop[1] == 1 and pop.wm_opt.warmup[1] == 0


def test_switches_mixed_on_another_rank_are_flags_here_too():
    """Under torchrun a rank's members may agree on a switch the whole population mixes; PBT
    can then hand one of them another rank's value, which must take effect."""
    members = switch_members()
    rank_members = [members[1], copy.deepcopy(members[1])]  # symlog, Adam, context
    rank_members[1].general.seed += 10
    alone = PopulationAgent(rank_members, 4, 2)
    assert not alone.mixed and "wm.space" not in alone.buffers
    pop = PopulationAgent(rank_members, 4, 2, mixed=frozenset(SWITCH_KEYS))
    assert pop.replay_context and pop.template.replay_context
    other = members[0]  # real, LaProp, no context
    pop.set_member_config(0, other)
    assert pop.buffers["wm.space"].tolist() == [True, False]
    assert pop.template.context_members.tolist() == [0, 1]
    assert pop.critic_opt.laprop.tolist() == [1, 0]
    real = dists.make_bins(other.models.num_bins, space="real")
    assert torch.equal(pop.buffers["behavior.bins"][0], real)


@pytest.mark.compiled
@pytest.mark.usefixtures("greedy_sampling")
def test_the_compiled_population_update_matches_the_eager_one():
    """general.compile: every member call is compiled (one graph per call and shape, no graph
    break) and the update equals the eager population's, with members differing in their
    settings and in the official switches (two-hot space and optimizer chosen per member)."""
    import torch._dynamo

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    # Adam with a tiny eps turns the rounding noise of a near-zero gradient (~1e-12) into a
    # full lr-sized step of either sign; a larger eps keeps such entries still in both.
    _, members = population_config(
        "env.image=false", "train.adam_eps=1e-3", grid={**GRID, **SWITCHES}
    )
    eager = PopulationAgent(members, 4, 2)
    compiled = PopulationAgent(members, 4, 2, opts=FastOptions(compile=True))
    B, T = members[0].train.batch_size, members[0].train.sequence_length
    for update in range(2):
        batch = make_batch(members[0], K * B, T, seed=update)
        batch.pop("image")
        want, _ = eager.learn(batch, True)
        got, _ = compiled.learn(batch, True)
        for name, value in want.items():
            torch.testing.assert_close(got[name], value, atol=1e-4, rtol=1e-4, msg=name)
    for k in range(K):
        a, b = eager.member_state(k)[0], compiled.member_state(k)[0]
        for name in a:
            torch.testing.assert_close(b[name], a[name], atol=1e-5, rtol=1e-4, msg=name)
    counters = torch._dynamo.utils.counters
    assert not counters["graph_break"], dict(counters["graph_break"])
    # Each member call has its own code object, so its own compile cache and recompile limit.
    calls = [getattr(getattr(compiled.template, path), name) for path, name, *_ in MEMBER_CALLS]
    codes = {call._torchdynamo_orig_callable.__code__ for call in calls}
    assert len(codes) == len(MEMBER_CALLS)
    assert counters["stats"]["unique_graphs"] >= 6  # encode, obs/img step, loss tails, act


@pytest.mark.usefixtures("greedy_sampling")
def test_acting_matches_single_agents():
    _, members = population_config()
    pop = PopulationAgent(members, 4, 2)
    agents = [single(m) for m in members]
    n = 2
    batch = make_batch(members[0], K * n, 3, seed=5)
    carry = pop.initial_carry(K * n, torch.device("cpu"))
    carries = [a.initial_carry(n, torch.device("cpu")) for a in agents]
    for t in range(3):
        obs = {k: v[:, t] for k, v in batch.items() if k in ("image", "vector", "is_first")}
        actions, carry = pop.policy(obs, carry)
        for k, agent in enumerate(agents):
            rows = slice(k * n, (k + 1) * n)
            mine, carries[k] = agent.policy({o: v[rows] for o, v in obs.items()}, carries[k])
            assert torch.equal(actions[rows], mine)
            torch.testing.assert_close(carry[0][rows], carries[k][0], atol=1e-5, rtol=1e-4)


def test_a_frozen_member_does_not_change():
    _, members = population_config()
    pop = PopulationAgent(members, 4, 2)
    before = pop.member_state(1)
    pop.freeze(1)
    B, T = members[0].train.batch_size, members[0].train.sequence_length
    for update in range(2):
        pop.learn(make_batch(members[0], K * B, T, seed=update), True)
    after = pop.member_state(1)
    for name, value in before[0].items():
        assert torch.equal(after[0][name], value), name
    for group in before[1]:
        assert torch.equal(after[1][group]["count"], before[1][group]["count"])
    moved = pop.member_state(0)[0]["wm.prior_net.out.weight"]
    assert not torch.equal(moved, pop.member_state(1)[0]["wm.prior_net.out.weight"])
    assert pop.active.tolist() == [1.0, 0.0, 1.0, 1.0]


def test_a_member_state_loads_into_a_single_agent_and_back():
    _, members = population_config()
    pop = PopulationAgent(members, 4, 2)
    B, T = members[0].train.batch_size, members[0].train.sequence_length
    pop.learn(make_batch(members[0], K * B, T), True)
    state, optim = pop.member_state(2)
    agent = single(members[2])
    agent.load_state_dict(state)  # strict: the same keys and shapes as a single agent's
    for group, opt in agent.optimizers().items():
        opt.load_state_dict(optim[group])
    pop.load_member_state(0, state, optim)
    assert_member_equals(pop, 0, agent, exact=True)
    state["wm.prior_net.out.weight"] = state["wm.prior_net.out.weight"][:1]
    with pytest.raises(ValueError, match="wm.prior_net.out.weight"):
        pop.load_member_state(0, state, optim)


def test_population_replay_samples_each_member_from_its_own_envs():
    spec = transition_spec(0, 3)
    members, n = 4, 2
    replay = Replay(64 * members, members * n, spec, torch.device("cpu"), members=members)
    for t in range(40):
        step = {
            k: torch.zeros(members * n, *shape, dtype=dtype) for k, (shape, dtype) in spec.items()
        }
        step["reward"] = torch.arange(members * n, dtype=torch.float32) + 100 * t
        replay.add(step)
    batch = replay.sample(5, 6)
    assert batch["reward"].shape == (members * 5, 6)
    env = batch["reward"].remainder(100).long()  # which env each row came from
    for k in range(members):
        rows = env[k * 5 : (k + 1) * 5]
        assert ((rows >= k * n) & (rows < (k + 1) * n)).all(), (k, rows)
    with pytest.raises(ValueError, match="do not split"):
        Replay(64, 6, spec, torch.device("cpu"), members=4)


def population_learner(members, device="cpu", opts=None):
    """A population, a replay of 40 steps of K x 2 random envs, and its fast.Learner."""
    opts = opts or FastOptions()
    torch.manual_seed(0)
    pop = PopulationAgent(members, 4, 2, device, opts)
    spec = transition_spec(0, 4)
    replay = Replay(64 * K, 2 * K, spec, torch.device(device), members=K)
    data = make_batch(members[0], 2 * K, 40, seed=1)
    for t in range(40):
        replay.add({k: data[k][:, t].to(device) for k in spec})
    t = members[0].train
    return pop, fast.Learner(pop, replay, t.batch_size, t.sequence_length, opts)


def test_the_population_update_has_no_host_sync(monkeypatch):
    # What CUDA-graph capture needs, checked on any device: no value leaves the device.
    _, members = population_config("env.image=false")
    _, learner = population_learner(members)
    learner.step(True)

    def forbidden(*args, **kwargs):
        raise AssertionError("host sync inside the population update")

    for name in ("item", "tolist", "__bool__", "__int__", "__float__", "numpy", "cpu"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    metrics = learner.step(True)
    monkeypatch.undo()
    assert metrics["wm_loss"].shape == (K,) and torch.isfinite(metrics["wm_loss"]).all()


def test_capture_warm_up_updates_are_undone_in_place():
    # fast.Learner runs real updates before capturing, then restores the state it snapshot
    # into the very tensors the graph will read.
    _, members = population_config("env.image=false")
    pop, learner = population_learner(members)
    live = pop.state_dict()
    before = {n: v.detach().clone() for n, v in live.items()}
    counts = [opt.count.clone() for opt in pop.optimizers().values()]
    saved = fast._snapshot(pop)
    learner.step(True)
    assert not torch.equal(live["wm.prior_net.out.weight"], before["wm.prior_net.out.weight"])
    fast._restore(pop, saved)
    assert pop.state_dict()["wm.prior_net.out.weight"] is live["wm.prior_net.out.weight"]
    for name, value in before.items():
        assert torch.equal(live[name], value), name
    for opt, count in zip(pop.optimizers().values(), counts):
        assert torch.equal(opt.count, count)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_population_cuda_graph_matches_eager_and_never_syncs():
    _, members = population_config(
        "env.image=false", "train.adam_eps=1e-3", grid={**GRID, **SWITCHES}
    )
    pop, eager = population_learner(members, "cuda")
    graphs = FastOptions(cuda_graphs=True)
    pop2, graphed = population_learner(members, "cuda", graphs)
    # Capture only (its warm-up updates are undone): step() would also replay it once, and the
    # comparison below would then set eager's first update against the graph's second (the
    # first H200 run failed so: the stacked weights differed by one LaProp step, <= wm_lr).
    graphed.capture(True)
    torch.manual_seed(7)
    want = eager.step(True)
    torch.manual_seed(7)
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = graphed.step(True)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    # env.image=false: a vector loss, no image loss (the second H200 run failed on that key).
    for name in ("wm_loss", "vector_loss", "reward_loss", "continue_loss", "critic_loss"):
        torch.testing.assert_close(got[name], want[name], atol=1e-4, rtol=1e-4, msg=name)


# ---- The command line ---------------------------------------------------------------------------


TINY_GRID = 'population.grid={"train.actor_lr" = [1e-4, 3e-4, 1e-3]}'


def lines(path, kind):
    return [r for r in map(json.loads, path.read_text().splitlines()) if r["type"] == kind]


@pytest.mark.slow
def test_run_trains_a_population_into_member_directories_and_resumes(tmp_path):
    run = tmp_path / "pop"
    base = ("--run-dir", str(run), "--set", TINY_GRID, "--set", "env.image=false")
    done = run_module("engine.run", "--config", "configs/tiny.toml", "--population", "3", *base,
                      "--set", "train.max_train_steps=6")  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "replay: 3 members x 1,024 steps" in done.stdout + done.stderr
    assert "(mean of 3 members)" in done.stdout
    for k in range(3):
        member = run / f"member_{k:02d}"
        cfg = load_config(member / "config.toml")
        assert cfg.general.seed == k and cfg.population.size == 1
        assert cfg.train.actor_lr == [1e-4, 3e-4, 1e-3][k]
        assert lines(member / "metrics.jsonl", "train") and lines(member / "metrics.jsonl", "eval")
        assert (member / "checkpoints" / "latest.pt").is_file()
    # Env steps are counted per member, so each member keeps a single run's train ratio and
    # bootstrap: its updates fall at the env steps a single run's do.
    alone = tmp_path / "alone"
    one = run_module("engine.run", "--config", "configs/tiny.toml", "--run-dir", str(alone),
                     "--set", "env.image=false", "--set", "train.max_train_steps=6")  # fmt: skip
    assert one.returncode == 0, one.stderr
    steps = lambda d: [(r["step"], r["env_steps"]) for r in lines(d / "metrics.jsonl", "train")]  # noqa: E731
    assert steps(run / "member_00") == steps(alone) != []
    csv_rows = (run / "population.csv").read_text().splitlines()
    assert csv_rows[0].startswith("member,seed,train.actor_lr,status") and len(csv_rows) == 4
    assert "last_eval:" in (run / "population.md").read_text()
    # Resume the population further; a member resumes and evaluates as a single run.
    more = run_module("engine.run", "--resume", str(run), "--set", "train.max_train_steps=12")
    assert more.returncode == 0, more.stderr
    assert "resumed" in more.stdout + more.stderr and "12 updates" in more.stdout
    evals = lines(run / "member_01" / "metrics.jsonl", "eval")
    assert [e["step"] for e in evals] == [6, 12]
    ev = run_module("engine.evaluate", str(run / "member_01"), "--episodes", "2")
    assert ev.returncode == 0 and "2 greedy episodes" in ev.stdout, ev.stderr
    wrong = run_module("engine.run", "--resume", str(run), "--population", "2")
    assert wrong.returncode == 2
    assert "holds a population of 3, not 2" in wrong.stderr and wrong.stderr.count("\n") == 1


@pytest.mark.slow
def test_a_diverging_member_is_frozen_while_the_others_train_on(tmp_path):
    run = tmp_path / "pop"
    grid = 'population.grid={"train.vector_scale" = [1.0, 1e38, 1.0]}'
    done = run_module("engine.run", "--config", "configs/tiny.toml", "--population", "3",
                      "--run-dir", str(run), "--set", grid, "--set", "env.image=false")  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "member 1: failed" in done.stdout + done.stderr
    health = lines(run / "member_01" / "metrics.jsonl", "health")
    assert len(health) == 1 and "non-finite" in health[0]["reason"]
    stopped = health[0]["step"]
    assert all(r["step"] <= stopped for r in lines(run / "member_01" / "metrics.jsonl", "train"))
    for k in (0, 2):  # the others trained to the end
        assert lines(run / f"member_{k:02d}" / "metrics.jsonl", "train")[-1]["step"] == 12
    assert "failed (non-finite" in (run / "population.md").read_text()
    # Every member failing ends the run with status 3.
    grid = 'population.grid={"train.vector_scale" = [1e38, 1e38]}'
    args = ("--run-dir", str(tmp_path / "all"), "--set", grid, "--set", "env.image=false")
    done = run_module("engine.run", "--config", "configs/tiny.toml", "--population", "2", *args)
    assert done.returncode == 3 and "every member failed" in done.stderr, done.stderr


def test_a_replay_that_cannot_fit_is_refused_before_training(tmp_path):
    done = run_module("engine.run", "--config", "configs/tiny.toml", "--population", "4",
                      "--run-dir", str(tmp_path / "pop"), "--set", "env.image=true",
                      "--set", "train.replay_buffer_size=4000000000")  # fmt: skip
    assert done.returncode == 2, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "train.replay_buffer_size" in errors[0], done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "pop" / "metrics.jsonl").exists()


def test_a_solved_member_keeps_the_counters_of_its_stop_in_later_checkpoints(tmp_path, monkeypatch):
    """Member 0 solves at the first evaluation (step 6) and is frozen; the population trains on to
    step 12. Its latest.pt holds the weights of step 6 and must say step 6 (and that step's env
    steps), so engine.evaluate and a report of the time to solve name the step it stopped at."""
    from engine import checkpoint, population

    cfg = load_config("configs/tiny.toml", ["population.size=2", "env.image=false",
                                            "train.max_train_steps=12", "log.eval_every=6",
                                            "train.stop_solved_evals=1"])  # fmt: skip
    tr = population.PopulationTrainer(cfg, tmp_path / "pop")
    first = tr.member_counters[0]
    solve_first = lambda cfg, ret, c: "solved in the test" if c is first else None  # noqa: E731
    monkeypatch.setattr(population, "solved_reason", solve_first)
    try:
        tr.run()
    finally:
        tr.close()
    load = lambda k: checkpoint.load(  # noqa: E731
        tmp_path / "pop" / f"member_{k:02d}" / "checkpoints" / "latest.pt", torch.device("cpu")
    )
    solved, other = load(0), load(1)
    (record,) = lines(tmp_path / "pop" / "member_00" / "metrics.jsonl", "solved")
    assert solved["counters"]["step"] == record["step"] == 6
    assert solved["counters"]["env_steps"] == record["env_steps"] < other["counters"]["env_steps"]
    assert other["counters"]["step"] == 12
    assert solved["counters"]["wall_time"] < other["counters"]["wall_time"]
    assert "solved (solved in the test)" in (tmp_path / "pop" / "population.md").read_text()


def test_each_solved_member_is_confirmed_on_its_own_rows(tmp_path):
    """Two members complete their solved streak at the same evaluation; the confirmation rounds
    are played once (train.stop_confirm_episodes = 4 over 2 eval envs per member: 2 rounds)
    and each member is judged on its own rows: member 0 averages 475 and stops, member 1
    averages 400 and trains on."""
    from engine import population
    from engine.episodes import Episodes

    cfg = load_config("configs/tiny.toml", ["population.size=2", "env.image=false",
                                            "train.stop_solved_evals=1",
                                            "train.stop_confirm_episodes=4"])  # fmt: skip
    tr = population.PopulationTrainer(cfg, tmp_path / "pop")
    played = []

    def rounds(count):
        played.append(count)
        r = np.array([500.0, 450.0, 400.0, 400.0])  # member 0's 2 envs, then member 1's
        return [Episodes(r, r.astype(np.int64), r < 500, np.ones_like(r))] * count

    tr.evaluator.rounds = rounds
    try:
        tr._stop_solved({0: "streak 0", 1: "streak 1"})
    finally:
        tr.close()
    assert played == [2]
    assert [m["status"] for m in tr.member_counters] == ["solved", "training"]
    reason = tr.member_counters[0]["reason"]
    assert "streak 0; 4 fresh greedy episodes with the same weights averaged 475.0" in reason
    confirms = [lines(tmp_path / "pop" / f"member_0{k}" / "metrics.jsonl", "solve_confirm")
                for k in (0, 1)]  # fmt: skip
    assert [c[0]["passed"] for c in confirms] == [True, False]
    assert confirms[1][0]["confirm_returns"] == [400.0] * 4
    assert not lines(tmp_path / "pop" / "member_01" / "metrics.jsonl", "solved")


def test_a_member_resumed_alone_takes_its_envs_from_the_population_replay(tmp_path):
    """engine.run --resume POP/member_01 continues member 1 as a single run: with
    log.checkpoint_replay its replay is member 1's envs cut out of the population's replay.pt,
    not a refill. The population then refuses to resume over the member trained alone."""
    from engine import checkpoint, population
    from engine.health import TrainingError
    from engine.trainer import Trainer

    sets = ["population.size=2", "env.image=false", "train.max_train_steps=6",
            "log.checkpoint_replay=true"]  # fmt: skip
    pop_dir = tmp_path / "pop"
    tr = population.PopulationTrainer(load_config("configs/tiny.toml", sets), pop_dir)
    try:
        tr.run()
        n = tr.cfg.env.num_envs
        want = {k: v[: min(tr.replay.count, tr.replay.slots), n : 2 * n].clone()
                for k, v in tr.replay.data.items()}  # fmt: skip
        count = tr.replay.count
    finally:
        tr.close()
    member = pop_dir / "member_01"
    assert checkpoint.member_replay(member) == (pop_dir / "checkpoints" / "replay.pt", 1, 2)
    cfg = load_config(member / "config.toml", ["train.max_train_steps=8"])
    alone = Trainer(cfg, member, resume=True)
    try:
        assert alone.replay.count == count and alone.replay.num_envs == n
        for k, v in want.items():
            assert torch.equal(alone.replay.data[k][: len(v)], v), k
        assert alone.train_from == alone.counters["env_steps"]  # no refill before training
        alone.run()
    finally:
        alone.close()
    assert (member / "checkpoints" / "replay.pt").is_file()
    with pytest.raises(TrainingError, match="holds update 8, the population 6 .*resumed alone"):
        population.PopulationTrainer(load_config(pop_dir / "config.toml"), pop_dir, resume=True)


def test_member_replay_finds_the_rank_file_that_holds_a_member(tmp_path):
    from engine import checkpoint

    (tmp_path / "checkpoints").mkdir()
    state = dict(config={"population": {"size": 4}}, world_size=2)
    checkpoint.save(tmp_path / "checkpoints" / "population.pt", state)
    find = lambda name: checkpoint.member_replay(tmp_path / name)  # noqa: E731
    assert find("member_00") == (tmp_path / "checkpoints" / "replay.pt", 0, 2)
    assert find("member_03") == (tmp_path / "checkpoints" / "replay.rank1.pt", 1, 2)
    assert find("member_04") is None and find("run") is None
    assert checkpoint.member_replay(tmp_path / "elsewhere" / "member_00") is None


@pytest.mark.parametrize(
    "killed", ["before population.pt", "before its rename", "before the members' renames"]
)
def test_a_population_killed_while_checkpointing_resumes_from_a_whole_set(
    tmp_path, monkeypatch, killed
):
    """The set saved at step 6 is whole; the one at step 12 is cut off by a 'kill' (an exception
    out of the save). Killed before population.pt.next is written: resume at 6 with the
    members' step-6 weights (their step-12 files dropped). Killed once it is written (before
    its rename, or before the members' renames): resume at 12 with the members' step-12
    weights (the renames completed). Never one step's counters with the other's weights, and
    the replay (log.checkpoint_replay) always the one of the step resumed, not a refill."""
    from engine import checkpoint, population

    run = tmp_path / "pop"
    sets = ["population.size=2", "env.image=false", "train.max_train_steps=12",
            "log.checkpoint_every=6", "log.checkpoint_replay=true"]  # fmt: skip
    tr = population.PopulationTrainer(load_config("configs/tiny.toml", sets), run)
    at_12 = lambda *_: tr.counters["step"] == 12  # noqa: E731
    staged = lambda path, _: Path(path).name == "population.pt.next" and at_12()  # noqa: E731
    if killed == "before population.pt":
        monkeypatch.setattr(checkpoint, "save", kill_when(checkpoint.save, staged))
    elif killed == "before its rename":
        monkeypatch.setattr(population.os, "replace", kill_when(os.replace, staged))
    else:
        cls = population.PopulationTrainer
        monkeypatch.setattr(cls, "_commit_members", kill_when(cls._commit_members, at_12))
    run_until_killed(tr, monkeypatch)
    member = lambda k, f: run / f"member_{k:02d}" / "checkpoints" / f  # noqa: E731
    read = lambda path: torch.load(path, weights_only=False)  # noqa: E731
    assert all(read(member(k, "latest.pt.next"))["saved_at"] == 12 for k in (0, 1))
    assert all(read(member(k, "latest.pt"))["counters"]["step"] == 6 for k in (0, 1))
    staged = read(member(0, "latest.pt.next"))["agent"]
    back = population.PopulationTrainer(load_config(run / "config.toml"), run, resume=True)
    try:
        expect = 6 if killed == "before population.pt" else 12
        assert back.counters["step"] == expect
        assert not (run / "checkpoints" / "population.pt.next").exists()
        for k in (0, 1):
            assert not member(k, "latest.pt.next").exists()
            assert read(member(k, "latest.pt"))["counters"]["step"] == expect
        weights, _ = back.agent.member_state(0)
        name = "behavior.actor.out.weight"
        assert torch.equal(weights[name], staged[name]) == (expect == 12)
        # The replay of that step is restored: every env step so far, none to refill.
        assert back.replay.count * back.cfg.env.num_envs == back.counters["env_steps"] > 0
        assert back.train_from == back.counters["env_steps"]
        assert not (run / "checkpoints" / "replay.pt.next").exists()
    finally:
        back.close()


@pytest.mark.parametrize(
    "held, want",
    [
        ([(6, None), (6, None)], 6),
        ([(12, None), (6, 12)], 12),  # rank 1 killed after the commit barrier, before renaming
        ([(6, 12), (6, 12)], 12),  # both killed there
        ([(6, 12), (6, None)], 6),  # rank 1 killed before its set of step 12 was written
        ([(None, 6), (None, None)], None),
        ([(12, None), (6, None)], None),  # no common step: refused
    ],
)
def test_the_resume_step_is_the_latest_every_rank_holds(held, want):
    from engine.population import _complete_step

    assert _complete_step(held) == want


@pytest.mark.parametrize("other", [(12, None), (6, None), (18, None)])
def test_a_rank_settles_its_population_file_on_the_step_every_rank_holds(tmp_path, other):
    """This rank holds step 6 committed and step 12 staged; the other rank's files decide."""
    import types

    from engine import checkpoint
    from engine.health import TrainingError
    from engine.population import PopulationTrainer

    path = tmp_path / "population.rank1.pt"
    checkpoint.save(path, {"counters": {"step": 6}})
    checkpoint.save(tmp_path / "population.rank1.pt.next", {"counters": {"step": 12}})

    class TwoRanks:
        def gather_objects(self, mine, what):
            return [other, mine]

    me = types.SimpleNamespace(dist=TwoRanks())
    if other == (18, None):
        with pytest.raises(TrainingError, match=r"rank 0: step 18; rank 1: step 6, step 12 staged"):
            PopulationTrainer._settle_population(me, path)
        return
    PopulationTrainer._settle_population(me, path)
    assert torch.load(path, weights_only=False)["counters"]["step"] == other[0]
    assert not (tmp_path / "population.rank1.pt.next").exists()


def test_a_rank_other_than_0_still_prints_its_members_stops(capsys):
    """Under torchrun only rank 0 prints progress; a member stopping on rank 1 is said by rank 1."""
    from engine.logger import Progress

    quiet = Progress(10, 0, enabled=True, lines=False)  # what a rank other than 0 holds
    quiet.write("step 6: eval return 1.0")
    quiet.write("member 3: solved at step 6: ...", every_rank=True)
    assert capsys.readouterr().err == "member 3: solved at step 6: ...\n"


# ---- Population-based training ------------------------------------------------------------------


def test_copy_member_and_set_member_config_act_in_place():
    _, members = population_config()
    pop = PopulationAgent(members, 4, 2)
    B, T = members[0].train.batch_size, members[0].train.sequence_length
    pop.learn(make_batch(members[0], K * B, T), True)
    pop.copy_member(2, 0)
    a, b = pop.member_state(0), pop.member_state(2)
    for name in a[0]:
        assert torch.equal(a[0][name], b[0][name]), name
    for group in a[1]:
        for x, y in zip(a[1][group]["m"] + a[1][group]["v"], b[1][group]["m"] + b[1][group]["v"]):
            assert torch.equal(x, y)
    assert pop.buffers["behavior.gamma"][0] == pop.buffers["behavior.gamma"][2]
    cfg = load_config("configs/tiny.toml", ["train.gamma=0.95", "train.actor_lr=0.002"])
    pop.set_member_config(1, cfg)
    assert pop.buffers["behavior.gamma"][1].item() == pytest.approx(0.95)
    assert pop.actor_opt.lr[1].item() == pytest.approx(0.002)
    assert pop.cfgs[1] is cfg and pop.buffers["behavior.gamma"][0].item() == pytest.approx(0.997)


def test_explore_perturbs_the_grid_keys_within_their_valid_range():
    from engine.population import explore

    cfg = load_config("configs/tiny.toml", ["train.gamma=0.99", "train.actor_lr=0.001"])
    rng = np.random.default_rng(0)
    out = explore(cfg, 7, ["train.gamma", "train.actor_lr"], [1.25], rng)
    assert out.general.seed == 7 and cfg.general.seed == 0  # a copy, the member's own seed
    assert out.train.actor_lr == pytest.approx(0.00125)
    assert out.train.gamma == 0.99  # 0.99 x 1.25 >= 1 is refused: the source's value stays


@pytest.mark.slow
def test_pbt_copies_a_top_member_into_a_bottom_one_and_records_it(tmp_path):
    run = tmp_path / "pop"
    sets = [
        'population.grid={"train.actor_lr" = [1e-4, 2e-4, 4e-4, 8e-4]}',
        "population.pbt.every=6",
        "population.pbt.quantile=0.25",
        "env.image=false",
    ]
    args = [a for item in sets for a in ("--set", item)]
    done = run_module("engine.run", "--config", "configs/tiny.toml", "--population", "4",
                      "--run-dir", str(run), *args)  # fmt: skip
    assert done.returncode == 0, done.stderr
    exploits = lines(run / "metrics.jsonl", "pbt_exploit")
    assert [e["step"] for e in exploits] == [6, 12]
    first = exploits[0]
    dst, src = first["target"], first["source"]
    evals = {k: lines(run / f"member_{k:02d}" / "metrics.jsonl", "eval")[0]["eval_return"]
             for k in range(4)}  # fmt: skip
    assert evals[dst] == min(evals.values()) and evals[src] == max(evals.values())
    mine = lines(run / f"member_{dst:02d}" / "metrics.jsonl", "pbt_exploit")[0]
    assert mine["source"] == src and mine["eval_return_before"] == evals[dst]
    lr = mine["settings"]["train.actor_lr"]
    assert any(lr == pytest.approx(f * [1e-4, 2e-4, 4e-4, 8e-4][src]) for f in (0.8, 1.25))
    theirs = lines(run / f"member_{src:02d}" / "metrics.jsonl", "pbt_source")
    assert theirs and theirs[0]["target"] == dst
    assert "pbt at step 6" in done.stdout + done.stderr
