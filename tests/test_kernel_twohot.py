"""kernels/twohot.py: the reference two-hot loss, and the Triton kernel against it.

Without CUDA the kernel runs in Triton's interpreter (CPU, fp32 only). Triton 3.9 reads
TRITON_INTERPRET lazily, each time a @triton.jit decorator runs: at `import triton` (its own
reductions tl.max, tl.sum are @jit functions) and at the import of kernels.twohot. If another
module imported Triton before this one set the variable, both are re-imported here so that
every @jit function involved is an interpreted one; a conftest.py that sets the variable
before any test module is imported would make that unnecessary.
"""

import importlib
import math
import os

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

from kernels import twohot as T  # noqa: E402  (must follow the environment variable)


def _stale_triton() -> bool:
    """True if Triton was imported before TRITON_INTERPRET was set (and is set now)."""
    import triton.language.standard
    from triton import knobs
    from triton.runtime import JITFunction

    stale_lib = isinstance(triton.language.standard.max, JITFunction)
    return knobs.runtime.interpret and (stale_lib or not T._interpreted())


if T.HAS_TRITON and not CUDA and _stale_triton():
    import triton.language
    import triton.language.standard

    importlib.reload(triton.language.standard)
    importlib.reload(triton.language)
    T = importlib.reload(T)

COMPILED = CUDA and T.HAS_TRITON and not T._interpreted()
RUNNABLE = COMPILED or (T.HAS_TRITON and T._interpreted() and not _stale_triton())
needs_kernel = pytest.mark.skipif(
    not RUNNABLE,
    reason="triton missing, or no CUDA and TRITON_INTERPRET set to a false value",
)
needs_cuda = pytest.mark.skipif(
    not COMPILED, reason="needs a CUDA device and compiled Triton (the interpreter is fp32-only)"
)

DEVICE = "cuda" if CUDA else "cpu"
BINS = T.make_bins(255)
RBINS = T.make_bins(255, space="real")
LN2 = math.log(2)
SPACES = ["symlog", "real"]


def ulp_neighbours(y: torch.Tensor, n: int) -> torch.Tensor:
    """(N,) -> (N, 2n + 1): y and its n nearest fp32 neighbours on each side."""
    out = [y]
    for direction in (math.inf, -math.inf):
        c = y
        for _ in range(n):
            c = torch.nextafter(c, torch.full_like(c, direction))
            out.append(c)
    return torch.stack(out, -1)


def at_centres(bins: torch.Tensor, space: str = "symlog") -> torch.Tensor:
    """fp32 targets that land exactly on a bin centre: the real bins themselves, or those whose
    torch symlog is a symlog bin, where one exists."""
    if space == "real":
        return bins.clone()
    cands = ulp_neighbours(T.symexp(bins.double()).float(), 4)
    hit = T.symlog(cands) == bins[:, None]
    first = torch.where(hit.any(-1), hit.int().argmax(-1), 0)
    return cands.gather(-1, first[:, None]).squeeze(-1)


def midpoints(bins: torch.Tensor, space: str = "symlog") -> torch.Tensor:
    """fp32 targets halfway between neighbouring bins (in the bins' space): floor ln 2."""
    if space == "real":
        return (bins[1:] + bins[:-1]) / 2
    return T.symexp(((bins[1:] + bins[:-1]) / 2).double()).float()


def w_slack(y: torch.Tensor, bins: torch.Tensor, space: str = "symlog") -> torch.Tensor:
    """Per target, how far the kernel's w may sit from the reference's: 2.5 ulps of the
    coordinate x over the width of x's bin.

    Symlog space: x = symlog(y); the interpreter's symlog (a hand-made log1p) is within 2 ulps
    of torch.log1p (measured); on CUDA both run libdevice's log1pf and agree exactly. Real
    space: x = y, and the kernel computes w from the same x, lo and hi as the reference, so it
    is bit-exact once it has the right bin; the bound (at most ~1e-6 at 4.8e8, where one ulp of
    x is 32 and a bin 7e7 wide) is far below what a wrong bin costs."""
    x = y.to(bins.dtype)
    if space == "symlog":
        x = T.symlog(x)
    x = x.clamp(bins[0], bins[-1])
    below = (torch.bucketize(x, bins, right=True) - 1).clamp(0, len(bins) - 2)
    width = (bins[below + 1] - bins[below]).clamp_min(torch.finfo(bins.dtype).tiny)
    x = x.abs()
    ulp = torch.nextafter(x, torch.full_like(x, math.inf)) - x
    return 2.5 * ulp / width + 2e-7


