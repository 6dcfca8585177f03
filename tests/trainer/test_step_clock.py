"""The step-time split (trainer/step_clock.py) and the run console (trainer/console.py), without Ray."""
from __future__ import annotations

import io

import pytest
from rich.console import Console

from trainer.console import RunConsole
from trainer.step_clock import PARTS, StartupClock, StepClock, split_summary


class FakeTime:
    def __init__(self):
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_parts_and_other_add_up_to_the_interval_and_intervals_tile_the_run():
    now = FakeTime()
    clock = StepClock(now)
    clock.start()
    now.t += 2.0
    clock.add("generation", 0.9)
    clock.add("training", 0.5)
    clock.add("generation", 0.1)  # a second wait (the drain before a push) adds up
    first = clock.close()
    assert first["perf/split/generation"] == pytest.approx(1.0)
    assert first["perf/split/other"] == pytest.approx(0.5)
    assert first["perf/split/step"] == pytest.approx(2.0)
    assert first["perf/other_frac"] == pytest.approx(0.25)
    assert sum(first[f"perf/split/{p}"] for p in PARTS) + first["perf/split/other"] == pytest.approx(2.0)
    # The next interval opens at the close, not at the next start(): logging and checkpoints land in "other".
    now.t += 1.0
    clock.start()
    now.t += 0.5
    clock.add("weight_sync", 0.5)
    second = clock.close()
    assert second["perf/split/step"] == pytest.approx(1.5)
    assert second["perf/split/generation"] == 0.0  # the parts were reset
    assert second["perf/split/other"] == pytest.approx(1.0)


def test_parts_measured_by_other_clocks_never_make_other_negative():
    now = FakeTime()
    clock = StepClock(now)
    clock.start()
    now.t += 1.0
    clock.add("training", 1.01)
    out = clock.close()
    assert out["perf/split/other"] == 0.0 and out["perf/other_frac"] == 0.0


def test_unknown_part_is_an_error_naming_it():
    with pytest.raises(KeyError, match="'rollout'.*generation"):
        StepClock().add("rollout", 1.0)


def test_split_summary_line():
    now = FakeTime()
    clock = StepClock(now)
    clock.start()
    now.t += 1.0
    clock.add("generation", 0.6)
    line = split_summary(clock.close())
    assert line == "gen 0.60s score 0.00s train 0.00s sync 0.00s other 0.40s (40%)"
    assert split_summary({}) == ""


def test_startup_phases_tile_process_start_to_the_last_mark():
    now = FakeTime()
    clock = StartupClock(process_start=97.0, now=now)  # the process began 3 s before the clock was made
    now.t += 1.5
    clock.mark("ray")
    now.t += 0.5
    clock.mark("engines")
    now.t += 0.25
    clock.mark("ray")  # a phase marked twice adds up
    m = clock.metrics()
    assert m == {"perf/startup/launch": 3.0, "perf/startup/ray": 1.75, "perf/startup/engines": 0.5,
                 "perf/startup_time": 5.25}


def _terminal() -> tuple[Console, io.StringIO]:
    buf = io.StringIO()
    return Console(file=buf, force_terminal=True, width=120), buf


def test_console_on_a_terminal_draws_the_stage_and_keeps_summary_lines():
    console, buf = _terminal()
    with RunConsole(3, console=console) as run:
        assert run.live
        with run.stage("rollout", total=4):
            run.update(2)
            run.progress.refresh()
            drawn = buf.getvalue()
            assert "rollout" in drawn and "2/4" in drawn and "steps" in drawn and "0/3" in drawn
        run.print("step 1/3 reward 0.5000 " + "x" * 200)  # longer than the terminal: not wrapped
        run.step_done()
        run.progress.refresh()
        assert "1/3" in buf.getvalue()
    assert "step 1/3 reward 0.5000 " + "x" * 200 in buf.getvalue()


def test_console_elsewhere_prints_plain_lines_only(capsys):
    buf = io.StringIO()
    with RunConsole(2, console=Console(file=buf, force_terminal=False)) as run:
        assert not run.live
        with run.stage("train"):
            run.print("step 1/2 reward 0.1000")
        run.step_done()
    assert capsys.readouterr().out == "step 1/2 reward 0.1000\n"
    assert buf.getvalue() == ""  # no bars, no escape codes in CI logs
