"""Hostile model files: lying counts, broken vocabularies, chat templates that attack or run away, NaN/inf
weights. Each is refused with a clean error (GGUFError / TokenizerError) or works; none crashes or hangs.
The fuzz findings (fuzz/README.md) are here too, one test each, and fuzz/regressions/ is replayed."""

from __future__ import annotations

import struct
import threading
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFValueType
from typer.testing import CliRunner

from fuzz.mutate import write_vocab_gguf
from fuzz.targets import check_gguf, check_tokenizer
from worker_orcd.gguf import GGUFError, open_gguf
from worker_orcd.inspect import model_facts, scan_values
from worker_orcd.tokenizer import Tokenizer, TokenizerError
from worker_orcd.tokenizer.build import spm_merges
from worker_orcd.tokenizer.chat import render_chat_template
from worker_orcd.tokenizer.pieces import gpt2_byte_decoder
from worker_orcd.tokenizer.sandbox import RenderLimits
from worker_orcd.tokenizer.vocab import read_vocab

REGRESSIONS = Path(__file__).parents[1] / "fuzz" / "regressions"
T = "tokenizer.ggml."


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _measured(fn) -> tuple[BaseException | None, float, int]:
    """(exception raised, seconds, peak traced bytes) of fn()."""
    tracemalloc.start()
    start = time.perf_counter()
    try:
        fn()
        err = None
    except BaseException as e:  # the test looks at whatever came out
        err = e
    elapsed = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return err, elapsed, peak


# -- counts that lie -------------------------------------------------------------------------

def _header(n_tensors: int, n_kv: int) -> bytes:
    return b"GGUF" + struct.pack("<IQQ", 3, n_tensors, n_kv)


def _key(name: str) -> bytes:
    return struct.pack("<Q", len(name)) + name.encode()


@pytest.mark.parametrize("etype", [GGUFValueType.UINT8, GGUFValueType.INT32, GGUFValueType.FLOAT64,
                                   GGUFValueType.STRING])
def test_array_claiming_2_to_the_40_entries_is_refused_fast_without_allocating(tmp_path, etype):
    # The key most worth lying about: a vocabulary of 2^40 tokens, followed by a few real ones.
    body = _key(f"{T}tokens") + struct.pack("<IIQ", GGUFValueType.ARRAY, etype, 2**40)
    body += (struct.pack("<Q", 1) + b"a") * 100
    path = _write(tmp_path / "huge-array.gguf", _header(0, 1) + body)
    err, elapsed, peak = _measured(lambda: open_gguf(path).close())
    assert isinstance(err, GGUFError), err
    assert f"'{T}tokens'" in str(err) and str(2**40) in str(err)
    assert elapsed < 1.0 and peak < 1 << 20, (elapsed, peak)


@pytest.mark.parametrize("n_tensors, n_kv", [(2**40, 0), (0, 2**40), (2**64 - 1, 2**64 - 1)])
def test_header_counts_claiming_2_to_the_40_are_refused_fast(tmp_path, n_tensors, n_kv):
    path = _write(tmp_path / "huge-count.gguf", _header(n_tensors, n_kv) + bytes(64))
    err, elapsed, peak = _measured(lambda: open_gguf(path).close())
    assert isinstance(err, GGUFError) and "cannot fit" in str(err), err
    assert elapsed < 1.0 and peak < 1 << 20


# -- vocabularies ----------------------------------------------------------------------------

def byte_vocab(extra: list[str] = (), pre: str = "gpt-2") -> dict:
    """A byte-level vocabulary of the 256 byte characters and `extra` normal tokens, no merges."""
    tokens = list(gpt2_byte_decoder()) + list(extra)
    return {f"{T}model": "gpt2", f"{T}pre": pre, f"{T}tokens": tokens,
            f"{T}token_type": np.ones(len(tokens), np.int32), f"{T}merges": []}


def _tokenizer_file(tmp_path: Path, meta: dict) -> Path:
    return _write(tmp_path / "vocab.gguf", write_vocab_gguf(meta, {}))


