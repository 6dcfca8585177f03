"""Does RL make the model better on held-out tasks? Runs an experiment preset end to end (warm-up, then RL with
evaluation before and during it) and prints, from the run's own logged metrics (<output_dir>/metrics.jsonl), each
task family's held-out eval reward at the end of RL minus at its start, and factuality's hallucination rate after
over before.

    python bench/quickstart_learns.py [--experiment quickstart] [--seed 0] [--plot docs/quickstart_eval.png]
        [hydra overrides...]

Lines printed for docs/benchmarks.md: `eval reward delta <kind>: +N.NN` (coding, factuality, agent) and
`hallucination rate after/before: N.NNx`, plus the wall time, the warm-up's share, the median step split and
`step time other/step: N.NNx` (the share of step time no named part explains; goal < 0.20). A fresh output
directory is used per invocation; the warm-up cache (warmup.cache_dir) is shared, so pass --fresh-warmup to time
a first run."""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--experiment", default="quickstart")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--fresh-warmup", action="store_true", help="warm up again instead of taking the cache")
    ap.add_argument("--plot", type=Path, help="write the held-out eval curves per family here (PNG; needs the "
                                              "`bench` extra's matplotlib)")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="quickstart_learns_"))
    extra = [f"warmup.cache_dir={work / 'warmup'}"] if args.fresh_warmup else []
    cmd = [sys.executable, "-m", "trainer.main", f"+experiment={args.experiment}", f"output_dir={work / 'run'}",
           f"trainer.seed={args.seed}", f"data.shuffle_seed={args.seed}", f"hydra.run.dir={work / 'hydra'}",
           f"logging.dir={work / 'wandb'}", *extra, *args.overrides]
    print("$", " ".join(cmd[1:]), flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"run failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    warmup_s = _warmup_seconds(proc.stdout)
    records = [json.loads(line) for line in (work / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "eval/raw_reward" in r]
    if len(evals) < 2 or evals[0]["step"] != 0:
        sys.exit("need an evaluation before RL (eval.at_start) and at least one after it")
    first, last = evals[0], evals[-1]
    families = sorted(k.split("/")[1] for k in first if k.startswith("eval/") and k.endswith("/raw_reward")
                      and k.count("/") == 2)
    steps = [r for r in records if "perf/step_time" in r]
    print(f"{len(steps)} RL steps, evaluations at steps {[r['step'] for r in evals]}, wall {wall:.0f}s "
          f"(warm-up {warmup_s:.0f}s{' from the cache' if warmup_s == 0 else ''})")
    for part in ("generation", "scoring", "training", "weight_sync", "eval", "other", "step"):
        print(f"  median perf/split/{part}: {statistics.median(r[f'perf/split/{part}'] for r in steps):.2f}s")
    # Each step's interval (trainer/step_clock.py) against the whole run's: unexplained time over all steps.
    other = sum(r["perf/split/other"] for r in steps) / sum(r["perf/split/step"] for r in steps)
    print(f"step time other/step: {other:.2f}x")
    for family in families:
        key = f"eval/{family}/raw_reward"
        print(f"  {family}: eval reward {first[key]:+.3f} -> {last[key]:+.3f}")
    for family in families:
        key = f"eval/{family}/raw_reward"
        print(f"eval reward delta {_kind(family)}: {last[key] - first[key]:+.2f}")
    for family in families:
        key = f"eval/{family}/hallucination_rate"
        if key in first and key in last:
            before, after = first[key], last[key]
            print(f"  {family}: hallucination rate {before:.3f} -> {after:.3f}, accuracy "
                  f"{first[f'eval/{family}/accuracy']:.3f} -> {last[f'eval/{family}/accuracy']:.3f}, abstention "
                  f"{first[f'eval/{family}/abstention_rate']:.3f} -> {last[f'eval/{family}/abstention_rate']:.3f} "
                  "(a policy that abstains on everything has no hallucinations and no accuracy)")
            print(f"hallucination rate after/before: {after / before:.2f}x" if before else
                  "hallucination rate after/before: n/a (none before)")
    if args.plot:
        plot_eval_curves(evals, families, args.plot, f"+experiment={args.experiment}, seed {args.seed}, "
                                                      f"{len(steps)} RL steps, 2-core CPU")
        print(f"eval curves written to {args.plot}")


def plot_eval_curves(evals: list[dict], families: list[str], path: Path, title: str) -> None:
    """Each family's held-out eval reward over RL steps, and factuality's hallucination rate where logged."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    steps = [r["step"] for r in evals]
    for family in families:
        ax.plot(steps, [r[f"eval/{family}/raw_reward"] for r in evals], marker="o", label=f"{family} reward")
        rate = f"eval/{family}/hallucination_rate"
        if all(rate in r for r in evals):
            ax.plot(steps, [r[rate] for r in evals], marker="x", linestyle="--", label=f"{family} hallucination rate")
    ax.set_xlabel("RL step (0 = after the warm-up, before RL)")
    ax.set_ylabel("held-out eval (greedy)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _kind(family: str) -> str:
    """The issue's name for a task family's kind: an environment's rows are the agent family, a task family is
    named by its reward (coding_fn -> coding, factuality_qa -> factuality); an unknown name stays as it is."""
    from rewards.envs.registry import registered_envs
    from rewards.tasks.registry import load_task_family, registered_task_families

    if family in registered_task_families():
        return load_task_family(family).reward
    return "agent" if family in registered_envs() else family


def _warmup_seconds(stdout: str) -> float:
    """The warm-up's training time from its last progress line ("warm-up step N/N ... (123s)"); 0 when cached."""
    lines = [ln for ln in stdout.splitlines() if ln.startswith("warm-up step")]
    return float(lines[-1].rsplit("(", 1)[1].rstrip("s)")) if lines else 0.0


if __name__ == "__main__":
    main()
