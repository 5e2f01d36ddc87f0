"""DreamerAgent: acting, updating and checkpoints with the RSSM world model (tiny sizes)."""

from __future__ import annotations

import warnings
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from agents.actor_critic import ActorCritic
from agents.config import ConfigError
from agents.dreamer import DreamerAgent
from world_models.networks import OneHotFeatures

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
VECTOR = gym.spaces.Dict({"vector": gym.spaces.Box(-np.inf, np.inf, (4,), np.float32)})
IMAGE = gym.spaces.Dict({"image": gym.spaces.Box(0, 255, (16, 16, 3), np.uint8)})
DISCRETE = gym.spaces.Discrete(2)
BOX = gym.spaces.Box(-1.0, 1.0, (3,), np.float32)


def full_cfg(**overrides):
    cfg = OmegaConf.create(
        {
            "agent": OmegaConf.load(CONFIGS / "agent" / "dreamer.yaml"),
            "world_model": OmegaConf.load(CONFIGS / "world_model" / "rssm.yaml"),
        }
    )
    tiny = {
        "agent.batch_size": 3,
        "agent.seq_len": 5,
        "agent.imag_horizon": 4,
        "agent.actor.units": 16,
        "agent.actor.layers": 1,
        "agent.critic.units": 16,
        "agent.critic.layers": 1,
        "world_model.deter": 16,
        "world_model.stoch": 4,
        "world_model.classes": 4,
        "world_model.units": 16,
        "world_model.cnn_depth": 4,
    }
    for key, value in {**tiny, **overrides}.items():
        OmegaConf.update(cfg, key, value)
    return cfg