def test_duplicate_tokens_are_refused_like_llamacpp(tmp_path):
    # llama.cpp aborts (GGML_ASSERT(id_to_token.size() == token_to_id.size())); we refuse cleanly.
    meta = byte_vocab(["hello", "hello"])
    with open_gguf(_tokenizer_file(tmp_path, meta)) as f, pytest.raises(TokenizerError) as e:
        Tokenizer.from_gguf(f)
    assert "duplicate token in vocabulary: 'hello' has ids 256 and 257" in str(e.value)


def test_empty_tokens_are_named_like_llamacpp_and_the_tokenizer_works(tmp_path):
    # llama.cpp renames an empty token "[EMPTY_<id>]" and loads the vocabulary.
    meta = byte_vocab(["", "ab", ""])
    with open_gguf(_tokenizer_file(tmp_path, meta)) as f:
        tok = Tokenizer.from_gguf(f)
    assert tok.token_text(256) == "[EMPTY_256]" and tok.token_text(258) == "[EMPTY_258]"
    ids = tok.tokenize("ab [EMPTY_256]")
    assert tok.detokenize(ids) == "ab [EMPTY_256]"


def test_an_empty_token_renamed_onto_an_existing_token_is_a_duplicate():
    meta = byte_vocab(["[EMPTY_257]", ""])
    with pytest.raises(TokenizerError, match="duplicate token"):
        Tokenizer.from_vocab(read_vocab(meta))


def test_merges_naming_tokens_outside_the_vocabulary_are_ignored():
    # fuzz finding 1: `tokenizers` refused the whole vocabulary with a bare Exception. llama.cpp loads
    # such merges; they never apply or make a symbol with no token. Here they are left out.
    good = byte_vocab(["he", "ll", "hell"])
    good[f"{T}merges"] = ["h e", "l l", "he ll"]
    bad = dict(good, **{f"{T}merges": ["h e", "x\u0120 q", "l l", "he zz", "he ll", "h l"]})
    want = Tokenizer.from_vocab(read_vocab(good)).tokenize("hello hell")
    assert Tokenizer.from_vocab(read_vocab(bad)).tokenize("hello hell") == want == [258, 78, 220, 258]


@pytest.mark.parametrize("key, value, message", [
    (f"{T}tokens", np.arange(300, dtype=np.int32), "must be an array of strings"),
    (f"{T}token_type", ["1"] * 256, "must be an array of integers"),
    (f"{T}token_type", np.ones(256, np.float32), "must be an array of integers"),
    (f"{T}scores", ["0.5"] * 256, "must be an array of numbers"),
    (f"{T}merges", np.arange(3, dtype=np.int32), "must be an array of strings"),
    (f"{T}model", np.arange(3, dtype=np.int32), "must be a string"),
    (f"{T}pre", 7, "must be a string"),
    (f"{T}bos_token_id", "1", "must be an integer"),
    (f"{T}eos_token_id", 1.5, "must be an integer"),
    (f"{T}eot_token_id", True, "must be an integer"),
    (f"{T}add_bos_token", 1, "must be a bool"),
    ("tokenizer.chat_template", 42, "must be a string"),
])
def test_tokenizer_metadata_of_the_wrong_type_is_refused(key, value, message):
    # Each of these was a TypeError/ValueError (e.g. int('a'), an ndarray's truth value) before the types
    # were checked; llama.cpp's typed get_key refuses a wrong type too.
    meta = byte_vocab()
    meta[key] = value
    with pytest.raises(TokenizerError, match=f"{key}.*{message}|{message}"):
        Tokenizer.from_vocab(read_vocab(meta))


def test_out_of_range_special_ids_fall_back_to_defaults_like_llamacpp():
    meta = byte_vocab()
    meta[f"{T}eos_token_id"] = 2**32 - 1
    meta[f"{T}bos_token_id"] = 5
    tok = Tokenizer.from_vocab(read_vocab(meta))
    assert tok.bos_id == 5 and tok.eos_id == 11  # llama.cpp: "bad special token", default id kept


