"""Test-wide settings: one torch thread per xdist worker, headless rendering, no W&B network."""

import os

import pytest
import torch

os.environ.setdefault("MUJOCO_GL", "egl")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def toy_agent(monkeypatch):
    """``agent.name=toy`` builds test_trainer's ToyAgent (a tiny learner for loop tests)."""
    from test_trainer import ToyAgent

    import agents

    monkeypatch.setitem(agents.AGENTS, "toy", lambda *a: ToyAgent(*a))
