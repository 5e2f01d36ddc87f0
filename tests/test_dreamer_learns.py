"""A short Dreamer run on CartPole beats the random agent (fixed seed; a learning smoke check).

Small sizes so that it runs in about a minute on one CPU thread. The random policy lasts ~22
steps on CartPole-v1 (tests/test_scripts.py); the trained policy's greedy evaluation must at
least double that. Learning speed itself is measured by scripts/benchmark.py, not here.
"""

from __future__ import annotations

import torch

from agents.trainer import Trainer
from tests.test_trainer import make_cfg

SMALL = [
    "agent=dreamer",
    "env=cartpole",
    "seed=0",
    "world_model.deter=64",
    "world_model.units=64",
    "world_model.stoch=8",
    "world_model.classes=8",
    "world_model.lr=1e-3",
    "agent.batch_size=8",
    "agent.seq_len=16",
    "agent.imag_last=4",
    "agent.actor.units=64",
    "agent.critic.units=64",
    "agent.actor.lr=1e-3",
    "agent.critic.lr=1e-3",
    "agent.gamma=0.99",
    "trainer.total_steps=2500",
    "trainer.learning_starts=500",
    "trainer.train_ratio=64",
    "trainer.eval_every=0",
    "trainer.eval_episodes=5",
    "trainer.checkpoint_every=0",
    "trainer.log_every=500",
]


def test_short_dreamer_run_beats_random_on_cartpole(tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        last = Trainer(make_cfg(tmp_path, SMALL), tmp_path).run()
    finally:
        torch.set_num_threads(threads)
    assert last["progress/updates"] == (2500 - 500) * 64 // (8 * 16)
    assert last["eval/return_mean"] > 50.0, last["eval/return_mean"]