def test_a_very_long_sentencepiece_token_builds_in_linear_time():
    # The SPM merge table tried every split of every token: a 200,000-character token cost 2*10^10
    # character copies. Splits are now tried only at lengths some token has.
    tokens = ["<unk>", "<s>", "</s>", "a", "b", "ab", "x" * 200_000]
    meta = {f"{T}model": "llama", f"{T}tokens": tokens, f"{T}scores": np.zeros(len(tokens), np.float32),
            f"{T}token_type": np.array([2, 3, 3, 1, 1, 1, 1], np.int32), f"{T}add_space_prefix": False}
    start = time.perf_counter()
    tok = Tokenizer.from_vocab(read_vocab(meta))
    assert time.perf_counter() - start < 5.0
    assert tok.tokenize("ab") == [5]


def test_spm_merges_only_at_token_lengths_match_every_split():
    rng = np.random.default_rng(0)
    tokens = list(dict.fromkeys("".join(rng.choice(list("abc"), rng.integers(1, 7))) for _ in range(400)))
    scores = [-float(i) for i in range(len(tokens))]
    token_to_id = {t: i for i, t in enumerate(tokens)}
    every = sorted((-scores[i], i, k) for i, t in enumerate(tokens) for k in range(1, len(t))
                   if t[:k] in token_to_id and t[k:] in token_to_id)
    assert spm_merges(tokens, scores, token_to_id) == [(tokens[i][:k], tokens[i][k:]) for _, i, k in every]


# -- chat templates --------------------------------------------------------------------------

FAST = RenderLimits(timeout_s=0.5)
MESSAGES = [{"role": "user", "content": "hi"}]


def _render(template: str, limits: RenderLimits = FAST) -> str:
    return render_chat_template(template, MESSAGES, limits=limits)


@pytest.mark.parametrize("template", [
    "{{ ''.__class__.__mro__ }}",
    "{{ ''.__class__ }}",
    "{{ cycler.__init__.__globals__ }}",
    "{{ joiner.__init__.__globals__['os'] }}",
    "{{ namespace.__init__.__globals__ }}",
    "{{ ''['__class__'] }}",
    "{{ messages.__class__.__base__.__subclasses__() }}",
    "{{ '{0.__class__.__mro__}'.format('') }}",
    "{{ self.__init__.__globals__ }}",
    "{{ raise_exception.__globals__ }}",
    "{{ (messages|attr('__class__')) }}",
    "{% set x = [] %}{{ x.append(1) }}",
])
def test_templates_reaching_for_python_internals_are_refused(template):
    with pytest.raises(TokenizerError, match="unsafe"):
        _render(template)


@pytest.mark.parametrize("template", [
    "{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}",
    "{% set r = range(100000)|list %}{% for a in r %}{% for b in r %}{% endfor %}{% endfor %}",
    "{% for a in range(100000) %}{% for b in range(100000) %}x{% endfor %}{% endfor %}",
    "{% macro f(n) %}{% if n %}{{ f(n - 1) }}{{ f(n - 1) }}{% endif %}{% endmacro %}{{ f(60) }}",
    "{% for a in range(100000) %}{% for b in range(100000) %}{% if a == b %}{% endif %}{% endfor %}{% endfor %}",
], ids=["silent-nested-range", "silent-nested-list", "output-nested", "exponential-macro", "silent-compare"])
def test_templates_that_run_for_ever_stop_at_the_time_limit(template):
    err, elapsed, _ = _measured(lambda: _render(template))
    assert isinstance(err, TokenizerError) and "ran longer than 0.5 s" in str(err), err
    assert elapsed < 2.0


BIG = "{% set big = 'x' * 4000000 %}"


