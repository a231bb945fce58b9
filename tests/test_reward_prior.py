"""train.reward_prior_steps: the reward head also regresses the replayed rewards from the prior's
open-loop states, the states imagination reads rewards from (LunarLander's hover trap, README)."""

import json

import pytest
import torch

from engine import dists
from engine.agent import Agent
from engine.config import ConfigError, load_config, member_configs
from engine.population import PopulationAgent
from tests.test_population import assert_member_equals, make_batch
from tests.test_world_model import synthetic_batch


def world_model(steps, scale=1.0, *extra):
    cfg = load_config(
        "configs/tiny.toml",
        [f"train.reward_prior_steps={steps}", f"train.reward_prior_scale={scale}", *extra],
    )
    torch.manual_seed(0)
    return cfg, Agent(cfg, vector_dim=4, num_actions=2).wm


def posterior(wm, batch):
    actions = dists.onehot(batch["action"], wm.num_actions)
    deter, stoch, logits = wm.observe(wm.encode(batch), actions, batch["is_first"])
    return actions, deter, stoch, logits


def test_the_rollout_follows_the_actions_taken_and_masks_what_it_cannot_target():
    cfg, wm = world_model(3)
    B, T = 2, 6
    batch = synthetic_batch(cfg, B, T)
    batch["is_first"][:] = False
    batch["is_first"][0, 4] = True  # an episode starts at position 4 of sequence 0
    with torch.no_grad():
        actions, deter, stoch, _ = posterior(wm, batch)
        torch.manual_seed(5)
        prior = wm.prior_rollout(batch, actions, deter, stoch)
        # The same draws by hand: depth j of start s is the prior after the actions taken at
        # s .. s + j - 1, its target the reward at s + j.
        torch.manual_seed(5)
        d, z = deter.flatten(0, 1), stoch.flatten(0, 1)
        for j in range(1, 4):
            a = torch.zeros_like(actions)
            a[:, : T - j + 1] = actions[:, j - 1 :]
            d, z = wm.img_step(d, z, a.flatten(0, 1))
            feat = wm.feat(d, z).unflatten(0, (B, T))
            torch.testing.assert_close(prior["feat"][:, j - 1], feat)
            s = torch.arange(T - j)
            torch.testing.assert_close(
                prior["target"][:, j - 1, : T - j], batch["reward"][:, s + j]
            )
    assert prior["feat"].shape == (B, 3, T, cfg.deter + cfg.stoch)
    valid = prior["valid"]
    # Past the sequence's end: starts s >= T - j have no target at depth j.
    for j in range(1, 4):
        assert not valid[:, j - 1, T - j :].any()
    # Sequence 1 has no episode start: every start with a target is valid.
    assert valid[1, 0, :5].all() and valid[1, 2, :3].all()
    # Sequence 0: a chain that reaches or passes position 4 crosses into another episode.
    want = torch.tensor(
        [
            [1, 1, 1, 0, 1, 0],  # depth 1: start 3 lands on 4 (a new episode)
            [1, 1, 0, 0, 0, 0],  # depth 2: starts 2 and 3 pass 4; start 4 runs past the end
            [1, 0, 0, 0, 0, 0],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(valid[0], want)


def test_the_term_is_weighed_as_the_posterior_reward_term_and_trains_only_the_reward_head():
    cfg, wm = world_model(3, 0.7, "train.beta_pred=0.9", "train.reward_scale=2.0")
    batch = synthetic_batch(cfg, 3, 8)
    _, deter, stoch, logits = posterior(wm, batch)
    actions = dists.onehot(batch["action"], wm.num_actions)
    torch.manual_seed(1)
    prior = wm.prior_rollout(batch, actions, deter, stoch)
    assert not prior["feat"].requires_grad
    with_term, metrics = wm.loss_terms(batch, deter, stoch, logits, prior)
    without, plain = wm.loss_terms(batch, deter, stoch, logits)
    ce = dists.twohot_loss(wm.reward_head(prior["feat"]), prior["target"], wm.bins, space=wm.space)
    w = prior["valid"].float()
    B, J, T = w.shape
    want = 0.9 * 2.0 * 0.7 * (ce * w).sum() / (B * T * J)
    torch.testing.assert_close(with_term - without, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(metrics["reward_prior_loss"], ((ce * w).sum() / w.sum()).detach())
    pred = dists.twohot_mean(wm.reward_head(prior["feat"]).detach(), wm.bins, wm.space)
    bias = ((pred - prior["target"]) * w).sum() / w.sum()
    torch.testing.assert_close(metrics["reward_prior_bias"], bias)
    assert "reward_prior_loss" not in plain and "reward_prior_bias" not in plain
    # Only the reward head gets a gradient from the term.
    params = dict(wm.named_parameters())
    g_with = torch.autograd.grad(
        with_term, list(params.values()), allow_unused=True, retain_graph=True
    )
    g_without = torch.autograd.grad(without, list(params.values()), allow_unused=True)
    changed = set()
    for (name, _), a, b in zip(params.items(), g_with, g_without):
        a = torch.zeros(()) if a is None else a
        b = torch.zeros(()) if b is None else b
        if not torch.allclose(a, b, atol=1e-7):
            changed.add(name.split(".")[0])
    assert changed == {"reward_head"}


def test_off_is_the_official_loss_and_scale_zero_adds_nothing():
    losses = {}
    for steps, scale in ((0, 1.0), (4, 0.0), (4, 1.0)):
        cfg, wm = world_model(steps, scale)
        batch = synthetic_batch(cfg, 2, 8)
        torch.manual_seed(3)
        losses[steps, scale], metrics, _ = wm.loss(batch)
        assert ("reward_prior_loss" in metrics) == (steps > 0)
    torch.testing.assert_close(losses[4, 0.0], losses[0, 1.0])
    assert losses[4, 1.0] > losses[0, 1.0]


@pytest.mark.parametrize(
    "sets, words",
    [
        (["train.reward_prior_steps=16"], ["train.reward_prior_steps", "sequence_length = 16"]),
        (["train.reward_prior_steps=-1"], ["train.reward_prior_steps"]),
        (["train.reward_prior_scale=-0.5"], ["train.reward_prior_scale", ">= 0"]),
    ],
)
def test_bad_settings_name_the_key(sets, words):
    with pytest.raises(ConfigError) as e:
        load_config("configs/tiny.toml", ["train.sequence_length=16", *sets])
    assert all(w in str(e.value) for w in words), str(e.value)


def test_population_members_hold_their_own_scale(monkeypatch):
    monkeypatch.setattr(dists, "sample_index", lambda probs: probs.detach().argmax(-1))
    grid = {"train.reward_prior_scale": [0.0, 1.0, 0.5, 2.0]}
    sets = [
        "population.size=4",
        "population.grid={" + ", ".join(f'"{k}" = {json.dumps(v)}' for k, v in grid.items()) + "}",
        "env.image=true",
        "train.reward_prior_steps=3",
    ]
    members = member_configs(load_config("configs/tiny.toml", sets))
    pop = PopulationAgent(members, 4, 2)
    agents = []
    for m in members:
        torch.manual_seed(m.general.seed)
        agents.append(Agent(m, 4, 2))
    B, T = members[0].train.batch_size, members[0].train.sequence_length
    batch = make_batch(members[0], 4 * B, T)
    metrics, _ = pop.learn(batch, True)
    for k, agent in enumerate(agents):
        mine, _ = agent.learn({n: v[k * B : (k + 1) * B] for n, v in batch.items()}, True)
        for name in ("wm_loss", "reward_prior_loss", "reward_prior_bias", "reward_loss"):
            torch.testing.assert_close(metrics[name][k], mine[name], atol=1e-4, rtol=1e-4)
        assert_member_equals(pop, k, agent)
    assert metrics["wm_loss"].unique().numel() == 4
