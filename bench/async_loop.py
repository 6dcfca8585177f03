"""Completed samples per second of the three loop modes, real SGLang + Megatron on this machine, on a workload with
a long tail of response lengths (lognormal budgets, median 16 tokens, longest 8x the median, generated to the
budget with ignore_eos), then the discrete-event model (bench/loop_sim.py) fed this machine's measured costs, to
see how well it reproduces the measured ratios, and fed GLM-5-scale inputs.

    python bench/async_loop.py [--steps 20] [--rounds 5] [--modes sync,one_step_off,async] [--prompts 8 --samples 8]

A step's batch is the quickstart's (8 prompts x 8 samples, conf/experiment/task_mix.yaml) unless --prompts and
--samples say otherwise. Each mode runs the real loop (trainer.main.run) in turn, --rounds times interleaved;
samples/s is taken from the run's trace (trace/batches.jsonl: when each step finished training) over every step
after the first, so start-up and the first step's warm-up are left out. A mode's ratio to sync is the median over
rounds of its run's samples/s over the sync run's of the same round: this machine's speed drifts by 10-20% within
minutes, which a round's two runs, a minute apart, mostly share. The best run of each mode is shown too, and is
what the loop model is calibrated from."""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import ray  # noqa: E402

from loop_sim import GLM5_SCALE, SimParams, simulate  # noqa: E402
from rollout.manager import RolloutManager  # noqa: E402

MEDIAN, LONGEST = 16, 128


