"""The fused MoE router (kernels/triton_router.py) against float64 logits, top-k and softmax."""

import pytest
import torch

from worker_orcd.kernels.triton_router import route


def inputs(T: int, E: int, D: int, k: int, dtype: torch.dtype, device: str, seed: int = 0):
    """Random h, w, b whose k-th and (k+1)-th logits of every row are apart (no near tie to flip by rounding)."""
    g = torch.Generator().manual_seed(seed)
    while True:
        h = torch.randn(T, D, generator=g).to(dtype)
        w, b = torch.randn(E, D, generator=g) / D**0.5, torch.randn(E, generator=g)
        logits = h.double() @ w.double().T + b.double()
        ordered = logits.sort(-1, descending=True).values
        gaps = ordered[:, :-1] - ordered[:, 1:]
        if bool((gaps[:, : min(k, E - 1)] > 1e-3).all()):
            return h.to(device), w.to(device), b.to(device), logits


def reference(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    top, ids = logits.topk(k, dim=-1)
    return ids, torch.softmax(top, -1)


@pytest.mark.parametrize("T,E,D,k,dtype", [(3, 32, 2880, 4, torch.bfloat16), (2, 4, 96, 2, torch.float32),
                                           (4, 6, 130, 3, torch.float32), (1, 128, 256, 4, torch.bfloat16)])
def test_route_matches_float64(T, E, D, k, dtype):
    h, w, b, logits = inputs(T, E, D, k, dtype, "cpu")
    got_ids, got_w = route(h, w, b, k)
    want_ids, want_w = reference(logits, k)
    assert torch.equal(got_ids, want_ids)
    assert torch.allclose(got_w.double(), want_w, rtol=1e-5, atol=1e-6)
    assert torch.allclose(got_w.sum(-1), torch.ones(T), atol=1e-6)


def test_route_is_batch_invariant():
    """A row's experts and weights are bitwise the same alone and among 9 others."""
    h, w, b, _ = inputs(10, 32, 512, 4, torch.bfloat16, "cpu", seed=3)
    many = route(h, w, b, 4)
    for t in (0, 7):
        one = route(h[t : t + 1], w, b, 4)
        assert torch.equal(one[0][0], many[0][t]) and torch.equal(one[1][0], many[1][t])


def test_route_breaks_ties_toward_the_lower_id():
    h = torch.ones(1, 64)
    w = torch.zeros(8, 64)
    ids, weights = route(h, w, torch.tensor([0.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0]), 2)
    assert ids.tolist() == [[1, 2]] and torch.allclose(weights, torch.tensor([[0.5, 0.5]]))


def test_route_refuses_mismatched_shapes():
    with pytest.raises(ValueError, match="route"):
        route(torch.zeros(2, 16), torch.zeros(4, 8), torch.zeros(4), 2)


@pytest.mark.gpu
@pytest.mark.parametrize("T", [1, 7, 64, 300])
def test_route_on_cuda(T):
    """GPT-OSS-20B's router shape; every row equal to its result alone (bitwise)."""
    h, w, b, logits = inputs(T, 32, 2880, 4, torch.bfloat16, "cuda", seed=T)
    ids, weights = route(h, w, b, 4)
    want_ids, want_w = reference(logits.cuda(), 4)
    assert torch.equal(ids, want_ids)
    assert torch.allclose(weights.double(), want_w, rtol=1e-5, atol=1e-6)
    for t in (0, T - 1):
        one = route(h[t : t + 1], w, b, 4)
        assert torch.equal(one[0][0], ids[t]) and torch.equal(one[1][0], weights[t])


def test_route_on_a_gpt_oss_layer_matches_the_torch_router(tmp_path):
    """What models/gpt_oss.py feeds it on CUDA (the F32 router as the kernels hold it), on the tiny fixture."""
    import worker_orcd
    from tests.fixtures import hf_to_gguf as fixtures
    from worker_orcd.models.gpt_oss import float32_matrix
    from worker_orcd.models.weights import linear

    path = fixtures.write_gguf(fixtures.make_tiny_model("gpt-oss", seed=0), tmp_path / "g.gguf", "MXFP4")
    net = worker_orcd.load(path, device="cpu").net
    layer, k = net.layers[1], net.cfg.n_experts_used
    h = torch.randn(5, net.cfg.dim)
    ids, weights = route(h, float32_matrix(layer.router), layer.router_b, k)
    top, want = torch.topk(linear(h, layer.router, layer.router_b).float(), k, dim=-1)
    assert torch.equal(ids, want) and torch.allclose(weights, torch.softmax(top, -1), atol=1e-6)
