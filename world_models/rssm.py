"""DreamerV3's recurrent state-space model (RSSM): the Dreamer world model.

Version followed: the 2023 arXiv paper (Hafner et al., "Mastering Diverse Domains through
World Models", arXiv:2301.04104v1) and its official code of that era:

- deterministic state h: a GRU with LayerNorm on its gate pre-activations (the DreamerV2/V3
  "norm GRU", update-gate bias -1), not the 2024 revision's block-diagonal GRU;
- stochastic state z: S categoricals of K classes (32 x 32 in the paper), 1% unimix,
  straight-through one-hot samples;
- prior p(z_t | h_t) and posterior q(z_t | h_t, x_t); h_t = f(h_{t-1}, z_{t-1}, a_{t-1});
- heads read features [h, z]: decoder (image MSE, vector symlog MSE), reward (two-hot symlog,
  255 bins, zero-initialised output), continue (Bernoulli logits);
- KL balancing with free bits (paper Eq. 5): L_dyn = max(1, KL(sg(q) || p)) weight 0.5,
  L_rep = max(1, KL(q || sg(p))) weight 0.1, the clamp applied to the KL summed over the S
  categoricals. All these numbers come from ``configs/world_model/rssm.yaml``.
- model sizes: the paper's Table B.1 (XS/S/M/L) in ``configs/preset/dreamer_*.yaml``.

Shape symbols (docs/shapes.md): B batch, T sequence, N flat batch of states, A action size,
D deter size, S number of categoricals, K classes per categorical, E embedding size,
F = D + S*K feature size.

Row convention (docs/architecture.md): ``action[t]`` was taken AT obs[t], so the step into
obs[t] uses ``action[t-1]``, zero where ``is_first[t]``; the latent state is reset to the
initial state where ``is_first[t]``.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import torch
from torch import nn

from agents.config import ConfigError, check_choice, check_float, check_int
from world_models.base import State, WorldModel
from world_models.distributions import (
    SAMPLERS,
    TwoHot,
    bernoulli_nll,
    categorical_entropy,
    categorical_kl,
    index_onehot,
    sample_index,
    unimix_probs,
)
from world_models.networks import (
    MLP,
    NORMS,
    Features,
    MultiDecoder,
    MultiEncoder,
    OneHotFeatures,
    init_dreamer_,
    make_norm,
    zero_init_,
)

PREFIX = "world_model."
KEYS = (
    "name", "deter", "stoch", "classes", "units", "layers", "cnn_depth", "minres", "norm",
    "unimix", "sampler", "initial", "free_nats", "kl_dyn", "kl_rep", "loss_scales", "reward_bins",
    "reward_low", "reward_high", "lr", "eps", "grad_clip",
)  # fmt: skip
LOSS_KEYS = ("image", "vector", "reward", "cont")


def check_keys(cfg: Any, keys: tuple[str, ...], prefix: str) -> None:
    """Every key present and no unknown one (a misspelt override fails at start-up)."""
    present = set(cfg.keys())
    missing = [k for k in keys if k not in present]
    if missing:
        raise ConfigError(
            f"missing config key '{prefix}{missing[0]}' (see configs/world_model/rssm.yaml)"
        )
    unknown = sorted(present - set(keys))
    if unknown:
        raise ConfigError(f"unknown config key '{prefix}{unknown[0]}'; known keys: {list(keys)}")


class NormGRUCell(nn.Module):
    """GRU cell with LayerNorm on the gates (DreamerV2/V3 2023).

    One Linear on [x, h] gives reset, candidate and update pre-activations [N, 3D], which
    are normalised together; the update gate has bias -1 so that early in training the
    cell mostly keeps its state (better gradient flow over long sequences).
    """

    def __init__(self, in_dim: int, deter: int, norm: str = "layer") -> None:
        super().__init__()
        self.linear = nn.Linear(in_dim + deter, 3 * deter, bias=norm == "none")
        self.norm = make_norm(norm, 3 * deter)

    def forward(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        parts = self.norm(self.linear(torch.cat([x, h], -1)))  # [N, 3D]
        reset, cand, update = parts.chunk(3, -1)  # 3 x [N, D]
        reset = torch.sigmoid(reset)
        cand = torch.tanh(reset * cand)
        update = torch.sigmoid(update - 1.0)
        return update * cand + (1.0 - update) * h  # [N, D]


def kl_losses(
    post_logits: torch.Tensor, prior_logits: torch.Tensor, free_nats: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DreamerV3 KL balancing with free bits: (dyn [...], rep [...], raw KL [...]).

    post/prior logits [..., S, K]. The per-categorical KLs are summed over S first and only
    then clamped below at ``free_nats``: the free budget is for the whole latent, not for
    each categorical. ``dyn`` trains the prior towards the (frozen) posterior; ``rep`` trains
    the posterior/encoder towards the (frozen) prior.
    """
    dyn = categorical_kl(post_logits.detach(), prior_logits).sum(-1)  # [...]
    rep = categorical_kl(post_logits, prior_logits.detach()).sum(-1)  # [...]
    raw = dyn.detach()
    return dyn.clamp(min=free_nats), rep.clamp(min=free_nats), raw


