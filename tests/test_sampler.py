import pytest
import torch

from worker_orcd.engine.sampler import (
    Sampler,
    SamplingParams,
    TokenCounts,
    apply_penalties,
    pick_rows,
    sample_rows,
    token_logprobs,
)
from worker_orcd.engine.stop import StopMatcher


def test_greedy_is_argmax():
    logits = torch.randn(1000)
    assert Sampler(SamplingParams())(logits) == int(logits.argmax())


def test_same_seed_same_tokens_different_seed_differs():
    logits = torch.randn(500)
    draws = lambda seed: [Sampler(SamplingParams(temperature=1.0, seed=seed))(logits) for _ in range(1)]  # noqa: E731
    a = Sampler(SamplingParams(temperature=1.0, seed=1))
    b = Sampler(SamplingParams(temperature=1.0, seed=1))
    c = Sampler(SamplingParams(temperature=1.0, seed=2))
    sa, sb, sc = [a(logits) for _ in range(20)], [b(logits) for _ in range(20)], [c(logits) for _ in range(20)]
    assert sa == sb and sa != sc
    assert draws(3) == draws(3)


def filtered_probs(logits: torch.Tensor, top_k: int, top_p: float, min_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference: the filters one row at a time, as (sorted descending probs, their ids)."""
    sorted_logits, ids = torch.sort(logits, descending=True, stable=True)
    if 0 < top_k < sorted_logits.shape[0]:
        sorted_logits, ids = sorted_logits[:top_k], ids[:top_k]
    probs = torch.softmax(sorted_logits, dim=-1)
    if top_p < 1.0:
        keep = (probs.cumsum(-1) - probs) < top_p
        keep[0] = True
        probs, ids = probs[keep], ids[keep]
    if min_p > 0.0:
        keep = probs >= min_p * probs[0]
        probs, ids = probs[keep], ids[keep]
    return probs / probs.sum(), ids


def reference_draw(logits: torch.Tensor, p: SamplingParams, u: float) -> int:
    probs, ids = filtered_probs(logits / p.temperature, p.top_k, p.top_p, p.min_p)
    idx = int(torch.searchsorted(probs.cumsum(-1), torch.tensor([u], dtype=probs.dtype)))
    return int(ids[min(idx, ids.shape[0] - 1)])


def reference_penalties(logits: list[float], prompt: list[int], output: list[int], rep: float, pres: float,
                        freq: float) -> list[float]:
    """vLLM's / HF's formulas written out per id, in float64."""
    out = []
    for t, x in enumerate(logits):
        if t in prompt or t in output:
            x = x / rep if x > 0 else x * rep
        n = output.count(t)
        out.append(x - freq * n - pres * (n > 0))
    return out


def test_filters_keep_what_they_should():
    logits = torch.log(torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05]))
    probs, ids = filtered_probs(logits, top_k=3, top_p=1.0, min_p=0.0)
    assert ids.tolist() == [0, 1, 2] and abs(float(probs.sum()) - 1) < 1e-6
    _, ids = filtered_probs(logits, top_k=0, top_p=0.7, min_p=0.0)
    assert ids.tolist() == [0, 1]  # 0.5 + 0.2 reaches 0.7
    _, ids = filtered_probs(logits, top_k=0, top_p=1.0, min_p=0.35)
    assert ids.tolist() == [0, 1]  # >= 0.35 * 0.5
    _, ids = filtered_probs(logits, top_k=0, top_p=0.01, min_p=0.0)
    assert ids.tolist() == [0]
    # the batched draw keeps the same sets: with u just below 1 it picks the least likely kept token
    for kw, last in [(dict(top_k=3), 2), (dict(top_p=0.7), 1), (dict(min_p=0.35), 1), (dict(top_p=0.01), 0)]:
        p = SamplingParams(temperature=1.0, **kw)
        assert sample_rows(logits[None], [p], [0.999999]).tolist() == [last]


def test_sampling_follows_the_distribution():
    logits = torch.log(torch.tensor([0.6, 0.3, 0.1]))
    s = Sampler(SamplingParams(temperature=1.0, seed=0))
    counts = torch.bincount(torch.tensor([s(logits) for _ in range(3000)]), minlength=3).float() / 3000
    assert torch.allclose(counts, torch.tensor([0.6, 0.3, 0.1]), atol=0.04)


def test_penalties_match_their_formulas():
    torch.manual_seed(0)
    logits = torch.randn(3, 50) * 4
    prompt, output = [[1, 2, 3, 3], [], [7]], [[3, 4, 4, 4], [5, 5], []]
    params = [SamplingParams(repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.25),
              SamplingParams(presence_penalty=-1.0, frequency_penalty=2.0), SamplingParams(repetition_penalty=0.7)]
    generated = torch.zeros(3, 50, dtype=torch.int32)
    seen = torch.zeros(3, 50, dtype=torch.bool)
    for i in range(3):
        for t in output[i]:
            generated[i, t] += 1
        seen[i, prompt[i] + output[i]] = True
    got = apply_penalties(logits, generated, seen, params)
    for i in range(3):
        want = reference_penalties(logits[i].double().tolist(), prompt[i], output[i], params[i].repetition_penalty,
                                   params[i].presence_penalty, params[i].frequency_penalty)
        assert torch.allclose(got[i].double(), torch.tensor(want, dtype=torch.float64), atol=1e-5)


def test_penalized_decoding_follows_the_reference_on_a_scripted_sequence():
    """Greedy picks with every penalty over 40 scripted steps (logits that favour repeating a few ids), the
    Sampler's device counts against the formulas applied to the history so far."""
    torch.manual_seed(1)
    prompt = [3, 9, 9, 12]
    p = SamplingParams(repetition_penalty=1.5, presence_penalty=0.4, frequency_penalty=0.3, seed=0)
    s = Sampler(p, prompt)
    output: list[int] = []
    for _ in range(40):
        logits = torch.randn(30)
        logits[[3, 9, 12, 20]] += 3.0
        want = reference_penalties(logits.double().tolist(), prompt, output, 1.5, 0.4, 0.3)
        token = s(logits)
        assert token == max(range(30), key=lambda t: want[t])
        output.append(token)
    assert len(set(output)) > 4  # the penalties moved the picks off the favoured ids


def test_logit_bias_adds_and_clamps_nothing_else():
    logits = torch.zeros(2, 10)
    logits[:, 4] = 5.0
    biased = SamplingParams(logit_bias=((4, -100.0), (7, 2.0)))
    forced = SamplingParams(logit_bias=((2, 100.0),))
    assert pick_rows(logits, [biased, forced], [0.0, 0.0], [None, None]).tolist() == [7, 2]
    assert logits[0, 4] == 5.0  # the caller's logits are not changed
    with pytest.raises(ValueError, match="logit_bias"):
        SamplingParams(logit_bias=((1, 101.0),)).validate()


def test_pick_rows_batch_equals_each_row_alone():
    """Batch invariance of the pick: greedy, sampled, biased and penalized rows together pick what each picks
    alone (its own uniform, its own counts), step after step."""
    torch.manual_seed(2)
    params = [SamplingParams(), SamplingParams(temperature=0.8, top_k=20, seed=5),
              SamplingParams(temperature=1.2, min_p=0.05, repetition_penalty=1.2, seed=6),
              SamplingParams(frequency_penalty=0.5, logit_bias=((3, 1.5),)), SamplingParams(top_p=0.9, temperature=1.0)]
    together = [Sampler(p, [1, 2, 3]) for p in params]
    alone = [Sampler(p, [1, 2, 3]) for p in params]
    for _ in range(15):
        logits = torch.randn(len(params), 200) * 2
        picks = pick_rows(logits, [s.p for s in together], [s.draw() for s in together],
                          [s.counts_for(logits) for s in together]).tolist()
        assert picks == [s(row) for s, row in zip(alone, logits)]


def test_token_logprobs_are_log_softmax():
    torch.manual_seed(3)
    logits = torch.randn(4, 300) * 5
    tokens = torch.tensor([0, 17, 299, 5])
    chosen, top, ids = token_logprobs(logits, tokens, 5)
    ref = torch.log_softmax(logits.double(), -1)
    assert torch.allclose(chosen.double(), ref[torch.arange(4), tokens], atol=1e-5)
    assert torch.equal(ids, ref.topk(5, -1).indices)
    assert torch.allclose(top.double(), ref.topk(5, -1).values, atol=1e-5)
    assert (top[:, :-1] >= top[:, 1:]).all()


def test_token_counts_start_from_the_prompt():
    c = TokenCounts([4, 4, 1], 8, torch.device("cpu"))
    assert c.seen.nonzero().flatten().tolist() == [1, 4] and int(c.generated.sum()) == 0


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(temperature=float("nan")), dict(top_p=0.0),
                                 dict(top_p=1.5), dict(top_k=-1), dict(min_p=2.0)])
