"""Programmatic dependent launch (kernels/pdl.py): asked for only inside CUDA graph capture."""

import pytest
import torch

from worker_orcd.kernels import pdl


def test_eager_launches_are_plain():
    assert pdl.pdl_launch() == {}


def test_off_without_a_hopper_gpu_or_in_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert not pdl._supported()
    monkeypatch.delenv("TRITON_INTERPRET")
    monkeypatch.setenv("WORKER_ORCD_PDL", "0")
    assert not pdl._supported()


@pytest.mark.gpu
def test_captured_launches_ask_for_it_on_hopper():
    s = torch.cuda.Stream()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.stream(s), torch.cuda.graph(g, stream=s):
        got = pdl.pdl_launch()
    want = {"launch_pdl": True} if pdl.PDL else {}
    assert got == want
    hopper = torch.cuda.get_device_capability() >= (9, 0)
    assert bool(pdl.PDL) == (hopper and pdl.gdc_wait is not None and pdl._launch_option())
