"""Offline checkpoint conversion: HF safetensors (single file or sharded with an index) <-> Megatron per-rank
files for any tensor / expert / pipeline-parallel layout, one decoder layer at a time, so a 744B checkpoint never
has to be in memory at once (peak: one layer, plus embeddings).

    python -m glm5_model.convert hf-to-megatron --hf HF_DIR --out MEG_DIR --tp 8 --ep 32 --pp 8 \
        --pp-first-layers 9 --pp-last-layers 9     # GLM-5: 78 layers as 9 + 6 x 10 + 9
    python -m glm5_model.convert megatron-to-hf --megatron MEG_DIR --out HF_DIR

Megatron side: MEG_DIR/layout.json, and per rank MEG_DIR/mp_rank_{tp}_{pp}_{ep}/{part}.safetensors, where part is
`layer_{global index}` (names use the stage-local layer number, as the rank's model does), `embedding` (first
stage) or `head` (last stage). Each rank file holds exactly that rank's tensors: its tensor-parallel piece, its
block of experts (local expert ids), the replicated tensors. Names, splits and the indexer's rotary-half layout
come from glm5_model/convert.py, the same mapping the trainer uses on live models.
"""
from __future__ import annotations

import dataclasses
import json
import re
from collections import defaultdict
from pathlib import Path

import torch

from glm5_model.convert import ExpertShard, hf_source, megatron_to_hf, merge_tp, split_tp
from glm5_model.megatron_config import ParallelLayout, pipeline_stage_layers

# Tensor-parallel split of Megatron tensors: suffix -> (partition_dim, partition_stride). Everything else is
# replicated. tests/glm5_model/test_checkpoint_layout.py checks this table against a real model's attributes.
TP_SPLIT = {
    "embedding.word_embeddings.weight": (0, 1),
    "output_layer.weight": (0, 1),
    "self_attention.linear_q_up_proj.weight": (0, 1),
    "self_attention.linear_kv_up_proj.weight": (0, 1),
    "self_attention.linear_proj.weight": (1, 1),
    "self_attention.linear_qkv.weight": (0, 1),  # GLM-4.5; rows are grouped per query group, so TP splits groups
    "self_attention.linear_qkv.bias": (0, 1),
    "mlp.linear_fc1.weight": (0, 2),
    "mlp.linear_fc2.weight": (1, 1),
    "mlp.shared_experts.linear_fc1.weight": (0, 2),
    "mlp.shared_experts.linear_fc2.weight": (1, 1),
    "linear_fc1.weight#expert": (0, 2),
    "linear_fc2.weight#expert": (1, 1),
}
_HF_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_HF_EXPERT = re.compile(r"^mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_MEG_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")


@dataclasses.dataclass(frozen=True)
class Layout:
    tp: int = 1
    ep: int = 1
    pp: int = 1
    etp: int | None = None  # expert tensor parallel; default: tp without EP, 1 with EP (as the trainer does)
    pp_first: int | None = None  # layers on the first / last pipeline stage (uneven split), as the trainer's
    pp_last: int | None = None

    @property
    def expert_tp(self) -> int:
        """The trainer's rule (ParallelLayout.expert_tp), so converted files match what live ranks load."""
        return ParallelLayout(tensor_parallel=self.tp, expert_parallel=self.ep,
                              expert_tensor_parallel=self.etp).expert_tp

    def check(self, hf: dict) -> None:
        for flag, value in (("--tp", self.tp), ("--ep", self.ep), ("--pp", self.pp), ("--etp", self.expert_tp)):
            if value < 1:
                raise ValueError(f"{flag}: must be >= 1, got {value}")
        if hf["num_attention_heads"] % self.tp:
            raise ValueError(f"--tp: {self.tp} does not divide num_attention_heads {hf['num_attention_heads']}")
        if hf.get("model_type") == "glm4_moe" and hf["num_key_value_heads"] % self.tp:
            raise ValueError(f"--tp: {self.tp} does not divide num_key_value_heads {hf['num_key_value_heads']}")
        if hf["n_routed_experts"] % self.ep:
            raise ValueError(f"--ep: {self.ep} does not divide n_routed_experts {hf['n_routed_experts']}")
        self.stage_counts(hf["num_hidden_layers"])

    def stage_counts(self, num_layers: int) -> list[int]:
        """Decoder layers per pipeline stage: the trainer's split (ParallelLayout), so files match live ranks."""
        return pipeline_stage_layers(num_layers, self.pp, self.pp_first, self.pp_last,
                                     names=("--pp", "--pp-first-layers", "--pp-last-layers"))

    def stage_of(self, layer: int, num_layers: int) -> tuple[int, int]:
        """(pipeline stage, stage-local layer index)."""
        start = 0
        for stage, count in enumerate(self.stage_counts(num_layers)):
            if layer < start + count:
                return stage, layer - start
            start += count
        raise ValueError(f"layer {layer} is beyond num_hidden_layers {num_layers}")


