"""Gumbel MuZero's pieces (Danihelka et al., 2022, "Policy improvement by planning with Gumbel").

Shape symbols: R roots, A actions.

- Root: sample g ~ Gumbel(0, 1) per action, consider the top-m actions by g + logits, and split
  the n simulations by sequential halving: log2(m) phases, each phase gives every remaining
  action an equal share, then keeps the better half by g + logits + sigma(q_hat).
- sigma(q) = (c_visit + max_b N(b)) * c_scale * q for q normalised to [0, 1] (the paper
  uses c_visit = 50, c_scale = 1).
- Completed Q: visited actions keep their Q, unvisited ones get v_mix, the value
  estimate mixed with the prior-weighted mean Q of the visited actions.
- Improved policy pi' = softmax(logits + sigma(completedQ)): the root's policy target,
  and, below the root, the deterministic selection argmax_a (pi'(a) - N(a) / (1 + sum_b N(b))).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def halving_schedule(simulations: int, considered: int) -> list[int]:
    """Visit level to fill at each simulation under sequential halving.

    Simulation s visits, among the considered actions that have exactly ``schedule[s]`` visits,
    the one with the best g + logits + sigma(q). A phase with k actions left and b visits each
    appends levels b, .., b + p - 1, each k times, p = max(1, n // (ceil(log2 m) * k)); then k
    halves (never below 2, so the last two keep sharing what budget is left).
    """
    n, m = simulations, considered
    if m <= 1:
        return list(range(n))
    phases = math.ceil(math.log2(m))
    levels: list[int] = []
    k, base = m, 0
    while len(levels) < n:
        per = max(1, n // (phases * k))
        for j in range(per):
            levels.extend([base + j] * k)
        base += per
        k = max(2, math.ceil(k / 2))
    return levels[:n]


def sigma(q: Tensor, visits: Tensor, c_visit: float, c_scale: float) -> Tensor:
    """Monotone transform of normalised Q [R, A] scaled by the most visited action's count."""
    return (c_visit + visits.max(dim=-1, keepdim=True).values) * c_scale * q


def completed_q(q: Tensor, visits: Tensor, prior: Tensor, value: Tensor) -> Tensor:
    """Q [R, A] with unvisited actions filled by v_mix (unnormalised, like ``q``).

    v_mix = (v + N / sum_{b visited} pi(b) * sum_{a visited} pi(a) q(a)) / (1 + N), N = sum_b
    N(b); with no visits it is the value estimate ``value`` [R] itself.
    """
    visited = visits > 0
    total = visits.sum(-1)  # [R]
    mass = (prior * visited).sum(-1)  # [R]
    weighted = (prior * torch.where(visited, q, torch.zeros_like(q))).sum(-1)
    mean_q = weighted / mass.clamp(min=1e-12)
    v_mix = (value + total * mean_q) / (1.0 + total)  # [R]
    return torch.where(visited, q, v_mix.unsqueeze(-1))


def prior_logits(prior: Tensor) -> Tensor:
    """log pi [.., A] from probabilities, with zeros floored so no logit is -inf."""
    return torch.log(prior.clamp(min=1e-12))


def improved_policy(logits: Tensor, sigma_q: Tensor) -> Tensor:
    """pi' = softmax(logits + sigma(completedQ)) [R, A]."""
    return torch.softmax(logits + sigma_q, dim=-1)


def interior_action(logits: Tensor, sigma_q: Tensor, visits: Tensor) -> Tensor:
    """Deterministic non-root selection: argmax_a pi'(a) - N(a) / (1 + sum_b N(b)) [R]."""
    pi = improved_policy(logits, sigma_q)
    return torch.argmax(pi - visits / (1.0 + visits.sum(-1, keepdim=True)), dim=-1)


def root_action(score: Tensor, visits: Tensor, considered: Tensor, level: int | None) -> Tensor:
    """Root action [R]: the best ``score`` [R, A] among considered actions at visit ``level``.

    ``level`` None picks among the considered actions with the most visits (the final choice
    after sequential halving). Roots with no action at the level fall back to all considered.
    """
    if level is None:
        top = torch.where(considered, visits, torch.full_like(visits, -1.0))
        mask = considered & (visits == top.max(-1, keepdim=True).values)
    else:
        mask = considered & (visits == level)
        mask = torch.where(mask.any(-1, keepdim=True), mask, considered)
    return torch.argmax(torch.where(mask, score, torch.full_like(score, -math.inf)), dim=-1)


def considered_mask(gumbel: Tensor, logits: Tensor, m: int) -> Tensor:
    """Bool [R, A]: the top-m actions by g + logits (Gumbel-top-k sampling without replacement)."""
    top = torch.topk(gumbel + logits, m, dim=-1).indices
    mask = torch.zeros_like(logits, dtype=torch.bool)
    return mask.scatter(-1, top, True)
