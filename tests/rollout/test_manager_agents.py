"""Agent episodes through the rollout manager (scripted engines, the real `calculator` environment): each
sample is one token sequence whose mask is 1 exactly on what the model generated, environment observations
come between turns, the outcome is the environment's verdict, episode metrics reach the batch, and an episode
aborted mid-turn (APRIL) and resumed ends with the same tokens and masks as an uninterrupted one."""
from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from glm5_model.tokenizer.build import TINY_DIR
from rewards import RewardSpec, RunnerSettings
from rollout.config import AgentConfig, LoopConfig, RolloutConfig, validate_rollout_config
from rollout.data.config import DataConfig, validate_data_config
from rollout.data.loader import load_data
from rollout.manager import EngineSpec, RolloutManager

from .scripted_agent import respond
from .scripted_engine import ScriptedEngineActor


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(str(TINY_DIR))


def _run(ray, checkpoint, tok, steps: int, tick_s: float, **overrides):
    data = validate_data_config(DataConfig(path="calculator", format="tasks", generated_tasks=12, shuffle=False))
    rows = load_data(data, tok).train
    r = RolloutConfig(prompts_per_step=2, samples_per_prompt=2, max_new_tokens=512,
                      agent=AgentConfig(max_turns=4, max_tokens=600), **overrides)
    loop = LoopConfig()
    validate_rollout_config(r, loop)
    handles = [ScriptedEngineActor.remote(seed=k, tick_s=tick_s, respond=respond) for k in range(2)]
    m = RolloutManager(r, loop, data, rows, EngineSpec(str(checkpoint), 2), [RewardSpec("char_fraction")],
                       RunnerSettings(), engine_handles=handles)
    m.start()
    batches = []
    try:
        for step in range(steps):
            batches.append(m.next_batch(step))
            m.pause_for_weights()
            ray.get([e.update_weights_from_tensors.remote([], step + 1) for e in handles])
            m.on_weights(step + 1)
    finally:
        m.shutdown()
    return batches


def _episodes(batches):
    return {s.label["task"]["id"] + f"#{s.index_in_group}": s for b in batches for g in b.groups for s in g}


def _model_turn_versions(s) -> list[list[int]]:
    turns, current = [], []
    for m, v in zip(s.response_mask, s.response_versions):
        if m:
            current.append(v)
        elif current:
            turns, current = turns + [current], []
    return turns + ([current] if current else [])


def test_calculator_episodes_through_the_manager(ray_session, tiny_checkpoint, tok):
    batches = _run(ray_session, tiny_checkpoint, tok, steps=2, tick_s=0.0005)
    observation, user = tok.convert_tokens_to_ids("<|observation|>"), tok.convert_tokens_to_ids("<|user|>")
    for s in _episodes(batches).values():
        assert s.multi_turn and s.finished and s.reward == 1.0, (s.key, s.reward, s.reward_components)
        assert s.reward_components["calculator/turns"] == 3.0
        mask = s.response_mask
        assert len(mask) == len(s.response_ids) == len(s.response_logprobs) == len(s.response_versions)
        # Model turns end with the stop token the template uses; every observation follows one, and the
        # observation tokens (mask 0) carry logprob 0.
        model = [t for t, m in zip(s.response_ids, mask) if m]
        assert model.count(observation) == 2 and model[-1] == user
        env = [i for i, m in enumerate(mask) if not m]
        assert env and all(s.response_logprobs[i] == 0.0 for i in env)
        text = tok.decode([t for t, m in zip(s.response_ids, mask) if not m], skip_special_tokens=False)
        assert text.count("<tool_response>") == len(s.label["task"]["data"]["basket"]) + 1
        # The mask is one run of 1s per turn: turn, observation, turn, observation, turn.
        runs = [m for i, m in enumerate(mask) if i == 0 or mask[i - 1] != m]
        assert runs == [1, 0, 1, 0, 1]
        assert len(s.metadata["token_turns"]) == len(s.response_ids)
        assert s.metadata["turn_rewards"] == [0.0, 0.0, 0.0]
    m = batches[-1].metrics
    assert m["agent/episodes"] == 4.0 and m["agent/turns/mean"] == 3.0 and m["agent/malformed_call_rate"] == 0.0
    assert m["agent/tool_call_success_rate"] == 1.0 and m["agent/calculator/reward"] == 1.0
    assert m["agent/end/done"] == 1.0 and m["agent/env_time_s/mean"] > 0


def test_an_episode_aborted_mid_turn_resumes_to_the_same_sequence(ray_session, tiny_checkpoint, tok):
    plain = _episodes(_run(ray_session, tiny_checkpoint, tok, steps=3, tick_s=0.0005))
    # APRIL: two extra groups per step, stragglers aborted when the batch is complete and resumed next step;
    # slow ticks so the aborts land mid-turn.
    batches = _run(ray_session, tiny_checkpoint, tok, steps=3, tick_s=0.004, partial_rollout=True,
                   over_sample_prompts=2)
    flow = batches[-1].metrics
    assert flow["rollout/flow/total_aborted_requests"] > 0 and flow["rollout/flow/total_resumed_requests"] > 0
    april = _episodes(batches)
    # An aborted turn resumes under the next weights: one run of model tokens with two versions in it.
    resumed = [k for k, s in april.items() if any(len(set(turn)) > 1 for turn in _model_turn_versions(s))]
    assert resumed, "no trained episode has a turn resumed across a weight update"
    common = set(plain) & set(april)
    assert common
    for key in common:
        a, b = plain[key], april[key]
        assert a.prompt_ids == b.prompt_ids and a.response_ids == b.response_ids, key
        assert a.response_mask == b.response_mask and a.reward == b.reward == 1.0, key


def test_evaluate_runs_heldout_episodes_whole(ray_session, tiny_checkpoint, tok):
    """Agent eval rows are whole episodes of their environment (not one generation scored by the run's reward);
    a budget too small for the scripted turns ends episodes on the token limit with reward 0."""
    from rollout.generation import SamplingSettings

    data = validate_data_config(DataConfig(path="calculator", format="tasks", generated_tasks=4,
                                           generated_eval_tasks=3, eval_split="heldout", shuffle=False))
    loaded = load_data(data, tok)
    assert all(r.label["task"]["split"] == "heldout" for r in loaded.eval)

    def evaluate(max_tokens: int) -> dict[str, float]:
        r = RolloutConfig(prompts_per_step=2, samples_per_prompt=2, max_new_tokens=512,
                          agent=AgentConfig(max_turns=4, max_tokens=max_tokens))
        handles = [ScriptedEngineActor.remote(seed=0, respond=respond)]
        m = RolloutManager(r, LoopConfig(), data, loaded.train, EngineSpec(str(tiny_checkpoint), 1),
                           [RewardSpec("char_fraction")], RunnerSettings(), engine_handles=handles)
        try:
            # eval.max_new_tokens (16 here) does not cut an episode's turns: its budget is the episode's.
            return m.evaluate(loaded.eval, SamplingSettings(16, 0.0, 1.0, m.sampling.stop_token_ids))
        finally:
            m.shutdown()

    full = evaluate(600)
    assert full["eval/prompts"] == 3.0 and full["eval/raw_reward"] == 1.0
    assert full["eval/agent/episodes"] == 3.0 and full["eval/agent/turns/mean"] == 3.0
    assert full["eval/agent/calculator/reward"] == 1.0 and full["eval/reward/calculator/score"] == 1.0
    short = evaluate(20)
    assert short["eval/raw_reward"] == 0.0 and short["eval/agent/end/token_budget"] == 1.0
