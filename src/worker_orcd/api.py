"""The public Python API: `load()` a model, then tokenize, score and generate."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import torch

from worker_orcd.engine.generate import Step, generate_steps
from worker_orcd.engine.sampler import SamplingParams
from worker_orcd.gguf import open_gguf
from worker_orcd.models.registry import build_model
from worker_orcd.models.weights import Progress
from worker_orcd.packaged import default_model_path
from worker_orcd.tokenizer import Tokenizer, load_tokenizer  # noqa: F401  (re-exported)


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was asked for but no CUDA device is available")
    return dev


class Model:
    """One GGUF model loaded on one device, with its tokenizer."""

    def __init__(self, path: str | os.PathLike, device: torch.device, progress: Progress | None = None,
                 max_len: int | None = None, mmap: bool | None = None):
        self.path = Path(path)
        self.device = device
        with open_gguf(path) as f:
            self.tokenizer = Tokenizer.from_gguf(f)
            self.net = build_model(f, device, progress, max_len=max_len, mmap=mmap)
        self.config = self.net.cfg

    def tokenize(self, text: str, add_special: bool = False, parse_special: bool = False) -> list[int]:
        return self.tokenizer.tokenize(text, add_special=add_special, parse_special=parse_special)

    def detokenize(self, ids: list[int]) -> str:
        return self.tokenizer.detokenize(ids)

    def logits(self, ids: list[int]) -> torch.Tensor:
        """float32 [len(ids), vocab]: next-token logits after each position, from one forward pass."""
        if not ids:
            raise ValueError("ids is empty")
        kv = self.net.new_kv_cache(len(ids))
        return self.net.forward(torch.tensor(ids, dtype=torch.long), torch.arange(len(ids)), kv).cpu()

    def steps(self, prompt: str | list[int], max_tokens: int = 64, stop: list[str] | None = None,
              **sampling: float | int) -> Iterator[Step]:
        """Generation steps with token ids and the finish reason (what the server streams)."""
        ids = self.tokenize(prompt, add_special=True) if isinstance(prompt, str) else list(prompt)
        return generate_steps(self.net, self.tokenizer, ids, max_tokens, SamplingParams(**sampling), stop)

    def generate(self, prompt: str | list[int], max_tokens: int = 64, temperature: float = 0.0,
                 top_p: float = 1.0, top_k: int = 0, seed: int = 0, stop: list[str] | None = None,
                 **sampling: float | int) -> Iterator[str]:
        """Text pieces, each valid UTF-8, until EOS, a stop string or max_tokens."""
        for step in self.steps(prompt, max_tokens, stop, temperature=temperature, top_p=top_p, top_k=top_k,
                               seed=seed, **sampling):
            if step.text:
                yield step.text


def load(path: str | os.PathLike | None = None, device: str | torch.device = "auto",
         progress: Progress | None = None, mmap: bool | None = None) -> Model:
    """Load a GGUF model (None: the packaged SmolLM2-135M-Instruct Q4_1) onto `device` ('auto': cuda if present).

    `mmap` matters on CPU only (GPU weights are always copied to VRAM): True keeps the weights in the file's
    memory map (cheap for huge files, but truncating the file under the process kills it with SIGBUS),
    False copies them (the file may then be replaced, truncated or deleted), None (default) copies
    models up to 1 GiB of tensors and maps bigger ones."""
    return Model(path or default_model_path(), resolve_device(device), progress, mmap=mmap)
