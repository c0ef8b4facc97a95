"""The static decode step (models' `decode`) and its CUDA-graph replays against the eager forward and transformers.

CPU: `decode` (the paged attention kernel through the Triton interpreter, positions and block tables read on
the device) gives the eager forward's logits. GPU: graphed decode gives the eager path's logits (rel < 1e-3)
and the same greedy tokens over 32 steps, one graph for every context length.
"""

import traceback

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import worker_orcd
from worker_orcd.engine.cuda_graphs import GraphedDecoder
from worker_orcd.engine.kv_cache import single_sequence as span

fixtures = pytest.importorskip("tests.fixtures.hf_to_gguf")

PROMPT, STEPS = 12, 32


class NoText:
    """The tokenizer side the scheduler needs, with no text: no end-of-generation ids, empty pieces."""

    eog_ids: list[int] = []

    def stream_decoder(self, continuation: bool = False):
        return type("D", (), {"push": lambda self, t: "", "flush": lambda self: ""})()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.double().flatten(), b.double().flatten(), dim=0))


def load(tmp_path, arch: str, gtype: str, device: str):
    model = fixtures.make_tiny_model(arch, seed=0)
    path = fixtures.write_gguf(model, tmp_path / f"{arch}-{gtype}.gguf", gtype)
    return model, worker_orcd.load(path, device=device).net


def prompt_ids(vocab: int, n: int = PROMPT, seed: int = 1) -> list[int]:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("arch,gtype", [(a, "F32") for a in ("llama", "qwen2", "phi3", "gpt-oss")] + [
    ("llama", "Q8_0"), ("gpt-oss", "MXFP4")])
def test_static_decode_matches_forward_on_cpu(tmp_path, arch, gtype):
    """Two sequences in slots 1 and 0 at different positions decode in one static step. With float32 activations
    the same sums to ~1e-7; where the CPU path feeds a Q8_0 matmul half-precision activations (the portable path's
    float16 GEMV), a one-ulp float32 difference between the eager and the static attention can round to 2^-11:
    measured 7.6e-4 on the portable path, so 3e-3 there."""
    from worker_orcd.quant.cpu_caps import cpu_kernels

    _, net = load(tmp_path, arch, gtype, "cpu")
    tol = 3e-3 if gtype == "Q8_0" and cpu_kernels().dense in ("f16", "bf16") else 1e-5
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
        static.prepare(1, pa + 1)
        static.prepare(0, pb + 1)
        got = net.decode(torch.tensor([ta, tb]), torch.tensor([pa, pb]), torch.tensor([1, 0]), static)
        assert rel_err(got[0], ref_a) < tol and rel_err(got[1], ref_b) < tol
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

    for slot in (0, 1):
        kv.prepare(slot, 32)
    net.decode(torch.tensor([1, 1]), torch.tensor([0, 0]), torch.tensor([0, 1]), kv)  # warm-up: caches fill
    logs = []
    for tokens, positions, slots in (([3, 9], [0, 5], [0, 1]), ([17, 2], [20, 7], [1, 0])):
        with monkeypatch.context() as m, OpLog() as log:
            m.setattr(torch.Tensor, "tolist", no_tolist)
            net.decode(torch.tensor(tokens), torch.tensor(positions), torch.tensor(slots), kv)
        logs.append(log.ops)
    assert logs[0] == logs[1]


CASES = [("gpt-oss", "F32"), ("gpt-oss", "Q8_0"), ("gpt-oss", "MXFP4"), ("llama", "Q8_0"), ("qwen2", "F32"),
         ("phi3", "Q8_0")]


@pytest.mark.gpu
@pytest.mark.parametrize("arch,gtype", CASES)
def test_graphed_decode_matches_eager_and_transformers(tmp_path, arch, gtype):
    hf, net = load(tmp_path, arch, gtype, "cuda")
    ids = prompt_ids(net.cfg.vocab_size)
    n = PROMPT + STEPS
    eager, graphed_kv = net.new_kv_cache(n), net.new_kv_cache(n)
    first = net.forward(torch.tensor(ids), torch.arange(PROMPT), eager)[-1]
    net.forward(torch.tensor(ids), torch.arange(PROMPT), graphed_kv)
    graphed = GraphedDecoder(net, graphed_kv, batch_size=1)
    tok_e = tok_g = int(first.argmax())
    seq, rows = ids + [tok_g], [first.cpu()]
    for i in range(PROMPT, n - 1):
        ref = net.forward(torch.tensor([tok_e]), torch.tensor([i]), eager)[-1]
        got = graphed.step([tok_g], [i], [0])[-1].clone()
        assert rel_err(got, ref) < 1e-3, f"step {i}"
        tok_e, tok_g = int(ref.argmax()), int(got.argmax())
        assert tok_g == tok_e, f"greedy tokens part at step {i}"
        seq.append(tok_g)
        rows.append(got.cpu())
    ref_model = hf if gtype == "F32" else fixtures.roundtrip_quantized(hf, gtype)
    with torch.no_grad():
        hf_rows = ref_model(torch.tensor([seq[:-1]])).logits[0, PROMPT - 1 :].float()
    ours = torch.stack(rows)
    assert rel_err(ours, hf_rows) < 3e-2  # bf16 activations and KV cache on CUDA
    assert cosine(ours, hf_rows) >= 0.999


