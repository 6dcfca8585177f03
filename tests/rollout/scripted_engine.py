"""A scripted stand-in for RolloutEngineActor with the same methods: every running request gains one token per
tick under the engine's current weight version (a batching scheduler), and stops at its budget or at a length
drawn per request (a long tail when asked), or emits what `respond(input_ids)` says the model would (a scripted
agent, tests/rollout/scripted_agent.py). Exact, fast timing for the rollout manager's tests."""
from __future__ import annotations

import random
import threading
import time

import ray

from rollout.protocol import EngineHealth, EngineRequest, EngineResult


class ScriptedEngine:
    def __init__(self, tick_s: float = 0.002, seed: int = 0, long_tail: bool = False, fail_on_token: int | None = None,
                 respond=None):
        self.tick_s, self.rng, self.long_tail, self.fail_on_token = tick_s, random.Random(seed), long_tail, fail_on_token
        self.respond = respond
        self.version, self.paused, self.hung = 0, None, False
        self._lock = threading.Condition()
        self._running: dict[str, dict] = {}
        self._done: list[EngineResult] = []
        self._failures: list[BaseException] = []
        self.served: list[str] = []  # rids in submission order
        self._stop = False
        threading.Thread(target=self._tick, daemon=True).start()

    def _length(self, budget: int) -> int:
        if self.long_tail:  # lognormal: most short, a few near the budget
            return max(1, min(budget, int(self.rng.lognormvariate(1.5, 0.8))))
        return self.rng.randint(1, budget)

    def submit(self, requests: list[EngineRequest]) -> None:
        with self._lock:
            for r in requests:
                if self.fail_on_token is not None and self.fail_on_token in r.input_ids:
                    self._failures.append(RuntimeError(f"scripted engine failure on request {r.rid}"))
                    self._lock.notify_all()
                    continue
                budget = int(r.sampling["max_new_tokens"])
                script = None if self.respond is None else list(self.respond(list(r.input_ids)))
                target = self._length(budget) if script is None else min(budget, len(script))
                self._running[r.rid] = {"ids": [], "lps": [], "vers": [], "budget": budget, "target": target,
                                        "script": script}
                self.served.append(r.rid)

    def _tick(self) -> None:
        while not self._stop:
            time.sleep(self.tick_s)
            with self._lock:
                if self.paused or self.hung:
                    continue
                for rid in list(self._running):
                    r = self._running[rid]
                    script = r["script"]
                    r["ids"].append(self.rng.randrange(10, 500) if script is None else script[len(r["ids"])])
                    r["lps"].append(-self.rng.random())
                    r["vers"].append(self.version)
                    if len(r["ids"]) >= r["target"]:
                        scripted_end = r["script"] is not None and len(r["ids"]) == len(r["script"])
                        self._finish(rid, "stop" if scripted_end or len(r["ids"]) < r["budget"] else "length")

    def _finish(self, rid: str, reason: str) -> None:
        r = self._running.pop(rid)
        self._done.append(EngineResult(rid, r["ids"], r["lps"], r["vers"], reason, "x" * len(r["ids"])))
        self._lock.notify_all()

    def collect(self, timeout_s: float = 0.2) -> list[EngineResult]:
        with self._lock:
            if not self._done and not self._failures:
                self._lock.wait(timeout_s)
            if self._failures:
                raise self._failures.pop(0)
            out, self._done = self._done, []
            return out

    def generate(self, requests: list[EngineRequest]) -> list[EngineResult]:
        """Blocking generation (evaluation): two fixed tokens, or the scripted model's turn within the budget."""
        out = []
        for r in requests:
            if self.respond is None:
                out.append(EngineResult(r.rid, [11] * 2, [-0.5] * 2, [self.version] * 2, "stop", "ab"))
                continue
            with self._lock:  # as in submit(): the scripted model's first call imports transformers (not thread-safe)
                ids = list(self.respond(list(r.input_ids)))
            budget = int(r.sampling["max_new_tokens"])
            reason = "stop" if len(ids) <= budget else "length"
            ids = ids[:budget]
            out.append(EngineResult(r.rid, ids, [-0.5] * len(ids), [self.version] * len(ids), reason))
        return out

    def in_flight(self) -> int:
        return len(self._running)

    def abort_all(self, timeout_s: float = 60.0) -> int:
        with self._lock:
            if self.paused:
                raise RuntimeError("abort_all while paused")
            n = len(self._running)
            for rid in list(self._running):
                self._finish(rid, "abort")
            return n

    def pause(self, mode: str) -> None:
        with self._lock:
            self.paused = mode

    def resume(self) -> None:
        with self._lock:
            self.paused = None

    def update_weights_from_tensors(self, named, version: int) -> None:
        if self.hung:  # like a stopped scheduler: the update never comes back
            time.sleep(3600)
        self.version = int(version)

    def weight_version(self) -> int:
        if self.hung:
            time.sleep(3600)
        return self.version

    def health(self, timeout_s: float = 10.0) -> EngineHealth:
        if self.hung:  # like a stopped scheduler: the check never comes back
            time.sleep(3600)
        return EngineHealth(True, "", len(self._running), self.version)

    def hang(self) -> None:
        """Stops generating and answering health checks (what SIGSTOP of a scheduler does)."""
        self.hung = True

    def kill(self) -> None:
        self._stop = True

    def served_rids(self) -> list[str]:
        return list(self.served)

    def shutdown(self) -> None:
        self._stop = True


ScriptedEngineActor = ray.remote(max_concurrency=8)(ScriptedEngine)
