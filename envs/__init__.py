"""Making Gymnasium envs from config: wrappers, the Atari-100k protocol, state cloning.

``make_env(cfg)`` gives one env whose observations are dicts (``image`` uint8 [H, W, C] and/or
``vector`` float32 [D]) and whose Box actions are float32 in [-1, 1]; ``make_vector_env`` gives
N of them (autoreset NEXT_STEP). ``envs.state`` snapshots and restores an env exactly.
"""

from envs.errors import EnvError
from envs.make import FAMILIES, make_env, make_vector_env
from envs.state import get_state, get_vector_state, set_state, set_vector_state

__all__ = [
    "EnvError",
    "FAMILIES",
    "make_env",
    "make_vector_env",
    "get_state",
    "set_state",
    "get_vector_state",
    "set_vector_state",
]
