"""Supervised warm-up before RL: the trainer itself (Megatron ranks, the run's layout) trains on demonstrations of
the run's training rows, and RL starts from the result.

Demonstrations come from the rows' generators (rewards/tasks, rewards/envs): a task family's `demonstrate(task)`
(a response, or None for rows it should not teach) and an environment's `expert`, run as a real episode with the
environment answering each turn (rollout.agent.demonstrate_episode; only episodes the environment scores above 0
are kept). Rows of other sources have no demonstrations. Only training rows are used, never eval rows.

The result is an HF checkpoint directory under `warmup.cache_dir`, named by a hash of everything it depends on:
the initial weights, the demonstration tokens, the warm-up settings and the trainer's optimizer and layout. A
second run with the same inputs takes it from there without training (`warmup.json` records the key and the loss
curve); a half-written directory is never taken, since the checkpoint is written atomically and the record last.
"""
from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import logging
import random
import time
from pathlib import Path

from rewards.envs import EnvRunner, EnvSettings, Task, load_env
from rewards.tasks import load_task_family, registered_task_families
from rollout.agent import demonstrate_episode
from rollout.agent.driver import label_task
from rollout.config import AgentConfig
from rollout.data import PromptRow, render_prompt
from rollout.generation import is_agent_row
from trainer.batching import TrainItem
from trainer.config import RunConfig, resolve_path

log = logging.getLogger("slipstream")
RECORD = "warmup.json"
DONE_WEIGHT = 0.25  # how often a family at warmup.target_nll is still drawn, relative to one still learning
_KEY_VERSION = 2  # 2: families drawn by FamilySchedule (target loss, rehearsal)


@dataclasses.dataclass(frozen=True)
class Demonstration:
    """One demonstrated training row: its task family and what the trainer learns from it (prompt tokens, then
    the demonstration's tokens with the loss on what the model generates; for episodes its turns only)."""

    task: str
    row: int
    item: TrainItem


def demonstrations(rows: list[PromptRow], tokenizer, agent: AgentConfig) -> list[Demonstration]:
    """The demonstrations of `rows` that have one, in row order."""
    stop = tokenizer.convert_tokens_to_ids("<|user|>")
    families = set(registered_task_families())
    settings = EnvSettings(agent.step_timeout_s, agent.episode_timeout_s, agent.max_turns, agent.max_tokens,
                           agent.on_env_error)
    runners: dict[str, EnvRunner] = {}
    out: list[Demonstration] = []
    for row in rows:
        if is_agent_row(row):
            name, task = label_task(row.label, row.messages, f"row {row.index}")
            expert = load_env(name).expert
            if expert is None:
                continue
            runner = runners.setdefault(name, EnvRunner(name, agent.env_kwargs, settings))
            result = asyncio.run(demonstrate_episode(runner, task, tokenizer, expert))
            if result is None:
                continue
            seq = result.sequence
            if result.reward <= 0 or not seq.response_ids:
                log.warning("warm-up: the %s expert failed task %s (reward %s); not used", name, task.id,
                            result.reward)
                continue
            out.append(Demonstration(name, row.index, TrainItem(
                seq.tokens, len(seq.prompt_ids), 0.0, [0.0] * len(seq.response_ids), model_mask=list(seq.loss_mask))))
        elif row.task in families:
            text = load_task_family(row.task).demonstrate(Task(str(row.index), row.messages, [], row.label))
            if text is None:
                continue
            prompt = render_prompt(tokenizer, row)
            response = tokenizer.encode(text, add_special_tokens=False) + [stop]
            out.append(Demonstration(row.task, row.index,
                                     TrainItem(prompt + response, len(prompt), 0.0, [0.0] * len(response))))
    return out


