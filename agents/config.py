"""Start-up validation of config values: every bad value fails with the key it came from."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


class ConfigError(ValueError):
    """A config value is missing, of the wrong type or out of range; the message names the key."""


def _get(cfg: Any, key: str, prefix: str = "") -> Any:
    node = cfg
    for part in key.split("."):
        try:
            node = node[part]
        except (KeyError, TypeError, AttributeError) as e:
            raise ConfigError(f"missing config key '{prefix}{key}'") from e
    return node


def check_int(cfg: Any, key: str, prefix: str = "", low: int | None = 1) -> int:
    """``cfg[key]`` as an int >= ``low``; ``prefix`` is the subtree's name for the message."""
    value = _get(cfg, key, prefix)
    if isinstance(value, bool) or not isinstance(value, int) or (low is not None and value < low):
        bound = f" >= {low}" if low is not None else ""
        raise ConfigError(f"{prefix}{key} must be an int{bound}, got {value!r}")
    return value


def check_float(
    cfg: Any, key: str, prefix: str = "", low: float | None = None, high: float | None = None
) -> float:
    """``cfg[key]`` as a float in [low, high]."""
    value = _get(cfg, key, prefix)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{prefix}{key} must be a number, got {value!r}")
    if (low is not None and value < low) or (high is not None and value > high):
        raise ConfigError(f"{prefix}{key} must be in [{low}, {high}], got {value!r}")
    return float(value)


def check_choice(cfg: Any, key: str, choices: Iterable[Any], prefix: str = "") -> Any:
    """``cfg[key]`` as one of ``choices``."""
    value = _get(cfg, key, prefix)
    choices = list(choices)
    if value not in choices:
        raise ConfigError(f"{prefix}{key} must be one of {choices}, got {value!r}")
    return value


def check_bool(cfg: Any, key: str, prefix: str = "") -> bool:
    value = _get(cfg, key, prefix)
    if not isinstance(value, bool):
        raise ConfigError(f"{prefix}{key} must be true or false, got {value!r}")
    return value


def env_label(env_id: str) -> str:
    """A short run-directory label for an env id: ``ALE/Pong-v5`` -> ``pong``."""
    name = str(env_id).split("/")[-1]
    name = name.rsplit("-v", 1)[0] if "-v" in name else name
    return name.lower().replace("noframeskip", "")


def _register_resolvers() -> None:
    from omegaconf import OmegaConf

    OmegaConf.register_new_resolver("yume_env_name", env_label, replace=True)


_register_resolvers()
