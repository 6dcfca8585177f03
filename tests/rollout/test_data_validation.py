"""Validation before Ray starts: each kind of bad row is reported with its row and field; strict mode stops with the
whole list, skip mode drops exactly the bad rows and counts them; bad data config values name their field."""
from __future__ import annotations

import json
import logging

import pytest

from rollout.data import DataError, load_data
from trainer.config import ConfigError, DataConfig, parse_config

GOOD = {"messages": [{"role": "user", "content": "What is two plus two?"}], "label": "4"}
# (line written to the file, expected "line N: field: message" fragment). Line numbers are 1-based file lines.
# Rows carry a label (`L`) unless the label is the point, so each bad row has exactly one issue.
L = b', "label": "x"}'
USER_HI = b'{"role": "user", "content": "hi"}'
BAD_LINES = [
    (b'{"messages": "caf\xe9"' + L, "line {n}: (line): not valid UTF-8"),
    (b'{"messages": ', "line {n}: (line): not valid JSON"),
    (b'[1, 2]', "line {n}: (line): expected an object, got list"),
    (b'{"prompt": "wrong key"' + L, "line {n}: messages: missing"),
    (b'{"messages": null' + L, "line {n}: messages: missing (null)"),
    (b'{"messages": 7' + L, "line {n}: messages: expected a list of chat messages or a string, got int"),
    (b'{"messages": "   "' + L, "line {n}: messages: empty prompt"),
    (b'{"messages": []' + L, "line {n}: messages: empty prompt (no messages)"),
    (b'{"messages": [{"role": "system", "content": "sys"}, {"role": "user", "content": " "}]' + L,
     "line {n}: messages: empty prompt (no user/assistant/tool message has content)"),
    (b'{"messages": [{"role": "robot", "content": "hi"}]' + L, "line {n}: messages[0].role: expected one of"),
    (b'{"messages": [{"content": "hi"}]' + L, "line {n}: messages[0].role: expected one of"),
    (b'{"messages": [{"role": "user", "content": 5}]' + L,
     "line {n}: messages[0].content: expected a string, got int"),
    (b'{"messages": [{"role": "user"}]' + L, "line {n}: messages[0].content: missing"),
    (b'{"messages": [{"role": "user", "content": "bad \\ud800 surrogate"}]' + L,
     "line {n}: messages[0].content: not valid UTF-8"),
    (b'{"messages": "hi", "tools": {"name": "x"}' + L,
     "line {n}: tools: expected a list of tool schemas, got dict"),
    (b'{"messages": "hi", "tools": [{"description": "no name"}]' + L, "line {n}: tools[0]: expected a tool schema"),
    (b'{"messages": "hi", "tools": "[not json"' + L, "line {n}: tools: not valid JSON"),
    (b'{"messages": [' + USER_HI + b', {"role": "assistant", "content": null, "tool_calls": '
     b'[{"function": {"name": "add", "arguments": "{oops"}}]}]' + L,
     "line {n}: messages[1].tool_calls[0].function.arguments: not valid JSON"),
    (b'{"messages": [{"role": "user", "content": "hi", "tool_calls": [{"name": "add"}]}]' + L,
     "line {n}: messages[0].tool_calls: only assistant messages may call tools"),
    (b'{"messages": "hi", "task": 3' + L, "line {n}: task: expected a string, got int"),
    (b'{"messages": "hi"}', "line {n}: label: missing"),                 # require_label=True below
    (b'{"messages": "hi", "label": null}', "line {n}: label: missing (null)"),
]


def write_mixed(tmp_path):
    """GOOD rows interleaved with every bad kind, plus a blank line (ignored, but it counts for line numbers)."""
    lines, expected = [json.dumps(GOOD).encode(), b""], []
    for raw, message in BAD_LINES:
        lines.append(raw)
        expected.append(message.format(n=len(lines)))
        lines.append(json.dumps(GOOD).encode())
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path, expected


def test_strict_mode_stops_with_every_row_and_field(tmp_path):
    path, expected = write_mixed(tmp_path)
    with pytest.raises(DataError) as info:
        load_data(DataConfig(path=str(path), require_label=True, on_invalid="strict"))
    text = str(info.value)
    assert f"{len(BAD_LINES)} problem(s)" in text
    report_lines = [line.strip() for line in text.splitlines()]
    for message in expected:
        assert any(line.startswith(f"{path} {message}") for line in report_lines), (message, text)


def test_skip_mode_drops_and_counts_exactly_the_bad_rows(tmp_path, caplog):
    path, _ = write_mixed(tmp_path)
    with caplog.at_level(logging.WARNING, logger="slipstream.data"):
        data = load_data(DataConfig(path=str(path), require_label=True, on_invalid="skip"))
    (report,) = data.reports
    n_good = len(BAD_LINES) + 1
    assert report.total == n_good + len(BAD_LINES)
    assert report.skipped == len(BAD_LINES) and report.issue_count == len(BAD_LINES)
    assert report.kept == len(data.train) == n_good
    assert all(r.label == "4" for r in data.train)
    skipped_logs = [r for r in caplog.records if "skipping bad row" in r.getMessage()]
    assert len(skipped_logs) == 5   # the first few, then the count
    assert any(f"skipped {len(BAD_LINES)} of {report.total} rows" in r.getMessage() for r in caplog.records)