def test_invalid_params_are_refused(bad):
    with pytest.raises(ValueError):
        Sampler(SamplingParams(**bad))


def test_stop_matcher_holds_back_partial_matches():
    m = StopMatcher(["###", "User:"])
    out = m.push("Hello #") + m.push("# wor") + m.push("ld Us") + m.push("er: more")
    assert out == "Hello ## world " and m.stopped
    m = StopMatcher(["\n\n"])
    assert m.push("a\n") == "a" and m.push("b") == "\nb" and not m.stopped
    assert m.flush() == ""


def test_extreme_but_valid_values_do_not_break_sampling():
    logits = torch.randn(100)
    assert Sampler(SamplingParams(temperature=5e-324, seed=1))(logits) == int(logits.argmax())
    assert Sampler(SamplingParams(temperature=1.0, top_p=1e-46, seed=1))(logits) == int(logits.argmax())


def test_sample_rows_draws_what_the_reference_draws():
    """The batched device draw (one sort for all rows) picks the token the one-row reference picks with the
    same uniform, for every filter."""
    torch.manual_seed(0)
    params = [SamplingParams(temperature=t, top_k=k, top_p=p, min_p=m, seed=s)
              for s, (t, k, p, m) in enumerate([(0.7, 0, 1.0, 0.0), (1.0, 5, 1.0, 0.0), (1.3, 0, 0.9, 0.0),
                                                 (0.9, 0, 1.0, 0.05), (2.0, 40, 0.8, 0.02), (0.5, 1, 1.0, 0.0)])]
    for _ in range(20):
        logits = torch.randn(len(params), 300) * 3
        draws = [Sampler(p).draw() for p in params]
        want = [reference_draw(row, p, u) for p, row, u in zip(params, logits, draws)]
        assert sample_rows(logits, params, draws).tolist() == want


