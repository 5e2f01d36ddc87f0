"""Building blocks shared by the world models: MLPs, image encoder/decoder, multi-key obs.

Shape symbols (docs/shapes.md): ``...`` leading batch dims (e.g. B, T), H/W/C image height,
width and channels, V vector-observation size, E embedding size, F feature size.

Design follows DreamerV3 (Hafner et al. 2023, arXiv v1 / official code of that era):
every hidden layer is Linear (or conv) -> normalisation -> SiLU; images enter as uint8 and
become floats in [-0.5, 0.5] only inside the encoder; vector observations are symlog-squashed
before the MLP so inputs of any scale train with one learning rate; strided 4x4 convolutions
halve the resolution down to ``minres`` (4) with channels ``depth * 2^i``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import gymnasium as gym
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from world_models.distributions import one_hot, symlog

NORMS = ("layer", "rms", "none")


def make_norm(norm: str, dim: int, eps: float = 1e-3) -> nn.Module:
    """LayerNorm (DreamerV3 2023), RMSNorm (2024 revision) or identity over the last dim."""
    if norm == "layer":
        return nn.LayerNorm(dim, eps=eps)
    if norm == "rms":
        return nn.RMSNorm(dim, eps=eps)
    if norm == "none":
        return nn.Identity()
    raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")


def init_dreamer_(module: nn.Module) -> None:
    """DreamerV3's 'normal, fan avg' init for every Linear/conv under ``module``, zero biases.

    Truncated normal (+-2 std) with variance 1 / mean(fan_in, fan_out); the 0.8796 factor
    corrects the standard deviation lost by truncation.
    """
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d)):
            fan_in, fan_out = nn.init._calculate_fan_in_and_fan_out(m.weight)
            std = math.sqrt(1.0 / ((fan_in + fan_out) / 2.0)) / 0.87962566103423978
            nn.init.trunc_normal_(m.weight, 0.0, std, -2.0 * std, 2.0 * std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def zero_init_(layer: nn.Module) -> nn.Module:
    """Zero the weight and bias of an output layer (DreamerV3 reward and critic heads).

    A zero-initialised two-hot head predicts exactly 0 at the start, so early return
    estimates do not explode from random initial outputs.
    """
    for p in layer.parameters():
        nn.init.zeros_(p)
    return layer


class MLP(nn.Module):
    """``layers`` x (Linear -> norm -> SiLU) of width ``units``, then an optional output Linear.

    [..., in_dim] -> [..., out_dim] (or [..., units] when ``out_dim`` is None;
    with ``layers == 0`` and no output layer it is the identity and ``out_dim == in_dim``).
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int | None,
        units: int,
        layers: int,
        norm: str = "layer",
    ) -> None:
        super().__init__()
        hidden: list[nn.Module] = []
        dim = in_dim
        for _ in range(layers):
            # no bias before a normalisation layer: it would be removed by the norm anyway
            hidden += [
                nn.Linear(dim, units, bias=norm == "none"),
                make_norm(norm, units),
                nn.SiLU(),
            ]
            dim = units
        self.hidden = nn.Sequential(*hidden)
        self.out = nn.Linear(dim, out_dim) if out_dim is not None else None
        self.out_dim = out_dim if out_dim is not None else dim

    def forward(self, x: Features) -> torch.Tensor:
        """[..., in_dim] -> [..., out_dim]. A ``OneHotFeatures`` input goes through the first
        Linear by ``linear_onehot`` (same result as the assembled dense input, less work)."""
        if isinstance(x, OneHotFeatures):
            layers = [*self.hidden] + ([self.out] if self.out is not None else [])
            if not layers:
                return x.to_dense()
            y = linear_onehot(layers[0], x.dense, x.index, x.classes, x.start)  # [..., U]
            for layer in layers[1:]:
                y = layer(y)
            return y  # [..., out_dim]
        x = self.hidden(x)  # [..., units]
        return self.out(x) if self.out is not None else x  # [..., out_dim]


