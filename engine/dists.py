"""The distributions of DreamerV3: symlog, symlog two-hot, unimix categoricals, KL with free bits.

One place for each; the Triton kernels (kernels/) are checked against these functions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def symlog(x: Tensor) -> Tensor:
    return torch.sign(x) * torch.log1p(torch.abs(x))


def symexp(x: Tensor) -> Tensor:
    return torch.sign(x) * torch.expm1(torch.abs(x))


def make_bins(num_bins: int = 255, limit: float = 20.0, device=None) -> Tensor:
    """Bin centres, uniform in symlog space from -limit to +limit (official DreamerV3)."""
    return torch.linspace(-limit, limit, num_bins, device=device)


def twohot(y: Tensor, bins: Tensor) -> Tensor:
    """Two-hot encoding of symlog(y) over `bins`: mass split between the two nearest bins.

    (...,) -> (..., K). Values beyond the outer bins put all mass on the outer bin.
    """
    x = symlog(y).clamp(bins[0], bins[-1])
    k = bins.numel()
    below = (torch.bucketize(x, bins, right=True) - 1).clamp(0, k - 2)  # bins[below] <= x
    lo, hi = bins[below], bins[below + 1]
    w_hi = ((x - lo) / (hi - lo)).clamp(0, 1)
    out = torch.zeros(*x.shape, k, device=x.device, dtype=x.dtype)
    out.scatter_(-1, below.unsqueeze(-1), (1 - w_hi).unsqueeze(-1))
    out.scatter_add_(-1, (below + 1).unsqueeze(-1), w_hi.unsqueeze(-1))
    return out


def twohot_loss(logits: Tensor, y: Tensor, bins: Tensor) -> Tensor:
    """Cross-entropy of the two-hot target of y under softmax(logits). (..., K), (...) -> (...)."""
    target = twohot(y.detach(), bins)
    return -(target * F.log_softmax(logits, -1)).sum(-1)


def twohot_floor(y: Tensor, bins: Tensor) -> Tensor:
    """Entropy of the two-hot target: the lowest cross-entropy any prediction can reach (<= ln 2).

    The archive's reward loss 'plateau' near 0.6 is this floor (DESIGN.md §1); report the excess.
    """
    target = twohot(y.detach(), bins)
    return -(target * torch.log(target.clamp_min(1e-12))).sum(-1)


def twohot_mean(logits: Tensor, bins: Tensor) -> Tensor:
    """Expected value in real space: symexp of the softmax-weighted bin average."""
    return symexp((F.softmax(logits, -1) * bins).sum(-1))


def unimix_probs(logits: Tensor, unimix: float) -> Tensor:
    """Softmax mixed with 1% uniform: no class has probability 0, so KL and log-probs are finite."""
    probs = F.softmax(logits, -1)
    if unimix > 0:
        probs = (1 - unimix) * probs + unimix / logits.shape[-1]
    return probs


def unimix_logits(logits: Tensor, unimix: float) -> Tensor:
    """Normalised log-probabilities of the unimix categorical."""
    if unimix == 0:
        return F.log_softmax(logits, -1)
    return torch.log(unimix_probs(logits, unimix))


def sample_index(probs: Tensor) -> Tensor:
    """Sample class indices (...,) from probs (..., K) by inverting the CDF with one uniform per
    categorical. No host sync and static shapes (unlike torch.multinomial), and on the CPU ~15x
    faster than Gumbel or exponential-race sampling, which draw K random numbers each."""
    u = torch.rand(probs.shape[:-1] + (1,), device=probs.device, dtype=probs.dtype)
    return (probs.detach().cumsum(-1) < u).sum(-1).clamp(max=probs.shape[-1] - 1)


def sample_onehot(probs: Tensor) -> Tensor:
    """One-hot sample, straight-through: the forward value is one-hot, the gradient is probs'."""
    onehot = F.one_hot(sample_index(probs), probs.shape[-1]).to(probs.dtype)
    return onehot + probs - probs.detach()


def categorical_kl(logp: Tensor, logq: Tensor) -> Tensor:
    """KL(p || q) from log-probabilities, summed over the latents: (..., L, K) -> (...)."""
    return (logp.exp() * (logp - logq)).sum((-2, -1))


def kl_losses(post_logits: Tensor, prior_logits: Tensor, unimix: float, free_bits: float):
    """DreamerV3's dynamics and representation KL terms with free bits.

    dyn = max(free, KL(sg(post) || prior)) trains the prior; rep = max(free, KL(post || sg(prior)))
    trains the encoder. Free bits clip the KL of a whole time step (summed over latents), not
    each latent (DESIGN.md §2). Returns (dyn, rep, raw_kl), each (...).
    """
    post = unimix_logits(post_logits, unimix)
    prior = unimix_logits(prior_logits, unimix)
    kl_dyn = categorical_kl(post.detach(), prior)
    kl_rep = categorical_kl(post, prior.detach())
    return kl_dyn.clamp_min(free_bits), kl_rep.clamp_min(free_bits), kl_dyn.detach()


def categorical_entropy(logp: Tensor) -> Tensor:
    return -(logp.exp() * logp).sum(-1)


def bernoulli_logprob(logit: Tensor, target: Tensor) -> Tensor:
    return -F.binary_cross_entropy_with_logits(logit, target, reduction="none")
