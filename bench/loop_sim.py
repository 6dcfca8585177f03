"""A discrete-event model of slipstream's three loop modes (sync, one_step_off, async), for planning and for
checking what bench/async_loop.py measures.

It models the same rule the rollout manager runs (rollout/flow.py): groups are admitted while
admitted < (admission_staleness + version + 1) * B, batches are taken in admission order, and a weight push either
drains in-flight requests first (sync, one_step_off) or pauses them in place (async). Engines batch continuously:
one decode step costs fixed_s + per_request_s * (requests running) and gives every running request one token; a
new request first pays prefill_per_token_s per prompt token. The trainer is a separate resource: a batch costs
train_fixed_s + train_per_token_s * (its tokens), a push costs sync_s with every engine stalled. Where engines and
trainer share a few cores, `contention` slows whichever starts while the other runs.

    python bench/loop_sim.py                  # the documented GLM-5-scale inputs (docs/benchmarks.md)
"""
from __future__ import annotations

import argparse
import heapq
import math
import random
from dataclasses import dataclass, field, replace


@dataclass(frozen=True)
class SimParams:
    groups_per_batch: int = 4          # B
    group_size: int = 4                # G
    median_len: float = 16.0           # response tokens: lognormal with this median ...
    max_len: int = 128                 # ... capped here (the "longest 8x the median" workload)
    sigma: float = 1.0                 # lognormal shape
    prompt_len: int = 32
    engines: int = 1
    fixed_s: float = 6e-3              # decode step cost per engine: fixed ...
    per_request_s: float = 0.36e-3     # ... plus this per running request
    prefill_per_token_s: float = 0.0
    max_running: int = 10**9           # per engine (KV capacity)
    train_fixed_s: float = 0.05
    train_per_token_s: float = 1e-4
    sync_s: float = 0.1
    max_staleness: int = 2             # async admission bound (one_step_off uses 1, sync 0)
    sync_interval: int = 1
    # >1 where engines and trainer share cores (a small CPU box): a decode step that starts while the trainer
    # trains, and a training step that starts while an engine decodes, cost this much more.
    contention: float = 1.0
    batches: int = 30
    seed: int = 0


@dataclass
class SimResult:
    samples_per_s: float
    time_s: float
    trainer_busy_frac: float
    engine_busy_frac: float
    max_staleness: int
    lengths: list[int] = field(default_factory=list)


def response_lengths(p: SimParams, n: int, rng: random.Random) -> list[int]:
    mu = math.log(p.median_len)
    return [max(1, min(p.max_len, int(round(rng.lognormvariate(mu, p.sigma))))) for _ in range(n)]


