"""The imagination actor-critic: λ-returns, return normaliser, critic, actor, imagination."""

from __future__ import annotations

import copy
from pathlib import Path

import gymnasium as gym
import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from agents.actor_critic import ActorCritic, Moments, lambda_return, replay_return
from agents.config import ConfigError
from world_models.base import State, WorldModel
from world_models.distributions import sample_onehot

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
DISCRETE = gym.spaces.Discrete(3)
BOX = gym.spaces.Box(-1.0, 1.0, (2,))


def agent_cfg(**overrides):
    cfg = OmegaConf.load(CONFIGS / "agent" / "dreamer.yaml")
    small = {"actor.units": 32, "actor.layers": 1, "critic.units": 32, "critic.layers": 1}
    for key, value in {**small, **overrides}.items():
        OmegaConf.update(cfg, key, value)
    return cfg


class ToyModel(WorldModel):
    """A tiny differentiable world model: x' = tanh(W [x, a]); reward = a_0 + u.x'.

    With ``rewarded_only`` the reward is exactly ``action[..., 0]`` (discrete: 1 for action 0,
    else 0) and episodes never end, so the best policy always picks action 0.
    """

    def __init__(self, feat: int = 5, action_dim: int = 3, rewarded_only: bool = False):
        super().__init__()
        self.feature_dim = feat
        self.dyn = nn.Linear(feat + action_dim, feat)
        self.rew = nn.Linear(feat, 1)
        self.con = nn.Linear(feat, 1)
        self.rewarded_only = rewarded_only

    def loss(self, batch):
        raise NotImplementedError

    def initial(self, batch_size: int) -> State:
        return {"x": torch.zeros(batch_size, self.feature_dim)}

    def observe_step(self, state, prev_action, obs, is_first):
        return state

    def imagine_step(self, state, action):
        x = torch.tanh(self.dyn(torch.cat([state["x"], action], -1)))  # [N, F]
        if self.rewarded_only:
            return {"x": x}, action[..., 0], torch.ones_like(action[..., 0])
        reward = action[..., 0] + self.rew(x).squeeze(-1)  # [N]
        return {"x": x}, reward, torch.sigmoid(self.con(x).squeeze(-1) + 2.0)

    def features(self, state):
        return state["x"]


# ---------------------------------------------------------------- λ-returns
def test_lambda_return_hand_computed_with_termination():
    # states s0..s3; s2 is terminal (c2 = 0): nothing after it flows back to s0, s1
    reward = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    cont = torch.tensor([[1.0, 1.0, 0.0, 1.0]])
    value = torch.tensor([[10.0, 20.0, 30.0, 40.0]])
    # R3 = v3 = 40; R2 = 3 + .9 (.5*40 + .5*40) = 39; R1 = 2 + 0 = 2; R0 = 1 + .9 (.5*20 + .5*2)
    ret = lambda_return(reward, cont, value, lam=0.5, gamma=0.9)
    torch.testing.assert_close(ret, torch.tensor([[10.9, 2.0, 39.0]]))
    # λ = 0: one-step TD targets r + γ c v'
    ret = lambda_return(reward, cont, value, lam=0.0, gamma=0.9)
    torch.testing.assert_close(ret, torch.tensor([[19.0, 2.0, 39.0]]))
    # λ = 1: discounted Monte-Carlo return bootstrapped from v_H
    ret = lambda_return(reward, cont, value, lam=1.0, gamma=0.9)
    torch.testing.assert_close(ret, torch.tensor([[1.0 + 0.9 * 2.0, 2.0, 39.0]]))


def test_lambda_return_is_pure_and_batched():
    g = torch.Generator().manual_seed(1)
    reward, cont, value = (torch.rand(4, 6, generator=g) for _ in range(3))
    args = [t.clone() for t in (reward, cont, value)]
    ret = lambda_return(reward, cont, value, 0.95, 0.997)
    assert ret.shape == (4, 5)
    for a, b in zip(args, (reward, cont, value)):
        assert torch.equal(a, b)  # inputs untouched
    row = lambda_return(reward[2:3], cont[2:3], value[2:3], 0.95, 0.997)
    torch.testing.assert_close(ret[2:3], row)


