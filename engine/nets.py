"""Network building blocks: linear layers with DreamerV3's init, RMSNorm, MLPs, the block-diagonal
GRU core, and the CNN encoder/decoder for 64x64 frames.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kernels.block_gru import block_gru

INITS = ("engine", "official")


def trunc_normal_in_(
    weight: Tensor, fan_in: int, outscale: float = 1.0, init: str = "engine"
) -> None:
    """Truncated normal with std 1/sqrt(fan_in) (official `trunc_normal_in`), times `outscale`:
    init "official" multiplies the std by it (as DreamerV3 does), "engine" the variance (the
    engine's first reading: an outscale of 0.01 gives 0.1x the std). outscale 0 = zeros."""
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, not {init!r}")
    if outscale == 0:
        nn.init.zeros_(weight)
        return
    factor = outscale if init == "official" else math.sqrt(outscale)
    # 0.8796 is the std of a unit normal truncated at +-2; dividing restores the intended std.
    std = factor / math.sqrt(fan_in) / 0.87962566103423978
    nn.init.trunc_normal_(weight, 0.0, std, -2 * std, 2 * std)


def hold_settings(module: nn.Module, values: dict[str, float], tensors: bool = False) -> None:
    """Sets each of `values` on `module`: as a float attribute (a single agent), or with
    `tensors` as a 0-dim non-persistent buffer (a population member: stack_module_state stacks
    the members' buffers, so each member's update reads its own value, and checkpoints do not
    change). The code reading them is the same for both: arithmetic, clamp and where."""
    for name, value in values.items():
        if tensors:
            module.register_buffer(name, torch.tensor(float(value)), persistent=False)
        else:
            setattr(module, name, float(value))


def hold_space(module: nn.Module, space: str, flag: bool = False) -> None:
    """`module.space`, the two-hot encoding its losses and predictions use: the name, or with
    `flag` (a population whose members differ in it) a 0-dim bool buffer, True for "real",
    stacked per member like hold_settings' values (kernels/twohot.py selects per member)."""
    if flag:
        module.register_buffer("space", torch.tensor(space == "real"), persistent=False)
    else:
        module.space = space


class Linear(nn.Linear):
    """`fan_in` overrides the input width in the init, for a layer that is one part of a wider
    one (its other part applied elsewhere)."""

    def __init__(
        self,
        n_in: int,
        n_out: int,
        bias: bool = True,
        outscale: float = 1.0,
        init: str = "engine",
        fan_in: int | None = None,
    ):
        super().__init__(n_in, n_out, bias)
        trunc_normal_in_(self.weight, fan_in or n_in, outscale, init)
        if bias:
            nn.init.zeros_(self.bias)


class WeightGradTap(torch.autograd.Function):
    """Batched weight gradients for a layer applied step by step in a recurrent loop.

    Per step, autograd would form the weight gradient x_t^T g_t from a handful of rows (the batch)
    and add it into a full-size gradient: T rank-B updates that each read and write every weight.
    At d256 that is ~7M weights x 25 steps, and it was the largest cost of a CPU update. Instead,
    the loop uses the weights detached and adds a zero "tap" to the layer's output; the tap's
    gradient is exactly g_t, and this function's backward, which runs once all steps' gradients
    have arrived, turns them into X^T G: one matmul over all T x B rows.

    forward(weight, inputs, shape, dtype, blocks) -> zeros(shape) for all T steps; `inputs` is
    a list the loop appends each step's layer input to (x_t, shape (B, in) or (B, G, in/G) for a
    block-diagonal layer with G = blocks). Dense weights are (out, in), block ones (G, in/G,
    out/G)."""

    @staticmethod
    def forward(ctx, weight, inputs, shape, dtype, blocks):
        ctx.inputs, ctx.blocks, ctx.weight_dtype = inputs, blocks, weight.dtype
        return torch.zeros(shape, dtype=dtype, device=weight.device)

    @staticmethod
    def backward(ctx, grad):
        x = torch.stack(ctx.inputs).to(grad.dtype)  # (T, B, ...)
        ctx.inputs = None  # the stacked inputs are freed with this backward
        if ctx.blocks:
            g, rows = ctx.blocks, grad.numel() // grad.shape[-1]
            xb = x.reshape(rows, g, -1).transpose(0, 1)  # (G, TB, in/G)
            gb = grad.reshape(rows, g, -1).transpose(0, 1)  # (G, TB, out/G)
            dw = torch.bmm(xb.transpose(1, 2), gb)
        else:
            dw = grad.reshape(-1, grad.shape[-1]).t() @ x.reshape(-1, x.shape[-1])
        return dw.to(ctx.weight_dtype), None, None, None, None


def tapped_linear(layer: nn.Linear, x: Tensor, tap: Tensor | None) -> Tensor:
    """`layer(x)`, or with a WeightGradTap: the weight detached and the tap added."""
    if tap is None:
        return layer(x)
    return F.linear(x, layer.weight.detach(), layer.bias) + tap


class RMSNorm(nn.Module):
    """Normalises the last dim (the feature maps are channels-last)."""

    def __init__(self, dim: int, eps: float = 1e-4):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        ms = x.float().square().mean(-1, keepdim=True)
        # The weight in the activation's dtype: an fp32 weight would promote a bf16 activation
        # (under autocast) to fp32 and every layer after the norm would run in fp32.
        return (x * torch.rsqrt(ms + self.eps)).to(x.dtype) * self.weight.to(x.dtype)


class DenseAct(nn.Sequential):
    """Linear -> RMSNorm -> SiLU, the unit of every DreamerV3 MLP."""

    def __init__(self, n_in: int, n_out: int, init: str = "engine"):
        super().__init__(Linear(n_in, n_out, init=init), RMSNorm(n_out), nn.SiLU())


class MLP(nn.Module):
    """`layers` hidden DenseAct layers, then an optional output Linear (outscale 0 = zero init)."""

    def __init__(
        self,
        n_in: int,
        units: int,
        layers: int,
        n_out: int | None = None,
        outscale: float = 1.0,
        init: str = "engine",
    ):
        super().__init__()
        dims = [n_in] + [units] * layers
        self.hidden = nn.Sequential(*[DenseAct(a, b, init) for a, b in zip(dims[:-1], dims[1:])])
        self.out = Linear(dims[-1], n_out, outscale=outscale, init=init) if n_out else None

    def forward(self, x: Tensor) -> Tensor:
        x = self.hidden(x)
        return self.out(x) if self.out is not None else x


class BlockLinear(nn.Module):
    """Block-diagonal linear map: G independent (in/G -> out/G) matrices, one batched matmul."""

    def __init__(self, n_in: int, n_out: int, blocks: int, init: str = "engine"):
        super().__init__()
        assert n_in % blocks == 0 and n_out % blocks == 0, (n_in, n_out, blocks)
        self.blocks = blocks
        self.weight = nn.Parameter(torch.empty(blocks, n_in // blocks, n_out // blocks))
        self.bias = nn.Parameter(torch.zeros(n_out))
        # Official DreamerV3 counts the whole input as the fan-in (its initializer's fans of a
        # (G, in/G, out/G) kernel); the engine's first reading counted one block's.
        trunc_normal_in_(self.weight, n_in if init == "official" else n_in // blocks, 1.0, init)

    def forward(self, x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        x = x.reshape(-1, self.blocks, x.shape[-1] // self.blocks).transpose(0, 1)  # (G, N, in/G)
        y = torch.bmm(x, self.weight).transpose(0, 1)  # (N, G, out/G)
        return y.reshape(*lead, -1) + self.bias


class BlockGRU(nn.Module):
    """The RSSM's recurrent core (official `_core`): deter, stoch, action -> next deter.

    Inputs are embedded separately, broadcast to every block beside that block's slice of deter,
    mixed by one block-diagonal layer, then a block-diagonal GRU with the update gate biased by -1
    (the state changes slowly at init).
    """

    def __init__(
        self,
        deter: int,
        stoch: int,
        num_actions: int,
        hidden: int,
        blocks: int,
        impl="torch",
        init: str = "engine",
    ):
        super().__init__()
        self.deter, self.blocks, self.impl, self.hidden = deter, blocks, impl, hidden
        self.in_deter = DenseAct(deter, hidden, init)
        self.in_stoch = DenseAct(stoch, hidden, init)
        self.in_action = DenseAct(num_actions, hidden, init)
        self.hid = BlockLinear(deter + blocks * 3 * hidden, deter, blocks, init)
        self.hid_norm = RMSNorm(deter)
        self.gru = BlockLinear(deter, 3 * deter, blocks, init)

    def forward(self, deter: Tensor, stoch: Tensor, action: Tensor) -> Tensor:
        return self.tapped(deter, stoch, action, None)[0]

    def tap_layers(self) -> dict[str, tuple[Tensor, int, int]]:
        """name -> (weight, output width, blocks) of the layers `tapped` can defer (the Triton
        cell computes its own weight gradients, so its two block layers are not among them)."""
        layers = {
            name: (getattr(self, name)[0].weight, self.hidden, 0)
            for name in ("in_deter", "in_stoch", "in_action")
        }
        if self.impl == "torch":
            layers["hid"] = (self.hid.weight, self.deter, self.blocks)
            layers["gru"] = (self.gru.weight, 3 * self.deter, self.blocks)
        return layers

    def tapped(
        self, deter: Tensor, stoch: Tensor, action: Tensor, taps: dict[str, Tensor] | None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """The step, optionally with WeightGradTap taps (keys of `tap_layers`); returns the next
        deter and each tapped layer's input."""
        g, inputs = self.blocks, {}
        embeds = []
        for name, v in (("in_deter", deter), ("in_stoch", stoch), ("in_action", action)):
            layer = getattr(self, name)
            tap = taps.get(name) if taps else None
            if tap is not None:
                inputs[name] = v
            embeds.append(layer[2](layer[1](tapped_linear(layer[0], v, tap))))
        x = torch.cat(embeds, -1)
        x = x.unsqueeze(-2).expand(*x.shape[:-1], g, x.shape[-1])  # (N, G, 3H)
        x = torch.cat([deter.reshape(*deter.shape[:-1], g, -1).to(x.dtype), x], -1)
        # (N, G, D/G + 3H), in the autocast dtype under autocast: the block matmuls would cast
        # it anyway, and the Triton cell takes its bf16 path only for a bf16 input.
        w_hid, w_gru = self.hid.weight, self.gru.weight
        block_taps = None
        if taps and "hid" in taps:
            w_hid, w_gru = w_hid.detach(), w_gru.detach()
            block_taps = (taps["hid"], taps["gru"])
        # Block matmuls, cross-block RMSNorm, gates and state update: kernels/block_gru.py.
        out = block_gru(
            x,
            deter,
            w_hid,
            self.hid.bias,
            self.hid_norm.weight,
            w_gru,
            self.gru.bias,
            self.hid_norm.eps,
            impl=self.impl,
            taps=block_taps,
        )
        if block_taps is None:
            return out, inputs
        inputs["hid"], inputs["gru"] = x, out[1]
        return out[0], inputs


def _conv_padding(kernel: int) -> int:
    return (kernel - 1) // 2


class StridedConv(nn.Conv2d):
    """A stride-2 convolution on channels-last maps, (N, H, W, C) -> (N, H/2, W/2, C').

    With kernel 2 (every config here: padding 0, the patches do not overlap) it is a matmul of
    each 2 x 2 patch: the map is cut into (N, H/2, W/2, 2*2*C) patches, a view and one copy, and
    one linear layer maps them. Same weights and result as the convolution (tests/test_nets.py),
    but a population's members then run a batched matmul: under vmap a convolution with
    per-member weights becomes a grouped one, and an eager cartpole_d256 8 x 25 update of 4
    members took 7.1x one agent's on this CPU, much of the excess in the decoder's grouped
    transposed convolutions (benchmarks/results/population_patch_conv_2026-12-05/). Other
    kernels run the convolution itself."""

    def __init__(self, c_in: int, c_out: int, kernel: int):
        super().__init__(c_in, c_out, kernel, 2, _conv_padding(kernel))

    def forward(self, x: Tensor) -> Tensor:
        if self.kernel_size != (2, 2):
            return super().forward(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        n, h, w, c = x.shape
        patches = (
            x.reshape(n, h // 2, 2, w // 2, 2, c).transpose(2, 3).reshape(n, h // 2, w // 2, 4 * c)
        )
        weight = self.weight.permute(0, 2, 3, 1).reshape(self.out_channels, 4 * c)  # (a, b, c)
        return F.linear(patches, weight, self.bias)


class StridedConvTranspose(nn.ConvTranspose2d):
    """A stride-2 transposed convolution on channels-last maps, (N, H, W, C) -> (N, 2H, 2W, C').

    With kernel 2 each input pixel writes its own 2 x 2 output patch: one linear layer to
    2*2*C' values per pixel and a pixel shuffle (one copy), the same weights and result as the
    transposed convolution (see StridedConv for why). Other kernels run the convolution."""

    def __init__(self, c_in: int, c_out: int, kernel: int):
        pad = _conv_padding(kernel)
        super().__init__(c_in, c_out, kernel, 2, pad, output_padding=2 - kernel + 2 * pad)

    def forward(self, x: Tensor) -> Tensor:
        if self.kernel_size != (2, 2):
            return super().forward(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        n, h, w, _ = x.shape
        c = self.out_channels
        weight = self.weight.permute(2, 3, 1, 0).reshape(4 * c, self.in_channels)  # (a, b, c')
        y = F.linear(x, weight, self.bias.repeat(4))
        return y.reshape(n, h, w, 2, 2, c).transpose(2, 3).reshape(n, 2 * h, 2 * w, c)


class ImageEncoder(nn.Module):
    """Strided convs, each halving the resolution, RMSNorm over channels + SiLU. Flattened out in
    (C, H, W) order. The maps stay channels-last, as the frames come."""

    def __init__(self, channels: list[int], kernel: int, size: int):
        super().__init__()
        layers, c_in = [], 3
        for c in channels:
            conv = StridedConv(c_in, c, kernel)
            trunc_normal_in_(conv.weight, c_in * kernel * kernel)
            nn.init.zeros_(conv.bias)
            layers += [conv, RMSNorm(c), nn.SiLU()]
            c_in = c
        self.net = nn.Sequential(*layers)
        self.out_dim = channels[-1] * (size // 2 ** len(channels)) ** 2

    def forward(self, image: Tensor) -> Tensor:
        x = image.float() / 255.0 - 0.5  # (N, H, W, 3) centred
        return self.net(x).permute(0, 3, 1, 2).flatten(1)


class ImageDecoder(nn.Module):
    """Mirror of the encoder with transposed convs; pixels in [0, 1] through a sigmoid.

    The first spatial map comes from a block-linear map of deter plus a small MLP of stoch
    (official `bspace`): a dense (deter + stoch) -> 4x4xC layer would be 10.5M parameters at d256,
    as many as the rest of the model. The maps are channels-last inside.
    """

    def __init__(
        self,
        deter: int,
        stoch: int,
        units: int,
        channels: list[int],
        kernel: int,
        size: int,
        sigmoid: bool,
        blocks: int = 8,
        init: str = "engine",
    ):
        super().__init__()
        self.min_res = size // 2 ** len(channels)
        self.c_last = channels[-1]
        space = self.min_res**2 * self.c_last
        self.blocks = math.gcd(blocks, self.c_last, deter)
        self.from_deter = BlockLinear(deter, space, self.blocks, init)
        self.from_stoch = nn.Sequential(
            DenseAct(stoch, units, init), Linear(units, space, init=init)
        )
        self.space_norm = RMSNorm(self.c_last)
        layers = []
        outs = list(reversed(channels[:-1])) + [3]
        c_in = self.c_last
        for i, c in enumerate(outs):
            conv = StridedConvTranspose(c_in, c, kernel)
            trunc_normal_in_(conv.weight, c_in * kernel * kernel // 4)
            nn.init.zeros_(conv.bias)
            layers.append(conv)
            if i < len(outs) - 1:
                layers += [RMSNorm(c), nn.SiLU()]
            c_in = c
        self.net = nn.Sequential(*layers)
        self.sigmoid = sigmoid

    def forward(self, deter: Tensor, stoch: Tensor) -> Tensor:
        """(N, deter), (N, stoch) -> (N, 3, H, W), a channels-last view."""
        n, r, g = deter.shape[0], self.min_res, self.blocks
        x0 = self.from_deter(deter).reshape(n, g, r, r, self.c_last // g)
        x0 = x0.permute(0, 2, 3, 1, 4).reshape(n, r, r, self.c_last)  # blocks own channel groups
        x1 = self.from_stoch(stoch).reshape(n, self.c_last, r, r).permute(0, 2, 3, 1)
        x = self.net(F.silu(self.space_norm(x0 + x1)))
        x = torch.sigmoid(x) if self.sigmoid else x
        return x.permute(0, 3, 1, 2)


def cnn_channels(d_hidden: int, num_layers: int) -> list[int]:
    """Channels start at d_hidden/8 and double per layer (DESIGN.md §2): d256 -> 32..256."""
    return [d_hidden // 8 * 2**i for i in range(num_layers)]
