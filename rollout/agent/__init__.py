"""Multi-turn agent episodes at the token level: the GLM tool-call format, turn-by-turn rendering of the chat
template, the token sequence with its loss mask, and the episode driver the rollout manager calls (episode.py).
The environments themselves are in rewards/envs."""
from rollout.agent.episode import AgentEpisode, AgentEpisodeResult, ModelTurn, demonstrate_episode, run_episode
from rollout.agent.glm_tools import parse_glm_turn
from rollout.agent.render import ChatRenderer, TemplateError
from rollout.agent.sequence import Span, TokenSequence

__all__ = ["AgentEpisode", "AgentEpisodeResult", "ModelTurn", "demonstrate_episode", "run_episode", "parse_glm_turn", "ChatRenderer",
           "TemplateError", "Span", "TokenSequence"]