def assert_within(actual: torch.Tensor, expected: torch.Tensor, bound: torch.Tensor, what: str):
    excess = (actual.double() - expected.double()).abs() - bound.double()
    worst = excess.flatten().argmax()
    assert (excess <= 0).all(), (
        f"{what}: exceeds its bound by {excess.flatten()[worst]:.2e} at flat index {worst}"
    )


def target_pool(
    bins: torch.Tensor, n: int, gen: torch.Generator, space: str = "symlog"
) -> torch.Tensor:
    """n targets mixing the edge cases with spread values, in random order."""
    lim = float(bins[-1] if space == "symlog" else T.symlog(bins[-1]))
    special = torch.tensor([0.0, 1.0, -1.0, 1e3, -1e3, 1e9, -1e9, 1e-7, -1e-7, 1e-30, -0.0])
    special = torch.cat([special, torch.tensor([math.inf, -math.inf])])
    centres = at_centres(bins, space)
    mids = midpoints(bins, space)
    spread = T.symexp((torch.rand(n, generator=gen) * 2 - 1) * (lim + 2))
    pool = torch.cat([special, centres, mids, spread])
    return pool[torch.randint(len(pool), (n,), generator=gen)]


# --------------------------------------------------------------------------------------------
# Reference
# --------------------------------------------------------------------------------------------


def test_twohot_round_trip_expectation_is_symlog():
    y = T.symexp(torch.linspace(-19.99, 19.99, 4001))
    t = T.twohot(y, BINS)
    torch.testing.assert_close(t.sum(-1), torch.ones(len(y)))
    assert (t >= 0).all() and ((t > 0).sum(-1) <= 2).all()
    torch.testing.assert_close((t * BINS).sum(-1), T.symlog(y), rtol=1e-5, atol=2e-5)


MAGNITUDES = [0.0, 1e-3, -1e-3, 0.5, -0.5, 1.0, -1.0, 7.3, -7.3, 100.0, -100.0]
MAGNITUDES += [1e4, -1e4, 1e6, -1e6]


@pytest.mark.parametrize("k", [255, 256])
def test_real_round_trip_through_logits_is_exact(k):
    y = torch.tensor(MAGNITUDES)
    bins = T.make_bins(k, space="real")
    t = T.twohot(y, bins, "real")
    torch.testing.assert_close(t.sum(-1), torch.ones(len(y)))
    assert (t >= 0).all() and ((t > 0).sum(-1) <= 2).all()
    # The real-space expectation of a real-space two-hot is y itself, up to the fp32 rounding
    # of w and of the softmax: log(0) = -inf logits give those bins exactly 0 probability.
    mean = T.twohot_mean(torch.log(t), bins, "real")
    torch.testing.assert_close(mean, y, rtol=1e-5, atol=0)
    assert mean[0] == 0
    # A symlog-space two-hot round-trips in symlog space only (its mean there is symlog(y)) ...
    sym_bins = T.make_bins(k)
    t_sym = torch.log(T.twohot(y, sym_bins))
    torch.testing.assert_close(T.twohot_mean(t_sym, sym_bins), y, rtol=2e-5, atol=1e-6)
    # ... while its real-space expectation, over the same bins in real space, is not y (Jensen:
    # interpolating in symlog space overweights the outer bin): 0.2-8% off here.
    off = (T.twohot_mean(t_sym, bins, "real") - y).abs() / y.abs()
    assert (off[1:] > 2e-3).all(), off


