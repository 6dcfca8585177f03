"""`+experiment=smoke` (the whole stack in a few steps), end to end in a subprocess as the README's quickstart
command runs: real Ray, SGLang, Megatron, W&B offline."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from trainer.config import REPO_ROOT


def _run(args: list[str], timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "trainer.main", *args], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=timeout)


def test_smoke_run_runs_and_logs(tmp_path):
    out = tmp_path / "run"
    # Plus an evaluation after the last step on 3 held-out rows (a quarter of the 12 smoke prompts).
    proc = _run(["+experiment=smoke", "trainer.num_steps=2", f"output_dir={out}",
                 f"model.checkpoint_dir={tmp_path / 'init'}", f"logging.dir={tmp_path / 'wandb'}",
                 f"hydra.run.dir={tmp_path / 'hydra'}", "data.eval_fraction=0.25", "eval.interval=2"], timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    console = proc.stdout + proc.stderr
    # The libraries' CPU notices are filtered in every actor (launch.QUIET_WARNINGS), and the filter parses.
    assert "Warning:" not in console and "Invalid -W option" not in console, console[-5000:]
    steps = [line for line in proc.stdout.splitlines() if line.startswith("step ")]
    assert [s.split()[1] for s in steps] == ["1/2", "2/2"], proc.stdout[-3000:]
    assert "eval reward" not in steps[0] and steps[1].endswith("(3 prompts)"), steps
    assert all(" other " in s and "gen " in s for s in steps), steps  # the step-time split (trainer/step_clock.py)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    for r in records:
        parts = sum(r[f"perf/split/{p}"] for p in ("generation", "scoring", "training", "weight_sync", "eval"))
        assert parts + r["perf/split/other"] == pytest.approx(r["perf/split/step"], rel=1e-6), r
        assert r["perf/split/generation"] > 0 and r["perf/split/training"] > 0 and r["perf/split/weight_sync"] > 0
        # Sync mode: the loop waits for the whole batch, so the wait is all generation and scoring (plus the
        # pause before the push, with nothing in flight to drain: milliseconds).
        waited = r["perf/split/generation"] + r["perf/split/scoring"]
        assert r["rollout/wait_time"] <= waited <= r["rollout/wait_time"] + 0.05, r
        assert r["perf/split/training"] <= r["perf/train_time"]  # the ranks' compute, inside the Ray call
    assert records[1]["perf/split/eval"] > 0 and records[0]["perf/split/eval"] == 0
    # Start-up (bench/startup.py), once, with the first step: its phases tile process start to the first step.
    startup = {k: v for k, v in records[0].items() if k.startswith("perf/startup/")}
    assert {"perf/startup/launch", "perf/startup/ray", "perf/startup/engines"} <= set(startup), records[0]
    assert sum(startup.values()) == pytest.approx(records[0]["perf/startup_time"], rel=1e-6)
    assert "perf/startup_time" not in records[1]
    assert (out / "final" / "model.safetensors").is_file()
    assert (out / "final" / "config.json").is_file()
    runs = list((tmp_path / "wandb").glob("wandb/offline-run-*/run-*.wandb"))
    assert runs, "no offline W&B run"
    assert b"eval/raw_reward" in runs[0].read_bytes(), "eval metrics missing from the W&B run"


def test_eval_without_eval_rows_fails_before_ray_starts(tmp_path):
    proc = _run(["+experiment=smoke", "eval.interval=1", f"output_dir={tmp_path / 'run'}",
                 f"model.checkpoint_dir={tmp_path / 'init'}", f"hydra.run.dir={tmp_path / 'hydra'}"], timeout=300)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "config error: eval.interval: the data has no eval rows" in proc.stderr
    assert "Started a local Ray instance" not in proc.stdout + proc.stderr


def test_bad_config_fails_before_ray_starts(tmp_path):
    proc = _run(["+experiment=smoke", "trainer.lr=-0.1", f"hydra.run.dir={tmp_path / 'hydra'}"], timeout=120)
    assert proc.returncode == 2
    assert "config error: trainer.lr: must be > 0" in proc.stderr
    assert "Started a local Ray instance" not in proc.stdout + proc.stderr
