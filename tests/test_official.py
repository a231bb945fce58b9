"""The official DreamerV3 details as switches: initialisation, the continue probability under
bf16, the replayed-value loss, the return normaliser's start, and replay context."""

import math

import pytest
import torch
import torch.nn.functional as F

from engine import dists, fast
from engine.agent import Agent
from engine.behavior import ReturnNorm, lambda_returns, replay_lambda_returns
from engine.config import load_config
from engine.nets import BlockLinear, Linear
from engine.replay import Replay, transition_spec
from engine.world_model import WorldModel
from tests.test_world_model import synthetic_batch

OFFICIAL = [
    "models.twohot_space=real",
    "models.init=official",
    "train.optimizer=laprop",
    "train.adam_eps=1e-20",
    "train.agc=0.3",
    "train.wm_grad_clip=0",
    "train.actor_grad_clip=0",
    "train.critic_grad_clip=0",
    "train.lr_warmup_steps=10",
    "train.repval_scale=0.3",
    "train.retnorm_init=zero",
    "train.replay_context=true",
]


def with_context(cfg, batch, seed=0):
    """A synthetic batch one step longer, with stored posteriors as replay context holds them."""
    g = torch.Generator().manual_seed(seed)
    B, T = batch["reward"].shape
    mlp = cfg.models.encoder.mlp
    out = {k: torch.cat([v[:, :1], v], 1) for k, v in batch.items()}
    out["deter"] = torch.randn(B, T + 1, cfg.deter, generator=g).bfloat16()
    out["stoch"] = torch.randint(mlp.latent_categories, (B, T + 1, mlp.latents), generator=g)
    out["stoch"] = out["stoch"].to(torch.int16)
    return out


# ---- Initialisation -------------------------------------------------------------------------


def measured_std_ratio(layers) -> float:
    """Mean over layers of (measured weight std) / (expected std), expected from each layer's
    declared (fan_in, outscale) under the official rule std = outscale / sqrt(fan_in)."""
    ratios = [w.std().item() / (scale / math.sqrt(fan)) for w, fan, scale in layers]
    return sum(ratios) / len(ratios)


def test_official_init_gives_the_official_weight_std():
    torch.manual_seed(0)
    cfg = load_config("configs/cartpole_d64.toml", ["models.init=official"])
    agent = Agent(cfg, vector_dim=4, num_actions=2)
    units, feat, deter = cfg.models.d_hidden, cfg.deter + cfg.stoch, cfg.deter
    core, beh = agent.wm.core, agent.behavior
    layers = [
        (beh.actor.out.weight, units, 0.01),  # policy output: outscale 0.01 on the std
        (beh.actor.hidden[0][0].weight, feat, 1.0),
        (beh.critic.hidden[1][0].weight, units, 1.0),
        (core.hid.weight, core.hid.weight.shape[0] * core.hid.weight.shape[1], 1.0),
        (core.gru.weight, deter, 1.0),  # block-diagonal: the fan-in is the whole input
    ]
    for w, fan, scale in layers:  # each layer alone, then on average
        assert w.std().item() == pytest.approx(scale / math.sqrt(fan), rel=0.1), w.shape
    assert measured_std_ratio(layers) == pytest.approx(1.0, abs=0.03)
    # The posterior's split first layer keeps the fan-in of the whole layer.
    token, post = agent.wm.post_token.weight, agent.wm.post_deter.weight
    fan_in = token.shape[1] + post.shape[1]
    std = torch.cat([token.flatten(), post.flatten()]).std().item()
    assert std == pytest.approx(1 / math.sqrt(fan_in), rel=0.05)


