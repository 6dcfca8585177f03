"""The rollout engine: one SGLang engine (token ids in, token ids + sampling logprobs out) with weight updates.

`SGLangEngine` is a plain class usable in-process; `RolloutEngineActor` is the same class as a Ray actor
(`RolloutEngineActor.options(num_cpus=...).remote(model_path, ...)`). Requests are typed (rollout/protocol.py):
`submit()` starts them and `collect()` returns each as it finishes (the rollout manager's path); `generate()`
waits for a list (evaluation, tests). Weight updates, `pause()`/`resume()` and aborts may arrive while requests
run; the actor is threaded for that.

On a machine without CUDA the engine runs on CPU through our out-of-tree SGLang platform
(rollout/sglang_cpu/platform.py) and the patches it needs for GLM-5 (rollout/sglang_cpu/patches.py).
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import json
import logging
import os
import pickle
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

import ray

from rollout.protocol import EngineHealth, EngineRequest, EngineResult, versions_from_spans
from rollout.sglang_process import (EngineStartError, cpu_seconds, kill_process_trees,  # noqa: F401 (re-export)
                                    kills_only, process_problem, start_engine)
from rollout.weight_protocol import READBACK_PREFIX, VERIFIED_MARKER, BucketLayout, verify_check

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

# SGLang's model registry starts from our GLM classes instead of importing all of its ~250 model modules (an
# engine's scheduler starts in 1.4 s instead of 2.5 s; rollout/sglang_models/__init__.py). Read when
# sglang.srt.models.registry is imported, here or in the scheduler, which inherits the environment.
os.environ.setdefault("SGLANG_EXTERNAL_MODEL_PACKAGE", "rollout.sglang_models")

ENGINE_START_TIMEOUT_S = float(os.environ.get("SLIPSTREAM_ENGINE_START_TIMEOUT_S", "300"))
_FLUSH_RETRIES = 10
# A health check's request that times out while the engine's processes used at least this share of the wait in CPU
# time is queued behind work, not hung (see health()).
_BUSY_CPU_FRACTION = 0.1
RESULT_LINGER_S = float(os.environ.get("SLIPSTREAM_RESULT_LINGER_S", "0.025"))

PAUSE_MODES = ("in_place", "retract")
# Opening a CPU buffer shared by name goes through the sender's torch_shm_manager daemon; on a loaded 2-core box
# its answer can miss libshm's socket timeout ("Shared memory manager connection has timed out", seen once in
# bench/engine_faults.py, ending the run). The buffer is still there: asking again is safe.
SHM_OPEN_ATTEMPTS = 4


def open_shared_buffer(handle: bytes):
    """The tensor a sender pickled as a shared-memory handle, retrying libshm's timeouts."""
    for attempt in range(SHM_OPEN_ATTEMPTS):
        try:
            return pickle.loads(handle)
        except RuntimeError as exc:
            if "Shared memory manager connection has timed out" not in str(exc) or attempt == SHM_OPEN_ATTEMPTS - 1:
                raise
            logger.warning("opening a shared weight bucket timed out (attempt %d of %d); retrying", attempt + 1,
                           SHM_OPEN_ATTEMPTS)
            time.sleep(0.5 * (attempt + 1))


@functools.cache
def prepare_engine_process() -> bool:
    """Sets up this process to run SGLang (before sglang is imported; the scheduler processes SGLang spawns
    inherit the environment); returns whether it runs on CPU. Called by SGLangEngine, not at import: the driver
    imports this module to start the engine actors, and torch's import (1 s of one core) would delay them."""
    import torch

    from glm5_model.compat import mark_absent

    if torch.cuda.is_available():
        return False
    # Select our platform explicitly: SGLang refuses to guess when several platform plugins are installed, and
    # without one a CUDA build of torch makes it pick the CUDA platform.
    os.environ.setdefault("SGLANG_PLATFORM", "slipstream_cpu")
    # FlashInfer is CUDA-only, but SGLang's quantization modules import it (and, through it, CUTLASS and ml_dtypes)
    # whenever it is installed, behind try/except ImportError: 1.3 s of one core per engine start. Marked absent,
    # as it is to SGLang's own availability check on CPU (is_flashinfer_available); find_spec answers None.
    mark_absent("flashinfer")
    # Bucketed weight pushes hand CPU tensors between unrelated processes (a trainer rank, this engine, SGLang's
    # scheduler) as shared-memory handles. The default fd-passing strategy authenticates against the parent
    # process's key and fails between unrelated processes; named shared-memory files work (seen: AuthenticationError
    # with file_descriptor).
    import torch.multiprocessing

    torch.multiprocessing.set_sharing_strategy("file_system")
    return True


