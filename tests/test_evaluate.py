"""engine.episodes (the shared episode loop, episode ends), engine.rundir (a run directory read
back) and engine.evaluate, the command that re-checks a checkpoint."""

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from engine import evaluate
from engine.agent import Agent
from engine.behavior import Behavior
from engine.config import load_config
from engine.envs import make_env
from engine.episodes import Episodes, end_labels, episode_ends, lunar_potential, play_episodes
from engine.evaluate import (
    ValueProbe,
    dream_split,
    ends_text,
    summary,
    target_check,
    value_check,
    values_text,
)
from engine.rundir import RunError, load_run
from engine.transfer import ObsUploader
from tests.helpers import run_module, tiny_run


def cli(*args: str) -> subprocess.CompletedProcess:
    return run_module("engine.evaluate", *args)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return tiny_run(tmp_path_factory.mktemp("evaluate") / "tiny")


@pytest.fixture(scope="module")
def lunar_dir(tmp_path_factory) -> Path:
    """configs/tiny.toml on LunarLander-v3: a few seconds; its greedy episodes all crash."""
    return tiny_run(tmp_path_factory.mktemp("evaluate") / "lunar", 'env.name="LunarLander-v3"')


def test_play_episodes_counts_each_episode_once_and_records_env_0():
    cfg = load_config("configs/tiny.toml")
    env = make_env("CartPole-v1", cfg.env.backend, 3, 5, cfg.image_size, True)
    torch.manual_seed(0)
    agent = Agent(cfg, env.vector_dim, env.num_actions)
    seen = []

    def record(obs, action):
        seen.append((bool(obs["is_first"][0]), bool(obs["is_last"][0]), action))
        return not obs["is_last"][0]

    class Env1Truncated:
        """env 1's episode end reported as a time-limit cut, as a time limit would."""

        num_envs = env.num_envs

        def reset(self):
            return env.reset()

        def step(self, action):
            obs = env.step(action)
            return {**obs, "is_terminal": obs["is_terminal"] & (np.arange(3) != 1)}

    try:
        returns, lengths, terminal, last = play_episodes(
            agent, Env1Truncated(), ObsUploader(torch.device("cpu")), True, record
        )
    finally:
        env.close()
    # How each episode ended: CartPole's untrained episodes end by the pole falling, reward 1.
    np.testing.assert_array_equal(terminal, [True, False, True])
    np.testing.assert_array_equal(last, [1.0, 1.0, 1.0])
    # CartPole pays 1 per step: each env's return is its episode's length, counted once even
    # though the envs that end first keep stepping (auto-reset) until the last one ends.
    assert returns.shape == lengths.shape == (3,)
    np.testing.assert_array_equal(returns, lengths)
    assert (lengths >= 1).all()
    # env 0's episode from its first observation to its last, one action each.
    assert seen[0][0] and seen[-1][1] and not any(last for _, last, _ in seen[:-1])
    assert len(seen) == lengths[0] + 1


@pytest.mark.parametrize("greedy", [True, False])
def test_value_probe_sees_every_step_of_each_episode_once(greedy):
    """--values' probe: each env is playing for exactly its episode's steps, the rewards it sees
    sum to the episode's return, and its values are the critic's at the policy's posterior. Its
    imagination draws from its own random stream: the episodes are those played without it."""
    cfg = load_config("configs/tiny.toml")
    torch.manual_seed(0)
    agent = Agent(cfg, 4, 2).eval()

    def play(probe):
        env = make_env("CartPole-v1", cfg.env.backend, 3, 7, cfg.image_size, True)
        torch.manual_seed(1)
        try:
            return play_episodes(agent, env, ObsUploader(torch.device("cpu")), greedy, probe=probe)
        finally:
            env.close()

    probe, carries = ValueProbe(agent, 0.9, greedy, seed=5), []

    def both(carry, playing, reward):
        carries.append(carry)
        probe(carry, playing, reward)

    episodes = play(both)
    alone = play(None)
    np.testing.assert_array_equal(episodes.returns, alone.returns)
    np.testing.assert_array_equal(episodes.lengths, alone.lengths)
    values, predicted, playing, rewards, dreamed = probe.arrays()
    assert values.shape == predicted.shape == playing.shape == rewards.shape == dreamed.shape
    assert values.shape == (episodes.lengths.max(), 3)
    np.testing.assert_array_equal(playing.sum(0), episodes.lengths)
    np.testing.assert_allclose(rewards.sum(0), episodes.returns)
    assert (rewards[~playing] == 0).all()
    deter, stoch, _ = carries[-1]
    with torch.no_grad():
        feat = agent.wm.feat(deter, stoch)
        expected = agent.behavior.value(agent.behavior.critic(feat).float())
        again = probe.imagine(deter, stoch)  # the next step's stream: a different draw
    np.testing.assert_allclose(values[-1], expected.numpy(), rtol=1e-6)
    assert np.isfinite(dreamed).all() and np.isfinite(again.numpy()).all()


