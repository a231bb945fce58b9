"""StackedOptimizer (a population's optimizer): member k of a stack is updated exactly as a
single Optimizer updates its own tensors, with its own settings, clips and step count."""

import pytest
import torch

from engine.optim import Optimizer, StackedOptimizer, member_norms

SHAPES = [(5, 3), (7,), (2, 3, 4)]
K = 3


def loss_of(x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return ((x - target) ** 2).sum() + 0.3 * (x**3).sum()


def members(seed: int = 0):
    """K members' tensors and loss targets, with one member's gradients 100x larger (so clips
    bind for it and not for the others)."""
    g = torch.Generator().manual_seed(seed)
    params = [[torch.randn(s, generator=g) for s in SHAPES] for _ in range(K)]
    targets = [[torch.randn(s, generator=g) * (100.0 if k == 1 else 1.0) for s in SHAPES]
               for k in range(K)]  # fmt: skip
    return params, targets


SETTINGS = [
    dict(kind="adam", lr=[1e-2, 3e-3, 5e-2], betas=([0.9, 0.8, 0.95], [0.999, 0.99, 0.9]),
         eps=[1e-8, 1e-3, 1e-20], weight_decay=[0.0, 0.1, 0.01], clip=[0.0, 5.0, 1.0],
         agc=0.0, warmup=0),
    dict(kind="laprop", lr=[4e-5, 1e-2, 3e-3], betas=(0.9, [0.999, 0.99, 0.98]),
         eps=1e-20, weight_decay=[0.0, 0.01, 0.1], clip=0.0, agc=[0.3, 0.3, 0.0], warmup=4),
    dict(kind="laprop", lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
         clip=[1.0, 0.0, 10.0], agc=[0.0, 0.3, 0.1], warmup=2),
    # Members differing in the optimizer and its warm-up (an ablation's arms in one population).
    dict(kind=["laprop", "adam", "laprop"], lr=[4e-3, 1e-2, 3e-3], betas=(0.9, 0.999),
         eps=[1e-20, 1e-8, 1e-20], weight_decay=[0.01, 0.1, 0.0], clip=[0.0, 5.0, 0.0],
         agc=[0.3, 0.0, 0.3], warmup=[3, 0, 5]),
]  # fmt: skip


def pick(value, k):
    return value[k] if isinstance(value, list) else value


@pytest.mark.parametrize(
    "setting", SETTINGS, ids=["adam", "laprop-agc", "laprop-agc+clip", "mixed-kind+warmup"]
)
def test_each_member_matches_a_single_optimizer(setting):
    params, targets = members()
    stacked = [torch.stack([params[k][i] for k in range(K)]).requires_grad_() for i in range(3)]
    opt = StackedOptimizer(stacked, K, **setting)
    singles = []
    for k in range(K):
        kw = {n: pick(v, k) for n, v in setting.items() if n != "betas"}
        kw["betas"] = tuple(pick(b, k) for b in setting["betas"])
        ps = [p.clone().requires_grad_() for p in params[k]]
        singles.append((ps, Optimizer(ps, **kw)))
    for _ in range(6):
        loss = sum(loss_of(p[k], targets[k][i]) for i, p in enumerate(stacked) for k in range(K))
        norms = opt.step(loss)
        for k, (ps, single) in enumerate(singles):
            norm = single.step(sum(loss_of(p, t) for p, t in zip(ps, targets[k])))
            assert norms[k].item() == pytest.approx(norm.item(), rel=1e-5)
    for k, (ps, single) in enumerate(singles):
        for p, s in zip(ps, stacked):
            torch.testing.assert_close(s[k].detach(), p.detach(), rtol=1e-5, atol=1e-6)
        for a, b in zip(opt.m + opt.v, single.m + single.v):
            torch.testing.assert_close(a[k], b, rtol=1e-4, atol=1e-8)  # fp32 rounding order
        assert opt.count[k].item() == single.count.item() == 6


def test_clips_act_per_member_never_across():
    """Member 1's huge gradient is clipped to its own clip; members 0 and 2 (no clip) take the
    same step as in a population without member 1's gradient."""
    params, targets = members()
    runs = []
    for big in (100.0, 1.0):
        stacked = [torch.stack([params[k][i] for k in range(K)]).requires_grad_() for i in range(3)]
        opt = StackedOptimizer(stacked, K, lr=0.1, kind="adam", clip=[0.0, 1.0, 0.0])
        loss = sum(
            loss_of(p[k], targets[k][i] * (big if k == 1 else 1.0) / 100.0 ** (k == 1))
            for i, p in enumerate(stacked)
            for k in range(K)
        )
        opt.step(loss)
        runs.append([s.detach().clone() for s in stacked])
    for a, b in zip(*runs):
        torch.testing.assert_close(a[[0, 2]], b[[0, 2]])


def test_a_frozen_member_does_not_change_even_with_nan_gradients():
    params, targets = members()
    stacked = [torch.stack([params[k][i] for k in range(K)]).requires_grad_() for i in range(3)]
    opt = StackedOptimizer(stacked, K, lr=1e-2, kind="laprop", agc=0.3, clip=1.0, warmup=3)
    opt.active[1] = 0.0
    before = [s.detach().clone() for s in stacked]
    for _ in range(3):
        nan = torch.tensor(float("nan"))
        loss = sum(
            loss_of(p[k], targets[k][i]) * (nan if k == 1 else 1.0)
            for i, p in enumerate(stacked)
            for k in range(K)
        )
        opt.step(loss)
    for s, b in zip(stacked, before):
        assert torch.equal(s[1].detach(), b[1])  # untouched
        assert torch.isfinite(s).all() and not torch.equal(s[0].detach(), b[0])
    assert opt.count.tolist() == [3.0, 0.0, 3.0]
    assert all(torch.equal(t[1], torch.zeros_like(t[1])) for t in opt.m + opt.v)
    # Its warm-up has not advanced either: unfrozen, it starts from the first warm-up step.
    assert opt.current_lr().tolist() == pytest.approx([1e-2, 0.0, 1e-2])


def test_member_norms_and_copy_member():
    params, _ = members()
    stacked = [torch.stack([params[k][i] for k in range(K)]) for i in range(3)]
    n = member_norms(stacked)
    assert n.shape == (3, K)
    assert n[2, 1].item() == pytest.approx(params[1][2].norm().item())
    ps = [s.clone().requires_grad_() for s in stacked]
    opt = StackedOptimizer(ps, K, lr=1e-2)
    opt.step(sum((p**2).sum() * torch.arange(1.0, K + 1).view(-1, *[1] * (p.dim() - 1))).sum()
             for p in ps)  # fmt: skip
    opt.active[2] = 0.0
    opt.step(sum((p**2).sum() for p in ps))
    opt.copy_member(torch.tensor([0]), torch.tensor([2]))
    assert opt.count.tolist() == [2.0, 2.0, 2.0]
    for t in opt.m + opt.v:
        assert torch.equal(t[2], t[0])


def test_bad_member_settings_are_clear_errors():
    ps = [torch.zeros(K, 2, requires_grad=True)]
    with pytest.raises(ValueError, match="lr: 2 values for a population of 3"):
        StackedOptimizer(ps, K, lr=[1.0, 2.0])
    with pytest.raises(ValueError, match="leading dim of 4"):
        StackedOptimizer(ps, 4, lr=1.0)
    with pytest.raises(ValueError, match="at least 1 member"):
        StackedOptimizer(ps, 0, lr=1.0)
    opt = StackedOptimizer(ps, K, lr=1.0)
    with pytest.raises(ValueError, match="no per-member optimizer setting"):
        opt.set_member_values("gamma", 0.9)
    opt.set_member_values("clip", [0.0, 1.0, 0.0])
    assert opt.use_clip and not opt.use_agc
    other = StackedOptimizer([torch.zeros(2, 2, requires_grad=True)], 2, lr=1.0)
    with pytest.raises(ValueError, match="for 3 members, not 2"):
        other.load_state_dict(opt.state_dict())
    fresh = StackedOptimizer([torch.zeros(K, 2, requires_grad=True)], K, lr=1.0)
    opt.count.fill_(5.0)
    fresh.load_state_dict(opt.state_dict())
    assert fresh.count.tolist() == [5.0] * K


@pytest.mark.compiled
@pytest.mark.parametrize(
    "kw",
    [
        dict(lr=1e-3, kind="adam", clip=100.0),
        dict(lr=1e-3, kind=["adam", "laprop", "adam", "laprop"], clip=[100.0, 0.0, 1.0, 10.0],
             agc=[0.0, 0.3, 0.3, 0.0], warmup=[0, 0, 5, 5]),
    ],
    ids=["adam-clip", "mixed"],
)  # fmt: skip
def test_the_compiled_update_of_the_d64_critic_matches_eager(kw):
    """StackedOptimizer.compile on the shapes of a d64 critic (K = 4, Adam, clips binding for
    some members): compiled as one graph, inductor failed to generate its code (KeyError:
    'buf95'); as two it runs and equals the eager update."""
    shapes = [(64, 1024), (64,), (64,), (64, 64), (64,), (64,), (64, 64), (64,), (64,),
              (255, 64), (255,)]  # fmt: skip
    g = torch.Generator().manual_seed(0)
    start = [torch.randn((4, *s), generator=g) for s in shapes]
    grads = [torch.randn((4, *s), generator=g) * 30 for s in shapes]
    out = []
    for compiled in (False, True):
        params = [p.clone().requires_grad_() for p in start]
        opt = StackedOptimizer(params, 4, **kw)
        if compiled:
            opt.compile()
        with torch.no_grad():
            norms = [opt._apply(grads) for _ in range(3)]
        out.append((params, norms))
    (eager, eager_norms), (fast, fast_norms) = out
    for a, b in zip(eager_norms, fast_norms):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=0)
    for a, b in zip(eager, fast):
        torch.testing.assert_close(b.detach(), a.detach(), rtol=1e-5, atol=1e-6)
