"""Speed and strength of the batched MCTS on this machine (figures in docs/mcts.md).

    python -m agents.planning.bench cartpole --simulations 32 --envs 1 --steps 500
    python -m agents.planning.bench tree --simulations 64 --roots 1 16

``cartpole``: MCTSAgent on CartPole-v1 (true simulator); prints each env's return and
simulations/s (search iterations x envs per second, env stepping included).
``tree``: the search alone on a tiny deterministic latent model (tree overhead only).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from omegaconf import OmegaConf

from agents.planning.search import SearchConfig, search


class _TinyModel:
    """Deterministic latent model: x' = tanh(W_a x), softmax(U x) prior, v.x value."""

    def __init__(self, dim: int = 8, actions: int = 4):
        g = torch.Generator().manual_seed(0)
        self.w = torch.randn(actions, dim, dim, generator=g) / dim**0.5
        self.u = torch.randn(actions, dim, generator=g)
        self.v = torch.randn(dim, generator=g)

    def _heads(self, x):
        return torch.softmax(x @ self.u.T, -1), x @ self.v

    def root(self, obs, state):
        return (state, *self._heads(state))

    def step(self, x, a):
        nxt = torch.tanh(torch.einsum("rij,rj->ri", self.w[a], x))
        reward = (x * self.u[a]).sum(-1) * 0.1
        return nxt, reward, torch.ones_like(reward), *self._heads(nxt)


def bench_tree(simulations: int, roots: list[int], repeats: int = 5) -> None:
    for rule, unvisited in [("puct", "zero"), ("uct", "inf"), ("gumbel", "zero")]:
        for r in roots:
            model = _TinyModel()
            x = torch.randn(r, 8, generator=torch.Generator().manual_seed(1))
            cfg = SearchConfig(simulations=simulations, rule=rule, unvisited=unvisited)
            search(model, None, x, cfg)
            start = time.perf_counter()
            for _ in range(repeats):
                search(model, None, x, cfg)
            dt = time.perf_counter() - start
            n = repeats * simulations
            print(
                f"tree {rule:6s} R={r:3d}: {n / dt:7.0f} search iterations/s, "
                f"{n * r / dt:8.0f} simulations/s (iterations x roots)"
            )


def bench_cartpole(
    simulations: int,
    envs: int,
    steps: int,
    rule: str,
    rollouts: int,
    depth: int,
    episodes: int = 1,
    learn_value: bool = False,
    mix: float = 1.0,
    seed: int = 0,
    rollout_policy: str = "random",
):
    """Plays ``episodes`` episodes per env (stopping early after ``steps`` acts), as the
    trainer does: act, step, observe (a learned leaf value fits on every finished episode)."""
    from agents.mcts import MCTSAgent
    from envs import make_vector_env

    node = OmegaConf.load("configs/agent/mcts.yaml")
    node.simulations, node.rule = simulations, rule
    node.rollout.count, node.rollout.depth = rollouts, depth
    node.value.learn, node.value.mix = learn_value, mix
    node.rollout.policy = rollout_policy
    cfg = OmegaConf.create(
        {
            "seed": seed,
            "env": {"family": "classic", "id": "CartPole-v1", "name": "cartpole", "num_envs": envs},
        }
    )
    cfg.agent = node
    venv = make_vector_env(cfg.env, envs, seed=seed)
    agent = MCTSAgent(cfg, venv.single_observation_space, venv.single_action_space, "cpu")
    agent.bind_env(venv)
    obs, _ = venv.reset(seed=seed)
    is_first, is_last = np.ones(envs, bool), np.zeros(envs, bool)
    ep_return = np.zeros(envs)
    returns: list[list[float]] = [[] for _ in range(envs)]
    start, acted = time.perf_counter(), 0
    for _ in range(steps):
        if min(len(r) for r in returns) >= episodes:
            break
        actions, _ = agent.act({**obs, "is_first": is_first}, None, explore=True)
        obs, reward, terminated, truncated, _ = venv.step(actions)
        valid = ~is_last
        agent.observe(reward, terminated, truncated, valid)
        acted += int(valid.sum())
        ep_return += np.where(valid, reward, 0.0)
        is_first, is_last = is_last.copy(), terminated | truncated
        for i in np.flatnonzero(is_last & valid):
            returns[i].append(float(ep_return[i]))
            print(f"  env {i} episode {len(returns[i])}: {ep_return[i]:.0f}", flush=True)
            ep_return[i] = 0.0
    dt = time.perf_counter() - start
    value = f" learned value (mix {mix})" if learn_value else ""
    value += f" {rollout_policy} rollouts"
    print(
        f"cartpole {rule} sims={simulations} rollout={rollouts}x{depth}{value} envs={envs} "
        f"seed={seed}: returns {returns}, {dt:.1f}s, {acted * simulations / dt:.0f} "
        f"simulations/s, {agent.env_steps / dt:.0f} simulator steps/s"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("what", choices=["cartpole", "tree"])
    p.add_argument("--simulations", type=int, default=32)
    p.add_argument("--envs", type=int, default=1)
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--rule", default="puct", choices=["uct", "puct", "gumbel"])
    p.add_argument("--rollouts", type=int, default=1)
    p.add_argument("--depth", type=int, default=50)
    p.add_argument("--roots", type=int, nargs="+", default=[1, 16])
    p.add_argument("--episodes", type=int, default=1, help="episodes per env (cartpole)")
    p.add_argument("--learn-value", action="store_true", help="agent.value.learn=true")
    p.add_argument("--mix", type=float, default=1.0, help="agent.value.mix")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rollout-policy", default="random", choices=["random", "learned"])
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    if a.what == "tree":
        bench_tree(a.simulations, a.roots)
    else:
        bench_cartpole(
            a.simulations,
            a.envs,
            a.steps,
            a.rule,
            a.rollouts,
            a.depth,
            a.episodes,
            a.learn_value,
            a.mix,
            a.seed,
            a.rollout_policy,
        )


if __name__ == "__main__":
    main()