class _StubWorld:
    """A world model whose imagined step adds 1 to the state, whose reward head reads the state
    and whose episode continues with probability 0.5 at every step."""

    feat = staticmethod(lambda deter, stoch: deter)

    def img_step(self, deter, stoch, action):
        assert action.shape == (deter.shape[0], 2) and (action.sum(-1) == 1).all()
        return deter + 1, stoch

    def reward(self, feat):
        return feat[..., 0]

    def cont_prob(self, feat):
        return torch.full_like(feat[..., 0], 0.5)

    def decode_vector(self, feat):
        return feat


class _StubBehavior:
    num_actions, horizon, lam = 2, 3, 0.5
    imagine = Behavior.imagine  # the real rollout over the stub world
    critic = staticmethod(lambda feat: feat)
    value = staticmethod(lambda x: x[..., 0])

    def act(self, feat, greedy):
        return torch.zeros(feat.shape[0], dtype=torch.long)


def test_value_probe_imagination_by_hand():
    """Imagined rewards weigh as in training's lambda-return: gamma^k times the probability the
    episode still runs. From states 0 and 10, rewards 1, 2, 3 and 11, 12, 13; gamma 0.9."""
    agent = type("Stub", (), dict(wm=_StubWorld(), behavior=_StubBehavior()))()
    probe = ValueProbe(agent, 0.9)
    deter = torch.tensor([[0.0], [10.0]])
    w = [1.0, 0.45, 0.45**2]
    expected = [sum(wk * r for wk, r in zip(w, rs)) for rs in ([1, 2, 3], [11, 12, 13])]
    np.testing.assert_allclose(probe.imagine(deter, deter).numpy(), expected, rtol=1e-6)


def test_value_probe_follows_the_potential_along_the_imagined_states():
    """With a potential (here twice the stub's state), the probe keeps each real state's
    potential and its weighted rise along the imagined steps: states 0 -> 1 -> 2 -> 3 rise by 2
    a step, weighed 1, 0.45, 0.45^2 as the rewards."""
    agent = type("Stub", (), dict(wm=_StubWorld(), behavior=_StubBehavior()))()
    probe = ValueProbe(agent, 0.9, potential=lambda v: 2 * v[..., 0])
    deter = torch.tensor([[0.0], [10.0]])
    probe((deter, deter), np.array([True, True]), np.array([0.0, 0.0]))
    phi, rise = probe.shaping_arrays()
    np.testing.assert_allclose(phi, [[0.0, 20.0]])
    np.testing.assert_allclose(rise, [[2 * (1 + 0.45 + 0.45**2)] * 2], rtol=1e-6)
    dreamed = probe.arrays()[4]
    np.testing.assert_allclose(dreamed[0], probe.imagine(deter, deter).numpy(), rtol=1e-6)
    assert ValueProbe(agent, 0.9).shaping_arrays() is None


def test_value_probe_target_is_trainings_lambda_return_by_hand():
    """The critic's target from each state: the lambda-return over the imagined states (the
    stub's reward and value read the state, continue 0.5), gamma 0.9, lambda 0.5. From state 0:
    R3 = 3, R2 = 3 + 0.45 * 3, R1 = 2 + 0.45 (2 + R2) / 2, R0 = 1 + 0.45 (1 + R1) / 2."""
    agent = type("Stub", (), dict(wm=_StubWorld(), behavior=_StubBehavior()))()
    probe = ValueProbe(agent, 0.9)
    deter = torch.tensor([[0.0], [10.0]])
    expected = []
    for s0 in (0.0, 10.0):
        ret = s0 + 3
        for k in (3, 2, 1):
            ret = (s0 + k) + 0.45 * (0.5 * (s0 + k) + 0.5 * ret)  # reward and value: s0 + k
        expected.append(ret)
    np.testing.assert_allclose(expected, [1.99646875, 17.73678125])
    probe((deter, deter), np.array([True, True]), np.array([0.0, 0.0]))
    np.testing.assert_allclose(probe.target_arrays(), [expected], rtol=1e-6)


