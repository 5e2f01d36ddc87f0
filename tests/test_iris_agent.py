"""IRIS under the shared learner: agent=dreamer world_model=transformer, composed by Hydra.

A tiny IRIS (16x16 frames, 2x2 tokens, one Transformer layer) built from the real config tree:
act, one update on a synthetic replay batch, and a checkpoint round trip through
``torch.load(weights_only=True)`` that must give the same deterministic actions.
"""

from __future__ import annotations

from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from agents import make_agent
from agents.dreamer import DreamerAgent
from world_models.iris import IrisWorldModel

ROOT = Path(__file__).resolve().parent.parent
TINY = [
    "env.size=16",
    "world_model.vocab_size=16",
    "world_model.embed_dim=8",
    "world_model.tokenizer_channels=8",
    "world_model.tokenizer_batch=4",  # exercise the random-subset path (B*T = 8 frames)
    "world_model.width=16",
    "world_model.layers=1",
    "world_model.heads=2",
    "world_model.context_blocks=4",
    "world_model.history_blocks=2",  # the preset's 6 need 8 blocks of context
    "agent.batch_size=2",
    "agent.seq_len=4",
    "agent.imag_horizon=6",  # 1 + 6 blocks > 4: the dream refills its KV cache once
    "agent.imag_last=1",
    "agent.actor.units=16",
    "agent.actor.layers=1",
    "agent.critic.units=16",
    "agent.critic.layers=1",
]


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def compose_cfg(overrides: list[str], preset: str = "iris_cpu") -> DictConfig:
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        return compose(
            "config",
            overrides=[
                "agent=dreamer",
                "world_model=transformer",
                f"preset={preset}",
                "env=cartpole",
                "env.from_pixels=true",
                "logger.mode=disabled",
                *overrides,
            ],
        )


def spaces_for(cfg: DictConfig) -> tuple[gym.spaces.Dict, gym.spaces.Discrete]:
    size, channels = cfg.env.size, 1 if cfg.env.grayscale else 3
    image = gym.spaces.Box(0, 255, (size, size, channels), np.uint8)
    return gym.spaces.Dict({"image": image}), gym.spaces.Discrete(2)


def frames(n: int, size: int, seed: int) -> np.ndarray:
    """Random uint8 frames [n, size, size, 3]."""
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def synthetic_batch(agent: DreamerAgent, size: int) -> dict[str, torch.Tensor]:
    """A replay batch [B, T, ...] as the trainer hands it over (row convention, int64 actions)."""
    b, t = agent.batch_size, agent.seq_len
    g = torch.Generator().manual_seed(1)
    is_first = torch.zeros(b, t, dtype=torch.bool)
    is_first[:, 0] = True
    is_first[1, 2] = True  # an episode starts inside the second sequence
    is_terminal = torch.zeros(b, t, dtype=torch.bool)
    is_terminal[1, 1] = True
    return {
        "image": torch.from_numpy(frames(b * t, size, 1)).view(b, t, size, size, 3),
        "action": torch.randint(0, 2, (b, t), generator=g),
        "reward": torch.ones(b, t).masked_fill(is_first, 0.0),
        "is_first": is_first,
        "is_terminal": is_terminal,
        "is_truncated": torch.zeros(b, t, dtype=torch.bool),
        "is_last": is_terminal.clone(),
    }


def rollout(agent: DreamerAgent, size: int, steps: int = 5) -> list[np.ndarray]:
    """Deterministic actions of 2 envs over ``steps`` fixed frames (env 1 resets at step 3)."""
    state, actions = None, []
    for step in range(steps):
        is_first = np.array([step == 0, step in (0, 3)])
        obs = {"image": frames(2, size, 100 + step), "is_first": is_first}
        action, state = agent.act(obs, state, explore=False)
        actions.append(action)
    return actions


def test_iris_agent_acts_updates_and_round_trips_a_checkpoint(tmp_path):
    cfg = compose_cfg(TINY)
    obs_space, action_space = spaces_for(cfg)
    torch.manual_seed(0)
    agent = make_agent(cfg, obs_space, action_space, torch.device("cpu"))
    assert isinstance(agent, DreamerAgent)
    assert isinstance(agent.world_model, IrisWorldModel)
    assert agent.world_model.K == 16  # iris_cpu: a 4x4 grid, here of 16x16 frames

    size = cfg.env.size
    actions = rollout(agent, size)
    assert all(a.dtype == np.int64 and a.shape == (2,) for a in actions)

    before = [p.detach().clone() for p in agent.world_model.parameters()]
    actor_before = [p.detach().clone() for p in agent.actor_critic.actor.parameters()]
    metrics = agent.update(synthetic_batch(agent, size))
    for key in (
        "world_model/obs_loss",
        "world_model/reward_loss",
        "tokenizer/recon_loss",
        "actor_loss",
        "critic_loss",
        "imag_return",
    ):
        assert key in metrics and torch.isfinite(metrics[key]), key
    changed = [not torch.equal(a, p) for a, p in zip(before, agent.world_model.parameters())]
    assert any(changed)
    assert any(
        not torch.equal(a, p) for a, p in zip(actor_before, agent.actor_critic.actor.parameters())
    )

    path = tmp_path / "agent.pt"
    torch.save(agent.state_dict(), path)
    loaded = torch.load(path, weights_only=True)
    torch.manual_seed(123)  # different initial weights: everything must come from the file
    other = make_agent(cfg, obs_space, action_space, torch.device("cpu"))
    other.load_state_dict(loaded)
    for (name, a), b in zip(
        agent.world_model.state_dict().items(), other.world_model.state_dict().values()
    ):
        assert torch.equal(a, b), name
    expected = rollout(agent, size)
    got = rollout(other, size)
    for a, b in zip(expected, got):
        np.testing.assert_array_equal(a, b)
    # a second update after loading works (optimiser state restored)
    assert torch.isfinite(other.update(synthetic_batch(other, size))["world_model/loss"])


def test_presets_compose_with_seq_len_fitting_the_context():
    for preset in ("iris_cpu", "iris_atari100k"):
        cfg = compose_cfg([], preset)
        assert cfg.world_model.name == "transformer"
        t, ctx = cfg.agent.seq_len, cfg.world_model.context_blocks
        assert t <= ctx or t % ctx == 0, preset
    # IRIS's tokenizer batch: 256 frames of the 64 x 20 = 1,280 (all of them needed > 24 GB)
    atari = compose_cfg([], "iris_atari100k")
    assert atari.world_model.tokenizer_batch == 256
    assert atari.agent.batch_size * atari.agent.seq_len == 1280


def test_dreamer_optimises_iris_per_part_with_its_config_lrs():
    """tokenizer_lr / transformer_lr / weight_decay reach the world model's AdamW groups."""
    cfg = compose_cfg([*TINY, "world_model.tokenizer_lr=1e-3", "world_model.transformer_lr=2e-4"])
    obs_space, action_space = spaces_for(cfg)
    agent = make_agent(cfg, obs_space, action_space, torch.device("cpu"))
    groups = agent.model_opt.param_groups
    assert isinstance(agent.model_opt, torch.optim.AdamW)
    assert [(g["lr"], g["weight_decay"]) for g in groups] == [
        (1e-3, 0.0),
        (2e-4, 0.01),
        (2e-4, 0.0),
    ]
    tok = {id(q) for q in agent.world_model.tokenizer.parameters()}
    assert {id(q) for q in groups[0]["params"]} == tok
    n = sum(len(g["params"]) for g in groups)
    assert n == len(list(agent.world_model.parameters()))