def test_real_bins_are_official_and_uniform_probabilities_predict_zero():
    bins = T.make_bins(255, space="real")
    assert bins.dtype == torch.float32 and bins.shape == (255,)
    assert torch.equal(bins, -bins.flip(0)) and bins[127] == 0
    assert (bins.diff() > 0).all()
    assert bins[-1] == pytest.approx(math.expm1(20), rel=1e-6)
    # symexp of the symlog bins, to fp32 rounding: the two linspaces each round the same grid
    # point to within an ulp of the limit (linspace(-20, 20, 255)[127] is 7.45e-8, not 0), an
    # error that symexp scales by its slope 1 + |b|; plus symexp's own rounding.
    s = T.make_bins(255)
    ulp = lambda t: torch.nextafter(t.abs(), torch.full_like(t, math.inf)) - t.abs()
    bound = (1 + bins.abs()) * ulp(torch.tensor(20.0)) + 2 * ulp(bins)
    assert_within(bins, T.symexp(s), bound, "real bins vs symexp(symlog bins)")
    # The limit replaces 20; odd and even K as in the official heads.py.
    e1, e2 = math.expm1(1.0), math.expm1(2.0)
    torch.testing.assert_close(
        T.make_bins(5, limit=2.0, space="real"), torch.tensor([-e2, -e1, 0.0, e1, e2])
    )
    even = T.make_bins(6, limit=2.0, space="real")
    torch.testing.assert_close(even, torch.tensor([-e2, -e1, 0.0, 0.0, e1, e2]))
    assert torch.equal(even, -even.flip(0))  # the official even bins hold 0 and -0
    # Uniform probabilities predict exactly 0 (the symmetric sum), whatever K and batch shape.
    for k in (255, 256, 3, 1023):
        b = T.make_bins(k, space="real")
        mean = T.twohot_mean(torch.zeros(2, 3, k), b, "real")
        assert mean.shape == (2, 3) and (mean == 0).all(), (k, mean)
        assert (T.twohot_mean(torch.zeros(2, k, dtype=torch.bfloat16), b, "real") == 0).all()


def test_twohot_mean_symlog_and_dtypes():
    gen = torch.Generator().manual_seed(2)
    logits = 3 * torch.randn(4, 255, generator=gen)
    # Symlog space: exactly the engine's former dists.twohot_mean.
    expected = T.symexp((torch.softmax(logits, -1) * BINS).sum(-1))
    assert torch.equal(T.twohot_mean(logits, BINS), expected)
    assert torch.equal(T.twohot_mean(logits, BINS, "symlog"), expected)
    # Real space: the plain expectation, up to summation order.
    p = torch.softmax(logits.double(), -1)
    mean = T.twohot_mean(logits, RBINS, "real").double()
    torch.testing.assert_close(mean, (p * RBINS.double()).sum(-1), rtol=1e-5, atol=1e-4)
    # bf16 logits: the softmax runs in fp32 on the same values.
    half = logits.bfloat16()
    for space, bins in (("symlog", BINS), ("real", RBINS)):
        out = T.twohot_mean(half, bins, space)
        assert out.dtype == torch.float32
        assert torch.equal(out, T.twohot_mean(half.float(), bins, space))


def test_real_twohot_edges():
    y = torch.tensor([[1e9, -1e9], [0.0, math.inf], [-math.inf, -0.0]])
    t = T.twohot(y, RBINS, "real")
    assert t.shape == (3, 2, 255)
    assert t[0, 0, -1] == 1 and t[0, 1, 0] == 1 and t[1, 1, -1] == 1 and t[2, 0, 0] == 1
    assert t[1, 0, 127] == 1 and t[2, 1, 127] == 1  # the centre bin is exactly 0
    # Every bin is an fp32 value: a target on it is one-hot, exactly.
    assert torch.equal(T.twohot(RBINS, RBINS, "real"), torch.eye(255))
    # Midpoints split evenly; the weights interpolate by real, not symlog, distance.
    mids = midpoints(RBINS, "real")
    torch.testing.assert_close(
        T.twohot(mids, RBINS, "real").max(-1).values, torch.full((254,), 0.5), rtol=0, atol=1e-6
    )
    assert T.twohot(torch.tensor([float("nan")]), RBINS, "real").isnan().any()


def test_twohot_edges_and_leading_dims():
    t = T.twohot(torch.tensor([[1e9, -1e9], [0.0, float("inf")]]), BINS)
    assert t.shape == (2, 2, 255)
    assert t[0, 0, -1] == 1 and t[0, 1, 0] == 1 and t[1, 1, -1] == 1
    # linspace(-20, 20, 255)[127] is 7.45e-8, not 0: a reward of 0 leaves ~5e-7 on bin 126.
    assert t[1, 0, 127] == pytest.approx(1, abs=1e-6)
    c = at_centres(BINS)
    hits = T.symlog(c) == BINS
    assert hits.sum() > 200  # most centres are reachable exactly from an fp32 target
    onehot = T.twohot(c[hits], BINS)
    assert (onehot.max(-1).values == 1).all()


