"""Chat prompts: the model's own template, a user-given one, or a sensible default."""
from __future__ import annotations

from pathlib import Path

# Gemma's turn format; a leading system message is folded into the first user
# turn, as Gemma has no system role. Newlines that end a turn are written inside
# `{{ }}`: as plain text before a `{%-` tag, whitespace control would strip them.
GEMMA_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] in ['system', 'developer'] -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set first_user_prefix = '' -%}{%- set loop_messages = messages -%}{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else 'user' -%}"
    "<start_of_turn>{{ role }}\n{{ ((first_user_prefix if loop.first else '') + message['content']) | trim }}"
    "{{ '<end_of_turn>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\\n' }}{%- endif -%}"
)

# For models that ship no template: plain role-prefixed turns, one per line.
GENERIC_TEMPLATE = (
    "{{ bos_token if bos_token else '' }}"
    "{%- for message in messages -%}{{ message['role'] }}: {{ message['content'] | trim }}{{ '\\n' }}{%- endfor -%}"
    "{%- if add_generation_prompt -%}assistant:{%- endif -%}"
)


def resolve_chat_template(option: str | None, tokenizer, architecture: str) -> str:
    """`option` is a file path or an inline Jinja template; else the tokenizer's
    own template; else Gemma's format for Gemma models and a generic one otherwise."""
    if option:
        path = Path(option)
        if len(option) < 4096 and path.is_file():
            return path.read_text(encoding="utf-8")
        if "{" not in option:
            raise ValueError(f"--chat-template {option!r} is neither a file nor a Jinja template")
        return option
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        return tokenizer.chat_template
    return GEMMA_TEMPLATE if "gemma" in architecture.lower() else GENERIC_TEMPLATE


def render_chat(tokenizer, template: str, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
    """Token ids of the rendered conversation (special tokens come from the template)."""
    text = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                         add_generation_prompt=add_generation_prompt)
    return tokenizer(text, add_special_tokens=False).input_ids
