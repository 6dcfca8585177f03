"""Agent episodes at the token level with the tiny GLM tokenizer: the sequence built turn by turn equals the chat
template's rendering of the whole conversation token by token, the loss mask covers exactly the model's tokens,
and the limits and failures end episodes cleanly."""
from __future__ import annotations

import asyncio

import pytest
from transformers import AutoTokenizer

from glm5_model.tokenizer.build import TINY_DIR
from rewards.envs import EndReason, EnvRunner, EnvSettings, Task, function_tool, load_env
from rewards.envs.builtin.calculator import basket_total
from rollout.agent import AgentEpisode, ChatRenderer, ModelTurn, TemplateError, run_episode

M = "tests.rewards.envs_misbehaving"


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(str(TINY_DIR))


def ids_of(tok, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False)


def special(tok, token: str) -> int:
    return tok.convert_tokens_to_ids(token)


def assistant_text(tok, tools, message) -> str:
    """The text the template renders for one assistant message: what a model that follows it generates."""
    renderer = ChatRenderer(tok, tools)
    history = [{"role": "user", "content": "q"}]
    before = renderer.text(history, add_generation_prompt=True)
    return renderer.text(history + [message], add_generation_prompt=False)[len(before):]


def calls_message(content: str, *calls: tuple[str, dict]) -> dict:
    return {"role": "assistant", "content": content,
            "tool_calls": [{"type": "function", "function": {"name": n, "arguments": a}} for n, a in calls]}


def model_turn(tok, tools, message, stop: str = "<|observation|>", version: int = 0) -> ModelTurn:
    ids = ids_of(tok, assistant_text(tok, tools, message)) + ([special(tok, stop)] if stop else [])
    return ModelTurn(ids, [-0.5] * len(ids), version)


def drive(runner: EnvRunner, task: Task, tok, turns: list[ModelTurn]):
    async def go():
        episode = await AgentEpisode.start(runner, task, tok)
        for turn in turns:
            if episode.done:
                break
            await episode.add_model_turn(turn.ids, turn.logprobs, turn.versions, turn.finished)
        return await episode.finish()

    return asyncio.run(go())


def calculator_script(tok, task):
    items = list(task.data["basket"])
    total = basket_total(task.data)
    first = calls_message("I need the prices.", *[("lookup_price", {"item": i}) for i in items])
    expression = " + ".join(f"{q} * {task.data['prices'][i]}" for i, q in task.data["basket"].items())
    second = calls_message("", ("calculate", {"expression": f"({expression}) * {100 - task.data['discount_percent']}"
                                                             " / 100"}))
    final = {"role": "assistant", "content": f"The total is {total}. Answer: {total}"}
    return [model_turn(tok, task.tools, first, version=3), model_turn(tok, task.tools, second, version=4),
            model_turn(tok, task.tools, final, stop="<|endoftext|>", version=4)]


def test_calculator_episode_matches_the_template_token_by_token(tok):
    task = load_env("calculator").generate_tasks("train", 1, seed=5)[0]
    turns = calculator_script(tok, task)
    result = drive(EnvRunner("calculator"), task, tok, turns)
    episode, seq = result.episode, result.sequence
    assert episode.end_reason is EndReason.DONE and result.reward == 1.0
    roles = [m["role"] for m in episode.messages]
    n_items = len(task.data["basket"])
    assert roles == ["user", "assistant"] + ["tool"] * n_items + ["assistant", "tool", "assistant"]

    whole = ChatRenderer(tok, task.tools).text(episode.messages, add_generation_prompt=False)
    expected = ids_of(tok, whole) + [special(tok, "<|endoftext|>")]  # the model's final stop is its own token
    assert seq.tokens == expected
    assert seq.prompt_ids == tok.apply_chat_template(task.prompt, tools=task.tools, add_generation_prompt=True,
                                                     tokenize=True, return_dict=False)
    # the loss mask is 1 exactly on the model's tokens, which sit in the sequence unchanged
    model_spans = [s for s in seq.spans if s.source == "model"]
    assert [seq.response_ids[s.start:s.end] for s in model_spans] == [t.ids for t in turns]
    assert seq.loss_mask == [int(any(s.start <= i < s.end for s in model_spans)) for i in range(len(seq.loss_mask))]
    assert sum(seq.loss_mask) == sum(len(t.ids) for t in turns)
    # each observation span is the template's tool block, with the next assistant header and no repeated stop
    env_spans = [s for s in seq.spans if s.source == "env"]
    first_obs = tok.decode(seq.response_ids[env_spans[0].start:env_spans[0].end], skip_special_tokens=False)
    assert first_obs.startswith("\n<tool_response>\n") and first_obs.endswith("</tool_response><|assistant|>\n")
    assert first_obs.count("<tool_response>") == n_items
    assert [s.turn for s in seq.spans] == [0, 0, 1, 1, 2]
    assert len(seq.response_logprobs) == len(seq.response_versions) == len(seq.response_ids)
    assert seq.response_logprobs[env_spans[0].start] == 0.0 and seq.response_logprobs[0] == -0.5
    assert seq.response_versions[env_spans[0].start] == 3 and seq.response_versions[-1] == 4
    assert episode.stats.model_tokens == sum(len(t.ids) for t in turns)
    assert episode.tokens == len(seq.response_ids)


