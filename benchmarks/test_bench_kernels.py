"""pytest-benchmark cases: each fused kernel against its PyTorch reference and torch.compile of
the reference (forward + backward), and envpool collection with pixels.

    pytest benchmarks/ --benchmark-only [--benchmark-json out.json]

Triton cases need CUDA (on a CPU Triton only runs in its interpreter, which measures nothing).
Shapes are the d256 config's: imagination over batch 8 x 25 starts (N = 200), 255 bins over the
15 x 200 imagined states.
"""

import numpy as np
import pytest
import torch

from kernels import block_gru as bg
from kernels import twohot as th

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
PROVIDERS = ["torch", "compiled"] + (["triton"] if CUDA and th.HAS_TRITON else [])


def _sync():
    if CUDA:
        torch.cuda.synchronize()


def _gru_inputs(n=200, deter=2048, blocks=4, hidden=256):
    g = torch.Generator(device=DEVICE).manual_seed(0)
    hb, i = deter // blocks, deter // blocks + 3 * hidden
    make = lambda *s, scale=1.0: (
        torch.randn(*s, device=DEVICE, generator=g) * scale
    ).requires_grad_(True)
    return (
        make(n, blocks, i),
        make(n, deter),
        make(blocks, i, hb, scale=i**-0.5),
        make(deter, scale=0.1),
        make(deter, scale=0.1).detach().add_(1).requires_grad_(True),
        make(blocks, hb, 3 * hb, scale=hb**-0.5),
        make(3 * deter, scale=0.1),
    )


def _fwd_bwd(fn, args, grad):
    def run():
        out = fn(*args)
        out.backward(grad)
        _sync()

    run()  # compile / autotune outside the timed rounds
    return run


@pytest.mark.parametrize("provider", PROVIDERS)
def test_block_gru_fwd_bwd(benchmark, provider):
    args = _gru_inputs()
    fn = {
        "torch": bg.block_gru_reference,
        "triton": bg.block_gru_triton,
        "compiled": torch.compile(bg.block_gru_reference),
    }[provider]
    grad = torch.randn_like(args[1])
    benchmark.group = "block_gru fwd+bwd (N=200, D=2048, G=4)"
    benchmark(_fwd_bwd(fn, args, grad))


@pytest.mark.parametrize("space", ["symlog", "real"])
@pytest.mark.parametrize("provider", PROVIDERS)
def test_twohot_loss_fwd_bwd(benchmark, provider, space):
    n, k = 15 * 200, 255
    logits = torch.randn(n, k, device=DEVICE, requires_grad=True)
    y, y2 = torch.randn(n, device=DEVICE) * 50, torch.randn(n, device=DEVICE) * 50
    bins = th.make_bins(k, device=DEVICE, space=space)
    ref = lambda lg, a, b: th.twohot_loss_reference(lg, a, bins, b, 1.0, space)
    fn = {
        "torch": ref,
        "compiled": torch.compile(ref),
        "triton": lambda lg, a, b: th.twohot_loss_triton(lg, a, bins, b, 1.0, space),
    }[provider]
    grad = torch.ones(n, device=DEVICE)
    benchmark.group = f"two-hot CE + slow target, fwd+bwd (3000 x 255, {space} space)"
    benchmark(_fwd_bwd(fn, (logits, y, y2), grad))


@pytest.mark.parametrize("task", ["CartPole-v1", "LunarLander-v3"])
def test_envpool_collection_with_pixels(benchmark, task):
    pytest.importorskip("envpool")
    from engine.envs import make_env

    env = make_env(task, "envpool", 16, 0, 64, True)
    env.reset()
    rng = np.random.default_rng(0)
    actions = rng.integers(env.num_actions, size=(64, 16))
    state = {"i": 0}

    def step():
        env.step(actions[state["i"] % 64])
        state["i"] += 1

    benchmark.group = "envpool, 16 envs, 64x64 pixels + state (one call = 16 env steps)"
    benchmark.extra_info["env_steps_per_call"] = 16
    benchmark(step)
