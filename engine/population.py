"""Population training: K agents in one process and one update.

Every parameter, buffer and optimizer moment of the K members is stacked along a leading
dimension, (K, ...). The population runs the single agent's own code (`Agent.wm_forward`,
`Agent.behavior_forward`, `Agent._policy`, with their observe and imagination loops) on K x B
rows, member k's rows at k*B .. k*B + B - 1; each function of that code that reads weights
(the ones the fast path compiles: encode, the posterior and prior steps, the loss tails, the
actor) is replaced on the population's template agent by a member call: its rows are split
(K, B, ...), `torch.func.vmap` runs the function over the members with `functional_call` on
their stacked weights, and the results are joined again. Members differ in their seeds
(initial weights, data, sampling) and in the settings of `config.MEMBER_KEYS`, which a
member's modules hold as tensors (`nets.hold_settings`). The optimizers are
`StackedOptimizer`s: learning rates, clips and moments per member, gradient norms and clips per
member, never across members, and a member can be frozen (`active`).

Why vmap and not layers written for a K dimension: measured on the 2-core CPU (cartpole_d64
world-model + behaviour losses, forward and backward, 8 x 16 per member) vmap costs 13-30% over
one agent at K x B rows, and it keeps one implementation of every layer. Why member calls per
function and not one vmap of the whole update: torch.compile does not compile a function
called inside vmap (it runs eagerly), and compiling one vmap of the whole update unrolls every
observe and imagination step into one graph (more than 13 minutes of compiling at K = 4,
cartpole_d64, before it was stopped); compiled member calls are one graph per step function,
as for a single agent.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import functools
import math
import os
import types
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap
from torch.utils._pytree import tree_map

from engine import checkpoint, distributed
from engine.agent import Agent, Carry
from engine.config import (
    MEMBER_KEYS,
    SWITCH_KEYS,
    Config,
    ConfigError,
    Schedule,
    actor_entropy_coef_at,
    effective_lrs,
    from_dict,
    get_key,
    member_configs,
    mixed_switches,
    plain_value,
    save_toml,
    set_key,
    to_dict,
    validate,
)
from engine.dists import make_bins
from engine.episodes import Episodes
from engine.fast import FastOptions
from engine.health import (
    HealthError,
    TrainingError,
    confirm_rounds,
    confirmation,
    early_stop_reason,
    solved_reason,
    unhealthy,
)
from engine.logger import MetricsLog, truncate_metrics
from engine.nvtx import nvtx_range
from engine.optim import StackedOptimizer, step_together
from engine.trainer import BEHAVIOR_KEYS, Trainer

# Member settings (config.MEMBER_KEYS) the member's modules hold as tensors (hold_settings):
# config key -> the stacked buffers holding it. The others are the optimizers' (learning rates,
# betas, eps, weight decay, clips, AGC) and the trainer's (the entropy coefficient schedule).
MODULE_KEYS = {
    "train.gamma": ("behavior.gamma",),
    "train.lam": ("behavior.lam",),
    "train.repval_scale": ("behavior.repval_scale",),
    "train.slow_critic_rate": ("behavior.slow_rate",),
    "train.slow_critic_reg": ("behavior.slow_reg",),
    "train.retnorm_rate": ("behavior.retnorm.rate",),
    "train.retnorm_limit": ("behavior.retnorm.limit",),
    "models.free_bits": ("wm.free_bits",),
    "models.unimix": ("wm.unimix", "behavior.unimix"),
    **{
        f"train.{k}": (f"wm.{k}",)
        for k in ("beta_pred", "beta_dyn", "beta_rep", "image_scale", "vector_scale")
        + ("reward_scale", "cont_scale")
    },
}


class _Shell(nn.Module):
    """Holds the template agent so `functional_call` can run any of its methods: forward(fn,
    *args) = fn(agent, *args) with the agent's tensors swapped for one member's."""

    def __init__(self, agent: Agent):
        super().__init__()
        self.agent = agent

    def forward(self, fn: Callable, *args):
        return fn(self.agent, *args)


# The functions of the single agent's code that read weights, each replaced on the template by
# a member call: (module path on the agent, method, the dim of each positional argument that
# holds the rows (None: passed to every member as it is), the same for the outputs ("member":
# one value per member, returned as (K, ...))). Tensors inside a tuple or dict argument or
# output share that entry's dim.
ROWS, MEMBER = 0, "member"
MEMBER_CALLS = (
    ("wm", "encode", (ROWS,), ROWS),
    ("wm", "obs_step", (ROWS,) * 5, ROWS),
    ("wm", "img_step", (ROWS,) * 3, ROWS),
    ("wm", "loss_terms", (ROWS,) * 4, MEMBER),
    ("behavior", "act", (ROWS, None), ROWS),
    # losses(wm, feats (H+1, N, F), actions (H, N, A), replay (B, T), entropy_coef (K,)); the
    # member's own world model stands in for the `wm` argument.
    ("behavior", "losses", (None, 1, 1, ROWS, MEMBER), MEMBER),
)


class PopulationAgent:
    """K agents (one per config of `cfgs`, which differ only in seed, MEMBER_KEYS and
    SWITCH_KEYS) with
    stacked state. Member k's initial weights are those of a single run seeded like it: each is
    built as `Agent` right after torch.manual_seed(its seed), as the trainer builds one."""

    def __init__(
        self,
        cfgs: list[Config],
        vector_dim: int,
        num_actions: int,
        device: torch.device | str = "cpu",
        opts: FastOptions | None = None,
        mixed: frozenset[str] | None = None,
    ):
        """`mixed`: the config.SWITCH_KEYS held per member as flags (default: those `cfgs`
        differ in; under torchrun, those the whole population differs in)."""
        self.cfgs, self.size = cfgs, len(cfgs)
        self.opts = opts = opts or FastOptions()
        if opts.kernels != "torch" or opts.batched_wgrad:
            raise ValueError("a population runs the torch kernels, without batched_wgrad")
        self.device, self.num_actions = torch.device(device), num_actions
        self.cfg = cfgs[0]
        self.mixed = mixed = mixed_switches(cfgs) if mixed is None else mixed
        members = []
        for c in cfgs:
            torch.manual_seed(c.general.seed)
            members.append(Agent(c, vector_dim, num_actions, device, opts, True, mixed))
        # Member names in the single agent's order (its optimizers' parameter order too).
        self.param_names = [n for n, _ in members[0].named_parameters()]
        self.buffer_names = [n for n, _ in members[0].named_buffers()]
        self.state_keys = list(members[0].state_dict())  # what a member's checkpoint holds
        with torch.no_grad():
            self.params = {
                n: torch.stack([m.get_parameter(n) for m in members]).requires_grad_(
                    members[0].get_parameter(n).requires_grad
                )
                for n in self.param_names
            }
            self.buffers = {
                n: torch.stack([m.get_buffer(n) for m in members]) for n in self.buffer_names
            }
        # The template runs the single agent's code; its own tensors are never read (member
        # calls swap in the stacked ones): on the meta device they take no memory, and a read
        # that was missed fails loudly.
        template = self.template = members[0]
        template.wm_opt = template.actor_opt = template.critic_opt = None
        template.to("meta")
        # The replay (the trainer's follows this flag) stores posteriors when any member of the
        # population starts from them: with `mixed` from the whole population, the same on every
        # rank. Members that do not start from zeros (Agent.context_members).
        context = any(c.train.replay_context for c in cfgs) or "train.replay_context" in mixed
        self.replay_context = template.replay_context = context
        if "train.replay_context" in mixed:
            flags = [float(c.train.replay_context) for c in cfgs]
            template.context_members = torch.tensor(flags, device=self.device)
        self.shell = _Shell(template)
        del members
        self.wm_params = self._group("wm.")
        self.actor_params = self._group("behavior.actor.")
        self.critic_params = self._group("behavior.critic.")
        # (slow critic tensor, the critic tensor it follows), paired once, not per update.
        self.slow_pairs = [
            (self.params[n], self.params[n.replace(".slow_critic.", ".critic.")])
            for n in self.param_names
            if ".slow_critic." in n
        ]
        t = [c.train for c in cfgs]
        lrs = [effective_lrs(x) for x in t]
        per = dict(
            kind=[x.optimizer for x in t],
            warmup=[x.lr_warmup_steps for x in t],
            betas=([x.adam_beta1 for x in t], [x.adam_beta2 for x in t]),
            eps=[x.adam_eps for x in t],
            weight_decay=[x.weight_decay for x in t],
            agc=[x.agc for x in t],
        )
        self.wm_opt, self.actor_opt, self.critic_opt = (
            StackedOptimizer(
                params,
                self.size,
                [lr[f"{name}_lr"] for lr in lrs],
                clip=[getattr(x, f"{name}_grad_clip") for x in t],
                **per,
            )
            for name, params in (
                ("wm", self.wm_params),
                ("actor", self.actor_params),
                ("critic", self.critic_params),
            )
        )
        self.entropy_coef = torch.tensor(
            [actor_entropy_coef_at(x, 0) for x in t], device=self.device
        )
        self.slow_rate = self.buffers["behavior.slow_rate"]
        if opts.compile:
            for opt in self.optimizers().values():
                opt.compile()
        for path, name, arg_dims, out_dims in MEMBER_CALLS:
            call = self._member_call(path, name, arg_dims, out_dims)
            if opts.compile:
                # Static shapes: with dynamic ones, vmap's batched tensors fail in the tracer
                # (torch 2.13: "Cannot call sizes() on tensor with symbolic sizes"). Each call
                # sees a few shapes (training rows, acting envs, eval envs), one graph each.
                call = torch.compile(call, dynamic=False)
            setattr(getattr(template, path), name, call)

    def state_dict(self) -> dict[str, Tensor]:
        """Every stacked parameter and buffer by name, the live tensors (not copies): what the
        CUDA-graph capture of fast.Learner snapshots before its warm-up updates and restores in
        place after them. A member's checkpoint is member_state(k)."""
        return {**self.params, **self.buffers}

    def _group(self, prefix: str) -> list[Tensor]:
        return [
            self.params[n]
            for n in self.param_names
            if n.startswith(prefix) and self.params[n].requires_grad
        ]

    def _member_call(self, path: str, name: str, arg_dims: tuple, out_dims) -> Callable:
        """The template's `path.name` as a function of all members' rows (see MEMBER_CALLS):
        the class's own function, run per member by vmap over the stacked weights."""
        method = getattr(type(getattr(self.template, path)), name)
        K = self.size

        def member(agent: Agent, *args):
            module = getattr(agent, path)
            if path == "behavior" and name == "losses":  # the member's own world model
                args = (agent.wm, *args[1:])
            return method(module, *args)

        def one(params, buffers, *args):
            tensors = {f"agent.{n}": v for n, v in (params | buffers).items()}
            return functional_call(self.shell, tensors, (member, *args), strict=True)

        out_dim = 0 if out_dims in (ROWS, MEMBER) else out_dims

        def split(x, dim):
            if isinstance(x, Tensor) and dim not in (None, MEMBER):
                x = x.unflatten(dim, (K, -1))
                # Rows on another dim than the first (the imagined (H+1, N, F) of the
                # behaviour losses) are moved to member-major order once, here: left to vmap,
                # every matmul inside the call would copy its input to bring the members first
                # (1.1 s of a 19.9 s update, d256 8 x 25, K = 4, CPU eager).
                return x if dim == 0 else x.movedim(dim, 0).contiguous()
            return x

        def join(x):
            return x.flatten(0, 1) if isinstance(x, Tensor) and out_dims == ROWS else x

        def call(*args):
            args = [
                tree_map(functools.partial(split, dim=dim), a) for a, dim in zip(args, arg_dims)
            ]
            # A module argument (the `wm` of losses) is the member's own inside the call.
            args = [None if isinstance(a, nn.Module) else a for a in args]
            # in_dims for the arguments given (a call may leave defaulted ones out).
            in_dims = (0, 0) + tuple(None if d is None else 0 for d in arg_dims)
            mapped = vmap(
                one, in_dims=in_dims[: 2 + len(args)], out_dims=out_dim, randomness="different"
            )
            out = mapped(self.params, self.buffers, *args)
            return tree_map(join, out)

        return _own_code(call, f"{path}_{name}")

    # ---- The interface the trainer and evaluation use -----------------------------------------

    def parameters(self) -> Iterator[Tensor]:
        return iter(self.params.values())

    def optimizers(self) -> dict[str, StackedOptimizer]:
        return {"wm": self.wm_opt, "actor": self.actor_opt, "critic": self.critic_opt}

    def num_params(self) -> int:
        """Trainable parameters of one member."""
        return sum(p[0].numel() for p in self.params.values() if p.requires_grad)

    def set_entropy_coef(self, values: list[float]) -> None:
        self.entropy_coef.copy_(torch.tensor(values, dtype=torch.float32))

    @property
    def active(self) -> Tensor:
        """(K,) 1 for a member that trains, 0 for a frozen one (shared by the optimizers)."""
        return self.wm_opt.active

    def freeze(self, k: int) -> None:
        """Member k stops training: its weights, moments and return normaliser stay as they are."""
        for opt in self.optimizers().values():
            opt.active[k] = 0.0

    # ---- Learning -----------------------------------------------------------------------------

    def learn(
        self, batch: dict[str, Tensor], train_behavior: bool
    ) -> tuple[dict[str, Tensor], tuple[Tensor, Tensor]]:
        """Agent.learn for every member: batch (K x B, T, ...), member k's rows k*B .. k*B + B -
        1. Returns (K,) metrics and the posteriors (K x B, T, ...)."""
        agent = self.template
        loss, metrics, (deter, stoch), batch = agent.wm_forward(batch)
        if self.cfg.general.train_world_model:
            with nvtx_range("world_model/backward+optimizer"):
                metrics["wm_grad_norm"] = self.wm_opt.step(loss.sum())
        if train_behavior:
            retnorm = self._retnorm_state()
            actor_loss, critic_loss, beh = agent.behavior_forward(
                deter, stoch, batch, self.entropy_coef
            )
            metrics.update(beh)
            with nvtx_range("actor_critic/backward+optimizer"):
                # Members and the actor/critic sets are independent: one backward of the sum.
                loss = actor_loss.sum() + critic_loss.sum()
                norms = step_together(loss, [self.actor_opt, self.critic_opt])
                metrics["actor_grad_norm"], metrics["critic_grad_norm"] = norms
                self._update_slow_critic()
                self._keep_frozen(retnorm)
        return metrics, (deter, stoch)

    def _retnorm_state(self) -> dict[str, Tensor]:
        return {n: v.clone() for n, v in self.buffers.items() if n.startswith("behavior.retnorm.")}

    @torch.no_grad()
    def _keep_frozen(self, before: dict[str, Tensor]) -> None:
        """A frozen member's return normaliser is restored (the update ran for every member)."""
        for n, old in before.items():
            live = self.active.view(-1, *([1] * (old.dim() - 1))) > 0
            self.buffers[n].copy_(torch.where(live, self.buffers[n], old))

    @torch.no_grad()
    def _update_slow_critic(self) -> None:
        rate = self.slow_rate * self.active  # (K,): a frozen member's slow critic stays
        for slow, fast in self.slow_pairs:
            slow.lerp_(fast, rate.view(-1, *([1] * (slow.dim() - 1))))

    # ---- Acting -------------------------------------------------------------------------------

    def initial_carry(self, n: int, device: torch.device) -> Carry:
        """The carry of n envs, member k acting in envs k*n/K .. (k+1)*n/K - 1."""
        if n % self.size:
            raise ValueError(f"{n} envs do not split into {self.size} members")
        return self.template.initial_carry(n, device)

    @torch.no_grad()
    def policy(
        self, obs: dict[str, Tensor], carry: Carry, greedy: bool = False
    ) -> tuple[Tensor, Carry]:
        """Agent.policy for every member: obs (K x n, ...) -> actions (K x n,), next carry."""
        return self.template.policy(obs, carry, greedy)

    # ---- Members' state -----------------------------------------------------------------------

    @torch.no_grad()
    def set_member_config(self, k: int, cfg: Config) -> None:
        """Member k's settings (MEMBER_KEYS) from `cfg`, in place: the module settings, the
        optimizers' values, and `cfgs[k]` (the entropy coefficient is read from it)."""
        for key, names in MODULE_KEYS.items():
            value = float(get_key(cfg, key))
            for name in names:
                self.buffers[name][k] = value
        space = cfg.models.twohot_space
        for module in ("wm", "behavior"):
            if f"{module}.space" in self.buffers:  # a population mixing the two-hot spaces
                self.buffers[f"{module}.space"][k] = space == "real"
                bins = self.buffers[f"{module}.bins"]
                bins[k] = make_bins(bins.shape[-1], space=space, device=bins.device)
        if self.template.context_members is not None:
            self.template.context_members[k] = float(cfg.train.replay_context)
        t, lrs = cfg.train, effective_lrs(cfg.train)
        for group, opt in self.optimizers().items():
            opt.lr[k], opt.clip[k] = lrs[f"{group}_lr"], getattr(t, f"{group}_grad_clip")
            opt.b1[k], opt.b2[k], opt.eps[k] = t.adam_beta1, t.adam_beta2, t.adam_eps
            opt.weight_decay[k], opt.agc[k] = t.weight_decay, t.agc
            opt.laprop[k], opt.warmup[k] = t.optimizer == "laprop", t.lr_warmup_steps
            opt._note_clips()
        self.cfgs[k] = cfg

    @torch.no_grad()
    def copy_member(self, src: int, dst: int) -> None:
        """Member dst takes member src's weights, buffers (return normaliser, slow critic,
        settings) and optimizer state, in place (index_copy_ on the stacked tensors: nothing is
        reallocated, so compiled graphs stay valid)."""
        s = torch.tensor([src], device=self.device)
        d = torch.tensor([dst], device=self.device)
        for t in [*self.params.values(), *self.buffers.values()]:
            t.index_copy_(0, d, t.index_select(0, s))
        for opt in self.optimizers().values():
            opt.copy_member(s, d)

    def member_state(self, k: int) -> tuple[dict[str, Tensor], dict[str, dict]]:
        """Member k's agent state_dict and optimizer states in a single agent's format (a
        member's checkpoint loads into Agent and resumes as a single run)."""
        stacked = {**self.params, **self.buffers}
        agent = {n: stacked[n][k].detach().clone() for n in self.state_keys}
        optim = {}
        for name, opt in self.optimizers().items():
            optim[name] = {
                "count": opt.count[k].clone(),
                "m": [m[k].clone() for m in opt.m],
                "v": [v[k].clone() for v in opt.v],
            }
        return agent, optim

    @torch.no_grad()
    def load_member_state(self, k: int, agent: dict[str, Tensor], optim: dict[str, dict]) -> None:
        """The inverse of `member_state`; ValueError names the first entry that does not fit."""
        stacked = {**self.params, **self.buffers}
        missing = sorted(set(self.state_keys) - set(agent))
        if missing:
            raise ValueError(f"missing {missing[0]}")
        for n in self.state_keys:
            if agent[n].shape != stacked[n].shape[1:]:
                raise ValueError(f"{n}: {tuple(agent[n].shape)} != {tuple(stacked[n].shape[1:])}")
            stacked[n][k].copy_(agent[n])
        for name, opt in self.optimizers().items():
            state = optim[name]
            if len(state["m"]) != len(opt.m):
                raise ValueError(f"optimizer {name}: {len(state['m'])} tensors != {len(opt.m)}")
            opt.count[k] = state["count"]
            for dst, src in zip(opt.m + opt.v, state["m"] + state["v"]):
                dst[k].copy_(src)


