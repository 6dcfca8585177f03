"""HF-format checkpoint directories: config.json + safetensors + a tokenizer (the tiny one for random inits).

Random initial checkpoints come from transformers' own model class (the reference implementation), so SGLang,
transformers and our Megatron model all start from the same weights. Tensor names on disk are the per-expert HF
names (`mlp.experts.{e}.gate_proj.weight` ...), which is what SGLang and released GLM checkpoints use.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from glm5_model.presets import preset_config
from glm5_model.tokenizer.build import TINY_DIR as TINY_TOKENIZER_DIR

if TYPE_CHECKING:
    import torch

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
# Other tokenizer files a released checkpoint may carry (GLM's template lives in chat_template.jinja).
_OPTIONAL_TOKENIZER_FILES = ("chat_template.jinja", "tokenizer.model")
# Written into random initial checkpoints: what they were made from, so a changed repo tokenizer makes a new one
# instead of reusing a stale directory.
INIT_RECORD = "slipstream_init.json"


def make_random_checkpoint(preset: str, out_dir: str | Path, seed: int = 0, overrides: dict | None = None) -> Path:
    """Writes a randomly initialised model of `preset` (with config `overrides`) to `out_dir`, an HF-format
    checkpoint directory."""
    # torch here, not at the top: the driver imports this module before its engines start (trainer/launch.py)
    # and, with the checkpoint already built, needs no torch there.
    import torch
    import transformers

    out_dir = Path(out_dir)
    config_dict = {**preset_config(preset), **(overrides or {})}
    config_cls, model_cls = {"glm_moe_dsa": ("GlmMoeDsaConfig", "GlmMoeDsaForCausalLM"),
                             "glm4_moe": ("Glm4MoeConfig", "Glm4MoeForCausalLM")}[config_dict["model_type"]]
    torch.manual_seed(seed)
    config = getattr(transformers, config_cls)(
        **{k: v for k, v in config_dict.items() if k not in ("architectures", "model_type")})
    model = getattr(transformers, model_cls)(config).float()
    with torch.no_grad():
        # transformers starts the selection bias at zero; a random one makes tests see it used for selection only.
        for name, param in model.named_parameters():
            if name.endswith("e_score_correction_bias"):
                param.uniform_(-0.05, 0.05)
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.uniform_(-0.05, 0.05)

    def write(tmp: Path) -> None:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # a run's stderr is for its own messages
        try:
            model.save_pretrained(tmp, safe_serialization=True)
        finally:
            hf_logging.enable_progress_bar()
        config = json.loads((tmp / "config.json").read_text())
        # transformers drops fields SGLang's DeepSeek-family model code reads; put them back.
        for key in ("moe_layer_freq", "topk_method", "scoring_func", "ep_size", "n_group", "topk_group"):
            config[key] = config_dict[key]
        _finish_checkpoint_dir(tmp, config)
        (tmp / INIT_RECORD).write_text(json.dumps(_init_record(preset, seed, overrides), indent=2) + "\n")

    return _write_atomically(out_dir, write)


def _init_record(preset: str, seed: int, overrides: dict | None) -> dict:
    return {"preset": preset, "seed": seed, "overrides": overrides or {}, "tokenizer_sha256": _tiny_tokenizer_digest()}


def _tiny_tokenizer_digest() -> str:
    import hashlib

    return hashlib.sha256(b"".join((TINY_TOKENIZER_DIR / n).read_bytes() for n in _TOKENIZER_FILES)).hexdigest()


def write_checkpoint_dir(out_dir: str | Path, state: dict[str, torch.Tensor], hf_config: dict,
                         tokenizer_from: str | Path | None = None) -> Path:
    """An HF-format checkpoint directory from HF-named tensors (what the trainer exports), with the tokenizer of
    the checkpoint at `tokenizer_from` (the one the weights were trained from; the repo's tiny tokenizer when
    None), so engines and the next run render prompts exactly as training did."""
    from safetensors.torch import save_file

    def write(tmp: Path) -> None:
        tmp.mkdir(parents=True)
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / "model.safetensors"),
                  metadata={"format": "pt"})
        _finish_checkpoint_dir(tmp, dict(hf_config), Path(tokenizer_from) if tokenizer_from else None)

    return _write_atomically(Path(out_dir), write)


def _write_atomically(out_dir: Path, write) -> Path:
    """Writes into a sibling temp dir, then renames: a crashed writer never leaves a half checkpoint."""
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    write(tmp)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    return out_dir


def _finish_checkpoint_dir(path: Path, config: dict, tokenizer_from: Path | None = None) -> None:
    """Writes config.json and copies the tokenizer in: `tokenizer_from`'s tokenizer files when it has a
    tokenizer.json, else the repo's tiny tokenizer."""
    source = tokenizer_from if tokenizer_from and (tokenizer_from / "tokenizer.json").is_file() else None
    for name in _TOKENIZER_FILES + _OPTIONAL_TOKENIZER_FILES:
        if source is not None and (source / name).is_file():
            shutil.copy(source / name, path / name)
        elif source is None and name in _TOKENIZER_FILES:
            shutil.copy(TINY_TOKENIZER_DIR / name, path / name)
    config["torch_dtype"] = "float32"
    (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def ensure_checkpoint(preset: str, out_dir: str | Path, seed: int = 0) -> Path:
    """`out_dir`, made a random initial checkpoint of `preset` first when it holds none. A random checkpoint made
    here earlier with another version of the repo's tokenizer is made again (its record says): its tokenizer,
    which the warm-up renders prompts with, would not be the one the code and the tests expect. Any other
    checkpoint (converted, trained) is used as it is; so is an existing one of another seed, as before."""
    out_dir = Path(out_dir)
    record = out_dir / INIT_RECORD
    stale = record.is_file() and json.loads(record.read_text()).get("tokenizer_sha256") != _tiny_tokenizer_digest()
    if stale:
        print(f"{out_dir}: the random initial checkpoint was made with an older version of the repo's tokenizer; "
              "making it again", flush=True)
    if stale or not (out_dir / "config.json").is_file():
        make_random_checkpoint(preset, out_dir, seed)
    return out_dir


def load_hf_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint directory (single file or sharded with an index json), by HF name."""
    from safetensors.torch import load_file

    path = Path(path)
    index = path / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else ["model.safetensors"]
    state: dict[str, torch.Tensor] = {}
    for name in files:
        state.update(load_file(path / name))
    return state
