"""Start-up to the first step of `+experiment=smoke` (Ray, the SGLang engine, the Megatron ranks, W&B; no warm-up
and no evaluation before step 1), as a user meets it: a fresh `python -m trainer.main` process each
time (interpreter and imports, config checks, Ray, the trainer ranks, the SGLang engines, W&B), read back from the
run's own perf/startup/* metrics (trainer/step_clock.py:StartupClock, logged with the first step).

    python bench/startup.py [--runs 3] [hydra overrides...]

The first run also builds the initial checkpoint and is left out when --runs > 1 (a user builds it once). Prints
each phase's median, `startup time: N.N s` and `startup/goal: N.NNx` (the median over the issue's 15 s goal)."""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
GOAL_S = 15.0


def one_run(work: Path, i: int, overrides: list[str]) -> dict[str, float]:
    out = work / f"run{i}"
    cmd = [sys.executable, "-m", "trainer.main", "+experiment=smoke", "trainer.num_steps=1",
           f"output_dir={out}", f"model.checkpoint_dir={work / 'init'}", f"hydra.run.dir={work / 'hydra'}",
           "logging.wandb_mode=offline", f"logging.dir={work / 'wandb'}", "checkpoint.save_interval=0", *overrides]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"run {i} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    first = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    return {k.removeprefix("perf/"): v for k, v in first.items() if k.startswith("perf/startup")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="startup_"))
    runs = [one_run(work, i, args.overrides) for i in range(args.runs)]
    for i, r in enumerate(runs):
        print(f"run {i}: {r['startup_time']:.1f}s" + (" (builds the initial checkpoint, left out)"
                                                      if i == 0 and len(runs) > 1 else ""))
    counted = runs[1:] if len(runs) > 1 else runs
    phases = [k for k in counted[0] if k != "startup_time"]
    for k in phases:
        print(f"  {k.removeprefix('startup/')}: {statistics.median(r[k] for r in counted):.2f}s")
    total = statistics.median(r["startup_time"] for r in counted)
    print(f"startup time: {total:.1f} s")
    print(f"startup/goal: {total / GOAL_S:.2f}x")


if __name__ == "__main__":
    main()