def test_floor_properties():
    y = torch.cat([T.symexp(torch.linspace(-21, 21, 999)), torch.tensor([0.0, 1.0, 1e9])])
    floor = T.twohot_floor(y, BINS)
    assert (floor >= 0).all() and (floor <= LN2 + 1e-6).all()
    assert floor[-3] == pytest.approx(0, abs=1e-5)  # not 0: the centre bin is 7.45e-8
    assert floor[-1] == 0
    assert 0.5 < floor[-2] < LN2  # a reward of 1 sits between bins: the ~0.6 "plateau"
    mids = T.symexp(((BINS[1:] + BINS[:-1]) / 2).double()).float()
    torch.testing.assert_close(
        T.twohot_floor(mids, BINS), torch.full((254,), LN2), atol=1e-4, rtol=0
    )
    # The floor is reached by logits = log(target), and by nothing else.
    best = torch.log(T.twohot(y, BINS).clamp_min(1e-30))
    loss = T.twohot_loss_reference(best, y, BINS)
    torch.testing.assert_close(loss, floor, atol=1e-5, rtol=1e-5)
    other = best + 0.3 * torch.randn(best.shape, generator=torch.Generator().manual_seed(0))
    assert (T.twohot_loss_reference(other, y, BINS) > floor - 1e-6).all()


def test_real_floor_properties_and_the_floor_moves_with_the_bins():
    y = torch.cat([T.symexp(torch.linspace(-21, 21, 999)), torch.tensor([0.0, 1.0, 1e9])])
    y = torch.cat([y, RBINS[::7], midpoints(RBINS, "real")[::5]])
    floor = T.twohot_floor(y, RBINS, "real")
    assert (floor >= 0).all() and (floor <= LN2 + 1e-6).all()
    assert floor[999] == 0 and floor[1001] == 0  # 0 is a bin; beyond the range: the outer bin
    assert (T.twohot_floor(RBINS, RBINS, "real") == 0).all()  # on any bin: no floor
    torch.testing.assert_close(
        T.twohot_floor(midpoints(RBINS, "real"), RBINS, "real"),
        torch.full((254,), LN2),
        atol=1e-5,
        rtol=0,
    )
    # The floor is reached by logits = log(target), and by nothing else.
    best = torch.log(T.twohot(y, RBINS, "real").clamp_min(1e-30))
    loss = T.twohot_loss_reference(best, y, RBINS, space="real")
    torch.testing.assert_close(loss, floor, atol=1e-5, rtol=1e-5)
    gen = torch.Generator().manual_seed(0)
    for scale in (0.3, 3.0):
        other = best + scale * torch.randn(best.shape, generator=gen)
        assert (T.twohot_loss_reference(other, y, RBINS, space="real") > floor - 1e-6).all()
    # The floor moves with the bins: a reward of 1 lies 40% of the way from bin 131 to 132 in
    # symlog space, but 38% of the way in real space (symexp is convex): a lower floor.
    one = torch.tensor([1.0])
    real, sym = T.twohot_floor(one, RBINS, "real").item(), T.twohot_floor(one, BINS).item()
    assert 0.5 < real < LN2 and 0.5 < sym < LN2
    assert sym - real > 5e-3, f"real-space floor {real:.6f}, symlog-space floor {sym:.6f}"


@pytest.mark.parametrize("impl", ["torch", pytest.param("triton", marks=needs_kernel)])
def test_rare_large_reward_bias(impl):
    """Why the real space: a reward of -100 with probability 0.1, else 0. The expected loss is
    the cross-entropy of the target mixture 0.1 * twohot(-100) + 0.9 * twohot(0), minimised (it
    is convex in the logits) where softmax = that mixture. The real-space optimum predicts the
    mean reward, -10; the symlog-space one predicts symexp(E[symlog r]) = -0.59."""
    zero, big = torch.zeros(1, device=DEVICE), torch.full((1,), -100.0, device=DEVICE)
    preds = {}
    for space in SPACES:
        bins = T.make_bins(255, device=DEVICE, space=space)
        mix = 0.9 * T.twohot(zero, bins, space) + 0.1 * T.twohot(big, bins, space)
        z = torch.log(mix.clamp_min(1e-30)).requires_grad_(True)  # no -inf: 0 * -inf = nan

        # The fused critic path: 0.9 * (CE(0) + CE(-100) / 9), the expected loss.
        def expected_loss(z, bins=bins, space=space):
            return 0.9 * T.twohot_loss(z, zero, bins, big, 1 / 9, impl, space)

        (grad,) = torch.autograd.grad(expected_loss(z).sum(), z)
        assert grad.abs().max() < 1e-6  # stationary, hence the minimum
        gen = torch.Generator().manual_seed(3)
        other = z.detach() + 0.1 * torch.randn(z.shape, generator=gen).to(DEVICE)
        assert expected_loss(other) > expected_loss(z.detach())
        preds[space] = T.twohot_mean(z.detach(), bins, space).item()
    assert preds["real"] == pytest.approx(-10.0, rel=1e-5)
    assert preds["symlog"] == pytest.approx(-math.expm1(0.1 * math.log1p(100)), rel=1e-4)
    assert preds["symlog"] == pytest.approx(-0.59, abs=0.01)


