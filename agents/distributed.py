"""Data-parallel training under ``torchrun``: every rank its own envs and replay shard.

Gradients are averaged over ranks as they are produced, by a post-accumulate hook on every
parameter of the agent's modules, so any agent whose ``update`` calls ``backward`` and then an
optimiser step is data-parallel without knowing it: the optimisers see identical averaged
gradients on every rank, and parameters (broadcast from rank 0 at start) stay identical.
Buffers that follow local data (e.g. the return normaliser) may differ slightly between ranks;
rank 0's are the ones checkpointed.

    torchrun --nproc_per_node=4 scripts/train.py run_dir=runs/ddp env=atari preset=dreamer_s

One all-reduce per parameter tensor is simple and exact; for many small tensors on fast GPUs a
bucketed all-reduce (as torch DDP does) would cut latency.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


SINGLE = DistInfo(rank=0, world_size=1, local_rank=0)


def init_from_env(device_type: str = "cpu") -> DistInfo:
    """Join the process group that ``torchrun`` describes in the environment (or run alone)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return SINGLE
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))


def agent_modules(agent: object) -> list[nn.Module]:
    """The top-level ``nn.Module`` attributes of an agent (world model, actor-critic, ...)."""
    return [v for v in vars(agent).values() if isinstance(v, nn.Module)]


def synchronise(modules: list[nn.Module], info: DistInfo) -> None:
    """Broadcast rank 0's parameters and buffers, then average every gradient over ranks."""
    if info.world_size <= 1:
        return
    world = info.world_size
    seen: set[int] = set()
    for module in modules:
        for tensor in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(tensor.data, src=0)
        for param in module.parameters():
            if id(param) in seen or not param.requires_grad:
                continue
            seen.add(id(param))

            def average(p: torch.Tensor) -> None:
                dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
                p.grad.div_(world)

            param.register_post_accumulate_grad_hook(average)


def broadcast_object(obj: object, info: DistInfo) -> object:
    """Rank 0's ``obj`` on every rank (e.g. the run directory)."""
    if info.world_size <= 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
