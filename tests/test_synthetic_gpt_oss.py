"""bench/make_synthetic.py: a GPT-OSS-shaped GGUF opens, validates, and runs one forward on CPU, memory-mapped."""

import resource
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from worker_orcd.gguf import open_gguf
from worker_orcd.inspect import model_facts
from worker_orcd.models.registry import build_model

ROOT = Path(__file__).resolve().parents[1]


def _make(path: Path, *args: str) -> None:
    subprocess.run([sys.executable, str(ROOT / "bench" / "make_synthetic.py"), str(path), *args], check=True,
                   capture_output=True)


def _forward_8(path: Path) -> torch.Tensor:
    with open_gguf(path) as f:
        net = build_model(f, torch.device("cpu"))
    ids = torch.tensor([200006, 1000, 2000, 3000, 4000, 5000, 200008, 6000])
    return net.forward(ids, torch.arange(8), net.new_kv_cache(8))


def test_one_layer_file_has_the_20b_layout_and_runs(tmp_path):
    path = tmp_path / "gpt-oss-1layer.gguf"
    _make(path, "--layers", "1")
    with open_gguf(path) as f:
        facts = model_facts(f)
        assert f.architecture == "gpt-oss"
        assert f.tensors["blk.0.ffn_gate_exps.weight"].shape == (32, 2880, 2880)
        assert f.tensors["blk.0.ffn_gate_exps.weight"].type_name == "MXFP4"
        assert f.tensors["output.weight"].type_name == "Q8_0"
        assert len(f.get("tokenizer.ggml.tokens")) == 201088
    assert facts.hyperparameters["expert_count"] == 32
    logits = _forward_8(path)
    assert logits.shape == (8, 201088) and torch.isfinite(logits).all()


@pytest.mark.slow
def test_full_20b_file_opens_inspects_and_runs_under_20_gb(tmp_path):
    path = tmp_path / "gpt-oss-20b.gguf"
    _make(path)
    with open_gguf(path) as f:
        facts = model_facts(f)
    assert 11.0 < facts.weight_bytes / 2**30 < 11.5  # ggml-org's published file: 11.27 GiB
    logits = _forward_8(path)
    assert torch.isfinite(logits).all()
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20 < 20  # GiB, memory-mapped weights
