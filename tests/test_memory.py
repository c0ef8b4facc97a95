"""engine/memory.py: the estimate made from the header, the fit check, residency."""

from __future__ import annotations

import pytest
import torch

from worker_orcd.engine import memory
from worker_orcd.gguf import open_gguf
from worker_orcd.models.registry import build_model

fixtures = pytest.importorskip("tests.fixtures.hf_to_gguf")


@pytest.fixture(scope="module", params=["llama", "gemma3", "gpt-oss", "gpt2"])
def tiny(request, tmp_path_factory):
    arch = request.param
    path = tmp_path_factory.mktemp("mem") / f"{arch}.gguf"
    fixtures.write_gguf(fixtures.make_tiny_model(arch, seed=0), path, "Q8_0" if arch != "gpt-oss" else "F32")
    return path


def test_estimate_matches_what_load_allocates(tiny):
    with open_gguf(tiny) as f:
        need = memory.estimate(f, "cpu", ctx=64, slots=3)
        net = build_model(f, torch.device("cpu"))
    kv = net.new_kv_cache(64, 3)
    assert need.kv_cache == kv.nbytes
    on_device, held = memory.residency(net, torch.device("cpu"))
    # nothing packed yet; beyond the weights a model holds only small tables (RoPE frequencies)
    assert on_device and need.weights <= held <= need.weights + 4096
    assert need.workspace >= memory.MARGIN_BYTES
    assert need.total == need.weights + need.kv_cache + need.workspace


def test_cuda_estimate_counts_the_packed_copy(tiny):
    with open_gguf(tiny) as f:
        cpu = memory.weight_bytes(f, "cpu")
        cuda = memory.weight_bytes(f, "cuda")
        packed = sum(r.nbytes for r in f.tensors.values() if r.ggml_type in memory.GPU_PACKED_TYPES)
    assert cuda == cpu + packed


def test_limit_refuses_with_required_available_and_device(tiny):
    with open_gguf(tiny) as f:
        need = memory.estimate(f, "cpu", ctx=64, slots=1)
    memory.check_fits(need, torch.device("cpu"), limit=need.total)  # exactly enough is enough
    with pytest.raises(memory.InsufficientMemory) as e:
        memory.check_fits(need, torch.device("cpu"), limit=need.total - 1)
    msg = str(e.value)
    assert str(need.total) in msg and str(need.total - 1) in msg and "cpu" in msg and "--vram-limit" in msg


@pytest.mark.parametrize("text,expected", [("20GiB", 20 * 2**30), ("20G", 20 * 2**30), ("512MB", 512 * 2**20),
                                           ("1.5k", 1536), ("4096", 4096), (" 2 GiB ", 2 * 2**30)])
def test_parse_size(text, expected):
    assert memory.parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "GiB", "-1G", "nanG", "infG", "12X", "0"])
def test_parse_size_refuses(text):
    with pytest.raises(ValueError, match="not a size"):
        memory.parse_size(text)


def test_residency_sees_a_tensor_off_the_device(tiny):
    with open_gguf(tiny) as f:
        net = build_model(f, torch.device("cpu"))
    ok, nbytes = memory.residency(net, torch.device("cpu"))
    assert ok and nbytes > 0
    net.layers[-1].ffn_norm = torch.zeros(3, device="meta")  # one tensor left behind
    assert memory.residency(net, torch.device("cpu"))[0] is False
