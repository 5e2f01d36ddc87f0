"""envs.state: snapshot/restore gives bit-identical trajectories, survives a weights_only
torch round trip, and refuses states from another env."""

from __future__ import annotations

import io

import gymnasium as gym
import numpy as np
import pytest
import torch

from envs import get_state, get_vector_state, make_env, make_vector_env, set_state, set_vector_state

CARTPOLE = {"family": "classic", "id": "CartPole-v1", "time_limit": 30}
PONG = {"family": "atari", "id": "ALE/Pong-v5", "sticky_actions": 0.25, "max_frames": 400}
CHEETAH = {"family": "mujoco", "id": "HalfCheetah-v5", "time_limit": 40}


def _roundtrip(state):
    """torch.save then torch.load(weights_only=True), as a checkpoint does."""
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def _rollout(env: gym.Env, actions) -> list:
    """(obs, reward, terminated, truncated) per step; resets after an episode end."""
    out = []
    for a in actions:
        obs, reward, terminated, truncated, info = env.step(a)
        out.append(({k: v.copy() for k, v in obs.items()}, reward, terminated, truncated))
        if terminated or truncated:
            obs, _ = env.reset()  # unseeded: uses the (restored) env RNG
            out.append(({k: v.copy() for k, v in obs.items()}, "reset"))
    return out


def _assert_same(a: list, b: list) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x[1:] == y[1:]
        assert x[0].keys() == y[0].keys()
        for k in x[0]:
            np.testing.assert_array_equal(x[0][k], y[0][k])


def _check_restore(cfg: dict, actions, warmup: int, expect_end: bool) -> None:
    env = make_env(cfg, seed=1)
    env.reset(seed=1)
    for a in actions[:warmup]:
        env.step(a)
    state = get_state(env)
    first = _rollout(env, actions[warmup:])
    assert any(len(row) == 2 for row in first) == expect_end  # crossed an episode end?
    set_state(env, state)
    _assert_same(first, _rollout(env, actions[warmup:]))
    fresh = make_env(cfg, seed=99)  # a different env instance, RNGs seeded differently
    fresh.reset(seed=99)
    set_state(fresh, _roundtrip(state))
    _assert_same(first, _rollout(fresh, actions[warmup:]))


def test_cartpole_restore_identical_across_time_limit_and_reset():
    actions = [0, 1] * 5 + [1, 0] * 25
    _check_restore(CARTPOLE, actions, warmup=10, expect_end=True)


def test_pong_sticky_actions_restore_identical():
    env = make_env(PONG)
    assert env.unwrapped.ale.getFloat("repeat_action_probability") == pytest.approx(0.25)
    actions = np.random.default_rng(0).integers(0, 6, 110)
    _check_restore(PONG, actions, warmup=10, expect_end=True)  # max_frames 400 = 100 steps


def test_pong_sticky_actions_matter():
    """Without restoring the ALE RNG the sticky-action trajectory would diverge: two envs
    seeded differently must differ, so the identity above is not trivial."""
    actions = np.random.default_rng(0).integers(0, 6, 60)
    runs = []
    for seed in (1, 2):
        env = make_env({**PONG, "noop_max": 0}, seed=seed)
        runs.append(_rollout(env, actions))
    assert any(not np.array_equal(x[0]["image"], y[0]["image"]) for x, y in zip(*runs))


def test_mujoco_restore_identical():
    actions = list(np.random.default_rng(0).uniform(-1, 1, (60, 6)).astype(np.float32))
    _check_restore(CHEETAH, actions, warmup=5, expect_end=True)


def test_state_holds_only_safe_types_and_wrapper_counters():
    env = make_env({**PONG, "life_loss": True}, seed=0)
    for _ in range(7):
        env.step(1)
    state = _roundtrip(get_state(env))
    protocol = state["layers"][state["classes"].index("AtariProtocol")]
    assert protocol["frames"] == 28 and protocol["lives"] == env.unwrapped.ale.lives()
    assert protocol["life_loss"] is True and protocol["noop_max"] == 30
    assert "_frames" not in protocol  # scratch buffer, refilled every step
    limit = make_env(CARTPOLE, seed=0)
    for _ in range(4):
        limit.step(0)
    s = get_state(limit)
    assert s["layers"][s["classes"].index("TimeLimit")]["_elapsed_steps"] == 4

    def walk(x):
        if isinstance(x, dict):
            assert all(isinstance(k, str) for k in x)
            for v in x.values():
                walk(v)
        elif isinstance(x, (list, tuple)):
            for v in x:
                walk(v)
        else:
            assert x is None or isinstance(x, (torch.Tensor, bool, int, float, str, bytes))

    walk(state)


def test_vector_state_restores_pending_autoreset():
    cfg = {"family": "classic", "id": "CartPole-v1", "time_limit": 6}
    venv = make_vector_env(cfg, num_envs=3, seed=4)
    venv.reset(seed=4)
    venv.step(np.array([0, 1, 0]))  # envs are 1 step apart from here on
    for _ in range(5):
        venv.step(np.array([1, 1, 0]))
    assert venv._autoreset_envs.all()  # every env is due to autoreset on the next step
    state = _roundtrip(get_vector_state(venv))
    actions = [np.array([i % 2, 1, (i // 2) % 2]) for i in range(12)]

    def run(v):
        return [
            tuple(
                np.copy(x) if not isinstance(x, dict) else x["vector"].copy() for x in v.step(a)[:4]
            )
            for a in actions
        ]

    first = run(venv)
    other = make_vector_env(cfg, num_envs=3, seed=77)
    other.reset(seed=77)
    set_vector_state(other, state)
    second = run(other)
    assert first[0][1].tolist() == [0.0, 0.0, 0.0]  # the restored autoreset step
    for x, y in zip(first, second):
        for u, w in zip(x, y):
            np.testing.assert_array_equal(u, w)


def test_state_errors():
    cart = make_env(CARTPOLE, seed=0)
    pend = make_env({"family": "classic", "id": "Pendulum-v1"}, seed=0)
    with pytest.raises(ValueError, match=r"cannot restore it into .*Pendulum"):
        set_state(pend, get_state(cart))
    with pytest.raises(NotImplementedError, match=r"CarRacing"):
        get_state(make_env({"family": "box2d", "id": "CarRacing-v3"}))
    venv = make_vector_env(CARTPOLE, num_envs=2, seed=0)
    with pytest.raises(ValueError, match=r"holds 2 envs, this vector env has 3"):
        set_vector_state(make_vector_env(CARTPOLE, num_envs=3, seed=0), get_vector_state(venv))
    avenv = make_vector_env({**CARTPOLE, "vector": "async"}, num_envs=1, seed=0)
    try:
        with pytest.raises(NotImplementedError, match=r"set env.vector=sync"):
            get_vector_state(avenv)
    finally:
        avenv.close()
