"""Where each step's wall time goes: generation, scoring, training, weight sync, evaluation and everything else
(Ray calls, serialization, advantages, waits, the previous step's logging and checkpoint).

A step's interval runs from one step's log call to the next (the first from the first next_batch call), so every
second of the run is in exactly one step, and "other" is what the named parts do not explain. The parts are
critical-path times as the loop sees them: in the overlapped modes generation counts only while the loop waits
for it (the batch, or in-flight requests drained before a push), and training is the ranks' own compute (the
slowest rank), not the Ray call around it."""
from __future__ import annotations

import time

PARTS = ("generation", "scoring", "training", "weight_sync", "eval")


class StepClock:
    def __init__(self, now=time.perf_counter):
        self._now = now
        self._mark: float | None = None
        self._parts = dict.fromkeys(PARTS, 0.0)

    def start(self) -> None:
        """Opens the first interval (later ones open when the previous closes)."""
        if self._mark is None:
            self._mark = self._now()

    def add(self, part: str, seconds: float) -> None:
        if part not in self._parts:
            raise KeyError(f"step clock: unknown part {part!r} (known: {', '.join(PARTS)})")
        self._parts[part] += max(0.0, seconds)

    def close(self) -> dict[str, float]:
        """perf/split/<part> seconds, perf/split/other, perf/split/step (the interval) and perf/other_frac for
        the interval that ends now; opens the next."""
        self.start()
        now = self._now()
        total = max(now - self._mark, 1e-9)
        named = sum(self._parts.values())
        out = {f"perf/split/{p}": v for p, v in self._parts.items()}
        # The parts are measured by different clocks (the manager's, the ranks'): they can exceed the interval
        # by a hair, never by much.
        out["perf/split/other"] = max(0.0, total - named)
        out["perf/split/step"] = total
        out["perf/other_frac"] = out["perf/split/other"] / total
        self._mark, self._parts = now, dict.fromkeys(PARTS, 0.0)
        return out


def split_summary(m: dict[str, float]) -> str:
    """The step line's time split, e.g. 'gen 0.52s score 0.01s train 0.21s sync 0.05s other 0.03s (4%)'."""
    if "perf/split/step" not in m:
        return ""
    names = (("generation", "gen"), ("scoring", "score"), ("training", "train"), ("weight_sync", "sync"),
             ("eval", "eval"))
    parts = [f"{short} {m[f'perf/split/{p}']:.2f}s" for p, short in names if p != "eval" or m["perf/split/eval"]]
    return f"{' '.join(parts)} other {m['perf/split/other']:.2f}s ({m['perf/other_frac']:.0%})"


class StartupClock:
    """Start-up to the first step, by phase: the process's own start (interpreter and imports) to
    trainer/launch.py's `launch`, then each phase it times, until the first step begins. Logged once, with the
    first step's metrics."""

    def __init__(self, process_start: float | None = None, now=time.time):
        import psutil

        self._now = now
        self._last = psutil.Process().create_time() if process_start is None else process_start
        self._start = self._last
        self.phases: dict[str, float] = {}
        self.mark("launch")  # interpreter, imports, Hydra and config checks

    def mark(self, phase: str) -> None:
        """The phase that ends now (it began where the previous one ended)."""
        now = self._now()
        self.phases[phase] = self.phases.get(phase, 0.0) + now - self._last
        self._last = now

    def metrics(self) -> dict[str, float]:
        """perf/startup/<phase> seconds and perf/startup_time, their sum: process start to the last mark."""
        out = {f"perf/startup/{p}": v for p, v in self.phases.items()}
        out["perf/startup_time"] = self._last - self._start
        return out
