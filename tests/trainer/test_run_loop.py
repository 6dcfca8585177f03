"""The trainer loop end to end (subprocesses running `python -m trainer.main`, like the README's quickstart) with
partial rollouts (APRIL) on and run checkpoints: a run is stopped after 2 steps and continued, and the continued
run picks up the trainer state, the data cursor and the buffered partial groups."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from trainer.config import REPO_ROOT, ConfigError, parse_config

from .test_config import compose_config


def _run(tmp_path, *overrides: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "trainer.main", "+experiment=quickstart", "rollout.partial_rollout=true",
         "rollout.over_sample_prompts=2", "rollout.max_new_tokens=16", "checkpoint.save_interval=1",
         f"output_dir={tmp_path / 'run'}", f"model.checkpoint_dir={tmp_path / 'init'}",
         f"logging.dir={tmp_path / 'wandb'}", f"hydra.run.dir={tmp_path / 'hydra'}", *overrides],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def _steps(proc) -> list[str]:
    return [line for line in proc.stdout.splitlines() if line.startswith("step ")]


def _served(cursor: dict) -> int:
    """Prompts served so far by the data cursor (the quickstart file has 12 rows, all valid)."""
    rows = sum(1 for line in (REPO_ROOT / "data" / "quickstart_prompts.jsonl").read_text().splitlines() if line)
    return cursor["epoch"] * rows + cursor["position"]


def _resumed_groups(step_line: str) -> int:
    return int(step_line.split("april resumed ")[1].split()[0])


def test_partial_rollout_run_stops_and_resumes(tmp_path):
    ckpts = tmp_path / "run" / "checkpoints"
    first = _run(tmp_path, "trainer.num_steps=2")
    steps = _steps(first)
    assert [s.split()[1] for s in steps] == ["1/2", "2/2"], first.stdout[-3000:]
    # 4 + 2 groups in play per step and 4 returned: 2 groups are buffered after each step, resumed by the next.
    assert [_resumed_groups(s) for s in steps] == [0, 2]
    assert all(s.endswith("buffered 2") for s in steps)
    assert (ckpts / "latest").read_text().strip() == "step_000002"
    saved = json.loads((ckpts / "step_000002" / "run_state.json").read_text())
    assert saved["next_step"] == 2 and saved["weight_version"] == 2 and saved["wandb_run_id"]
    assert len(saved["buffer"]["groups"]) == 2
    assert sorted(p.name for p in (ckpts / "step_000002" / "trainer").iterdir()) == ["rank_000.pt"]
    final = load_file(str(tmp_path / "run" / "final" / "model.safetensors"))

    # Nothing left to do: the trainer state is restored exactly (its HF export equals the first run's).
    again = _run(tmp_path, "trainer.num_steps=2")
    assert "resumed from" in again.stdout and "at step 3" in again.stdout and not _steps(again)
    restored = load_file(str(tmp_path / "run" / "final" / "model.safetensors"))
    assert sorted(restored) == sorted(final)
    assert all(restored[k].equal(final[k]) for k in final)

    # One more step: the 2 buffered groups come back from the checkpoint and are resumed first, and the data
    # cursor continues where it stopped: 6 groups in play, so 4 fresh prompts are served.
    more = _run(tmp_path, "trainer.num_steps=3")
    (step3,) = _steps(more)
    assert step3.split()[1] == "3/3" and _resumed_groups(step3) == 2, more.stdout[-3000:]
    after = json.loads((ckpts / "step_000003" / "run_state.json").read_text())
    assert _served(after["data"]) - _served(saved["data"]) == 4
    assert after["wandb_run_id"] == saved["wandb_run_id"]  # the same W&B run continues
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step_000002", "step_000003"]  # keep_last 2


def test_resume_without_the_buffer_is_refused(tmp_path):
    """A checkpoint with buffered partial groups cannot continue with partial_rollout off: the data cursor
    already counts those prompts as served, so dropping the buffer would lose them. Refused before Ray starts."""
    ckpt = tmp_path / "run" / "checkpoints" / "step_000001"
    ckpt.mkdir(parents=True)
    group = [{"prompt_ids": [11, 12], "group_id": 4, "index_in_group": k} for k in range(4)]
    (ckpt / "run_state.json").write_text(json.dumps({"format": 1, "next_step": 1, "weight_version": 1,
                                                     "data": {}, "buffer": {"groups": [group]}}))
    (ckpt.parent / "latest").write_text("step_000001\n")
    proc = subprocess.run(
        [sys.executable, "-m", "trainer.main", "+experiment=quickstart", f"output_dir={tmp_path / 'run'}",
         f"model.checkpoint_dir={tmp_path / 'init'}", "logging.wandb_mode=disabled",
         f"hydra.run.dir={tmp_path / 'hydra'}"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "config error: rollout.partial_rollout:" in proc.stderr and "1 partial-rollout groups" in proc.stderr
    assert "Started a local Ray instance" not in proc.stdout + proc.stderr


@pytest.mark.parametrize("overrides, field", [
    (["rollout.partial_rollout=true", "rollout.over_sample_prompts=-1"], "rollout.over_sample_prompts"),
    (["rollout.max_staleness=-1"], "rollout.max_staleness"),
    (["rollout.over_sample_prompts=2"], "rollout.over_sample_prompts"),  # does nothing without partial_rollout
    (["rollout.partial_rollout=maybe"], "rollout.partial_rollout"),
    (["checkpoint.save_interval=-1"], "checkpoint.save_interval"),
    (["checkpoint.keep_last=0"], "checkpoint.keep_last"),
])
def test_bad_value_names_the_field(overrides, field):
    with pytest.raises(ConfigError) as info:
        parse_config(compose_config(["+experiment=quickstart", *overrides]))
    assert str(info.value).startswith(field + ":"), str(info.value)


def test_partial_rollout_fields_parse():
    assert parse_config(compose_config(["+experiment=quickstart"])).rollout.partial_rollout is False
    cfg = parse_config(compose_config(["+experiment=quickstart", "rollout.partial_rollout=true",
                                       "rollout.over_sample_prompts=2", "rollout.max_staleness=0"]))
    assert (cfg.rollout.over_sample_prompts, cfg.rollout.max_staleness) == (2, 0)
