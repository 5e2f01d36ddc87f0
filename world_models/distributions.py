"""Distribution helpers shared by the world models and the actor-critic (DreamerV3 details).

Shape symbols (docs/shapes.md): ``...`` any leading batch dims, K number of classes or bins.

- ``symlog``/``symexp``: the squashing DreamerV3 uses so one loss scale fits rewards and
  returns of any magnitude (Hafner et al. 2023, Sec. "Robust predictions").
- ``TwoHot``: regression as classification over 255 bins spaced evenly in symlog space.
- ``unimix``: 1% uniform mixed into categorical probabilities so no class has probability 0
  (keeps KL terms finite and avoids deterministic collapse of the latent).
- ``one_hot``: ``F.one_hot`` without its host-side range check.
- ``sample_onehot``: graph-safe categorical sampling by inverse CDF or Gumbel-max (no
  ``torch.multinomial``, no host synchronisation), with straight-through gradients.

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

    def _neighbours(
        self, x: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The two bins around symlog(x) and their weights: (below, above) int64 [..., 1] and
        (w_below, w_above) [..., 1], summing to 1. Outside [low, high] both indices are the
        edge bin with weight 1/2 each. ``searchsorted`` finds the bins without building a
        [..., K] comparison (which cost more than the critic's matmuls at 16,384 x 255)."""
        bins = self.bins.to(x.dtype)
        y = symlog(x).unsqueeze(-1)  # [..., 1]
        k = self.num_bins
        count = torch.searchsorted(bins, y, right=True)  # [..., 1]: bins <= y
        below = (count - 1).clamp(0, k - 1)
        above = count.clamp(0, k - 1)
        equal = below == above
        dist_below = torch.where(equal, 1.0, (y - bins[below]).abs())  # [..., 1]
        dist_above = torch.where(equal, 1.0, (bins[above] - y).abs())  # [..., 1]
        total = dist_below + dist_above
        # closer to the lower bin -> more weight there
        return below, above, dist_above / total, dist_below / total

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Two-hot targets of symlog(x): [...] -> [..., K]; weights sum to 1.

        The weight is split between the two neighbouring bins in proportion to closeness;
        values outside [low, high] put all their weight on the edge bin.
        """
        below, above, w_below, w_above = self._neighbours(x)
        target = torch.zeros(*x.shape, self.num_bins, dtype=x.dtype, device=x.device)  # [..., K]
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
        below, above, w_below, w_above = self._neighbours(target.detach().to(logits.dtype))
        logp = torch.log_softmax(logits, -1)  # [..., K]
        # = -(encode(target) * logp).sum(-1), reading only the two bins that carry weight
        return -(w_below * logp.gather(-1, below) + w_above * logp.gather(-1, above)).squeeze(-1)


def unimix_probs(logits: torch.Tensor, mix: float = 0.01) -> torch.Tensor:
    """Probabilities (1 - mix) * softmax(logits) + mix / K over the last dim: [..., K]."""
    probs = torch.softmax(logits, -1)
    return probs if mix <= 0.0 else (1.0 - mix) * probs + mix / logits.shape[-1]


def unimix(logits: torch.Tensor, mix: float = 0.01) -> torch.Tensor:
    """Log-probabilities of (1 - mix) * softmax(logits) + mix / K over the last dim."""
    if mix <= 0.0:
        return torch.log_softmax(logits, -1)
    return torch.log(unimix_probs(logits, mix))


SAMPLERS = ("icdf", "gumbel")  # the ``method`` of sample_index; config keys ``*.sampler``


def sample_index(
    logits: torch.Tensor,
    generator: torch.Generator | None = None,
    probs: torch.Tensor | None = None,
    method: str = "icdf",
) -> torch.Tensor:
    """Class indices [..., 1] (int64) drawn from categoricals with ``logits`` [..., K].

    ``icdf`` (inverse CDF): one uniform per categorical is located in the cumulative
    probabilities (``searchsorted`` over the last dim). K times fewer random numbers than
    ``gumbel`` (argmax of logits + Gumbel noise: one uniform and two logs per class, 14x slower
    for the RSSM's 1,024 x 32 x 32 latents on the dev CPU, docs/benchmarks.md). Both are exact
    and need no host sync; they draw different random numbers from the same generator, so a
    seed gives a different run with each. A class of probability 0 is never drawn
    (``right=True``: the index counts the CDF entries <= u * total). ``probs``
    (softmax(logits), when the caller has it) saves the icdf's softmax.
    """
    if method == "gumbel":
        u = torch.rand(logits.shape, generator=generator, device=logits.device, dtype=logits.dtype)
        tiny = torch.finfo(logits.dtype).tiny
        gumbel = -torch.log(-torch.log(u.clamp(min=tiny, max=1.0 - 1e-7)))  # [..., K]
        return torch.argmax(logits.detach() + gumbel, -1, keepdim=True)  # [..., 1]
    if method != "icdf":
        raise ValueError(f"sampling method must be one of {SAMPLERS}, got {method!r}")
    probs = torch.softmax(logits.detach(), -1) if probs is None else probs.detach()
    cdf = probs.cumsum(-1)  # [..., K]
    u = torch.rand(
        cdf.shape[:-1] + (1,), generator=generator, device=cdf.device, dtype=cdf.dtype
    )  # [..., 1]
    index = torch.searchsorted(cdf, u * cdf[..., -1:], right=True)  # [..., 1]
    return index.clamp_(max=logits.shape[-1] - 1)  # u * total rounded up to total (p ~ 2^-24)


def one_hot(index: torch.Tensor, classes: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """One-hot [..., K] of int64 ``index`` [...]. Unlike ``F.one_hot``, never reads the indices
    on the host (its range check is a host sync on the CPU)."""
    onehot = torch.zeros(*index.shape, classes, dtype=dtype, device=index.device)
    return onehot.scatter_(-1, index[..., None], 1.0)


def index_onehot(
    index: torch.Tensor,
    logits: torch.Tensor,
    straight_through: bool = True,
    probs: torch.Tensor | None = None,
) -> torch.Tensor:
    """One-hot [..., K] of class ``index`` [..., 1] for categoricals with ``logits`` [..., K].

    With ``straight_through`` the forward value is the one-hot and the gradient is that of the
    probabilities: ``onehot + (probs - probs.detach())`` (DreamerV3, following DreamerV2);
    ``probs`` (softmax(logits) with its graph, when the caller has it) saves the softmax.
    """
    onehot = torch.zeros_like(logits).scatter_(-1, index, 1.0)  # [..., K]
    if straight_through:
        probs = torch.softmax(logits, -1) if probs is None else probs
        onehot = onehot + (probs - probs.detach())
    return onehot


def sample_onehot(
    logits: torch.Tensor,
    straight_through: bool = True,
    generator: torch.Generator | None = None,
    method: str = "icdf",
) -> torch.Tensor:
    """One-hot sample [..., K] from categoricals with ``logits`` [..., K] (``sample_index``
    by ``method``), straight-through as ``index_onehot``."""
    index = sample_index(logits, generator, method=method)
    return index_onehot(index, logits, straight_through)


def onehot_mode(logits: torch.Tensor, straight_through: bool = True) -> torch.Tensor:
    """The most likely class as a one-hot [..., K], straight-through like ``sample_onehot``."""
    return index_onehot(logits.argmax(-1, keepdim=True), logits, straight_through)


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
