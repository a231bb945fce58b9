import torch

from engine.optim import Adam


def test_matches_torch_adam_with_weight_decay_and_clipping():
    torch.manual_seed(0)
    ref = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3))
    mine = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3))
    mine.load_state_dict(ref.state_dict())
    clip = 0.5
    opt_ref = torch.optim.Adam(ref.parameters(), lr=1e-2, eps=1e-8, weight_decay=1e-3)
    opt = Adam(mine.parameters(), 1e-2, eps=1e-8, weight_decay=1e-3, clip=clip)
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
    opt = Adam([w], 0.1)
    opt.step((w**2).sum())
    w2 = torch.nn.Parameter(w.detach().clone())
    opt2 = Adam([w2], 0.1)
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
    opt, opt_ref = Adam([w], 0.1), Adam([ref], 0.1)
    opt.step((ChannelsLastGrad.apply(w) * target).sum())
    opt_ref.step((ref * target).sum())
    torch.testing.assert_close(w, ref)
