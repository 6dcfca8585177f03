"""The judge of a `coding` run: runs the task's tests and decides each verdict, in a process the solution's code
never runs in.

Runs inside the sandbox as its own private uid (not the solution's; without private uids both are namespace root
with no capabilities), as init of the run's pid namespace, not dumpable, with stdout and stderr on /dev/null. It reads the task (tests, entry code, entry point) from stdin, which the solution's
processes never hold, and writes one verdict line per test to fd 3, which they never hold either. fd 4 is the
control socket to the solution's server (solution_server.py). The solution's names reach a test as proxies: a call
sends its arguments as plain data (wire.py) and the result comes back as plain data, decoded here with builtin
constructors, so every comparison a test makes runs on values of exact builtin types in this process.

A test passes when its code (and `check(candidate)` for an entry point) runs to the end without an exception and
the solution's side behaved: a solution that died, sent a malformed reply or ran out of time fails the test even
if the test code swallowed the error.

Standard library only. The sandbox launcher runs it in its own interpreter (run_here); on its own it is
`python -I -S -B judge.py`.
"""
import builtins
import ctypes
import importlib
import json
import os
import signal
import socket
import sys

_RESULT_FD, _CONTROL_FD = 3, 4
_PR_SET_DUMPABLE = 4


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # for wire.py, and only while importing it
import wire  # noqa: E402

del sys.path[0]


class TestTimeout(BaseException):
    """The test ran past its time. A BaseException, so a test's `except Exception` cannot swallow it."""


class SolutionBroke(BaseException):
    """The solution's side died, misbehaved or aborted (SystemExit): the test fails whatever its code catches."""

    def __init__(self, status, detail):
        super().__init__(detail)
        self.status = status


class UnsupportedTest(BaseException):
    """The test does something that cannot cross to the solution (a lambda as an argument): the task's fault."""


class SolutionError(Exception):
    """The solution raised an exception that is not a builtin one."""


class SolutionFunction:
    """What a test sees of one of the solution's functions."""

    __slots__ = ("_channel", "__name__")

    def __init__(self, channel, name):
        self._channel, self.__name__ = channel, name

    def __call__(self, *args, **kwargs):
        return self._channel.call(self.__name__, args, kwargs)

    def __repr__(self):
        return f"<solution function {self.__name__}>"


# Raised as themselves these would end a test's own iteration early (`all(map(f, xs))` is true when f raises
# StopIteration at once), so they arrive as SolutionError.
_NOT_REPLAYED = (StopIteration, StopAsyncIteration)


def _exception_for(name, message):
    cls = getattr(builtins, name, None) if isinstance(name, str) else None
    if isinstance(cls, type) and issubclass(cls, Exception) and not issubclass(cls, _NOT_REPLAYED):
        try:
            return cls(message)
        except Exception:  # noqa: BLE001 -- e.g. UnicodeDecodeError needs five arguments
            pass
    if isinstance(cls, type) and issubclass(cls, BaseException):  # SystemExit, KeyboardInterrupt, GeneratorExit
        return SolutionBroke("error", f"the solution raised {name}: {message}")
    return SolutionError(f"{str(name)[:100]}: {message}")


