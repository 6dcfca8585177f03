"""Run untrusted code in a local sandbox.

`run_sandboxed` is blocking (call it through `asyncio.to_thread` from async code). One run:

* a throw-away directory (0700, root only) holds the launch config; it is removed afterwards;
* `unshare -m -n -p -f --kill-child --mount-proc` gives the run its own mount, network (loopback only, down) and
  pid namespaces: when the run's first process exits or is killed, the kernel kills every process in it;
* inside, launcher.py runs as a trusted *launcher* (fresh single-threaded process, no `preexec_fn` in the threaded
  parent): it remounts every existing mount read-only, mounts a size-capped private tmpfs on /tmp holding the working
  directory, covers every top-level directory but the system's (/usr, /etc, /bin, /lib*, /dev, /proc) with an
  empty tmpfs, sets rlimits (CPU, address space, processes, file size, open files, no core), switches to a
  private uid (one per concurrent run, from a lock-file pool) with no supplementary groups and no_new_privs, and
  execs the program with a stripped environment;
* with a `Peer`, the run holds two programs: a trusted main program (say, a judge) and an untrusted peer, each with
  its own private uid, directory and rlimits, the peer in a pid namespace nested in the run's (see launcher.py);
* the parent reads stdout/stderr (and an optional result pipe) incrementally, keeping only the first bytes, kills the
  process group at the wall-clock deadline, and finally kills anything still running under the run's uids.

Without root, a user namespace (`unshare -U -r ...`) gives the same namespaces but no private uid (the programs then
run as namespace root with every capability dropped); where `unshare` does not work at all the code runs with
rlimits only, and a warning says so once.
"""
from __future__ import annotations

import base64
import dataclasses
import fcntl
import json
import logging
import os
import selectors
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from dataclasses import dataclass, field

from rewards.sandbox import launcher
from rewards.sandbox.limits import SandboxLimits

_UID_POOL = 4096

log = logging.getLogger(__name__)

@dataclass
class SandboxResult:
    returncode: int | None
    stdout: bytes
    stderr: bytes
    results: bytes = b""
    timed_out: bool = False
    truncated: dict[str, bool] = field(default_factory=dict)
    wall_s: float = 0.0
    isolation: str = ""
    uid: int | None = None  # the main program's private uid (None without one)
    peer_uid: int | None = None  # the peer's, in a run with a Peer


@dataclass(frozen=True)
class Peer:
    """The untrusted second program of a run: its files go to its own working directory, it runs as its own uid
    under its own limits (`wall_s` and `tmpfs_mb` come from the run's), with the control socket on fd 3 and the
    run's stdout and stderr; "{python}" in `argv` as for the main program."""

    files: dict[str, str | bytes]
    argv: list[str]
    limits: SandboxLimits
    run_here: bool = False  # a Python script the launcher's forked copy runs itself (launcher._prepare_here)

@dataclass(frozen=True)
class Isolation:
    mode: str  # "namespaces" (root), "userns" (unprivileged user namespace) or "none"
    prefix: tuple[str, ...]
    private_uid: bool  # whether each run gets its own uid (needs root)

_isolation: Isolation | None = None
_isolation_lock = threading.Lock()

