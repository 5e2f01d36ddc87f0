"""The World Models pipeline: stages, resume, CMA-ES on a toy env, the Agent API."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from agents.config import ConfigError
from agents.world_models_agent import (
    WorldModelsAgent,
    WorldModelsPipeline,
    controller_act,
    controller_size,
    dream_returns,
)


class SignEnv(gym.Env):
    """Toy env: obs x ~ U(-1, 1)^2; reward 1 when action == (x[0] > 0); 10 steps.

    Random policy: 5 per episode; a linear controller on the features can reach 10.
    """

    observation_space = gym.spaces.Dict({"vector": gym.spaces.Box(-1.0, 1.0, (2,), np.float32)})
    action_space = gym.spaces.Discrete(2)

    def reset(self, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        self.x = self.np_random.uniform(-1, 1, 2).astype(np.float32)
        return {"vector": self.x}, {}

    def step(self, action):
        reward = float(int(action) == int(self.x[0] > 0))
        self.t += 1
        self.x = self.np_random.uniform(-1, 1, 2).astype(np.float32)
        return {"vector": self.x}, reward, False, self.t >= 10, {}


def sign_env(env_cfg, seed):
    return SignEnv()


def _cfg(**agent):
    cfg = OmegaConf.create(
        {
            "seed": 0,
            "env": {"id": "Sign", "name": "sign"},
            "agent": OmegaConf.load("configs/agent/world_models.yaml"),
            "world_model": OmegaConf.load("configs/world_model/vae_mdnrnn.yaml"),
        }
    )
    small = {
        "collect": {"rollouts": 6, "iterative_rollouts": 2, "max_steps": 10},
        "vae": {"epochs": 2, "batch_size": 16},
        "mdn": {"epochs": 2, "batch_size": 4, "seq_len": 6},
        "controller": {
            "generations": 2,
            "population": 6,
            "rollouts": 2,
            "workers": 0,
            "max_steps": 10,
        },
    }
    cfg.agent = OmegaConf.merge(cfg.agent, small, agent)
    cfg.world_model = OmegaConf.merge(
        cfg.world_model,
        {
            "latent": 4,
            "hidden": 16,
            "vector_units": 16,
            "vector_layers": 1,
            "head_units": 16,
            "sample_z": False,
        },
    )
    return cfg


def test_controller_size_and_outputs():
    assert controller_size(288, 3) == 867  # the paper's CarRacing controller
    params = torch.zeros(2, controller_size(3, 2))
    params[0, :6] = torch.tensor([1.0, 0, 0, -1.0, 0, 0])  # W rows: +f0, -f0
    params[1, 6:] = torch.tensor([0.5, -0.5])  # biases only
    feat = torch.tensor([[[2.0, 0, 0], [-2.0, 0, 0]]] * 2)  # [C=2, M=2, F=3]
    disc = controller_act(params, feat, 2, True)
    torch.testing.assert_close(disc[0], torch.tensor([[1.0, 0], [0, 1.0]]))
    torch.testing.assert_close(disc[1], torch.tensor([[1.0, 0], [1.0, 0]]))
    cont = controller_act(params, feat, 2, False)
    torch.testing.assert_close(cont[0, 0], torch.tanh(torch.tensor([2.0, -2.0])))


def test_stages_save_reload_and_resume(tmp_path):
    logs = []
    pipe = WorldModelsPipeline(_cfg(), tmp_path, env_fn=sign_env, log=logs.append)
    pipe.run()
    names = sorted(p.name for p in (tmp_path / "world_models").glob("*.pt"))
    assert names == ["collect.pt", "controller.pt", "mdn.pt", "vae.pt"]
    for name in names:  # tensors and primitives only
        torch.load(tmp_path / "world_models" / name, weights_only=True)
    collect = pipe.load("collect")
    assert collect["episodes"] == 6 and collect["rows"] == 6 * 11  # 10 steps + final row
    assert pipe.load("vae")["epochs_done"] == 2 and len(pipe.load("mdn")["history"]) == 2
    assert pipe.load("controller")["history"].shape == (2, 3)
    # a second pipeline in the same run dir finds every stage done and runs nothing
    again = []
    WorldModelsPipeline(_cfg(), tmp_path, env_fn=sign_env, log=again.append).run()
    assert again == []
    # more generations: the controller stage resumes from generation 2
    more = []
    cfg = _cfg(controller={"generations": 3})
    p3 = WorldModelsPipeline(cfg, tmp_path, env_fn=sign_env, log=more.append)
    p3.run(["controller"])
    assert len(more) == 1 and "gen 3/3" in more[0]
    # stage weights reload into a fresh pipeline: same MDN loss history and VAE weights
    fresh = WorldModelsPipeline(cfg, tmp_path, env_fn=sign_env, log=lambda s: None)
    fresh._restore_inputs("controller")
    for k, v in pipe.model.vae.state_dict().items():
        torch.testing.assert_close(fresh.model.vae.state_dict()[k], v)
    assert len(fresh.replay) == 66


def test_stage_without_its_input_fails_clearly(tmp_path):
    pipe = WorldModelsPipeline(_cfg(), tmp_path, env_fn=sign_env, log=lambda s: None)
    with pytest.raises(ConfigError, match="run --stage collect first"):
        pipe.train_vae()


def test_cma_es_improves_return_on_toy_env(tmp_path):
    """Random policy scores 5/10; after 6 generations of 8 candidates the ES mean scores >= 8."""
    cfg = _cfg(
        vae={"epochs": 1},
        mdn={"epochs": 1},
        controller={"generations": 6, "population": 8, "rollouts": 3, "sigma0": 0.5},
    )
    pipe = WorldModelsPipeline(cfg, tmp_path, env_fn=sign_env, log=lambda s: None)
    pipe.run()  # V and M barely trained: C reads near-random features of x, still informative
    history = pipe.load("controller")["history"]  # [G, 3] mean / max / min fitness
    random_return = np.mean([pipe.load("collect")["return_mean"]])
    assert 3.0 <= random_return <= 7.0
    final = np.mean(pipe.evaluate(episodes=10))
    assert final >= 8.0, (history, final)
    assert history[-1, 0] > history[0, 0]


def test_worker_pool_matches_serial_scores(tmp_path):
    serial = WorldModelsPipeline(_cfg(), tmp_path / "a", env_fn=sign_env, log=lambda s: None)
    parallel = WorldModelsPipeline(
        _cfg(controller={"workers": 2, "start_method": "fork"}),
        tmp_path / "b",
        env_fn=sign_env,
        log=lambda s: None,
    )
    parallel.model.load_state_dict(serial.model.state_dict())
    rng = np.random.default_rng(0)
    solutions = [rng.normal(size=controller_size(20, 2)) for _ in range(5)]
    a_pool, b_pool = serial._pool(), parallel._pool()
    try:
        a = serial._fitness(a_pool, solutions, 0)
        b = parallel._fitness(b_pool, solutions, 0)
    finally:
        a_pool.close()
        b_pool.close()
    np.testing.assert_allclose(a, b)


def test_dream_returns_shapes_and_dream_mode(tmp_path):
    cfg = _cfg(stages=["collect", "vae", "mdn", "controller"], controller={"mode": "dream"})
    pipe = WorldModelsPipeline(cfg, tmp_path, env_fn=sign_env, log=lambda s: None)
    pipe.run()
    assert pipe.load("controller")["history"].shape == (2, 3)
    model = pipe.model
    params = torch.zeros(3, controller_size(model.feature_dim, 2))
    returns = dream_returns(model, params, torch.zeros(4, 4), max_steps=5, discrete=True)
    assert returns.shape == (3, 4)
    # identical controllers from identical starts: equal rows at temperature 0 once the
    # termination draws are taken out (continue probability 1)
    model.temperature = 0.0
    with torch.no_grad():
        model.done_head.out.bias.fill_(-100.0)
    torch.manual_seed(0)
    returns = dream_returns(model, params, torch.zeros(4, 4), max_steps=5, discrete=True)
    torch.testing.assert_close(returns[0], returns[1])


def test_dream_mode_with_worker_processes(tmp_path):
    """The dream's start codes cross process boundaries (they must not carry autograd)."""
    cfg = _cfg(controller={"mode": "dream", "workers": 2, "start_method": "fork", "generations": 1})
    pipe = WorldModelsPipeline(cfg, tmp_path, env_fn=sign_env, log=lambda s: None)
    pipe.run()
    assert pipe.load("controller")["generations_done"] == 1