@pytest.mark.parametrize("space", SPACES)
def test_reference_mixture_and_gradient_formula(space):
    gen = torch.Generator().manual_seed(1)
    bins = T.make_bins(255, space=space)
    logits = torch.randn(3, 4, 255, generator=gen, dtype=torch.float64, requires_grad=True)
    y = target_pool(bins, 12, gen, space).view(3, 4)
    y2 = target_pool(bins, 12, gen, space).view(3, 4)
    loss = T.twohot_loss_reference(logits, y, bins, y2, 0.3, space)
    logp = torch.log_softmax(logits, -1)
    t1, t2 = T.twohot(y, bins, space), T.twohot(y2, bins, space)
    torch.testing.assert_close(loss, -(t1 * logp).sum(-1) - 0.3 * (t2 * logp).sum(-1))
    g = torch.randn(3, 4, generator=gen, dtype=torch.float64)
    (grad,) = torch.autograd.grad(loss, logits, g)
    expected = (1.3 * logp.detach().exp() - t1 - 0.3 * t2) * g[..., None]
    torch.testing.assert_close(grad, expected.to(grad.dtype))
    small = logits.detach()[:1, :2].clone().requires_grad_(True)
    fn = lambda z: T.twohot_loss_reference(z, y[:1, :2], bins, y2[:1, :2], 0.3, space)
    assert torch.autograd.gradcheck(fn, (small,), fast_mode=True)


# --------------------------------------------------------------------------------------------
# Triton kernel vs reference (fp32; interpreted on the CPU)
# --------------------------------------------------------------------------------------------

SHAPES = [(1, 255), (7, 255), (3, 5, 255), (33, 255), (4, 3), (5, 101), (2, 1023)]


def run_both(logits, y, bins, y2=None, coef2=0.0, grad_out=None, space="symlog"):
    """(loss, logits grad) from the kernel and from the fp32 reference, same upstream grad."""
    out = []
    for fn in (T.twohot_loss_triton, T.twohot_loss_reference):
        z = logits.detach().clone().requires_grad_(True)
        loss = fn(z, y, bins, y2, coef2, space)
        (grad,) = torch.autograd.grad(loss, z, grad_out)
        out.append((loss, grad))
    return out


def make_case(shape, seed, dtype=torch.float32, space="symlog", nan=False):
    """logits, y, bins, y2, upstream grad; with nan, y[1] and y2[2] are NaN where they exist."""
    gen = torch.Generator().manual_seed(seed)
    bins = T.make_bins(shape[-1], space=space)
    logits = 3 * torch.randn(shape, generator=gen)
    n = math.prod(shape[:-1])
    y = target_pool(bins, n, gen, space).view(shape[:-1])
    y2 = target_pool(bins, n, gen, space).view(shape[:-1])
    if nan:
        y.view(-1)[1:2] = math.nan
        y2.view(-1)[2:3] = math.nan
    g = torch.randn(shape[:-1], generator=gen)
    to = lambda t: t.to(DEVICE)
    return to(logits).to(dtype), to(y), to(bins), to(y2), to(g)


def target_slack(y, bins, y2=None, coef2=0.0, space="symlog") -> torch.Tensor:
    return w_slack(y, bins, space) + (0 if y2 is None else coef2 * w_slack(y2, bins, space))


def split_nan_rows(loss, ref_loss, grad):
    """Rows whose reference loss is NaN (a NaN target) must be NaN in the kernel's loss and
    gradient too; returns the mask of the other rows, to compare."""
    nan = ref_loss.isnan()
    assert torch.equal(loss.isnan(), nan), "NaN rows differ"
    assert grad[nan].isnan().any(-1).all(), "a NaN target's row has a finite gradient"
    return ~nan


def assert_loss_close(loss, ref_loss, logits, slack):
    """1e-5 relative, plus what the targets' slack explains."""
    z = logits.float()
    spread = z.amax(-1) - z.amin(-1)  # bounds |log p[i] - log p[i + 1]|
    assert_within(loss, ref_loss, 1e-5 * ref_loss.abs() + 1e-5 + slack * spread, "loss")


