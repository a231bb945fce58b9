"""Behaviour learning in imagination: rollout, lambda-returns, percentile return normalisation,
the REINFORCE actor and the two-hot critic with a slow EMA copy.

Time-major inside this file: tensors are (H+1, N, ...) for the H imagined steps plus the start.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from engine import dists
from engine.config import Config
from engine.nets import MLP, hold_settings, hold_space
from engine.nvtx import nvtx_range


def replay_lambda_returns(
    reward: Tensor,
    is_last: Tensor,
    is_terminal: Tensor,
    boot: Tensor,
    gamma: float,
    lam: float,
) -> Tensor:
    """TD(lambda) returns along replayed sequences (official DreamerV3 `repl_loss`).

    reward, is_last, is_terminal, boot: (B, T), time on dim 1, as stored (reward[t] is the
    reward for the step into observation t). boot[t] is the imagined lambda-return from replayed
    state t. Returns R_0..R_{T-2}, (B, T-1):
        R_{T-1} = boot_{T-1}
        R_t     = r_{t+1} + gamma (1 - term_{t+1}) ((1 - lam_{t+1}) boot_{t+1} + lam_{t+1} R_{t+1})
    with lam_{t+1} = lam (1 - last_{t+1}): at an episode's last observation the return stops
    following the replay (the next row is another episode) and bootstraps instead.
    """
    live = gamma * (~is_terminal[:, 1:]).to(reward.dtype)
    cont = lam * (~is_last[:, 1:]).to(reward.dtype)
    interm = reward[:, 1:] + (1 - cont) * live * boot[:, 1:]
    out = []
    ret = boot[:, -1]
    for t in reversed(range(reward.shape[1] - 1)):
        ret = interm[:, t] + live[:, t] * cont[:, t] * ret
        out.append(ret)
    return torch.stack(out[::-1], 1)


def lambda_returns(reward: Tensor, cont: Tensor, value: Tensor, gamma: float, lam: float) -> Tensor:
    """TD(lambda) returns over an imagined trajectory, bootstrapped with the last value.

    reward, cont, value: (H+1, N); reward[t] and cont[t] are predicted from state t, i.e. they
    belong to the step INTO state t (reward[0] is unused). Returns R_0..R_{H-1}, (H, N):
        R_{H}  = v_H
        R_t    = r_{t+1} + gamma c_{t+1} ((1 - lam) v_{t+1} + lam R_{t+1})
    """
    disc = gamma * cont[1:]
    interm = reward[1:] + disc * (1 - lam) * value[1:]
    out = []
    ret = value[-1]
    for t in reversed(range(reward.shape[0] - 1)):
        ret = interm[t] + disc[t] * lam * ret
        out.append(ret)
    return torch.stack(out[::-1])


class ReturnNorm(nn.Module):
    """EMA of the 5th and 95th return percentiles; returns are divided by max(limit, P95 - P5).

    Dividing by the range (not a std) keeps small returns unscaled, so the entropy bonus keeps the
    same meaning whether rewards are sparse or dense (DreamerV3, Hafner et al.).
    init "first": the first batch sets the percentiles; "zero" (official): the EMA starts at 0.
    Data-parallel training sets `gather` to the all-gather over ranks, so the percentiles are
    the global batch's on every rank."""

    gather = None

    def __init__(self, rate: float, limit: float, init: str = "first", member: bool = False):
        super().__init__()
        hold_settings(self, dict(rate=rate, limit=limit), member)
        self.register_buffer("lo", torch.zeros(()))
        self.register_buffer("hi", torch.zeros(()))
        # With init "zero" the EMA counts as started from the zeros above.
        self.register_buffer("initialised", torch.tensor(init == "zero"))

    @torch.no_grad()
    def update(self, ret: Tensor) -> None:
        ret = ret.detach().float()
        if self.gather is not None:
            ret = self.gather(ret)
        q = dists.percentiles(ret, (0.05, 0.95))
        # The first batch sets the statistics directly: no host-side branch, so no sync.
        rate = torch.where(self.initialised, self.rate, 1.0)
        # Out-of-place lerp copied back: the same values, and under vmap (a population) the
        # in-place lerp_ with a tensor weight would run a per-member loop.
        self.lo.copy_(torch.lerp(self.lo, q[0], rate))
        self.hi.copy_(torch.lerp(self.hi, q[1], rate))
        self.initialised.fill_(True)

    def scale(self) -> Tensor:
        return torch.clamp(self.hi - self.lo, min=self.limit)


