"""World Models (Ha & Schmidhuber 2018): the paper's V -> M -> C pipeline, and its agent.

Shape symbols (docs/shapes.md): N envs, B batch, T sequence, Z latent, Hd LSTM size,
F = Z + Hd features, A action size, P controller parameters, C candidates, R rollouts.

The pipeline (``WorldModelsPipeline``), one stage after the other, each resumable from its file
under ``<run_dir>/world_models/``:

1. ``collect``    rollouts with a random policy (later iterations: with the controller) into a
                  ``Replay`` (``replay/`` chunk files + ``collect.pt``);
2. ``vae``        train V on single frames sampled from the replay (``vae.pt``);
3. ``mdn``        train M (MDN-RNN + reward/termination heads) on z sequences that the frozen V
                  encodes on the fly (``mdn.pt``);
4. ``controller`` CMA-ES (the ``cma`` package) over a linear controller
                  a = tanh(W [z, h] + b) (continuous) or argmax(W [z, h] + b) (discrete), each
                  candidate scored by the mean return of R rollouts in the real env or entirely
                  inside the dream (M sampled at ``world_model.temperature``), candidates spread
                  over a pool of worker processes (``controller.pt``).

With ``agent.iterations > 1`` the four stages repeat (the paper's iterative procedure): the
controller collects new rollouts that join the replay, V and M continue training, CMA-ES
restarts from the last controller. Stage files load with ``torch.load(weights_only=True)``.

``WorldModelsAgent`` is the ``Agent`` (``agent=world_models``): it filters [z, h] with V+M and
acts with the controller (uniformly random until a controller is trained or loaded). Inside
``scripts/train.py`` its ``update`` trains V and M jointly from the trainer's replay; the
controller comes only from the pipeline (``scripts/world_models.py``).
"""

from __future__ import annotations

import json
import math
import multiprocessing as mp
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from agents.base import Agent
from agents.checkpoint import atomic_torch_save
from agents.config import ConfigError, check_choice, check_float, check_int
from agents.replay import Replay
from world_models.vae_mdnrnn import VaeMdnRnn

P = "agent."
STAGES = ("collect", "vae", "mdn", "controller")


# ---------------------------------------------------------------------------- controller
def controller_size(feature_dim: int, action_dim: int) -> int:
    """P = F*A + A (CarRacing: 288 * 3 + 3 = 867, as the paper)."""
    return feature_dim * action_dim + action_dim


def controller_act(
    params: torch.Tensor, feat: torch.Tensor, action_dim: int, discrete: bool
) -> torch.Tensor:
    """Linear controller for C candidates at once.

    params [C, P], feat [C, M, F] -> model actions [C, M, A]: tanh(W f + b) for continuous
    spaces, one-hot(argmax(W f + b)) for discrete ones.
    """
    c, f = params.shape[0], feat.shape[-1]
    w = params[:, : f * action_dim].reshape(c, action_dim, f)  # [C, A, F]
    b = params[:, f * action_dim :].unsqueeze(1)  # [C, 1, A]
    out = torch.einsum("caf,cmf->cma", w, feat) + b  # [C, M, A]
    if discrete:
        return torch.nn.functional.one_hot(out.argmax(-1), action_dim).to(feat.dtype)
    return torch.tanh(out)


# ---------------------------------------------------------------------------- CMA-ES state
# The attributes of a ``cma.CMAEvolutionStrategy`` (cma 4.x) that ask/tell read or update:
# (owner path, attribute). Saved as tensors (arrays) and primitives so controller.pt loads with
# ``weights_only=True``; tests/test_world_models_agent.py checks that a restored ES asks the same
# populations as one that never stopped.
CMA_FIELDS = (
    ("", "mean"), ("", "mean_after_tell"), ("", "sigma"), ("", "countiter"), ("", "countevals"),
    ("", "pc"), ("", "pc2"), ("", "pc_neg"), ("", "itereigenupdated"), ("", "count_eigen"),
    ("", "hsiglist"), ("", "_flgtelldone"), ("", "number_of_solutions_asked"),
    ("", "mean_old"), ("", "mean_old_old"), ("", "_sigma_old"), ("", "_isotropic_mean_shift"),
    ("", "evaluations_per_f_value"), ("", "number_of_injections"),
    ("", "pop_injection_directions"), ("", "pop_injection_solutions"),
    ("", "number_of_injections_delivered"),
    ("adapt_sigma", "ps"), ("adapt_sigma", "is_initialized"),
    ("adapt_sigma", "s"), ("adapt_sigma", "initialized"), ("adapt_sigma", "_last_z"),  # TPA
    # (TPA, cma's step size for large dims, sets its constants itself: not is_initialized_base)
    ("adapt_sigma", "_ps_updated_iteration"), ("adapt_sigma", "delta"),
    ("adapt_sigma", "_last_multiplier"),
    ("sigma_vec", "scaling"),
    ("sm", "C"), ("sm", "B"), ("sm", "D"), ("sm", "last_update"), ("sm", "count_tell"),
    ("sm", "count_eigen"), ("sm", "_beta_diagonal_acceleration"), ("sm", "_corr_condition"),
    ("sm", "_corr_condition_count_eigen"),
    ("best", "x"), ("best", "f"), ("best", "evals"),
)  # fmt: skip


