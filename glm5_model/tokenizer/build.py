"""Builds the tiny GLM-style tokenizer shipped in glm5_model/tokenizer/tiny (no hub downloads on our machines).

Byte-level BPE trained on a small corpus written here, plus GLM-5's special tokens and a chat template of the same
shape as GLM's ([gMASK]<sop>, <|role|> headers). Run `python -m glm5_model.tokenizer.build` to regenerate; the
output is deterministic and committed.
"""
from __future__ import annotations

import json
from pathlib import Path

TINY_DIR = Path(__file__).parent / "tiny"
VOCAB_SIZE = 512

SPECIAL_TOKENS = [
    "<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>",
    "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>",
    "<think>", "</think>", "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>",
    "<arg_key>", "</arg_key>", "<arg_value>", "</arg_value>",
]
# Generation stops at any of these, as GLM's generation_config does.
STOP_TOKENS = ["<|endoftext|>", "<|user|>", "<|observation|>"]

# GLM-4.5/GLM-5 shape: tools are listed in a system block of their own, assistant tool calls are
# <tool_call>name<arg_key>k</arg_key><arg_value>v</arg_value></tool_call> (string values raw, others as JSON), and
# consecutive tool results share one <|observation|> header, each wrapped in <tool_response>. Plain role/content
# messages render exactly as before (the prompt cache and tests depend on that).
# One difference from GLM's template, for this 512-token vocabulary: each tool is one signature line,
# `name(arg: type, ...): description`, where GLM writes its JSON schema inside a paragraph of instructions. With
# GLM's text a one-tool prompt was ~460 tokens here, 246 of them the instructions, so the tiny models trained on
# 2 CPU cores could not afford agent tasks (docs/agents.md); the calls' format is what the model must follow, and
# that is GLM's.
CHAT_TEMPLATE = (
    "[gMASK]<sop>"
    "{% if tools %}"
    "{{ '<|system|>\\n# Tools\\n' }}"
    "{% for tool in tools %}"
    "{% set fn = tool['function'] if tool['function'] is defined else tool %}"
    "{% set params = fn['parameters']['properties'] if fn['parameters'] is defined and "
    "fn['parameters']['properties'] is defined else {} %}"
    "{{ fn['name'] + '(' }}"
    "{% for key, spec in params.items() %}{{ ', ' if not loop.first else '' }}{{ key }}"
    "{% if spec['type'] is defined %}"
    "{{ ': ' + (spec['type'] if spec['type'] is string else spec['type'] | join('|')) }}{% endif %}"
    "{% if spec['description'] is defined %}{{ ' (' + spec['description'] + ')' }}{% endif %}{% endfor %}"
    "{{ ')' }}{% if fn['description'] is defined and fn['description'] %}{{ ': ' + fn['description'] }}{% endif %}"
    "{{ '\\n' }}"
    "{% endfor %}"
    "{% endif %}"
    "{% for message in messages %}"
    "{% set content = message['content'] if message['content'] is string else '' %}"
    "{% if message['role'] == 'tool' %}"
    "{% if loop.first or messages[loop.index0 - 1]['role'] != 'tool' %}{{ '<|observation|>' }}{% endif %}"
    "{{ '\\n<tool_response>\\n' + content + '\\n</tool_response>' }}"
    "{% else %}"
    "{{ '<|' + message['role'] + '|>\\n' + content }}"
    "{% if message['role'] == 'assistant' and message['tool_calls'] is defined and message['tool_calls'] %}"
    "{% for call in message['tool_calls'] %}"
    "{% set fn = call['function'] if call['function'] is defined else call %}"
    "{{ '<tool_call>' + fn['name'] }}"
    "{% if fn['arguments'] is mapping %}{% for key, value in fn['arguments'].items() %}"
    "{{ '<arg_key>' + key + '</arg_key><arg_value>' }}"
    "{{ value if value is string else value | tojson(ensure_ascii=False) }}{{ '</arg_value>' }}"
    "{% endfor %}{% endif %}"
    "{{ '</tool_call>' }}"
    "{% endfor %}"
    "{% endif %}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)

_CORPUS = """
The quick brown fox jumps over the lazy dog. A tiny model learns to answer short questions.
What is two plus two? Two plus two is four. What is the capital of France? The capital of France is Paris.
Write a function that adds two numbers. def add(a, b): return a + b
Reinforcement learning from verifiable rewards trains a policy with samples, rewards and advantages.
The experts of a mixture route each token to the best few; a shared expert sees every token.
Please answer with one word. I do not know the answer. Let me think step by step about this problem.
0 1 2 3 4 5 6 7 8 9 10 100 1000 + - * / = ( ) [ ] { } < > : ; , . ! ? ' " # _
"""


def build(out_dir: Path = TINY_DIR) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    if tokenizer.get_vocab_size() != VOCAB_SIZE:
        raise RuntimeError(f"tokenizer vocab is {tokenizer.get_vocab_size()}, expected {VOCAB_SIZE}")

    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out_dir / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": 4096,
        "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    special_map = {"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2) + "\n")


def stop_token_ids(tokenizer) -> list[int]:
    return [tokenizer.convert_tokens_to_ids(t) for t in STOP_TOKENS]


if __name__ == "__main__":
    build()
    print(f"wrote {TINY_DIR}")