def simulate(mode: str, p: SimParams) -> SimResult:
    """Completed (trained) samples per second over p.batches training steps."""
    if mode not in ("sync", "one_step_off", "async"):
        raise ValueError(f"mode {mode!r}")
    eta = {"sync": 0, "one_step_off": 1, "async": p.max_staleness}[mode]
    drain = mode != "async"
    interval = p.sync_interval if mode == "async" else 1
    rng = random.Random(p.seed)
    B, G = p.groups_per_batch, p.group_size
    lengths = response_lengths(p, (p.batches + eta + 2) * B * G, rng)

    t = 0.0
    version = 0
    admitted = 0
    group_left: dict[int, int] = {}          # group id -> samples still generating
    group_done_at: dict[int, float] = {}
    group_oldest: dict[int, int] = {}        # group id -> version of its oldest token
    running: list[list[list]] = [[] for _ in range(p.engines)]  # per engine: [gid, tokens_left, prefill_left]
    load = [0] * p.engines
    engine_busy = [0.0] * p.engines
    next_step: list[tuple[float, int]] = []  # (time, engine) when an engine finishes its current decode step
    stepping: list[list | None] = [None] * p.engines  # the requests in each engine's current decode step
    trained = 0
    trainer_free_at = 0.0
    trainer_busy = 0.0
    training_until = -1.0
    paused_until = 0.0
    pushing = False
    max_stale = 0
    events = 0

    def admit() -> None:
        nonlocal admitted
        while not pushing and admitted < (eta + version + 1) * B:
            gid = admitted
            admitted += 1
            k = min(range(p.engines), key=lambda e: load[e])
            group_left[gid] = G
            for i in range(G):
                running[k].append([gid, lengths[gid * G + i], p.prompt_len])
            load[k] += G
        for k in range(p.engines):
            start(k)

    def start(k: int) -> None:
        if stepping[k] is None and running[k]:
            active = stepping[k] = running[k][:p.max_running]
            cost = p.fixed_s + p.per_request_s * len(active)
            cost += p.prefill_per_token_s * sum(r[2] for r in active)
            if t < training_until:
                cost *= p.contention
            begin = max(t, paused_until)
            engine_busy[k] += cost
            heapq.heappush(next_step, (begin + cost, k))

    admit()
    while trained < p.batches:
        events += 1
        if events > 10**8:
            raise RuntimeError("simulation did not converge")
        # The trainer takes batch `trained` once its groups (admission order) are all done.
        batch = range(trained * B, (trained + 1) * B)
        ready = all(g in group_done_at for g in batch)
        if ready and trainer_free_at <= t and not pushing:
            tokens = sum(lengths[g * G + i] for g in batch for i in range(G))
            max_stale = max(max_stale, max(trained - group_oldest[g] for g in batch))
            cost = p.train_fixed_s + p.train_per_token_s * tokens
            if any(s is not None for s in stepping):
                cost *= p.contention
            trainer_busy += cost
            training_until = trainer_free_at = t + cost
            heapq.heappush(next_step, (trainer_free_at, -1))  # the trainer's event
        if not next_step:
            raise RuntimeError(f"{mode}: stalled at t={t:.3f} with {trained} batches trained")
        t, k = heapq.heappop(next_step)
        if k == -1:  # a training step ended
            trained += 1
            if trained % interval == 0:
                pushing = True
                if drain:
                    while any(running):  # in-flight generation finishes first
                        t2, e = heapq.heappop(next_step)
                        t = t2
                        _decode(e, running, load, stepping, group_left, group_done_at, group_oldest, t, version)
                        start(e)
                t += p.sync_s
                paused_until = t
                version = trained
                pushing = False
                for e in range(p.engines):
                    start(e)
            admit()
            continue
        _decode(k, running, load, stepping, group_left, group_done_at, group_oldest, t, version)
        start(k)
        admit()
    span = t
    return SimResult(p.batches * B * G / span, span, trainer_busy / span, sum(engine_busy) / (span * p.engines),
                     max_stale, lengths)


def _decode(k, running, load, stepping, group_left, group_done_at, group_oldest, t, version) -> None:
    """One decode step of engine k ends at t: each request in it gains a token; finished ones leave. (Requests
    admitted during the step wait for the next one.)"""
    stepped, stepping[k] = stepping[k], None
    done = set()
    for r in stepped:
        gid = r[0]
        group_oldest.setdefault(gid, version)
        r[2] = 0
        r[1] -= 1
        if r[1] <= 0:
            done.add(id(r))
            load[k] -= 1
            group_left[gid] -= 1
            if group_left[gid] == 0:
                group_done_at[gid] = t
    running[k][:] = [r for r in running[k] if id(r) not in done]


# GLM-5 (744B, ~40B active) on 64 H100 nodes: documented planning inputs, each a stated assumption.
GLM5_SCALE = SimParams(
    groups_per_batch=64, group_size=16,            # 1,024 samples per step
    median_len=4096, max_len=32768, sigma=1.0,     # reasoning-length responses, longest 8x the median
    prompt_len=1024,
    engines=16,                                    # 16 SGLang engines (one per 4 nodes, TP8 x EP4 / DP-attention)
    fixed_s=0.030, per_request_s=0.05e-3,          # a decode step: ~30 ms + 0.05 ms per running request
    prefill_per_token_s=2e-7, max_running=256,
    train_fixed_s=5.0, train_per_token_s=2.0e-5,   # ~1,024 x 6k tokens in ~130 s on 256 H100s (~40% MFU)
    sync_s=2.5,                                    # the weight-sync goal (docs/weight-sync.md)
    max_staleness=4, batches=12)                 # AReaL's typical eta is 2-8


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, default=None)
    args = ap.parse_args()
    p = GLM5_SCALE if args.batches is None else replace(GLM5_SCALE, batches=args.batches)
    results = {m: simulate(m, p) for m in ("sync", "one_step_off", "async")}
    for mode, r in results.items():
        print(f"{mode:13s} {r.samples_per_s:8.3f} samples/s  trainer busy {r.trainer_busy_frac:.2f}  "
              f"engines busy {r.engine_busy_frac:.2f}  max staleness {r.max_staleness}")
    print(f"simulated one_step_off/sync: {results['one_step_off'].samples_per_s / results['sync'].samples_per_s:.2f}x")
    print(f"simulated async/sync: {results['async'].samples_per_s / results['sync'].samples_per_s:.2f}x")


if __name__ == "__main__":
    main()