def _split_spec(megatron_name: str) -> tuple[int, int] | None:
    if ".local_experts." in megatron_name:
        return TP_SPLIT["linear_fc1.weight#expert" if megatron_name.endswith("linear_fc1.weight")
                        else "linear_fc2.weight#expert"]
    m = _MEG_LAYER.match(megatron_name)
    return TP_SPLIT.get(m.group(2) if m else megatron_name)


def _megatron_suffix(hf_rest: str, shard: ExpertShard) -> str:
    """Megatron suffix (inside decoder.layers.i) of an HF suffix (inside model.layers.i); experts excluded."""
    from glm5_model import convert as c

    inverse = {v: k for k, v in shard.one_to_one.items()}
    if hf_rest in inverse:
        return inverse[hf_rest]
    for meg, kind in c._QKV.items():  # GLM-4.5: q/k/v fuse into linear_qkv
        if shard.num_kv_heads and hf_rest in (f"self_attn.{p}_proj.{kind}" for p in "qkv"):
            return meg
    for meg, (hf_suffix, _) in c._INDEXER_TENSORS.items():
        if hf_rest == hf_suffix:
            return c._INDEXER + meg
    for meg, base in c._LAYER_GATED_FC1.items():
        if hf_rest in (f"{base}.gate_proj.weight", f"{base}.up_proj.weight"):
            return meg
    raise KeyError(f"no Megatron tensor for HF tensor suffix {hf_rest!r}")


def _layer_tensors(hf_layer: dict[str, torch.Tensor], layer: int, shard: ExpertShard
                   ) -> list[tuple[str, int, torch.Tensor]]:
    """(Megatron name with global layer number, owning EP rank or -1 for all, full tensor) for one HF layer."""
    names: dict[str, int] = {}
    for hf_name in hf_layer:
        rest = _HF_LAYER.match(hf_name).group(2)
        e = _HF_EXPERT.match(rest)
        if e:
            expert = int(e.group(1))
            fc = "linear_fc2" if e.group(2) == "down_proj" else "linear_fc1"
            local = f"decoder.layers.{layer}.mlp.experts.local_experts.{expert % shard.num_local}.{fc}.weight"
            names[local + f"@{expert // shard.num_local}"] = expert // shard.num_local
        else:
            names[f"decoder.layers.{layer}.{_megatron_suffix(rest, shard)}"] = -1
    out = []
    for key, ep_rank in names.items():
        name = key.split("@")[0]
        rank_shard = dataclasses.replace(shard, ep_rank=max(ep_rank, 0))
        out.append((name, ep_rank, hf_source(name, hf_layer, rank_shard)))
    return out


class _HFReader:
    """Reads tensors of an HF checkpoint directory lazily, by name, from single or sharded safetensors."""

    def __init__(self, path: Path):
        from safetensors import safe_open

        self.path = path
        index = path / "model.safetensors.index.json"
        weight_map = (json.loads(index.read_text())["weight_map"] if index.is_file()
                      else {k: "model.safetensors" for k in safe_open(str(path / "model.safetensors"), "pt").keys()})
        self.weight_map = weight_map
        self._open = lambda f: safe_open(str(path / f), "pt")

    def get(self, names: list[str]) -> dict[str, torch.Tensor]:
        by_file: dict[str, list[str]] = defaultdict(list)
        for n in names:
            by_file[self.weight_map[n]].append(n)
        out = {}
        for f, ns in by_file.items():
            with self._open(f) as handle:
                out.update({n: handle.get_tensor(n) for n in ns})
        return out


