"""The static decode step (models' `decode`), what CUDA graphs will replay, against the eager forward.

CPU: `decode` over a fixed cache length gives the eager forward's logits (masking replaces slicing), reads no
tensor value on the host, and runs the same ops on the same shapes whatever the positions, tokens and slots.
"""

import traceback

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import worker_orcd
from worker_orcd.engine.kv_cache import single_sequence as span

fixtures = pytest.importorskip("tests.fixtures.hf_to_gguf")

PROMPT = 12


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def load(tmp_path, arch: str, gtype: str, device: str):
    model = fixtures.make_tiny_model(arch, seed=0)
    path = fixtures.write_gguf(model, tmp_path / f"{arch}-{gtype}.gguf", gtype)
    return model, worker_orcd.load(path, device=device).net


def prompt_ids(vocab: int, n: int = PROMPT, seed: int = 1) -> list[int]:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("arch,gtype", [(a, "F32") for a in ("llama", "qwen2", "phi3", "gpt-oss")] + [
    ("llama", "Q8_0"), ("gpt-oss", "MXFP4")])
def test_static_decode_matches_forward_on_cpu(tmp_path, arch, gtype):
    """Two sequences in slots 1 and 0 at different positions decode in one static step."""
    _, net = load(tmp_path, arch, gtype, "cpu")
    a, b = prompt_ids(net.cfg.vocab_size, 10, 1), prompt_ids(net.cfg.vocab_size, 6, 2)
    eager, static = net.new_kv_cache(32, n_slots=2), net.new_kv_cache(32, n_slots=2)
    for kv in (eager, static):
        net.forward(torch.tensor(a), torch.arange(10), kv, seqs=span(10, 1))
        net.forward(torch.tensor(b), torch.arange(6), kv, seqs=span(6, 0))
    ta, tb = 5, 7
    for step in range(8):
        pa, pb = 10 + step, 6 + step
        ref_a = net.forward(torch.tensor([ta]), torch.tensor([pa]), eager, seqs=span(1, 1))[-1]
        ref_b = net.forward(torch.tensor([tb]), torch.tensor([pb]), eager, seqs=span(1, 0))[-1]
        got = net.decode(torch.tensor([ta, tb]), torch.tensor([pa, pb]), torch.tensor([1, 0]), static, 32)
        assert rel_err(got[0], ref_a) < 1e-5 and rel_err(got[1], ref_b) < 1e-5
        ta, tb = int(ref_a.argmax()), int(ref_b.argmax())


class OpLog(TorchDispatchMode):
    """Every aten op with its output shapes; host reads of tensor values (item, int, bool) fail at once."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if str(func) in DATA_DEPENDENT and not cpu_only_id_check():
            raise AssertionError(f"{func} makes the host wait for the device")
        out = func(*args, **(kwargs or {}))
        shapes = [tuple(t.shape) for t in (out if isinstance(out, (tuple, list)) else [out]) if torch.is_tensor(t)]
        self.ops.append((str(func), shapes))
        return out


def cpu_only_id_check() -> bool:
    """QuantTensor.embedding range-checks ids on the host only when they live on the CPU (on CUDA it skips
    the check rather than sync), so that one host read is not one a CUDA step would make."""
    return any(f.name == "embedding" and f.filename.endswith("quant/tensor.py") for f in traceback.extract_stack())


DATA_DEPENDENT = {  # ops whose output size (or result) the host must read from the device
    "aten.item.default", "aten._local_scalar_dense.default", "aten.nonzero.default", "aten._unique2.default",
    "aten.unique_dim.default", "aten.unique_consecutive.default", "aten.masked_select.default",
    "aten.repeat_interleave.Tensor",
}


@pytest.mark.parametrize("arch,gtype", [("gpt-oss", "F32"), ("gpt-oss", "MXFP4"), ("llama", "Q8_0"), ("phi3", "F32")])
def test_static_decode_never_reads_values_and_keeps_its_shapes(tmp_path, monkeypatch, arch, gtype):
    """What a CUDA graph needs, checked on the CPU: after a warm-up step, no op reads a tensor's value on the
    host, and two steps at other positions, tokens and slots run the same ops on the same shapes."""
    _, net = load(tmp_path, arch, gtype, "cpu")
    kv = net.new_kv_cache(32, n_slots=2)

    def no_tolist(self):
        raise AssertionError("tolist makes the host wait for the device")

    net.decode(torch.tensor([1, 1]), torch.tensor([0, 0]), torch.tensor([0, 1]), kv, 32)  # warm-up: caches fill
    logs = []
    for tokens, positions, slots in (([3, 9], [0, 5], [0, 1]), ([17, 2], [20, 7], [1, 0])):
        with monkeypatch.context() as m, OpLog() as log:
            m.setattr(torch.Tensor, "tolist", no_tolist)
            net.decode(torch.tensor(tokens), torch.tensor(positions), torch.tensor(slots), kv, 32)
        logs.append(log.ops)
    assert logs[0] == logs[1]
