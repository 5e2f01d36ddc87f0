"""The two planning models the search runs on: the true simulator and any learned WorldModel.

Both offer ``root(obs, state) -> (embedding, prior [R, A], value [R])`` and
``step(embedding, action [R]) -> (embedding, reward [R], discount [R], prior [R, A], value [R])``
(``agents.planning.search.PlanningModel``). Shape symbols: R roots, A actions, F features.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as F

from world_models.base import State, WorldModel


@dataclass
class Snapshot:
    """One simulator node: the env's saved state, whether its episode has ended there, and
    the flat observation there (``vector`` [D], kept only when a learned leaf value needs it)."""

    state: Any
    done: bool = False
    obs: np.ndarray | None = None


class SimulatorModel:
    """The true environment as a model, through ``envs.state`` snapshots.

    ``envs`` are R single planning envs (made by ``envs.make_env``), one per root; an embedding
    is a list of R ``Snapshot`` s. A step restores the parent snapshot, steps the env and saves
    the result. The prior is uniform. The leaf value is the mean discounted return of
    ``rollouts`` random rollouts of at most ``rollout_depth`` steps (0 rollouts: value 0),
    or, with ``value_fn`` (flat observations [N, D] -> values [N], e.g. a ``ValueLearner``),
    ``(1 - value_mix) * rollout value + value_mix * value_fn(obs)`` (AlphaGo's mixing);
    ``value_mix = 1`` skips the rollouts. ``rollout_policy`` (flat observation [D], rng ->
    action) replaces the uniformly random rollout actions.
    Termination or truncation ends the episode: discount 0 on that edge, value 0 there, and
    steps from an ended node stay put with reward 0.
    ``rngs`` are R numpy generators for the rollouts, one per root, so a root's search does not
    depend on which other roots share the batch.
    """

    def __init__(
        self,
        envs: Sequence[gym.Env],
        num_actions: int,
        rngs: Sequence[np.random.Generator],
        rollouts: int = 1,
        rollout_depth: int = 50,
        discount: float = 0.997,
        device: torch.device | str = "cpu",
        value_fn: Callable[[np.ndarray], np.ndarray] | None = None,
        value_mix: float = 0.0,
        rollout_policy: Callable[[np.ndarray, np.random.Generator], int] | None = None,
    ):
        from envs.state import get_state, set_state

        if len(rngs) != len(envs):
            raise ValueError(f"need one rollout rng per planning env: {len(rngs)} != {len(envs)}")
        self.envs, self.rngs = list(envs), list(rngs)
        self.num_actions = num_actions
        self.rollouts, self.rollout_depth, self.discount = rollouts, rollout_depth, discount
        self.device = torch.device(device)
        self.value_fn = value_fn
        self.value_mix = value_mix if value_fn is not None else 0.0
        self.rollout_policy = rollout_policy
        self._keep_obs = self.value_mix > 0 or rollout_policy is not None
        self._get, self._set = get_state, set_state
        self.env_steps = 0  # counts every env.step (tree and rollouts), for speed reports

    def root(self, obs: Any, state: Sequence[Any]) -> tuple[list[Snapshot], Tensor, Tensor]:
        """``state``: R snapshots from ``envs.state.get_state`` of the real envs, or Snapshots
        (``done=True`` for an env whose episode already ended). ``obs``: the real envs'
        observation dict (its ``vector`` [R, D] feeds ``value_fn``), or None without one."""
        if len(state) != len(self.envs):
            raise ValueError(f"{len(state)} root states for {len(self.envs)} planning envs")
        roots = [s if isinstance(s, Snapshot) else Snapshot(s) for s in state]
        flat = _flat_obs(obs, len(roots)) if self._keep_obs else [None] * len(roots)
        roots = [Snapshot(_checked(s.state), s.done, o) for s, o in zip(roots, flat)]
        values = self._leaf_values(roots, restore=True)
        return roots, self._uniform(len(roots)), self._tensor(values)

    def step(
        self, embedding: Sequence[Snapshot], action: Tensor
    ) -> tuple[list[Snapshot], Tensor, Tensor, Tensor, Tensor]:
        """Step every root's env once (a Python loop: env stepping is per env anyway)."""
        out: list[Snapshot] = []
        rewards: list[float] = []
        for r, (snap, a) in enumerate(zip(embedding, action.tolist())):
            if snap.done:  # the episode ended above this node: nothing more happens
                out.append(snap)
                rewards.append(0.0)
                continue
            env = self.envs[r]
            self._set(env, snap.state)
            obs, reward, terminated, truncated, _ = env.step(a)
            self.env_steps += 1
            flat = obs["vector"].reshape(-1) if self._keep_obs else None
            out.append(Snapshot(self._get(env), bool(terminated or truncated), flat))
            rewards.append(float(reward))
        # the env of root r sits at its new child: its first rollout needs no restore
        value = self._tensor(self._leaf_values(out, restore=False))
        discount = self._tensor([0.0 if s.done else 1.0 for s in out])
        return out, self._tensor(rewards), discount, self._uniform(len(out)), value

    def _leaf_values(self, snaps: list[Snapshot], restore: bool) -> list[float]:
        """Leaf values [R]: 0 at ended nodes, else rollouts and/or ``value_fn`` (mixed).

        ``restore=False``: env r already sits at ``snaps[r]`` (just stepped there).
        """
        values = [0.0] * len(snaps)
        live = [r for r, s in enumerate(snaps) if not s.done]
        if not live:
            return values
        mix = self.value_mix
        if mix < 1:
            for r in live:
                values[r] = (1 - mix) * self._rollout_value(r, snaps[r], restore)
        if mix > 0:
            learned = self.value_fn(np.stack([snaps[r].obs for r in live]))  # [len(live)]
            for r, v in zip(live, np.asarray(learned).tolist()):
                values[r] += mix * v
        return values

    def _rollout_value(self, r: int, snap: Snapshot, restore: bool = True) -> float:
        """Mean discounted return of rollouts from ``snap`` (env r may already be there):
        uniformly random actions, or ``rollout_policy``'s."""
        if self.rollouts == 0 or self.rollout_depth == 0:
            return 0.0
        env, rng, policy = self.envs[r], self.rngs[r], self.rollout_policy
        total = 0.0
        for i in range(self.rollouts):
            if restore or i > 0:
                self._set(env, snap.state)
            ret, scale, obs = 0.0, 1.0, snap.obs
            if policy is None:
                random = rng.integers(0, self.num_actions, size=self.rollout_depth).tolist()
            for t in range(self.rollout_depth):
                a = random[t] if policy is None else policy(obs, rng)
                out, reward, terminated, truncated, _ = env.step(a)
                self.env_steps += 1
                ret += scale * float(reward)
                scale *= self.discount
                if terminated or truncated:
                    break
                obs = out["vector"] if policy is not None else None
            total += ret
        return total / self.rollouts

    def _uniform(self, n: int) -> Tensor:
        return torch.full((n, self.num_actions), 1.0 / self.num_actions, device=self.device)

    def _tensor(self, values: list[float]) -> Tensor:
        return torch.tensor(values, dtype=torch.float32, device=self.device)


def _flat_obs(obs: Any, n: int) -> list[np.ndarray]:
    """The R flat observations ``obs["vector"]`` [R, D] a learned leaf value reads."""
    if not isinstance(obs, dict) or "vector" not in obs:
        raise ValueError("a learned leaf value reads obs['vector'] [R, D]; none was given")
    vec = np.asarray(obs["vector"], np.float32).reshape(n, -1)
    return list(vec)


def _checked(state: dict) -> dict:
    """The snapshot with gymnasium's PassiveEnvChecker marked as done checking.

    A snapshot taken before the env's first step restores ``checked_step=False`` without the
    reset data the checker compares against, and the next step fails inside the checker
    (gymnasium 1.4). The checker is a debugging aid; planning copies skip it.
    """
    if "PassiveEnvChecker" not in state.get("classes", ()):
        return state
    layers = list(state["layers"])
    i = state["classes"].index("PassiveEnvChecker")
    layers[i] = {**layers[i], "checked_step": True, "checked_data_reuse": True}
    return {**state, "layers": layers}


class WorldModelModel:
    """Any ``WorldModel`` as a planning model, dreaming with ``imagine_step``.

    Embeddings are the latent states (dicts of tensors [R, ...]; the search stores them in
    tensors [R, M, ...] and gathers by node index). The prior is softmax(actor(features)) and
    the leaf value critic(features): ``actor`` maps features [R, F] to logits [R, A], ``critic``
    maps features [R, F] to values [R] or [R, 1]. The discount is the model's continue
    probability. Discrete actions only: action [R] becomes a one-hot [R, A].
    """

    def __init__(
        self,
        world_model: WorldModel,
        actor: Callable[[Tensor], Tensor],
        critic: Callable[[Tensor], Tensor],
        num_actions: int,
    ):
        self.world_model, self.actor, self.critic = world_model, actor, critic
        self.num_actions = num_actions

    def _heads(self, state: State) -> tuple[Tensor, Tensor]:
        feat = self.world_model.features(state)  # [R, F]
        logits = self.actor(feat)  # [R, A]
        if not isinstance(logits, Tensor) or logits.shape[-1] != self.num_actions:
            raise TypeError(
                f"the planner's actor must map features [R, F] to logits [R, {self.num_actions}]"
            )
        value = self.critic(feat).reshape(feat.shape[0])  # [R]
        return torch.softmax(logits.float(), dim=-1), value.float()

    @torch.no_grad()
    def root(self, obs: Any, state: State) -> tuple[State, Tensor, Tensor]:
        """``state``: the posterior latent state [R, ...] of the current step; ``obs`` unused."""
        prior, value = self._heads(state)
        return state, prior, value

    @torch.no_grad()
    def step(
        self, embedding: State, action: Tensor
    ) -> tuple[State, Tensor, Tensor, Tensor, Tensor]:
        onehot = F.one_hot(action, self.num_actions).float()  # [R, A]
        nxt, reward, cont = self.world_model.imagine_step(embedding, onehot)
        prior, value = self._heads(nxt)
        return nxt, reward.reshape(-1).float(), cont.reshape(-1).float(), prior, value