@pytest.mark.gpu
def test_graphed_batch_of_two_matches_eager(tmp_path):
    _, net = load(tmp_path, "gpt-oss", "MXFP4", "cuda")
    a, b = prompt_ids(net.cfg.vocab_size, 10, 1), prompt_ids(net.cfg.vocab_size, 6, 2)
    eager, kv = net.new_kv_cache(32, n_slots=2), net.new_kv_cache(32, n_slots=2)
    for cache in (eager, kv):
        net.forward(torch.tensor(a), torch.arange(10), cache, seqs=span(10, 1))
        net.forward(torch.tensor(b), torch.arange(6), cache, seqs=span(6, 0))
    graphed = GraphedDecoder(net, kv, batch_size=2)
    ta, tb = 5, 7
    for step in range(8):
        pa, pb = 10 + step, 6 + step
        ref_a = net.forward(torch.tensor([ta]), torch.tensor([pa]), eager, seqs=span(1, 1))[-1]
        ref_b = net.forward(torch.tensor([tb]), torch.tensor([pb]), eager, seqs=span(1, 0))[-1]
        got = graphed.step([ta, tb], [pa, pb], [1, 0])
        assert rel_err(got[0], ref_a) < 1e-3 and rel_err(got[1], ref_b) < 1e-3
        ta, tb = int(ref_a.argmax()), int(ref_b.argmax())


@pytest.mark.gpu
def test_generate_on_cuda_uses_graphs_and_matches_cpu(tmp_path):
    hf = fixtures.make_tiny_model("gpt-oss", seed=0)
    path = fixtures.write_gguf(hf, tmp_path / "g.gguf", "F32")
    ids = prompt_ids(hf.config.vocab_size)
    cpu = list(worker_orcd.load(path, device="cpu").generate(ids, max_tokens=16))
    gpu = list(worker_orcd.load(path, device="cuda").generate(ids, max_tokens=16))
    assert gpu == cpu


@pytest.mark.gpu
def test_scheduler_on_cuda_decodes_through_bucketed_graphs(tmp_path):
    """Decode-only steps replay one graph set per batch bucket; padding rows use the scratch slot and
    change nothing: each sequence's greedy tokens stay those of its eager run."""
    from worker_orcd.engine.scheduler import Request, Scheduler, TokenEvent

    _, net = load(tmp_path, "gpt-oss", "MXFP4", "cuda")
    runs = {}
    for graphs in (False, True):
        s = Scheduler(net, NoText(), max_batch=4, ctx=64, prefill_chunk=32, graphs=graphs).start()
        try:
            handles = [s.submit(Request(f"r{i}", prompt_ids(net.cfg.vocab_size, 6 + i, i), 12)) for i in range(3)]
            runs[graphs] = [[e.token for e in h if isinstance(e, TokenEvent)] for h in handles]
            if graphs:
                assert set(s._decoder.decoders) & {1, 2, 4}
        finally:
            s.stop()
    assert runs[True] == runs[False]


@pytest.mark.gpu
def test_scheduler_start_leaves_no_kernel_for_the_first_requests_to_compile(tmp_path):
    """start() runs both kinds of prompt chunk (packable, and longer than pack_rows) besides capturing the
    decode graphs, so the first requests, short or long, compile no Triton kernel while serving."""
    from triton import knobs

    from worker_orcd.engine.scheduler import Request, Scheduler

    _, net = load(tmp_path, "gpt-oss", "MXFP4", "cuda")
    s = Scheduler(net, NoText(), max_batch=4, ctx=512, prefill_chunk=256).start()
    compiled, hook = [], knobs.runtime.jit_cache_hook
    knobs.runtime.jit_cache_hook = lambda *, repr, **_: compiled.append(repr.split("[")[0]) or False
    try:
        for n in (1, 7, 20, 200):
            list(s.submit(Request(f"r{n}", prompt_ids(net.cfg.vocab_size, n, n), 4)))
    finally:
        knobs.runtime.jit_cache_hook = hook
        s.stop()
    assert compiled == []


