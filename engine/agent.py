"""The agent: the learner update and the acting policy, as functions over tensors.

The update has static shapes and no host syncs (.item(), .cpu(), Python branches on tensor
values): metrics come back as 0-dim device tensors and are read at log time. That is what lets
the fast path compile it and capture it in a CUDA graph.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from engine import dists
from engine.behavior import Behavior
from engine.config import Config, actor_entropy_coef_at, effective_lrs
from engine.fast import FastOptions, autocast
from engine.nvtx import nvtx_range
from engine.optim import Optimizer, step_together
from engine.world_model import WorldModel

Carry = tuple[Tensor, Tensor, Tensor]  # deter (N, D), stoch (N, L, K), prev action one-hot (N, A)


class Agent(nn.Module):
    def __init__(
        self,
        cfg: Config,
        vector_dim: int,
        num_actions: int,
        device: torch.device | str = "cpu",
        opts: FastOptions | None = None,
        member: bool = False,
        mixed: frozenset[str] = frozenset(),
    ):
        """`member`: one agent of a population (engine.population), its per-member settings
        held as tensors so that the members' values stack; `mixed`: the config.SWITCH_KEYS
        the population's members differ in (their modules then hold those as tensors too)."""
        super().__init__()
        opts = opts or FastOptions()
        self.cfg, self.opts, self.device = cfg, opts, torch.device(device)
        self.num_actions = num_actions
        flag = "models.twohot_space" in mixed
        self.wm = WorldModel(
            cfg, vector_dim, num_actions, opts.kernels, opts.batched_wgrad, member, flag
        )
        self.behavior = Behavior(cfg, num_actions, opts.kernels, member, flag)
        self.to(device)  # before the optimizers: their state lives beside the parameters
        t = cfg.train
        lr = effective_lrs(t)  # scaled with the batch size under train.lr_scaling
        kw = dict(
            kind=t.optimizer,
            weight_decay=t.weight_decay,
            betas=(t.adam_beta1, t.adam_beta2),
            eps=t.adam_eps,
            agc=t.agc,
            warmup=t.lr_warmup_steps,
        )
        self.wm_opt = Optimizer(self.wm.parameters(), lr["wm_lr"], clip=t.wm_grad_clip, **kw)
        self.actor_opt = Optimizer(
            self.behavior.actor.parameters(), lr["actor_lr"], clip=t.actor_grad_clip, **kw
        )
        self.critic_opt = Optimizer(
            self.behavior.critic.parameters(), lr["critic_lr"], clip=t.critic_grad_clip, **kw
        )
        self.replay_context = t.replay_context
        # A population whose members differ in train.replay_context sets this to (K,) flags:
        # the other members' rows start from zeros, as without context.
        self.context_members: Tensor | None = None
        # A device tensor, refilled in place by the trainer: a changing Python float would make
        # torch.compile recompile every update and be frozen into a captured CUDA graph.
        self.entropy_coef = torch.tensor(actor_entropy_coef_at(t, 0), device=self.device)
        # policy()'s greedy flag as a device tensor: a compiled _policy is one graph for acting
        # and evaluating, instead of a second compile guarded on the flag's value.
        self.greedy_flags = {v: torch.tensor(v, device=self.device) for v in (False, True)}
        # Data-parallel training (engine.distributed) sets this to its gradient average.
        self.grad_reduce = None

    def set_entropy_coef(self, value: float) -> None:
        """The actor's entropy coefficient for the next updates (no host sync)."""
        self.entropy_coef.fill_(value)

    def optimizers(self) -> dict[str, Optimizer]:
        return {"wm": self.wm_opt, "actor": self.actor_opt, "critic": self.critic_opt}

    def num_params(self) -> int:
        """Trainable parameters (the slow critic is a copy, not counted)."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    # ---- Learning ---------------------------------------------------------------------------

    def train_step(self, batch: dict[str, Tensor], train_behavior: bool) -> dict[str, Tensor]:
        """One learner update on a replay batch (B, T, ...). Returns 0-dim metric tensors."""
        return self.learn(batch, train_behavior)[0]

    def learn(
        self, batch: dict[str, Tensor], train_behavior: bool
    ) -> tuple[dict[str, Tensor], tuple[Tensor, Tensor]]:
        """`train_step`, also returning the posterior (deter (B, T, D), stoch (B, T, L, K)),
        which the learner writes back to the replay under train.replay_context. With
        replay_context the learner's batch is one step longer and carries the stored posteriors
        (deter, stoch): its first step's posterior and action start the sequence."""
        loss, metrics, (deter, stoch), batch = self.wm_forward(batch)
        if self.cfg.general.train_world_model:
            with nvtx_range("world_model/backward+optimizer"):
                metrics["wm_grad_norm"] = self.wm_opt.step(loss, self.grad_reduce)
        if train_behavior:
            actor_loss, critic_loss, beh = self.behavior_forward(
                deter, stoch, batch, self.entropy_coef
            )
            metrics.update(beh)
            # The actor's loss does not depend on the critic's parameters nor the critic's on the
            # actor's, so the gradient of the sum w.r.t. each set is that set's own gradient.
            with nvtx_range("actor_critic/backward+optimizer"):
                norms = step_together(
                    actor_loss + critic_loss, [self.actor_opt, self.critic_opt], self.grad_reduce
                )
                metrics["actor_grad_norm"], metrics["critic_grad_norm"] = norms
                self.behavior.update_slow_critic()
        return metrics, (deter, stoch)

    def wm_forward(
        self, batch: dict[str, Tensor]
    ) -> tuple[Tensor, dict[str, Tensor], tuple[Tensor, Tensor], dict[str, Tensor]]:
        """The world-model loss of `learn` without its optimizer step (a population runs it
        per member under vmap): loss, metrics, posterior, and the batch without its context
        step."""
        start = None
        # A batch without stored posteriors (tests, benchmarks) starts from zeros as before.
        if self.replay_context and "deter" in batch:
            start = (
                batch["deter"][:, 0].float(),
                dists.onehot(batch["stoch"][:, 0].long(), self.wm.K),
                dists.onehot(batch["action"][:, 0], self.num_actions),
            )
            batch = {k: v[:, 1:] for k, v in batch.items()}
            if self.context_members is not None:
                start = _context_start(start, self.context_members)
        with nvtx_range("world_model/forward"), autocast(self.opts, self.device):
            loss, metrics, posterior = self.wm.loss(batch, start)
        return loss, metrics, posterior, batch

    def behavior_forward(
        self, deter: Tensor, stoch: Tensor, batch: dict[str, Tensor], entropy_coef: Tensor
    ) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """The actor and critic losses of `learn` from the posterior, without their step."""
        replay = {k: batch[k] for k in ("reward", "is_last", "is_terminal")}
        with autocast(self.opts, self.device):
            return self.behavior.loss(self.wm, deter, stoch, replay, entropy_coef)

    # ---- Acting -----------------------------------------------------------------------------

    def initial_carry(self, n: int, device: torch.device) -> Carry:
        deter, stoch = self.wm.initial(n, device)
        return deter, stoch, torch.zeros(n, self.num_actions, device=device)

    @torch.no_grad()
    def policy(
        self, obs: dict[str, Tensor], carry: Carry, greedy: bool = False
    ) -> tuple[Tensor, Carry]:
        """One environment step for N envs: obs (N, ...) -> action indices (N,), next carry."""
        with autocast(self.opts, self.device):
            return self._policy(obs, carry, self.greedy_flags[bool(greedy)])

    def _policy(self, obs: dict[str, Tensor], carry: Carry, greedy: Tensor):
        deter, stoch, prev_action = carry
        token = self.wm.encode(obs)
        deter, stoch, _ = self.wm.obs_step(deter, stoch, prev_action, token, obs["is_first"])
        action = self.behavior.act(self.wm.feat(deter, stoch), greedy)
        return action, (deter, stoch, dists.onehot(action, self.num_actions, deter.dtype))


def _context_start(start: Carry, members: Tensor) -> Carry:
    """The replay context for a population whose members differ in using it: `members` (K,)
    flags, member k's rows k*B .. k*B + B - 1. A member without context starts from zeros,
    which is what `WorldModel.observe` starts from without a `start` (its first step marked
    first resets to the same zeros)."""
    on = members.bool().repeat_interleave(start[0].shape[0] // members.shape[0])
    return tuple(
        torch.where(on.view(-1, *[1] * (x.dim() - 1)), x, torch.zeros_like(x)) for x in start
    )
