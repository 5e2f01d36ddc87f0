"""Batched MCTS: known values on hand-written models, batching, Gumbel, the true simulator."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from agents.config import ConfigError
from agents.mcts import MCTSAgent, MCTSPlanner, search_config
from agents.planning import gumbel as gz
from agents.planning.models import SimulatorModel, WorldModelModel
from agents.planning.search import SearchConfig, search
from agents.planning.tree import Tree
from agents.planning.value import ValueLearner
from envs import get_state, make_env, make_vector_env
from world_models.base import WorldModel

# ------------------------------------------------------------------ hand-written models


class TableModel:
    """A deterministic MDP from tables; the embedding is the state id, a tensor [R].

    ``nxt``, ``reward``, ``discount``: [S, A]; ``value``: [S]; ``prior``: [S, A].
    """

    def __init__(self, nxt, reward, discount, value, prior):
        self.nxt = torch.tensor(nxt)
        self.reward = torch.tensor(reward, dtype=torch.float32)
        self.discount = torch.tensor(discount, dtype=torch.float32)
        self.value = torch.tensor(value, dtype=torch.float32)
        self.prior = torch.tensor(prior, dtype=torch.float32)
        self.calls = 0

    def root(self, obs, state):
        s = torch.as_tensor(state)
        return s, self.prior[s], self.value[s]

    def step(self, s, a):
        self.calls += 1
        n = self.nxt[s, a]
        return n, self.reward[s, a], self.discount[s, a], self.prior[n], self.value[n]


def trap_model() -> TableModel:
    """Root 0: a0 -> state 1 (reward 0), a1 -> state 2 (reward 0.5, the greedy trap).

    State 1: a0 -> reward 1 then the end, a1 -> reward 0. State 2: reward 0 either way.
    State 3 is terminal (discount 0 into it). Best: a0, a0 with return gamma * 1.
    """
    nxt = [[1, 2], [3, 3], [3, 3], [3, 3]]
    reward = [[0.0, 0.5], [1.0, 0.0], [0.0, 0.0], [0.0, 0.0]]
    discount = [[1.0, 1.0], [0.0, 0.0], [0.0, 0.0], [0.0, 0.0]]
    return TableModel(nxt, reward, discount, [0.0] * 4, [[0.5, 0.5]] * 4)


def bandit_model(rewards: list[float], prior: list[float] | None = None) -> TableModel:
    """One root with len(rewards) arms; arm a pays rewards[a] and ends the episode."""
    a = len(rewards)
    nxt = [[1] * a, [1] * a]
    reward = [rewards, [0.0] * a]
    discount = [[0.0] * a, [0.0] * a]
    p = prior or [1.0 / a] * a
    return TableModel(nxt, reward, discount, [0.0, 0.0], [p, [1.0 / a] * a])


class LinearModel:
    """A smooth deterministic latent model, row-wise independent: embedding [R, D]."""

    def __init__(self, dim: int = 6, actions: int = 4, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.w = torch.randn(actions, dim, dim, generator=g) / dim**0.5
        self.u = torch.randn(actions, dim, generator=g)
        self.v = torch.randn(dim, generator=g)
        self.actions = actions

    def _heads(self, x):
        return torch.softmax((x.unsqueeze(1) * self.u).sum(-1), -1), (x * self.v).sum(-1)

    def root(self, obs, state):
        return (state, *self._heads(state))

    def step(self, x, a):
        nxt = torch.tanh((self.w[a] * x.unsqueeze(1)).sum(-1))  # [R, D]
        reward = (x * self.u[a]).sum(-1) * 0.1
        return nxt, reward, torch.ones_like(reward), *self._heads(nxt)


# ------------------------------------------------------------------ tree arithmetic


def test_min_max_normalisation_on_known_numbers():
    tree = Tree.allocate(2, 3, 2, torch.device("cpu"))
    tree.q_min = torch.tensor([-1.0, 2.0])
    tree.q_max = torch.tensor([3.0, 2.0])  # root 1: max == min, values pass through
    q = torch.tensor([[-1.0, 0.0, 1.0, 3.0], [5.0, 2.0, -4.0, 0.5]])
    out = tree.normalise(q)
    assert torch.allclose(out[0], torch.tensor([0.0, 0.25, 0.5, 1.0]))
    assert torch.equal(out[1], q[1])
    assert torch.allclose(tree.normalise(torch.tensor([1.0, 2.0])), torch.tensor([0.5, 2.0]))


def test_backup_of_discounted_values_on_a_two_level_tree():
    """root -a0-> node 1 (r=1, d=1, v=2) -a1-> node 2 (r=0.5, d=0.8, v=3), gamma 0.9."""
    gamma = 0.9
    tree = Tree.allocate(1, 3, 2, torch.device("cpu"))
    one = torch.ones(1)
    prior = torch.full((1, 2), 0.5)
    zero = torch.zeros(1, dtype=torch.int64)
    tree.expand(1, zero, zero, one, one, prior, 2.0 * one)
    tree.backup(torch.tensor([[0, 1]]), 2.0 * one, gamma)
    assert tree.value_sum[0].tolist() == pytest.approx([2.8, 2.0, 0.0])  # 1 + 0.9 * 2
    tree.expand(2, zero + 1, zero + 1, 0.5 * one, 0.8 * one, prior, 3.0 * one)
    tree.backup(torch.tensor([[0, 1, 2]]), 3.0 * one, gamma)
    # node 2: 3; node 1: 2 + (0.5 + 0.9 * 0.8 * 3) = 4.66; root: 2.8 + (1 + 0.9 * 2.66) = 6.194
    assert tree.value_sum[0].tolist() == pytest.approx([6.194, 4.66, 3.0])
    assert tree.visits[0].tolist() == [2.0, 2.0, 1.0]
    # edge Qs seen: 2.8 (root, a0, first), 2.66 (node 1, a1), 1 + 0.9 * 4.66 / 2 = 3.097
    assert tree.q_min.item() == pytest.approx(2.66)
    assert tree.q_max.item() == pytest.approx(3.097)
    visits, q = tree.child_stats(torch.tensor([0]))
    assert visits[0].tolist() == [2.0, 0.0]
    assert q[0].tolist() == pytest.approx([3.097, 0.0])
    assert tree.depth[0].tolist() == [0, 1, 2]
    assert tree.node_value(torch.tensor([0])).item() == pytest.approx(3.097)


# ------------------------------------------------------------------ search


@pytest.mark.parametrize("rule", ["puct", "uct", "gumbel"])
@pytest.mark.parametrize("unvisited", ["zero", "parent", "inf"])
def test_search_finds_the_delayed_reward_and_concentrates_visits(rule, unvisited):
    model = trap_model()
    cfg = SearchConfig(simulations=40, rule=rule, discount=0.9, unvisited=unvisited)
    out = search(model, None, torch.tensor([0]), cfg)
    assert model.calls == 40  # one batched model call per simulation
    assert out.action.tolist() == [0]
    assert out.visits.sum().item() == 40
    assert out.q[0, 0].item() == pytest.approx(0.9, abs=0.15)  # -> gamma * 1 under a0, a0
    if rule == "uct" and unvisited != "inf":
        # UCB scores of visited children are >= 0 = the first-play value, so a1 is never tried
        assert out.visits[0].tolist() == [40.0, 0.0]
        return
    assert out.q[0, 1].item() == pytest.approx(0.5)  # the trap is worth its reward only
    if rule == "gumbel":  # m = 2: one halving phase, the budget split evenly
        assert out.visits[0].tolist() == [20.0, 20.0]
        assert out.policy[0, 0].item() > 0.99  # improved policy: softmax(logits + sigma(q))
    else:
        assert out.visits[0, 0] > 2 * out.visits[0, 1]


@pytest.mark.parametrize("rule", ["puct", "uct"])
def test_three_simulations_known_tree(rule):
    """Traced by hand (gamma 0.9), pUCT and UCT with unvisited first agree:
    sim 1: all unvisited -> a0: state 1 (r 0, v 0); Q(a0) = 0, root sum 0.
    sim 2: a1 has the larger bonus (pUCT) / is unvisited (UCT) -> state 2: Q(a1) = 0.5.
    sim 3: Q_norm = [0, 1] -> a1 again, then state 2's a0 -> the end (r 0, d 0, v 0):
    Q(a1) stays 0.5, root sum 0 + 0.5 + 0.5 = 1 over 3 visits.
    """
    unvisited = "inf" if rule == "uct" else "zero"
    cfg = SearchConfig(simulations=3, rule=rule, discount=0.9, unvisited=unvisited)
    out = search(trap_model(), None, torch.tensor([0]), cfg)
    assert out.visits[0].tolist() == [1.0, 2.0]
    assert out.q[0].tolist() == pytest.approx([0.0, 0.5])
    assert out.value.item() == pytest.approx(1 / 3)
    assert out.tree.q_min.item() == 0.0 and out.tree.q_max.item() == 0.5
    assert out.tree.parent[0].tolist() == [-1, 0, 0, 2]
    assert out.tree.action[0].tolist() == [-1, 0, 1, 0]
    assert out.tree.discount[0].tolist() == [1.0, 1.0, 1.0, 0.0]
    assert out.policy[0].tolist() == pytest.approx([1 / 3, 2 / 3])


@pytest.mark.parametrize("rewards,best", [([0.2, 0.8], 1), ([0.8, 0.2], 0)])
def test_equal_visits_go_to_the_higher_q_not_the_lower_index(rewards, best):
    cfg = SearchConfig(simulations=2, rule="uct", unvisited="inf")  # one visit per arm
    out = search(bandit_model(rewards), None, torch.tensor([0]), cfg)
    assert out.visits[0].tolist() == [1.0, 1.0]
    assert out.action.item() == best


def test_batched_search_equals_per_root_searches():
    model = LinearModel()
    roots = torch.randn(5, 6, generator=torch.Generator().manual_seed(1))
    for rule in ["puct", "uct", "gumbel"]:
        cfg = SearchConfig(simulations=16, rule=rule, max_considered=4, unvisited="inf")
        noise = torch.stack(
            [
                torch.from_numpy(np.random.default_rng(s).dirichlet([0.3] * 4)).float()
                for s in range(5)
            ]
        )
        g = torch.stack(
            [
                torch.from_numpy(np.random.default_rng(10 + s).gumbel(size=4)).float()
                for s in range(5)
            ]
        )
        batched = search(model, None, roots, cfg, dirichlet=noise, gumbel=g)
        for r in range(5):
            one = search(
                model, None, roots[r : r + 1], cfg, dirichlet=noise[r : r + 1], gumbel=g[r : r + 1]
            )
            assert torch.equal(one.visits[0], batched.visits[r]), (rule, r)
            assert torch.allclose(one.q[0], batched.q[r], atol=1e-6)
            assert one.action.item() == batched.action[r].item()
            assert torch.allclose(one.policy[0], batched.policy[r], atol=1e-6)


def test_dirichlet_noise_mixes_into_the_root_prior_only():
    model = trap_model()
    noise = torch.tensor([[1.0, 0.0]])
    cfg = SearchConfig(simulations=4, dirichlet_fraction=0.25)
    out = search(model, None, torch.tensor([0]), cfg, dirichlet=noise)
    assert out.tree.prior[0, 0].tolist() == pytest.approx([0.625, 0.375])
    assert out.tree.prior[0, 1].tolist() == pytest.approx([0.5, 0.5])


# ------------------------------------------------------------------ Gumbel MuZero


def test_halving_schedule_known_levels():
    # m = 4, n = 8: 2 phases; phase 1 gives each of 4 one visit, phase 2 the best 2 two more
    assert gz.halving_schedule(8, 4) == [0, 0, 0, 0, 1, 1, 2, 2]
    # m = 8, n = 16: 8 x level 0, 4 x level 1, then 2 actions x 2 levels
    assert gz.halving_schedule(16, 8) == [0] * 8 + [1] * 4 + [2, 2, 3, 3]
    assert gz.halving_schedule(5, 1) == [0, 1, 2, 3, 4]
    assert gz.halving_schedule(3, 4) == [0, 0, 0]


def test_completed_q_and_sigma_known_values():
    q = torch.tensor([[1.0, 0.0, 3.0]])
    visits = torch.tensor([[1.0, 0.0, 3.0]])
    prior = torch.tensor([[0.5, 0.25, 0.25]])
    # v_mix = (v + N * sum pi q / sum pi) / (1 + N) = (2 + 4 * (0.5 + 0.75) / 0.75) / 5
    cq = gz.completed_q(q, visits, prior, torch.tensor([2.0]))
    assert cq[0].tolist() == pytest.approx([1.0, (2 + 4 * 1.25 / 0.75) / 5, 3.0])
    assert gz.sigma(torch.tensor([[0.5, 1.0]]), torch.tensor([[2.0, 3.0]]), 50, 1.0)[
        0
    ].tolist() == [
        26.5,
        53.0,
    ]


@pytest.mark.parametrize("seed", range(8))
def test_gumbel_sequential_halving_picks_the_best_arm_with_few_simulations(seed):
    rewards = [0.1, 0.5, 0.2, 0.7, 0.0, 0.3, 0.6, 0.4]  # arm 3 is best
    prior = [0.3, 0.2, 0.2, 0.02, 0.1, 0.06, 0.06, 0.06]  # and the prior dislikes it
    g = torch.from_numpy(np.random.default_rng(seed).gumbel(size=8)).float()[None]
    cfg = SearchConfig(simulations=16, rule="gumbel", max_considered=8, discount=1.0)
    out = search(bandit_model(rewards, prior), None, torch.tensor([0]), cfg, gumbel=g)
    assert out.action.item() == 3
    assert out.visits[0].tolist()[3] == 4  # survived both halvings: 1 + 1 + 2 visits
    assert out.visits.sum().item() == 16
    assert out.policy[0].argmax().item() == 3


def test_puct_with_the_same_small_budget_can_miss_the_arm_gumbel_finds():
    """The contrast that motivates Gumbel: pUCT (zero for unvisited) follows the prior."""
    rewards = [0.1, 0.5, 0.2, 0.7, 0.0, 0.3, 0.6, 0.4]
    prior = [0.3, 0.2, 0.2, 0.02, 0.1, 0.06, 0.06, 0.06]
    cfg = SearchConfig(simulations=4, discount=1.0)
    out = search(bandit_model(rewards, prior), None, torch.tensor([0]), cfg)
    assert out.visits[0, 3].item() == 0


# ------------------------------------------------------------------ world-model planning


class ToyWorldModel(WorldModel):
    """A deterministic latent model: h' = tanh(h W_a); action 1 pays 1 and ends the dream."""

    def __init__(self, dim: int = 4, actions: int = 3):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w = torch.randn(actions, dim, dim, generator=g) / dim**0.5
        self.feature_dim = dim

    def loss(self, batch):
        raise NotImplementedError

    def initial(self, batch_size):
        return {"h": torch.zeros(batch_size, self.feature_dim)}

    def observe_step(self, state, prev_action, obs, is_first):
        raise NotImplementedError

    def imagine_step(self, state, action):
        w = torch.einsum("na,aij->nij", action, self.w)  # [N, D, D]
        h = torch.tanh(torch.einsum("ni,nij->nj", state["h"], w))
        reward = action[:, 1]  # 1 for action 1
        cont = 1.0 - action[:, 1]  # action 1 ends the episode
        return {"h": h}, reward, cont

    def features(self, state):
        return state["h"]