def test_replay_return_hand_computed():
    # rows 0..3 of one sequence, imagined returns boot_t from each row; gamma .9, lambda .5
    reward = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    boot = torch.tensor([[10.0, 20.0, 30.0, 40.0]])
    no = torch.zeros(1, 4, dtype=torch.bool)
    row2 = torch.tensor([[False, False, True, False]])
    # R3 = 40; R2 = 3 + .9 (.5*40 + .5*40) = 39; R1 = 2 + .9 (.5*30 + .5*39); R0 = 1 + .9 (...)
    ret = replay_return(reward, no, no, boot, lam=0.5, gamma=0.9)
    torch.testing.assert_close(ret, torch.tensor([[24.8725, 33.05, 39.0]]))
    # row 2 terminal: nothing flows back across it; R1 = r2 = 2, R0 = 1 + .9 (.5*20 + .5*2)
    ret = replay_return(reward, row2, row2, boot, lam=0.5, gamma=0.9)
    torch.testing.assert_close(ret[:, :2], torch.tensor([[10.9, 2.0]]))
    # row 2 truncated (last, not terminal): bootstrap fully from boot_2: R1 = 2 + .9 * 30
    ret = replay_return(reward, row2, no, boot, lam=0.5, gamma=0.9)
    torch.testing.assert_close(ret[:, :2], torch.tensor([[1.0 + 0.9 * (10.0 + 14.5), 29.0]]))


def test_replay_value_loss_trains_the_critic_only_when_enabled():
    model = ToyModel(5, 3)
    start = {"x": torch.randn(2, 6, 5)}
    terminal = torch.zeros(2, 6, dtype=torch.bool)
    replay = {"reward": torch.ones(2, 6), "is_last": terminal.clone(), "is_terminal": terminal}
    replay["is_last"][0, 2] = True
    grads = {}
    for repval in (0.0, 0.3):
        torch.manual_seed(0)
        ac = ActorCritic(agent_cfg(imag_horizon=3, imag_last=4, repval=repval), 5, DISCRETE)
        metrics = ac.update(model, start, terminal, replay)
        assert ("repval_loss" in metrics) == (repval > 0)
        grads[repval] = ac.critic.out.weight.grad.clone()
    assert torch.isfinite(metrics["repval_loss"]) and metrics["repval_loss"] > 0
    assert not torch.equal(grads[0.0], grads[0.3])


# ---------------------------------------------------------------- return normaliser
def test_moments_percentile_ema():
    m = Moments(decay=0.99, limit=1.0, perc_low=5.0, perc_high=95.0)
    x = torch.arange(101, dtype=torch.float32)  # P5 = 5, P95 = 95
    m.update(x)
    torch.testing.assert_close(m.low, torch.tensor(0.05))
    torch.testing.assert_close(m.high, torch.tensor(0.95))
    torch.testing.assert_close(m.scale(), torch.tensor(1.0))  # range 0.9 < limit 1
    m.update(x)
    torch.testing.assert_close(m.low, torch.tensor(0.99 * 0.05 + 0.05))
    torch.testing.assert_close(m.high, torch.tensor(0.99 * 0.95 + 0.95))
    torch.testing.assert_close(m.scale(), torch.tensor(1.8905 - 0.0995))
    assert set(m.state_dict()) == {"low", "high"}


# ---------------------------------------------------------------- critic
def test_critic_twohot_shapes_and_zero_init():
    ac = ActorCritic(agent_cfg(), 5, DISCRETE)
    feat = torch.randn(7, 4, 5)  # [N, H, F]
    logits = ac.critic(feat)
    assert logits.shape == (7, 4, 255)
    assert torch.equal(ac.value(feat), torch.zeros(7, 4))  # zero-initialised head decodes to 0
    assert torch.equal(ac.value(feat, slow=True), torch.zeros(7, 4))
    target = torch.randn(7, 4) * 10
    loss = ac.twohot.loss(logits, target)
    assert loss.shape == (7, 4)
    torch.testing.assert_close(loss, torch.full((7, 4), torch.log(torch.tensor(255.0)).item()))
    assert not any(p.requires_grad for p in ac.slow_critic.parameters())


