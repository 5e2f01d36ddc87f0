"""Uniform random actions: the reference agent for normalised scores."""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np

from agents.base import Agent


class RandomAgent(Agent):
    """Samples actions uniformly from the action space with its own seeded generator."""

    def __init__(self, cfg: Any, obs_space: gym.spaces.Dict, action_space: gym.Space, device):
        self.action_space = action_space
        self.rng = np.random.default_rng(int(cfg.seed))

    @property
    def learns(self) -> bool:
        return False

    def act(self, obs: dict[str, np.ndarray], state: Any, explore: bool = True):
        n = len(obs["is_first"])
        space = self.action_space
        if isinstance(space, gym.spaces.Discrete):
            actions = self.rng.integers(0, space.n, size=n, dtype=np.int64) + int(space.start)
        else:
            low, high = space.low, space.high
            actions = self.rng.uniform(low, high, size=(n, *space.shape)).astype(np.float32)
        return actions, state

    def state_dict(self) -> dict:
        return {"rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict) -> None:
        self.rng.bit_generator.state = state["rng"]
