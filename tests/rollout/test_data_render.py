"""Prompts rendered with the tiny tokenizer's GLM-style chat template: plain messages render exactly as before,
a tool-using conversation matches a hand-written string, and `python -m rollout.data inspect` shows it."""
from __future__ import annotations

import json

import pytest

from rollout.data import PromptRow, load_data, render_prompt
from rollout.data.cli import histogram, main
from trainer.config import DataConfig


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    from glm5_model.tokenizer.build import TINY_DIR

    return AutoTokenizer.from_pretrained(str(TINY_DIR))


def test_plain_messages_render_as_before(tok):
    row = PromptRow(0, [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Say hello."}])
    assert render_prompt(tok, row, tokenize=False) == \
        "[gMASK]<sop><|system|>\nAnswer briefly.<|user|>\nSay hello.<|assistant|>\n"
    assert render_prompt(tok, row) == tok.encode(render_prompt(tok, row, tokenize=False))


TOOL_ROW = {
    "messages": [
        {"role": "system", "content": "Use tools."},
        {"role": "user", "content": "Weather in Paris, in celsius?"},
        # OpenAI-style call with arguments as a JSON string: normalised to a mapping for the template.
        {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "get_weather",
                                              "arguments": json.dumps({"city": "Paris", "days": 2})}}]},
        {"role": "tool", "content": "{\"temp\": 21}"},
        {"role": "tool", "content": "sunny"},
    ],
    "tools": [{"type": "function", "function": {"name": "get_weather", "description": "Forecast.",
                                                "parameters": {"type": "object", "properties": {
                                                    "city": {"type": "string"}}}}}],
}

EXPECTED_TOOL_PROMPT = (
    "[gMASK]<sop><|system|>\n"
    "# Tools\n"
    "get_weather(city: string): Forecast.\n"
    "<|system|>\nUse tools."
    "<|user|>\nWeather in Paris, in celsius?"
    "<|assistant|>\n<tool_call>get_weather<arg_key>city</arg_key><arg_value>Paris</arg_value>"
    "<arg_key>days</arg_key><arg_value>2</arg_value></tool_call>"
    "<|observation|>\n<tool_response>\n{\"temp\": 21}\n</tool_response>\n<tool_response>\nsunny\n</tool_response>"
    "<|assistant|>\n"
)


def test_tool_using_chat_matches_hand_written_prompt(tok, tmp_path):
    path = tmp_path / "tools.jsonl"
    path.write_text(json.dumps(TOOL_ROW) + "\n")
    (row,) = load_data(DataConfig(path=str(path)), tok).train
    assert render_prompt(tok, row, tokenize=False) == EXPECTED_TOOL_PROMPT
    ids = render_prompt(tok, row)
    assert tok.decode(ids) == EXPECTED_TOOL_PROMPT
    # the special tokens are single ids, as the engine's stop tokens and the reward parser expect
    for special in ("<tool_call>", "</tool_call>", "<arg_key>", "<|observation|>", "<tool_response>"):
        assert tok.convert_tokens_to_ids(special) in ids


def test_the_tiny_template_lists_each_tool_as_one_signature_line(tok):
    tools = [
        {"type": "function", "function": {"name": "lookup", "description": "Finds a thing.", "parameters": {
            "type": "object", "properties": {"key": {"type": "string", "description": "its name"},
                                             "limit": {"type": ["integer", "null"]}, "raw": {}}}}},
        {"type": "function", "function": {"name": "ping"}},  # no description, no parameters
        {"name": "bare", "parameters": {"type": "object", "properties": {"x": {"type": "number"}}}},  # not wrapped
    ]
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tools=tools, add_generation_prompt=True,
                                   tokenize=False)
    assert text == ("[gMASK]<sop><|system|>\n# Tools\n"
                    "lookup(key: string (its name), limit: integer|null, raw): Finds a thing.\n"
                    "ping()\n"
                    "bare(x: number)\n"
                    "<|user|>\nhi<|assistant|>\n")


def test_plain_string_prompt_and_system_prompt(tok, tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": "Say hello."}) + "\n")
    (row,) = load_data(DataConfig(path=str(path), messages_key="prompt", system_prompt="Answer briefly.")).train
    assert render_prompt(tok, row, tokenize=False) == \
        "[gMASK]<sop><|system|>\nAnswer briefly.<|user|>\nSay hello.<|assistant|>\n"


def test_histogram_uses_power_of_two_buckets():
    lines = histogram([3, 20, 20, 40], width=4)
    assert [line.split()[0] for line in lines] == ["2-3", "4-7", "8-15", "16-31", "32-63"]
    assert lines[3].split()[-1] == "2" and lines[1].split()[-1] == "0"


def test_inspect_cli_prints_counts_histogram_first_prompt_and_report(tmp_path, capsys):
    path = tmp_path / "tools.jsonl"
    bad = {"messages": [{"role": "user", "content": 3}]}
    path.write_text(json.dumps(TOOL_ROW) + "\n" + json.dumps(bad) + "\n")
    from glm5_model.tokenizer.build import TINY_DIR

    args = ["inspect", "--tokenizer", str(TINY_DIR), f"data.path={path}"]
    assert main(args + ["data.on_invalid=skip"]) == 0
    out = capsys.readouterr().out
    assert "rows: 2 read, 1 valid, 1 with problems" in out
    assert "with tools: 1" in out
    assert "prompt length in tokens" in out and "#" in out
    assert EXPECTED_TOOL_PROMPT in out
    assert f"{path} line 2: messages[0].content: expected a string, got int" in out

    assert main(args) == 1   # strict would stop the run: same report, failing status
    assert "FAILS (strict)" in capsys.readouterr().out
    assert main(["inspect", "data.path=/nonexistent.jsonl"]) == 2
    assert capsys.readouterr().err.startswith("config error: data.path:")
