"""M: the mixture-density LSTM of World Models (Ha & Schmidhuber 2018, Sec. 2.2 and A.2).

Shape symbols (docs/shapes.md): ``...`` leading batch dims, Z latent size, A action size,
Hd LSTM hidden size, K mixture components per latent dimension.

The LSTM reads [z_t, a_t] and its new hidden state h_{t+1} parameterises
P(z_{t+1} | a_t, z_t, h_t) as an independent mixture of K diagonal Gaussians per latent
dimension (official code: one Linear to Z * 3K numbers, split into log-mixture weights,
means and log-stds). The loss is the mixture NLL averaged over batch, time and Z.

Temperature (official ``rnn.py``): mixture logits are divided by tau and the chosen
Gaussian's std is multiplied by sqrt(tau); tau -> 0 gives the mean of the most likely
component. Sampling here is graph-safe: an inverse-CDF draw picks the component, no
``torch.multinomial`` and no host synchronisation.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from world_models.distributions import sample_index

LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)


def mdn_split(out: torch.Tensor, latent: int, mixtures: int) -> tuple[torch.Tensor, ...]:
    """Raw head output [..., Z*3K] -> (log weights, means, log-stds), each [..., Z, K].

    Log weights are normalised (log-softmax over K).
    """
    out = out.reshape(*out.shape[:-1], latent, 3, mixtures)  # [..., Z, 3, K]
    logit, mean, logstd = out.unbind(-2)  # [..., Z, K] x3
    return torch.log_softmax(logit, -1), mean, logstd


def mdn_nll(
    logpi: torch.Tensor, mean: torch.Tensor, logstd: torch.Tensor, target: torch.Tensor
) -> torch.Tensor:
    """-log sum_k pi_k N(target; mean_k, exp(logstd_k)^2) per latent dim.

    logpi/mean/logstd [..., Z, K] (logpi normalised), target [..., Z] -> NLL [..., Z].
    """
    y = target.unsqueeze(-1)  # [..., Z, 1]
    log_normal = -0.5 * ((y - mean) / logstd.exp()).square() - logstd - LOG_SQRT_2PI
    return -torch.logsumexp(logpi + log_normal, -1)  # [..., Z]


def mdn_sample(
    logpi: torch.Tensor,
    mean: torch.Tensor,
    logstd: torch.Tensor,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Sample [..., Z] from the mixtures [..., Z, K] at ``temperature`` tau (python float).

    tau > 0: component k ~ softmax(logpi / tau) (``sample_index``), then
    z = mean_k + exp(logstd_k) * sqrt(tau) * eps. tau == 0: z = mean of argmax_k logpi.
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if temperature == 0.0:
        index = logpi.argmax(-1, keepdim=True)  # [..., Z, 1]
        return mean.gather(-1, index).squeeze(-1)
    index = sample_index(logpi / temperature, generator)  # [..., Z, 1]
    mu = mean.gather(-1, index).squeeze(-1)  # [..., Z]
    std = logstd.gather(-1, index).squeeze(-1).exp()  # [..., Z]
    eps = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
    return mu + std * math.sqrt(temperature) * eps


def mdn_moments(
    logpi: torch.Tensor, mean: torch.Tensor, logstd: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and variance [..., Z] of the mixtures [..., Z, K] (at temperature 1)."""
    pi = logpi.exp()
    m = (pi * mean).sum(-1)  # [..., Z]
    second = (pi * ((2.0 * logstd).exp() + mean.square())).sum(-1)  # E[z^2]
    return m, second - m.square()


class MDNRNN(nn.Module):
    """LSTM over [z, a] with a mixture-density head for the next z.

    ``step(z, a, (h, c)) -> (h', c')`` advances one step, [N, Z] + [N, A] -> [N, Hd] x2;
    ``mixture(h')`` gives (logpi, mean, logstd) [N, Z, K] of P(z_{t+1}).
    """

    def __init__(self, latent: int, action_dim: int, hidden: int = 256, mixtures: int = 5):
        super().__init__()
        self.latent, self.action_dim = latent, action_dim
        self.hidden, self.mixtures = hidden, mixtures
        self.cell = nn.LSTMCell(latent + action_dim, hidden)
        self.head = nn.Linear(hidden, latent * 3 * mixtures)

    def step(
        self, z: torch.Tensor, action: torch.Tensor, hc: tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One LSTM step: z [N, Z], action [N, A], (h, c) [N, Hd] -> (h', c') [N, Hd]."""
        return self.cell(torch.cat([z, action], -1), hc)

    def mixture(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(logpi, mean, logstd) [..., Z, K] of the next z, from the LSTM output h [..., Hd]."""
        return mdn_split(self.head(h), self.latent, self.mixtures)
