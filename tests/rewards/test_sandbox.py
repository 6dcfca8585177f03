"""Hostile solutions are contained by the sandbox: each yields a score, leaves no process behind, and this (the
test) process and an unrelated process of ours survive."""
from __future__ import annotations

import asyncio
import logging
import os
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid

import psutil
import pytest

from rewards import RewardInput, get_reward
from rewards.sandbox import SandboxLimits, isolation, run_sandboxed
from rewards.sandbox import runner

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the sandbox is Linux only")

ADD_TESTS = {"tests": ["assert add(1, 2) == 3", "assert add(-1, 1) == 0"]}


def score(code: str, label=ADD_TESTS, **kwargs):
    kwargs.setdefault("timeout_s", 1.0)
    return asyncio.run(get_reward("coding")(RewardInput("p", code, label), **kwargs))


@pytest.fixture
def bystander():
    """An unrelated process of ours that hostile code must not be able to kill."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    yield proc
    proc.kill()
    proc.wait()


def assert_contained(result, bystander=None):
    assert 0.0 <= result.score <= 1.0
    me = psutil.Process()
    assert me.is_running()
    for uid in (result.info["sandbox_uid"], result.info["judge_uid"]):
        if uid is not None:
            left = [p.pid for p in psutil.process_iter(["uids"]) if p.info["uids"] and uid in p.info["uids"]]
            assert left == [], f"processes left behind under sandbox uid {uid}: {left}"
    others = [p for p in me.children(recursive=True) if bystander is None or p.pid != bystander.pid]
    assert others == [], f"processes left behind: {others}"
    if bystander is not None:
        assert bystander.poll() is None, "the sandbox killed an unrelated process"


def test_isolation_is_full_on_this_machine():
    # The machines this project runs on allow `unshare` as root; if that changes, the other tests still run, but
    # this one says the containment has degraded.
    iso = isolation()
    if os.geteuid() != 0:
        pytest.skip("not root: the sandbox uses a user namespace or rlimits only")
    assert iso.mode == "namespaces" and iso.private_uid


def test_infinite_loop_times_out(bystander):
    t0 = time.monotonic()
    result = score("def add(a, b):\n    while True:\n        pass\n")
    assert time.monotonic() - t0 < 10
    # Each case is stopped by its wall-clock timeout or, on a loaded machine, first by the CPU-time limit.
    statuses = [case["status"] for case in result.info["cases"]]
    assert result.score == 0.0 and len(statuses) == 2, result.info
    assert set(statuses) <= {"timeout", "crash"}, statuses
    assert_contained(result, bystander)


def test_infinite_loop_at_import_that_ignores_signals():
    code = "import signal\nfor s in (signal.SIGTERM, signal.SIGINT, signal.SIGALRM):\n    signal.signal(s, signal.SIG_IGN)\n" \
           "while True:\n    pass\n"
    result = score(code, {"tests": ["assert True"]})
    assert result.score == 0.0 and result.info["cases"][0]["status"] == "timeout"
    assert_contained(result)


def test_fork_bomb(bystander):
    code = textwrap.dedent("""
        import os
        def add(a, b):
            return a + b
        while True:
            try:
                os.fork()
            except OSError:
                pass
    """)
    t0 = time.monotonic()
    result = score(code)
    assert time.monotonic() - t0 < 15
    assert result.score == 0.0
    assert_contained(result, bystander)
    # and the host can still start processes
    assert subprocess.run([sys.executable, "-c", "pass"]).returncode == 0


def test_fork_bomb_escaping_with_setsid_is_reaped():
    code = textwrap.dedent("""
        import os, time
        def add(a, b):
            return a + b
        for _ in range(5):
            if os.fork() == 0:
                os.setsid()
                if os.fork() == 0:
                    time.sleep(60)
                os._exit(0)
    """)
    result = score(code)
    assert result.score == 1.0  # the daemons do not stop the tests passing...
    assert_contained(result)  # ...and do not outlive the run


def test_memory_blow_up(bystander):
    code = "def add(a, b):\n    x = [bytearray(1 << 20) for _ in range(100_000)]\n    return a + b\n"
    result = score(code, memory_mb=256)
    assert result.score == 0.0
    assert all("MemoryError" in c["detail"] or c["status"] in ("crash", "timeout") for c in result.info["cases"]), \
        result.info
    assert_contained(result, bystander)


def test_writing_outside_the_working_directory():
    name = f"slipstream_escape_{uuid.uuid4().hex}"
    targets = [os.path.join(tempfile.gettempdir(), name), os.path.join("/dev/shm", name),
               os.path.join(os.path.dirname(os.path.abspath(__file__)), name), os.path.join("/var/tmp", name)]
    code = textwrap.dedent(f"""
        import os
        outcomes = []
        for path in {targets!r} + ["escape_inside_workdir"]:
            try:
                with open(path, "w") as fh:
                    fh.write("escaped")
                outcomes.append("wrote " + path)
            except OSError as exc:
                outcomes.append("refused " + path + ": " + type(exc).__name__)
        print(outcomes)
        def add(a, b):
            return a + b
    """)
    try:
        result = score(code, {"tests": ["assert add(1, 2) == 3"]})
        assert result.score == 1.0
        assert "wrote escape_inside_workdir" in result.info["stdout"]  # the code did run and could write its own dir
        for path in targets:
            assert not os.path.exists(path), f"sandboxed code wrote {path}"
        assert_contained(result)
    finally:
        for path in targets:
            if os.path.exists(path):
                os.unlink(path)


def test_reading_the_parents_environment(monkeypatch):
    secret = f"secret-{uuid.uuid4().hex}"
    monkeypatch.setenv("SLIPSTREAM_SANDBOX_SECRET", secret)
    code = textwrap.dedent(f"""
        import os
        found = [repr(dict(os.environ))]
        for pid in [os.getppid(), {os.getpid()}] + [p for p in os.listdir("/proc") if p.isdigit()]:
            try:
                with open("/proc/%s/environ" % pid, "rb") as fh:
                    found.append(fh.read().decode(errors="replace"))
            except OSError:
                pass
        print("RAN", found)
        def add(a, b):
            return a + b
    """)
    result = score(code, {"tests": ["assert add(1, 2) == 3"]})
    assert result.score == 1.0
    assert "RAN" in result.info["stdout"]
    assert secret not in result.info["stdout"] and secret not in result.info["stderr"]
    assert "SLIPSTREAM_SANDBOX_SECRET" not in result.info["stdout"]
    assert_contained(result)


def test_opening_a_network_connection():
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.settimeout(0.5)
    port = listener.getsockname()[1]
    code = textwrap.dedent(f"""
        import socket
        def add(a, b):
            socket.create_connection(("127.0.0.1", {port}), timeout=2).sendall(b"leak")
            return a + b
    """)
    try:
        result = score(code, {"tests": ["assert add(1, 2) == 3"]}, timeout_s=3.0)
        assert result.score == 0.0
        assert result.info["cases"][0]["status"] == "error", result.info
        assert "OSError" in result.info["cases"][0]["detail"] or "Network" in result.info["cases"][0]["detail"]
        with pytest.raises(socket.timeout):
            listener.accept()
        assert_contained(result)
    finally:
        listener.close()


def test_printing_100_mb():
    code = "import sys\nsys.stdout.write('x' * 100_000_000)\nsys.stdout.flush()\ndef add(a, b):\n    return a + b\n"
    t0 = time.monotonic()
    result = score(code, {"tests": ["assert add(1, 2) == 3"]}, timeout_s=5.0, max_output_bytes=1000)
    assert time.monotonic() - t0 < 15
    assert result.score == 1.0
    assert result.info["output_truncated"] and len(result.info["stdout"]) <= 1000
    assert_contained(result)


def test_killing_its_parent_and_everyone_else(bystander):
    code = textwrap.dedent(f"""
        import os, signal
        for pid in (os.getppid(), {os.getpid()}, {bystander.pid}, 1, -1):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        def add(a, b):
            return a + b
    """)
    result = score(code)
    assert result.score == 1.0  # the harness survived and still scored the tests
    assert_contained(result, bystander)


def test_runner_wall_clock_timeout_kills_everything():
    code = "import os, signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\nos.fork()\ntime.sleep(60)\n"
    t0 = time.monotonic()
    res = run_sandboxed({"a.py": code}, ["{python}", "-I", "-S", "a.py"], SandboxLimits(wall_s=1.0))
    assert res.timed_out and res.returncode is None
    assert time.monotonic() - t0 < 5
    if res.uid is not None:
        assert not [p for p in psutil.process_iter(["uids"]) if p.info["uids"] and res.uid in p.info["uids"]]
    assert psutil.Process().children(recursive=True) == []


def test_runner_result_channel_and_stripped_environment():
    code = "import os\nos.write(3, b'via-fd-3')\nprint(sorted(os.environ), os.getcwd())\n"
    res = run_sandboxed({"a.py": code}, ["{python}", "-I", "-S", "a.py"], result_channel=True)
    assert res.returncode == 0, res.stderr
    assert res.results == b"via-fd-3"
    env_keys = eval(res.stdout.decode().split("]")[0] + "]")  # noqa: S307 -- our own output
    assert set(env_keys) <= {"PATH", "LANG", "LC_ALL", "HOME", "TMPDIR", "PYTHONDONTWRITEBYTECODE", "LD_LIBRARY_PATH"}


def test_runner_rejects_path_file_names():
    with pytest.raises(ValueError):
        run_sandboxed({"../x.py": ""}, ["{python}", "-c", "pass"])


def test_without_unshare_it_warns(monkeypatch, caplog):
    monkeypatch.setattr(runner, "_isolation", None)
    monkeypatch.setattr(runner.shutil, "which", lambda name: None)
    monkeypatch.setattr(runner.os.path, "exists", lambda path: False if path == "/usr/bin/unshare" else os.path.lexists(path))
    with caplog.at_level(logging.WARNING, logger="rewards.sandbox.runner"):
        iso = runner.isolation()
    assert iso.mode == "none"
    assert "NO NETWORK ISOLATION" in caplog.text


def test_rlimits_only_fallback_still_scores(monkeypatch):
    # What an unprivileged user without user namespaces gets: no namespaces, no private uid, rlimits only.
    monkeypatch.setattr(runner, "_isolation", runner.Isolation("none", (), private_uid=False))
    good = score("def add(a, b):\n    return a + b\n")
    bad = score("def add(a, b):\n    while True:\n        pass\n")
    assert (good.score, bad.score) == (1.0, 0.0)
    assert good.info["isolation"] == "none"
    assert_contained(good)
    assert_contained(bad)


def test_a_sandbox_that_cannot_start_is_an_error_not_a_zero():
    with pytest.raises(RuntimeError, match="could not start"):
        run_sandboxed({}, ["/nonexistent/program"])
    assert psutil.Process().children(recursive=True) == []
