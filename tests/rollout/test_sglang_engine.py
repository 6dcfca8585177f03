"""SGLangEngine on the tiny GLM-5 checkpoint (CPU, fp32): logprobs against transformers, score(), weight updates,
abort, and the Ray actor. One in-process engine is shared by the module (each start costs ~20-30 s)."""
from __future__ import annotations

import shutil
import threading
import time

import pytest
import torch

import sglang  # noqa: F401  -- no importorskip: a missing sglang must fail, not skip

from glm5_model.hf_checkpoint import load_hf_state_dict
from rollout.engine import EngineStartError, RolloutEngineActor, SGLangEngine

STOP_IDS = [0, 7, 9]
LOGPROB_MEAN_TOL = 1e-4


def _prompts(n: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    # Tokens 10..499: clear of the tiny tokenizer's special/stop ids.
    return [torch.randint(10, 500, (int(torch.randint(6, 14, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def _requests(prompts, max_new_tokens=16, **params):
    sp = {"max_new_tokens": max_new_tokens, "temperature": 1.0, "top_p": 1.0, "stop_token_ids": STOP_IDS, **params}
    return [{"input_ids": p, "sampling_params": dict(sp)} for p in prompts]


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
def _hf_logprobs(model, prompt: list[int], output: list[int]) -> list[float]:
    """transformers' logprob of each output token given the prompt and the output tokens before it."""
    ids = torch.tensor([prompt + output])
    logits = model(input_ids=ids).logits[0].float()
    logprobs = torch.log_softmax(logits, dim=-1)
    positions = torch.arange(len(prompt) - 1, len(prompt) + len(output) - 1)
    return logprobs[positions, torch.tensor(output)].tolist()


def _diffs(model, prompts, results) -> torch.Tensor:
    diffs = []
    for prompt, res in zip(prompts, results):
        ref = _hf_logprobs(model, prompt, res["output_ids"])
        diffs.extend(abs(a - b) for a, b in zip(ref, res["output_logprobs"]))
    return torch.tensor(diffs)


def test_engine_start_deadline(tiny_checkpoint):
    """A start that overruns its deadline raises a clear error and leaves no processes behind (a failed start can
    otherwise hang forever). Runs before the shared engine exists, so no process of that one can be hit."""
    import psutil

    before = {p.pid for p in psutil.Process().children(recursive=True)}
    with pytest.raises(EngineStartError, match="did not start within 2s"):
        SGLangEngine(str(tiny_checkpoint), max_total_tokens=4096, start_timeout_s=2)
    left = [p for p in psutil.Process().children(recursive=True) if p.pid not in before]
    assert not left, f"engine processes left running: {left}"


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
        assert res["weight_version"] == 0
        assert res["finish_reason"] in ("stop", "length")
        assert len(res["output_ids"]) == len(res["output_logprobs"]) > 0
        assert all(0 <= t < 512 for t in res["output_ids"])
        assert isinstance(res["text"], str)
    diffs = _diffs(_hf_model(tiny_checkpoint), prompts, results)
    print(f"\nSGLang vs transformers logprobs: mean {diffs.mean():.2e} max {diffs.max():.2e} over {diffs.numel()}")
    assert diffs.mean() <= LOGPROB_MEAN_TOL, f"mean abs diff {diffs.mean():.3e}, max {diffs.max():.3e}"


def test_score_agrees_with_generate(engine):
    prompts = _prompts(3, seed=2)
    results = engine.generate(_requests(prompts, max_new_tokens=12))
    seqs = [p + r["output_ids"] for p, r in zip(prompts, results)]
    scores = engine.score(seqs, [len(p) for p in prompts])
    for res, sc in zip(results, scores):
        assert len(sc) == len(res["output_logprobs"])
        diff = (torch.tensor(sc) - torch.tensor(res["output_logprobs"])).abs()
        assert diff.max() <= 1e-4, f"score vs generate logprobs: max abs diff {diff.max():.3e}"


def test_update_weights_from_tensors_then_disk(engine, tiny_checkpoint, tmp_path):
    prompts = _prompts(3, seed=3)
    before = engine.generate(_requests(prompts, max_new_tokens=12))
    seqs = [p + r["output_ids"] for p, r in zip(prompts, before)]
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
    change = torch.tensor([abs(a - b) for sc, r in zip(rescored, before) for a, b in zip(sc, r["output_logprobs"])])
    assert change.mean() > 1e-2, f"logprobs barely changed after the update (mean {change.mean():.2e})"

    after = engine.generate(_requests(prompts))
    assert all(r["weight_version"] == 1 for r in after)
    perturbed_dir = _write_checkpoint(tiny_checkpoint, tmp_path / "perturbed", perturbed)
    diffs = _diffs(_hf_model(perturbed_dir), prompts, after)
    print(f"\nafter tensor update, SGLang vs transformers: mean {diffs.mean():.2e} max {diffs.max():.2e}")
    assert diffs.mean() <= LOGPROB_MEAN_TOL, f"mean abs diff {diffs.mean():.3e}, max {diffs.max():.3e}"

    # Back to the checkpoint on disk: the original logprobs return.
    engine.update_weights_from_disk(str(tiny_checkpoint), version=2)
    assert engine.weight_version() == 2
    restored = engine.score(seqs, lens)
    back = torch.tensor([abs(a - b) for sc, r in zip(restored, before) for a, b in zip(sc, r["output_logprobs"])])
    assert back.max() <= 1e-4, f"after update_weights_from_disk: max abs diff {back.max():.3e}"


def test_abort_long_request_then_serve(engine):
    prompt = _prompts(1, seed=5)[0]
    long_req = {"input_ids": prompt, "rid": "long-request-1",
                "sampling_params": {"max_new_tokens": 1800, "temperature": 1.0, "ignore_eos": True}}
    box: dict = {}
    worker = threading.Thread(target=lambda: box.setdefault("out", engine.generate([long_req])))
    t0 = time.monotonic()
    worker.start()
    time.sleep(1.0)
    # An abort that reaches SGLang before the request is registered is dropped, so repeat until it lands.
    while worker.is_alive() and time.monotonic() - t0 < 120:
        engine.abort("long-request-1")
        worker.join(timeout=0.5)
    assert not worker.is_alive(), "generate() did not return after abort"
    (res,) = box["out"]
    assert res["finish_reason"] == "abort"
    assert len(res["output_ids"]) < 1800
    # Still serving afterwards, and abort-all with nothing running is harmless.
    engine.abort()
    (ok,) = engine.generate(_requests(_prompts(1, seed=6), max_new_tokens=4))
    assert ok["finish_reason"] in ("stop", "length") and len(ok["output_ids"]) > 0


def test_finished_rids_while_running_and_partial_abort(engine):
    """finished_rids() sees the short requests of a running batch finish while the long one still runs (and is
    callable while generate() holds the engine); the aborted long request returns its partial tokens with
    logprobs that are the real sampling logprobs (equal to a prefill score of the same tokens)."""
    prompts = _prompts(3, seed=8)
    reqs = [{"input_ids": p, "rid": f"batch-{i}",
             "sampling_params": {"max_new_tokens": n, "temperature": 1.0, "ignore_eos": True}}
            for i, (p, n) in enumerate(zip(prompts, [3, 5, 1800]))]
    box: dict = {}
    worker = threading.Thread(target=lambda: box.setdefault("out", engine.generate(reqs)))
    t0 = time.monotonic()
    worker.start()
    seen: list[str] = []
    while time.monotonic() - t0 < 60 and set(seen) != {"batch-0", "batch-1"}:
        seen = engine.finished_rids()
        time.sleep(0.05)
    assert set(seen) == {"batch-0", "batch-1"}, f"short requests not reported finished: {seen}"
    assert worker.is_alive(), "the long request should still be generating"
    time.sleep(0.3)  # let it generate a few more tokens
    while worker.is_alive() and time.monotonic() - t0 < 120:
        engine.abort()
        worker.join(timeout=0.5)
    assert not worker.is_alive(), "generate() did not return after abort"
    short_a, short_b, long = box["out"]
    assert [short_a["finish_reason"], short_b["finish_reason"]] == ["length", "length"]
    assert [len(short_a["output_ids"]), len(short_b["output_ids"])] == [3, 5]
    assert long["finish_reason"] == "abort"
    assert "batch-2" not in engine.finished_rids()
    n = len(long["output_ids"])
    assert 5 < n < 1800, f"aborted request returned {n} tokens"
    assert len(long["output_logprobs"]) == n
    (scored,) = engine.score([prompts[2] + long["output_ids"]], [len(prompts[2])])
    diff = (torch.tensor(scored) - torch.tensor(long["output_logprobs"])).abs()
    print(f"\naborted after {n} tokens; partial logprobs vs prefill score: max abs diff {diff.max():.2e}")
    assert diff.max() <= 1e-4


def test_engine_in_ray_actor(ray_session, tiny_checkpoint):
    # The session's Ray (tests/conftest.py): a second ray.init here would fail once another module started it,
    # and shutting it down would pull it from under the tests that follow.
    ray = ray_session
    actor = RolloutEngineActor.options(num_cpus=1).remote(str(tiny_checkpoint), max_total_tokens=4096)
    try:
        results = ray.get(actor.generate.remote(_requests(_prompts(2, seed=7), max_new_tokens=8)), timeout=300)
        assert len(results) == 2
        assert all(len(r["output_ids"]) == len(r["output_logprobs"]) > 0 for r in results)
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
