"""Fused block-diagonal GRU cell of the RSSM (the math of `engine.nets.BlockGRU` after its input
embeddings), as a PyTorch reference and as Triton forward/backward kernels.

    h   = blockmm(x, w_hid) + b_hid          x (N, G, I), w_hid (G, I, Hb)  -> (N, D)
    h   = silu(rmsnorm(h) * norm_w)          the norm spans all D = G * Hb features
    g   = blockmm(h, w_gru) + b_gru          w_gru (G, Hb, 3Hb): per block [reset|cand|update]
    r   = sigmoid(reset); c = tanh(r * cand); u = sigmoid(update - 1)
    new = u * c + (1 - u) * deter

Kernel plan (N rows, one program per tile; every reduction is deterministic, no atomics):

forward
    K1 `_fwd_hid_kernel`   (row tile, Hb tile, block): x @ w_hid + b_hid -> h_pre (fp32), plus
                           the tile's per-row sum of squares into a small partials buffer.
    K2 `_fwd_gru_kernel`   (row tile, Hb tile, block): prologue sums the partials to the row's
                           rstd and applies rmsnorm * norm_w + silu to each A tile as it is loaded;
                           the three gate tiles (reset, cand, update of the same Hb columns) are
                           accumulated side by side so the whole GRU update is the epilogue.
backward
    B1 `_bwd_gates_kernel` (D tile, row split): gate derivatives -> dgates (N, 3D), ddeter, and
                           column sums of dgates (db_gru partials).
    B2 `_bwd_hact_kernel`  (row tile, Hb tile, block): dgates @ w_gru^T, epilogue: silu' -> dy
                           and the tile's part of the row dot <dy * norm_w, h_norm>.
    B3 `_bwd_norm_kernel`  (D tile, row split): rmsnorm backward -> dh_pre, column sums for
                           d norm_w and d b_hid.
    B4 `_bwd_dx_kernel`    (row tile, I tile, block): dh_pre @ w_hid^T -> dx.
    B5 `_bwd_dw_kernel`    (A tile, B tile, block x row split): A^T @ B summed over rows, used for
                           d w_hid = x^T dh_pre and d w_gru = silu(rmsnorm(h_pre))^T dgates (the
                           activation is recomputed in the prologue instead of being saved).

The cross-block reductions that a tile cannot finish alone (the rms over D, the rmsnorm row dot)
go through (N, tiles) partial buffers that the next kernel sums: that keeps results bitwise
reproducible run to run, which atomics would not. Weight and bias gradients reduce over rows by a
row split (enough programs to fill the GPU when N is large and the weights small) writing
(splits, ...) fp32 partials; the final `.sum(0)` over a handful of splits is left to torch on
purpose: it is a tiny, bandwidth-trivial reduction and a dedicated kernel would add nothing.

Saved for backward: h_pre (N, D) and the gate pre-activations (N, 3D) in fp32, and rstd (N,).
Recomputing the gates in backward would cost a second GRU matmul (~1/5 of the op's FLOPs at
d256) to save 12 bytes (3 fp32 gates) per state element; on an H200 memory is the cheaper. The
post-norm activation is recomputed because it is one elementwise pass over an A tile that is
being loaded anyway.

Triton on CPU runs only in its interpreter. Triton 3.9 reads TRITON_INTERPRET inside every
`@triton.jit` decoration, and triton.language's own helpers (tl.zeros, tl.sum, ...) are
@jit functions decorated when `triton` is first imported; so the variable must be "1" before the
first `import triton` in the process (and hence before this module is imported). A process that
imported triton without it cannot switch: re-importing triton aborts in its nanobind extension.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # the reference path must keep working on machines without triton
    triton = None
    tl = None
    HAS_TRITON = False

__all__ = [
    "HAS_TRITON",
    "INTERPRETED",
    "BlockGRUFunction",
    "block_gru",
    "block_gru_reference",
    "block_gru_triton",
]


def block_gru_reference(
    x: Tensor,
    deter: Tensor,
    w_hid: Tensor,
    b_hid: Tensor,
    norm_w: Tensor,
    w_gru: Tensor,
    b_gru: Tensor,
    eps: float = 1e-4,
    taps: tuple[Tensor, Tensor] | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """The engine's `BlockGRU.forward` after the input embeddings, op for op.

    x: (..., G, I) per-block inputs; deter: (..., D). Returns the next deter, shape of `deter`.
    The op order copies `BlockLinear`, `RMSNorm` and `BlockGRU` so results match bitwise.

    `taps` (zero tensors (..., D) and (..., 3D), see `engine.nets.WeightGradTap`) are added to the
    two block matmuls' outputs, and the GRU matmul's input is returned beside the next deter:
    the caller then forms the weight gradients over a whole sequence at once.
    """
    lead = deter.shape[:-1]
    g = w_hid.shape[0]
    xb = x.reshape(-1, g, x.shape[-1]).transpose(0, 1)  # (G, N, I)
    h = torch.bmm(xb, w_hid).transpose(0, 1).reshape(*lead, -1) + b_hid
    if taps is not None:
        h = h + taps[0]
    ms = h.float().square().mean(-1, keepdim=True)
    h = F.silu((h * torch.rsqrt(ms + eps)).to(h.dtype) * norm_w.to(h.dtype))
    hb = h.reshape(-1, g, h.shape[-1] // g).transpose(0, 1)  # (G, N, Hb)
    gates = torch.bmm(hb, w_gru).transpose(0, 1).reshape(*lead, -1) + b_gru
    if taps is not None:
        gates = gates + taps[1]
    gates = gates.reshape(*lead, g, 3, -1)
    reset, cand, update = (gates[..., i, :].flatten(-2) for i in range(3))
    reset = torch.sigmoid(reset)
    cand = torch.tanh(reset * cand)
    update = torch.sigmoid(update - 1)
    new = update * cand + (1 - update) * deter
    return new if taps is None else (new, h)


if HAS_TRITON:

    @triton.jit
    def _tanh(x):
        # tl has no tanh; the sigmoid form saturates cleanly to +-1 for large |x| (no inf/inf).
        return 2.0 * tl.sigmoid(2.0 * x) - 1.0

    @triton.jit
    def _fwd_hid_kernel(
        x_ptr,
        w_ptr,
        b_ptr,
        h_ptr,
        ss_ptr,
        N,
        I,
        HB,
        D,
        G,
        NT,
        BM: tl.constexpr,
        BN: tl.constexpr,
        BK: tl.constexpr,
        DOT_BF16: tl.constexpr,
        PREC: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        g = tl.program_id(2)
        rows = pid_m * BM + tl.arange(0, BM)
        cols = pid_n * BN + tl.arange(0, BN)
        rmask = rows < N
        cmask = cols < HB
        rows64 = rows.to(tl.int64)  # N * G * I can pass 2**31 at imagination sizes
        x_row = x_ptr + rows64[:, None] * (G * I) + g * I
        w_blk = w_ptr + g.to(tl.int64) * I * HB
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k0 in range(0, I, BK):
            ks = k0 + tl.arange(0, BK)
            kmask = ks < I
            a = tl.load(x_row + ks[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
            b = tl.load(
                w_blk + ks[:, None] * HB + cols[None, :],
                mask=kmask[:, None] & cmask[None, :],
                other=0.0,
            )
            if DOT_BF16:
                acc += tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16))
            else:
                acc += tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision=PREC)
        bias = tl.load(b_ptr + g * HB + cols, mask=cmask, other=0.0).to(tl.float32)
        h = acc + bias[None, :]  # padded columns stay exactly 0 (masked weights and bias)
        tl.store(
            h_ptr + rows64[:, None] * D + g * HB + cols[None, :],
            h,
            mask=rmask[:, None] & cmask[None, :],
        )
        # The rms spans all G blocks, which no single program sees: hand the next kernel this
        # tile's share instead of a separate pass over h_pre.
        tl.store(ss_ptr + rows64 * (G * NT) + g * NT + pid_n, tl.sum(h * h, axis=1), mask=rmask)

    @triton.jit
    def _fwd_gru_kernel(
        h_ptr,
        ss_ptr,
        nw_ptr,
        w_ptr,
        b_ptr,
        deter_ptr,
        out_ptr,
        gates_ptr,
        rstd_ptr,
        N,
        HB,
        D,
        G,
        P,
        eps,
        BM: tl.constexpr,
        BN: tl.constexpr,
        BK: tl.constexpr,
        BP: tl.constexpr,
        DOT_BF16: tl.constexpr,
        PREC: tl.constexpr,
        SAVE: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        g = tl.program_id(2)
        rows = pid_m * BM + tl.arange(0, BM)
        rmask = rows < N
        rows64 = rows.to(tl.int64)
        ps = tl.arange(0, BP)
        ss = tl.load(
            ss_ptr + rows64[:, None] * P + ps[None, :],
            mask=rmask[:, None] & (ps < P)[None, :],
            other=0.0,
        )
        rstd = tl.rsqrt(tl.sum(ss, axis=1) / D + eps)
        if SAVE:
            # One program column owns the rstd store; the others computed the same values.
            if pid_n + g == 0:
                tl.store(rstd_ptr + rows64, rstd, mask=rmask)

        cols = pid_n * BN + tl.arange(0, BN)
        cmask = cols < HB
        h_row = h_ptr + rows64[:, None] * D + g * HB
        w_blk = w_ptr + g.to(tl.int64) * HB * (3 * HB)
        acc_r = tl.zeros((BM, BN), dtype=tl.float32)
        acc_c = tl.zeros((BM, BN), dtype=tl.float32)
        acc_u = tl.zeros((BM, BN), dtype=tl.float32)
        for k0 in range(0, HB, BK):
            ks = k0 + tl.arange(0, BK)
            kmask = ks < HB
            hp = tl.load(h_row + ks[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
            nw = tl.load(nw_ptr + g * HB + ks, mask=kmask, other=0.0).to(tl.float32)
            y = hp * rstd[:, None] * nw[None, :]
            a = y * tl.sigmoid(y)  # silu(0) = 0 keeps the padded K entries inert
            wmask = kmask[:, None] & cmask[None, :]
            w_tile = w_blk + ks[:, None] * (3 * HB) + cols[None, :]
            wr = tl.load(w_tile, mask=wmask, other=0.0)
            wc = tl.load(w_tile + HB, mask=wmask, other=0.0)
            wu = tl.load(w_tile + 2 * HB, mask=wmask, other=0.0)
            if DOT_BF16:
                a16 = a.to(tl.bfloat16)
                acc_r += tl.dot(a16, wr.to(tl.bfloat16))
                acc_c += tl.dot(a16, wc.to(tl.bfloat16))
                acc_u += tl.dot(a16, wu.to(tl.bfloat16))
            else:
                acc_r += tl.dot(a, wr.to(tl.float32), input_precision=PREC)
                acc_c += tl.dot(a, wc.to(tl.float32), input_precision=PREC)
                acc_u += tl.dot(a, wu.to(tl.float32), input_precision=PREC)

        b_blk = b_ptr + g * (3 * HB) + cols
        pre_r = acc_r + tl.load(b_blk, mask=cmask, other=0.0).to(tl.float32)[None, :]
        pre_c = acc_c + tl.load(b_blk + HB, mask=cmask, other=0.0).to(tl.float32)[None, :]
        pre_u = acc_u + tl.load(b_blk + 2 * HB, mask=cmask, other=0.0).to(tl.float32)[None, :]
        mask = rmask[:, None] & cmask[None, :]
        if SAVE:
            g_tile = gates_ptr + rows64[:, None] * (3 * D) + g * (3 * HB) + cols[None, :]
            tl.store(g_tile, pre_r, mask=mask)
            tl.store(g_tile + HB, pre_c, mask=mask)
            tl.store(g_tile + 2 * HB, pre_u, mask=mask)
        r = tl.sigmoid(pre_r)
        c = _tanh(r * pre_c)
        u = tl.sigmoid(pre_u - 1.0)
        d_off = rows64[:, None] * D + g * HB + cols[None, :]
        d = tl.load(deter_ptr + d_off, mask=mask, other=0.0).to(tl.float32)
        new = u * c + (1.0 - u) * d
        tl.store(out_ptr + d_off, new.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _bwd_gates_kernel(
        gates_ptr,
        deter_ptr,
        dnew_ptr,
        dgates_ptr,
        ddeter_ptr,
        dbias_ptr,
        N,
        HB,
        D,
        RPS,
        BR: tl.constexpr,
        BD: tl.constexpr,
    ):
        pid_c = tl.program_id(0)
        pid_s = tl.program_id(1)
        cols = pid_c * BD + tl.arange(0, BD)
        cmask = cols < D
        # deter column -> (block, column in block) -> the three gate columns of that block.
        gcol = (cols // HB) * (3 * HB) + cols % HB
        db_r = tl.zeros((BD,), dtype=tl.float32)
        db_c = tl.zeros((BD,), dtype=tl.float32)
        db_u = tl.zeros((BD,), dtype=tl.float32)
        row0 = pid_s * RPS
        for r0 in range(row0, row0 + RPS, BR):
            rows = r0 + tl.arange(0, BR)
            rows64 = rows.to(tl.int64)
            mask = (rows < N)[:, None] & cmask[None, :]
            g_tile = gates_ptr + rows64[:, None] * (3 * D) + gcol[None, :]
            pre_r = tl.load(g_tile, mask=mask, other=0.0)
            pre_c = tl.load(g_tile + HB, mask=mask, other=0.0)
            pre_u = tl.load(g_tile + 2 * HB, mask=mask, other=0.0)
            d_off = rows64[:, None] * D + cols[None, :]
            d = tl.load(deter_ptr + d_off, mask=mask, other=0.0).to(tl.float32)
            dn = tl.load(dnew_ptr + d_off, mask=mask, other=0.0).to(tl.float32)
            r = tl.sigmoid(pre_r)
            c = _tanh(r * pre_c)
            u = tl.sigmoid(pre_u - 1.0)
            dt = dn * u * (1.0 - c * c)  # through tanh(r * cand)
            d_r = dt * pre_c * r * (1.0 - r)
            d_c = dt * r
            d_u = dn * (c - d) * u * (1.0 - u)
            dg_tile = dgates_ptr + rows64[:, None] * (3 * D) + gcol[None, :]
            tl.store(dg_tile, d_r, mask=mask)
            tl.store(dg_tile + HB, d_c, mask=mask)
            tl.store(dg_tile + 2 * HB, d_u, mask=mask)
            tl.store(
                ddeter_ptr + d_off, (dn * (1.0 - u)).to(ddeter_ptr.dtype.element_ty), mask=mask
            )
            # Padded rows loaded dn = 0, so they add exact zeros to the bias sums.
            db_r += tl.sum(d_r, axis=0)
            db_c += tl.sum(d_c, axis=0)
            db_u += tl.sum(d_u, axis=0)
        db_row = dbias_ptr + pid_s * (3 * D) + gcol
        tl.store(db_row, db_r, mask=cmask)
        tl.store(db_row + HB, db_c, mask=cmask)
        tl.store(db_row + 2 * HB, db_u, mask=cmask)

    @triton.jit
    def _bwd_hact_kernel(
        dgates_ptr,
        w_ptr,
        h_ptr,
        rstd_ptr,
        nw_ptr,
        dy_ptr,
        dot_ptr,
        N,
        HB,
        D,
        G,
        NT,
        BM: tl.constexpr,
        BN: tl.constexpr,
        BK: tl.constexpr,
        DOT_BF16: tl.constexpr,
        PREC: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        g = tl.program_id(2)
        rows = pid_m * BM + tl.arange(0, BM)
        cols = pid_n * BN + tl.arange(0, BN)  # columns of h inside block g
        rmask = rows < N
        cmask = cols < HB
        rows64 = rows.to(tl.int64)
        dg_row = dgates_ptr + rows64[:, None] * (3 * D) + g * (3 * HB)
        w_blk = w_ptr + g.to(tl.int64) * HB * (3 * HB)
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        # The three gates are contiguous within a block, so one K loop over 3*Hb covers them all.
        for k0 in range(0, 3 * HB, BK):
            ks = k0 + tl.arange(0, BK)
            kmask = ks < 3 * HB
            a = tl.load(dg_row + ks[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
            b = tl.load(  # w_gru[g, cols, ks] read as its transpose (K, BN)
                w_blk + cols[None, :] * (3 * HB) + ks[:, None],
                mask=kmask[:, None] & cmask[None, :],
                other=0.0,
            )
            if DOT_BF16:
                acc += tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16))
            else:
                acc += tl.dot(a, b.to(tl.float32), input_precision=PREC)
        mask = rmask[:, None] & cmask[None, :]
        h_off = rows64[:, None] * D + g * HB + cols[None, :]
        hp = tl.load(h_ptr + h_off, mask=mask, other=0.0)
        rstd = tl.load(rstd_ptr + rows64, mask=rmask, other=0.0)
        nw = tl.load(nw_ptr + g * HB + cols, mask=cmask, other=0.0).to(tl.float32)
        hn = hp * rstd[:, None]
        y = hn * nw[None, :]
        s = tl.sigmoid(y)
        dy = acc * s * (1.0 + y * (1.0 - s))  # silu'(y)
        tl.store(dy_ptr + h_off, dy, mask=mask)
        # rmsnorm backward needs <d(h_norm), h_norm> over all D: store this tile's share.
        part = tl.sum(dy * nw[None, :] * hn, axis=1)
        tl.store(dot_ptr + rows64 * (G * NT) + g * NT + pid_n, part, mask=rmask)

    @triton.jit
    def _bwd_norm_kernel(
        h_ptr,
        rstd_ptr,
        nw_ptr,
        dy_ptr,
        dot_ptr,
        dh_ptr,
        dnw_ptr,
        db_ptr,
        N,
        D,
        P,
        RPS,
        BR: tl.constexpr,
        BD: tl.constexpr,
        BP: tl.constexpr,
    ):
        pid_c = tl.program_id(0)
        pid_s = tl.program_id(1)
        cols = pid_c * BD + tl.arange(0, BD)
        cmask = cols < D
        ps = tl.arange(0, BP)
        nw = tl.load(nw_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
        dnw = tl.zeros((BD,), dtype=tl.float32)
        db = tl.zeros((BD,), dtype=tl.float32)
        row0 = pid_s * RPS
        for r0 in range(row0, row0 + RPS, BR):
            rows = r0 + tl.arange(0, BR)
            rmask = rows < N
            rows64 = rows.to(tl.int64)
            mask = rmask[:, None] & cmask[None, :]
            off = rows64[:, None] * D + cols[None, :]
            hp = tl.load(h_ptr + off, mask=mask, other=0.0)
            dy = tl.load(dy_ptr + off, mask=mask, other=0.0)
            rstd = tl.load(rstd_ptr + rows64, mask=rmask, other=0.0)
            dots = tl.load(
                dot_ptr + rows64[:, None] * P + ps[None, :],
                mask=rmask[:, None] & (ps < P)[None, :],
                other=0.0,
            )
            dot = tl.sum(dots, axis=1)
            hn = hp * rstd[:, None]
            # d h = rstd * (d hn - hn * <d hn, hn> / D), d hn = dy * norm_w
            dh = rstd[:, None] * (dy * nw[None, :] - hn * (dot / D)[:, None])
            tl.store(dh_ptr + off, dh, mask=mask)
            dnw += tl.sum(dy * hn, axis=0)
            db += tl.sum(dh, axis=0)
        tl.store(dnw_ptr + pid_s * D + cols, dnw, mask=cmask)
        tl.store(db_ptr + pid_s * D + cols, db, mask=cmask)

    @triton.jit
    def _bwd_dx_kernel(
        dh_ptr,
        w_ptr,
        dx_ptr,
        N,
        I,
        HB,
        D,
        G,
        BM: tl.constexpr,
        BN: tl.constexpr,
        BK: tl.constexpr,
        DOT_BF16: tl.constexpr,
        PREC: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        g = tl.program_id(2)
        rows = pid_m * BM + tl.arange(0, BM)
        cols = pid_n * BN + tl.arange(0, BN)  # columns of x inside block g
        rmask = rows < N
        cmask = cols < I
        rows64 = rows.to(tl.int64)
        dh_row = dh_ptr + rows64[:, None] * D + g * HB
        w_blk = w_ptr + g.to(tl.int64) * I * HB
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k0 in range(0, HB, BK):
            ks = k0 + tl.arange(0, BK)
            kmask = ks < HB
            a = tl.load(dh_row + ks[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
            b = tl.load(  # w_hid[g, cols, ks] read as its transpose (K, BN)
                w_blk + cols[None, :] * HB + ks[:, None],
                mask=kmask[:, None] & cmask[None, :],
                other=0.0,
            )
            if DOT_BF16:
                acc += tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16))
            else:
                acc += tl.dot(a, b.to(tl.float32), input_precision=PREC)
        tl.store(
            dx_ptr + rows64[:, None] * (G * I) + g * I + cols[None, :],
            acc.to(dx_ptr.dtype.element_ty),
            mask=rmask[:, None] & cmask[None, :],
        )

    @triton.jit
    def _bwd_dw_kernel(
        a_ptr,
        b_ptr,
        rstd_ptr,
        nw_ptr,
        out_ptr,
        N,
        A,
        B,
        a_row,
        b_row,
        G,
        RPS,
        BA: tl.constexpr,
        BB: tl.constexpr,
        BR: tl.constexpr,
        NORM_A: tl.constexpr,
        DOT_BF16: tl.constexpr,
        PREC: tl.constexpr,
    ):
        """out[s, g] = sum over split s's rows of A[n, g]^T B[n, g], A (A wide) and B (B wide)
        being block g's slices of row-major matrices with row strides a_row and b_row.
        NORM_A: A is h_pre and the kernel uses silu(h_pre * rstd * norm_w) instead."""
        pid_a = tl.program_id(0)
        pid_b = tl.program_id(1)
        pid_gs = tl.program_id(2)
        g = pid_gs % G
        pid_s = pid_gs // G
        ca = pid_a * BA + tl.arange(0, BA)
        cb = pid_b * BB + tl.arange(0, BB)
        amask = ca < A
        bmask = cb < B
        if NORM_A:
            nw = tl.load(nw_ptr + g * A + ca, mask=amask, other=0.0).to(tl.float32)
        acc = tl.zeros((BA, BB), dtype=tl.float32)
        row0 = pid_s * RPS
        for r0 in range(row0, row0 + RPS, BR):
            rows = r0 + tl.arange(0, BR)
            rmask = rows < N
            rows64 = rows.to(tl.int64)
            at = tl.load(  # (BA, BR): the transpose of the A tile
                a_ptr + rows64[None, :] * a_row + g * A + ca[:, None],
                mask=amask[:, None] & rmask[None, :],
                other=0.0,
            ).to(tl.float32)
            if NORM_A:
                rstd = tl.load(rstd_ptr + rows64, mask=rmask, other=0.0)
                y = at * rstd[None, :] * nw[:, None]
                at = y * tl.sigmoid(y)
            bt = tl.load(
                b_ptr + rows64[:, None] * b_row + g * B + cb[None, :],
                mask=rmask[:, None] & bmask[None, :],
                other=0.0,
            )
            if DOT_BF16:
                acc += tl.dot(at.to(tl.bfloat16), bt.to(tl.bfloat16))
            else:
                acc += tl.dot(at, bt.to(tl.float32), input_precision=PREC)
        out = out_ptr + (pid_s * G + g).to(tl.int64) * A * B
        tl.store(out + ca[:, None] * B + cb[None, :], acc, mask=amask[:, None] & bmask[None, :])


def _interpreted() -> bool:
    if not HAS_TRITON:
        return False
    from triton.runtime.interpreter import InterpretedFunction

    # Both halves must agree: our kernels and triton's own @jit helpers (decorated at triton's
    # import, possibly long before this module was imported).
    return isinstance(_fwd_hid_kernel, InterpretedFunction) and isinstance(
        tl.zeros, InterpretedFunction
    )


# Whether the kernels can run in the CPU interpreter (TRITON_INTERPRET=1 before triton's import).
INTERPRETED: bool = _interpreted()


def _pow2(n: int, lo: int, hi: int) -> int:
    """Smallest power of two >= n, clamped to [lo, hi]; lo >= 16 keeps tl.dot legal."""
    return max(lo, min(hi, 1 << max(0, n - 1).bit_length()))


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _target_programs(device: torch.device) -> int:
    """Programs a row-split reduction should reach: two waves on a GPU; few in the interpreter,
    where every program costs Python time."""
    if device.type == "cuda":
        return 2 * _sm_count(device.index if device.index is not None else 0)
    return 4


def _row_split(
    n: int, base_programs: int, block_rows: int, device: torch.device
) -> tuple[int, int]:
    """(splits, rows per split): split the rows only as far as needed to fill the device.
    Depends on shapes only, so a CUDA graph captured once stays valid."""
    want = max(1, _target_programs(device) // max(1, base_programs))
    splits = max(1, min(want, triton.cdiv(n, block_rows)))
    rps = triton.cdiv(triton.cdiv(n, splits), block_rows) * block_rows
    return triton.cdiv(n, rps), rps


def _prec(dtype: torch.dtype) -> tuple[bool, str]:
    """(bf16 dot, fp32 dot precision). fp32 follows torch's own matmul flag, so the Triton path
    trades accuracy for speed exactly when torch.bmm would (TF32 off by default)."""
    bf16 = dtype == torch.bfloat16
    tf32 = bf16 or torch.backends.cuda.matmul.allow_tf32
    return bf16, "tf32" if tf32 else "ieee"


def _gemm_blocks(n: int, cols: int, k: int, k_max: int) -> tuple[int, int, int]:
    # Small-N calls (acting, N ~ 8) shrink the row tile so most of each MMA is not padding.
    return _pow2(n, 16, 64), _pow2(cols, 16, 64), _pow2(k, 16, k_max)


def _warps(bm: int, bn: int) -> int:
    # 64x64 fp32 tiles at 4 warps need 150-250 registers per thread (bf16 ones spill): spread
    # them over 8 warps. Checked with ptxas for sm_90 (cuobjdump --dump-resource-usage).
    return 8 if bm * bn >= 64 * 64 else 4


def _check(x: Tensor, deter: Tensor, w_hid: Tensor, w_gru: Tensor) -> tuple[int, int, int, int]:
    if not HAS_TRITON:
        raise RuntimeError("block_gru_triton needs triton; use impl='torch'")
    if x.device.type != "cuda" and not INTERPRETED:
        raise RuntimeError(
            "Triton on CPU needs TRITON_INTERPRET=1 in the environment before triton is first "
            "imported in this process (it is read when @triton.jit functions are decorated)"
        )
    if x.device.type != "cuda" and {x.dtype, deter.dtype} != {torch.float32}:
        raise TypeError("the Triton interpreter (CPU) runs fp32 only; bf16 needs a GPU")
    g, i, hb = w_hid.shape
    d = deter.shape[-1]
    if (
        x.shape[-2:] != (g, i)
        or x.shape[:-2] != deter.shape[:-1]
        or d != g * hb
        or w_gru.shape != (g, hb, 3 * hb)
    ):
        raise ValueError(
            f"shape mismatch: x {tuple(x.shape)}, deter {tuple(deter.shape)}, "
            f"w_hid {tuple(w_hid.shape)}, w_gru {tuple(w_gru.shape)}"
        )
    return g, i, hb, d


def _forward(
    x: Tensor,
    deter: Tensor,
    w_hid: Tensor,
    b_hid: Tensor,
    norm_w: Tensor,
    w_gru: Tensor,
    b_gru: Tensor,
    eps: float,
    save: bool,
) -> tuple:
    """Runs K1 and K2 on 2-D views. Returns (new, h_pre, gates, rstd); the last three are None
    unless `save` (inference skips the (N, 3D) gate store)."""
    g, i, hb, d = _check(x, deter, w_hid, w_gru)
    x = x.reshape(-1, g, i).contiguous()
    deter2 = deter.reshape(-1, d).contiguous()
    w_hid, w_gru = w_hid.contiguous(), w_gru.contiguous()
    b_hid, norm_w, b_gru = b_hid.contiguous(), norm_w.contiguous(), b_gru.contiguous()
    n = deter2.shape[0]
    dev = x.device
    new = torch.empty(n, d, device=dev, dtype=deter.dtype)
    if n == 0:
        return new.reshape(deter.shape), None, None, None
    bf16, prec = _prec(x.dtype)
    f32 = torch.float32

    bm, bn, bk = _gemm_blocks(n, hb, i, 64 if bf16 else 32)
    nt = triton.cdiv(hb, bn)
    h_pre = torch.empty(n, d, device=dev, dtype=f32)
    ss = torch.empty(n, g * nt, device=dev, dtype=f32)
    grid = (triton.cdiv(n, bm), nt, g)
    _fwd_hid_kernel[grid](
        x, w_hid, b_hid, h_pre, ss, n, i, hb, d, g, nt,
        BM=bm, BN=bn, BK=bk, DOT_BF16=bf16, PREC=prec, num_warps=_warps(bm, bn),
    )  # fmt: skip

    # Three accumulators plus three weight tiles per K step: BK=32 keeps bf16 out of spills.
    bm, bn, bk = _gemm_blocks(n, hb, hb, 32)
    gates = torch.empty(n, 3 * d, device=dev, dtype=f32) if save else h_pre  # dummy if unused
    rstd = torch.empty(n, device=dev, dtype=f32) if save else h_pre
    grid = (triton.cdiv(n, bm), triton.cdiv(hb, bn), g)
    _fwd_gru_kernel[grid](
        h_pre, ss, norm_w, w_gru, b_gru, deter2, new, gates, rstd, n, hb, d, g, g * nt, eps,
        BM=bm, BN=bn, BK=bk, BP=_pow2(g * nt, 16, 1 << 30), DOT_BF16=bf16, PREC=prec,
        SAVE=save, num_warps=_warps(bm, bn),
    )  # fmt: skip
    new = new.reshape(deter.shape)
    return (new, h_pre, gates, rstd) if save else (new, None, None, None)


def _backward(
    dnew: Tensor,
    x: Tensor,
    deter: Tensor,
    w_hid: Tensor,
    norm_w: Tensor,
    w_gru: Tensor,
    h_pre: Tensor,
    gates: Tensor,
    rstd: Tensor,
    need: tuple,
    bias_dtypes: tuple,
) -> tuple:
    """B1..B5. `need` is ctx.needs_input_grad for (x, deter, w_hid, b_hid, norm_w, w_gru,
    b_gru); matmuls whose only product is unneeded are skipped (static flags, graph-safe)."""
    g, i, hb = w_hid.shape
    d = g * hb
    x2 = x.reshape(-1, g, i).contiguous()
    deter2 = deter.reshape(-1, d).contiguous()
    dnew = dnew.reshape(-1, d).contiguous()
    w_hid, w_gru, norm_w = w_hid.contiguous(), w_gru.contiguous(), norm_w.contiguous()
    n = deter2.shape[0]
    dev = x.device
    f32 = torch.float32
    bf16, prec = _prec(x.dtype)

    # B1: gates backward (elementwise) + d b_gru partials.
    br, bd = 32, 64
    s1, rps1 = _row_split(n, triton.cdiv(d, bd), br, dev)
    dgates = torch.empty(n, 3 * d, device=dev, dtype=f32)
    ddeter = torch.empty(n, d, device=dev, dtype=deter.dtype)
    db_gru = torch.empty(s1, 3 * d, device=dev, dtype=f32)
    _bwd_gates_kernel[(triton.cdiv(d, bd), s1)](
        gates, deter2, dnew, dgates, ddeter, db_gru, n, hb, d, rps1, BR=br, BD=bd, num_warps=4
    )

    # B2: d h_act = dgates @ w_gru^T, silu backward, partial row dots for the rmsnorm.
    bm, bn, bk = _gemm_blocks(n, hb, 3 * hb, 64 if bf16 else 32)
    nt = triton.cdiv(hb, bn)
    dy = torch.empty(n, d, device=dev, dtype=f32)
    dots = torch.empty(n, g * nt, device=dev, dtype=f32)
    _bwd_hact_kernel[(triton.cdiv(n, bm), nt, g)](
        dgates, w_gru, h_pre, rstd, norm_w, dy, dots, n, hb, d, g, nt,
        BM=bm, BN=bn, BK=bk, DOT_BF16=bf16, PREC=prec, num_warps=_warps(bm, bn),
    )  # fmt: skip

    # B3: rmsnorm backward + d norm_w, d b_hid partials.
    s3, rps3 = _row_split(n, triton.cdiv(d, bd), br, dev)
    dh = torch.empty(n, d, device=dev, dtype=f32)
    dnw = torch.empty(s3, d, device=dev, dtype=f32)
    db_hid = torch.empty(s3, d, device=dev, dtype=f32)
    _bwd_norm_kernel[(triton.cdiv(d, bd), s3)](
        h_pre, rstd, norm_w, dy, dots, dh, dnw, db_hid, n, d, g * nt, rps3,
        BR=br, BD=bd, BP=_pow2(g * nt, 16, 1 << 30), num_warps=4,
    )  # fmt: skip

    dx = dw_hid = dw_gru = None
    if need[0]:  # B4
        bm, bn, bk = _gemm_blocks(n, i, hb, 64 if bf16 else 32)
        dx = torch.empty(n, g, i, device=dev, dtype=x.dtype)
        _bwd_dx_kernel[(triton.cdiv(n, bm), triton.cdiv(i, bn), g)](
            dh, w_hid, dx, n, i, hb, d, g,
            BM=bm, BN=bn, BK=bk, DOT_BF16=bf16, PREC=prec, num_warps=_warps(bm, bn),
        )  # fmt: skip
        dx = dx.reshape(x.shape)
    if need[2]:  # B5 on (x, dh)
        dw_hid = _weight_grad(x2, dh, None, None, n, g, i, hb, g * i, d, bf16, prec)
        dw_hid = dw_hid.to(w_hid.dtype)
    if need[5]:  # B5 on (silu(rmsnorm(h_pre)), dgates)
        dw_gru = _weight_grad(h_pre, dgates, rstd, norm_w, n, g, hb, 3 * hb, d, 3 * d, bf16, prec)
        dw_gru = dw_gru.to(w_gru.dtype)
    return (
        dx,
        ddeter.reshape(deter.shape),
        dw_hid,
        db_hid.sum(0).to(bias_dtypes[0]),
        dnw.sum(0).to(norm_w.dtype),
        dw_gru,
        db_gru.sum(0).to(bias_dtypes[1]),
    )


def _weight_grad(
    a: Tensor,
    b: Tensor,
    rstd: Tensor | None,
    norm_w: Tensor | None,
    n: int,
    g: int,
    wa: int,
    wb: int,
    a_row: int,
    b_row: int,
    bf16: bool,
    prec: str,
) -> Tensor:
    """(G, wa, wb) = sum over rows of A_g^T B_g via `_bwd_dw_kernel` and a split-K over rows."""
    ba, bb = _pow2(wa, 16, 64), _pow2(wb, 16, 64)
    brows = 64 if bf16 else 32
    base = triton.cdiv(wa, ba) * triton.cdiv(wb, bb) * g
    s, rps = _row_split(n, base, brows, a.device)
    part = torch.empty(s, g, wa, wb, device=a.device, dtype=torch.float32)
    norm = rstd is not None
    _bwd_dw_kernel[(triton.cdiv(wa, ba), triton.cdiv(wb, bb), g * s)](
        a, b, rstd if norm else a, norm_w if norm else a, part, n, wa, wb, a_row, b_row, g, rps,
        BA=ba, BB=bb, BR=brows, NORM_A=norm, DOT_BF16=bf16, PREC=prec, num_warps=_warps(ba, bb),
    )  # fmt: skip
    return part.sum(0) if s > 1 else part[0]


class BlockGRUFunction(torch.autograd.Function):
    """Autograd wrapper: forward K1+K2 saving h_pre, gate pre-activations and rstd; backward
    B1..B5."""

    @staticmethod
    def forward(ctx, x, deter, w_hid, b_hid, norm_w, w_gru, b_gru, eps):
        new, h_pre, gates, rstd = _forward(
            x, deter, w_hid, b_hid, norm_w, w_gru, b_gru, eps, save=True
        )
        ctx.save_for_backward(x, deter, w_hid, norm_w, w_gru, h_pre, gates, rstd)
        ctx.bias_dtypes = (b_hid.dtype, b_gru.dtype)
        return new

    @staticmethod
    def backward(ctx, dnew):
        x, deter, w_hid, norm_w, w_gru, h_pre, gates, rstd = ctx.saved_tensors
        if h_pre is None:  # N == 0
            return (
                torch.zeros_like(x),
                torch.zeros_like(deter),
                torch.zeros_like(w_hid),
                torch.zeros(deter.shape[-1], dtype=ctx.bias_dtypes[0], device=x.device),
                torch.zeros_like(norm_w),
                torch.zeros_like(w_gru),
                torch.zeros(3 * deter.shape[-1], dtype=ctx.bias_dtypes[1], device=x.device),
                None,
            )
        grads = _backward(
            dnew, x, deter, w_hid, norm_w, w_gru, h_pre, gates, rstd,
            ctx.needs_input_grad[:7], ctx.bias_dtypes,
        )  # fmt: skip
        return (*grads, None)


def block_gru_triton(
    x: Tensor,
    deter: Tensor,
    w_hid: Tensor,
    b_hid: Tensor,
    norm_w: Tensor,
    w_gru: Tensor,
    b_gru: Tensor,
    eps: float = 1e-4,
) -> Tensor:
    """Triton version of `block_gru_reference` (same arguments, same result up to fp rounding).

    fp32 or bf16 inputs (fp32 math inside, output in deter's dtype). Launches no host syncs.
    """
    args = (x, deter, w_hid, b_hid, norm_w, w_gru, b_gru)
    if torch.is_grad_enabled() and any(t.requires_grad for t in args):
        return BlockGRUFunction.apply(*args, float(eps))
    return _forward(*args, float(eps), save=False)[0]


def block_gru(
    x: Tensor,
    deter: Tensor,
    w_hid: Tensor,
    b_hid: Tensor,
    norm_w: Tensor,
    w_gru: Tensor,
    b_gru: Tensor,
    eps: float = 1e-4,
    impl: str = "torch",
    taps: tuple[Tensor, Tensor] | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Dispatches to `block_gru_reference` (impl="torch") or `block_gru_triton` ("triton").
    `taps`: see `block_gru_reference` (torch only)."""
    if impl == "torch":
        return block_gru_reference(x, deter, w_hid, b_hid, norm_w, w_gru, b_gru, eps, taps)
    if taps is not None:
        raise ValueError("block_gru taps are implemented by the torch reference only")
    if impl == "triton":
        return block_gru_triton(x, deter, w_hid, b_hid, norm_w, w_gru, b_gru, eps)
    raise ValueError(f"unknown block_gru impl {impl!r}; expected 'torch' or 'triton'")
