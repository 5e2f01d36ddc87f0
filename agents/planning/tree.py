"""The search tree of R roots kept in preallocated tensors, and where node embeddings live.

Shape symbols: R roots (one per env), M nodes per root (= simulations + 1), A actions.
Node 0 is every root; simulation s adds node s + 1 to every root's tree at once, so a node's
index is also the index of its embedding and is the same in every root. Children that are not
expanded yet have index -1.

Statistics follow MuZero (Schrittwieser et al., 2020, Appendix B): a node stores the reward and
the model's discount on the edge that leads into it, and the sum and count of the returns backed
up through it; Q(s, a) = r(s, a) + gamma * d(s, a) * V(child) with V = value_sum / visits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor


@dataclass
class Tree:
    """Node and edge arrays for R roots; all tensors are on one device.

    Edges (s, a) keep their own visit count and return sum, so a node's children are read with
    one row gather instead of one gather per child statistic. Every child has exactly one
    incoming edge, so edge_visits[s, a] = visits[child] and
    edge_return[s, a] / edge_visits[s, a] = r + gamma * d * V(child) = Q(s, a).
    """

    visits: Tensor  # [R, M] float: returns backed up through the node
    value_sum: Tensor  # [R, M] sum of those returns (from the node on, its own reward excluded)
    reward: Tensor  # [R, M] reward on the edge parent -> node
    discount: Tensor  # [R, M] model discount on that edge (0 after a termination)
    value: Tensor  # [R, M] the model's value estimate at the node
    prior: Tensor  # [R, M, A] the model's policy (probabilities) at the node
    children: Tensor  # [R, M, A] int64 node index of each child, -1 where not expanded
    edge_visits: Tensor  # [R, M, A] visits of each edge (= of its child)
    edge_return: Tensor  # [R, M, A] sum of r + gamma * d * G backed up through each edge
    parent: Tensor  # [R, M] int64 parent index, -1 at the root
    action: Tensor  # [R, M] int64 action from the parent, -1 at the root
    depth: Tensor  # [R, M] int64 edges from the root
    q_min: Tensor  # [R] smallest Q seen in this root's tree (min-max normalisation)
    q_max: Tensor  # [R] largest Q seen
    rows: Tensor  # [R] arange(R), for gathering one node per root
    row_base: Tensor  # [R] r * M: node (r, n) is row r * M + n of the [R * M, ...] views

    @classmethod
    def allocate(cls, roots: int, nodes: int, actions: int, device: torch.device) -> Tree:
        """Empty arrays for ``roots`` trees of ``nodes`` nodes each."""
        f = dict(device=device, dtype=torch.float32)
        i = dict(device=device, dtype=torch.int64)
        return cls(
            visits=torch.zeros(roots, nodes, **f),
            value_sum=torch.zeros(roots, nodes, **f),
            reward=torch.zeros(roots, nodes, **f),
            discount=torch.ones(roots, nodes, **f),
            value=torch.zeros(roots, nodes, **f),
            prior=torch.zeros(roots, nodes, actions, **f),
            children=torch.full((roots, nodes, actions), -1, **i),
            edge_visits=torch.zeros(roots, nodes, actions, **f),
            edge_return=torch.zeros(roots, nodes, actions, **f),
            parent=torch.full((roots, nodes), -1, **i),
            action=torch.full((roots, nodes), -1, **i),
            depth=torch.zeros(roots, nodes, **i),
            q_min=torch.full((roots,), float("inf"), **f),
            q_max=torch.full((roots,), float("-inf"), **f),
            rows=torch.arange(roots, device=device),
            row_base=torch.arange(roots, device=device) * nodes,
        )

    def __post_init__(self) -> None:
        a = self.prior.shape[-1]
        # flat views [R * M, ...] sharing memory with the arrays: row r * M + n is node (r, n)
        self.f_visits, self.f_value_sum = self.visits.view(-1), self.value_sum.view(-1)
        self.f_value, self.f_depth = self.value.view(-1), self.depth.view(-1)
        self.f_prior = self.prior.view(-1, a)
        self.f_children = self.children.view(-1)  # [R * M * A]
        self.f_edge_visits, self.f_edge_return = (
            self.edge_visits.view(-1),
            self.edge_return.view(-1),
        )
        self.f_edge_visits_rows = self.edge_visits.view(-1, a)
        self.f_edge_return_rows = self.edge_return.view(-1, a)

    @property
    def shape(self) -> tuple[int, int, int]:
        """(R, M, A)."""
        return tuple(self.prior.shape)

    def flat(self, nodes: Tensor) -> Tensor:
        """Row index into the [R * M, ...] views for node ``nodes[..., r]`` of root r."""
        if nodes.dim() == 1:
            return self.row_base + nodes
        return self.row_base.view(-1, *([1] * (nodes.dim() - 1))) + nodes

    def node_value(self, nodes: Tensor) -> Tensor:
        """V(node) [R]: mean backed-up return, or the model's value before the first visit."""
        flat = self.flat(nodes)
        n = self.f_visits[flat]
        mean = self.f_value_sum[flat] / n.clamp(min=1.0)
        return torch.where(n > 0, mean, self.f_value[flat])

    def node_prior(self, nodes: Tensor) -> Tensor:
        """The model's policy [R, A] at ``nodes`` [R]."""
        return self.f_prior[self.flat(nodes)]

    def child_stats(self, nodes: Tensor) -> tuple[Tensor, Tensor]:
        """Visit counts [R, A] and Q values [R, A] (unnormalised, 0 if unvisited) of children."""
        flat = self.flat(nodes)
        visits = self.f_edge_visits_rows[flat]  # [R, A]
        q = self.f_edge_return_rows[flat] / visits.clamp(min=1.0)
        return visits, q

    def child(self, nodes: Tensor, actions: Tensor) -> Tensor:
        """Child index [R] of ``nodes`` [R] by ``actions`` [R]; -1 where not expanded."""
        return self.f_children[self.flat(nodes) * self.prior.shape[-1] + actions]

    def normalise(self, q: Tensor) -> Tensor:
        """Min-max normalise per root: (q - min) / (max - min) once max > min, else q as is.

        ``q`` is [R] or [R, ...]; MuZero's MinMaxStats, one per root.
        """
        cache = getattr(self, "_norm", None)
        if cache is None or cache[0] is not self.q_min or cache[1] is not self.q_max:
            spread = self.q_max - self.q_min
            ok = spread > 0
            lo = torch.where(ok, self.q_min, torch.zeros_like(spread))  # [R]
            scale = torch.where(ok, 1.0 / torch.where(ok, spread, 1.0), 1.0)
            cache = self._norm = (self.q_min, self.q_max, lo, scale)
        shape = (-1,) + (1,) * (q.dim() - 1)
        return (q - cache[2].view(shape)) * cache[3].view(shape)

    def expand(
        self,
        node: int,
        parent: Tensor,
        action: Tensor,
        reward: Tensor,
        discount: Tensor,
        prior: Tensor,
        value: Tensor,
    ) -> None:
        """Write node ``node`` of every root as child ``action`` [R] of ``parent`` [R]."""
        a = self.prior.shape[-1]
        self.f_children[self.flat(parent) * a + action] = node
        self.parent[:, node] = parent
        self.action[:, node] = action
        self.depth[:, node] = self.f_depth[self.flat(parent)] + 1
        self.reward[:, node] = reward
        self.discount[:, node] = discount
        self.prior[:, node] = prior
        self.value[:, node] = value

    def backup(self, path: Tensor, value: Tensor, gamma: float) -> None:
        """Back the leaf's value [R] up its path [R, L] (root .. leaf, -1 after the leaf).

        Returns along the path: G = value at the leaf, G <- r + gamma * d * G one step up
        (r, d: reward and discount on the edge into the node below). Every node on the path
        adds G to value_sum and 1 to visits; every edge adds its return r + gamma * d * G and
        1 visit, and its new Q updates the root's min-max bounds. A loop over depth of a few
        column operations, vectorised over roots; everything else is a handful of scatters.
        """
        r, m, a = self.shape
        valid = path >= 0  # [R, L]
        idx = path.clamp(min=0)
        rew = self.reward.gather(1, idx)  # [R, L]
        scale = gamma * self.discount.gather(1, idx)
        g = value.to(rew.dtype)
        cols = [g]
        for k in range(path.shape[1] - 2, -1, -1):  # G at position k from position k + 1
            g = torch.where(valid[:, k + 1], rew[:, k + 1] + scale[:, k + 1] * g, g)
            cols.append(g)
        ret = torch.stack(cols[::-1], dim=1)  # [R, L]
        mask = valid.to(ret.dtype)
        flat = self.flat(idx).view(-1)
        self.f_value_sum.index_add_(0, flat, (ret * mask).view(-1))
        self.f_visits.index_add_(0, flat, mask.view(-1))
        # edge (node at k - 1, action into node at k) carries the return G_{k-1}
        acts = self.action.gather(1, idx[:, 1:]).clamp(min=0)  # [R, L-1]
        edges = (self.flat(idx[:, :-1]) * a + acts).view(-1)
        emask = mask[:, 1:]
        self.f_edge_visits.index_add_(0, edges, emask.reshape(-1))
        self.f_edge_return.index_add_(0, edges, (ret[:, :-1] * emask).reshape(-1))
        q = self.f_edge_return[edges] / self.f_edge_visits[edges].clamp(min=1.0)
        q = q.view(r, -1)  # [R, L-1] Q of every edge on the path, after this backup
        inf = torch.full_like(q, float("inf"))
        live = emask > 0
        self.q_min = torch.minimum(self.q_min, torch.where(live, q, inf).amin(1))
        self.q_max = torch.maximum(self.q_max, torch.where(live, q, -inf).amax(1))