def _owner(es: Any, path: str) -> Any:
    return getattr(es, path) if path else es


def _plain_value(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.array(value, copy=True))
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (list, tuple)):
        return [_plain_value(v) for v in value]
    return value


def cma_state(es: Any, rng: np.random.Generator) -> dict:
    """CMA-ES state (``CMA_FIELDS``) + the sampling RNG as tensors and primitives.

    The key names are ``owner.attribute`` (``sm.C`` the covariance matrix, ``sm.B``/``sm.D`` its
    eigendecomposition, ``pc``/``adapt_sigma.ps`` the evolution paths, ``countiter`` the
    generation counter). ``rng`` is the generator behind the ES's ``randn`` option.
    """
    out: dict[str, Any] = {}
    for path, attr in CMA_FIELDS:
        owner = _owner(es, path)
        if owner is not None and hasattr(owner, attr):
            out[f"{path}.{attr}" if path else attr] = _plain_value(getattr(owner, attr))
    out["rng"] = _plain_rng(rng.bit_generator.state)
    return out


def _plain_rng(state: dict) -> dict:
    """numpy bit-generator state with its (possibly 128-bit) ints as strings."""
    return {
        k: (_plain_rng(v) if isinstance(v, dict) else (str(v) if isinstance(v, int) else v))
        for k, v in state.items()
    }


def _int_rng(state: dict) -> dict:
    return {
        k: (_int_rng(v) if isinstance(v, dict) else (int(v) if k != "bit_generator" else v))
        for k, v in state.items()
    }


def cma_restore(es: Any, rng: np.random.Generator, state: dict) -> None:
    """Put ``cma_state`` output back into a fresh ES built with the same options and ``rng``."""
    for key, value in state.items():
        if key == "rng":
            continue
        path, _, attr = key.rpartition(".")
        owner = _owner(es, path)
        old = getattr(owner, attr, None)
        if isinstance(value, torch.Tensor):
            value = value.numpy().copy()
        elif isinstance(value, list):  # injection directions / solutions: lists of arrays
            value = [v.numpy().copy() if isinstance(v, torch.Tensor) else v for v in value]
        elif isinstance(old, np.generic):
            value = type(old)(value)
        setattr(owner, attr, value)
    rng.bit_generator.state = _int_rng(state["rng"])
    if not hasattr(es, "timer"):  # made by the first ask(); ask() only ticks it later
        from cma.utilities.utils import ElapsedWCTime

        es.timer = ElapsedWCTime()


# ---------------------------------------------------------------------------- config
def validate(cfg: Any) -> dict[str, Any]:
    """Check ``cfg.agent`` (configs/agent/world_models.yaml); returns its plain values."""
    a = cfg.agent
    wm = cfg.world_model
    if wm.get("name") != "vae_mdnrnn":
        raise ConfigError(
            "agent=world_models needs world_model=vae_mdnrnn, "
            f"got world_model.name={wm.get('name')!r}"
        )
    stages = list(a.stages)
    for s in stages:
        if s not in STAGES:
            raise ConfigError(f"agent.stages entries must be in {list(STAGES)}, got {s!r}")
    out = {"stages": stages, "iterations": check_int(a, "iterations", P)}
    for key in ("rollouts", "max_steps", "capacity", "iterative_rollouts"):
        out[f"collect.{key}"] = check_int(a, f"collect.{key}", P)
    for key in ("epochs", "batch_size"):
        out[f"vae.{key}"] = check_int(a, f"vae.{key}", P)
    out["vae.lr"] = check_float(a, "vae.lr", P, 0.0)
    for key in ("epochs", "batch_size", "seq_len"):
        out[f"mdn.{key}"] = check_int(a, f"mdn.{key}", P)
    out["mdn.lr"] = check_float(a, "mdn.lr", P, 0.0)
    out["mdn.grad_clip"] = check_float(a, "mdn.grad_clip", P, 0.0)
    if out["mdn.seq_len"] < 2:
        raise ConfigError(
            f"agent.mdn.seq_len must be >= 2 (M predicts z_t+1), got {out['mdn.seq_len']}"
        )
    c = "controller."
    out[c + "mode"] = check_choice(a, c + "mode", ("real", "dream"), P)
    for key in ("generations", "population", "rollouts", "max_steps"):
        out[c + key] = check_int(a, c + key, P)
    if out[c + "population"] < 2:
        raise ConfigError("agent.controller.population must be >= 2 for CMA-ES")
    out[c + "workers"] = check_int(a, c + "workers", P, low=0)
    out[c + "sigma0"] = check_float(a, c + "sigma0", P, 0.0)
    out[c + "start_method"] = check_choice(
        a, c + "start_method", ("spawn", "forkserver", "fork"), P
    )
    out["online.batch_size"] = check_int(a, "online.batch_size", P)
    out["online.seq_len"] = check_int(a, "online.seq_len", P, low=2)
    return out


