import pytest
import torch

from engine.behavior import ReturnNorm, lambda_returns


def test_lambda_returns_by_hand():
    # One trajectory, H = 3. reward[t]/cont[t] belong to the step into state t.
    reward = torch.tensor([[9.0], [1.0], [2.0], [3.0]])  # reward[0] is never used
    cont = torch.tensor([[1.0], [1.0], [0.5], [1.0]])
    value = torch.tensor([[0.0], [10.0], [20.0], [30.0]])
    g, lam = 0.9, 0.8
    r3 = 30.0
    r2 = 3.0 + g * 1.0 * ((1 - lam) * 30.0 + lam * r3)
    r1 = 2.0 + g * 0.5 * ((1 - lam) * 20.0 + lam * r2)
    r0 = 1.0 + g * 1.0 * ((1 - lam) * 10.0 + lam * r1)
    out = lambda_returns(reward, cont, value, g, lam)
    torch.testing.assert_close(out[:, 0], torch.tensor([r0, r1, r2]))


def test_lambda_one_is_discounted_sum_plus_bootstrap_and_zero_is_td():
    torch.manual_seed(0)
    H, N = 5, 4
    reward, value = torch.randn(H + 1, N), torch.randn(H + 1, N)
    cont = torch.ones(H + 1, N)
    g = 0.97
    mc = lambda_returns(reward, cont, value, g, 1.0)
    expected0 = sum(g**k * reward[k + 1] for k in range(H)) + g**H * value[H]
    torch.testing.assert_close(mc[0], expected0)
    td = lambda_returns(reward, cont, value, g, 0.0)
    torch.testing.assert_close(td, reward[1:] + g * value[1:])


def test_termination_cuts_the_return():
    reward = torch.ones(4, 1)
    cont = torch.tensor([[1.0], [1.0], [0.0], [1.0]])  # state 2 is terminal
    value = torch.full((4, 1), 100.0)
    out = lambda_returns(reward, cont, value, 0.99, 0.95)
    assert out[1, 0] == pytest.approx(1.0)  # reward into the terminal state, nothing after
    assert out[0, 0] == pytest.approx(1 + 0.99 * (0.05 * 100 + 0.95 * 1.0))


def test_return_norm_percentiles_and_ema():
    norm = ReturnNorm(rate=0.01, limit=1.0)
    ret = torch.arange(101, dtype=torch.float32)  # percentiles 5 and 95 are 5 and 95
    norm.update(ret)
    assert norm.lo.item() == pytest.approx(5.0) and norm.hi.item() == pytest.approx(95.0)
    assert norm.scale().item() == pytest.approx(90.0)
    norm.update(ret + 100)  # EMA with rate 0.01 from the second batch on
    assert norm.lo.item() == pytest.approx(5.0 + 0.01 * 100)
    assert norm.hi.item() == pytest.approx(95.0 + 0.01 * 100)


def test_return_norm_never_scales_small_returns_up():
    norm = ReturnNorm(rate=0.01, limit=1.0)
    norm.update(torch.linspace(0, 0.1, 50))
    assert norm.scale().item() == 1.0
