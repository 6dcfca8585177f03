"""SGLangEngine.collect() hands out finished requests in bunches (fewer Ray round trips on the cores that generate
and train), but never holds back the last one: with nothing left running it returns at once. The engine's
bookkeeping is driven directly, as its loop thread's completion callback drives it, without starting SGLang."""
from __future__ import annotations

import threading
import time

import pytest

from rollout import engine as engine_mod
from rollout.engine import SGLangEngine
from rollout.protocol import EngineResult


def _bare_engine() -> SGLangEngine:
    eng = SGLangEngine.__new__(SGLangEngine)
    eng._results = threading.Condition()
    eng._done, eng._failures, eng._inflight = [], [], {}
    return eng


def _finish(eng: SGLangEngine, rid: str, after_s: float) -> threading.Thread:
    """What _on_done does for a streamed request: leaves the in-flight set, then joins the results."""
    def run():
        time.sleep(after_s)
        eng._inflight.pop(rid)
        with eng._results:
            eng._done.append(EngineResult(rid, [1], [-0.5], [0], "length", ""))
            eng._results.notify_all()
    t = threading.Thread(target=run)
    t.start()
    return t


@pytest.fixture
def long_linger(monkeypatch):
    # Far longer than any wait below: a collect() that held a result for the whole linger would show plainly.
    monkeypatch.setattr(engine_mod, "RESULT_LINGER_S", 5.0)


def test_results_a_moment_apart_come_out_together(long_linger):
    eng = _bare_engine()
    eng._inflight = {"a": None, "b": None}
    threads = [_finish(eng, "a", 0.0), _finish(eng, "b", 0.2)]
    t0 = time.monotonic()
    out = eng.collect(timeout_s=2.0)
    took = time.monotonic() - t0
    for t in threads:
        t.join()
    assert sorted(r.rid for r in out) == ["a", "b"]
    assert took < 2.0  # returned when "b" finished (nothing ran any more), not at the end of the linger


def test_the_last_running_request_is_not_held_back(long_linger):
    eng = _bare_engine()
    eng._inflight = {"a": None}
    t = _finish(eng, "a", 0.05)
    t0 = time.monotonic()
    out = eng.collect(timeout_s=2.0)
    t.join()
    assert [r.rid for r in out] == ["a"]
    assert time.monotonic() - t0 < 2.0


def test_linger_ends_while_others_still_run(monkeypatch):
    monkeypatch.setattr(engine_mod, "RESULT_LINGER_S", 0.1)
    eng = _bare_engine()
    eng._inflight = {"a": None, "slow": None}
    t = _finish(eng, "a", 0.0)
    out = eng.collect(timeout_s=2.0)
    t.join()
    assert [r.rid for r in out] == ["a"]  # "slow" still runs; "a" was not kept waiting for it
    assert list(eng._inflight) == ["slow"]


def test_a_failure_is_raised_without_lingering(long_linger):
    eng = _bare_engine()
    eng._inflight = {"a": None, "b": None}
    eng._done.append(EngineResult("a", [1], [-0.5], [0], "length", ""))
    eng._inflight.pop("a")
    eng._failures.append(RuntimeError("request b: boom"))
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match="boom"):
        eng.collect(timeout_s=2.0)
    assert time.monotonic() - t0 < 2.0
