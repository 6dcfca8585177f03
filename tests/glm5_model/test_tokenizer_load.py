"""load_tokenizer: the same tokenizer AutoTokenizer gives, without AutoTokenizer's import of torch where the
checkpoint's tokenizer is a plain tokenizer.json (the rollout manager and the driver only render and decode)."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import transformers

from glm5_model.tokenizer import load_tokenizer
from glm5_model.tokenizer.build import TINY_DIR

REPO = Path(__file__).resolve().parents[2]
CONVERSATION = [{"role": "user", "content": "What is the price of 3 pens?"},
                {"role": "assistant", "content": "", "tool_calls": [
                    {"type": "function", "function": {"name": "lookup_price", "arguments": {"item": "pen"}}}]},
                {"role": "tool", "content": "4"}]
TOOLS = [{"type": "function", "function": {"name": "lookup_price", "description": "A unit price.",
                                           "parameters": {"type": "object",
                                                          "properties": {"item": {"type": "string"}}}}}]


def test_renders_encodes_and_decodes_as_autotokenizer_does():
    ours, auto = load_tokenizer(TINY_DIR), transformers.AutoTokenizer.from_pretrained(str(TINY_DIR))
    for kwargs in ({}, {"tools": TOOLS}):
        text = auto.apply_chat_template(CONVERSATION, add_generation_prompt=True, tokenize=False, **kwargs)
        assert ours.apply_chat_template(CONVERSATION, add_generation_prompt=True, tokenize=False, **kwargs) == text
        ids = auto.encode(text, add_special_tokens=False)
        assert ours.encode(text, add_special_tokens=False) == ids
        assert ours.decode(ids, skip_special_tokens=True) == auto.decode(ids, skip_special_tokens=True)
    assert ours.convert_tokens_to_ids("<|observation|>") == auto.convert_tokens_to_ids("<|observation|>")
    assert {t.content for t in ours.added_tokens_decoder.values() if t.special} == \
        {t.content for t in auto.added_tokens_decoder.values() if t.special}


def test_loading_the_repo_tokenizer_imports_no_torch():
    code = ("import sys; from glm5_model.tokenizer import load_tokenizer; "
            f"load_tokenizer({str(TINY_DIR)!r}); print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out.stderr[-2000:]


def test_a_tokenizer_that_names_its_own_class_goes_through_autotokenizer(tmp_path, monkeypatch):
    model_dir = tmp_path / "model"
    shutil.copytree(TINY_DIR, model_dir)
    config = json.loads((model_dir / "tokenizer_config.json").read_text())
    (model_dir / "tokenizer_config.json").write_text(json.dumps({**config, "tokenizer_class": "LlamaTokenizerFast"}))
    loaded = []
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda path, **kw: loaded.append(path) or "auto")
    assert load_tokenizer(model_dir) == "auto" and loaded == [str(model_dir)]
