"""Shared world models: RSSM (Dreamer), VAE + MDN-RNN (World Models), IRIS transformer.

``make_world_model(cfg.world_model, obs_space, action_dim)`` builds the one named by
``cfg.world_model.name``; each family registers itself in ``WORLD_MODELS`` below.
"""

from __future__ import annotations

import importlib
from typing import Any

import gymnasium as gym

from agents.config import ConfigError
from world_models.base import WorldModel

WORLD_MODELS: dict[str, str] = {
    # name -> "module:Class"; the class is built as Class(cfg_world_model, obs_space, action_dim).
    # Imported lazily, so one family's import cost or error never touches the others.
    "rssm": "world_models.rssm:RSSM",
    "transformer": "world_models.iris:IrisWorldModel",
    "vae_mdnrnn": "world_models.vae_mdnrnn:VaeMdnRnn",
}


def make_world_model(
    cfg_world_model: Any, obs_space: gym.spaces.Dict, action_dim: int
) -> WorldModel:
    """The world model named by ``cfg_world_model.name``, validated against its config subtree."""
    try:
        name = cfg_world_model["name"]
    except (KeyError, TypeError) as e:
        raise ConfigError(
            f"missing config key 'world_model.name'; known: {sorted(WORLD_MODELS)}"
        ) from e
    if name not in WORLD_MODELS:
        raise ConfigError(f"world_model.name must be one of {sorted(WORLD_MODELS)}, got {name!r}")
    module, cls = WORLD_MODELS[name].split(":")
    return getattr(importlib.import_module(module), cls)(cfg_world_model, obs_space, action_dim)
