"""The sandbox launcher: `python -I -S launcher.py CONFIG`, run by `runner.run_sandboxed` inside the fresh
namespaces, as root (or namespace root). Standard library only; it ends by exec'ing the program.

It makes every mount read-only, mounts a private tmpfs on /tmp, hides every top-level directory but the system's
(_VISIBLE_TOP), writes the program's files, sets rlimits, switches to the run's private uid (or, without one, drops
every capability) and execs the program with a stripped environment.

With a *peer* (a second, untrusted program) it first forks the peer into a pid namespace of its own, nested in the
run's, with its own private uid, working directory, rlimits and a control socket on fd 3; the main program gets
the other end of that socket on fd 4, the result pipe on fd 3, stdout and stderr on /dev/null, and becomes init
of the outer pid namespace: the peer cannot see, signal or ptrace it, and holds no fd the main program writes
results to. The run's stdout and stderr are then the peer's.

A program marked `run_here` (a Python script) is not exec'd: this interpreter, or its forked copy for the peer,
runs it after the same steps (rlimits, uid or cleared capabilities, no_new_privs), which saves an interpreter
start and its imports per run; the status fd is closed before the program's first line.
"""
import base64
import ctypes
import fcntl
import json
import os
import resource
import socket
import sys

RESULT_FD = 3  # the fd the main program sees its result pipe on
CONTROL_FD_MAIN, CONTROL_FD_PEER = 4, 3  # the two ends of the main <-> peer control socket
SANDBOX_ROOT = "/tmp"  # where the private tmpfs is mounted inside the mount namespace
WORKDIR = "/tmp/work"
MAIN_WORKDIR = "/tmp/main"  # the main program's own directory when a peer shares the run
PYTHON_MOUNT = "/tmp/.python"
# Top-level directories the programs see (read-only); every other one (/home, /root, /work, /mnt, /opt, /var,
# /srv, /run, /sys...) is covered by an empty tmpfs and every top-level file by /dev/null, so no dataset, checkout
# or home directory on the machine is readable from the sandbox. The interpreter's own prefix is bind-mounted.
_VISIBLE_TOP = frozenset("bin sbin lib lib32 lib64 libx32 usr etc dev proc tmp".split())

_MS_RDONLY, _MS_NOSUID, _MS_NODEV, _MS_NOEXEC = 1, 2, 4, 8
_MS_REMOUNT, _MS_BIND, _MS_REC, _MS_PRIVATE = 32, 4096, 16384, 1 << 18
_PR_SET_NO_NEW_PRIVS, _PR_CAPBSET_DROP, _PR_SET_SECUREBITS, _PR_CAP_AMBIENT = 38, 24, 28, 47
_PR_CAP_AMBIENT_CLEAR_ALL = 4
_SECBIT_NOROOT, _SECBIT_NOROOT_LOCKED = 1, 2
_CLONE_NEWPID, _CLONE_NEWNS = 0x20000000, 0x00020000


def _libc():
    return ctypes.CDLL(None, use_errno=True)


def _mount(libc, source, target, fstype, flags, data=None) -> None:
    enc = lambda s: None if s is None else s.encode()  # noqa: E731
    if libc.mount(enc(source), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {source} on {target}: {os.strerror(err)}")


def _mount_points() -> list:
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


def _hide_the_rest(libc, python_prefix: str) -> None:
    """Cover what is not in _VISIBLE_TOP (see there). Without a bind-mounted prefix the interpreter's own top-level
    directories stay visible, or nothing could start."""
    needed = set() if python_prefix else {os.path.realpath(p).split("/")[1] for p in (sys.executable, sys.base_prefix)}
    for name in os.listdir("/"):
        path = "/" + name
        if name in _VISIBLE_TOP or name in needed or os.path.islink(path):
            continue
        try:
            if os.path.isdir(path):
                _mount(libc, "tmpfs", path, "tmpfs", _MS_RDONLY | _MS_NOSUID | _MS_NODEV, "size=4k,mode=755")
            elif os.path.isfile(path):
                _mount(libc, "/dev/null", path, None, _MS_BIND)
        except OSError:
            pass  # e.g. a mount point we may not cover; it is still read-only


def _write_files(workdir: str, files: dict, uid, private: bool) -> None:
    """`private`: the directory is the owner's alone (0700); else the usual 0700 dir the program owns."""
    os.makedirs(workdir, mode=0o700, exist_ok=True)
    for name, data in files.items():
        path = os.path.join(workdir, name)
        with open(path, "wb") as fh:
            fh.write(base64.b64decode(data))
        os.chmod(path, 0o600 if private else 0o644)
        if uid is not None and private:
            os.chown(path, uid, uid)
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


def _set_limits(limits: dict, mode: str, uid) -> None:
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


def _capabilities_held() -> bool:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(("CapEff:", "CapPrm:")) and int(line.split()[1], 16):
                return True
    return False


def _drop_capabilities(libc) -> None:
    """Without a private uid the program would run as (namespace) root: empty the bounding and ambient sets and lock
    out root's special case, so the exec'd program holds no capability (and cannot, e.g., ptrace a sibling)."""
    if not _capabilities_held():
        return
    with open("/proc/sys/kernel/cap_last_cap") as fh:
        last = int(fh.read())
    for cap in range(last + 1):
        libc.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0)
    libc.prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)
    if libc.prctl(_PR_SET_SECUREBITS, _SECBIT_NOROOT | _SECBIT_NOROOT_LOCKED, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_SECUREBITS): cannot drop root's capabilities")
    with open("/proc/self/status") as fh:
        if any(line.startswith("CapBnd:") and int(line.split()[1], 16) for line in fh):
            raise OSError("the capability bounding set is not empty")


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