def fake_obs(space: gym.spaces.Dict, n: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    obs = {}
    if "vector" in space.spaces:
        obs["vector"] = rng.normal(size=(n, 4)).astype(np.float32)
    if "image" in space.spaces:
        obs["image"] = rng.integers(0, 256, (n, 16, 16, 3), dtype=np.uint8)
    return obs


def fake_batch(agent: DreamerAgent, space: gym.spaces.Dict, action_space, seed: int = 0):
    b, t = agent.batch_size, agent.seq_len
    g = torch.Generator().manual_seed(seed)
    batch = {
        k: torch.from_numpy(v.reshape(b, t, *v.shape[1:]))
        for k, v in fake_obs(space, b * t, seed).items()
    }
    if isinstance(action_space, gym.spaces.Discrete):
        batch["action"] = torch.randint(0, action_space.n, (b, t), generator=g)  # int64 as stored
    else:
        batch["action"] = torch.rand(b, t, action_space.shape[0], generator=g) * 2 - 1
    batch["reward"] = torch.rand(b, t, generator=g)
    batch["is_first"] = torch.zeros(b, t, dtype=torch.bool)
    batch["is_first"][:, 0] = True
    batch["is_terminal"] = torch.zeros(b, t, dtype=torch.bool)
    batch["is_terminal"][0, -1] = True
    return batch


def test_properties_from_config():
    agent = DreamerAgent(full_cfg(), VECTOR, DISCRETE, "cpu")
    assert (agent.batch_size, agent.seq_len) == (3, 5)
    assert isinstance(agent.actor_critic, ActorCritic)


@pytest.mark.parametrize("obs_space", [VECTOR, IMAGE], ids=["vector", "image"])
def test_act_discrete(obs_space):
    agent = DreamerAgent(full_cfg(), obs_space, DISCRETE, "cpu")
    obs = {**fake_obs(obs_space, 4), "is_first": np.ones(4, bool)}
    action, state = agent.act(obs, None)
    assert action.dtype == np.int64 and action.shape == (4,)
    assert ((action >= 0) & (action < 2)).all()
    assert state["action"].shape == (4, 2)
    assert state["latent"]["deter"].shape == (4, 16)
    obs["is_first"][:] = False
    action, state = agent.act(obs, state, explore=False)
    assert action.shape == (4,)
    assert torch.equal(state["action"].sum(-1), torch.ones(4))


def test_act_continuous():
    agent = DreamerAgent(full_cfg(), VECTOR, BOX, "cpu")
    obs = {**fake_obs(VECTOR, 5), "is_first": np.ones(5, bool)}
    action, state = agent.act(obs, None)
    assert action.dtype == np.float32 and action.shape == (5, 3)
    assert np.abs(action).max() <= 1.0
    action, _ = agent.act({**obs, "is_first": np.zeros(5, bool)}, state, explore=False)
    assert np.abs(action).max() <= 1.0


@pytest.mark.parametrize(
    "obs_space,action_space",
    [(VECTOR, DISCRETE), (IMAGE, DISCRETE), (VECTOR, BOX), (IMAGE, BOX)],
    ids=["vector-discrete", "image-discrete", "vector-continuous", "image-continuous"],
)
def test_update_trains_every_part(obs_space, action_space):
    agent = DreamerAgent(full_cfg(), obs_space, action_space, "cpu")
    parts = [agent.world_model, agent.actor_critic.actor, agent.actor_critic.critic]
    before = [[p.detach().clone() for p in m.parameters()] for m in parts]
    metrics = agent.update(fake_batch(agent, obs_space, action_space))
    for module, old in zip(parts, before):
        assert any(not torch.equal(a, b) for a, b in zip(old, module.parameters()))
    for key in ("model_loss", "model_grad_norm", "actor_loss", "critic_loss", "imag_return"):
        assert key in metrics
    assert all(isinstance(v, torch.Tensor) and v.dim() == 0 for v in metrics.values())
    assert all(torch.isfinite(v) for v in metrics.values())


def test_checkpoint_round_trip_gives_identical_actions(tmp_path):
    torch.manual_seed(1)
    agent = DreamerAgent(full_cfg(), VECTOR, DISCRETE, "cpu")
    agent.update(fake_batch(agent, VECTOR, DISCRETE))
    torch.save(agent.state_dict(), tmp_path / "agent.pt")
    torch.manual_seed(2)
    other = DreamerAgent(full_cfg(), VECTOR, DISCRETE, "cpu")
    other.load_state_dict(torch.load(tmp_path / "agent.pt", weights_only=True))

    def rollout(a: DreamerAgent) -> list[np.ndarray]:
        torch.manual_seed(3)  # the posterior sample is stochastic; same seed, same draws
        state, actions = None, []
        for step in range(6):
            obs = {**fake_obs(VECTOR, 8, seed=step), "is_first": np.full(8, step == 0)}
            action, state = a.act(obs, state, explore=False)
            actions.append(action)
        return actions

    for x, y in zip(rollout(agent), rollout(other)):
        assert np.array_equal(x, y)
    a, b = agent.state_dict(), other.state_dict()
    assert torch.equal(
        a["actor_critic"]["modules"]["moments.high"], b["actor_critic"]["modules"]["moments.high"]
    )
    assert a["model_opt"]["state"][0]["step"] == b["model_opt"]["state"][0]["step"] == 1
    # training continues from the restored optimiser state identically
    batch = fake_batch(agent, VECTOR, DISCRETE, seed=5)
    torch.manual_seed(4)
    m1 = agent.update(batch)
    torch.manual_seed(4)
    m2 = other.update(batch)
    for key in m1:
        torch.testing.assert_close(m1[key], m2[key])


def test_mismatched_checkpoint_is_a_clear_error():
    agent = DreamerAgent(full_cfg(), VECTOR, DISCRETE, "cpu")
    bigger = DreamerAgent(full_cfg(**{"world_model.deter": 32}), VECTOR, DISCRETE, "cpu")
    with pytest.raises(ValueError, match="does not match this Dreamer agent"):
        bigger.load_state_dict(agent.state_dict())


def test_unsupported_action_space():
    with pytest.raises(ValueError, match="Discrete and 1-D Box"):
        DreamerAgent(full_cfg(), VECTOR, gym.spaces.MultiDiscrete([2, 3]), "cpu")


@pytest.mark.parametrize("grad", ["reinforce", "dynamics"])
def test_rssm_imagination_shapes_and_no_model_gradients(grad):
    agent = DreamerAgent(full_cfg(**{"agent.actor_grad": grad}), VECTOR, BOX, "cpu")
    batch = fake_batch(agent, VECTOR, BOX)
    data = {**batch, "action": batch["action"].float()}
    _, _, post = agent.world_model.loss(data)
    start = {k: v.detach() for k, v in post.items()}  # [B, T, ...]
    flat, _ = agent.actor_critic._starts(start, batch["is_terminal"])
    with torch.no_grad():
        traj = agent.actor_critic.imagine(agent.world_model, flat, horizon=4)
    n, f = 3 * 5, agent.world_model.feature_dim
    assert isinstance(traj["feat"], OneHotFeatures)  # no gradient to z: h dense, z by index
    assert traj["feat"].to_dense().shape == (n, 5, f)
    assert traj["action"].shape == (n, 4, 3)
    assert traj["reward"].shape == traj["cont"].shape == (n, 5)
    agent.actor_critic.update(agent.world_model, start, batch["is_terminal"])
    assert all(p.grad is None for p in agent.world_model.parameters())


def test_update_on_one_hot_features_equals_the_update_on_dense_features():
    """The RSSM hands the actor-critic OneHotFeatures (h dense, z by class index); an agent
    whose world model gives the dense features instead makes the same update: same losses,
    same actor and critic weights after two updates (slow critic and replay-value loss on)."""
    cfg = {"agent.slow_reg": 1.0, "agent.imag_last": 0}
    params = []
    for dense in (False, True):
        torch.manual_seed(0)
        agent = DreamerAgent(full_cfg(**cfg), VECTOR, DISCRETE, "cpu")
        wm = agent.world_model
        if dense:
            wm.head_features = wm.features  # the instance attribute shadows the method
        for seed in (1, 2):
            torch.manual_seed(seed)
            metrics = agent.update(fake_batch(agent, VECTOR, DISCRETE, seed=seed))
        params.append(([p.detach().clone() for p in agent.actor_critic.parameters()], metrics))
    (p0, m0), (p1, m1) = params
    for key in ("actor_loss", "critic_loss", "repval_loss", "imag_return", "critic_grad_norm"):
        torch.testing.assert_close(m0[key], m1[key], rtol=1e-4, atol=1e-6)
    assert m0["critic_grad_norm"] > 0
    for a, b in zip(p0, p1):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("grad", ["dynamics", "reinforce"])
def test_dream_heads_run_once_per_trajectory_and_match_the_per_step_heads(grad):
    """The RSSM's reward and continue heads run once over the whole dream [N, H+1, F]
    (``batched_heads``) instead of once per imagined step: the same rewards, continues and
    updates as predicting them inside every ``imagine_step`` (two updates, both actor
    gradients; the dynamics one backpropagates through the heads)."""
    calls, runs = [], []
    for batched in (True, False):
        torch.manual_seed(0)
        agent = DreamerAgent(full_cfg(**{"agent.actor_grad": grad}), VECTOR, DISCRETE, "cpu")
        wm = agent.world_model
        wm.batched_heads = batched  # the instance attribute shadows the class's
        heads = wm.heads
        wm.heads = lambda feat, heads=heads, b=batched: calls.append(b) or heads(feat)
        for seed in (1, 2):
            torch.manual_seed(seed)
            metrics = agent.update(fake_batch(agent, VECTOR, DISCRETE, seed=seed))
        runs.append(([p.detach().clone() for p in agent.actor_critic.parameters()], metrics))
    horizon = full_cfg().agent.imag_horizon
    assert calls.count(True) == 2  # one heads call per dream, i.e. per update
    assert calls.count(False) == 2 * horizon  # one per imagined step
    (p0, m0), (p1, m1) = runs
    for key in ("actor_loss", "critic_loss", "imag_reward", "imag_cont", "imag_return"):
        torch.testing.assert_close(m0[key], m1[key], rtol=1e-4, atol=1e-6)
    assert m0["imag_reward"] != 0  # the reward head is not at its zero init after one update
    for a, b in zip(p0, p1):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_latent_mcts_planner_overrides_a_wrong_actor(tmp_path):
    """agent.planner=mcts: the search in the world model finds the action the dream pays for.

    The actor prefers action 0 (its mode), the critic says 0 everywhere, and the world model's
    imagined reward is 1 for action 1 only: the actor alone picks 0, the Gumbel planner picks
    1 with 8 simulations. (pUCT, the default rule, follows the 98% prior here even at 64
    simulations, since action 1 also pays one step later below action 0.)
    """
    torch.manual_seed(0)
    cfg = full_cfg(
        **{"agent.planner": "mcts", "agent.mcts.rule": "gumbel", "agent.mcts.simulations": 8}
    )
    assert cfg.agent.mcts.discount == cfg.agent.gamma  # interpolated from the learner
    agent = DreamerAgent(cfg, VECTOR, DISCRETE, "cpu")
    with torch.no_grad():
        agent.actor_critic.actor.out.weight.zero_()
        agent.actor_critic.actor.out.bias.copy_(torch.tensor([2.0, -2.0]))
    imagine = agent.world_model.imagine_step

    def paying_step(state, action):
        nxt, _, cont = imagine(state, action)
        return nxt, action[:, 1].clone(), cont  # reward 1 for action 1

    agent.world_model.imagine_step = paying_step
    obs = {**fake_obs(VECTOR, 4), "is_first": np.ones(4, bool)}
    for explore in (False, True):
        action, state = agent.act(obs, None, explore=explore)
        assert action.tolist() == [1, 1, 1, 1]
        assert torch.equal(state["action"], torch.tensor([[0.0, 1.0]] * 4))
    actor_only = DreamerAgent(full_cfg(), VECTOR, DISCRETE, "cpu")
    actor_only.load_state_dict(agent.state_dict())  # same weights, no planner
    assert actor_only.act(obs, None, explore=False)[0].tolist() == [0, 0, 0, 0]
    # the planner's RNG is part of the checkpoint (tensors and primitives only)
    torch.save(agent.state_dict(), tmp_path / "agent.pt")
    state = torch.load(tmp_path / "agent.pt", weights_only=True)
    assert state["planner"]["rng"] == agent.planner.state_dict()["rng"]


def test_latent_mcts_needs_discrete_actions():
    with pytest.raises(ConfigError, match="agent.planner=mcts"):
        DreamerAgent(full_cfg(**{"agent.planner": "mcts"}), VECTOR, BOX, "cpu")
    with pytest.raises(ConfigError, match="agent.planner"):
        DreamerAgent(full_cfg(**{"agent.planner": "beam"}), VECTOR, DISCRETE, "cpu")


@pytest.mark.parametrize("obs_space", [VECTOR, IMAGE], ids=["vector", "image"])
def test_bf16_update_matches_fp32_losses(obs_space):
    """agent.precision=bf16 on CPU: same weights and batch give the fp32 losses within bf16's
    precision, weights stay fp32, and every part still trains."""
    losses = {}
    for precision in ("fp32", "bf16"):
        torch.manual_seed(0)
        agent = DreamerAgent(full_cfg(**{"agent.precision": precision}), obs_space, DISCRETE)
        before = agent.actor_critic.critic.out.weight.detach().clone()
        metrics = agent.update(fake_batch(agent, obs_space, DISCRETE))
        assert all(p.dtype == torch.float32 for p in agent.world_model.parameters())
        assert not torch.equal(before, agent.actor_critic.critic.out.weight)
        assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in metrics.values())
        losses[precision] = metrics
    for key in ("model_loss", "reward_loss", "cont_loss", "critic_loss"):
        fp32, bf16 = losses["fp32"][key].item(), losses["bf16"][key].item()
        assert bf16 == pytest.approx(fp32, rel=0.05, abs=0.02), key
    assert losses["bf16"]["model_loss"] != losses["fp32"]["model_loss"]  # autocast engaged


