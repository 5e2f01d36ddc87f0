"""The 10-armed testbed of Sutton & Barto (2nd ed., §2.3-2.7, figures 2.2-2.6).

Runs each policy on R independent problems for T steps, all runs in one tensor, and writes
``avg_reward.png``, ``optimal_action.png``, ``regret.png`` (mean cumulative regret with a 95%
confidence band and the 10-90% spread of runs) and ``table.md`` into ``--out``; prints the
steps 951-1000 averages and the time each policy took.

    python scripts/bandit_testbed.py --runs 2000 --steps 1000 --seed 0 --out runs/bandit_testbed
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

from agents import bandits as B  # noqa: E402
from envs.bandits import STREAM_POLICY, BanditTestbed, CounterRNG  # noqa: E402

Factory = Callable[[int, int], B.BanditPolicy]

#: label -> policy for R runs x A arms (S&B's settings)
POLICIES: dict[str, Factory] = {
    "greedy": lambda r, a: B.EpsilonGreedy(r, a, epsilon=0.0),
    "eps=0.01": lambda r, a: B.EpsilonGreedy(r, a, epsilon=0.01),
    "eps=0.1": lambda r, a: B.EpsilonGreedy(r, a, epsilon=0.1),
    "optimistic Q1=5 a=0.1": lambda r, a: B.EpsilonGreedy(r, a, 0.0, initial=5.0, step_size=0.1),
    "UCB c=2": lambda r, a: B.UCB1(r, a, c=2.0),
    "gradient a=0.1 baseline": lambda r, a: B.GradientBandit(r, a, alpha=0.1, baseline=True),
    "Gaussian Thompson": lambda r, a: B.GaussianThompson(r, a, 1.0, 0.0, 1.0),
}
#: extra policies, run with --policies (EXP3 assumes rewards in [-3, 3])
EXTRA: dict[str, Factory] = {
    "discounted UCB g=0.99": lambda r, a: B.DiscountedUCB(r, a, c=2.0, discount=0.99),
    "EXP3 g=0.1": lambda r, a: B.EXP3(r, a, gamma=0.1, low=-3.0, high=3.0),
    "gradient a=0.1 no baseline": lambda r, a: B.GradientBandit(r, a, 0.1, baseline=False),
}
EXPECTED = {  # S&B / REFERENCES.md late-run levels: (average reward, % optimal)
    "greedy": (1.03, 36),
    "eps=0.01": (1.32, 61),
    "eps=0.1": (1.39, 81),
    "UCB c=2": (1.46, 85),
    "Gaussian Thompson": (1.52, 92),
}


def run_policy(
    factory: Factory, runs: int, steps: int, arms: int, seed: int, kind: str = "gaussian"
) -> dict[str, torch.Tensor | float]:
    """One policy on the testbed: per-step rewards, optimal flags and regrets [T, R], seconds."""
    wall, cpu = time.perf_counter(), time.process_time()
    bed = BanditTestbed(runs, arms, kind, seed)
    rng = CounterRNG.seeded(seed, runs, STREAM_POLICY)
    policy = factory(runs, arms)
    best, q_best = bed.optimal_action, bed.q_star.max(-1).values  # fixed unless kind=walk
    rewards, optimal, regret = [], [], []
    for _ in range(steps):
        a = policy.select(rng)  # [R]
        if kind == "walk":
            best, q_best = bed.optimal_action, bed.q_star.max(-1).values
        regret.append(q_best - bed.q_star.gather(-1, a[:, None])[:, 0])
        optimal.append(a == best)
        r = bed.pull(a)
        policy.update(a, r)
        rewards.append(r)
    out: dict[str, torch.Tensor | float] = {
        "reward": torch.stack(rewards),  # [T, R]
        "optimal": torch.stack(optimal).double(),  # [T, R]
        "regret": torch.stack(regret),  # [T, R] expected regret of each pull
    }
    out["seconds"] = time.perf_counter() - wall
    out["cpu_seconds"] = time.process_time() - cpu
    out["best_mean"] = bed.q_star.max(-1).values.mean().item()
    return out


def summarise(res: dict, window: tuple[int, int]) -> dict[str, float]:
    """Averages over steps window[0]..window[1] (1-based, inclusive) and final regret."""
    lo, hi = window[0] - 1, window[1]
    cum = res["regret"].cumsum(0)[-1]  # [R]
    return {
        "reward": res["reward"][lo:hi].mean().item(),
        "optimal": 100 * res["optimal"][lo:hi].mean().item(),
        "regret": cum.mean().item(),
        "regret_ci": 1.96 * cum.std().item() / cum.numel() ** 0.5,
        "seconds": res["seconds"],
        "cpu_seconds": res["cpu_seconds"],
    }


def plot(results: dict[str, dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = next(iter(results.values()))["reward"].shape[0]
    x = torch.arange(1, steps + 1).numpy()
    for key, ylabel, name in [
        ("reward", "average reward", "avg_reward.png"),
        ("optimal", "% optimal action", "optimal_action.png"),
    ]:
        fig, ax = plt.subplots(figsize=(8, 4.5))
        for label, res in results.items():
            y = res[key].mean(1) * (100 if key == "optimal" else 1)
            ax.plot(x, y.numpy(), label=label, lw=1)
        ax.set_xlabel("steps")
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / name, dpi=120)
        plt.close(fig)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for label, res in results.items():
        cum = res["regret"].cumsum(0)  # [T, R]
        mean = cum.mean(1)
        ci = 1.96 * cum.std(1) / cum.shape[1] ** 0.5
        q10, q90 = torch.quantile(cum.float(), torch.tensor([0.1, 0.9]), dim=1)
        (line,) = ax.plot(x, mean.numpy(), label=label, lw=1)
        ax.fill_between(
            x, (mean - ci).numpy(), (mean + ci).numpy(), color=line.get_color(), alpha=0.4
        )
        ax.fill_between(x, q10.numpy(), q90.numpy(), color=line.get_color(), alpha=0.08)
    ax.set_xlabel("steps")
    ax.set_ylabel("cumulative regret (mean, 95% CI; 10-90% of runs)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "regret.png", dpi=120)
    plt.close(fig)


def table(summaries: dict[str, dict], window: tuple[int, int], header: str) -> str:
    lines = [
        header,
        "",
        f"| policy | avg reward {window[0]}-{window[1]} | % optimal {window[0]}-{window[1]} "
        "| expected (S&B) | cumulative regret (95% CI) | wall s | CPU s |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, s in summaries.items():
        exp = EXPECTED.get(label)
        expected = f"{exp[0]:.2f} / {exp[1]}%" if exp else "-"
        lines.append(
            f"| {label} | {s['reward']:.3f} | {s['optimal']:.1f}% | {expected} "
            f"| {s['regret']:.1f} ± {s['regret_ci']:.1f} | {s['seconds']:.2f} "
            f"| {s['cpu_seconds']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", type=int, default=2000)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--arms", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--kind", default="gaussian", choices=["gaussian", "walk"])
    p.add_argument("--out", default="runs/bandit_testbed")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument(
        "--policies",
        nargs="+",
        default=list(POLICIES),
        help=f"labels from {list(POLICIES) + list(EXTRA)}",
    )
    args = p.parse_args(argv)
    known = {**POLICIES, **EXTRA}
    unknown = [name for name in args.policies if name not in known]
    if unknown or args.runs < 1 or args.steps < 1 or args.arms < 1:
        p.error(f"unknown policies {unknown}" if unknown else "runs, steps, arms must be >= 1")
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    window = (max(1, args.steps - 49), args.steps)

    results, summaries = {}, {}
    for label in args.policies:
        res = run_policy(known[label], args.runs, args.steps, args.arms, args.seed, args.kind)
        results[label], summaries[label] = res, summarise(res, window)
        s = summaries[label]
        print(
            f"{label:28s} reward {s['reward']:.3f}  optimal {s['optimal']:5.1f}%  "
            f"regret {s['regret']:7.1f} ± {s['regret_ci']:.1f}  "
            f"{s['seconds']:.2f} s wall, {s['cpu_seconds']:.2f} s CPU",
            flush=True,
        )
    best = next(iter(results.values()))["best_mean"]
    header = (
        f"Testbed: {args.kind}, {args.runs} runs x {args.steps} steps, {args.arms} arms, "
        f"seed {args.seed}; best possible average reward {best:.3f}. "
        f"torch {torch.__version__}, {args.threads} thread(s), {platform.processor() or 'cpu'}.\n"
        f"Command: python scripts/bandit_testbed.py "
        + " ".join(sys.argv[1:] if argv is None else argv)
    )
    (out / "table.md").write_text(table(summaries, window, header))
    print(f"best possible average reward {best:.3f}; wrote {out}/table.md")
    if not args.no_plots:
        plot(results, out)
        print(f"plots: {out}/avg_reward.png, optimal_action.png, regret.png")


if __name__ == "__main__":
    main()
