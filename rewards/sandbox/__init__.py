"""A local sandbox for untrusted code (used by the `coding` reward)."""
from rewards.sandbox.limits import SandboxLimits
from rewards.sandbox.runner import SandboxResult, isolation, kill_uid, run_sandboxed

__all__ = ["SandboxLimits", "SandboxResult", "isolation", "kill_uid", "run_sandboxed"]