def _container(cfg: Any) -> dict:
    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg


def action_info(action_space: gym.Space) -> tuple[int, bool]:
    """(A, discrete) for the model: one-hot size of Discrete spaces, size of 1-D Box spaces."""
    if isinstance(action_space, gym.spaces.Discrete):
        return int(action_space.n), True
    if isinstance(action_space, gym.spaces.Box) and len(action_space.shape) == 1:
        return int(action_space.shape[0]), False
    raise ConfigError(
        f"agent=world_models supports Discrete or 1-D Box actions, got {action_space}"
    )


def model_action(action: torch.Tensor, action_dim: int, discrete: bool) -> torch.Tensor:
    """Env actions (int64 [...] or float [..., A]) -> model actions float [..., A]."""
    if discrete:
        return torch.nn.functional.one_hot(action.long(), action_dim).float()
    return action.float()


def env_action(action: torch.Tensor, discrete: bool, start: int = 0) -> np.ndarray:
    """Model actions [N, A] -> env actions: int64 [N] or float32 [N, A]."""
    if discrete:
        return action.argmax(-1).cpu().numpy().astype(np.int64) + start
    return action.cpu().numpy().astype(np.float32)


# ---------------------------------------------------------------------------- agent
class WorldModelsAgent(Agent):
    """Acts with the linear controller on [z, h] filtered by V+M; random until trained."""

    def __init__(self, cfg: Any, obs_space: gym.spaces.Dict, action_space: gym.Space, device):
        self.opts = validate(cfg)
        self.device = torch.device(device)
        self.action_space = action_space
        self.action_dim, self.discrete = action_info(action_space)
        self.start = int(getattr(action_space, "start", 0))
        self.model = VaeMdnRnn(cfg.world_model, obs_space, self.action_dim).to(self.device)
        self.params = torch.zeros(controller_size(self.model.feature_dim, self.action_dim))
        self.has_controller = False
        self.rng = np.random.default_rng(int(cfg.seed))
        self.seq_len = self.opts["online.seq_len"]
        self.batch_size = self.opts["online.batch_size"]
        self.opt = torch.optim.Adam(self.model.parameters(), lr=self.model.lr, eps=self.model.eps)

    def set_controller(self, params: torch.Tensor | np.ndarray) -> None:
        self.params = torch.as_tensor(np.asarray(params), dtype=torch.float32).clone()
        self.has_controller = True

    def random_actions(self, n: int) -> np.ndarray:
        if self.discrete:
            return self.rng.integers(0, self.action_dim, size=n, dtype=np.int64) + self.start
        low, high = self.action_space.low, self.action_space.high
        return self.rng.uniform(low, high, size=(n, self.action_dim)).astype(np.float32)

    @torch.no_grad()
    def act(self, obs: dict[str, np.ndarray], state: Any, explore: bool = True):
        """obs values [N, ...] with ``is_first`` [N]; state {``wm``: State, ``prev``: [N, A]}."""
        is_first = torch.as_tensor(np.asarray(obs["is_first"]), device=self.device)
        n = len(is_first)
        if state is None:
            state = {
                "wm": self.model.initial(n),
                "prev": torch.zeros(n, self.action_dim, device=self.device),
            }
        tensors = {
            k: torch.as_tensor(np.asarray(obs[k]), device=self.device) for k in self.model.obs_keys
        }
        wm = self.model.observe_step(state["wm"], state["prev"], tensors, is_first)
        if self.has_controller:
            feat = self.model.features(wm).unsqueeze(0)  # [1, N, F]
            params = self.params.to(self.device).unsqueeze(0)  # [1, P]
            action = controller_act(params, feat, self.action_dim, self.discrete)[0]  # [N, A]
            out = env_action(action, self.discrete, self.start)
        else:
            out = self.random_actions(n)
            action = model_action(torch.as_tensor(out) - self.start, self.action_dim, self.discrete)
        return out, {"wm": wm, "prev": action.to(self.device)}

    def update(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """One joint V+M step (Adam at ``world_model.lr``) on a replay batch [B, T, ...]."""
        batch = dict(batch)
        action = batch["action"]
        if self.discrete:
            action = action - self.start
        batch["action"] = model_action(action, self.action_dim, self.discrete)
        loss, metrics, _ = self.model.loss(batch)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        metrics["grad_norm"] = torch.nn.utils.clip_grad_norm_(
            self.model.parameters(), self.model.grad_clip
        )
        self.opt.step()
        return metrics

    def state_dict(self) -> dict:
        return {
            "model": self.model.state_dict(),
            "opt": self.opt.state_dict(),
            "params": self.params,
            "has_controller": self.has_controller,
            "rng": self.rng.bit_generator.state,
        }

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["opt"])
        self.params = state["params"].clone()
        self.has_controller = bool(state["has_controller"])
        self.rng.bit_generator.state = state["rng"]


