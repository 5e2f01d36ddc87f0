"""The training loop shared by every agent: collect, store, learn, evaluate, log, checkpoint.

One loop iteration steps N parallel envs once (N env steps). Learning keeps DreamerV3's
``train_ratio``: replayed rows per env step, so after ``learning_starts`` the number of updates
done by env step s is ``(s - learning_starts) * train_ratio // (B * T)``.
"""

from __future__ import annotations

import ctypes
import random
import signal
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from agents import make_agent
from agents.base import Agent
from agents.checkpoint import (
    FORMAT,
    CheckpointError,
    atomic_torch_save,
    checkpoint_path,
    load_checkpoint,
    rank_checkpoint_path,
    remove_other_rank_checkpoints,
)
from agents.config import ConfigError, check_bool, check_int
from agents.distributed import SINGLE, DistInfo, agent_modules, any_rank, barrier, synchronise
from agents.evaluate import evaluate
from agents.logger import Logger
from agents.replay import Replay
from envs import make_vector_env


def select_device(name: str) -> torch.device:
    """``auto`` picks CUDA when present, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not isinstance(name, str) or not (name == "cpu" or name.startswith("cuda")):
        raise ConfigError(f"device must be auto, cpu, cuda or cuda:N, got {name!r}")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={name} but no CUDA device is available (use device=cpu)")
    return torch.device(name)


# Under torchrun the ranks agree whether to stop (a signal, a solved evaluation) after every
# evaluation and every AGREE_EVERY loop iterations: each agreement is an all-reduce on the host
# (0.36 ms for 2 gloo ranks on the 2-core dev VM; agreeing on every iteration halved CartPole
# collection there, 803 against 1,511 env steps/s per rank), so a signal takes effect up to 16
# iterations late instead.
AGREE_EVERY = 16

# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3


def reuse_host_memory(cfg: Any) -> bool:
    """Keep freed host memory in the process for reuse (``reuse_host_memory``, default true).

    A CPU update allocates and frees the same large tensors every step. By default glibc hands
    blocks above a few MB straight back to the kernel (mmap/munmap, heap trimming), and every
    fresh page then costs a page fault: 67,584 faults per size-XS update on the dev VM, and
    1.76 s instead of 1.36 s per update (docs/benchmarks.md). Raising the mmap threshold to
    glibc's maximum (32 MiB) and never trimming the heap keeps those pages mapped. The price
    is that the process keeps its peak heap. Returns whether it was applied (glibc only).
    """
    enabled = check_bool(cfg, "reuse_host_memory") if "reuse_host_memory" in cfg else True
    if not enabled:
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to tune
        return False
    ok = mallopt(_M_MMAP_THRESHOLD, 32 << 20) == 1
    ok &= mallopt(_M_TRIM_THRESHOLD, (1 << 31) - 1) == 1
    ok &= mallopt(_M_TOP_PAD, 64 << 20) == 1
    return bool(ok)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    state = {
        "python": random.getstate(),
        "numpy": _np_global_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _np_global_state() -> tuple:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)


def updates_due(
    env_steps: int, learning_starts: int, train_ratio: int, rows_per_update: int
) -> int:
    """Total updates that should have been done after ``env_steps`` env steps."""
    return max(0, env_steps - learning_starts) * train_ratio // rows_per_update


def to_torch(batch: dict[str, np.ndarray], device: torch.device) -> dict[str, torch.Tensor]:
    """A replay batch on the device: pinned memory and asynchronous copies on CUDA."""
    out = {}
    for key, value in batch.items():
        tensor = torch.from_numpy(np.ascontiguousarray(value))
        if device.type == "cuda":
            tensor = tensor.pin_memory().to(device, non_blocking=True)
        out[key] = tensor
    return out


def _to_tensors(tree: Any) -> Any:
    """numpy arrays -> tensors, recursively, so the checkpoint loads with weights_only."""
    if isinstance(tree, np.ndarray):
        return torch.from_numpy(tree.copy())
    if isinstance(tree, dict):
        return {k: _to_tensors(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_to_tensors(v) for v in tree)
    return tree


def _to_numpy(tree: Any) -> Any:
    if torch.is_tensor(tree):
        return tree.numpy()
    if isinstance(tree, dict):
        return {k: _to_numpy(v) for k, v in tree.items()}
    return tree


def validate_trainer(cfg: Any) -> None:
    t = cfg.trainer
    for key in ["total_steps", "train_ratio", "replay_capacity", "replay_chunk"]:
        check_int(t, key, "trainer.")
    for key in ["learning_starts", "eval_every", "checkpoint_every"]:
        check_int(t, key, "trainer.", low=0)
    check_int(t, "log_every", "trainer.")
    check_int(t, "eval_episodes", "trainer.", low=0)
    check_int(t, "eval_envs", "trainer.")
    for key in ["video", "progress", "eval_explore", "stop_when_solved", "replay_online"]:
        check_bool(t, key, "trainer.")
    check_int(cfg.env, "num_envs", "env.")
    if not isinstance(cfg.seed, int) or isinstance(cfg.seed, bool):
        raise ConfigError(f"seed must be an int, got {cfg.seed!r}")


class Trainer:
    """Runs one training job in ``run_dir``; ``resume=True`` continues from its checkpoint.

    Under ``torchrun`` (``dist`` from agents/distributed.py) every rank collects with its own
    envs into its own replay shard and gradients are averaged; rank 0 logs and evaluates, every
    rank checkpoints its own part, and all ranks stop at the same step.
    """

    def __init__(
        self, cfg: Any, run_dir: str | Path, resume: bool = False, dist: DistInfo = SINGLE
    ):
        validate_trainer(cfg)
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.dist = dist
        self.device = select_device(cfg.device)
        reuse_host_memory(cfg)
        if dist.world_size > 1 and self.device.type == "cuda":
            self.device = torch.device("cuda", dist.local_rank)
        if dist.world_size > 1 and cfg.agent.get("cuda_graph", False):
            raise ConfigError(
                "agent.cuda_graph=true is not supported under torchrun yet (the gradient "
                "all-reduce has not been checked inside a graph); run with agent.cuda_graph=false"
            )
        seed_everything(cfg.seed)  # identical initial weights on every rank
        rank_seed = cfg.seed + 10_007 * dist.rank
        self.num_envs = cfg.env.num_envs
        self.env = make_vector_env(cfg.env, self.num_envs, seed=rank_seed)
        self.obs_space = self.env.single_observation_space
        self.action_space = self.env.single_action_space
        self.agent: Agent = make_agent(cfg, self.obs_space, self.action_space, self.device)
        if dist.world_size > 1:
            synchronise(agent_modules(self.agent), dist)
            seed_everything(rank_seed)  # different exploration and sampling per rank
        self.replay = None
        if self.agent.learns:
            shard = "replay" if dist.is_main else f"replay_rank{dist.rank}"
            self.replay = Replay(
                capacity=cfg.trainer.replay_capacity,
                num_envs=self.num_envs,
                directory=self.run_dir / shard,
                chunk_size=cfg.trainer.replay_chunk,
                seed=rank_seed,
                online=self.agent.seq_len if cfg.trainer.replay_online else 0,
            )
        if hasattr(self.agent, "bind_env"):  # planners on the true simulator (MCTS)
            self.agent.bind_env(self.env)
        self.env_steps = 0
        self.updates = 0
        self.episodes = 0
        self.act_state = None
        self._reset_loop_state()
        if resume:
            self._restore()
        self.seed = rank_seed
        self.logger = Logger(
            cfg,
            self.run_dir,
            cfg.trainer.total_steps,
            self.env_steps,
            enabled=dist.is_main,
            wall_s=self._wall_s,
        )
        if resume and self._pending is not None and dist.is_main:
            for key, values in self._pending.items():
                self.logger._pending[key].extend(values)
        self._stop_signal: int | None = None

    # ----------------------------------------------------------------- state
    def _reset_loop_state(self) -> None:
        obs, _ = self.env.reset(seed=self.cfg.seed + 10_007 * self.dist.rank)
        n = self.num_envs
        self.obs = obs
        self.reward = np.zeros(n, np.float32)
        self.is_first = np.ones(n, bool)
        self.is_terminal = np.zeros(n, bool)
        self.is_truncated = np.zeros(n, bool)
        self.ep_return = np.zeros(n, np.float64)
        self.ep_length = np.zeros(n, np.int64)
        self.last_return = float("nan")
        self._pending = None
        self._wall_s = 0.0

    def _env_state(self) -> Any:
        from envs.state import get_vector_state

        try:
            return get_vector_state(self.env)
        except (NotImplementedError, TypeError, ValueError, AttributeError):
            return None

    def _own_state(self) -> dict[str, Any]:
        """This process's part of a checkpoint: agent, replay, RNG, envs and loop state."""
        if self.replay is not None:
            self.replay.flush()
        return {
            "format": FORMAT,
            "agent_name": self.cfg.agent.name,
            "env_id": self.cfg.env.id,
            "env_steps": self.env_steps,
            "updates": self.updates,
            "episodes": self.episodes,
            "agent": self.agent.state_dict(),
            "replay": None if self.replay is None else self.replay.state_dict(),
            "rng": rng_state(),
            "env_state": self._env_state(),
            "loop": _to_tensors(
                {
                    "obs": dict(self.obs),
                    "reward": self.reward,
                    "is_first": self.is_first,
                    "is_terminal": self.is_terminal,
                    "is_truncated": self.is_truncated,
                    "ep_return": self.ep_return,
                    "ep_length": self.ep_length,
                    "last_return": self.last_return,
                }
            ),
            "act_state": _to_tensors(self.act_state),
        }

    def save(self) -> Path:
        """Checkpoint everything a resumed run needs, in atomic writes; returns ``latest.pt``.

        Under ``torchrun`` (every rank calls this at the same step) each rank r >= 1 first writes
        its own part, ``rank{r}-{env_steps}.pt``; once all have, rank 0 writes ``latest.pt``,
        which names the step and so commits the set. A crash before that leaves the previous
        set whole; the parts it no longer names are deleted after the commit.
        """
        own = self._own_state()
        path = checkpoint_path(self.run_dir)
        part = rank_checkpoint_path(self.run_dir, self.dist.rank, self.env_steps)
        if not self.dist.is_main:
            atomic_torch_save(own, part)
        barrier(self.dist)
        if self.dist.is_main:
            metrics_path = self.run_dir / "metrics.jsonl"
            payload = {
                **own,
                "world_size": self.dist.world_size,
                "pending_metrics": {k: list(v) for k, v in self.logger._pending.items()},
                "metrics_bytes": metrics_path.stat().st_size if metrics_path.exists() else 0,
                "wall_s": self.logger.wall_s(),
            }
            atomic_torch_save(payload, path)
        barrier(self.dist)
        if not self.dist.is_main:
            remove_other_rank_checkpoints(self.run_dir, self.dist.rank, keep=part)
        return path

    def _load_own_state(self, ckpt: dict[str, Any]) -> dict[str, Any]:
        """This rank's part of the checkpoint whose ``latest.pt`` is ``ckpt``."""
        saved_world = int(ckpt.get("world_size", 1))  # absent before data-parallel resume
        world = self.dist.world_size
        if world == 1:  # alone, rank 0's envs and replay continue (also for a torchrun run)
            return ckpt
        if saved_world != world:
            raise CheckpointError(
                f"run {self.run_dir} was checkpointed by {saved_world} process(es), not {world}: "
                f"resume it with torchrun --nproc_per_node={saved_world}, or on one process "
                "(rank 0's envs and replay shard continue)"
            )
        if self.dist.is_main:
            return ckpt
        path = rank_checkpoint_path(self.run_dir, self.dist.rank, ckpt["env_steps"])
        if not path.is_file():
            raise CheckpointError(
                f"{path} is missing: rank {self.dist.rank}'s part of the checkpoint at "
                f"{ckpt['env_steps']} env steps (copy the run directory with its checkpoints/)"
            )
        return load_checkpoint(path, agent_name=self.cfg.agent.name, env_id=self.cfg.env.id)

    def _restore(self) -> None:
        ckpt = load_checkpoint(
            checkpoint_path(self.run_dir), agent_name=self.cfg.agent.name, env_id=self.cfg.env.id
        )
        own = self._load_own_state(ckpt)
        self.env_steps, self.updates = own["env_steps"], own["updates"]
        self.episodes = own["episodes"]
        self.agent.load_state_dict(own["agent"])
        if self.replay is not None:
            self.replay.load_state_dict(own["replay"])
        set_rng_state(own["rng"])
        restored_env = False
        if own["env_state"] is not None:
            from envs.state import set_vector_state

            set_vector_state(self.env, own["env_state"])
            restored_env = True
        loop = _to_numpy(own["loop"])
        if restored_env:
            self.obs = loop["obs"]
            self.reward, self.is_first = loop["reward"], loop["is_first"]
            self.is_terminal, self.is_truncated = loop["is_terminal"], loop["is_truncated"]
            self.ep_return, self.ep_length = loop["ep_return"], loop["ep_length"]
            self.act_state = own["act_state"]
        else:  # envs whose state cannot be captured restart their episodes
            obs, _ = self.env.reset(seed=self.cfg.seed + 10_007 * self.dist.rank + self.env_steps)
            self.obs = obs
            self.act_state = None
        self.last_return = float(loop["last_return"])
        self._pending = ckpt["pending_metrics"]
        self._wall_s = float(ckpt.get("wall_s", 0.0))  # absent in checkpoints before it
        metrics_path = self.run_dir / "metrics.jsonl"
        if self.dist.is_main and metrics_path.exists():
            with open(metrics_path, "r+b") as f:  # drop rows logged after it (and torn lines)
                f.truncate(ckpt["metrics_bytes"])

    # ------------------------------------------------------------------ loop
    def _collect(self) -> None:
        """Act in every env once and store the rows (DreamerV3 row convention)."""
        obs = {**self.obs, "is_first": self.is_first}
        actions, self.act_state = self.agent.act(obs, self.act_state, explore=True)
        is_last = self.is_terminal | self.is_truncated
        if self.replay is not None:
            self.replay.add(
                {
                    **self.obs,
                    "action": actions,
                    "reward": self.reward,
                    "is_first": self.is_first,
                    "is_terminal": self.is_terminal,
                    "is_truncated": self.is_truncated,
                    "is_last": is_last,
                }
            )
        obs, reward, terminated, truncated, info = self.env.step(actions)
        valid = ~is_last  # after a last row the env autoresets and ignored the action
        self.agent.observe(reward, terminated, truncated, valid)
        life_loss = info.get("life_loss", np.zeros(self.num_envs, bool))
        self.obs = obs
        self.reward = np.where(valid, reward, 0.0).astype(np.float32)
        self.is_first = is_last.copy()
        self.is_terminal = np.asarray(terminated, bool) | (np.asarray(life_loss, bool) & valid)
        self.is_truncated = np.asarray(truncated, bool)
        self.ep_return += np.where(valid, reward, 0.0)
        self.ep_length += valid
        done = valid & (np.asarray(terminated) | np.asarray(truncated))
        for i in np.flatnonzero(done):
            self.logger.add({"episode/return": float(self.ep_return[i])})
            self.logger.add({"episode/length": float(self.ep_length[i])})
            self.last_return = float(self.ep_return[i])
            self.ep_return[i], self.ep_length[i] = 0.0, 0
            self.episodes += 1
        self.env_steps += self.num_envs

    def _learn(self) -> None:
        t = self.cfg.trainer
        if self.replay is None or self.env_steps < t.learning_starts:
            return
        batch_size, seq_len = self.agent.batch_size, self.agent.seq_len
        if not self.replay.can_sample(seq_len):
            return
        due = updates_due(self.env_steps, t.learning_starts, t.train_ratio, batch_size * seq_len)
        done = 0
        while self.updates < due:
            batch = to_torch(self.replay.sample(batch_size, seq_len), self.device)
            self.logger.add(self.agent.update(batch), prefix="train/")
            self.updates += 1
            done += 1
        self.logger.count_updates(done)

    def evaluate(self) -> dict[str, float]:
        t = self.cfg.trainer
        start = time.perf_counter()
        video = None
        if t.video and "image" in self.obs_space.spaces:
            video = self.run_dir / "videos" / f"eval_{self.env_steps:09d}.mp4"
        result = evaluate(
            self.agent,
            self.cfg.env,
            episodes=t.eval_episodes,
            num_envs=t.eval_envs,
            seed=self.cfg.seed + 1_000_003,
            explore=t.eval_explore,
            video_path=video,
        )
        if hasattr(self.agent, "bind_env"):  # evaluation bound the planner to its own env
            self.agent.bind_env(self.env)
        if video is not None and video.exists():
            self.logger.log_video(video, self.env_steps)
        return {
            "eval/return_mean": result["return_mean"],
            "eval/return_std": result["return_std"],
            "eval/length_mean": result["length_mean"],
            "perf/eval_s": time.perf_counter() - start,
        }

    def _due(self, every: int) -> bool:
        return every > 0 and self.env_steps % every < self.num_envs

    def _on_signal(self, signum, frame) -> None:
        self._stop_signal = signum

    def _solved(self, eval_return: float) -> bool:
        """Whether this evaluation ends the run (``trainer.stop_when_solved``)."""
        target = self.cfg.env.get("solved_return")
        if not self.cfg.trainer.stop_when_solved or target is None:
            return False
        return eval_return >= target

    def run(self) -> dict[str, float]:
        """Train until ``trainer.total_steps`` (or solved); returns the last logged row."""
        t = self.cfg.trainer
        handlers = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        last: dict[str, float] = {}
        solved = stopping = False
        try:
            while self.env_steps < t.total_steps and not stopping and not solved:
                self._collect()
                self._learn()
                extra = {}
                final = self.env_steps >= t.total_steps
                evaluating = t.eval_episodes > 0 and (self._due(t.eval_every) or final)
                if self.dist.is_main and evaluating:
                    extra = self.evaluate()
                    score = extra["eval/return_mean"]
                    solved = self._solved(score)
                if self.dist.world_size == 1:
                    stopping = self._stop_signal is not None
                elif evaluating or (self.env_steps // self.num_envs) % AGREE_EVERY == 0:
                    # a signal or a solved evaluation on one rank stops every rank at this step
                    stopping, solved = any_rank([self._stop_signal is not None, solved], self.dist)
                if self._due(t.log_every) or final or extra:
                    extra.update(
                        {
                            "progress/updates": float(self.updates),
                            "progress/episodes": float(self.episodes),
                        }
                    )
                    last = self.logger.write(self.env_steps, extra)
                if self._due(t.checkpoint_every) and not (final or solved or stopping):
                    self.save()
                self.logger.progress(self.env_steps, self.last_return, self.updates)
            if solved and self.dist.is_main:
                print(
                    f"solved: eval return {score:.1f} >= "
                    f"env.solved_return={self.cfg.env.solved_return} at {self.env_steps} env steps"
                    f" ({self.logger.wall_s() / 60:.1f} min)"
                )
            self.save()
        finally:
            for s, h in handlers.items():
                signal.signal(s, h)
            self.logger.close()
            self.env.close()
        return last
