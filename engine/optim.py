"""Optimizers with all of their state on the device: Adam and LaProp (official DreamerV3), with
global-norm clipping, adaptive gradient clipping (AGC) and a linear learning-rate warm-up. The
step count and learning rate are tensors and no clip ever leaves the device. torch.optim.Adam
reads its step count with .item() unless capturable=True, which it only allows on CUDA; these
have no host sync on any device, so the whole update can be compiled and captured in a CUDA
graph.

Adam is torch's fused Adam kernel (one pass over parameters, gradients and both moments; the
global-norm clip is folded in as its `grad_scale` divisor): at d256 (13.8M world-model parameters)
the eight separate foreach passes it replaces took ~0.25 s per update on the 2-core CPU. LaProp
has no fused kernel in torch and runs as foreach passes.

Per update, in order: gradient (+ L2 weight decay for Adam), AGC per tensor, global-norm clip,
then the Adam or LaProp step with the warmed-up learning rate.
"""

from __future__ import annotations

import torch
from torch import Tensor

KINDS = ("adam", "laprop")
AGC_PMIN = 1e-3  # official `clip_by_agc`: parameter norms below this count as this


class Optimizer:
    """`kind` "adam": torch's Adam (L2 weight decay added to the gradient). "laprop": the
    gradient is divided by the RMS of past gradients (bias-corrected second moment) first, then
    averaged by momentum (bias-corrected); weight decay is decoupled (added to the update), as in
    official DreamerV3. `agc` > 0 scales each tensor's gradient by 1 / max(1, |g| / (agc x
    max(1e-3, |p|))); `clip` > 0 then clips the global norm; `warmup` > 0 ramps the learning rate
    linearly from 0 over the first `warmup` updates (update k uses lr x k / warmup)."""

    def __init__(
        self,
        params,
        lr: float,
        kind: str = "adam",
        betas=(0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        clip: float = 0.0,
        agc: float = 0.0,
        warmup: int = 0,
    ):
        if kind not in KINDS:
            raise ValueError(f"optimizer kind must be one of {KINDS}, not {kind!r}")
        self.params = [p for p in params if p.requires_grad]
        device = self.params[0].device
        self.kind = kind
        self.lr = torch.tensor(float(lr), device=device)
        self.betas, self.eps, self.weight_decay = betas, eps, weight_decay
        self.clip, self.agc, self.warmup = clip, agc, warmup
        self.count = torch.zeros((), device=device)
        self.m = [torch.zeros_like(p) for p in self.params]
        self.v = [torch.zeros_like(p) for p in self.params]

    def set_lr(self, lr: float) -> None:
        self.lr.fill_(lr)

    def current_lr(self) -> Tensor:
        """The learning rate of the next update (the warm-up applied), a device tensor."""
        if not self.warmup:
            return self.lr
        return self.lr * torch.clamp(self.count / self.warmup, max=1.0)

    def step(self, loss: Tensor, reduce=None) -> Tensor:
        """Gradients of `loss`, clipping, update. Returns the gradient norm before clipping, as
        a device tensor. `reduce`: see step_together."""
        return step_together(loss, [self], reduce)[0]

    def _apply(self, grads: list[Tensor]) -> Tensor:
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
        if self.agc > 0:
            torch._foreach_mul_(grads, list(agc_factors(self.params, grads, self.agc).unbind()))
        scale = None
        if self.clip > 0:
            # The global-norm clip as a divisor: > 1 exactly when the norm exceeds the clip.
            clipped = norm
            if self.agc > 0:
                clipped = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
            scale = torch.clamp((clipped + 1e-6) / self.clip, min=1.0)
        lr = self.current_lr()
        self.count.add_(1)
        b1, b2 = self.betas
        if self.kind == "adam":
            torch._fused_adam_(
                self.params, grads, self.m, self.v, [], [self.count] * len(self.params),
                lr=lr, beta1=b1, beta2=b2, weight_decay=self.weight_decay, eps=self.eps,
                amsgrad=False, maximize=False, grad_scale=scale, found_inf=None,
            )  # fmt: skip
        else:
            if scale is not None:
                grads = torch._foreach_div(grads, scale)
            self._laprop(grads, lr)
        return norm

    def _laprop(self, grads: list[Tensor], lr: Tensor) -> None:
        b1, b2 = self.betas
        torch._foreach_mul_(self.v, b2)
        torch._foreach_addcmul_(self.v, grads, grads, value=1 - b2)
        denom = torch._foreach_div(self.v, 1 - b2**self.count)
        torch._foreach_sqrt_(denom)
        torch._foreach_add_(denom, self.eps)
        torch._foreach_mul_(self.m, b1)
        torch._foreach_add_(self.m, torch._foreach_div(grads, denom), alpha=1 - b1)
        update = torch._foreach_div(self.m, 1 - b1**self.count)
        if self.weight_decay:
            torch._foreach_add_(update, self.params, alpha=self.weight_decay)
        torch._foreach_mul_(update, -lr)
        torch._foreach_add_(self.params, update)

    def state_dict(self) -> dict:
        return {"count": self.count, "m": self.m, "v": self.v}

    def load_state_dict(self, state: dict) -> None:
        if len(state["m"]) != len(self.m) or any(
            a.shape != b.shape for a, b in zip(state["m"], self.m)
        ):
            raise ValueError("optimizer state does not match the parameters")
        self.count.copy_(state["count"])
        for dst, src in zip(self.m + self.v, state["m"] + state["v"]):
            dst.copy_(src)


def agc_factors(params: list[Tensor], grads: list[Tensor], agc: float) -> Tensor:
    """Per tensor, the factor AGC scales its gradient by: min(1, agc x max(1e-3, |p|) / |g|)."""
    gnorm = torch.stack(torch._foreach_norm(grads))
    pnorm = torch.stack(torch._foreach_norm([p.detach() for p in params]))
    upper = agc * torch.clamp(pnorm, min=AGC_PMIN)
    return 1.0 / torch.clamp(gnorm / upper, min=1.0)


def step_together(loss: Tensor, optimizers: list[Optimizer], reduce=None) -> list[Tensor]:
    """One backward pass for several optimizers whose parameter sets do not interact in `loss`
    (actor + critic). Needed on the compiled path: one compiled graph computing both losses has
    one backward, which a second autograd.grad call could not run again. `reduce` (data-parallel
    training: engine.distributed's gradient average over ranks) maps the list of gradients to
    the list the optimizers apply, before any norm or clip is taken. Returns the norms."""
    params = [p for opt in optimizers for p in opt.params]
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    # The fused kernel walks parameters and gradients as flat memory: a gradient whose strides
    # differ from its parameter's (inductor returns conv-transpose weight gradients in
    # channels-last order) would be applied to the wrong elements.
    grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]
    grads = [
        g if g.stride() == p.stride() else torch.empty_like(p).copy_(g)
        for p, g in zip(params, grads)
    ]
    if reduce is not None:
        grads = reduce(grads)
    norms, i = [], 0
    with torch.no_grad():
        for opt in optimizers:
            n = len(opt.params)
            norms.append(opt._apply(grads[i : i + n]))
            i += n
    return norms


