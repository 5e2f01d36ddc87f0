"""Evaluate a saved agent: ``python scripts/eval.py run=<run dir> episodes=20 video=true``.

Prints mean ± std and every episode's return; ``env_id=`` or ``+env.<key>=`` evaluate on an
overridden env; ``+agent.<key>=`` changes how the trained agent acts, e.g.
``+agent.planner=mcts +agent.mcts.simulations=64`` plans with MCTS inside a Dreamer agent's world
model; ``explore=true`` samples actions instead of taking the mode.
"""

from __future__ import annotations

import json
import time

import _common
import hydra
from omegaconf import DictConfig, OmegaConf

from agents import make_agent
from agents.checkpoint import load_checkpoint, resolve_checkpoint
from agents.config import check_int
from agents.evaluate import evaluate
from agents.trainer import select_device
from envs import make_env


def run_eval(cfg: DictConfig) -> dict:
    check_int(cfg, "episodes")
    check_int(cfg, "num_envs")
    run_dir, ckpt_path = resolve_checkpoint(cfg.run)
    run_cfg = OmegaConf.load(run_dir / "config.yaml")
    trained_on = run_cfg.env.id
    if cfg.env_id:
        run_cfg.env.id = cfg.env_id
    for key, value in (cfg.env or {}).items():
        OmegaConf.update(run_cfg, f"env.{key}", value, merge=True)
    for key, value in (cfg.agent or {}).items():  # acting-time knobs, e.g. the planner
        OmegaConf.update(run_cfg, f"agent.{key}", value, merge=True)
    run_cfg.device = cfg.device
    device = select_device(cfg.device)
    probe = make_env(run_cfg.env, seed=cfg.seed)
    agent = make_agent(run_cfg, probe.observation_space, probe.action_space, device)
    probe.close()
    ckpt = load_checkpoint(ckpt_path, agent_name=run_cfg.agent.name, env_id=trained_on)
    agent.load_state_dict(ckpt["agent"])
    video = None
    if cfg.video:
        video = run_dir / "videos" / f"eval_cli_{time.strftime('%Y%m%d-%H%M%S')}.mp4"
    result = evaluate(
        agent,
        run_cfg.env,
        episodes=cfg.episodes,
        num_envs=cfg.num_envs,
        seed=cfg.seed,
        explore=cfg.explore,
        video_path=video,
    )
    print(
        f"{run_cfg.agent.name} on {run_cfg.env.id} after {ckpt['env_steps']} env steps: "
        f"return {result['return_mean']:.2f} ± {result['return_std']:.2f} "
        f"over {len(result['returns'])} episodes"
    )
    print("returns: " + json.dumps([round(r, 3) for r in result["returns"]]))
    if video is not None:
        print(f"video: {video}" if video.exists() else "video: none (the env has no image obs)")
    return result


@hydra.main(version_base="1.3", config_path="../configs", config_name="eval")
def main(cfg: DictConfig) -> None:
    _common.run_cli(lambda: run_eval(cfg))


if __name__ == "__main__":
    main()
