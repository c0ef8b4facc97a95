"""A jinja2 sandbox for chat templates from model files: no Python internals, bounded time and size.

jinja2's ImmutableSandboxedEnvironment keeps a template away from Python's internals, but not from
running for ever or from building a string of many gigabytes. `GuardedEnvironment` adds:
- time: a watchdog thread raises `RenderTimeout` inside the rendering thread once the deadline
  passes (PyThreadState_SetAsyncExc). It lands between bytecodes, so loops that output nothing stop too;
- size: every operation that can build a big value in one C call (`* ** % +`, `~`, joins, string
  methods and filters that pad, repeat, replace or join) is estimated before it runs and refused over
  `max_chars`; the memory of what it built is charged to a per-render budget, so recursion that keeps
  many big values alive stops as well; a value about to become text (`{{ x }}`, `~`, formatting, string filters)
  is bounded first, containers walked, since a list of many references to one big string is cheap to
  build and huge to print; the output is counted as it is generated;
- internals: an unsafe attribute (`''.__class__`) is an error at once, not an undefined that prints ''.
Filters are marked pass_context so they never run at compile time (constant folding), outside the limits.
"""

from __future__ import annotations

import ctypes
import os
import re
import string
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.compiler import CodeGenerator, Frame
from jinja2.runtime import Context
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError
from jinja2.utils import Namespace

MAX_INT_BITS = 1 << 16  # ints a template may build with * and ** (~19,700 digits)
MAX_JSON_INDENT = 64
MAX_ROUND_DIGITS = 20_000  # about the digits of the largest int allowed


@dataclass(frozen=True)
class RenderLimits:
    timeout_s: float = 2.0
    max_chars: int = 4 << 20  # the largest value and the largest output
    budget_bytes: int = 256 << 20  # the memory of all values one render builds, together


class TemplateLimitError(SecurityError):
    """A template went past its time or size limit."""


class RenderTimeout(BaseException):
    """Raised inside the rendering thread by the watchdog. Not an Exception, so that no
    `except Exception` on the way (jinja2's, a filter's) can swallow it."""


# -- size ----------------------------------------------------------------------------------------

class _Budget:
    """The limits of the render running on this thread and the memory of the values it has built."""

    def __init__(self, limits: RenderLimits) -> None:
        self.limits = limits
        self.used = 0

    def check(self, n: int, what: str) -> None:
        """A value about to be built, n characters (or items) long."""
        if n > self.limits.max_chars:
            limit = self.limits.max_chars
            raise TemplateLimitError(f"{what} is estimated at {n} characters, over the limit of {limit}")

    def charge(self, value: Any, what: str) -> None:
        """A value just built: its length is checked, its memory counted (a list of references costs 8 bytes
        an item, which its length does not say)."""
        self.check(len(value), what)
        self.used += sys.getsizeof(value)
        if self.used > self.limits.budget_bytes:
            raise TemplateLimitError(f"the template built more than {self.limits.budget_bytes} bytes of values")


_local = threading.local()


def _budget() -> _Budget:
    budget = getattr(_local, "budget", None)
    return budget if budget is not None else _Budget(RenderLimits())  # outside a render: compile time


_SIZED = (str, bytes, list, tuple, dict)


def _charge(value: Any, what: str) -> Any:
    if isinstance(value, _SIZED):
        _budget().charge(value, what)
    return value


def _text_len(x: Any) -> int:
    """A bound on len(str(x)) that never builds str(x): a list of a million references to one big string
    is cheap to make and a terabyte to print."""
    return len(x) if isinstance(x, (str, bytes)) else _text_bound(x, _budget().limits.max_chars)


def _text_bound(x: Any, limit: int) -> int:
    """Walks containers (and jinja2 namespaces) adding up their items; stops once past `limit`."""
    total, stack, seen = 0, [x], set()
    while stack and total <= limit:
        v = stack.pop()
        if isinstance(v, (str, bytes)):
            total += len(v) + 2
        elif isinstance(v, bool) or v is None:
            total += 5
        elif isinstance(v, int):
            total += v.bit_length() * 30103 // 100000 + 2
        elif isinstance(v, (list, tuple, set, frozenset, dict, Namespace)):
            if id(v) in seen:
                continue
            seen.add(id(v))
            items = v._Namespace__attrs if isinstance(v, Namespace) else v  # what its repr prints
            stack.extend(items.items() if isinstance(items, dict) else items)
            total += 2 * len(items) + 2
        else:
            total += 64  # floats, Undefined, loop and macro objects: short reprs
    return total


