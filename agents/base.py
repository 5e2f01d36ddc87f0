"""The Agent interface: the only thing the trainer knows about an agent.

``obs`` given to ``act`` is a dict of arrays for N parallel envs: ``image`` uint8 [N,H,W,C]
and/or ``vector`` float32 [N,D], plus ``is_first`` bool [N] (this observation came from a
reset, so recurrent state must restart). Actions come back in the env's format: int64 [N]
for Discrete spaces, float32 [N,A] for Box spaces.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import numpy as np
import torch


class Agent(ABC):
    """Acts in N envs at once and learns from replayed sequences."""

    #: replayed sequence length T the agent wants in ``update`` batches
    seq_len: int = 1
    #: sequences per batch B
    batch_size: int = 1

    @abstractmethod
    def act(
        self, obs: dict[str, np.ndarray], state: Any, explore: bool = True
    ) -> tuple[np.ndarray, Any]:
        """Choose actions for N envs. ``state`` is None on the first call."""

    def observe(
        self,
        reward: np.ndarray,
        terminated: np.ndarray,
        truncated: np.ndarray,
        valid: np.ndarray,
    ) -> None:
        """Outcome [N] of the last ``act``; online learners (bandits) learn here.

        ``valid`` is False for envs whose last step was an autoreset (the action was ignored
        and the reward is 0 by convention), so learners must skip those entries.
        """

    def update(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """One learning step on a replay batch [B,T,...]; returns metrics as tensors."""
        return {}

    @property
    def learns(self) -> bool:
        """False for agents (random, bandits on their own) that need no replay updates."""
        return True

    def rng_state(self) -> Any:
        """The agent's private random streams (not torch's/numpy's global ones), or None.
        ``agents/evaluate.py`` restores them after evaluating, as it does the global RNGs,
        so evaluating never changes what training samples next."""
        return None

    def set_rng_state(self, state: Any) -> None:
        """Restore what ``rng_state`` returned."""

    @abstractmethod
    def state_dict(self) -> dict:
        """Everything needed to continue learning: weights, optimisers, counters."""

    @abstractmethod
    def load_state_dict(self, state: dict) -> None:
        """Restore what ``state_dict`` returned."""