def _search_cfg(**overrides):
    node = OmegaConf.load("configs/agent/mcts.yaml")
    for k, v in overrides.items():
        OmegaConf.update(node, k, v)
    return node


@pytest.mark.parametrize("rule,unvisited", [("puct", "inf"), ("gumbel", "zero")])
def test_world_model_planner_finds_the_paying_action_against_the_prior(rule, unvisited):
    """The prior (softmax [4, 0, 2]) dislikes action 1, the only one that pays. pUCT with
    zero for unvisited children would never try it in 16 simulations; trying every child
    once (inf) or Gumbel's halving over all 3 actions finds it."""
    wm = ToyWorldModel()
    actor = lambda f: torch.tensor([4.0, 0.0, 2.0]).expand(f.shape[0], 3)  # noqa: E731
    critic = lambda f: torch.zeros(f.shape[0], 1)  # noqa: E731
    cfg = _search_cfg(simulations=16, discount=0.9, rule=rule, unvisited=unvisited)
    planner = MCTSPlanner(cfg, 3, seed=0)
    latent = {"h": torch.randn(5, 4, generator=torch.Generator().manual_seed(3))}
    actions, out = planner.plan(wm, actor, critic, latent, explore=False)
    assert actions.tolist() == [1] * 5
    assert out.q[:, 1].tolist() == pytest.approx([1.0] * 5)
    # node 1 holds imagine_step(root latent, its action), read back by node index
    first = out.tree.action[:, 1]
    expected = wm.imagine_step(latent, torch.nn.functional.one_hot(first, 3).float())[0]["h"]
    stored = out.embeddings.read(torch.ones(5, dtype=torch.int64))["h"]
    assert torch.equal(stored, expected)
    model = WorldModelModel(wm, actor, critic, 3)
    assert torch.allclose(model.step(latent, first)[0]["h"], expected)


