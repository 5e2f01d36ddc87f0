"""Checkpoints: written atomically, read with ``torch.load(weights_only=True)``.

A run directory holds ``config.yaml`` (the resolved config, the source of truth for resume and
eval), ``metrics.jsonl``, ``checkpoints/latest.pt``, ``replay/`` and ``videos/``. A data-parallel
run adds, per rank r >= 1, ``replay_rank{r}/`` and ``checkpoints/rank{r}-{env_steps}.pt`` (that
rank's envs, replay state, RNG and agent at the step ``latest.pt`` names).
"""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

FORMAT = "yume-checkpoint-v1"
CHECKPOINT_NAME = "latest.pt"


class CheckpointError(RuntimeError):
    """A checkpoint or run directory is missing, corrupt or belongs to another agent/env."""


def atomic_torch_save(obj: Any, path: Path) -> None:
    """Write ``obj`` to ``path`` so that a crash leaves either the old file or the new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def checkpoint_path(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints" / CHECKPOINT_NAME


def rank_checkpoint_path(run_dir: Path, rank: int, env_steps: int) -> Path:
    """Rank ``rank``'s part of the data-parallel checkpoint taken at ``env_steps``."""
    return Path(run_dir) / "checkpoints" / f"rank{rank}-{env_steps:012d}.pt"


def remove_other_rank_checkpoints(run_dir: Path, rank: int, keep: Path) -> None:
    """Delete rank ``rank``'s checkpoint parts other than ``keep`` (older or uncommitted)."""
    for path in (Path(run_dir) / "checkpoints").glob(f"rank{rank}-*.pt"):
        if path != keep:
            path.unlink(missing_ok=True)


def is_run_dir(path: Path) -> bool:
    return (Path(path) / "config.yaml").is_file()


def resolve_checkpoint(path: str | Path) -> tuple[Path, Path]:
    """Accept a run directory or a checkpoint file; return (run_dir, checkpoint file)."""
    path = Path(path)
    if path.is_file():
        run_dir = path.parent.parent
        if not is_run_dir(run_dir):
            raise CheckpointError(
                f"{path} is a file but not inside a yume run directory "
                f"(expected {run_dir / 'config.yaml'})"
            )
        return run_dir, path
    if not path.exists():
        raise CheckpointError(f"run directory or checkpoint '{path}' does not exist")
    if not is_run_dir(path):
        raise CheckpointError(
            f"'{path}' is not a yume run directory: it has no config.yaml "
            "(pass the directory printed at the start of a training run)"
        )
    ckpt = checkpoint_path(path)
    if not ckpt.is_file():
        raise CheckpointError(
            f"run directory '{path}' has no checkpoint yet ({ckpt} is missing); "
            "the run stopped before its first save"
        )
    return path, ckpt


def load_checkpoint(
    path: Path, agent_name: str | None = None, env_id: str | None = None
) -> dict[str, Any]:
    """Load and check a checkpoint; mismatched agent or env raise one clear error."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, zipfile.BadZipFile, RuntimeError, EOFError, OSError) as e:
        raise CheckpointError(
            f"checkpoint {path} is corrupt or not a yume checkpoint ({type(e).__name__}: {e})"
        ) from e
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path} is not a {FORMAT} file")
    if agent_name is not None and payload["agent_name"] != agent_name:
        raise CheckpointError(
            f"checkpoint {path} was written by agent '{payload['agent_name']}', not '{agent_name}'"
        )
    if env_id is not None and payload["env_id"] != env_id:
        raise CheckpointError(
            f"checkpoint {path} was trained on env '{payload['env_id']}', not '{env_id}'"
        )
    return payload
