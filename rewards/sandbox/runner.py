"""Run untrusted code in a local sandbox.

`run_sandboxed` is blocking (call it through `asyncio.to_thread` from async code). One run:

* a throw-away directory (0700, root only) holds the launch config; it is removed afterwards;
* `unshare -m -n -p -f --kill-child --mount-proc` gives the run its own mount, network (loopback only, down) and
  pid namespaces: when the run's first process exits or is killed, the kernel kills every process in it;
* inside, this file runs as a trusted *launcher* (fresh single-threaded process, no `preexec_fn` in the threaded
  parent): it remounts every existing mount read-only, mounts a size-capped private tmpfs on /tmp holding the working
  directory, hides /root, sets rlimits (CPU, address space, processes, file size, open files, no core), switches to a
  private uid (one per concurrent run, from a lock-file pool) with no supplementary groups and no_new_privs, and
  execs the program with a stripped environment;
* the parent reads stdout/stderr (and an optional result pipe) incrementally, keeping only the first bytes, kills the
  process group at the wall-clock deadline, and finally kills anything still running under the run's uid.

Without root, a user namespace (`unshare -U -r ...`) gives the same namespaces but no private uid; where `unshare`
does not work at all the code runs with rlimits only, and a warning says so once.
"""
from __future__ import annotations

import base64
import ctypes
import json
import os
import resource
import signal
import sys

_RESULT_FD = 3  # the fd number the sandboxed program sees its result pipe on
_SANDBOX_ROOT = "/tmp"  # where the private tmpfs is mounted inside the mount namespace
_WORKDIR = "/tmp/work"
_PYTHON_MOUNT = "/tmp/.python"
_HIDDEN_DIRS = ("/root",)
_UID_POOL = 4096