def test_world_model_planner_gumbel_and_noise_shapes():
    wm = ToyWorldModel()
    actor = torch.nn.Linear(4, 3)
    critic = torch.nn.Linear(4, 1)
    planner = MCTSPlanner(_search_cfg(simulations=8, rule="gumbel"), 3, seed=1)
    latent = {"h": torch.randn(2, 4)}
    actions, out = planner.plan(wm, actor, critic, latent, explore=True)
    assert actions.shape == (2,) and actions.dtype == torch.int64
    assert out.policy.sum(-1).tolist() == pytest.approx([1.0, 1.0])
    assert out.visits.sum(-1).tolist() == [8.0, 8.0]


# ------------------------------------------------------------------ config and agent


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="agent.rule"):
        search_config(_search_cfg(rule="ucb"))
    with pytest.raises(ConfigError, match="agent.dirichlet.fraction"):
        search_config(_search_cfg(**{"dirichlet.fraction": 1.5}))
    with pytest.raises(ConfigError, match="agent.simulations"):
        search_config(_search_cfg(simulations=0))
    cfg = search_config(_search_cfg())
    assert (cfg.c1, cfg.c2, cfg.rule, cfg.simulations) == (1.25, 19652.0, "puct", 50)


def _cartpole_cfg(**agent):
    return OmegaConf.create(
        {
            "seed": 0,
            "env": {"family": "classic", "id": "CartPole-v1", "name": "cartpole"},
            "agent": _search_cfg(**agent),
        }
    )


