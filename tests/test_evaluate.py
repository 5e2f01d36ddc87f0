"""agents/evaluate.py: which episodes an evaluation over several envs counts."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
from omegaconf import OmegaConf

import agents.evaluate as evaluate_module
from agents.random_agent import RandomAgent


class FixedLength(gym.Env):
    """Reward 1 per step; every episode lasts ``length`` steps."""

    observation_space = gym.spaces.Dict({"vector": gym.spaces.Box(-1, 1, (1,), np.float32)})
    action_space = gym.spaces.Discrete(2)

    def __init__(self, length: int) -> None:
        self.length, self.t = length, 0

    def reset(self, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        return {"vector": np.zeros(1, np.float32)}, {}

    def step(self, action):
        self.t += 1
        return {"vector": np.zeros(1, np.float32)}, 1.0, self.t >= self.length, False, {}


def test_each_env_counts_its_share_so_short_episodes_are_not_over_counted(monkeypatch):
    """Env 0's episodes last 2 steps and env 1's 10: counting the first 4 to finish would give
    four 2s (mean 2); each env counts its own 2 episodes, so the mean is 6."""

    def two_lengths(cfg, num_envs, seed):
        return gym.vector.SyncVectorEnv(
            [lambda n=n: FixedLength(n) for n in (2, 10)],
            autoreset_mode=gym.vector.AutoresetMode.NEXT_STEP,
        )

    monkeypatch.setattr(evaluate_module, "make_vector_env", two_lengths)
    space = FixedLength.observation_space
    agent = RandomAgent(OmegaConf.create({"seed": 0}), space, FixedLength.action_space, "cpu")
    result = evaluate_module.evaluate(agent, None, episodes=4, num_envs=2)
    assert sorted(result["returns"]) == [2.0, 2.0, 10.0, 10.0]
    assert result["return_mean"] == 6.0
    odd = evaluate_module.evaluate(agent, None, episodes=3, num_envs=2)  # env 0 runs one more
    assert sorted(odd["returns"]) == [2.0, 2.0, 10.0]


def test_no_more_envs_than_episodes(monkeypatch):
    """eval_envs above the episode count builds only as many envs as there are episodes."""
    built = []

    def make(cfg, num_envs, seed):
        built.append(num_envs)
        return gym.vector.SyncVectorEnv(
            [lambda: FixedLength(3) for _ in range(num_envs)],
            autoreset_mode=gym.vector.AutoresetMode.NEXT_STEP,
        )

    monkeypatch.setattr(evaluate_module, "make_vector_env", make)
    space = FixedLength.observation_space
    agent = RandomAgent(OmegaConf.create({"seed": 0}), space, FixedLength.action_space, "cpu")
    result = evaluate_module.evaluate(agent, None, episodes=2, num_envs=5)
    assert built == [2] and result["returns"] == [3.0, 3.0]
