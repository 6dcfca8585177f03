"""A local sandbox for untrusted code (used by the `coding` reward)."""
from rewards.sandbox.limits import SandboxLimits
from rewards.sandbox.runner import Peer, SandboxResult, isolation, kill_uid, run_sandboxed

__all__ = ["Peer", "SandboxLimits", "SandboxResult", "isolation", "kill_uid", "run_sandboxed"]
