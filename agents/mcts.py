"""MCTS agents: planning on the true simulator (``agent=mcts``) and inside a world model.

- ``MCTSAgent``: searches with ``SimulatorModel`` from snapshots of the real envs. The trainer
  (and ``agents/evaluate.py``) hand it the vector env with ``agent.bind_env(vector_env)``
  before acting; the agent builds one planning copy per env with ``envs.make_env(cfg.env)``
  and, at every ``act``, copies each real env's state into its copy (``envs.state``). The real
  envs are only read, never stepped. ``learns = False``: no replay, no updates. With
  ``agent.value.learn=true`` and/or ``agent.rollout.policy=learned`` it fits a leaf value
  V(obs) / a linear rollout policy on its own finished training episodes
  (``agents/planning/value.py``; online, through ``observe``).
- ``MCTSPlanner``: the helper world-model agents call when ``agent.planner=mcts``: it searches
  from the current latent state with ``WorldModelModel`` (actor as prior, critic as leaf value).

Config keys (configs/agent/mcts.yaml; the planner reads the same search keys from its subtree):
``simulations``, ``rule`` (uct|puct|gumbel), ``discount``, ``c1``, ``c2``, ``c_uct``,
``unvisited`` (zero|parent|inf), ``dirichlet.alpha``, ``dirichlet.fraction``,
``gumbel.max_considered``, ``gumbel.c_visit``, ``gumbel.c_scale``, ``temperature``;
the simulator agent also ``rollout.count``, ``rollout.depth``, ``rollout.policy``, ``rollout.lr``
and ``value.*`` (learned leaf value).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from torch import Tensor

from agents.base import Agent
from agents.config import ConfigError, check_bool, check_choice, check_float, check_int
from agents.planning.models import SimulatorModel, Snapshot, WorldModelModel
from agents.planning.search import RULES, UNVISITED, SearchConfig, SearchResult, search
from agents.planning.value import ValueLearner


def search_config(node: Any, prefix: str = "agent.") -> SearchConfig:
    """A validated ``SearchConfig`` from a config subtree; errors name ``prefix + key``."""
    return SearchConfig(
        simulations=check_int(node, "simulations", prefix),
        rule=check_choice(node, "rule", RULES, prefix),
        discount=check_float(node, "discount", prefix, 0.0, 1.0),
        c1=check_float(node, "c1", prefix, 0.0),
        c2=check_float(node, "c2", prefix, 1e-9),
        c_uct=check_float(node, "c_uct", prefix, 0.0),
        unvisited=check_choice(node, "unvisited", UNVISITED, prefix),
        dirichlet_alpha=check_float(node, "dirichlet.alpha", prefix, 1e-9),
        dirichlet_fraction=check_float(node, "dirichlet.fraction", prefix, 0.0, 1.0),
        max_considered=check_int(node, "gumbel.max_considered", prefix),
        c_visit=check_float(node, "gumbel.c_visit", prefix, 0.0),
        c_scale=check_float(node, "gumbel.c_scale", prefix, 0.0),
    )


def root_noise(
    config: SearchConfig, rngs: list[np.random.Generator], actions: int, explore: bool
) -> tuple[Tensor | None, Tensor | None]:
    """Per-root exploration noise (gumbel [R, A], dirichlet [R, A]), one generator per root.

    Dirichlet(alpha) for UCT/pUCT when its fraction > 0, Gumbel(0, 1) for the Gumbel rule;
    None when not exploring (the search is then deterministic).
    """
    if not explore:
        return None, None
    if config.rule == "gumbel":
        return torch.tensor(
            np.stack([g.gumbel(size=actions) for g in rngs]), dtype=torch.float32
        ), None
    if config.dirichlet_fraction == 0:
        return None, None
    alpha = [config.dirichlet_alpha] * actions
    noise = np.stack([g.dirichlet(alpha) for g in rngs])
    return None, torch.tensor(noise, dtype=torch.float32)


def choose(
    result: SearchResult, rule: str, temperature: float, explore: bool, rng: np.random.Generator
) -> np.ndarray:
    """Actions [R] from a search: Gumbel's winner, else visits^(1/T) sampled (T=0: most visited)."""
    if rule == "gumbel" or not explore or temperature == 0:
        return result.action.cpu().numpy().astype(np.int64)
    visits = result.visits.double().cpu().numpy()
    logits = np.log(np.maximum(visits, 1e-30)) / temperature
    probs = np.exp(logits - logits.max(-1, keepdims=True)) * (visits > 0)
    probs /= probs.sum(-1, keepdims=True)
    return np.array([rng.choice(len(p), p=p) for p in probs], dtype=np.int64)