@pytest.mark.parametrize("native", [False, True])
def test_bf16_on_a_cpu_without_bf16_matmuls_warns(monkeypatch, native):
    """bf16 autocast is a slowdown on CPUs without AVX512-BF16 / AMX: say so at start-up."""
    monkeypatch.setattr("agents.dreamer.cpu_has_bf16", lambda: native)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        DreamerAgent(full_cfg(**{"agent.precision": "bf16"}), VECTOR, DISCRETE)
        DreamerAgent(full_cfg(), VECTOR, DISCRETE)  # fp32 never warns
    slow = [w for w in caught if "without native bf16" in str(w.message)]
    assert len(slow) == (0 if native else 1)


def test_precision_is_validated():
    with pytest.raises(ConfigError, match="agent.precision"):
        DreamerAgent(full_cfg(**{"agent.precision": "fp8"}), VECTOR, DISCRETE)


@pytest.fixture
def inductor_fallback_random():
    """Compiled code draws eager's random numbers (``config.patch``: undoing a monkeypatch
    deletes the key from inductor's config, breaking later tests in the process)."""
    import torch._inductor.config as inductor_config

    with inductor_config.patch(fallback_random=True):
        yield


def test_compiled_world_model_loss_and_dream_match_eager(inductor_fallback_random):
    """agent.compile=true: the torch.compile'd world-model loss, its gradients and the compiled
    imagination equal eager's on the same weights, batch and seed (tolerance: fused kernels
    reorder float sums). Inductor draws its own random numbers unless told to use eager's:
    here it must, to sample the same latents and actions."""
    torch._dynamo.reset()
    out = {}
    for compiled in (False, True):
        torch.manual_seed(0)
        agent = DreamerAgent(
            full_cfg(**{"agent.compile": compiled, "agent.seq_len": 2}), VECTOR, DISCRETE
        )
        data, _ = agent.model_inputs(fake_batch(agent, VECTOR, DISCRETE))
        loss, metrics, post = agent.model_loss(data)
        loss.backward()
        grads = [p.grad.clone() for p in agent.world_model.parameters() if p.grad is not None]
        start, _ = agent.actor_critic._starts(post, data["is_terminal"])
        torch.manual_seed(1)
        with torch.no_grad():
            dream = agent.actor_critic.imagine(agent.world_model, start, 3)
        out[compiled] = (loss.detach(), metrics, post, grads, dream)
    (l0, m0, p0, g0, d0), (l1, m1, p1, g1, d1) = out[False], out[True]
    assert l1.item() == pytest.approx(l0.item(), rel=1e-4)
    for key in ("reward_loss", "cont_loss"):
        assert m1[key].item() == pytest.approx(m0[key].item(), rel=1e-4, abs=1e-6), key
    assert torch.allclose(p1["deter"], p0["deter"], atol=1e-5)
    assert len(g1) == len(g0) > 0
    for a, b in zip(g0, g1):
        assert torch.allclose(a, b, rtol=1e-3, atol=1e-5)
    assert torch.equal(d1["action"], d0["action"])  # the same sampled actions
    assert torch.allclose(d1["feat"].to_dense(), d0["feat"].to_dense(), atol=1e-4)
    for key in ("reward", "cont"):
        assert torch.allclose(d1[key], d0[key], atol=1e-4), key
    with pytest.raises(ConfigError, match="agent.compile"):
        DreamerAgent(full_cfg(**{"agent.compile": "yes"}), VECTOR, DISCRETE)


