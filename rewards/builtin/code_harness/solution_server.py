"""The solution's side of a `coding` run: exports the solution's functions to the judge.

Runs in the sandbox as the solution's uid, with the judge's control socket on fd 3; with namespaces, as init of a
pid namespace of its own (nothing it starts can kill it, and orphans come back to it), and not dumpable (nothing
it starts can ptrace-stop it). For each test the judge sends one socket over the control socket; this process
forks a fresh child that runs the solution's module code and then answers, on that socket, the judge's requests
for the names the test uses and its calls of the solution's functions. Before each new test and at the end it
kills everything the previous test left behind.

Nothing here is trusted: the solution's code runs in the child and can rewrite any of it. The judge relies only on
what it decodes from the socket (wire.py), never on this program behaving.

    python -I -S -B solution_server.py kill-all|group MAX_MESSAGE_BYTES

(the sandbox launcher runs it in a forked copy of its own interpreter: run_here).
"""
import builtins
import ctypes
import os
import signal
import socket
import sys
import time

_CONTROL_FD = 3
_PR_SET_DUMPABLE = 4


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # for wire.py, and only while importing it
import wire  # noqa: E402

del sys.path[0]


def _describe(value):
    if isinstance(value, type(os)):
        return {"kind": "module", "module": value.__name__}
    if callable(value) and not isinstance(value, type):
        return {"kind": "function"}
    try:
        return {"kind": "value", "value": wire.encode(value)}
    except (wire.NotPlainData, RecursionError):
        return {"kind": "other", "type": type(value).__name__}


def _call(ns, request):
    fn = ns.get(request.get("name"))
    if not callable(fn):
        return {"raised": "NameError", "message": f"the solution has no function {request.get('name')!r}"}
    try:
        resolve = lambda name: ns[name]  # noqa: E731 -- the judge passes the solution's own functions by name
        wire_args = request["args"]
        args = [wire.decode(a, resolve) for a in wire_args]
        kwargs = {k: wire.decode(v, resolve) for k, v in request["kwargs"]}
    except (KeyError, TypeError, ValueError, wire.NotPlainData) as exc:
        return {"raised": "TypeError", "message": f"bad call from the judge: {exc}"}
    try:
        result = fn(*args, **kwargs)
    except BaseException as exc:  # noqa: BLE001 -- the test decides what an exception means
        return {"raised": type(exc).__name__, "message": str(exc)[:500]}
    try:
        reply = {"value": wire.encode(result)}
        # Arguments the function changed in place travel back, so `f(xs); assert xs == ...` works as in one process.
        after = [None] * len(args)
        for i, (arg, sent) in enumerate(zip(args, wire_args)):
            if type(arg) in (list, dict, set):
                now = wire.encode(arg)
                if now != sent:
                    after[i] = now
        if any(a is not None for a in after):
            reply["after"] = after
        return reply
    except (wire.NotPlainData, RecursionError) as exc:
        return {"unsupported": f"{request['name']}() returned something that cannot cross as plain data: {exc}"}


def _flush():
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:  # noqa: BLE001
            pass


def _serve(source, fd, max_bytes):
    """One test, in a fresh child: run the solution's module code, then answer the judge until it hangs up."""
    sock = socket.socket(fileno=fd)
    ns = {"__name__": "solution", "__builtins__": builtins}
    load_error = None
    try:
        exec(compile(source, "solution.py", "exec"), ns)
    except BaseException as exc:  # noqa: BLE001
        load_error = f"{type(exc).__name__}: {exc}"[:500]
    _flush()
    reader = wire.LineReader(sock, max_bytes)
    try:
        while True:
            request = reader.read()
            if request is None:
                break
            if load_error is not None:
                reply = {"load_error": load_error}
            elif request.get("op") == "exports":
                reply = {"exports": {name: _describe(ns[name]) for name in request.get("names", []) if name in ns}}
            else:
                reply = _call(ns, request)
            _flush()
            sock.sendall(wire.dumps(reply))
    except BaseException:  # noqa: BLE001 -- the judge sees the socket close
        pass
    _flush()
    os._exit(0)


def _clear(child, kill_all):
    """Kill whatever the previous test left running and reap it."""
    if child is None:
        return
    if not kill_all:
        try:
            os.killpg(child, signal.SIGKILL)
        except OSError:
            pass
        try:
            os.waitpid(child, 0)
        except ChildProcessError:
            pass
    for _ in range(1000):
        if kill_all:
            try:
                os.kill(-1, signal.SIGKILL)  # every process of ours but this one (we are alone in this pid ns / uid)
            except OSError:
                pass
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            if not kill_all:
                return  # escaped daemons we may not kill: the run's end does
            time.sleep(0.001)


def _set_dumpable(flag):
    try:
        ctypes.CDLL(None).prctl(_PR_SET_DUMPABLE, flag, 0, 0, 0)
    except Exception:  # noqa: BLE001
        pass


def main():
    kill_all, max_bytes = sys.argv[1] == "kill-all", int(sys.argv[2])
    # Not ptrace-able by the tests' children (same uid): a stopped server would stall every later test.
    _set_dumpable(0)
    with open("solution.py", encoding="utf-8", errors="replace") as fh:
        source = fh.read()
    control = socket.socket(fileno=_CONTROL_FD)
    child = None
    while True:
        try:
            message, fds, _, _ = socket.recv_fds(control, 64, 1)
        except OSError:
            break
        if not message:
            break
        _clear(child, kill_all)
        child = None
        if not fds:
            continue
        pid = os.fork()
        if pid == 0:
            control.close()
            _set_dumpable(1)  # the solution's own process behaves as usual (its /proc/self, core limits...)
            try:
                os.setpgid(0, 0)
            except OSError:
                pass
            _serve(source, fds[0], max_bytes)
        os.close(fds[0])
        child = pid
    _clear(child, kill_all)


main()
