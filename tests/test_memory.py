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
    model = fixtures.make_tiny_model(arch, seed=0)
    if arch == "gpt-oss":
        fixtures.write_gguf(model, path, "MXFP4", dense_type="Q8_0")
    else:
        fixtures.write_gguf(model, path, "Q8_0")
    return path


def test_estimate_matches_what_load_allocates(tiny):
    with open_gguf(tiny) as f:
        need = memory.estimate(f, ctx=70, slots=3)
        net = build_model(f, torch.device("cpu"))
    kv = net.new_kv_cache(70, 3)
    assert need.kv_cache == kv.nbytes
    on_device, held = memory.residency(net, torch.device("cpu"))
    # nothing packed yet; beyond the weights a model holds only small tables (RoPE frequencies)
    assert on_device and need.weights <= held <= need.weights + 4096
    assert need.workspace >= memory.MARGIN_BYTES
    assert need.total == need.weights + need.kv_cache + need.workspace


def test_packed_only_weights_are_the_estimate_and_give_the_same_logits(tiny):
    """On CUDA the kernels' packing replaces the blocks at load (one copy); simulated here on CPU, where a
    packed-only tensor unpacks on first use: same logits, and resident bytes equal to the estimate."""
    from worker_orcd.models.registry import FAMILIES, config_for
    from worker_orcd.models.weights import Weights

    with open_gguf(tiny) as f:
        need = memory.estimate(f, ctx=8, slots=1)
        plain = build_model(f, torch.device("cpu"))
        w = Weights(f, torch.device("cpu"), mmap=False)
        for t in w._t.values():
            if not isinstance(t, torch.Tensor):
                t.pack_resident()
        packed = FAMILIES[f.architecture][1](config_for(f), w)
        on_device, held = memory.residency(packed, torch.device("cpu"))
    assert on_device and need.weights <= held <= need.weights + 4096
    ids = torch.tensor([1, 5, 2, 7, 3])
    logits = [net.forward(ids, torch.arange(5), net.new_kv_cache(8)) for net in (plain, packed)]
    assert torch.equal(logits[0], logits[1])


def test_limit_refuses_with_required_available_and_device(tiny):
    with open_gguf(tiny) as f:
        need = memory.estimate(f, ctx=64, slots=1)
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
