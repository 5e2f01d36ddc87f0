"""Evaluation episodes in a fresh env instance, isolated from the training RNG streams."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from agents.base import Agent
from envs import make_vector_env


def evaluate(
    agent: Agent,
    env_cfg: Any,
    episodes: int,
    num_envs: int = 1,
    seed: int = 0,
    explore: bool = False,
    video_path: Path | None = None,
    fps: int = 15,
) -> dict[str, Any]:
    """Run ``episodes`` full episodes; returns mean/std return and per-episode lists.

    With ``num_envs`` > 1 each env runs a fixed share of the episodes (env i the first
    ``episodes // num_envs`` of its own, one more for i < ``episodes % num_envs``), so short
    episodes, which end first, are not over-counted. The global RNGs are forked, so
    evaluating never changes what training samples next. With ``video_path``, the first
    episode of env 0 is saved as an mp4 of its ``image`` obs. At most ``episodes`` envs run.
    """
    num_envs = max(1, min(num_envs, episodes))
    quota = [episodes // num_envs + (i < episodes % num_envs) for i in range(num_envs)]
    env = make_vector_env(env_cfg, num_envs, seed=seed)
    returns: list[float] = []
    lengths: list[int] = []
    frames: list[np.ndarray] = []
    recording = video_path is not None
    private = agent.rng_state()  # the agent's own streams, restored like the global ones
    try:
        # the CPU generator and every CUDA one in use (their streams feed training's sampling,
        # and a CUDA graph's replays: torch.manual_seed below reseeds them all)
        cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
        with torch.random.fork_rng(devices=cuda):
            torch.manual_seed(seed)
            obs, _ = env.reset(seed=seed)
            state = None
            is_first = np.ones(num_envs, bool)
            is_last = np.zeros(num_envs, bool)
            ep_return = np.zeros(num_envs)
            ep_length = np.zeros(num_envs, np.int64)
            if hasattr(agent, "bind_env"):
                agent.bind_env(env)
            while len(returns) < episodes:
                if recording and "image" in obs:
                    frames.append(np.asarray(obs["image"][0]))
                action, state = agent.act({**obs, "is_first": is_first}, state, explore=explore)
                obs, reward, terminated, truncated, _ = env.step(action)
                valid = ~is_last
                ep_return += np.where(valid, reward, 0.0)
                ep_length += valid
                is_first = is_last.copy()
                is_last = np.asarray(terminated, bool) | np.asarray(truncated, bool)
                for i in np.flatnonzero(is_last & valid):
                    if quota[i] > 0:
                        quota[i] -= 1
                        returns.append(float(ep_return[i]))
                        lengths.append(int(ep_length[i]))
                    if i == 0:
                        recording = False
                    ep_return[i], ep_length[i] = 0.0, 0
    finally:
        agent.set_rng_state(private)
    env.close()
    if video_path is not None and frames:
        _write_video(Path(video_path), frames, fps)
    return {
        "return_mean": float(np.mean(returns)) if returns else float("nan"),
        "return_std": float(np.std(returns)) if returns else float("nan"),
        "length_mean": float(np.mean(lengths)) if lengths else float("nan"),
        "returns": returns,
        "lengths": lengths,
    }


def _write_video(path: Path, frames: list[np.ndarray], fps: int) -> None:
    import imageio.v2 as imageio

    path.parent.mkdir(parents=True, exist_ok=True)
    video = np.stack(frames)  # [T, H, W, C] uint8
    if video.shape[-1] == 1:
        video = np.repeat(video, 3, axis=-1)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    imageio.mimsave(tmp, list(video), fps=fps, macro_block_size=1)
    os.replace(tmp, path)
