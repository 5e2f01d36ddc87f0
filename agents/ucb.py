"""The upper-confidence rules shared by the bandit policies and by MCTS at every tree node.

Shapes broadcast: a bandit passes ``mean``/``count`` [R, A] and ``total`` [R, 1]; a tree
passes per-child statistics [..., K] and the parent's visit count [..., 1].
"""

from __future__ import annotations

import math

import torch


def ucb_score(
    mean: torch.Tensor,
    count: torch.Tensor,
    total: torch.Tensor | float,
    c: float,
    unvisited: float = float("inf"),
) -> torch.Tensor:
    """UCB1 / UCT: ``mean + c * sqrt(ln(total) / count)``, and ``unvisited`` where count == 0.

    mean, count: [..., K] (counts may be fractional, e.g. discounted); total: broadcastable
    to them (the parent's count, or the time step t), clamped to >= 1 so ln(total) >= 0.
    c = sqrt(2) is Auer et al.'s UCB1; Sutton & Barto's eq. (2.10) uses t and c = 2.
    ``unvisited = inf`` tries every arm/child once first; a finite value is a first-play urgency.
    Forward only: unvisited entries would carry nan gradients.
    """
    if isinstance(total, (int, float)):
        c2_log_total: torch.Tensor | float = c * c * math.log(max(total, 1.0))
        if unvisited == float("inf") and c2_log_total > 0:  # fast path: x/0 = inf does it
            return mean + (c2_log_total / count).sqrt()
    else:  # log before broadcasting: one value per parent
        c2_log_total = c * c * total.to(mean.dtype).clamp_min(1.0).log()
    bonus = (c2_log_total / count).sqrt()  # inf or nan where count == 0, masked below
    return torch.where(count > 0, mean + bonus, unvisited)


def puct_score(
    mean: torch.Tensor,
    count: torch.Tensor,
    total: torch.Tensor | float,
    prior: torch.Tensor,
    c: float,
) -> torch.Tensor:
    """AlphaZero's PUCT: ``mean + c * prior * sqrt(total) / (1 + count)``.

    mean, count, prior: [..., K]; total: the parent's visit count, broadcastable. Unvisited
    children need no special case: their bonus is largest where the prior is.
    """
    total = torch.as_tensor(total, dtype=mean.dtype, device=mean.device)
    return mean + c * prior * total.clamp_min(0.0).sqrt() / (1.0 + count)
