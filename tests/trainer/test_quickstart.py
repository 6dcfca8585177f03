"""The README's quickstart command, end to end in a subprocess (real Ray, SGLang, Megatron, W&B offline)."""
from __future__ import annotations

import subprocess
import sys

from trainer.config import REPO_ROOT


def _run(args: list[str], timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "trainer.main", *args], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=timeout)


def test_quickstart_runs_and_logs(tmp_path):
    out = tmp_path / "run"
    # Plus an evaluation after the last step on 3 held-out rows (a quarter of the 12 quickstart prompts).
    proc = _run(["+experiment=quickstart", "trainer.num_steps=2", f"output_dir={out}",
                 f"model.checkpoint_dir={tmp_path / 'init'}", f"logging.dir={tmp_path / 'wandb'}",
                 f"hydra.run.dir={tmp_path / 'hydra'}", "data.eval_fraction=0.25", "eval.interval=2"], timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    console = proc.stdout + proc.stderr
    # The libraries' CPU notices are filtered in every actor (runtime.QUIET_WARNINGS), and the filter parses.
    assert "Warning:" not in console and "Invalid -W option" not in console, console[-5000:]
    steps = [line for line in proc.stdout.splitlines() if line.startswith("step ")]
    assert [s.split()[1] for s in steps] == ["1/2", "2/2"], proc.stdout[-3000:]
    assert "eval reward" not in steps[0] and steps[1].endswith("(3 prompts)"), steps
    assert (out / "final" / "model.safetensors").is_file()
    assert (out / "final" / "config.json").is_file()
    runs = list((tmp_path / "wandb").glob("wandb/offline-run-*/run-*.wandb"))
    assert runs, "no offline W&B run"
    assert b"eval/raw_reward" in runs[0].read_bytes(), "eval metrics missing from the W&B run"


def test_eval_without_eval_rows_fails_before_ray_starts(tmp_path):
    proc = _run(["+experiment=quickstart", "eval.interval=1", f"output_dir={tmp_path / 'run'}",
                 f"model.checkpoint_dir={tmp_path / 'init'}", f"hydra.run.dir={tmp_path / 'hydra'}"], timeout=300)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "config error: eval.interval: the data has no eval rows" in proc.stderr
    assert "Started a local Ray instance" not in proc.stdout + proc.stderr


def test_bad_config_fails_before_ray_starts(tmp_path):
    proc = _run(["+experiment=quickstart", "trainer.lr=-0.1", f"hydra.run.dir={tmp_path / 'hydra'}"], timeout=120)
    assert proc.returncode == 2
    assert "config error: trainer.lr: must be > 0" in proc.stderr
    assert "Started a local Ray instance" not in proc.stdout + proc.stderr
