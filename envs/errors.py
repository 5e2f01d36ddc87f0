"""The one error type the envs package raises for unusable envs."""

from __future__ import annotations


class EnvError(ValueError):
    """An env id, family or space that yume cannot use; the message says what is supported."""
