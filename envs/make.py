"""``make_env`` / ``make_vector_env``: Gymnasium envs from the ``env`` config subtree.

Families (``env.family``) and their defaults live in ``FAMILIES``; the yaml files under
``configs/env/`` spell out every key. ``time_limit`` counts steps of the underlying Gymnasium
env (before ``action_repeat``, like the registered ``max_episode_steps``); for Atari it counts
agent steps and ``max_frames`` is the protocol's cap.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces
from omegaconf import DictConfig, OmegaConf

from agents.config import ConfigError, check_bool, check_choice, check_float, check_int
from envs.errors import EnvError
from envs.wrappers import ActionRepeat, DictObservation, RescaleAction

COMMON = {
    "family": None,
    "id": None,
    "name": None,
    "from_pixels": False,
    "size": 64,
    "grayscale": False,
    "action_repeat": None,  # null: the family default (see _action_repeat)
    "time_limit": None,
    "num_envs": 1,
    "vector": "sync",
    "solved_return": None,  # eval mean return that counts as solved (trainer.stop_when_solved)
}

#: family -> (family-specific keys with defaults, example ids, entry-point module marker)
FAMILIES: dict[str, tuple[dict[str, Any], tuple[str, ...], str]] = {
    "classic": (
        {"keep_state": False},
        ("CartPole-v1", "Pendulum-v1", "Acrobot-v1", "MountainCar-v0", "MountainCarContinuous-v0"),
        "classic_control",
    ),
    "atari": (
        # DreamerV3 configs.yaml `atari100k`: sticky False, actions needed, noops 30, 108k frames
        {
            "from_pixels": True,
            "noop_max": 30,
            "sticky_actions": 0.0,
            "full_action_space": False,
            "life_loss": False,
            "max_frames": 108000,
        },
        ("ALE/Pong-v5", "ALE/Breakout-v5", "ALE/MsPacman-v5"),
        "ale_py",
    ),
    "mujoco": (
        {"keep_state": False, "camera": None},
        ("HalfCheetah-v5", "Hopper-v5", "Walker2d-v5", "Ant-v5", "Humanoid-v5"),
        "mujoco",
    ),
    "box2d": (
        {},
        ("CarRacing-v3", "LunarLander-v3", "BipedalWalker-v3"),
        "box2d",
    ),
}


def _supported() -> str:
    rows = [f"{fam} (e.g. {', '.join(ids)})" for fam, (_, ids, _) in FAMILIES.items()]
    return "supported families: " + "; ".join(rows) + "; bandit (envs.bandits)"


def _config(cfg: Any) -> dict[str, Any]:
    """The env subtree as a plain dict with defaults filled in and every value validated."""
    if isinstance(cfg, DictConfig):
        cfg = OmegaConf.to_container(cfg, resolve=True)
    elif not isinstance(cfg, dict):
        raise ConfigError(f"env config must be a mapping, got {type(cfg).__name__}")
    cfg = dict(cfg)
    family = cfg.get("family")
    if family not in FAMILIES:
        raise EnvError(f"env.family {family!r} is unknown; {_supported()}")
    extra, _, _ = FAMILIES[family]
    known = {**COMMON, **extra}
    unknown = sorted(set(cfg) - set(known))
    if unknown:
        raise ConfigError(
            f"unknown key(s) {', '.join('env.' + k for k in unknown)} for env.family={family}; "
            f"known keys: {sorted(known)}"
        )
    c = {**known, **cfg}
    if not isinstance(c["id"], str) or not c["id"]:
        raise ConfigError(f"env.id must be a Gymnasium id such as 'CartPole-v1', got {c['id']!r}")
    c["name"] = c["name"] or c["id"].replace("/", "_")
    p = "env."
    check_bool(c, "from_pixels", p)
    check_int(c, "size", p)
    check_bool(c, "grayscale", p)
    if c["action_repeat"] is not None:
        check_int(c, "action_repeat", p)
    if c["time_limit"] is not None:
        check_int(c, "time_limit", p)
    check_int(c, "num_envs", p)
    check_choice(c, "vector", ["sync", "async"], p)
    if c["solved_return"] is not None:
        check_float(c, "solved_return", p)
    if family in ("classic", "mujoco"):
        check_bool(c, "keep_state", p)
    if family == "atari":
        check_int(c, "noop_max", p, low=0)
        check_float(c, "sticky_actions", p, low=0.0, high=1.0)
        check_bool(c, "full_action_space", p)
        check_bool(c, "life_loss", p)
        if c["max_frames"] is not None:
            check_int(c, "max_frames", p)
    return c


def _spec(c: dict[str, Any]) -> gym.envs.registration.EnvSpec:
    """The registered spec of ``c["id"]``, checked against ``c["family"]``."""
    env_id, family = c["id"], c["family"]
    import envs.atari  # noqa: F401  (registers the ALE/* ids)

    try:
        spec = gym.spec(env_id)
    except gym.error.Error as e:
        raise EnvError(f"unknown env id {env_id!r} ({e}); {_supported()}") from e
    entry = spec.entry_point if isinstance(spec.entry_point, str) else spec.entry_point.__module__
    marker = FAMILIES[family][2]
    if marker not in entry:
        owner = next((f for f, (_, _, m) in FAMILIES.items() if m in entry), None)
        hint = f"set env.family={owner}" if owner else _supported()
        raise EnvError(f"env id {env_id!r} is not in env.family={family!r}: {hint}")
    return spec


def _action_repeat(c: dict[str, Any]) -> int:
    """Family default when ``action_repeat`` is null: 4 for Atari (the protocol's frame skip),
    2 for MuJoCo from pixels (DreamerV3's DMC setting), else 1."""
    if c["action_repeat"] is not None:
        return c["action_repeat"]
    if c["family"] == "atari":
        return 4
    if c["family"] == "mujoco" and c["from_pixels"]:
        return 2
    return 1


def _check_action_space(env_id: str, space: spaces.Space) -> None:
    if isinstance(space, spaces.Discrete):
        return
    if isinstance(space, spaces.Box):
        if np.all(np.isfinite(space.low)) and np.all(np.isfinite(space.high)):
            return
        raise EnvError(
            f"{env_id}: Box action space {space} has infinite bounds and cannot be rescaled "
            "to [-1, 1]; supported action spaces: Discrete, or Box with finite bounds"
        )
    raise EnvError(
        f"{env_id}: action space {space} is not supported; "
        "supported action spaces: Discrete, or Box with finite bounds"
    )


def _map_observation(env: gym.Env, c: dict[str, Any], env_id: str) -> gym.Env:
    """Wrap ``env`` so its observation is the yume dict (image and/or vector)."""
    space = env.observation_space
    size, gray = c["size"], c["grayscale"]
    if not isinstance(space, spaces.Box):
        raise EnvError(
            f"{env_id}: observation space {space} is not supported; supported observation "
            "spaces: Box images uint8 [H, W, 3] or Box vectors (any float shape)"
        )
    native_image = space.dtype == np.uint8 and len(space.shape) == 3 and space.shape[-1] == 3
    if native_image:
        return DictObservation(env, "obs", vector=False, size=size, grayscale=gray)
    if c["from_pixels"]:
        return DictObservation(
            env, "render", vector=c.get("keep_state", False), size=size, grayscale=gray
        )
    if np.issubdtype(space.dtype, np.floating) or np.issubdtype(space.dtype, np.integer):
        return DictObservation(env, None, vector=True)
    raise EnvError(f"{env_id}: observation space {space} is not supported")


def _ensure_gl() -> None:
    """Headless MuJoCo rendering: EGL unless MUJOCO_GL is set (osmesa is the fallback)."""
    if "MUJOCO_GL" not in os.environ:
        os.environ["MUJOCO_GL"] = "egl"
        try:
            import mujoco.egl  # noqa: F401
        except Exception:
            os.environ["MUJOCO_GL"] = "osmesa"
    os.environ.setdefault("PYOPENGL_PLATFORM", os.environ["MUJOCO_GL"])


def _make_gym(c: dict[str, Any], render_mode: str | None) -> gym.Env:
    kwargs: dict[str, Any] = {}
    if c["time_limit"] is not None and c["family"] != "atari":
        kwargs["max_episode_steps"] = c["time_limit"]
    if c["from_pixels"]:
        if render_mode not in (None, "rgb_array"):
            raise EnvError(f"{c['id']}: from_pixels needs render_mode rgb_array, got {render_mode}")
        render_mode = "rgb_array"
    if c["family"] == "mujoco" and render_mode == "rgb_array":
        _ensure_gl()
        kwargs.update(width=c["size"], height=c["size"])
        if c["camera"] is not None:
            kwargs["camera_id"] = c["camera"]
    try:
        return gym.make(c["id"], render_mode=render_mode, **kwargs)
    except gym.error.DependencyNotInstalled as e:
        raise EnvError(f"{c['id']}: a dependency is missing ({e})") from e


def _make_atari(c: dict[str, Any], render_mode: str | None) -> gym.Env:
    from envs.atari import AtariProtocol

    if not c["from_pixels"]:
        raise ConfigError("env.from_pixels must be true for env.family=atari (RAM is unsupported)")
    base = gym.make(
        c["id"],
        frameskip=1,
        repeat_action_probability=c["sticky_actions"],
        full_action_space=c["full_action_space"],
        max_num_frames_per_episode=None,
        obs_type="rgb",
        render_mode=render_mode,
    )
    env: gym.Env = AtariProtocol(
        base,
        frame_skip=_action_repeat(c),
        size=c["size"],
        grayscale=c["grayscale"],
        noop_max=c["noop_max"],
        life_loss=c["life_loss"],
        max_frames=c["max_frames"],
    )
    if c["time_limit"] is not None:
        env = gym.wrappers.TimeLimit(env, c["time_limit"])
    return env


def _make_bandit(cfg: Any, seed: int | None) -> gym.Env:
    """The bandit family lives in ``envs.bandits`` (its own config keys and validation)."""
    try:
        from envs.bandits import make_bandit_env
    except ImportError as e:
        raise EnvError(f"env.family=bandit needs envs.bandits.make_bandit_env ({e})") from e
    return make_bandit_env(cfg, seed=seed)


def make_env(cfg: Any, seed: int | None = None, render_mode: str | None = None) -> gym.Env:
    """One env from the ``env`` config subtree (DictConfig or dict).

    Observation space: ``Dict`` with ``image`` uint8 [size, size, C] and/or ``vector``
    float32 [D]. Action space: ``Discrete`` as is, ``Box`` rescaled to float32 [-1, 1].
    With ``seed`` the env is reset once with it (and its spaces seeded), so later unseeded
    resets are reproducible. Raises ``EnvError`` for unknown ids/families or unsupported spaces,
    ``ConfigError`` for bad config values.
    """
    if isinstance(cfg, (dict, DictConfig)) and cfg.get("family") == "bandit":
        return _make_bandit(cfg, seed)
    c = _config(cfg)
    _spec(c)
    if c["family"] == "atari":
        env = _make_atari(c, render_mode)
    else:
        env = _make_gym(c, render_mode)
        _check_action_space(c["id"], env.action_space)
        repeat = _action_repeat(c)
        if repeat > 1:
            env = ActionRepeat(env, repeat)
        env = _map_observation(env, c, c["id"])
    _check_action_space(c["id"], env.action_space)
    if isinstance(env.action_space, spaces.Box):
        env = RescaleAction(env)
    if seed is not None:
        env.reset(seed=seed)
        env.action_space.seed(seed)
        env.observation_space.seed(seed)
    return env


def _env_fn(cfg: dict[str, Any], seed: int) -> gym.Env:
    return make_env(cfg, seed=seed)


def make_vector_env(cfg: Any, num_envs: int, seed: int) -> gym.vector.VectorEnv:
    """``num_envs`` copies of ``make_env(cfg)`` (env i seeded with ``seed + i``) in a Sync or
    Async vector env per ``cfg.vector``, autoreset mode NEXT_STEP. Observations are dicts of
    batched arrays: ``image`` uint8 [N, H, W, C], ``vector`` float32 [N, D]."""
    if isinstance(cfg, DictConfig):
        cfg = OmegaConf.to_container(cfg, resolve=True)
    if isinstance(num_envs, bool) or not isinstance(num_envs, int) or num_envs < 1:
        raise ConfigError(f"num_envs must be an int >= 1, got {num_envs!r}")
    vector = cfg.get("vector", "sync")
    check_choice({"vector": vector}, "vector", ["sync", "async"], "env.")
    fns = [functools.partial(_env_fn, cfg, seed + i) for i in range(num_envs)]
    mode = gym.vector.AutoresetMode.NEXT_STEP
    if vector == "async":
        return gym.vector.AsyncVectorEnv(fns, autoreset_mode=mode)
    venv = gym.vector.SyncVectorEnv(fns, autoreset_mode=mode)
    venv.action_space.seed(seed)
    return venv