def _own_code(fn: Callable, name: str) -> Callable:
    """`fn` with a code object of its own, named `name`. torch.compile caches its graphs per
    code object, and every member call is the same `call` closure: sharing one code object, the
    six calls at their three shapes (training rows, acting envs, eval envs) passed dynamo's
    recompile limit of 8 in a training run, and the calls after that ran eagerly."""
    code = fn.__code__.replace(co_name=name)
    return types.FunctionType(code, fn.__globals__, name, fn.__defaults__, fn.__closure__)


def write_population_tables(run_dir: Path, rows: list[dict], counters: dict) -> None:
    """population.csv (one row per member) and population.md (the same as a table, then the
    mean +- std of the last and best eval returns), each written atomically."""
    if not rows:
        return
    keys = list(rows[0])

    def write_csv(f):
        w = csv.DictWriter(f, keys)
        w.writeheader()
        w.writerows(rows)

    checkpoint.atomic_write(run_dir / "population.csv", lambda p: _write_text(p, write_csv))

    def cell(v) -> str:  # returns to one decimal; settings (learning rates of 1e-4) to 4 digits
        if not isinstance(v, float):
            return str(v)
        return f"{v:.1f}" if abs(v) >= 10 else f"{v:.4g}"

    lines = [
        f"# Population: {len(rows)} members, {counters['step']:,} updates, "
        f"{counters['env_steps']:,} env steps per member",
        "",
        "| " + " | ".join(keys) + " |",
        "|" + "---|" * len(keys),
    ]
    lines += ["| " + " | ".join(cell(r[k]) for k in keys) + " |" for r in rows]
    for key in ("last_eval", "best_eval"):
        values = np.array([r[key] for r in rows], dtype=float)
        values = values[np.isfinite(values)]
        if len(values):
            lines.append("")
            lines.append(
                f"{key}: {values.mean():.1f} +- {values.std():.1f} over {len(values)} members "
                f"(min {values.min():.1f}, max {values.max():.1f})"
            )
    text = "\n".join(lines) + "\n"
    checkpoint.atomic_write(
        run_dir / "population.md", lambda p: _write_text(p, lambda f: f.write(text))
    )


