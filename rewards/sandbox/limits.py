"""Resource limits for one sandbox run."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SandboxLimits:
    """Limits applied to everything the untrusted code runs.

    `wall_s` bounds the whole run (the runner kills the process group and the namespace when it passes);
    `cpu_s`, `memory_mb` (address space), `max_file_mb` and `max_open_files` are per process rlimits;
    `max_processes` is RLIMIT_NPROC for the run's private uid (so it bounds the whole run, not the host user);
    `tmpfs_mb` caps the private working directory; `max_output_bytes` caps what is kept of each of stdout, stderr.
    """

    wall_s: float = 10.0
    cpu_s: int = 5
    memory_mb: int = 1024
    max_processes: int = 64
    max_file_mb: int = 16
    max_open_files: int = 256
    tmpfs_mb: int = 64
    max_output_bytes: int = 64 * 1024

    def __post_init__(self) -> None:
        for name in ("wall_s", "cpu_s", "memory_mb", "max_processes", "max_file_mb", "max_open_files", "tmpfs_mb",
                     "max_output_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise ValueError(f"SandboxLimits.{name} must be a positive number, got {value!r}")
