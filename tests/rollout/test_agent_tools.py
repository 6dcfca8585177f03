"""The GLM tool-call parser: well-formed calls by the tools' schemas, each malformed kind classified with a
message for the model, never an exception."""
from __future__ import annotations

import pytest

from rewards.envs import MalformedKind, function_tool
from rollout.agent.glm_tools import decode_value, parse_glm_turn

TOOLS = [
    function_tool("search", "Search.", {"query": {"type": "string"}, "limit": {"type": "integer", "minimum": 1},
                                        "tags": {"type": "array", "items": {"type": "string"}},
                                        "exact": {"type": "boolean"}}, required=["query"]),
    function_tool("note", "Take a note.", {"text": {"type": ["string", "null"]}, "n": {"type": ["string", "number"]}},
                  required=["text"]),
]


def one(text: str):
    turn = parse_glm_turn(text, TOOLS)
    assert len(turn.tool_calls) + len(turn.malformed) == 1
    return turn.tool_calls[0] if turn.tool_calls else turn.malformed[0]


def test_well_formed_calls_with_typed_values():
    turn = parse_glm_turn(
        "Looking it up.<tool_call>search<arg_key>query</arg_key><arg_value>a \"quoted\" {x}</arg_value>"
        "<arg_key>limit</arg_key><arg_value>3</arg_value><arg_key>tags</arg_key><arg_value>[\"a\", \"b\"]"
        "</arg_value><arg_key>exact</arg_key><arg_value>true</arg_value></tool_call>"
        "<tool_call>note<arg_key>text</arg_key><arg_value>null</arg_value></tool_call>", TOOLS, id_prefix="t1_")
    assert turn.content == "Looking it up." and turn.malformed == ()
    first, second = turn.tool_calls
    assert (first.id, first.name, first.index) == ("t1_0", "search", 0)
    assert first.arguments == {"query": 'a "quoted" {x}', "limit": 3, "tags": ["a", "b"], "exact": True}
    assert second.arguments == {"text": None} and second.index == 1
    assert first.to_openai()["function"]["arguments"] == (
        '{"query": "a \\"quoted\\" {x}", "limit": 3, "tags": ["a", "b"], "exact": true}')


def test_glm45_whitespace_and_reasoning():
    turn = parse_glm_turn("<think>I should search.</think>\n<tool_call>search\n<arg_key>query</arg_key>\n"
                          "<arg_value>cats</arg_value>\n</tool_call>", TOOLS)
    assert turn.reasoning == "I should search." and turn.content == "\n"
    assert turn.tool_calls[0].arguments == {"query": "cats"}


def test_string_values_are_raw_even_when_they_look_like_json():
    assert one("<tool_call>search<arg_key>query</arg_key><arg_value>42</arg_value></tool_call>").arguments == {
        "query": "42"}
    assert one("<tool_call>search<arg_key>query</arg_key><arg_value> padded </arg_value></tool_call>").arguments == {
        "query": " padded "}


def test_union_types_take_the_json_value_only_when_it_is_an_allowed_non_string():
    assert decode_value("7", {"type": ["string", "number"]}) == 7
    assert decode_value("[1]", {"type": ["string", "number"]}) == "[1]"
    assert decode_value("hello", {"type": ["string", "number"]}) == "hello"
    assert decode_value("{\"a\": 1}", None) == {"a": 1} and decode_value("plain", None) == "plain"
    with pytest.raises(ValueError):
        decode_value("three", {"type": "integer"})


@pytest.mark.parametrize("text, kind, says", [
    ("<tool_call>search<arg_key>query</arg_key><arg_value>x", MalformedKind.BAD_FORMAT, "not closed"),
    ("<tool_call><arg_key>query</arg_key><arg_value>x</arg_value></tool_call>", MalformedKind.BAD_FORMAT,
     "no tool name"),
    ('<tool_call>{"name": "search", "arguments": {"query": "x"}}</tool_call>', MalformedKind.BAD_FORMAT,
     "is not a tool name"),
    ("<tool_call>search<arg_key>query</arg_key>x</tool_call>", MalformedKind.BAD_FORMAT, "pairs"),
    ("<tool_call>search<arg_key>query</arg_key><arg_value>x</arg_value>junk</tool_call>", MalformedKind.BAD_FORMAT,
     "pairs"),
    ("<tool_call>search<arg_key>query</arg_key><arg_value>x</arg_value><arg_key>limit</arg_key>"
     "<arg_value>three</arg_value></tool_call>", MalformedKind.BAD_JSON, "'limit' is not valid JSON"),
    ("<tool_call>search<arg_key>query</arg_key><arg_value>x</arg_value><arg_key>tags</arg_key>"
     "<arg_value>[\"a\",</arg_value></tool_call>", MalformedKind.BAD_JSON, "'tags' is not valid JSON"),
    ("<tool_call>browse<arg_key>url</arg_key><arg_value>x</arg_value></tool_call>", MalformedKind.UNKNOWN_TOOL,
     "the tools are: note, search"),
    ("<tool_call>search<arg_key>limit</arg_key><arg_value>3</arg_value></tool_call>",
     MalformedKind.INVALID_ARGUMENTS, "'query' is a required property"),
    ("<tool_call>search<arg_key>query</arg_key><arg_value>x</arg_value><arg_key>limit</arg_key>"
     "<arg_value>0</arg_value></tool_call>", MalformedKind.INVALID_ARGUMENTS, "'limit'"),
    ("<tool_call>search<arg_key>query</arg_key><arg_value>x</arg_value><arg_key>limit</arg_key>"
     "<arg_value>\"3\"</arg_value></tool_call>", MalformedKind.INVALID_ARGUMENTS, "is not of type 'integer'"),
    ("<tool_call>search<arg_key>query</arg_key><arg_value>x</arg_value><arg_key>color</arg_key>"
     "<arg_value>red</arg_value></tool_call>", MalformedKind.INVALID_ARGUMENTS, "'color' was unexpected"),
    ("<tool_call>search<arg_key>query</arg_key><arg_value>x</arg_value><arg_key>query</arg_key>"
     "<arg_value>y</arg_value></tool_call>", MalformedKind.INVALID_ARGUMENTS, "given twice"),
])
def test_malformed_calls_are_classified(text, kind, says):
    bad = one(text)
    assert bad.kind is kind and says in bad.error, bad.error
    assert bad.raw in text and bad.id == "call_0"


def test_a_turn_mixes_good_and_bad_calls_and_keeps_their_order():
    turn = parse_glm_turn("<tool_call>nope</tool_call><tool_call>search<arg_key>query</arg_key><arg_value>x"
                          "</arg_value></tool_call><tool_call>search", TOOLS)
    assert [c.index for c in turn.tool_calls] == [1]
    assert [(m.index, m.kind) for m in turn.malformed] == [(0, MalformedKind.UNKNOWN_TOOL),
                                                           (2, MalformedKind.BAD_FORMAT)]
    assert turn.call_count == 3


def test_text_without_calls_and_garbage_never_raise():
    assert parse_glm_turn("Just an answer.", TOOLS).to_message() == {"role": "assistant", "content": "Just an answer."}
    for junk in ["</tool_call>", "<arg_key>", "<tool_call></tool_call>", "<think>unclosed", "\x00\ufffd"]:
        parse_glm_turn(junk, TOOLS)
    assert parse_glm_turn("<tool_call>search</tool_call>", []).malformed[0].kind is MalformedKind.UNKNOWN_TOOL