def _int(x: Any, default: int = 0) -> int:
    return x if isinstance(x, int) else default


def _check_int_bits(bits: int, what: str) -> None:
    if bits > MAX_INT_BITS:
        raise TemplateLimitError(f"{what} would have about {bits} bits (limit {MAX_INT_BITS})")


def _check_binop(budget: _Budget, operator: str, left: Any, right: Any) -> None:
    """Refuse `left operator right` before it runs if its result would be too big ('+' is checked after:
    it is at most twice its operands)."""
    seqs = (str, bytes, list, tuple)
    if operator == "*" and isinstance(left, seqs) and isinstance(right, int):
        budget.check(len(left) * max(right, 0), "a repeated sequence")
    elif operator == "*" and isinstance(right, seqs) and isinstance(left, int):
        budget.check(len(right) * max(left, 0), "a repeated sequence")
    elif operator == "*" and isinstance(left, int) and isinstance(right, int):
        _check_int_bits(left.bit_length() + right.bit_length(), "a product")
    elif operator == "**" and isinstance(left, int) and isinstance(right, int) and right > 0:
        _check_int_bits(max(left.bit_length(), 1) * right, "a power")
    elif operator == "%" and isinstance(left, (str, bytes)):
        budget.check(_printf_size(left, right), "a %-formatted string")


# a printf conversion: mapping key, flags, width, precision, length modifier, type
_PRINTF = re.compile(rb"%(?:\([^)]*\))?[-#0 +]*(\*|\d+)?(?:\.(\*|\d+))?[hlL]?(.)", re.DOTALL)


def _printf_size(fmt: str | bytes, args: Any) -> int:
    """An upper bound on len(fmt % args): widths, and each conversion at most the longest argument."""
    values = list(args.values()) if isinstance(args, dict) else list(args) if isinstance(args, tuple) else [args]
    longest = max((_text_len(v) for v in values), default=0)
    stars = sum(abs(v) for v in values if isinstance(v, int))
    raw = fmt.encode("utf-8", "replace") if isinstance(fmt, str) else fmt
    size = len(raw)
    for width, precision, _ in _PRINTF.findall(raw):
        for n in (width, precision):
            size += stars if n == b"*" else int(n or 0)
        size += longest
    return size


def _format_size(fmt: str, args: tuple, kwargs: dict) -> int:
    """An upper bound on len(fmt.format(*args, **kwargs)), as _printf_size bounds %-formatting."""
    values = [*args, *kwargs.values()]
    longest = max((_text_len(v) for v in values), default=0)
    nested = sum(abs(v) for v in values if isinstance(v, int))
    size = len(fmt)
    for _, field, spec, _ in string.Formatter().parse(fmt):
        if field is None:
            continue
        size += longest + sum(int(n) for n in re.findall(r"\d+", spec or ""))
        if spec and "{" in spec:
            size += nested
    return size


# str/bytes methods whose result can be much longer than the string: name -> bound on the result
def _pad_size(s: Any, width: Any = 0, *_: Any) -> int:
    return max(len(s), _int(width))


def _expandtabs_size(s: Any, tabsize: Any = 8) -> int:
    return len(s) + s.count("\t" if isinstance(s, str) else b"\t") * max(_int(tabsize, 8), 0)


def _replace_size(s: Any, old: Any = "", new: Any = "", count: Any = -1) -> int:
    hits = len(s) + 1 if not old else s.count(old)
    if isinstance(count, int) and count >= 0:
        hits = min(hits, count)
    return len(s) + hits * max(_text_len(new) - _text_len(old), 0)


def _join_size(sep: Any, items: Iterable[Any] = ()) -> int:
    items = list(items)
    return sum(_text_len(x) for x in items) + len(sep) * max(len(items) - 1, 0)


