"""The population's agent: K agents in one update (engine.population trains it).

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

import functools
import types
from collections.abc import Callable, Iterator

import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap
from torch.utils._pytree import tree_map

from engine.agent import Agent, Carry
from engine.config import (
    Config,
    actor_entropy_coef_at,
    effective_lrs,
    get_key,
    mixed_switches,
)
from engine.dists import make_bins
from engine.fast import FastOptions
from engine.nvtx import nvtx_range
from engine.optim import StackedOptimizer, step_together

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