def test_parquet_non_utf8_names_row_and_field(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"question": pa.array([b"fine", b"caf\xe9", b"ok"], pa.binary())})
    pq.write_table(table, tmp_path / "b.parquet")
    data = load_data(DataConfig(path=str(tmp_path / "b.parquet"), messages_key="question", on_invalid="skip"))
    (issue,) = data.reports[0].issues
    assert str(issue) == f"{tmp_path / 'b.parquet'} row 1: question: not valid UTF-8 (byte 3)"
    assert [r.messages[0]["content"] for r in data.train] == ["fine", "ok"]


def tiny_tokenizer():
    from transformers import AutoTokenizer

    from glm5_model.tokenizer.build import TINY_DIR

    return AutoTokenizer.from_pretrained(str(TINY_DIR))


def test_prompt_longer_than_limit_is_reported_in_tokens(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"messages": "short"}) + "\n" + json.dumps({"messages": "word " * 200}) + "\n")
    tok = tiny_tokenizer()
    with pytest.raises(DataError, match=rf"{path} line 2: messages: prompt is \d+ tokens, longer than "
                                        r"data.max_prompt_tokens=50"):
        load_data(DataConfig(path=str(path), max_prompt_tokens=50), tok)
    data = load_data(DataConfig(path=str(path), max_prompt_tokens=50, on_invalid="skip"), tok)
    assert len(data.train) == 1 and data.reports[0].skipped == 1 and data.reports[0].token_checked == 2
    assert data.reports[0].prompt_lengths == [len(tok.apply_chat_template(
        [{"role": "user", "content": "short"}], add_generation_prompt=True, tokenize=True, return_dict=False))]


def test_validate_rows_measures_a_fixed_sample(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps({"messages": "x " * i + "end"}) + "\n" for i in range(40)))
    cfg = DataConfig(path=str(path), validate_rows=7, shuffle_seed=1)
    a, b = load_data(cfg, tiny_tokenizer()), load_data(cfg, tiny_tokenizer())
    assert a.reports[0].token_checked == 7 and len(a.train) == 40   # structure is still checked on every row
    assert a.reports[0].prompt_lengths == b.reports[0].prompt_lengths


def test_template_without_tools_support_is_refused(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"messages": "hi", "tools": [{"name": "add"}]}) + "\n")
    tok = tiny_tokenizer()
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    with pytest.raises(DataError, match="chat template does not render"):
        load_data(DataConfig(path=str(path)), tok)


def compose(overrides):
    from tests.trainer.test_config import compose_config

    return parse_config(compose_config(["+experiment=smoke", *overrides]))


@pytest.mark.parametrize("override, field", [
    ("data.format=parquet_v9", "data.format"),
    ("data.on_invalid=ignore", "data.on_invalid"),
    ("data.validate_rows=0", "data.validate_rows"),
    ("data.validate_rows=some", "data.validate_rows"),
    ("data.epochs=0", "data.epochs"),
    ("data.max_prompt_tokens=0", "data.max_prompt_tokens"),
    ("data.eval_fraction=1.0", "data.eval_fraction"),
    ("data.eval_split=test", "data.eval_split"),
    ("data.eval_path=/nonexistent/eval.jsonl", "data.eval_path"),
    ("data.path=README.md", "data.format"),
])
def test_bad_data_config_names_the_field(override, field):
    with pytest.raises(ConfigError) as info:
        compose([override])
    assert str(info.value).startswith(field + ":"), str(info.value)


def test_eval_fraction_and_eval_path_together_are_rejected(tmp_path):
    with pytest.raises(ConfigError, match=r"^data.eval_fraction: set either"):
        compose(["data.eval_fraction=0.1", "data.eval_path=data/quickstart_prompts.jsonl"])
    cfg = compose(["data.validate_rows=5", "data.format=jsonl"])
    assert cfg.data.validate_rows == 5


def test_trainer_cli_stops_on_bad_data_before_ray(tmp_path):
    import subprocess
    import sys

    from trainer.config import REPO_ROOT

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": "ok"}\n{"messages": 5}\n')
    proc = subprocess.run(
        [sys.executable, "-m", "trainer.main", "+experiment=smoke", f"data.path={bad}",
         "logging.wandb_mode=disabled", f"hydra.run.dir={tmp_path / 'hydra'}",
         f"model.checkpoint_dir={tmp_path / 'ckpt'}"],  # a fresh checkpoint, as on a fresh clone
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "data error: 1 problem(s)" in proc.stderr, proc.stderr[-2000:]
    assert f"{bad} line 2: messages: expected a list of chat messages or a string, got int" in proc.stderr
    assert "Started a local Ray instance" not in proc.stderr + proc.stdout