class SGLangEngine:
    """One SGLang engine. Token ids only: text is never sent (tokenizers can disagree between libraries).

    SGLang's engine runs its asyncio loop only while one of its sync calls is inside `run_until_complete`, so
    requests could only be in flight during a blocking call. Here the loop runs for the engine's whole life in a
    thread of its own (`_LoopThread`), which lets requests stream in (`submit`) and out (`collect`) while weight
    updates, pauses and aborts arrive from other threads; SGLang's own sync methods still work, from any thread."""

    def __init__(self, model_path: str, *, dtype: str = "float32", max_total_tokens: int = 16384, seed: int = 0,
                 mem_fraction_static: float | None = None, log_level: str = "error",
                 start_timeout_s: float = ENGINE_START_TIMEOUT_S):
        self._lock = threading.Lock()  # weight updates, pause/resume: one control operation at a time
        self._control_ops = 0  # bumped as each control operation starts and ends (see health())
        self._version = 0
        self._paused: str | None = None
        self._results = threading.Condition()
        self._done: list[EngineResult] = []           # finished streamed requests not yet collected
        self._failures: list[BaseException] = []      # streamed requests that raised
        self._inflight: dict[str, object] = {}        # rid -> future, streamed and blocking requests alike
        self._push: _Push | None = None  # the bucketed push in progress
        self.model_path = str(model_path)
        self._vocab_size = int(json.loads((Path(self.model_path) / "config.json").read_text())["vocab_size"])
        self.on_cpu = prepare_engine_process()
        kwargs = dict(model_path=self.model_path, dtype=dtype, max_total_tokens=max_total_tokens,
                      random_seed=seed, log_level=log_level, skip_tokenizer_init=False)
        if mem_fraction_static is not None:
            kwargs["mem_fraction_static"] = mem_fraction_static
        if self.on_cpu:
            # sleep_on_idle: an idle scheduler otherwise busy-polls a whole core, starving the trainer beside it.
            kwargs.update(device="cpu", attention_backend="torch_native", disable_cuda_graph=True, sleep_on_idle=True)
        self._engine, self._engine_pids = start_engine(kwargs, start_timeout_s)
        self._loop = _LoopThread(self._engine)
        self._set_served_version(0)

    # ------------------------------------------------------------------ generation
    def submit(self, requests: list[EngineRequest]) -> None:
        """Starts the requests and returns at once; their results come out of `collect()` as each finishes."""
        self._start(requests, streamed=True)

    def collect(self, timeout_s: float = 0.2) -> list[EngineResult]:
        """Results of submitted requests that finished since the last call (stopped, truncated or aborted),
        waiting up to `timeout_s` for the first one. A request that raised is raised here."""
        with self._results:
            if not self._done and not self._failures:
                self._results.wait(timeout_s)
            # Each collect is a Ray round trip on the cores that generate and train; results that come a few decode
            # steps apart go out together. Not once nothing runs: the last of a batch is never held back.
            deadline = time.monotonic() + RESULT_LINGER_S
            while self._done and self._inflight and not self._failures and time.monotonic() < deadline:
                self._results.wait(deadline - time.monotonic())
            if self._failures:
                raise self._failures.pop(0)
            out, self._done = self._done, []
        return out

    def generate(self, requests: list[EngineRequest]) -> list[EngineResult]:
        """Samples a completion per request and waits for all of them (they do not appear in `collect()`)."""
        futures = self._start(requests, streamed=False)
        return [f.result() for f in futures]

    def in_flight(self) -> int:
        return len(self._inflight)

    def _start(self, requests: list[EngineRequest], streamed: bool) -> list:
        rids = [r.rid for r in requests]
        if len(set(rids)) != len(rids) or any(rid in self._inflight for rid in rids):
            raise ValueError(f"duplicate rids: {sorted(set(r for r in rids if rids.count(r) > 1 or r in self._inflight))}")
        futures = []
        for req in requests:
            future = self._loop.submit(self._engine.async_generate(
                input_ids=[int(t) for t in req.input_ids], sampling_params=dict(req.sampling), return_logprob=True,
                rid=req.rid))
            self._inflight[req.rid] = future
            wrapped = _ResultFuture(req.rid)
            future.add_done_callback(functools.partial(self._on_done, wrapped, streamed))
            futures.append(wrapped)
        return futures

    def _on_done(self, wrapped: "_ResultFuture", streamed: bool, future) -> None:
        """Runs on the loop thread as each request ends: converts its output and hands it to `collect()`."""
        self._inflight.pop(wrapped.rid, None)
        try:
            wrapped.value = self._to_result(wrapped.rid, future.result())
        except BaseException as exc:  # noqa: BLE001 - delivered to whoever waits for this request
            wrapped.error = exc
        wrapped.done.set()
        if streamed:
            with self._results:
                if wrapped.error is not None:
                    self._failures.append(wrapped.error)
                else:
                    self._done.append(wrapped.value)
                self._results.notify_all()

    def _to_result(self, rid: str, o: dict) -> EngineResult:
        meta = o["meta_info"]
        logprobs = [float(lp) for lp, _tok, _txt in meta["output_token_logprobs"]]
        ids = list(o["output_ids"])
        if len(logprobs) != len(ids):
            raise RuntimeError(f"SGLang returned {len(logprobs)} logprobs for {len(ids)} tokens (request {rid})")
        versions = versions_from_spans(meta.get("weight_versions"), len(ids), fallback=self._version)
        return EngineResult(rid, ids, logprobs, versions, _finish_reason(meta.get("finish_reason")),
                            o.get("text", ""))

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
        """Asks SGLang to abort one request (by rid) or, with no rid, every request; they finish with
        finish_reason "abort" and keep the tokens they had. An abort that reaches SGLang before it has registered
        the request is dropped: `abort_all` repeats until nothing is in flight."""
        tm = self._engine.tokenizer_manager
        args = dict(abort_all=True) if rid is None else dict(rid=str(rid))
        self._loop.call_soon(lambda: tm.abort_request(**args))

    def abort_all(self, timeout_s: float = 120.0) -> int:
        """Aborts every request and returns once none is in flight (their results go where they would have gone:
        `collect()` or the blocking `generate()`); returns how many were in flight. Must not be called while paused
        (a paused scheduler does not process aborts)."""
        if self._paused:
            raise RuntimeError(f"abort_all while paused ({self._paused}): resume first")
        n = len(self._inflight)
        deadline = time.monotonic() + timeout_s
        while self._inflight:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{len(self._inflight)} requests still running {timeout_s:.0f}s after abort")
            self.abort()
            time.sleep(0.02)
        return n

    def pause(self, mode: str) -> None:
        """Stops the scheduler from running its requests until `resume()`: "in_place" keeps them and their KV cache
        (the cache stays from the old weights), "retract" puts them back in the waiting queue and frees their KV,
        so after a weight update their prefix is recomputed under the new weights. Requests submitted while
        paused wait. Generated tokens keep the version of the weights that produced them either way."""
        from sglang.srt.managers.io_struct import PauseGenerationReqInput

        if mode not in PAUSE_MODES:
            raise ValueError(f"pause mode {mode!r} not in {PAUSE_MODES}")
        with self._control():
            if self._paused:
                raise RuntimeError(f"engine already paused ({self._paused})")
            self._loop.run(self._engine.tokenizer_manager.pause_generation(PauseGenerationReqInput(mode=mode)))
            self._paused = mode

    def resume(self) -> None:
        from sglang.srt.managers.io_struct import ContinueGenerationReqInput

        with self._control():
            if self._paused:
                self._loop.run(self._engine.tokenizer_manager.continue_generation(ContinueGenerationReqInput()))
                self._paused = None

    # ------------------------------------------------------------------ weights
    def update_weights_from_tensors(self, named_tensors: list[tuple[str, torch.Tensor]], version: int) -> None:
        """Loads full HF-named tensors (e.g. "model.layers.1.mlp.experts.3.gate_proj.weight") into the engine."""
        tensors = [(name, t.detach().to("cpu").contiguous()) for name, t in named_tensors]
        with self._control():
            flush = self._flush_cache()
            # SGLang 0.5.23 only accepts tensor updates inside a weight-update session.
            _check(self._engine.begin_weight_update(), "begin_weight_update")
            try:
                _check(self._engine.update_weights_from_tensor(tensors, flush_cache=flush),
                       "update_weights_from_tensor")
            finally:
                _check(self._engine.end_weight_update(), "end_weight_update")
            self._set_served_version(version)

    def update_weights_from_disk(self, path: str, version: int) -> None:
        with self._control():
            self._flush_cache()
            _check(self._engine.update_weights_from_disk(str(path)), "update_weights_from_disk")
            self._set_served_version(version)

    def weight_version(self) -> int:
        """The weight version this engine serves: set only once a whole push of it arrived and verified."""
        return self._version

    def _set_served_version(self, version: int) -> None:
        """Our version, and SGLang's: its scheduler then records, for every live request, how many of its tokens
        the previous weights produced (meta_info["weight_versions"]), which tags tokens of paused requests."""
        from sglang.srt.managers.io_struct import UpdateWeightVersionReqInput

        self._loop.run(self._engine.tokenizer_manager.update_weight_version(
            UpdateWeightVersionReqInput(new_version=str(int(version)), abort_all_requests=False)))
        self._version = int(version)

    # ------------------------------------------------------------------ bucketed, verified pushes
    # (trainer/weight_sync drives these; the wire format is rollout/weight_protocol.py)
    def begin_weight_push(self, version: int) -> None:
        """Opens a push of `version`: the engine is flushed and SGLang's weight-update session opened; buckets
        follow (load_bucket / receive_buckets), then end_weight_push (or abort_weight_push on failure)."""
        with self._control():
            if self._push is not None:
                raise RuntimeError(f"a push of version {self._push.version} is still open; end or abort it first")
            self._flush_cache()
            _check(self._engine.begin_weight_update(), "begin_weight_update")
            self._push = _Push(int(version))

    def load_bucket(self, handle: bytes, layout: BucketLayout, version: int, index: int) -> int:
        """Loads one flattened bucket through SGLang's tensor-update path (colocated mode). `handle` is the
        sender's buffer pickled as a shared-memory handle (CUDA IPC on a GPU): opening it maps the sender's
        memory, nothing is copied until SGLang loads it into the parameters. The checksum is verified on the
        mapped bytes first; a bad bucket raises and loads nothing. Returns the payload bytes."""
        from sglang.srt.utils import MultiprocessingSerializer
        from sglang.srt.weight_sync.tensor_bucket import FlattenedTensorMetadata
        import torch

        flat = open_shared_buffer(handle)
        if flat.numel() != layout.nbytes:
            raise ValueError(f"bucket {index}: {flat.numel()} bytes received for a layout of {layout.nbytes}")
        verify_check(flat, layout.payload_nbytes, layout.entries[-1].view(flat), version=version, index=index)
        metadata = [FlattenedTensorMetadata(name=e.name, shape=torch.Size(e.shape), dtype=e.torch_dtype,
                                            start_idx=e.offset, end_idx=e.offset + e.nbytes, numel=e.nbytes)
                    for e in layout.weights]
        payload = MultiprocessingSerializer.serialize({"flattened_tensor": flat, "metadata": metadata})
        with self._control():
            push = self._open_push(version)
            _check(self._engine.update_weights_from_tensor([payload], load_format="flattened_bucket",
                                                           flush_cache=False), "update_weights_from_tensor")
            push.loaded.add(int(index))
        return layout.payload_nbytes

    def join_weight_group(self, group_name: str, master_address: str, master_port: int, rank: int,
                          world_size: int, backend: str) -> None:
        """Joins a weight-update process group (distributed mode): the sending trainer rank is its rank 0."""
        with self._control():
            _check(self._engine.init_weights_update_group(master_address, int(master_port), int(rank),
                                                          int(world_size), group_name, backend),
                   "init_weights_update_group")

    def leave_weight_group(self, group_name: str) -> None:
        with self._control():
            _check(self._engine.destroy_weights_update_group(group_name), "destroy_weights_update_group")

    def receive_buckets(self, plan: list[tuple[str, BucketLayout, int]], version: int) -> int:
        """Receives the buckets of a push by broadcast, in plan order (each entry: the group whose rank 0 sends
        it, its layout, its index). Every engine takes them in the same order, so the senders' broadcasts can
        never wait on each other in a cycle. SGLang's scheduler checks each bucket's checksum before loading it
        (rollout/weight_receiver.py); its reply must say so. Returns the payload bytes received."""
        total = 0
        with self._control():
            push = self._open_push(version)
            for group_name, layout, index in plan:
                result = self._engine.update_weights_from_distributed(
                    [e.name for e in layout.entries], [e.dtype for e in layout.entries],
                    [list(e.shape) for e in layout.entries], group_name=group_name, flush_cache=False,
                    load_format="flattened_bucket")
                _check(result, f"update_weights_from_distributed (bucket {index})")
                message = result[1] if isinstance(result, tuple) else getattr(result, "message", "")
                if f"{VERIFIED_MARKER} bucket {index} of version {version}:" not in message:
                    raise RuntimeError(f"bucket {index} of version {version} loaded without the checksum check "
                                       f"(is rollout.weight_receiver installed in SGLang's scheduler?): {message}")
                push.loaded.add(int(index))
                total += layout.payload_nbytes
        return total

    def end_weight_push(self, version: int, buckets: int) -> None:
        """Closes the push: every one of `buckets` buckets must have arrived; the cache the old weights filled is
        flushed and the engine serves `version` from here on."""
        with self._control():
            push = self._open_push(version)
            missing = sorted(set(range(buckets)) - push.loaded)
            if missing:
                raise RuntimeError(f"push of version {version}: buckets {missing[:10]} never arrived "
                                   f"({len(push.loaded)} of {buckets} loaded)")
            self._push = None
            _check(self._engine.end_weight_update(), "end_weight_update")
            self._flush_cache()
            self._set_served_version(version)

    def abort_weight_push(self) -> None:
        """Closes a failed push's session; the engine keeps reporting the version it had (its weights may be
        partly updated: the next complete push repairs them)."""
        with self._control():
            if self._push is None:
                return
            self._push = None
            _check(self._engine.end_weight_update(), "end_weight_update")

    def read_weight_checksums(self, tensors: list[tuple[str, str, tuple[int, ...]]], hash: bool = True,
                              algorithm: str | None = None) -> dict:
        """Reads HF-named tensors back from the engine's parameters (rollout/weight_receiver.py): their checksums,
        the names it holds no parameter for, and the engine parameters those tensors do not cover completely.
        With hash=False only the last two (which tensors the engine holds at all). `algorithm`: the sender's
        checksum algorithm (rollout/weight_protocol.py; default: the engine device's)."""
        fd, path = tempfile.mkstemp(prefix="slipstream-readback-", suffix=".json")
        os.close(fd)
        try:
            request = READBACK_PREFIX + json.dumps({"path": path, "hash": bool(hash), "algorithm": algorithm,
                                                    "tensors": [[n, d, list(s)] for n, d, s in tensors]})
            with self._control():
                self._engine.get_weights_by_name(request)
            result = json.loads(Path(path).read_text() or "{}")
        finally:
            os.unlink(path)
        if "error" in result or "checksums" not in result:
            raise RuntimeError(f"weight read-back failed in SGLang's scheduler: {result.get('error', result)}")
        return result

    def _open_push(self, version: int) -> "_Push":
        if self._push is None or self._push.version != int(version):
            open_version = None if self._push is None else self._push.version
            raise RuntimeError(f"no push of version {version} is open (open: {open_version}); "
                               "call begin_weight_push first")
        return self._push

    # ------------------------------------------------------------------ health
    def health(self, timeout_s: float = 10.0) -> EngineHealth:
        """Whether the engine serves: its SGLang processes exist and run (a SIGSTOPped scheduler counts as hung),
        and a one-token request finishes within `timeout_s` (skipped while paused: nothing runs then).

        A pause or weight update that lands while the request waits holds it up legitimately (the manager pauses
        every engine for a weight push, which takes longer than a check on a loaded CPU): such a check is
        inconclusive and passes; the next one decides. So is one whose engine kept working (used CPU) while the
        request waited: slow is not hung. A stopped or dead scheduler is caught by the process check."""
        problem = process_problem(self._engine_pids)
        if problem:
            return EngineHealth(False, problem, len(self._inflight), self._version)
        if self._paused:
            return EngineHealth(True, f"paused ({self._paused})", len(self._inflight), self._version)
        rid, ops, cpu0 = f"health/{time.monotonic_ns()}", self._control_ops, cpu_seconds(self._engine_pids)
        future = self._loop.submit(self._engine.async_generate(input_ids=[1, 2], sampling_params={
            "max_new_tokens": 1, "temperature": 0.0}, rid=rid))
        try:
            future.result(timeout=timeout_s)
        except concurrent.futures.TimeoutError:
            # Holding the control lock while deciding keeps a pause from landing between the test and the abort.
            # Not aborted when held up: an abort that reaches a scheduler paused in place leaves it serving nothing
            # after resume (found by test_health_check_held_up_by_a_pause_is_not_a_failure); the one token
            # finishes once the engine resumes.
            if not self._lock.acquire(blocking=False):
                return self._inconclusive()
            try:
                if self._paused or self._control_ops != ops:
                    return self._inconclusive()
                # On an oversubscribed CPU (an engine starting beside this one, trainer ranks) a working scheduler
                # can leave the request queued past the timeout; a hung one (deadlocked, waiting on a dead peer)
                # uses next to no CPU. The request is left to finish.
                busy = cpu_seconds(self._engine_pids) - cpu0
                if busy >= _BUSY_CPU_FRACTION * timeout_s:
                    return EngineHealth(True, f"slow: a one-token request took over {timeout_s:.0f}s while the "
                                        f"engine used {busy:.1f}s of CPU", len(self._inflight), self._version)
                self.abort(rid)
            finally:
                self._lock.release()
            return EngineHealth(False, f"a one-token request did not finish within {timeout_s:.0f}s and the "
                                f"engine used {busy:.2f}s of CPU meanwhile", len(self._inflight), self._version)
        return EngineHealth(True, "", len(self._inflight), self._version)

    def _inconclusive(self) -> EngineHealth:
        return EngineHealth(True, "inconclusive: a pause or weight update held the check up", len(self._inflight),
                            self._version)

    @contextlib.contextmanager
    def _control(self):
        with self._lock:
            self._control_ops += 1
            try:
                yield
            finally:
                self._control_ops += 1

    def process_ids(self) -> list[int]:
        """The engine's SGLang processes (scheduler, detokenizer): what a fault-injection test kills or stops."""
        return sorted(self._engine_pids)

    def kill(self) -> None:
        """SIGKILLs the engine's SGLang processes and their children (a hung engine cannot shut down cleanly)."""
        kill_process_trees(self._engine_pids)

    def shutdown(self) -> None:
        engine, self._engine = getattr(self, "_engine", None), None
        if engine is not None:
            self._loop.stop()
            with kills_only(self._engine_pids):
                engine.shutdown()

    def _flush_cache(self) -> bool:
        """Flushes the KV/prefix cache before a weight update; returns whether the update should flush again.
        Paused in place, the running requests keep their cache and SGLang refuses any flush: none is done."""
        if self._paused == "in_place":
            return False
        # Right after a generation the scheduler may still hold requests and refuse to flush ("Cache flush
        # failed"); it succeeds once they are released, so retry briefly.
        for attempt in range(_FLUSH_RETRIES):
            result = self._engine.flush_cache()
            if getattr(result, "success", True):
                return True
            time.sleep(0.1 * (attempt + 1))
        raise RuntimeError(f"SGLang flush_cache kept failing: {getattr(result, 'message', result)}")