def test_target_check_by_hand():
    """gamma 0.5, lambda 0.5, windows of 2. Env 0 plays 4 steps (values 4, 8, 2, 6, rewards 1,
    2, 3, 4), env 1 plays 3 (values 10, 0, 4, rewards 1, 1, 1): windows at env 0's t = 0, 1 and
    env 1's t = 0. Real targets: R1 = r1 + 0.5 v2, R0 = r0 + 0.5 (0.5 v1 + 0.5 R1): env 0 3.75
    and 4, env 1 1.75. A target keeps 0.5 (0.5 + 0.5 * 0.5 (0.5 + 0.5)) = 0.375 of values."""
    playing = np.array([[1, 1], [1, 1], [1, 1], [1, 0]], dtype=bool)
    real = np.array([[1.0, 1.0], [2.0, 1.0], [3.0, 1.0], [4.0, 0.0]])
    values = np.array([[4.0, 10.0], [8.0, 0.0], [2.0, 4.0], [6.0, 0.0]])
    targets = np.array([[5.0, 2.0], [3.0, 9.0], [9.0, 9.0], [9.0, 9.0]])
    v = target_check(values, real, playing, targets, 0.5, 0.5, 2)
    assert v["target_states"] == 3
    assert v["target_value"] == pytest.approx(22 / 3)
    assert v["target_imagined"] == pytest.approx(10 / 3)
    assert v["target_real"] == pytest.approx(9.5 / 3)
    assert v["target_gap"] == pytest.approx(0.5 / 3)
    assert v["value_vs_target"] == pytest.approx(12 / 3)
    assert v["target_residual"] == pytest.approx(12.5 / 3)
    assert v["target_residual"] == pytest.approx(v["target_gap"] + v["value_vs_target"])
    assert v["target_keep"] == pytest.approx(0.375)
    assert v["target_settle"] == pytest.approx(12.5 / 3 / 0.625)
    # A critic that is the real value (a constant reward c, forever: c / (1 - gamma)) under
    # an exact imagination leaves no residual, at training's settings too.
    c, gamma = 0.7, 0.997
    steps = np.full((60, 1), True)
    v = target_check(
        np.full((60, 1), c / (1 - gamma)),
        np.full((60, 1), c),
        steps,
        np.full((60, 1), c / (1 - gamma)),
        gamma,
        0.95,
        15,
    )
    assert abs(v["target_residual"]) < 1e-9 and v["target_keep"] == pytest.approx(0.969, abs=1e-3)
    assert target_check(values[:2], real[:2], playing[:2], targets[:2], 0.5, 0.5, 2) == dict(
        target_states=0
    )


def test_dream_split_by_hand():
    """gamma 0.5, windows of 2. Env 0 plays 4 steps (rewards 1, 2, 3, 4; potential 0, 2, 5, 9),
    env 1 plays 3: only windows whose state 2 steps on was observed count: env 0's t = 0, 1 and
    env 1's t = 0."""
    playing = np.array([[1, 1], [1, 1], [1, 1], [1, 0]], dtype=bool)
    real = np.array([[1.0, 1.0], [2.0, 1.0], [3.0, 1.0], [4.0, 0.0]])
    phi = np.array([[0.0, 0.0], [2.0, 4.0], [5.0, 4.0], [9.0, 0.0]])
    dreamed = np.array([[10.0, 7.0], [20.0, 0.0], [0.0, 0.0], [0.0, 0.0]])
    rise = np.array([[4.0, 1.0], [6.0, 0.0], [0.0, 0.0], [0.0, 0.0]])
    v = dream_split(dreamed, real, playing, 0.5, 2, phi, rise)
    # Real rises: env 0 2 + 0.5*3 = 3.5, 3 + 0.5*4 = 5; env 1 4 + 0.5*0 = 4. Real windows: env
    # 0 1 + 0.5*2 = 2, 2 + 0.5*3 = 3.5; env 1 1 + 0.5 = 1.5.
    assert v["dream_split_states"] == 3
    assert v["dream_split_gap"] == pytest.approx((8 + 16.5 + 5.5) / 3)
    assert v["dream_rise"] == pytest.approx(11 / 3)
    assert v["dream_rise_real"] == pytest.approx(12.5 / 3)
    assert v["dream_dynamics"] == pytest.approx((0.5 + 1 - 3) / 3)
    assert v["dream_beyond"] == pytest.approx((6 + 14 + 6) / 3)
    assert v["dream_beyond_real"] == pytest.approx((-1.5 - 1.5 - 2.5) / 3)
    assert v["dream_head"] == pytest.approx((7.5 + 15.5 + 8.5) / 3)
    assert v["dream_dynamics"] + v["dream_head"] == pytest.approx(v["dream_split_gap"])
    assert dream_split(dreamed[:2], real[:2], playing[:2], 0.5, 2, phi[:2], rise[:2]) == dict(
        dream_split_states=0
    )