def test_agent_needs_discrete_actions_and_a_bound_env():
    import gymnasium as gym

    cfg = _cartpole_cfg()
    obs_space = gym.spaces.Dict({"vector": gym.spaces.Box(-1, 1, (3,))})
    with pytest.raises(ConfigError, match="Discrete"):
        MCTSAgent(cfg, obs_space, gym.spaces.Box(-1, 1, (2,)), torch.device("cpu"))
    agent = MCTSAgent(cfg, obs_space, gym.spaces.Discrete(2), torch.device("cpu"))
    assert agent.learns is False
    with pytest.raises(RuntimeError, match="bind_env"):
        agent.act({"vector": np.zeros((1, 3)), "is_first": np.ones(1, bool)}, None)


def test_simulator_model_steps_like_the_real_env_and_ends_with_discount_zero():
    env = make_env({"family": "classic", "id": "CartPole-v1", "name": "cartpole"}, seed=0)
    plan = make_env({"family": "classic", "id": "CartPole-v1", "name": "cartpole"}, seed=5)
    snap = get_state(env)
    model = SimulatorModel([plan], 2, [np.random.default_rng(0)], rollouts=0)
    emb, prior, value = model.root(None, [snap])
    assert prior.tolist() == [[0.5, 0.5]] and value.tolist() == [0.0]
    rewards, discounts = [], []
    for _ in range(60):  # always push right: the pole falls within 60 steps
        emb, reward, discount, _, _ = model.step(emb, torch.tensor([1]))
        rewards.append(reward.item()), discounts.append(discount.item())
    real_steps = 0
    while True:
        real_steps += 1
        _, _, terminated, truncated, _ = env.step(1)
        if terminated or truncated:
            break
    assert discounts.index(0.0) == real_steps - 1  # the terminating edge has discount 0
    assert rewards[:real_steps] == [1.0] * real_steps
    assert rewards[real_steps:] == [0.0] * (60 - real_steps)  # nothing after the end
    assert emb[0].done


