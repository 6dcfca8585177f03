"""Parallel layout planner: parameter counts and per-GPU training memory for a GLM preset on a Megatron layout.

    python -m glm5_model.plan --preset glm5-744b --tp 8 --pp 8 --ep 32 --nodes 32 --gpus-per-node 8 \\
        --seq-len 4096 --micro-batch 1 --optimizer adam --precision bf16

The layout is Megatron-core's: world = TP x PP x DP for the dense part; the MoE layers fold the same ranks into
expert-TP (ETP) x EP x expert-DP x PP ("MoE parallel folding"), which requires ETP x EP to divide TP x DP.
Either give --dp, or --nodes and --gpus-per-node (DP is derived); giving both checks they agree.

Memory model, per GPU, for every pipeline stage (the report shows each stage and the largest one):

* weights: the stage's parameters as that GPU holds them. TP splits the embedding/lm_head (vocab-parallel, vocab
  padded to a multiple of 128 x TP as Megatron does), MLA's q/kv up-projections and output projection (GQA: qkv and
  output), the dense MLP and the shared expert. Replicated on every TP rank: the norms, MLA's q/kv down
  projections and latent norms, the router, and the DSA indexer (not built by our Megatron model yet; assumed
  replicated). Routed experts are split over EP, then ETP: routed / (EP x ETP). Bytes: 2 (bf16) or 4 (fp32).
* gradients: one gradient per held parameter, in --grad-dtype (Megatron's default keeps the DDP grad buffer in
  the parameter dtype; --grad-dtype fp32 is --accumulate-allreduce-grads-in-fp32). The distributed optimizer
  does not shard the grad buffer.
* optimizer: Adam holds fp32 moments m and v (8 bytes/param) plus an fp32 master copy when params are bf16
  (4 bytes/param): 12 bytes/param in bf16, 8 in fp32. SGD with momentum: one fp32 moment (+ master in bf16).
  With the distributed optimizer (default; --no-distributed-optimizer to turn off) dense-part state is sharded
  over DP and expert state over expert-DP = TP x DP / (ETP x EP).
* activations (an estimate, bf16, balanced routing, flash attention so no s x s scores are stored, no dropout):
  each layer keeps, per token, the tensors listed in `activation_terms` (norm inputs/outputs, projections'
  inputs, MLA latents, q/k/v, attention output, router logits in fp32, each token's top_k expert inputs and
  SwiGLU intermediates, the shared expert's). Terms in the sequence-parallel region are divided by TP when
  sequence parallelism is on (default when TP > 1), TP-split terms by TP, expert intermediates by ETP.
  With 1F1B the first stage holds PP microbatches in flight (stage i holds PP - i).
  - --recompute full (default): Megatron full/uniform recomputation with one layer per checkpoint: each layer
    keeps only its input (s x b x h, / TP with SP) per in-flight microbatch, plus one layer's full activations
    while it is recomputed in backward.
  - --recompute selective: Megatron's --recompute-modules layernorm mla_up_proj moe_act: the terms tagged with
    those modules are dropped, the rest kept for every in-flight microbatch and layer.
  - --recompute none: everything kept.
  The last stage also holds the fp32 logits and their gradient for one microbatch: 2 x s x b x V/TP x 4 bytes.
Not counted: the CUDA context and NCCL buffers (~2-5 GiB), allocator fragmentation, temporary all-to-all
buffers, FP8 copies, MTP layers (not built), the rollout engine (SGLang holds its own weights + KV cache).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from glm5_model.megatron_config import pipeline_stage_layers
from glm5_model.param_count import ModelParams, count_params

GIB = 1024 ** 3
BYTES = {"bf16": 2, "fp32": 4}


class LayoutError(ValueError):
    """An invalid layout; the message names the offending flag."""


@dataclass(frozen=True)
class Layout:
    tp: int = 1
    pp: int = 1
    ep: int = 1
    etp: int = 1
    dp: int = 1
    pp_first_layers: int | None = None
    pp_last_layers: int | None = None
    sequence_parallel: bool | None = None  # None: on when tp > 1

    @property
    def world(self) -> int:
        return self.tp * self.pp * self.dp

    @property
    def expert_dp(self) -> int:
        return self.tp * self.dp // (self.etp * self.ep)

    @property
    def sp(self) -> bool:
        return self.tp > 1 if self.sequence_parallel is None else self.sequence_parallel


@dataclass(frozen=True)
class Workload:
    seq_len: int = 4096
    micro_batch: int = 1
    optimizer: str = "adam"
    precision: str = "bf16"
    grad_dtype: str | None = None  # None: same as precision
    distributed_optimizer: bool = True
    recompute: str = "full"


@dataclass
class StageMemory:
    stage: int
    layers: list[int]
    params: int  # parameters held by one GPU of this stage
    weights: float
    grads: float
    optimizer: float
    activations: float

    @property
    def total(self) -> float:
        return self.weights + self.grads + self.optimizer + self.activations


@dataclass
class Plan:
    preset: str
    layout: Layout
    workload: Workload
    total_params: int
    active_params: int
    active_params_no_embedding: int
    buffers: int
    mtp_params: int
    groups: dict[str, int]
    stages: list[StageMemory] = field(default_factory=list)

    @property
    def peak(self) -> StageMemory:
        return max(self.stages, key=lambda s: s.total)


def resolve_dp(tp: int, pp: int, dp: int | None, nodes: int | None, gpus_per_node: int) -> int:
    if nodes is None:
        if dp is None:
            raise LayoutError("--dp: give --dp, or --nodes (and --gpus-per-node) to derive it")
        return dp
    world = nodes * gpus_per_node
    if world % (tp * pp):
        raise LayoutError(f"--nodes x --gpus-per-node = {world} GPUs is not divisible by --tp x --pp = {tp * pp}")
    derived = world // (tp * pp)
    if dp is not None and dp != derived:
        raise LayoutError(f"--dp {dp} disagrees with --nodes x --gpus-per-node = {world} = tp {tp} x pp {pp} x "
                          f"dp {derived}")
    return derived


def stage_layers(num_layers: int, layout: Layout) -> list[list[int]]:
    """Decoder layers of each pipeline stage: even, or with Megatron's first/last-stage overrides
    (num_layers_in_first/last_pipeline_stage) and the rest even (the trainer's split, see ParallelLayout)."""
    try:
        counts = pipeline_stage_layers(num_layers, layout.pp, layout.pp_first_layers, layout.pp_last_layers,
                                       names=("--pp", "--pp-first-layers", "--pp-last-layers"))
    except ValueError as exc:
        raise LayoutError(str(exc)) from exc
    out, start = [], 0
    for c in counts:
        out.append(list(range(start, start + c)))
        start += c
    return out


def validate(hf: dict[str, Any], layout: Layout, work: Workload) -> None:
    for flag, v in (("--tp", layout.tp), ("--pp", layout.pp), ("--ep", layout.ep), ("--etp", layout.etp),
                    ("--dp", layout.dp), ("--seq-len", work.seq_len), ("--micro-batch", work.micro_batch)):
        if v < 1:
            raise LayoutError(f"{flag}: must be >= 1 (got {v})")
    if hf["num_attention_heads"] % layout.tp:
        raise LayoutError(f"--tp {layout.tp}: num_attention_heads {hf['num_attention_heads']} is not divisible by it")
    if hf.get("model_type") == "glm4_moe" and hf["num_key_value_heads"] % layout.tp:
        raise LayoutError(f"--tp {layout.tp}: num_key_value_heads {hf['num_key_value_heads']} (GQA groups) is not "
                          "divisible by it")
    for key in ("intermediate_size", "moe_intermediate_size"):
        if hf[key] % layout.tp:
            raise LayoutError(f"--tp {layout.tp}: {key} {hf[key]} is not divisible by it")
    if hf["n_routed_experts"] % layout.ep:
        raise LayoutError(f"--ep {layout.ep}: n_routed_experts {hf['n_routed_experts']} is not divisible by it")
    if hf["moe_intermediate_size"] % layout.etp:
        raise LayoutError(f"--etp {layout.etp}: moe_intermediate_size {hf['moe_intermediate_size']} is not "
                          "divisible by it")
    # Megatron MoE parallel folding: experts live on ETP x EP x expert-DP x PP = world, so ETP x EP | TP x DP.
    if (layout.tp * layout.dp) % (layout.etp * layout.ep):
        raise LayoutError(f"--ep {layout.ep} x --etp {layout.etp} = {layout.ep * layout.etp} must divide "
                          f"--tp x --dp = {layout.tp * layout.dp} (Megatron: expert ranks fold into the TP x DP "
                          "ranks of a pipeline stage)")
    if layout.sp and layout.tp == 1:
        raise LayoutError("--sequence-parallel: needs --tp > 1")
    if layout.sp and work.seq_len % layout.tp:
        raise LayoutError(f"--seq-len {work.seq_len}: must be divisible by --tp {layout.tp} with sequence parallelism")
    if work.optimizer not in ("adam", "sgd"):
        raise LayoutError(f"--optimizer {work.optimizer!r}: known adam, sgd")
    for flag, v in (("--precision", work.precision), ("--grad-dtype", work.grad_dtype or work.precision)):
        if v not in BYTES:
            raise LayoutError(f"{flag} {v!r}: known {sorted(BYTES)}")
    if work.recompute not in ("full", "selective", "none"):
        raise LayoutError(f"--recompute {work.recompute!r}: known full, selective, none")
    stage_layers(hf["num_hidden_layers"], layout)


def padded_vocab(vocab: int, tp: int, multiple: int = 128) -> int:
    m = multiple * tp
    return int(math.ceil(vocab / m) * m)


def activation_terms(hf: dict[str, Any], moe: bool, layout: Layout) -> list[tuple[str, float, str]]:
    """(name, bytes per token per layer on one GPU, recompute module or '') for one decoder layer in bf16.
    The module tags are Megatron's --recompute-modules names that would drop the term."""
    tp, etp = layout.tp, layout.etp
    sp = tp if layout.sp else 1  # sequence-parallel region divisor
    h = hf["hidden_size"]
    b = 2.0  # bf16
    t: list[tuple[str, float, str]] = [
        ("input norm input (residual)", b * h / sp, ""),
        ("input norm output", b * h, "layernorm"),  # gathered to the full sequence for the column-parallel proj
    ]
    if hf.get("model_type", "glm_moe_dsa") == "glm_moe_dsa":
        nh, nope, rope, v = hf["num_attention_heads"], hf["qk_nope_head_dim"], hf["qk_rope_head_dim"], hf["v_head_dim"]
        ql, kvl = hf["q_lora_rank"], hf["kv_lora_rank"]
        t += [
            ("q/kv latents + latent norms", b * (2 * ql + 2 * (kvl + rope)), ""),
            ("q up-projection output", b * nh * (nope + rope) / tp, "mla_up_proj"),
            ("kv up-projection output", b * nh * (nope + v) / tp, "mla_up_proj"),
            ("q, k after rope (attention inputs)", b * 2 * nh * (nope + rope) / tp, "mla_up_proj"),
            ("attention output (o_proj input)", b * nh * v / tp, ""),
        ]
        # DSA indexer: its forward runs under no_grad in transformers (selection only); nothing is kept.
    else:
        nh, nkv = hf["num_attention_heads"], hf["num_key_value_heads"]
        hd = hf.get("head_dim") or h // nh
        t += [
            ("qkv projection output", b * (nh + 2 * nkv) * hd / tp, ""),
            ("q, k after norm + rope", b * (nh + nkv) * hd / tp, ""),
            ("attention output (o_proj input)", b * nh * hd / tp, ""),
        ]
    t += [
        ("post-attention norm input (residual)", b * h / sp, ""),
        ("post-attention norm output", b * h, "layernorm"),
    ]
    if moe:
        k, E, im = hf["num_experts_per_tok"], hf["n_routed_experts"], hf["moe_intermediate_size"]
        ims = im * hf.get("n_shared_experts", 1)
        t += [
            ("router logits + scores (fp32)", 4.0 * 2 * E / sp, ""),
            ("routed expert inputs (top_k copies)", b * k * h, ""),
            ("routed expert fc1 output (gate, up)", b * k * 2 * im / etp, ""),
            ("routed expert SwiGLU output", b * k * im / etp, "moe_act"),
            ("routed expert outputs before combine", b * k * h, ""),
            ("shared expert fc1 output", b * 2 * ims / tp, ""),
            ("shared expert SwiGLU output", b * ims / tp, "moe_act"),
        ]
    else:
        inter = hf["intermediate_size"]
        t += [
            ("dense MLP fc1 output (gate, up)", b * 2 * inter / tp, ""),
            ("dense MLP SwiGLU output", b * inter / tp, "moe_act"),
        ]
    return t


def _layer_activation_bytes(hf, moe: bool, layout: Layout, tokens: int, recompute: str) -> float:
    terms = activation_terms(hf, moe, layout)
    if recompute == "selective":
        terms = [x for x in terms if not x[2]]
    return tokens * sum(x[1] for x in terms)


def plan(hf: dict[str, Any], layout: Layout, work: Workload, preset: str = "") -> Plan:
    validate(hf, layout, work)
    params: ModelParams = count_params(hf)
    tp, ep, etp = layout.tp, layout.ep, layout.etp
    wbytes = BYTES[work.precision]
    gbytes = BYTES[work.grad_dtype or work.precision]
    master = 4 if work.precision == "bf16" else 0
    opt_bytes = master + (8 if work.optimizer == "adam" else 4)
    dense_shard = layout.dp if work.distributed_optimizer else 1
    expert_shard = layout.expert_dp if work.distributed_optimizer else 1
    vocab_rows = padded_vocab(hf["vocab_size"], tp) // tp
    h = hf["hidden_size"]
    tokens = work.seq_len * work.micro_batch
    stages = stage_layers(hf["num_hidden_layers"], layout)
    out: list[StageMemory] = []
    for i, layer_ids in enumerate(stages):
        dense = expert = 0
        for li in layer_ids:
            lp = params.layers[li]
            dense += lp.attention_tp // tp + lp.attention_replicated + lp.mlp_tp // tp + lp.router
            expert += lp.routed_experts // (ep * etp)
        if i == 0:
            dense += vocab_rows * h
        if i == len(stages) - 1:
            dense += h + (vocab_rows * h if params.lm_head else 0)
        held = dense + expert
        in_flight = layout.pp - i
        layer_full = [_layer_activation_bytes(hf, params.layers[li].moe, layout, tokens, "none") for li in layer_ids]
        if work.recompute == "full":
            ckpt = tokens * 2.0 * h / (tp if layout.sp else 1)
            act = in_flight * len(layer_ids) * ckpt + max(layer_full, default=0.0)
        else:
            per_mb = sum(_layer_activation_bytes(hf, params.layers[li].moe, layout, tokens, work.recompute)
                         for li in layer_ids)
            act = in_flight * per_mb
        if i == len(stages) - 1:
            act += 2 * tokens * vocab_rows * 4.0
        out.append(StageMemory(
            stage=i, layers=layer_ids, params=held,
            weights=held * wbytes / GIB,
            grads=held * gbytes / GIB,
            optimizer=(dense / dense_shard + expert / expert_shard) * opt_bytes / GIB,
            activations=act / GIB,
        ))
    return Plan(
        preset=preset, layout=layout, workload=work,
        total_params=params.total, active_params=params.active,
        active_params_no_embedding=params.active - params.embedding - params.lm_head,
        buffers=params.buffers, mtp_params=params.mtp, groups=params.groups(), stages=out,
    )


def _b(n: int) -> str:
    return f"{n:,} ({n / 1e9:.2f}B)" if n >= 1e8 else f"{n:,} ({n / 1e6:.2f}M)"


def format_plan(p: Plan, gpu_memory_gib: float | None = None) -> str:
    L, W = p.layout, p.workload
    lines = [
        f"model: {p.preset or '(config)'}",
        f"  total parameters:  {_b(p.total_params)}",
        f"  active per token:  {_b(p.active_params)}  [without embedding + lm_head: {_b(p.active_params_no_embedding)}]",
        f"  buffers (MoE selection bias, in the checkpoint, not trained): {p.buffers:,}",
    ]
    if p.mtp_params:
        lines.append(f"  MTP layers (in the published checkpoint, not built, not counted above): {_b(p.mtp_params)}")
    lines.append("  breakdown:")
    for k, v in p.groups.items():
        lines.append(f"    {k:<56} {v:>18,}")
    lines += [
        f"layout: world {L.world} = tp {L.tp} x pp {L.pp} x dp {L.dp}; experts: ep {L.ep} x etp {L.etp} x "
        f"expert-dp {L.expert_dp} x pp {L.pp}; sequence parallel {'on' if L.sp else 'off'}",
        f"workload: seq {W.seq_len} x micro-batch {W.micro_batch}, {W.precision} params, "
        f"{W.grad_dtype or W.precision} grads, {W.optimizer} "
        f"({'distributed over DP' if W.distributed_optimizer else 'not sharded'}), recompute {W.recompute}",
        "per-GPU memory by pipeline stage (GiB):",
        f"  {'stage':>5} {'layers':>9} {'params/GPU':>15} {'weights':>8} {'grads':>8} {'optim':>8} {'activ':>8} {'total':>8}",
    ]
    for s in p.stages:
        span = f"{s.layers[0]}-{s.layers[-1]}" if s.layers else "-"
        lines.append(f"  {s.stage:>5} {span:>9} {s.params:>15,} {s.weights:>8.2f} {s.grads:>8.2f} "
                     f"{s.optimizer:>8.2f} {s.activations:>8.2f} {s.total:>8.2f}")
    pk = p.peak
    lines.append(f"peak: stage {pk.stage}, {pk.total:.2f} GiB (+ CUDA context/NCCL/fragmentation, not modelled)")
    if gpu_memory_gib:
        verdict = "fits" if pk.total <= gpu_memory_gib else "DOES NOT FIT"
        lines.append(f"{verdict} in {gpu_memory_gib:g} GiB per GPU ({gpu_memory_gib - pk.total:+.2f} GiB headroom)")
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m glm5_model.plan", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--preset", help="a glm5_model.presets name")
    src.add_argument("--config", type=Path, help="an HF config.json")
    ap.add_argument("--tp", type=int, default=1, help="tensor parallel")
    ap.add_argument("--pp", type=int, default=1, help="pipeline parallel")
    ap.add_argument("--ep", type=int, default=1, help="expert parallel")
    ap.add_argument("--etp", type=int, default=1,
                    help="expert tensor parallel (default 1; Megatron's own default is ETP = TP)")
    ap.add_argument("--dp", type=int, help="data parallel (or give --nodes)")
    ap.add_argument("--nodes", type=int, help="number of nodes; DP = nodes x gpus-per-node / (TP x PP)")
    ap.add_argument("--gpus-per-node", type=int, default=8)
    ap.add_argument("--pp-first-layers", type=int, help="layers on the first pipeline stage (uneven split)")
    ap.add_argument("--pp-last-layers", type=int, help="layers on the last pipeline stage (uneven split)")
    ap.add_argument("--sequence-parallel", action=argparse.BooleanOptionalAction, default=None,
                    help="default: on when --tp > 1")
    ap.add_argument("--seq-len", type=int, default=4096)
    ap.add_argument("--micro-batch", type=int, default=1)
    ap.add_argument("--optimizer", default="adam", choices=["adam", "sgd"])
    ap.add_argument("--precision", default="bf16", choices=sorted(BYTES))
    ap.add_argument("--grad-dtype", choices=sorted(BYTES), help="default: same as --precision")
    ap.add_argument("--distributed-optimizer", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--recompute", default="full", choices=["full", "selective", "none"])
    ap.add_argument("--gpu-memory-gib", type=float, default=79.6,
                    help="per-GPU memory to compare against (H100 80GB: 79.6 GiB)")
    ap.add_argument("--json", action="store_true", help="print the plan as JSON")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.preset:
        from glm5_model.presets import preset_config

        hf, name = preset_config(args.preset), args.preset
    else:
        hf, name = json.loads(args.config.read_text()), str(args.config)
    try:
        dp = resolve_dp(args.tp, args.pp, args.dp, args.nodes, args.gpus_per_node)
        layout = Layout(tp=args.tp, pp=args.pp, ep=args.ep, etp=args.etp, dp=dp,
                        pp_first_layers=args.pp_first_layers, pp_last_layers=args.pp_last_layers,
                        sequence_parallel=args.sequence_parallel)
        work = Workload(seq_len=args.seq_len, micro_batch=args.micro_batch, optimizer=args.optimizer,
                        precision=args.precision, grad_dtype=args.grad_dtype,
                        distributed_optimizer=args.distributed_optimizer, recompute=args.recompute)
        p = plan(hf, layout, work, preset=name)
    except LayoutError as e:
        print(f"invalid layout: {e}", file=sys.stderr)
        return 2
    if args.json:
        d = asdict(p)
        d["peak_gib"] = p.peak.total
        print(json.dumps(d, indent=1, default=str))
    else:
        print(format_plan(p, args.gpu_memory_gib))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
