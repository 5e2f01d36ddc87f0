"""Bandits: the shared UCB rule, every policy's update on hand-computed steps, the counter RNG,
vectorised == one-by-one runs, testbed statistics, the Gym env and the trainer adapter."""

from __future__ import annotations

import math

import gymnasium as gym
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from agents import bandits as B
from agents.config import ConfigError
from agents.ucb import puct_score, ucb_score
from envs.bandits import STREAM_POLICY, BanditEnv, BanditTestbed, CounterRNG, make_bandit_env

F64 = torch.float64


def t64(*values) -> torch.Tensor:
    return torch.tensor(values, dtype=F64)


def pull(policy: B.BanditPolicy, arm: int, reward: float) -> None:
    policy.update(torch.tensor([arm]), t64(reward))


# ------------------------------------------------------------------------ ucb.py
def test_ucb_score_hand_values():
    score = ucb_score(t64(0.5, 1.0, 0.0), t64(2, 1, 0), 4.0, c=2.0)
    # 0.5 + 2 sqrt(ln 4 / 2), 1 + 2 sqrt(ln 4), unvisited
    torch.testing.assert_close(score[:2], t64(2.1651092223, 3.3548200450))
    assert score[2] == math.inf


def test_ucb_score_per_parent_totals_and_first_play_value():
    mean = t64(0.0, 1.0, 0.0, 1.0).view(2, 2)
    count = t64(1, 0, 4, 1).view(2, 2)
    total = t64(math.e, 1.0).view(2, 1)  # ln e = 1; ln 1 = 0
    score = ucb_score(mean, count, total, c=1.0, unvisited=-7.0)
    torch.testing.assert_close(score, t64(1.0, -7.0, 0.0, 1.0).view(2, 2))
    # totals below 1 are clamped (no negative logs, no nan)
    assert ucb_score(t64(0.3), t64(2), 0.5, c=1.0).item() == pytest.approx(0.3)
    # at total 1 (ln 1 = 0) unvisited arms still score +inf
    assert ucb_score(t64(0.3, 0.0), t64(1, 0), 1.0, c=2.0)[1] == math.inf


def test_puct_score_hand_value():
    score = puct_score(t64(0.2, 0.0), t64(3, 0), 16.0, t64(0.5, 0.25), c=1.5)
    torch.testing.assert_close(score, t64(0.2 + 1.5 * 0.5 * 4 / 4, 1.5 * 0.25 * 4))


# ------------------------------------------------------------------------ helpers
def test_argmax_random_ties_is_uniform_over_ties():
    x = t64(0.0, 2.0, 1.0, 2.0, 2.0).expand(3, 5)
    u = t64(0.0, 0.5, 0.99)  # thirds: first, second, third tied arm
    assert B.argmax_random_ties(x, u).tolist() == [1, 3, 4]


def test_sample_categorical_inverse_cdf():
    probs = t64(0.2, 0.5, 0.3).expand(4, 3)
    assert B.sample_categorical(probs, t64(0.1, 0.21, 0.69, 0.71)).tolist() == [0, 1, 1, 2]


# ------------------------------------------------------------------------ update rules
def test_sample_average_and_constant_step():
    avg = B.EpsilonGreedy(1, 3, epsilon=0.1)
    pull(avg, 1, 1.0)
    pull(avg, 1, 3.0)
    pull(avg, 0, -1.0)
    torch.testing.assert_close(avg.q[0], t64(-1.0, 2.0, 0.0))
    torch.testing.assert_close(avg.n[0], t64(1, 2, 0))

    optimistic = B.EpsilonGreedy(1, 3, epsilon=0.0, initial=5.0, step_size=0.1)
    pull(optimistic, 2, 1.0)  # 5 + 0.1 (1 - 5) = 4.6
    pull(optimistic, 2, 1.0)  # 4.6 + 0.1 (1 - 4.6) = 4.24
    torch.testing.assert_close(optimistic.q[0], t64(5.0, 5.0, 4.24))