class RSSM(WorldModel):
    """DreamerV3 RSSM world model (2023 version). See the module docstring.

    States are dicts: ``deter`` [N, D], ``stoch`` [N, S, K] (one-hot samples, straight-through),
    ``logits`` [N, S, K] (unimixed log-probs of the distribution ``stoch`` was drawn from),
    ``index`` [N, S] (int64, the class of each one-hot: where no gradient must reach z, heads,
    actor and critic read ``head_features``, which gathers weight columns by it instead of
    multiplying the 80%-zero features, ``networks.linear_onehot``).
    """

    capturable = True  # agent.cuda_graph: the update is graph-safe (tests/test_cuda_graph.py)
    batched_heads = True  # imagine_step(..., heads=False) + heads(): see WorldModel

    def __init__(self, cfg: Any, obs_space: gym.spaces.Dict, action_dim: int) -> None:
        super().__init__()
        p = PREFIX
        check_keys(cfg, KEYS, p)
        check_keys(cfg["loss_scales"], LOSS_KEYS, f"{p}loss_scales.")
        self.deter = check_int(cfg, "deter", p)
        self.stoch = check_int(cfg, "stoch", p)
        self.classes = check_int(cfg, "classes", p, low=2)
        units = check_int(cfg, "units", p)
        layers = check_int(cfg, "layers", p, low=0)
        depth = check_int(cfg, "cnn_depth", p)
        minres = check_int(cfg, "minres", p)
        norm = check_choice(cfg, "norm", NORMS, p)
        self.unimix = check_float(cfg, "unimix", p, 0.0, 1.0)
        self.sampler = check_choice(cfg, "sampler", SAMPLERS, p)
        self.initial_mode = check_choice(cfg, "initial", ("learned", "zeros"), p)
        self.free_nats = check_float(cfg, "free_nats", p, 0.0)
        self.kl_dyn = check_float(cfg, "kl_dyn", p, 0.0)
        self.kl_rep = check_float(cfg, "kl_rep", p, 0.0)
        self.scales = {k: check_float(cfg, f"loss_scales.{k}", p, 0.0) for k in LOSS_KEYS}
        bins = check_int(cfg, "reward_bins", p, low=2)
        low = check_float(cfg, "reward_low", p)
        high = check_float(cfg, "reward_high", p)
        if not high > low:
            raise ConfigError(f"{p}reward_high must be > {p}reward_low, got {high} <= {low}")
        # optimiser settings are read by the agent; validated here so a typo fails at start-up
        self.lr = check_float(cfg, "lr", p, 0.0)
        self.eps = check_float(cfg, "eps", p, 0.0)
        self.grad_clip = check_float(cfg, "grad_clip", p, 0.0)
        if isinstance(action_dim, bool) or not isinstance(action_dim, int) or action_dim < 1:
            raise ValueError(f"action_dim must be a positive int, got {action_dim!r}")
        self.action_dim = action_dim

        d, s, k = self.deter, self.stoch, self.classes
        self.feature_dim = d + s * k
        try:
            self.encoder = MultiEncoder(obs_space, depth, units, layers, norm, minres)
            self.decoder = MultiDecoder(
                self.feature_dim, obs_space, depth, units, layers, norm, minres
            )
        except ValueError as e:  # image size vs minres: name the config key that can fix it
            if "minres" in str(e):
                raise ConfigError(f"{p}minres: {e}") from e
            raise
        self.obs_keys = self.encoder.keys
        # h_t = GRU(h_{t-1}, MLP([z_{t-1}, a_{t-1}]))   ("img_in" in the official code)
        self.img_in = MLP(s * k + action_dim, None, units, 1, norm)
        self.gru = NormGRUCell(units, d, norm)
        # prior p(z_t | h_t) and posterior q(z_t | h_t, e_t)
        self.prior_net = MLP(d, s * k, units, 1, norm)
        self.post_net = MLP(d + self.encoder.out_dim, s * k, units, 1, norm)
        self.reward_head = MLP(self.feature_dim, bins, units, layers, norm)
        self.cont_head = MLP(self.feature_dim, 1, units, layers, norm)
        self.twohot = TwoHot(bins, low, high)
        self.initial_deter = nn.Parameter(torch.zeros(d))  # h_0 = tanh(w), learned
        init_dreamer_(self)
        zero_init_(self.reward_head.out)

    # ----------------------------------------------------------------- latent steps
    def _dist(self, raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Flat head output [..., S*K] -> unimixed (log-probs, probs), [..., S, K] each."""
        raw = raw.unflatten(-1, (self.stoch, self.classes))
        if self.unimix <= 0.0:
            logits = torch.log_softmax(raw, -1)
            return logits, logits.exp()
        probs = unimix_probs(raw, self.unimix)
        return probs.log(), probs

    def prior_logits(self, deter: torch.Tensor) -> torch.Tensor:
        """p(z | h): [..., D] -> log-probs [..., S, K]."""
        return self._dist(self.prior_net(deter))[0]

    def initial(self, batch_size: int) -> State:
        """h_0 = tanh(learned vector) (or zeros), z_0 = mode of p(z | h_0); [N, ...]."""
        w = self.initial_deter
        deter = torch.tanh(w) if self.initial_mode == "learned" else torch.zeros_like(w)
        logits = self.prior_logits(deter)  # [S, K]
        index = logits.argmax(-1, keepdim=True)  # [S, 1]
        # no gradient path into the prior through z_0
        stoch = index_onehot(index, logits, straight_through=False)  # [S, K]
        state = {"deter": deter, "stoch": stoch, "logits": logits, "index": index.squeeze(-1)}
        # contiguous copies, so callers may write into rows of the state
        return {
            k: v.unsqueeze(0).expand(batch_size, *v.shape).contiguous() for k, v in state.items()
        }

    def _sampled(self, deter: torch.Tensor, logits: torch.Tensor, probs: torch.Tensor) -> State:
        """State with z drawn from the categoricals (``logits``, ``probs`` [N, S, K]): one-hot
        ``stoch`` [N, S, K] (straight-through where a gradient is recorded) and its class
        ``index`` [N, S] (int64). ``probs`` serve the sample and the straight-through path,
        so no softmax is recomputed."""
        index = sample_index(logits, probs=probs, method=self.sampler)  # [N, S, 1]
        st = torch.is_grad_enabled() and probs.requires_grad
        stoch = index_onehot(index, logits, straight_through=st, probs=probs)  # [N, S, K]
        return {"deter": deter, "stoch": stoch, "logits": logits, "index": index.squeeze(-1)}

    def head_features(self, state: State) -> Features:
        """[h, z] as ``OneHotFeatures`` (h dense, z by its class index) unless a gradient must
        reach z through the straight-through one-hot; then the dense ``features``."""
        if "index" not in state or (torch.is_grad_enabled() and state["stoch"].requires_grad):
            return self.features(state)
        return OneHotFeatures(state["deter"], state["index"], self.classes, self.deter)

    def _recur(self, state: State, action: torch.Tensor) -> torch.Tensor:
        """h_t = f(h_{t-1}, z_{t-1}, a_{t-1}): -> [N, D]."""
        action = action.to(state["stoch"].dtype)
        feat = self.head_features(state)
        if isinstance(feat, OneHotFeatures):  # the input is [one-hot z (S*K), action (A)]
            x = self.img_in(OneHotFeatures(action, feat.index, self.classes, 0))
        else:
            stoch = state["stoch"].flatten(-2)  # [N, S*K]
            x = self.img_in(torch.cat([stoch, action], -1))  # [N, units]
        return self.gru(x, state["deter"])  # [N, D]

    def _reset(self, state: State, action: torch.Tensor, is_first: torch.Tensor, init: State):
        """Replace rows where ``is_first`` by the initial state and zero their action."""
        first = is_first.reshape(-1, 1)  # [N, 1]
        state = {
            key: torch.where(first.reshape(-1, *([1] * (v.dim() - 1))), init[key], v)
            for key, v in state.items()
        }
        return state, torch.where(first, torch.zeros_like(action), action)

    def _posterior(self, deter: torch.Tensor, embed: torch.Tensor) -> State:
        logits, probs = self._dist(self.post_net(torch.cat([deter, embed], -1)))  # [N, S, K]
        return self._sampled(deter, logits, probs)

    def observe_step(
        self,
        state: State,
        prev_action: torch.Tensor,
        obs: dict[str, torch.Tensor],
        is_first: torch.Tensor,
    ) -> State:
        """Posterior state after one real observation; rows with ``is_first`` start afresh.

        state [N, ...]; prev_action [N, A]; obs values [N, ...]; is_first bool [N].
        """
        state, prev_action = self._reset(state, prev_action, is_first, self.initial(len(is_first)))
        deter = self._recur(state, prev_action)  # [N, D]
        embed = self.encoder({key: obs[key] for key in self.obs_keys})  # [N, E]
        return self._posterior(deter, embed)

    def imagine_step(
        self, state: State, action: torch.Tensor, heads: bool = True
    ) -> tuple[State, torch.Tensor | None, torch.Tensor | None]:
        """One batched dream step from ``state`` [N, ...] with ``action`` [N, A].

        Returns (prior-sampled next state, predicted reward [N], continue probability [N]);
        ``heads=False`` returns (next state, None, None) for a caller that predicts reward and
        continue of the whole trajectory at once with ``heads``.
        """
        deter = self._recur(state, action)  # [N, D]
        nxt = self._sampled(deter, *self._dist(self.prior_net(deter)))
        if not heads:
            return nxt, None, None
        return (nxt, *self.heads(self.head_features(nxt)))

    def heads(self, feat: Features) -> tuple[torch.Tensor, torch.Tensor]:
        """Predicted reward [...] and continue probability [...] of features [..., F]."""
        reward = self.twohot.decode(self.reward_head(feat))
        cont = torch.sigmoid(self.cont_head(feat).squeeze(-1))
        return reward, cont

    def features(self, state: State) -> torch.Tensor:
        """[h, flatten(z)]: [..., D + S*K]."""
        return torch.cat([state["deter"], state["stoch"].flatten(-2)], -1)

    # ----------------------------------------------------------------- learning
    def observe(self, batch: dict[str, torch.Tensor], state: State | None = None) -> State:
        """Posterior states [B, T, ...] for a batch of sequences (a loop over T only).

        ``state`` [B, ...] is the latent before row 0 (rows with is_first ignore it);
        the encoder runs on all B*T observations at once.
        """
        is_first = batch["is_first"].bool()  # [B, T]
        bsz, steps = is_first.shape
        embed = self.encoder({key: batch[key] for key in self.obs_keys})  # [B, T, E]
        action = batch["action"].to(embed.dtype)  # [B, T, A]
        prev_action = torch.cat([torch.zeros_like(action[:, :1]), action[:, :-1]], 1)  # [B, T, A]
        init = self.initial(bsz)
        state = init if state is None else state
        posts = []
        for t in range(steps):
            state, act = self._reset(state, prev_action[:, t], is_first[:, t], init)
            deter = self._recur(state, act)  # [B, D]
            state = self._posterior(deter, embed[:, t])
            posts.append(state)
        return {key: torch.stack([s[key] for s in posts], 1) for key in posts[0]}  # [B, T, ...]

    def loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict, State]:
        """World-model loss on sequences (paper Eq. 4-5), averaged over B and T.

        batch: obs keys [B, T, ...], ``action`` float [B, T, A], ``reward`` [B, T],
        ``is_first``/``is_terminal`` bool [B, T]. Returns (scalar loss, detached metrics,
        posterior states ``deter`` [B, T, D], ``stoch``/``logits`` [B, T, S, K]).
        """
        post = self.observe(batch)
        prior = self.prior_logits(post["deter"])  # [B, T, S, K], all steps in one call
        feat = self.features(post)  # [B, T, F]
        dyn, rep, kl = kl_losses(post["logits"], prior, self.free_nats)  # [B, T] each

        losses = {
            key: value
            for key, value in self.decoder.loss(feat, {k: batch[k] for k in self.obs_keys}).items()
        }  # [B, T] each
        reward_logits = self.reward_head(feat)  # [B, T, bins]
        losses["reward"] = self.twohot.loss(reward_logits, batch["reward"].float())  # [B, T]
        cont_logits = self.cont_head(feat).squeeze(-1)  # [B, T]
        cont_target = 1.0 - batch["is_terminal"].to(cont_logits.dtype)
        losses["cont"] = bernoulli_nll(cont_logits, cont_target)  # [B, T]

        pred = sum(self.scales[key] * value.mean() for key, value in losses.items())
        total = pred + self.kl_dyn * dyn.mean() + self.kl_rep * rep.mean()

        metrics = {f"{key}_loss": value.detach().mean() for key, value in losses.items()}
        metrics.update(
            model_loss=total.detach(),
            dyn_loss=dyn.detach().mean(),
            rep_loss=rep.detach().mean(),
            kl=kl.mean(),
            prior_ent=categorical_entropy(prior.detach()).sum(-1).mean(),
            post_ent=categorical_entropy(post["logits"].detach()).sum(-1).mean(),
            reward_pred=self.twohot.decode(reward_logits.detach()).mean(),
            cont_acc=((cont_logits.detach() > 0).float() == cont_target).float().mean(),
        )
        return total, metrics, post
