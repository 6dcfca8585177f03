"""The repo's tiny tokenizer (build.py) and loading a checkpoint's tokenizer (load_tokenizer)."""
from __future__ import annotations

import json
from pathlib import Path

# Tokenizers whose whole behaviour is their tokenizer.json: transformers' fast base class serves them as they are.
_PLAIN_FAST_CLASSES = (None, "PreTrainedTokenizerFast", "TokenizersBackend")


def load_tokenizer(path: str | Path):
    """The tokenizer of the checkpoint at `path`, as AutoTokenizer would load it.

    A tokenizer.json whose config names no model-specific class (the repo's tokenizers, GLM's) is loaded through
    PreTrainedTokenizerFast directly: AutoTokenizer's import pulls in torch and transformers' model registry,
    3 s of one core in every process that only renders and decodes text (the rollout manager, the driver)."""
    path = Path(path)
    config_file = path / "tokenizer_config.json"
    config = json.loads(config_file.read_text()) if config_file.exists() else {}
    if (path / "tokenizer.json").exists() and config.get("tokenizer_class") in _PLAIN_FAST_CLASSES:
        from transformers import PreTrainedTokenizerFast

        return PreTrainedTokenizerFast.from_pretrained(str(path))
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))