def test_simulator_batched_search_equals_per_root_searches():
    cfg_env = {"family": "classic", "id": "CartPole-v1", "name": "cartpole"}
    real = [make_env(cfg_env, seed=s) for s in (1, 2)]
    snaps = [get_state(e) for e in real]
    cfg = SearchConfig(simulations=12)

    def run(roots):
        envs = [make_env(cfg_env, seed=9) for _ in roots]
        rngs = [np.random.default_rng(100 + r) for r in roots]
        model = SimulatorModel(envs, 2, rngs, rollouts=2, rollout_depth=10)
        return search(model, None, [snaps[r] for r in roots], cfg)

    both = run([0, 1])
    for r in (0, 1):
        one = run([r])
        assert torch.equal(one.visits[0], both.visits[r])
        assert torch.allclose(one.q[0], both.q[r])


CARTPOLE_STEPS = 200


def test_mcts_keeps_cartpole_up():
    """pUCT, 32 simulations, one random rollout of 50 steps per leaf (docs/mcts.md: 500 steps)."""
    cfg = _cartpole_cfg(simulations=32)
    venv = make_vector_env(cfg.env, 1, seed=0)
    agent = MCTSAgent(cfg, venv.single_observation_space, venv.single_action_space, "cpu")
    agent.bind_env(venv)
    obs, _ = venv.reset(seed=0)
    is_first = np.ones(1, bool)
    for _ in range(CARTPOLE_STEPS):
        actions, _ = agent.act({**obs, "is_first": is_first}, None, explore=True)
        obs, reward, terminated, truncated, _ = venv.step(actions)
        assert not terminated.any() and not truncated.any()
        is_first[:] = False
    assert agent.env_steps > CARTPOLE_STEPS * 32  # every simulation stepped the simulator
    assert agent.last_result.visits.sum().item() == 32


