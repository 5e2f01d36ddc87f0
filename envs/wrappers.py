"""Wrappers every env made by ``envs.make_env`` is built from.

Observations become a ``gymnasium.spaces.Dict`` with ``image`` (uint8 [H, W, C]) and/or
``vector`` (float32 [D]); Box actions are rescaled to [-1, 1] (float32); ``ActionRepeat``
repeats an action and sums the rewards. Wrapper counters live in plain attributes (ints, floats,
bools, numpy arrays) so ``envs.state`` can snapshot them generically.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces
from PIL import Image

from envs.errors import EnvError

#: ITU-R 601 luma weights, the same grayscale conversion DreamerV3 applies after resizing.
GRAY_WEIGHTS = np.array([0.299, 0.587, 1 - (0.299 + 0.587)])


def resize_image(image: np.ndarray, size: int, grayscale: bool) -> np.ndarray:
    """uint8 [H, W, 3] -> uint8 [size, size, C] (C = 1 if grayscale else 3), PIL bilinear.

    Bilinear PIL resizing (antialiased when shrinking) as in DreamerV3's ``resize: pillow``.
    """
    if image.shape[0] != size or image.shape[1] != size:
        image = np.asarray(Image.fromarray(image).resize((size, size), Image.BILINEAR))
    if grayscale:
        image = (image * GRAY_WEIGHTS).sum(-1).astype(np.uint8)[:, :, None]  # [size, size, 1]
    return image


def image_space(size: int, grayscale: bool) -> spaces.Box:
    return spaces.Box(0, 255, (size, size, 1 if grayscale else 3), np.uint8)


class DictObservation(gym.ObservationWrapper):
    """Map the env's observation to ``{"image": uint8 [S,S,C]}`` and/or ``{"vector": f32 [D]}``.

    ``image_source``: ``"obs"`` resizes an image observation, ``"render"`` resizes
    ``env.render()`` (the env must use ``render_mode="rgb_array"``), ``None`` gives no image.
    ``vector``: keep the (flattened, float32) observation vector under ``vector``.
    """

    def __init__(
        self,
        env: gym.Env,
        image_source: str | None,
        vector: bool,
        size: int = 64,
        grayscale: bool = False,
    ):
        super().__init__(env)
        self.image_source, self.vector, self.size, self.grayscale = (
            image_source,
            vector,
            size,
            grayscale,
        )
        obs_space = env.observation_space
        parts: dict[str, spaces.Space] = {}
        if image_source is not None:
            parts["image"] = image_space(size, grayscale)
        if vector:
            if not isinstance(obs_space, spaces.Box):
                raise EnvError(f"cannot make a state vector from observation space {obs_space}")
            dim = int(np.prod(obs_space.shape))
            low = np.asarray(obs_space.low, np.float32).reshape(dim)
            high = np.asarray(obs_space.high, np.float32).reshape(dim)
            parts["vector"] = spaces.Box(low, high, (dim,), np.float32)
        self.observation_space = spaces.Dict(parts)

    def observation(self, observation: Any) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        if self.image_source == "obs":
            out["image"] = resize_image(np.asarray(observation), self.size, self.grayscale)
        elif self.image_source == "render":
            frame = self.env.render()
            out["image"] = resize_image(np.ascontiguousarray(frame), self.size, self.grayscale)
        if self.vector:
            out["vector"] = np.asarray(observation, np.float32).reshape(-1)  # [D]
        return out


class RescaleAction(gym.ActionWrapper):
    """Expose a finite Box action space as float32 [-1, 1]; actions are clipped, then mapped
    affinely onto the env's [low, high]."""

    def __init__(self, env: gym.Env):
        super().__init__(env)
        space = env.action_space
        assert isinstance(space, spaces.Box)
        self._low = np.asarray(space.low, np.float64)
        self._high = np.asarray(space.high, np.float64)
        self._env_dtype = space.dtype
        self.action_space = spaces.Box(-1.0, 1.0, space.shape, np.float32)

    def action(self, action: np.ndarray) -> np.ndarray:
        a = np.clip(np.asarray(action, np.float64), -1.0, 1.0)
        env_action = self._low + (a + 1.0) * 0.5 * (self._high - self._low)
        return env_action.astype(self._env_dtype)


class ActionRepeat(gym.Wrapper):
    """Repeat each action ``repeat`` times, summing rewards; stops early when the episode ends.

    The ``info`` returned is the one of the last inner step.
    """

    def __init__(self, env: gym.Env, repeat: int):
        super().__init__(env)
        self.repeat = repeat

    def step(self, action: Any):
        total = 0.0
        for _ in range(self.repeat):
            obs, reward, terminated, truncated, info = self.env.step(action)
            total += float(reward)
            if terminated or truncated:
                break
        return obs, total, terminated, truncated, info
