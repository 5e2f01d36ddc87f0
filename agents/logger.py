"""Metrics out of a run: W&B (offline by default), metrics.jsonl and a live progress bar.

Metrics arrive as tensors or numbers and are averaged and read from the device once per log
interval (``write``), never inside the update.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from agents.config import check_choice


class Logger:
    """Collects metrics between log points and writes them to every sink."""

    def __init__(
        self,
        cfg: Any,
        run_dir: Path,
        total_steps: int,
        start_step: int = 0,
        enabled: bool = True,
        wall_s: float = 0.0,
    ):
        """``enabled=False`` (ranks other than 0) keeps the interface but writes nothing.
        ``wall_s``: seconds the run had trained before this process (a resumed run's)."""
        self.run_dir = Path(run_dir)
        self.mode = check_choice(cfg.logger, "mode", ["offline", "online", "disabled"], "logger.")
        self.enabled = enabled
        self.path = self.run_dir / "metrics.jsonl"
        self._pending: dict[str, list] = defaultdict(list)
        self._wandb = None
        if self.mode != "disabled" and enabled:
            import wandb

            os.environ.setdefault("WANDB_SILENT", "true")
            self._wandb = wandb.init(
                project=cfg.logger.project,
                entity=cfg.logger.entity,
                group=cfg.logger.group,
                tags=list(cfg.logger.tags),
                mode=self.mode,
                dir=str(self.run_dir),
                config=OmegaConf.to_container(cfg, resolve=True),
                name=self.run_dir.name,
                id=_wandb_id(self.run_dir),
                resume="allow",
            )
        self._bar = None
        if cfg.trainer.progress and enabled:
            from tqdm import tqdm

            self._bar = tqdm(
                total=total_steps,
                initial=start_step,
                unit="step",
                dynamic_ncols=True,
                smoothing=0.1,
            )
        self._bar_time, self._bar_updates = time.perf_counter(), 0
        self._last_time = time.perf_counter()
        self._wall_start = self._last_time - wall_s
        self._last_step = start_step
        self._updates_since = 0

    def add(self, metrics: dict[str, Any], prefix: str = "") -> None:
        """Queue values (tensors stay on their device until ``write``)."""
        for key, value in metrics.items():
            self._pending[prefix + key].append(value)

    def count_updates(self, n: int) -> None:
        self._updates_since += n

    def wall_s(self) -> float:
        """Seconds of training so far, over every process of a resumed run."""
        return time.perf_counter() - self._wall_start

    def write(self, step: int, extra: dict[str, float] | None = None) -> dict[str, float]:
        """Average the queued values, append them to metrics.jsonl and W&B; returns the row."""
        row: dict[str, float] = {}
        tensors = {k: v for k, v in self._pending.items() if torch.is_tensor(v[0])}
        if tensors:  # one device-to-host copy for all tensor metrics
            keys = list(tensors)
            means = torch.stack(
                [torch.stack([t.detach().float() for t in tensors[k]]).mean() for k in keys]
            )
            row.update(zip(keys, means.cpu().tolist()))
        for key, values in self._pending.items():
            if key not in tensors:
                row[key] = float(sum(values) / len(values))
        self._pending.clear()
        now = time.perf_counter()
        elapsed = max(now - self._last_time, 1e-9)
        row["perf/env_steps_per_s"] = (step - self._last_step) / elapsed
        row["perf/updates_per_s"] = self._updates_since / elapsed
        row["perf/wall_s"] = now - self._wall_start
        self._last_time, self._last_step, self._updates_since = now, step, 0
        if extra:
            row.update(extra)
        row = {k: v for k, v in row.items() if not (isinstance(v, float) and math.isnan(v))}
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps({"step": step, **row}) + "\n")
        if self._wandb is not None:
            self._wandb.log(row, step=step)
        return row

    def log_video(self, path: Path, step: int) -> None:
        if self._wandb is not None:
            import wandb

            self._wandb.log({"eval/video": wandb.Video(str(path), format="mp4")}, step=step)

    def progress(self, step: int, last_return: float, updates: int) -> None:
        """Refresh the bar (env steps, steps/s and ETA from tqdm) at most every 0.5 s."""
        if self._bar is None:
            return
        now = time.perf_counter()
        if now - self._bar_time < 0.5:
            return
        rate = (updates - self._bar_updates) / max(now - self._bar_time, 1e-9)
        self._bar_time, self._bar_updates = now, updates
        self._bar.n = step
        self._bar.set_postfix(
            {"return": f"{last_return:.1f}", "updates": updates, "upd/s": f"{rate:.1f}"},
            refresh=False,
        )
        self._bar.refresh()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._wandb is not None:
            self._wandb.finish()


def _wandb_id(run_dir: Path) -> str:
    """A stable W&B run id per run directory, so a resumed run continues the same W&B run."""
    path = run_dir / "wandb_id.txt"
    if path.exists():
        return path.read_text().strip()
    import uuid

    run_id = uuid.uuid4().hex[:12]
    path.write_text(run_id)
    return run_id
