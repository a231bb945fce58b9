"""The fused block GRU: the torch reference against the engine's BlockGRU, and the Triton kernels
(forward and every gradient) against the reference.

Without CUDA the kernels run in Triton's interpreter. Triton 3.9 reads TRITON_INTERPRET inside
each `@triton.jit` decoration; triton.language's own helpers (tl.zeros, tl.sum, ...) are decorated
when triton is first imported and our kernels when `kernels.block_gru` is. So the variable is set
here before either import. If triton was already imported without it (say by another test module
collected earlier), the process cannot switch (re-importing triton aborts in its C extension) and
the Triton tests skip with that reason; if only `kernels.block_gru` was imported too early, it is
reloaded so that its kernels are decorated again.
"""

import importlib
import os
import sys

import pytest
import torch

CUDA = torch.cuda.is_available()
TRITON_PREIMPORTED = "triton" in sys.modules
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

from engine.nets import BlockGRU  # noqa: E402
from kernels import block_gru as bg  # noqa: E402


def _triton_lang_interpreted() -> bool:
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(bg.tl.zeros, InterpretedFunction)


SKIP_REASON = ""
if not bg.HAS_TRITON:
    SKIP_REASON = "triton is not installed"
elif not CUDA and os.environ["TRITON_INTERPRET"] != "1":
    SKIP_REASON = "no CUDA and TRITON_INTERPRET is set to something other than 1"
elif not CUDA and not _triton_lang_interpreted():
    SKIP_REASON = (
        "no CUDA, and triton was imported in this process before TRITON_INTERPRET=1 was set "
        f"(already imported when this module loaded: {TRITON_PREIMPORTED}); run this test file "
        "in its own process or export TRITON_INTERPRET=1"
    )
elif not CUDA and not bg.INTERPRETED:
    bg = importlib.reload(bg)  # our kernels were decorated before the variable was set

DEVICE = torch.device("cuda" if CUDA else "cpu")
needs_triton = pytest.mark.skipif(bool(SKIP_REASON), reason=SKIP_REASON)
NAMES = ("x", "deter", "w_hid", "b_hid", "norm_w", "w_gru", "b_gru")

# (N, D, G, hidden): Hb = D / G and I = Hb + 3 * hidden; the odd ones leave partial row, column
# and K tiles everywhere (Hb 16 with I 34, Hb 24 with I 54, N 17 and 33).
SHAPES = [(5, 64, 4, 8), (1, 32, 2, 4), (17, 48, 3, 6), (33, 96, 4, 10), (8, 128, 4, 16)]


def make_inputs(n, d, g, hidden, device=DEVICE, dtype=torch.float32, lead=None, seed=0):
    """Random inputs at the scale the engine sees: unit activations, fan-in scaled weights, and
    non-trivial biases / norm weights so that a layout mix-up cannot hide behind zeros or ones."""
    gen = torch.Generator().manual_seed(seed)
    hb = d // g
    i = hb + 3 * hidden
    lead = lead or (n,)

    def r(*shape, scale=1.0, shift=0.0):
        return torch.randn(*shape, generator=gen) * scale + shift

    t = {
        "x": r(*lead, g, i),
        "deter": r(*lead, d),
        "w_hid": r(g, i, hb, scale=i**-0.5),
        "b_hid": r(d, scale=0.1),
        "norm_w": r(d, scale=0.1, shift=1.0),
        "w_gru": r(g, hb, 3 * hb, scale=hb**-0.5),
        "b_gru": r(3 * d, scale=0.5),
    }
    return {k: v.to(device=device, dtype=dtype).requires_grad_() for k, v in t.items()}


def run_with_grads(fn, inputs, seed=1):
    out = fn(**inputs)
    gen = torch.Generator().manual_seed(seed)
    upstream = torch.randn(out.shape, generator=gen).to(out)
    grads = torch.autograd.grad(out, [inputs[k] for k in NAMES], upstream)
    return out, dict(zip(NAMES, grads))


