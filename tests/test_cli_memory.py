"""`serve --vram-limit`: a model that does not fit is refused before any weight is copied."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

import worker_orcd
from worker_orcd.cli import app
from worker_orcd.engine import memory
from worker_orcd.gguf import open_gguf
from worker_orcd.packaged import default_model_path


def test_vram_limit_refuses_before_loading(monkeypatch):
    def no_load(*a, **k):
        raise AssertionError("weights were loaded")

    monkeypatch.setattr(worker_orcd, "load", no_load)
    with open_gguf(default_model_path()) as f:
        weights = memory.weight_bytes(f)
    result = CliRunner().invoke(app, ["serve", "--device", "cpu", "--port", "0", "--ctx", "512",
                                      "--vram-limit", f"{weights // 2**20}MiB"])
    assert result.exit_code == 1, result.output
    out = " ".join(result.output.split())
    assert "not enough memory on cpu" in out and "bytes required" in out and "--vram-limit" in out
    assert str(weights // 2**20 * 2**20) in out  # the limit, in bytes


@pytest.mark.parametrize("bad", ["lots", "-5G", "0"])
def test_vram_limit_must_be_a_size(bad):
    result = CliRunner().invoke(app, ["serve", "--device", "cpu", "--vram-limit", bad])
    assert result.exit_code != 0 and "not a size" in " ".join(result.output.split())
