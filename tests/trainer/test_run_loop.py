"""The trainer loop end to end (subprocesses running `python -m trainer.main`, like the README's quickstart):
APRIL partial rollouts with run checkpoints, stopped and continued; the one_step_off and async loop modes on real
SGLang (staleness above 0, current-version tokens agreeing with the trainer); kill -9 of an async run's driver and
resume, training the same prompts as an uninterrupted run; bad loop configs stopping before Ray."""
from __future__ import annotations

import collections
import json
import os
import re
import signal
import subprocess
import sys
import time

import psutil
import pytest
from safetensors.torch import load_file

from trainer.config import REPO_ROOT, ConfigError, parse_config

from .test_config import compose_config


def _cmd(tmp_path, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "trainer.main", "+experiment=smoke", "rollout.max_new_tokens=16",
            f"output_dir={tmp_path / 'run'}", f"model.checkpoint_dir={tmp_path / 'init'}",
            f"logging.dir={tmp_path / 'wandb'}", f"hydra.run.dir={tmp_path / 'hydra'}", *overrides]


def _run(tmp_path, *overrides: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(_cmd(tmp_path, *overrides), cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def _steps(proc) -> list[str]:
    return [line for line in proc.stdout.splitlines() if line.startswith("step ")]


def _field(line: str, name: str) -> float:
    return float(re.search(rf"{re.escape(name)} ([-+0-9.e]+)", line).group(1))


def _trained(run_dir) -> list[tuple[int, int]]:
    """(epoch, row) of every group trained, from the run's trace (trace/batches.jsonl)."""
    lines = (run_dir / "trace" / "batches.jsonl").read_text().splitlines()
    steps = [json.loads(ln) for ln in lines]
    assert [s["step"] for s in steps] == list(range(len(steps))), "steps missing or repeated in the trace"
    return [(g["epoch"], g["row"]) for s in steps for g in s["groups"]]


def _served(cursor: dict) -> int:
    """Prompts served so far by the data cursor (the smoke prompt file has 12 rows, all valid)."""
    rows = sum(1 for line in (REPO_ROOT / "data" / "quickstart_prompts.jsonl").read_text().splitlines() if line)
    return cursor["epoch"] * rows + cursor["position"]


APRIL = ("rollout.partial_rollout=true", "rollout.over_sample_prompts=2", "checkpoint.save_interval=1")


def test_partial_rollout_run_stops_and_resumes(tmp_path):
    ckpts = tmp_path / "run" / "checkpoints"
    first = _run(tmp_path, *APRIL, "trainer.num_steps=2")
    assert [s.split()[1] for s in _steps(first)] == ["1/2", "2/2"], first.stdout[-3000:]
    assert (ckpts / "latest").read_text().strip() == "step_000002"
    saved = json.loads((ckpts / "step_000002" / "run_state.json").read_text())
    assert saved["next_step"] == 2 and saved["weight_version"] == 2 and saved["wandb_run_id"]
    flow = saved["rollout"]["flow"]
    # Every prompt served is trained or held in the checkpoint (the over-sampled stragglers at least).
    assert len(flow["groups"]) >= 2 and flow["batches_taken"] == 2
    assert _served(saved["rollout"]["data"]) == 2 * 4 + len(flow["groups"])
    assert sorted(p.name for p in (ckpts / "step_000002" / "trainer").iterdir()) == ["rank_000.pt"]
    final = load_file(str(tmp_path / "run" / "final" / "model.safetensors"))

    # Nothing left to do: the trainer state is restored exactly (its HF export equals the first run's).
    again = _run(tmp_path, *APRIL, "trainer.num_steps=2")
    assert "resumed from" in again.stdout and "at step 3" in again.stdout and not _steps(again)
    restored = load_file(str(tmp_path / "run" / "final" / "model.safetensors"))
    assert sorted(restored) == sorted(final)
    assert all(restored[k].equal(final[k]) for k in final)

    # One more step: the held groups come back first, and no prompt is served twice or skipped.
    more = _run(tmp_path, *APRIL, "trainer.num_steps=3")
    (step3,) = _steps(more)
    assert step3.split()[1] == "3/3", more.stdout[-3000:]
    after = json.loads((ckpts / "step_000003" / "run_state.json").read_text())
    trained = _trained(tmp_path / "run")
    assert len(trained) == 12 and len(set(trained)) == 12  # 3 steps x 4 groups, all distinct prompts
    assert _served(after["rollout"]["data"]) == len(trained) + len(after["rollout"]["flow"]["groups"])
    assert after["wandb_run_id"] == saved["wandb_run_id"]  # the same W&B run continues
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step_000002", "step_000003"]  # keep_last 2


@pytest.mark.parametrize("mode", ["one_step_off", "async"])
def test_overlapping_loop_modes_on_sglang(tmp_path, mode):
    """Generation runs ahead of training (tokens up to max_staleness versions old), and the tokens the current
    policy generated agree with the trainer's recomputation (the pushed weights are the ones served)."""
    proc = _run(tmp_path, f"loop.mode={mode}", "rollout.max_staleness=2", "trainer.num_steps=4",
                "logging.wandb_mode=disabled")
    steps = _steps(proc)
    assert len(steps) == 4, proc.stdout[-3000:]
    stale = [_field(s, "stale") for s in steps]
    assert max(stale) >= 1 and max(stale) <= 2, steps
    assert all(_field(s, "|train-rollout logp|") <= 1e-3 for s in steps), steps
    assert len(set(_trained(tmp_path / "run"))) == 16


def test_kill_dash_nine_mid_async_run_then_resume(tmp_path):
    """kill -9 of the driver (and everything it started) in the middle of an async run, then the same command:
    the prompts trained over the whole run equal an uninterrupted run's (none twice, none skipped)."""
    args = ("loop.mode=async", "rollout.max_staleness=2", "trainer.num_steps=5", "checkpoint.save_interval=1",
            "logging.wandb_mode=disabled")
    reference = _run(tmp_path / "ref", *args)
    assert len(_steps(reference)) == 5
    expected = collections.Counter(_trained(tmp_path / "ref" / "run"))

    run = tmp_path / "killed"
    driver = subprocess.Popen(_cmd(run, *args), cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, start_new_session=True)
    latest = run / "run" / "checkpoints" / "latest"
    deadline = time.monotonic() + 600
    while not (latest.is_file() and latest.read_text().strip() == "step_000002"):
        assert driver.poll() is None and time.monotonic() < deadline, "the run ended before its second checkpoint"
        time.sleep(0.05)
    time.sleep(0.5)  # into step 3: generation of later batches in flight, step 3 possibly trained, not saved
    family = [driver] + psutil.Process(driver.pid).children(recursive=True)
    os.killpg(driver.pid, signal.SIGKILL)
    for p in family:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    driver.wait()
    resumed = _run(run, *args)
    assert "resumed from" in resumed.stdout, resumed.stdout[-3000:]
    assert collections.Counter(_trained(run / "run")) == expected


@pytest.mark.parametrize("overrides, field", [
    (["loop.mode=fast"], "loop.mode"),
    (["loop.mode=async", "rollout.max_staleness=0"], "rollout.max_staleness"),
    (["loop.mode=async", "rollout.partial_rollout=true", "rollout.over_sample_prompts=2"],
     "rollout.over_sample_prompts"),
    (["loop.mode=async", "loop.sync_interval=3", "rollout.max_staleness=2"], "loop.sync_interval"),
    (["loop.sync_interval=2"], "loop.sync_interval"),  # sync mode pushes every step
    (["loop.pause_mode=freeze"], "loop.pause_mode"),
    (["rollout.stale_policy=ignore"], "rollout.stale_policy"),
    (["rollout.partial_rollout=true", "rollout.over_sample_prompts=-1"], "rollout.over_sample_prompts"),
    (["rollout.max_staleness=-1"], "rollout.max_staleness"),
    (["rollout.over_sample_prompts=2"], "rollout.over_sample_prompts"),  # does nothing without partial_rollout
    (["rollout.partial_rollout=maybe"], "rollout.partial_rollout"),
    (["trainer.num_minibatches=0"], "trainer.num_minibatches"),
    (["trainer.max_token_age=-1"], "trainer.max_token_age"),
    (["checkpoint.save_interval=-1"], "checkpoint.save_interval"),
    (["checkpoint.keep_last=0"], "checkpoint.keep_last"),
])
def test_bad_value_names_the_field(overrides, field):
    with pytest.raises(ConfigError) as info:
        parse_config(compose_config(["+experiment=smoke", *overrides]))
    assert str(info.value).startswith(field + ":"), str(info.value)


def test_bad_loop_mode_stops_before_ray(tmp_path):
    proc = subprocess.run(_cmd(tmp_path, "loop.mode=async", "rollout.max_staleness=0"), cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "config error: rollout.max_staleness:" in proc.stderr, proc.stderr[-2000:]
    assert "Started a local Ray instance" not in proc.stdout + proc.stderr


def test_resume_with_another_group_size_is_refused(tmp_path):
    """The checkpoint's groups were generated with 4 samples each; continuing with 2 would train them with the
    wrong group statistics. Refused before Ray starts, naming the field."""
    ckpt = tmp_path / "run" / "checkpoints" / "step_000001"
    ckpt.mkdir(parents=True)
    group = [{"prompt_ids": [11, 12], "group_id": 4, "index_in_group": k} for k in range(4)]
    (ckpt / "run_state.json").write_text(json.dumps({
        "format": 2, "next_step": 1, "weight_version": 1,
        "rollout": {"format": 1, "data": {}, "flow": {"groups": [group]}}}))
    (ckpt.parent / "latest").write_text("step_000001\n")
    proc = subprocess.run(_cmd(tmp_path, "rollout.samples_per_prompt=2", "logging.wandb_mode=disabled"),
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "config error: rollout.samples_per_prompt:" in proc.stderr and "[4] samples" in proc.stderr
    assert "Started a local Ray instance" not in proc.stdout + proc.stderr


def test_loop_fields_parse():
    cfg = parse_config(compose_config(["+experiment=smoke"]))
    assert (cfg.loop.mode, cfg.rollout.partial_rollout) == ("sync", False)
    cfg = parse_config(compose_config(["+experiment=smoke", "loop.mode=async", "rollout.max_staleness=2",
                                       "loop.sync_interval=2", "loop.pause_mode=abort"]))
    assert (cfg.loop.mode, cfg.loop.sync_interval, cfg.loop.pause_mode) == ("async", 2, "abort")
