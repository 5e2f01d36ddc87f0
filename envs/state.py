"""Snapshot and restore the full state of an env made by ``envs.make_env`` (and of a
``SyncVectorEnv`` of them), for checkpoint/resume and for planning on the true simulator.

After ``set_state(env, get_state(env))`` the same actions give bit-identical observations,
rewards and episode ends. A state holds every wrapper's counters (time-limit steps, Atari
frame/lives bookkeeping, ...), the simulator (classic-control physics attributes, the ALE
emulator with its RNG so sticky actions repeat, MuJoCo's integration state incl. warm start)
and the NumPy generators. It contains only torch tensors, python scalars/str/bytes and
lists/dicts of those, so ``torch.save`` + ``torch.load(weights_only=True)`` round-trips it.

Unwrapped envs outside these families may define ``get_state() -> dict`` and
``set_state(state)`` themselves; others (e.g. Box2D) raise ``NotImplementedError``.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
import torch

FORMAT = "yume-env-state/1"
VECTOR_FORMAT = "yume-vector-env-state/1"

#: attributes never snapshotted (constant metadata)
_EXCLUDE = frozenset({"spec", "metadata", "render_mode", "_ezpickle_args", "_ezpickle_kwargs"})
_SKIP = object()


# ------------------------------------------------------------------ encoding
def _encode(value: Any) -> Any:
    """A snapshot-able value -> tensors/primitives; ``_SKIP`` for objects that are not state."""
    if value is None or isinstance(value, (bool, int, float, str, bytes)):
        return value
    if isinstance(value, np.random.Generator):
        return {"generator": value.bit_generator.state}
    if isinstance(value, np.generic) and value.dtype != object:
        return {"np_scalar": torch.from_numpy(np.array(value))}
    if isinstance(value, np.ndarray) and value.dtype != object:
        return {"ndarray": torch.from_numpy(value.copy())}
    return _SKIP


def _decode(value: Any, current: Any) -> Any:
    if not isinstance(value, dict):
        return value
    if "ndarray" in value:
        return value["ndarray"].numpy().copy()
    if "np_scalar" in value:
        return value["np_scalar"].numpy()[()]
    if "generator" in value:
        return _set_generator(current, value["generator"])
    raise ValueError(f"corrupt env state entry {value!r}")


def _set_generator(gen: Any, state: dict) -> np.random.Generator:
    """Restore ``state`` into ``gen`` in place when possible (keeps shared references)."""
    if not isinstance(gen, np.random.Generator) or type(gen.bit_generator).__name__ != state.get(
        "bit_generator"
    ):
        gen = np.random.Generator(getattr(np.random, state["bit_generator"])())
    gen.bit_generator.state = state
    return gen


def _get_vars(obj: Any) -> dict[str, Any]:
    exclude = _EXCLUDE | set(getattr(type(obj), "_state_exclude", ()))
    out = {}
    for key, value in vars(obj).items():
        if key in exclude:
            continue
        enc = _encode(value)
        if enc is not _SKIP:
            out[key] = enc
    return out


def _set_vars(obj: Any, state: dict[str, Any]) -> None:
    for key, value in state.items():
        setattr(obj, key, _decode(value, getattr(obj, key, None)))


# ------------------------------------------------------------- simulators
def _simulator_kind(env: gym.Env) -> str:
    module = type(env).__module__
    if callable(getattr(env, "get_state", None)) and callable(getattr(env, "set_state", None)):
        return "custom"
    if module.startswith("ale_py"):
        return "ale"
    if module.startswith("gymnasium.envs.mujoco"):
        return "mujoco"
    if module.startswith("gymnasium.envs.classic_control"):
        return "classic"
    raise NotImplementedError(
        f"cannot snapshot the state of {type(env).__name__} ({module}); supported: classic "
        "control, ALE (Atari) and MuJoCo envs, or envs defining get_state()/set_state()"
    )


def _get_simulator(env: gym.Env, kind: str) -> dict[str, Any]:
    if kind == "custom":
        return {"custom": env.get_state()}
    if kind == "ale":
        return {"ale": env.ale.cloneState(include_rng=True).serialize()}
    if kind == "mujoco":
        import mujoco

        sig = mujoco.mjtState.mjSTATE_INTEGRATION  # time, qpos, qvel, act, ctrl, warm start, ...
        buf = np.empty(mujoco.mj_stateSize(env.model, sig), np.float64)
        mujoco.mj_getState(env.model, env.data, buf, sig)
        return {"mujoco": torch.from_numpy(buf)}
    return {}


def _set_simulator(env: gym.Env, kind: str, state: dict[str, Any]) -> None:
    if kind == "custom":
        env.set_state(state["custom"])
    elif kind == "ale":
        import ale_py

        env.ale.restoreState(ale_py.ALEState(state["ale"]))
    elif kind == "mujoco":
        import mujoco

        sig = mujoco.mjtState.mjSTATE_INTEGRATION
        buf = state["mujoco"].numpy().astype(np.float64)
        mujoco.mj_setState(env.model, env.data, buf, sig)
        mujoco.mj_forward(env.model, env.data)  # derived quantities (positions, contacts)
        mujoco.mj_setState(env.model, env.data, buf, sig)  # forward must not leave a trace


# -------------------------------------------------------------- single env
def _layers(env: gym.Env) -> list[Any]:
    layers = [env]
    while isinstance(layers[-1], gym.Wrapper):
        layers.append(layers[-1].env)
    return layers


def _space_rng(space: gym.spaces.Space) -> Any:
    rng = getattr(space, "_np_random", None)
    return None if rng is None else _encode(rng)


def get_state(env: gym.Env) -> dict[str, Any]:
    """Snapshot of ``env`` (a ``make_env`` env): wrapper counters, simulator, RNG states."""
    layers = _layers(env)
    base = layers[-1]
    kind = _simulator_kind(base)
    return {
        "format": FORMAT,
        "classes": [type(layer).__name__ for layer in layers],
        "layers": [_get_vars(layer) for layer in layers[:-1]],
        "base": _get_vars(base) if kind != "custom" else {},
        "simulator": _get_simulator(base, kind),
        "action_space_rng": _space_rng(env.action_space),
    }


def set_state(env: gym.Env, state: dict[str, Any]) -> None:
    """Restore a ``get_state`` snapshot into ``env`` (same id and wrappers)."""
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"not an env state of format {FORMAT!r}")
    layers = _layers(env)
    classes = [type(layer).__name__ for layer in layers]
    if classes != list(state["classes"]):
        raise ValueError(
            f"env state was taken from the env stack {state['classes']}, "
            f"cannot restore it into {classes} (different env id or config)"
        )
    for layer, layer_state in zip(layers[:-1], state["layers"]):
        _set_vars(layer, layer_state)
    base = layers[-1]
    kind = _simulator_kind(base)
    _set_vars(base, state["base"])
    _set_simulator(base, kind, state["simulator"])
    if state["action_space_rng"] is not None:
        space = env.action_space
        space._np_random = _set_generator(space._np_random, state["action_space_rng"]["generator"])


# -------------------------------------------------------------- vector env
def _check_sync(venv: Any) -> None:
    if not isinstance(venv, gym.vector.SyncVectorEnv):
        raise NotImplementedError(
            f"env state capture supports SyncVectorEnv only, got {type(venv).__name__} "
            "(set env.vector=sync to checkpoint and resume env episodes)"
        )


def get_vector_state(venv: gym.vector.VectorEnv) -> dict[str, Any]:
    """Snapshot of a ``SyncVectorEnv``: every sub-env plus the autoreset bookkeeping."""
    _check_sync(venv)
    return {
        "format": VECTOR_FORMAT,
        "num_envs": venv.num_envs,
        "envs": [get_state(env) for env in venv.envs],
        "autoreset_envs": torch.from_numpy(np.asarray(venv._autoreset_envs, bool).copy()),
        "action_space_rng": _space_rng(venv.action_space),
    }


def set_vector_state(venv: gym.vector.VectorEnv, state: dict[str, Any]) -> None:
    """Restore a ``get_vector_state`` snapshot (same number of envs, same config)."""
    _check_sync(venv)
    if not isinstance(state, dict) or state.get("format") != VECTOR_FORMAT:
        raise ValueError(f"not a vector env state of format {VECTOR_FORMAT!r}")
    if state["num_envs"] != venv.num_envs:
        raise ValueError(
            f"vector env state holds {state['num_envs']} envs, this vector env has "
            f"{venv.num_envs} (env.num_envs must match the checkpoint)"
        )
    for env, env_state in zip(venv.envs, state["envs"]):
        set_state(env, env_state)
    venv._autoreset_envs = state["autoreset_envs"].numpy().astype(np.bool_).copy()
    if state["action_space_rng"] is not None:
        space = venv.action_space
        space._np_random = _set_generator(space._np_random, state["action_space_rng"]["generator"])