class LongTailManager(RolloutManager):
    """Each sample gets its own lognormal budget and generates all of it (ignore_eos)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.sampling = dataclasses.replace(self.sampling, ignore_eos=True)
        self._rng = random.Random(0)

    def _new_group(self, row, group_id):
        group = super()._new_group(row, group_id)
        for s in group:
            s.max_new_tokens = budget(self._rng)
        return group


def budget(rng: random.Random) -> int:
    return max(1, min(LONGEST, round(rng.lognormvariate(math.log(MEDIAN), 1.0))))


def compose_cfg(mode: str, steps: int, out: Path, prompts: int = 8, samples: int = 8):
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from trainer.config import parse_config

    overrides = ["+experiment=smoke", f"loop.mode={mode}", f"trainer.num_steps={steps}",
                 f"rollout.max_new_tokens={LONGEST}", "rollout.max_staleness=2",
                 f"rollout.prompts_per_step={prompts}", f"rollout.samples_per_prompt={samples}",
                 "logging.wandb_mode=disabled", f"output_dir={out}", "checkpoint.save_interval=0"]
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        cfg = compose(config_name="config", overrides=overrides)
    return parse_config(OmegaConf.to_container(cfg, resolve=True))


def measure(mode: str, steps: int, root: Path, prompts: int, samples: int) -> dict:
    from trainer.main import run

    out = root / mode
    cfg = compose_cfg(mode, steps, out, prompts, samples)
    t0 = time.time()
    history = run(cfg, manager_actor=ray.remote(max_concurrency=8)(LongTailManager))
    trace = [json.loads(line) for line in (out / "trace" / "batches.jsonl").read_text().splitlines()]
    per_step = cfg.rollout.prompts_per_step * cfg.rollout.samples_per_prompt
    span = trace[-1]["time"] - trace[0]["time"]
    steady = history[1:]  # the first step warms up
    return {"mode": mode, "samples_per_s": (len(trace) - 1) * per_step / span, "span_s": span,
            "wall_s": time.time() - t0,
            **{k: statistics.median(m[k] for m in steady) for k in ("perf/rollout_time", "perf/train_time",
                                                                  "perf/update_weights_time")},
            "train_s_per_token": statistics.median(m["perf/train_time"] / m["train/response_tokens"]
                                                   for m in steady)}


def engine_step_costs(checkpoint: str) -> tuple[float, float]:
    """(fixed, per running request) seconds of one SGLang decode step on this machine: 64 tokens at batch 1 and
    at batch 16, ignore_eos, one in-process engine."""
    from rollout.engine import SGLangEngine
    from rollout.protocol import EngineRequest

    engine = SGLangEngine(checkpoint, max_total_tokens=16384)
    try:
        def per_step(batch: int) -> float:
            reqs = [EngineRequest(f"probe-{batch}-{i}-{time.monotonic_ns()}", [11 + i, 12, 13, 14],
                                  {"max_new_tokens": 64, "ignore_eos": True}) for i in range(batch)]
            engine.generate(reqs[:1])  # warm
            t0 = time.perf_counter()
            engine.generate(reqs)
            return (time.perf_counter() - t0) / 64
        one, sixteen = min(per_step(1) for _ in range(2)), min(per_step(16) for _ in range(2))
    finally:
        engine.shutdown()
    per_request = (sixteen - one) / 15
    return one - per_request, per_request


def calibrated(measured: dict[str, dict], step_costs: tuple[float, float], prompts: int, samples: int
               ) -> SimParams:
    """Loop-model inputs from this machine: the engine's step costs; training per token and push time from the
    sync run (medians over its steps; nothing overlaps there); and the core contention as how much slower a
    training token is in the async run, where generation runs beside training on the same two cores."""
    sync = measured["sync"]
    overlapped = measured.get("async") or measured.get("one_step_off") or sync
    return SimParams(groups_per_batch=prompts, group_size=samples, median_len=MEDIAN, max_len=LONGEST, sigma=1.0,
                     prompt_len=30, engines=1, fixed_s=step_costs[0], per_request_s=step_costs[1],
                     train_fixed_s=0.0, train_per_token_s=sync["train_s_per_token"],
                     sync_s=sync["perf/update_weights_time"], max_staleness=2, batches=200,
                     contention=max(1.0, overlapped["train_s_per_token"] / sync["train_s_per_token"]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=5, help="runs of each mode, interleaved")
    ap.add_argument("--modes", default="sync,one_step_off,async")
    ap.add_argument("--prompts", type=int, default=8, help="prompts per step (the quickstart's 8)")
    ap.add_argument("--samples", type=int, default=8, help="samples per prompt (the quickstart's 8)")
    args = ap.parse_args()
    modes = args.modes.split(",")
    runs: dict[str, list[dict]] = {m: [] for m in modes}
    with tempfile.TemporaryDirectory() as tmp:
        for k in range(args.rounds):
            for m in modes:
                runs[m].append(measure(m, args.steps, Path(tmp) / f"round{k}", args.prompts, args.samples))
    measured = {m: max(rs, key=lambda r: r["samples_per_s"]) for m, rs in runs.items()}
    for m, r in measured.items():
        spread = ", ".join(f"{x['samples_per_s']:.2f}" for x in runs[m])
        print(f"{m:13s} {r['samples_per_s']:7.2f} samples/s (rounds: {spread}); median step: wait "
              f"{r['perf/rollout_time']:.2f}s train {r['perf/train_time']:.2f}s sync {r['perf/update_weights_time']:.2f}s")
    base = measured["sync"]["samples_per_s"]
    for m in modes[1:]:
        paired = [r["samples_per_s"] / s["samples_per_s"] for r, s in zip(runs[m], runs["sync"])]
        print(f"{m}/sync: {statistics.median(paired):.2f}x (median of the rounds' "
              f"{', '.join(f'{x:.3f}' for x in paired)}; best runs: {measured[m]['samples_per_s'] / base:.3f})")
    from glm5_model.hf_checkpoint import ensure_checkpoint
    from trainer.config import resolve_path

    cfg = compose_cfg("sync", 1, Path("/tmp"))
    checkpoint = ensure_checkpoint(cfg.model.preset, resolve_path(cfg.model.checkpoint_dir), cfg.model.init_seed)
    costs = engine_step_costs(str(checkpoint))
    print(f"engine decode step: {costs[0] * 1e3:.2f} ms + {costs[1] * 1e3:.3f} ms per running request")
    p = calibrated(measured, costs, args.prompts, args.samples)
    print(f"core contention (async / sync training time per token): {p.contention:.2f}x")
    sim = {m: simulate(m, p).samples_per_s for m in modes}
    for m in modes[1:]:
        meas, model = measured[m]["samples_per_s"] / base, sim[m] / sim["sync"]
        print(f"model {m}/sync on this machine's costs: {model:.2f}x (best runs {meas:.2f}x, "
              f"off by {abs(model - meas) / meas:.0%})")
    big = {m: simulate(m, GLM5_SCALE) for m in ("sync", "async")}
    print(f"simulated async/sync: {big['async'].samples_per_s / big['sync'].samples_per_s:.2f}x "
          f"(GLM-5 scale: bench/loop_sim.py GLM5_SCALE, max_staleness {GLM5_SCALE.max_staleness})")


if __name__ == "__main__":
    main()