# ---------------------------------------------------------------- learned leaf value


def test_value_returns_known_numbers_with_and_without_a_bootstrap():
    assert ValueLearner.returns([1.0, 1.0, 1.0], 0.5) == [1.75, 1.5, 1.0]
    assert ValueLearner.returns([1.0, 1.0, 1.0], 0.5, tail=4.0) == [2.25, 2.5, 3.0]


def test_value_learner_overfits_one_episode():
    learner = ValueLearner(2, 2, num_envs=1, discount=0.9, policy=True, updates=1500, lr=3e-3)
    obs = np.linspace(-1, 1, 20, dtype=np.float32)[:, None] * np.array([1.0, -0.5], np.float32)
    actions = (obs[:, 0] > 0).astype(int)  # push right when x > 0: linearly separable
    for o, a in zip(obs, actions):
        learner.record(0, o, a, 1.0)
    targets = learner.finish(0, None)
    assert learner.episodes == 1 and learner.size == 20
    expected = ValueLearner.returns([1.0] * 20, 0.9)
    assert np.allclose(targets.numpy(), expected)
    assert np.abs(learner.predict(obs) - np.array(expected)).max() < 0.3  # returns 1.0 .. 8.8
    rng = np.random.default_rng(0)
    picks = [learner.rollout_action(obs[j], rng) for j in (0, 1, 18, 19) for _ in range(20)]
    assert picks == [0] * 40 + [1] * 40  # the rollout policy learned the separable rule


