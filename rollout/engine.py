"""The rollout engine: one SGLang engine (token ids in, token ids + sampling logprobs out) with weight updates.

`SGLangEngine` is a plain class usable in-process; `RolloutEngineActor` is the same class as a Ray actor
(`RolloutEngineActor.options(num_cpus=...).remote(model_path, ...)`). The actor is threaded so `abort()` and
`finished_rids()` can arrive while a `generate()` call is running; all other calls are serialised by a lock
(SGLang's sync Engine API drives one asyncio loop that must not be entered twice).

On a machine without CUDA the engine runs on CPU through our out-of-tree SGLang platform
(rollout/sglang_cpu/platform.py) and the patches it needs for GLM-5 (rollout/sglang_cpu/patches.py).
"""
from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import os
import threading
import time
import uuid
from pathlib import Path

import psutil
import ray
import torch

logger = logging.getLogger(__name__)

if not torch.cuda.is_available():
    # Select our platform explicitly: SGLang refuses to guess when several platform plugins are installed, and
    # without one a CUDA build of torch makes it pick the CUDA platform. Must be set before sglang is imported
    # (SGLang reads it lazily, but its scheduler subprocesses inherit the environment from here).
    os.environ.setdefault("SGLANG_PLATFORM", "slipstream_cpu")

ENGINE_START_TIMEOUT_S = float(os.environ.get("SLIPSTREAM_ENGINE_START_TIMEOUT_S", "300"))
_FLUSH_RETRIES = 10


class EngineStartError(RuntimeError):
    pass


