"""SGLang on CPU (our platform plugin, the rollout path) against transformers' `generate`, measured in one run.

    python bench/rollout_throughput.py                      # tiny and tiny-glm45, 16x24, 64x64, 256x32
    python bench/rollout_throughput.py --presets tiny --rounds 3

For each preset one random checkpoint is served by both sides: an in-process `SGLangEngine` (fp32, torch_native
attention, token ids in, tokens and logprobs out, as the rollout manager uses it) and transformers'
`AutoModelForCausalLM.generate` (fp32, KV cache, the same torch threads as this process). Every prompt is 16
random token ids and every request generates exactly its budget (SGLang `ignore_eos`; transformers with no EOS),
sampled at temperature 1, so both sides do the same work. Rounds interleave the two sides; the best round counts.

Tok/s = batch x new tokens / wall time of the whole call (prefill included). The cost of one decode step is
(time for 8 + 32 new tokens - time for 8) / 32 at batches 1, 16, 64 and 256, fitted as fixed + per-request x
batch by least squares. Prints `sglang/generate <preset> <B>x<N>: R.RRx` per shape and
`sglang/generate per-request step cost <preset>: R.RRx` (goals in docs/benchmarks.md).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

PROMPT_LEN = 16
STEP_PROBE_BATCHES = (1, 16, 64, 256)
STEP_PROBE_BASE, STEP_PROBE_EXTRA = 8, 32


def _prompts(batch: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    # ids 10.. clear the tiny tokenizer's special ids; no stop ids are set on either side anyway
    return torch.randint(10, vocab, (batch, PROMPT_LEN), generator=g).tolist()


class SGLangSide:
    name = "sglang"

    def __init__(self, path: Path, max_tokens: int):
        from rollout.engine import SGLangEngine

        self.engine = SGLangEngine(str(path), dtype="float32", max_total_tokens=max_tokens, seed=0)
        self._n = 0

    def run(self, prompts: list[list[int]], new_tokens: int) -> float:
        from rollout.protocol import EngineRequest

        self._n += 1
        sampling = {"max_new_tokens": new_tokens, "ignore_eos": True, "temperature": 1.0, "top_p": 1.0}
        reqs = [EngineRequest(f"b{self._n}-{i}", p, dict(sampling)) for i, p in enumerate(prompts)]
        t0 = time.perf_counter()
        results = self.engine.generate(reqs)
        elapsed = time.perf_counter() - t0
        lengths = {len(r.output_ids) for r in results}
        if lengths != {new_tokens}:
            raise RuntimeError(f"sglang generated {sorted(lengths)} tokens per request, expected {new_tokens}")
        return elapsed

    def close(self) -> None:
        self.engine.shutdown()


class GenerateSide:
    name = "generate"

    def __init__(self, path: Path):
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
        # no EOS: every sequence runs to its budget, as SGLang's ignore_eos does
        self.model.generation_config.eos_token_id = None
        self.model.generation_config.pad_token_id = 0

    @torch.inference_mode()
    def run(self, prompts: list[list[int]], new_tokens: int) -> float:
        ids = torch.tensor(prompts)
        t0 = time.perf_counter()
        out = self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                  do_sample=True, temperature=1.0, top_p=1.0, top_k=0)
        elapsed = time.perf_counter() - t0
        expected = (len(prompts), PROMPT_LEN + new_tokens)
        if tuple(out.shape) != expected:
            raise RuntimeError(f"generate returned {tuple(out.shape)}, expected {expected}")
        return elapsed

    def close(self) -> None:
        del self.model


def fit_step_cost(points: dict[int, float]) -> tuple[float, float]:
    """Least squares step = fixed + per_request * batch over {batch: seconds per decode step}."""
    xs, ys = list(points), [points[b] for b in points]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return my - slope * mx, slope


def measure_preset(preset: str, shapes: list[tuple[int, int]], rounds: int, workdir: Path) -> list[str]:
    from glm5_model.hf_checkpoint import make_random_checkpoint
    from glm5_model.presets.configs import preset_config

    path = make_random_checkpoint(preset, workdir / preset, seed=0)
    vocab = int(preset_config(preset)["vocab_size"])
    longest = max([b * (PROMPT_LEN + n) for b, n in shapes]
                  + [b * (PROMPT_LEN + STEP_PROBE_BASE + STEP_PROBE_EXTRA) for b in STEP_PROBE_BATCHES])
    sides = [SGLangSide(path, max_tokens=2 * longest), GenerateSide(path)]
    try:
        for side in sides:  # warm-up: first calls pay for allocation and lazy initialisation
            side.run(_prompts(4, vocab, seed=99), 8)
        best: dict[tuple[str, int, int], float] = {}
        for r in range(rounds):
            for batch, new in shapes + [(b, n) for b in STEP_PROBE_BATCHES
                                        for n in (STEP_PROBE_BASE, STEP_PROBE_BASE + STEP_PROBE_EXTRA)]:
                prompts = _prompts(batch, vocab, seed=batch * 1000 + new)
                for side in sides if r % 2 == 0 else sides[::-1]:
                    t = side.run(prompts, new)
                    key = (side.name, batch, new)
                    best[key] = min(best.get(key, float("inf")), t)
    finally:
        for side in sides:
            side.close()

    lines, figures = [], []
    for batch, new in shapes:
        tps = {s.name: batch * new / best[(s.name, batch, new)] for s in sides}
        lines.append(f"  {preset} {batch:>3}x{new:<3} sglang {tps['sglang']:8.0f} tok/s   generate "
                     f"{tps['generate']:8.0f} tok/s")
        figures.append(f"sglang/generate {preset} {batch}x{new}: {tps['sglang'] / tps['generate']:.2f}x")
    costs = {}
    for s in sides:
        steps = {b: (best[(s.name, b, STEP_PROBE_BASE + STEP_PROBE_EXTRA)] - best[(s.name, b, STEP_PROBE_BASE)])
                 / STEP_PROBE_EXTRA for b in STEP_PROBE_BATCHES}
        costs[s.name] = fit_step_cost(steps)
        per_batch = ", ".join(f"{steps[b] * 1e3:.1f} ms at {b}" for b in STEP_PROBE_BATCHES)
        lines.append(f"  {preset} {s.name:>8} decode step: {per_batch}; fit {costs[s.name][0] * 1e3:.2f} ms + "
                     f"{costs[s.name][1] * 1e3:.3f} ms per request")
    figures.append(f"sglang/generate per-request step cost {preset}: "
                   f"{costs['sglang'][1] / costs['generate'][1]:.2f}x")
    figures.append(f"sglang/generate fixed step cost {preset}: {costs['sglang'][0] / costs['generate'][0]:.2f}x")
    return lines + figures


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", default="tiny,tiny-glm45")
    ap.add_argument("--shapes", default="16x24,64x64,256x32", help="batch x new tokens, comma-separated")
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    print(f"CPU, fp32, prompts of {PROMPT_LEN} tokens, torch threads {torch.get_num_threads()}, best of "
          f"{args.rounds} interleaved rounds", flush=True)
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        for preset in args.presets.split(","):
            lines = measure_preset(preset, shapes, args.rounds, Path(tmp))
            print("\n".join(line for line in lines if line.startswith("  ")), flush=True)
            out += [line for line in lines if not line.startswith("  ")]
    print("\n".join(out))


if __name__ == "__main__":
    main()
