"""envs.make_env / make_vector_env: observation dicts, action rescaling, the Atari-100k
protocol against raw ALE frames, errors that name the problem, NEXT_STEP autoreset."""

from __future__ import annotations

from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
from gymnasium import spaces
from omegaconf import OmegaConf
from PIL import Image

from agents.config import ConfigError
from envs import EnvError, make_env, make_vector_env
from envs.make import _check_action_space, _map_observation

CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "env"
PONG = {"family": "atari", "id": "ALE/Pong-v5"}
CARTPOLE = {"family": "classic", "id": "CartPole-v1"}


def _assert_obs(env: gym.Env, obs: dict, expected: dict) -> None:
    """``obs`` has exactly the ``expected`` {key: (shape, dtype)} and lies in the space."""
    assert isinstance(env.observation_space, spaces.Dict)
    got = {k: (v.shape, v.dtype) for k, v in obs.items()}
    assert got == {k: (s, np.dtype(d)) for k, (s, d) in expected.items()}
    assert set(env.observation_space.spaces) == set(expected)
    assert env.observation_space.contains(obs)


@pytest.mark.parametrize(
    "cfg, expected",
    [
        (CARTPOLE, {"vector": ((4,), np.float32)}),
        ({"family": "classic", "id": "Acrobot-v1"}, {"vector": ((6,), np.float32)}),
        (
            {"family": "classic", "id": "CartPole-v1", "from_pixels": True, "size": 32},
            {"image": ((32, 32, 3), np.uint8)},
        ),
        (
            {
                "family": "classic",
                "id": "Pendulum-v1",
                "from_pixels": True,
                "grayscale": True,
                "keep_state": True,
            },
            {"image": ((64, 64, 1), np.uint8), "vector": ((3,), np.float32)},
        ),
        (PONG, {"image": ((64, 64, 3), np.uint8)}),
        ({**PONG, "grayscale": True}, {"image": ((64, 64, 1), np.uint8)}),
        ({"family": "mujoco", "id": "HalfCheetah-v5"}, {"vector": ((17,), np.float32)}),
        ({"family": "box2d", "id": "CarRacing-v3"}, {"image": ((64, 64, 3), np.uint8)}),
    ],
)
def test_observation_dicts(cfg, expected):
    env = make_env(OmegaConf.create(cfg), seed=0)
    obs, _ = env.reset(seed=1)
    _assert_obs(env, obs, expected)
    obs, *_ = env.step(env.action_space.sample())
    _assert_obs(env, obs, expected)


@pytest.mark.parametrize(
    "name, expected",
    [
        ("cartpole", {"vector": ((4,), np.float32)}),
        ("pendulum", {"vector": ((3,), np.float32)}),
        ("acrobot", {"vector": ((6,), np.float32)}),
        ("mountaincar", {"vector": ((2,), np.float32)}),
        ("mountaincar_continuous", {"vector": ((2,), np.float32)}),
        ("atari", {"image": ((64, 64, 3), np.uint8)}),
        ("mujoco", {"vector": ((17,), np.float32)}),
        ("carracing", {"image": ((64, 64, 3), np.uint8)}),
    ],
)
def test_config_files_build(name, expected):
    cfg = OmegaConf.load(CONFIGS / f"{name}.yaml")
    common = {
        "family",
        "id",
        "name",
        "from_pixels",
        "size",
        "grayscale",
        "action_repeat",
        "time_limit",
        "num_envs",
        "vector",
    }
    assert common <= set(cfg)
    env = make_env(cfg, seed=0)
    _assert_obs(env, env.reset(seed=0)[0], expected)


def test_mujoco_pixels_headless():
    cfg = {
        "family": "mujoco",
        "id": "Hopper-v5",
        "from_pixels": True,
        "size": 48,
        "keep_state": True,
    }
    try:
        env = make_env(cfg, seed=0)
        obs, _ = env.reset(seed=0)
    except Exception as e:  # noqa: BLE001 - any GL failure means no headless backend here
        pytest.skip(f"no headless OpenGL backend (MUJOCO_GL egl/osmesa) on this machine: {e}")
    _assert_obs(env, obs, {"image": ((48, 48, 3), np.uint8), "vector": ((11,), np.float32)})
    assert obs["image"].std() > 5  # a rendered scene, not a blank frame
    # action_repeat null -> 2 for pixels: 2 inner steps of the v5 task per agent step
    base = env.unwrapped
    t0 = base.data.time
    env.step(np.zeros(3, np.float32))
    assert base.data.time - t0 == pytest.approx(2 * base.dt)