class MCTSAgent(Agent):
    """Plans every action with MCTS on the true simulator (cloned env state); no learning."""

    def __init__(self, cfg: Any, obs_space: gym.spaces.Dict, action_space: gym.Space, device):
        if not isinstance(action_space, gym.spaces.Discrete):
            raise ConfigError(
                f"agent.name=mcts plans over Discrete actions; env '{cfg.env.id}' has "
                f"{action_space} (pick a discrete-action env)"
            )
        node = cfg.agent
        self.config = search_config(node)
        self.temperature = check_float(node, "temperature", "agent.", 0.0)
        self.rollouts = check_int(node, "rollout.count", "agent.", low=0)
        self.rollout_depth = check_int(node, "rollout.depth", "agent.", low=0)
        self.value: ValueLearner | None = None
        learn_value = check_bool(node, "value.learn", "agent.")
        self.value_mix = check_float(node, "value.mix", "agent.", 0.0, 1.0) if learn_value else 0.0
        self.learned_rollouts = (
            check_choice(node, "rollout.policy", ["random", "learned"], "agent.") == "learned"
        )
        if learn_value or self.learned_rollouts:
            self.value = _value_learner(
                node, obs_space, action_space, self.config, cfg, learn_value, self.learned_rollouts
            )
        self._pending_obs: np.ndarray | None = None  # vector obs of the last act
        self._pending_action: np.ndarray | None = None  # [N] its actions (0-based)
        self._truncated: np.ndarray | None = None  # [N] episode truncated, final obs next
        self.num_actions = int(action_space.n)
        self.action_start = int(action_space.start)
        self.env_cfg, self.seed = cfg.env, int(cfg.seed)
        self.device = torch.device("cpu")  # env stepping dominates; the tree stays on the CPU
        self.rng = np.random.default_rng(self.seed)
        self.vector_env: Any = None
        self.plan_envs: list[gym.Env] = []
        self._plan_envs: dict[int, list[gym.Env]] = {}  # env count -> planning copies
        self.last_result: SearchResult | None = None
        self.env_steps = 0  # simulator steps spent planning, for speed reports

    @property
    def learns(self) -> bool:
        return False

    def bind_env(self, vector_env: Any) -> None:
        """Plan for the sub-envs of ``vector_env`` (a SyncVectorEnv made by ``envs``).

        Call it again whenever acting switches to other envs (evaluation, then training);
        planning copies are built once per env count and reused.
        """
        if not hasattr(vector_env, "envs"):
            raise TypeError(
                "MCTSAgent reads the real envs' state: give it a SyncVectorEnv (env.vector=sync)"
            )
        self.vector_env = vector_env
        n = vector_env.num_envs
        if n not in self._plan_envs:
            from envs import make_env

            self._plan_envs[n] = [
                make_env(self.env_cfg, seed=self.seed + 1000 * (i + 1)) for i in range(n)
            ]
        self.plan_envs = self._plan_envs[n]

    def _root_states(self) -> list[Snapshot]:
        from envs.state import get_state

        ended = getattr(self.vector_env, "_autoreset_envs", None)  # NEXT_STEP autoreset pending
        return [
            Snapshot(get_state(env), done=bool(ended[i]) if ended is not None else False)
            for i, env in enumerate(self.vector_env.envs)
        ]

    def act(self, obs: dict[str, np.ndarray], state: Any, explore: bool = True):
        if self.vector_env is None:
            raise RuntimeError(
                "MCTSAgent plans on the true simulator: call agent.bind_env(vector_env) before "
                "act (the trainer and agents/evaluate.py do)"
            )
        n = len(obs["is_first"])
        if n != len(self.plan_envs):
            raise ValueError(f"act got {n} observations for {len(self.plan_envs)} bound envs")
        rngs = [np.random.default_rng(s) for s in self.rng.integers(0, 2**63 - 1, size=n)]
        # before the first finished episode: random rollouts alone
        learned = self.value is not None and self.value.trained
        model = SimulatorModel(
            self.plan_envs,
            self.num_actions,
            rngs,
            self.rollouts,
            self.rollout_depth,
            self.config.discount,
            self.device,
            value_fn=self.value.predict if learned and self.value_mix > 0 else None,
            value_mix=self.value_mix if learned else 0.0,
            rollout_policy=self.value.rollout_action if learned and self.learned_rollouts else None,
        )
        if self.value is not None:
            self._pending_obs = np.asarray(obs["vector"], np.float32).reshape(n, -1).copy()
        gumbel, dirichlet = root_noise(self.config, rngs, self.num_actions, explore)
        result = search(model, obs, self._root_states(), self.config, dirichlet, gumbel)
        self.last_result = result
        self.env_steps += model.env_steps
        actions = choose(result, self.config.rule, self.temperature, explore, self.rng)
        self._pending_action = actions
        return actions + self.action_start, state

    def observe(
        self, reward: np.ndarray, terminated: np.ndarray, truncated: np.ndarray, valid: np.ndarray
    ) -> None:
        """Training steps only (evaluation never calls it): feed the learned leaf evaluation.

        A valid step adds (obs and action of the last ``act``, reward) to env i's episode;
        a termination fits on it with G_T = 0; a truncation waits for the final observation,
        which the next ``act`` sees (its step is the autoreset, ``valid`` False), to
        bootstrap G_T.
        """
        if self.value is None or self._pending_obs is None:
            return
        n = len(reward)
        if self._truncated is None or len(self._truncated) != n:
            self._truncated = np.zeros(n, bool)
        for i in range(n):
            if not valid[i]:  # the autoreset step: _pending_obs[i] is the final observation
                if self._truncated[i]:
                    self.value.finish(i, self._pending_obs[i])
                    self._truncated[i] = False
                self.value.drop(i)
                continue
            self.value.record(i, self._pending_obs[i], self._pending_action[i], reward[i])
            if terminated[i]:
                self.value.finish(i, None)
            elif truncated[i]:
                self._truncated[i] = True

    def rng_state(self) -> dict:
        return self.rng.bit_generator.state  # a fresh dict

    def set_rng_state(self, state: dict) -> None:
        self.rng.bit_generator.state = state

    def state_dict(self) -> dict:
        state = {"rng": self.rng.bit_generator.state, "env_steps": self.env_steps}
        if self.value is not None:
            state["value"] = self.value.state_dict()
            truncated = self._truncated if self._truncated is not None else np.zeros(0, bool)
            state["value_truncated"] = torch.as_tensor(truncated)
        return state

    def load_state_dict(self, state: dict) -> None:
        self.rng.bit_generator.state = state["rng"]
        self.env_steps = int(state["env_steps"])
        if self.value is not None:
            if "value" not in state:
                raise ValueError(
                    "the checkpoint has no learned leaf value; it was saved with "
                    "agent.value.learn=false"
                )
            self.value.load_state_dict(state["value"])
            self._truncated = state["value_truncated"].numpy().copy()