def test_slow_critic_ema():
    ac = ActorCritic(agent_cfg(critic_ema=0.98), 5, DISCRETE)
    with torch.no_grad():
        for p in ac.critic.parameters():
            p.fill_(1.0)
        for p in ac.slow_critic.parameters():
            p.fill_(0.0)
    ac.update_slow_critic()
    for p in ac.slow_critic.parameters():
        torch.testing.assert_close(p, torch.full_like(p, 0.02))


# ---------------------------------------------------------------- actor distributions
def test_discrete_actor_matches_torch_distributions():
    ac = ActorCritic(agent_cfg(**{"actor.outscale": 1.0}), 5, DISCRETE)
    feat = torch.randn(64, 5)
    params = ac.policy(feat)
    probs = 0.99 * torch.softmax(ac.actor(feat), -1) + 0.01 / 3  # 1% unimix
    dist = torch.distributions.Categorical(probs=probs)
    action = ac.sample(params)  # [N, A] one-hot
    assert action.shape == (64, 3)
    torch.testing.assert_close(action.detach().sum(-1), torch.ones(64))
    index = action.argmax(-1)
    torch.testing.assert_close(ac.log_prob(params, action.detach()), dist.log_prob(index))
    torch.testing.assert_close(ac.entropy(params), dist.entropy())
    mode = ac.act(feat, explore=False)
    assert torch.equal(mode.argmax(-1), probs.argmax(-1))


def test_continuous_actor_matches_torch_distributions():
    ac = ActorCritic(agent_cfg(**{"actor.outscale": 1.0}), 5, BOX)
    feat = torch.randn(64, 5) * 3
    mean, std = ac.policy(feat)
    assert mean.shape == std.shape == (64, 2)
    assert (mean.abs() < 1).all() and (std > 0.1).all() and (std < 1.0).all()
    dist = torch.distributions.Independent(torch.distributions.Normal(mean, std), 1)
    action = ac.sample((mean, std))
    torch.testing.assert_close(ac.log_prob((mean, std), action), dist.log_prob(action))
    torch.testing.assert_close(ac.entropy((mean, std)), dist.entropy())
    env_action = ac.act(feat)
    assert env_action.shape == (64, 2) and env_action.abs().max() <= 1.0
    assert torch.equal(ac.act(feat, explore=False), mean)


# ---------------------------------------------------------------- imagination and update
@pytest.mark.parametrize("space", [DISCRETE, BOX], ids=["discrete", "continuous"])
def test_imagine_shapes(space):
    ac = ActorCritic(agent_cfg(), 5, space)
    model = ToyModel(5, 3 if space is DISCRETE else 2)
    start = {"x": torch.randn(2 * 6, 5)}  # N = B*T = 12
    with torch.no_grad():
        traj = ac.imagine(model, start, horizon=4)
    a = 3 if space is DISCRETE else 2
    assert traj["feat"].shape == (12, 5, 5)
    assert traj["action"].shape == (12, 4, a)
    assert traj["reward"].shape == traj["cont"].shape == (12, 5)
    if space is DISCRETE:
        assert torch.equal(traj["action"].sum(-1), torch.ones(12, 4))
    else:
        assert traj["action"].abs().max() <= 1.0


def test_imag_last_selects_starts():
    ac = ActorCritic(agent_cfg(imag_last=2), 5, DISCRETE)
    start = {"x": torch.arange(3 * 4, dtype=torch.float32).reshape(3, 4, 1).expand(3, 4, 5)}
    flat, term = ac._starts(start, torch.zeros(3, 4, dtype=torch.bool))
    assert flat["x"].shape == (6, 5) and term.shape == (6,)
    assert flat["x"][:, 0].tolist() == [2, 3, 6, 7, 10, 11]


