"""HF checkpoint directories: a random initial checkpoint is made again when what it was made from changed (a
stale one trained the warm-up on one chat template while the engines rendered another), any other checkpoint is
used as it is, and an exported checkpoint carries the tokenizer its weights were trained with."""
from __future__ import annotations

import json
import shutil

from glm5_model.hf_checkpoint import INIT_RECORD, ensure_checkpoint, write_checkpoint_dir


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_a_random_init_is_made_again_when_the_repo_tokenizer_changed(tiny_checkpoint, tmp_path):
    ckpt = _copy(tiny_checkpoint, tmp_path / "init")
    weights = (ckpt / "model.safetensors").stat().st_mtime_ns
    assert ensure_checkpoint("tiny", ckpt, seed=0) == ckpt
    assert ensure_checkpoint("tiny", ckpt, seed=5) == ckpt  # another seed: reused as before (tests share one)
    assert (ckpt / "model.safetensors").stat().st_mtime_ns == weights

    record = json.loads((ckpt / INIT_RECORD).read_text())
    (ckpt / INIT_RECORD).write_text(json.dumps({**record, "tokenizer_sha256": "an older tokenizer"}))
    (ckpt / "tokenizer_config.json").write_text("{}")
    ensure_checkpoint("tiny", ckpt, seed=0)
    assert json.loads((ckpt / INIT_RECORD).read_text()) == record
    assert "chat_template" in json.loads((ckpt / "tokenizer_config.json").read_text())


def test_a_checkpoint_without_an_init_record_is_never_replaced(tiny_checkpoint, tmp_path):
    ckpt = _copy(tiny_checkpoint, tmp_path / "converted")
    (ckpt / INIT_RECORD).unlink()
    (ckpt / "tokenizer_config.json").write_text('{"chat_template": "a released model\'s own"}')
    ensure_checkpoint("tiny", ckpt, seed=7)
    assert json.loads((ckpt / "tokenizer_config.json").read_text())["chat_template"] == "a released model's own"
    assert not (ckpt / INIT_RECORD).exists()


def test_an_exported_checkpoint_carries_the_tokenizer_it_was_trained_from(tiny_checkpoint, tmp_path):
    import torch

    source = _copy(tiny_checkpoint, tmp_path / "source")
    (source / "tokenizer_config.json").write_text('{"chat_template": "the source\'s template"}')
    (source / "chat_template.jinja").write_text("{{ messages }}")
    config = json.loads((source / "config.json").read_text())
    out = write_checkpoint_dir(tmp_path / "out", {"w": torch.zeros(2)}, config, tokenizer_from=source)
    assert (out / "tokenizer_config.json").read_text() == (source / "tokenizer_config.json").read_text()
    assert (out / "chat_template.jinja").read_text() == "{{ messages }}"
    assert (out / "tokenizer.json").read_bytes() == (source / "tokenizer.json").read_bytes()
    assert not (out / INIT_RECORD).exists()  # trained weights are never "remade" as a random init
    tiny = write_checkpoint_dir(tmp_path / "tiny", {"w": torch.zeros(2)}, config)
    assert "chat_template" in json.loads((tiny / "tokenizer_config.json").read_text())
    assert json.loads((tiny / "tokenizer_config.json").read_text())["chat_template"] != "the source's template"
