"""Bandit policies for R independent runs at once, and the Agent adapter for the trainer.

Every policy keeps its statistics as float64 tensors [R, A] (R runs, A arms) and offers

- ``select(rng) -> actions`` int64 [R]: the exploring choice;
- ``greedy(rng) -> actions`` int64 [R]: argmax of ``values()`` (ties broken at random);
- ``update(actions [R], rewards [R])``: learn from one pull per run.

All randomness comes from a ``CounterRNG`` (envs/bandits.py): a run's random numbers are a
hash of (its key, draw counter, slot), so they do not depend on the other runs in the batch.
Each ``select`` draws the same number of values whatever the state, hence R runs stepped
together give exactly the runs stepped one at a time with ``rng.run(r)``. Ties in argmax are
broken uniformly at random (Sutton & Barto's convention), with one uniform per run.

References: Sutton & Barto (2nd ed.) ch. 2; Auer et al. 2002 (UCB1, EXP3); Garivier & Cappé
2011 (KL-UCB); Garivier & Moulines 2011 (discounted UCB); Agrawal & Goyal 2012 (Thompson).
"""

from __future__ import annotations

import math
from typing import Any

import gymnasium as gym
import numpy as np
import torch

from agents.base import Agent
from agents.config import ConfigError, check_bool, check_choice, check_float
from agents.ucb import ucb_score
from envs.bandits import STREAM_AGENT, CounterRNG

F64 = torch.float64


