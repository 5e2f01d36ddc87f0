"""The Atari-100k protocol (DreamerV3 ``atari100k`` / IRIS) on top of a frameskip=1 ALE env.

One agent step = ``frame_skip`` emulator frames with the same action; the observation is the
pixel-wise max of the last two frames, resized (PIL bilinear) to ``size`` x ``size``, RGB or
grayscale. Each reset plays 0..``noop_max`` NOOP frames (uniform, from the env's ``np_random``).
The episode is truncated after ``max_frames`` agent frames (noops not counted; 108k frames =
27k steps, 30 minutes of play). Sticky actions and the action set are ALE settings passed to
``gym.make``. With ``life_loss`` the episode goes on after a lost life but ``info["life_loss"]``
is True at that step (the trainer turns it into ``is_terminal`` for learning).
"""

from __future__ import annotations

from typing import Any

import ale_py
import gymnasium as gym
import numpy as np

from envs.wrappers import image_space, resize_image

gym.register_envs(ale_py)


class AtariProtocol(gym.Wrapper):
    """Frame skip + max-pool, noop starts, life-loss signal and frame cap over ``ALE/*-v5``.

    The wrapped env must be an ``AtariEnv`` made with ``frameskip=1``. Observations are
    ``{"image": uint8 [size, size, C]}``; info holds ``lives``, ``frames`` (agent frames this
    episode), ``noops`` (after reset) and ``life_loss`` (when enabled).
    """

    #: attributes ``envs.state`` does not snapshot (scratch buffers refilled every step)
    _state_exclude = ("_frames",)

    def __init__(
        self,
        env: gym.Env,
        frame_skip: int = 4,
        size: int = 64,
        grayscale: bool = False,
        noop_max: int = 30,
        life_loss: bool = False,
        max_frames: int | None = 108000,
    ):
        super().__init__(env)
        ale_env = env.unwrapped
        if not isinstance(ale_env, ale_py.AtariEnv) or ale_env._frameskip != 1:
            raise ValueError("AtariProtocol needs an ALE AtariEnv made with frameskip=1")
        self.frame_skip, self.size, self.grayscale = frame_skip, size, grayscale
        self.noop_max, self.life_loss, self.max_frames = noop_max, life_loss, max_frames
        self.ale = ale_env.ale
        self._action_set = ale_env._action_set
        height, width = self.ale.getScreenDims()
        self._frames = np.zeros((2, height, width, 3), np.uint8)  # last two screens, RGB
        self.frames = 0  # agent frames played this episode (noops excluded)
        self.lives = 0
        self.observation_space = gym.spaces.Dict({"image": image_space(size, grayscale)})

    def _obs(self, pooled: np.ndarray) -> dict[str, np.ndarray]:
        return {"image": resize_image(pooled, self.size, self.grayscale)}

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        _, info = self.env.reset(seed=seed, options=options)
        noops = int(self.env.unwrapped.np_random.integers(self.noop_max + 1))
        for _ in range(noops):
            self.ale.act(ale_py.Action.NOOP)
            if self.ale.game_over(with_truncation=False):
                self.ale.reset_game()
        self.ale.getScreenRGB(self._frames[0])
        self.frames, self.lives = 0, self.ale.lives()
        info = {"lives": self.lives, "frames": 0, "noops": noops}
        if self.life_loss:
            info["life_loss"] = False
        return self._obs(self._frames[0]), info

    def step(self, action: Any):
        ale_action = self._action_set[int(action)]
        reward = 0.0
        terminated = truncated = False
        grabbed = 0  # screens grabbed this step, into _frames[i % 2]
        last = 0
        for i in range(self.frame_skip):
            reward += self.ale.act(ale_action)
            self.frames += 1
            terminated = self.ale.game_over(with_truncation=False)
            truncated = self.max_frames is not None and self.frames >= self.max_frames
            end = terminated or truncated
            if i >= self.frame_skip - 2 or end:
                last = i % 2
                self.ale.getScreenRGB(self._frames[last])
                grabbed += 1
            if end:
                break
        if grabbed >= 2:  # max over the last two emulator frames (removes flicker)
            pooled = np.maximum(self._frames[0], self._frames[1])
        else:  # the episode ended on an early frame of the skip: no earlier frame grabbed
            pooled = self._frames[last]
        lives = self.ale.lives()
        info = {"lives": lives, "frames": self.frames}
        if self.life_loss:
            info["life_loss"] = bool(lives < self.lives and not terminated)
        self.lives = lives
        return self._obs(pooled), reward, terminated, truncated and not terminated, info
