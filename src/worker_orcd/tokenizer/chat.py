"""Chat templates rendered the way transformers' apply_chat_template renders them.

Templates come from model files, so they run in jinja2's ImmutableSandboxedEnvironment with the
helpers HF templates expect (raise_exception, strftime_now, a tojson that does not HTML-escape).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from worker_orcd.tokenizer.errors import TokenizerError


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    # jinja2's own tojson escapes <, >, & and ' for HTML; HF templates expect plain JSON.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=16)
def compile_chat_template(template: str) -> jinja2.Template:
    """A compiled template (cached: the same template string is rendered for every request)."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise TokenizerError(f"chat template does not parse: {e.message} (line {e.lineno})") from None


def render_chat_template(template: str, messages: Sequence[dict[str, Any]],
                         add_generation_prompt: bool = True, tools: list[dict[str, Any]] | None = None,
                         **kwargs: Any) -> str:
    """Render `messages` (and `tools`, and any template variables in kwargs) with `template`."""
    try:
        return compile_chat_template(template).render(
            messages=list(messages), tools=tools, add_generation_prompt=add_generation_prompt, **kwargs)
    except jinja2.TemplateError as e:
        raise TokenizerError(f"chat template failed: {e}") from None