def test_lunar_potential_is_what_lunarlander_pays():
    """A LunarLander-v3 step pays the potential's change less the fuel (0.3 main engine, 0.03 a
    side engine), except the +100 / -100 of its last step: checked on random play."""
    gym = pytest.importorskip("gymnasium")
    pytest.importorskip("Box2D")
    env = gym.make("LunarLander-v3")
    rng = np.random.default_rng(0)
    obs, _ = env.reset(seed=3)
    checked = 0
    for _ in range(300):
        action = int(rng.integers(4))
        nxt, reward, terminated, truncated, _ = env.step(action)
        if terminated or truncated:
            obs, _ = env.reset()
            continue
        fuel = {0: 0.0, 1: 0.03, 2: 0.3, 3: 0.03}[action]
        expected = lunar_potential(nxt) - lunar_potential(obs) - fuel
        assert reward == pytest.approx(expected, abs=2e-3)
        obs, checked = nxt, checked + 1
    env.close()
    assert checked > 200


def test_value_check_by_hand():
    """Two episodes, gamma 0.5: env 0 plays 3 steps (rewards 1, 2, 4) and rests, env 1 plays 2
    (rewards -1, 8) and is cut at a time limit; the figures by hand."""
    playing = np.array([[1, 1], [1, 1], [1, 0]], dtype=bool)
    rewards = np.array([[1.0, -1.0], [2.0, 8.0], [4.0, 0.0]])
    values = np.array([[5.0, 1.0], [9.0, 9.0], [9.0, 9.0]])
    predicted = np.array([[7.0, 7.0], [1.5, -2.0], [2.0, 9.0]])  # row 0 predicts nothing
    ends = dict(
        rest=np.array([True, False]),
        crash=np.array([False, False]),
        time_limit=np.array([False, True]),
    )
    # Imagined 2 steps ahead; env 1's last state is left out (its real window is cut by the
    # limit), whatever it imagines.
    dreamed = np.array([[3.0, 5.0], [4.0, 100.0], [6.0, 0.0]])
    v = value_check(values, predicted, playing, rewards, 0.5, ends, dreamed, 2)
    # Returns from the first state: 1 + 0.5*2 + 0.25*4 = 3 and -1 + 0.5*8 = 3.
    assert v["return_start"] == [3.0, 3.0] and v["value_start"] == [5.0, 1.0]
    assert v["value_bias"] == 0.0 and v["value_bias_by_end"] == {"rest": 2.0, "time_limit": -2.0}
    # Every state acted from, against its return to go: env 0's 3, 4, 4 (values 5, 9, 9), env
    # 1's 3, 8 (values 1, 9; cut at the limit); pooled over the 5 states.
    assert v["states"] == 5
    assert v["value_states_mean"] == pytest.approx(33 / 5)
    assert v["return_states_mean"] == pytest.approx(22 / 5)
    assert v["value_bias_states"] == pytest.approx(11 / 5)
    assert v["value_bias_states_by_end"] == pytest.approx({"rest": 4.0, "time_limit": -0.5})
    # Predictions of the rewards that led to observed states: env 0's steps 1 and 2 (of rewards
    # 1 and 2), env 1's step 1 (of reward -1).
    assert v["reward_predicted_mean"] == pytest.approx((1.5 + 2.0 - 2.0) / 3)
    assert v["reward_real_mean"] == pytest.approx((1.0 + 2.0 - 1.0) / 3)
    # Real windows of 2 steps: env 0's 1 + 0.5*2, 2 + 0.5*4, 4 (it rested), env 1's -1 + 0.5*8.
    assert v["dream_horizon"] == 2 and v["dream_states"] == 4
    assert v["dream_reward_mean"] == pytest.approx((3 + 4 + 6 + 5) / 4)
    assert v["dream_real_mean"] == pytest.approx((2 + 4 + 4 + 3) / 4)
    assert v["dream_gap"] == pytest.approx(1.25)
    assert v["dream_gap_by_end"] == pytest.approx({"rest": 1.0, "time_limit": 2.0})
    s = dict(rest=1, time_limit=1, lengths=[3, 2], end=["rest", "time_limit"])
    assert values_text(v, s) == (
        "values: the critic values the first state at 3.0 against a real discounted return of "
        "3.0 (gamma 0.5): +0.0 (1 rest +2.0, 1 at the time limit -2.0); over the 5 states it "
        "acted from, 6.6 against 4.4 to go: +2.2 (rest +4.0, at the time limit -0.5); reward "
        "head 0.500 per "
        "step against 0.667 real (-0.167); imagined 2 steps ahead from 4 states, the reward "
        "head expects 4.50 (discounted) against 3.25 real: +1.25 (rest +1.00, at the time limit "
        "+2.00); a time-limit episode's return stops at its limit (the rest weighs gamma^2 = "
        "0.250 or less)"
    )


