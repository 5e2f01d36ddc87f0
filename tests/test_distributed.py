"""Data parallelism on CPU: two gloo ranks with different data keep identical parameters."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import torch
import torch.multiprocessing as mp

TESTS = str(Path(__file__).resolve().parent)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, run_dir: str, out_dir: str) -> None:
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
    info = init_from_env("cpu")
    trainer = Trainer(toy_cfg(Path(run_dir), 160), run_dir, dist=info)
    trainer.run()
    batch = trainer.replay.sample(4, 8)
    torch.save(
        {
            "w": trainer.agent.w.detach().contiguous(),
            "data": torch.from_numpy(batch["vector"]).sum(),
        },
        Path(out_dir) / f"rank{rank}.pt",
    )
    dist.destroy_process_group()


def test_two_ranks_stay_in_sync(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    mp.spawn(_worker, args=(2, _free_port(), str(run_dir), str(tmp_path)), nprocs=2, join=True)
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert not torch.equal(r0["data"], r1["data"])  # each rank collected its own experience
    assert torch.equal(r0["w"], r1["w"])  # ... yet the averaged gradients kept them identical
    assert r0["w"].abs().sum() > 0  # and they did learn
    assert (run_dir / "replay").is_dir() and (run_dir / "replay_rank1").is_dir()
    assert (run_dir / "checkpoints" / "latest.pt").is_file()  # written by rank 0 only
