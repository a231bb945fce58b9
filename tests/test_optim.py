import pytest
import torch

from engine.optim import Optimizer, agc_factors


def test_matches_torch_adam_with_weight_decay_and_clipping():
    torch.manual_seed(0)
    ref = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3))
    mine = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3))
    mine.load_state_dict(ref.state_dict())
    clip = 0.5
    opt_ref = torch.optim.Adam(ref.parameters(), lr=1e-2, eps=1e-8, weight_decay=1e-3)
    opt = Optimizer(mine.parameters(), 1e-2, eps=1e-8, weight_decay=1e-3, clip=clip)
    for _ in range(6):
        x = torch.randn(16, 5)
        opt_ref.zero_grad()
        ref(x).square().sum().backward()
        norm_ref = torch.nn.utils.clip_grad_norm_(ref.parameters(), clip)
        opt_ref.step()
        norm = opt.step(mine(x).square().sum())
        torch.testing.assert_close(norm, norm_ref, rtol=1e-5, atol=1e-5)
        for a, b in zip(ref.parameters(), mine.parameters()):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_state_round_trip_and_lr_change():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(4))
    opt = Optimizer([w], 0.1)
    opt.step((w**2).sum())
    w2 = torch.nn.Parameter(w.detach().clone())
    opt2 = Optimizer([w2], 0.1)
    opt2.load_state_dict(opt.state_dict())
    opt.step((w**2).sum())
    opt2.step((w2**2).sum())
    torch.testing.assert_close(w, w2)
    opt2.set_lr(0.0)
    before = w2.detach().clone()
    opt2.step((w2**2).sum())
    torch.testing.assert_close(w2.detach(), before)


def test_gradient_with_other_strides_updates_the_right_elements():
    # Compiled backward can hand back a conv weight gradient in channels-last order; the fused
    # kernel walks memory, so the optimizer must lay the gradient out like its parameter.
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(2, 3, 4, 4))
    target = torch.randn(2, 3, 4, 4)

    class ChannelsLastGrad(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, g):
            return g.contiguous(memory_format=torch.channels_last)

    ref = torch.nn.Parameter(w.detach().clone())
    opt, opt_ref = Optimizer([w], 0.1), Optimizer([ref], 0.1)
    opt.step((ChannelsLastGrad.apply(w) * target).sum())
    opt_ref.step((ref * target).sum())
    torch.testing.assert_close(w, ref)


def test_laprop_against_a_hand_computation():
    # Two updates of one tensor by the formulas of official DreamerV3's scale_by_rms then
    # scale_by_momentum (both bias-corrected), written out by hand in float64.
    w0 = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    w = torch.nn.Parameter(w0.clone())
    lr, b1, b2, eps, wd = 0.1, 0.9, 0.999, 1e-20, 0.01
    opt = Optimizer([w], lr, kind="laprop", betas=(b1, b2), eps=eps, weight_decay=wd)
    target = torch.tensor([3.0, 1.0, -1.0], dtype=torch.float64)
    m = v = torch.zeros(3, dtype=torch.float64)
    expected = w0.clone()
    for k in (1, 2):
        g = 2 * (expected - target) * torch.tensor([1.0, 10.0, 0.1], dtype=torch.float64)
        v = b2 * v + (1 - b2) * g * g
        u = g / ((v / (1 - b2**k)).sqrt() + eps)
        m = b1 * m + (1 - b1) * u
        expected = expected - lr * (m / (1 - b1**k) + wd * expected)
        opt.step(((w - target).square() * torch.tensor([1.0, 10.0, 0.1], dtype=w.dtype)).sum())
        # The step count is an fp32 device tensor, so 1 - 0.999^k carries fp32 rounding
        # (1e-5 relative at k = 1); everything else is float64.
        torch.testing.assert_close(w.detach(), expected, rtol=2e-5, atol=1e-12)
    # LaProp's first step is lr x sign(g) (+ decay) like Adam's, the second differs from Adam's.
    w_adam = torch.nn.Parameter(w0.clone())
    adam = Optimizer([w_adam], lr, kind="adam", betas=(b1, b2), eps=eps)
    for _ in range(2):
        adam.step(((w_adam - target).square() * torch.tensor([1.0, 10.0, 0.1])).sum())
    assert not torch.allclose(w_adam.detach(), w.detach(), atol=1e-4)