@pytest.mark.parametrize("template, message", [
    ("{{ 'a' * 10**10 }}", "repeated sequence"),
    ("{{ 'a' * 10000000000 }}", "repeated sequence"),
    ("{{ [1, 2] * 10**9 }}", "repeated sequence"),
    ("{{ 9 ** (9 ** 9) }}", "power"),
    ("{% set ns = namespace(x=7) %}{% for i in range(40) %}{% set ns.x = ns.x * ns.x %}{% endfor %}", "product"),
    ("{{ 'a'|center(1000000000) }}", "filter 'center'"),
    ("{{ 'a'.center(1000000000) }}", "str.center"),
    ("{{ 'a'.zfill(1000000000) }}", "str.zfill"),
    ("{{ ('\\t' * 1000).expandtabs(100000) }}", "str.expandtabs"),
    ("{{ ('a' * 1000000)|replace('', 'b' * 1000) }}", "filter 'replace'"),
    ("{{ ('a' * 1000000).replace('a', 'b' * 1000) }}", "str.replace"),
    ("{{ range(100000)|join('x' * 1000000) }}", "filter 'join'"),
    ("{{ ('x' * 1000000).join(range(10000)|map('string')) }}", "str.join"),
    ("{{ '%1000000000s' % 'a' }}", "%-formatted"),
    ("{{ '%1000000000s'|format('a') }}", "filter 'format'"),
    ("{{ '{:>1000000000}'.format('a') }}", "formatted string"),
    ("{{ 'a'|indent(1000000000, true) }}", "filter 'indent'"),
    ("{{ messages|tojson(indent=100000) }}", "tojson indent"),
    ("{{ [1]|slice(1000000000)|list }}", "filter 'slice'"),
    ("{% set a = 'x' * 1000000 %}{% set b = a~a~a~a~a~a~a~a~a~a %}{{ b|length }}", "~ concatenation"),
    ("{% set ns = namespace(s='a') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}",
     "~ concatenation"),
    ("{% set ns = namespace(s='a') %}{% for i in range(64) %}{% set ns.s = ns.s + ns.s %}{% endfor %}",
     "concatenation"),
    ("{% macro f(s, n) %}{% if n %}{{ f(s ~ 'x', n - 1) }}{% endif %}{% endmacro %}{{ f('y' * 4000000, 900) }}",
     "bytes of values"),
    ("{% macro m() %}{{ 'x' * 3000000 }}{{ 'x' * 3000000 }}{% endmacro %}{{ m() }}", "block's output"),
    ("{% for i in range(100000) %}{{ 'x' * 1000 }}{% endfor %}", "output is longer"),
    # a list of references to one big string is cheap to build and huge as text
    (BIG + "{{ [big] * 4000000 }}", "an output value"),
    (BIG + "{{ [big]|batch(4000000, big)|list }}", "an output value"),
    (BIG + "{{ 'a' ~ ([big] * 1000) }}", "~ concatenation"),
    (BIG + "{{ ([big] * 1000)|upper }}", "filter 'upper'"),
    (BIG + "{{ ([big] * 1000)|tojson }}", "filter 'tojson'"),
    (BIG + "{{ '%s' % ([big] * 1000,) }}", "%-formatted"),
    (BIG + "{{ '{}'.format([big] * 1000) }}", "formatted string"),
    (BIG + "{% set ns = namespace(l=[big] * 1000) %}{{ ns }}", "an output value"),
    (BIG + "{{ ([[big]] * 1000)|join }}", "filter 'join'"),
    # fuzz finding 6: lists of references held alive by recursion, 32 MB each; counted as memory now
    ("{% macro f(n) %}{% if n %}{% set l = [n] * 4000000 %}{{ f(n - 1) }}{{ l|length }}{% endif %}{% endmacro %}"
     "{{ f(100) }}", "bytes of values"),
    ("{{ (10 ** 4000)|round(-1000000000) }}", "round precision"),  # computes 10**(10**9) in C
    ("{{ ([[1]] * 100000)|sum(start=[]) }}", "sum with a start of type list"),  # quadratic copying in C
], ids=lambda v: v if len(v) < 30 else v[:30])
def test_templates_that_blow_up_are_refused_before_allocating(template, message):
    # a long time limit: the size checks must stop these, not the clock (tracemalloc slows them down)
    err, elapsed, peak = _measured(lambda: _render(template, RenderLimits(timeout_s=30)))
    assert isinstance(err, TokenizerError) and message in str(err), err
    assert peak < 400 << 20, peak  # a few values at the 4 Mi-character limit, never gigabytes