class SGLangEngine:
    """One SGLang engine. Token ids only: text is never sent (tokenizers can disagree between libraries)."""

    def __init__(self, model_path: str, *, dtype: str = "float32", max_total_tokens: int = 16384, seed: int = 0,
                 mem_fraction_static: float | None = None, log_level: str = "error",
                 start_timeout_s: float = ENGINE_START_TIMEOUT_S):
        self._lock = threading.Lock()
        self._version = 0
        # rids of the current (or last) generate() call that have finished, readable without self._lock.
        self._finished_lock = threading.Lock()
        self._finished: set[str] = set()
        self.model_path = str(model_path)
        self._vocab_size = int(json.loads((Path(self.model_path) / "config.json").read_text())["vocab_size"])
        self.on_cpu = not torch.cuda.is_available()
        kwargs = dict(model_path=self.model_path, dtype=dtype, max_total_tokens=max_total_tokens,
                      random_seed=seed, log_level=log_level, skip_tokenizer_init=False)
        if mem_fraction_static is not None:
            kwargs["mem_fraction_static"] = mem_fraction_static
        if self.on_cpu:
            # sleep_on_idle: an idle scheduler otherwise busy-polls a whole core, starving the trainer beside it.
            kwargs.update(device="cpu", attention_backend="torch_native", disable_cuda_graph=True, sleep_on_idle=True)
        self._engine, self._engine_pids = _start_engine(kwargs, start_timeout_s)

    # ------------------------------------------------------------------ generation
    def generate(self, requests: list[dict]) -> list[dict]:
        """Samples a completion per request. Each result carries the logprob of every generated token under the
        distribution it was sampled from (SGLang applies the temperature, not top-p/top-k), and the weight
        version that produced it. An aborted request returns the tokens (and logprobs) it had generated.

        The requests go to SGLang one by one, concurrently on the engine's loop (its scheduler still batches
        them), so each one's completion is seen as it happens: `finished_rids()` lists them while this runs."""
        if not requests:
            return []
        rids = [str(r.get("rid") or uuid.uuid4().hex) for r in requests]
        if len(set(rids)) != len(rids):
            raise ValueError("duplicate rids in one generate() call")
        input_ids = [[int(t) for t in r["input_ids"]] for r in requests]
        params = [dict(r.get("sampling_params") or {}) for r in requests]
        finished: set[str] = set()

        def mark_finished(rid: str) -> None:
            with self._finished_lock:
                finished.add(rid)

        with self._lock:
            with self._finished_lock:
                self._finished = finished
            out = self._engine.loop.run_until_complete(
                _generate_each(self._engine, input_ids, params, rids, mark_finished))
            version = self._version
        failed = [o for o in out if isinstance(o, BaseException)]
        if failed:
            raise failed[0]
        results = []
        for o in out:
            meta = o["meta_info"]
            logprobs = [float(lp) for lp, _tok, _txt in meta["output_token_logprobs"]]
            if len(logprobs) != len(o["output_ids"]):
                raise RuntimeError(f"SGLang returned {len(logprobs)} logprobs for {len(o['output_ids'])} tokens")
            results.append({"output_ids": list(o["output_ids"]), "output_logprobs": logprobs,
                            "finish_reason": _finish_reason(meta.get("finish_reason")), "text": o.get("text", ""),
                            "weight_version": version})
        return results

    def finished_rids(self) -> list[str]:
        """rids of the running (or last) generate() call that finished on their own (stop or length; aborted
        ones are not listed). Never waits for generate(): it is the driver's window into a running batch."""
        with self._finished_lock:
            return sorted(self._finished)

    def score(self, input_ids: list[list[int]], prompt_lens: list[int]) -> list[list[float]]:
        """Logprobs (temperature 1) of tokens input_ids[i][prompt_lens[i]:], each given all tokens before it.

        Prefill only. SGLang 0.5.23 returns `input_token_logprobs` for positions logprob_start_len.. end, where
        entry j is the logprob of token (start + j) given tokens < start + j, except that the first entry is always
        None (SGLang computes no logprob for the first returned position). So we start one position early and drop
        that first entry.
        """
        if len(input_ids) != len(prompt_lens):
            raise ValueError(f"{len(input_ids)} sequences but {len(prompt_lens)} prompt lengths")
        if not input_ids:
            return []
        ids = [[int(t) for t in seq] for seq in input_ids]
        for seq, p in zip(ids, prompt_lens):
            if not 1 <= p <= len(seq):
                raise ValueError(f"prompt_len {p} must be in [1, {len(seq)}] (the first token has no logprob)")
        starts = [p - 1 for p in prompt_lens]
        with self._lock:
            out = self._engine.generate(input_ids=ids, sampling_params=[{"max_new_tokens": 0}] * len(ids),
                                        return_logprob=True, logprob_start_len=starts)
        if isinstance(out, dict):
            out = [out]
        scores = []
        for seq, p, o in zip(ids, prompt_lens, out):
            entries = o["meta_info"]["input_token_logprobs"][1:]
            # SGLang 0.5.23 reports the id of the last vocabulary entry as 0 in input_token_logprobs (it clips ids
            # >= vocab_size - 1 meant for image-token hashes); the logprob itself is computed for the real id.
            expected = [t if t < self._vocab_size - 1 else 0 for t in seq[p:]]
            if [tok for _lp, tok, _txt in entries] != expected:
                raise RuntimeError(f"SGLang input_token_logprobs do not line up with tokens {p}..{len(seq)} "
                                   "(logprob_start_len semantics changed? pinned sglang==0.5.23)")
            scores.append([float(lp) for lp, _tok, _txt in entries])
        return scores

    def abort(self, rid: str | None = None) -> None:
        """Aborts one request (by rid) or, with no rid, every request; they finish with finish_reason "abort".

        Safe to call from another thread while generate() runs: the abort is handed to the engine's event loop
        (the thread running generate) instead of touching its sockets from here. Weight updates wait for an
        in-flight generate() to return, so a driver that wants fresh weights now calls abort() first. An abort
        that arrives before SGLang has registered the request is dropped, and so is one while the loop is idle:
        requests are only in flight while a call runs the loop, and sending from this thread could race a call
        that is just starting on the same (not thread-safe) ZMQ socket. A driver that must stop a batch repeats
        abort() until its generate() returns."""
        tm = self._engine.tokenizer_manager
        args = dict(abort_all=True) if rid is None else dict(rid=str(rid))
        loop = self._engine.loop
        if loop.is_running():
            loop.call_soon_threadsafe(lambda: tm.abort_request(**args))

    # ------------------------------------------------------------------ weights
    def update_weights_from_tensors(self, named_tensors: list[tuple[str, torch.Tensor]], version: int) -> None:
        """Loads full HF-named tensors (e.g. "model.layers.1.mlp.experts.3.gate_proj.weight") into the engine."""
        tensors = [(name, t.detach().to("cpu").contiguous()) for name, t in named_tensors]
        with self._lock:
            self._flush_cache()
            # SGLang 0.5.23 only accepts tensor updates inside a weight-update session.
            _check(self._engine.begin_weight_update(), "begin_weight_update")
            try:
                _check(self._engine.update_weights_from_tensor(tensors, flush_cache=True), "update_weights_from_tensor")
            finally:
                _check(self._engine.end_weight_update(), "end_weight_update")
            self._version = int(version)

    def update_weights_from_disk(self, path: str, version: int) -> None:
        with self._lock:
            self._flush_cache()
            _check(self._engine.update_weights_from_disk(str(path)), "update_weights_from_disk")
            self._version = int(version)

    def weight_version(self) -> int:
        return self._version

    def shutdown(self) -> None:
        engine, self._engine = getattr(self, "_engine", None), None
        if engine is not None:
            with _kills_only(self._engine_pids):
                engine.shutdown()

    def _flush_cache(self) -> None:
        # Right after a generation the scheduler may still hold requests and refuse to flush ("Cache flush
        # failed"); it succeeds once they are released, so retry briefly.
        for attempt in range(_FLUSH_RETRIES):
            result = self._engine.flush_cache()
            if getattr(result, "success", True):
                return
            time.sleep(0.1 * (attempt + 1))
        raise RuntimeError(f"SGLang flush_cache kept failing: {getattr(result, 'message', result)}")