def assert_grad_close(grad, ref_grad, g, slack):
    # bf16 gradients: each side is rounded once from fp32, so up to one bf16 ulp apart.
    rtol = 1e-5 if grad.dtype == torch.float32 else 2**-7
    bound = rtol * ref_grad.float().abs() + 1e-6 + (g.abs() * slack)[..., None]
    assert_within(grad.float(), ref_grad.float(), bound, "logits grad")


@needs_kernel
@pytest.mark.filterwarnings("ignore:invalid value encountered")  # NaN targets, interpreted
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("mix", ["single", "mixture", "same_targets"])
@pytest.mark.parametrize("space", SPACES)
def test_kernel_matches_reference_fp32(shape, mix, space):
    seed = len(shape) * 1000 + shape[-1]
    logits, y, bins, y2, g = make_case(shape, seed=seed, space=space, nan=True)
    y2, coef2 = {"single": (None, 0.0), "mixture": (y2, 0.3), "same_targets": (y, 1.7)}[mix]
    (loss, grad), (ref_loss, ref_grad) = run_both(logits, y, bins, y2, coef2, g, space)
    assert loss.dtype == torch.float32 and loss.shape == shape[:-1]
    assert grad.dtype == logits.dtype and grad.shape == shape
    ok = split_nan_rows(loss, ref_loss, grad)
    assert ok.sum() >= 1 and (ok.numel() < 3 or not ok.all())
    slack = target_slack(y, bins, y2, coef2, space)[ok]
    assert_loss_close(loss[ok], ref_loss[ok], logits[ok], slack)
    assert_grad_close(grad[ok], ref_grad[ok], g[ok], slack)