def test_a_namespace_holding_itself_prints():
    assert _render("{% set ns = namespace() %}{% set ns.me = ns %}{{ ns }}") == "<Namespace {'me': <Namespace {...}>}>"


def test_deep_recursion_is_a_clean_error():
    with pytest.raises(TokenizerError, match="RecursionError"):
        _render("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}")


@pytest.mark.parametrize("template", ["{{ 1 + 'a' }}", "{{ messages[5]['x'] }}", "{{ raise_exception('no') }}",
                                      "{% for %}", "{{ 10 ** 5000 }}"])
def test_template_errors_of_every_kind_are_tokenizer_errors(template):
    with pytest.raises(TokenizerError):
        _render(template)


def test_a_timeout_never_escapes_into_the_caller():
    """The watchdog's exception is cleared when the render ends first. Renders whose limit falls around their
    own running time (some finish, some time out) must each end as what they were: a render that reports a
    timeout ran for at least its limit (an earlier render's timeout did not land in it), one that finished
    gave its output, and busy Python code after them never sees a timeout."""
    from worker_orcd.tokenizer.sandbox import RenderTimeout

    runaway = "{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}"
    near = "{% for a in range(3000) %}{% endfor %}x"
    outcomes = {"finished": 0, "timed out": 0}
    try:
        for _ in range(3):
            with pytest.raises(TokenizerError, match="ran longer than"):
                _render(runaway, RenderLimits(timeout_s=0.05))
        durations = []
        for _ in range(5):
            start = time.monotonic()
            assert _render(near, RenderLimits(timeout_s=60)) == "x"
            durations.append(time.monotonic() - start)
        for i in range(300):
            limit = min(durations) * (0.05, 0.5, 0.9, 1.1, 2.0, 20.0)[i % 6]
            start = time.monotonic()
            try:
                out = _render(near, RenderLimits(timeout_s=limit))
            except TokenizerError as e:
                elapsed = time.monotonic() - start
                assert "ran longer than" in str(e), e
                assert elapsed >= limit, f"a timeout after {elapsed:.6f} s of a {limit:.6f} s limit: not this render's"
                outcomes["timed out"] += 1
            else:
                assert out == "x"
                outcomes["finished"] += 1
        if not outcomes["timed out"]:  # a starved watchdog (a loaded machine) let every near render finish
            with pytest.raises(TokenizerError, match="ran longer than"):
                _render(runaway, RenderLimits(timeout_s=0.001))
            outcomes["timed out"] += 1
        deadline = time.monotonic() + 0.3
        n = 0
        while time.monotonic() < deadline:
            n += 1
    except RenderTimeout:
        pytest.fail(f"a render's timeout escaped into the caller after {outcomes}")
    assert outcomes["finished"] and outcomes["timed out"], f"limits around the render time gave only {outcomes}"


def test_a_timeout_landing_as_a_watch_stops_never_leaves_the_watchdog_locked():
    """The race behind a wedged server: a render ends as its deadline passes, so the watchdog fires at the thread
    while that thread waits for the watchdog's lock to stop its watch. The exception arrives the moment the thread
    gets the lock; the lock must still be released (before: it was taken inside Condition.__enter__, a Python
    frame the exception left with the lock held, and every later render in the process hung)."""
    from worker_orcd.tokenizer.sandbox import _WATCHDOG, RenderTimeout, _set_async_exc

    started, go, caught = threading.Event(), threading.Event(), []
    box: dict = {}

    def render_thread() -> None:
        box["watch"] = _WATCHDOG.start(100.0)
        started.set()
        go.wait(5)
        try:
            _WATCHDOG.stop(box["watch"])  # blocks: the test holds the watchdog's lock
            time.sleep(0.2)  # a late exception lands here at the latest
        except RenderTimeout:
            caught.append("timeout")

    t = threading.Thread(target=render_thread, daemon=True)
    t.start()
    assert started.wait(5)
    _WATCHDOG._cond.acquire()  # as the watchdog holds it while it fires
    try:
        go.set()
        time.sleep(0.2)  # the render thread is now waiting for the lock in stop()
        box["watch"].fired = True
        _WATCHDOG._watches.discard(box["watch"])
        _set_async_exc(t.ident, RenderTimeout)
    finally:
        _WATCHDOG._cond.release()
    t.join(5)
    assert not t.is_alive() and caught == ["timeout"]
    free = _WATCHDOG._cond.acquire(timeout=2)
    if free:
        _WATCHDOG._cond.release()
    assert free, "the watchdog's lock stayed held: every later render would hang"
    assert _render("{{ 'ok' }}") == "ok"


