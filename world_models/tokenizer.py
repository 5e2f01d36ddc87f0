"""Discrete autoencoder (VQ-VAE) that turns a frame into a grid of tokens (IRIS §2.1).

A 64x64 frame goes through a convolutional encoder down to a g x g grid of vectors
(IRIS Atari: g = 4, so K = 16 tokens per frame), each vector is replaced by its nearest
codebook entry (IRIS: 512 entries of size 512), and a decoder maps the quantised grid back
to pixels. Gradients cross the non-differentiable lookup with the straight-through estimator
(van den Oord et al., 2017): the decoder's input is ``z + sg(z_q - z)``.

Loss (IRIS: equal weights, beta = 1.0 in the authors' code; the VQ-VAE paper uses 0.25)::

    recon ||x - x_hat||_1 (or L2)  +  ||sg(z) - z_q||^2  +  beta ||z - sg(z_q)||^2
          [+ perceptual LPIPS(x, x_hat), off by default: it needs pretrained VGG weights]

Shape symbols: N frames, H = W image size, C image channels, g grid side, K = g*g tokens,
E codebook vector size, V vocabulary (codebook) size. Images are uint8 [N, H, W, C] at the
boundary and are scaled to [-1, 1] inside.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from agents.config import ConfigError, check_choice, check_float, check_int


def _groups(channels: int) -> int:
    return math.gcd(32, channels)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv3x3 twice, plus identity: [N, c, h, w] -> [N, c, h, w]."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.GroupNorm(_groups(channels), channels),
            nn.SiLU(),
            nn.Conv2d(channels, channels, 3, padding=1),
            nn.GroupNorm(_groups(channels), channels),
            nn.SiLU(),
            nn.Conv2d(channels, channels, 3, padding=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


def _encoder(in_ch: int, ch: int, embed_dim: int, downs: int, res_blocks: int) -> nn.Module:
    """[N, C, H, W] -> [N, E, H / 2^downs, W / 2^downs]."""
    layers: list[nn.Module] = [nn.Conv2d(in_ch, ch, 3, padding=1)]
    for _ in range(downs):
        layers += [ResBlock(ch) for _ in range(res_blocks)]
        layers.append(nn.Conv2d(ch, ch, 4, stride=2, padding=1))  # halves h and w
    layers += [ResBlock(ch), nn.GroupNorm(_groups(ch), ch), nn.SiLU(), nn.Conv2d(ch, embed_dim, 1)]
    return nn.Sequential(*layers)


def _decoder(out_ch: int, ch: int, embed_dim: int, ups: int, res_blocks: int) -> nn.Module:
    """[N, E, g, g] -> [N, C, g * 2^ups, g * 2^ups] (values meant to be in [-1, 1])."""
    layers: list[nn.Module] = [nn.Conv2d(embed_dim, ch, 3, padding=1), ResBlock(ch)]
    for _ in range(ups):
        layers += [nn.Upsample(scale_factor=2.0, mode="nearest"), nn.Conv2d(ch, ch, 3, padding=1)]
        layers += [ResBlock(ch) for _ in range(res_blocks)]
    layers += [nn.GroupNorm(_groups(ch), ch), nn.SiLU(), nn.Conv2d(ch, out_ch, 3, padding=1)]
    return nn.Sequential(*layers)


class Tokenizer(nn.Module):
    """VQ-VAE over frames: ``encode`` -> tokens [N, K], ``decode`` -> uint8-range images.

    Config keys (the ``world_model`` subtree; ``prefix`` names it in errors): ``vocab_size``,
    ``embed_dim``, ``tokens_per_frame``, ``tokenizer_channels``, ``tokenizer_res_blocks``,
    ``commitment_beta``, ``codebook_weight``, ``recon_loss`` (l1|l2), ``recon_weight``,
    ``perceptual_weight``, ``perceptual_weights``, ``dead_code_after``, ``restart_dead_codes``
    (optional, default false: move codes unused for ``dead_code_after`` batches onto random
    encoder outputs of the batch).
    """

    def __init__(self, cfg: Any, image_shape: tuple[int, int, int], prefix: str = "") -> None:
        super().__init__()
        h, w, c = image_shape
        self.vocab_size = check_int(cfg, "vocab_size", prefix, low=2)
        self.embed_dim = check_int(cfg, "embed_dim", prefix)
        self.tokens_per_frame = check_int(cfg, "tokens_per_frame", prefix)
        channels = check_int(cfg, "tokenizer_channels", prefix)
        res_blocks = check_int(cfg, "tokenizer_res_blocks", prefix, low=0)
        self.beta = check_float(cfg, "commitment_beta", prefix, low=0.0)
        self.codebook_weight = check_float(cfg, "codebook_weight", prefix, low=0.0)
        self.recon_loss = check_choice(cfg, "recon_loss", ["l1", "l2"], prefix)
        self.recon_weight = check_float(cfg, "recon_weight", prefix, low=0.0)
        self.perceptual_weight = check_float(cfg, "perceptual_weight", prefix, low=0.0)
        self.dead_code_after = check_int(cfg, "dead_code_after", prefix)
        restart = cfg.get("restart_dead_codes", False) if hasattr(cfg, "get") else False
        if not isinstance(restart, bool):
            raise ConfigError(f"{prefix}restart_dead_codes must be true or false, got {restart!r}")
        self.restart_dead_codes = restart

        grid = math.isqrt(self.tokens_per_frame)
        downs = int(math.log2(h // grid)) if grid > 0 and h % grid == 0 else -1
        if grid * grid != self.tokens_per_frame or h != w or downs < 0 or grid << downs != h:
            raise ConfigError(
                f"{prefix}tokens_per_frame must be g*g with image size {h}x{w} = g * 2^n "
                f"(e.g. 16 for 64x64: a 4x4 grid), got {self.tokens_per_frame}"
            )
        self.grid, self.image_shape = grid, (h, w, c)
        self.encoder = _encoder(c, channels, self.embed_dim, downs, res_blocks)
        self.decoder = _decoder(c, channels, self.embed_dim, downs, res_blocks)
        self.codebook = nn.Embedding(self.vocab_size, self.embed_dim)
        nn.init.uniform_(self.codebook.weight, -1.0 / self.vocab_size, 1.0 / self.vocab_size)
        # Batches since each code was last chosen, for the dead-code count (a tensor metric).
        self.register_buffer("code_age", torch.zeros(self.vocab_size, dtype=torch.long))
        self.lpips = _load_perceptual(cfg, prefix) if self.perceptual_weight > 0 else None

    @staticmethod
    def preprocess(image: torch.Tensor) -> torch.Tensor:
        """uint8 [N, H, W, C] -> float [N, C, H, W] in [-1, 1]."""
        return image.permute(0, 3, 1, 2).float().div(127.5).sub(1.0)

    @staticmethod
    def postprocess(x: torch.Tensor) -> torch.Tensor:
        """float [N, C, H, W] in [-1, 1] -> uint8 [N, H, W, C]."""
        return x.add(1.0).mul(127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)

    def quantize(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Nearest codebook entries of z [N, E, g, g] -> (tokens [N, K] long, z_q [N, E, g, g])."""
        n, e, g, _ = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, e)  # [N*K, E]
        book = self.codebook.weight  # [V, E]
        dist = flat.pow(2).sum(1, keepdim=True) + book.pow(2).sum(1) - 2 * flat @ book.t()
        tokens = dist.argmin(-1).view(n, g * g)  # [N, K], row-major over the grid
        return tokens, self.embed_tokens(tokens)

    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [N, K] -> codebook grid [N, E, g, g]."""
        n = tokens.shape[0]
        return self.codebook(tokens).view(n, self.grid, self.grid, -1).permute(0, 3, 1, 2)

    @torch.no_grad()
    def encode(self, image: torch.Tensor) -> torch.Tensor:
        """uint8 [..., H, W, C] -> tokens long [..., K]."""
        lead = image.shape[:-3]
        z = self.encoder(self.preprocess(image.reshape(-1, *image.shape[-3:])))
        return self.quantize(z)[0].view(*lead, self.tokens_per_frame)

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [..., K] -> uint8 images [..., H, W, C]."""
        lead = tokens.shape[:-1]
        x = self.decoder(self.embed_tokens(tokens.reshape(-1, self.tokens_per_frame)))
        return self.postprocess(x).view(*lead, *self.image_shape)

    def forward(
        self, image: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """uint8 [N,H,W,C] -> (z, z_q [N,E,g,g], recon [N,C,H,W] in [-1, 1], tokens [N,K]).

        The decoder reads ``z + sg(z_q - z)``: value of z_q, gradient of z (straight-through).
        """
        z = self.encoder(self.preprocess(image))
        tokens, z_q = self.quantize(z)
        recon = self.decoder(z + (z_q - z).detach())
        return z, z_q, recon, tokens

    def loss(
        self, image: torch.Tensor, usage_tokens: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, dict, torch.Tensor]:
        """image uint8 [N, H, W, C] -> (scalar loss, metrics, tokens [N, K] long).

        usage_tokens: long [M, K], the tokens of every frame of the batch when ``image`` is a
        subset of it (already encoded by the caller): code ages and usage metrics count them
        instead of ``image``'s own, so that a code used only outside the subset is not dead.

        Metrics (detached tensors): reconstruction, codebook and commitment losses,
        ``codebook_perplexity`` (exp entropy of this batch's token histogram: V when all codes
        are used equally, 1 when one code takes all), ``codebook_usage`` (fraction of codes
        used in the batch), ``dead_codes`` (codes unused for ``dead_code_after`` batches).
        """
        x = self.preprocess(image)
        z, z_q, recon, tokens = self(image)
        if self.recon_loss == "l1":
            recon_loss = (x - recon).abs().mean()
        else:
            recon_loss = (x - recon).pow(2).mean()
        codebook_loss = (z.detach() - z_q).pow(2).mean()  # moves the codebook towards z
        commitment_loss = (z - z_q.detach()).pow(2).mean()  # keeps the encoder near its code
        loss = (
            self.recon_weight * recon_loss
            + self.codebook_weight * codebook_loss
            + self.beta * commitment_loss
        )
        metrics = {
            "tokenizer/recon_loss": recon_loss.detach(),
            "tokenizer/codebook_loss": codebook_loss.detach(),
            "tokenizer/commitment_loss": commitment_loss.detach(),
        }
        if self.lpips is not None:
            perceptual = self.lpips(x, recon).mean()
            loss = loss + self.perceptual_weight * perceptual
            metrics["tokenizer/perceptual_loss"] = perceptual.detach()
        metrics.update(self._usage(tokens if usage_tokens is None else usage_tokens))
        if self.restart_dead_codes and self.training:
            self._restart_dead(z)
        return loss, metrics, tokens.detach()

    @torch.no_grad()
    def _restart_dead(self, z: torch.Tensor) -> None:
        """Move every dead code onto a random encoder output of this batch (z [N, E, g, g]).

        Codebook expiry as in Jukebox / SoundStream: a collapsed codebook (all frames on a few
        codes) otherwise never recovers, because unused codes get no gradient. Static shapes,
        no host sync: ``torch.where`` over the whole codebook.
        """
        flat = z.detach().permute(0, 2, 3, 1).reshape(-1, self.embed_dim)  # [N*K, E]
        pick = torch.randint(0, flat.shape[0], (self.vocab_size,), device=flat.device)
        dead = self.code_age >= self.dead_code_after  # [V]
        book = self.codebook.weight
        book.copy_(torch.where(dead[:, None], flat[pick].to(book.dtype), book))
        self.code_age.masked_fill_(dead, 0)

    @torch.no_grad()
    def _usage(self, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        counts = torch.bincount(tokens.flatten(), minlength=self.vocab_size).float()  # [V]
        probs = counts / counts.sum()
        entropy = -(probs * probs.clamp_min(1e-12).log()).sum()
        if self.training:
            self.code_age.add_(1).masked_fill_(counts > 0, 0)
        return {
            "tokenizer/codebook_perplexity": entropy.exp(),
            "tokenizer/codebook_usage": (counts > 0).float().mean(),
            "tokenizer/dead_codes": (self.code_age >= self.dead_code_after).sum().float(),
        }


def _load_perceptual(cfg: Any, prefix: str) -> nn.Module:
    """The frozen LPIPS network for the optional perceptual term.

    LPIPS (Zhang et al., 2018) compares VGG16 features and needs pretrained weights, which
    cannot be downloaded on these machines. ``perceptual_weights`` must name a TorchScript
    file holding an LPIPS module ``f(x, y) -> [N, 1, 1, 1]`` on images in [-1, 1] (exported
    elsewhere with ``torch.jit.script``); it is kept out of the state_dict and never trained.
    """
    path = cfg.get("perceptual_weights") if hasattr(cfg, "get") else None
    if not path:
        raise ConfigError(
            f"{prefix}perceptual_weight > 0 needs {prefix}perceptual_weights: a TorchScript LPIPS "
            "(VGG16) file, because the perceptual loss uses pretrained weights that cannot be "
            f"downloaded here. Set {prefix}perceptual_weight: 0 (the default) to train without it."
        )
    if not Path(path).is_file():
        raise ConfigError(f"{prefix}perceptual_weights: no such file {path!r}")
    module = torch.jit.load(str(path), map_location="cpu").eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return _Frozen(module)


class _Frozen:
    """Holds a module without registering it (no state_dict entry, no optimiser params)."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if next(self.module.parameters(), x).device != x.device:
            self.module = self.module.to(x.device)
        return self.module(x, y)


__all__ = ["Tokenizer", "ResBlock"]