def test_box_actions_rescaled_to_unit_interval():
    env = make_env({"family": "classic", "id": "Pendulum-v1"}, seed=0)
    assert env.action_space == spaces.Box(-1.0, 1.0, (1,), np.float32)
    assert env.action_space.dtype == np.float32
    for a, torque in [(-1.0, -2.0), (0.0, 0.0), (0.5, 1.0), (1.0, 2.0), (3.0, 2.0)]:
        assert env.action(np.array([a], np.float32))[0] == pytest.approx(torque)
    # end to end: +1 in yume equals the raw env's max torque 2.0
    raw = gym.make("Pendulum-v1")
    raw.reset(seed=5)
    env.reset(seed=5)
    for _ in range(5):
        obs, reward, *_ = env.step(np.array([1.0], np.float32))
        raw_obs, raw_reward, *_ = raw.step(np.array([2.0], np.float32))
        np.testing.assert_array_equal(obs["vector"], raw_obs)
        assert reward == raw_reward
    car = make_env({"family": "box2d", "id": "CarRacing-v3"})  # low [-1, 0, 0], high [1, 1, 1]
    np.testing.assert_allclose(car.action(np.array([-1, -1, 0], np.float32)), [-1, 0, 0.5])
    cheetah = make_env({"family": "mujoco", "id": "HalfCheetah-v5"})
    assert cheetah.action_space == spaces.Box(-1.0, 1.0, (6,), np.float32)
    assert isinstance(make_env(CARTPOLE).action_space, spaces.Discrete)


def test_action_repeat_sums_rewards_and_matches_raw_steps():
    env = make_env({**CARTPOLE, "action_repeat": 3}, seed=0)
    raw = gym.make("CartPole-v1")
    obs, _ = env.reset(seed=3)
    raw_obs, _ = raw.reset(seed=3)
    np.testing.assert_array_equal(obs["vector"], raw_obs)
    obs, reward, *_ = env.step(1)
    for _ in range(3):
        raw_obs, *_ = raw.step(1)
    assert reward == 3.0
    np.testing.assert_array_equal(obs["vector"], raw_obs)


def _pool_resize(a: np.ndarray, b: np.ndarray, size: int = 64) -> np.ndarray:
    pooled = np.maximum(a, b)
    return np.asarray(Image.fromarray(pooled).resize((size, size), Image.BILINEAR))


def test_atari_protocol_matches_raw_ale_frames():
    """Skip 4 + max-pool of the last two frames + 64x64 resize, noops from the env's RNG."""
    seed, noop_max = 7, 30
    env = make_env({**PONG, "noop_max": noop_max})
    raw = gym.make("ALE/Pong-v5", frameskip=1, repeat_action_probability=0.0)
    obs, info = env.reset(seed=seed)
    frame, _ = raw.reset(seed=seed)
    noops = int(raw.unwrapped.np_random.integers(noop_max + 1))
    assert info["noops"] == noops
    for _ in range(noops):
        frame, *_ = raw.step(0)
    np.testing.assert_array_equal(obs["image"], _pool_resize(frame, frame))
    actions = np.random.default_rng(0).integers(0, env.action_space.n, 60)
    total, raw_total = 0.0, 0.0
    for a in actions:
        obs, reward, terminated, truncated, info = env.step(a)
        frames = []
        for _ in range(4):
            frame, r, *_ = raw.step(a)
            frames.append(frame)
            raw_total += r
        total += reward
        np.testing.assert_array_equal(obs["image"], _pool_resize(frames[-2], frames[-1]))
        assert not terminated and not truncated
    assert total == raw_total
    assert info["frames"] == 4 * len(actions)


def test_atari_noop_starts_within_range():
    env = make_env({**PONG, "noop_max": 5})
    ale = env.unwrapped.ale
    seen = set()
    for i in range(12):
        _, info = env.reset(seed=0 if i == 0 else None)  # seeded once (reloads the ROM)
        assert 0 <= info["noops"] <= 5
        assert ale.getEpisodeFrameNumber() == info["noops"]
        seen.add(info["noops"])
    assert len(seen) >= 3  # uniform draws, not a constant
    env = make_env({**PONG, "noop_max": 0})
    _, info = env.reset(seed=0)
    assert info["noops"] == 0 and env.unwrapped.ale.getEpisodeFrameNumber() == 0


def test_atari_life_loss_info_and_episode_continues():
    cfg = {"family": "atari", "id": "ALE/Breakout-v5", "life_loss": True, "noop_max": 0}
    env = make_env(cfg, seed=0)
    _, info = env.reset(seed=0)
    assert info["lives"] == 5 and info["life_loss"] is False
    rng = np.random.default_rng(0)
    losses, lives = [], 5
    for t in range(3000):
        _, _, terminated, truncated, info = env.step(rng.integers(env.action_space.n))
        assert info["life_loss"] == (info["lives"] < lives)
        if info["life_loss"]:
            losses.append(t)
            assert not terminated and not truncated  # the episode goes on
        lives = info["lives"]
        if len(losses) == 2:
            break
    assert len(losses) == 2 and lives == 3
    plain = make_env({**cfg, "life_loss": False}, seed=0)
    _, info = plain.reset()
    assert "life_loss" not in plain.step(0)[-1]


def test_atari_max_frames_truncates():
    env = make_env({**PONG, "max_frames": 40, "noop_max": 3}, seed=0)
    env.reset(seed=0)
    for t in range(1, 11):
        _, _, terminated, truncated, info = env.step(0)
        assert info["frames"] == 4 * t
        assert truncated == (t == 10) and not terminated
    assert env.observation_space.contains(env.reset()[0])