def _value_agent(**agent):
    cfg = _cartpole_cfg(**{"value.learn": True, "value.updates": 5, **agent})
    venv = make_vector_env(cfg.env, 1, seed=0)
    mcts = MCTSAgent(cfg, venv.single_observation_space, venv.single_action_space, "cpu")
    return mcts, venv


def test_agent_feeds_terminated_and_truncated_episodes_to_its_value():
    agent, _ = _value_agent(discount=0.5)
    no, yes = np.zeros(1, bool), np.ones(1, bool)
    agent._pending_action = np.ones(1, np.int64)
    for t in range(3):  # three steps, the third terminates
        agent._pending_obs = np.full((1, 4), t, np.float32)
        agent.observe(np.ones(1), yes if t == 2 else no, no, yes)
    assert agent.value.episodes == 1 and agent.value.size == 3
    stored = agent.value.target[:3] * agent.value.scale
    assert torch.allclose(stored, torch.tensor([1.75, 1.5, 1.0]))
    assert agent.value.obs[:3, 0].tolist() == [0.0, 1.0, 2.0]
    assert agent.value.action[:3].tolist() == [1, 1, 1]
    for t in range(2):  # two steps, then a time limit: fitted only once the final obs is seen
        agent._pending_obs = np.full((1, 4), 10 + t, np.float32)
        agent.observe(np.ones(1), no, yes if t == 1 else no, yes)
    assert agent.value.episodes == 1
    final = np.full((1, 4), 7.0, np.float32)
    tail = float(agent.value.predict(final)[0])
    agent._pending_obs = final
    agent.observe(np.zeros(1), no, no, no)  # the autoreset step
    assert agent.value.episodes == 2 and agent.value.size == 5
    stored = agent.value.target[3:5] * agent.value.scale
    assert torch.allclose(stored, torch.tensor([1.5 + 0.25 * tail, 1.0 + 0.5 * tail]), atol=1e-5)


def test_simulator_leaf_mixes_rollouts_and_the_learned_value():
    cfg_env = {"family": "classic", "id": "CartPole-v1", "name": "cartpole"}
    snap = get_state(make_env(cfg_env, seed=3))

    def value_fn(obs):  # a known function of the child's observation
        return 100.0 + 10.0 * obs[:, 0]

    def leaf(mix, rollouts):
        model = SimulatorModel(
            [make_env(cfg_env, seed=9)],
            2,
            [np.random.default_rng(4)],
            rollouts=rollouts,
            rollout_depth=30,
            value_fn=value_fn,
            value_mix=mix,
        )
        emb, _, _ = model.root({"vector": np.zeros((1, 4), np.float32)}, [snap])
        child, _, _, _, value = model.step(emb, torch.tensor([1]))
        return child[0].obs, value.item()

    obs, pure = leaf(1.0, rollouts=0)
    assert pure == pytest.approx(100.0 + 10.0 * obs[0])
    _, rollout = leaf(0.0, rollouts=2)
    _, mixed = leaf(0.25, rollouts=2)
    assert 0 < rollout <= 30
    assert mixed == pytest.approx(0.75 * rollout + 0.25 * pure, rel=1e-5)