@pytest.mark.parametrize(
    "space,grad",
    [(DISCRETE, "reinforce"), (DISCRETE, "dynamics"), (BOX, "reinforce"), (BOX, "dynamics")],
)
def test_update_leaves_world_model_without_gradients(space, grad):
    ac = ActorCritic(agent_cfg(actor_grad=grad, imag_horizon=5), 5, space)
    model = ToyModel(5, 3 if space is DISCRETE else 2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    actor_before = [p.clone() for p in ac.actor.parameters()]
    start = {"x": torch.randn(2, 3, 5)}  # [B, T, F]
    is_terminal = torch.tensor([[False, False, True], [False, False, False]])
    metrics = ac.update(model, start, is_terminal)
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(isinstance(v, torch.Tensor) and v.dim() == 0 for v in metrics.values())
    assert all(torch.isfinite(v) for v in metrics.values())
    assert any(not torch.equal(a, b) for a, b in zip(actor_before, ac.actor.parameters()))
    assert all(p.grad is None for p in ac.slow_critic.parameters())


def test_terminal_start_gets_zero_weight():
    # a start that is terminal contributes nothing: its imagined trajectory has weight 0
    ac = ActorCritic(agent_cfg(imag_horizon=3, entropy=0.0), 5, DISCRETE)
    model = ToyModel(5, 3)
    start = {"x": torch.randn(1, 1, 5)}
    ac.update(model, start, torch.ones(1, 1, dtype=torch.bool))
    assert all(p.grad is None or not p.grad.any() for p in ac.actor.parameters())
    assert all(p.grad is None or not p.grad.any() for p in ac.critic.parameters())


def test_learns_rewarded_action_in_toy_model():
    """Action 0 always pays 1: the policy and the imagined return go up (fixed seed)."""
    torch.manual_seed(0)
    cfg = agent_cfg(
        imag_horizon=5, gamma=0.9, **{"actor.lr": 3e-3, "critic.lr": 3e-3, "actor.outscale": 1.0}
    )
    ac = ActorCritic(cfg, 5, DISCRETE)
    model = ToyModel(5, 3, rewarded_only=True)
    start = {"x": torch.randn(4, 8, 5)}
    terminal = torch.zeros(4, 8, dtype=torch.bool)
    with torch.no_grad():
        p0 = ac.policy(start["x"])[0].exp()[..., 0].mean()
    first = ac.update(model, start, terminal)
    for _ in range(100):
        last = ac.update(model, start, terminal)
    with torch.no_grad():
        p1 = ac.policy(start["x"])[0].exp()[..., 0].mean()
    assert p0 < 0.5 and p1 > 0.9
    assert first["imag_reward"] < 0.5 and last["imag_reward"] > 0.9
    assert last["imag_return"] > first["imag_return"] + 2.0
    assert last["imag_value"] > 1.0  # the critic follows (it starts at exactly 0)


# ---------------------------------------------------------------- config and checkpoints
def test_auto_actor_grad_is_reinforce_for_discrete_and_dynamics_for_continuous():
    assert ActorCritic(agent_cfg(actor_grad="auto"), 5, DISCRETE).actor_grad == "reinforce"
    assert ActorCritic(agent_cfg(actor_grad="auto"), 5, BOX).actor_grad == "dynamics"
    assert ActorCritic(agent_cfg(actor_grad="reinforce"), 5, BOX).actor_grad == "reinforce"
    # a world model that dreams without gradients (IRIS): auto falls back, dynamics is an error
    auto = agent_cfg(actor_grad="auto")
    assert ActorCritic(auto, 5, BOX, differentiable=False).actor_grad == "reinforce"
    with pytest.raises(ConfigError, match="agent.actor_grad=dynamics.*preset=iris_cpu"):
        ActorCritic(agent_cfg(actor_grad="dynamics"), 5, BOX, differentiable=False)


def test_cpu_default_backpropagates_discrete_actions_and_presets_keep_the_papers_choice():
    """The CPU base config uses dynamics (CartPole, docs/benchmarks.md); size and IRIS
    presets set auto, so they learn with REINFORCE for discrete actions as the papers do."""
    assert ActorCritic(agent_cfg(), 5, DISCRETE).actor_grad == "dynamics"
    for preset in (
        "dreamer_xs",
        "dreamer_s",
        "dreamer_m",
        "dreamer_l",
        "iris_cpu",
        "iris_atari100k",
    ):
        preset_cfg = OmegaConf.load(CONFIGS / "preset" / f"{preset}.yaml")
        assert preset_cfg.agent.actor_grad == "auto", preset


def test_actor_sampler_picks_the_method_of_its_action_draws():
    """agent.actor.sampler: exploring actions are sample_onehot by that method."""
    feat = torch.randn(64, 5)
    acts = {}
    for method in ("icdf", "gumbel"):
        torch.manual_seed(0)
        ac = ActorCritic(agent_cfg(**{"actor.sampler": method}), 5, DISCRETE)
        with torch.no_grad():
            params = ac.policy(feat)
            torch.manual_seed(4)
            acts[method] = ac.sample(params)
            torch.manual_seed(4)
            expected = sample_onehot(params[0], straight_through=False, method=method)
        assert torch.equal(acts[method], expected), method
    assert not torch.equal(acts["icdf"], acts["gumbel"])


def test_bad_config_values_name_the_key():
    with pytest.raises(ConfigError, match="agent.actor_grad"):
        ActorCritic(agent_cfg(actor_grad="backprop"), 5, DISCRETE)
    with pytest.raises(ConfigError, match="agent.gamma"):
        ActorCritic(agent_cfg(gamma=1.5), 5, DISCRETE)
    with pytest.raises(ConfigError, match="agent.actor.sampler"):
        ActorCritic(agent_cfg(**{"actor.sampler": "multinomial"}), 5, DISCRETE)
    with pytest.raises(ConfigError, match="agent.return_norm.perc_high"):
        ActorCritic(agent_cfg(**{"return_norm.perc_high": 2.0}), 5, DISCRETE)
    with pytest.raises(ValueError, match="action spaces"):
        ActorCritic(agent_cfg(), 5, gym.spaces.MultiBinary(3))


def test_learner_state_round_trip(tmp_path):
    ac = ActorCritic(agent_cfg(), 5, DISCRETE)
    model = ToyModel(5, 3)
    ac.update(model, {"x": torch.randn(2, 3, 5)}, torch.zeros(2, 3, dtype=torch.bool))
    torch.save(ac.learner_state_dict(), tmp_path / "ac.pt")
    other = ActorCritic(agent_cfg(), 5, DISCRETE)
    other.load_learner_state_dict(torch.load(tmp_path / "ac.pt", weights_only=True))
    for (k, a), b in zip(ac.state_dict().items(), other.state_dict().values()):
        assert torch.equal(a, b), k
    assert other.moments.high != 0
    assert other.actor_opt.state_dict()["state"][0]["step"] == 1


def test_loading_optimiser_state_keeps_the_optimisers_own_flags():
    """A checkpoint of a foreach (CPU) Adam loaded into a fused one stays fused, with its
    step count as float32 on the parameters' device, and still steps like the saved one."""
    from agents.actor_critic import load_optimiser_state

    torch.manual_seed(0)
    a, b = nn.Parameter(torch.randn(4)), nn.Parameter(torch.randn(4))
    b.data.copy_(a.data)
    saved = torch.optim.Adam([a], lr=0.1, foreach=True)
    for _ in range(3):
        a.grad = a.detach() ** 2
        saved.step()
    fused = torch.optim.Adam([b], lr=0.1, fused=True)
    b.data.copy_(a.data)
    load_optimiser_state(fused, copy.deepcopy(saved.state_dict()))  # as if read from disk
    group = fused.param_groups[0]
    assert group["fused"] is True and not group["foreach"]
    step = fused.state[b]["step"]
    assert step.dtype == torch.float32 and step.device == b.device and step.item() == 3.0
    a.grad, b.grad = a.detach() ** 2, b.detach() ** 2
    saved.step()
    fused.step()
    assert torch.allclose(a, b, atol=1e-6)  # same moments and bias correction after the load
