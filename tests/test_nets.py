"""The image encoder and decoder: channels-last strided (transposed) convolutions written as
patch matmuls, checked against torch's convolutions on the same weights (so every checkpoint
written before the rewrite means the same network), forward and backward, and under vmap with
per-member weights (a population)."""

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call, stack_module_state, vmap

from engine.nets import ImageDecoder, ImageEncoder, StridedConv, StridedConvTranspose


def _rms_nchw(x, weight, eps):
    """The RMSNorm over channels of NCHW maps that the encoder and decoder used before."""
    ms = x.square().mean(1, keepdim=True)
    return x * torch.rsqrt(ms + eps) * weight[:, None, None]


def _encoder_nchw(enc: ImageEncoder, image):
    """ImageEncoder as it was: NCHW torch convolutions, the same parameters."""
    x = image.permute(0, 3, 1, 2).float() / 255.0 - 0.5
    mods = list(enc.net)
    for conv, norm, _ in zip(mods[0::3], mods[1::3], mods[2::3]):
        x = F.conv2d(x, conv.weight, conv.bias, stride=2, padding=conv.padding)
        x = F.silu(_rms_nchw(x, norm.weight, norm.eps))
    return x.flatten(1)


def _decoder_nchw(dec: ImageDecoder, deter, stoch):
    """ImageDecoder as it was: NCHW maps, torch transposed convolutions, the same parameters."""
    n, r, g, c = deter.shape[0], dec.min_res, dec.blocks, dec.c_last
    x0 = dec.from_deter(deter).reshape(n, g, r, r, c // g).permute(0, 1, 4, 2, 3)
    x1 = dec.from_stoch(stoch).reshape(n, c, r, r)
    norm = dec.space_norm
    x = F.silu(_rms_nchw(x0.reshape(n, c, r, r) + x1, norm.weight, norm.eps))
    mods = list(dec.net)  # conv, norm, SiLU, ..., conv
    norms = mods[1::3]
    for i, conv in enumerate(mods[0::3]):
        pad, out_pad = conv.padding, conv.output_padding
        x = F.conv_transpose2d(x, conv.weight, conv.bias, 2, pad, out_pad)
        if i < len(norms):
            x = F.silu(_rms_nchw(x, norms[i].weight, norms[i].eps))
    return torch.sigmoid(x)


def _assert_same_grads(y, ref, inputs, rtol=1e-4):
    """The gradients of y and ref with respect to `inputs` agree for one random cotangent."""
    g = torch.randn_like(ref)
    got = torch.autograd.grad(y, inputs, g, retain_graph=True)
    want = torch.autograd.grad(ref, inputs, g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=rtol)


@pytest.mark.parametrize(
    "layer, c_in, c_out, size, kernel",
    [(StridedConv, 5, 7, 16, k) for k in (2, 3, 4)]
    + [(StridedConvTranspose, 6, 4, 4, k) for k in (2, 4)],
)
def test_strided_layers_are_torchs_convolutions_forward_and_backward(
    layer, c_in, c_out, size, kernel
):
    torch.manual_seed(kernel)
    conv = layer(c_in, c_out, kernel)
    torch.nn.init.normal_(conv.bias)
    x = torch.randn(3, size, size, c_in, requires_grad=True)
    y = conv(x)
    # torch's own (transposed) convolution of the parent class, on NCHW, with the same weights
    ref = super(layer, conv).forward(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
    out = size // 2 if layer is StridedConv else size * 2
    assert y.shape == (3, out, out, c_out) == ref.shape
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
    _assert_same_grads(y, ref, (x, conv.weight, conv.bias))


def _randomize(module):
    """Non-trivial norm weights and biases (they start at 1 and 0)."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("bias") or p.dim() == 1:
                p.add_(0.3 * torch.randn_like(p))


def test_encoder_and_decoder_compute_what_the_nchw_convolutions_did_with_the_same_weights():
    torch.manual_seed(0)
    enc = ImageEncoder([4, 8, 16, 32], 2, 64)
    dec = ImageDecoder(64, 48, 32, [4, 8, 16, 32], 2, 64, sigmoid=True, blocks=8)
    _randomize(enc)
    _randomize(dec)
    image = torch.randint(0, 256, (5, 64, 64, 3), dtype=torch.uint8)
    emb = enc(image)
    assert emb.shape == (5, enc.out_dim) == (5, 32 * 4 * 4)
    torch.testing.assert_close(emb, _encoder_nchw(enc, image), atol=1e-5, rtol=1e-5)
    deter, stoch = torch.randn(5, 64, requires_grad=True), torch.randn(5, 48)
    recon = dec(deter, stoch)
    ref = _decoder_nchw(dec, deter, stoch)
    assert recon.shape == (5, 3, 64, 64) == ref.shape
    torch.testing.assert_close(recon, ref, atol=1e-5, rtol=1e-5)
    _assert_same_grads(recon, ref, (deter, *dec.parameters()))


def test_encoder_under_vmap_with_member_weights_is_each_member_alone():
    """A population's members: vmap over stacked weights gives each member's own encoding and
    weight gradients (the patch matmuls batch over members instead of a grouped conv)."""
    members = []
    for seed in range(3):
        torch.manual_seed(seed)
        members.append(ImageEncoder([4, 8], 2, 16))
    params, _ = stack_module_state(members)
    images = torch.randint(0, 256, (3, 2, 16, 16, 3), dtype=torch.uint8)

    def one(p, img):
        return functional_call(members[0], p, (img,))

    out = vmap(one)(params, images)
    (out.square().sum()).backward()
    for k, enc in enumerate(members):
        alone = enc(images[k])
        torch.testing.assert_close(out[k], alone, atol=1e-5, rtol=1e-5)
        alone.square().sum().backward()
        for name, p in enc.named_parameters():
            torch.testing.assert_close(params[name].grad[k], p.grad, atol=1e-5, rtol=1e-4)