@needs_kernel
@pytest.mark.parametrize("space", SPACES)
def test_same_targets_is_scaled_single_target(space):
    logits, y, bins, _, g = make_case((6, 255), seed=3, space=space)
    (single, g_single), _ = run_both(logits, y, bins, None, 0.0, g, space)
    (mixed, g_mixed), _ = run_both(logits, y, bins, y, 0.5, g, space)
    torch.testing.assert_close(mixed, 1.5 * single, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(g_mixed, 1.5 * g_single, rtol=1e-6, atol=1e-7)


@needs_kernel
@pytest.mark.parametrize(
    "space,k",
    [("symlog", 3), ("symlog", 255), ("symlog", 1023)]
    # Even K: the official real bins hold 0 twice (0 and -0), so the symlog grid the kernel
    # locates on is not uniform there.
    + [("real", k) for k in (2, 3, 4, 6, 255, 256, 1023)],
)
def test_kernel_twohot_matches_bucketize(space, k):
    # With zero logits and unit upstream grad the gradient is 1/K - target: the kernel's
    # arithmetic two-hot, read out, against the bucketize one.
    bins = T.make_bins(k, space=space)
    c = at_centres(bins, space)
    # A few ulps around every centre: where floor((x - first) / step) is off by one either way
    # (a few per K; fewer neighbours at K = 1023 to keep the interpreter fast).
    near = ulp_neighbours(c, 8 if k <= 255 else 2).flatten()
    small = torch.logspace(-30, 0, 301)
    y = torch.cat(
        [
            c,
            near,
            T.symexp(torch.linspace(-22, 22, 2001)),
            midpoints(bins, space),
            torch.cat([small, -small]),
            torch.tensor([0.0, -0.0, 1e3, -1e3, 1e9, -1e9, float("inf"), -float("inf")]),
        ]
    ).to(DEVICE)
    z = torch.zeros(len(y), k, device=DEVICE, requires_grad=True)
    T.twohot_loss_triton(z, y, bins.to(DEVICE), space=space).sum().backward()
    target = 1.0 / k - z.grad
    ref = T.twohot(y, bins.to(DEVICE), space)
    # Anything beyond the coordinate's rounding, e.g. a wrong bin next to a centre, fails this.
    slack = w_slack(y, bins.to(DEVICE), space)[:, None]
    assert_within(target, ref, slack, "two-hot target")
    assert (target[: len(c)].argmax(-1) == ref[: len(c)].argmax(-1)).all()


@needs_kernel
@pytest.mark.parametrize("space", SPACES)
def test_targets_get_no_gradient_and_finite_differences_agree(space):
    logits, y, bins, y2, g = make_case((4, 255), seed=5, space=space)
    z = logits.clone().requires_grad_(True)
    y, y2 = y.clone().requires_grad_(True), y2.clone().requires_grad_(True)
    loss = T.twohot_loss_triton(z, y, bins, y2, 0.4, space)
    assert loss.requires_grad
    (loss * g).sum().backward()
    assert y.grad is None and y2.grad is None
    t1, t2 = T.twohot(y.detach(), bins, space), T.twohot(y2.detach(), bins, space)
    expected = (1.4 * torch.softmax(logits, -1) - t1 - 0.4 * t2) * g[:, None]
    slack = target_slack(y.detach(), bins, y2.detach(), 0.4, space)
    assert_grad_close(z.grad, expected, g, slack)
    # Central difference along one random direction (fp32, so a coarse eps).
    d = torch.randn(logits.shape, generator=torch.Generator().manual_seed(6)).to(DEVICE)
    f = lambda x: (T.twohot_loss_triton(x, y.detach(), bins, y2.detach(), 0.4, space) * g).sum()
    eps = 1e-2
    fd = (f(logits + eps * d) - f(logits - eps * d)) / (2 * eps)
    assert fd.item() == pytest.approx((z.grad * d).sum().item(), rel=1e-3, abs=1e-3)


@needs_kernel
@pytest.mark.parametrize("space", SPACES)
def test_expanded_upstream_grad_and_non_contiguous_logits(space):
    logits, y, bins, _, _ = make_case((5, 255), seed=7, space=space)
    wide = torch.randn(255, 5, device=DEVICE).t()  # non-contiguous (5, 255)
    g = torch.full((5,), 1 / 5, device=DEVICE)
    for z0 in (logits, wide):
        grads = []
        for fn in (T.twohot_loss_triton, T.twohot_loss_reference):
            z = z0.clone().requires_grad_(True)  # clone keeps the strides
            # The upstream grad is a stride-0 expanded scalar.
            fn(z, y, bins, space=space).mean().backward()
            grads.append(z.grad)
        assert_grad_close(grads[0], grads[1], g, target_slack(y, bins, space=space))


@needs_kernel
def test_empty_batch():
    z = torch.zeros(0, 255, device=DEVICE, requires_grad=True)
    loss = T.twohot_loss_triton(z, torch.zeros(0, device=DEVICE), BINS.to(DEVICE))
    assert loss.shape == (0,)
    loss.sum().backward()
    assert z.grad.shape == (0, 255)


@needs_kernel
@pytest.mark.filterwarnings("ignore:invalid value encountered")  # numpy, under the interpreter
@pytest.mark.parametrize("space", SPACES)
def test_nan_target_gives_nan_loss(space):
    logits, y, bins, _, _ = make_case((3, 255), seed=10, space=space)
    y[1] = float("nan")
    z = logits.clone().requires_grad_(True)
    loss = T.twohot_loss_triton(z, y, bins, space=space)
    loss.sum().backward()
    assert loss[1].isnan() and not loss[[0, 2]].isnan().any()
    assert z.grad[1].isnan().any() and not z.grad[[0, 2]].isnan().any()
    assert T.twohot_loss_reference(logits, y, bins, space=space)[1].isnan()


@needs_kernel
@pytest.mark.parametrize("space", SPACES)
def test_dispatcher_and_input_checks(space):
    logits, y, bins, y2, _ = make_case((3, 255), seed=8, space=space)
    a = T.twohot_loss(logits, y, bins, y2, 0.2, impl="torch", space=space)
    b = T.twohot_loss(logits, y, bins, y2, 0.2, impl="triton", space=space)
    assert_loss_close(b, a, logits, target_slack(y, bins, y2, 0.2, space))
    # `space` reaches both implementations (positionally too): had it been dropped, these bins
    # would be read as the other space's and give another loss.
    assert torch.equal(a, T.twohot_loss_reference(logits, y, bins, y2, 0.2, space))
    other = "real" if space == "symlog" else "symlog"
    assert not torch.allclose(T.twohot_loss_reference(logits, y, bins, y2, 0.2, other), a)
    for impl in ("torch", "triton"):
        c = T.twohot_loss(logits, y, bins, y2, 0.2, impl, space)
        assert_loss_close(c, a, logits, target_slack(y, bins, y2, 0.2, space))
    with pytest.raises(ValueError, match="impl"):
        T.twohot_loss(logits, y, bins, impl="cuda")
    for impl in ("torch", "triton"):
        with pytest.raises(ValueError, match="'symexp'"):
            T.twohot_loss(logits, y, bins, impl=impl, space="symexp")
    for fn in (T.twohot, T.twohot_floor, T.twohot_mean):
        with pytest.raises(ValueError, match="'Real'"):
            fn(logits if fn is T.twohot_mean else y, bins, "Real")
    with pytest.raises(ValueError, match="'linear'"):
        T.make_bins(255, space="linear")
    with pytest.raises(ValueError, match="bins"):
        T.twohot_loss_triton(logits, y, bins[:-1])
    with pytest.raises(ValueError, match="y2"):
        T.twohot_loss_triton(logits, y, bins, y2[:2], 0.2)
    with pytest.raises(TypeError, match="coef2"):
        T.twohot_loss_triton(logits, y, bins, y2, torch.tensor(0.2))


# --------------------------------------------------------------------------------------------
# GPU only: bf16 logits, CUDA-graph capture
# --------------------------------------------------------------------------------------------


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("mix", ["single", "mixture"])
@pytest.mark.parametrize("space", SPACES)
def test_kernel_bf16(shape, mix, space):
    logits, y, bins, y2, g = make_case(shape, seed=shape[-1], dtype=torch.bfloat16, space=space)
    y2, coef2 = (None, 0.0) if mix == "single" else (y2, 0.3)
    # Same bf16 values, reference upcast to fp32: the kernel upcasts on load too, so the loss
    # is held to the fp32 bound; the gradient differs by its final rounding to bf16.
    (loss, grad), (ref_loss, ref_grad) = run_both(logits, y, bins, y2, coef2, g, space)
    assert loss.dtype == torch.float32 and grad.dtype == torch.bfloat16
    slack = target_slack(y, bins, y2, coef2, space)
    assert_loss_close(loss, ref_loss, logits, slack)
    assert_grad_close(grad, ref_grad, g, slack)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("space", SPACES)
def test_cuda_graph_capture(space):
    logits, y, bins, y2, g = make_case((64, 255), seed=9, space=space)
    z = logits.clone().requires_grad_(True)
    loss = lambda: T.twohot_loss_triton(z, y, bins, y2, 0.3, space)
    step = lambda: torch.autograd.grad(loss(), z, g)[0]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compile and warm up outside the capture
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):  # fails if anything syncs with the host
        grad = step()
    with torch.no_grad():
        z.copy_(torch.randn_like(z))
    y.copy_(y.flip(0))
    graph.replay()
    assert torch.equal(grad, step())  # the replay saw the new inputs, same kernels as eager


