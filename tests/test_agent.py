import pytest
import torch

from engine import fast
from engine.agent import Agent
from engine.config import load_config
from tests.test_cli import TRAIN_KEYS
from tests.test_world_model import synthetic_batch


@pytest.mark.parametrize("batched_wgrad", [False, True])
def test_update_has_no_host_sync(monkeypatch, batched_wgrad):
    cfg = load_config("configs/tiny.toml", [f"general.batched_wgrad={str(batched_wgrad).lower()}"])
    opts, _ = fast.resolve(cfg.general, torch.device("cpu"))
    assert opts.batched_wgrad == batched_wgrad
    torch.manual_seed(0)
    agent = Agent(cfg, vector_dim=4, num_actions=2, opts=opts)
    batch = synthetic_batch(cfg, 4, 8)
    agent.train_step(batch, train_behavior=True)  # warm caches outside the check

    calls = []

    def forbidden(name):
        def f(*args, **kwargs):
            calls.append(name)
            raise AssertionError(f"host sync: Tensor.{name} inside the update")

        return f

    for name in ("item", "tolist", "__bool__", "__int__", "__float__", "numpy", "cpu"):
        monkeypatch.setattr(torch.Tensor, name, forbidden(name))
    metrics = agent.train_step(batch, train_behavior=True)
    monkeypatch.undo()
    assert not calls
    assert all(isinstance(v, torch.Tensor) and v.dim() == 0 for v in metrics.values())
    for key in TRAIN_KEYS:
        if key not in ("step", "env_steps", "train_steps_per_sec"):
            assert key in metrics and torch.isfinite(metrics[key])


def test_behavior_update_leaves_the_world_model_alone():
    cfg = load_config("configs/tiny.toml", ["general.train_world_model=false"])
    torch.manual_seed(0)
    agent = Agent(cfg, vector_dim=4, num_actions=2)
    before_wm = [p.clone() for p in agent.wm.parameters()]
    before_actor = [p.clone() for p in agent.behavior.actor.parameters()]
    agent.train_step(synthetic_batch(cfg, 4, 8), train_behavior=True)
    assert all(torch.equal(a, b) for a, b in zip(before_wm, agent.wm.parameters()))
    assert any(
        not torch.equal(a, b) for a, b in zip(before_actor, agent.behavior.actor.parameters())
    )


def test_slow_critic_follows_the_critic_by_ema():
    cfg = load_config("configs/tiny.toml")
    agent = Agent(cfg, vector_dim=4, num_actions=2)
    beh = agent.behavior
    with torch.no_grad():
        for p in beh.critic.parameters():
            p.fill_(1.0)
        for p in beh.slow_critic.parameters():
            p.fill_(0.0)
    beh.update_slow_critic()
    for p in beh.slow_critic.parameters():
        torch.testing.assert_close(p, torch.full_like(p, cfg.train.slow_critic_rate))


def test_policy_step_shapes_and_greedy_action():
    cfg = load_config("configs/tiny.toml")
    torch.manual_seed(0)
    agent = Agent(cfg, vector_dim=4, num_actions=2)
    n = 3
    obs = dict(
        image=torch.randint(0, 255, (n, 64, 64, 3), dtype=torch.uint8),
        vector=torch.randn(n, 4),
        is_first=torch.ones(n, dtype=torch.bool),
    )
    carry = agent.initial_carry(n, torch.device("cpu"))
    torch.manual_seed(1)  # the latent is still sampled; only the action choice is greedy
    a1, c1 = agent.policy(obs, carry, greedy=True)
    torch.manual_seed(1)
    a2, _ = agent.policy(obs, carry, greedy=True)
    assert a1.shape == (n,) and a1.dtype == torch.int64 and torch.equal(a1, a2)
    assert c1[0].shape == (n, cfg.deter) and c1[2].shape == (n, 2)