def _translate_size(s: Any, table: Any = None) -> int:
    longest = max((_text_len(v) for v in table.values() if v is not None), default=1) if isinstance(table, dict) else 1
    return len(s) * max(longest, 1)


_METHOD_SIZES: dict[str, Callable[..., int]] = {
    "center": _pad_size, "ljust": _pad_size, "rjust": _pad_size, "zfill": _pad_size,
    "expandtabs": _expandtabs_size, "replace": _replace_size, "join": _join_size, "translate": _translate_size,
}


def _check_method(obj: Any, args: tuple, kwargs: dict) -> tuple:
    """Refuse a str/bytes method call whose result would be too long; joins get their items as a list."""
    owner = getattr(obj, "__self__", None)
    name = getattr(obj, "__name__", "")
    if not isinstance(owner, (str, bytes)) or name not in _METHOD_SIZES:
        return args
    if name == "join" and args:
        args = (list(args[0]), *args[1:])
    try:
        size = _METHOD_SIZES[name](owner, *args, **kwargs)
    except (TypeError, AttributeError):
        return args  # wrong arguments: the call itself says so
    _budget().check(size, f"{type(owner).__name__}.{name}()")
    return args


# -- filters -------------------------------------------------------------------------------------

def _center_filter(value: Any, width: Any = 80, *_: Any) -> int:
    return max(_text_len(value), _int(width))


def _indent_filter(s: Any, width: Any = 4, *_: Any, **__: Any) -> int:
    per_line = width if isinstance(width, int) else _text_len(width)
    text = str(s)
    return len(text) + (text.count("\n") + 1) * max(per_line, 0)


def _join_filter(value: Any, d: Any = "", attribute: Any = None) -> int:
    # with `attribute` the items' own text is what joins (checked after); the separator is repeated all the same
    items = 0 if attribute is not None else sum(_text_len(x) for x in value)
    return items + _text_len(d) * max(len(value) - 1, 0)


def _replace_filter(s: Any, old: Any = "", new: Any = "", count: Any = None) -> int:
    return _replace_size(str(s), str(old), str(new), -1 if count is None else count)


def _format_filter(value: Any, *args: Any, **kwargs: Any) -> int:
    return _printf_size(str(value), kwargs or args)


def _wordwrap_filter(s: Any, width: Any = 79, break_long_words: Any = True, wrapstring: Any = None,
                     *_: Any, **__: Any) -> int:
    text = str(s)
    return len(text) * (1 + _text_len("\n" if wrapstring is None else wrapstring))


def _count_filter(value: Any, count: Any = 0, *_: Any, **__: Any) -> int:
    return max(_int(count), 0)  # slice(slots) and batch(linecount) build that many items


def _round_filter(value: Any, precision: Any = 0, *_: Any) -> int:
    if isinstance(precision, int) and abs(precision) > MAX_ROUND_DIGITS:  # round(10**4000, -10**9) never ends
        raise TemplateLimitError(f"round precision {precision} is over the limit of {MAX_ROUND_DIGITS}")
    return 0


def _sum_filter(value: Any, attribute: Any = None, start: Any = 0) -> int:
    if not isinstance(start, (int, float)):  # summing sequences copies them once per item, in C
        raise TemplateLimitError(f"sum with a start of type {type(start).__name__} is not allowed")
    return 0


def _tojson_filter(value: Any, indent: Any = None, *_: Any, **__: Any) -> int:
    if isinstance(indent, int) and indent > MAX_JSON_INDENT:
        raise TemplateLimitError(f"tojson indent {indent} is over the limit of {MAX_JSON_INDENT}")
    if isinstance(indent, str) and len(indent) > MAX_JSON_INDENT:
        raise TemplateLimitError(f"tojson indent of {len(indent)} characters is over the limit of {MAX_JSON_INDENT}")
    return 0


