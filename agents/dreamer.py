"""Dreamer: a world model learned from replay plus an actor-critic trained inside it.

Reads like DreamerV3's algorithm (Hafner et al. 2023, arXiv:2301.04104, Sec. 2-3):

1. act: filter the latent state with each real observation, h_t, z_t ~ q(z_t | h_t, x_t),
   and sample a_t ~ π(a_t | s_t) (the mode when evaluating);
2. update: on a replayed batch [B, T], train the world model (paper Eq. 4-5, its own AdamW
   and gradient clipping), then train the actor and critic on H-step dreams started from
   the detached posterior states (the last ``agent.imag_last`` rows of each sequence, or all
   B*T rows as in the paper with ``imag_last=0``; agents/actor_critic.py).

``agent.planner=mcts`` replaces step 1's actor sample by a decision-time MCTS inside the world
model from the posterior state (agents/mcts.py ``MCTSPlanner``: the actor's probabilities as
prior, the critic as leaf value, ``agent.mcts.*`` search keys; discrete actions only). Learning
is unchanged: the actor still learns from dreams, the planner only chooses the env actions.

``world_model=rssm`` gives DreamerV3; any other WorldModel (``world_model.name``) plugs into the
same agent. Build with ``DreamerAgent(cfg, obs_space, action_space, device)``, cfg being the full
config (``cfg.agent`` and ``cfg.world_model`` are read).

Shape symbols (docs/shapes.md): N parallel envs, B batch, T sequence, A action size.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import gymnasium as gym
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from agents.actor_critic import ActorCritic, _adamw, load_optimiser_state
from agents.base import Agent
from agents.config import ConfigError, check_bool, check_choice, check_float, check_int
from agents.cuda_graph import GraphedUpdate
from agents.mcts import MCTSPlanner
from world_models import make_world_model
from world_models.base import State
from world_models.distributions import one_hot

OBS_KEYS = ("image", "vector")


def cpu_has_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (oneDNN with AVX512-BF16 or AMX): only then
    does ``agent.precision=bf16`` speed a CPU update up (docs/benchmarks.md, session 10)."""
    mkldnn = torch.backends.mkldnn.is_available()
    return bool(mkldnn and torch.ops.mkldnn._is_mkldnn_bf16_supported())