def _write_text(path, write) -> None:
    with open(path, "w", newline="") as f:
        write(f)


def population_options(opts: FastOptions) -> tuple[FastOptions, list[str]]:
    """The fast-path switches a population runs with, and a notice naming each one dropped:
    the Triton kernels and batched weight gradients are custom autograd functions that vmap
    cannot batch. compile, bf16 and CUDA graphs apply (the population update has no host sync
    and static shapes: fast.Learner captures it like a single agent's)."""
    dropped = [
        name
        for name, on in (
            ("general.kernels = triton", opts.kernels != "torch"),
            ("general.batched_wgrad", opts.batched_wgrad),
        )
        if on
    ]
    if not dropped:
        return opts, []
    notice = (
        f"notice: {', '.join(dropped)}: not yet for a population (its members run under "
        "vmap); running without"
    )
    return FastOptions(opts.compile, opts.cuda_graphs, opts.precision, "torch", False), [notice]


def member_dir_name(k: int) -> str:
    return f"member_{k:02d}"


# ------------------------------------------------------------------------------------------------
# The trainer


class PopulationTrainer(Trainer):
    """Trainer for a population (population.size > 1): one env pool of K x N envs (member k acts
    in envs k*N .. k*N + N - 1), one replay ring with each member sampling its own envs, one
    update for all members. Each member's directory (member_00/ ...) holds what a single run's
    does (config.toml with its resolved settings, metrics.jsonl, checkpoints/ in a single
    agent's format), so engine.report, engine.evaluate and engine.dream work on it, and a member
    resumes as a single run. The run directory holds the population's config.toml, its own
    metrics.jsonl (speed and membership events), checkpoints/population.pt (counters, members'
    status, RNG) and replay.pt, and population.csv / population.md.

    A member that diverges (non-finite metric or parameter, runaway dream value) is frozen: its
    updates are masked, its envs keep stepping with its last weights, and the others train on.
    A member that meets train.stop_solved_evals or train.early_stop_patience stops the same
    way. The run ends when no member trains; it exits 3 only when every member has failed.

    Under torchrun the members are split over the ranks, K / W each (rank r trains members
    r*K/W .. (r+1)*K/W - 1, in their own directories): no gradient crosses ranks. The ranks
    step in lockstep (the same updates, evaluations and checkpoints), agree once per loop step
    whether every member of the job has stopped, gather the members' evals for the job's line
    and tables (rank 0 writes them), and PBT ranks the whole population, a member's state
    crossing ranks when its source trains elsewhere. Each rank checkpoints its members and
    its own counters (population.pt on rank 0, population.rank<r>.pt)."""

    ranks_share_agent = False
    resume_file = "population.pt"

    def __init__(self, cfg: Config, run_dir: Path, resume: bool = False):
        dist, total = distributed.current(), cfg.population.size
        world, rank = (dist.world, dist.rank) if dist is not None else (1, 0)
        if total % world:
            raise TrainingError(
                f"population.size {total} does not split over {world} ranks: make it a "
                f"multiple of --nproc_per_node"
            )
        self.members = total // world  # this rank's
        self.first = rank * self.members  # the job-wide index of this rank's first member
        # Every member's config on every rank (PBT's explore reads a source trained elsewhere).
        self.all_member_cfgs = member_configs(cfg)
        self.member_cfgs = self.all_member_cfgs[self.first : self.first + self.members]
        self.member_dirs = [run_dir / member_dir_name(self.first + k) for k in range(self.members)]
        self.member_counters = [_member_counters() for _ in range(self.members)]
        self.member_logs: list[MetricsLog] = []
        super().__init__(cfg, run_dir, resume)
        for d in self.member_dirs:
            (d / "checkpoints").mkdir(parents=True, exist_ok=True)
        if not resume:
            for member, d in zip(self.member_cfgs, self.member_dirs):
                save_toml(member, d / "config.toml")
        self.member_logs = [MetricsLog(d / "metrics.jsonl") for d in self.member_dirs]
        self.member_lrs = [effective_lrs(m.train) for m in self.member_cfgs]
        self._rank_done = ""  # under torchrun: "stopped" or "failed" once no member here trains
        self._stops: list[dict] = []  # member_stopped records not yet in the run's metrics
        if self.dreams:
            self.dreams = False
            self.progress.write("note: log.dream_video: no dream videos in a population run")
        self._refresh_active()

    # ---- Building ---------------------------------------------------------------------------

    def _make_agent(self) -> PopulationAgent:
        self.opts, notices = population_options(self.opts)
        for line in notices:
            self.progress.write(line)
        env = self.env
        # Under torchrun a rank holds some members, and PBT may hand one a switch value only
        # another rank's members have: the switches mixed in the whole population are flags.
        mixed = mixed_switches(self.all_member_cfgs)
        return PopulationAgent(
            self.member_cfgs, env.vector_dim, env.num_actions, self.device, self.opts, mixed
        )

    def _entropy_coef_at(self, step: int) -> list[float]:
        return [actor_entropy_coef_at(m.train, step) for m in self.member_cfgs]

    def param_summary(self) -> str:
        ranks = f" on each of {self.world} ranks" if self.world > 1 else ""
        return f"{self.members} members{ranks} x {self.agent.num_params():,}"

    def _job(self, values: list) -> list:
        """Every member's value in the job (each rank's `values` in rank order)."""
        if self.dist is None:
            return list(values)
        return [v for part in self.dist.gather_objects(list(values), "member gather") for v in part]

    # ---- Members ----------------------------------------------------------------------------

    def _member_write(self, k: int, kind: str, **fields) -> None:
        if self.member_logs:
            self.member_logs[k].write(self._fields(kind, **fields))

    def _episode_end(self, env: int, ret: float, length: int) -> None:
        k = env // self.cfg.env.num_envs
        self.counters["episodes"] += 1
        mc = self.member_counters[k]
        mc["episodes"] += 1
        self.last_return = ret
        self._member_write(k, "episode", episode_return=ret, episode_length=length)

    def _refresh_active(self) -> None:
        with torch.no_grad():
            for k, mc in enumerate(self.member_counters):
                if mc["status"] != "training":
                    self.agent.freeze(k)

    def _stop_member(self, k: int, status: str, reason: str, **values) -> None:
        """Member k stops training: "failed" (diverged), "solved" or "early stop"."""
        mc = self.member_counters[k]
        if mc["status"] != "training":
            return
        # Its weights stop here: every later checkpoint of it says so (engine.evaluate's step,
        # the env steps and wall time it took), not the step the population was saved at.
        stopped = dict(self.counters, wall_time=self._wall_time())
        mc.update(status=status, reason=reason, stopped_counters=stopped)
        self.agent.freeze(k)
        kind = {"failed": "health", "solved": "solved", "early stop": "early_stop"}[status]
        self._member_write(k, kind, reason=reason, **values)
        self._stops.append(
            self._fields("member_stopped", member=self.first + k, status=status, reason=reason)
        )
        # Every rank's line: under torchrun a member trained on rank 1 stops in rank 1 only.
        self.progress.write(
            f"member {self.first + k}: {status} at step {self.counters['step']}: {reason}"
            + ("; the others train on" if status == "failed" else ""),
            every_rank=True,
        )
        if any(m["status"] == "training" for m in self.member_counters):
            return
        failed = all(m["status"] == "failed" for m in self.member_counters)
        if self.dist is not None:  # the job ends when no rank has a member training (_agreed)
            self._rank_done = "failed" if failed else "stopped"
            return
        if failed:
            raise HealthError(f"step {self.counters['step']}: every member failed ({reason})")
        self.stop_reason = (
            "no member is training ("
            + ", ".join(f"{i}: {m['status']}" for i, m in enumerate(self.member_counters))
            + ")"
        )
        self.stop_kind = "all members stopped"

    def _flush_stops(self) -> None:
        """The job's member stops into the run's metrics.jsonl, which rank 0 writes: a member
        stopped on another rank reaches it here, at the next log line, evaluation or summary
        (points every rank passes in step)."""
        stops, self._stops = self._stops, []
        for record in self._job(stops):
            self.log.write(record)

    def _flags(self) -> tuple[bool, ...]:
        return bool(self._rank_done), self._rank_done == "failed"

    def _agreed(self, flags: list[bool]) -> None:
        """Under torchrun: a rank whose members have all stopped keeps stepping (its updates
        masked) until every rank's have, so that the ranks stay in step."""
        all_done, all_failed = flags
        if all_failed:
            raise HealthError(f"step {self.counters['step']}: every member on every rank failed")
        if all_done and self.stop_reason is None:
            self.stop_reason = f"no member is training on any of the {self.world} ranks"
            self.stop_kind = "all members stopped"

    # ---- Logging ----------------------------------------------------------------------------

    def _log_train(self) -> None:
        if not self.meter:
            return
        c = self.counters
        means = self._means()  # key -> [one value per member]
        now, rate, env_rate = self.meter.rates(c["step"], c["env_steps"])
        speed = dict(
            train_steps_per_sec=rate,
            agent_updates_per_sec=rate * self.members,  # this rank's (the job's: x world)
            env_steps_per_sec=env_rate,  # per member
        )
        training = [m["status"] == "training" for m in self.member_counters]
        total = dict(
            speed,
            agent_updates_per_sec=speed["agent_updates_per_sec"] * self.world,
            env_steps_per_sec=speed["env_steps_per_sec"] * self.members * self.world,
        )
        members_training = sum(self._job([sum(training)]))
        self._record("train", wall_time=self._wall_time(now), members_training=members_training,
                     **total)  # fmt: skip
        for k in range(self.members):
            if not training[k]:
                continue
            record = {key: None for key in BEHAVIOR_KEYS}
            record.update({key: values[k] for key, values in means.items()})
            self._member_write(
                k,
                "train",
                wall_time=self._wall_time(now),
                **record,
                **speed,
                actor_entropy_coef=self._entropy_coef[k],
                **self.member_lrs[k],
            )
            member_means = {key: values[k] for key, values in means.items()}
            self._check_member_health(k, member_means)
            mc, wm_loss = self.member_counters[k], member_means.get("wm_loss")
            reason = early_stop_reason(self.cfg.train, wm_loss, mc, c["step"])
            if reason is not None:
                self._stop_member(k, "early stop", reason)
        self._flush_stops()

    def _check_member_health(self, k: int, means: dict[str, float]) -> None:
        found = unhealthy(means, self.cfg.train.max_abs_dream_value)
        if found is not None:
            reason, values = found
            self._stop_member(k, "failed", reason, **values)

    # ---- Population-based training ----------------------------------------------------------

    def _update(self) -> None:
        super()._update()
        every = self.cfg.population.pbt.every
        if every and self.counters["step"] % every == 0 and self.stop_reason is None:
            self.exploit_and_explore()

    def exploit_and_explore(self) -> None:
        """[population.pbt]: each training member in the bottom `quantile` of the last eval
        returns takes the state of a random one in the top `quantile` (copy_member) and that
        member's grid settings, each multiplied by a random factor of `perturb` (a value the
        config would refuse keeps the source's). Members are ranked only once evaluated after
        their last exploit. Both members' metrics get a record. Under torchrun the whole
        population is ranked (every rank draws the same pairs) and a source on another rank
        sends its state there."""
        pbt, c = self.cfg.population.pbt, self.counters
        evals = self._job(
            mc["last_eval"] if mc["status"] == "training" else math.nan
            for mc in self.member_counters
        )
        ranked = sorted((v, k) for k, v in enumerate(evals) if math.isfinite(v))
        n = int(pbt.quantile * len(ranked))
        if n < 1:
            return
        rng = np.random.default_rng(self.cfg.general.seed * 1_000_003 + c["step"])
        bottom, top = [k for _, k in ranked[:n]], [k for _, k in ranked[-n:]]
        for dst in bottom:
            src = top[int(rng.integers(len(top)))]
            self._copy_member(src, dst)
            member = explore(
                self.all_member_cfgs[src],
                self.all_member_cfgs[dst].general.seed,
                [k for k in self.cfg.population.grid if k in MEMBER_KEYS],
                pbt.perturb,
                rng,
            )
            self.all_member_cfgs[dst] = member
            settings = {key: plain_value(get_key(member, key)) for key in self.cfg.population.grid}
            mine = self._local(dst)
            if mine is not None:
                self.agent.set_member_config(mine, member)  # also self.member_cfgs[mine]
                self.member_lrs[mine] = effective_lrs(member.train)
                save_toml(member, self.member_dirs[mine] / "config.toml")
                self.member_counters[mine]["last_eval"] = math.nan  # ranked again once evaluated
                self._member_write(mine, "pbt_exploit", source=src, source_eval=evals[src],
                                   eval_return_before=evals[dst], settings=settings)  # fmt: skip
            if (theirs := self._local(src)) is not None:
                self._member_write(theirs, "pbt_source", target=dst, eval_return=evals[src])
            self._record("pbt_exploit", source=src, target=dst, settings=settings)
            self.progress.write(
                f"pbt at step {c['step']}: member {dst} ({evals[dst]:.1f}) takes member {src}'s "
                f"state ({evals[src]:.1f}), settings {settings}"
            )
        self._entropy_coef = self._entropy_coef_at(c["step"])
        self.agent.set_entropy_coef(self._entropy_coef)
        self.write_summary()

    def _local(self, k: int) -> int | None:
        """This rank's index of the job's member k (None: it trains on another rank)."""
        return k - self.first if self.first <= k < self.first + self.members else None

    def _copy_member(self, src: int, dst: int) -> None:
        """Member dst (job-wide index) takes member src's state: in place when both train here,
        else sent from src's rank (weights, buffers, moments, on the CPU) to every rank."""
        s, d = self._local(src), self._local(dst)
        if s is not None and d is not None:
            self.agent.copy_member(s, d)
            return
        state = None
        if s is not None:
            state = tree_map(lambda t: t.cpu(), self.agent.member_state(s))
        state = self.dist.broadcast_object(state, "PBT member copy", src=src // self.members)
        if d is not None:
            agent, optim = tree_map(lambda t: t.to(self.device), state)
            self.agent.load_member_state(d, agent, optim)

    # ---- Evaluation -------------------------------------------------------------------------

    def _evaluate(self) -> float:
        c, n = self.counters, self.cfg.log.eval_episodes
        episodes, _ = self.evaluator.play()
        evals, solved = [], {}
        for k, mc in enumerate(self.member_counters):
            fields = episodes.rows(self._eval_rows(k)).record("eval", self.cfg.env.name)
            mc["last_eval"] = fields["eval_return"]
            evals.append(mc["last_eval"])
            self._member_write(k, "eval", **fields)
            if mc["status"] != "training":
                continue
            if mc["last_eval"] > mc["best_eval"]:
                mc["best_eval"] = mc["last_eval"]
                self._checkpoint_member(k, "best")
            reason = solved_reason(self.cfg, mc["last_eval"], mc)
            if reason is not None:
                solved[k] = reason
        self._stop_solved(solved)
        self._flush_stops()
        # The job's: every rank's members (in one process, this population).
        evals, bests = zip(*self._job(zip(evals, (m["best_eval"] for m in self.member_counters))))
        self.last_eval = float(np.mean(evals))
        c["best_eval"] = max(bests)
        self._record("eval", eval_returns=list(evals), eval_return=self.last_eval)
        self.progress.write(
            f"step {c['step']} env_steps {c['env_steps']}: eval return "
            f"{self.last_eval:.1f} +- {float(np.std(evals)):.1f} over {len(evals)} members "
            f"({' '.join(f'{v:.0f}' for v in evals)}; {n} episodes each)"
        )
        self.write_summary()
        return self.last_eval

    def _eval_rows(self, k: int) -> slice:
        """Member k's rows of an evaluation's episodes (log.eval_episodes envs each)."""
        n = self.cfg.log.eval_episodes
        return slice(k * n, (k + 1) * n)

    def _stop_solved(self, solved: dict[int, str]) -> None:
        """Stops the members whose solved streak is complete ({member: reason}), each once its
        own rows of train.stop_confirm_episodes fresh episodes confirm it when that is set
        (the rounds are played once for all of them)."""
        n = self.cfg.log.eval_episodes
        rounds = confirm_rounds(self.cfg.train, n) if solved else 0
        parts = self.evaluator.rounds(rounds)
        for k, reason in solved.items():
            if parts:
                mine = Episodes.join([p.rows(self._eval_rows(k)) for p in parts])
                confirm = confirmation(self.cfg, mine)
                self._member_write(k, "solve_confirm", **confirm)
                if not confirm["passed"]:
                    self.progress.write(
                        f"member {self.first + k}: not stopped at step {self.counters['step']}: "
                        f"{reason}, but {confirm['reason']}; it trains on",
                        every_rank=True,
                    )
                    continue
                reason = f"{reason}; {confirm['reason']}"
            self._stop_member(k, "solved", reason, eval_return=self.member_counters[k]["last_eval"])

    # ---- Checkpoints ------------------------------------------------------------------------

    def _checkpoint(self, name: str) -> int:
        """checkpoints/population.pt (and replay.pt) in the run directory, and each member's
        `name`.pt in its own directory but a failed one's. A member whose state is not finite
        is stopped (its last good checkpoint kept) instead of ending the run.

        The set that resumes (members' latest.pt, replay.pt, population.pt) is written in two
        phases: the members' files as latest.pt.next, then replay.pt.next and
        population.pt.next, then (under torchrun once every rank has written its set)
        population.pt.next, each member's .next and replay.pt.next renamed into place. A process
        killed while the set is written (torchrun gives its ranks 30 s after a Ctrl-C before
        SIGKILL; the LunarLander population of 4 took 14-25 s here, and 31 s when the Ctrl-C
        came during the first update's compile) leaves the previous set whole, replay
        included, on every rank: _restore resumes the latest step whose set every rank holds,
        committed or staged, and drops the rest (Trainer._restore_replay the replay's)."""
        if self.meter:  # updates since the last log line are checked first
            means = self._means()
            for k, mc in enumerate(self.member_counters):
                if mc["status"] == "training":
                    self._check_member_health(k, {key: v[k] for key, v in means.items()})
        size = 0
        for k, mc in enumerate(self.member_counters):
            # A solved or early-stopped member's final weights are saved too; a failed one
            # keeps its last good checkpoint.
            if mc["status"] != "failed":
                size += self._checkpoint_member(k, name, staged=name == "latest")
        if name == "latest":
            self._save_replay()
            state = dict(
                counters=dict(self.counters, wall_time=self._wall_time()),
                members=self.member_counters,
                rng=checkpoint.rng_state(),
                config=to_dict(self.cfg),
                world_size=self.world,
                # PBT may have changed members trained on other ranks too: every rank's view.
                member_configs=[to_dict(m) for m in self.all_member_cfgs],
            )
            path = self._population_path()
            size += checkpoint.save(checkpoint.staged_path(path), state)
            if self.dist is not None:
                # Every rank's set is on disk before any rank commits its own, so a resume
                # finds each rank's set of this step committed or staged (_settle_population).
                self.dist.all_of(True, what="checkpoint commit")
            os.replace(checkpoint.staged_path(path), path)
            self._commit_members()
            self._commit_replay()
            self.saved_step[name] = self.counters["step"]
        return size

    def _staged(self) -> Iterator[Path]:
        """The members' latest.pt.next files on disk."""
        for d in self.member_dirs:
            if (staged := checkpoint.staged_path(d / "checkpoints" / "latest.pt")).is_file():
                yield staged

    def _commit_members(self) -> None:
        """Each member's latest.pt.next becomes its latest.pt (population.pt is written)."""
        for staged in self._staged():
            os.replace(staged, staged.with_name("latest.pt"))

    def _drop_uncommitted(self, step: int) -> None:
        """On resume: a latest.pt.next written for another step than population.pt's belongs
        to a set a kill cut off before population.pt; the previous set stays whole."""
        for staged in list(self._staged()):
            # An unreadable one is never part of a completed set.
            if (checkpoint.peek(staged) or {}).get("saved_at") != step:
                staged.unlink()

    def _checkpoint_member(self, k: int, name: str, staged: bool = False) -> int:
        agent, optim = self.agent.member_state(k)
        if not all(v.isfinite().all() for v in agent.values() if v.is_floating_point()):
            self._stop_member(k, "failed", "non-finite parameters")
            return 0
        mc = self.member_counters[k]
        counters = mc.get("stopped_counters") or dict(self.counters, wall_time=self._wall_time())
        counters.update({key: mc[key] for key in SINGLE_RUN_COUNTERS})
        payload = dict(
            agent=agent,
            optim=optim,
            counters=counters,
            rng=checkpoint.rng_state(),
            config=to_dict(self.member_cfgs[k]),
        )
        path = self.member_dirs[k] / "checkpoints" / f"{name}.pt"
        if staged:  # part of the resume set: latest.pt once population.pt is written
            payload["saved_at"] = self.counters["step"]
            path = checkpoint.staged_path(path)
        return checkpoint.save(path, payload)

    def _population_path(self) -> Path:
        """This rank's counters, members' status and RNG: population.pt, population.rank<r>.pt."""
        return checkpoint.rank_path(self.ckpt_dir, "population", self.rank)

    def _settle_population(self, path: Path) -> None:
        """Make this rank's population file the one of the latest step whose set every rank
        holds on disk, committed or staged (a kill can stop one rank between the commit
        barrier and its renames, or before its staged files are complete)."""
        staged = checkpoint.staged_path(path)
        mine = (_saved_step(path), _saved_step(staged))
        everyone = self.dist.gather_objects(mine, "checkpoint agreement") if self.dist else [mine]
        target = _complete_step(everyone)
        if target is None:
            if any(step is not None for pair in everyone for step in pair):
                held = "; ".join(
                    f"rank {r}: {_steps_held(c, s)}" for r, (c, s) in enumerate(everyone)
                )
                raise TrainingError(
                    f"{path.parent}: the ranks hold no checkpoint of the same step ({held}); "
                    "cannot resume them together"
                )
            return  # no checkpoint at all: _restore says so
        if mine[0] != target:
            os.replace(staged, path)  # a set the kill left staged after every rank wrote it
        elif staged.exists():
            staged.unlink()  # a later set that not every rank finished

    def _restore(self) -> None:
        path = self._population_path()
        self._settle_population(path)
        if not path.is_file():
            raise TrainingError(f"{path}: no population checkpoint to resume from")
        state = checkpoint.load(path, self.device)
        saved = len(state["members"])
        if saved != self.members:
            raise TrainingError(
                f"{path}: holds a population of {saved}, not {self.members} (population.size)"
            )
        if self.cfg.population.pbt.every and "member_configs" in state:
            self._restore_pbt_settings(state["member_configs"])
        self._drop_uncommitted(state["counters"]["step"])  # a set cut off by a kill
        self._commit_members()  # one killed after population.pt, before its renames
        for k, d in enumerate(self.member_dirs):
            member_path = d / "checkpoints" / "latest.pt"
            if not member_path.is_file():
                raise TrainingError(
                    f"{member_path}: missing; cannot resume member {self.first + k}"
                )
            member = checkpoint.load(member_path, self.device)
            step, held = state["counters"]["step"], member.get("counters", {}).get("step")
            if state["members"][k]["status"] == "training" and held != step:
                # engine.run --resume on the member's directory continued it alone since.
                raise TrainingError(
                    f"{member_path}: holds update {held}, the population {step} (was "
                    f"{d.name} resumed alone?); resume that member on its own, or the "
                    "population from a copy made before"
                )
            try:
                self.agent.load_member_state(k, member["agent"], member["optim"])
            except (KeyError, ValueError) as e:
                raise TrainingError(
                    f"{member_path}: does not match the config (were models.* changed?): {e}"
                ) from None
        self.counters.update(state["counters"])
        self.member_counters = state["members"]
        checkpoint.set_rng_state(state["rng"])
        step = self.counters["step"]
        if self.is_main:
            save_toml(self.cfg, self.run_dir / "config.toml")
            truncate_metrics(self.run_dir / "metrics.jsonl", step)
        for member, d in zip(self.member_cfgs, self.member_dirs):
            save_toml(member, d / "config.toml")
            truncate_metrics(d / "metrics.jsonl", step)
        # The job's members (under torchrun, every rank's), as the eval lines count them.
        stopped = self._job([m["status"] != "training" for m in self.member_counters])
        self.progress.write(
            f"resumed {path} at step {step}, env steps {self.counters['env_steps']} "
            f"({len(stopped)} members, {sum(stopped)} stopped)"
        )

    def _restore_pbt_settings(self, saved: list[dict]) -> None:
        """The grid settings PBT gave each member (saved with the counters), over the grid's
        own: a resumed PBT run goes on with the perturbed learning rates, not the first ones."""
        keys = [key for key in self.cfg.population.grid if key in (*MEMBER_KEYS, *SWITCH_KEYS)]
        for member, raw in zip(self.all_member_cfgs, saved):
            before = from_dict(raw)
            for key in keys:
                set_key(member, key, get_key(before, key), "population checkpoint")
        for k, member in enumerate(self.member_cfgs):
            self.agent.set_member_config(k, member)

    # ---- The end ----------------------------------------------------------------------------

    def run(self) -> dict:
        try:
            result = super().run()
        except BaseException:
            # Under torchrun the other ranks may be gone: the last evaluation's tables stay.
            if self.dist is None:
                self.write_summary()
            raise
        finally:
            for log in self.member_logs:
                log.close()
        self.write_summary()
        return result

    def write_summary(self) -> None:
        """population.csv and population.md: each member's seed, grid settings, status, last and
        best eval, and the mean +- std over the members."""
        self._flush_stops()
        rows = []
        for k, (member, mc) in enumerate(zip(self.member_cfgs, self.member_counters)):
            row = {"member": member_dir_name(self.first + k), "seed": member.general.seed}
            grid = [key for key in self.cfg.population.grid if key != "general.seed"]
            row.update({key: get_key(member, key) for key in grid})
            row.update(
                status=mc["status"] + (f" ({mc['reason']})" if mc["reason"] else ""),
                episodes=mc["episodes"],
                last_eval=mc["last_eval"],
                best_eval=mc["best_eval"],
            )
            rows.append(row)
        rows = self._job(rows)  # under torchrun, every rank's members: rank 0 writes them
        if self.is_main:
            write_population_tables(self.run_dir, rows, self.counters)


def explore(
    source: Config, seed: int, keys: list[str], factors: list[float], rng: np.random.Generator
) -> Config:
    """PBT's explore step: a copy of `source` with the member's own `seed` and each of `keys`
    multiplied by a random one of `factors` (a schedule's start and end alike); a value the
    config refuses (e.g. gamma >= 1) keeps the source's."""
    cfg = copy.deepcopy(source)
    cfg.general.seed = seed
    for key in keys:
        old = get_key(cfg, key)
        factor = float(factors[int(rng.integers(len(factors)))])
        if isinstance(old, Schedule):
            new = dataclasses.replace(old, start=old.start * factor, end=old.end * factor)
        else:
            new = old * factor
        try:
            set_key(cfg, key, new, "population.pbt")
            validate(cfg, "population.pbt")
        except ConfigError:
            set_key(cfg, key, old, "population.pbt")
    return cfg


SINGLE_RUN_COUNTERS = ("episodes", "best_eval", "es_best", "es_best_step", "es_stale",
                       "solved_streak")  # fmt: skip


def _member_counters() -> dict:
    return dict(
        episodes=0,
        best_eval=-math.inf,
        last_eval=math.nan,
        es_best=math.inf,
        es_best_step=0,
        es_stale=0,
        solved_streak=0,
        status="training",
        reason="",
        stopped_counters=None,  # the counters at the stop (its step...), for later checkpoints
    )


def _saved_step(path: Path) -> int | None:
    """The step a population file was saved at; None when it is missing or unreadable."""
    state = checkpoint.peek(path)
    return None if state is None else int(state["counters"]["step"])


def _complete_step(held: list[tuple[int | None, int | None]]) -> int | None:
    """The latest step whose population file every rank holds, as (committed, staged) steps
    per rank; None when there is none."""
    steps = sorted({s for pair in held for s in pair if s is not None}, reverse=True)
    return next((s for s in steps if all(s in pair for pair in held)), None)


def _steps_held(committed: int | None, staged: int | None) -> str:
    parts = [f"step {committed}" if committed is not None else "no checkpoint"]
    if staged is not None:
        parts.append(f"step {staged} staged")
    return ", ".join(parts)