def _clear_capabilities(libc) -> None:
    """Empty this process's effective, permitted and inheritable sets now (exec would do it after
    _drop_capabilities; a program run in this interpreter needs it done here)."""
    if not _capabilities_held():
        return
    header, data = _CapHeader(0x20080522, 0), (_CapData * 2)()  # _LINUX_CAPABILITY_VERSION_3
    if libc.capset(ctypes.byref(header), data) != 0 or _capabilities_held():
        raise OSError(ctypes.get_errno(), "capset: cannot clear the capabilities")


def _become(uid, mode: str, limits: dict, libc, in_process: bool = False) -> None:
    """Limits, then the private uid (or no capabilities), then no_new_privs: the last steps before the program.
    `in_process`: the program runs in this interpreter, not through exec."""
    _set_limits(limits, mode, uid)
    if uid is not None:
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)
    else:
        _drop_capabilities(libc)
        if in_process:
            _clear_capabilities(libc)
    if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")
    os.umask(0o077)


def _place_fds(targets: dict, keep: tuple = ()) -> None:
    """Put each source fd on its target number (inheritable) and close every other fd above 2 except `keep`."""
    moved = {target: fcntl.fcntl(source, fcntl.F_DUPFD_CLOEXEC, 100) for target, source in targets.items()}
    for target, temp in moved.items():
        os.dup2(temp, target, inheritable=True)
    spared = sorted({2, *targets, *keep})
    for low, high in zip(spared, spared[1:] + [1 << 20]):
        os.closerange(low + 1, high)


def _exec(argv: list, env: dict, status_fd: int) -> None:
    if not os.access(argv[0], os.X_OK):
        raise PermissionError(f"{argv[0]} cannot be executed by the sandbox user (uid {os.getuid()})")
    os.write(status_fd, b"X")
    os.execve(argv[0], argv, env)


def _prepare_here(argv: list, env: dict, python_prefix: str):
    """Ready this interpreter to run a Python program (`{python} -FLAGS script args...`) itself instead of exec'ing
    a new one: it saves an interpreter start and the imports this launcher already made. Returns the compiled
    script; sys.argv, the environment and sys.path become the program's (the interpreter's own directory may be
    hidden in here; the run's bind mount of it is not)."""
    script_at = next(i for i, arg in enumerate(argv) if i and not arg.startswith("-"))
    path = os.path.abspath(argv[script_at])
    with open(path, encoding="utf-8") as fh:
        code = compile(fh.read(), path, "exec")
    if python_prefix:  # sys.path, and the search path of every package imported so far (encodings, json...)
        moved = lambda paths: [PYTHON_MOUNT + p[len(python_prefix):] if p.startswith(python_prefix) else p  # noqa: E731
                               for p in paths]
        sys.path[:] = moved(sys.path)
        for module in list(sys.modules.values()):
            search = getattr(module, "__path__", None)
            if isinstance(search, list):
                search[:] = moved(search)
        sys.path_importer_cache.clear()
        for name in ("prefix", "exec_prefix", "base_prefix", "base_exec_prefix"):
            setattr(sys, name, moved([getattr(sys, name)])[0])
    sys.executable = argv[0]  # what `exec` would have run, as this file system sees it
    sys.argv = argv[script_at:]
    sys.dont_write_bytecode = True
    os.environ.clear()
    os.environ.update(env)
    return code