class EmbeddingStore:
    """Holds each node's model embedding, indexed like the tree's nodes.

    Tensors and dicts of tensors ([R, ...] per node, e.g. a world model's latent state) go to
    preallocated tensors [R, M, ...] and are gathered by node index; anything else (a list of R
    env snapshots for the true simulator) is kept in a Python list per root.
    """

    def __init__(self, root: Any, roots: int, nodes: int):
        self.roots, self.nodes = roots, nodes
        if isinstance(root, Tensor):
            self.kind = "tensor"
            self.data: Any = self._alloc(root)
        elif isinstance(root, dict) and all(isinstance(v, Tensor) for v in root.values()):
            self.kind = "dict"
            self.data = {k: self._alloc(v) for k, v in root.items()}
        elif isinstance(root, (list, tuple)) and len(root) == roots:
            self.kind = "list"
            self.data = [[None] * nodes for _ in range(roots)]
        else:
            raise TypeError(
                "a planning model's embedding must be a tensor [R, ...], a dict of tensors "
                f"[R, ...] or a list of R items; got {type(root).__name__}"
            )
        self.write(0, root)

    def _alloc(self, x: Tensor) -> Tensor:
        return torch.zeros(self.roots, self.nodes, *x.shape[1:], dtype=x.dtype, device=x.device)

    def write(self, node: int, emb: Any) -> None:
        """Store ``emb`` (for R roots) as node ``node`` of every root."""
        if self.kind == "tensor":
            self.data[:, node] = emb
        elif self.kind == "dict":
            for k, v in emb.items():
                self.data[k][:, node] = v
        else:
            for r in range(self.roots):
                self.data[r][node] = emb[r]

    def read(self, nodes: Tensor) -> Any:
        """The embeddings of node ``nodes[r]`` of each root r, batched [R, ...]."""
        if self.kind == "list":
            return [self.data[r][int(n)] for r, n in enumerate(nodes.tolist())]
        rows = torch.arange(self.roots, device=nodes.device)
        if self.kind == "tensor":
            return self.data[rows, nodes]
        return {k: v[rows, nodes] for k, v in self.data.items()}