@pytest.mark.gpu
def test_scheduler_on_cuda_texts_do_not_depend_on_company(tmp_path):
    """16 requests of different lengths (greedy, and seeded samples drawn on the device) decoding and
    prefilling together give each the tokens it gets alone: every GPU kernel computes a row the same way in
    any batch. Penalties, logit bias, min_p, logprobs and prompt logprobs are computed on the device too."""
    from dataclasses import replace

    from worker_orcd.engine.sampler import SamplingParams
    from worker_orcd.engine.scheduler import PromptEvent, Request, Scheduler, TokenEvent

    _, net = load(tmp_path, "gpt-oss", "MXFP4", "cuda")
    s = Scheduler(net, NoText(), max_batch=16, ctx=256, prefill_chunk=64).start()
    try:
        kinds = [SamplingParams(temperature=0.8, top_p=0.9, top_k=50, seed=0), SamplingParams(),
                 SamplingParams(temperature=1.1, min_p=0.05, repetition_penalty=1.2, frequency_penalty=0.3,
                                presence_penalty=0.2, logit_bias=((5, 2.0), (7, -100.0)), seed=1),
                 SamplingParams(repetition_penalty=1.3, logit_bias=((9, 1.5),))]
        reqs = [Request(f"r{i}", prompt_ids(net.cfg.vocab_size, 3 + 9 * i, i), 20, replace(kinds[i % 4], seed=i),
                        logprobs=3 if i % 2 else None, prompt_logprobs=2 if i % 5 == 0 else None)
                for i in range(16)]

        def events(handle) -> list:
            return [(e.token, e.logprob) if isinstance(e, TokenEvent) else e.logprobs for e in handle
                    if isinstance(e, TokenEvent | PromptEvent)]

        alone = [events(s.submit(r)) for r in reqs]
        together = [events(h) for h in [s.submit(replace(r, id=r.id + "b")) for r in reqs]]
    finally:
        s.stop()
    assert together == alone


@pytest.mark.gpu
def test_overlapped_decode_launches_without_a_sync_and_changes_nothing(tmp_path, monkeypatch):
    """The overlapped step queues decode N + 1 before it handles step N's tokens: its launch must not wait
    for the GPU (torch's sync debug mode turns any synchronizing call into an error there), and the tokens
    are those of the serial loop, greedy and sampled with every option, prompt chunks riding along or not."""
    from dataclasses import replace

    from worker_orcd.engine.sampler import SamplingParams
    from worker_orcd.engine.scheduler import Request, Scheduler, TokenEvent

    launch, launches = Scheduler._launch, []

    def strict_launch(self, rows, last, riders=()):
        torch.cuda.set_sync_debug_mode("error")
        try:
            launches.append((len(rows), len(riders)))
            return launch(self, rows, last, riders)
        finally:
            torch.cuda.set_sync_debug_mode("default")

    monkeypatch.setattr(Scheduler, "_launch", strict_launch)
    _, net = load(tmp_path, "gpt-oss", "MXFP4", "cuda")
    kinds = [SamplingParams(), SamplingParams(temperature=0.8, top_p=0.9, top_k=50, min_p=0.05, seed=0),
             SamplingParams(temperature=1.1, repetition_penalty=1.2, frequency_penalty=0.3, presence_penalty=0.2,
                            logit_bias=((5, 2.0), (7, -100.0)), seed=1)]
    reqs = [Request(f"r{i}", prompt_ids(net.cfg.vocab_size, 3 + 5 * i, i), 6 + 2 * i, replace(kinds[i % 3], seed=i),
                    logprobs=2 if i % 2 else None) for i in range(6)]
    runs = {}
    for overlap in (False, True):
        s = Scheduler(net, NoText(), max_batch=8, ctx=128, prefill_chunk=32, overlap=overlap).start()
        try:
            handles = [s.submit(r) for r in reqs]
            runs[overlap] = [[(e.token, e.logprob) for e in h if isinstance(e, TokenEvent)] for h in handles]
        finally:
            s.stop()
    assert launches, "no overlapped launch ran"
    assert any(r for _, r in launches), f"no prompt chunk rode along: {launches}"
    assert runs[True] == runs[False]