if __name__ != "__main__":  # the launcher (run as a script, -I -S) needs only the standard library
    import dataclasses
    import fcntl
    import logging
    import selectors
    import shutil
    import subprocess
    import sysconfig
    import tempfile
    import threading
    import time
    from dataclasses import dataclass, field

    from rewards.sandbox.limits import SandboxLimits

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
        uid: int | None = None

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

    def _pids_of_uid(uid: int) -> list[int]:
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
                            if uid in (int(x) for x in line.split()[1:]):
                                pids.append(int(name))
                            break
            except (OSError, ValueError):
                continue
        return pids

    def kill_uid(uid: int, rounds: int = 50) -> int:
        """SIGKILL every process running as `uid` until none is left; returns how many were killed."""
        killed = 0
        for _ in range(rounds):
            pids = _pids_of_uid(uid)
            if not pids:
                return killed
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                    killed += 1
                except (ProcessLookupError, PermissionError):
                    pass
            time.sleep(0.01)
        if _pids_of_uid(uid):
            log.error("sandbox: processes of uid %d survive SIGKILL", uid)
        return killed

    # ---- the interpreter as the sandbox sees it ----

    def python_inside() -> tuple[str, str, dict[str, str]]:
        """(path of this interpreter inside the sandbox, prefix to bind there, extra env) -- the interpreter may live
        in a directory the private uid cannot enter (e.g. /root/.pyenv), so its prefix is bind-mounted read-only."""
        exe = os.path.realpath(sys.executable)
        prefix = os.path.realpath(sys.base_prefix)
        if not exe.startswith(prefix + os.sep):
            return exe, "", {}
        inside = _PYTHON_MOUNT + exe[len(prefix):]
        env = {}
        libdir = sysconfig.get_config_var("LIBDIR")
        if sysconfig.get_config_var("Py_ENABLE_SHARED") and libdir:
            libdir = os.path.realpath(libdir)
            if libdir.startswith(prefix):
                env["LD_LIBRARY_PATH"] = _PYTHON_MOUNT + libdir[len(prefix):]
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
    ) -> SandboxResult:
        """Write `files` into a fresh working directory and run `argv` there under the sandbox.

        In `argv`, "{python}" stands for an isolated Python interpreter (add "-I", "-S" yourself). With
        `result_channel` the program gets a pipe on fd 3 whose content comes back as `SandboxResult.results`.
        """
        limits = limits or SandboxLimits()
        if len(stdin) > 60_000:
            raise ValueError("sandbox stdin is limited to 60000 bytes")
        for name in files:
            if not name or "/" in name or name.startswith("."):
                raise ValueError(f"sandbox file name {name!r} must be a plain name")
        iso = isolation()
        python, python_prefix, python_env = python_inside() if iso.mode == "namespaces" else (sys.executable, "", {})
        slot = _UidSlot() if iso.private_uid else None
        tmp = tempfile.mkdtemp(prefix="slipstream-sandbox-")
        read_end = write_end = status_read = status_write = None
        t0 = time.monotonic()
        proc = None
        try:
            workdir = _WORKDIR if iso.mode in ("namespaces", "userns") else os.path.join(tmp, "work")
            env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "HOME": workdir,
                   "TMPDIR": workdir, "PYTHONDONTWRITEBYTECODE": "1", **python_env}
            if result_channel:
                read_end, write_end = os.pipe()
            status_read, status_write = os.pipe()
            config = {
                "mode": iso.mode,
                "uid": slot.uid if slot else None,
                "workdir": workdir,
                "files": {k: base64.b64encode(v.encode() if isinstance(v, str) else v).decode() for k, v in files.items()},
                "argv": [python if a == "{python}" else a for a in argv],
                "env": env,
                "limits": dataclasses.asdict(limits),
                "result_fd": write_end,
                "status_fd": status_write,
                "python_prefix": python_prefix,
            }
            config_path = os.path.join(tmp, "launch.json")
            with open(config_path, "w") as fh:
                json.dump(config, fh)
            cmd = [*iso.prefix, sys.executable, "-I", "-S", os.path.abspath(__file__), config_path]
            proc = subprocess.Popen(
                cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=tmp,
                env={"PATH": env["PATH"], "LANG": "C.UTF-8"}, start_new_session=True,
                pass_fds=(status_write,) + ((write_end,) if write_end is not None else ()))
            os.close(status_write)
            status_write = None
            if write_end is not None:
                os.close(write_end)
                write_end = None
            try:
                proc.stdin.write(stdin)
            except BrokenPipeError:
                pass
            finally:
                try:
                    proc.stdin.close()
                except BrokenPipeError:
                    pass
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
                wall_s=time.monotonic() - t0, isolation=iso.mode, uid=slot.uid if slot else None)
        finally:
            if proc is not None:
                _stop(proc, iso)
                for stream in (proc.stdout, proc.stderr):
                    stream.close()
                if proc.returncode is None:
                    proc.wait()
            for fd in (read_end, write_end, status_read, status_write):
                if fd is not None:
                    os.close(fd)
            if slot is not None:
                kill_uid(slot.uid)
                slot.release()
            shutil.rmtree(tmp, ignore_errors=True)

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


# ---------------------------------------------------------------------------------------------------------------
# The launcher: `python -I -S runner.py CONFIG`, run inside the fresh namespaces, as root (or namespace root).
# Standard library only; it ends by exec'ing the untrusted program.

_MS_RDONLY, _MS_NOSUID, _MS_NODEV, _MS_NOEXEC = 1, 2, 4, 8
_MS_REMOUNT, _MS_BIND, _MS_REC, _MS_PRIVATE = 32, 4096, 16384, 1 << 18
_PR_SET_NO_NEW_PRIVS = 38


def _libc():
    return ctypes.CDLL(None, use_errno=True)