# ------------------------------------------------------------------------ helpers
def argmax_random_ties(x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Index [R] of a maximum of x [R, A], uniform among ties; u [R] float64 uniforms in [0, 1)."""
    tied = x == x.amax(-1, keepdim=True)  # [R, A]
    k = (u * tied.sum(-1)).long()  # [R] which tied arm, 0-based (u < 1 so k < #tied)
    return (tied.cumsum(-1) <= k[:, None]).sum(-1)  # index of the (k+1)-th tied arm


def sample_categorical(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF sample [R] from probs [R, A] with one uniform per run u [R]."""
    idx = (probs.cumsum(-1) < u[:, None]).sum(-1)
    return idx.clamp_max(probs.shape[-1] - 1)


def _scale01(rewards: torch.Tensor, low: float, high: float) -> torch.Tensor:
    return ((rewards - low) / (high - low)).clamp(0.0, 1.0)


def _bernoulli_kl(p: torch.Tensor, q: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """KL(Bernoulli(p) || Bernoulli(q)), elementwise."""
    pc, qc = p.clamp(eps, 1 - eps), q.clamp(eps, 1 - eps)
    return p * (pc / qc).log() + (1 - p) * ((1 - pc) / (1 - qc)).log()


def _gamma_mt(a: torch.Tensor, z: torch.Tensor, u: torch.Tensor, ub: torch.Tensor) -> torch.Tensor:
    """Gamma(a, 1) samples [R, A] by Marsaglia & Tsang (2000) with K fixed tries.

    a [R, A] > 0; z, u [R, A, K] normals / uniforms for the tries; ub [R, A] uniforms for the
    a < 1 boost Gamma(a) = Gamma(a + 1) * U^(1/a). The first accepted try is used; if all K
    are rejected (probability < 0.05^K) the last candidate d*v, a Wilson-Hilferty
    approximation, stands in, so the draw count stays fixed.
    """
    small = a < 1
    a1 = torch.where(small, a + 1, a)
    d = (a1 - 1.0 / 3.0)[..., None]  # [R, A, 1]
    c = 1.0 / (9.0 * d).sqrt()
    v = (1 + c * z) ** 3  # [R, A, K]
    pos = v > 0
    v_safe = torch.where(pos, v, torch.ones_like(v))
    ok = pos & (u.log() < 0.5 * z * z + d - d * v_safe + d * v_safe.log())
    k_last = z.shape[-1] - 1
    idx = torch.where(ok.any(-1), ok.int().argmax(-1), k_last)  # first accepted try
    g = (d * v_safe).gather(-1, idx[..., None]).squeeze(-1)  # [R, A]
    return torch.where(small, g * ub ** (1.0 / a), g)


# ------------------------------------------------------------------------ policies
class BanditPolicy:
    """Base: R runs x A arms; subclasses define ``select``, ``_update``, ``values``."""

    #: names of the tensor attributes saved by state_dict
    _state: tuple[str, ...] = ()

    def __init__(self, runs: int, arms: int, device: torch.device | str = "cpu"):
        if runs < 1 or arms < 1:
            raise ValueError(f"a bandit policy needs runs >= 1 and arms >= 1, got {runs}, {arms}")
        self.runs, self.arms = runs, arms
        self.device = torch.device(device)
        self.t = 0  # updates done (the same for every run)

    def _zeros(self) -> torch.Tensor:
        return torch.zeros(self.runs, self.arms, dtype=F64, device=self.device)

    def select(self, rng: CounterRNG) -> torch.Tensor:
        raise NotImplementedError

    def values(self) -> torch.Tensor:
        """float64 [R, A]: the current estimate of each arm's value (for greedy acting)."""
        raise NotImplementedError

    def greedy(self, rng: CounterRNG) -> torch.Tensor:
        return argmax_random_ties(self.values(), rng.uniform(1)[:, 0].to(self.device))

    def update(self, actions: torch.Tensor, rewards: torch.Tensor) -> None:
        """One pull per run: actions int64 [R], rewards [R]."""
        self._update(actions.to(self.device).long(), rewards.to(self.device, F64))
        self.t += 1

    def _update(self, actions: torch.Tensor, rewards: torch.Tensor) -> None:
        raise NotImplementedError

    def _u(self, rng: CounterRNG, width: int) -> torch.Tensor:
        return rng.uniform(width).to(self.device, F64)

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {name: getattr(self, name).clone() for name in self._state}
        state["t"] = torch.tensor(self.t)
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for name in self._state:
            mine = getattr(self, name)
            if name not in state or state[name].shape != mine.shape:
                got = tuple(state[name].shape) if name in state else "nothing"
                raise ValueError(
                    f"{type(self).__name__} state '{name}': expected shape "
                    f"{tuple(mine.shape)} (runs, arms), got {got}"
                )
            setattr(self, name, state[name].to(self.device, mine.dtype).clone())
        self.t = int(state["t"])


def _gather(x: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
    return x.gather(-1, actions[:, None]).squeeze(-1)


def _add_at(x: torch.Tensor, actions: torch.Tensor, values: torch.Tensor) -> None:
    x.scatter_add_(-1, actions[:, None], values[:, None])


class EpsilonGreedy(BanditPolicy):
    """ε-greedy on action values (S&B §2.2-2.6). ``step_size=None``: sample averages
    Q += (R - Q) / N; else the constant step Q += α (R - Q). ``initial`` is Q1 (optimism);
    ``epsilon=0`` is the greedy policy. Draws 3 uniforms: explore coin, random arm, tie."""

    _state = ("q", "n")

    def __init__(self, runs, arms, epsilon=0.1, initial=0.0, step_size=None, device="cpu"):
        super().__init__(runs, arms, device)
        self.epsilon, self.step_size = float(epsilon), step_size
        self.q = self._zeros() + float(initial)  # [R, A]
        self.n = self._zeros()  # [R, A] pulls

    def values(self) -> torch.Tensor:
        return self.q

    def select(self, rng: CounterRNG) -> torch.Tensor:
        u = self._u(rng, 3)  # [R, 3]
        explore = u[:, 0] < self.epsilon
        random_arm = (u[:, 1] * self.arms).long().clamp_max(self.arms - 1)
        return torch.where(explore, random_arm, argmax_random_ties(self.q, u[:, 2]))

    def _update(self, actions, rewards):
        _add_at(self.n, actions, torch.ones_like(rewards))
        q_a = _gather(self.q, actions)
        alpha = 1.0 / _gather(self.n, actions) if self.step_size is None else self.step_size
        _add_at(self.q, actions, alpha * (rewards - q_a))


class UCB1(BanditPolicy):
    """Sample averages plus the UCB bonus (agents/ucb.py) at time t = pulls + 1 (S&B eq. 2.10):
    every arm is pulled once first (unvisited scores +inf), then argmax Q + c sqrt(ln t / N)."""

    _state = ("q", "n")

    def __init__(self, runs, arms, c=2.0, device="cpu"):
        super().__init__(runs, arms, device)
        self.c = float(c)
        self.q, self.n = self._zeros(), self._zeros()

    def values(self) -> torch.Tensor:
        return self.q

    def scores(self) -> torch.Tensor:
        return ucb_score(self.q, self.n, float(self.t + 1), self.c)

    def select(self, rng: CounterRNG) -> torch.Tensor:
        return argmax_random_ties(self.scores(), self._u(rng, 1)[:, 0])

    def _update(self, actions, rewards):
        _add_at(self.n, actions, torch.ones_like(rewards))
        q_a = _gather(self.q, actions)
        _add_at(self.q, actions, (rewards - q_a) / _gather(self.n, actions))


class KLUCB(BanditPolicy):
    """KL-UCB for rewards in [low, high] (rescaled to [0, 1]; Garivier & Cappé 2011): the
    index is max{q >= mean: N kl(mean, q) <= ln t + c ln ln t}, found by ``iters`` bisection
    steps (precision 2^-iters); unvisited arms score +inf."""

    _state = ("s", "n")

    def __init__(self, runs, arms, c=0.0, low=0.0, high=1.0, iters=25, device="cpu"):
        super().__init__(runs, arms, device)
        self.c, self.low, self.high, self.iters = float(c), float(low), float(high), int(iters)
        self.s, self.n = self._zeros(), self._zeros()  # reward sums in [0, 1] scale, pulls

    def values(self) -> torch.Tensor:
        return self.s / self.n.clamp_min(1.0)

    def scores(self) -> torch.Tensor:
        mean = self.values()
        log_t = math.log(self.t + 1)
        level = (log_t + self.c * math.log(max(log_t, 1.0))) / self.n.clamp_min(1.0)
        lo, hi = mean.clone(), torch.ones_like(mean)
        for _ in range(self.iters):
            mid = 0.5 * (lo + hi)
            ok = _bernoulli_kl(mean, mid) <= level
            lo, hi = torch.where(ok, mid, lo), torch.where(ok, hi, mid)
        return torch.where(self.n > 0, lo, torch.full_like(lo, float("inf")))

    def select(self, rng: CounterRNG) -> torch.Tensor:
        return argmax_random_ties(self.scores(), self._u(rng, 1)[:, 0])

    def _update(self, actions, rewards):
        _add_at(self.n, actions, torch.ones_like(rewards))
        _add_at(self.s, actions, _scale01(rewards, self.low, self.high))


class GaussianThompson(BanditPolicy):
    """Thompson sampling with a N(prior_mean, prior_std²) prior per arm and Gaussian rewards
    of known std ``noise_std``. Posterior precision 1/τ² + N/σ², mean (μ0/τ² + S/σ²) / precision.
    Draws A normals per select."""

    _state = ("s", "n")

    def __init__(self, runs, arms, noise_std=1.0, prior_mean=0.0, prior_std=1.0, device="cpu"):
        super().__init__(runs, arms, device)
        self.noise_var, self.prior_mean = float(noise_std) ** 2, float(prior_mean)
        self.prior_prec = 1.0 / float(prior_std) ** 2
        self.s, self.n = self._zeros(), self._zeros()  # reward sums, pulls

    def posterior(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior mean and std [R, A] of each arm's value."""
        prec = self.prior_prec + self.n / self.noise_var
        mean = (self.prior_mean * self.prior_prec + self.s / self.noise_var) / prec
        return mean, prec.rsqrt()

    def values(self) -> torch.Tensor:
        return self.posterior()[0]

    def select(self, rng: CounterRNG) -> torch.Tensor:
        mean, std = self.posterior()
        z = rng.normal(self.arms).to(self.device, F64)  # [R, A]
        return (mean + std * z).argmax(-1)

    def _update(self, actions, rewards):
        _add_at(self.n, actions, torch.ones_like(rewards))
        _add_at(self.s, actions, rewards)


class BetaThompson(BanditPolicy):
    """Thompson sampling for Bernoulli arms: Beta(α, β) posteriors, α += x, β += 1 - x with
    x the reward rescaled from [low, high] to [0, 1] (fractional for non-binary rewards).
    Beta = G1 / (G1 + G2) with Gamma draws by ``_gamma_mt`` (``tries`` per draw)."""

    _state = ("alpha", "beta")

    def __init__(
        self, runs, arms, prior_alpha=1.0, prior_beta=1.0, low=0.0, high=1.0, tries=4, device="cpu"
    ):
        super().__init__(runs, arms, device)
        self.low, self.high, self.tries = float(low), float(high), int(tries)
        self.alpha = self._zeros() + float(prior_alpha)
        self.beta = self._zeros() + float(prior_beta)

    def values(self) -> torch.Tensor:
        return self.alpha / (self.alpha + self.beta)

    def select(self, rng: CounterRNG) -> torch.Tensor:
        k = self.tries
        u = self._u(rng, self.arms * (4 * k + 2)).view(self.runs, self.arms, 4 * k + 2)
        z = math.sqrt(2.0) * torch.erfinv(2.0 * u[..., : 2 * k] - 1.0)  # [R, A, 2K] normals
        g1 = _gamma_mt(self.alpha, z[..., :k], u[..., 2 * k : 3 * k], u[..., 4 * k])
        g2 = _gamma_mt(self.beta, z[..., k:], u[..., 3 * k : 4 * k], u[..., 4 * k + 1])
        return (g1 / (g1 + g2)).argmax(-1)

    def _update(self, actions, rewards):
        x = _scale01(rewards, self.low, self.high)
        _add_at(self.alpha, actions, x)
        _add_at(self.beta, actions, 1.0 - x)


class GradientBandit(BanditPolicy):
    """Softmax preferences H (S&B §2.8, eq. 2.12): H += α (R - R̄)(1{a=A} - π(a)), with R̄ the
    average of the rewards before this one (R̄_1 = R_1), or 0 without ``baseline``."""

    _state = ("h", "baseline_value")

    def __init__(self, runs, arms, alpha=0.1, baseline=True, device="cpu"):
        super().__init__(runs, arms, device)
        self.alpha, self.use_baseline = float(alpha), bool(baseline)
        self.h = self._zeros()  # [R, A] preferences
        self.baseline_value = torch.zeros(runs, dtype=F64, device=self.device)  # [R]

    def probs(self) -> torch.Tensor:
        return self.h.softmax(-1)

    def values(self) -> torch.Tensor:
        return self.h

    def select(self, rng: CounterRNG) -> torch.Tensor:
        return sample_categorical(self.probs(), self._u(rng, 1)[:, 0])

    def _update(self, actions, rewards):
        pi = self.probs()  # the policy that chose `actions`
        if self.use_baseline:
            rbar = rewards if self.t == 0 else self.baseline_value
            self.baseline_value = self.baseline_value + (rewards - self.baseline_value) / (
                self.t + 1
            )
        else:
            rbar = torch.zeros_like(rewards)
        one_hot = torch.nn.functional.one_hot(actions, self.arms).to(F64)
        self.h += self.alpha * (rewards - rbar)[:, None] * (one_hot - pi)


class EXP3(BanditPolicy):
    """EXP3 (Auer et al. 2002) for adversarial rewards in [low, high] (rescaled to [0, 1]):
    p = (1 - γ) w / Σw + γ / A; after pulling a with reward x: w_a *= exp(γ x / (p_a A)).
    Weights are kept as logs (``log_w``) so they never overflow."""

    _state = ("log_w",)

    def __init__(self, runs, arms, gamma=0.1, low=0.0, high=1.0, device="cpu"):
        super().__init__(runs, arms, device)
        self.gamma, self.low, self.high = float(gamma), float(low), float(high)
        self.log_w = self._zeros()

    def probs(self) -> torch.Tensor:
        return (1 - self.gamma) * self.log_w.softmax(-1) + self.gamma / self.arms

    def values(self) -> torch.Tensor:
        return self.log_w

    def select(self, rng: CounterRNG) -> torch.Tensor:
        return sample_categorical(self.probs(), self._u(rng, 1)[:, 0])

    def _update(self, actions, rewards):
        p_a = _gather(self.probs(), actions)
        x = _scale01(rewards, self.low, self.high)
        _add_at(self.log_w, actions, self.gamma * x / (p_a * self.arms))


class DiscountedUCB(BanditPolicy):
    """Discounted UCB (Garivier & Moulines 2011) for drifting arms: every pull discounts all
    counts N and reward sums S by γ, then adds 1 and R to the pulled arm's. Index
    S/N + c sqrt(ln ΣN / N) through ``ucb_score`` (never-pulled arms +inf)."""

    _state = ("s", "n")

    def __init__(self, runs, arms, c=2.0, discount=0.99, device="cpu"):
        super().__init__(runs, arms, device)
        self.c, self.discount = float(c), float(discount)
        self.s, self.n = self._zeros(), self._zeros()  # discounted sums, discounted counts

    def values(self) -> torch.Tensor:
        return self.s / self.n.clamp_min(1e-300)

    def scores(self) -> torch.Tensor:
        return ucb_score(self.values(), self.n, self.n.sum(-1, keepdim=True), self.c)

    def select(self, rng: CounterRNG) -> torch.Tensor:
        return argmax_random_ties(self.scores(), self._u(rng, 1)[:, 0])

    def _update(self, actions, rewards):
        self.n *= self.discount
        self.s *= self.discount
        _add_at(self.n, actions, torch.ones_like(rewards))
        _add_at(self.s, actions, rewards)


# ------------------------------------------------------------------------ config
POLICIES = (
    "greedy",
    "epsilon",
    "ucb",
    "kl_ucb",
    "thompson",
    "gradient",
    "exp3",
    "discounted_ucb",
)


def _positive(cfg: Any, key: str, prefix: str) -> float:
    value = check_float(cfg, key, prefix)
    if value <= 0:
        raise ConfigError(f"{prefix}{key} must be > 0, got {value!r}")
    return value


def _reward_range(cfg: Any, prefix: str) -> tuple[float, float]:
    low, high = check_float(cfg, "reward_low", prefix), check_float(cfg, "reward_high", prefix)
    if not low < high:
        raise ConfigError(f"{prefix}reward_low must be < {prefix}reward_high, got {low}, {high}")
    return low, high


def make_policy(
    cfg: Any, runs: int, arms: int, device: torch.device | str = "cpu", prefix: str = "agent."
) -> BanditPolicy:
    """The policy named by ``cfg.policy`` (the keys of configs/agent/bandit.yaml)."""
    name = check_choice(cfg, "policy", POLICIES, prefix)
    kw: dict[str, Any] = {"device": device}
    if name in ("greedy", "epsilon"):
        step = cfg["step_size"]
        if step is not None:
            step = check_float(cfg, "step_size", prefix, low=0.0, high=1.0)
            if step <= 0:
                raise ConfigError(f"{prefix}step_size must be in (0, 1] or null, got {step}")
        eps = 0.0 if name == "greedy" else check_float(cfg, "epsilon", prefix, 0.0, 1.0)
        init = check_float(cfg, "initial_value", prefix)
        return EpsilonGreedy(runs, arms, eps, init, step, **kw)
    if name == "ucb":
        return UCB1(runs, arms, check_float(cfg, "c", prefix, low=0.0), **kw)
    if name == "kl_ucb":
        low, high = _reward_range(cfg, prefix)
        return KLUCB(runs, arms, check_float(cfg, "kl_c", prefix, low=0.0), low, high, **kw)
    if name == "thompson":
        likelihood = check_choice(cfg, "likelihood", ("gaussian", "bernoulli"), prefix)
        if likelihood == "gaussian":
            noise, std = _positive(cfg, "noise_std", prefix), _positive(cfg, "prior_std", prefix)
            mean = check_float(cfg, "prior_mean", prefix)
            return GaussianThompson(runs, arms, noise, mean, std, **kw)
        a0, b0 = _positive(cfg, "prior_alpha", prefix), _positive(cfg, "prior_beta", prefix)
        low, high = _reward_range(cfg, prefix)
        return BetaThompson(runs, arms, a0, b0, low, high, **kw)
    if name == "gradient":
        alpha = _positive(cfg, "alpha", prefix)
        return GradientBandit(runs, arms, alpha, check_bool(cfg, "baseline", prefix), **kw)
    if name == "exp3":
        gamma = check_float(cfg, "exp3_gamma", prefix, 0.0, 1.0)
        if gamma <= 0:
            raise ConfigError(f"{prefix}exp3_gamma must be in (0, 1], got {gamma}")
        low, high = _reward_range(cfg, prefix)
        return EXP3(runs, arms, gamma, low, high, **kw)
    discount = check_float(cfg, "discount", prefix, 0.0, 1.0)
    if discount <= 0:
        raise ConfigError(f"{prefix}discount must be in (0, 1], got {discount}")
    return DiscountedUCB(runs, arms, check_float(cfg, "c", prefix, low=0.0), discount, **kw)


# ------------------------------------------------------------------------ agent
class BanditAgent(Agent):
    """A bandit policy as a trainer agent (``agent=bandit``).

    The N parallel envs are copies of one bandit problem (env.problem_seed fixes q*), so one
    learner (a policy with R = 1) pools their pulls: ``act`` selects once per env, and
    ``observe`` applies the valid pulls one after another in env order. Episodes do not reset
    the learner: a bandit has one state. ``explore=False`` acts greedily on ``values()``.
    ``learns`` is False: no replay, learning happens in ``observe``.
    """

    def __init__(
        self,
        cfg: Any,
        obs_space: gym.spaces.Dict,
        action_space: gym.Space,
        device: torch.device | str = "cpu",
    ):
        if not isinstance(action_space, gym.spaces.Discrete):
            raise ConfigError(
                "agent=bandit needs a Discrete action space (env family bandit), "
                f"got {action_space}"
            )
        seed = cfg.seed
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise ConfigError(f"seed must be an int, got {seed!r}")
        self.start = int(action_space.start)
        self.policy = make_policy(cfg.agent, 1, int(action_space.n), "cpu")
        self.rng = CounterRNG.seeded(seed, 1, STREAM_AGENT)
        self.last_actions = np.zeros(0, np.int64)  # [N] arms chosen by the last act

    @property
    def learns(self) -> bool:
        return False

    def act(
        self, obs: dict[str, np.ndarray], state: Any, explore: bool = True
    ) -> tuple[np.ndarray, Any]:
        n = len(obs["is_first"])
        choose = self.policy.select if explore else self.policy.greedy
        arms = torch.cat([choose(self.rng) for _ in range(n)])  # [N]
        self.last_actions = arms.numpy().astype(np.int64)
        return self.last_actions + self.start, state

    def observe(self, reward, terminated, truncated, valid) -> None:
        reward = np.asarray(reward, np.float64)
        for i in np.flatnonzero(np.asarray(valid, bool)):
            a = torch.tensor([int(self.last_actions[i])])
            self.policy.update(a, torch.tensor([float(reward[i])], dtype=F64))

    def rng_state(self) -> dict:
        return self.rng.state_dict()

    def set_rng_state(self, state: dict) -> None:
        self.rng.load_state_dict(state)

    def state_dict(self) -> dict:
        return {
            "policy": self.policy.state_dict(),
            "rng": self.rng.state_dict(),
            "last_actions": torch.from_numpy(self.last_actions.copy()),
        }

    def load_state_dict(self, state: dict) -> None:
        self.policy.load_state_dict(state["policy"])
        self.rng.load_state_dict(state["rng"])
        self.last_actions = state["last_actions"].numpy().astype(np.int64).copy()