@pytest.mark.parametrize("members", [1, 2])
def test_padded_policy_rows_play_the_same_episodes(monkeypatch, members):
    """The evaluator pads the policy's batch to training's shape (a compiled policy then needs
    no graph for the eval batch): each member's envs first in its block of rows, zero rows after.
    The envs' episodes are those of the unpadded batch."""
    from engine.config import member_configs
    from engine.fast import FastOptions
    from engine.population_agent import PopulationAgent

    cfg = load_config("configs/tiny.toml", [f"population.size={members}"])
    torch.manual_seed(0)
    if members == 1:
        agent = Agent(cfg, 4, 2)
    else:
        agent = PopulationAgent(member_configs(cfg), 4, 2, torch.device("cpu"), FastOptions())
    # What the policy saw and returned, and what the envs were given, per step.
    calls, stepped = [], []
    policy = agent.policy

    def spy_policy(obs, carry, greedy):
        action, carry = policy(obs, carry, greedy)
        # The untrained agent's action hardly depends on its row: each row's action is made its
        # own pole angle's sign (0 on a zero row), so an env given another row's action, or a
        # member's envs swapped with its zero rows, plays another episode.
        action = (obs["vector"][:, 2] > 0).long()
        calls.append(({k: v.clone() for k, v in obs.items()}, action))
        return action, carry

    monkeypatch.setattr(agent, "policy", spy_policy)
    played, per, n = [], 2, 5
    for rows in (None, (members, n)):
        env = make_env("CartPole-v1", cfg.env.backend, per * members, 7, cfg.image_size, True)
        step = env.step
        env.step = lambda action, step=step: (stepped.append(np.array(action)), step(action))[1]
        try:
            played.append(play_episodes(agent, env, ObsUploader(torch.device("cpu")), True,
                                        rows=rows))  # fmt: skip
        finally:
            env.close()
    for got, want in zip(played[1], played[0]):
        np.testing.assert_array_equal(got, want)
    # Row by row: in the padded run each member's block of n rows holds its envs' observations
    # first, zeros after, and its envs are given the actions of their own rows.
    steps = int(played[0].lengths.max())  # policy calls per run (both runs' calls in order)
    assert len(calls) == len(stepped) == 2 * steps
    for (obs, action), (obs0, _), given in zip(calls[steps:], calls[:steps], stepped[steps:]):
        for key, x in obs.items():
            blocks = x.reshape(members, n, *x.shape[1:])
            want = obs0[key].reshape(members, per, *x.shape[1:])
            torch.testing.assert_close(blocks[:, :per], want, rtol=0, atol=0, msg=key)
            assert not blocks[:, per:].any(), key
        np.testing.assert_array_equal(given, action.reshape(members, n)[:, :per].flatten())


@pytest.mark.compiled
def test_a_compiled_run_evaluates_without_a_graph_of_its_own(tmp_path, monkeypatch):
    """The eval envs (log.eval_episodes) are fewer than the training envs and the eval is
    greedy: without padding and the tensor flag, the compiled policy recompiled for the eval
    batch and the flag, and turned its graphs dynamic. Any recompile during an eval fails."""
    import torch._dynamo

    from engine.evaluation import Evaluator
    from engine.trainer import Trainer

    play = Evaluator.play

    def strict_play(self, record=False):
        with torch._dynamo.config.patch(error_on_recompile=True):
            return play(self, record)

    monkeypatch.setattr(Evaluator, "play", strict_play)
    sets = ["general.compile=true", "env.image=false", "train.max_train_steps=6"]
    tr = Trainer(load_config("configs/tiny.toml", sets), tmp_path / "r")
    try:
        assert tr.cfg.log.eval_episodes < tr.cfg.env.num_envs
        tr.run()
    finally:
        tr.close()
    assert [r["type"] for r in map(json.loads, (tmp_path / "r" / "metrics.jsonl").open())].count(
        "eval"
    )