def warm_up(cfg: RunConfig, init_checkpoint: Path, rows: list[PromptRow], tokenizer) -> Path:
    """The checkpoint RL starts from: `init_checkpoint` after warmup.steps supervised steps on demonstrations of
    `rows` (the run's training rows), from the cache when it holds this warm-up. Needs Ray (the trainer's ranks)."""
    from trainer.group import TrainerGroup

    w = cfg.warmup
    demos = demonstrations(rows, tokenizer, cfg.rollout.agent)
    items = [d.item for d in demos]
    if not items:
        raise ValueError("warmup.steps > 0 but no training row has a demonstration (rows of task families and of "
                         "environments with an expert have them; data.format=tasks makes such rows)")
    out = resolve_path(w.cache_dir) / cache_key(cfg, init_checkpoint, items)
    record = out / RECORD
    if record.is_file():
        print(f"warm-up: taken from the cache {out}", flush=True)
        return out
    print(f"warm-up: {w.steps} steps on {len(items)} demonstrations ({_count_by_task(demos)})", flush=True)
    trainer_cfg = dataclasses.replace(cfg.trainer, lr=w.lr, num_minibatches=1)
    trainer = TrainerGroup(trainer_cfg, str(init_checkpoint), layer_spec=cfg.model.layer_spec)
    # Each step's batch is drawn from one task family (weighted by its demonstrations): rows of a family have
    # similar lengths, and a batch is padded to its longest row. A family of long rows (agent episodes with their
    # tool schemas) gets fewer rows per batch: at most warmup.batch_tokens tokens.
    by_task: dict[str, list[TrainItem]] = {}
    for d in demos:
        by_task.setdefault(d.task, []).append(d.item)
    tasks = sorted(by_task)
    rows = {t: max(1, min(w.batch_size, len(by_task[t]), w.batch_tokens // max(len(it.tokens) for it in by_task[t])))
            for t in tasks}
    rng, curve, families, t0 = random.Random(w.seed), [], [], time.perf_counter()
    schedule = FamilySchedule({t: len(by_task[t]) for t in tasks}, w.target_nll, w.target_window, rng)
    try:
        for step in range(w.steps):
            task = schedule.next()
            if task is None:
                print(f"warm-up: every family's loss is below warmup.target_nll {w.target_nll} after {step} steps",
                      flush=True)
                break
            m = trainer.sft_step(rng.sample(by_task[task], rows[task]))
            curve.append(round(m["nll"], 5))
            families.append(task)
            schedule.record(task, m["nll"])
            if step == 0 or (step + 1) % max(1, w.steps // 10) == 0 or step + 1 == w.steps:
                recent = ", ".join(f"{t} {nll:.3f}" for t, nll in schedule.recent_nll().items())
                print(f"warm-up step {step + 1}/{w.steps} nll {m['nll']:.4f} grad_norm {m['grad_norm']:.3f} "
                      f"(recent by family: {recent}) ({time.perf_counter() - t0:.0f}s)", flush=True)
        trainer.save_hf_checkpoint(str(out))
    finally:
        trainer.shutdown()
    record.write_text(json.dumps({"key": out.name, "steps": len(curve), "demonstrations": len(items),
                                  "seconds": round(time.perf_counter() - t0, 1), "nll": curve,
                                  "family": families}) + "\n")
    return out


def cache_key(cfg: RunConfig, init_checkpoint: Path, items: list[TrainItem]) -> str:
    """A hash of what the warmed-up weights depend on. RL settings are left out on purpose: changing them must not
    redo the warm-up."""
    t = cfg.trainer
    h = hashlib.sha256(json.dumps({
        "version": _KEY_VERSION, "warmup": dataclasses.asdict(cfg.warmup) | {"cache_dir": None},
        "trainer": {k: getattr(t, k) for k in ("world_size", "tensor_parallel", "pipeline_parallel",
                                               "pipeline_first_stage_layers", "pipeline_last_stage_layers",
                                               "sequence_parallel", "expert_parallel", "weight_decay", "adam_beta1",
                                               "adam_beta2", "grad_clip", "micro_batch_size", "seed")},
        "layer_spec": cfg.model.layer_spec}, sort_keys=True).encode())
    for name in sorted(p.name for p in Path(init_checkpoint).iterdir() if p.suffix in (".json", ".safetensors")):
        h.update(name.encode())
        with open(Path(init_checkpoint) / name, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 24), b""):
                h.update(chunk)
    for it in items:
        h.update(json.dumps([it.tokens, it.prompt_len, it.model_mask]).encode())
    return h.hexdigest()[:20]


@dataclasses.dataclass
class FamilySchedule:
    """Which task family each warm-up step trains: drawn in proportion to its demonstrations. With a target loss,
    a family whose last `window` steps average at most `target_nll` is done and drawn DONE_WEIGHT times as often,
    so most steps go to the families still learning (how many a family needs varies with the seed and the data),
    while a done family is still rehearsed: left alone, the quickstart's facts were half forgotten 155 steps
    later, and a family whose loss climbs back over the target is no longer done. next() is None once every
    family is done at the same time."""

    sizes: dict[str, int]
    target_nll: float | None
    window: int
    rng: random.Random
    losses: dict[str, list[float]] = dataclasses.field(default_factory=dict)

    def done(self, family: str) -> bool:
        recent = self.losses.get(family, [])[-self.window:]
        return self.target_nll is not None and len(recent) == self.window and \
            sum(recent) / self.window <= self.target_nll

    def recent_nll(self) -> dict[str, float]:
        """Each family's mean loss over its last `window` steps (fewer where it has had fewer)."""
        return {t: sum(v[-self.window:]) / len(v[-self.window:]) for t, v in sorted(self.losses.items())}

    def next(self) -> str | None:
        families = sorted(self.sizes)
        done = [self.done(t) for t in families]
        if all(done):
            return None
        weights = [self.sizes[t] * (DONE_WEIGHT if d else 1.0) for t, d in zip(families, done)]
        return self.rng.choices(families, weights=weights)[0]

    def record(self, family: str, nll: float) -> None:
        self.losses.setdefault(family, []).append(nll)


def _count_by_task(demos: list[Demonstration]) -> str:
    counts: dict[str, int] = {}
    for d in demos:
        counts[d.task] = counts.get(d.task, 0) + 1
    return ", ".join(f"{task} {n}" for task, n in sorted(counts.items()))
