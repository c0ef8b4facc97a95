"""Chat templates rendered the way transformers' apply_chat_template renders them.

Templates come from model files, so they run in a sandbox (`sandbox.GuardedEnvironment`: jinja2's
ImmutableSandboxedEnvironment plus a time limit and size limits) with the helpers HF templates expect
(raise_exception, strftime_now, a tojson that does not HTML-escape).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.ext

from worker_orcd.tokenizer.errors import TokenizerError
from worker_orcd.tokenizer.sandbox import GuardedEnvironment, RenderLimits, render, run_limited

DEFAULT_LIMITS = RenderLimits()


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    # jinja2's own tojson escapes <, >, & and ' for HTML; HF templates expect plain JSON.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _environment() -> GuardedEnvironment:
    env = GuardedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.add_filter("tojson", _tojson)
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


@lru_cache(maxsize=16)
def compile_chat_template(template: str) -> jinja2.Template:
    """A compiled template (cached: the same template string is rendered for every request)."""
    if not isinstance(template, str):
        raise TokenizerError(f"chat template must be a string, got {type(template).__name__}")
    try:
        return run_limited(lambda: _environment().from_string(template), DEFAULT_LIMITS)
    except jinja2.TemplateSyntaxError as e:
        raise TokenizerError(f"chat template does not parse: {e.message} (line {e.lineno})") from None
    except Exception as e:  # a template deep enough to exhaust the parser's recursion, or over the limits
        raise TokenizerError(f"chat template does not compile: {type(e).__name__}: {e}") from None


def render_chat_template(template: str, messages: Sequence[dict[str, Any]],
                         add_generation_prompt: bool = True, tools: list[dict[str, Any]] | None = None,
                         *, limits: RenderLimits = DEFAULT_LIMITS, **kwargs: Any) -> str:
    """Render `messages` (and `tools`, and any template variables in kwargs) with `template`."""
    compiled = compile_chat_template(template)
    variables = dict(messages=list(messages), tools=tools, add_generation_prompt=add_generation_prompt, **kwargs)
    try:
        return render(compiled, variables, limits)
    except jinja2.TemplateError as e:
        raise TokenizerError(f"chat template failed: {e}") from None
    except Exception as e:  # the template's own errors: 1 + 'a', deep recursion, a huge int printed
        raise TokenizerError(f"chat template failed: {type(e).__name__}: {e}") from None
