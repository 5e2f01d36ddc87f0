"""Data-parallel training under ``torchrun``: every rank its own envs and replay shard.

Gradients are averaged over ranks as they are produced, by a post-accumulate hook on every
parameter of the agent's modules, so any agent whose ``update`` calls ``backward`` and then an
optimiser step is data-parallel without knowing it: the optimisers see identical averaged
gradients on every rank, and parameters (broadcast from rank 0 at start) stay identical.
Buffers that follow local data (e.g. the return normaliser) may differ slightly between ranks;
each rank checkpoints its own (agents/trainer.py ``save``).

    torchrun --nproc_per_node=4 scripts/train.py run_dir=runs/ddp env=atari preset=dreamer_s

One all-reduce per parameter tensor is simple and exact; for many small tensors on fast GPUs a
bucketed all-reduce (as torch DDP does) would cut latency.

The training loop's own decisions (stop on a signal, stop when solved, checkpoint) must be taken
by every rank at the same step, or one rank waits forever in an all-reduce the others never
join: ``any_rank`` and ``barrier`` carry those on a host-side (gloo) group, so they never
synchronise with a GPU.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta

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

_control: dist.ProcessGroup | None = None  # host-side group for the loop's decisions


def init_from_env(device_type: str = "cpu", timeout: timedelta | None = None) -> DistInfo:
    """Join the process group that ``torchrun`` describes in the environment (or run alone).

    ``timeout``: how long a collective waits for the other ranks before failing (torch's
    default when None: 10 minutes for NCCL, 30 for gloo)."""
    global _control
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return SINGLE
    if not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, timeout=timeout)
    # every rank creates it, in the same order, as new_group requires
    gloo = dist.get_backend() == "gloo"
    _control = None if gloo else dist.new_group(backend="gloo", timeout=timeout)
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))


def any_rank(flags: Sequence[bool], info: DistInfo) -> list[bool]:
    """Each flag OR-ed over the ranks: what one rank saw (a signal, a solved evaluation) all
    act on at the same step. One tiny all-reduce on the host; alone, the flags themselves."""
    if info.world_size <= 1:
        return [bool(f) for f in flags]
    box = torch.tensor([int(bool(f)) for f in flags], dtype=torch.int32)
    dist.all_reduce(box, op=dist.ReduceOp.MAX, group=_control)
    return [bool(v) for v in box.tolist()]


def barrier(info: DistInfo) -> None:
    """Wait until every rank gets here (a no-op alone)."""
    if info.world_size > 1:
        dist.barrier(group=_control)


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
