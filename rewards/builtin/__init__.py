"""Built-in rewards; importing this module registers them."""
from rewards.builtin import simple  # noqa: F401
