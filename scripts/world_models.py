"""The World Models pipeline (Ha & Schmidhuber 2018), stage by stage.

    python scripts/world_models.py env=carracing                      # all stages, new run dir
    python scripts/world_models.py --stage vae --run-dir runs/wm_car  # one stage, same run dir
    python scripts/world_models.py --run-dir runs/wm_car agent.controller.generations=100
    python scripts/world_models.py --run-dir runs/wm_car --evaluate 10

Config overrides are Hydra-style ``key=value`` / ``group=option``; ``agent=world_models`` and
``world_model=vae_mdnrnn`` are implied. An existing ``--run-dir`` reuses its saved config.yaml
(plain ``key=value`` overrides still apply) and every stage resumes from its saved file.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import _common  # noqa: F401  (sys.path and resolvers first)
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from agents.config import ConfigError
from agents.world_models_agent import STAGES, WorldModelsPipeline


def load_config(run_dir: Path | None, overrides: list[str]):
    """The run's config: saved config.yaml of an existing run dir, else composed from configs/."""
    if run_dir is not None and (run_dir / "config.yaml").is_file():
        cfg = OmegaConf.load(run_dir / "config.yaml")
        OmegaConf.set_struct(cfg, True)
        for override in overrides:
            key, _, value = override.partition("=")
            if key in _common.GROUPS:
                raise ConfigError(f"cannot change config group '{key}' of existing run {run_dir}")
            try:
                OmegaConf.update(cfg, key, yaml.safe_load(value), merge=True)
            except Exception as e:  # omegaconf raises several types for unknown keys
                raise ConfigError(f"cannot override '{key}': {e}") from e
        return cfg, run_dir
    with initialize_config_dir(str(_common.ROOT / "configs"), version_base="1.3"):
        cfg = compose("config", ["agent=world_models", "world_model=vae_mdnrnn", *overrides])
    resolved = OmegaConf.to_container(cfg, resolve=True)
    run_dir = run_dir or Path(resolved["run_dir"])
    resolved["run_dir"] = str(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg = OmegaConf.create(resolved)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    OmegaConf.set_struct(cfg, True)
    return cfg, run_dir


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stage", choices=[*STAGES, "all"], default="all")
    parser.add_argument("--run-dir", type=Path, default=None)
    parser.add_argument("--evaluate", type=int, default=0, help="real-env episodes of C after")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)

    def body():
        cfg, run_dir = load_config(args.run_dir, args.overrides)
        print(f"run directory: {run_dir}", flush=True)
        pipe = WorldModelsPipeline(cfg, run_dir, log=lambda s: print(s, flush=True))
        pipe.run(None if args.stage == "all" else [args.stage])
        if args.evaluate > 0:
            returns = pipe.evaluate(args.evaluate)
            mean, std = statistics.fmean(returns), statistics.pstdev(returns)
            summary = {"episodes": len(returns), "mean": mean, "std": std, "returns": returns}
            (pipe.dir / "evaluation.json").write_text(json.dumps(summary, indent=1))
            print(f"evaluation: {mean:.2f} ± {std:.2f} over {len(returns)} episodes", flush=True)

    _common.run_cli(body)


if __name__ == "__main__":
    main(sys.argv[1:])
