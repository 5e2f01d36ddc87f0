"""Data parallelism on CPU: two gloo ranks keep identical parameters, stop together, resume."""

from __future__ import annotations

import os
import signal
import socket
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from test_trainer import read_metrics, toy_cfg

from agents.checkpoint import (
    CheckpointError,
    checkpoint_path,
    load_checkpoint,
    rank_checkpoint_path,
)
from agents.distributed import DistInfo
from agents.trainer import AGREE_EVERY, Trainer

TESTS = str(Path(__file__).resolve().parent)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(
    rank: int,
    world: int,
    port: int,
    run_dir: str,
    out_dir: str,
    total: int = 160,
    resume: bool = False,
    signal_rank1_at: int = 0,
    solved_return: float | None = None,
) -> None:
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    sys.path.insert(0, TESTS)
    torch.set_num_threads(1)
    import torch.distributed as dist
    from test_trainer import ToyAgent, toy_cfg

    import agents
    from agents.distributed import init_from_env
    from agents.trainer import Trainer

    agents.AGENTS["toy"] = lambda *a: ToyAgent(*a)
    info = init_from_env("cpu", timeout=timedelta(seconds=60))  # a hang fails the test
    cfg = toy_cfg(Path(run_dir), total)
    if solved_return is not None:  # rank 0 alone evaluates; every rank must stop with it
        cfg.trainer.stop_when_solved = True
        cfg.env.solved_return = solved_return
    trainer = Trainer(cfg, run_dir, resume=resume, dist=info)
    if signal_rank1_at and rank == 1:  # Ctrl-C reaching one rank only, mid-run
        collect = trainer._collect

        def collect_then_signal() -> None:
            collect()
            if trainer.env_steps == signal_rank1_at:
                os.kill(os.getpid(), signal.SIGTERM)

        trainer._collect = collect_then_signal
    trainer.run()
    batch = trainer.replay.sample(4, 8)
    torch.save(
        {
            "w": trainer.agent.w.detach().contiguous(),
            "data": torch.from_numpy(batch["vector"]).sum(),
            "env_steps": trainer.env_steps,
        },
        Path(out_dir) / f"rank{rank}.pt",
    )
    dist.destroy_process_group()


def _spawn(
    run_dir: Path,
    out_dir: Path,
    total: int = 160,
    resume: bool = False,
    signal_rank1_at: int = 0,
    solved_return: float | None = None,
) -> list[dict]:
    """Run the toy agent on 2 gloo ranks; returns each rank's final weights and data."""
    out_dir.mkdir(parents=True, exist_ok=True)
    args = (2, _free_port(), str(run_dir), str(out_dir), total, resume, signal_rank1_at)
    args += (solved_return,)
    mp.spawn(_worker, args=args, nprocs=2, join=True)
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=True) for r in range(2)]


def test_two_ranks_stay_in_sync(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    r0, r1 = _spawn(run_dir, tmp_path / "out")
    assert not torch.equal(r0["data"], r1["data"])  # each rank collected its own experience
    assert torch.equal(r0["w"], r1["w"])  # ... yet the averaged gradients kept them identical
    assert r0["w"].abs().sum() > 0  # and they did learn
    assert (run_dir / "replay").is_dir() and (run_dir / "replay_rank1").is_dir()
    ckpt = load_checkpoint(checkpoint_path(run_dir))
    assert ckpt["world_size"] == 2 and ckpt["env_steps"] == 160
    # rank 1's part of the final checkpoint, and only that one (80's was deleted on commit)
    parts = sorted(p.name for p in (run_dir / "checkpoints").glob("rank*"))
    assert parts == [rank_checkpoint_path(run_dir, 1, 160).name]


@pytest.mark.usefixtures("toy_agent")
def test_a_signal_or_a_solve_on_one_rank_stops_both_and_a_resume_equals_the_uninterrupted_run(
    tmp_path,
):
    full_dir, split_dir = tmp_path / "full", tmp_path / "split"
    full_dir.mkdir()
    split_dir.mkdir()
    full = _spawn(full_dir, tmp_path / "full_out", total=320)
    stopped = _spawn(split_dir, tmp_path / "stopped_out", total=320, signal_rank1_at=100)
    # rank 1 alone got SIGTERM at step 100: both ranks stopped at the next agreement (every
    # AGREE_EVERY iterations of 2 envs: step 128) and checkpointed there
    step = 2 * AGREE_EVERY * (100 // (2 * AGREE_EVERY) + 1)
    assert [r["env_steps"] for r in stopped] == [step, step]
    assert load_checkpoint(checkpoint_path(split_dir))["env_steps"] == step
    assert rank_checkpoint_path(split_dir, 1, step).is_file()

    resumed = _spawn(split_dir, tmp_path / "resumed_out", total=320, resume=True)
    for a, b in zip(full, resumed):  # every rank continued its own envs, replay and RNG
        assert a["env_steps"] == b["env_steps"] == 320
        assert torch.equal(a["w"], b["w"]) and torch.equal(a["data"], b["data"])
    assert read_metrics(full_dir) == read_metrics(split_dir)

    # a solved evaluation (rank 0's alone) stops both ranks at that step: the first, 80
    solved_dir = tmp_path / "solved"
    solved_dir.mkdir()
    solved = _spawn(solved_dir, tmp_path / "solved_out", total=320, solved_return=1.0)
    assert [r["env_steps"] for r in solved] == [80, 80]
    assert load_checkpoint(checkpoint_path(solved_dir))["env_steps"] == 80

    # one process may go on from a data-parallel run: rank 0's envs and replay shard continue
    alone = Trainer(toy_cfg(split_dir, 360), split_dir, resume=True)
    alone.run()
    assert alone.env_steps == 360


@pytest.mark.usefixtures("toy_agent")
def test_resuming_with_another_number_of_ranks_or_a_missing_part_is_refused(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    trainer = Trainer(toy_cfg(run_dir, 40), run_dir)
    trainer.run()
    ckpt = {**load_checkpoint(checkpoint_path(run_dir)), "world_size": 2}
    trainer.dist = DistInfo(rank=1, world_size=3, local_rank=1)
    with pytest.raises(CheckpointError, match="checkpointed by 2 process.*nproc_per_node=2"):
        trainer._load_own_state(ckpt)
    trainer.dist = DistInfo(rank=1, world_size=2, local_rank=1)
    with pytest.raises(CheckpointError, match="rank1-000000000040.pt is missing"):
        trainer._load_own_state(ckpt)
