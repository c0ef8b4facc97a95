"""general.architecture -> the model family that runs it."""

from __future__ import annotations

import torch

from worker_orcd.gguf import GGUFError, GGUFFile
from worker_orcd.models import gemma3, gpt2, gpt_oss, llama
from worker_orcd.models.weights import Progress, Weights

FAMILIES = {arch: (llama.LlamaConfig, llama.LlamaModel) for arch in llama.ARCHITECTURES}
FAMILIES.update({arch: (gemma3.Gemma3Config, gemma3.Gemma3Model) for arch in gemma3.ARCHITECTURES})
FAMILIES.update({arch: (gpt2.GPT2Config, gpt2.GPT2Model) for arch in gpt2.ARCHITECTURES})
FAMILIES.update({arch: (gpt_oss.GptOssConfig, gpt_oss.GptOssModel) for arch in gpt_oss.ARCHITECTURES})


def supported_architectures() -> list[str]:
    return sorted(FAMILIES)


def config_for(f: GGUFFile):
    """The validated config dataclass for this file's architecture."""
    arch = f.architecture
    if arch not in FAMILIES:
        raise GGUFError(f.path, f"architecture {arch!r} is not supported (supported: "
                                f"{', '.join(supported_architectures())})", "general.architecture")
    return FAMILIES[arch][0].from_gguf(f)


def build_model(f: GGUFFile, device: torch.device, progress: Progress | None = None, max_len: int | None = None,
                mmap: bool | None = None):
    """Validate the config, move every weight to `device`, and build the model (`mmap`: see Weights)."""
    cfg = config_for(f)
    weights = Weights(f, device, progress, mmap)
    return FAMILIES[f.architecture][1](cfg, weights, max_len=max_len)