def test_engine_init_keeps_its_reading_and_differs_where_the_issue_says():
    torch.manual_seed(0)
    assert Linear(256, 4, outscale=0.01).weight.std().item() == pytest.approx(0.1 / 16, rel=0.1)
    assert Linear(256, 4, outscale=0.01, init="official").weight.std().item() == pytest.approx(
        0.01 / 16, rel=0.1
    )
    engine, official = BlockLinear(512, 1536, 4), BlockLinear(512, 1536, 4, init="official")
    assert engine.weight.std().item() == pytest.approx(1 / math.sqrt(128), rel=0.05)
    assert official.weight.std().item() == pytest.approx(1 / math.sqrt(512), rel=0.05)
    assert Linear(64, 8, outscale=0.0, init="official").weight.abs().max() == 0
    with pytest.raises(ValueError, match="glorot"):
        Linear(4, 4, init="glorot")


# ---- Continue probability under bf16 --------------------------------------------------------


def test_continue_probability_stays_fp32_under_bf16():
    torch.manual_seed(0)
    cfg = load_config("configs/tiny.toml")
    wm = WorldModel(cfg, vector_dim=4, num_actions=2)
    head = wm.cont_head.out
    logit = math.log(0.998 / 0.002)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.fill_(logit)
    feat = torch.randn(5, cfg.deter + cfg.stoch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        p = wm.cont_prob(feat)
        naive = torch.sigmoid(wm.cont_head(feat).squeeze(-1))
    assert p.dtype == torch.float32
    # The bf16 logit is rounded (6.21 -> 6.1875), its fp32 sigmoid still within 1e-4 of 0.998;
    # a bf16 sigmoid rounds the probability itself to a multiple of 2^-9 (0.998 -> 0.99609).
    assert p.sub(0.998).abs().max() < 1e-4
    assert naive.dtype == torch.bfloat16 and naive.float().sub(0.998).abs().max() > 1e-3


def test_bf16_norm_outputs_stay_bf16():
    from engine.nets import RMSNorm

    norm = RMSNorm(8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        x = torch.nn.functional.linear(torch.randn(3, 8), torch.randn(8, 8))
        assert x.dtype == torch.bfloat16
        assert norm(x).dtype == torch.bfloat16  # was promoted to fp32 by the fp32 weight


# ---- Replayed-value loss --------------------------------------------------------------------


def test_replay_lambda_returns_by_hand():
    # One replayed sequence of T = 5 rows; an episode ends at row 2 (is_last, terminal) and the
    # next episode starts at row 3. reward[t] is the reward for the step into row t.
    reward = torch.tensor([[9.0, 1.0, 2.0, 0.0, 3.0]])
    last = torch.tensor([[False, False, True, False, False]])
    term = torch.tensor([[False, False, True, False, False]])
    boot = torch.tensor([[10.0, 20.0, 30.0, 40.0, 50.0]])
    g, lam = 0.9, 0.8
    r4 = 50.0  # the last row bootstraps
    r3 = 3.0 + g * ((1 - lam) * 50.0 + lam * r4)
    r2 = 0.0 + g * ((1 - lam) * 40.0 + lam * r3)  # masked in the loss: row 2 ends the episode
    r1 = 2.0  # the step into a terminal row: nothing after it
    r0 = 1.0 + g * ((1 - lam) * 20.0 + lam * r1)
    out = replay_lambda_returns(reward, last, term, boot, g, lam)
    torch.testing.assert_close(out, torch.tensor([[r0, r1, r2, r3]]))
    # A time-limit end (last, not terminal) bootstraps from the imagined return there.
    out = replay_lambda_returns(reward, last, torch.zeros_like(term), boot, g, lam)
    assert out[0, 1].item() == pytest.approx(2.0 + g * 30.0)


def test_repval_loss_regresses_the_critic_on_the_replayed_returns():
    torch.manual_seed(0)
    cfg = load_config("configs/tiny.toml", ["models.twohot_space=real"])
    agent = Agent(cfg, vector_dim=4, num_actions=2)
    beh = agent.behavior
    B, T, K = 2, 4, cfg.models.num_bins
    replay = {
        "reward": torch.randn(B, T),
        "is_last": torch.tensor([[False, True, False, False], [False] * 4]),
        "is_terminal": torch.tensor([[False, True, False, False], [False] * 4]),
    }
    logits = torch.randn(B * T, K, requires_grad=True)
    slow, boot = torch.randn(B * T), torch.randn(B * T)
    loss = beh.repval_loss(logits, slow, boot, replay)
    target = replay_lambda_returns(
        replay["reward"], replay["is_last"], replay["is_terminal"], boot.reshape(B, T),
        beh.gamma, beh.lam,
    )  # fmt: skip
    logp = F.log_softmax(logits.reshape(B, T, K)[:, :-1], -1)
    ce = -(dists.twohot(target, beh.bins, "real") * logp).sum(-1)
    ce = ce - beh.slow_reg * (
        dists.twohot(slow.reshape(B, T)[:, :-1], beh.bins, "real") * logp
    ).sum(-1)
    weight = torch.tensor([[1.0, 0.0, 1.0], [1.0, 1.0, 1.0]])  # row 1 of sequence 0 ends it
    torch.testing.assert_close(loss, (weight * ce).mean())


@pytest.mark.parametrize("boot", ["imagined", "critic"])
def test_repval_boot_picks_what_the_replayed_returns_bootstrap_with(monkeypatch, boot):
    """train.repval_boot: the replayed lambda-returns bootstrap with the imagined return from
    each replayed state (official) or the slow critic's value of it; the rest is unchanged."""
    cfg = load_config("configs/tiny.toml", ["train.repval_scale=0.3", f"train.repval_boot={boot}"])
    torch.manual_seed(0)
    agent = Agent(cfg, vector_dim=4, num_actions=2)
    beh, wm = agent.behavior, agent.wm
    with torch.no_grad():  # a slow critic apart from the critic: the two boots differ
        for p in beh.slow_critic.parameters():
            p.add_(0.05 * torch.randn_like(p))
    H, N = beh.horizon, 6
    feats = torch.randn(H + 1, N, cfg.deter + cfg.stoch)
    actions = torch.eye(2)[torch.randint(0, 2, (H, N))]
    replay = {
        "reward": torch.randn(2, 3),
        "is_last": torch.zeros(2, 3, dtype=torch.bool),
        "is_terminal": torch.zeros(2, 3, dtype=torch.bool),
    }
    seen = {}

    def spy(logits, slow_value, boot_values, replay):
        seen.update(slow=slow_value, boot=boot_values)
        return logits.sum() * 0

    monkeypatch.setattr(beh, "repval_loss", spy)
    beh.losses(wm, feats, actions, replay, 0.0)
    with torch.no_grad():
        slow = beh.value(beh.slow_critic(feats[0]).float())
        value = beh.value(beh.critic(feats).float())
        cont = torch.cat([torch.ones(1, N), wm.cont_prob(feats)[1:]])
        ret = lambda_returns(wm.reward(feats), cont, value, beh.gamma, beh.lam)
    torch.testing.assert_close(seen["slow"], slow, rtol=1e-5, atol=1e-4)
    expected = ret[0] if boot == "imagined" else slow
    torch.testing.assert_close(seen["boot"], expected, rtol=1e-5, atol=1e-4)
    assert not torch.allclose(ret[0], slow)


def test_repval_scale_adds_the_replayed_value_loss_to_the_critic():
    cfg_off = load_config("configs/tiny.toml", ["train.repval_scale=0"])
    cfg_on = load_config("configs/tiny.toml", ["train.repval_scale=0.3"])
    batch = synthetic_batch(cfg_off, 4, 8)
    out = []
    for cfg in (cfg_off, cfg_on):
        torch.manual_seed(0)
        agent = Agent(cfg, vector_dim=4, num_actions=2)
        torch.manual_seed(1)
        out.append(agent.train_step(batch, train_behavior=True))
    off, on = out
    assert "repval_loss" not in off and on["repval_loss"] > 0
    torch.testing.assert_close(on["actor_loss"], off["actor_loss"])
    assert on["critic_loss"].item() == pytest.approx(
        off["critic_loss"].item() + 0.3 * on["repval_loss"].item(), rel=1e-5
    )


# ---- Return normaliser ----------------------------------------------------------------------


def test_return_norm_from_zero_is_an_ema_from_zero():
    norm = ReturnNorm(rate=0.01, limit=1.0, init="zero")
    ret = torch.arange(101, dtype=torch.float32)
    norm.update(ret)
    assert norm.lo.item() == pytest.approx(0.05) and norm.hi.item() == pytest.approx(0.95)
    assert norm.scale().item() == 1.0  # 0.9 < limit: early returns are not scaled down
    for _ in range(500):
        norm.update(ret)
    assert norm.scale().item() == pytest.approx(90.0, rel=0.01)


# ---- Replay context -------------------------------------------------------------------------


def test_observe_from_a_stored_state_continues_the_sequence():
    torch.manual_seed(0)
    wm = WorldModel(load_config("configs/tiny.toml"), vector_dim=4, num_actions=2)
    B, T, k = 3, 7, 3
    tokens = torch.randn(B, T, wm.post_deter.out_features)
    actions = F.one_hot(torch.randint(2, (B, T)), 2).float()
    is_first = torch.zeros(B, T, dtype=torch.bool)
    is_first[0, 5] = True
    torch.manual_seed(1)
    deter, stoch, _ = wm.observe(tokens, actions, is_first)
    torch.manual_seed(1)  # the same latent samples, drawn in the same order
    d1, s1, _ = wm.observe(tokens[:, :k], actions[:, :k], is_first[:, :k])
    start = (d1[:, -1], s1[:, -1], actions[:, k - 1])
    d2, s2, _ = wm.observe(tokens[:, k:], actions[:, k:], is_first[:, k:], start)
    torch.testing.assert_close(torch.cat([d1, d2], 1), deter)
    torch.testing.assert_close(torch.cat([s1, s2], 1), stoch)


def test_replay_write_overwrites_the_sampled_rows():
    spec = transition_spec(0, 2, context=(6, 3))
    assert spec["deter"][1] == torch.bfloat16 and spec["stoch"][0] == (3,)
    replay = Replay(40, 4, spec, torch.device("cpu"))
    for i in range(10):
        step = {k: torch.zeros(4, *shape, dtype=dt) for k, (shape, dt) in spec.items()}
        step["reward"] += i
        replay.add(step)
    t, e = replay.sample_indices(3, 4)
    batch = replay.gather(t, e)
    assert (batch["reward"][:, 1:] - batch["reward"][:, :-1] == 1).all()  # consecutive rows
    deter = torch.randn(3, 4, 6)
    replay.write(t, e, {"deter": deter, "stoch": torch.full((3, 4, 3), 2)})
    again = replay.gather(t, e)
    torch.testing.assert_close(again["deter"].float(), deter.bfloat16().float())
    assert (again["stoch"] == 2).all() and again["stoch"].dtype == torch.int16
    untouched = torch.ones(replay.slots, 4, dtype=torch.bool)
    untouched[t, e] = False
    assert (replay.data["stoch"][untouched] == 0).all()


def test_learner_writes_the_fresher_posterior_back():
    cfg = load_config("configs/tiny.toml", ["train.replay_context=true"])
    torch.manual_seed(0)
    agent = Agent(cfg, vector_dim=4, num_actions=2)
    spec = transition_spec(cfg.image_size, 4, context=(cfg.deter, cfg.models.encoder.mlp.latents))
    replay = Replay(64, 2, spec, torch.device("cpu"))
    batch = synthetic_batch(cfg, 2, 32)
    for i in range(32):
        step = {k: v[:, i] for k, v in batch.items()}
        step["deter"] = torch.zeros(2, cfg.deter)
        step["stoch"] = torch.zeros(2, cfg.models.encoder.mlp.latents, dtype=torch.int16)
        replay.add(step)
    learner = fast.Learner(agent, replay, 4, 6, fast.FastOptions())
    learner.step(True)
    written = replay.data["deter"].float().abs().sum(-1) > 0
    assert written.sum() >= 6  # at least one window's rows (its first row is only read)
    assert written.sum() <= 4 * 6


def test_an_update_with_every_official_switch_has_no_host_sync(monkeypatch):
    cfg = load_config("configs/tiny.toml", OFFICIAL)
    torch.manual_seed(0)
    agent = Agent(cfg, vector_dim=4, num_actions=2)
    batch = with_context(cfg, synthetic_batch(cfg, 4, 8))
    agent.train_step(batch, train_behavior=True)

    def forbidden(*args, **kwargs):
        raise AssertionError("host sync inside the update")

    for name in ("item", "tolist", "__bool__", "__int__", "__float__", "numpy", "cpu"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    metrics = agent.train_step(batch, train_behavior=True)
    monkeypatch.undo()
    assert all(torch.isfinite(v) for v in metrics.values())
    assert "repval_loss" in metrics


@pytest.mark.parametrize("space", ["symlog", "real"])
def test_reward_loss_excess_is_measured_from_the_floor_of_the_heads_space(space):
    # CartPole's reward of 1 falls between two bins in either space, but not at the same place:
    # the floor (the target's entropy) is 0.673 in symlog space and 0.665 in real space.
    cfg = load_config("configs/tiny.toml", [f"models.twohot_space={space}"])
    torch.manual_seed(0)
    wm = WorldModel(cfg, vector_dim=4, num_actions=2)
    batch = synthetic_batch(cfg, 3, 5)
    batch["reward"] = torch.ones_like(batch["reward"])
    _, metrics, _ = wm.loss(batch)
    floor = dists.twohot_floor(torch.ones(()), wm.bins, space).item()
    other = dists.twohot_floor(torch.ones(()), dists.make_bins(255, space="symlog"), "symlog")
    if space == "real":
        assert abs(floor - other.item()) > 5e-3
    # The zero-initialised head predicts uniform logits: the loss is ln(255) everywhere.
    assert metrics["reward_loss"].item() == pytest.approx(math.log(255), rel=1e-6)
    assert metrics["reward_loss_excess"].item() == pytest.approx(math.log(255) - floor, rel=1e-6)


@pytest.mark.compiled
def test_compiled_update_with_every_official_switch_matches_eager(eager_random_compile):
    # No warm-up (its first update has lr 0) and a large eps: LaProp's step is then ~lr x g / eps,
    # so the parameter change compares the gradients themselves.
    switches = [*OFFICIAL, "train.lr_warmup_steps=0", "train.adam_eps=10"]
    out = []
    for extra in ([], ["general.compile=true", "general.batched_wgrad=true"]):
        cfg = load_config("configs/tiny.toml", [*switches, *extra])
        opts, _ = fast.resolve(cfg.general, torch.device("cpu"))
        torch.manual_seed(0)
        agent = Agent(cfg, vector_dim=4, num_actions=2, opts=opts)
        if opts.compile:
            fast.compile_agent(agent)
        start = torch.cat([p.detach().flatten() for p in agent.parameters()])
        batch = with_context(cfg, synthetic_batch(cfg, 4, 6))
        torch.manual_seed(123)
        metrics = agent.train_step(batch, train_behavior=True)
        delta = torch.cat([p.detach().flatten() for p in agent.parameters()]) - start
        out.append(({k: v.item() for k, v in metrics.items()}, delta))
    (m_e, d_e), (m_c, d_c) = out
    for k in m_e:
        assert m_c[k] == pytest.approx(m_e[k], rel=1e-4, abs=1e-5), k
    assert d_e.abs().max() > 0
    # The change of a parameter is known to about an fp32 ulp of the parameter (~3e-8 at 0.5).
    atol = max(1e-3 * d_e.abs().max().item(), 1e-7)
    torch.testing.assert_close(d_c, d_e, rtol=1e-3, atol=atol)