def assert_close(actual, expected, rtol, atol, what):
    # atol scales with the tensor: weight gradients are sums over rows and grow with N.
    scale = max(1.0, expected.abs().max().item())
    torch.testing.assert_close(
        actual.float(), expected.float(), rtol=rtol, atol=atol * scale, msg=lambda m: f"{what}: {m}"
    )


def engine_input(core, deter, stoch, action):
    """x exactly as BlockGRU.forward builds it, reshaped to (N, G, I)."""
    g = core.blocks
    e = torch.cat([core.in_deter(deter), core.in_stoch(stoch), core.in_action(action)], -1)
    e = e.unsqueeze(-2).expand(*e.shape[:-1], g, e.shape[-1])
    return torch.cat([deter.reshape(*deter.shape[:-1], g, -1), e], -1)


@pytest.mark.parametrize("lead", [(7,), (2, 3)])
def test_reference_is_the_engine_math(lead):
    torch.manual_seed(0)
    core = BlockGRU(deter=32, stoch=12, num_actions=3, hidden=8, blocks=4)
    with torch.no_grad():  # the engine inits biases to 0 and norm weights to 1: break that
        for p in core.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.3)
    deter = torch.randn(*lead, 32, requires_grad=True)
    stoch, action = torch.randn(*lead, 12), torch.randn(*lead, 3)
    expected = core(deter, stoch, action)
    params = (core.hid.weight, core.hid.bias, core.hid_norm.weight, core.gru.weight, core.gru.bias)
    x = engine_input(core, deter, stoch, action)
    actual = bg.block_gru_reference(x, deter, *params, eps=core.hid_norm.eps)
    assert torch.equal(actual, expected)

    upstream = torch.randn_like(expected)
    wrt = [deter, *params]
    g_engine = torch.autograd.grad(expected, wrt, upstream)
    g_ref = torch.autograd.grad(actual, wrt, upstream)
    for a, b in zip(g_ref, g_engine):
        assert torch.equal(a, b)


def test_dispatcher():
    t = {k: v.detach() for k, v in make_inputs(3, 32, 2, 4, device=torch.device("cpu")).items()}
    assert torch.equal(bg.block_gru(**t), bg.block_gru_reference(**t))
    assert torch.equal(bg.block_gru(**t, impl="torch"), bg.block_gru_reference(**t))
    with pytest.raises(ValueError, match="impl"):
        bg.block_gru(**t, impl="cuda")


# fp32 tolerances: the kernels sum in a different order than torch's bmm / mean (tiled K loops,
# per-tile partial sums for the rms and the norm's row dot), so they agree to a few ulp times
# sqrt(K), ~1e-6 relative here; 1e-4 / 1e-5 leaves room for the larger GPU shapes.
@needs_triton
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "N{}_D{}_G{}_H{}".format(*s))
def test_triton_matches_reference_fp32(shape):
    inputs = make_inputs(*shape)
    ref, g_ref = run_with_grads(bg.block_gru_reference, inputs)
    out, g_out = run_with_grads(bg.block_gru_triton, inputs)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert_close(out, ref, 1e-4, 1e-5, "new_deter")
    for k in NAMES:
        assert g_out[k].shape == inputs[k].shape, k
        assert_close(g_out[k], g_ref[k], 1e-4, 1e-5, f"d{k}")


@needs_triton
def test_triton_row_splits_and_leading_dims(monkeypatch):
    # Force the weight/bias/norm gradients through several row splits (the partial-sum path the
    # GPU takes at large N) and feed (B, T, ...) inputs.
    monkeypatch.setattr(bg, "_target_programs", lambda device: 256)
    inputs = make_inputs(70, 64, 4, 8, lead=(2, 35))
    assert bg._row_split(70, 1, 32, DEVICE)[0] > 1
    ref, g_ref = run_with_grads(bg.block_gru_reference, inputs)
    out, g_out = run_with_grads(bg.block_gru_triton, inputs)
    assert out.shape == (2, 35, 64)
    assert_close(out, ref, 1e-4, 1e-5, "new_deter")
    for k in NAMES:
        assert_close(g_out[k], g_ref[k], 1e-4, 1e-5, f"d{k}")


