import math

import pytest
import torch

from engine import dists

BINS = dists.make_bins(255)
# Both two-hot spaces: (bins, the coordinate the bins are in).
SPACES = {
    "symlog": (BINS, dists.symlog),
    "real": (dists.make_bins(255, space="real"), lambda y: y),
}


def test_symlog_symexp_round_trip():
    x = torch.tensor([-1e6, -100.0, -1.0, -1e-3, 0.0, 1e-3, 0.5, 1.0, 100.0, 1e6])
    torch.testing.assert_close(dists.symexp(dists.symlog(x)), x, rtol=1e-5, atol=1e-6)
    assert dists.symlog(torch.tensor(1.0)).item() == pytest.approx(math.log(2))


@pytest.mark.parametrize("space", SPACES)
def test_twohot_is_a_distribution_with_the_right_mean(space):
    bins, coord = SPACES[space]
    y = torch.tensor([-250.0, -3.3, 0.0, 0.7, 1.0, 12.0, 499.0])
    t = dists.twohot(y, bins, space)
    torch.testing.assert_close(t.sum(-1), torch.ones(len(y)))
    assert ((t > 0).sum(-1) <= 2).all()
    # The expectation over the bins, in the bins' space (symlog(y), or y itself in real space):
    # the encoding is exact there.
    torch.testing.assert_close((t * bins).sum(-1), coord(y), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("space", SPACES)
def test_twohot_round_trip_through_logits(space):
    bins = SPACES[space][0]
    y = torch.tensor([-42.0, -1.0, 0.0, 1.0, 3.7, 500.0])
    logits = torch.log(dists.twohot(y, bins, space).clamp_min(1e-30))
    torch.testing.assert_close(dists.twohot_mean(logits, bins, space), y, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("space", SPACES)
def test_twohot_clamps_beyond_the_outer_bins(space):
    t = dists.twohot(torch.tensor([1e12, -1e12]), SPACES[space][0], space)
    assert t[0, -1] == 1 and t[1, 0] == 1


@pytest.mark.parametrize("space", SPACES)
def test_twohot_loss_floor_is_target_entropy(space):
    bins = SPACES[space][0]
    y = torch.tensor([1.0, 0.0, 7.5, -2.0])
    target = dists.twohot(y, bins, space)
    best = torch.log(target.clamp_min(1e-30))
    floor = dists.twohot_floor(y, bins, space)
    loss = dists.twohot_loss(best, y, bins, space=space)
    torch.testing.assert_close(loss, floor, atol=1e-5, rtol=1e-5)
    assert (floor <= math.log(2) + 1e-6).all()
    # A reward of exactly 0 sits on a bin: no floor. A reward of 1 (CartPole) does not: the
    # archive's reward-loss "plateau" of ~0.6 is this floor.
    assert floor[1] == pytest.approx(0.0, abs=1e-4)
    assert 0.5 < floor[0] < math.log(2)
    # Any other prediction is worse.
    torch.manual_seed(0)
    other = best + 0.3 * torch.randn_like(best)
    assert (dists.twohot_loss(other, y, bins, space=space) > floor - 1e-6).all()
    assert (dists.twohot_loss(torch.zeros_like(best), y, bins, space=space) > floor + 1).all()


@pytest.mark.parametrize("space", SPACES)
def test_twohot_loss_gradient_is_softmax_minus_target(space):
    bins = SPACES[space][0]
    logits = torch.randn(5, 255, requires_grad=True)
    y = torch.randn(5) * 10
    dists.twohot_loss(logits, y, bins, space=space).sum().backward()
    expected = torch.softmax(logits.detach(), -1) - dists.twohot(y, bins, space)
    torch.testing.assert_close(logits.grad, expected, atol=1e-6, rtol=1e-5)


def test_unimix_floor_and_normalisation():
    logits = torch.tensor([[100.0, 0.0, -100.0, 0.0]])
    p = dists.unimix_probs(logits, 0.01)
    torch.testing.assert_close(p.sum(-1), torch.ones(1))
    assert p.min() >= 0.01 / 4 - 1e-7
    torch.testing.assert_close(dists.unimix_logits(logits, 0.01).exp(), p)


def test_straight_through_sample():
    torch.manual_seed(0)
    probs = torch.tensor([0.1, 0.6, 0.3]).expand(20000, 3).clone().requires_grad_(True)
    s = dists.sample_onehot(probs)
    hard = s.detach().round()
    torch.testing.assert_close(s.detach(), hard)  # forward value is one-hot (up to rounding)
    assert (hard.sum(-1) == 1).all()
    freq = hard.mean(0)
    torch.testing.assert_close(freq, torch.tensor([0.1, 0.6, 0.3]), atol=0.015, rtol=0)
    w = torch.randn(3)
    (s * w).sum().backward()
    torch.testing.assert_close(probs.grad, w.expand(20000, 3))  # gradient passes straight through


def _logits_with_kl_per_latent(latents: int, kl_each: float):
    """Posterior/prior logits (1, L, 2) whose KL per latent is kl_each (found by bisection)."""
    lo, hi = 0.0, 20.0
    for _ in range(100):
        mid = (lo + hi) / 2
        post = torch.tensor([[mid, 0.0]]).log_softmax(-1)
        prior = torch.tensor([[0.0, 0.0]]).log_softmax(-1)
        kl = dists.categorical_kl(post[None], prior[None]).item()
        lo, hi = (mid, hi) if kl < kl_each else (lo, mid)
    post = torch.tensor([lo, 0.0]).expand(1, latents, 2).clone()
    prior = torch.zeros(1, latents, 2)
    return post, prior


def test_free_bits_clip_the_whole_step_not_each_latent():
    # 4 latents with KL 0.3 each: the step's KL is 1.2 > 1 free nat, so nothing is clipped.
    post, prior = _logits_with_kl_per_latent(4, 0.3)
    dyn, rep, kl = dists.kl_losses(post, prior, unimix=0.0, free_bits=1.0)
    assert kl.item() == pytest.approx(1.2, abs=1e-4)
    assert dyn.item() == pytest.approx(1.2, abs=1e-4) and rep.item() == pytest.approx(1.2, abs=1e-4)
    # 2 latents with 0.3 each: 0.6 < 1 free nat, clipped to 1 with no gradient.
    post, prior = _logits_with_kl_per_latent(2, 0.3)
    post.requires_grad_(True)
    prior.requires_grad_(True)
    dyn, rep, _ = dists.kl_losses(post, prior, unimix=0.0, free_bits=1.0)
    assert dyn.item() == 1.0 and rep.item() == 1.0
    (dyn + rep).sum().backward()
    assert post.grad.abs().max() == 0 and prior.grad.abs().max() == 0


def test_dyn_trains_prior_and_rep_trains_posterior():
    torch.manual_seed(0)
    post = torch.randn(3, 32, 16, requires_grad=True)
    prior = torch.randn(3, 32, 16, requires_grad=True)
    dyn, rep, _ = dists.kl_losses(post, prior, unimix=0.01, free_bits=1.0)
    assert (dyn > 1).all()
    g_post, g_prior = torch.autograd.grad(dyn.sum(), (post, prior), allow_unused=True)
    assert g_post is None and g_prior.abs().max() > 0
    g_post, g_prior = torch.autograd.grad(rep.sum(), (post, prior), allow_unused=True)
    assert g_post.abs().max() > 0 and g_prior is None