def test_value_agent_checkpoint_round_trip(tmp_path):
    agent, _ = _value_agent(**{"rollout.policy": "learned"})
    yes, no = np.ones(1, bool), np.zeros(1, bool)
    for t in range(6):
        agent._pending_action = np.array([t % 2])
        agent._pending_obs = np.random.default_rng(t).normal(size=(1, 4)).astype(np.float32)
        agent.observe(np.ones(1), yes if t == 3 else no, no, yes)  # one episode + 2 pending
    torch.save(agent.state_dict(), tmp_path / "a.pt")
    other, _ = _value_agent(**{"rollout.policy": "learned"})
    other.load_state_dict(torch.load(tmp_path / "a.pt", weights_only=True))
    probe = np.random.default_rng(9).normal(size=(5, 4)).astype(np.float32)
    assert np.array_equal(other.value.predict(probe), agent.value.predict(probe))
    assert other.value.size == 4 and other.value._rew == agent.value._rew
    assert other.value._act == agent.value._act == [[0, 1]]
    assert np.array_equal(other.value._w, agent.value._w)
    # both continue identically: the pending episode finishes and fits the same way
    for a in (agent, other):
        a._pending_obs, a._pending_action = np.ones((1, 4), np.float32), np.zeros(1, np.int64)
        a.observe(np.ones(1), yes, no, yes)
    assert np.array_equal(other.value.predict(probe), agent.value.predict(probe))


def test_learned_value_needs_vector_observations():
    import gymnasium as gym

    cfg = _cartpole_cfg(**{"value.learn": True})
    image = gym.spaces.Dict({"image": gym.spaces.Box(0, 255, (64, 64, 3), np.uint8)})
    with pytest.raises(ConfigError, match="agent.value.learn"):
        MCTSAgent(cfg, image, gym.spaces.Discrete(2), torch.device("cpu"))
    cfg = _cartpole_cfg(**{"rollout.policy": "learned"})
    with pytest.raises(ConfigError, match="agent.rollout.policy"):
        MCTSAgent(cfg, image, gym.spaces.Discrete(2), torch.device("cpu"))
    with pytest.raises(ConfigError, match="agent.rollout.policy"):
        _value_agent(**{"rollout.policy": "greedy"})
    with pytest.raises(ConfigError, match="agent.value.mix"):
        _value_agent(**{"value.mix": 1.5})


def test_trainer_run_with_a_learned_rollout_policy_resumes_identically(tmp_path):
    """agent=mcts agent.rollout.policy=learned through the Trainer: the policy fits on the
    finished training episodes, and a run split by a checkpoint ends where the whole run does."""
    from agents.checkpoint import checkpoint_path, load_checkpoint
    from agents.trainer import Trainer
    from tests.test_trainer import make_cfg

    def cfg(run_dir, total):
        return make_cfg(
            run_dir,
            [
                "agent=mcts",
                "env=cartpole",
                "agent.simulations=4",
                "agent.rollout.depth=10",
                "agent.rollout.policy=learned",
                "agent.value.updates=20",
                f"trainer.total_steps={total}",
                "trainer.eval_every=0",
                "trainer.eval_episodes=1",
                "trainer.checkpoint_every=60",
                "trainer.log_every=60",
                "trainer.stop_when_solved=false",
            ],
        )

    full, split = tmp_path / "full", tmp_path / "split"
    full.mkdir(), split.mkdir()
    Trainer(cfg(full, 240), full).run()
    Trainer(cfg(split, 120), split).run()
    Trainer(cfg(split, 240), split, resume=True).run()
    a = load_checkpoint(checkpoint_path(full))["agent"]
    b = load_checkpoint(checkpoint_path(split))["agent"]
    assert a["value"]["episodes"] >= 2  # several short episodes finished and were fitted
    assert a["value"]["obs"].shape[0] == sum(1 for _ in a["value"]["action"])
    for key in ("obs", "action", "target"):
        assert torch.equal(a["value"][key], b["value"][key]), key
    for key in ("weight", "bias"):
        assert torch.equal(a["value"]["policy"][key], b["value"]["policy"][key]), key
    assert a["rng"] == b["rng"]


def test_evaluating_leaves_the_agents_own_rng_where_it_was():
    from agents.evaluate import evaluate

    agent, venv = _value_agent(simulations=2, **{"rollout.depth": 5})
    agent.bind_env(venv)
    before = agent.rng_state()
    result = evaluate(agent, agent.env_cfg, episodes=1, seed=3)
    assert result["returns"][0] > 0
    assert agent.rng_state() == before
