"""Two-hot cross-entropy: DreamerV3's reward and critic loss, as one fused Triton kernel.

Two encodings (`space`, "symlog" by default everywhere):

- "symlog": bins uniform in symlog space (make_bins: linspace(-20, 20, K)); the target is the
  two-hot of symlog(y), interpolated in symlog space, and the prediction is
  symexp(sum(p * bins)). The expectation is exact in symlog space, so a stochastic target is
  fitted at symexp(E[symlog y]): a reward of -100 with probability 0.1 (else 0) is predicted as
  about -0.59, not -10.
- "real": official DreamerV3 (`symexp_twohot` in embodied/jax/heads.py, `TwoHot` in outs.py).
  Bins live in real space, symexp of a uniform symlog grid, mirrored so they are exactly
  antisymmetric (make_bins(space="real")); the target is the two-hot of y itself, interpolated
  by real-space distance, and the prediction sum(p * bins) is summed symmetrically so uniform
  probabilities give exactly 0. Its expectation is exact in real space: the -100 / 0 example
  is predicted as -10.

The loss floor (`twohot_floor`, the target's entropy) depends on where y falls between two
bins, so it differs between the spaces. The kernel takes the space as a compile-time flag.

The first half is the pure-PyTorch reference, THE definition used by the engine and checked
against by the kernel. The second half is the Triton implementation: a forward kernel that
computes per row the log-sum-exp, the two-hot target(s) and the loss, and a backward kernel that
recomputes softmax from the saved log-sum-exp and writes the logits gradient in one pass. Neither
ever materialises the (..., K) target or log-softmax tensors.

Host syncs: none. The launcher reads only tensor shapes; the bin geometry (first/last centre,
step; in real space their symlog) is read by the kernel from the `bins` tensor in device
memory, so the same code is capturable in a CUDA graph and bins never have to be mirrored as
Python floats.

Under Triton 3.9 the interpreter (TRITON_INTERPRET=1: CPU, fp32 only) is chosen each time a
`@triton.jit` decorator runs, which happens both at `import triton` (tl.max, tl.sum and the
rest of triton.language.standard are @jit functions) and at the import of this module. So the
variable must be set before Triton is first imported anywhere in the process; set later, the
kernels below are interpreted but the reductions they call refuse to run ("Cannot call
@triton.jit'd outside of the scope of a kernel").
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

try:
    import triton
    import triton.language as tl
    from triton.language.extra import libdevice

    HAS_TRITON = True
except ImportError:  # the reference half must stay importable where Triton is not installed
    from types import SimpleNamespace

    HAS_TRITON = False
    triton = SimpleNamespace(jit=lambda fn: fn)
    tl = SimpleNamespace(constexpr=int)


# --------------------------------------------------------------------------------------------
# Reference (pure PyTorch)
# --------------------------------------------------------------------------------------------


def symlog(x: Tensor) -> Tensor:
    return torch.sign(x) * torch.log1p(torch.abs(x))


def symexp(x: Tensor) -> Tensor:
    return torch.sign(x) * torch.expm1(torch.abs(x))


Space = Literal["symlog", "real"] | Tensor  # a tensor: per-member flag, True for real
SPACES = ("symlog", "real")


def _check_space(space: str | Tensor) -> bool | Tensor:
    """True for the real space; ValueError (naming it) for anything but 'symlog' or 'real'.
    A bool tensor (True: real) is returned as it is: a population whose members differ in the
    space holds it per member, and the reference computes both encodings and selects."""
    if isinstance(space, Tensor):
        return space
    if space not in SPACES:
        raise ValueError(f"space must be 'symlog' or 'real', not {space!r}")
    return space == "real"


def make_bins(
    num_bins: int = 255, limit: float = 20.0, device=None, space: Space = "symlog"
) -> Tensor:
    """Bin centres (fp32) of the two-hot encoding.

    "symlog": uniform in symlog space from -limit to +limit (linspace).
    "real": official DreamerV3 `symexp_twohot`, in real space: symexp of a uniform grid from
    -limit to 0, mirrored. Odd K: exactly antisymmetric with the centre exactly 0. Even K:
    the official concat([half, -half[::-1]]) keeps both 0 and -0 (two bins at zero).
    """
    if _check_space(space):
        n = (num_bins - 1) // 2 + 1 if num_bins % 2 else num_bins // 2
        half = symexp(torch.linspace(-limit, 0.0, n, device=device, dtype=torch.float32))
        upper = half[:-1] if num_bins % 2 else half
        return torch.cat([half, -upper.flip(0)])
    return torch.linspace(-limit, limit, num_bins, device=device)


def twohot(y: Tensor, bins: Tensor, space: Space = "symlog") -> Tensor:
    """Two-hot encoding of y over `bins`: (...,) -> (..., K), in bins' dtype.

    "symlog": of x = symlog(y), interpolated in symlog space (so sum(target * bins) = symlog(y)).
    "real": of x = y over real-space bins (make_bins(space="real")), interpolated by real
    distance (so sum(target * bins) = y), as the official `TwoHot` loss.
    Mass 1 - w on the last bin <= x and w on the next one; x beyond the outer bins puts all mass
    on the outer bin. A NaN target gives NaN weights.
    """
    x = y.to(bins.dtype)
    real = _check_space(space)
    if isinstance(real, Tensor):
        x = torch.where(real, x, symlog(x))
    elif not real:
        x = symlog(x)
    x = x.clamp(bins[0], bins[-1])
    k = bins.numel()
    below = (torch.bucketize(x, bins, right=True) - 1).clamp(0, k - 2)  # bins[below] <= x
    lo, hi = bins[below], bins[below + 1]
    w_hi = ((x - lo) / (hi - lo)).clamp(0, 1)
    # By comparison with the bin indices, not by scattering into a zeros buffer: the same values
    # (each entry is one weight plus exact zeros), and under torch.func.vmap (a population's
    # members) every op has a batching rule, where in-place scatters ran vmap's per-member loop.
    idx = torch.arange(k, device=x.device)
    below = below.unsqueeze(-1)
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    out = torch.where(idx == below, (1 - w_hi).unsqueeze(-1), zero)
    out = out + torch.where(idx == below + 1, w_hi.unsqueeze(-1), zero)
    return out


def _fp32(logits: Tensor) -> Tensor:
    # bf16/fp16 softmax over 255 bins loses ~2 significant digits; fp64 stays fp64 so gradcheck
    # can use the functions below.
    return logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits


def _log_softmax_fp32(logits: Tensor) -> Tensor:
    return F.log_softmax(_fp32(logits), -1)


def twohot_mean(logits: Tensor, bins: Tensor, space: Space = "symlog") -> Tensor:
    """The prediction in real space: (..., K) logits -> (...), softmax in fp32 (or fp64).

    "symlog": symexp of the softmax-weighted bin average (what engine/dists.py computed).
    "real": the softmax-weighted average of the real bins, summed symmetrically like the
    official `TwoHot.pred`: bin i is added to its mirror K-1-i before the sum, so uniform
    probabilities over antisymmetric bins predict exactly 0 (a left-to-right sum would not).
    """
    real = _check_space(space)
    pb = F.softmax(_fp32(logits), -1) * bins
    if isinstance(real, Tensor):
        return torch.where(real, _symmetric_sum(pb), symexp(pb.sum(-1)))
    if not real:
        return symexp(pb.sum(-1))
    return _symmetric_sum(pb)


def _symmetric_sum(pb: Tensor) -> Tensor:
    """sum(pb, -1) with bin i added to its mirror K-1-i first."""
    k = pb.shape[-1]
    m = k // 2
    if k % 2:
        return pb[..., m] + (pb[..., :m].flip(-1) + pb[..., m + 1 :]).sum(-1)
    return (pb[..., :m].flip(-1) + pb[..., m:]).sum(-1)


def twohot_loss_reference(
    logits: Tensor,
    y: Tensor,
    bins: Tensor,
    y2: Tensor | None = None,
    coef2: float = 0.0,
    space: Space = "symlog",
) -> Tensor:
    """Cross-entropy of two-hot target(s) under softmax(logits): (..., K), (...) -> (...).

    With y2: CE(twohot(y)) + coef2 * CE(twohot(y2)) over the same logits (the critic's return
    target plus its slow-critic regulariser); coef2 is ignored without y2. Targets are detached.
    Half-precision logits are upcast, so the loss is fp32 like the kernel's. `space` picks the
    encoding (see `twohot`); `bins` must be that space's make_bins.
    """
    _check_space(space)
    logp = _log_softmax_fp32(logits)
    loss = -(twohot(y.detach(), bins, space) * logp).sum(-1)
    if y2 is not None:
        loss = loss - coef2 * (twohot(y2.detach(), bins, space) * logp).sum(-1)
    return loss


def twohot_floor(y: Tensor, bins: Tensor, space: Space = "symlog") -> Tensor:
    """Entropy of the two-hot target: the lowest cross-entropy any prediction can reach (<= ln 2).

    The reward loss 'plateau' near 0.6 is this floor; report the excess over it. It depends on
    where y falls between two bins, so it differs between the spaces.
    """
    target = twohot(y.detach(), bins, space)
    return -(target * torch.log(target.clamp_min(1e-12))).sum(-1)


# --------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------


@triton.jit
def _symlog(y, USE_LIBDEVICE: tl.constexpr):
    a = tl.abs(y)
    if USE_LIBDEVICE:
        # The same __nv_log1pf that torch.log1p runs on CUDA: x, hence the bin and w, match the
        # reference bit for bit instead of to an ulp of x (ulp(20) / step = 1.2e-5 in w).
        mag = libdevice.log1p(a)
    else:
        # The interpreter has no libdevice. log(u) * a / (u - 1) with u = 1 + a cancels the
        # rounding of 1 + a (Goldberg): within 2 ulps of torch.log1p, against ~1e-7 absolute
        # for a plain log(1 + a). Only used below 1, so an inf target never makes inf / inf.
        s = tl.where(a < 1.0, a, 0.0)
        u = 1.0 + s
        small = tl.where(u == 1.0, s, tl.log(u) * (s / tl.where(u == 1.0, 1.0, u - 1.0)))
        mag = tl.where(a < 1.0, small, tl.log(1.0 + a))
    return tl.where(y < 0.0, -mag, mag)


@triton.jit
def _clamp_nan(x, lo, hi):
    # PTX min/max return the non-NaN operand: without propagate_nan a NaN reward would become a
    # finite loss on a real bin on GPUs (NaN under the interpreter and in the reference).
    x = tl.maximum(x, lo, propagate_nan=tl.PropagateNan.ALL)
    return tl.minimum(x, hi, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _twohot_target(y, bins_ptr, n_bins, cols, REAL: tl.constexpr, USE_LIBDEVICE: tl.constexpr):
    """(ROWS,) targets -> (ROWS, BLOCK_K) weights; equals `twohot` for make_bins' bins.

    x is the coordinate the bins are in (symlog(y), or y itself in real space). The bin is found
    arithmetically on the uniform symlog grid: the symlog bins are that grid, the real bins are
    symexp of it, so first/step are symlog(bins[0]) and the symlog step either way.
    """
    first = tl.load(bins_ptr)
    last = tl.load(bins_ptr + n_bins - 1)
    if REAL:
        x = _clamp_nan(y, first, last)
        first_s = _symlog(first, USE_LIBDEVICE)
        step_s = (_symlog(last, USE_LIBDEVICE) - first_s) / (n_bins - 1)
        pos = (_symlog(x, USE_LIBDEVICE) - first_s) / step_s
    else:
        x = _clamp_nan(_symlog(y, USE_LIBDEVICE), first, last)
        step = (last - first) / (n_bins - 1)
        pos = (x - first) / step
    below = tl.floor(pos).to(tl.int32)
    # Clamp after the int cast: a NaN target casts to an arbitrary int, and must not index
    # outside the bins.
    below = tl.minimum(tl.maximum(below, 0), n_bins - 2)
    # The arithmetic position can be an ulp off at a bin centre (linspace's centres are not
    # exactly first + i * step, and real bins are symexp of them, rounded); one step against
    # the actual centres, in x's space, reproduces bucketize. It is never more than one step
    # off: even K's real bins repeat 0 (0 and -0), which makes the symlog grid's two halves
    # each a little coarser than the step assumed here, but by at most half a step.
    lo = tl.load(bins_ptr + below)
    below = tl.where((x < lo) & (below > 0), below - 1, below)
    hi = tl.load(bins_ptr + below + 1)
    below = tl.where((x >= hi) & (below < n_bins - 2), below + 1, below)
    lo = tl.load(bins_ptr + below)
    hi = tl.load(bins_ptr + below + 1)
    # div_rn: Triton's `/` is div.full.f32 on NVIDIA (2 ulps); IEEE division keeps w exactly
    # the reference's (in real space x, lo and hi are the reference's too, so w is bit-exact
    # wherever the bin is).
    w = _clamp_nan(tl.div_rn(x - lo, hi - lo), 0.0, 1.0)
    c = cols[None, :]
    b = below[:, None]
    return tl.where(c == b, 1.0 - w[:, None], 0.0) + tl.where(c == b + 1, w[:, None], 0.0)


@triton.jit
def _mixed_target(
    y_ptr,
    y2_ptr,
    rows,
    row_ok,
    bins_ptr,
    n_bins,
    cols,
    coef2,
    HAS_Y2: tl.constexpr,
    REAL: tl.constexpr,
    USE_LIBDEVICE: tl.constexpr,
):
    y = tl.load(y_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    target = _twohot_target(y, bins_ptr, n_bins, cols, REAL, USE_LIBDEVICE)
    if HAS_Y2:
        y2 = tl.load(y2_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
        target += coef2 * _twohot_target(y2, bins_ptr, n_bins, cols, REAL, USE_LIBDEVICE)
    return target


@triton.jit
def _twohot_fwd_kernel(
    logits_ptr,
    y_ptr,
    y2_ptr,
    bins_ptr,
    loss_ptr,
    lse_ptr,
    n_rows,
    n_bins,
    coef2,
    HAS_Y2: tl.constexpr,
    REAL: tl.constexpr,
    USE_LIBDEVICE: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = tl.arange(0, BLOCK_K)
    row_ok = rows < n_rows
    mask = row_ok[:, None] & (cols[None, :] < n_bins)
    offs = rows[:, None].to(tl.int64) * n_bins + cols[None, :]
    z = tl.load(logits_ptr + offs, mask=mask, other=float("-inf")).to(tl.float32)
    # Padding rows are all -inf: pin their max and sum so they stay finite (no nan, no warnings).
    m = tl.where(row_ok, tl.max(z, axis=1), 0.0)
    s = tl.sum(tl.exp(z - m[:, None]), axis=1)
    lse = m + tl.log(tl.where(row_ok, s, 1.0))
    target = _mixed_target(
        y_ptr, y2_ptr, rows, row_ok, bins_ptr, n_bins, cols, coef2, HAS_Y2, REAL, USE_LIBDEVICE
    )
    # where(), not z * target: 0 * -inf in the padding columns would be nan.
    zt = tl.sum(tl.where(mask, z, 0.0) * target, axis=1)
    loss = (1.0 + coef2) * lse - zt
    tl.store(loss_ptr + rows, loss, mask=row_ok)
    tl.store(lse_ptr + rows, lse, mask=row_ok)


@triton.jit
def _twohot_bwd_kernel(
    grad_logits_ptr,
    grad_loss_ptr,
    grad_loss_stride,
    logits_ptr,
    y_ptr,
    y2_ptr,
    bins_ptr,
    lse_ptr,
    n_rows,
    n_bins,
    coef2,
    HAS_Y2: tl.constexpr,
    REAL: tl.constexpr,
    USE_LIBDEVICE: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = tl.arange(0, BLOCK_K)
    row_ok = rows < n_rows
    mask = row_ok[:, None] & (cols[None, :] < n_bins)
    offs = rows[:, None].to(tl.int64) * n_bins + cols[None, :]
    z = tl.load(logits_ptr + offs, mask=mask, other=float("-inf")).to(tl.float32)
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    g = tl.load(grad_loss_ptr + rows * grad_loss_stride, mask=row_ok, other=0.0).to(tl.float32)
    p = tl.exp(z - lse[:, None])
    target = _mixed_target(
        y_ptr, y2_ptr, rows, row_ok, bins_ptr, n_bins, cols, coef2, HAS_Y2, REAL, USE_LIBDEVICE
    )
    grad = ((1.0 + coef2) * p - target) * g[:, None]
    tl.store(grad_logits_ptr + offs, grad.to(grad_logits_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------
# Launcher, autograd, public entry points
# --------------------------------------------------------------------------------------------

_TILE = 2048  # elements per program on a GPU: 8 rows of K=255, 16 fp32 registers a thread
# The interpreter runs programs one after another in Python at ~10 ms each, whatever their
# size: big tiles cut the test suite from about a minute to seconds.
_TILE_INTERPRETED = 1 << 16


def _interpreted() -> bool:
    return HAS_TRITON and not isinstance(_twohot_fwd_kernel, triton.runtime.JITFunction)


def _launch_config(n_rows: int, n_bins: int) -> tuple[tuple[int], dict]:
    block_k = triton.next_power_of_2(n_bins)
    if _interpreted():
        rows_cap = _TILE_INTERPRETED // block_k
    else:
        rows_cap = min(16, _TILE // block_k)
    block_rows = max(1, min(rows_cap, triton.next_power_of_2(n_rows)))
    grid = (triton.cdiv(n_rows, block_rows),)
    meta = dict(BLOCK_ROWS=block_rows, BLOCK_K=block_k, USE_LIBDEVICE=not _interpreted())
    return grid, dict(meta, num_warps=4 if block_k <= 1024 else 8)


def _check_inputs(logits: Tensor, y: Tensor, bins: Tensor, y2: Tensor | None, coef2) -> None:
    # Metadata only: nothing here may read device memory (CUDA-graph capture).
    if not HAS_TRITON:
        raise RuntimeError("twohot_loss_triton needs Triton; use impl='torch'")
    if not logits.is_cuda and not _interpreted():
        raise RuntimeError(
            "Triton on CPU tensors needs TRITON_INTERPRET=1 set before Triton is imported"
        )
    if isinstance(coef2, Tensor):
        raise TypeError("coef2 must be a Python float: a tensor would need a host sync")
    for name, t in (("y", y), ("bins", bins), ("y2", y2)):
        if t is not None and t.device != logits.device:
            raise ValueError(f"{name} is on {t.device}, logits on {logits.device}")
    k = logits.shape[-1]
    if bins.dim() != 1 or bins.numel() != k or k < 2:
        raise ValueError(f"bins {tuple(bins.shape)} do not match logits {tuple(logits.shape)}")
    for name, t in (("y", y), ("y2", y2)):
        if t is not None and t.shape != logits.shape[:-1]:
            raise ValueError(f"{name} {tuple(t.shape)} must be logits.shape[:-1]")


class TwoHotLossFunction(torch.autograd.Function):
    """Fused two-hot cross-entropy; saves only the per-row log-sum-exp (fp32) for backward."""

    @staticmethod
    def forward(
        ctx, logits: Tensor, y: Tensor, bins: Tensor, y2: Tensor | None, coef2: float, real: bool
    ):
        lead, k = logits.shape[:-1], logits.shape[-1]
        z = logits.reshape(-1, k).contiguous()
        y1 = y.detach().reshape(-1).to(torch.float32).contiguous()
        y2f = None if y2 is None else y2.detach().reshape(-1).to(torch.float32).contiguous()
        b = bins.detach().to(torch.float32).contiguous()
        coef2 = float(coef2) if y2 is not None else 0.0
        n = z.shape[0]
        loss = torch.empty(n, device=z.device, dtype=torch.float32)
        lse = torch.empty(n, device=z.device, dtype=torch.float32)
        if n > 0:
            grid, meta = _launch_config(n, k)
            has_y2 = y2f is not None
            _twohot_fwd_kernel[grid](
                z,
                y1,
                y2f if has_y2 else y1,
                b,
                loss,
                lse,
                n,
                k,
                coef2,
                HAS_Y2=has_y2,
                REAL=real,
                **meta,
            )
        ctx.save_for_backward(z, y1, y2f, b, lse)
        ctx.coef2, ctx.real, ctx.logits_shape = coef2, real, logits.shape
        return loss.view(lead)

    @staticmethod
    def backward(ctx, grad_loss: Tensor):
        z, y1, y2f, b, lse = ctx.saved_tensors
        n, k = z.shape
        grad = torch.empty_like(z)
        if n > 0:
            # reshape, not contiguous: the .mean()/.sum() upstream gradient is an expanded
            # scalar, which stays a stride-0 view instead of being materialised.
            g = grad_loss.reshape(-1)
            grid, meta = _launch_config(n, k)
            has_y2 = y2f is not None
            _twohot_bwd_kernel[grid](
                grad,
                g,
                g.stride(0),
                z,
                y1,
                y2f if has_y2 else y1,
                b,
                lse,
                n,
                k,
                ctx.coef2,
                HAS_Y2=has_y2,
                REAL=ctx.real,
                **meta,
            )
        return grad.view(ctx.logits_shape), None, None, None, None, None


def twohot_loss_triton(
    logits: Tensor,
    y: Tensor,
    bins: Tensor,
    y2: Tensor | None = None,
    coef2: float = 0.0,
    space: Space = "symlog",
) -> Tensor:
    """Triton twohot_loss_reference: (..., K) fp32/bf16 logits, (...) targets -> (...) fp32.

    `bins` must be make_bins(K, limit, space=space): uniform in symlog space, or symexp of such
    a grid in real space. The kernel reads their geometry on the device, so any K >= 2 and limit
    work without a host sync. The logits gradient has the logits' dtype.
    """
    real = _check_space(space)
    if isinstance(real, Tensor):
        raise ValueError("the Triton two-hot kernel takes the space as a name, not a tensor flag")
    _check_inputs(logits, y, bins, y2, coef2)
    return TwoHotLossFunction.apply(logits, y, bins, y2, coef2, real)


def twohot_loss(
    logits: Tensor,
    y: Tensor,
    bins: Tensor,
    y2: Tensor | None = None,
    coef2: float = 0.0,
    impl: Literal["torch", "triton"] = "torch",
    space: Space = "symlog",
) -> Tensor:
    """Two-hot cross-entropy, (..., K), (...) -> (...), by the chosen implementation, in the
    chosen space (see `twohot`)."""
    if impl == "torch":
        return twohot_loss_reference(logits, y, bins, y2, coef2, space)
    if impl == "triton":
        return twohot_loss_triton(logits, y, bins, y2, coef2, space)
    raise ValueError(f"impl must be 'torch' or 'triton', not {impl!r}")