class Behavior(nn.Module):
    def __init__(
        self,
        cfg: Config,
        num_actions: int,
        kernels: str = "torch",
        member: bool = False,
        space_flag: bool = False,
    ):
        """`member`: a population member's, its per-member settings held as tensors;
        `space_flag`: its two-hot space too (`hold_space`)."""
        super().__init__()
        self.kernels = kernels
        m, t = cfg.models, cfg.train
        feat, units, layers = cfg.deter + cfg.stoch, m.d_hidden, m.encoder.mlp.n_layers
        self.num_actions, self.horizon = num_actions, t.num_dream_steps
        hold_space(self, m.twohot_space, space_flag)
        settings = dict(unimix=m.unimix, gamma=t.gamma, lam=t.lam, repval_scale=t.repval_scale)
        settings.update(slow_rate=t.slow_critic_rate, slow_reg=t.slow_critic_reg)
        hold_settings(self, settings, member)
        # Whether the replayed-value loss is computed at all: a branch on the config, not on a
        # (possibly per-member) tensor. A population computes it when any member uses it.
        self.use_repval = t.repval_scale != 0
        self.repval_boot = t.repval_boot
        self.actor = MLP(feat, units, layers, num_actions, outscale=0.01, init=m.init)
        self.critic = MLP(feat, units, layers, m.num_bins, outscale=0.0, init=m.init)
        self.slow_critic = copy.deepcopy(self.critic).requires_grad_(False)
        self.retnorm = ReturnNorm(t.retnorm_rate, t.retnorm_limit, t.retnorm_init, member)
        self.register_buffer(
            "bins", dists.make_bins(m.num_bins, space=m.twohot_space), persistent=False
        )

    def action_logits(self, feat: Tensor) -> Tensor:
        """Normalised log-probabilities of the unimix actor."""
        return dists.unimix_logits(self.actor(feat), self.unimix)

    def act(self, feat: Tensor, greedy: bool | Tensor = False) -> Tensor:
        """Action indices (N,): the mode when `greedy`, else a sample. A tensor flag selects
        between both (one graph for either value, a sample drawn either way)."""
        logp = self.action_logits(feat)
        if isinstance(greedy, Tensor):
            return torch.where(greedy, logp.argmax(-1), dists.sample_index(logp.exp()))
        if greedy:
            return logp.argmax(-1)
        return dists.sample_index(logp.exp())

    @torch.no_grad()
    def imagine(
        self, wm, deter: Tensor, stoch: Tensor, greedy: bool = False
    ) -> tuple[Tensor, Tensor]:
        """Roll the prior forward `horizon` steps from every start, acting with the actor
        (sampled actions, as training imagines; the mode with `greedy`, for evaluate --values).

        No gradient flows through the rollout: for discrete actions the actor learns by REINFORCE
        and the critic regresses targets, so the world model is not trained through it.
        Returns feats (H+1, N, F) and one-hot actions (H, N, A), action[t] taken in state t."""
        feats, actions = [wm.feat(deter, stoch)], []
        for _ in range(self.horizon):
            action = dists.onehot(self.act(feats[-1], greedy), self.num_actions, deter.dtype)
            deter, stoch = wm.img_step(deter, stoch, action)
            feats.append(wm.feat(deter, stoch))
            actions.append(action)
        return torch.stack(feats), torch.stack(actions)

    def loss(
        self,
        wm,
        deter: Tensor,
        stoch: Tensor,
        replay: dict[str, Tensor],
        entropy_coef: Tensor | float,
    ) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """Actor and critic losses from the posterior of a replayed batch: deter, stoch
        (B, T, ...) start one imagined trajectory each; replay holds the batch's reward,
        is_last and is_terminal (B, T), for the start's continue flag and the replayed-value
        loss."""
        with nvtx_range("behavior/imagine"):
            feats, actions = self.imagine(wm, deter.flatten(0, 1), stoch.flatten(0, 1))
        with nvtx_range("behavior/actor_critic_forward"):
            return self.losses(wm, feats, actions, replay, entropy_coef)

    def value(self, logits: Tensor) -> Tensor:
        """The critic's (or reward head's) expected value from its two-hot logits."""
        return dists.twohot_mean(logits, self.bins, self.space)

    def losses(
        self,
        wm,
        feats: Tensor,
        actions: Tensor,
        replay: dict[str, Tensor],
        entropy_coef: Tensor | float,
    ) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """The losses over imagined trajectories from every replayed state (feats (H+1, N, F),
        N = B x T): one static-shape graph (compiled on the fast path) after the rollout."""
        critic_logits = self.critic(feats)  # one pass: its detached mean is the value estimate
        start_cont = (~replay["is_terminal"]).flatten().float()
        with torch.no_grad():
            reward = wm.reward(feats)
            cont = wm.cont_prob(feats)
            cont = torch.cat([start_cont[None], cont[1:]])  # the start's continue flag is known
            value = self.value(critic_logits.detach().float())
            slow_value = self.value(self.slow_critic(feats[:-1]).float())
            ret = lambda_returns(reward, cont, value, self.gamma, self.lam)  # (H, N)
            # Imagined steps count by the probability the episode is still running.
            weight = torch.cumprod(self.gamma * cont, 0)[:-1] / self.gamma
            self.retnorm.update(ret)
            adv = (ret - value[:-1]) / self.retnorm.scale()

        logp = self.action_logits(feats[:-1])  # (H, N, A)
        logpi = (logp * actions).sum(-1)
        entropy = dists.categorical_entropy(logp)
        actor_loss = -(weight * (logpi * adv + entropy_coef * entropy)).mean()
        # The return target and the slow-critic regulariser share one pass over the logits.
        critic_ce = dists.twohot_loss(
            critic_logits[:-1], ret, self.bins, slow_value, self.slow_reg, self.kernels, self.space
        )
        critic_loss = (weight * critic_ce).mean()
        metrics = {}
        if self.use_repval:
            boot = ret[0] if self.repval_boot == "imagined" else slow_value[0]
            repval = self.repval_loss(critic_logits[0], slow_value[0], boot, replay)
            metrics["repval_loss"] = repval.detach()
            critic_loss = critic_loss + self.repval_scale * repval
        metrics.update(
            actor_loss=actor_loss.detach(),
            actor_entropy=entropy.mean().detach(),
            critic_loss=critic_loss.detach(),
            dream_reward=reward[1:].mean(),
            dream_value=value.mean(),
            dream_return=ret.mean(),
            dream_cont=cont[1:].mean(),
            return_scale=self.retnorm.scale(),
            advantage_std=adv.std(),
        )
        return actor_loss, critic_loss, metrics

    def repval_loss(
        self, logits: Tensor, slow_value: Tensor, boot: Tensor, replay: dict[str, Tensor]
    ) -> Tensor:
        """The critic on the replayed states (logits (N, bins), N = B x T) regressed on the
        replayed trajectories' lambda-returns, bootstrapped with `boot` (N,): the imagined
        returns from each replayed state or the slow critic's values (train.repval_boot), plus
        the slow-critic regulariser; steps that end an episode have no target."""
        B, T = replay["reward"].shape
        with torch.no_grad():
            target = replay_lambda_returns(
                replay["reward"].float(),
                replay["is_last"],
                replay["is_terminal"],
                boot.reshape(B, T),
                self.gamma,
                self.lam,
            )  # (B, T-1)
            weight = (~replay["is_last"][:, :-1]).float()
        ce = dists.twohot_loss(
            logits.reshape(B, T, -1)[:, :-1],
            target,
            self.bins,
            slow_value.reshape(B, T)[:, :-1],
            self.slow_reg,
            self.kernels,
            self.space,
        )
        return (weight * ce).mean()

    @torch.no_grad()
    def update_slow_critic(self) -> None:
        for slow, fast in zip(self.slow_critic.parameters(), self.critic.parameters(), strict=True):
            slow.lerp_(fast, self.slow_rate)