async def _generate_each(engine, input_ids: list[list[int]], params: list[dict], rids: list[str],
                         on_finished) -> list:
    """One SGLang request per sample, all in flight together. A module function, not a method: an async method
    would make Ray run the actor as an async actor, whose own event loop then blocks SGLang's."""
    async def one(ids: list[int], sampling_params: dict, rid: str):
        o = await engine.async_generate(input_ids=ids, sampling_params=sampling_params, return_logprob=True, rid=rid)
        if _finish_reason(o["meta_info"].get("finish_reason")) != "abort":
            on_finished(rid)
        return o

    # return_exceptions: one bad request must not leave the others running on the loop after we return.
    return await asyncio.gather(*(one(i, p, r) for i, p, r in zip(input_ids, params, rids)), return_exceptions=True)


def _finish_reason(info) -> str:
    kind = info.get("type") if isinstance(info, dict) else info
    if kind in ("stop", "length", "abort"):
        return kind
    return "abort" if kind is None else str(kind)


def _check(result, what: str) -> None:
    """SGLang control calls return (success, message, ...) or an object with .success/.message."""
    if isinstance(result, tuple):
        success, message = result[0], result[1] if len(result) > 1 else ""
    else:
        success, message = getattr(result, "success", True), getattr(result, "message", "")
    if not success:
        raise RuntimeError(f"SGLang {what} failed: {message}")


