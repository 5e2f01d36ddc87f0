"""Learning curves from metrics.jsonl: mean and spread over seeds, x axis in env steps.

``python scripts/plot.py runs='[multirun/2026...]' metric=eval/return_mean out=curves.png``
Runs are grouped by agent, world model and env (seeds pooled); each group is one line.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import _common
import hydra
import numpy as np
from omegaconf import DictConfig, OmegaConf

from agents.config import ConfigError, check_choice


def find_runs(paths: list[str]) -> list[Path]:
    """Run directories (holding metrics.jsonl) at or below each path."""
    found: list[Path] = []
    for p in paths:
        path = Path(p)
        if not path.exists():
            raise ConfigError(f"runs: '{p}' does not exist")
        if (path / "metrics.jsonl").is_file():
            found.append(path)
        else:
            found.extend(sorted(m.parent for m in path.rglob("metrics.jsonl")))
    if not found:
        raise ConfigError(f"runs: no metrics.jsonl found under {paths}")
    return found


def read_curve(run: Path, metric: str) -> tuple[np.ndarray, np.ndarray]:
    steps, values = [], []
    for line in (run / "metrics.jsonl").read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a torn last line of a crashed run
        if metric in row:
            steps.append(row["step"])
            values.append(row[metric])
    return np.asarray(steps), np.asarray(values, dtype=np.float64)


def group_name(run: Path) -> str:
    cfg_path = run / "config.yaml"
    if not cfg_path.exists():
        return run.name
    cfg = OmegaConf.load(cfg_path)
    wm = f"+{cfg.world_model.name}" if cfg.agent.name == "dreamer" else ""
    return f"{cfg.agent.name}{wm} {cfg.env.id}"


def aggregate(curves: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """Interpolate every seed's curve onto the union of steps (within the common range)."""
    curves = [c for c in curves if len(c[0])]
    end = min(c[0][-1] for c in curves)
    grid = np.unique(np.concatenate([c[0] for c in curves]))
    grid = grid[grid <= end]
    stacked = np.stack([np.interp(grid, s, v) for s, v in curves])  # [seeds, steps]
    return grid, stacked


def plot(cfg: DictConfig) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    spread = check_choice(cfg, "spread", ["std", "minmax"])
    runs = find_runs(list(cfg.runs) if not isinstance(cfg.runs, str) else [cfg.runs])
    groups: dict[str, list] = defaultdict(list)
    for run in runs:
        curve = read_curve(run, cfg.metric)
        if len(curve[0]):
            groups[group_name(run)].append(curve)
    if not groups:
        raise ConfigError(f"metric '{cfg.metric}' appears in none of {len(runs)} runs")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, curves in sorted(groups.items()):
        steps, values = aggregate(curves)
        mean = values.mean(0)
        if spread == "std":
            low, high = mean - values.std(0), mean + values.std(0)
        else:
            low, high = values.min(0), values.max(0)
        ax.plot(steps, mean, label=f"{name} (n={len(curves)})")
        ax.fill_between(steps, low, high, alpha=0.25)
    ax.set_xlabel("env steps")
    ax.set_ylabel(cfg.metric)
    ax.set_title(cfg.title or cfg.metric)
    ax.grid(alpha=0.3)
    ax.legend()
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    print(f"wrote {out} ({len(runs)} runs, {len(groups)} groups)")
    return out


@hydra.main(version_base="1.3", config_path="../configs", config_name="plot")
def main(cfg: DictConfig) -> None:
    _common.run_cli(lambda: plot(cfg))


if __name__ == "__main__":
    main()
