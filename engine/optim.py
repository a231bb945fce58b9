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
        kind: str = "adam",
        betas=(0.9, 0.999),
        eps=1e-8,
        weight_decay=0.0,
        clip=0.0,
        agc=0.0,
        warmup: int = 0,
    ):
        if kind not in KINDS:
            raise ValueError(f"optimizer kind must be one of {KINDS}, not {kind!r}")
        if members < 1:
            raise ValueError(f"a population needs at least 1 member, not {members}")
        self.params = [p for p in params if p.requires_grad]
        bad = [tuple(p.shape) for p in self.params if p.dim() < 1 or p.shape[0] != members]
        if bad:
            raise ValueError(f"stacked parameters need a leading dim of {members}: {bad[0]}")
        device = self.params[0].device
        k = self.members = members
        self.kind, self.warmup = kind, warmup
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
        """Sets one of lr, b1, b2, eps, weight_decay, clip, agc: a float for every member or
        one per member (population-based training perturbs them in place)."""
        if name not in ("lr", "b1", "b2", "eps", "weight_decay", "clip", "agc"):
            raise ValueError(f"no per-member optimizer setting {name!r}")
        t = getattr(self, name)
        t.copy_(_member_values(values, self.members, t.device, name))
        self._note_clips()

    def _note_clips(self) -> None:
        """Whether any member clips at all, read here (a host sync, once per setting change)
        so the update has no branch on a tensor."""
        self.use_agc, self.use_clip = bool((self.agc > 0).any()), bool((self.clip > 0).any())

    # current_lr and step are Optimizer's: with (K,) lr and count they are per member, and step
    # returns the (K,) gradient norms before clipping.

    def _apply(self, grads: list[Tensor]) -> Tensor:
        ps = self.params
        norm = member_norms(grads).square().sum(0).sqrt()  # (K,)
        if self.use_agc:
            gn = member_norms(grads)  # (n, K)
            pn = member_norms([p.detach() for p in ps])
            factor = 1.0 / torch.clamp(gn / (self.agc * torch.clamp(pn, min=AGC_PMIN)), min=1.0)
            factor = torch.where(self.agc > 0, factor, torch.ones_like(factor))
            grads = [g * _per_member(f, g) for g, f in zip(grads, factor.unbind())]
        if self.use_clip:
            clipped = member_norms(grads).square().sum(0).sqrt()
            scale = torch.clamp((clipped + 1e-6) / self.clip, min=1.0)
            scale = torch.where(self.clip > 0, scale, torch.ones_like(scale))
            grads = [g / _per_member(scale, g) for g in grads]
        lr = self.current_lr()
        on = self.active > 0
        self.count.add_(on.float())  # a frozen member keeps its step count
        # Bias corrections of this step; a frozen member (count possibly 0) gets a harmless 1.
        c = torch.clamp(self.count, min=1.0)
        bc1, bc2 = 1 - self.b1**c, 1 - self.b2**c
        for p, g, m, v in zip(ps, grads, self.m, self.v):
            b1, b2 = _per_member(self.b1, p), _per_member(self.b2, p)
            eps, wd = _per_member(self.eps, p), _per_member(self.weight_decay, p)
            if self.kind == "adam":
                g = g + wd * p  # L2 decay, into the gradient as torch's Adam adds it
            v_new = b2 * v + (1 - b2) * g * g
            rms = torch.sqrt(v_new / _per_member(bc2, p)) + eps
            if self.kind == "adam":  # momentum of the gradient, then divided by the RMS
                m_new = b1 * m + (1 - b1) * g
                step = m_new / _per_member(bc1, p) / rms
            else:  # LaProp: momentum of the RMS-normalised gradient, decoupled decay
                m_new = b1 * m + (1 - b1) * g / rms
                step = m_new / _per_member(bc1, p) + wd * p
            # Selected, not blended: a frozen member may have non-finite gradients (that is why
            # it was frozen), and 0 x NaN would still reach its weights.
            live = _per_member(on, p)
            m.copy_(torch.where(live, m_new, m))
            v.copy_(torch.where(live, v_new, v))
            p.copy_(torch.where(live, p - _per_member(lr, p) * step, p))
        return norm

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
