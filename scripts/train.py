"""Train an agent: ``python scripts/train.py agent=dreamer env=cartpole seed=0``.

``resume=<run dir>`` continues that run with its saved config (plain key=value overrides,
e.g. a larger ``trainer.total_steps``, still apply). Sweeps: ``-m seed=0,1,2``.
"""

from __future__ import annotations

from pathlib import Path

import _common  # noqa: F401  (sys.path and resolvers first)
import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from agents.distributed import broadcast_object, init_from_env
from agents.trainer import Trainer


def train(cfg: DictConfig) -> dict:
    hydra_cfg = HydraConfig.get()
    dist = init_from_env("cuda" if torch.cuda.is_available() and cfg.device != "cpu" else "cpu")
    if cfg.resume:
        cfg, run_dir = _common.resume_config(cfg.resume, list(hydra_cfg.overrides.task))
        resume = True
    else:
        # under torchrun every rank uses rank 0's directory (pass run_dir= to name it)
        run_dir = Path(broadcast_object(hydra_cfg.runtime.output_dir, dist))
        resume = False
        if dist.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            resolved = OmegaConf.to_container(cfg, resolve=True)
            resolved["run_dir"] = str(run_dir)
            tmp = run_dir / ".config.yaml.tmp"
            tmp.write_text(OmegaConf.to_yaml(OmegaConf.create(resolved)))
            tmp.replace(run_dir / "config.yaml")
        broadcast_object(None, dist)  # the others wait for config.yaml
        cfg = OmegaConf.load(run_dir / "config.yaml")
        OmegaConf.set_struct(cfg, True)
    if dist.is_main:
        print(f"run directory: {run_dir}", flush=True)
    trainer = Trainer(cfg, run_dir, resume=resume, dist=dist)
    return trainer.run()


@hydra.main(version_base="1.3", config_path="../configs", config_name="config")
def main(cfg: DictConfig) -> float | None:
    result: dict = {}

    def body():
        result.update(train(cfg))

    _common.run_cli(body)
    return result.get("eval/return_mean")  # sweeper objective


if __name__ == "__main__":
    main()
