"""Starting and stopping an in-process sglang.Engine safely: a start deadline that kills what a hung start
spawned, a shutdown that reaches only the engine's own processes, and cleanup of the ZMQ contexts a failed start
leaves behind. Used by rollout/engine.py."""
from __future__ import annotations

import contextlib
import functools
import logging
import os
import sys
import threading
import time
import weakref

import psutil

logger = logging.getLogger(__name__)


class EngineStartError(RuntimeError):
    pass


def start_engine(kwargs: dict, timeout_s: float):
    """Starts sglang.Engine; if it is not up within timeout_s, kills the processes it spawned and raises.

    A failed start can hang (the launcher waits on a scheduler that never reports); killing the scheduler
    processes makes the launcher's wait fail, so the constructor returns and we can raise a clear error. The
    watchdog keeps killing until the constructor returns: at the deadline the processes may not exist yet."""
    import sglang
    import torch

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
    contexts: weakref.WeakSet = weakref.WeakSet()
    try:
        with _recording_zmq_contexts(contexts), \
                _children_forked(kwargs.get("device") == "cpu" and torch.get_num_threads() == 1):
            engine = sglang.Engine(**kwargs)
    except BaseException as exc:
        done.set()
        _kill_new_children(me, before)
        _drop_zmq_contexts(contexts)
        if timed_out.is_set():
            raise EngineStartError(f"{what} did not start within {timeout_s:.0f}s (set "
                                   "SLIPSTREAM_ENGINE_START_TIMEOUT_S to change); its processes were killed") from exc
        raise EngineStartError(f"{what} failed to start: {exc}") from exc
    done.set()
    owned = {p.pid for p in me.children(recursive=True)} - before
    if timed_out.is_set():  # came up, but only after the watchdog had started killing: not trustworthy
        try:
            with kills_only(owned):
                engine.shutdown()
        finally:
            _kill_new_children(me, before)
        raise EngineStartError(f"{what} did not start within {timeout_s:.0f}s")
    logger.info("%s ready in %.1fs", what, time.monotonic() - t0)
    return engine, owned


_KILL_PATCH_LOCK = threading.Lock()
_START_METHOD_LOCK = threading.Lock()


@contextlib.contextmanager
def _children_forked(fork: bool):
    """With fork, SGLang's scheduler and detokenizer processes are forked instead of spawned.

    SGLang forces the spawn start method (`_set_envs_and_config`) because CUDA cannot be used in a forked child;
    spawned, each of the two imports torch and SGLang again. On CPU there is no CUDA state to inherit, and a fork
    inherits the launching process's imports: the engine was ready in 4.2 s instead of 20.2 s (tiny GLM-5, idle
    2-core box, same tokens out). Only from a process with one intra-op thread (an engine actor with num_cpus=1,
    Ray's OMP_NUM_THREADS): a fork of a process whose OpenMP pool ran a parallel region hangs in the child's first
    parallel region (GNU libgomp has no fork handler; seen in a test process that had run transformers' forward).
    The start method is SGLang's again once the engine is up."""
    if not fork:
        yield
        return
    import multiprocessing as mp

    import sglang.srt.entrypoints.engine as sglang_engine

    original = sglang_engine._set_envs_and_config

    def set_envs_and_config(*args, **kwargs):
        original(*args, **kwargs)
        mp.set_start_method("fork", force=True)

    with _START_METHOD_LOCK, _titles_through_ray():
        sglang_engine._set_envs_and_config = set_envs_and_config
        try:
            yield
        finally:
            sglang_engine._set_envs_and_config = original
            mp.set_start_method("spawn", force=True)


@contextlib.contextmanager
def _titles_through_ray():
    """In a Ray worker, forked children name themselves ("sglang::scheduler") through Ray's own setproctitle.

    Ray retitles its workers with a vendored setproctitle that moves the process's argv; the `setproctitle`
    package SGLang calls then changes nothing in a forked child, which kept the actor's title
    ("ray::SGLangEngine.__init__"), so `ps`, and whatever finds an engine's scheduler by name, could not tell the
    two apart. Children forked while this is active keep the redirect; the launching process gets the package's
    function back."""
    import setproctitle

    raylet = sys.modules.get("ray._raylet")
    if raylet is None or not hasattr(raylet, "setproctitle"):
        yield
        return
    original = setproctitle.setproctitle
    setproctitle.setproctitle = raylet.setproctitle
    try:
        yield
    finally:
        setproctitle.setproctitle = original


@contextlib.contextmanager
def kills_only(owned: set[int]):
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


@contextlib.contextmanager
def _recording_zmq_contexts(created: weakref.WeakSet):
    """Adds to `created` each ZMQ context made in this process while the block runs (SGLang's engine and
    tokenizer manager make theirs through zmq.Context's constructor, asyncio ones included). Hooking the
    constructor replaced a gc.get_objects() scan before each start: 0.3-0.5 s of every engine start. (A scheduler
    forked inside the block keeps the hook; it only fills that process's copy of the set.)"""
    import zmq

    original = zmq.Context.__init__

    @functools.wraps(original)
    def init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        created.add(self)

    zmq.Context.__init__ = init
    try:
        yield
    finally:
        zmq.Context.__init__ = original


def _drop_zmq_contexts(contexts: set) -> None:
    """Closes the ZMQ contexts a failed start left behind, discarding unsent messages.

    Their sockets hold messages for the killed scheduler; with the default infinite linger, the context's
    finalizer blocks forever in `term()` whenever the garbage collector reaches it -- which was the *next*
    engine start in this process (seen: a test's engine fixture hung after the start-deadline test)."""
    for ctx in list(contexts):
        if ctx.closed:
            continue
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


def process_problem(pids: set[int]) -> str | None:
    """Why the engine's processes cannot serve (gone, zombie, stopped), or None when all of them run."""
    for pid in sorted(pids):
        try:
            status = psutil.Process(pid).status()
        except psutil.NoSuchProcess:
            return f"SGLang process {pid} is gone"
        if status in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD, psutil.STATUS_STOPPED):
            return f"SGLang process {pid} is {status}"
    return None


def cpu_seconds(pids: set[int]) -> float:
    """CPU time (user + system) these processes have used so far; a gone one counts 0."""
    total = 0.0
    for pid in pids:
        try:
            t = psutil.Process(pid).cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += t.user + t.system
    return total


def kill_process_trees(pids: set[int]) -> None:
    """SIGKILLs these processes and all their descendants, and reaps them."""
    victims = []
    for pid in pids:
        try:
            proc = psutil.Process(pid)
            victims += [proc, *proc.children(recursive=True)]
        except psutil.NoSuchProcess:
            continue
    for proc in victims:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(victims, timeout=10)