_FILTER_SIZES: dict[str, Callable[..., int]] = {
    "center": _center_filter, "indent": _indent_filter, "join": _join_filter, "replace": _replace_filter,
    "format": _format_filter, "wordwrap": _wordwrap_filter, "slice": _count_filter, "batch": _count_filter,
    "tojson": _tojson_filter, "round": _round_filter, "sum": _sum_filter,
}
# filters that turn their value into text first: a container's text is bounded before they run
_STRINGIFYING = frozenset({"string", "pprint", "tojson", "escape", "e", "forceescape", "urlencode", "urlize", "upper",
                           "lower", "title", "capitalize", "trim", "striptags", "wordcount", "truncate", "center",
                           "indent", "replace", "format", "wordwrap", "safe", "xmlattr"})


def _guard_filter(name: str, func: Callable[..., Any]) -> Callable[..., Any]:
    """`func` behind a size check; pass_context keeps jinja2 from running it at compile time."""
    passes = getattr(getattr(func, "jinja_pass_arg", None), "name", None)
    estimate = _FILTER_SIZES.get(name)
    what = f"the result of filter {name!r}"

    stringifies = name in _STRINGIFYING

    @jinja2.pass_context
    def guarded(context: Context, value: Any, *args: Any, **kwargs: Any) -> Any:
        if stringifies and not isinstance(value, str):
            _budget().check(_text_len(value), what)
        if estimate is not None:
            if name == "join" and not isinstance(value, (str, bytes)):
                value = list(value)
            try:
                size = estimate(value, *args, **kwargs)
            except (TypeError, ValueError):
                size = 0  # wrong arguments: the filter itself says so
            _budget().check(size, what)
        if passes == "context":
            args = (context, value, *args)
        elif passes == "eval_context":
            args = (context.eval_ctx, value, *args)
        elif passes == "environment":
            args = (context.environment, value, *args)
        else:
            args = (value, *args)
        return _charge(func(*args, **kwargs), what)

    return guarded


# -- the environment -----------------------------------------------------------------------------

def _finalize(value: Any) -> Any:
    """Every `{{ value }}` before it becomes text."""
    if not isinstance(value, str):
        _budget().check(_text_len(value), "an output value")
    return value


class _CodeGenerator(CodeGenerator):
    """Compiles `a ~ b` through the environment, so its size is checked before the join."""

    def visit_Concat(self, node: nodes.Concat, frame: Frame) -> None:
        if frame.eval_ctx.volatile:
            join = "(markup_join if context.eval_ctx.volatile else str_join)"
        elif frame.eval_ctx.autoescape:
            join = "markup_join"
        else:
            join = "str_join"
        self.write(f"environment.checked_join({join}, (")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("))")


class GuardedEnvironment(ImmutableSandboxedEnvironment):
    """ImmutableSandboxedEnvironment with size checks; `render` adds the time limit."""

    intercepted_binops = frozenset({"*", "**", "%", "+"})
    code_generator_class = _CodeGenerator

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(finalize=_finalize, **kwargs)
        self.filters = {name: _guard_filter(name, f) for name, f in self.filters.items()}
        self.globals.pop("lipsum", None)  # lorem ipsum of n paragraphs: no chat template needs it

    def add_filter(self, name: str, func: Callable[..., Any]) -> None:
        self.filters[name] = _guard_filter(name, func)

    def call_binop(self, context: Context, operator: str, left: Any, right: Any) -> Any:
        budget = _budget()
        if operator != "+":
            _check_binop(budget, operator, left, right)
        result = self.binop_table[operator](left, right)
        if isinstance(result, _SIZED):
            budget.charge(result, "a concatenation" if operator == "+" else "an operator's result")
        return result

    def call(__self, __context: Context, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805
        args = _check_method(__obj, args, kwargs)
        return _charge(super().call(__context, __obj, *args, **kwargs), "a call's result")

    def getitem(self, obj: Any, argument: Any) -> Any:
        value = super().getitem(obj, argument)
        return _charge(value, "a slice") if isinstance(argument, slice) else value

    def unsafe_undefined(self, obj: Any, attribute: str) -> jinja2.Undefined:
        raise SecurityError(f"access to attribute {attribute!r} of {type(obj).__name__!r} object is unsafe")

    def wrap_str_format(self, value: Any) -> Callable[..., str] | None:
        sandboxed = super().wrap_str_format(value)
        if sandboxed is None:
            return None
        fmt = value.__self__
        is_map = value.__name__ == "format_map"

        def checked(*args: Any, **kwargs: Any) -> str:
            mapping = args[0] if is_map and args and isinstance(args[0], dict) else kwargs
            _budget().check(_format_size(fmt, () if is_map else args, mapping), "a formatted string")
            return _charge(sandboxed(*args, **kwargs), "a formatted string")

        return checked

    def concat(self, parts: Iterable[Any]) -> str:  # type: ignore[override]
        """Joins a block's output (macros, {% set %} blocks, filter blocks) after checking its size."""
        parts = list(parts)
        _budget().check(sum(len(p) for p in parts), "a block's output")
        return _charge("".join(parts), "a block's output")

    def checked_join(self, join: Callable[[Iterable[Any]], str], values: tuple) -> str:
        _budget().check(sum(_text_len(v) for v in values), "a ~ concatenation")
        return _charge(join(values), "a ~ concatenation")


# -- time ----------------------------------------------------------------------------------------

@dataclass(eq=False)
class _Watch:
    thread_id: int
    deadline: float
    fired: bool = False


def _set_async_exc(thread_id: int, exc: type[BaseException] | None) -> None:
    """Raise `exc` in the thread at its next bytecode; None clears one not yet raised."""
    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread_id),
                                               ctypes.py_object(exc) if exc is not None else None)