def test_gradient_bandit_with_baseline():
    g = B.GradientBandit(1, 3, alpha=0.1, baseline=True)
    pull(g, 0, 1.0)  # baseline R̄_1 = R_1: no change
    torch.testing.assert_close(g.h[0], t64(0.0, 0.0, 0.0))
    pull(g, 1, 4.0)  # R - R̄ = 3, π = 1/3: +0.1*3*(2/3), -0.1*3*(1/3)
    torch.testing.assert_close(g.h[0], t64(-0.1, 0.2, -0.1))
    assert g.baseline_value.item() == pytest.approx(2.5)
    pull(g, 2, 0.0)  # R - R̄ = -2.5, π = softmax(-0.1, 0.2, -0.1) = (0.298520, 0.402960, ...)
    torch.testing.assert_close(g.h[0], t64(-0.0253699889, 0.3007399778, -0.2753699889))


def test_gradient_bandit_without_baseline():
    g = B.GradientBandit(1, 3, alpha=0.1, baseline=False)
    pull(g, 0, 1.0)
    torch.testing.assert_close(g.h[0], t64(0.2 / 3, -0.1 / 3, -0.1 / 3))


def test_beta_posterior_update():
    b = B.BetaThompson(1, 2)
    pull(b, 0, 1.0)
    pull(b, 0, 0.0)
    pull(b, 1, 1.0)
    torch.testing.assert_close(b.alpha[0], t64(2.0, 2.0))
    torch.testing.assert_close(b.beta[0], t64(2.0, 1.0))
    torch.testing.assert_close(b.values()[0], t64(0.5, 2 / 3))
    scaled = B.BetaThompson(1, 1, low=-1.0, high=1.0)
    pull(scaled, 0, 0.0)  # x = 0.5
    assert (scaled.alpha.item(), scaled.beta.item()) == (1.5, 1.5)


def test_gaussian_posterior():
    g = B.GaussianThompson(1, 2, noise_std=2.0, prior_mean=1.0, prior_std=1.0)
    pull(g, 0, 3.0)
    pull(g, 0, 5.0)
    mean, std = g.posterior()
    # precision 1 + 2/4 = 1.5; mean (1*1 + 8/4) / 1.5 = 2; the untouched arm keeps the prior
    torch.testing.assert_close(mean[0], t64(2.0, 1.0))
    torch.testing.assert_close(std[0], t64(1 / math.sqrt(1.5), 1.0))


def test_exp3_weights():
    e = B.EXP3(1, 3, gamma=0.3)
    torch.testing.assert_close(e.probs()[0], t64(1 / 3, 1 / 3, 1 / 3))
    pull(e, 0, 1.0)  # log w0 += 0.3 * 1 / (1/3 * 3)
    torch.testing.assert_close(e.log_w[0], t64(0.3, 0.0, 0.0))
    torch.testing.assert_close(e.probs()[0], t64(0.3820719378, 0.3089640311, 0.3089640311))
    pull(e, 1, 0.5)  # log w1 += 0.3 * 0.5 / (0.308964 * 3)
    torch.testing.assert_close(e.log_w[0], t64(0.3, 0.1618311356, 0.0))


def test_discounted_counts_and_scores():
    d = B.DiscountedUCB(1, 2, c=1.0, discount=0.5)
    pull(d, 0, 1.0)
    pull(d, 1, 2.0)
    pull(d, 0, 0.0)
    torch.testing.assert_close(d.n[0], t64(1.25, 0.5))
    torch.testing.assert_close(d.s[0], t64(0.25, 1.0))
    # means 0.2, 2; total 1.75: 0.2 + sqrt(ln 1.75 / 1.25), 2 + sqrt(ln 1.75 / 0.5)
    torch.testing.assert_close(d.scores()[0], t64(0.8690983712, 3.0579374159))