def test_agent_acts_updates_and_round_trips():
    cfg = _cfg()
    env = SignEnv()
    agent = WorldModelsAgent(cfg, env.observation_space, env.action_space, "cpu")
    obs = {"vector": np.zeros((3, 2), np.float32), "is_first": np.ones(3, bool)}
    actions, state = agent.act(obs, None)
    assert actions.shape == (3,) and actions.dtype == np.int64
    assert state["wm"]["h"].shape == (3, 16) and state["prev"].shape == (3, 2)
    params = torch.zeros(controller_size(agent.model.feature_dim, 2))
    params[-1] = 1.0  # bias picks action 1
    agent.set_controller(params)
    actions, state = agent.act({**obs, "is_first": np.zeros(3, bool)}, state)
    assert actions.tolist() == [1, 1, 1]
    b, t = agent.batch_size, agent.seq_len
    batch = {
        "vector": torch.randn(b, t, 2),
        "action": torch.randint(0, 2, (b, t)),
        "reward": torch.randn(b, t),
        "is_first": torch.zeros(b, t, dtype=torch.bool),
        "is_terminal": torch.zeros(b, t, dtype=torch.bool),
    }
    batch["is_first"][:, 0] = True
    metrics = agent.update(batch)
    assert torch.isfinite(metrics["model_loss"])
    clone = WorldModelsAgent(cfg, env.observation_space, env.action_space, "cpu")
    clone.load_state_dict(agent.state_dict())
    assert clone.has_controller and torch.equal(clone.params, agent.params)