def _rank_dir(out: Path, tp: int, pp: int, ep: int) -> Path:
    return out / f"mp_rank_{tp:02d}_{pp:03d}_{ep:03d}"


def _save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata={"format": "pt"})


def _localise(name: str, layout: Layout, num_layers: int) -> tuple[int, str]:
    m = _MEG_LAYER.match(name)
    if not m:
        return (0 if name.startswith("embedding") else layout.pp - 1), name
    stage, local = layout.stage_of(int(m.group(1)), num_layers)
    return stage, f"decoder.layers.{local}.{m.group(2)}"


def _write_part(part: str, tensors: list[tuple[str, int, torch.Tensor]], layout: Layout, num_layers: int,
                out: Path) -> None:
    """Splits full tensors over (tp, ep) for their stage and writes one file per rank."""
    per_rank: dict[tuple[int, int, int], dict[str, torch.Tensor]] = defaultdict(dict)
    for name, ep_owner, full in tensors:
        stage, local_name = _localise(name, layout, num_layers)
        spec = _split_spec(name)
        expert = ".local_experts." in name
        tp_size = layout.expert_tp if expert else layout.tp
        for tp in range(layout.tp):
            # Expert tensors split over the expert-TP group; with expert TP 1 every TP rank holds them whole.
            piece = full if spec is None or tp_size == 1 else split_tp(full, *spec, tp % tp_size, tp_size)
            for ep in range(layout.ep):
                if ep_owner in (-1, ep):
                    per_rank[(tp, stage, ep)][local_name] = piece
    for (tp, pp, ep), tensors_of_rank in per_rank.items():
        _save(tensors_of_rank, _rank_dir(out, tp, pp, ep) / f"{part}.safetensors")


def hf_to_megatron(hf_dir: str | Path, out_dir: str | Path, layout: Layout, progress: bool = True) -> Path:
    hf_dir, out = Path(hf_dir), Path(out_dir)
    hf = json.loads((hf_dir / "config.json").read_text())
    layout.check(hf)
    num_layers = hf["num_hidden_layers"]
    shard = ExpertShard.for_rank(hf, 0, layout.ep)
    reader = _HFReader(hf_dir)
    by_layer: dict[int, list[str]] = defaultdict(list)
    globals_ = []
    for name in reader.weight_map:
        m = _HF_LAYER.match(name)
        if m and int(m.group(1)) < num_layers:
            by_layer[int(m.group(1))].append(name)
        elif not m:
            globals_.append(name)
        # layers >= num_hidden_layers are MTP / next-token-prediction heads: not part of the trained model
    parts = [("embedding", ["embedding.word_embeddings.weight"]),
             ("head", ["decoder.final_layernorm.weight", "output_layer.weight"])]
    for part, meg_names in parts:
        hf_state = reader.get([n for n in globals_ if n in ("model.embed_tokens.weight", "model.norm.weight",
                                                             "lm_head.weight")])
        _write_part(part, [(n, -1, hf_source(n, hf_state, shard)) for n in meg_names], layout, num_layers, out)
    for layer in _progress(range(num_layers), progress, "layers"):
        tensors = _layer_tensors(reader.get(by_layer[layer]), layer, shard)
        _write_part(f"layer_{layer:04d}", tensors, layout, num_layers, out)
    meta = {"layout": dataclasses.asdict(layout) | {"etp": layout.expert_tp}, "hf_config": hf}
    (out / "layout.json").write_text(json.dumps(meta, indent=2) + "\n")
    return out


def _progress(items, enabled: bool, desc: str):
    if not enabled:
        return items
    from tqdm import tqdm

    return tqdm(items, desc=desc)