@pytest.mark.gpu
def test_pick_rows_on_cuda_picks_what_the_cpu_picks():
    """The same torch code on CUDA tensors: greedy, sampled, biased and penalized rows pick the same tokens as
    on the CPU (same uniforms, counts kept on each device), and the logprobs agree."""
    params = [SamplingParams(), SamplingParams(temperature=0.8, top_k=50, top_p=0.9, seed=1),
              SamplingParams(temperature=1.0, min_p=0.05, repetition_penalty=1.3, frequency_penalty=0.4, seed=2),
              SamplingParams(presence_penalty=0.7, logit_bias=((11, 3.0), (12, -100.0)))]
    on = {dev: [Sampler(p, [5, 6, 7]) for p in params] for dev in ("cpu", "cuda")}
    torch.manual_seed(4)
    for _ in range(10):
        logits = torch.randn(len(params), 49152) * 3
        picks = {}
        for dev, samplers in on.items():
            x = logits.to(dev)
            picks[dev] = pick_rows(x, params, [s.draw() for s in samplers], [s.counts_for(x) for s in samplers])
        assert picks["cuda"].tolist() == picks["cpu"].tolist()
        cpu = token_logprobs(logits, picks["cpu"], 5)
        cuda = token_logprobs(logits.cuda(), picks["cuda"], 5)
        assert torch.allclose(cpu[0], cuda[0].cpu(), atol=1e-5) and torch.equal(cpu[2], cuda[2].cpu())


@pytest.mark.parametrize("temperature", [1.0, 0.3])
def test_extreme_penalties_and_non_finite_logits_still_pick_a_token(temperature):
    """A repetition penalty of 5e-324 (zero in float32) sends seen positive logits to +inf; NaN and -inf rows come
    from broken inputs. The draw still returns an id of the vocab, never -1 or an index error."""
    logits = torch.randn(4, 100) + 2.0
    logits[1, :] = float("-inf")
    logits[2, 5] = float("nan")
    logits[3, 7] = float("inf")
    params = [SamplingParams(temperature=temperature, repetition_penalty=5e-324, seed=i) for i in range(4)]
    counts = [TokenCounts([1, 2, 3], 100, logits.device) for _ in range(4)]
    picks = pick_rows(logits, params, [0.999, 0.5, 0.0, 0.7], counts)
    assert ((picks >= 0) & (picks < 100)).all()
    assert int(picks[3]) in (1, 2, 3, 7)  # the infinite logits win the draw
