"""World Models (Ha & Schmidhuber 2018) as a WorldModel: V (``vae.py``) + M (``mdn_rnn.py``).

Shape symbols (docs/shapes.md): B batch, T sequence, N flat batch, Z latent size,
Hd LSTM hidden size, A action size, F = Z + Hd feature size.

State at row t (a dict of tensors): ``z`` [.., Z] the VAE code of obs[t], ``h``/``c`` [.., Hd]
the LSTM state that summarises (z, a) of rows before t (zeros on ``is_first`` rows).
Row convention (docs/architecture.md): action[t] is taken at obs[t], so
h_{t+1}, c_{t+1} = LSTM([z_t, a_t], (h_t, c_t)) and the mixture head on h_{t+1} predicts z_{t+1};
transitions into an ``is_first`` row cross an episode boundary and are masked out.
``features = [z, h]``, the controller input of the paper (288 numbers for CarRacing).

Losses: V's loss (reconstruction + floored KL) on every frame; M's mixture NLL on z sequences
*detached* from V (the paper trains M on V's outputs); two extras the paper does not have for
CarRacing: a reward head (squared error in symlog space) and a termination head (Bernoulli NLL
of ``is_terminal``), both reading ``features`` of the state they describe, like the RSSM's.
V and M share no parameters, so one Adam on the sum trains each exactly as on its own term.

Vector-only envs are supported: V then is an MLP VAE on symlog(vector) (see ``vae.py``).
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import torch

from agents.config import ConfigError, check_bool, check_float, check_int
from world_models.base import State, WorldModel
from world_models.distributions import bernoulli_nll, symexp, symlog
from world_models.mdn_rnn import MDNRNN, mdn_nll, mdn_sample
from world_models.networks import MLP
from world_models.vae import VAE

PREFIX = "world_model."


class VaeMdnRnn(WorldModel):
    """V + M with reward and termination heads; see the module docstring.

    ``cfg`` is the ``world_model`` subtree (configs/world_model/vae_mdnrnn.yaml).
    """

    def __init__(self, cfg: Any, obs_space: gym.spaces.Dict, action_dim: int) -> None:
        super().__init__()
        p = PREFIX
        self.latent = check_int(cfg, "latent", p)
        self.hidden = check_int(cfg, "hidden", p)
        self.mixtures = check_int(cfg, "mixtures", p)
        kl_tolerance = check_float(cfg, "kl_tolerance", p, 0.0)
        vector_units = check_int(cfg, "vector_units", p)
        vector_layers = check_int(cfg, "vector_layers", p, low=0)
        head_units = check_int(cfg, "head_units", p)
        head_layers = check_int(cfg, "head_layers", p, low=0)
        self.temperature = check_float(cfg, "temperature", p, 0.0)
        self.sample_z = check_bool(cfg, "sample_z", p)
        self.scales = {
            k: check_float(cfg, f"loss_scales.{k}", p, 0.0)
            for k in ("vae", "mdn", "reward", "done")
        }
        # optimiser settings read by agents that train the whole model with one Adam
        self.lr = check_float(cfg, "lr", p, 0.0)
        self.eps = check_float(cfg, "eps", p, 0.0)
        self.grad_clip = check_float(cfg, "grad_clip", p, 0.0)
        if isinstance(action_dim, bool) or not isinstance(action_dim, int) or action_dim < 1:
            raise ValueError(f"action_dim must be a positive int, got {action_dim!r}")
        self.action_dim = action_dim
        try:
            self.vae = VAE(obs_space, self.latent, kl_tolerance, vector_units, vector_layers)
        except ValueError as e:
            raise ConfigError(
                f"world_model=vae_mdnrnn cannot read this observation space: {e}"
            ) from e
        self.obs_keys = [k for k in ("image", "vector") if k in obs_space.spaces]
        self.rnn = MDNRNN(self.latent, action_dim, self.hidden, self.mixtures)
        self.feature_dim = self.latent + self.hidden
        self.reward_head = MLP(self.feature_dim, 1, head_units, head_layers)
        self.done_head = MLP(self.feature_dim, 1, head_units, head_layers)

    # ----------------------------------------------------------------- V
    def encode(self, obs: dict[str, torch.Tensor], sample: bool | None = None) -> torch.Tensor:
        """z [..., Z] for obs [..., ...]: a posterior sample (``sample_z``, paper) or the mean."""
        mean, logvar = self.vae.encode({k: obs[k] for k in self.obs_keys})
        sample = self.sample_z if sample is None else sample
        return self.vae.sample(mean, logvar) if sample else mean

    def vae_loss(self, obs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict, torch.Tensor]:
        """V's loss averaged over frames obs [..., ...]; returns (loss, metrics, z [..., Z]).

        z is the posterior sample the loss used (``sample_z``) or the posterior mean.
        """
        per_frame, terms, z, mean = self.vae.loss({k: obs[k] for k in self.obs_keys})
        z = z if self.sample_z else mean
        metrics = {f"vae_{k}": v.detach().mean() for k, v in terms.items()}
        loss = per_frame.mean()
        metrics["vae_loss"] = loss.detach()
        return loss, metrics, z

    # ----------------------------------------------------------------- M
    def rollout(
        self, z: torch.Tensor, action: torch.Tensor, is_first: torch.Tensor
    ) -> tuple[State, torch.Tensor]:
        """Run the LSTM over sequences: z [B, T, Z], action [B, T, A], is_first bool [B, T].

        Returns (states with ``z`` [B,T,Z], ``h``/``c`` [B,T,Hd]; LSTM outputs h_{t+1} [B,T,Hd]
        before any reset, which parameterise P(z_{t+1})).
        """
        bsz, steps = is_first.shape
        h = z.new_zeros(bsz, self.hidden)
        c = z.new_zeros(bsz, self.hidden)
        hs, cs, outs = [], [], []
        for t in range(steps):
            keep = (~is_first[:, t]).to(z.dtype).unsqueeze(-1)  # [B, 1]
            h, c = h * keep, c * keep  # reset at episode starts
            hs.append(h)
            cs.append(c)
            h, c = self.rnn.step(z[:, t], action[:, t], (h, c))  # h_{t+1} [B, Hd]
            outs.append(h)
        state = {"z": z, "h": torch.stack(hs, 1), "c": torch.stack(cs, 1)}
        return state, torch.stack(outs, 1)

    def sequence_loss(
        self,
        z: torch.Tensor,
        action: torch.Tensor,
        reward: torch.Tensor,
        is_first: torch.Tensor,
        is_terminal: torch.Tensor,
    ) -> tuple[torch.Tensor, dict, State]:
        """M's losses on z sequences [B, T, Z] (detached here), action [B, T, A], reward [B, T],
        is_first/is_terminal bool [B, T]. Returns (loss, metrics, posterior states [B, T, ...]).

        The MDN term is the mixture NLL of z_{t+1} averaged over valid transitions and Z.
        """
        z = z.detach()
        is_first = is_first.bool()
        state, outs = self.rollout(z, action.to(z.dtype), is_first)
        logpi, mean, logstd = self.rnn.mixture(outs[:, :-1])  # [B, T-1, Z, K]
        nll = mdn_nll(logpi, mean, logstd, z[:, 1:]).mean(-1)  # [B, T-1]
        valid = (~is_first[:, 1:]).to(z.dtype)  # [B, T-1]
        mdn = (nll * valid).sum() / valid.sum().clamp(min=1.0)
        feat = self.features(state)  # [B, T, F]
        reward_pred = self.reward_head(feat).squeeze(-1)  # [B, T] symlog
        reward_loss = (reward_pred - symlog(reward.to(z.dtype))).square().mean()
        done_logit = self.done_head(feat).squeeze(-1)  # [B, T]
        done_loss = bernoulli_nll(done_logit, is_terminal).mean()
        s = self.scales
        loss = s["mdn"] * mdn + s["reward"] * reward_loss + s["done"] * done_loss
        metrics = {
            "mdn_nll": mdn.detach(),
            "reward_loss": reward_loss.detach(),
            "done_loss": done_loss.detach(),
            "done_acc": ((done_logit.detach() > 0) == is_terminal.bool()).float().mean(),
        }
        return loss, metrics, state

    # ----------------------------------------------------------------- WorldModel API
    def loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict, State]:
        """V + M losses on replayed sequences (see ``WorldModel.loss``).

        Posterior: ``z`` [B,T,Z] (V's sample, detached), ``h``/``c`` [B,T,Hd].
        """
        vae, metrics, z = self.vae_loss({k: batch[k] for k in self.obs_keys})  # z [B, T, Z]
        seq, seq_metrics, post = self.sequence_loss(
            z, batch["action"], batch["reward"], batch["is_first"], batch["is_terminal"]
        )
        total = self.scales["vae"] * vae + seq
        metrics.update(seq_metrics)
        metrics["model_loss"] = total.detach()
        return total, metrics, post

    def initial(self, batch_size: int) -> State:
        """All zeros: ``z`` [N, Z], ``h``/``c`` [N, Hd]."""
        w = self.rnn.head.weight
        return {
            "z": w.new_zeros(batch_size, self.latent),
            "h": w.new_zeros(batch_size, self.hidden),
            "c": w.new_zeros(batch_size, self.hidden),
        }

    def observe_step(
        self,
        state: State,
        prev_action: torch.Tensor,
        obs: dict[str, torch.Tensor],
        is_first: torch.Tensor,
    ) -> State:
        """Advance the LSTM with the previous (z, a), reset where ``is_first``, encode obs.

        state [N, ...]; prev_action float [N, A]; obs values [N, ...]; is_first bool [N].
        """
        h, c = self.rnn.step(state["z"], prev_action.to(state["z"].dtype), (state["h"], state["c"]))
        keep = (~is_first.bool()).to(h.dtype).unsqueeze(-1)  # [N, 1]
        return {"z": self.encode(obs), "h": h * keep, "c": c * keep}

    def imagine_step(
        self, state: State, action: torch.Tensor
    ) -> tuple[State, torch.Tensor, torch.Tensor]:
        """Dream one step: z' ~ MDN(h') at ``temperature``; reward [N] and continue prob [N]
        read the new state's features. Graph-safe (inverse-CDF draws, no host syncs)."""
        h, c = self.rnn.step(state["z"], action.to(state["z"].dtype), (state["h"], state["c"]))
        logpi, mean, logstd = self.rnn.mixture(h)  # [N, Z, K]
        z = mdn_sample(logpi, mean, logstd, self.temperature)  # [N, Z]
        nxt = {"z": z, "h": h, "c": c}
        feat = self.features(nxt)  # [N, F]
        reward = symexp(self.reward_head(feat).squeeze(-1))  # [N]
        cont = 1.0 - torch.sigmoid(self.done_head(feat).squeeze(-1))  # [N]
        return nxt, reward, cont

    def features(self, state: State) -> torch.Tensor:
        """[z, h]: [..., Z + Hd]."""
        return torch.cat([state["z"], state["h"]], -1)
