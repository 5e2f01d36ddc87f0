"""World-model quality on held-out episodes: VaeMdnRnn (World Models V+M) vs the RSSM.

    python scripts/wm_quality.py --run-dir /tmp/wmx/cp_pix --steps 150 --batch 8 --seq 16

Both models train on the replay that ``scripts/world_models.py --stage collect`` wrote under
``<run dir>/world_models/`` (the same replay, the same sequence of sampled batches [B, T], the
same number of gradient steps), each with its own configured optimiser:

- ``vae_mdnrnn`` (the run's ``world_model`` config): one Adam with V at ``agent.vae.lr`` and M
  (MDN-RNN + reward/termination heads) at ``agent.mdn.lr``, M's gradients clipped at
  ``agent.mdn.grad_clip``, i.e. the pipeline's stage settings, trained jointly;
- ``rssm`` (``configs/world_model/rssm.yaml``, its default CPU size unless ``--rssm key=value``):
  Adam at ``world_model.lr`` / ``eps``, clip ``grad_clip``.

Held-out data: ``--episodes`` new random-policy episodes (seeds 10,000,000 + i) of the run's
env. Along each episode the model filters the true frames with ``observe_step``; at every row t
it predicts row t+1 with one ``imagine_step`` (the dream's step: sampled z' / sampled prior),
and we score

- ``next_mse``: decoded predicted next frame vs the true next frame, MSE per pixel on [0, 1];
- ``recon_mse``: decoded filtered state of frame t vs frame t (reconstruction, for reference);
- ``copy_mse``: the true frame t as a guess for t+1 (a trivial baseline);
- ``reward_mae``: |predicted reward - true reward of row t+1|;
- ``done_acc``: (continue prob < 0.5) == is_terminal[t+1] over all transitions, with
  ``done_recall`` on terminal transitions and ``done_false_alarm`` on the others.

Prints a markdown table and writes ``<run dir>/world_models/quality.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import _common  # noqa: F401  (sys.path first)
import numpy as np
import torch
import yaml
from omegaconf import OmegaConf

from agents.replay import Replay
from agents.world_models_agent import (
    WorldModelsPipeline,
    action_info,
    model_action,
    run_episode,
)
from world_models.rssm import RSSM
from world_models.vae_mdnrnn import VaeMdnRnn


def _batch(replay: Replay, bsz: int, seq: int, keys: list[str], adim: int, discrete: bool):
    b = replay.sample(bsz, seq)
    out = {k: torch.as_tensor(b[k]) for k in keys}
    out["action"] = model_action(torch.as_tensor(b["action"]), adim, discrete)
    for k in ("reward", "is_first", "is_terminal"):
        out[k] = torch.as_tensor(b[k])
    return out


def _optimiser(name: str, model, cfg) -> tuple[torch.optim.Optimizer, list, float]:
    if name == "vae_mdnrnn":
        v = list(model.vae.parameters())
        m = [p for n, p in model.named_parameters() if not n.startswith("vae.")]
        opt = torch.optim.Adam(
            [{"params": v, "lr": cfg.agent.vae.lr}, {"params": m, "lr": cfg.agent.mdn.lr}]
        )
        return opt, m, float(cfg.agent.mdn.grad_clip)
    params = list(model.parameters())
    return torch.optim.Adam(params, lr=model.lr, eps=model.eps), params, model.grad_clip


def _decode(name: str, model, state) -> torch.Tensor:
    """Image [N, H, W, C] in [0, 1] from a latent state."""
    if name == "vae_mdnrnn":
        return model.vae.decode(state["z"])["image"].clamp(0, 1)
    return (model.decoder(model.features(state))["image"] + 0.5).clamp(0, 1)


@torch.no_grad()
def evaluate(name: str, model, episodes: list[dict], adim: int, discrete: bool) -> dict:
    stats: dict[str, list] = {k: [] for k in ("next", "recon", "copy", "rew", "pred", "term")}
    for rows in episodes:
        frames = torch.as_tensor(rows["image"]).float() / 255.0  # [L+1, H, W, C]
        actions = model_action(torch.as_tensor(rows["action"]), adim, discrete)  # [L+1, A]
        state, prev = model.initial(1), torch.zeros(1, adim)
        for t in range(len(frames)):
            obs = {"image": torch.as_tensor(rows["image"][t : t + 1])}
            state = model.observe_step(state, prev, obs, torch.tensor([t == 0]))
            recon = _decode(name, model, state)[0]
            stats["recon"].append(float((recon - frames[t]).square().mean()))
            if t + 1 >= len(frames):
                break
            nxt, reward, cont = model.imagine_step(state, actions[t : t + 1])
            pred = _decode(name, model, nxt)[0]
            stats["next"].append(float((pred - frames[t + 1]).square().mean()))
            stats["copy"].append(float((frames[t] - frames[t + 1]).square().mean()))
            stats["rew"].append(abs(float(reward[0]) - float(rows["reward"][t + 1])))
            stats["pred"].append(bool(cont[0] < 0.5))
            stats["term"].append(bool(rows["is_terminal"][t + 1]))
            prev = actions[t : t + 1]
    pred, term = np.array(stats["pred"]), np.array(stats["term"])
    return {
        "next_mse": float(np.mean(stats["next"])),
        "recon_mse": float(np.mean(stats["recon"])),
        "copy_mse": float(np.mean(stats["copy"])),
        "reward_mae": float(np.mean(stats["rew"])),
        "done_acc": float(np.mean(pred == term)),
        "done_recall": float(pred[term].mean()) if term.any() else float("nan"),
        "done_false_alarm": float(pred[~term].mean()) if (~term).any() else float("nan"),
        "transitions": int(len(term)),
        "terminal_transitions": int(term.sum()),
    }


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run-dir", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=16)
    ap.add_argument("--episodes", type=int, default=30)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--models", default="vae_mdnrnn,rssm")
    ap.add_argument("--rssm", nargs="*", default=[], help="world_model.key=value for the RSSM")
    args = ap.parse_args(argv)

    def body():
        torch.set_num_threads(1)
        cfg = OmegaConf.load(args.run_dir / "config.yaml")
        pipe = WorldModelsPipeline(cfg, args.run_dir, log=lambda s: None)
        collect = pipe.load("collect")
        if collect is None:
            raise SystemExit(f"{pipe.path('collect')} is missing: run --stage collect first")
        adim, discrete = action_info(pipe.action_space)
        if "image" not in pipe.obs_space.spaces:
            raise SystemExit("wm_quality scores frames: the run needs env.from_pixels=true")
        env = pipe.env_fn(pipe.env_cfg, 10_000_000)
        held = [
            run_episode(env, 10_000_000 + i, 10_000, keep_rows=True)[2]
            for i in range(args.episodes)
        ]
        env.close()
        rssm_cfg = OmegaConf.load(_common.ROOT / "configs/world_model/rssm.yaml")
        for override in args.rssm:
            key, _, value = override.removeprefix("world_model.").partition("=")
            OmegaConf.update(rssm_cfg, key, yaml.safe_load(value), merge=False)
        results = {}
        for name in args.models.split(","):
            torch.manual_seed(args.seed)
            if name == "vae_mdnrnn":
                model = VaeMdnRnn(cfg.world_model, pipe.obs_space, adim)
            elif name == "rssm":
                model = RSSM(rssm_cfg, pipe.obs_space, adim)
            else:
                raise SystemExit(f"--models entries must be vae_mdnrnn or rssm, got {name!r}")
            capacity = pipe.opts["collect.capacity"]
            replay = Replay(capacity, 1, pipe.dir / "replay", chunk_size=1024, seed=args.seed)
            replay.load_state_dict(collect["replay"])  # same sampler state: same batches
            opt, clip_params, clip = _optimiser(name, model, cfg)
            t0, losses = time.time(), []
            for step in range(args.steps):
                batch = _batch(replay, args.batch, args.seq, model.obs_keys, adim, discrete)
                loss, _, _ = model.loss(batch)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(clip_params, clip)
                opt.step()
                losses.append(loss.item())
                if (step + 1) % 25 == 0:
                    print(f"{name} step {step + 1}: loss {np.mean(losses[-25:]):.2f}", flush=True)
            train_s = time.time() - t0
            model.eval()
            torch.manual_seed(args.seed + 1)
            res = evaluate(name, model, held, adim, discrete)
            res.update(
                train_seconds=round(train_s, 1),
                params=sum(p.numel() for p in model.parameters()),
                steps=args.steps,
            )
            results[name] = res
            print(name, json.dumps(res), flush=True)
        out = {
            "run_dir": str(args.run_dir),
            "steps": args.steps,
            "batch": args.batch,
            "seq": args.seq,
            "train_rows": collect["rows"],
            "heldout_episodes": args.episodes,
            "seed": args.seed,
            "results": results,
        }
        (pipe.dir / "quality.json").write_text(json.dumps(out, indent=1))
        cols = ("next_mse", "recon_mse", "copy_mse", "reward_mae", "done_acc", "done_recall",
                "done_false_alarm", "params", "train_seconds")  # fmt: skip
        print("| model | " + " | ".join(cols) + " |")
        print("|---" * (len(cols) + 1) + "|")
        for name, r in results.items():
            cells = [f"{r[c]:.4f}" if isinstance(r[c], float) else str(r[c]) for c in cols]
            print(f"| {name} | " + " | ".join(cells) + " |")

    _common.run_cli(body)


if __name__ == "__main__":
    main(sys.argv[1:])
