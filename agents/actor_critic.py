"""The imagination actor-critic shared by every world model (DreamerV3's behaviour learning).

Follows Hafner et al. 2023 ("Mastering Diverse Domains through World Models",
arXiv:2301.04104, Sec. 3 "Actor Critic Learning") and the official code:

- imagination: from every posterior state of a replay batch (N = B*T starts, or the last
  ``imag_last`` of each sequence) roll the world model H steps with actions from the actor,
  all N in one batched call per step (a Python loop over H only);
- critic: an MLP whose output is a two-hot distribution over 255 bins in symlog space
  (zero-initialised output, so it predicts 0 at first), trained by cross-entropy towards
  λ-returns, plus a regulariser towards the prediction of a slow EMA copy of itself;
- λ-returns (Eq. 7) with γ = 1 - 1/333 and λ = 0.95, cut by predicted continues;
- return normalisation (Eq. 9): advantages divided by max(1, S), where S is the range between
  the 5th and 95th percentiles of the λ-returns, tracked as an EMA with decay 0.99;
- actor: REINFORCE on normalised advantages with entropy bonus η = 3e-4 (Eq. 8), for discrete
  (categorical, 1% unimix) and continuous actions (Normal with tanh mean and sigmoid-bounded
  std, the 2024 code's ``bounded_normal``); ``actor_grad: dynamics`` backpropagates returns
  through the world model instead; ``auto`` (default) takes the 2023 code's choice:
  REINFORCE for discrete actions, dynamics for continuous ones;
- every loss term is weighted by w_t = γ^t ∏_{i<=t} c_i, so states after a predicted episode
  end count for nothing.

The update is written for speed: static shapes, no ``.item()``/``.cpu()``, no branching on
tensor values, inverse-CDF categorical sampling, metrics returned as tensors, fused (CUDA) or
foreach (CPU) Adam. The world model's parameters never receive gradients from these losses.

Shape symbols (docs/shapes.md): B batch, T sequence, N = number of imagination starts,
H horizon, F feature size, A action size (one-hot size for discrete actions), K critic bins.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import gymnasium as gym
import torch
from torch import nn

from agents.config import ConfigError, check_choice, check_float, check_int
from world_models.base import State, WorldModel, flatten_state, state_map
from world_models.distributions import SAMPLERS, TwoHot, onehot_mode, sample_onehot, unimix
from world_models.networks import (
    MLP,
    NORMS,
    Features,
    init_dreamer_,
    map_features,
    stack_features,
    zero_init_,
)


def lambda_return(
    reward: torch.Tensor, cont: torch.Tensor, value: torch.Tensor, lam: float, gamma: float
) -> torch.Tensor:
    """λ-returns of imagined trajectories (DreamerV3 Eq. 7), pure.

    All inputs are [N, H+1] over states s_0..s_H: ``reward[:, t]`` is received on arriving at
    s_t (``reward[:, 0]`` is unused), ``cont[:, t]`` is the continue flag of s_t (0 when s_t is
    terminal), ``value[:, t]`` the critic's value of s_t. Returns R [N, H] for s_0..s_{H-1}:

        R_t = r_{t+1} + γ c_{t+1} ((1 - λ) v_{t+1} + λ R_{t+1}),    R_H = v_H.
    """
    disc = gamma * cont[:, 1:]  # [N, H]
    interm = reward[:, 1:] + disc * (1.0 - lam) * value[:, 1:]  # [N, H]
    ret = value[:, -1]  # [N]
    rets = []
    for t in reversed(range(disc.shape[1])):
        ret = interm[:, t] + disc[:, t] * lam * ret
        rets.append(ret)
    return torch.stack(rets[::-1], 1)  # [N, H]


def replay_return(
    reward: torch.Tensor,
    is_last: torch.Tensor,
    is_terminal: torch.Tensor,
    boot: torch.Tensor,
    lam: float,
    gamma: float,
) -> torch.Tensor:
    """λ-returns along replayed rows, bootstrapped by imagined returns (DreamerV3 2024 ``repval``).

    All inputs are [B, K] over consecutive replay rows; ``boot[:, t]`` is the imagined λ-return
    from row t. Returns R [B, K-1] for rows 0..K-2:

        R_t = r_{t+1} + γ (1 - term_{t+1}) ((1 - λ_{t+1}) boot_{t+1} + λ_{t+1} R_{t+1}),

    with λ_{t+1} = 0 when row t+1 is the last of its episode (no real rows follow it) and
    R_{K-1} = boot_{K-1}. Rows that are themselves last have no successor in their episode;
    the caller masks them out.
    """
    live = gamma * (1.0 - is_terminal[:, 1:].to(boot.dtype))  # [B, K-1]
    chain = lam * (1.0 - is_last[:, 1:].to(boot.dtype))  # [B, K-1]
    ret = boot[:, -1]  # [B]
    rets = []
    for t in reversed(range(live.shape[1])):
        ret = reward[:, t + 1] + live[:, t] * (
            (1.0 - chain[:, t]) * boot[:, t + 1] + chain[:, t] * ret
        )
        rets.append(ret)
    return torch.stack(rets[::-1], 1)  # [B, K-1]


class Moments(nn.Module):
    """Percentile return normaliser (DreamerV3 Eq. 9): EMA of the 5th and 95th percentiles.

    ``update(x)`` folds the percentiles of a batch into ``low``/``high`` (initially 0, no bias
    correction, as in the official code); ``scale()`` is max(limit, high - low), the divisor
    of advantages: returns spread over less than ``limit`` are not scaled up, so small noisy
    rewards are not amplified, while large returns are scaled down to a unit range.
    """

    low: torch.Tensor
    high: torch.Tensor

    def __init__(
        self,
        decay: float = 0.99,
        limit: float = 1.0,
        perc_low: float = 5.0,
        perc_high: float = 95.0,
    ) -> None:
        super().__init__()
        self.decay, self.limit = decay, limit
        self.q_low, self.q_high = perc_low / 100.0, perc_high / 100.0
        self.register_buffer("low", torch.zeros(()))
        self.register_buffer("high", torch.zeros(()))
        self.register_buffer("qs", torch.tensor([self.q_low, self.q_high]), persistent=False)

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        x = x.detach().flatten().float()  # [M]
        q = torch.quantile(x, self.qs.to(x.dtype))  # [2]
        self.low.lerp_(q[0], 1.0 - self.decay)
        self.high.lerp_(q[1], 1.0 - self.decay)

    def scale(self) -> torch.Tensor:
        return torch.clamp(self.high - self.low, min=self.limit)  # []


def _adam(params: list[nn.Parameter], lr: float, eps: float) -> torch.optim.Adam:
    """Adam that a CUDA graph can capture (fused) on GPU, multi-tensor (foreach) on CPU."""
    if params and params[0].is_cuda:
        return torch.optim.Adam(params, lr=lr, eps=eps, fused=True, capturable=True)
    return torch.optim.Adam(params, lr=lr, eps=eps, foreach=True)


def load_optimiser_state(opt: torch.optim.Optimizer, state: dict) -> None:
    """``opt.load_state_dict(state)`` keeping ``opt``'s own implementation flags.

    A checkpoint's param groups carry ``fused``/``foreach``/``capturable`` of the device it
    was saved on, and loading them as they are would turn a GPU run resumed from a CPU
    checkpoint into an unfused Adam that a CUDA graph cannot capture. The step counts move
    to the device as the flags need (fused or capturable: the parameter's, float32)."""
    keys = ("fused", "foreach", "capturable")
    own = [{k: g[k] for k in keys if k in g} for g in opt.param_groups]
    opt.load_state_dict(state)
    for group, flags in zip(opt.param_groups, own):
        group.update(flags)
        on_device = bool(flags.get("fused") or flags.get("capturable"))
        for p in group["params"]:
            step = opt.state.get(p, {}).get("step")
            if torch.is_tensor(step):
                device = p.device if on_device else torch.device("cpu")
                opt.state[p]["step"] = step.to(device=device, dtype=torch.float32)


def _adamw(groups: list[dict], lr: float, eps: float) -> torch.optim.AdamW:
    """AdamW over parameter groups (``lr``/``weight_decay`` per group, else ``lr`` and no
    decay: plain Adam), fused and capturable on GPU like ``_adam``."""
    cuda = any(p.is_cuda for g in groups for p in g["params"])
    kwargs = {"fused": True, "capturable": True} if cuda else {"foreach": True}
    return torch.optim.AdamW(groups, lr=lr, eps=eps, weight_decay=0.0, **kwargs)


class ActorCritic(nn.Module):
    """Actor, critic and slow critic learning inside any WorldModel. See the module docstring.

    cfg is the agent's config subtree (``agent.*``); ``feature_dim`` is the world model's F;
    ``action_space`` a gymnasium Discrete or 1-D Box (actions in [-1, 1]); ``differentiable``
    is the world model's ``differentiable_imagination`` (False rules out ``actor_grad:
    dynamics``, and ``auto`` then takes REINFORCE).
    """

    def __init__(
        self,
        cfg: Any,
        feature_dim: int,
        action_space: gym.Space,
        prefix: str = "agent.",
        differentiable: bool = True,
    ) -> None:
        super().__init__()
        p = prefix
        self.horizon = check_int(cfg, "imag_horizon", p)
        self.imag_last = check_int(cfg, "imag_last", p, low=0)
        self.gamma = check_float(cfg, "gamma", p, 0.0, 1.0)
        self.lam = check_float(cfg, "lam", p, 0.0, 1.0)
        self.entropy_scale = check_float(cfg, "entropy", p, 0.0)
        actor_grad = check_choice(cfg, "actor_grad", ("auto", "reinforce", "dynamics"), p)
        self.imag_cont = check_choice(cfg, "imag_cont", ("mode", "mean"), p)
        self.slow_reg = check_float(cfg, "slow_reg", p, 0.0)
        self.critic_ema = check_float(cfg, "critic_ema", p, 0.0, 1.0)
        self.repval = check_float(cfg, "repval", p, 0.0) if "repval" in cfg else 0.0
        rn = "return_norm."
        decay = check_float(cfg, rn + "decay", p, 0.0, 1.0)
        limit = check_float(cfg, rn + "limit", p, 0.0)
        perc_low = check_float(cfg, rn + "perc_low", p, 0.0, 100.0)
        perc_high = check_float(cfg, rn + "perc_high", p, 0.0, 100.0)
        if not perc_high > perc_low:
            raise ConfigError(f"{p}{rn}perc_high must be > {p}{rn}perc_low")
        bins = check_int(cfg, "critic.bins", p, low=2)
        low = check_float(cfg, "critic.low", p)
        high = check_float(cfg, "critic.high", p)
        if not high > low:
            raise ConfigError(f"{p}critic.high must be > {p}critic.low, got {high} <= {low}")
        actor_cfg = {
            k: check_float(cfg, f"actor.{k}", p, 0.0)
            for k in ("lr", "eps", "grad_clip", "unimix", "min_std", "max_std", "outscale")
        }
        critic_cfg = {
            k: check_float(cfg, f"critic.{k}", p, 0.0) for k in ("lr", "eps", "grad_clip")
        }
        if actor_cfg["unimix"] > 1.0:
            raise ConfigError(f"{p}actor.unimix must be in [0, 1], got {actor_cfg['unimix']}")
        if not actor_cfg["max_std"] > actor_cfg["min_std"]:
            raise ConfigError(f"{p}actor.max_std must be > {p}actor.min_std")

        if isinstance(action_space, gym.spaces.Discrete):
            self.discrete = True
            self.action_dim = int(action_space.n)
            out_dim = self.action_dim  # logits [A]
        elif isinstance(action_space, gym.spaces.Box) and len(action_space.shape) == 1:
            self.discrete = False
            self.action_dim = int(action_space.shape[0])
            out_dim = 2 * self.action_dim  # mean and std pre-activations [2A]
        else:
            raise ValueError(
                f"the actor-critic supports Discrete and 1-D Box action spaces, got {action_space}"
            )
        if actor_grad == "auto":  # the 2023 code: REINFORCE for discrete, backprop for continuous
            actor_grad = "dynamics" if differentiable and not self.discrete else "reinforce"
        elif actor_grad == "dynamics" and not differentiable:
            raise ConfigError(
                f"{p}actor_grad=dynamics (the CPU default) needs a world model whose imagination "
                f"is differentiable; this one dreams without gradients (IRIS): set {p}actor_grad="
                "auto or reinforce, or use preset=iris_cpu or preset=iris_atari100k"
            )
        self.actor_grad = actor_grad
        self.unimix = actor_cfg["unimix"]
        self.sampler = check_choice(cfg, "actor.sampler", SAMPLERS, p)
        self.min_std, self.max_std = actor_cfg["min_std"], actor_cfg["max_std"]
        self.actor_clip = actor_cfg["grad_clip"]
        self.critic_clip = critic_cfg["grad_clip"]

        def mlp(name: str, out: int) -> MLP:
            units = check_int(cfg, f"{name}.units", p)
            layers = check_int(cfg, f"{name}.layers", p, low=0)
            norm = check_choice(cfg, f"{name}.norm", NORMS, p)
            return MLP(feature_dim, out, units, layers, norm)

        self.actor = mlp("actor", out_dim)
        self.critic = mlp("critic", bins)
        init_dreamer_(self.actor)
        init_dreamer_(self.critic)
        with torch.no_grad():  # small initial policy logits: near-uniform, exploratory actions
            self.actor.out.weight.mul_(actor_cfg["outscale"])
        zero_init_(self.critic.out)  # the critic predicts exactly 0 at first
        self.slow_critic = copy.deepcopy(self.critic).requires_grad_(False)
        self.twohot = TwoHot(bins, low, high)
        self.moments = Moments(decay, limit, perc_low, perc_high)
        self._opt_cfg = (actor_cfg, critic_cfg)
        self.actor_opt: torch.optim.Adam | None = None
        self.critic_opt: torch.optim.Adam | None = None

    def _optimisers(self) -> tuple[torch.optim.Adam, torch.optim.Adam]:
        # built on first use, once the module is on its device (fused Adam needs CUDA params)
        if self.actor_opt is None or self.critic_opt is None:
            actor_cfg, critic_cfg = self._opt_cfg
            self.actor_opt = _adam(list(self.actor.parameters()), actor_cfg["lr"], actor_cfg["eps"])
            self.critic_opt = _adam(
                list(self.critic.parameters()), critic_cfg["lr"], critic_cfg["eps"]
            )
        return self.actor_opt, self.critic_opt

    # ------------------------------------------------------------------ policy
    def policy(self, feat: Features) -> tuple[torch.Tensor, torch.Tensor]:
        """Distribution parameters of π(a | s) for features [..., F] (dense or one-hot).

        Discrete: (unimixed log-probs [..., A], same). Continuous: (mean [..., A] in (-1, 1),
        std [..., A] in (min_std, max_std)).
        """
        out = self.actor(feat)  # [..., A] or [..., 2A]
        if self.discrete:
            logp = unimix(out, self.unimix)  # [..., A]
            return logp, logp
        mean, std = out.chunk(2, -1)  # [..., A] each
        std = (self.max_std - self.min_std) * torch.sigmoid(std + 2.0) + self.min_std
        return torch.tanh(mean), std

    def sample(
        self, params: tuple[torch.Tensor, torch.Tensor], explore: bool = True
    ) -> torch.Tensor:
        """An action [..., A] (one-hot for discrete, unclipped Normal sample for continuous).

        Discrete samples are one-hots (``sample_onehot``) with straight-through gradients;
        continuous ones are reparameterised. ``explore=False`` gives the mode.
        """
        a, b = params
        if self.discrete:
            st = torch.is_grad_enabled()  # exact one-hots when no gradient is wanted
            return sample_onehot(a, st, method=self.sampler) if explore else onehot_mode(a, st)
        if not explore:
            return a
        return a + b * torch.randn_like(a)

    def log_prob(self, params: tuple[torch.Tensor, torch.Tensor], action: torch.Tensor):
        """log π(a | s): [...]. ``action`` is one-hot [..., A] or continuous [..., A]."""
        a, b = params
        if self.discrete:
            return (a * action).sum(-1)
        z = (action - a) / b
        return (-0.5 * z.square() - b.log() - 0.5 * math.log(2 * math.pi)).sum(-1)

    def entropy(self, params: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """H[π(· | s)]: [...] (summed over action dims for continuous actions)."""
        a, b = params
        if self.discrete:
            return -(a.exp() * a).sum(-1)
        return (0.5 + 0.5 * math.log(2 * math.pi) + b.log()).sum(-1)

    def act(self, feat: torch.Tensor, explore: bool = True) -> torch.Tensor:
        """World-model action [N, A] for features [N, F]: one-hot, or clipped to [-1, 1]."""
        action = self.sample(self.policy(feat), explore)
        return action if self.discrete else action.clamp(-1.0, 1.0)

    def value(self, feat: Features, slow: bool = False) -> torch.Tensor:
        """Critic's expected return in real units: [..., F] -> [...]."""
        net = self.slow_critic if slow else self.critic
        return self.twohot.decode(net(feat))

    # ------------------------------------------------------------------ imagination
    def imagine(
        self, world_model: WorldModel, start: State, horizon: int, keep_policy: bool = False
    ) -> dict[str, Any]:
        """Roll every start state H steps in the world model with the actor's actions.

        start: states [N, ...] (already flat and detached). Returns ``feat`` [N, H+1, F] for
        s_0..s_H (``WorldModel.head_features``: one-hot features where no gradient reaches z),
        ``action`` [N, H, A] taken at s_0..s_{H-1}, ``reward`` [N, H+1] and ``cont`` [N, H+1]
        predicted on arriving at s_t (index 0 is filled by the caller).
        Gradients flow through the dynamics into the actions only when the caller has grad
        enabled (``actor_grad: dynamics``); the actor always reads detached features.
        ``keep_policy`` also returns ``policy``, the actor's distribution parameters at
        s_0..s_{H-1} ([N, H, ...] each) with their graph, so the actor loss reuses this forward
        pass instead of running the actor over all N x H states again.
        """
        state = start
        feat = world_model.head_features(state)  # [N, F]
        feats, actions, rewards, conts, policies = [feat], [], [], [], []
        dynamics = torch.is_grad_enabled()
        batched = world_model.batched_heads  # reward and continue once over [N, H] after the loop
        for _ in range(horizon):
            with torch.set_grad_enabled(dynamics or keep_policy):
                params = self.policy(map_features(feat, torch.Tensor.detach))
            if not dynamics:  # REINFORCE: the sample is a constant
                params_for_action = tuple(p.detach() for p in params)
            else:
                params_for_action = params
            action = self.sample(params_for_action)  # [N, A]
            if not self.discrete:
                action = action.clamp(-1.0, 1.0)  # the env's range
            if batched:
                state = world_model.imagine_step(state, action, heads=False)[0]
            else:
                state, reward, cont = world_model.imagine_step(state, action)
                rewards.append(reward)
                conts.append(cont)
            feat = world_model.head_features(state)  # [N, F]
            feats.append(feat)
            actions.append(action)
            policies.append(params)
        feat = stack_features(feats, 1)  # [N, H+1, F]
        if batched:  # the heads in one call over s_0..s_H (contiguous; s_0's are dropped)
            reward, cont = (x[:, 1:] for x in world_model.heads(feat))  # [N, H] each
        else:
            reward, cont = torch.stack(rewards, 1), torch.stack(conts, 1)  # [N, H] each
        zero = torch.zeros_like(reward[:, :1])  # [N, 1]
        traj = {
            "feat": feat,
            "action": torch.stack(actions, 1),  # [N, H, A]
            "reward": torch.cat([zero, reward], 1),  # [N, H+1]
            "cont": torch.cat([zero, cont], 1),  # [N, H+1]
        }
        if keep_policy:
            with torch.enable_grad():  # stacking under no_grad would cut the graph
                parts = 1 if self.discrete else 2  # discrete: both entries are the same log-probs
                stacked = [torch.stack([p[i] for p in policies], 1) for i in range(parts)]
            traj["policy"] = (stacked[0], stacked[-1])  # [N, H, A] each
        return traj

    # ------------------------------------------------------------------ learning
    def _starts(self, start: State, start_is_terminal: torch.Tensor) -> tuple[State, torch.Tensor]:
        """Posterior states [B, T, ...] -> N detached starts (the last ``imag_last`` per row)."""
        if self.imag_last > 0:
            k = self.imag_last
            start = state_map(start, lambda v: v[:, -k:])
            start_is_terminal = start_is_terminal[:, -k:]
        start = state_map(flatten_state(start, 2), lambda v: v.detach())  # [N, ...]
        return start, start_is_terminal.reshape(-1)  # [N]

    def update(
        self,
        world_model: WorldModel,
        start: State,
        start_is_terminal: torch.Tensor,
        replay: dict[str, torch.Tensor] | None = None,
        autocast: Callable[[], AbstractContextManager] = nullcontext,
    ) -> dict[str, torch.Tensor]:
        """One actor and critic step on imagined trajectories from posterior states [B, T, ...].

        start_is_terminal bool [B, T]. ``replay`` (``reward`` [B, T], ``is_last``/``is_terminal``
        bool [B, T]) enables the replay-value loss when ``repval > 0``: the critic also regresses
        λ-returns along the real rows, bootstrapped by the imagined returns (DreamerV3 2024).
        ``autocast`` makes the context of the forward passes (``agent.precision=bf16``).
        Returns metrics as detached 0-d tensors.
        """
        actor_opt, critic_opt = self._optimisers()
        start, is_terminal = self._starts(start, start_is_terminal)
        with autocast():  # forward passes only: backward and optimiser steps run outside
            dynamics = self.actor_grad == "dynamics"
            with torch.set_grad_enabled(dynamics):
                traj = self.imagine(world_model, start, self.horizon, keep_policy=True)
                cont = traj["cont"]  # [N, H+1]
                if self.imag_cont == "mode":
                    cont = (cont > 0.5).to(cont.dtype)
                cont = torch.cat([1.0 - is_terminal.to(cont.dtype)[:, None], cont[:, 1:]], 1)
                feat = traj["feat"]  # [N, H+1, F]
            # The critic runs on all H+1 states (contiguous tensors: slicing off s_H made
            # strided copies and a batched-matmul fallback); the loss weights s_H by 0.
            # One critic pass serves the returns and the critic loss. With dynamics it reads
            # the features with their graph: the actor's gradient reaches them through the
            # value, while the critic loss's backward stops at the critic's own weights.
            logits = self.critic(feat if dynamics else map_features(feat, torch.Tensor.detach))
            value = self.twohot.decode(logits if dynamics else logits.detach())  # [N, H+1]
            feat = map_features(feat, torch.Tensor.detach)  # [N, H+1, F]
            ret = lambda_return(traj["reward"], cont, value, self.lam, self.gamma)  # [N, H]
            cont = cont.detach()
            # w_t = γ^t ∏_{i<=t} c_i: nothing after a predicted episode end counts
            weight = torch.cumprod(self.gamma * cont, 1)[:, :-1] / self.gamma  # [N, H]
            self.moments.update(ret)
            scale = self.moments.scale()  # []
            adv = (ret - value[:, :-1]) / scale  # [N, H]

            # actor (Eq. 8): REINFORCE or dynamics backprop, plus entropy, on the normalised scale
            params = traj["policy"]  # π at s_0..s_{H-1}, [N, H, A] each, from the imagination
            entropy = self.entropy(params)  # [N, H]
            if dynamics:
                pg = -adv
            else:
                pg = -self.log_prob(params, traj["action"].detach()) * adv.detach()
            actor_loss = ((pg - self.entropy_scale * entropy) * weight).mean()

            # critic: two-hot cross-entropy to the λ-return plus the slow-critic regulariser,
            # over s_0..s_H with s_H's weight 0 (its target is a placeholder: its own value)
            target = torch.cat([ret, value[:, -1:]], 1).detach()  # [N, H+1]
            critic_loss = self.twohot.loss(logits, target)  # [N, H+1]
            if self.slow_reg > 0:
                with torch.no_grad():
                    slow_target = self.value(feat, slow=True)  # [N, H+1]
                critic_loss = critic_loss + self.slow_reg * self.twohot.loss(logits, slow_target)
            critic_weight = torch.cat([weight, torch.zeros_like(weight[:, :1])], 1)  # [N, H+1]
            critic_loss = (critic_loss * critic_weight).sum() / weight.numel()  # mean over N x H
            metrics = {}
            if self.repval > 0 and replay is not None:
                repval_loss = self._replay_value_loss(
                    map_features(feat, lambda v: v[:, 0]), ret[:, 0].detach(), replay
                )
                critic_loss = critic_loss + self.repval * repval_loss
                metrics["repval_loss"] = repval_loss.detach()

        actor_params = list(self.actor.parameters())
        critic_params = list(self.critic.parameters())
        actor_opt.zero_grad(set_to_none=True)
        critic_opt.zero_grad(set_to_none=True)
        # ``inputs`` restricts gradients to the learner's own parameters: the world model (and,
        # for the actor loss in dynamics mode, the critic) get none, and their weight-gradient
        # kernels are skipped by autograd.
        critic_loss.backward(inputs=critic_params, retain_graph=dynamics)  # graph shared
        actor_loss.backward(inputs=actor_params)
        actor_norm = nn.utils.clip_grad_norm_(actor_params, self.actor_clip, foreach=True)
        critic_norm = nn.utils.clip_grad_norm_(critic_params, self.critic_clip, foreach=True)
        actor_opt.step()
        critic_opt.step()
        self.update_slow_critic()

        with torch.no_grad():
            return metrics | {
                "actor_loss": actor_loss.detach(),
                "critic_loss": critic_loss.detach(),
                "actor_entropy": entropy.detach().mean(),
                "actor_grad_norm": actor_norm,
                "critic_grad_norm": critic_norm,
                "imag_return": ret.detach().mean(),
                "imag_reward": traj["reward"][:, 1:].detach().mean(),
                "imag_cont": cont[:, 1:].mean(),
                "imag_value": value.detach().mean(),
                "adv_mag": adv.detach().abs().mean(),
                "return_scale": scale,
                "return_low": self.moments.low.clone(),
                "return_high": self.moments.high.clone(),
            }

    def _replay_value_loss(
        self, feat: Features, boot: torch.Tensor, replay: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        """Critic loss on the real rows the imagination started from: feat [N, F] and their
        imagined returns boot [N] for N = B*K starts (the last K rows of each sequence)."""
        bsz, steps = replay["reward"].shape
        k = min(self.imag_last, steps) if self.imag_last > 0 else steps  # as in _starts
        if k < 2:  # one start row per sequence has no real successor to regress along
            return boot.new_zeros(())
        rows = {key: replay[key][:, -k:] for key in ("reward", "is_last", "is_terminal")}
        boot = boot.reshape(bsz, k)  # [B, K]
        target = replay_return(
            rows["reward"].to(boot.dtype),
            rows["is_last"],
            rows["is_terminal"],
            boot,
            self.lam,
            self.gamma,
        )  # [B, K-1]
        sfeat = map_features(feat, lambda v: v.reshape(bsz, k, *v.shape[1:])[:, :-1])
        # sfeat: [B, K-1, F]
        logits = self.critic(sfeat)  # [B, K-1, bins]
        loss = self.twohot.loss(logits, target)  # [B, K-1]
        if self.slow_reg > 0:
            with torch.no_grad():
                slow_target = self.value(sfeat, slow=True)  # [B, K-1]
            loss = loss + self.slow_reg * self.twohot.loss(logits, slow_target)
        mask = 1.0 - rows["is_last"][:, :-1].to(loss.dtype)  # a last row has no real successor
        return (loss * mask).sum() / mask.sum().clamp(min=1.0)

    @torch.no_grad()
    def update_slow_critic(self) -> None:
        """slow <- decay * slow + (1 - decay) * critic (every update, decay 0.98)."""
        slow = list(self.slow_critic.parameters())
        fast = list(self.critic.parameters())
        torch._foreach_lerp_(slow, fast, 1.0 - self.critic_ema)

    # ------------------------------------------------------------------ checkpoints
    def learner_state_dict(self) -> dict:
        """Weights, slow critic, normaliser and both optimisers (tensors and primitives only)."""
        actor_opt, critic_opt = self._optimisers()
        return {
            "modules": self.state_dict(),
            "actor_opt": actor_opt.state_dict(),
            "critic_opt": critic_opt.state_dict(),
        }

    def load_learner_state_dict(self, state: dict) -> None:
        self.load_state_dict(state["modules"])
        actor_opt, critic_opt = self._optimisers()
        load_optimiser_state(actor_opt, state["actor_opt"])
        load_optimiser_state(critic_opt, state["critic_opt"])