def test_a_runaway_render_does_not_stop_other_threads_rendering():
    results: dict[str, str] = {}

    def run(name: str, template: str) -> None:
        try:
            results[name] = _render(template, RenderLimits(timeout_s=0.3))
        except TokenizerError as e:
            results[name] = f"error: {e}"

    loop = "{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}"
    ok = "{% for i in range(2000) %}{{ i }}{% endfor %}"
    threads = [threading.Thread(target=run, args=("loop", loop))]
    threads += [threading.Thread(target=run, args=(f"ok{i}", ok)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert "ran longer" in results.get("loop", "still running after 10 s"), results.get("loop")
    assert all(results[f"ok{i}"] == "".join(map(str, range(2000))) for i in range(4))


def test_the_time_limit_holds_in_a_forked_child():
    import os

    loop = "{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}"
    with pytest.raises(TokenizerError):
        _render(loop, RenderLimits(timeout_s=0.1))  # the watchdog thread now runs in this process
    pid = os.fork()
    if pid == 0:  # the child inherits no threads: its renders need a watchdog of their own
        try:
            _render(loop, RenderLimits(timeout_s=0.1))
        except TokenizerError:
            os._exit(0)
        os._exit(1)
    _, status = os.waitpid(pid, 0)
    assert os.WEXITSTATUS(status) == 0


def test_joining_an_attribute_of_big_messages_is_not_refused():
    messages = [{"role": "user", "content": "x" * 100_000}] * 100  # 10 M characters of content in all
    out = render_chat_template("{{ messages|join(', ', attribute='role') }}", messages)
    assert out == ", ".join(["user"] * 100)


def test_unsafe_attribute_access_in_constant_folding_does_not_break_compiling():
    # jinja2 folds constants at compile time; an unsafe access there must surface at render, as an error
    with pytest.raises(TokenizerError, match="unsafe"):
        _render("{{ 'abc'.__len__ }}")


# -- NaN / inf weights -----------------------------------------------------------------------

def _tiny_llama(tmp_path: Path, qtype: str = "Q8_0") -> Path:
    from tests.fixtures.hf_to_gguf import make_tiny_model, write_gguf

    return write_gguf(make_tiny_model("llama", seed=0), tmp_path / "tiny.gguf", qtype)


def _poke(path: Path, tensor: str, at: int, raw: bytes) -> None:
    with open_gguf(path) as f:
        offset = f.tensors[tensor].offset
    with path.open("r+b") as fh:
        fh.seek(offset + at)
        fh.write(raw)


def test_nan_in_a_norm_is_refused_at_load_naming_the_tensor(tmp_path):
    import worker_orcd

    path = _tiny_llama(tmp_path)
    _poke(path, "blk.1.attn_norm.weight", 4 * 3, struct.pack("<f", float("nan")))
    _poke(path, "blk.1.attn_norm.weight", 4 * 5, struct.pack("<f", float("-inf")))
    with pytest.raises(GGUFError, match=r"tensor blk\.1\.attn_norm\.weight holds 1 NaN and 1 inf values"):
        worker_orcd.load(path, device="cpu")


def test_inspect_check_values_reports_nan_and_inf_per_tensor(tmp_path):
    from worker_orcd.cli import app

    path = _tiny_llama(tmp_path)
    runner = CliRunner()
    clean = runner.invoke(app, ["inspect", str(path), "--check-values"])
    assert clean.exit_code == 0, clean.output
    assert "0withNaNorinf,0notchecked" in _squeezed(clean.output)
    # a Q8_0 block's f16 scale set to NaN makes its 32 values NaN; an F32 norm value set to +inf
    _poke(path, "blk.0.ffn_down.weight", 0, struct.pack("<e", float("nan")))
    _poke(path, "output_norm.weight", 0, struct.pack("<f", float("inf")))
    with open_gguf(path) as f:
        bad = {c.name: (c.nan, c.inf) for c in scan_values(f) if c.bad}
    assert bad == {"blk.0.ffn_down.weight": (32, 0), "output_norm.weight": (0, 1)}
    result = runner.invoke(app, ["inspect", str(path), "--check-values"])
    out = _squeezed(result.output)
    assert result.exit_code == 1, result.output
    assert "2withNaNorinf" in out and "2tensorsholdNaNorinfvalues" in out
    assert "blk.0.ffn_down.weight" in out and "output_norm.weight" in out


def _squeezed(text: str) -> str:
    """CLI output without whitespace (rich wraps long lines at the runner's width)."""
    return "".join(text.split())


def test_value_scan_memory_is_bounded_by_the_chunk(tmp_path, monkeypatch):
    import worker_orcd.inspect as inspect_module

    monkeypatch.setattr(inspect_module, "SCAN_BLOCKS", 4)  # several chunks per tensor, counts still whole
    path = _tiny_llama(tmp_path)
    _poke(path, "blk.1.ffn_up.weight", 34 * 9, struct.pack("<e", float("-inf")))  # the 10th block's scale
    with open_gguf(path) as f:
        bad = {c.name: (c.nan, c.inf) for c in scan_values(f) if c.bad}
    assert bad == {"blk.1.ffn_up.weight": (0, 32)}


def test_inspect_without_check_values_does_not_scan(tmp_path):
    from worker_orcd.cli import app

    path = _tiny_llama(tmp_path)
    _poke(path, "output_norm.weight", 0, struct.pack("<f", float("nan")))
    result = CliRunner().invoke(app, ["inspect", str(path)])
    assert result.exit_code == 0 and "NaN/inf scan" not in result.output


# -- inspect on odd metadata -----------------------------------------------------------------

@pytest.mark.parametrize("key, value", [
    ("llama.block_count", "many"),
    ("llama.attention.head_count", np.array([4, 4, 2, 2], np.int32)),
    ("llama.attention.head_count_kv", np.array([1, 2], np.int32)),
    ("llama.embedding_length", 2.5),
    ("tokenizer.ggml.tokens", np.arange(5, dtype=np.int32)),
])
def test_model_facts_survive_metadata_of_unexpected_types(tmp_path, key, value):
    # a string block count made `layers * heads` a string repetition; an array made `x or 0` raise
    meta = {"general.architecture": "llama", "llama.block_count": 4, "llama.attention.head_count": 4,
            "llama.embedding_length": 64, key: value}
    with open_gguf(_write(tmp_path / "odd.gguf", write_vocab_gguf(meta, {}))) as f:
        facts = model_facts(f)
    assert facts.kv_bytes_per_token >= 0


def test_per_layer_head_counts_are_summed(tmp_path):
    meta = {"general.architecture": "llama", "llama.block_count": 3, "llama.embedding_length": 64,
            "llama.attention.head_count": np.array([4, 4, 8], np.int32),
            "llama.attention.head_count_kv": np.array([2, 1, 0], np.int32)}
    with open_gguf(_write(tmp_path / "per-layer.gguf", write_vocab_gguf(meta, {}))) as f:
        facts = model_facts(f)
    # head dims 16, 16, 8 (64 // heads); K and V in f16
    assert facts.kv_bytes_per_token == (2 * 32 + 1 * 32 + 0 * 16) * 2


# -- the fuzz corpus of findings -------------------------------------------------------------

@pytest.mark.parametrize("path", sorted(REGRESSIONS.glob("*.gguf")), ids=lambda p: p.name)
def test_fuzz_findings_replay_cleanly(path):
    check_gguf(path)
    check_tokenizer(path)

