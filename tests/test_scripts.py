"""The entry points as a user runs them: train, eval, plot, resume, and their error messages."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run(script: str, *args: str, ok: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / script), *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=300,
    )
    if ok:
        assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


@pytest.fixture(scope="module")
def random_run(tmp_path_factory) -> Path:
    """A finished random-agent CartPole run (300 steps, two evaluations)."""
    run_dir = tmp_path_factory.mktemp("runs") / "random"
    run(
        "train.py",
        "agent=random",
        "env=cartpole",
        "trainer.total_steps=300",
        "trainer.eval_every=150",
        "trainer.eval_episodes=2",
        "trainer.log_every=150",
        "trainer.progress=false",
        "logger.mode=disabled",
        f"run_dir={run_dir}",
    )
    return run_dir


def test_train_writes_a_run_directory(random_run):
    assert (random_run / "config.yaml").is_file()
    assert (random_run / "checkpoints" / "latest.pt").is_file()
    rows = [json.loads(line) for line in (random_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [150, 300]
    assert all("eval/return_mean" in r for r in rows)
    # a random CartPole policy lasts ~22 steps on average; certainly between 8 and 100
    assert 8 < rows[-1]["eval/return_mean"] < 100


def test_eval_prints_mean_std_and_episodes(random_run):
    out = run("eval.py", f"run={random_run}", "episodes=3").stdout
    assert "random on CartPole-v1 after 300 env steps: return" in out
    returns = json.loads(out.split("returns: ")[1].splitlines()[0])
    assert len(returns) == 3 and all(r >= 8 for r in returns)


def test_plot_writes_png(random_run, tmp_path):
    out = tmp_path / "curve.png"
    run("plot.py", f"runs=[{random_run}]", f"out={out}", "metric=eval/return_mean")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_resume_extends_a_finished_run(random_run, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(random_run, copy)
    run("train.py", f"resume={copy}", "trainer.total_steps=450")
    rows = [json.loads(line) for line in (copy / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [150, 300, 450]


def test_user_errors_are_one_line(random_run, tmp_path):
    proc = run("train.py", "trainer.totl_steps=5", ok=False)
    assert proc.returncode != 0 and "totl_steps" in proc.stderr
    proc = run("train.py", f"resume={random_run}", "env=atari", ok=False)
    assert proc.returncode == 2
    assert "cannot change config group 'env' when resuming" in proc.stderr
    proc = run("eval.py", f"run={tmp_path}", ok=False)
    assert proc.returncode == 2 and "is not a yume run directory" in proc.stderr
    proc = run(
        "train.py",
        "agent=random",
        "env.id=NoSuchEnv-v0",
        f"run_dir={tmp_path / 'bad'}",
        "logger.mode=disabled",
        ok=False,
    )
    assert proc.returncode == 2 and "unknown env id 'NoSuchEnv-v0'" in proc.stderr
    assert "Traceback" not in proc.stderr


# a small Dreamer on CartPole vectors for the benchmark runs below (4 x 8 batches)
TINY_DREAMER = (
    "agent=dreamer",
    "env=cartpole",
    "world_model.deter=32",
    "world_model.units=32",
    "agent.batch_size=4",
    "agent.seq_len=8",
)


def test_benchmark_reports_the_split_update_and_a_profile(tmp_path):
    trace = tmp_path / "trace.json"
    proc = run(
        "benchmark.py",
        *TINY_DREAMER,
        "bench.parts=[update,split,profile]",
        "bench.repeats=2",
        "bench.warmup=1",
        "bench.replay_rows=256",
        f"bench.profile_trace={trace}",
    )
    result = json.loads(proc.stdout[: proc.stdout.index("\n}\n") + 2])
    assert result["batch"] == "4x8" and result["agent"] == "dreamer"
    for key in ("update_s", "world_model_s", "imagination_s", "actor_critic_s"):
        assert 0 < result[key] < 60, key
    # 4 sequences x the last 8 rows = 32 starts; 15 imagined steps each
    assert result["imagination_starts"] == 32
    assert result["imagined_steps_per_s"] == pytest.approx(32 * 15 / result["imagination_s"])
    assert "Self CPU" in proc.stdout and "aten::" in proc.stdout  # the profiler's table
    assert json.loads(trace.read_text())["traceEvents"]
    assert proc.stdout.rstrip().splitlines()[-1].startswith("| dreamer+rssm | CartPole-v1 | 4x8")

    alone = run(
        "benchmark.py",
        *TINY_DREAMER,
        "bench.parts=[profile]",
        "bench.repeats=1",
        "bench.warmup=0",
        "bench.replay_rows=256",
        "bench.profile_shapes=true",
    )
    assert "aten::" in alone.stdout  # the profile needs no other part to build its batch
    # bench.profile_shapes: one row per operator and input shapes, e.g. [[32, 16], []]
    assert "Input Shapes" in alone.stdout and re.search(r"\[\[\d+, \d+\]", alone.stdout)


def test_benchmark_dream_part_reports_steps_and_tokens_per_second(tmp_path):
    table = tmp_path / "rows.md"
    proc = run(
        "benchmark.py",
        "agent=dreamer",
        "world_model=transformer",
        "preset=iris_cpu",
        "env=cartpole",
        "env.from_pixels=true",
        "world_model.layers=1",
        "world_model.width=16",
        "world_model.heads=2",
        "world_model.tokens_per_frame=4",
        "world_model.tokenizer_channels=8",
        "world_model.kv_cache=false",
        "agent.batch_size=2",
        "bench.parts=[dream]",
        "bench.dream_starts=20",  # more than the 2 x 8 batch's 16 rows: rows repeat
        "bench.dream_horizon=3",
        "bench.repeats=1",
        "bench.warmup=0",
        "bench.replay_rows=64",
        f"bench.append={table}",
    )
    result = json.loads(proc.stdout[: proc.stdout.index("\n}\n") + 2])
    assert result["dream"] == "20x3" and result["kv_cache"] is False
    assert result["dream_steps_per_s"] == pytest.approx(60 / result["dream_s"])
    # IRIS generates K + 1 = 5 positions per imagined step
    assert result["dream_tokens_per_s"] == pytest.approx(5 * result["dream_steps_per_s"])
    rows = table.read_text().splitlines()
    assert len(rows) == 2 and rows[1].startswith("| dreamer+transformer | CartPole-v1 | 20x3 |")
    assert "| recompute |" in rows[1]

    bad = run(
        "benchmark.py", *TINY_DREAMER, "bench.parts=[dream]", "bench.dream_horizon=0", ok=False
    )
    assert bad.returncode == 2 and "bench.dream_starts and bench.dream_horizon" in bad.stderr


def test_benchmark_collection_rounds_time_the_policy_against_the_raw_env(tmp_path):
    proc = run(
        "benchmark.py",
        *TINY_DREAMER,
        "bench.parts=[collect]",
        "bench.collect_steps=200",
        "bench.collect_rounds=2",
        "bench.warmup=2",
    )
    result = json.loads(proc.stdout[: proc.stdout.index("\n}\n") + 2])
    # one CartPole step is ~50 us, one eager policy call on one env ~1 ms: the raw env is faster
    assert 0 < result["collect_steps_per_s"] < result["raw_env_steps_per_s"]
    assert "update_s" not in result  # only the asked-for part ran

    bad = run(
        "benchmark.py", *TINY_DREAMER, "bench.parts=[collect]", "bench.collect_rounds=0", ok=False
    )
    assert bad.returncode != 0 and "bench.collect_rounds must be >= 1" in bad.stderr
    assert "Traceback" not in bad.stderr
