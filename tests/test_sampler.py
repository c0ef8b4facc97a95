import pytest
import torch

from worker_orcd.engine.sampler import Sampler, SamplingParams, apply_repetition_penalty, filtered_probs
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


def test_sampling_follows_the_distribution():
    logits = torch.log(torch.tensor([0.6, 0.3, 0.1]))
    s = Sampler(SamplingParams(temperature=1.0, seed=0))
    counts = torch.bincount(torch.tensor([s(logits) for _ in range(3000)]), minlength=3).float() / 3000
    assert torch.allclose(counts, torch.tensor([0.6, 0.3, 0.1]), atol=0.04)


def test_repetition_penalty_llama_cpp_rule():
    logits = torch.tensor([2.0, -2.0, 1.0])
    out = apply_repetition_penalty(logits, [0, 1], 2.0)
    assert out.tolist() == [1.0, -4.0, 1.0]


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


def test_sample_rows_draws_what_each_sampler_draws():
    """The batched device draw (one sort and one transfer for all rows) picks the token the per-row sampler
    picks with the same seed, for every filter."""
    from worker_orcd.engine.sampler import Sampler, SamplingParams, sample_rows

    torch.manual_seed(0)
    params = [SamplingParams(temperature=t, top_k=k, top_p=p, min_p=m, seed=s)
              for s, (t, k, p, m) in enumerate([(0.7, 0, 1.0, 0.0), (1.0, 5, 1.0, 0.0), (1.3, 0, 0.9, 0.0),
                                                 (0.9, 0, 1.0, 0.05), (2.0, 40, 0.8, 0.02), (0.5, 1, 1.0, 0.0)])]
    for _ in range(20):
        logits = torch.randn(len(params), 300) * 3
        want = [Sampler(p)(row) for p, row in zip(params, logits)]
        draws = [Sampler(p).draw() for p in params]
        assert sample_rows(logits, params, draws) == want
