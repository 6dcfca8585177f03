"""Prompts as the model sees them: the row's chat messages (and tools) through the tokenizer's chat template.
One function for the trainer, validation and `inspect`, so the length check measures what is generated from."""
from __future__ import annotations

from rollout.data.rows import DataError, PromptRow


def render_prompt(tokenizer, row: PromptRow, tokenize: bool = True) -> list[int] | str:
    """Token ids (or the text with tokenize=False) of the prompt, ending with the assistant header."""
    kwargs = {"tools": row.tools} if row.tools else {}
    return tokenizer.apply_chat_template(row.messages, add_generation_prompt=True, tokenize=tokenize,
                                         return_dict=False, **kwargs)


def check_template_supports_tools(tokenizer, rows: list[PromptRow]) -> None:
    """A template that never mentions `tools` drops them silently (an old checkpoint's tokenizer_config, say): the
    model would be asked to call tools it was never shown. Fail loudly instead."""
    if not any(r.tools or any(m.get("tool_calls") or m["role"] == "tool" for m in r.messages) for r in rows):
        return
    template = getattr(tokenizer, "chat_template", None) or ""
    if isinstance(template, dict):  # named templates: the default one is used
        template = template.get("default", "")
    if "tools" not in template or "tool_calls" not in template:
        raise DataError("the dataset has tools or tool calls but the tokenizer's chat template does not render "
                        "them; regenerate the tokenizer (python -m glm5_model.tokenizer.build) or the checkpoint")