class OneHotFeatures(NamedTuple):
    """Features [..., F] whose columns [start, start + S*K) are S one-hot groups of K classes,
    held as the class ``index`` [..., S] (int64) and the other columns ``dense`` [..., F - S*K]
    in order. ``MLP`` reads them without building the 80%-zero dense vector (the RSSM's
    [h, z]: 1,024 of 1,280 columns at size XS are one-hot). Carries no gradient into z: a
    world model hands these out only where the straight-through path is not needed."""

    dense: torch.Tensor
    index: torch.Tensor
    classes: int
    start: int

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> OneHotFeatures:
        """``fn`` on both parts, for ops on the leading dims (index, reshape, stack, detach)."""
        return self._replace(dense=fn(self.dense), index=fn(self.index))

    def to_dense(self) -> torch.Tensor:
        """The assembled features [..., F]."""
        onehot = one_hot(self.index, self.classes, self.dense.dtype).flatten(-2)
        d, s = self.dense, self.start
        return torch.cat([d[..., :s], onehot, d[..., s:]], -1)


Features = torch.Tensor | OneHotFeatures
"""What actors, critics and heads read: a dense tensor [..., F] or ``OneHotFeatures``."""


def map_features(feat: Features, fn: Callable[[torch.Tensor], torch.Tensor]) -> Features:
    """``fn`` applied to a dense feature tensor, or to both parts of ``OneHotFeatures``."""
    return feat.map(fn) if isinstance(feat, OneHotFeatures) else fn(feat)


def stack_features(feats: list[Features], dim: int) -> Features:
    """``torch.stack`` for features; a mix of dense and one-hot features stacks dense."""
    if all(isinstance(f, OneHotFeatures) for f in feats):
        first = feats[0]
        dense = torch.stack([f.dense for f in feats], dim)
        return first._replace(dense=dense, index=torch.stack([f.index for f in feats], dim))
    dense = [f.to_dense() if isinstance(f, OneHotFeatures) else f for f in feats]
    return torch.stack(dense, dim)


def linear_onehot(
    layer: nn.Linear, dense: torch.Tensor, index: torch.Tensor, classes: int, start: int
) -> torch.Tensor:
    """``layer`` of an input whose columns [start, start + S*K) are S one-hot groups of K classes.

    index [..., S] (int64) picks one class per group; ``dense`` [..., in - S*K] holds the other
    columns in order. Equals ``layer(cat(dense[..., :start], one_hot(index).flatten(-2),
    dense[..., start:]))`` up to float rounding, but sums S weight columns per row
    (``embedding_bag``) instead of multiplying S*K mostly-zero inputs. Differentiable in the
    weights and ``dense`` (not in the one-hot columns). On the dev CPU (16,384 rows, 32 x 32
    one-hots, 256 units, 2 threads) the one-hot part's forward takes 12 ms against the dense
    matmul's 72 ms, and its weight gradient 31 ms against 62 ms plus 32 ms to build the
    one-hot matrix.
    """
    groups = index.shape[-1]
    stop = start + groups * classes
    weight = layer.weight  # [U, in]
    w_dense = weight[:, stop:] if start == 0 else weight[:, :start]
    if 0 < start and stop < weight.shape[1]:
        w_dense = torch.cat([weight[:, :start], weight[:, stop:]], 1)
    table = weight[:, start:stop].t().contiguous()  # [S*K, U]: embedding_bag reads rows
    offsets = torch.arange(groups, device=index.device) * classes  # [S]
    flat = (index + offsets).reshape(-1, groups)  # [M, S] rows of the table to sum
    gathered = _RowSum.apply(flat, table).reshape(*index.shape[:-1], -1)  # [..., U]
    return F.linear(dense, w_dense, layer.bias) + gathered  # [..., U]


