"""Agent environments: multi-turn tasks whose turns are answered by an environment (tools, a file system, a
sandbox). Registered like reward plugins; run through `EnvRunner`, which enforces the timeouts, turn and token
limits and isolates the caller from environments that raise or hang. Like the rest of rewards/, this package
imports nothing from trainer/, rollout/ or glm5_model/ (the chat-template side lives in rollout/agent/)."""
from rewards.envs.api import (AssistantTurn, Environment, EpisodeStart, MalformedCall, MalformedKind, Message,
                              StepResult, Task, ToolCall, tool_message, tool_name)
from rewards.envs.metrics import episode_metrics
from rewards.envs.registry import EnvSpec, load_env, register_env, registered_envs
from rewards.envs.runner import (EndReason, EnvRunner, EnvSettings, EpisodeResult, EpisodeSession, EpisodeStats,
                                 TurnResult)
from rewards.envs.tools import ToolEnvironment, ToolError, function_tool, validate_arguments

__all__ = [
    "AssistantTurn", "Environment", "EpisodeStart", "MalformedCall", "MalformedKind", "Message", "StepResult",
    "Task", "ToolCall", "tool_message", "tool_name", "episode_metrics", "EnvSpec", "load_env", "register_env",
    "registered_envs", "EndReason", "EnvRunner", "EnvSettings", "EpisodeResult", "EpisodeSession", "EpisodeStats",
    "TurnResult", "ToolEnvironment", "ToolError", "function_tool", "validate_arguments",
]
