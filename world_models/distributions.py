"""Distribution helpers shared by the world models and the actor-critic (DreamerV3 details).

Shape symbols (docs/shapes.md): ``...`` any leading batch dims, K number of classes or bins.

- ``symlog``/``symexp``: the squashing DreamerV3 uses so one loss scale fits rewards and
  returns of any magnitude (Hafner et al. 2023, Sec. "Robust predictions").
- ``TwoHot``: regression as classification over 255 bins spaced evenly in symlog space.
- ``unimix``: 1% uniform mixed into categorical probabilities so no class has probability 0
  (keeps KL terms finite and avoids deterministic collapse of the latent).
- ``sample_onehot``: graph-safe categorical sampling by Gumbel-max (no ``torch.multinomial``,
  no host synchronisation), with straight-through gradients.

Everything here is pure tensor code: no ``.item()``, no data-dependent shapes, so it can be
captured in a CUDA graph or compiled.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def symlog(x: torch.Tensor) -> torch.Tensor:
    """sign(x) * log(1 + |x|), elementwise."""
    return torch.sign(x) * torch.log1p(torch.abs(x))


def symexp(x: torch.Tensor) -> torch.Tensor:
    """sign(x) * (exp(|x|) - 1), the inverse of ``symlog``."""
    return torch.sign(x) * torch.expm1(torch.abs(x))


class TwoHot(nn.Module):
    """Two-hot symlog discretisation of scalars (DreamerV3 reward and critic heads).

    Bin centres are ``bins`` points evenly spaced over [low, high] in symlog space; DreamerV3
    uses 255 bins over [-20, 20], which covers |x| up to exp(20) ~ 5e8 in real units.
    When ``low == -high`` and ``bins`` is odd, the centres are built exactly symmetric and
    ``decode`` sums mirrored bins pairwise, so uniform logits (a zero-initialised head)
    decode to exactly 0.
    """

    bins: torch.Tensor

    def __init__(self, bins: int = 255, low: float = -20.0, high: float = 20.0) -> None:
        super().__init__()
        if bins < 2 or not high > low:
            raise ValueError(f"TwoHot needs bins >= 2 and high > low, got {bins}, {low}, {high}")
        self.num_bins = bins
        self.symmetric = bins % 2 == 1 and low == -high
        if self.symmetric:
            half = torch.linspace(0.0, high, (bins + 1) // 2, dtype=torch.float32)
            centres = torch.cat([-half.flip(0)[:-1], half])  # [K], exactly mirrored
        else:
            centres = torch.linspace(low, high, bins, dtype=torch.float32)  # [K]
        self.register_buffer("bins", centres, persistent=False)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Two-hot targets of symlog(x): [...] -> [..., K]; weights sum to 1.

        The weight is split between the two neighbouring bins in proportion to closeness;
        values outside [low, high] put all their weight on the edge bin.
        """
        bins = self.bins.to(x.dtype)
        y = symlog(x).unsqueeze(-1)  # [..., 1]
        k = self.num_bins
        below = (bins <= y).sum(-1, keepdim=True) - 1  # [..., 1], -1 when y < low
        above = k - (bins > y).sum(-1, keepdim=True)  # [..., 1], K when y > high
        below = below.clamp(0, k - 1)
        above = above.clamp(0, k - 1)
        equal = below == above
        dist_below = torch.where(equal, 1.0, (y - bins[below]).abs())  # [..., 1]
        dist_above = torch.where(equal, 1.0, (bins[above] - y).abs())  # [..., 1]
        total = dist_below + dist_above
        w_below = dist_above / total  # closer to the lower bin -> more weight there
        w_above = dist_below / total
        target = torch.zeros(*x.shape, k, dtype=x.dtype, device=x.device)  # [..., K]
        target.scatter_add_(-1, below, w_below)
        target.scatter_add_(-1, above, w_above)
        return target

    def decode(self, logits: torch.Tensor) -> torch.Tensor:
        """Expected value in real units: symexp(sum(softmax(logits) * bins)), [..., K] -> [...]."""
        probs = torch.softmax(logits, -1)  # [..., K]
        bins = self.bins.to(probs.dtype)
        if self.symmetric:
            m = (self.num_bins - 1) // 2
            # mirrored pairs summed first: uniform probs give exactly 0
            lower = (probs[..., :m] * bins[:m]).flip(-1)  # [..., m]
            upper = probs[..., m + 1 :] * bins[m + 1 :]  # [..., m]
            mean = (lower + upper).sum(-1) + probs[..., m] * bins[m]  # [...]
        else:
            mean = (probs * bins).sum(-1)  # [...]
        return symexp(mean)

    def loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of logits [..., K] against encode(target [...]): -> [...]."""
        soft = self.encode(target.detach().to(logits.dtype))  # [..., K]
        return -(soft * torch.log_softmax(logits, -1)).sum(-1)


def unimix(logits: torch.Tensor, mix: float = 0.01) -> torch.Tensor:
    """Log-probabilities of (1 - mix) * softmax(logits) + mix / K over the last dim."""
    if mix <= 0.0:
        return torch.log_softmax(logits, -1)
    probs = torch.softmax(logits, -1)
    probs = (1.0 - mix) * probs + mix / logits.shape[-1]
    return torch.log(probs)


def sample_onehot(
    logits: torch.Tensor,
    straight_through: bool = True,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One-hot sample [..., K] from categoricals with ``logits`` [..., K] by Gumbel-max.

    argmax(logits + Gumbel noise) is an exact sample and needs no host sync. With
    ``straight_through`` the forward value is the one-hot and the gradient is that of the
    probabilities: ``onehot + probs - probs.detach()`` (DreamerV3, following DreamerV2).
    """
    tiny = torch.finfo(logits.dtype).tiny
    u = torch.rand(
        logits.shape, generator=generator, device=logits.device, dtype=logits.dtype
    )  # [..., K]
    gumbel = -torch.log(-torch.log(u.clamp(min=tiny, max=1.0 - 1e-7)))  # [..., K]
    index = torch.argmax(logits.detach() + gumbel, -1)  # [...]
    onehot = F.one_hot(index, logits.shape[-1]).to(logits.dtype)  # [..., K]
    if straight_through:
        probs = torch.softmax(logits, -1)
        onehot = onehot + probs - probs.detach()
    return onehot


def onehot_mode(logits: torch.Tensor, straight_through: bool = True) -> torch.Tensor:
    """The most likely class as a one-hot [..., K], straight-through like ``sample_onehot``."""
    onehot = F.one_hot(logits.argmax(-1), logits.shape[-1]).to(logits.dtype)
    if straight_through:
        probs = torch.softmax(logits, -1)
        onehot = onehot + probs - probs.detach()
    return onehot


def categorical_kl(lhs_logits: torch.Tensor, rhs_logits: torch.Tensor) -> torch.Tensor:
    """KL(lhs || rhs) of categoricals over the last dim: [..., K] x [..., K] -> [...]."""
    lhs_logp = torch.log_softmax(lhs_logits, -1)
    rhs_logp = torch.log_softmax(rhs_logits, -1)
    return (lhs_logp.exp() * (lhs_logp - rhs_logp)).sum(-1)


def categorical_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of categoricals over the last dim: [..., K] -> [...]."""
    logp = torch.log_softmax(logits, -1)
    return -(logp.exp() * logp).sum(-1)


def bernoulli_nll(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood of binary ``target`` under Bernoulli(sigmoid(logits)), [...]."""
    return F.binary_cross_entropy_with_logits(logits, target.to(logits.dtype), reduction="none")
