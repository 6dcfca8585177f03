"""Built-in environments; importing this module registers them."""
from rewards.envs.builtin import calculator  # noqa: F401
from rewards.envs.builtin import terminal  # noqa: F401
from rewards.envs.builtin import coding_agent  # noqa: F401
from rewards.envs.builtin import price_check  # noqa: F401
from rewards.envs import verifiers_env  # noqa: F401  (the adapter; verifiers itself runs in a worker)
