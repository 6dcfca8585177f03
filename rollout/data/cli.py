"""`python -m rollout.data inspect [--tokenizer DIR] OVERRIDES...`: what a run would train on, without starting
Ray -- counts, prompt lengths in tokens, the first prompt exactly as the engine receives it, and the validation
report. OVERRIDES are the same Hydra overrides as for `python -m trainer.main` (e.g. `data.path=x.parquet`).

Exit status: 0 when the data would be accepted, 1 when strict mode would stop the run, 2 on a config/data error
that prevents reading at all."""
from __future__ import annotations

import argparse
import collections
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

from rollout.config_schema import REPO_ROOT, ConfigError, build_dataclass, resolve_path
from rollout.data.config import DataConfig, validate_data_config
from rollout.data.loader import LoadedData, load_data, make_source
from rollout.data.render import render_prompt
from rollout.data.rows import DataError


@dataclass
class _InspectConfig:
    """The parts of the composed run config that inspecting data needs (the trainer validates the rest)."""

    data: DataConfig
    checkpoint_dir: str


def _compose(overrides: list[str]) -> _InspectConfig:
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=str(REPO_ROOT / "conf"), version_base=None):
        cfg = OmegaConf.to_container(compose(config_name="config", overrides=overrides), resolve=True)
    data = validate_data_config(build_dataclass(DataConfig, cfg.get("data", {}), "data"))
    return _InspectConfig(data, str(cfg.get("model", {}).get("checkpoint_dir", "")))


def _tokenizer(cfg, explicit: str | None):
    """The tokenizer the run would use: the checkpoint's (what the engines load), else the preset's tiny one.
    A checkpoint is not created here; inspecting data should not write model weights."""
    from glm5_model.tokenizer import load_tokenizer
    from glm5_model.tokenizer.build import TINY_DIR

    if explicit:
        path = Path(explicit)
    else:
        ckpt = resolve_path(cfg.checkpoint_dir)
        path = ckpt if (ckpt / "tokenizer_config.json").is_file() else TINY_DIR
    return load_tokenizer(path), path


def histogram(lengths: list[int], width: int = 40) -> list[str]:
    """Power-of-two buckets: prompt lengths span orders of magnitude, linear bins would hide the tail."""
    if not lengths:
        return ["  (no prompts measured)"]
    buckets = collections.Counter(max(n, 1).bit_length() - 1 for n in lengths)
    top = max(buckets.values())
    lines = []
    for b in range(min(buckets), max(buckets) + 1):
        lo, hi = (0 if b == 0 else 2 ** b), 2 ** (b + 1) - 1
        count = buckets.get(b, 0)
        lines.append(f"  {lo:>7}-{hi:<7} {'#' * max(count * width // top, 1 if count else 0):<{width}} {count}")
    return lines


def _stats(lengths: list[int]) -> str:
    if not lengths:
        return "none measured"
    q = sorted(lengths)
    return (f"min {q[0]}  p50 {q[len(q) // 2]}  p95 {q[min(len(q) - 1, int(len(q) * 0.95))]}  max {q[-1]}  "
            f"mean {statistics.fmean(q):.1f}")


def report(cfg, data: LoadedData, tokenizer, tokenizer_path, out=None) -> int:
    d, out = cfg.data, out or sys.stdout   # looked up per call: tests and callers may swap sys.stdout

    def say(line: str = "") -> None:
        print(line, file=out)

    train_report = data.reports[0]
    say(f"== data: {train_report.source.split(' ', 1)[1]} (format {data.format}, split {d.split})")
    say(f"tokenizer: {tokenizer_path}")
    say(f"rows: {train_report.total} read, {train_report.kept} valid, {train_report.skipped} with problems")
    say(f"train {len(data.train)} | eval {len(data.eval)}" + (
        f" (held out {d.eval_fraction:g} by seed {d.shuffle_seed})" if d.eval_fraction and not
        (d.eval_path or d.eval_split) else ""))
    rows = data.train + data.eval
    tasks = collections.Counter(r.task or "(none)" for r in rows)
    say(f"with tools: {sum(bool(r.tools) for r in rows)} | with labels: {sum(r.label is not None for r in rows)}"
        f" | tasks: {dict(sorted(tasks.items()))}")
    say(f"epochs: {d.epochs or 'endless'} | shuffle: {d.shuffle} (seed {d.shuffle_seed})")
    for rep in data.reports:
        sampled = "" if rep.token_checked >= rep.kept else f" (sample of {rep.token_checked}, validate_rows)"
        say(f"\n== prompt length in tokens, {rep.source}{sampled}: {_stats(rep.prompt_lengths)}")
        for line in histogram(rep.prompt_lengths):
            say(line)
    if data.train:
        first = make_source(d, data.train).next_batch(1)[0]
        text = render_prompt(tokenizer, first, tokenize=False)
        ids = render_prompt(tokenizer, first)
        say(f"\n== first prompt served (record {first.index}, {len(ids)} tokens), exactly as rendered, between "
            f"the rules:")
        say("-" * 72)
        out.write(text if text.endswith("\n") else text + "\n")   # the template's trailing newline is real
        say("-" * 72)
    would_fail = False
    for rep in data.reports:
        status = "OK" if rep.ok else ("FAILS (strict)" if d.on_invalid == "strict" else "rows dropped (skip)")
        say(f"\n== validation ({d.on_invalid}): {status}")
        say(rep.summary())
        would_fail |= not rep.ok and d.on_invalid == "strict"
    return 1 if would_fail else 0


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m rollout.data", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    insp = sub.add_parser("inspect", help="counts, length histogram, first prompt, validation report")
    insp.add_argument("--tokenizer", help="tokenizer directory (default: the run's checkpoint, else the tiny one)")
    insp.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. data.path=prompts.parquet")
    args = parser.parse_args(argv)

    from hydra.errors import HydraException

    try:
        cfg = _compose(args.overrides)
        tokenizer, tokenizer_path = _tokenizer(cfg, args.tokenizer)
        data = load_data(cfg.data, tokenizer, enforce_mode=False)
    except (ConfigError, HydraException) as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    except DataError as exc:
        print(f"data error: {exc}", file=sys.stderr)
        return 2
    return report(cfg, data, tokenizer, tokenizer_path)