# ---------------------------------------------------------------------------- rollouts
def _default_env_fn(env_cfg: dict, seed: int) -> gym.Env:
    from envs import make_env

    return make_env(env_cfg, seed=seed)


@torch.no_grad()
def run_episode(
    env: gym.Env,
    seed: int,
    max_steps: int,
    model: VaeMdnRnn | None = None,
    params: torch.Tensor | None = None,
    discrete: bool = False,
    keep_rows: bool = False,
) -> tuple[float, int, dict[str, np.ndarray] | None]:
    """One episode; random actions when ``params`` is None, else the controller on [z, h].

    Returns (return, length, rows [L+1, ...] in the replay row convention or None).
    """
    obs, _ = env.reset(seed=seed)
    env.action_space.seed(seed)
    action_dim, _ = action_info(env.action_space)
    start = int(getattr(env.action_space, "start", 0))
    rows: dict[str, list] = {}
    state = model.initial(1) if params is not None else None
    prev = torch.zeros(1, action_dim)
    reward, total, first, term, trunc = 0.0, 0.0, True, False, False
    steps = 0
    while True:
        last = term or trunc
        if params is not None and not last:
            t_obs = {
                k: torch.as_tensor(np.array(v))[None] for k, v in obs.items()
            }  # copy: read-only
            state = model.observe_step(state, prev, t_obs, torch.tensor([first]))
            feat = model.features(state)[None]  # [1, 1, F]
            prev = controller_act(params[None], feat, action_dim, discrete)[0]  # [1, A]
            action = env_action(prev, discrete, start)[0]
        else:
            action = env.action_space.sample()
        if keep_rows:
            row = {
                **obs,
                "action": np.asarray(action),
                "reward": np.float32(reward),
                "is_first": first,
                "is_terminal": term,
                "is_truncated": trunc,
                "is_last": last,
            }
            for k, v in row.items():
                rows.setdefault(k, []).append(np.asarray(v))
        if last:
            break
        obs, r, term, trunc, _ = env.step(action)
        reward, first = float(r), False
        total += reward
        steps += 1
        trunc = bool(trunc) or steps >= max_steps
        term = bool(term)
    return total, steps, ({k: np.stack(v) for k, v in rows.items()} if keep_rows else None)


@torch.no_grad()
def dream_returns(
    model: VaeMdnRnn,
    params: torch.Tensor,
    z0: torch.Tensor,
    max_steps: int,
    discrete: bool,
) -> torch.Tensor:
    """Returns [C, R] of C controllers params [C, P] from R start codes z0 [R, Z], in the dream.

    All C*R rollouts advance together; an episode ends where a Bernoulli draw from the
    predicted termination says so (graph-safe, no host syncs inside the loop).
    """
    c, r = params.shape[0], z0.shape[0]
    state = model.initial(c * r)
    state["z"] = z0.repeat(c, 1)  # [C*R, Z], candidate-major
    alive = torch.ones(c * r)
    total = torch.zeros(c * r)
    for _ in range(max_steps):
        feat = model.features(state).reshape(c, r, -1)  # [C, R, F]
        action = controller_act(params, feat, model.action_dim, discrete).reshape(c * r, -1)
        state, reward, cont = model.imagine_step(state, action)
        total = total + alive * reward
        alive = alive * (torch.rand_like(cont) < cont).to(alive.dtype)
    return total.reshape(c, r)