def test_errors_name_the_problem():
    with pytest.raises(EnvError) as e:
        make_env({"family": "classic", "id": "CartPol-v1"})
    msg = str(e.value)
    assert "'CartPol-v1'" in msg and "CartPole-v1" in msg and "atari (e.g. ALE/Pong-v5" in msg
    with pytest.raises(EnvError, match=r"env.family 'robots' is unknown; supported families"):
        make_env({"family": "robots", "id": "CartPole-v1"})
    with pytest.raises(EnvError, match=r"'HalfCheetah-v5' is not in env.family='classic'.*mujoco"):
        make_env({"family": "classic", "id": "HalfCheetah-v5"})
    with pytest.raises(ConfigError, match=r"env.size must be an int >= 1, got -3"):
        make_env({**CARTPOLE, "size": -3})
    with pytest.raises(ConfigError, match=r"unknown key\(s\) env.sticky_action for"):
        make_env({**PONG, "sticky_action": 0.25})
    with pytest.raises(ConfigError, match=r"env.sticky_actions must be in \[0.0, 1.0\]"):
        make_env({**PONG, "sticky_actions": 1.5})


def test_unsupported_spaces_raise_env_error():
    for space in [
        spaces.MultiDiscrete([2, 3]),
        spaces.Tuple((spaces.Discrete(2), spaces.Discrete(2))),
        spaces.Dict({"a": spaces.Discrete(2)}),
    ]:
        with pytest.raises(EnvError) as e:
            _check_action_space("Toy-v0", space)
        msg = str(e.value)
        assert "Toy-v0" in msg and str(space) in msg and "Discrete, or Box" in msg
    with pytest.raises(EnvError, match=r"Toy-v0: Box action space .* infinite bounds"):
        _check_action_space("Toy-v0", spaces.Box(-np.inf, np.inf, (2,)))

    class DictObsEnv(gym.Env):
        observation_space = spaces.Dict({"pos": spaces.Box(0, 1, (2,))})
        action_space = spaces.Discrete(2)

    cfg = {"size": 64, "grayscale": False, "from_pixels": False}
    with pytest.raises(EnvError, match=r"Toy-v0: observation space Dict\(.*supported observation"):
        _map_observation(DictObsEnv(), cfg, "Toy-v0")


def test_vector_env_next_step_autoreset():
    cfg = {**CARTPOLE, "time_limit": 5}
    venv = make_vector_env(cfg, num_envs=2, seed=10)
    assert isinstance(venv, gym.vector.SyncVectorEnv)
    assert venv.metadata["autoreset_mode"] == gym.vector.AutoresetMode.NEXT_STEP
    obs, _ = venv.reset(seed=10)
    assert obs["vector"].shape == (2, 4) and obs["vector"].dtype == np.float32
    assert not np.array_equal(obs["vector"][0], obs["vector"][1])  # env i seeded with seed+i
    replicas = [make_env(cfg, seed=10 + i) for i in range(2)]
    for i, env in enumerate(replicas):
        np.testing.assert_array_equal(env.reset(seed=10 + i)[0]["vector"], obs["vector"][i])
    actions = np.array([0, 1])
    for t in range(5):
        obs, reward, terminated, truncated, _ = venv.step(actions)
        np.testing.assert_array_equal(reward, [1.0, 1.0])
        assert list(truncated) == [t == 4] * 2 and not terminated.any()
    # the next step ignores its action and returns the reset observation with reward 0
    obs, reward, terminated, truncated, _ = venv.step(actions)
    np.testing.assert_array_equal(reward, [0.0, 0.0])
    assert not terminated.any() and not truncated.any()
    for i, env in enumerate(replicas):
        for _ in range(5):
            env.step(actions[i])
        np.testing.assert_array_equal(env.reset()[0]["vector"], obs["vector"][i])


def test_async_vector_env_matches_sync():
    cfg = {**CARTPOLE, "vector": "async"}
    venv = make_vector_env(OmegaConf.create(cfg), num_envs=2, seed=3)
    sync = make_vector_env({**cfg, "vector": "sync"}, num_envs=2, seed=3)
    try:
        assert isinstance(venv, gym.vector.AsyncVectorEnv)
        a, _ = venv.reset(seed=3)
        b, _ = sync.reset(seed=3)
        np.testing.assert_array_equal(a["vector"], b["vector"])
        a = venv.step(np.array([1, 0]))[0]
        b = sync.step(np.array([1, 0]))[0]
        np.testing.assert_array_equal(a["vector"], b["vector"])
    finally:
        venv.close()


def test_vector_env_atari_life_loss_batched():
    cfg = {"family": "atari", "id": "ALE/Breakout-v5", "life_loss": True}
    venv = make_vector_env(cfg, num_envs=2, seed=0)
    obs, info = venv.reset(seed=0)
    assert obs["image"].shape == (2, 64, 64, 3) and obs["image"].dtype == np.uint8
    _, _, _, _, info = venv.step(np.array([1, 1]))
    assert info["life_loss"].dtype == bool and info["life_loss"].shape == (2,)
