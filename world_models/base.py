"""The WorldModel interface every world-model family implements.

Shape symbols (see docs/shapes.md): B batch, T sequence length, N any flat batch of
states (N = B*T when imagination starts from every posterior state), A action size
(one-hot size for discrete actions), F feature size.

Batches follow the replay row convention: row t holds ``obs[t]``, ``reward[t]`` (received on
arriving at obs[t]), ``is_first[t]`` (obs[t] came from reset), ``is_terminal[t]`` (obs[t] is
terminal), ``is_last[t]`` and ``action[t]`` (the action the policy chose *at* obs[t]).
A model that needs the previous action uses ``action[t-1]`` and zeros where ``is_first``.
Actions given to a world model are float tensors [..., A]: one-hot for discrete spaces,
values in [-1, 1] for continuous ones.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import nn

from world_models.networks import Features

State = dict[str, torch.Tensor]
"""A latent state: a flat dict of tensors sharing leading batch dimensions."""


def state_map(state: State, fn) -> State:
    """Apply ``fn`` to every tensor of a state (reshape, detach, index, ...)."""
    return {k: fn(v) for k, v in state.items()}


def flatten_state(state: State, dims: int = 2) -> State:
    """Merge the first ``dims`` batch dimensions: [B, T, ...] -> [B*T, ...]."""
    return {k: v.reshape(-1, *v.shape[dims:]) for k, v in state.items()}


class WorldModel(nn.Module, ABC):
    """A learned model of the environment that an agent can train and plan inside."""

    feature_dim: int
    """Size F of ``features(state)``."""

    differentiable_imagination: bool = True
    """Whether returns can be backpropagated through ``imagine_step`` into the actions
    (``agent.actor_grad: dynamics``); False where dream steps run without a graph (IRIS)."""

    batched_heads: bool = False
    """Whether ``imagine_step(state, action, heads=False)`` skips the reward and continue heads
    and ``heads(feat)`` predicts them (reward [...], continue probability [...]) for features
    [..., F]: the actor-critic then runs the heads once over a whole dream [N, H+1, F] instead of
    once per step (the RSSM; a Transformer predicts them inside its step)."""

    capturable: bool = False
    """Whether the Dreamer update around this model can be recorded as one CUDA graph
    (``agent.cuda_graph``): no host syncs, no Python-side state that changes per update, static
    shapes (checked by tests/test_cuda_graph.py)."""

    @abstractmethod
    def loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict, State]:
        """Learn from replayed sequences.

        batch: obs keys (``image`` uint8 [B,T,H,W,C], ``vector`` float [B,T,D]), ``action``
        float [B,T,A], ``reward`` [B,T], ``is_first``/``is_terminal`` bool [B,T].
        Returns (scalar loss, metrics as detached tensors, posterior states [B,T,...]).
        """

    @abstractmethod
    def initial(self, batch_size: int) -> State:
        """The latent state before the first observation, [N, ...]."""

    @abstractmethod
    def observe_step(
        self,
        state: State,
        prev_action: torch.Tensor,
        obs: dict[str, torch.Tensor],
        is_first: torch.Tensor,
    ) -> State:
        """Filter the latent state with one real observation (acting in the env).

        prev_action [N,A]; obs values [N,...]; is_first bool [N] resets those rows.
        """

    @abstractmethod
    def imagine_step(
        self, state: State, action: torch.Tensor
    ) -> tuple[State, torch.Tensor, torch.Tensor]:
        """One batched dream step: (next state [N,...], reward [N], continue prob [N])."""

    @abstractmethod
    def features(self, state: State) -> torch.Tensor:
        """The vector [..., F] that actors, critics and planners read."""

    def head_features(self, state: State) -> Features:
        """``features(state)`` in the form an ``MLP`` reads fastest (``networks.Features``):
        the dense tensor by default; the RSSM gives ``OneHotFeatures`` wherever no gradient
        has to reach its one-hot z (the actor-critic's dreams without ``actor_grad:
        dynamics``), so actor and critic skip the mostly-zero columns."""
        return self.features(state)

    def param_groups(self) -> list[dict]:
        """Optimiser parameter groups for the learner's AdamW. Groups without their own
        ``lr`` / ``weight_decay`` get ``world_model.lr`` and no decay; the default is one
        group of every parameter (IRIS overrides it: per-part lrs and decay)."""
        return [{"params": list(self.parameters())}]