def _member_values(value, k: int, device: torch.device, name: str) -> Tensor:
    """A float (every member the same) or one value per member, as a (K,) fp32 tensor."""
    t = torch.as_tensor(value, dtype=torch.float32).flatten()
    if t.numel() == 1:
        t = t.expand(k)
    if t.numel() != k:
        raise ValueError(f"{name}: {t.numel()} values for a population of {k}")
    return t.clone().to(device)


def _per_member(x: Tensor, like: Tensor) -> Tensor:
    """(K,) -> (K, 1, ..., 1), to broadcast over one member's slice of a stacked tensor."""
    return x.view(-1, *([1] * (like.dim() - 1)))


def _moments(kind: str | Tensor, p, g, m, v, b1, b2, eps, wd, bc1, bc2):
    """One stacked tensor's new moments and step direction (before the learning rate): torch's
    Adam with L2 decay, or LaProp, its per-member values broadcast. `kind` a bool tensor
    (members differing in it; True: LaProp) takes each member's kind by selecting the factors
    that differ (multiplying by 1 or adding 0 where they do not apply: exact), one pass for
    both kinds."""
    if isinstance(kind, Tensor):
        lap = kind.to(p.dtype)  # 1 LaProp, 0 Adam: x * 1, x * 0 + 1 and x + 0 are exact
        g = g + (1 - lap) * wd * p  # Adam's L2 decay, into the gradient
        v_new = b2 * v + (1 - b2) * g * g
        rms = torch.sqrt(v_new / bc2) + eps
        m_new = b1 * m + (1 - b1) * g / (lap * rms + (1 - lap))  # LaProp normalises first
        step = m_new / bc1 / ((1 - lap) * rms + lap) + lap * wd * p
        return m_new, v_new, step
    if kind == "adam":
        g = g + wd * p  # L2 decay, into the gradient as torch's Adam adds it
    v_new = b2 * v + (1 - b2) * g * g
    rms = torch.sqrt(v_new / bc2) + eps
    if kind == "adam":  # momentum of the gradient, then divided by the RMS
        m_new = b1 * m + (1 - b1) * g
        return m_new, v_new, m_new / bc1 / rms
    # LaProp: momentum of the RMS-normalised gradient, decoupled decay
    m_new = b1 * m + (1 - b1) * g / rms
    return m_new, v_new, m_new / bc1 + wd * p


