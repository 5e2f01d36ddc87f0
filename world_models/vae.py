"""V: the variational autoencoder of World Models (Ha & Schmidhuber 2018, Sec. 2.1 and A.1).

Shape symbols (docs/shapes.md): ``...`` leading batch dims (B, T), H/W/C image height, width
and channels (64x64 only), V vector-observation size, Z latent size.

The image path is the paper's exact CarRacing architecture (official ``vae.py``), kept here
rather than built from ``networks.ConvEncoder`` because that block is DreamerV3's (padding 1,
LayerNorm + SiLU, channels ``depth * 2^i``) and the paper's is not:

- encoder: 4 convs, kernel 4, stride 2, *no padding*, ReLU, channels 32-64-128-256
  (64 -> 31 -> 14 -> 6 -> 2), flattened to 1024 and mapped to the mean and log-variance of z;
- decoder: Linear(Z -> 1024) viewed as [1024, 1, 1], then 4 transposed convs, stride 2,
  kernels 5-5-6-6, channels 128-64-32-C (1 -> 5 -> 13 -> 30 -> 64), ReLU between, sigmoid out.

Loss (official code): reconstruction = sum of squared errors over all pixels in [0, 1] scale;
KL(q(z|x) || N(0, I)) summed over Z dims and floored at ``kl_tolerance * Z`` per sample
(0.5 * 32 = 16 nats for CarRacing), i.e. free bits on the total KL.

Vector observations (``vector`` [V]) get an MLP path so the same pipeline runs on state-vector
envs (CartPole): symlog(vector) -> ``networks.MLP`` -> concatenated with the image features;
decoded by an MLP, squared error in symlog space. This is our extension, not the paper's.
"""

from __future__ import annotations

import gymnasium as gym
import torch
from torch import nn

from world_models.distributions import symlog
from world_models.networks import MLP, check_obs_space

IMAGE_SIZE = 64
ENC_CHANNELS = (32, 64, 128, 256)
DEC_CHANNELS = (128, 64, 32)
DEC_KERNELS = (5, 5, 6, 6)


def gaussian_kl(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, exp(logvar)) || N(0, I)) summed over the last dim: [..., Z] -> [...].

    -0.5 * sum(1 + logvar - mean^2 - exp(logvar)).
    """
    return -0.5 * (1.0 + logvar - mean.square() - logvar.exp()).sum(-1)


class VAE(nn.Module):
    """Dict observations -> Gaussian posterior over z [..., Z] -> reconstructions.

    ``obs_space`` is a gymnasium Dict with ``image`` uint8 [64, 64, C] and/or ``vector`` [V].
    """

    def __init__(
        self,
        obs_space: gym.spaces.Dict,
        latent: int = 32,
        kl_tolerance: float = 0.5,
        vector_units: int = 256,
        vector_layers: int = 2,
    ) -> None:
        super().__init__()
        shapes = check_obs_space(obs_space)
        self.latent = latent
        self.kl_tolerance = kl_tolerance
        self.image_shape = shapes.get("image")
        self.vector_dim = shapes["vector"][0] if "vector" in shapes else None
        feat = 0
        if self.image_shape is not None:
            h, w, c = self.image_shape
            if (h, w) != (IMAGE_SIZE, IMAGE_SIZE):
                raise ValueError(
                    f"the World Models VAE needs 64x64 images (the paper's architecture), got "
                    f"{h}x{w}; set env.size=64"
                )
            layers: list[nn.Module] = []
            in_ch = c
            for out_ch in ENC_CHANNELS:
                layers += [nn.Conv2d(in_ch, out_ch, 4, 2), nn.ReLU()]
                in_ch = out_ch
            self.conv = nn.Sequential(*layers)
            feat += ENC_CHANNELS[-1] * 2 * 2  # 1024
            self.dec_in = nn.Linear(latent, 1024)
            dec: list[nn.Module] = []
            in_ch = 1024
            for i, (out_ch, k) in enumerate(zip((*DEC_CHANNELS, c), DEC_KERNELS)):
                dec.append(nn.ConvTranspose2d(in_ch, out_ch, k, 2))
                dec.append(nn.ReLU() if i < len(DEC_KERNELS) - 1 else nn.Sigmoid())
                in_ch = out_ch
            self.deconv = nn.Sequential(*dec)
        if self.vector_dim is not None:
            self.vec_enc = MLP(self.vector_dim, None, vector_units, vector_layers)
            self.vec_dec = MLP(latent, self.vector_dim, vector_units, vector_layers)
            feat += self.vec_enc.out_dim
        self.mean = nn.Linear(feat, latent)
        self.logvar = nn.Linear(feat, latent)

    def encode(self, obs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior parameters (mean, logvar), each [..., Z], from obs values [..., ...]."""
        parts = []
        if self.image_shape is not None:
            image = obs["image"]
            lead = image.shape[:-3]
            x = image.reshape(-1, *self.image_shape).permute(0, 3, 1, 2)  # [N, C, 64, 64]
            x = x.float() / 255.0  # uint8 -> [0, 1], as the paper
            parts.append(self.conv(x).reshape(*lead, -1))  # [..., 1024]
        if self.vector_dim is not None:
            parts.append(self.vec_enc(symlog(obs["vector"].float())))  # [..., U]
        feat = torch.cat(parts, -1) if len(parts) > 1 else parts[0]  # [..., E]
        return self.mean(feat), self.logvar(feat)

    @staticmethod
    def sample(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
        """Reparameterised z = mean + exp(logvar / 2) * eps, [..., Z]."""
        return mean + (0.5 * logvar).exp() * torch.randn_like(mean)

    def decode(self, z: torch.Tensor) -> dict[str, torch.Tensor]:
        """Reconstructions: ``image`` [..., 64, 64, C] in [0, 1], ``vector`` [..., V] (symlog)."""
        out = {}
        lead = z.shape[:-1]
        if self.image_shape is not None:
            x = self.dec_in(z.reshape(-1, self.latent)).reshape(-1, 1024, 1, 1)  # [N, 1024, 1, 1]
            x = self.deconv(x)  # [N, C, 64, 64]
            out["image"] = x.permute(0, 2, 3, 1).reshape(*lead, *self.image_shape)
        if self.vector_dim is not None:
            out["vector"] = self.vec_dec(z)  # [..., V]
        return out

    def loss(
        self, obs: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
        """(loss [...], metrics [...] per term, sampled z [..., Z], mean [..., Z]) for obs.

        loss = sum-of-squares reconstruction + max(KL, kl_tolerance * Z), per sample.
        """
        mean, logvar = self.encode(obs)  # [..., Z] x2
        z = self.sample(mean, logvar)  # [..., Z]
        recon = self.decode(z)
        rec = torch.zeros(mean.shape[:-1], device=mean.device)  # [...]
        metrics = {}
        if "image" in recon:
            target = obs["image"].float() / 255.0  # [..., 64, 64, C]
            metrics["image_sse"] = (recon["image"] - target).square().sum((-3, -2, -1))
            rec = rec + metrics["image_sse"]
        if "vector" in recon:
            target = symlog(obs["vector"].float())  # [..., V]
            metrics["vector_sse"] = (recon["vector"] - target).square().sum(-1)
            rec = rec + metrics["vector_sse"]
        kl = gaussian_kl(mean, logvar)  # [...]
        floored = kl.clamp(min=self.kl_tolerance * self.latent)  # free bits (official code)
        metrics["kl"] = kl
        metrics["recon"] = rec
        return rec + floored, metrics, z, mean
