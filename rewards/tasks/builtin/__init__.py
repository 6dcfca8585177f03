"""Built-in task families (importing registers them)."""
from rewards.tasks.builtin import coding_fn, factuality_qa  # noqa: F401