# worker-process globals, set once per worker by _init_worker
_W: dict[str, Any] = {}


def _init_worker(payload: dict) -> None:
    torch.set_num_threads(1)
    model = VaeMdnRnn(OmegaConf.create(payload["wm_cfg"]), payload["obs_space"], payload["adim"])
    model.load_state_dict(payload["model"])
    model.eval()
    _W.update(payload, model=model, env=None)


def _worker_task(task: dict) -> list:
    """Score or collect in a worker: task has ``kind`` (episodes | dream) and its inputs."""
    model = _W["model"]
    if task["kind"] == "dream":
        torch.manual_seed(task["seed"])
        params = torch.as_tensor(task["params"], dtype=torch.float32)  # [C, P]
        z0 = task["z0"]  # [R, Z]
        return dream_returns(model, params, z0, task["max_steps"], _W["discrete"]).tolist()
    if _W["env"] is None:
        _W["env"] = _W["env_fn"](_W["env_cfg"], task["seeds"][0])
    out = []
    for params in task["params"]:  # a list of [P] arrays or None
        p = None if params is None else torch.as_tensor(params, dtype=torch.float32)
        torch.manual_seed(task["seeds"][0])
        for seed in task["seeds"]:
            ret, length, rows = run_episode(
                _W["env"], seed, task["max_steps"], model, p, _W["discrete"], task["rows"]
            )
            out.append((ret, length, rows))
    return out


class _Pool:
    """A multiprocessing pool with V+M and the env in each worker, or in-process (workers 0)."""

    def __init__(self, payload: dict, workers: int, start_method: str):
        self.workers = workers
        if workers > 0:
            ctx = mp.get_context(start_method)
            self.pool = ctx.Pool(workers, initializer=_init_worker, initargs=(payload,))
        else:
            self.pool = None
            self._saved = dict(_W)
            _init_worker_inprocess(payload)

    def map(self, tasks: list[dict]) -> list:
        if self.pool is None:
            return [_worker_task(t) for t in tasks]
        return self.pool.map(_worker_task, tasks)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()
            self.pool.join()
        else:
            if _W.get("env") is not None:
                _W["env"].close()
            _W.clear()
            _W.update(self._saved)


def _init_worker_inprocess(payload: dict) -> None:
    threads = torch.get_num_threads()
    _init_worker(payload)
    torch.set_num_threads(threads)  # in-process: keep the caller's thread count