def test_kl_ucb_index_solves_the_kl_equation():
    k = B.KLUCB(1, 3)
    for arm, r in [(0, 1.0), (0, 0.0), (1, 1.0), (0, 1.0), (1, 0.0)]:
        pull(k, arm, r)
    score = k.scores()[0]
    level = math.log(k.t + 1)
    for arm, (mean, n) in enumerate([(2 / 3, 3), (0.5, 2)]):
        u = score[arm].item()
        kl = mean * math.log(mean / u) + (1 - mean) * math.log((1 - mean) / (1 - u))
        assert u > mean and n * kl == pytest.approx(level, abs=1e-5)
    assert score[2] == math.inf


def test_ucb_pulls_every_arm_once_before_exploiting():
    runs, arms = 8, 5
    bed = BanditTestbed(runs, arms, seed=3)
    ucb = B.UCB1(runs, arms, c=2.0)
    rng = CounterRNG.seeded(3, runs, STREAM_POLICY)
    chosen = []
    for _ in range(arms):
        a = ucb.select(rng)
        ucb.update(a, bed.pull(a))
        chosen.append(a)
    chosen = torch.stack(chosen, 1)  # [R, arms]
    assert (chosen.sort(-1).values == torch.arange(arms)).all()
    assert len({tuple(row) for row in chosen.tolist()}) > 1  # ties broken at random


# ------------------------------------------------------------------------ vectorisation
POLICY_MAKERS = {
    "greedy": lambda r, a: B.EpsilonGreedy(r, a, 0.0),
    "epsilon": lambda r, a: B.EpsilonGreedy(r, a, 0.1),
    "optimistic": lambda r, a: B.EpsilonGreedy(r, a, 0.0, 5.0, 0.1),
    "ucb": lambda r, a: B.UCB1(r, a, 2.0),
    "kl_ucb": lambda r, a: B.KLUCB(r, a),
    "thompson_gaussian": lambda r, a: B.GaussianThompson(r, a),
    "thompson_beta": lambda r, a: B.BetaThompson(r, a),
    "gradient": lambda r, a: B.GradientBandit(r, a, 0.1),
    "exp3": lambda r, a: B.EXP3(r, a, 0.1, -3.0, 3.0),
    "discounted_ucb": lambda r, a: B.DiscountedUCB(r, a, 2.0, 0.95),
}


def _play(policy, bed, rng, steps):
    actions = []
    for _ in range(steps):
        a = policy.select(rng)
        policy.update(a, bed.pull(a))
        actions.append(a)
    return torch.stack(actions, 1)  # [R, T]


@pytest.mark.parametrize("name", sorted(POLICY_MAKERS))
def test_vectorised_equals_one_by_one(name):
    runs, arms, steps, seed = 5, 4, 60, 11
    kind = "bernoulli" if name in ("kl_ucb", "thompson_beta") else "walk"
    bed = BanditTestbed(runs, arms, kind, seed, walk_std=0.1)
    together = POLICY_MAKERS[name](runs, arms)
    actions = _play(together, bed, CounterRNG.seeded(seed, runs, STREAM_POLICY), steps)
    assert len(set(actions.flatten().tolist())) > 1
    for r in range(runs):
        alone = POLICY_MAKERS[name](1, arms)
        bed_r = BanditTestbed(1, arms, kind, seed, first_run=r, walk_std=0.1)
        rng_r = CounterRNG.seeded(seed, 1, STREAM_POLICY, first_run=r)
        assert torch.equal(_play(alone, bed_r, rng_r, steps)[0], actions[r])
        for key, value in alone.state_dict().items():
            if key != "t":
                torch.testing.assert_close(value[0], together.state_dict()[key][r])
        torch.testing.assert_close(bed_r.q_star[0], bed.q_star[r])


