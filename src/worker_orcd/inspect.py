"""Facts about a GGUF file for `worker-orcd inspect`: what it is, what it holds, what it will cost in VRAM."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from gguf import GGML_QUANT_SIZES
from rich.table import Table

from worker_orcd.engine.memory import kv_bytes_per_token
from worker_orcd.gguf import GGUFFile, TensorRef

# Hyperparameters worth showing, as '<arch>.<suffix>' keys.
ARCH_KEYS = [
    "context_length",
    "embedding_length",
    "block_count",
    "feed_forward_length",
    "attention.head_count",
    "attention.head_count_kv",
    "attention.key_length",
    "attention.value_length",
    "attention.sliding_window",
    "attention.layer_norm_rms_epsilon",
    "attention.layer_norm_epsilon",
    "rope.freq_base",
    "rope.dimension_count",
    "rope.scaling.type",
    "rope.scaling.factor",
    "rope.scaling.original_context_length",
    "expert_count",
    "expert_used_count",
    "expert_feed_forward_length",
    "vocab_size",
]


@dataclass
class ModelFacts:
    path: str
    architecture: str
    name: str | None
    version: int
    hyperparameters: dict[str, object]
    tokenizer_model: str | None
    tokenizer_pre: str | None
    vocab_size: int
    tensor_count: int
    types: dict[str, tuple[int, int]] = field(default_factory=dict)  # type -> (tensors, bytes)
    weight_bytes: int = 0
    kv_bytes_per_token: int = 0  # f16 K and V for every layer
    parameters: int = 0


def _scalar(v: object) -> object:
    return v.item() if hasattr(v, "item") and getattr(v, "ndim", 1) == 0 else v


def model_facts(f: GGUFFile) -> ModelFacts:
    """What `inspect` shows. Metadata of an unexpected type (a string block count, per-layer head counts)
    shows as it is and leaves the KV estimate at 0 rather than failing."""
    arch = f.architecture
    hp = {k: _scalar(f.get(f"{arch}.{k}")) for k in ARCH_KEYS if f"{arch}.{k}" in f.metadata}
    tokens = f.get("tokenizer.ggml.tokens")
    counts: Counter[str] = Counter()
    nbytes: Counter[str] = Counter()
    params = 0
    for t in f.tensors.values():
        counts[t.type_name] += 1
        nbytes[t.type_name] += t.nbytes
        params += t.n_elements
    facts = ModelFacts(
        path=f.path,
        architecture=arch,
        name=f.get("general.name"),
        version=f.version,
        hyperparameters=hp,
        tokenizer_model=f.get("tokenizer.ggml.model"),
        tokenizer_pre=f.get("tokenizer.ggml.pre"),
        vocab_size=len(tokens) if isinstance(tokens, (list, np.ndarray)) else 0,
        tensor_count=len(f.tensors),
        types={k: (counts[k], nbytes[k]) for k in sorted(counts, key=lambda k: -nbytes[k])},
        weight_bytes=sum(nbytes.values()),
        kv_bytes_per_token=kv_bytes_per_token(f, dtype_bytes=2),
        parameters=params,
    )
    return facts





# -- NaN/inf scan ----------------------------------------------------------------------------

SCAN_BLOCKS = 1 << 16  # blocks dequantized at a time: at most 16 MiB of float32 (256-element blocks)


@dataclass
class ValueCounts:
    """NaN and infinity counts of one tensor's dequantized values; checked is False for types we cannot decode."""

    name: str
    type_name: str
    elements: int
    nan: int = 0
    inf: int = 0
    checked: bool = True

    @property
    def bad(self) -> bool:
        return self.nan > 0 or self.inf > 0


def scan_values(f: GGUFFile, progress: Callable[[int, int], None] | None = None) -> list[ValueCounts]:
    """Dequantize every tensor in chunks of SCAN_BLOCKS blocks (bounded memory) and count NaN and inf."""
    total = sum(t.nbytes for t in f.tensors.values())
    done = 0
    counts = []
    for ref in f.tensors.values():
        counts.append(_scan_tensor(f, ref))
        done += ref.nbytes
        if progress is not None:
            progress(done, total)
    return counts


def _scan_tensor(f: GGUFFile, ref: TensorRef) -> ValueCounts:
    import torch

    from worker_orcd.quant.formats import DEQUANTIZERS

    counts = ValueCounts(ref.name, ref.type_name, ref.n_elements)
    if ref.ggml_type not in DEQUANTIZERS:
        counts.checked = False
        return counts
    _, type_size = GGML_QUANT_SIZES[ref.ggml_type]
    blocks = f.tensor_bytes(ref.name).reshape(-1, type_size)
    for start in range(0, len(blocks), SCAN_BLOCKS):
        chunk = torch.from_numpy(np.array(blocks[start : start + SCAN_BLOCKS]))  # a copy: the map is read-only
        values = DEQUANTIZERS[ref.ggml_type](chunk)
        counts.nan += int(torch.isnan(values).sum())
        counts.inf += int(torch.isinf(values).sum())
    return counts


def value_table(counts: list[ValueCounts], limit: int = 50) -> Table:
    """The tensors with NaN or inf (the first `limit`), and those of types the scan cannot decode."""
    bad = [c for c in counts if c.bad]
    unchecked = [c for c in counts if not c.checked]
    table = Table(title=f"NaN/inf scan: {len(counts)} tensors, {len(bad)} with NaN or inf, "
                        f"{len(unchecked)} not checked")
    for column in ("tensor", "type", "elements", "NaN", "inf"):
        table.add_column(column, justify="left" if column in ("tensor", "type") else "right")
    for c in bad[:limit]:
        table.add_row(c.name, c.type_name, str(c.elements), str(c.nan), str(c.inf))
    for c in unchecked[:limit]:
        table.add_row(c.name, c.type_name, str(c.elements), "not checked", "")
    return table