def _try(cmd: list[str]) -> str | None:
    try:
        out = subprocess.run(cmd + ["true"], capture_output=True, timeout=10, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return str(exc)
    return None if out.returncode == 0 else (out.stderr.decode(errors="replace").strip() or f"rc={out.returncode}")

def isolation() -> Isolation:
    """Which isolation this machine allows; probed once per process."""
    global _isolation
    with _isolation_lock:
        if _isolation is not None:
            return _isolation
        ns = ("-m", "-n", "-p", "-f", "--kill-child", "--mount-proc")
        unshare = shutil.which("unshare") or ("/usr/bin/unshare" if os.path.exists("/usr/bin/unshare") else None)
        root = os.geteuid() == 0
        errors = []
        if unshare is None:
            errors.append("`unshare` (util-linux) not found")
        else:
            if root:
                err = _try([unshare, *ns])
                if err is None:
                    _isolation = Isolation("namespaces", (unshare, *ns), private_uid=True)
                    return _isolation
                errors.append(f"unshare {' '.join(ns)}: {err}")
            err = _try([unshare, "-U", "-r", *ns])
            if err is None:
                log.warning(
                    "sandbox: running without root: user namespace isolation (no network, private /tmp, pid "
                    "namespace) but no private uid, so the process limit (RLIMIT_NPROC) counts the processes "
                    "of your own user")
                _isolation = Isolation("userns", (unshare, "-U", "-r", *ns), private_uid=False)
                return _isolation
            errors.append(f"unshare -U -r {' '.join(ns)}: {err}")
        log.warning(
            "sandbox: NO NETWORK ISOLATION and no private file system: untrusted code can open network "
            "connections and write to world-writable directories (rlimits%s still apply). Reason: %s",
            " and a private uid" if root else "", "; ".join(errors))
        _isolation = Isolation("none", (), private_uid=root)
        return _isolation

# ---- private uids: one per concurrent run, across processes (flock on a per-uid lock file) ----

def _uid_base() -> int:
    """A block of _UID_POOL uids no account uses, inside this (possibly namespaced) machine's uid map."""
    preferred = 1_900_000_000
    try:
        with open("/proc/self/uid_map") as fh:
            ranges = [tuple(int(x) for x in line.split()) for line in fh if line.strip()]
    except OSError:
        return preferred
    for inside, _outside, count in ranges:
        if inside <= preferred and preferred + _UID_POOL <= inside + count:
            return preferred
    inside, _outside, count = max(ranges, key=lambda r: r[0] + r[2])
    return inside + count - _UID_POOL - 1

class _UidSlot:
    def __init__(self) -> None:
        lock_dir = os.path.join(tempfile.gettempdir(), "slipstream-sandbox-uids")
        os.makedirs(lock_dir, mode=0o700, exist_ok=True)
        base = _uid_base()
        start = int.from_bytes(os.urandom(2), "little") % _UID_POOL
        for i in range(_UID_POOL):
            slot = (start + i) % _UID_POOL
            fd = os.open(os.path.join(lock_dir, f"{slot}.lock"), os.O_CREAT | os.O_RDWR, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                continue
            self.fd, self.uid = fd, base + slot
            return
        raise RuntimeError(f"sandbox: all {_UID_POOL} private uids are in use")

    def release(self) -> None:
        os.close(self.fd)

def _pids_of_uids(uids: set[int]) -> list[int]:
    pids = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/status") as fh:
                for line in fh:
                    if line.startswith("State:") and line.split()[1] == "Z":
                        break  # a zombie holds nothing but its pid; its parent reaps it
                    if line.startswith("Uid:"):
                        if uids.intersection(int(x) for x in line.split()[1:]):
                            pids.append(int(name))
                        break
        except (OSError, ValueError):
            continue
    return pids


def kill_uid(*uids: int, rounds: int = 50) -> int:
    """SIGKILL every process running as any of `uids` until none is left; returns how many were killed. One scan
    of /proc per round covers all of them (a run has up to two private uids)."""
    wanted = set(uids)
    killed = 0
    for _ in range(rounds):
        pids = _pids_of_uids(wanted)
        if not pids:
            return killed
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
                killed += 1
            except (ProcessLookupError, PermissionError):
                pass
        time.sleep(0.01)
    if _pids_of_uids(wanted):
        log.error("sandbox: processes of uid(s) %s survive SIGKILL", sorted(wanted))
    return killed


# ---- the interpreter as the sandbox sees it ----

def python_inside() -> tuple[str, str, dict[str, str]]:
    """(path of this interpreter inside the sandbox, prefix to bind there, extra env) -- the interpreter may live
    in a directory the private uid cannot enter (e.g. /root/.pyenv), so its prefix is bind-mounted read-only."""
    exe = os.path.realpath(sys.executable)
    prefix = os.path.realpath(sys.base_prefix)
    if not exe.startswith(prefix + os.sep):
        return exe, "", {}
    inside = launcher.PYTHON_MOUNT + exe[len(prefix):]
    env = {}
    libdir = sysconfig.get_config_var("LIBDIR")
    if sysconfig.get_config_var("Py_ENABLE_SHARED") and libdir:
        libdir = os.path.realpath(libdir)
        if libdir.startswith(prefix):
            env["LD_LIBRARY_PATH"] = launcher.PYTHON_MOUNT + libdir[len(prefix):]
    return inside, prefix, env

# ---- the run ----

def run_sandboxed(
    files: dict[str, str | bytes],
    argv: list[str],
    limits: SandboxLimits | None = None,
    *,
    stdin: bytes = b"",
    result_channel: bool = False,
    max_result_bytes: int = 1 << 20,
    peer: Peer | None = None,
    run_here: bool = False,
) -> SandboxResult:
    """Write `files` into a fresh working directory and run `argv` there under the sandbox.

    In `argv`, "{python}" stands for an isolated Python interpreter (add "-I", "-S" yourself). With
    `result_channel` the program gets a pipe on fd 3 whose content comes back as `SandboxResult.results`. With a
    `peer`, `argv` is the trusted main program (its directory is its own, stdout/stderr on /dev/null, the control
    socket on fd 4) and the run's stdout/stderr are the peer's. `run_here`: the main program is a trusted Python
    script that the launcher runs in its own interpreter (no second interpreter start; see launcher._run_here).
    """
    limits = limits or SandboxLimits()
    for name in [*files, *(peer.files if peer else ())]:
        if not name or "/" in name or name.startswith("."):
            raise ValueError(f"sandbox file name {name!r} must be a plain name")
    iso = isolation()
    python, python_prefix, python_env = python_inside() if iso.mode in ("namespaces", "userns") else (sys.executable, "", {})
    slots: list[_UidSlot] = []
    tmp = tempfile.mkdtemp(prefix="slipstream-sandbox-")
    read_end = write_end = status_read = status_write = None
    t0 = time.monotonic()
    proc = feeder = None
    try:
        if iso.private_uid:
            slots = [_UidSlot() for _ in range(2 if peer else 1)]
        uid, peer_uid = (slots[0].uid if slots else None), (slots[1].uid if len(slots) > 1 else None)
        in_namespace = iso.mode in ("namespaces", "userns")
        root = launcher.SANDBOX_ROOT if in_namespace else tmp
        workdir = os.path.join(root, "main" if peer else "work")
        encode = lambda fs: {k: base64.b64encode(v.encode() if isinstance(v, str) else v).decode()  # noqa: E731
                             for k, v in fs.items()}
        argv_of = lambda args: [python if a == "{python}" else a for a in args]  # noqa: E731
        env_of = lambda home: {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8",  # noqa: E731
                               "HOME": home, "TMPDIR": home, "PYTHONDONTWRITEBYTECODE": "1", **python_env}
        if result_channel:
            read_end, write_end = os.pipe()
        status_read, status_write = os.pipe()
        config = {
            "mode": iso.mode, "uid": uid, "workdir": workdir, "files": encode(files), "argv": argv_of(argv),
            "env": env_of(workdir), "limits": dataclasses.asdict(limits), "result_fd": write_end,
            "status_fd": status_write, "python_prefix": python_prefix, "run_here": run_here,
        }
        if peer is not None:
            peer_dir = os.path.join(root, "work")
            peer_limits = dataclasses.replace(peer.limits, wall_s=limits.wall_s, tmpfs_mb=limits.tmpfs_mb)
            config["peer"] = {"uid": peer_uid, "workdir": peer_dir, "files": encode(peer.files),
                              "argv": argv_of(peer.argv), "env": env_of(peer_dir), "run_here": peer.run_here,
                              "limits": dataclasses.asdict(peer_limits)}
        config_path = os.path.join(tmp, "launch.json")
        with open(os.open(config_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as fh:
            json.dump(config, fh)
        if not in_namespace and iso.private_uid:
            os.chmod(tmp, 0o711)  # the private uids must reach their directories inside it (not list it)
        cmd = [*iso.prefix, sys.executable, "-I", "-S", os.path.abspath(launcher.__file__), config_path]
        proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=tmp,
            env={"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"}, start_new_session=True,
            pass_fds=(status_write,) + ((write_end,) if write_end is not None else ()))
        os.close(status_write)
        status_write = None
        if write_end is not None:
            os.close(write_end)
            write_end = None
        # stdin is written from a thread while the pipes are pumped, so neither side can block the other whatever
        # its size.
        feeder = threading.Thread(target=_feed, args=(proc.stdin, stdin), daemon=True)
        feeder.start()
        streams = {"stdout": proc.stdout.fileno(), "stderr": proc.stderr.fileno()}
        if read_end is not None:
            streams["results"] = read_end
        caps = {"stdout": limits.max_output_bytes, "stderr": limits.max_output_bytes, "results": max_result_bytes}
        out, timed_out, truncated = _pump(proc, streams, caps, t0 + limits.wall_s)
        if timed_out:
            _stop(proc, iso)
        # The launcher writes "X" just before exec (the pipe is close-on-exec, so the untrusted program cannot
        # write to it) or "E<why>" when it could not set the sandbox up: that is an error, not a score.
        status = _read_all(status_read)
        if status != b"X" and not timed_out:
            why = status.partition(b"E")[2].decode(errors="replace") or out["stderr"].decode(errors="replace")[-2000:]
            raise RuntimeError(f"sandbox could not start ({iso.mode}): {why.strip()}")
        try:
            returncode = proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            _stop(proc, iso)
            returncode = proc.wait()
        return SandboxResult(
            returncode=None if timed_out else returncode, stdout=out["stdout"], stderr=out["stderr"],
            results=out.get("results", b""), timed_out=timed_out, truncated=truncated,
            wall_s=time.monotonic() - t0, isolation=iso.mode, uid=uid, peer_uid=peer_uid)
    finally:
        if proc is not None:
            _stop(proc, iso)
            for stream in (proc.stdout, proc.stderr):
                stream.close()
            if proc.returncode is None:
                proc.wait()
        if feeder is not None:
            feeder.join(timeout=5)
        for fd in (read_end, write_end, status_read, status_write):
            if fd is not None:
                os.close(fd)
        if slots:
            kill_uid(*(slot.uid for slot in slots))
        for slot in slots:
            slot.release()
        shutil.rmtree(tmp, ignore_errors=True)


def _feed(pipe, data: bytes) -> None:
    try:
        pipe.write(data)
    except (BrokenPipeError, ValueError, OSError):
        pass
    finally:
        try:
            pipe.close()
        except (BrokenPipeError, OSError):
            pass


def _read_all(fd: int) -> bytes:
    os.set_blocking(fd, False)
    data = b""
    while len(data) < 65536:
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            break
        if not chunk:
            break
        data += chunk
    return data

def _children_of(pid: int) -> list[int]:
    kids = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as fh:
                    if int(fh.read().rpartition(")")[2].split()[1]) == pid:
                        kids.append(int(name))
            except (OSError, ValueError, IndexError):
                pass
    return kids

def _stop(proc, iso: Isolation) -> None:
    """Kill the run. Under `unshare`, kill its child (the pid namespace's init: the kernel then kills the whole
    namespace) and let `unshare` reap it and exit, so no zombie is left to the host's init; then the group."""
    if proc.poll() is None and iso.prefix:
        for pid in _children_of(proc.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        try:
            proc.wait(timeout=2)
        except subprocess.TimeoutExpired:
            pass
    _killpg(proc.pid)

def _killpg(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass

def _pump(proc, streams: dict[str, int], caps: dict[str, int], deadline: float):
    """Read the pipes until they close or the deadline passes, keeping at most `caps[name]` bytes of each
    (the rest is read and dropped, so a chatty program never blocks on a full pipe)."""
    out = {name: bytearray() for name in streams}
    truncated = {name: False for name in streams}
    sel = selectors.DefaultSelector()
    for name, fd in streams.items():
        os.set_blocking(fd, False)
        sel.register(fd, selectors.EVENT_READ, name)
    exited_at = None
    timed_out = False
    try:
        while sel.get_map():
            now = time.monotonic()
            if now >= deadline:
                timed_out = True
                break
            if exited_at is None and proc.poll() is not None:
                exited_at = now
            if exited_at is not None and now - exited_at > 1.0:
                break  # the launcher is gone but something (outside a pid namespace) holds a pipe open
            for key, _ in sel.select(timeout=min(0.1, deadline - now)):
                name = key.data
                try:
                    chunk = os.read(key.fd, 1 << 16)
                except BlockingIOError:
                    continue
                if not chunk:
                    sel.unregister(key.fd)
                    continue
                room = caps[name] - len(out[name])
                if room > 0:
                    out[name] += chunk[:room]
                if len(chunk) > max(room, 0):
                    truncated[name] = True
    finally:
        sel.close()
    return {k: bytes(v) for k, v in out.items()}, timed_out, truncated
