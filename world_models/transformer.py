"""GPT-style causal Transformer with a preallocated KV cache (the IRIS dynamics model).

IRIS (Micheli et al., 2023, §2.2) models a trajectory as one token sequence made of
blocks ``[z_t^1 .. z_t^K, a_t]``: the K tokens of frame t followed by its action. A causal
Transformer reads the sequence; at every position it predicts the next frame token, and at
the action position also the reward and the episode end that follow. This module holds the
generic pieces: the Transformer itself (:class:`Transformer`) and its KV cache
(:class:`KVCache`). The world model that wires tokens, actions and heads together lives in
``world_models/iris.py``.

Shape symbols: N rows (sequences), S new positions in one call, P positions already in the
cache, M cache capacity (max positions), L layers, h heads, d head size, D width.

Masks are boolean and say who may be *seen*: ``key_valid [N, P+S]`` marks the positions a row
may attend to (False before an episode start, for instance). Causality is always added on top,
and a position always sees itself, so no softmax row is empty (no NaN), even at a masked
position whose output nobody reads.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class KVCache:
    """Preallocated keys and values, written in place, never reallocated while generating.

    ``data`` has layout [L, 2, N, h, M, d] (layer, key/value, row, head, position, head dim).
    The fill level is not stored here: callers pass the offset P, so one buffer can be shared
    and overwritten (a refill recomputes from position 0).
    """

    def __init__(self, data: torch.Tensor) -> None:
        if data.dim() != 6 or data.shape[1] != 2:
            raise ValueError(f"KV cache must be [L, 2, N, h, M, d], got {tuple(data.shape)}")
        self.data = data

    @classmethod
    def empty(
        cls,
        layers: int,
        rows: int,
        heads: int,
        capacity: int,
        head_dim: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> KVCache:
        """A zero cache for ``rows`` sequences of up to ``capacity`` positions."""
        shape = (layers, 2, rows, heads, capacity, head_dim)
        return cls(torch.zeros(shape, device=device, dtype=dtype))

    @property
    def capacity(self) -> int:
        """M, the number of positions the cache can hold."""
        return self.data.shape[4]

    def as_state(self) -> torch.Tensor:
        """The same storage viewed batch-first, [N, L, 2, h, M, d], to travel inside a State."""
        return self.data.permute(2, 0, 1, 3, 4, 5)

    @classmethod
    def from_state(cls, tensor: torch.Tensor) -> KVCache:
        """Inverse of :meth:`as_state` (a view: writes reach the state's tensor)."""
        return cls(tensor.permute(1, 2, 0, 3, 4, 5))


class SelfAttention(nn.Module):
    """Multi-head causal self-attention that can read from and write to a KV cache."""

    def __init__(self, width: int, heads: int, dropout: float) -> None:
        super().__init__()
        if width % heads != 0:
            raise ValueError(f"width {width} must be divisible by heads {heads}")
        self.heads, self.head_dim, self.dropout = heads, width // heads, dropout
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.resid_drop = nn.Dropout(dropout)

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor,
        cache: torch.Tensor | None,
        offset: int,
    ) -> torch.Tensor:
        """x [N, S, D]; mask bool [N, S, P+S] (True = may attend); cache [2, N, h, M, d] or None.

        With a cache, keys/values of the S new positions are written at [offset, offset+S) and
        attention reads positions [0, offset+S); without one it reads the S positions only.
        """
        n, s, width = x.shape
        q, k, v = self.qkv(x).view(n, s, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        # q, k, v: [N, h, S, d]
        if cache is not None:
            cache[0, :, :, offset : offset + s] = k
            cache[1, :, :, offset : offset + s] = v
            k = cache[0, :, :, : offset + s]  # [N, h, P+S, d]
            v = cache[1, :, :, : offset + s]
        drop = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None], dropout_p=drop)
        y = y.transpose(1, 2).reshape(n, s, width)  # [N, S, D]
        return self.resid_drop(self.proj(y))


class Block(nn.Module):
    """Pre-norm Transformer block: x + attn(ln(x)); x + mlp(ln(x))."""

    def __init__(self, width: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(width)
        self.attn = SelfAttention(width, heads, dropout)
        self.ln2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(
            nn.Linear(width, 4 * width),
            nn.GELU(),
            nn.Linear(4 * width, width),
            nn.Dropout(dropout),
        )

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor, cache: torch.Tensor | None, offset: int
    ) -> torch.Tensor:
        x = x + self.attn(self.ln1(x), mask, cache, offset)
        return x + self.mlp(self.ln2(x))


def attention_mask(key_valid: torch.Tensor, queries: int) -> torch.Tensor:
    """Causal mask for the last ``queries`` positions: bool [N, S, P+S].

    key_valid: bool [N, P+S]. Query i (absolute position P+i) sees key j iff j <= P+i and
    (key_valid[j] or j == P+i).
    """
    n, total = key_valid.shape
    q_pos = torch.arange(total - queries, total, device=key_valid.device)[:, None]  # [S, 1]
    k_pos = torch.arange(total, device=key_valid.device)[None, :]  # [1, P+S]
    causal = k_pos <= q_pos  # [S, P+S]
    return causal & (key_valid[:, None, :] | (k_pos == q_pos))  # [N, S, P+S]


def segment_mask(segment: torch.Tensor) -> torch.Tensor:
    """Causal mask that also forbids attention across episode boundaries.

    segment: long [N, S], the episode index of each position (non-decreasing along S).
    Returns bool [N, S, S]: query i sees key j iff j <= i and segment[j] == segment[i].
    """
    s = segment.shape[1]
    causal = torch.ones(s, s, dtype=torch.bool, device=segment.device).tril()
    return causal & (segment[:, :, None] == segment[:, None, :])


class Transformer(nn.Module):
    """A stack of causal blocks over already embedded positions (embedding is the caller's).

    Dropout (IRIS: 0.1 on embeddings, attention weights and residuals) is active only in
    training mode; cached generation is normally run in eval mode or under ``no_grad``.
    """

    def __init__(self, width: int, layers: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.width, self.num_layers, self.heads = width, layers, heads
        self.head_dim = width // heads
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(width, heads, dropout) for _ in range(layers))
        self.ln_f = nn.LayerNorm(width)
        self.apply(_init_weights)
        for name, p in self.named_parameters():  # GPT-2: scale residual projections by depth
            if name.endswith("attn.proj.weight") or name.endswith("mlp.2.weight"):
                nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * layers))

    def new_cache(
        self, rows: int, capacity: int, device: torch.device | str | None = None
    ) -> KVCache:
        """An empty cache sized for this Transformer: [L, 2, rows, h, capacity, d]."""
        dtype = self.ln_f.weight.dtype
        return KVCache.empty(
            self.num_layers, rows, self.heads, capacity, self.head_dim, device, dtype
        )

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor,
        cache: KVCache | None = None,
        offset: int = 0,
    ) -> torch.Tensor:
        """x [N, S, D] embedded inputs; mask bool [N, S, P+S]; returns hidden [N, S, D].

        With ``cache`` the S positions are appended at ``offset`` (= P) and attend to the
        cached prefix; generation one position at a time thus never recomputes the context.
        """
        if cache is not None and offset + x.shape[1] > cache.capacity:
            raise ValueError(
                f"KV cache overflow: {offset} + {x.shape[1]} positions > capacity {cache.capacity}"
            )
        x = self.drop(x)
        for i, block in enumerate(self.blocks):
            x = block(x, mask, None if cache is None else cache.data[i], offset)
        return self.ln_f(x)


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, 0.0, 0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