def test_policy_state_dict_round_trip_continues_identically():
    runs, arms = 3, 4
    bed = BanditTestbed(runs, arms, seed=2)
    rng = CounterRNG.seeded(2, runs, STREAM_POLICY)
    a = B.GradientBandit(runs, arms)
    _play(a, bed, rng, 10)
    b = B.GradientBandit(runs, arms)
    b.load_state_dict(a.state_dict())
    rng_b = CounterRNG(rng.keys)
    rng_b.load_state_dict(rng.state_dict())
    assert torch.equal(a.select(rng), b.select(rng_b))
    with pytest.raises(ValueError, match="expected shape"):
        B.GradientBandit(runs, arms + 1).load_state_dict(a.state_dict())


# ------------------------------------------------------------------------ randomness, testbed
def test_counter_rng_is_uniform_and_uncorrelated():
    rng = CounterRNG.seeded(0, 4000, STREAM_POLICY)
    u = torch.cat([rng.uniform(5) for _ in range(10)], 1).double()  # [4000, 50]
    assert u.min() > 0 and u.max() < 1
    assert u.mean().item() == pytest.approx(0.5, abs=0.005)
    assert u.var().item() == pytest.approx(1 / 12, abs=0.002)
    corr = torch.corrcoef(torch.stack([u[:, 0], u[:, 1], u[:, 5], u[:, 0].roll(1)]))
    assert (corr - torch.eye(4)).abs().max() < 0.05  # slots, draws and runs independent
    z = rng.normal(8).double()
    assert z.mean().item() == pytest.approx(0.0, abs=0.03)
    assert z.std().item() == pytest.approx(1.0, abs=0.03)
    assert torch.equal(CounterRNG.seeded(0, 2, 1).uniform(3), CounterRNG.seeded(0, 2, 1).uniform(3))
    assert not torch.equal(
        CounterRNG.seeded(0, 2, 1).uniform(3), CounterRNG.seeded(1, 2, 1).uniform(3)
    )


def test_gaussian_testbed_statistics():
    bed = BanditTestbed(2000, 10, "gaussian", seed=0)
    assert bed.q_star.mean().item() == pytest.approx(0.0, abs=0.03)
    assert bed.q_star.std().item() == pytest.approx(1.0, abs=0.03)
    best = bed.optimal_action
    assert torch.equal(bed.q_star.gather(1, best[:, None])[:, 0], bed.q_star.max(1).values)
    noise = torch.stack([bed.pull(best) for _ in range(20)]) - bed.q_star.max(1).values
    assert noise.mean().item() == pytest.approx(0.0, abs=0.02)
    assert noise.std().item() == pytest.approx(1.0, abs=0.02)
    assert (bed.regret(best) == 0).all() and (bed.regret(torch.zeros_like(best)) >= 0).all()
    shifted = BanditTestbed(2000, 10, "gaussian", seed=0, offset=4.0)
    torch.testing.assert_close(shifted.q_star - 4.0, bed.q_star)


def test_bernoulli_and_walk_testbeds():
    bern = BanditTestbed(3000, 2, "bernoulli", seed=1)
    assert bern.q_star.min() >= 0 and bern.q_star.max() <= 1
    arm0 = torch.zeros(3000, dtype=torch.long)
    rewards = torch.stack([bern.pull(arm0) for _ in range(10)])
    assert set(rewards.unique().tolist()) <= {0.0, 1.0}
    assert (rewards.mean(0) - bern.q_star[:, 0]).mean().abs() < 0.02
    walk = BanditTestbed(3000, 10, "walk", seed=1, walk_std=0.01)
    assert (walk.q_star == 0).all()  # S&B exercise 2.5: equal start
    for _ in range(100):
        walk.pull(arm0)
    # after 100 steps each q* ~ N(0, 100 * 0.01^2) = N(0, 0.1^2)
    assert walk.q_star.std().item() == pytest.approx(0.1, abs=0.003)