def test_episode_ends_lunarlander_and_cartpole():
    terminal = np.array([True, True, False, True, False, True])
    last = np.array([100.4, -100.2, -0.3, 0.0, 2.5, 97.0])
    ends = episode_ends("LunarLander-v3", terminal, last)
    assert list(ends) == ["rest", "crash", "time_limit"]
    np.testing.assert_array_equal(ends["rest"], [True, False, False, False, False, True])
    # A termination with last reward exactly 0 counts as a crash; a time-limit cut with a
    # positive last reward is still a time-limit end.
    np.testing.assert_array_equal(ends["crash"], [False, True, False, True, False, False])
    np.testing.assert_array_equal(ends["time_limit"], [False, False, True, False, True, False])
    assert end_labels(ends) == ["rest", "crash", "time_limit", "crash", "time_limit", "rest"]
    # CartPole (and any other task): terminated (the pole fell) or cut at the time limit; the
    # last reward does not matter.
    ends = episode_ends("CartPole-v1", terminal, last)
    assert list(ends) == ["terminated", "time_limit"]
    np.testing.assert_array_equal(ends["terminated"], terminal)
    np.testing.assert_array_equal(ends["time_limit"], ~terminal)
    assert list(episode_ends("", terminal, last)) == ["terminated", "time_limit"]
    # Every episode in exactly one group; lists are accepted; no episodes, no counts.
    for task in ("LunarLander-v3", "CartPole-v1"):
        ends = episode_ends(task, terminal.tolist(), last.tolist())
        np.testing.assert_array_equal(sum(m.astype(int) for m in ends.values()), 1)
        assert all(m.sum() == 0 for m in episode_ends(task, [], []).values())
    with pytest.raises(ValueError, match="differ"):
        episode_ends("LunarLander-v3", terminal, last[:3])


def test_episodes_record_fields_for_each_task():
    """Episodes.record: the fields the eval and solve_confirm records carry, by hand, and a
    member's rows give its own episodes' fields."""
    eps = Episodes(
        returns=np.array([250.0, -120.0, 30.0, 10.0]),
        lengths=np.array([300, 90, 1000, 40]),
        terminal=np.array([True, True, False, True]),
        last_reward=np.array([100.0, -100.0, 0.5, 100.0]),
    )
    rec = eps.record("eval", "LunarLander-v3")
    assert rec == dict(
        eval_return=42.5,
        eval_return_std=float(np.std([250.0, -120.0, 30.0, 10.0])),
        eval_returns=[250.0, -120.0, 30.0, 10.0],
        eval_length=357.5,
        eval_episodes=4,
        eval_terminated=3,
        eval_rest=2,
        eval_crash=1,
        eval_time_limit=1,
    )
    cart = eps.rows(slice(2, 4)).record("confirm", "CartPole-v1")
    assert cart["confirm_returns"] == [30.0, 10.0] and cart["confirm_episodes"] == 2
    assert cart["confirm_terminated"] == 1 and cart["confirm_time_limit"] == 1
    assert "confirm_rest" not in cart and cart["confirm_length"] == 520.0


def test_episode_ends_of_a_committed_reevaluation():
    """llF best.pt's 50 greedy episodes (benchmarks/results, written before the split): the
    figures the README quotes. The final rewards are exactly +-100 on termination."""
    path = Path(__file__).resolve().parent.parent / "benchmarks/results"
    record = json.loads((path / "lunarlander_d64_cpu_reeval.json").read_text())
    r = record["runs"]["llF best.pt (update 48000)"]
    episodes = Episodes(
        *(np.array(r[k]) for k in ("returns", "lengths", "terminal")), np.array(r["last_rewards"])
    )
    s = summary(episodes, 200.0, r["task"])
    assert ends_text(s) == (
        "ends: 35 rest (mean return 206.2), 8 crash (mean -66.1), 7 at the time limit (mean 29.2)"
    )
    terminal_rewards = {abs(x) for x, t in zip(r["last_rewards"], r["terminal"]) if t}
    assert terminal_rewards == {100.0}


