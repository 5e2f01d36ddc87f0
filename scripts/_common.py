"""Shared start-up for the entry points: resolvers, clean errors, resume config."""

from __future__ import annotations

import sys
from pathlib import Path

import yaml
from omegaconf import DictConfig, OmegaConf

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

from agents.checkpoint import CheckpointError, resolve_checkpoint  # noqa: E402
from agents.config import ConfigError  # noqa: E402

GROUPS = {"agent", "world_model", "env", "trainer", "logger", "preset", "experiment"}

OmegaConf.register_new_resolver(
    "yume_run_dir", lambda resume, default: resume if resume else default, replace=True
)


def user_errors() -> tuple[type[Exception], ...]:
    """Exceptions that are the user's input, reported as one line instead of a traceback."""
    from envs import EnvError

    return (ConfigError, CheckpointError, EnvError)


def run_cli(fn) -> None:
    """Call ``fn``; a user error prints 'error: ...' and exits with status 2."""
    try:
        fn()
    except user_errors() as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def resume_config(resume: str, overrides: list[str]) -> tuple[DictConfig, Path]:
    """The saved config of run ``resume`` with this command line's plain key=value overrides."""
    run_dir, _ = resolve_checkpoint(resume)
    cfg = OmegaConf.load(run_dir / "config.yaml")
    OmegaConf.set_struct(cfg, True)
    for override in overrides:
        key, _, value = override.lstrip("+~").partition("=")
        if key in ("resume", "run_dir") or key.startswith("hydra"):
            continue
        if key in GROUPS:
            raise ConfigError(
                f"cannot change config group '{key}' when resuming {run_dir}; "
                "start a new run instead"
            )
        try:
            OmegaConf.update(cfg, key, yaml.safe_load(value), merge=True)
        except Exception as e:  # omegaconf raises several types for unknown keys
            raise ConfigError(f"cannot override '{key}' when resuming: {e}") from e
    cfg.resume = str(run_dir)
    return cfg, run_dir