def test_agc_clips_each_tensor_by_its_ratio_to_the_parameter_norm():
    big = torch.nn.Parameter(torch.full((4,), 10.0))  # norm 20
    small = torch.nn.Parameter(torch.full((4,), 0.1))  # norm 0.2
    tiny = torch.nn.Parameter(torch.zeros(4))  # norm 0: the 1e-3 floor applies
    grads = [torch.full((4,), 1.0), torch.full((4,), 1.0), torch.full((4,), 1.0)]  # norms 2
    f = agc_factors([big, small, tiny], grads, 0.3)
    # big: 2 <= 0.3 x 20 = 6, untouched; small: scaled to 0.3 x 0.2 = 0.06; tiny: to 3e-4.
    torch.testing.assert_close(f, torch.tensor([1.0, 0.06 / 2, 0.3e-3 / 2]))
    # In an update, the clipped gradient is the one applied: with a huge eps LaProp's first
    # step is lr x g / eps, so the step's norm is the clipped gradient's norm x lr / eps.
    params = [torch.nn.Parameter(p.detach().double()) for p in (big, small, tiny)]
    opt = Optimizer(params, 1.0, kind="laprop", agc=0.3, eps=1e9)
    before = [p.detach().clone() for p in params]
    opt.step(sum(p.sum() for p in params))
    steps = torch.stack([(b - p.detach()).norm() for b, p in zip(before, params)])
    expected = torch.tensor([2.0, 0.06, 3e-4], dtype=torch.float64)
    torch.testing.assert_close(steps * 1e9, expected, rtol=1e-6, atol=0)


def test_agc_is_off_at_zero_and_global_clip_still_reports_the_raw_norm():
    w = torch.nn.Parameter(torch.full((4,), 0.1))
    opt = Optimizer([w], 0.1, agc=0.0, clip=0.0)
    norm = opt.step((w * 3.0).sum())
    assert norm.item() == pytest.approx(6.0)
    w2 = torch.nn.Parameter(torch.full((4,), 0.1))
    opt2 = Optimizer([w2], 0.1, agc=0.3, clip=1.0)
    assert opt2.step((w2 * 3.0).sum()).item() == pytest.approx(6.0)  # before any clipping


@pytest.mark.parametrize("kind", ["adam", "laprop"])
def test_warmup_ramps_the_learning_rate_linearly_from_zero(kind):
    w = torch.nn.Parameter(torch.zeros(1))
    opt = Optimizer([w], 0.4, kind=kind, warmup=4)
    lrs, moves = [], []
    for _ in range(6):
        lrs.append(opt.current_lr().item())
        before = w.detach().clone()
        opt.step((w * 1.0).sum())  # a constant gradient: every step is lr x 1 (sign step)
        moves.append((before - w.detach()).item())
    assert lrs == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4, 0.4])
    assert moves == pytest.approx(lrs, rel=1e-5, abs=1e-7)
    opt.set_lr(0.8)  # a new base rate after the warm-up applies in full
    assert opt.current_lr().item() == pytest.approx(0.8)


def test_warmup_state_survives_a_checkpoint():
    w = torch.nn.Parameter(torch.zeros(1))
    opt = Optimizer([w], 0.4, kind="laprop", warmup=4)
    for _ in range(2):
        opt.step((w * 1.0).sum())
    opt2 = Optimizer([torch.nn.Parameter(torch.zeros(1))], 0.4, kind="laprop", warmup=4)
    opt2.load_state_dict(opt.state_dict())
    assert opt2.current_lr().item() == pytest.approx(0.2)


def test_unknown_kind_is_refused():
    with pytest.raises(ValueError, match="sgd"):
        Optimizer([torch.nn.Parameter(torch.zeros(1))], 0.1, kind="sgd")
