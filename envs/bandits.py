"""Multi-armed bandit environments: a Gymnasium env for the trainer and a tensor testbed.

Three kinds of problem (Sutton & Barto, 2nd ed., §2.3 and exercise 2.5):

- ``gaussian``: q*(a) ~ N(offset, 1) once per problem, rewards ~ N(q*(a), reward_std²);
- ``bernoulli``: q*(a) ~ U(0, 1), rewards ~ Bernoulli(q*(a));
- ``walk``: q*(a) all start at ``offset`` and take independent random walks
  q*(a) += N(0, walk_std²) after every pull; rewards ~ N(q*(a), reward_std²).

``BanditTestbed`` runs R independent problems at once as tensors [R, A] (the 2000-run testbed).
``BanditEnv`` is one problem as a Gymnasium env: one constant observation, ``Discrete(A)``
actions, a fixed-length episode of ``episode_length`` pulls ending in truncation (never
termination), so the trainer treats each pull as a step. Its q* is fixed by ``problem_seed``
(not by ``reset(seed)``, which only seeds the reward noise), so training and evaluation envs
face the same arms.

Randomness is counter-based (``CounterRNG``): the k-th number a run draws is a hash of
(run key, draw counter, slot). A run's numbers never depend on how many other runs share the
tensor, so R runs stepped together equal the same R runs stepped one at a time with the same
seed, and the testbed costs a few tensor ops per step instead of R generator calls.
"""

from __future__ import annotations

import math
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from agents.config import ConfigError, check_choice, check_float, check_int

_M32 = 0xFFFFFFFF
_GOLDEN = 0x9E3779B9  # 2^32 / golden ratio: spreads slot indices over the 32-bit range

#: stream ids: the same seed gives independent numbers to the problem and to the policy
STREAM_ENV = 1
STREAM_POLICY = 2
STREAM_AGENT = 3

KINDS = ("gaussian", "bernoulli", "walk")


# ------------------------------------------------------------------------ hashing
def _mix_int(x: int) -> int:
    """lowbias32 (C. Wellons' hash-prospector): a 32-bit bijection with strong avalanche."""
    x &= _M32
    x ^= x >> 16
    x = (x * 0x7FEB352D) & _M32
    x ^= x >> 15
    x = (x * 0x846CA68B) & _M32
    return x ^ (x >> 16)


def _to_i32(x: int) -> int:
    """A 32-bit pattern in [0, 2^32) as the signed int32 with the same bits."""
    x &= _M32
    return x - (1 << 32) if x >= 1 << 31 else x


_C1 = torch.tensor(0x7FEB352D, dtype=torch.uint32)
_C2 = torch.tensor(0x846CA68B, dtype=torch.uint32)
# shift amounts and masks as 0-dim int32 tensors: python ints would be converted on every op
_SHIFT = {s: torch.tensor(s, dtype=torch.int32) for s in (8, 15, 16)}
_MASK = {s: torch.tensor((1 << (32 - s)) - 1, dtype=torch.int32) for s in (8, 15, 16)}