def member_norms(tensors: list[Tensor]) -> Tensor:
    """(n_tensors, K): the norm of each tensor's member slice (all dims after the first)."""
    return torch.stack([torch.linalg.vector_norm(t.flatten(1), dim=1) for t in tensors])


class StackedOptimizer(Optimizer):
    """The Optimizer of a population: every parameter is stacked, (K, ...) with member k's
    tensor at index k, and every member is updated as a separate Optimizer would update its own
    tensors: its own learning rate, betas, eps, weight decay, AGC and global-norm clip ((K,)
    device tensors, set per member), its own step count, its gradient norm and clip over its own
    slices only, never across members. `active` (K,) masks members out: a frozen member's
    parameters, moments and step count do not change.

    Adam here runs as per-tensor passes with the per-member values broadcast (torch's fused
    Adam takes one learning rate per call); the math is torch's Adam with L2 weight decay, the
    LaProp the same as Optimizer's."""

    def __init__(
        self,
        params,
        members: int,
        lr,
        kind: str | list[str] = "adam",
        betas=(0.9, 0.999),
        eps=1e-8,
        weight_decay=0.0,
        clip=0.0,
        agc=0.0,
        warmup: int | list[int] = 0,
    ):
        kinds = [kind] if isinstance(kind, str) else list(kind)
        bad_kind = [k for k in kinds if k not in KINDS]
        if bad_kind:
            raise ValueError(f"optimizer kind must be one of {KINDS}, not {bad_kind[0]!r}")
        if members < 1:
            raise ValueError(f"a population needs at least 1 member, not {members}")
        self.params = [p for p in params if p.requires_grad]
        bad = [tuple(p.shape) for p in self.params if p.dim() < 1 or p.shape[0] != members]
        if bad:
            raise ValueError(f"stacked parameters need a leading dim of {members}: {bad[0]}")
        device = self.params[0].device
        k = self.members = members
        # Per member: LaProp (1) or Adam (0), and the warm-up length (0: none).
        self.laprop = _member_values([x == "laprop" for x in kinds], k, device, "kind")
        self.warmup = _member_values(warmup, k, device, "warmup")
        self.lr = _member_values(lr, k, device, "lr")
        self.b1 = _member_values(betas[0], k, device, "beta1")
        self.b2 = _member_values(betas[1], k, device, "beta2")
        self.eps = _member_values(eps, k, device, "eps")
        self.weight_decay = _member_values(weight_decay, k, device, "weight_decay")
        self.clip = _member_values(clip, k, device, "clip")
        self.agc = _member_values(agc, k, device, "agc")
        self._note_clips()
        self.active = torch.ones(k, device=device)
        self.count = torch.zeros(k, device=device)
        self.m = [torch.zeros_like(p) for p in self.params]
        self.v = [torch.zeros_like(p) for p in self.params]

    def set_lr(self, lr) -> None:
        """One learning rate for every member, or one per member."""
        self.set_member_values("lr", lr)

    def set_member_values(self, name: str, values) -> None:
        """Sets one of lr, b1, b2, eps, weight_decay, clip, agc, laprop (1 LaProp, 0 Adam) or
        warmup: a float for every member or one per member (population-based training perturbs
        them in place)."""
        if name not in ("lr", "b1", "b2", "eps", "weight_decay", "clip", "agc", "laprop", "warmup"):
            raise ValueError(f"no per-member optimizer setting {name!r}")
        t = getattr(self, name)
        t.copy_(_member_values(values, self.members, t.device, name))
        self._note_clips()

    def _note_clips(self) -> None:
        """Which clips, kinds and warm-ups any member uses, read here (a host sync, once per
        setting change) so the update has no branch on a tensor."""
        self.use_agc, self.use_clip = bool((self.agc > 0).any()), bool((self.clip > 0).any())
        lap = self.laprop > 0
        self.kinds = tuple(k for k, on in zip(KINDS, (bool((~lap).any()), bool(lap.any()))) if on)
        self.use_warmup = bool((self.warmup > 0).any())

    def current_lr(self) -> Tensor:
        """(K,) learning rates of the next update, each member's warm-up applied."""
        if not self.use_warmup:
            return self.lr
        ramp = torch.clamp(self.count / torch.clamp(self.warmup, min=1.0), max=1.0)
        return self.lr * torch.where(self.warmup > 0, ramp, torch.ones_like(ramp))

    # step is Optimizer's: with (K,) lr and count it is per member, and returns the (K,)
    # gradient norms before clipping.

    def compile(self) -> None:
        """Compiles the update (no fused kernel takes one learning rate per member: compiled,
        each step is a few fused loops instead of ~15 ATen ops per tensor), as two graphs (see
        _clip_factors)."""
        self._clip_factors = torch.compile(self._clip_factors, dynamic=False)
        self._update = torch.compile(self._update, dynamic=False)

    def _apply(self, grads: list[Tensor]) -> Tensor:
        norm, factors = self._clip_factors(grads)
        self._update(grads, factors)
        return norm

    def _clip_factors(self, grads: list[Tensor]) -> tuple[Tensor, Tensor | None]:
        """(K,) gradient norms before clipping, and each tensor's per-member factor (n, K) from
        AGC and the global-norm clip (None when no member clips). A population compiles this
        and `_update` as two graphs. The update as first written (clipped gradients divided by
        the clip, all in one graph) made inductor (torch 2.13, CPU) fail to generate code for
        some tensor sets ("KeyError: 'buf95'": the d64 critic's 11 tensors, Adam or LaProp,
        any member clipping, K = 4 or 9; tests/test_optim_stacked.py). Two graphs compiled for
        every optimizer of the LunarLander ablation population; the factors form alone passes
        the test in one graph too, but was not tried on the other sets."""
        gn = member_norms(grads)  # (n, K)
        norm = gn.square().sum(0).sqrt()
        factors = None
        if self.use_agc:
            pn = member_norms([p.detach() for p in self.params])
            factor = 1.0 / torch.clamp(gn / (self.agc * torch.clamp(pn, min=AGC_PMIN)), min=1.0)
            factors = torch.where(self.agc > 0, factor, torch.ones_like(factor))
        if self.use_clip:
            # The norm after AGC, from the norms before it (the factor is one per tensor).
            clipped = norm if factors is None else (gn * factors).square().sum(0).sqrt()
            scale = torch.clamp((clipped + 1e-6) / self.clip, min=1.0)
            scale = torch.where(self.clip > 0, scale, torch.ones_like(scale))
            factors = (torch.ones_like(gn) if factors is None else factors) / scale
        return norm, factors

    def _update(self, grads: list[Tensor], factors: Tensor | None) -> None:
        """The moments and parameters of every member, each gradient scaled by its factors."""
        lr = self.current_lr()
        on = self.active > 0
        self.count.add_(on.float())  # a frozen member keeps its step count
        # Bias corrections of this step; a frozen member (count possibly 0) gets a harmless 1.
        c = torch.clamp(self.count, min=1.0)
        bc1, bc2 = 1 - self.b1**c, 1 - self.b2**c
        for i, (p, g, m, v) in enumerate(zip(self.params, grads, self.m, self.v)):
            if factors is not None:
                g = g * _per_member(factors[i], g)
            hyper = [_per_member(x, p) for x in (self.b1, self.b2, self.eps, self.weight_decay)]
            hyper += [_per_member(bc1, p), _per_member(bc2, p)]
            kind = self.kinds[0] if len(self.kinds) == 1 else _per_member(self.laprop, p) > 0
            m_new, v_new, step = _moments(kind, p, g, m, v, *hyper)
            # Selected, not blended: a frozen member may have non-finite gradients (that is why
            # it was frozen), and 0 x NaN would still reach its weights.
            live = _per_member(on, p)
            m.copy_(torch.where(live, m_new, m))
            v.copy_(torch.where(live, v_new, v))
            p.copy_(torch.where(live, p - _per_member(lr, p) * step, p))

    def copy_member(self, src: Tensor, dst: Tensor) -> None:
        """Members `dst` (index tensor) take the step counts and moments of members `src`
        (population-based training's exploit; the parameters are copied by the caller)."""
        self.count.index_copy_(0, dst, self.count[src])
        for t in self.m + self.v:
            t.index_copy_(0, dst, t[src])

    def state_dict(self) -> dict:
        return {
            "count": self.count,
            "m": self.m,
            "v": self.v,
            "active": self.active,
            "members": self.members,
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("members") != self.members:
            raise ValueError(
                f"optimizer state is for {state.get('members')} members, not {self.members}"
            )
        super().load_state_dict(state)
        self.active.copy_(state["active"])