# ---------------------------------------------------------------------------- pipeline
class WorldModelsPipeline:
    """Runs the paper's stages in ``run_dir``; every stage resumes from its saved file.

    ``cfg`` is the full config (``agent=world_models world_model=vae_mdnrnn env=...``);
    ``env_fn(env_cfg, seed) -> gym.Env`` makes real envs (default ``envs.make_env``).
    """

    def __init__(
        self,
        cfg: Any,
        run_dir: str | Path,
        env_fn: Callable[[dict, int], gym.Env] | None = None,
        log: Callable[[str], None] = print,
    ):
        self.cfg = cfg
        self.opts = validate(cfg)
        self.env_cfg = _container(cfg.env)
        self.env_fn = env_fn or _default_env_fn
        self.log = log
        self.seed = int(cfg.seed)
        probe = self.env_fn(self.env_cfg, self.seed)
        self.obs_space, self.action_space = probe.observation_space, probe.action_space
        probe.close()
        self.agent = WorldModelsAgent(cfg, self.obs_space, self.action_space, "cpu")
        self.model = self.agent.model
        self.dir = Path(run_dir) / "world_models"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.replay = Replay(
            self.opts["collect.capacity"], 1, self.dir / "replay", chunk_size=1024, seed=self.seed
        )
        self.initial_obs: dict[str, torch.Tensor] = {}

    # ------------------------------------------------------------------ files
    def path(self, stage: str) -> Path:
        return self.dir / f"{stage}.pt"

    def load(self, stage: str) -> dict | None:
        path = self.path(stage)
        if not path.is_file():
            return None
        return torch.load(path, map_location="cpu", weights_only=True)

    def done(self, stage: str, iteration: int) -> bool:
        """Whether ``stage`` has finished ``iteration`` with the counts configured now."""
        saved = self.load(stage)
        if saved is None:
            return False
        if saved["iteration"] != iteration:
            return saved["iteration"] > iteration
        o = self.opts
        wanted = {
            "vae": ("epochs_done", o["vae.epochs"]),
            "mdn": ("epochs_done", o["mdn.epochs"]),
            "controller": ("generations_done", o["controller.generations"]),
        }
        if stage in wanted:
            key, count = wanted[stage]
            return saved[key] >= count
        return bool(saved["done"])

    def _need(self, stage: str, before: str) -> dict:
        saved = self.load(stage)
        if saved is None:
            raise ConfigError(
                f"stage '{before}' needs the output of stage '{stage}' ({self.path(stage)} is "
                f"missing); run --stage {stage} first with the same run directory"
            )
        return saved

    def _restore_inputs(self, stage: str) -> None:
        """Load what ``stage`` reads: replay and earlier weights."""
        order = STAGES.index(stage)
        if order >= 1:
            c = self._need("collect", stage)
            self.replay.load_state_dict(c["replay"])
            self.initial_obs = c["initial_obs"]
        if order >= 2:
            self.model.vae.load_state_dict(self._need("vae", stage)["vae"])
        if order >= 3:
            self.model.load_state_dict(self._need("mdn", stage)["m"], strict=False)

    def _payload(self) -> dict:
        return {
            "wm_cfg": _container(self.cfg.world_model),
            "obs_space": self.obs_space,
            "adim": self.agent.action_dim,
            "discrete": self.agent.discrete,
            "model": {k: v.detach().clone() for k, v in self.model.state_dict().items()},
            "env_fn": self.env_fn,
            "env_cfg": self.env_cfg,
        }

    def _pool(self) -> _Pool:
        o = self.opts
        return _Pool(self._payload(), o["controller.workers"], o["controller.start_method"])

    # ------------------------------------------------------------------ stages
    def collect(self, iteration: int = 0) -> dict:
        """Stage 1: rollouts (random at iteration 0, the controller after) into the replay."""
        o = self.opts
        saved = self.load("collect")
        if saved is not None:
            self.replay.load_state_dict(saved["replay"])
            self.initial_obs = saved["initial_obs"]
        episodes = o["collect.rollouts"] if iteration == 0 else o["collect.iterative_rollouts"]
        params = None
        if iteration > 0:
            self._restore_inputs("controller")
            params = self._need("controller", "collect")["params"].numpy()
        base = self.seed * 1_000_003 + iteration * 100_003
        returns = []
        pool = self._pool()
        try:
            workers = max(1, o["controller.workers"])
            seeds = [base + i for i in range(episodes)]
            tasks = [
                {
                    "kind": "episodes",
                    "params": [params],
                    "seeds": seeds[w::workers],
                    "max_steps": o["collect.max_steps"],
                    "rows": True,
                }
                for w in range(workers)
                if seeds[w::workers]
            ]
            for result in pool.map(tasks):
                for ret, _, rows in result:
                    returns.append(ret)
                    for t in range(len(rows["is_first"])):
                        self.replay.add({k: v[t : t + 1] for k, v in rows.items()})
                    first = {k: torch.as_tensor(rows[k][:1]) for k in self.model.obs_keys}
                    for k, v in first.items():
                        self.initial_obs[k] = torch.cat([self.initial_obs.get(k, v[:0]), v])[-1000:]
        finally:
            pool.close()
        out = {
            "iteration": iteration,
            "done": True,
            "episodes": len(returns),
            "return_mean": float(np.mean(returns)),
            "rows": len(self.replay),
            "replay": self.replay.state_dict(),
            "initial_obs": self.initial_obs,
        }
        atomic_torch_save(out, self.path("collect"))
        self.log(
            f"collect[{iteration}]: {len(returns)} episodes, return {out['return_mean']:.2f}, "
            f"{out['rows']} rows in replay"
        )
        return out

    def train_vae(self, iteration: int = 0) -> dict:
        """Stage 2: V on frames sampled uniformly from the replay; saved after every epoch."""
        o = self.opts
        self._restore_inputs("vae")
        opt = torch.optim.Adam(self.model.vae.parameters(), lr=o["vae.lr"])
        saved = self.load("vae")
        epoch, history = 0, []
        if saved is not None:
            self.model.vae.load_state_dict(saved["vae"])
            opt.load_state_dict(saved["opt"])
            history = list(saved["history"])
            if saved["iteration"] == iteration:
                epoch = saved["epochs_done"]
        bsz = o["vae.batch_size"]
        steps = math.ceil(len(self.replay) / bsz)
        while epoch < o["vae.epochs"]:
            losses = []
            for _ in range(steps):
                batch = self.replay.sample(bsz, 1)
                obs = {k: torch.as_tensor(batch[k][:, 0]) for k in self.model.obs_keys}
                loss, metrics, _ = self.model.vae_loss(obs)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                losses.append(loss.item())
            epoch += 1
            history.append(float(np.mean(losses)))
            out = {
                "iteration": iteration,
                "epochs_done": epoch,
                "done": epoch >= o["vae.epochs"],
                "vae": self.model.vae.state_dict(),
                "opt": opt.state_dict(),
                "history": history,
            }
            atomic_torch_save(out, self.path("vae"))
            self.log(f"vae[{iteration}] epoch {epoch}/{o['vae.epochs']}: loss {history[-1]:.2f}")
        return self.load("vae")

    def _m_state(self) -> dict:
        return {k: v for k, v in self.model.state_dict().items() if not k.startswith("vae.")}

    def train_mdn(self, iteration: int = 0) -> dict:
        """Stage 3: M on sequences of z from the frozen V (posterior samples, as the paper)."""
        o = self.opts
        self._restore_inputs("mdn")
        m_params = [p for n, p in self.model.named_parameters() if not n.startswith("vae.")]
        opt = torch.optim.Adam(m_params, lr=o["mdn.lr"])
        saved = self.load("mdn")
        epoch, history = 0, []
        if saved is not None:
            self.model.load_state_dict(saved["m"], strict=False)
            opt.load_state_dict(saved["opt"])
            history = list(saved["history"])
            if saved["iteration"] == iteration:
                epoch = saved["epochs_done"]
        bsz, seq = o["mdn.batch_size"], o["mdn.seq_len"]
        if not self.replay.can_sample(seq):
            raise ConfigError(
                f"agent.mdn.seq_len={seq} is longer than the replay ({len(self.replay)} rows)"
            )
        steps = math.ceil(len(self.replay) / (bsz * seq))
        adim, discrete = self.agent.action_dim, self.agent.discrete
        while epoch < o["mdn.epochs"]:
            nlls = []
            for _ in range(steps):
                b = self.replay.sample(bsz, seq)
                with torch.no_grad():
                    z = self.model.encode({k: torch.as_tensor(b[k]) for k in self.model.obs_keys})
                action = torch.as_tensor(b["action"])
                if discrete:
                    action = action - self.agent.start
                loss, metrics, _ = self.model.sequence_loss(
                    z,
                    model_action(action, adim, discrete),
                    torch.as_tensor(b["reward"]),
                    torch.as_tensor(b["is_first"]),
                    torch.as_tensor(b["is_terminal"]),
                )
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(m_params, o["mdn.grad_clip"])
                opt.step()
                nlls.append(float(metrics["mdn_nll"]))
            epoch += 1
            history.append(float(np.mean(nlls)))
            out = {
                "iteration": iteration,
                "epochs_done": epoch,
                "done": epoch >= o["mdn.epochs"],
                "m": self._m_state(),
                "opt": opt.state_dict(),
                "history": history,
            }
            atomic_torch_save(out, self.path("mdn"))
            self.log(f"mdn[{iteration}] epoch {epoch}/{o['mdn.epochs']}: nll {history[-1]:.3f}")
        return self.load("mdn")

    def _fitness(self, pool: _Pool, solutions: list[np.ndarray], generation: int) -> np.ndarray:
        """Mean return over R rollouts for each candidate [C] (common seeds per generation)."""
        o = self.opts
        r, workers = o["controller.rollouts"], max(1, o["controller.workers"])
        base = self.seed * 7_919 + generation * 10_007
        chunks = [list(range(len(solutions)))[w::workers] for w in range(workers)]
        chunks = [c for c in chunks if c]
        if o["controller.mode"] == "dream":
            z_gen = torch.Generator().manual_seed(base)
            obs0 = self.initial_obs
            pick = torch.randint(0, len(next(iter(obs0.values()))), (r,), generator=z_gen)
            with torch.random.fork_rng(devices=[]), torch.no_grad():  # z0 goes to workers
                torch.manual_seed(base)
                z0 = self.model.encode({k: v[pick] for k, v in obs0.items()})  # [R, Z]
            tasks = [
                {
                    "kind": "dream",
                    "params": np.stack([solutions[i] for i in c]),
                    "z0": z0,
                    "seed": base + j,
                    "max_steps": o["controller.max_steps"],
                }
                for j, c in enumerate(chunks)
            ]
            results = pool.map(tasks)
            fit = np.zeros(len(solutions))
            for c, res in zip(chunks, results):
                fit[c] = np.asarray(res).mean(1)
            return fit
        seeds = [base + i for i in range(r)]
        tasks = [
            {
                "kind": "episodes",
                "params": [solutions[i] for i in c],
                "seeds": seeds,
                "max_steps": o["controller.max_steps"],
                "rows": False,
            }
            for c in chunks
        ]
        fit = np.zeros(len(solutions))
        for c, res in zip(chunks, pool.map(tasks)):
            rets = np.asarray([x[0] for x in res]).reshape(len(c), r)
            fit[c] = rets.mean(1)
        return fit

    def train_controller(self, iteration: int = 0) -> dict:
        """Stage 4: CMA-ES over the linear controller; saved after every generation.

        Resuming within an iteration restores the whole CMA-ES state (mean, step size,
        covariance and its eigendecomposition, evolution paths, counters and the sampling RNG,
        as tensors and primitives, see ``cma_state``), so a resumed run asks exactly the
        populations an uninterrupted one would. A new iteration restarts CMA-ES from the last
        controller's mean (the paper's iterative procedure).
        """
        import cma

        o = self.opts
        self._restore_inputs("controller")
        size = controller_size(self.model.feature_dim, self.agent.action_dim)
        saved = self.load("controller")
        gen, history, x0, sigma = 0, [], np.zeros(size), o["controller.sigma0"]
        resume = saved is not None and saved["iteration"] == iteration
        if saved is not None:
            x0 = saved["params"].double().numpy()
            history = [list(h) for h in saved["history"].tolist()]
            if resume:
                gen, sigma = saved["generations_done"], float(saved["sigma"])
        rng = np.random.default_rng(self.seed + 1 + 1000 * iteration)
        es = cma.CMAEvolutionStrategy(
            x0,
            sigma,
            {
                "popsize": o["controller.population"],
                "randn": lambda *shape: rng.standard_normal(shape),
                "verbose": -9,
            },
        )
        if resume and "cma" in saved:
            cma_restore(es, rng, saved["cma"])
        pool = self._pool()
        try:
            while gen < o["controller.generations"]:
                t0 = time.time()
                solutions = es.ask()
                fit = self._fitness(pool, solutions, gen + 1000 * iteration)
                es.tell(solutions, (-fit).tolist())  # cma minimises
                gen += 1
                history.append([fit.mean(), fit.max(), fit.min()])
                out = {
                    "iteration": iteration,
                    "generations_done": gen,
                    "done": gen >= o["controller.generations"],
                    "params": torch.as_tensor(es.mean, dtype=torch.float32),
                    "best_params": torch.as_tensor(
                        solutions[int(fit.argmax())], dtype=torch.float32
                    ),
                    "sigma": float(es.sigma),
                    "history": torch.tensor(history, dtype=torch.float64),  # [G, 3] mean/max/min
                    "cma": cma_state(es, rng),
                }
                atomic_torch_save(out, self.path("controller"))
                self.log(
                    f"controller[{iteration}] gen {gen}/{o['controller.generations']} "
                    f"({o['controller.mode']}): fitness mean {fit.mean():.2f} max {fit.max():.2f} "
                    f"({time.time() - t0:.1f}s)"
                )
        finally:
            pool.close()
        saved = self.load("controller")
        self.agent.set_controller(saved["params"])
        return saved

    def evaluate(self, episodes: int, seed: int = 12345) -> list[float]:
        """Returns of the saved controller (distribution mean) in the real env, in-process."""
        self._restore_inputs("controller")
        params = self._need("controller", "evaluate")["params"]
        env = self.env_fn(self.env_cfg, seed)
        try:
            return [
                run_episode(
                    env,
                    seed + i,
                    self.opts["controller.max_steps"],
                    self.model,
                    params,
                    self.agent.discrete,
                )[0]
                for i in range(episodes)
            ]
        finally:
            env.close()

    def run(self, stages: list[str] | None = None) -> None:
        """Run ``stages`` (default ``agent.stages``) for every iteration, skipping finished ones."""
        stages = self.opts["stages"] if stages is None else stages
        fns = {
            "collect": self.collect,
            "vae": self.train_vae,
            "mdn": self.train_mdn,
            "controller": self.train_controller,
        }
        for iteration in range(self.opts["iterations"]):
            for stage in STAGES:
                if stage in stages and not self.done(stage, iteration):
                    fns[stage](iteration)
        summary = {s: _summary(self.load(s)) for s in STAGES if self.path(s).is_file()}
        (self.dir / "summary.json").write_text(json.dumps(summary, indent=1))


def _summary(saved: dict | None) -> dict:
    if saved is None:
        return {}
    keep = ("iteration", "done", "episodes", "return_mean", "rows", "epochs_done")
    out = {k: saved[k] for k in keep if k in saved}
    if "generations_done" in saved:
        out["generations_done"] = saved["generations_done"]
        out["fitness_mean_max_min"] = saved["history"][-1].tolist()
    if "history" in saved and "generations_done" not in saved:
        out["history"] = list(saved["history"])
    return out
