"""Batched Monte-Carlo tree search: R roots searched together, one model call per simulation.

Shape symbols: R roots (one per env), A actions, M = simulations + 1 nodes per root.

One simulation, for every root at once (MuZero, Schrittwieser et al., 2020, Appendix B):

1. select: walk down from the root while the chosen child exists (a loop over depth,
   vectorised over roots) with UCT, pUCT, or Gumbel MuZero's rules;
2. expand: ONE batched ``model.step(embeddings [R], actions [R])`` creates node s + 1 in
   every tree;
3. backup: the new leaf's value goes up its path, discounted by gamma and the model's discount,
   and every edge's Q updates its root's min-max bounds.

pUCT (MuZero, Eq. 2):
    a = argmax Q_norm(s, a) + P(s, a) sqrt(N(s)) / (1 + N(s, a)) (c1 + log((N(s) + c2 + 1) / c2))
with N(s) = sum_b N(s, b) and Q_norm min-max normalised over the root's tree.
UCT: a = argmax ucb_score(Q_norm, N(s, a), N(s), c_uct) (agents/ucb.py, the bandits' rule).
Gumbel: sequential halving at the root, argmax pi'(a) - N(a) / (1 + N) below it (gumbel.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

from agents.planning import gumbel as gz
from agents.planning.tree import EmbeddingStore, Tree
from agents.ucb import puct_score, ucb_score

RULES = ("uct", "puct", "gumbel")
UNVISITED = ("zero", "parent", "inf")

# Score offset that puts unvisited children first (unvisited="inf"), ordered by prior.
_FIRST = 1e9


class PlanningModel(Protocol):
    """What the search needs from a model (true simulator or world model)."""

    def root(self, obs: Any, state: Any) -> tuple[Any, Tensor, Tensor]:
        """(embedding for R roots, prior [R, A] probabilities, value [R])."""

    def step(self, embedding: Any, action: Tensor) -> tuple[Any, Tensor, Tensor, Tensor, Tensor]:
        """(next embedding, reward [R], discount [R], prior [R, A], value [R]) for action [R]."""


@dataclass(frozen=True)
class SearchConfig:
    """The method's numbers: MuZero's c1, c2 and Gumbel MuZero's c_visit, c_scale by default."""

    simulations: int = 50
    rule: str = "puct"  # uct | puct | gumbel
    discount: float = 0.997  # gamma of the backed-up returns
    c1: float = 1.25  # pUCT
    c2: float = 19652.0  # pUCT
    c_uct: float = 1.41421356  # UCT exploration constant (sqrt 2, UCB1)
    unvisited: str = "zero"  # Q_norm of unvisited children: zero | parent (its V) | inf (first)
    dirichlet_alpha: float = 0.25  # root noise (pUCT only, when noise is given)
    dirichlet_fraction: float = 0.25
    max_considered: int = 16  # Gumbel: m actions sampled at the root
    c_visit: float = 50.0  # Gumbel sigma
    c_scale: float = 1.0  # Gumbel sigma

    def __post_init__(self) -> None:
        if self.rule not in RULES:
            raise ValueError(f"rule must be one of {RULES}, got {self.rule!r}")
        if self.unvisited not in UNVISITED:
            raise ValueError(f"unvisited must be one of {UNVISITED}, got {self.unvisited!r}")
        if self.simulations < 1:
            raise ValueError(f"simulations must be >= 1, got {self.simulations}")


@dataclass
class SearchResult:
    """What a search returns for R roots."""

    action: Tensor  # [R] int64: the search's choice (most visited; Gumbel: halving winner)
    visits: Tensor  # [R, A] root children's visit counts
    q: Tensor  # [R, A] root children's Q (unnormalised; 0 where unvisited)
    value: Tensor  # [R] root value: mean of the returns backed up through the root
    policy: Tensor  # [R, A] policy target: visit distribution (Gumbel: improved policy pi')
    tree: Tree
    embeddings: EmbeddingStore  # node embeddings, ``read(nodes [R])``