def _srl(x: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int32 bit patterns (torch's >> is arithmetic)."""
    return (x >> _SHIFT[s]) & _MASK[s]


def _mix(x: torch.Tensor) -> torch.Tensor:
    """``_mix_int`` on an int32 tensor of bit patterns. Products are taken as uint32, where
    overflow wraps by definition (signed overflow would be undefined behaviour)."""
    x = x ^ _srl(x, 16)
    x = (x.view(torch.uint32) * _C1).view(torch.int32)
    x = x ^ _srl(x, 15)
    x = (x.view(torch.uint32) * _C2).view(torch.int32)
    return x ^ _srl(x, 16)


def run_keys(seed: int, runs: int, stream: int, first_run: int = 0) -> torch.Tensor:
    """int32 [runs] keys of runs first_run .. first_run+runs-1 of (seed, stream)."""
    seed &= (1 << 64) - 1
    base = _mix_int(_mix_int(seed & _M32) ^ (seed >> 32))
    base = _mix_int(base ^ _mix_int(stream * _GOLDEN))
    index = (torch.arange(first_run, first_run + runs, dtype=torch.int64) + base) & _M32
    index = torch.where(index >= 1 << 31, index - (1 << 32), index).to(torch.int32)
    return _mix(index)


_HALF = torch.tensor(0.5)
_INV24 = torch.tensor(1.0 / (1 << 24))
_SQRT2 = torch.tensor(math.sqrt(2.0))
_ONE = torch.tensor(1.0)
_TWO = torch.tensor(2.0)


class CounterRNG:
    """Counter-based random numbers for R independent runs.

    Draw number ``counter`` of run r is ``b = hash(key[r] ^ hash(counter))`` for width 1, and
    ``hash(b ^ j*φ)`` in slot j for wider draws:
    a pure function of (key, counter, slot), so runs are independent of each other and of
    the batch they sit in. Each ``uniform``/``normal`` call advances the shared counter by one.
    Output has 24 random bits per number (float32 resolution); 32-bit hashing means two
    (run, draw) pairs out of ~2^16 collide by chance, which is harmless for Monte Carlo.
    """

    def __init__(self, keys: torch.Tensor, counter: int = 0):
        self.keys = keys.to(torch.int32)  # [R]
        self.counter = int(counter)
        self._slots: torch.Tensor | None = None

    @classmethod
    def seeded(cls, seed: int, runs: int, stream: int, first_run: int = 0) -> CounterRNG:
        return cls(run_keys(seed, runs, stream, first_run))

    @property
    def runs(self) -> int:
        return self.keys.shape[0]

    def run(self, r: int) -> CounterRNG:
        """Run r alone, at the same counter (for one-by-one checks)."""
        return CounterRNG(self.keys[r : r + 1].clone(), self.counter)

    def bits(self, width: int) -> torch.Tensor:
        """int32 [R, width] random bit patterns; advances the counter."""
        c = self.counter
        self.counter += 1
        cmix = torch.tensor(_to_i32(_mix_int(_mix_int(c & _M32) ^ (c >> 32))), dtype=torch.int32)
        base = _mix(self.keys ^ cmix)  # [R]
        if width == 1:  # one number per run: the base hash itself (half the work)
            return base[:, None]
        if self._slots is None or self._slots.shape[0] < width:
            slots = (torch.arange(max(width, 16), dtype=torch.int64) * _GOLDEN) & _M32
            slots = torch.where(slots >= 1 << 31, slots - (1 << 32), slots).to(torch.int32)
            self._slots = slots.to(self.keys.device)
        return _mix(base[:, None] ^ self._slots[:width])  # [R, width]

    def uniform(self, width: int) -> torch.Tensor:
        """float32 [R, width] in the open interval (0, 1): (k + 0.5) / 2^24."""
        return (_srl(self.bits(width), 8).float() + _HALF) * _INV24

    def normal(self, width: int) -> torch.Tensor:
        """float32 [R, width] standard normals by the inverse CDF (|z| <= 5.4)."""
        return _SQRT2 * torch.erfinv(_TWO * self.uniform(width) - _ONE)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"keys": self.keys.clone(), "counter": torch.tensor(self.counter)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if state["keys"].shape != self.keys.shape:
            raise ValueError(
                f"CounterRNG state holds {state['keys'].shape[0]} runs, expected {self.runs}"
            )
        self.keys = state["keys"].to(torch.int32).clone()
        self.counter = int(state["counter"])


# ------------------------------------------------------------------------ testbed
class BanditTestbed:
    """R independent bandit problems with A arms, stepped together (tensors on ``device``).

    ``q_star`` float64 [R, A]; ``pull(actions [R]) -> rewards float64 [R]``. Run r of a testbed
    with ``first_run=0`` is identical to the single run of ``BanditTestbed(1, ..., first_run=r)``.
    """

    def __init__(
        self,
        runs: int,
        arms: int = 10,
        kind: str = "gaussian",
        seed: int = 0,
        first_run: int = 0,
        offset: float = 0.0,
        reward_std: float = 1.0,
        walk_std: float = 0.01,
        device: torch.device | str = "cpu",
    ):
        if kind not in KINDS:
            raise ValueError(f"bandit kind must be one of {list(KINDS)}, got {kind!r}")
        if runs < 1 or arms < 1:
            raise ValueError(f"bandit testbed needs runs >= 1 and arms >= 1, got {runs}, {arms}")
        self.runs, self.arms, self.kind = runs, arms, kind
        self.reward_std, self.walk_std = float(reward_std), float(walk_std)
        self.device = torch.device(device)
        self.rng = CounterRNG.seeded(seed, runs, STREAM_ENV, first_run)
        if kind == "gaussian":
            q = offset + self.rng.normal(arms).double()
        elif kind == "bernoulli":
            q = self.rng.uniform(arms).double()
        else:
            self.rng.counter += 1  # keep the draw schedule of every kind alike
            q = torch.full((runs, arms), float(offset), dtype=torch.float64)
        self.q_star = q.to(self.device)  # [R, A]
        self.rng.keys = self.rng.keys.to(self.device)
        self.steps = 0

    @property
    def optimal_action(self) -> torch.Tensor:
        """int64 [R]: argmax of the current q* (first index on ties)."""
        return self.q_star.argmax(-1)

    def regret(self, actions: torch.Tensor) -> torch.Tensor:
        """float64 [R]: q*max - q*(action), the expected loss of this pull."""
        q_a = self.q_star.gather(-1, actions[:, None]).squeeze(-1)
        return self.q_star.max(-1).values - q_a

    def pull(self, actions: torch.Tensor) -> torch.Tensor:
        """Rewards float64 [R] for int64 actions [R]; the walk moves q* after the pull."""
        q_a = self.q_star.gather(-1, actions[:, None]).squeeze(-1)  # [R]
        if self.kind == "bernoulli":
            rewards = (self.rng.uniform(1)[:, 0].double() < q_a).double()
        else:
            rewards = q_a + self.reward_std * self.rng.normal(1)[:, 0].double()
        if self.kind == "walk":
            self.q_star += self.walk_std * self.rng.normal(self.arms).double()
        self.steps += 1
        return rewards


# ------------------------------------------------------------------------ Gymnasium
class BanditEnv(gym.Env):
    """One bandit problem as a Gymnasium env (see the module docstring for the kinds).

    Observation ``{"vector": float32 [1]}`` always 1.0; action ``Discrete(arms)``; an episode is
    ``episode_length`` pulls, then ``truncated=True``. ``reset`` restores q* to the problem's
    start (this matters only for ``walk``). ``info``: ``optimal_action`` and ``regret``.
    """

    metadata = {"render_modes": []}

    def __init__(
        self,
        arms: int = 10,
        kind: str = "gaussian",
        problem_seed: int = 0,
        episode_length: int = 1000,
        offset: float = 0.0,
        reward_std: float = 1.0,
        walk_std: float = 0.01,
        means: list[float] | None = None,
    ):
        if kind not in KINDS:
            raise ValueError(f"bandit kind must be one of {list(KINDS)}, got {kind!r}")
        if episode_length < 1:
            raise ValueError(f"bandit episode_length must be >= 1, got {episode_length}")
        if means is not None:
            start = np.asarray(means, np.float64)
            if start.ndim != 1 or start.size < 1:
                raise ValueError(f"bandit means must be a non-empty list, got {means!r}")
            if kind == "bernoulli" and not ((start >= 0) & (start <= 1)).all():
                raise ValueError(f"bernoulli bandit means must lie in [0, 1], got {means!r}")
        else:
            bed = BanditTestbed(1, arms, kind, problem_seed, offset=offset)
            start = bed.q_star[0].numpy()
        self.kind = kind
        self.start = start.copy()
        self.q_star = start.copy()
        self.arms = start.size
        self.episode_length = int(episode_length)
        self.reward_std, self.walk_std = float(reward_std), float(walk_std)
        self.t = 0
        self.observation_space = gym.spaces.Dict(
            {"vector": gym.spaces.Box(-np.inf, np.inf, (1,), np.float32)}
        )
        self.action_space = gym.spaces.Discrete(self.arms)

    def _obs(self) -> dict[str, np.ndarray]:
        return {"vector": np.ones(1, np.float32)}

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self.q_star = self.start.copy()
        self.t = 0
        return self._obs(), {"optimal_action": int(self.q_star.argmax())}

    def step(self, action: Any):
        a = int(action)
        if not 0 <= a < self.arms:
            raise ValueError(f"bandit action must be in [0, {self.arms}), got {action!r}")
        q = self.q_star
        info = {"optimal_action": int(q.argmax()), "regret": float(q.max() - q[a])}
        if self.kind == "bernoulli":
            reward = float(self.np_random.random() < q[a])
        else:
            reward = float(q[a] + self.reward_std * self.np_random.standard_normal())
        if self.kind == "walk":
            self.q_star = q + self.walk_std * self.np_random.standard_normal(self.arms)
        self.t += 1
        return self._obs(), reward, False, self.t >= self.episode_length, info

    def get_state(self) -> dict[str, Any]:
        """Everything to continue this env exactly (tensors and primitives, for checkpoints)."""
        return {
            "q_star": torch.from_numpy(self.q_star.copy()),
            "t": self.t,
            "np_random": self.np_random.bit_generator.state,
        }

    def set_state(self, state: dict[str, Any]) -> None:
        self.q_star = torch.as_tensor(state["q_star"]).numpy().astype(np.float64).copy()
        self.t = int(state["t"])
        self.np_random.bit_generator.state = state["np_random"]


ENV_ID = "yume/Bandit-v0"
if ENV_ID not in gym.registry:
    gym.register(ENV_ID, entry_point="envs.bandits:BanditEnv")


#: bandit keys (beyond the common env keys) and their defaults
BANDIT_KEYS: dict[str, Any] = {
    "kind": "gaussian",
    "arms": 10,
    "problem_seed": 0,
    "offset": 0.0,
    "reward_std": 1.0,
    "walk_std": 0.01,
    "means": None,
}
_COMMON_KEYS = {"family", "id", "name", "from_pixels", "size", "grayscale", "action_repeat"}
_COMMON_KEYS |= {"time_limit", "num_envs", "vector"}


def make_bandit_env(cfg: Any, seed: int | None = None) -> BanditEnv:
    """The env for ``env.family: bandit`` from the ``env`` subtree (DictConfig or dict; see
    configs/env/bandit.yaml): ``kind``, ``arms``, ``problem_seed``, ``offset``, ``reward_std``,
    ``walk_std``, ``means`` (null or a list overriding the drawn q*) and ``time_limit`` (pulls
    per episode, null = 1000). With ``seed`` the env is reset once with it (reward noise) and
    its action space seeded. Bad values raise ``ConfigError`` naming the key.
    """
    if isinstance(cfg, DictConfig):
        cfg = OmegaConf.to_container(cfg, resolve=True)
    unknown = sorted(set(cfg) - _COMMON_KEYS - set(BANDIT_KEYS))
    if unknown:
        raise ConfigError(
            f"unknown key(s) {', '.join('env.' + k for k in unknown)} for env.family=bandit; "
            f"known keys: {sorted(_COMMON_KEYS | set(BANDIT_KEYS))}"
        )
    c = {**BANDIT_KEYS, **cfg}
    if c.get("time_limit") is None:
        c["time_limit"] = 1000
    p = "env."
    kind = check_choice(c, "kind", KINDS, p)
    arms = check_int(c, "arms", p)
    problem_seed = check_int(c, "problem_seed", p, low=0)
    length = check_int(c, "time_limit", p)
    offset = check_float(c, "offset", p)
    reward_std = check_float(c, "reward_std", p, low=0.0)
    walk_std = check_float(c, "walk_std", p, low=0.0)
    means = c["means"]
    if means is not None:
        if not isinstance(means, (list, tuple)) or not means:
            raise ConfigError(f"env.means must be null or a non-empty list, got {means!r}")
        if not all(isinstance(m, (int, float)) and not isinstance(m, bool) for m in means):
            raise ConfigError(f"env.means must hold numbers, got {means!r}")
        if kind == "bernoulli" and not all(0 <= m <= 1 for m in means):
            raise ConfigError(f"env.means must lie in [0, 1] for kind=bernoulli, got {means}")
        if len(means) != arms:
            raise ConfigError(f"env.means has {len(means)} values but env.arms={arms}")
        means = [float(m) for m in means]
    env = BanditEnv(arms, kind, problem_seed, length, offset, reward_std, walk_std, means)
    if seed is not None:
        env.reset(seed=seed)
        env.action_space.seed(seed)
    return env