def test_summary_figures():
    episodes = Episodes(
        np.array([100.0, 250.0, 300.0, -50.0]),
        np.array([1000, 20, 30, 40]),
        np.array([False, True, True, True]),
        np.array([-0.3, 100.0, 100.0, -100.0]),
    )
    s = summary(episodes, 200.0, "CartPole-v1")
    assert s["mean"] == 150.0 and s["median"] == 175.0 and (s["min"], s["max"]) == (-50.0, 300.0)
    assert s["at_target"] == 2 and s["episodes"] == 4 and s["mean_length"] == 272.5
    assert (s["terminated"], s["terminated_mean"]) == (3, 500.0 / 3)
    assert (s["time_limit"], s["time_limit_mean"]) == (1, 100.0)
    assert s["terminal"] == [False, True, True, True] and s["last_rewards"][3] == -100.0
    assert s["end"] == ["time_limit", "terminated", "terminated", "terminated"]
    assert s["end_counts"] == {"terminated": 3, "time_limit": 1} and "rest" not in s
    assert (
        ends_text(s) == "ends: 3 terminated (mean return 166.7), 1 at the time limit (mean 100.0)"
    )
    s = summary(episodes._replace(terminal=np.ones(4, dtype=bool)), 200.0)
    assert s["time_limit_mean"] is None and ends_text(s).endswith(", 0 at the time limit")
    # LunarLander: terminations split by the last reward into rest and crash.
    s = summary(episodes, 200.0, "LunarLander-v3")
    assert s["end_counts"] == {"rest": 2, "crash": 1, "time_limit": 1}
    assert (s["rest"], s["rest_mean"], s["crash"], s["crash_mean"]) == (2, 275.0, 1, -50.0)
    assert (s["terminated"], s["time_limit"], s["time_limit_mean"]) == (3, 1, 100.0)
    assert s["end"] == ["time_limit", "rest", "rest", "crash"]
    assert ends_text(s) == (
        "ends: 2 rest (mean return 275.0), 1 crash (mean -50.0), 1 at the time limit (mean 100.0)"
    )
    # The first group with episodes says "mean return"; empty groups carry no mean.
    s = summary(episodes._replace(last_reward=np.full(4, -100.0)), 200.0, "LunarLander-v3")
    assert s["rest_mean"] is None
    assert ends_text(s) == (
        "ends: 0 rest, 3 crash (mean return 166.7), 1 at the time limit (mean 100.0)"
    )