class _Watchdog:
    """One daemon thread that raises RenderTimeout in each watched thread that passes its deadline.

    Firing and stopping take the same lock, and stopping a watch that fired clears an exception not
    yet delivered, so a timeout never escapes the render it was meant for. The render threads take that lock
    with `with self._lock` (a C-level lock): an exception fired at them can arrive the moment they get it,
    and only then is it sure to be released (Condition.__enter__ is a Python frame, which such an exception
    can leave with the lock held, wedging every later render).
    """

    def __init__(self) -> None:
        self._reset()
        os.register_at_fork(after_in_child=self._reset)  # a forked child has no watchdog thread

    def _reset(self) -> None:
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._watches: set[_Watch] = set()
        self._thread: threading.Thread | None = None

    def start(self, timeout_s: float) -> _Watch:
        watch = _Watch(threading.get_ident(), time.monotonic() + timeout_s)
        with self._lock:
            self._watches.add(watch)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="chat-template-watchdog", daemon=True)
                self._thread.start()
            self._cond.notify()
        return watch

    def stop(self, watch: _Watch) -> None:
        with self._lock:
            self._watches.discard(watch)
            if watch.fired:
                _set_async_exc(watch.thread_id, None)

    def _run(self) -> None:
        with self._cond:
            while True:
                now = time.monotonic()
                for watch in [w for w in self._watches if w.deadline <= now]:
                    self._watches.discard(watch)
                    watch.fired = True
                    _set_async_exc(watch.thread_id, RenderTimeout)
                deadline = min((w.deadline for w in self._watches), default=None)
                self._cond.wait(None if deadline is None else deadline - now)


_WATCHDOG = _Watchdog()


def run_limited(fn: Callable[[], Any], limits: RenderLimits) -> Any:
    """fn() under `limits`: TemplateLimitError when it runs out of time or builds too much."""
    previous = getattr(_local, "budget", None)
    _local.budget = _Budget(limits)
    try:
        watch = _WATCHDOG.start(limits.timeout_s)
        try:
            return fn()
        finally:
            _WATCHDOG.stop(watch)
    except RenderTimeout:
        raise TemplateLimitError(f"the template ran longer than {limits.timeout_s} s") from None
    finally:
        _local.budget = previous


def render(template: jinja2.Template, variables: dict[str, Any], limits: RenderLimits) -> str:
    """The template's output, generated piece by piece under `limits`."""

    def collect() -> str:
        parts, size = [], 0
        for part in template.generate(variables):
            size += len(part)
            if size > limits.max_chars:
                raise TemplateLimitError(f"the output is longer than {limits.max_chars} characters")
            parts.append(part)
        return "".join(parts)

    return run_limited(collect, limits)
