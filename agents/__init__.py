"""Agents: everything that acts or learns a policy, plus replay memory and the training loop."""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import torch

from agents.base import Agent
from agents.config import ConfigError


def _random(cfg, obs_space, action_space, device):
    from agents.random_agent import RandomAgent

    return RandomAgent(cfg, obs_space, action_space, device)


def _dreamer(cfg, obs_space, action_space, device):
    from agents.dreamer import DreamerAgent

    return DreamerAgent(cfg, obs_space, action_space, device)


def _bandit(cfg, obs_space, action_space, device):
    from agents.bandits import BanditAgent

    return BanditAgent(cfg, obs_space, action_space, device)


def _mcts(cfg, obs_space, action_space, device):
    from agents.mcts import MCTSAgent

    return MCTSAgent(cfg, obs_space, action_space, device)


def _world_models(cfg, obs_space, action_space, device):
    from agents.world_models_agent import WorldModelsAgent

    return WorldModelsAgent(cfg, obs_space, action_space, device)


AGENTS = {
    "random": _random,
    "dreamer": _dreamer,
    "bandit": _bandit,
    "mcts": _mcts,
    "world_models": _world_models,
}


def make_agent(
    cfg: Any, obs_space: gym.spaces.Dict, action_space: gym.Space, device: torch.device
) -> Agent:
    """Build the agent named by ``cfg.agent.name`` for these spaces (cfg is the full config)."""
    name = cfg.agent.name
    if name not in AGENTS:
        raise ConfigError(f"agent.name '{name}' is unknown; known agents: {sorted(AGENTS)}")
    return AGENTS[name](cfg, obs_space, action_space, device)