def megatron_to_hf_dir(meg_dir: str | Path, out_dir: str | Path, progress: bool = True) -> Path:
    """Merges per-rank files back into an HF checkpoint directory (one safetensors shard per layer + index)."""
    from glm5_model.hf_checkpoint import _finish_checkpoint_dir, _write_atomically
    from safetensors import safe_open

    meg, out = Path(meg_dir), Path(out_dir)
    meta = json.loads((meg / "layout.json").read_text())
    layout, hf = Layout(**meta["layout"]), meta["hf_config"]
    num_layers = hf["num_hidden_layers"]

    def load(tp: int, pp: int, ep: int, part: str) -> dict[str, torch.Tensor]:
        with safe_open(str(_rank_dir(meg, tp, pp, ep) / f"{part}.safetensors"), "pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}

    def merged(part: str, stage: int, offset: int) -> dict[str, torch.Tensor]:
        ranks = {(tp, ep): load(tp, stage, ep, part) for tp in range(layout.tp) for ep in range(layout.ep)}
        hf_out: dict[str, torch.Tensor] = {}
        for local_name, t in ranks[(0, 0)].items():
            m = _MEG_LAYER.match(local_name)
            name = f"decoder.layers.{int(m.group(1)) + offset}.{m.group(2)}" if m else local_name
            if ".local_experts." in name:
                continue
            spec = _split_spec(name)
            full = t if spec is None or layout.tp == 1 else merge_tp(
                [ranks[(tp, 0)][local_name] for tp in range(layout.tp)], *spec)
            hf_out.update(megatron_to_hf(name, full, ExpertShard.for_rank(hf, 0, layout.ep)))
        etp = layout.expert_tp
        for ep in range(layout.ep):
            for local_name, t in ranks[(0, ep)].items():
                if ".local_experts." not in local_name:
                    continue
                m = _MEG_LAYER.match(local_name)
                name = f"decoder.layers.{int(m.group(1)) + offset}.{m.group(2)}"
                full = t if etp == 1 else merge_tp([ranks[(tp, ep)][local_name] for tp in range(etp)],
                                                   *_split_spec(name))
                hf_out.update(megatron_to_hf(name, full, ExpertShard.for_rank(hf, ep, layout.ep)))
        return hf_out

    def write(tmp: Path) -> None:
        tmp.mkdir(parents=True)
        weight_map: dict[str, str] = {}
        jobs = [("embedding", 0, 0)]
        for i in range(num_layers):
            stage, local = layout.stage_of(i, num_layers)
            jobs.append((f"layer_{i:04d}", stage, i - local))
        jobs.append(("head", layout.pp - 1, 0))
        for part, stage, offset in _progress(jobs, progress, "parts"):
            tensors = merged(part, stage, offset)
            file = f"model-{part}.safetensors"
            _save(tensors, tmp / file)
            weight_map.update({k: file for k in tensors})
        index = {"metadata": {"total_size": 0}, "weight_map": dict(sorted(weight_map.items()))}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        _finish_checkpoint_dir(tmp, dict(hf))

    return _write_atomically(out, write)


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m glm5_model.convert", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    a = sub.add_parser("hf-to-megatron")
    a.add_argument("--hf", required=True)
    a.add_argument("--out", required=True)
    for flag in ("--tp", "--ep", "--pp"):
        a.add_argument(flag, type=int, default=1)
    a.add_argument("--etp", type=int, default=None)
    a.add_argument("--pp-first-layers", type=int, default=None, help="layers on the first pipeline stage")
    a.add_argument("--pp-last-layers", type=int, default=None, help="layers on the last pipeline stage")
    b = sub.add_parser("megatron-to-hf")
    b.add_argument("--megatron", required=True)
    b.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    try:
        if args.command == "hf-to-megatron":
            out = hf_to_megatron(args.hf, args.out, Layout(args.tp, args.ep, args.pp, args.etp,
                                                                args.pp_first_layers, args.pp_last_layers))
        else:
            out = megatron_to_hf_dir(args.megatron, args.out)
    except (ValueError, KeyError, FileNotFoundError) as exc:
        print(f"error: {exc}")
        return 2
    print(f"wrote {out}")
    return 0