def _start_engine(kwargs: dict, timeout_s: float):
    """Starts sglang.Engine; if it is not up within timeout_s, kills the processes it spawned and raises.

    A failed start can hang (the launcher waits on a scheduler that never reports); killing the scheduler
    processes makes the launcher's wait fail, so the constructor returns and we can raise a clear error. The
    watchdog keeps killing until the constructor returns: at the deadline the processes may not exist yet."""
    import sglang

    me = psutil.Process()
    before = {p.pid for p in me.children(recursive=True)}
    done, timed_out = threading.Event(), threading.Event()

    def watchdog():
        if done.wait(timeout_s):
            return
        timed_out.set()
        while not done.is_set():
            _kill_new_children(me, before)
            done.wait(0.5)

    threading.Thread(target=watchdog, name="sglang-start-watchdog", daemon=True).start()
    t0 = time.monotonic()
    what = f"SGLang engine for {kwargs['model_path']}"
    contexts_before = _live_zmq_contexts()
    try:
        engine = sglang.Engine(**kwargs)
    except BaseException as exc:
        done.set()
        _kill_new_children(me, before)
        _drop_zmq_contexts(_live_zmq_contexts() - contexts_before)
        if timed_out.is_set():
            raise EngineStartError(f"{what} did not start within {timeout_s:.0f}s (set "
                                   "SLIPSTREAM_ENGINE_START_TIMEOUT_S to change); its processes were killed") from exc
        raise EngineStartError(f"{what} failed to start: {exc}") from exc
    done.set()
    owned = {p.pid for p in me.children(recursive=True)} - before
    if timed_out.is_set():  # came up, but only after the watchdog had started killing: not trustworthy
        try:
            with _kills_only(owned):
                engine.shutdown()
        finally:
            _kill_new_children(me, before)
        raise EngineStartError(f"{what} did not start within {timeout_s:.0f}s")
    logger.info("%s ready in %.1fs", what, time.monotonic() - t0)
    return engine, owned


_KILL_PATCH_LOCK = threading.Lock()


@contextlib.contextmanager
def _kills_only(owned: set[int]):
    """SGLang's Engine.shutdown() kills *every* child process of the calling process, not only its scheduler and
    detokenizer: in a process that also runs a Ray head (a test session, a user's script) or another engine, it
    killed those too (seen: the Ray GCS started by the test session died with an in-process engine, and the test
    run with it). While this is active its kill reaches only the engine's own processes and their descendants."""
    import sglang.srt.entrypoints.engine as sglang_engine

    original = sglang_engine.kill_process_tree
    me = psutil.Process()

    def kill_process_tree(parent_pid, include_parent=True, skip_pid=None, wait_timeout=60):
        if parent_pid != os.getpid() or include_parent:
            return original(parent_pid, include_parent=include_parent, skip_pid=skip_pid, wait_timeout=wait_timeout)
        victims = []
        for child in me.children(recursive=True):
            try:
                if child.pid in owned or any(p.pid in owned for p in child.parents()):
                    victims.append(child)
            except psutil.NoSuchProcess:
                continue
        for child in victims:
            try:
                child.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(victims, timeout=wait_timeout or 5)

    with _KILL_PATCH_LOCK:
        sglang_engine.kill_process_tree = kill_process_tree
        try:
            yield
        finally:
            sglang_engine.kill_process_tree = original


def _live_zmq_contexts() -> set:
    import zmq

    return {obj for obj in gc.get_objects() if isinstance(obj, zmq.Context) and not obj.closed}


def _drop_zmq_contexts(contexts: set) -> None:
    """Closes the ZMQ contexts a failed start left behind, discarding unsent messages.

    Their sockets hold messages for the killed scheduler; with the default infinite linger, the context's
    finalizer blocks forever in `term()` whenever the garbage collector reaches it -- which was the *next*
    engine start in this process (seen: a test's engine fixture hung after the start-deadline test)."""
    for ctx in contexts:
        try:
            ctx.destroy(linger=0)
        except Exception:  # noqa: BLE001 - best effort on an already failing path
            logger.exception("could not close a ZMQ context of the failed engine start")


def _kill_new_children(me: psutil.Process, before: set[int]) -> None:
    """Kills (and reaps) every descendant process that did not exist before the engine start."""
    victims = [c for c in me.children(recursive=True) if c.pid not in before]
    for child in victims:
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(victims, timeout=5)


# Threaded so abort() can run while generate() is in flight; callers add resources with .options(num_cpus=...).
RolloutEngineActor = ray.remote(max_concurrency=4)(SGLangEngine)