class Channel:
    """The judge's end of one test's socket to the solution."""

    def __init__(self, sock, max_bytes):
        self.sock, self.reader, self.broken = sock, wire.LineReader(sock, max_bytes), None

    def _fail(self, status, detail):
        if self.broken is None:
            self.broken = SolutionBroke(status, detail)
        raise self.broken

    def request(self, message):
        if self.broken is not None:
            raise self.broken
        try:
            self.sock.sendall(wire.dumps(message))
            reply = self.reader.read()
        except OSError as exc:
            self._fail("crash", f"the solution's process is gone ({type(exc).__name__})")
        except wire.NotPlainData as exc:
            self._fail("error", f"malformed reply from the solution: {exc}")
        if reply is None:
            self._fail("crash", "the solution's process exited without answering")
        if "load_error" in reply:
            self._fail("error", str(reply["load_error"])[:500])
        return reply

    def exports(self, names):
        reply = self.request({"op": "exports", "names": names})
        exports = reply.get("exports")
        if type(exports) is not dict:
            self._fail("error", "malformed reply from the solution: no exports")
        bound = {}
        for name in names:
            info = exports.get(name)
            kind = info.get("kind") if type(info) is dict else None
            if kind == "function":
                bound[name] = SolutionFunction(self, name)
            elif kind == "value":
                try:
                    bound[name] = wire.decode(info.get("value"))
                except wire.NotPlainData as exc:
                    self._fail("error", f"malformed value of {name}: {exc}")
            elif kind == "module" and info.get("module") == name:
                try:  # our own copy of the module the solution imported under the same name
                    bound[name] = importlib.import_module(name)
                except ImportError:
                    pass
        return bound

    def call(self, name, args, kwargs):
        ref = lambda v: v.__name__ if type(v) is SolutionFunction and v._channel is self else None  # noqa: E731
        try:
            wire_args = [wire.encode(a, ref) for a in args]
            wire_kwargs = [[k, wire.encode(v, ref)] for k, v in kwargs.items()]
        except (wire.NotPlainData, RecursionError) as exc:
            raise UnsupportedTest(f"an argument of {name}() cannot cross to the solution: {exc}") from None
        reply = self.request({"op": "call", "name": name, "args": wire_args, "kwargs": wire_kwargs})
        if "value" in reply:
            try:
                value = wire.decode(reply["value"])
                after = reply.get("after")
                if after is not None:
                    self._write_back(args, after)
            except (wire.NotPlainData, TypeError, ValueError) as exc:
                self._fail("error", f"malformed reply from the solution: {exc}")
            return value
        if "raised" in reply:
            exc = _exception_for(reply["raised"], str(reply.get("message", ""))[:500])
            if isinstance(exc, SolutionBroke):
                self._fail(exc.status, str(exc))
            raise exc
        if "unsupported" in reply:
            self._fail("error", str(reply["unsupported"])[:500])
        self._fail("error", "malformed reply from the solution")

    @staticmethod
    def _write_back(args, after):
        if type(after) is not list or len(after) != len(args):
            raise TypeError("bad 'after'")
        for arg, changed in zip(args, after):
            if changed is None or type(arg) not in (list, dict, set):
                continue
            new = wire.decode(changed)
            if type(new) is not type(arg):
                raise TypeError("an argument changed type")
            if type(arg) is list:
                arg[:] = new
            else:
                arg.clear()
                arg.update(new)

    def close(self):
        self.sock.close()


def run_test(control, index, task, names, state):
    """(status, detail) of one test."""
    mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    channel = Channel(mine, task["max_message_bytes"])
    try:
        try:
            socket.send_fds(control, [b"test"], [theirs.fileno()])
        except OSError as exc:
            return "crash", f"the solution's server is gone ({type(exc).__name__})"
        finally:
            theirs.close()
        signal.setitimer(signal.ITIMER_REAL, task["timeout_s"])
        ns = {"__name__": "__test__", "__builtins__": builtins}
        ns.update(channel.exports(names))
        entry_point = task["entry_point"]
        if entry_point and not isinstance(ns.get(entry_point), SolutionFunction):
            return "error", f"the solution defines no function {entry_point}()"
        if task["entry"]:
            exec(compile(task["entry"], "entry.py", "exec"), ns)
        exec(compile(task["tests"][index], f"test_{index}.py", "exec"), ns)
        if entry_point:
            ns["check"](SolutionFunction(channel, entry_point))
        outcome = "pass", ""
    except TestTimeout:
        outcome = "timeout", f"no result within {task['timeout_s']:.3g} s"
    except SolutionBroke as exc:
        outcome = exc.status, str(exc)
    except UnsupportedTest as exc:
        outcome = "unsupported", str(exc)
    except AssertionError as exc:
        outcome = "fail", f"AssertionError: {exc}"
    except BaseException as exc:  # noqa: BLE001 -- any other exception fails the test
        outcome = "error", f"{type(exc).__name__}: {exc}"
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        channel.close()
    if state["timed_out"]:
        return "timeout", f"no result within {task['timeout_s']:.3g} s"
    if channel.broken is not None:  # the test caught the error, but the solution still broke
        return channel.broken.status, str(channel.broken)
    return outcome


def main():
    task = json.loads(sys.stdin.buffer.read())
    try:  # neither ptrace-able nor readable through /proc by anything, whatever the uids
        ctypes.CDLL(None).prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0)
    except Exception:  # noqa: BLE001
        pass
    state = {"timed_out": False}

    def on_alarm(signum, frame):
        state["timed_out"] = True
        raise TestTimeout()

    signal.signal(signal.SIGALRM, on_alarm)
    control = socket.socket(fileno=_CONTROL_FD)
    out = os.fdopen(_RESULT_FD, "w", buffering=1)
    for index, names in enumerate(task["names"]):
        state["timed_out"] = False
        try:
            status, detail = run_test(control, index, task, names, state)
        except TestTimeout:  # the alarm fired in the judge's own bookkeeping, after the test had run
            status, detail = "timeout", f"no result within {task['timeout_s']:.3g} s"
        out.write(json.dumps([index, status, str(detail)[:500]]) + "\n")
    control.close()
    out.close()


try:
    main()
except BaseException as exc:  # noqa: BLE001 -- tell the reward, which raises: a judge failure is never a score
    try:
        os.write(_RESULT_FD, (json.dumps({"judge_error": f"{type(exc).__name__}: {exc}"[:2000]}) + "\n").encode())
    finally:
        os._exit(1)
