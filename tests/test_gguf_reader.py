"""The GGUF reader: valid files open (matching gguf.GGUFReader), malformed ones are refused with GGUFError only,
quickly and within a small memory bound, even when their counts claim 2^64-1 of something."""

from __future__ import annotations

import os
import pickle
import signal
import struct
import time
import tracemalloc
from contextlib import contextmanager
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFValueType
from gguf.quants import quantize
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.gguf_corpus import ARRAYS, SCALARS, TENSORS, build, layout, malformed_cases, patch, splice, valid_bytes
from tests.shared_data import vocab_files
from worker_orcd.gguf import GGUFError, open_gguf

# The reader's own work, in CPU seconds of the opening thread: the wall clock on a busy machine also counts
# other processes' time (a 2 s wall-clock budget failed once with two busy loops on the two cores).
TIME_BUDGET_S = 2.0
HANG_S = 60.0  # wall clock: SIGALRM interrupts a hang so it fails the test instead of stalling the run
MEMORY_BUDGET = 4 * 2**20
CASES = malformed_cases()


@contextmanager
def _time_budget(seconds: float):
    """Interrupts a hang (SIGALRM) so it fails the test instead of stalling the run."""

    def on_alarm(signum, frame):
        raise TimeoutError(f"still running after {seconds} s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _open_measured(path: Path) -> tuple[Exception | None, float, int]:
    """(exception or None, CPU seconds of this thread, peak bytes allocated) for opening and closing `path`."""
    tracemalloc.start()
    tracemalloc.reset_peak()
    start = time.thread_time()
    err = None
    try:
        with _time_budget(HANG_S), open_gguf(path) as f:
            for name in f.tensors:  # what opened is in bounds: every view can be made
                assert len(f.tensor_bytes(name)) == f.tensors[name].nbytes
    except Exception as e:
        err = e
    finally:
        elapsed = time.thread_time() - start
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return err, elapsed, peak


def _refused(path: Path) -> GGUFError:
    err, elapsed, peak = _open_measured(path)
    assert err is not None, "the malformed file opened"
    assert type(err) is GGUFError, f"{type(err).__name__}: {err}"
    assert elapsed < TIME_BUDGET_S, f"took {elapsed:.2f} CPU s"
    assert peak < MEMORY_BUDGET, f"peak allocation {peak} bytes"
    assert err.path == str(path) and str(err).startswith(str(path))
    return err


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


@pytest.fixture(scope="module")
def valid_path(tmp_path_factory) -> Path:
    return _write(tmp_path_factory.mktemp("gguf") / "valid.gguf", valid_bytes())


# -- the valid file --------------------------------------------------------------------------------------------


def _tensor_bytes_expected(name: str) -> bytes:
    data, qtype = TENSORS[name]
    if qtype in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
        return data.tobytes()
    return quantize(data, qtype).tobytes()


def test_valid_file_opens_with_every_value_type(valid_path):
    with open_gguf(valid_path) as f:
        assert f.version == 3 and f.alignment == 32 and f.architecture == "llama"
        assert f.data_offset % 32 == 0 and f.file_size == len(valid_bytes())
        assert f.get("general.name") == "corpus" and f.arch_get("missing", 7) == 7
        for key, (vtype, value) in SCALARS.items():
            assert f.metadata_types[key] == vtype
            assert f.get(key) == (np.float32(value) if vtype == GGUFValueType.FLOAT32 else value), key
        for key, (_, values) in ARRAYS.items():
            assert f.metadata_types[key] == GGUFValueType.ARRAY
            assert list(f.get(key)) == values, key
        assert list(f.tensors) == list(TENSORS)
        for name, (data, qtype) in TENSORS.items():
            t = f.tensors[name]
            assert t.ggml_type == qtype and t.shape == data.shape and t.n_elements == data.size
            assert f.tensor_bytes(name).tobytes() == _tensor_bytes_expected(name)


def test_parity_with_gguf_reader(valid_path):
    _assert_parity(valid_path)


def _assert_parity(path: Path) -> None:
    ref = gguf.GGUFReader(path)
    with open_gguf(path) as f:
        fields = {k: v for k, v in ref.fields.items() if not k.startswith("GGUF.")}
        assert list(fields) == list(f.metadata)
        for key, field in fields.items():
            assert f.metadata_types[key] == field.types[0], key
            ours, theirs = f.metadata[key], field.contents()
            if isinstance(ours, np.ndarray):
                np.testing.assert_array_equal(ours, np.asarray(theirs, dtype=ours.dtype), err_msg=key)
            else:
                assert ours == theirs, key
        assert [t.name for t in ref.tensors] == list(f.tensors)
        for rt in ref.tensors:
            t = f.tensors[rt.name]
            assert t.ggml_type == rt.tensor_type and t.ne == tuple(int(d) for d in rt.shape)
            assert t.offset == rt.data_offset and t.nbytes == rt.n_bytes
            assert np.array_equal(f.tensor_bytes(rt.name), np.asarray(rt.data).reshape(-1).view(np.uint8))


def test_valid_variants_open(tmp_path):
    v = valid_bytes()
    lay = layout(v)
    variants = {
        "version_2": patch(v, 4, "<I", 2),
        "explicit_alignment_32": build(alignment=(GGUFValueType.UINT32, 32)),
        "alignment_64": build(data_alignment=64),
        "no_trailing_padding": v[: lay.data_end],
        "empty_array": splice(v, lay.at("kv:test.arr_i32.etype"), lay.at("kv:test.arr_f32"),
                              struct.pack("<IQ", GGUFValueType.INT32, 0)),
    }
    for name, data in variants.items():
        err, elapsed, peak = _open_measured(_write(tmp_path / f"{name}.gguf", data))
        assert err is None, f"{name}: {err!r}"
        with open_gguf(tmp_path / f"{name}.gguf") as f:
            assert f.data_offset % f.alignment == 0
            for tname in TENSORS:
                assert f.tensor_bytes(tname).tobytes() == _tensor_bytes_expected(tname), (name, tname)
    with open_gguf(tmp_path / "alignment_64.gguf") as f:
        assert f.alignment == 64
    with open_gguf(tmp_path / "empty_array.gguf") as f:
        assert f.get("test.arr_i32").shape == (0,) and f.get("test.arr_f32").tolist() == [0.25, -1.5]


# -- malformed files ---------------------------------------------------------------------------------------------


def test_corpus_is_large_and_distinct():
    assert len(CASES) >= 25
    assert len({c.name for c in CASES}) == len(CASES)
    assert len({c.data for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_malformed_file_is_refused(case, tmp_path):
    err = _refused(_write(tmp_path / f"{case.name}.gguf", case.data))
    assert case.expect in str(err), str(err)


def test_truncated_at_every_byte(tmp_path):
    """Every prefix of the file up to the end of its last tensor: header fields, padding and tensor data."""
    v = valid_bytes()
    path = tmp_path / "cut.gguf"
    for n in range(layout(v).data_end):
        err = _refused(_write(path, v[:n]))
        assert err.where is not None or n == 0, (n, str(err))


@pytest.fixture(scope="module")
def fuzz_path(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz") / "fuzz.gguf"


@settings(max_examples=500, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(
    flips=st.lists(st.tuples(st.integers(0, len(valid_bytes()) - 1), st.integers(0, 255)), max_size=4),
    cut=st.one_of(st.none(), st.integers(0, len(valid_bytes()))),
)
def test_random_damage_opens_or_raises_gguf_error(fuzz_path, flips, cut):
    data = bytearray(valid_bytes())
    for pos, byte in flips:
        data[pos] = byte
    err, elapsed, peak = _open_measured(_write(fuzz_path, bytes(data[:cut])))
    assert err is None or type(err) is GGUFError, f"{type(err).__name__}: {err}"
    assert elapsed < TIME_BUDGET_S and peak < MEMORY_BUDGET


_LAYOUT = layout(valid_bytes())
_NUMERIC_FIELDS = sorted(  # every number in the header: counts, lengths, types, dims, offsets, values
    name for name, (_, size) in _LAYOUT.fields.items()
    if size in (1, 2, 4, 8) and not name.endswith((".key", ".name", ".str")) and not name.startswith("kv:test.arr_str[")
    or name.startswith("kv:test.arr_str[") and name.endswith(".len")
)
_INTERESTING = [0, 1, 2, 3, 4, 5, 8, 9, 12, 13, 31, 32, 33, 63, 64, 2**31, 2**32 - 1, 2**32, 2**63 - 1, 2**63,
                2**64 - 32, 2**64 - 1]


@settings(max_examples=300, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(field=st.sampled_from(_NUMERIC_FIELDS),
       value=st.one_of(st.sampled_from(_INTERESTING), st.integers(0, 2**64 - 1)))
def test_any_header_field_set_to_any_value_opens_or_raises_gguf_error(fuzz_path, field, value):
    offset, size = _LAYOUT.fields[field]
    data = bytearray(valid_bytes())
    data[offset : offset + size] = (value % 2 ** (8 * size)).to_bytes(size, "little")
    err, elapsed, peak = _open_measured(_write(fuzz_path, bytes(data)))
    assert err is None or type(err) is GGUFError, f"{field}={value}: {type(err).__name__}: {err}"
    assert elapsed < TIME_BUDGET_S and peak < MEMORY_BUDGET


# -- resources and the API's edges -----------------------------------------------------------------------------


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc")
def test_close_releases_the_file_even_when_metadata_or_errors_are_kept(valid_path, tmp_path):
    before = _open_fds()
    kept = []
    for _ in range(5):
        with open_gguf(valid_path) as f:
            kept.append(f.metadata)
    bad = _write(tmp_path / "bad.gguf", valid_bytes()[:-100])
    for _ in range(5):
        with pytest.raises(GGUFError) as e:
            open_gguf(bad)
        kept.append(e)
    assert _open_fds() == before
    assert kept[0]["test.arr_i32"].flags.writeable  # a copy, not a view of the (closed) mapping


def test_tensor_bytes_refuses_unknown_names_and_closed_files(valid_path):
    f = open_gguf(valid_path)
    with pytest.raises(GGUFError, match="tensor nope not found"):
        f.tensor_bytes("nope")
    f.close()
    f.close()
    with pytest.raises(GGUFError, match="t0.f32: file is closed"):
        f.tensor_bytes("t0.f32")


def test_paths_that_are_not_files_are_refused(tmp_path):
    assert "cannot open" in str(_refused(tmp_path / "missing.gguf"))
    assert "Is a directory" in str(_refused(tmp_path))
    os.mkfifo(tmp_path / "fifo")  # opening a FIFO for reading would wait for a writer
    assert "not a regular file" in str(_refused(tmp_path / "fifo"))


def test_gguf_error_pickles():
    e = pickle.loads(pickle.dumps(GGUFError("m.gguf", "tensor x: offset 3 past end of file", "offset 99")))
    assert (type(e), e.path, e.what, e.where, str(e)) == (
        GGUFError, "m.gguf", "tensor x: offset 3 past end of file", "offset 99",
        "m.gguf: tensor x: offset 3 past end of file (at offset 99)")


# -- real files ---------------------------------------------------------------------------------------------------


def _check_real(f, arch: str, n_tensors: int) -> None:
    assert f.architecture == arch and len(f.tensors) == n_tensors
    assert f.version == 3 and f.data_offset % f.alignment == 0
    spans = sorted((t.offset, t.offset + t.nbytes) for t in f.tensors.values())
    assert spans[0][0] >= f.data_offset and spans[-1][1] <= f.file_size
    assert all(end <= nxt for (_, end), (nxt, _) in zip(spans, spans[1:]))
    # the vocabulary against the embedding's rows (Gemma 3 has no <arch>.vocab_size key to compare with)
    n_vocab = len(f.get("tokenizer.ggml.tokens"))
    assert f.tensors["token_embd.weight"].shape[0] == n_vocab
    assert f.arch_get("vocab_size", n_vocab) == n_vocab


def test_smollm2_opens_and_matches_gguf_reader(smollm2_path):
    with open_gguf(smollm2_path) as f:
        _check_real(f, "llama", 272)
        assert len(f.get("tokenizer.ggml.tokens")) == 49152
    _assert_parity(smollm2_path)


def test_vocab_only_files_open():
    for path in vocab_files():
        with open_gguf(path) as f:
            assert not f.tensors and f.get("tokenizer.ggml.model") in ("gpt2", "llama"), path
            assert len(f.get("tokenizer.ggml.tokens")) > 1000 and f.architecture in ("gpt2", "llama", "phi3", "qwen2")


def test_gemma3_opens_with_small_memory_for_its_vocab(gemma3_path, record_property):
    tracemalloc.start()
    tracemalloc.reset_peak()
    try:
        with open_gguf(gemma3_path) as f:
            peak = tracemalloc.get_traced_memory()[1]
            _check_real(f, "gemma3", 236)
            assert len(f.get("tokenizer.ggml.tokens")) == 262144
            header = f.data_offset
    finally:
        tracemalloc.stop()
    ratio = peak / header
    record_property("gemma3_open_peak_over_header", round(ratio, 2))
    print(f"gemma3: peak {peak / 2**20:.1f} MiB while opening, header {header / 2**20:.1f} MiB, ratio {ratio:.2f}")
    # 262144 Python str objects are most of it (they cost ~86 bytes each against ~17 on disk).
    assert ratio < 5