def search(
    model: PlanningModel,
    obs: Any,
    state: Any,
    config: SearchConfig,
    dirichlet: Tensor | None = None,
    gumbel: Tensor | None = None,
) -> SearchResult:
    """Search from R roots given by ``model.root(obs, state)``.

    ``dirichlet`` [R, A]: noise mixed into the root prior (pUCT/UCT; pass None to search
    without). ``gumbel`` [R, A]: the Gumbel(0, 1) sample of Gumbel MuZero (None: zeros, a
    deterministic search for evaluation). The search itself draws no random numbers, so the
    same inputs give the same tree, whether a root is searched alone or in a batch.
    """
    cfg = config
    emb, prior, value = model.root(obs, state)
    prior = prior.float()
    roots, actions = prior.shape
    device = prior.device
    tree = Tree.allocate(roots, cfg.simulations + 1, actions, device)
    root_logits = gz.prior_logits(prior)  # Gumbel uses the prior before any Dirichlet noise
    if dirichlet is not None and cfg.rule != "gumbel":
        f = cfg.dirichlet_fraction
        prior = (1.0 - f) * prior + f * dirichlet.to(prior)
    tree.prior[:, 0] = prior
    tree.value[:, 0] = value.float()
    store = EmbeddingStore(emb, roots, cfg.simulations + 1)
    root_nodes = torch.zeros(roots, dtype=torch.int64, device=device)

    if cfg.rule == "gumbel":
        g = torch.zeros_like(prior) if gumbel is None else gumbel.to(prior)
        m = min(cfg.max_considered, actions, cfg.simulations)
        considered = gz.considered_mask(g, root_logits, m)
        schedule = gz.halving_schedule(cfg.simulations, m)

    for s in range(cfg.simulations):
        first = None
        if cfg.rule == "gumbel":
            visits, _ = tree.child_stats(root_nodes)
            score = g + root_logits + _sigma(tree, root_nodes, cfg)
            first = gz.root_action(score, visits, considered, schedule[s])
        path, parent, action = _descend(tree, cfg, first, s + 1)
        child_emb, reward, discount, child_prior, child_value = model.step(
            store.read(parent), action
        )
        node = s + 1
        tree.expand(
            node,
            parent,
            action,
            reward.float(),
            discount.float(),
            child_prior.float(),
            child_value.float(),
        )
        store.write(node, child_emb)
        tree.backup(path, child_value.float(), cfg.discount)

    visits, q = tree.child_stats(root_nodes)
    if cfg.rule == "gumbel":
        sig = _sigma(tree, root_nodes, cfg)
        chosen = gz.root_action(g + root_logits + sig, visits, considered, None)
        policy = gz.improved_policy(root_logits, sig)
    else:
        # most visited; ties go to the higher Q (not to the lowest index, which biases
        # symmetric tasks such as CartPole towards action 0)
        tie_break = torch.where(visits > 0, tree.normalise(q).clamp(0.0, 1.0), 0.0) * 0.5
        chosen = torch.argmax(visits.to(q.dtype) + tie_break, dim=-1)
        policy = visits / visits.sum(-1, keepdim=True).clamp(min=1.0)
    return SearchResult(chosen, visits, q, tree.node_value(root_nodes), policy, tree, store)


def _sigma(tree: Tree, nodes: Tensor, cfg: SearchConfig) -> Tensor:
    """sigma(normalised completed Q) [R, A] at ``nodes`` [R]."""
    visits, q = tree.child_stats(nodes)
    value = tree.f_value[tree.flat(nodes)]
    cq = gz.completed_q(q, visits, tree.node_prior(nodes), value)
    return gz.sigma(tree.normalise(cq), visits, cfg.c_visit, cfg.c_scale)


def select(tree: Tree, nodes: Tensor, cfg: SearchConfig) -> Tensor:
    """The child to follow [R] from ``nodes`` [R] under ``cfg.rule`` (below the Gumbel root)."""
    prior = tree.node_prior(nodes)  # [R, A]
    visits, q = tree.child_stats(nodes)
    if cfg.rule == "gumbel":
        value = tree.f_value[tree.flat(nodes)]
        cq = gz.completed_q(q, visits, prior, value)
        sig = gz.sigma(tree.normalise(cq), visits, cfg.c_visit, cfg.c_scale)
        return gz.interior_action(gz.prior_logits(prior), sig, visits)
    total = visits.sum(-1, keepdim=True)  # [R, 1]
    unvisited = visits == 0
    if cfg.unvisited == "parent":
        fill = tree.normalise(tree.node_value(nodes)).unsqueeze(-1)  # [R, 1]
    else:
        fill = torch.zeros_like(total)
    mean = torch.where(unvisited, fill, tree.normalise(q))  # [R, A]
    if cfg.rule == "puct":
        scale = cfg.c1 + torch.log((total + cfg.c2 + 1.0) / cfg.c2)  # MuZero's c(s) [R, 1]
        score = puct_score(mean, visits, total, prior, scale)
    else:
        score = ucb_score(mean, visits, total, cfg.c_uct)  # inf where unvisited
        if cfg.unvisited != "inf":
            score = torch.where(unvisited, fill.expand_as(score), score)
    if cfg.unvisited == "inf":  # unvisited children first, the higher prior first among them
        score = torch.where(unvisited, _FIRST + prior, score)
    return torch.argmax(score, dim=-1)


def _descend(
    tree: Tree, cfg: SearchConfig, first: Tensor | None, leaf: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Walk from each root to an unexpanded edge, one depth level per iteration.

    ``first`` [R]: the root's action when the rule fixes it (Gumbel), else None. Returns the
    path [R, L] (root, .., parent, ``leaf``, then -1), the parent [R] and the new edge's
    action [R]; node ``leaf`` becomes the child of that edge in every root.
    """
    node = torch.zeros_like(tree.rows)
    parent, action = node.clone(), node.clone()
    active = torch.ones_like(node, dtype=torch.bool)
    cols = [node]
    depth = 0
    while True:
        a = first if (depth == 0 and first is not None) else select(tree, node, cfg)
        child = tree.child(node, a)  # [R]
        stop = active & (child < 0)
        parent = torch.where(stop, node, parent)
        action = torch.where(stop, a, action)
        active = active & (child >= 0)
        if not bool(active.any()):
            break
        node = torch.where(active, child, node)
        cols.append(torch.where(active, child, torch.full_like(child, -1)))
        depth += 1
    cols.append(torch.full_like(node, -1))  # room for the new leaf
    path = torch.stack(cols, dim=1)  # [R, L]
    length = (path >= 0).sum(1, keepdim=True)  # [R, 1] the new leaf's position
    path.scatter_(1, length, leaf)
    return path, parent, action
