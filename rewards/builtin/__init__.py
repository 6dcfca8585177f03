"""Built-in rewards; importing this module registers them."""
from rewards.builtin import simple  # noqa: F401
from rewards.builtin import factuality  # noqa: F401
from rewards.builtin import math_answer  # noqa: F401
from rewards.builtin import coding  # noqa: F401