def test_a_tensor_space_flag_selects_per_member_under_vmap():
    """A population mixing the spaces holds each member's space as a bool tensor (True: real)
    and its own bins: under vmap every function computes exactly what the named space gives
    that member, values and logits gradient alike; the Triton kernel refuses a flag."""
    spaces = ["real", "symlog", "symlog", "real"]
    gen = torch.Generator().manual_seed(5)
    logits = (torch.randn(4, 6, 255, generator=gen) * 2).requires_grad_(True)
    y = torch.randn(4, 6, generator=gen) * torch.tensor([1.0, 300.0, 1.0, 300.0])[:, None]
    y2 = torch.randn(4, 6, generator=gen) * 20
    bins = torch.stack([T.make_bins(255, space=s) for s in spaces])
    flags = torch.tensor([s == "real" for s in spaces])

    def each(z, y, y2, bins, flag):
        return (
            T.twohot_loss_reference(z, y, bins, y2, 0.3, flag),
            T.twohot_mean(z, bins, flag),
            T.twohot_floor(y, bins, flag),
        )

    out = torch.func.vmap(each)(logits, y, y2, bins, flags)
    (grad,) = torch.autograd.grad(out[0].sum(), logits)
    for k, space in enumerate(spaces):
        z = logits[k].detach().requires_grad_(True)
        want = each(z, y[k], y2[k], bins[k], space)
        for got, ref in zip(out, want):
            torch.testing.assert_close(got[k], ref, rtol=1e-6, atol=1e-6)
        (ref_grad,) = torch.autograd.grad(want[0].sum(), z)
        torch.testing.assert_close(grad[k], ref_grad, rtol=1e-6, atol=1e-7)
        # The flag mattered: the other space's loss differs.
        other = "symlog" if space == "real" else "real"
        other_loss = T.twohot_loss_reference(z, y[k], bins[k], y2[k], 0.3, other)
        assert not torch.allclose(other_loss, want[0])
    with pytest.raises(ValueError, match="tensor flag"):
        T.twohot_loss_triton(logits[0].detach(), y[0], bins[0], space=flags[0])