def test_compiled_acting_step_matches_eager(inductor_fallback_random):
    """agent.compile_act=true: the compiled filter + actor step gives eager's latents and
    actions over a few steps (same seed; inductor uses eager's random numbers here)."""
    torch._dynamo.reset()
    runs = {}
    for compiled in (False, True):
        torch.manual_seed(0)
        agent = DreamerAgent(full_cfg(**{"agent.compile_act": compiled}), VECTOR, DISCRETE)
        assert (agent._filter_and_act != agent._filter_and_act_eager) == compiled
        state, actions = None, []
        for step in range(4):
            obs = {**fake_obs(VECTOR, 2, step), "is_first": np.array([step == 0, step == 2])}
            action, state = agent.act(obs, state, explore=True)
            actions.append(action)
        runs[compiled] = (np.stack(actions), state["latent"]["deter"])
    assert np.array_equal(runs[True][0], runs[False][0])
    assert torch.allclose(runs[True][1], runs[False][1], atol=1e-5)
    with pytest.raises(ConfigError, match="agent.compile_act"):
        DreamerAgent(full_cfg(**{"agent.compile_act": "yes"}), VECTOR, DISCRETE)


def test_one_start_row_per_sequence_leaves_the_replay_value_loss_at_zero():
    """agent.imag_last=1 with the RSSM's one-hot features: no real successor to regress the
    replay-value loss along, so it is 0 (it used to crash on OneHotFeatures)."""
    agent = DreamerAgent(full_cfg(**{"agent.imag_last": 1}), VECTOR, DISCRETE)
    metrics = agent.update(fake_batch(agent, VECTOR, DISCRETE))
    assert metrics["repval_loss"].item() == 0.0
    assert torch.isfinite(metrics["critic_loss"])