@needs_triton
def test_triton_inference_path_and_partial_grads():
    inputs = make_inputs(9, 48, 3, 6)
    with torch.no_grad():  # skips saving the gates; must give the very same numbers
        out_ng = bg.block_gru(**inputs, impl="triton")
        ref = bg.block_gru_reference(**inputs)
    out = bg.block_gru(**inputs, impl="triton")
    assert torch.equal(out_ng, out.detach())
    assert_close(out_ng, ref, 1e-4, 1e-5, "new_deter")
    # Only some inputs need grads: the skipped matmuls must not break the others.
    frozen = {k: (v.detach() if k in ("x", "w_hid", "w_gru") else v) for k, v in inputs.items()}
    out = bg.block_gru_triton(**frozen)
    wrt = [frozen[k] for k in ("deter", "b_hid", "norm_w", "b_gru")]
    g_out = torch.autograd.grad(out, wrt, torch.ones_like(out))
    g_ref = torch.autograd.grad(bg.block_gru_reference(**frozen), wrt, torch.ones_like(out))
    for a, b, k in zip(g_out, g_ref, ("deter", "b_hid", "norm_w", "b_gru")):
        assert_close(a, b, 1e-4, 1e-5, f"d{k}")


@needs_triton
def test_triton_empty_batch():
    inputs = make_inputs(0, 32, 2, 4)
    out, grads = run_with_grads(bg.block_gru_triton, inputs)
    assert out.shape == (0, 32)
    assert all(grads[k].shape == inputs[k].shape for k in NAMES)
    assert all(not grads[k].any() for k in NAMES)


gpu = pytest.mark.skipif(not (CUDA and bg.HAS_TRITON), reason="needs CUDA and triton")


def _bf16_case(n, d, g, hidden, tol):
    """bf16 kernels against the fp32 reference on the same (bf16-representable) values."""
    inputs = make_inputs(n, d, g, hidden, dtype=torch.bfloat16)
    inputs32 = {k: v.detach().float().requires_grad_() for k, v in inputs.items()}
    ref, g_ref = run_with_grads(bg.block_gru_reference, inputs32)
    out, g_out = run_with_grads(bg.block_gru_triton, inputs)
    assert out.dtype == torch.bfloat16
    assert all(g_out[k].dtype == torch.bfloat16 for k in NAMES)
    # bf16 rounds the dot operands (2**-9 relative) and every stored output and gradient.
    assert_close(out, ref, tol, tol, "new_deter")
    for k in NAMES:
        assert_close(g_out[k], g_ref[k], tol, tol, f"d{k}")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "N{}_D{}_G{}_H{}".format(*s))
def test_triton_bf16_against_fp32_reference(shape):
    _bf16_case(*shape, tol=3e-2)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n", [8, 333])
def test_triton_real_d256_size(n, dtype):
    d, g, hidden = 2048, 4, 256  # I = 512 + 768 = 1280, Hb = 512
    if dtype == torch.bfloat16:
        _bf16_case(n, d, g, hidden, tol=5e-2)
        return
    inputs = make_inputs(n, d, g, hidden)
    ref, g_ref = run_with_grads(bg.block_gru_reference, inputs)
    out, g_out = run_with_grads(bg.block_gru_triton, inputs)
    # K up to 1280 and sums over N rows: a little looser than the small shapes.
    assert_close(out, ref, 1e-4, 1e-5, "new_deter")
    for k in NAMES:
        assert_close(g_out[k], g_ref[k], 1e-3, 1e-4, f"d{k}")


@pytest.mark.gpu
@gpu
def test_triton_captures_in_cuda_graph():
    """No host syncs: forward and backward replay from a CUDA graph."""
    inputs = make_inputs(40, 128, 4, 16)
    upstream = torch.randn(40, 128, device=DEVICE)
    wrt = [inputs[k] for k in NAMES]

    def step():
        out = bg.block_gru_triton(**inputs)
        return (out, *torch.autograd.grad(out, wrt, upstream))

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        eager = step()  # compiles the kernels outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static = step()
    graph.replay()  # same inputs: the deterministic kernels must reproduce eager bit for bit
    torch.cuda.synchronize()
    for a, b in zip(static, eager):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
