"""Replay a whole training update as one CUDA graph (``agent.cuda_graph=true``).

On a GPU the update of a small model is bound by Python and kernel-launch overhead, not by
arithmetic: hundreds of small kernels, each launched from Python. A CUDA graph records those
launches once and replays them with one call (PyTorch docs, "CUDA Graphs", whole-network
capture). What the recorded update may not do, and the Dreamer update does not:

- synchronise with the host (``.item()``, ``bool(tensor)``, ``nonzero``, data-dependent shapes):
  ``tests/test_cuda_graph.py`` traces the update with ``make_fx``, which fails on any of these;
- keep state in Python that changes from one update to the next (a step counter, a lazily
  built tensor): the trace replayed on new batches must equal the eager updates;
- step optimisers whose step count lives on the host: Adam/AdamW are fused and
  ``capturable`` on CUDA (agents/actor_critic.py ``_adam``/``_adamw``);
- draw random numbers from a private generator (the default CUDA generator is captured).

Usage: ``step = GraphedUpdate(agent_update)``; ``metrics = step(batch)``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

Batch = dict[str, torch.Tensor]


class GraphedUpdate:
    """``update(batch) -> metrics`` as a CUDA graph, after ``warmup`` eager calls.

    The first ``warmup`` calls run eagerly on a side stream, so that lazily built state
    (optimiser moments, cuBLAS workspaces) exists before capture, which uses the same
    stream. The next call copies its batch into static buffers, records ``update`` on them
    and replays it; every later call copies its batch (same keys, shapes and dtypes: a
    replay batch [B, T, ...] always has them) into the buffers and replays. Metrics come
    back as fresh tensors (clones of the graph's outputs). ``reset()`` drops the graph:
    call it whenever parameters, optimiser state or buffers are replaced by new tensors (a
    checkpoint load), since the graph reads and writes the memory it was recorded with.
    """

    def __init__(
        self,
        update: Callable[[Batch], Batch],
        warmup: int = 3,
        device: torch.device | str | None = None,
    ) -> None:
        if warmup < 1:
            raise ValueError(f"GraphedUpdate needs at least one eager warm-up call, got {warmup}")
        self.update = update
        self.warmup = warmup
        self.device = torch.device(device) if device is not None else None  # None: current
        self.reset()

    def reset(self) -> None:
        """Forget the recorded graph; the next ``warmup`` calls run eagerly again."""
        self.calls = 0
        self.stream: torch.cuda.Stream | None = None  # warm-up and capture share one stream
        self.graph: torch.cuda.CUDAGraph | None = None
        self.inputs: Batch = {}
        self.outputs: Batch = {}

    @property
    def captured(self) -> bool:
        return self.graph is not None

    def __call__(self, batch: Batch) -> Batch:
        # stream and graph belong to the update's GPU (cuda:N need not be the current device)
        with torch.cuda.device(self.device):
            return self._call(batch)

    def _call(self, batch: Batch) -> Batch:
        if self.graph is None and self.calls < self.warmup:
            self.calls += 1
            if self.stream is None:
                self.stream = torch.cuda.Stream()
            self.stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self.stream):
                metrics = self.update(batch)
            torch.cuda.current_stream().wait_stream(self.stream)
            return metrics
        if self.graph is None:
            # the stream the warm-up ran on: per-stream library state (cuBLAS workspaces)
            # already exists there, so nothing is created lazily mid-capture
            self.inputs = {k: v.clone() for k, v in batch.items()}
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=self.stream):
                self.outputs = self.update(self.inputs)
            self.graph = graph  # capture recorded the update; the replay below runs it
        else:
            self._copy_in(batch)
        self.graph.replay()
        return {k: v.clone() for k, v in self.outputs.items()}

    def _copy_in(self, batch: Batch) -> None:
        if batch.keys() != self.inputs.keys():
            raise ValueError(
                f"a CUDA-graphed update needs the batch keys it was captured with: "
                f"{sorted(self.inputs)}, got {sorted(batch)}"
            )
        for key, value in batch.items():
            static = self.inputs[key]
            if value.shape != static.shape or value.dtype != static.dtype:
                raise ValueError(
                    f"a CUDA-graphed update needs static shapes: batch[{key!r}] was captured as "
                    f"{tuple(static.shape)} {static.dtype}, got {tuple(value.shape)} {value.dtype}"
                )
            static.copy_(value, non_blocking=True)