class DreamerAgent(Agent):
    """World model + imagination actor-critic. See the module docstring.

    The acting state is ``{"latent": State [N, ...], "action": float [N, A]}`` (the previous
    action as the world model sees it: one-hot or in [-1, 1]).
    """

    def __init__(
        self,
        cfg: Any,
        obs_space: gym.spaces.Dict,
        action_space: gym.Space,
        device: torch.device | str = "cpu",
    ) -> None:
        self.device = torch.device(device)
        self.batch_size = check_int(cfg.agent, "batch_size", "agent.")
        self.seq_len = check_int(cfg.agent, "seq_len", "agent.")
        if isinstance(action_space, gym.spaces.Discrete):
            self.discrete, self.action_dim = True, int(action_space.n)
            self.action_start = int(action_space.start)
        elif isinstance(action_space, gym.spaces.Box) and len(action_space.shape) == 1:
            self.discrete, self.action_dim = False, int(action_space.shape[0])
            self.action_start = 0
        else:
            raise ValueError(
                f"Dreamer supports Discrete and 1-D Box action spaces, got {action_space}"
            )
        wm_cfg = cfg.world_model
        self.world_model = make_world_model(wm_cfg, obs_space, self.action_dim).to(self.device)
        self.obs_keys = [k for k in OBS_KEYS if k in obs_space.spaces]
        self.actor_critic = ActorCritic(
            cfg.agent,
            self.world_model.feature_dim,
            action_space,
            differentiable=self.world_model.differentiable_imagination,
        ).to(self.device)
        self.planner: MCTSPlanner | None = None
        planner = "planner" in cfg.agent  # absent from configs saved before the key existed
        if planner and check_choice(cfg.agent, "planner", ("actor", "mcts"), "agent.") == "mcts":
            if not self.discrete:
                raise ConfigError(
                    f"agent.planner=mcts needs a Discrete action space, got {action_space}"
                )
            seed = int(cfg.get("seed", 0))
            self.planner = MCTSPlanner(cfg.agent.mcts, self.action_dim, "agent.mcts.", seed)
        precision = "fp32"
        if "precision" in cfg.agent:
            precision = check_choice(cfg.agent, "precision", ("fp32", "bf16"), "agent.")
        self.autocast_dtype = torch.bfloat16 if precision == "bf16" else None
        if precision == "bf16" and self.device.type == "cpu" and not cpu_has_bf16():
            warnings.warn(
                "agent.precision=bf16 on a CPU without native bf16 matmuls (AVX512-BF16 / AMX): "
                "the update runs several times slower than fp32 (docs/dreamer.md)",
                stacklevel=2,
            )
        # agent.compile: torch.compile the world-model loss (forward, and backward through
        # AOTAutograd) and the imagination rollout; absent from configs saved before the key
        compiled = "compile" in cfg.agent and check_bool(cfg.agent, "compile", "agent.")
        self.model_loss = (
            torch.compile(self.world_model.loss) if compiled else self.world_model.loss
        )
        if compiled:  # the H-step dream too (the instance attribute shadows the method)
            self.actor_critic.imagine = torch.compile(self.actor_critic.imagine)
        # agent.compile_act: torch.compile the acting step (filter + actor), ~100 small ops
        # that otherwise cost ~2 ms per env step on the CPU in launch overhead alone
        self._filter_and_act = self._filter_and_act_eager
        compile_act = "compile_act" in cfg.agent and check_bool(cfg.agent, "compile_act", "agent.")
        if compile_act:
            if not self.world_model.capturable:
                raise ConfigError(
                    f"agent.compile_act=true needs a world model with a static-shape step; "
                    f"{type(self.world_model).__name__} has none (world_model=rssm has)"
                )
            self._filter_and_act = torch.compile(self._filter_and_act_eager, dynamic=False)
        # agent.cuda_graph: record the whole update (both losses, backward passes, clipping,
        # optimiser steps, slow critic) once and replay it (agents/cuda_graph.py); the acting
        # step too, one graph per (number of envs, explore)
        self.graphed: GraphedUpdate | None = None
        self._act_graphs: dict[tuple[int, bool], GraphedUpdate] = {}
        if "cuda_graph" in cfg.agent and check_bool(cfg.agent, "cuda_graph", "agent."):
            if not self.world_model.capturable:
                raise ConfigError(
                    f"agent.cuda_graph=true needs a world model whose update is graph-safe; "
                    f"{type(self.world_model).__name__} is not (world_model=rssm is)"
                )
            if compiled or compile_act:
                raise ConfigError(
                    "agent.cuda_graph and agent.compile / agent.compile_act are exclusive: pick one"
                )
            if self.device.type == "cuda":
                self.graphed = GraphedUpdate(self._update, device=self.device)
                if self.planner is None:  # the planner's search runs on the host
                    self._filter_and_act = self._filter_and_act_graphed
            else:
                warnings.warn(
                    f"agent.cuda_graph=true on device {self.device}: CUDA graphs need a GPU, "
                    "the update runs eagerly",
                    stacklevel=2,
                )
        p = "world_model."
        self.model_clip = check_float(wm_cfg, "grad_clip", p, 0.0)
        # AdamW over the world model's groups (IRIS: per-part lrs, decay on Linear weights);
        # world_model.lr serves groups without their own (RSSM: the one group of everything)
        groups = self.world_model.param_groups()
        own_lr = all("lr" in g for g in groups) and "lr" not in wm_cfg
        self.model_opt = _adamw(
            groups,
            0.0 if own_lr else check_float(wm_cfg, "lr", p, 0.0),
            check_float(wm_cfg, "eps", p, 0.0),
        )

    # ------------------------------------------------------------------ acting
    def _initial_state(self, n: int) -> dict[str, Any]:
        latent = self.world_model.initial(n)
        action = torch.zeros(n, self.action_dim, device=self.device)  # [N, A]
        return {"latent": latent, "action": action}

    @torch.no_grad()
    def act(
        self, obs: dict[str, np.ndarray], state: Any, explore: bool = True
    ) -> tuple[np.ndarray, dict[str, Any]]:
        """Filter the latent with ``obs`` (values [N, ...], ``is_first`` [N]) and pick actions.

        Returns env actions (int64 [N] for Discrete, float32 [N, A] in [-1, 1] for Box) and the
        new state. Images stay uint8 until the encoder.
        """
        is_first = torch.as_tensor(np.asarray(obs["is_first"]), device=self.device).bool()  # [N]
        n = is_first.shape[0]
        x = {k: torch.as_tensor(np.asarray(obs[k]), device=self.device) for k in self.obs_keys}
        if state is None:
            state = self._initial_state(n)
        latent = {k: v.to(self.device) for k, v in state["latent"].items()}
        prev_action = state["action"].to(self.device)  # [N, A]
        latent, action = self._filter_and_act(latent, prev_action, x, is_first, explore)
        if action is None:
            ac = self.actor_critic
            index, _ = self.planner.plan(
                self.world_model, lambda f: ac.policy(f)[0], ac.value, latent, explore
            )
            action = F.one_hot(index, self.action_dim).float()  # [N, A]
        if self.discrete:
            env_action = action.argmax(-1).cpu().numpy().astype(np.int64) + self.action_start
        else:
            env_action = action.cpu().numpy().astype(np.float32)
        return env_action, {"latent": latent, "action": action}

    def _filter_and_act_eager(
        self,
        latent: State,
        prev_action: torch.Tensor,
        x: dict[str, torch.Tensor],
        is_first: torch.Tensor,
        explore: bool,
    ) -> tuple[State, torch.Tensor | None]:
        """Posterior state [N, ...] after ``x`` and the actor's action [N, A] in it (None when
        the planner chooses). ``agent.compile_act`` compiles this function."""
        latent = self.world_model.observe_step(latent, prev_action, x, is_first)
        if self.planner is not None:
            return latent, None
        return latent, self.actor_critic.act(self.world_model.features(latent), explore)

    def _filter_and_act_graphed(
        self,
        latent: State,
        prev_action: torch.Tensor,
        x: dict[str, torch.Tensor],
        is_first: torch.Tensor,
        explore: bool,
    ) -> tuple[State, torch.Tensor]:
        """``_filter_and_act_eager`` replayed as a CUDA graph (``agent.cuda_graph``)."""
        key = (int(is_first.shape[0]), explore)
        if key not in self._act_graphs:
            self._act_graphs[key] = GraphedUpdate(self._act_step(explore), device=self.device)
        inputs = {f"latent.{k}": v for k, v in latent.items()}
        inputs.update({f"obs.{k}": v for k, v in x.items()})
        inputs.update(prev_action=prev_action, is_first=is_first)
        out = self._act_graphs[key](inputs)
        return {k[7:]: v for k, v in out.items() if k.startswith("latent.")}, out["action"]

    def _act_step(self, explore: bool) -> Callable[[dict], dict]:
        """The acting step on one flat dict of tensors (``latent.*``, ``obs.*``,
        ``prev_action``, ``is_first``) -> ``action`` and ``latent.*``: what a graph records."""

        def step(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            state = {k[7:]: v for k, v in inputs.items() if k.startswith("latent.")}
            obs = {k[4:]: v for k, v in inputs.items() if k.startswith("obs.")}
            state, action = self._filter_and_act_eager(
                state, inputs["prev_action"], obs, inputs["is_first"], explore
            )
            return {"action": action, **{f"latent.{k}": v for k, v in state.items()}}

        return step

    # ------------------------------------------------------------------ learning
    def _model_action(self, action: torch.Tensor) -> torch.Tensor:
        """Replay actions -> world-model actions [B, T, A] (one-hot for discrete)."""
        if self.discrete:
            return one_hot(action.long() - self.action_start, self.action_dim)
        return action.float().reshape(*action.shape[:2], self.action_dim)

    def model_inputs(
        self, batch: dict[str, torch.Tensor]
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Replay batch [B, T, ...] -> (world-model batch, the replay rows the actor-critic's
        replay-value loss reads: ``reward``, ``is_last``, ``is_terminal`` [B, T])."""
        data = {k: batch[k] for k in self.obs_keys}
        data["action"] = self._model_action(batch["action"])  # [B, T, A]
        data["reward"] = batch["reward"].float()  # [B, T]
        data["is_first"] = batch["is_first"].bool()  # [B, T]
        data["is_terminal"] = batch["is_terminal"].bool()  # [B, T]
        is_last = batch["is_last"] if "is_last" in batch else batch["is_terminal"]
        replay = {"reward": data["reward"], "is_terminal": data["is_terminal"]}
        replay["is_last"] = is_last.bool() | data["is_terminal"]  # [B, T]
        return data, replay

    def update(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """World-model step then actor-critic step on a replay batch [B, T, ...] (on the
        agent's device); replayed as a CUDA graph with ``agent.cuda_graph``."""
        if self.graphed is not None:
            return self.graphed(batch)
        return self._update(batch)

    def _update(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        data, replay = self.model_inputs(batch)
        with self._autocast():
            loss, metrics, post = self.model_loss(data)
        self.model_opt.zero_grad(set_to_none=True)
        loss.backward()
        params = list(self.world_model.parameters())
        metrics["model_grad_norm"] = nn.utils.clip_grad_norm_(params, self.model_clip, foreach=True)
        self.model_opt.step()

        # bf16 activations back to fp32 starts; integer entries (IRIS tokens) stay as they are
        start: State = {
            k: v.detach().float() if v.is_floating_point() else v.detach() for k, v in post.items()
        }  # [B, T, ...]
        ac = self.actor_critic.update(
            self.world_model, start, data["is_terminal"], replay, autocast=self._autocast
        )
        metrics.update(ac)
        return {k: v.float() for k, v in metrics.items()}

    def _autocast(self) -> torch.autocast:
        """bf16 autocast of the forward passes (``agent.precision=bf16``); weights, optimiser
        state and gradients stay fp32. A no-op context for fp32."""
        dtype = self.autocast_dtype
        return torch.autocast(
            self.device.type,
            dtype=dtype or torch.float32,
            enabled=bool(dtype),
            cache_enabled=self.graphed is None,  # cached casts must not outlive a graph capture
        )

    # ------------------------------------------------------------------ checkpoints
    def rng_state(self) -> dict | None:
        """The latent planner's generator (its only private stream), or None."""
        return None if self.planner is None else self.planner.state_dict()

    def set_rng_state(self, state: dict | None) -> None:
        if self.planner is not None and state is not None:
            self.planner.load_state_dict(state)

    def state_dict(self) -> dict:
        """World model, actor-critic (with slow critic and return normaliser), all optimisers."""
        state = {
            "world_model": self.world_model.state_dict(),
            "model_opt": self.model_opt.state_dict(),
            "actor_critic": self.actor_critic.learner_state_dict(),
        }
        if self.planner is not None:
            state["planner"] = self.planner.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        if self.graphed is not None:  # optimiser state is rebuilt: the graph would miss it
            self.graphed.reset()
        try:
            self.world_model.load_state_dict(state["world_model"])
            load_optimiser_state(self.model_opt, state["model_opt"])
            self.actor_critic.load_learner_state_dict(state["actor_critic"])
            if self.planner is not None and "planner" in state:
                self.planner.load_state_dict(state["planner"])
        except (KeyError, RuntimeError, ValueError) as e:
            raise ValueError(
                "the checkpoint does not match this Dreamer agent (different world_model.* / "
                f"agent.* sizes, action space or observation keys?): {e}"
            ) from e