def _value_learner(
    node: Any,
    obs_space: gym.spaces.Dict,
    action_space: Any,
    config: SearchConfig,
    cfg: Any,
    value: bool,
    policy: bool,
) -> ValueLearner:
    """The learned leaf value (``value``) and/or rollout policy (``policy``), sized from
    ``agent.value.*`` and ``agent.rollout.lr``."""
    space = obs_space.spaces.get("vector") if isinstance(obs_space, gym.spaces.Dict) else None
    if space is None:
        raise ConfigError(
            "agent.value.learn=true and agent.rollout.policy=learned read flat observations "
            f"(obs['vector']); env '{cfg.env.id}' gives {obs_space} (use "
            "agent.value.learn=false agent.rollout.policy=random)"
        )
    p = "agent."
    return ValueLearner(
        obs_dim=int(np.prod(space.shape)),
        num_actions=int(action_space.n),
        num_envs=int(cfg.env.get("num_envs", 1)),
        discount=config.discount,
        value=value,
        policy=policy,
        hidden=check_int(node, "value.hidden", p),
        lr=check_float(node, "value.lr", p, 1e-9),
        policy_lr=check_float(node, "rollout.lr", p, 1e-9),
        batch_size=check_int(node, "value.batch_size", p),
        updates=check_int(node, "value.updates", p, low=0),
        capacity=check_int(node, "value.capacity", p),
        seed=int(cfg.seed),
    )


class MCTSPlanner:
    """MCTS inside a world model, for world-model agents with ``agent.planner=mcts``.

    ``node`` is the config subtree holding the search keys (``prefix`` names it in errors).
    Call ``plan`` with the posterior latent state [R, ...] of the current step; it returns
    the actions [R] (int64, 0-based) and the search result (``policy`` is a training target).
    """

    def __init__(self, node: Any, num_actions: int, prefix: str = "agent.mcts.", seed: int = 0):
        self.config = search_config(node, prefix)
        self.temperature = check_float(node, "temperature", prefix, 0.0)
        self.num_actions = num_actions
        self.rng = np.random.default_rng(seed)

    def plan(
        self,
        world_model: Any,
        actor: Callable[[Tensor], Tensor],
        critic: Callable[[Tensor], Tensor],
        latent: dict[str, Tensor],
        explore: bool = True,
    ) -> tuple[Tensor, SearchResult]:
        """Search from ``latent`` [R, ...]; actor: features -> logits [R, A], critic -> [R]."""
        model = WorldModelModel(world_model, actor, critic, self.num_actions)
        roots = next(iter(latent.values())).shape[0]
        rngs = [np.random.default_rng(s) for s in self.rng.integers(0, 2**63 - 1, size=roots)]
        gumbel, dirichlet = root_noise(self.config, rngs, self.num_actions, explore)
        device = next(iter(latent.values())).device
        gumbel = None if gumbel is None else gumbel.to(device)
        dirichlet = None if dirichlet is None else dirichlet.to(device)
        result = search(model, None, latent, self.config, dirichlet, gumbel)
        actions = choose(result, self.config.rule, self.temperature, explore, self.rng)
        return torch.as_tensor(actions, device=device), result

    def state_dict(self) -> dict:
        return {"rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict) -> None:
        self.rng.bit_generator.state = state["rng"]
