"""The weight-sync bucket plan and the refit time expected from link bandwidth, for a preset and a layout
(docs/weight-sync.md). Counts come from glm5_model/param_count.py; the link figures are flags, printed with the
result.

    python bench/refit_estimate.py --preset glm5-744b --tp 8 --pp 8 --ep 32 --first 9 --last 9 --dp 4 \
        --bucket-mb 512 --engine-gpus 32 --engines 2
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="glm5-744b")
    p.add_argument("--tp", type=int, default=8)
    p.add_argument("--pp", type=int, default=8)
    p.add_argument("--ep", type=int, default=32)
    p.add_argument("--dp", type=int, default=4)
    p.add_argument("--first", type=int, default=9, help="layers on the first pipeline stage")
    p.add_argument("--last", type=int, default=9, help="layers on the last pipeline stage")
    p.add_argument("--bucket-mb", type=float, default=512)
    p.add_argument("--bytes-per-param", type=int, default=2, help="the engine dtype (bf16: 2)")
    p.add_argument("--engines", type=int, default=2, help="engine replicas to refit")
    p.add_argument("--engine-gpus", type=int, default=32, help="GPUs per engine (its experts spread over all)")
    p.add_argument("--nic-gbs", type=float, default=40.0,
                   help="GB/s per GPU across nodes (400 Gb/s ConnectX-7 per GPU = 50 GB/s line rate, ~40 achieved)")
    p.add_argument("--nvlink-gbs", type=float, default=360.0,
                   help="GB/s per GPU inside a node (H100 NVLink 4: 450 GB/s per direction, ~360 NCCL bus bw)")
    p.add_argument("--hbm-gbs", type=float, default=2000.0, help="GB/s of a device copy into the engine's weights")
    a = p.parse_args()

    from glm5_model.megatron_config import pipeline_stage_layers
    from glm5_model.param_count import count_params
    from glm5_model.presets import PRESETS

    hf = PRESETS[a.preset]
    m = count_params(hf)
    b = a.bytes_per_param
    bucket = a.bucket_mb * 2**20
    stages = pipeline_stage_layers(hf["num_hidden_layers"], a.pp, a.first, a.last)
    bounds = [sum(stages[:i]) for i in range(len(stages) + 1)]
    gb = 1e9
    print(f"{a.preset}: {m.total:,} parameters ({m.total * b / gb:,.1f} GB at {b} B/param); routed experts "
          f"{m.routed_experts:,} ({m.routed_experts * b / gb:,.1f} GB), everything else "
          f"{(m.total - m.routed_experts):,} ({(m.total - m.routed_experts) * b / gb:,.1f} GB)")
    print(f"trainer layout: TP {a.tp} x PP {a.pp} (layers {stages}) x DP {a.dp}, EP {a.ep} (ETP 1); "
          f"bucket {a.bucket_mb:g} MiB")
    print("stage  dense sender: bytes  buckets | expert senders: count  bytes each  buckets each")
    total_buckets = 0
    max_expert_sender = 0.0
    for s, (lo, hi) in enumerate(zip(bounds, bounds[1:])):
        layers = m.layers[lo:hi]
        dense = sum(L.total - L.routed_experts for L in layers)
        if s == 0:
            dense += m.embedding
        if s == len(stages) - 1:
            dense += m.lm_head + m.final_norm
        experts_each = sum(L.routed_experts for L in layers) / a.ep
        nd, ne = math.ceil(dense * b / bucket), math.ceil(experts_each * b / bucket)
        total_buckets += nd + a.ep * ne
        max_expert_sender = max(max_expert_sender, experts_each * b)
        print(f"{s:5d}  {dense * b / gb:17.2f} GB {nd:7d} | {a.ep:21d} {experts_each * b / gb:8.2f} GB {ne:12d}")
    per_engine = m.total * b
    print(f"senders: {a.pp} dense (TP rank 0 of DP replica 0 per stage) + {a.pp * a.ep} expert (every EP rank); "
          f"{total_buckets:,} buckets per push; bytes per engine {per_engine / gb:,.1f} GB")
    # (1) what rollout/engine.py + SGLang's update_weights_from_distributed do today: every bucket is broadcast,
    # whole, to every GPU of every engine, and each engine takes one bucket at a time.
    broadcast = per_engine / (a.nic_gbs * gb)
    print(f"as built (distributed: every engine GPU receives every bucket whole): >= {per_engine / gb:,.0f} GB "
          f"into each engine GPU at {a.nic_gbs:g} GB/s = {broadcast:.1f} s")
    # (2) shard-aware: each engine GPU receives only the experts it serves (EP-aligned with the trainer) plus its
    # share of the dense tensors; every trainer GPU sends its own experts once per engine.
    dense_bytes = (m.total - m.routed_experts) * b
    ingress = (m.routed_experts * b + dense_bytes) / a.engine_gpus
    egress = a.engines * max_expert_sender
    gather = dense_bytes / a.pp / (a.nvlink_gbs * gb)
    load = ingress / (a.hbm_gbs * gb)
    shard = max(ingress, egress) / (a.nic_gbs * gb) + gather + load
    print(f"shard-aware (not built): {ingress / gb:.1f} GB into each of {a.engine_gpus} GPUs per engine, "
          f"{egress / gb:.1f} GB out of the busiest trainer GPU for {a.engines} engines, at {a.nic_gbs:g} GB/s "
          f"= {max(ingress, egress) / (a.nic_gbs * gb):.2f} s; + dense TP gather over NVLink "
          f"{gather:.2f} s + load at {a.hbm_gbs:g} GB/s {load:.2f} s = {shard:.2f} s")


if __name__ == "__main__":
    main()