def _mount(libc, source, target, fstype, flags, data=None) -> None:
    enc = lambda s: None if s is None else s.encode()  # noqa: E731
    if libc.mount(enc(source), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {source} on {target}: {os.strerror(err)}")


def _mount_points() -> list[str]:
    points = []
    with open("/proc/self/mountinfo") as fh:
        for line in fh:
            raw = line.split()[4]
            points.append(raw.encode().decode("unicode_escape"))  # \040 etc.
    return points


def _readonly_everything(libc) -> None:
    """Bind-remount every mount of this (private) mount namespace read-only; keeps nosuid/nodev/noexec."""
    flag_map = ((os.ST_NOSUID, _MS_NOSUID), (os.ST_NODEV, _MS_NODEV), (os.ST_NOEXEC, _MS_NOEXEC))
    for point in _mount_points():
        try:
            st = os.statvfs(point)
            flags = _MS_REMOUNT | _MS_BIND | _MS_RDONLY
            for st_flag, ms_flag in flag_map:
                if st.f_flag & st_flag:
                    flags |= ms_flag
            _mount(libc, None, point, None, flags)
        except OSError:
            pass  # over-mounted or vanished: nothing reachable to protect


def _write_files(workdir: str, files: dict[str, str], uid: int | None) -> None:
    os.makedirs(workdir, mode=0o700, exist_ok=True)
    for name, data in files.items():
        path = os.path.join(workdir, name)
        with open(path, "wb") as fh:
            fh.write(base64.b64decode(data))
        os.chmod(path, 0o644)
    if uid is not None:
        os.chown(workdir, uid, uid)


def _count_processes_of(uid: int) -> int:
    n = 0
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                if os.stat(f"/proc/{name}").st_uid == uid:
                    n += 1
            except OSError:
                pass
    return n


def _launch(config_path: str) -> None:
    with open(config_path) as fh:
        cfg = json.load(fh)
    os.set_inheritable(cfg["status_fd"], False)
    mode, uid, workdir, limits = cfg["mode"], cfg["uid"], cfg["workdir"], cfg["limits"]
    libc = _libc()
    if mode in ("namespaces", "userns"):
        _mount(libc, None, "/", None, _MS_REC | _MS_PRIVATE)
        _readonly_everything(libc)
        _mount(libc, "tmpfs", _SANDBOX_ROOT, "tmpfs", _MS_NOSUID | _MS_NODEV,
               f"size={int(limits['tmpfs_mb'])}m,mode=1777")
        if cfg["python_prefix"]:
            os.mkdir(_PYTHON_MOUNT, 0o755)
            _mount(libc, cfg["python_prefix"], _PYTHON_MOUNT, None, _MS_BIND | _MS_REC)
            _mount(libc, None, _PYTHON_MOUNT, None, _MS_REMOUNT | _MS_BIND | _MS_RDONLY | _MS_NOSUID | _MS_NODEV)
        for hidden in _HIDDEN_DIRS:
            if os.path.isdir(hidden) and not _PYTHON_MOUNT.startswith(hidden):
                try:
                    _mount(libc, "tmpfs", hidden, "tmpfs", _MS_RDONLY | _MS_NOSUID | _MS_NODEV, "size=1m,mode=755")
                except OSError:
                    pass
    _write_files(workdir, cfg["files"], uid)
    os.chdir(workdir)

    result_fd = cfg["result_fd"]
    if result_fd is not None:
        if result_fd != _RESULT_FD:
            os.dup2(result_fd, _RESULT_FD)
            os.close(result_fd)
        os.set_inheritable(_RESULT_FD, True)

    nproc = int(limits["max_processes"])
    if uid is None and mode == "none":
        nproc += _count_processes_of(os.getuid())  # RLIMIT_NPROC counts all processes of this (host) user
    mem = int(limits["memory_mb"]) * 1024 * 1024
    cpu = int(limits["cpu_s"])
    fsize = int(limits["max_file_mb"]) * 1024 * 1024
    for res, value in ((resource.RLIMIT_CPU, (cpu, cpu + 1)), (resource.RLIMIT_AS, (mem, mem)),
                       (resource.RLIMIT_NPROC, (nproc, nproc)), (resource.RLIMIT_FSIZE, (fsize, fsize)),
                       (resource.RLIMIT_CORE, (0, 0)),
                       (resource.RLIMIT_NOFILE, (int(limits["max_open_files"]),) * 2)):
        resource.setrlimit(res, value)
    if uid is not None:
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)
    if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")
    os.umask(0o077)
    argv = cfg["argv"]
    if not os.access(argv[0], os.X_OK):
        raise PermissionError(f"{argv[0]} cannot be executed by the sandbox user (uid {os.getuid()})")
    os.write(cfg["status_fd"], b"X")
    os.execve(argv[0], argv, cfg["env"])


if __name__ == "__main__":
    try:
        _launch(sys.argv[1])
    except BaseException as exc:  # noqa: BLE001 -- report and fail closed
        message = f"sandbox launcher failed: {type(exc).__name__}: {exc}"
        try:
            with open(sys.argv[1]) as fh:
                os.write(json.load(fh)["status_fd"], b"E" + message.encode()[:4000])
        except Exception:  # noqa: BLE001
            sys.stderr.write(message + "\n")
        os._exit(125)
