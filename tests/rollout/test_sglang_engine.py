"""SGLangEngine on the tiny GLM-5 checkpoint (CPU, fp32): logprobs against transformers (also at a temperature),
score(), weight updates, streaming submit/collect, abort, pause in place / retract across a weight update (per-token
versions), and the Ray actor. One in-process engine is shared by the module (each start costs ~20-30 s)."""
from __future__ import annotations

import asyncio
import shutil
import time

import pytest
import torch

import sglang  # noqa: F401  -- no importorskip: a missing sglang must fail, not skip

from glm5_model.hf_checkpoint import load_hf_state_dict
from rollout.engine import EngineStartError, RolloutEngineActor, SGLangEngine
from rollout.protocol import EngineRequest

STOP_IDS = [0, 7, 9]
LOGPROB_MEAN_TOL = 1e-4


def _prompts(n: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    # Tokens 10..499: clear of the tiny tokenizer's special/stop ids.
    return [torch.randint(10, 500, (int(torch.randint(6, 14, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def _requests(prompts, max_new_tokens=16, prefix="r", **params):
    sp = {"max_new_tokens": max_new_tokens, "temperature": 1.0, "top_p": 1.0, "stop_token_ids": STOP_IDS, **params}
    return [EngineRequest(f"{prefix}-{time.monotonic_ns()}-{i}", p, dict(sp)) for i, p in enumerate(prompts)]


def _hf_model(path):
    from transformers import GlmMoeDsaForCausalLM

    return GlmMoeDsaForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


def _write_checkpoint(src, dst, state_dict):
    """A copy of checkpoint `src` with `state_dict` as its weights; transformers' loader then maps the per-expert
    names on disk onto its fused expert tensors, exactly as for the original."""
    from safetensors.torch import save_file

    dst.mkdir()
    for f in src.iterdir():
        if f.suffix != ".safetensors" and f.name != "model.safetensors.index.json":
            shutil.copy(f, dst / f.name)
    save_file({k: v.contiguous() for k, v in state_dict.items()}, str(dst / "model.safetensors"),
              metadata={"format": "pt"})
    return dst


@torch.no_grad()
def _hf_logprobs(model, prompt: list[int], output: list[int], temperature: float = 1.0) -> list[float]:
    """transformers' logprob of each output token given the prompt and the output tokens before it."""
    ids = torch.tensor([prompt + output])
    logits = model(input_ids=ids).logits[0].float() / temperature
    logprobs = torch.log_softmax(logits, dim=-1)
    positions = torch.arange(len(prompt) - 1, len(prompt) + len(output) - 1)
    return logprobs[positions, torch.tensor(output)].tolist()


def _diffs(model, prompts, results, temperature: float = 1.0) -> torch.Tensor:
    diffs = []
    for prompt, res in zip(prompts, results):
        ref = _hf_logprobs(model, prompt, res.output_ids, temperature)
        diffs.extend(abs(a - b) for a, b in zip(ref, res.output_logprobs))
    return torch.tensor(diffs)


def test_engine_start_deadline(tiny_checkpoint, monkeypatch):
    """A start that overruns its deadline raises a clear error and leaves no processes behind (a failed start can
    otherwise hang forever), nor open ZMQ contexts (their finalizer would block the next start). Runs before the
    shared engine exists, so no process of that one can be hit."""
    import gc

    import psutil
    import zmq

    import rollout.sglang_process as sglang_process

    def open_contexts() -> set:
        return {o for o in gc.get_objects() if isinstance(o, zmq.Context) and not o.closed}

    dropped = []
    drop = sglang_process._drop_zmq_contexts
    monkeypatch.setattr(sglang_process, "_drop_zmq_contexts", lambda contexts: (dropped.extend(contexts),
                                                                               drop(contexts)))
    before, contexts_before = {p.pid for p in psutil.Process().children(recursive=True)}, open_contexts()
    constructor = zmq.Context.__dict__["__init__"]
    with pytest.raises(EngineStartError, match="did not start within 2s"):
        SGLangEngine(str(tiny_checkpoint), max_total_tokens=4096, start_timeout_s=2)
    left = [p for p in psutil.Process().children(recursive=True) if p.pid not in before]
    assert not left, f"engine processes left running: {left}"
    assert dropped, "the failed start made no ZMQ context, or they were not found"
    assert open_contexts() <= contexts_before, "the failed start left ZMQ contexts open"
    assert zmq.Context.__dict__["__init__"] is constructor, "the recording hook was left on zmq.Context"


def test_shared_bucket_open_retries_libshm_timeouts(monkeypatch):
    """A timed-out answer from the sender's torch_shm_manager (seen under load) is asked again, a few times;
    any other error, or a timeout that persists, is raised."""
    import types

    import rollout.engine as engine_module

    monkeypatch.setattr(engine_module.time, "sleep", lambda s: None)
    answers = []

    def loads(handle):
        answers.append(handle)
        if len(answers) < 3:
            raise RuntimeError("Shared memory manager connection has timed out\nException raised from recv")
        return torch.ones(3)

    monkeypatch.setattr(engine_module, "pickle", types.SimpleNamespace(loads=loads))
    assert engine_module.open_shared_buffer(b"h").tolist() == [1.0, 1.0, 1.0] and len(answers) == 3

    def always(message):
        def loads(handle):
            answers.append(handle)
            raise RuntimeError(message)
        return types.SimpleNamespace(loads=loads)

    answers.clear()
    monkeypatch.setattr(engine_module, "pickle", always("Shared memory manager connection has timed out"))
    with pytest.raises(RuntimeError, match="timed out"):
        engine_module.open_shared_buffer(b"h")
    assert len(answers) == engine_module.SHM_OPEN_ATTEMPTS
    answers.clear()
    monkeypatch.setattr(engine_module, "pickle", always("unpickling failed"))
    with pytest.raises(RuntimeError, match="unpickling failed"):
        engine_module.open_shared_buffer(b"h")


@pytest.fixture(scope="module")
def engine(tiny_checkpoint):
    eng = SGLangEngine(str(tiny_checkpoint), dtype="float32", max_total_tokens=8192, seed=0)
    yield eng
    eng.shutdown()


def test_generate_logprobs_match_transformers(engine, tiny_checkpoint):
    prompts = _prompts(4, seed=1)
    results = engine.generate(_requests(prompts))
    assert len(results) == len(prompts)
    for res in results:
        assert res.output_versions == [0] * len(res.output_ids)
        assert res.finish_reason in ("stop", "length")
        assert len(res.output_ids) == len(res.output_logprobs) > 0
        assert all(0 <= t < 512 for t in res.output_ids)
        assert isinstance(res.text, str)
    diffs = _diffs(_hf_model(tiny_checkpoint), prompts, results)
    print(f"\nSGLang vs transformers logprobs: mean {diffs.mean():.2e} max {diffs.max():.2e} over {diffs.numel()}")
    assert diffs.mean() <= LOGPROB_MEAN_TOL, f"mean abs diff {diffs.mean():.3e}, max {diffs.max():.3e}"


def test_sampling_logprobs_are_at_the_temperature(engine, tiny_checkpoint):
    """At temperature 0.7 the engine reports log softmax(logits / 0.7) of each sampled token: what the trainer must
    compute for the importance ratios (at temperature 1 these differ by ~5e-2 here)."""
    prompts = _prompts(3, seed=11)
    results = engine.generate(_requests(prompts, temperature=0.7))
    model = _hf_model(tiny_checkpoint)
    at_t, at_1 = _diffs(model, prompts, results, 0.7), _diffs(model, prompts, results, 1.0)
    print(f"\nT=0.7 logprobs vs transformers at 0.7: mean {at_t.mean():.2e}; at 1.0: mean {at_1.mean():.2e}")
    assert at_t.mean() <= LOGPROB_MEAN_TOL and at_1.mean() > 100 * LOGPROB_MEAN_TOL


def test_score_agrees_with_generate(engine):
    prompts = _prompts(3, seed=2)
    results = engine.generate(_requests(prompts, max_new_tokens=12))
    seqs = [p + r.output_ids for p, r in zip(prompts, results)]
    scores = engine.score(seqs, [len(p) for p in prompts])
    for res, sc in zip(results, scores):
        assert len(sc) == len(res.output_logprobs)
        diff = (torch.tensor(sc) - torch.tensor(res.output_logprobs)).abs()
        assert diff.max() <= 1e-4, f"score vs generate logprobs: max abs diff {diff.max():.3e}"


def test_update_weights_from_tensors_then_disk(engine, tiny_checkpoint, tmp_path):
    prompts = _prompts(3, seed=3)
    before = engine.generate(_requests(prompts, max_new_tokens=12))
    seqs = [p + r.output_ids for p, r in zip(prompts, before)]
    lens = [len(p) for p in prompts]

    g = torch.Generator().manual_seed(4)
    original = load_hf_state_dict(tiny_checkpoint)
    # Every tensor, like a trainer's full sync: fused (q_a + kv_a), post-processed (kv_b -> w_kc/w_vc) and stacked
    # (per-expert) parameters all go through SGLang's loader.
    perturbed = {name: t + 0.02 * torch.randn(t.shape, generator=g, dtype=t.dtype) if t.is_floating_point() else t
                 for name, t in original.items()}
    engine.update_weights_from_tensors(list(perturbed.items()), version=1)
    assert engine.weight_version() == 1

    rescored = engine.score(seqs, lens)
    change = torch.tensor([abs(a - b) for sc, r in zip(rescored, before) for a, b in zip(sc, r.output_logprobs)])
    assert change.mean() > 1e-2, f"logprobs barely changed after the update (mean {change.mean():.2e})"

    after = engine.generate(_requests(prompts))
    assert all(set(r.output_versions) == {1} for r in after)
    perturbed_dir = _write_checkpoint(tiny_checkpoint, tmp_path / "perturbed", perturbed)
    diffs = _diffs(_hf_model(perturbed_dir), prompts, after)
    print(f"\nafter tensor update, SGLang vs transformers: mean {diffs.mean():.2e} max {diffs.max():.2e}")
    assert diffs.mean() <= LOGPROB_MEAN_TOL, f"mean abs diff {diffs.mean():.3e}, max {diffs.max():.3e}"

    # Back to the checkpoint on disk: the original logprobs return.
    engine.update_weights_from_disk(str(tiny_checkpoint), version=2)
    assert engine.weight_version() == 2
    restored = engine.score(seqs, lens)
    back = torch.tensor([abs(a - b) for sc, r in zip(restored, before) for a, b in zip(sc, r.output_logprobs)])
    assert back.max() <= 1e-4, f"after update_weights_from_disk: max abs diff {back.max():.3e}"


def _long(prompt, rid, n=1800):
    return EngineRequest(rid, prompt, {"max_new_tokens": n, "temperature": 1.0, "ignore_eos": True})


def _collect_until(engine, rids: set[str], timeout_s: float = 120.0) -> dict:
    got, t0 = {}, time.monotonic()
    while set(got) != rids:
        assert time.monotonic() - t0 < timeout_s, f"still waiting for {rids - set(got)}"
        got.update((r.rid, r) for r in engine.collect(0.2))
    return got


def test_submit_collect_streams_and_abort_keeps_partial_tokens(engine):
    """Short requests come out of collect() while a long one still runs; abort_all() ends the long one with its
    partial tokens, whose logprobs are the real sampling logprobs (equal to a prefill score of the same tokens);
    the engine keeps serving after."""
    prompts = _prompts(3, seed=8)
    reqs = [EngineRequest(f"batch-{i}", p, {"max_new_tokens": n, "temperature": 1.0, "ignore_eos": True})
            for i, (p, n) in enumerate(zip(prompts, [3, 5, 1800]))]
    engine.submit(reqs)
    short = _collect_until(engine, {"batch-0", "batch-1"})
    assert engine.in_flight() == 1, "the long request should still be generating"
    assert [len(short["batch-0"].output_ids), len(short["batch-1"].output_ids)] == [3, 5]
    assert {r.finish_reason for r in short.values()} == {"length"}
    time.sleep(0.3)  # let it generate a few more tokens
    assert engine.abort_all() == 1 and engine.in_flight() == 0
    long = _collect_until(engine, {"batch-2"})["batch-2"]
    assert long.finish_reason == "abort"
    n = len(long.output_ids)
    assert 5 < n < 1800, f"aborted request returned {n} tokens"
    (scored,) = engine.score([prompts[2] + long.output_ids], [len(prompts[2])])
    diff = (torch.tensor(scored) - torch.tensor(long.output_logprobs)).abs()
    print(f"\naborted after {n} tokens; partial logprobs vs prefill score: max abs diff {diff.max():.2e}")
    assert diff.max() <= 1e-4
    engine.abort()  # abort-all with nothing running is harmless
    (ok,) = engine.generate(_requests(_prompts(1, seed=6), max_new_tokens=4))
    assert ok.finish_reason in ("stop", "length") and len(ok.output_ids) > 0


@pytest.mark.parametrize("mode", ["retract", "in_place"])
def test_pause_update_resume_tags_tokens_by_version(engine, tiny_checkpoint, mode):
    """A request running across a weight update keeps going after resume(); SGLang's spans tag the tokens before
    the update with the old version and the rest with the new one. With "retract" the prefix is recomputed under
    the new weights, so the new-version tokens' logprobs equal a prefill score under those weights."""
    prompt = _prompts(1, seed=12)[0]
    before = engine.weight_version()
    rid = f"pause-{mode}"
    engine.submit([_long(prompt, rid)])
    time.sleep(1.0)
    engine.pause(mode)
    original = load_hf_state_dict(tiny_checkpoint)
    g = torch.Generator().manual_seed(13)
    perturbed = {n: t + 0.02 * torch.randn(t.shape, generator=g) if t.is_floating_point() else t
                 for n, t in original.items()}
    engine.update_weights_from_tensors(list(perturbed.items()), version=before + 1)
    engine.resume()
    time.sleep(0.5)
    engine.abort_all()
    res = _collect_until(engine, {rid})[rid]
    n, old = len(res.output_ids), res.output_versions.count(before)
    assert res.finish_reason == "abort" and n < 1800
    assert 0 < old < n and res.output_versions == [before] * old + [before + 1] * (n - old), res.output_versions
    if mode == "retract":
        (scored,) = engine.score([prompt + res.output_ids], [len(prompt)])
        diff = (torch.tensor(scored[old:]) - torch.tensor(res.output_logprobs[old:])).abs()
        print(f"\nretract: {old} old-version tokens; new-version logprobs vs score: mean {diff.mean():.2e}")
        assert diff.mean() <= LOGPROB_MEAN_TOL
    engine.update_weights_from_disk(str(tiny_checkpoint), version=before + 2)


def test_health_check_held_up_by_a_pause_is_not_a_failure(engine, monkeypatch):
    """The manager pauses every engine for a weight push; a pause that lands after the check's paused test but
    before its one-token request finishes must not fail the engine (under CI load both engines of the pool were
    replaced this way). A check with no pause still fails an engine that does not answer."""
    import threading

    real_submit = engine._loop.submit

    def pause_first(coro):  # the pause lands between health()'s paused test and its request
        monkeypatch.undo()  # pause() itself submits through the loop
        engine.pause("in_place")
        threading.Timer(2.5, engine.resume).start()
        return real_submit(coro)

    monkeypatch.setattr(engine._loop, "submit", pause_first)
    report = engine.health(timeout_s=1.0)
    monkeypatch.undo()
    assert report.ok, report.reason
    assert "inconclusive" in report.reason
    deadline = time.monotonic() + 10
    while engine._paused and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine.health(timeout_s=10.0).ok  # resumed: a clean check passes again

    def never_answers(coro):  # a scheduler that takes the request and never finishes it, with no pause about
        monkeypatch.undo()
        coro.close()
        return real_submit(asyncio.sleep(5.0))

    monkeypatch.setattr(engine._loop, "submit", never_answers)
    report = engine.health(timeout_s=1.0)
    monkeypatch.undo()
    assert not report.ok and "did not finish" in report.reason

    # The same unanswered request while the scheduler works through other requests (CPU taken by an engine
    # starting beside it held a real check past its timeout this way): slow, not hung.
    engine.submit(_requests(_prompts(4, seed=11), max_new_tokens=2000, stop_token_ids=[], ignore_eos=True))
    try:
        monkeypatch.setattr(engine._loop, "submit", never_answers)
        report = engine.health(timeout_s=2.0)
        monkeypatch.undo()
        assert report.ok and report.reason.startswith("slow"), report.reason
    finally:
        engine.abort_all()
        engine.collect(timeout_s=0.0)


def test_engine_in_ray_actor(ray_session, tiny_checkpoint):
    # The session's Ray (tests/conftest.py): a second ray.init here would fail once another module started it,
    # and shutting it down would pull it from under the tests that follow.
    ray = ray_session
    actor = RolloutEngineActor.options(num_cpus=1).remote(str(tiny_checkpoint), max_total_tokens=4096)
    try:
        results = ray.get(actor.generate.remote(_requests(_prompts(2, seed=7), max_new_tokens=8)), timeout=300)
        assert len(results) == 2
        assert all(len(r.output_ids) == len(r.output_logprobs) > 0 for r in results)
        assert ray.get(actor.weight_version.remote()) == 0
    finally:
        ray.get(actor.shutdown.remote(), timeout=120)
        ray.kill(actor)


def test_shutdown_spares_unrelated_children(engine):
    """SGLang's own shutdown kills every child of the calling process; ours must reach only the engine's
    processes (in a test session the Ray head is such an unrelated child). Runs last in this module: it shuts
    the module's engine down (the fixture's second shutdown is a no-op)."""
    import subprocess

    import psutil

    bystander = subprocess.Popen(["sleep", "120"])
    try:
        own = [psutil.Process(pid) for pid in engine._engine_pids if psutil.pid_exists(pid)]
        assert own, "the engine recorded no processes of its own"
        engine.shutdown()
        assert bystander.poll() is None, "engine shutdown killed an unrelated child process"
        gone, alive = psutil.wait_procs(own, timeout=10)
        assert not alive, f"engine processes still running after shutdown: {[p.pid for p in alive]}"
    finally:
        bystander.kill()
        bystander.wait()