def test_bad_config_names_the_key():
    env = SignEnv()
    with pytest.raises(ConfigError, match="agent.controller.mode"):
        WorldModelsAgent(
            _cfg(controller={"mode": "imagined"}), env.observation_space, env.action_space, "cpu"
        )
    cfg = _cfg()
    cfg.world_model.name = "rssm"
    with pytest.raises(ConfigError, match="world_model=vae_mdnrnn"):
        WorldModelsAgent(cfg, env.observation_space, env.action_space, "cpu")


@pytest.mark.parametrize("dim", [12, 300])  # cma picks CSA step sizes at 12, TPA at 300
def test_cma_state_round_trip_gives_the_same_populations(dim):
    """cma_state -> torch.save -> load(weights_only) -> cma_restore: identical next asks."""
    import io

    import cma

    from agents.world_models_agent import cma_restore, cma_state

    def make(seed):
        rng = np.random.default_rng(seed)
        opts = {"popsize": 8, "verbose": -9, "randn": lambda *s: rng.standard_normal(s)}
        return cma.CMAEvolutionStrategy(np.zeros(dim), 0.3, opts), rng

    def f(x):
        return float(np.sum((x - 1.0) ** 2 * np.arange(1, dim + 1)))

    es, _ = make(0)
    pops = []
    for _ in range(10):
        x = es.ask()
        pops.append(np.array(x))
        es.tell(x, [f(v) for v in x])
    stopped, rng = make(0)
    for _ in range(5):
        x = stopped.ask()
        stopped.tell(x, [f(v) for v in x])
    buf = io.BytesIO()
    torch.save(cma_state(stopped, rng), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    assert state["sm.C"].shape == (dim, dim) and state["countiter"] == 5
    resumed, rng2 = make(99)  # a different seed: everything must come from the saved state
    cma_restore(resumed, rng2, state)
    for g in range(5, 10):
        x = resumed.ask()
        np.testing.assert_array_equal(np.array(x), pops[g])
        resumed.tell(x, [f(v) for v in x])


def test_controller_resume_matches_uninterrupted_run(tmp_path):
    """Stopping CMA-ES after 2 generations and resuming to 4 = running 4 straight."""
    import shutil

    cfg4 = _cfg(controller={"generations": 4, "population": 6, "sigma0": 0.5})
    full = WorldModelsPipeline(cfg4, tmp_path / "a", env_fn=sign_env, log=lambda s: None)
    full.run()
    part_dir = tmp_path / "b" / "world_models"
    shutil.copytree(tmp_path / "a" / "world_models", part_dir)
    (part_dir / "controller.pt").unlink()
    cfg2 = _cfg(controller={"generations": 2, "population": 6, "sigma0": 0.5})
    WorldModelsPipeline(cfg2, tmp_path / "b", env_fn=sign_env, log=lambda s: None).run()
    resumed = WorldModelsPipeline(cfg4, tmp_path / "b", env_fn=sign_env, log=lambda s: None)
    resumed.run(["controller"])
    a, b = full.load("controller"), resumed.load("controller")
    assert b["generations_done"] == 4
    torch.testing.assert_close(b["history"], a["history"], rtol=0, atol=0)
    torch.testing.assert_close(b["params"], a["params"], rtol=0, atol=0)
    torch.testing.assert_close(b["cma"]["sm.C"], a["cma"]["sm.C"], rtol=0, atol=0)
