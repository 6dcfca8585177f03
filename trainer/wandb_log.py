"""What a run writes to W&B (offline by default): every step's metrics on three step axes (train/step for
training, perf and reward components, rollout/step for rollout metrics, eval/step for evaluations), histograms of
the batch's rewards, advantages, response lengths and token staleness, and a table of sample completions (task,
prompt, response, reward) every `logging.samples_interval` steps."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from rollout.manager import RolloutBatch
from trainer.config import RunConfig, resolve_path

_AXES = {"train": "train/step", "perf": "train/step", "reward": "rollout/step", "rollout": "rollout/step",
         "agent": "rollout/step", "eval": "eval/step", "warmup": "warmup/step"}
TABLE_COLUMNS = ["step", "task", "prompt", "response", "reward"]


def init_wandb(cfg: RunConfig, resume_id: str | None = None):
    """The run's W&B run (None when logging.wandb_mode=disabled); a resumed run keeps logging into the same one
    (offline runs sync as one run too)."""
    if cfg.logging.wandb_mode == "disabled":
        return None
    import wandb

    wandb_dir = resolve_path(cfg.logging.dir)
    wandb_dir.mkdir(parents=True, exist_ok=True)
    # quiet: no end-of-run history/summary dump (about 30 console lines); W&B still says where the run is.
    run = wandb.init(project=cfg.logging.project, name=cfg.logging.run_name, mode=cfg.logging.wandb_mode,
                     dir=str(wandb_dir), config=dataclasses.asdict(cfg), id=resume_id,
                     resume="allow" if resume_id else None, settings=wandb.Settings(quiet=True))
    for axis in sorted(set(_AXES.values())):
        run.define_metric(axis)
    for prefix, axis in _AXES.items():
        run.define_metric(f"{prefix}/*", step_metric=axis)
    return run


def log_warmup(run, checkpoint: Path) -> None:
    """The warm-up's loss curve (its record beside the warmed-up checkpoint, trainer/warmup.py) on warmup/step,
    and each task family's (a step trains one family)."""
    record = json.loads((checkpoint / "warmup.json").read_text())
    families = record.get("family") or [None] * len(record["nll"])
    for i, (nll, family) in enumerate(zip(record["nll"], families)):
        run.log({"warmup/step": i + 1, "warmup/nll": nll, **({f"warmup/{family}/nll": nll} if family else {})})
    run.summary["warmup/demonstrations"] = record["demonstrations"]
    run.summary["warmup/seconds"] = record["seconds"]


def log_step(run, cfg: RunConfig, batch: RolloutBatch, metrics: dict[str, float],
             advantages: list[float | list[float]]) -> None:
    """One training step's record. `advantages`: one per sample, or one per token of multi-turn samples."""
    import wandb

    step = batch.step + 1
    samples = batch.samples
    flat = [a for adv in advantages for a in (adv if isinstance(adv, list) else [adv])]
    record: dict[str, Any] = {**metrics, "train/step": step, "rollout/step": step,
                              "rollout/reward_hist": wandb.Histogram([s.reward for s in samples]),
                              "rollout/response_len_hist": wandb.Histogram([s.response_length for s in samples]),
                              "train/advantage_hist": wandb.Histogram(flat)}
    ages = sorted(batch.token_ages.items())
    if ages:
        record["rollout/staleness/hist"] = wandb.Histogram(np_histogram=(
            [n for _, n in ages], [a for a, _ in ages] + [ages[-1][0] + 1]))
    if any(k.startswith("eval/") for k in metrics):
        record["eval/step"] = step
    every = cfg.logging.samples_interval
    if every and (batch.step % every == 0 or step == cfg.trainer.num_steps):
        table = wandb.Table(columns=TABLE_COLUMNS)
        # One sample of each group first, so every task family of the batch shows.
        interleaved = [g[i] for i in range(max(map(len, batch.groups))) for g in batch.groups if i < len(g)]
        for s in interleaved[:cfg.logging.samples_per_table]:
            table.add_data(step, s.metadata.get("task") or "", _prompt_text(s.prompt), s.response_text,
                           float(s.reward))
        record["rollout/samples"] = table
    run.log(record)


def _prompt_text(prompt: Any) -> str:
    """The last user message of a chat prompt (what the sample answers), or the prompt itself."""
    if isinstance(prompt, list):
        users = [m.get("content", "") for m in prompt if isinstance(m, dict) and m.get("role") == "user"]
        return str(users[-1]) if users else ""
    return str(prompt or "")