# ------------------------------------------------------------------------ Gymnasium env
ENV_CFG = {
    "family": "bandit",
    "id": "yume/Bandit-v0",
    "name": "bandit",
    "time_limit": 5,
    "kind": "gaussian",
    "arms": 4,
    "problem_seed": 7,
    "offset": 0.0,
    "reward_std": 1.0,
    "walk_std": 0.01,
    "means": None,
}


def test_gym_env_spaces_rewards_and_truncation():
    env = make_bandit_env(ENV_CFG, seed=0)
    assert env.action_space == gym.spaces.Discrete(4)
    assert env.observation_space["vector"].shape == (1,)
    assert env.observation_space["vector"].dtype == np.float32
    obs, info = env.reset(seed=0)
    assert obs["vector"].dtype == np.float32 and obs["vector"].tolist() == [1.0]
    # the problem is that of testbed run 0 with seed problem_seed
    np.testing.assert_allclose(env.q_star, BanditTestbed(1, 4, seed=7).q_star[0].numpy())
    assert info["optimal_action"] == int(env.q_star.argmax())
    ends = []
    for _ in range(5):
        obs, reward, terminated, truncated, info = env.step(0)
        ends.append((terminated, truncated))
        assert info["regret"] == pytest.approx(env.q_star.max() - env.q_star[0])
    assert ends == [(False, False)] * 4 + [(False, True)]
    assert env.observation_space.contains(obs)


def test_gym_env_reward_distribution_and_means_override():
    env = make_bandit_env({**ENV_CFG, "means": [0.0, 2.0, -1.0, 0.5]}, seed=1)
    rewards = np.array([env.step(1)[1] for _ in range(4000)])
    assert rewards.mean() == pytest.approx(2.0, abs=0.05)
    assert rewards.std() == pytest.approx(1.0, abs=0.05)
    bern = make_bandit_env({**ENV_CFG, "kind": "bernoulli", "means": [0.25, 0.5, 0.75, 1.0]})
    bern.reset(seed=2)
    rewards = np.array([bern.step(0)[1] for _ in range(4000)])
    assert set(np.unique(rewards)) <= {0.0, 1.0} and rewards.mean() == pytest.approx(0.25, abs=0.03)
    made = gym.make("yume/Bandit-v0", arms=3, problem_seed=1)
    assert made.action_space.n == 3


def test_gym_env_state_round_trip():
    env = make_bandit_env({**ENV_CFG, "kind": "walk"}, seed=3)
    env.step(1)
    state = env.get_state()
    after = [env.step(2)[1] for _ in range(3)]
    env.set_state(state)
    assert [env.step(2)[1] for _ in range(3)] == after


@pytest.mark.parametrize(
    "override, message",
    [
        ({"kind": "poisson"}, "env.kind"),
        ({"arms": 0}, "env.arms"),
        ({"means": [0.5, 0.5]}, "env.means has 2 values"),
        ({"kind": "bernoulli", "means": [0.5, 0.5, 0.5, 2.0]}, "env.means must lie in"),
        ({"reward_std": -1.0}, "env.reward_std"),
        ({"arm": 3}, "unknown key"),
    ],
)
def test_make_bandit_env_rejects_bad_config(override, message):
    with pytest.raises(ConfigError, match=message):
        make_bandit_env({**ENV_CFG, **override})


def test_bandit_env_rejects_out_of_range_action():
    env = BanditEnv(arms=2)
    env.reset(seed=0)
    with pytest.raises(ValueError, match="action must be in"):
        env.step(2)


# ------------------------------------------------------------------------ learning
def test_ucb_learns_an_easy_two_arm_bernoulli():
    """Best arm chosen > 90% of the last 100 of 1000 pulls (averaged over 50 runs)."""
    runs = 50
    bed = BanditTestbed(runs, 2, "bernoulli", seed=0)
    bed.q_star = t64(0.2, 0.8).expand(runs, 2).clone()
    actions = _play(B.UCB1(runs, 2, c=2.0), bed, CounterRNG.seeded(0, runs, STREAM_POLICY), 1000)
    best = (actions[:, -100:] == 1).double().mean(1)  # [R]
    assert best.mean() > 0.9 and best.min() > 0.8


