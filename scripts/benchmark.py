"""Speed of one agent/world-model preset on one device, measured the same way every time.

    python scripts/benchmark.py agent=dreamer env=cartpole preset=dreamer_xs
    python scripts/benchmark.py env=atari preset=dreamer_s device=cuda \
        bench.append=docs/benchmarks.md

Reports seconds per update (split into world model / imagination / actor-critic for agents built
on a world model), imagined latent steps/s, env steps/s while collecting with policy inference
(and the raw vector env's rate), replay sampling time for the agent's [B, T] batch, and peak host
and device memory. ``bench.parts=[dream]`` times the dream alone at a fixed size (64 starts x
horizon 20 by default, as IRIS's): imagined steps/s and, for token world models, tokens/s;
``world_model.kv_cache=false`` gives IRIS's recomputing baseline. Each figure is the median of
``bench.repeats`` timings after ``bench.warmup`` untimed calls; CUDA work is synchronised before
every clock read.
"""

from __future__ import annotations

import gc
import json
import platform
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import _common
import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from agents import make_agent
from agents.config import ConfigError
from agents.cuda_graph import GraphedUpdate
from agents.dreamer import cpu_has_bf16
from agents.replay import Replay
from agents.trainer import reuse_host_memory, seed_everything, select_device, to_torch
from envs import make_vector_env
from world_models.base import flatten_state


