"""Leaf evaluation for MCTS on the true simulator, learned from the planner's own episodes.

Random rollouts only see a few dozen steps ahead (on CartPole a random policy drops the pole
in ~20 steps), so they cannot tell a centred cart from one drifting towards the track edge
hundreds of steps later. ``ValueLearner`` learns from the episodes the planner has finished:

- a value V(obs) fitted to their discounted returns (Monte Carlo targets, as AlphaZero's value
  targets are the game outcome), used at the leaves with ``agent.value.learn=true``;
- a fast rollout policy, a linear softmax over the observation fitted to the actions the
  search chose (AlphaGo's rollout policy was a linear softmax trained on moves), used by the
  rollouts with ``agent.rollout.policy=learned``: rollouts that balance live long enough to
  see the slow failures.

Targets for an episode with rewards r_0..r_{T-1}: G_t = r_t + γ G_{t+1}, with G_T = 0 after a
termination and G_T = V(o_T) (the current net on the final observation) after a truncation,
so a time limit is not mistaken for failure. The net regresses G_t · (1 - γ) (returns of
per-step rewards in [-1, 1] then lie in [-1, 1]) and predictions are scaled back.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F


class ValueLearner:
    """V(obs) and a linear rollout policy for flat observations [D], fitted on finished
    episodes of N parallel envs.

    Feed it with ``record(i, obs, action, reward)`` for every step env i takes; close an
    episode with ``finish(i, final_obs or None)`` (None: terminated, value 0 after
    it). Each finished episode adds its (obs, action, target) rows to a ring buffer of
    ``capacity`` rows and runs ``updates`` Adam steps on minibatches of ``batch_size`` rows
    (the value's MSE when ``value``, the policy's cross-entropy when ``policy``).
    """

    def __init__(
        self,
        obs_dim: int,
        num_actions: int,
        num_envs: int,
        discount: float,
        value: bool = True,
        policy: bool = False,
        hidden: int = 64,
        lr: float = 1e-3,
        policy_lr: float = 1e-2,
        batch_size: int = 256,
        updates: int = 200,
        capacity: int = 100_000,
        seed: int = 0,
    ):
        self.obs_dim, self.num_actions, self.discount = obs_dim, num_actions, discount
        self.fit_value, self.fit_policy = value, policy
        self.batch_size, self.updates, self.capacity = batch_size, updates, capacity
        self.scale = 1.0 / (1.0 - discount) if discount < 1 else 1.0
        gen = torch.Generator().manual_seed(seed)
        self.net = nn.Sequential(
            nn.Linear(obs_dim, hidden),
            nn.SiLU(),
            nn.Linear(hidden, hidden),
            nn.SiLU(),
            nn.Linear(hidden, 1),
        )
        self.policy = nn.Linear(obs_dim, num_actions)
        with torch.no_grad():  # seeded init, independent of the global RNG
            for p in [*self.net.parameters(), *self.policy.parameters()]:
                p.copy_(torch.empty_like(p).uniform_(-1, 1, generator=gen) / p.shape[-1] ** 0.5)
        self.opt = torch.optim.Adam(self.net.parameters(), lr=lr)
        self.policy_opt = torch.optim.Adam(self.policy.parameters(), lr=policy_lr)
        self.gen = gen
        self.obs = torch.zeros(capacity, obs_dim)  # ring buffer of training rows
        self.action = torch.zeros(capacity, dtype=torch.long)
        self.target = torch.zeros(capacity)
        self.size = self.cursor = 0
        self.episodes = 0  # finished episodes fitted so far; 0 = nothing is trained
        self._obs: list[list[np.ndarray]] = [[] for _ in range(num_envs)]
        self._act: list[list[int]] = [[] for _ in range(num_envs)]
        self._rew: list[list[float]] = [[] for _ in range(num_envs)]
        self._w = self._b = np.zeros(0)  # numpy copy of the policy for per-step rollouts
        self._sync_policy()

    @property
    def trained(self) -> bool:
        return self.episodes > 0

    @torch.no_grad()
    def predict(self, obs: np.ndarray) -> np.ndarray:
        """obs [N, D] -> values [N] in return units."""
        x = torch.as_tensor(np.asarray(obs, np.float32).reshape(-1, self.obs_dim))
        return (self.net(x)[:, 0] * self.scale).numpy()

    def rollout_action(self, obs: np.ndarray, rng: np.random.Generator) -> int:
        """One action sampled from the linear softmax policy at ``obs`` [D] (numpy: fast)."""
        logits = self._w @ np.asarray(obs, np.float64).reshape(-1) + self._b  # [A]
        probs = np.exp(logits - logits.max())
        return int(rng.choice(self.num_actions, p=probs / probs.sum()))

    def _sync_policy(self) -> None:
        self._w = self.policy.weight.detach().double().numpy().copy()  # [A, D]
        self._b = self.policy.bias.detach().double().numpy().copy()  # [A]

    # ---------------------------------------------------------------------- episodes
    def _slot(self, i: int) -> None:
        """Episode lists for env i (more envs than at construction grow them)."""
        while i >= len(self._obs):
            self._obs.append([])
            self._act.append([])
            self._rew.append([])

    def record(self, i: int, obs: np.ndarray, action: int, reward: float) -> None:
        """Env i stepped from ``obs`` [D] with ``action`` and got ``reward``."""
        self._slot(i)
        self._obs[i].append(np.asarray(obs, np.float32).reshape(self.obs_dim).copy())
        self._act[i].append(int(action))
        self._rew[i].append(float(reward))

    def drop(self, i: int) -> None:
        """Forget env i's unfinished episode."""
        self._slot(i)
        self._obs[i].clear()
        self._act[i].clear()
        self._rew[i].clear()

    def finish(self, i: int, final_obs: np.ndarray | None) -> Tensor:
        """Close env i's episode, store its rows and fit; returns the return targets [T]."""
        self._slot(i)
        obs, act, rew = list(self._obs[i]), list(self._act[i]), list(self._rew[i])
        tail = 0.0 if final_obs is None else float(self.predict(final_obs[None])[0])
        targets = torch.tensor(self.returns(rew, self.discount, tail), dtype=torch.float32)
        self.drop(i)
        if len(rew) == 0:
            return targets
        self._store(torch.as_tensor(np.stack(obs)), torch.tensor(act), targets / self.scale)
        self.episodes += 1
        self.fit(self.updates)
        return targets

    @staticmethod
    def returns(rewards: list[float], discount: float, tail: float = 0.0) -> list[float]:
        """Discounted returns-to-go G_t = r_t + γ G_{t+1}, G_T = ``tail``."""
        out, g = [0.0] * len(rewards), tail
        for t in range(len(rewards) - 1, -1, -1):
            g = rewards[t] + discount * g
            out[t] = g
        return out

    def _store(self, obs: Tensor, action: Tensor, target: Tensor) -> None:
        n, c = obs.shape[0], self.capacity
        idx = (self.cursor + torch.arange(n)) % c  # the last c rows win when n > c
        self.obs[idx], self.action[idx], self.target[idx] = obs, action, target
        self.cursor = (self.cursor + n) % c
        self.size = min(self.size + n, c)

    def fit(self, steps: int) -> dict[str, float]:
        """``steps`` Adam steps on random minibatches; returns the last losses."""
        out: dict[str, float] = {}
        for _ in range(steps):
            n = min(self.batch_size, self.size)
            idx = torch.randint(0, self.size, (n,), generator=self.gen)
            obs = self.obs[idx]
            if self.fit_value:
                loss = (self.net(obs)[:, 0] - self.target[idx]).pow(2).mean()
                self.opt.zero_grad(set_to_none=True)
                loss.backward()
                self.opt.step()
                out["value"] = float(loss.detach())
            if self.fit_policy:
                loss = F.cross_entropy(self.policy(obs), self.action[idx])
                self.policy_opt.zero_grad(set_to_none=True)
                loss.backward()
                self.policy_opt.step()
                out["policy"] = float(loss.detach())
        self._sync_policy()
        return out

    # ---------------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict:
        n = self.size
        return {
            "net": self.net.state_dict(),
            "opt": self.opt.state_dict(),
            "policy": self.policy.state_dict(),
            "policy_opt": self.policy_opt.state_dict(),
            "gen": self.gen.get_state(),
            "obs": self.obs[:n].clone(),
            "action": self.action[:n].clone(),
            "target": self.target[:n].clone(),
            "cursor": self.cursor,
            "episodes": self.episodes,
            "pending_obs": [torch.as_tensor(np.array(o, np.float32)) for o in self._obs],
            "pending_act": [torch.tensor(a, dtype=torch.long) for a in self._act],
            "pending_rew": [torch.tensor(r, dtype=torch.float32) for r in self._rew],
        }

    def load_state_dict(self, state: dict) -> None:
        self.net.load_state_dict(state["net"])
        self.opt.load_state_dict(state["opt"])
        self.policy.load_state_dict(state["policy"])
        self.policy_opt.load_state_dict(state["policy_opt"])
        self.gen.set_state(state["gen"])
        n = state["obs"].shape[0]
        self.obs.zero_(), self.action.zero_(), self.target.zero_()
        self.obs[:n], self.action[:n], self.target[:n] = (
            state["obs"],
            state["action"],
            state["target"],
        )
        self.size, self.cursor = n, int(state["cursor"])
        self.episodes = int(state["episodes"])
        self._obs = [[row.numpy().copy() for row in o] for o in state["pending_obs"]]
        self._act = [a.tolist() for a in state["pending_act"]]
        self._rew = [r.tolist() for r in state["pending_rew"]]
        self._sync_policy()