def test_typed_arguments_and_several_rounds_match_the_template(tok):
    tools = [function_tool("add", "Adds to the counter.", {"n": {"type": "integer"}}),
             function_tool("fail", "Fails.", {})]
    task = Task("counter", [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Reach 5."}],
                tools, {"target": 5})
    script = [calls_message("", ("add", {"n": 2}), ("add", {"n": 1})), calls_message("Again.", ("add", {"n": 2})),
              calls_message("", ("fail", {})), {"role": "assistant", "content": "Done."}]
    turns = [model_turn(tok, tools, m, stop="<|observation|>" if "tool_calls" in m else "<|user|>") for m in script]
    result = drive(EnvRunner(f"{M}:Counter"), task, tok, turns)
    assert result.reward == 1.0
    whole = ChatRenderer(tok, tools).text(result.episode.messages, add_generation_prompt=False)
    assert result.sequence.tokens == ids_of(tok, whole) + [special(tok, "<|user|>")]
    assert result.episode.stats.failed_calls == 1 and "Error: this tool always fails" in whole


def test_a_turn_resumed_after_an_abort_gives_the_same_sequence_and_masks(tok):
    """An aborted turn is generated on from its partial tokens and handed over whole, the tokens before the
    abort carrying the old policy version: the episode's structure and masks are those of an uninterrupted one."""
    task = load_env("calculator").generate_tasks("train", 1, seed=5)[0]
    straight = calculator_script(tok, task)
    first = straight[0]
    cut = len(first.ids) // 2
    resumed = [ModelTurn(first.ids, first.logprobs, [3] * cut + [4] * (len(first.ids) - cut))] + straight[1:]
    a = drive(EnvRunner("calculator"), task, tok, straight)
    b = drive(EnvRunner("calculator"), task, tok, resumed)
    assert b.sequence.tokens == a.sequence.tokens and b.sequence.loss_mask == a.sequence.loss_mask
    assert b.sequence.spans == a.sequence.spans and b.episode.messages == a.episode.messages
    assert b.sequence.response_versions[:len(first.ids)] == resumed[0].versions
    assert b.reward == a.reward == 1.0


def test_a_model_turn_without_its_stop_token_gets_the_header_from_the_template(tok):
    """An engine that strips the stop token: the observation block brings its own <|observation|> (masked 0)."""
    task = load_env("calculator").generate_tasks("train", 1, seed=5)[0]
    turns = [ModelTurn(t.ids[:-1], t.logprobs[:-1], 0) if i < 2 else t
             for i, t in enumerate(calculator_script(tok, task))]
    result = drive(EnvRunner("calculator"), task, tok, turns)
    whole = ChatRenderer(tok, task.tools).text(result.episode.messages, add_generation_prompt=False)
    assert result.sequence.tokens == ids_of(tok, whole) + [special(tok, "<|endoftext|>")]
    env_start = next(s.start for s in result.sequence.spans if s.source == "env")
    assert result.sequence.response_ids[env_start] == special(tok, "<|observation|>")
    assert result.sequence.loss_mask[env_start] == 0


def test_malformed_calls_are_answered_in_the_sequence(tok):
    task = load_env("calculator").generate_tasks("train", 1, seed=5)[0]
    bad = ids_of(tok, "<tool_call>lookup_price<arg_key>name</arg_key><arg_value>pen</arg_value></tool_call>"
                      "<tool_call>teleport</tool_call>") + [special(tok, "<|observation|>")]
    result = drive(EnvRunner("calculator", settings=EnvSettings(max_turns=1)), task, tok, [ModelTurn(bad)])
    assert result.episode.end_reason is EndReason.MAX_TURNS
    assert result.episode.stats.malformed == {"invalid_arguments": 1, "unknown_tool": 1}

    async def one_turn():
        episode = await AgentEpisode.start(EnvRunner("calculator"), task, tok)
        turn = await episode.add_model_turn(bad)
        return episode, turn

    episode, turn = asyncio.run(one_turn())
    assert [m["tool_call_id"] for m in turn.observations] == ["call_0_0", "call_0_1"]
    obs = episode.sequence.spans[-1]
    text = tok.decode(episode.sequence.response_ids[obs.start:obs.end], skip_special_tokens=False)
    assert "'name' was unexpected" in text or "'item' is a required property" in text
    assert "there is no tool 'teleport'" in text and text.endswith("<|assistant|>\n")


def test_a_truncated_turn_ends_the_episode_on_the_budget(tok):
    task = load_env("calculator").generate_tasks("train", 1, seed=5)[0]

    async def go():
        episode = await AgentEpisode.start(EnvRunner("calculator", settings=EnvSettings(max_tokens=8)), task, tok)
        with pytest.raises(ValueError, match="only 8 were left"):
            await episode.add_model_turn(list(range(100, 109)))
        result = await episode.add_model_turn(list(range(100, 108)), finished=False)
        return result, await episode.finish()

    result, final = asyncio.run(go())
    assert result.done and final.episode.end_reason is EndReason.TOKEN_BUDGET
    assert final.sequence.loss_mask == [1] * 8 and final.episode.turn_rewards == [0.0] and final.reward == 0.0


def test_run_episode_with_a_generate_coroutine(tok):
    task = load_env("calculator").generate_tasks("train", 1, seed=5)[0]
    script = iter(calculator_script(tok, task))
    budgets = []

    async def generate(token_ids, max_new_tokens):
        budgets.append(max_new_tokens)
        return next(script)

    result = asyncio.run(run_episode(EnvRunner("calculator", settings=EnvSettings(max_tokens=2000)), task, tok,
                                     generate))
    assert result.reward == 1.0 and len(budgets) == 3 and budgets[0] == 2000 and budgets[1] < budgets[0]


def test_a_failing_generation_aborts_the_episode_and_closes_the_environment(tok):
    runner = EnvRunner(f"{M}:Counter")
    task = Task("c", [{"role": "user", "content": "go"}], [function_tool("add", "", {"n": {"type": "integer"}})],
                {"target": 1})

    async def generate(token_ids, max_new_tokens):
        raise ConnectionError("engine gone")

    with pytest.raises(ConnectionError):
        asyncio.run(run_episode(runner, task, tok, generate))
    assert runner.stats["end/aborted"] == 1


def test_a_reset_failure_gives_a_done_episode_with_no_prompt(tok):
    async def go():
        return await AgentEpisode.start(EnvRunner(f"{M}:RaisesInReset"), Task("t", [{"role": "user", "content": "x"}]),
                                        tok)

    episode = asyncio.run(go())
    assert episode.done and episode.sequence.prompt_ids == []


def test_a_template_that_rewrites_earlier_turns_is_refused(tok):
    tok = AutoTokenizer.from_pretrained(str(TINY_DIR))
    # renders only the last assistant message's content: earlier turns change once more messages follow
    tok.chat_template = ("{% for m in messages %}{{ '<|' + m['role'] + '|>\\n' }}"
                         "{% if m['role'] != 'assistant' or loop.last %}{{ m['content'] }}{% endif %}{% endfor %}"
                         "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}")
    renderer = ChatRenderer(tok)
    history = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    with pytest.raises(TemplateError, match="renders turn 2 differently"):
        renderer.observation_ids(history, [{"role": "user", "content": "more"}], [])


@pytest.mark.skipif(not __import__("os").environ.get("SLIPSTREAM_VERIFIERS_PYTHON"),
                    reason="set SLIPSTREAM_VERIFIERS_PYTHON to an interpreter with verifiers==0.4.0")
def test_a_verifiers_episode_matches_the_template_token_by_token(tok):
    """The verifiers adapter's tools and messages go through the same rendering: token by token again."""
    import os
    from pathlib import Path

    from rewards.envs.verifiers_env import close_workers, taskset_tasks

    runner = EnvRunner("verifiers", {"taskset": "vf_tiny_taskset", "python": os.environ["SLIPSTREAM_VERIFIERS_PYTHON"],
                                     "sys_path": [str(Path(__file__).parent.parent / "rewards")]},
                       EnvSettings(step_timeout_s=120))

    async def go():
        episode = await AgentEpisode.start(runner, taskset_tasks(1)[0], tok)
        tools = episode.session.tools
        for message, stop in [(calls_message("Adding.", ("add", {"a": 2, "b": 3})), "<|observation|>"),
                              ({"role": "assistant", "content": "The sum is 5"}, "<|endoftext|>")]:
            turn = model_turn(tok, tools, message, stop=stop)
            await episode.add_model_turn(turn.ids, turn.logprobs)
        result = await episode.finish()
        await close_workers()
        return result, tools

    result, tools = asyncio.run(go())
    assert result.reward == 1.0 and [t["function"]["name"] for t in tools] == ["add"]
    whole = ChatRenderer(tok, tools).text(result.episode.messages, add_generation_prompt=False)
    assert result.sequence.tokens == ids_of(tok, whole) + [special(tok, "<|endoftext|>")]
    assert "<|system|>\nYou are a careful assistant." in whole