def _run_here(code) -> None:
    """Run a program _prepare_here compiled, as `__main__`, and exit with its status (never returns)."""
    status = 0
    try:
        exec(code, {"__name__": "__main__", "__file__": code.co_filename, "__builtins__": __builtins__})
    except SystemExit as exc:
        status = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:  # noqa: BLE001
        import traceback

        traceback.print_exc()
        status = 1
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:  # noqa: BLE001
            pass
    os._exit(status)


def _start_peer(cfg: dict, libc) -> int:
    """Fork the peer (see the module doc); returns the fd of the main program's end of the control socket."""
    peer, mode = cfg["peer"], cfg["mode"]
    # Plain fds from here on: a socket object would close its fd number when collected, after _place_fds moved it.
    main_end, peer_end = (end.detach() for end in socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET))
    if mode in ("namespaces", "userns") and libc.unshare(_CLONE_NEWPID) != 0:
        raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWPID) for the peer")
    pid = os.fork()
    if pid == 0:
        try:
            if mode in ("namespaces", "userns"):  # a /proc of its own pid namespace: the main program is not in it
                if libc.unshare(_CLONE_NEWNS) != 0:
                    raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWNS) for the peer")
                _mount(libc, "proc", "/proc", "proc", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC)
            devnull = os.open("/dev/null", os.O_RDONLY)
            os.dup2(devnull, 0)
            _place_fds({CONTROL_FD_PEER: peer_end}, keep=(cfg["status_fd"],))
            os.chdir(peer["workdir"])
            _become(peer["uid"], mode, peer["limits"], libc, in_process=peer["run_here"])
            if not peer["run_here"]:
                os.execve(peer["argv"][0], peer["argv"], peer["env"])
            code = _prepare_here(peer["argv"], peer["env"], cfg["python_prefix"])
        except BaseException as exc:  # noqa: BLE001
            os.write(cfg["status_fd"], f"Esandbox peer failed: {type(exc).__name__}: {exc}".encode()[:4000])
            os._exit(126)
        os.close(cfg["status_fd"])  # the last fd of the launcher's: untrusted code runs next
        _run_here(code)
    os.close(peer_end)
    return main_end


def _launch(config_path: str) -> None:
    with open(config_path) as fh:
        cfg = json.load(fh)
    # Above every fd number we place, close-on-exec: the exec'd program can never write to it.
    status_fd = fcntl.fcntl(cfg["status_fd"], fcntl.F_DUPFD_CLOEXEC, 100)
    os.close(cfg["status_fd"])
    cfg["status_fd"] = status_fd
    mode, uid, workdir, limits = cfg["mode"], cfg["uid"], cfg["workdir"], cfg["limits"]
    peer = cfg.get("peer")
    libc = _libc()
    if mode in ("namespaces", "userns"):
        _mount(libc, None, "/", None, _MS_REC | _MS_PRIVATE)
        _readonly_everything(libc)
        _mount(libc, "tmpfs", SANDBOX_ROOT, "tmpfs", _MS_NOSUID | _MS_NODEV,
               f"size={int(limits['tmpfs_mb'])}m,mode=1777")
        if cfg["python_prefix"]:
            os.mkdir(PYTHON_MOUNT, 0o755)
            _mount(libc, cfg["python_prefix"], PYTHON_MOUNT, None, _MS_BIND | _MS_REC)
            _mount(libc, None, PYTHON_MOUNT, None, _MS_REMOUNT | _MS_BIND | _MS_RDONLY | _MS_NOSUID | _MS_NODEV)
        _hide_the_rest(libc, cfg["python_prefix"])
    _write_files(workdir, cfg["files"], uid, private=peer is not None)
    targets = {}
    if peer is not None:
        _write_files(peer["workdir"], peer["files"], peer["uid"], private=False)
        targets[CONTROL_FD_MAIN] = _start_peer(cfg, libc)
        devnull = os.open("/dev/null", os.O_WRONLY)
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
    if cfg["result_fd"] is not None:
        targets[RESULT_FD] = cfg["result_fd"]
    _place_fds(targets, keep=(cfg["status_fd"],))
    os.chdir(workdir)
    _become(uid, mode, limits, libc, in_process=cfg["run_here"])
    if cfg["run_here"]:
        code = _prepare_here(cfg["argv"], cfg["env"], cfg["python_prefix"])
        os.write(cfg["status_fd"], b"X")
        os.close(cfg["status_fd"])
        _run_here(code)
    _exec(cfg["argv"], cfg["env"], cfg["status_fd"])


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
