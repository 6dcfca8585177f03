"""Run checkpoints: everything a run needs to continue where it stopped.

    <output_dir>/checkpoints/step_000004/
        trainer/rank_NNN.pt   each rank's weights, Adam moments and RNG (TrainRank.save_state)
        run_state.json        next step, weight version, the rollout manager's state (data cursor, every prompt group
                              admitted and not yet trained, partial ones with their tokens), W&B run id
    <output_dir>/checkpoints/latest   the name of the newest complete checkpoint

A checkpoint directory is written under a temporary name and renamed when complete, and `latest` is replaced
atomically after that, so a crash while saving leaves the previous checkpoint as the one a restart resumes from.
"""
from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

STATE_FILE = "run_state.json"
FORMAT = 2  # 2: the rollout manager's state replaced the data cursor + partial-rollout buffer


def checkpoints_dir(output_dir: Path) -> Path:
    return Path(output_dir) / "checkpoints"


def latest_checkpoint(output_dir: Path) -> Path | None:
    """The newest complete checkpoint, or None when the run has none."""
    pointer = checkpoints_dir(output_dir) / "latest"
    if not pointer.is_file():
        return None
    path = checkpoints_dir(output_dir) / pointer.read_text().strip()
    if not (path / STATE_FILE).is_file():
        raise FileNotFoundError(f"{pointer} names {path.name}, which has no {STATE_FILE} (deleted by hand?); "
                                "point it at a complete checkpoint or remove it to start over")
    return path


def read_run_state(path: Path) -> dict[str, Any]:
    state = json.loads((Path(path) / STATE_FILE).read_text())
    if state.get("format") != FORMAT:
        raise ValueError(f"{path / STATE_FILE}: format {state.get('format')!r}, this version reads {FORMAT}")
    return state


def check_resumable(path: Path, state: dict[str, Any], rollout) -> None:
    """What the config must keep to continue this checkpoint, checked before Ray starts (`rollout` is the run's
    RolloutConfig)."""
    from trainer.config import ConfigError

    groups = state["rollout"]["flow"]["groups"]
    sizes = sorted({len(g) for g in groups})
    if sizes and sizes != [rollout.samples_per_prompt]:
        # The saved groups would be trained with a different group size than their advantages assume.
        raise ConfigError(f"rollout.samples_per_prompt: {path} holds {len(groups)} prompt groups of {sizes} samples; "
                          f"resume with rollout.samples_per_prompt={sizes[0]}")


def save_checkpoint(output_dir: Path, next_step: int, run_state: dict[str, Any],
                    save_trainer: Callable[[Path], None], keep_last: int) -> Path:
    """Writes checkpoint `step_{next_step}` (save_trainer(dir) fills dir/trainer), moves `latest` to it and
    deletes all but the newest `keep_last` checkpoints."""
    root = checkpoints_dir(output_dir)
    final = root / f"step_{next_step:06d}"
    tmp = root / f".step_{next_step:06d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_trainer(tmp / "trainer")
    (tmp / STATE_FILE).write_text(json.dumps({"format": FORMAT, "next_step": next_step, **run_state}, indent=1))
    if final.exists():  # the same step saved again (a re-run after a crash between rename and `latest`)
        shutil.rmtree(final)
    os.replace(tmp, final)
    pointer_tmp = root / "latest.tmp"
    pointer_tmp.write_text(final.name + "\n")
    os.replace(pointer_tmp, root / "latest")
    for old in sorted(root.glob("step_*"))[:-keep_last]:
        shutil.rmtree(old)
    return final