# ------------------------------------------------------------------------ agent adapter
def agent_cfg(**agent):
    base = OmegaConf.load("configs/agent/bandit.yaml")
    return OmegaConf.create({"seed": 0, "agent": {**OmegaConf.to_container(base), **agent}})


@pytest.mark.parametrize(
    "policy, cls",
    [
        ("greedy", B.EpsilonGreedy),
        ("epsilon", B.EpsilonGreedy),
        ("ucb", B.UCB1),
        ("kl_ucb", B.KLUCB),
        ("thompson", B.GaussianThompson),
        ("gradient", B.GradientBandit),
        ("exp3", B.EXP3),
        ("discounted_ucb", B.DiscountedUCB),
    ],
)
def test_make_policy_from_the_shipped_config(policy, cls):
    cfg = agent_cfg(policy=policy)
    assert type(B.make_policy(cfg.agent, 2, 3)) is cls
    beta = B.make_policy(agent_cfg(policy="thompson", likelihood="bernoulli").agent, 2, 3)
    assert type(beta) is B.BetaThompson


@pytest.mark.parametrize(
    "override, message",
    [
        ({"policy": "softmax"}, "agent.policy must be one of"),
        ({"policy": "epsilon", "epsilon": 1.5}, "agent.epsilon"),
        ({"policy": "epsilon", "step_size": 0.0}, "agent.step_size"),
        ({"policy": "exp3", "reward_low": 1.0}, "agent.reward_low must be <"),
        ({"policy": "gradient", "baseline": "yes"}, "agent.baseline"),
    ],
)
def test_bandit_agent_config_errors(override, message):
    with pytest.raises(ConfigError, match=message):
        B.BanditAgent(agent_cfg(**override), None, gym.spaces.Discrete(3), "cpu")


def test_bandit_agent_needs_discrete_actions():
    with pytest.raises(ConfigError, match="Discrete"):
        B.BanditAgent(agent_cfg(), None, gym.spaces.Box(-1, 1, (2,)), "cpu")


def test_bandit_agent_learns_online_and_resumes():
    env = make_bandit_env({**ENV_CFG, "kind": "bernoulli", "means": [0.1, 0.2, 0.9, 0.3]}, seed=0)
    agent = B.BanditAgent(agent_cfg(policy="ucb"), env.observation_space, env.action_space, "cpu")
    assert agent.learns is False
    obs = {"vector": np.ones((2, 1), np.float32), "is_first": np.zeros(2, bool)}
    for _ in range(300):
        actions, state = agent.act(obs, None)
        assert actions.dtype == np.int64 and actions.shape == (2,) and state is None
        rewards = np.array([env.step(a)[1] for a in actions])
        agent.observe(rewards, np.zeros(2, bool), np.zeros(2, bool), np.ones(2, bool))
    assert agent.policy.t == 600  # both envs' pulls pooled into one learner
    assert agent.act(obs, None, explore=False)[0].tolist() == [2, 2]
    # invalid (autoreset) steps are skipped
    agent.observe(np.ones(2), np.zeros(2, bool), np.zeros(2, bool), np.array([False, True]))
    assert agent.policy.t == 601
    # a restored agent continues identically
    other = B.BanditAgent(agent_cfg(policy="ucb"), None, env.action_space, "cpu")
    other.load_state_dict(agent.state_dict())
    assert all(torch.is_tensor(v) for v in other.state_dict()["policy"].values())
    for _ in range(5):
        a1, _ = agent.act(obs, None)
        a2, _ = other.act(obs, None)
        assert a1.tolist() == a2.tolist()
        agent.observe(np.ones(2), np.zeros(2, bool), np.zeros(2, bool), np.ones(2, bool))
        other.observe(np.ones(2), np.zeros(2, bool), np.zeros(2, bool), np.ones(2, bool))
