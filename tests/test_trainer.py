"""The shared training loop: train_ratio arithmetic, row convention, checkpoints, resume."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

from agents.base import Agent
from agents.checkpoint import (
    CheckpointError,
    checkpoint_path,
    load_checkpoint,
    resolve_checkpoint,
)
from agents.config import ConfigError
from agents.distributed import DistInfo
from agents.trainer import Trainer, reuse_host_memory, updates_due

ROOT = Path(__file__).resolve().parent.parent


def make_cfg(run_dir: Path, overrides: list[str]) -> DictConfig:
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose(
            "config", overrides=["logger.mode=disabled", "trainer.progress=false", *overrides]
        )
    cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
    cfg.run_dir = str(run_dir)
    OmegaConf.set_struct(cfg, True)
    return cfg


class ToyAgent(Agent):
    """A softmax-linear policy that learns from replay: exercises every RNG stream of a run."""

    seq_len = 8
    batch_size = 4

    def __init__(self, cfg, obs_space, action_space, device):
        dim = obs_space["vector"].shape[0]
        self.net = torch.nn.Linear(dim, action_space.n, bias=False)  # a module: DDP finds it
        torch.nn.init.zeros_(self.net.weight)
        self.opt = torch.optim.Adam(self.net.parameters(), lr=0.05)

    @property
    def w(self) -> torch.Tensor:
        return self.net.weight.T  # [D, A]

    def act(self, obs, state, explore=True):
        logits = torch.from_numpy(obs["vector"]) @ self.w.detach()
        dist = torch.distributions.Categorical(logits=logits)
        action = dist.sample() if explore else logits.argmax(-1)
        steps = torch.zeros(len(obs["is_first"])) if state is None else state
        steps = torch.where(torch.from_numpy(obs["is_first"]), 0.0, steps + 1)
        return action.numpy().astype(np.int64), steps

    def update(self, batch):
        logp = (batch["vector"] @ self.w).log_softmax(-1)  # [B, T, A]
        taken = logp.gather(-1, batch["action"][..., None]).squeeze(-1)
        alive = (~batch["is_last"]).float()
        loss = -(taken * alive).mean()
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        return {"loss": loss.detach(), "first_frac": batch["is_first"].float().mean()}

    def state_dict(self):
        return {"w": self.w.detach().clone(), "opt": self.opt.state_dict()}

    def load_state_dict(self, state):
        with torch.no_grad():
            self.net.weight.copy_(state["w"].T)
        self.opt.load_state_dict(state["opt"])


def toy_overrides(total: int) -> list[str]:
    return [
        "agent=random",
        "env=cartpole",
        "env.num_envs=2",
        f"trainer.total_steps={total}",
        "trainer.learning_starts=40",
        "trainer.train_ratio=16",
        "trainer.log_every=40",
        "trainer.eval_every=80",
        "trainer.eval_episodes=2",
        "trainer.checkpoint_every=80",
        "trainer.replay_chunk=32",
        "trainer.stop_when_solved=false",
    ]


def toy_cfg(run_dir, total):
    cfg = make_cfg(run_dir, toy_overrides(total))
    OmegaConf.set_struct(cfg, False)
    cfg.agent.name = "toy"
    OmegaConf.set_struct(cfg, True)
    return cfg


def read_metrics(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith("perf/")} for r in rows]


def test_updates_due_follows_train_ratio():
    # 1024 replayed rows per update (16 x 64); ratio 512 -> one update per 2 env steps
    assert updates_due(999, 1000, 512, 1024) == 0
    assert updates_due(1000, 1000, 512, 1024) == 0
    assert updates_due(1002, 1000, 512, 1024) == 1
    assert updates_due(3000, 1000, 512, 1024) == 1000
    assert updates_due(1100, 1000, 32, 1024) == 3  # 100 * 32 / 1024 = 3.125


def test_toy_run_counts_updates_and_stores_rows(tmp_path, toy_agent):
    cfg = toy_cfg(tmp_path, 200)
    trainer = Trainer(cfg, tmp_path)
    trainer.run()
    # 2 envs x 100 iterations; (200 - 40) * 16 / 32 rows per update = 80 updates
    assert trainer.env_steps == 200
    assert trainer.updates == 80
    assert len(trainer.replay) == 200
    batch = trainer.replay.sample(4, 8)
    # reward of a reset row is 0; a row after a last row is first
    last = batch["is_last"][:, :-1]
    assert np.all(batch["is_first"][:, 1:][last])
    assert np.all(batch["reward"][:, 1:][batch["is_first"][:, 1:]] == 0)
    assert batch["image" if "image" in batch else "vector"].dtype == np.float32
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == [40, 80, 120, 160, 200]
    assert all("eval/return_mean" in r for r in rows if r["step"] % 80 == 0 or r["step"] == 200)
    ckpt = load_checkpoint(checkpoint_path(tmp_path), agent_name="toy", env_id="CartPole-v1")
    assert ckpt["env_steps"] == 200 and ckpt["updates"] == 80


def test_resume_gives_the_same_run(tmp_path, toy_agent):
    full_dir, split_dir = tmp_path / "full", tmp_path / "split"
    full_dir.mkdir()
    split_dir.mkdir()
    Trainer(toy_cfg(full_dir, 320), full_dir).run()
    Trainer(toy_cfg(split_dir, 160), split_dir).run()
    # the resumed run reads everything (replay, RNG, envs, agent) back from split_dir
    Trainer(toy_cfg(split_dir, 320), split_dir, resume=True).run()
    assert read_metrics(full_dir) == read_metrics(split_dir)
    a = load_checkpoint(checkpoint_path(full_dir))["agent"]["w"]
    b = load_checkpoint(checkpoint_path(split_dir))["agent"]["w"]
    assert torch.equal(a, b)


def test_replay_online_serves_the_agents_sequence_length(tmp_path, toy_agent):
    cfg = toy_cfg(tmp_path, 80)
    cfg.trainer.replay_online = True
    trainer = Trainer(cfg, tmp_path)
    trainer.run()
    assert trainer.replay.online == ToyAgent.seq_len
    # 40 rows per stream: 5 online sequences of 8 rows each, all served by the 20 updates
    assert trainer.replay._online_start == 40 and trainer.updates == 20


def test_wall_clock_continues_across_a_resume(tmp_path, toy_agent):
    Trainer(toy_cfg(tmp_path, 160), tmp_path).run()
    saved = load_checkpoint(checkpoint_path(tmp_path))["wall_s"]
    Trainer(toy_cfg(tmp_path, 320), tmp_path, resume=True).run()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    walls = [r["perf/wall_s"] for r in rows]
    assert walls == sorted(walls) and walls[0] > 0
    # the resumed process starts its clock at the first process's total, not at zero
    resumed = [r["perf/wall_s"] for r in rows if r["step"] > 160]
    assert min(resumed) > saved > 0
    assert all(r["perf/eval_s"] > 0 for r in rows if "eval/return_mean" in r)


def test_run_stops_at_the_first_solved_evaluation(tmp_path, toy_agent):
    cfg = toy_cfg(tmp_path, 320)
    cfg.trainer.stop_when_solved = True
    cfg.env.solved_return = 1.0  # any episode lasts >= 1 step: the first eval (step 80) solves
    trainer = Trainer(cfg, tmp_path)
    last = trainer.run()
    assert trainer.env_steps == 80
    assert last["eval/return_mean"] >= 1.0
    assert read_metrics(tmp_path)[-1]["step"] == 80
    assert load_checkpoint(checkpoint_path(tmp_path))["env_steps"] == 80

    cfg.env.solved_return = 1e9  # never reached: the full budget runs
    other = tmp_path / "unsolved"
    other.mkdir()
    cfg.run_dir = str(other)
    unsolved = Trainer(cfg, other)
    unsolved.run()
    assert unsolved.env_steps == 320


def test_bad_trainer_value_names_the_key(tmp_path):
    cfg = make_cfg(tmp_path, ["agent=random", "trainer.total_steps=-5"])
    with pytest.raises(ConfigError, match="trainer.total_steps"):
        Trainer(cfg, tmp_path)


def test_cuda_graph_under_torchrun_is_refused_at_start_up(tmp_path):
    cfg = make_cfg(tmp_path, ["agent=dreamer", "agent.cuda_graph=true"])
    with pytest.raises(ConfigError, match="agent.cuda_graph=true is not supported under torchrun"):
        Trainer(cfg, tmp_path, dist=DistInfo(rank=0, world_size=2, local_rank=0))


def test_checkpoint_errors(tmp_path, toy_agent):
    with pytest.raises(CheckpointError, match="not a yume run directory"):
        resolve_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="does not exist"):
        resolve_checkpoint(tmp_path / "nope")
    run = tmp_path / "run"
    run.mkdir()
    Trainer(toy_cfg(run, 60), run).run()
    with pytest.raises(CheckpointError, match="written by agent 'toy', not 'dreamer'"):
        load_checkpoint(checkpoint_path(run), agent_name="dreamer")
    with pytest.raises(CheckpointError, match="trained on env 'CartPole-v1'"):
        load_checkpoint(checkpoint_path(run), env_id="ALE/Pong-v5")
    checkpoint_path(run).write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(checkpoint_path(run))


@pytest.mark.skipif(
    not any(
        Path(d, "libc.so.6").exists() for d in ("/lib/x86_64-linux-gnu", "/lib/aarch64-linux-gnu")
    ),
    reason="glibc only",
)
def test_reuse_host_memory_keeps_freed_tensors_mapped():
    """After ``reuse_host_memory`` four 8 MB tensors freed and allocated again reuse their
    pages: 20 rounds cost ~4,000 page faults, where glibc's defaults trim the heap and fault
    ~160,000 times (20 x 4 x 2,048 fresh pages)."""
    import resource

    assert reuse_host_memory(OmegaConf.create({"reuse_host_memory": False})) is False
    with pytest.raises(ConfigError, match="reuse_host_memory must be true or false"):
        reuse_host_memory(OmegaConf.create({"reuse_host_memory": "yes"}))
    assert reuse_host_memory(OmegaConf.create({})) is True  # default on (configs saved before)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(20):
        live = [torch.ones(2 << 20) for _ in range(4)]  # 4 x 8 MB, freed together
        del live
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    assert faults < 16_384, faults
