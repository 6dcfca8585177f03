"""Engine kills during a training run: `+experiment=smoke` in async mode with two SGLang engines, and a thread that
kill -9s one engine's scheduler every --every steps (once both engines serve again), --kills times.

    python bench/engine_faults.py --kills 10 --every 15 --steps 1800    # the figure in docs/benchmarks.md

A kill is survived when the run goes on to finish every step, with no prompt group trained twice or skipped
(read from the run's trace/batches.jsonl), and the pool is back to two engines at the end."""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import psutil  # noqa: E402


def schedulers(min_age_s: float = 0.0) -> list[psutil.Process]:
    """This run's SGLang schedulers up for at least `min_age_s`: descendants of this process (its local Ray
    starts the engines), never an engine some other program on the machine runs."""
    out, now = [], time.time()
    for p in psutil.Process().children(recursive=True):
        try:
            # a killed scheduler stays a zombie until its parent reaps it: it is no engine
            if (p.status() != psutil.STATUS_ZOMBIE and "sglang::scheduler" in " ".join(p.cmdline())
                    and now - p.create_time() >= min_age_s):
                out.append(p)
        except psutil.Error:
            continue
    return out


def steps_done(trace: Path) -> int:
    return len(trace.read_text().splitlines()) if trace.is_file() else 0


def serving(settle_s: float = 60.0) -> list[psutil.Process]:
    """Schedulers up for a while (a replacement still starting is not a serving engine)."""
    return schedulers(min_age_s=settle_s)


def killer(trace: Path, kills: int, every: int, log: list, stop: threading.Event) -> None:
    rng = random.Random(0)
    while len(log) < kills and not stop.is_set():
        target = (log[-1]["step"] if log else 0) + every
        while not stop.is_set() and (steps_done(trace) < target or len(serving()) < 2):
            time.sleep(0.2)
        if stop.is_set():
            return
        victim = rng.choice(serving())
        try:
            os.kill(victim.pid, signal.SIGKILL)
        except ProcessLookupError:
            continue
        log.append({"step": steps_done(trace), "pid": victim.pid, "time": time.time()})
        print(f"killed scheduler {victim.pid} after step {log[-1]['step']}", flush=True)
        with contextlib.suppress(psutil.Error):  # one kill at a time: it counts as serving until it is gone
            psutil.wait_procs([victim], timeout=30)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kills", type=int, default=10)
    ap.add_argument("--every", type=int, default=30, help="steps between kills (at least)")
    ap.add_argument("--steps", type=int, default=None,
                    help="training steps (default every x (kills + 1)); a replacement takes ~100 steps to start and "
                         "settle on 2 cores, so 10 kills need ~2000")
    args = ap.parse_args()
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from trainer.config import parse_config
    from trainer.main import run

    steps = args.steps or args.every * (args.kills + 1)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        overrides = ["+experiment=smoke", "loop.mode=async", "rollout.max_staleness=2", "rollout.num_engines=2",
                     "rollout.engine_cpus=0.5", f"trainer.num_steps={steps}", "logging.wandb_mode=disabled",
                     f"output_dir={out}", "rollout.health_interval_s=2", "rollout.health_timeout_s=60"]
        with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
            cfg = parse_config(OmegaConf.to_container(compose(config_name="config", overrides=overrides),
                                                      resolve=True))
        log: list = []
        stop = threading.Event()
        trace = out / "trace" / "batches.jsonl"
        thread = threading.Thread(target=killer, args=(trace, args.kills, args.every, log, stop), daemon=True)
        thread.start()
        t0 = time.time()
        error = None
        try:
            history = run(cfg)
        except Exception as exc:  # noqa: BLE001 - what the bench reports
            history, error = [], exc
        stop.set()
        lines = [json.loads(x) for x in trace.read_text().splitlines()] if trace.is_file() else []
        groups = [g["group"] for x in lines for g in x["groups"]]
        whole = error is None and [x["step"] for x in lines] == list(range(steps))
        unique = len(groups) == len(set(groups)) and sorted(groups) == list(range(len(groups)))
        survived = len(log) if whole and unique else sum(k["step"] < len(lines) - 1 for k in log) - 1
        last = history[-1] if history else {}
        print(f"{len(lines)}/{steps} steps in {time.time() - t0:.0f}s; groups trained {len(groups)} "
              f"(unique: {unique}); error: {error!r}")
        print(f"pool: restarts {last.get('rollout/pool/engine_restarts')}, requeued "
              f"{last.get('rollout/pool/requeued_requests')}, time without a full pool "
              f"{last.get('rollout/pool/time_without_full_pool_s', 0):.0f}s, active at the end "
              f"{last.get('rollout/pool/active_engines')}")
        print(f"engine kills survived: {max(survived, 0)}/{args.kills}")


if __name__ == "__main__":
    main()