def test_load_run_errors(tmp_path):
    with pytest.raises(RunError, match="no such run directory"):
        load_run(tmp_path / "nope", None, None, 1, None, 0)
    (tmp_path / "empty").mkdir()
    with pytest.raises(RunError, match="no best.pt or latest.pt"):
        load_run(tmp_path / "empty", None, None, 1, None, 0)
    bad = tmp_path / "bad" / "checkpoints"
    bad.mkdir(parents=True)
    (bad / "latest.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(RunError, match="cannot read the checkpoint"):
        load_run(tmp_path / "bad", None, None, 1, None, 0)
    with pytest.raises(RunError, match="no best.pt"):
        load_run(tmp_path / "bad", "best", None, 1, None, 0)


@pytest.mark.slow
def test_cli_prints_and_writes_the_figures(run_dir, tmp_path):
    out = tmp_path / "eval.json"
    done = cli(str(run_dir), "--episodes", "6", "--json", str(out))
    assert done.returncode == 0, done.stderr
    line = done.stdout.strip()
    assert line.startswith(f"{run_dir / 'checkpoints' / 'best.pt'} (step 12), 6 greedy episodes")
    assert "from seed 30000" in line and "/6 >= 450" in line
    record = json.loads(out.read_text())
    assert record["episodes"] == 6 and len(record["returns"]) == 6 and record["step"] == 12
    assert record["policy"] == "greedy" and record["task"] == "CartPole-v1"
    assert record["mean"] == pytest.approx(np.mean(record["returns"]))
    assert record["mean"] == pytest.approx(record["mean_length"])  # CartPole: 1 per step
    assert f"return {record['mean']:.1f} +- {record['std']:.1f}" in line
    # Untrained CartPole episodes end by the pole falling, long before the 500-step limit.
    assert line.endswith(
        f"ends: 6 terminated (mean return {record['mean']:.1f}), 0 at the time limit"
    )
    assert record["terminal"] == [True] * 6 and record["lengths"] == [
        int(r) for r in record["returns"]
    ]
    assert record["end"] == ["terminated"] * 6
    assert record["end_counts"] == {"terminated": 6, "time_limit": 0}
    # The same command gives the same figures; another seed, other episodes.
    again = cli(str(run_dir), "--episodes", "6")
    assert again.stdout == done.stdout
    other = cli(str(run_dir), "--episodes", "6", "--seed", "7", "--policy", "sample")
    assert other.returncode == 0 and "from seed 7" in other.stdout and "sampled" in other.stdout


@pytest.mark.slow
@pytest.mark.parametrize(
    "args, message",
    [
        (["--episodes", "0"], "--episodes must be >= 1, got 0"),
        (["--target", "nan"], "--target must be a finite number"),
        (["--checkpoint", "latest", "--json", "/proc/no/such/dir/x.json"], "/proc/no/such"),
    ],
)
def test_cli_bad_input_is_one_line(run_dir, args, message):
    done = cli(str(run_dir), *args)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("error: ") and message in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr


@pytest.mark.slow
def test_cli_splits_lunarlander_terminations_into_rest_and_crash(lunar_dir, tmp_path):
    out = tmp_path / "eval.json"
    done = cli(str(lunar_dir), "--episodes", "4", "--json", str(out))
    assert done.returncode == 0, done.stderr
    record = json.loads(out.read_text())
    assert record["task"] == "LunarLander-v3" and record["target"] == 200.0
    # An untrained lander crashes (last reward -100 plus shaping) within ~100 steps.
    assert record["end"] == ["crash"] * 4 and all(r < 0 for r in record["last_rewards"])
    assert record["end_counts"] == {"rest": 0, "crash": 4, "time_limit": 0}
    assert (record["rest"], record["crash"], record["terminated"]) == (0, 4, 4)
    assert record["crash_mean"] == pytest.approx(record["mean"]) and record["rest_mean"] is None
    assert done.stdout.strip().endswith(
        f"ends: 0 rest, 4 crash (mean return {record['mean']:.1f}), 0 at the time limit"
    )
    # The trainer's eval lines carry the split too.
    evals = [
        json.loads(x)
        for x in (lunar_dir / "metrics.jsonl").read_text().splitlines()
        if '"eval"' in x
    ]
    assert evals and all(
        r["eval_rest"] + r["eval_crash"] + r["eval_time_limit"] == len(r["eval_returns"])
        and r["eval_terminated"] == r["eval_rest"] + r["eval_crash"]
        for r in evals
    )


@pytest.mark.slow
def test_cli_values_checks_the_critic_against_the_real_returns(lunar_dir, tmp_path):
    out = tmp_path / "eval.json"
    done = cli(str(lunar_dir), "--episodes", "4", "--values", "--json", str(out))
    assert done.returncode == 0, done.stderr
    first, second = done.stdout.strip().splitlines()
    record = json.loads(out.read_text())
    v = record["values"]
    assert first.endswith(
        f"ends: 0 rest, 4 crash (mean return {record['mean']:.1f}), 0 at the time limit"
    )
    assert second.startswith(
        f"values: the critic values the first state at {v['value_start_mean']:.1f}"
    )
    assert len(v["value_start"]) == len(v["return_start"]) == 4
    assert v["gamma"] == load_config(lunar_dir / "config.toml").train.gamma
    assert v["value_bias"] == pytest.approx(np.mean(v["value_start"]) - np.mean(v["return_start"]))
    assert list(v["value_bias_by_end"]) == ["crash"] and "time limit" not in second
    horizon = load_config(lunar_dir / "config.toml").train.num_dream_steps
    assert v["dream_horizon"] == horizon and 0 < v["dream_states"] <= v["states"]
    assert v["dream_gap"] == pytest.approx(v["dream_reward_mean"] - v["dream_real_mean"])
    assert f"imagined {horizon} steps ahead from {v['dream_states']} states" in second
    assert 0 < v["target_states"] <= v["dream_states"]
    assert v["target_residual"] == pytest.approx(v["target_gap"] + v["value_vs_target"])
    assert f"= {v['target_settle']:+.1f} above the real values" in second


@pytest.mark.slow
def test_cli_line_with_every_lunarlander_end(lunar_dir, tmp_path, monkeypatch, capsys):
    """The printed line and JSON when episodes rest, crash and time out (the tiny agent only
    crashes, so the episodes are made up; the rest is the real command)."""
    made_up = Episodes(
        np.array([230.0, 182.4, -66.1, 29.2, 250.0]),
        np.array([400, 380, 120, 1000, 350]),
        np.array([True, True, True, False, True]),
        np.array([101.2, 98.7, -100.4, -0.02, 100.0]),
    )
    monkeypatch.setattr(evaluate, "play_episodes", lambda *args, **kwargs: made_up)
    out = tmp_path / "eval.json"
    evaluate.main([str(lunar_dir), "--episodes", "5", "--json", str(out)])
    line = capsys.readouterr().out.strip()
    assert line.endswith(
        "2/5 >= 200; mean length 450.0; ends: 3 rest (mean return 220.8), "
        "1 crash (mean -66.1), 1 at the time limit (mean 29.2)"
    )
    record = json.loads(out.read_text())
    assert record["end"] == ["rest", "rest", "crash", "time_limit", "rest"]
    assert record["end_counts"] == {"rest": 3, "crash": 1, "time_limit": 1}