class _Push:
    """A bucketed push in progress: its version and the bucket indices loaded so far."""

    def __init__(self, version: int):
        self.version = version
        self.loaded: set[int] = set()


class _ResultFuture:
    """A blocking generate()'s handle on one request: its EngineResult once the loop thread has converted it."""

    def __init__(self, rid: str):
        self.rid, self.done, self.value, self.error = rid, threading.Event(), None, None

    def result(self) -> EngineResult:
        self.done.wait()
        if self.error is not None:
            raise self.error
        return self.value


class _LoopThread:
    """Runs an sglang.Engine's event loop forever in a daemon thread, and points the engine's `loop` at a proxy
    whose run_until_complete hands the coroutine to that thread and waits: every sync Engine method keeps working,
    from any thread, while requests are in flight."""

    def __init__(self, engine):
        self.engine, self.loop = engine, engine.loop
        self.thread = threading.Thread(target=self.loop.run_forever, name="sglang-loop", daemon=True)
        self.thread.start()
        engine.loop = _LoopProxy(self)

    def submit(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def run(self, coro):
        return self.submit(coro).result()

    def call_soon(self, fn) -> None:
        self.loop.call_soon_threadsafe(fn)

    def stop(self) -> None:
        if self.thread.is_alive():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(timeout=30)
        self.engine.loop = self.loop  # SGLang's own shutdown may use it


class _LoopProxy:
    def __init__(self, owner: _LoopThread):
        self._owner = owner

    def run_until_complete(self, coro):
        return self._owner.run(coro)

    def __getattr__(self, name):
        return getattr(self._owner.loop, name)


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


# Threaded: collect() waits in one thread while submit, abort, pause and weight updates arrive on others; callers
# add resources with .options(num_cpus=...).
RolloutEngineActor = ray.remote(max_concurrency=8)(SGLangEngine)