class _RowSum(torch.autograd.Function):
    """out[m] = sum_s table[flat[m, s]]: ``embedding_bag(flat, table, mode="sum")`` [M, U],
    whose table gradient is one ``index_add_`` per group s over blocks of rows that stay in
    cache, instead of embedding_bag's sort-based backward (on the dev CPU at 16,384 x 32 rows
    of 256, 2 threads: 31 ms against 118 ms; the same sums)."""

    @staticmethod
    def forward(ctx, flat: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(flat)
        ctx.rows = table.shape[0]
        return F.embedding_bag(flat, table, mode="sum")  # [M, U]

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[None, torch.Tensor]:
        (flat,) = ctx.saved_tensors
        grad = grad.contiguous()
        table_grad = grad.new_zeros(ctx.rows, grad.shape[-1])  # [S*K, U]
        step = max(1, (1 << 20) // grad.shape[-1])  # 4 MB of rows, re-read S times from cache
        for lo in range(0, grad.shape[0], step):
            rows, g = flat[lo : lo + step], grad[lo : lo + step]
            for s in range(flat.shape[1]):
                table_grad.index_add_(0, rows[:, s], g)
        return None, table_grad


class ChannelNorm(nn.Module):
    """Normalise a [N, C, H, W] map over its channels at every pixel (DreamerV3 conv norm)."""

    def __init__(self, norm: str, channels: int) -> None:
        super().__init__()
        self.norm = make_norm(norm, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def _conv_stages(size: int, minres: int) -> int:
    stages = 0
    while size > minres:
        if size % 2:
            raise ValueError(f"image size must be minres * 2^n, got {size} (minres {minres})")
        size //= 2
        stages += 1
    if size != minres:
        raise ValueError(f"image size must be minres * 2^n, got size ending at {size}")
    return stages


class ConvEncoder(nn.Module):
    """uint8 images [..., H, W, C] -> flat features [..., E] with E = depth*2^(n-1) * minres^2.

    n = log2(H / minres) stride-2 4x4 convolutions with ``depth * 2^i`` channels, each
    followed by channel norm and SiLU (64x64 with minres 4: 4 convs, 64 -> 4).
    """

    def __init__(
        self, shape: tuple[int, int, int], depth: int, norm: str = "layer", minres: int = 4
    ):
        super().__init__()
        h, w, c = shape
        if h != w:
            raise ValueError(f"ConvEncoder needs square images, got {h}x{w}")
        stages = _conv_stages(h, minres)
        layers: list[nn.Module] = []
        in_ch = c
        for i in range(stages):
            out_ch = depth * 2**i
            layers += [
                nn.Conv2d(in_ch, out_ch, 4, 2, 1, bias=norm == "none"),
                ChannelNorm(norm, out_ch),
                nn.SiLU(),
            ]
            in_ch = out_ch
        self.net = nn.Sequential(*layers)
        self.shape = (h, w, c)
        self.out_dim = in_ch * minres * minres

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        lead = image.shape[:-3]
        x = image.reshape(-1, *self.shape).permute(0, 3, 1, 2)  # [N, C, H, W]
        x = x.float() / 255.0 - 0.5  # uint8 -> [-0.5, 0.5]
        x = self.net(x)  # [N, C', minres, minres]
        return x.reshape(*lead, self.out_dim)  # [..., E]


class ConvDecoder(nn.Module):
    """Features [..., F] -> image means [..., H, W, C] in the encoder's [-0.5, 0.5] scale.

    Mirror of ConvEncoder: Linear to [depth*2^(n-1), minres, minres], then n stride-2 4x4
    transposed convs (norm + SiLU on all but the last, which outputs C channels).
    """

    def __init__(
        self,
        in_dim: int,
        shape: tuple[int, int, int],
        depth: int,
        norm: str = "layer",
        minres: int = 4,
    ):
        super().__init__()
        h, w, c = shape
        if h != w:
            raise ValueError(f"ConvDecoder needs square images, got {h}x{w}")
        stages = _conv_stages(h, minres)
        self.shape, self.minres = (h, w, c), minres
        self.top_ch = depth * 2 ** (stages - 1)
        self.inp = nn.Linear(in_dim, self.top_ch * minres * minres)
        layers: list[nn.Module] = []
        in_ch = self.top_ch
        for i in reversed(range(stages)):
            if i == 0:
                layers.append(nn.ConvTranspose2d(in_ch, c, 4, 2, 1))
            else:
                out_ch = depth * 2 ** (i - 1)
                layers += [
                    nn.ConvTranspose2d(in_ch, out_ch, 4, 2, 1, bias=norm == "none"),
                    ChannelNorm(norm, out_ch),
                    nn.SiLU(),
                ]
                in_ch = out_ch
        self.net = nn.Sequential(*layers)

    def forward(self, feat: torch.Tensor) -> torch.Tensor:
        lead = feat.shape[:-1]
        x = self.inp(feat.reshape(-1, feat.shape[-1]))  # [N, C'*minres^2]
        x = x.reshape(-1, self.top_ch, self.minres, self.minres)  # [N, C', minres, minres]
        x = self.net(x)  # [N, C, H, W]
        return x.permute(0, 2, 3, 1).reshape(*lead, *self.shape)  # [..., H, W, C]


OBS_KEYS = ("image", "vector")


def check_obs_space(obs_space: gym.spaces.Dict) -> dict[str, tuple[int, ...]]:
    """The supported keys of a Dict observation space and their shapes, or a clear error."""
    if not isinstance(obs_space, gym.spaces.Dict):
        raise ValueError(f"world models need a gymnasium.spaces.Dict obs space, got {obs_space}")
    shapes: dict[str, tuple[int, ...]] = {}
    for key, space in obs_space.spaces.items():
        if key not in OBS_KEYS:
            raise ValueError(f"unsupported observation key {key!r}; supported: {list(OBS_KEYS)}")
        if not isinstance(space, gym.spaces.Box):
            raise ValueError(f"observation {key!r} must be a Box space, got {space}")
        if key == "image" and (len(space.shape) != 3 or space.dtype != np.uint8):
            raise ValueError(f"observation 'image' must be uint8 [H, W, C], got {space}")
        if key == "vector" and len(space.shape) != 1:
            raise ValueError(f"observation 'vector' must be 1-D [V], got shape {space.shape}")
        shapes[key] = tuple(int(s) for s in space.shape)
    if not shapes:
        raise ValueError("observation space has no keys; expected 'image' and/or 'vector'")
    return shapes


class MultiEncoder(nn.Module):
    """Dict obs -> one embedding [..., E]: ConvEncoder(image) ++ MLP(symlog(vector))."""

    def __init__(
        self,
        obs_space: gym.spaces.Dict,
        depth: int,
        units: int,
        layers: int,
        norm: str = "layer",
        minres: int = 4,
    ):
        super().__init__()
        shapes = check_obs_space(obs_space)
        self.keys = [k for k in OBS_KEYS if k in shapes]
        self.cnn = ConvEncoder(shapes["image"], depth, norm, minres) if "image" in shapes else None
        self.mlp = (
            MLP(shapes["vector"][0], None, units, layers, norm) if "vector" in shapes else None
        )
        self.out_dim = (self.cnn.out_dim if self.cnn else 0) + (self.mlp.out_dim if self.mlp else 0)

    def forward(self, obs: dict[str, torch.Tensor]) -> torch.Tensor:
        parts = []
        if self.cnn is not None:
            parts.append(self.cnn(obs["image"]))  # [..., E_img]
        if self.mlp is not None:
            parts.append(self.mlp(symlog(obs["vector"].float())))  # [..., E_vec]
        return torch.cat(parts, -1) if len(parts) > 1 else parts[0]  # [..., E]


class MultiDecoder(nn.Module):
    """Features [..., F] -> reconstructions per obs key, and their losses.

    Image: mean-squared error summed over pixels in [-0.5, 0.5] scale (a unit-variance
    Gaussian up to a constant). Vector: squared error in symlog space summed over dims
    (DreamerV3's symlog MSE).
    """

    def __init__(
        self,
        in_dim: int,
        obs_space: gym.spaces.Dict,
        depth: int,
        units: int,
        layers: int,
        norm: str = "layer",
        minres: int = 4,
    ):
        super().__init__()
        shapes = check_obs_space(obs_space)
        self.keys = [k for k in OBS_KEYS if k in shapes]
        self.cnn = (
            ConvDecoder(in_dim, shapes["image"], depth, norm, minres) if "image" in shapes else None
        )
        self.mlp = (
            MLP(in_dim, shapes["vector"][0], units, layers, norm) if "vector" in shapes else None
        )

    def forward(self, feat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Predicted means: ``image`` [..., H, W, C] in [-0.5, 0.5] scale, ``vector`` [..., V] in
        symlog space (``symexp`` it for real units)."""
        out = {}
        if self.cnn is not None:
            out["image"] = self.cnn(feat)
        if self.mlp is not None:
            out["vector"] = self.mlp(feat)
        return out

    def loss(self, feat: torch.Tensor, obs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Per-key reconstruction losses [...] (summed over each observation's dims)."""
        pred = self(feat)
        losses = {}
        if "image" in pred:
            target = obs["image"].float() / 255.0 - 0.5  # [..., H, W, C]
            losses["image"] = (pred["image"] - target).square().sum((-3, -2, -1))  # [...]
        if "vector" in pred:
            target = symlog(obs["vector"].float())  # [..., V]
            losses["vector"] = (pred["vector"] - target).square().sum(-1)  # [...]
        return losses
