"""Token ids of an agent conversation as the tokenizer's chat template renders it, built turn by turn.

Earlier turns are never re-tokenized (slime #2285: re-tokenizing the whole conversation every turn is O(N^2) and
can move token boundaries under the model's own tokens). The ids of what the environment adds are the template's
rendering of the conversation with the new messages minus its rendering without them, tokenized alone. That is
the full conversation's tokenization at that place because the cut falls on a special token (GLM's
<|observation|>, <|user|>, <|assistant|>): tokenizers split on special tokens before anything else. The cut is
checked, and so is that the template renders earlier turns the same whatever follows (append-only); a template
that breaks either is refused with an error naming the turn, never silently mis-tokenized.
"""
from __future__ import annotations

from typing import Any

from glm5_model.tokenizer.build import STOP_TOKENS
from rewards.envs.api import Message


class TemplateError(ValueError):
    """The chat template cannot be extended turn by turn (see the module doc)."""


class ChatRenderer:
    """Renders one episode's conversation (`tools`: its OpenAI tool schemas) with `tokenizer`'s chat template."""

    def __init__(self, tokenizer: Any, tools: list[dict[str, Any]] | None = None,
                 stop_tokens: tuple[str, ...] = tuple(STOP_TOKENS)):
        self.tokenizer = tokenizer
        self.tools = list(tools or [])
        self._special = {t.content for t in tokenizer.added_tokens_decoder.values() if t.special}
        self.stop_ids = frozenset(tokenizer.convert_tokens_to_ids(t) for t in stop_tokens if t in self._special)

    def text(self, messages: list[Message], add_generation_prompt: bool) -> str:
        kwargs = {"tools": self.tools} if self.tools else {}
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                                  tokenize=False, **kwargs)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def prompt_ids(self, messages: list[Message]) -> list[int]:
        """The first prompt, ending with the assistant header (as rollout/data/render.py renders dataset rows)."""
        return self.encode(self.text(messages, add_generation_prompt=True))

    def assistant_ids(self, message: Message) -> list[int]:
        """The ids a model following the template generates for one assistant `message` after the generation
        prompt, with the stop token that ends such a turn (<|observation|> after tool calls, else <|user|>)."""
        history = [{"role": "user", "content": "q"}]
        before = self.text(history, add_generation_prompt=True)
        text = self.text(history + [message], add_generation_prompt=False)[len(before):]
        stop = "<|observation|>" if message.get("tool_calls") else "<|user|>"
        return self.encode(text) + [self.tokenizer.convert_tokens_to_ids(stop)]

    def decode_turn(self, ids: list[int]) -> str:
        """A model turn's text with its special tokens (tool-call tags), without the stop token that ended it."""
        if ids and ids[-1] in self.stop_ids:
            ids = ids[:-1]
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def observation_ids(self, history: list[Message], observations: list[Message], model_ids: list[int]) -> list[int]:
        """Ids to append after the model's turn `model_ids` (the last message of `history`): `observations` and
        the next assistant header, as the template renders them after `history`. A stop token the model already
        generated is not repeated (it stays the model's token, in the loss)."""
        before = self.text(history, add_generation_prompt=False)
        after = self.text(history + observations, add_generation_prompt=True)
        if not after.startswith(before):
            at = next((i for i, (a, b) in enumerate(zip(before, after)) if a != b), len(before))
            raise TemplateError(
                f"the chat template renders turn {len(history)} differently once more messages follow (first "
                f"difference at character {at}: {before[at:at + 40]!r} -> {after[at:at + 40]!r}); turns cannot be "
                "appended without re-tokenizing earlier ones")
        suffix = after[len(before):]
        if not (self._starts_special(suffix) or self._ends_special(before)):
            raise TemplateError(
                f"the chat template's text for the messages after turn {len(history)} starts with {suffix[:40]!r}, "
                "not at a special token: tokenizing it alone may not match the whole conversation's tokens")
        ids = self.encode(suffix)
        if model_ids and ids and ids[0] == model_ids[-1] and ids[0] in self.stop_ids:
            ids = ids[1:]
        return ids

    def _starts_special(self, text: str) -> bool:
        return any(text.startswith(t) for t in self._special)

    def _ends_special(self, text: str) -> bool:
        return any(text.endswith(t) for t in self._special)