def timed(fn: Callable[[], Any], repeats: int, warmup: int, device: torch.device) -> float:
    """Median seconds of ``fn()`` over ``repeats`` calls after ``warmup`` calls."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def fill_replay(env, agent, rows: int, num_envs: int, seed: int, directory=None) -> Replay:
    """Random-action rows (with the trainer's row convention) for sampling batches."""
    capacity = max(rows, 2 * agent.seq_len * num_envs)
    replay = Replay(capacity=capacity, num_envs=num_envs, directory=directory, seed=seed)
    obs, _ = env.reset(seed=seed)
    is_first = np.ones(num_envs, bool)
    reward = np.zeros(num_envs, np.float32)
    last = np.zeros(num_envs, bool)
    term = np.zeros(num_envs, bool)
    for _ in range(rows // num_envs):
        action = np.stack([env.single_action_space.sample() for _ in range(num_envs)])
        replay.add(
            {
                **obs,
                "action": action,
                "reward": reward,
                "is_first": is_first,
                "is_terminal": term,
                "is_truncated": last & ~term,
                "is_last": last,
            }
        )
        obs, reward, term, trunc, _ = env.step(action)
        reward = reward.astype(np.float32)
        is_first, last = last, term | trunc
    return replay


def collection_rate(
    env, agent, steps: int, num_envs: int, seed: int, policy: bool, warmup: int = 0
) -> float:
    """Env steps/s of stepping the vector env, with or without ``agent.act`` inference, after
    ``warmup`` untimed vector steps (``agent.compile_act`` compiles on the first)."""
    obs, _ = env.reset(seed=seed)
    is_first = np.ones(num_envs, bool)
    state = None
    space = env.single_action_space
    actions = np.stack([space.sample() for _ in range(num_envs)])
    start = time.perf_counter()
    for i in range(warmup + steps // num_envs):
        if i == warmup:
            start = time.perf_counter()
        if policy:
            actions, state = agent.act({**obs, "is_first": is_first}, state, explore=True)
        obs, _, term, trunc, _ = env.step(actions)
        is_first = term | trunc
    return steps // num_envs * num_envs / (time.perf_counter() - start)


def _rss_mb() -> float:
    """Resident set size of this process now, MB (Linux ``/proc/self/statm``)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def replay_memory(env, agent, rows: int, num_envs: int, seed: int) -> dict[str, float]:
    """Host memory of a full replay of ``rows`` random rows against the bytes it stores, and
    the process's peak while a new replay resumes the same rows from disk (as a resumed run
    does): a second copy of the rows would show as a peak near twice the stored bytes."""
    with tempfile.TemporaryDirectory() as directory:
        gc.collect()
        base = _rss_mb()
        replay = fill_replay(env, agent, rows, num_envs, seed, directory)
        full = _rss_mb() - base
        stored = replay.nbytes / 2**20
        state = replay.state_dict()  # flushes the rows to the chunk files
        capacity = replay.capacity
        del replay
        gc.collect()
        again = Replay(capacity=capacity, num_envs=num_envs, directory=directory, seed=seed)
        again.load_state_dict(state)
        resumed = _rss_mb() - base
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base
        del again
    return {
        "replay_stored_mb": stored,
        "replay_rss_mb": full,
        "replay_resumed_rss_mb": resumed,
        "replay_resume_peak_mb": peak,
    }


def benchmark(cfg: DictConfig) -> dict[str, Any]:
    bench = cfg.bench
    device = select_device(cfg.device)
    result_malloc = reuse_host_memory(cfg)
    seed_everything(cfg.seed)
    num_envs = cfg.env.num_envs
    env = make_vector_env(cfg.env, num_envs, seed=cfg.seed)
    agent = make_agent(cfg, env.single_observation_space, env.single_action_space, device)
    cpu = f"{platform.processor() or platform.machine()} {torch.backends.cpu.get_cpu_capability()}"
    cpu += " BF16" if cpu_has_bf16() else ""  # native bf16 matmuls: agent.precision=bf16 pays
    result: dict[str, Any] = {
        "agent": cfg.agent.name,
        "world_model": cfg.world_model.name if cfg.agent.name == "dreamer" else None,
        "env": cfg.env.id,
        "device": str(device),
        "hardware": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"{cpu}, {torch.get_num_threads()} threads",  # capability: AVX2 / AVX512 / ...
        "reuse_host_memory": result_malloc,
    }
    parts = set(bench.parts)
    unknown = parts - {"replay", "update", "split", "collect", "profile", "memory", "dream"}
    if unknown:
        raise ConfigError(f"bench.parts has unknown entries {sorted(unknown)}")
    if "collect" in parts and bench.collect_rounds < 1:
        raise ConfigError(f"bench.collect_rounds must be >= 1, got {bench.collect_rounds}")
    if "memory" in parts and agent.learns:  # before the update allocates: the peak is the replay's
        result.update(replay_memory(env, agent, bench.memory_rows, num_envs, cfg.seed))
    if agent.learns and parts & {"replay", "update", "split", "profile", "dream"}:
        b, t = agent.batch_size, agent.seq_len
        result["batch"] = f"{b}x{t}"
        replay = fill_replay(env, agent, bench.replay_rows, num_envs, cfg.seed)
        result["replay_sample_ms"] = 1e3 * timed(
            lambda: replay.sample(b, t), bench.repeats * 5, bench.warmup, device
        )
        result["replay_bytes_per_row"] = replay.nbytes / (len(replay) or 1)
        batch = to_torch(replay.sample(b, t), device)
        if "update" in parts:
            # agent.cuda_graph: its eager warm-up calls and the capture stay untimed
            graphed = getattr(agent, "graphed", None)
            warmup = max(bench.warmup, graphed.warmup + 1) if graphed else bench.warmup
            result["update_s"] = timed(lambda: agent.update(batch), bench.repeats, warmup, device)
            result["cuda_graph"] = bool(graphed and graphed.captured)
        if "split" in parts and hasattr(agent, "world_model") and hasattr(agent, "actor_critic"):
            result.update(split_update(agent, batch, bench, device))
        if "profile" in parts:
            result["profile"] = profile_update(agent, batch, bench, device)
        if "dream" in parts and hasattr(agent, "world_model") and hasattr(agent, "actor_critic"):
            result.update(dream_rate(agent, batch, bench, device))
    if "collect" in parts:
        # policy and raw rounds alternate so that a shared VM's drift hits both alike
        collect, raw = [], []
        for i in range(bench.collect_rounds):
            warmup = bench.warmup if i == 0 else 0
            collect.append(
                collection_rate(
                    env, agent, bench.collect_steps, num_envs, cfg.seed, policy=True, warmup=warmup
                )
            )
            raw.append(
                collection_rate(
                    env, agent, bench.collect_steps, num_envs, cfg.seed, policy=False, warmup=warmup
                )
            )
        result["collect_steps_per_s"] = statistics.median(collect)
        result["raw_env_steps_per_s"] = statistics.median(raw)
    result["peak_host_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if device.type == "cuda":
        result["peak_device_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    env.close()
    return result


def split_update(agent, batch, bench, device) -> dict[str, float]:
    """World-model step, imagination alone, and the actor-critic step (which includes its own
    imagination: the actor-critic's own cost is ``actor_critic_s - imagination_s``), each as
    ``DreamerAgent.update`` runs it (same inputs, clipping, replay-value loss and autocast)."""
    wm, ac = agent.world_model, agent.actor_critic
    data, replay = agent.model_inputs(batch)

    def model_step():
        with agent._autocast():
            loss, _, post = agent.model_loss(data)
        agent.model_opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(wm.parameters()), agent.model_clip, foreach=True)
        agent.model_opt.step()
        return post

    post = model_step()
    start, _ = ac._starts({k: v.detach() for k, v in post.items()}, data["is_terminal"])
    n = next(iter(start.values())).shape[0]

    def imagine():
        with torch.no_grad(), agent._autocast():
            ac.imagine(wm, start, ac.horizon)

    wm_s = timed(model_step, bench.repeats, bench.warmup, device)
    imag_s = timed(imagine, bench.repeats, bench.warmup, device)
    ac_s = timed(
        lambda: ac.update(
            wm,
            {k: v.detach() for k, v in post.items()},
            data["is_terminal"],
            replay,
            autocast=agent._autocast,
        ),
        bench.repeats,
        bench.warmup,
        device,
    )
    result = {
        "world_model_s": wm_s,
        "imagination_s": imag_s,
        "actor_critic_s": ac_s,
        "imagination_starts": n,
        "imagined_steps_per_s": n * ac.horizon / imag_s,
    }
    if getattr(agent, "graphed", None) is not None:  # agent.cuda_graph: the dream as a graph too

        def dream(state):
            with torch.no_grad(), agent._autocast():
                traj = ac.imagine(wm, state, ac.horizon)
            return {key: traj[key] for key in ("action", "reward", "cont")}

        graphed = GraphedUpdate(dream)
        warmup = max(bench.warmup, graphed.warmup + 1)
        result["imagination_graph_s"] = timed(lambda: graphed(start), bench.repeats, warmup, device)
    return result


def dream_rate(agent, batch, bench, device) -> dict[str, Any]:
    """The actor-critic's dream alone, without gradients: ``bench.dream_starts`` posterior
    states of a replay batch (rows repeated when the batch has fewer) rolled
    ``bench.dream_horizon`` steps with the actor's sampled actions. A token world model
    (``block_len``: IRIS's K frame tokens + 1 action position) also reports generated
    positions per second."""
    if bench.dream_starts < 1 or bench.dream_horizon < 1:
        raise ConfigError(
            f"bench.dream_starts and bench.dream_horizon must be >= 1, got "
            f"{bench.dream_starts} and {bench.dream_horizon}"
        )
    wm, ac = agent.world_model, agent.actor_critic
    data, _ = agent.model_inputs(batch)
    with torch.no_grad(), agent._autocast():
        _, _, post = agent.model_loss(data)
    post = flatten_state({k: v.detach() for k, v in post.items()})  # [B*T, ...]
    rows = next(iter(post.values())).shape[0]
    index = torch.arange(bench.dream_starts, device=device) % rows
    start = {k: v[index] for k, v in post.items()}  # [N, ...]
    n, horizon = bench.dream_starts, bench.dream_horizon

    def dream():
        with torch.no_grad(), agent._autocast():
            ac.imagine(wm, start, horizon)

    seconds = timed(dream, bench.repeats, bench.warmup, device)
    result = {
        "dream": f"{n}x{horizon}",
        "dream_s": seconds,
        "dream_steps_per_s": n * horizon / seconds,
        "kv_cache": getattr(wm, "kv_cache", None),
    }
    positions = getattr(wm, "block_len", None)
    if positions is not None:
        result["dream_tokens_per_s"] = n * horizon * positions / seconds
    return result


def profile_update(agent, batch, bench, device) -> str:
    """torch.profiler over ``bench.repeats`` updates (after warm-up): the operator table sorted
    by self time (``bench.profile_rows`` rows; one row per operator and input shapes with
    ``bench.profile_shapes``); a Chrome trace goes to ``bench.profile_trace``."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(bench.warmup):
        agent.update(batch)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities, record_shapes=bench.profile_shapes) as prof:
        for _ in range(bench.repeats):
            agent.update(batch)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    if bench.profile_trace:
        prof.export_chrome_trace(str(bench.profile_trace))
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    averages = prof.key_averages(group_by_input_shape=bench.profile_shapes)
    return averages.table(sort_by=key, row_limit=bench.profile_rows)


def markdown_row(result: dict[str, Any], command: str) -> str:
    def fmt(key, scale=1.0, digits=3):
        value = result.get(key)
        return "–" if value is None else f"{value * scale:.{digits}g}"

    return (
        f"| {result['agent']}{'+' + result['world_model'] if result['world_model'] else ''} "
        f"| {result['env']} | {result.get('batch', '–')} | {result['hardware']} "
        f"| {fmt('update_s')} | {fmt('world_model_s')} | {fmt('imagination_s')} "
        f"| {fmt('actor_critic_s')} | {fmt('imagined_steps_per_s')} "
        f"| {fmt('collect_steps_per_s')} / {fmt('raw_env_steps_per_s')} "
        f"| {fmt('replay_sample_ms')} | {fmt('peak_host_mb', digits=4)} "
        f"| {fmt('peak_device_mb', digits=4)} | `{command}` |"
    )


def dream_row(result: dict[str, Any], command: str) -> str:
    """The ``dream`` part's markdown row (docs/benchmarks.md and docs/iris.md tables)."""
    tokens = result.get("dream_tokens_per_s")
    cache = {True: "KV cache", False: "recompute", None: "–"}[result["kv_cache"]]
    return (
        f"| {result['agent']}{'+' + result['world_model'] if result['world_model'] else ''} "
        f"| {result['env']} | {result['dream']} | {result['hardware']} | {cache} "
        f"| {result['dream_s']:.3g} | {result['dream_steps_per_s']:.3g} "
        f"| {'–' if tokens is None else f'{tokens:.3g}'} | `{command}` |"
    )


@hydra.main(version_base="1.3", config_path="../configs", config_name="benchmark")
def main(cfg: DictConfig) -> None:
    def body():
        OmegaConf.resolve(cfg)
        result = benchmark(cfg)
        command = "python scripts/benchmark.py " + " ".join(sys.argv[1:])
        table = result.pop("profile", None)
        print(json.dumps(result, indent=2))
        if table:
            print(table)
        rows = [markdown_row(result, command)]
        if "dream" in result:
            rows.append(dream_row(result, command))
        print("\n".join(rows))
        if cfg.bench.append:
            with open(Path(_common.ROOT) / cfg.bench.append, "a") as f:
                f.write("".join(row + "\n" for row in rows))

    _common.run_cli(body)


if __name__ == "__main__":
    main()
