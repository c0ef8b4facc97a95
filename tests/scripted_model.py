"""A stand-in model whose replies are scripted, for testing what the server makes of generated text.

`ScriptedNet` has the network's interface (`new_kv_cache`, `forward`); its logits put all the mass on the
next token of a reply that a script picks from the rendered prompt, then on end-of-generation. So the
chat template, the scheduler, the stream decoder, the tool-call parser and the API all run as with a real
model; only the choice of tokens is fixed. Tokenizers are real: the vocab-only GGUFs of llama.cpp's tests
(Llama 3, Qwen2) with the real chat templates, GPT-2's plus the harmony tokens for GPT-OSS, and the
packaged SmolLM2 (whose template has no tool support).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import torch

from worker_orcd.engine.kv_cache import KVCache, SeqSpan
from worker_orcd.gguf import open_gguf
from worker_orcd.tokenizer import Tokenizer, load_tokenizer
from worker_orcd.tokenizer.vocab import CONTROL, USER_DEFINED, read_vocab

TEMPLATES = Path("/work/shared/templates")
VOCAB = Path("/work/shared/vocab")
HARMONY_TOKENS = {"<|start|>": USER_DEFINED, "<|channel|>": USER_DEFINED, "<|message|>": USER_DEFINED,
                  "<|constrain|>": USER_DEFINED, "<|end|>": USER_DEFINED, "<|return|>": CONTROL,
                  "<|call|>": CONTROL}


class ScriptedNet:
    def __init__(self, tokenizer: Tokenizer, script: Callable[[str], str]):
        self.device = torch.device("cpu")
        self.tokenizer = tokenizer
        self.script = script
        self.prompts: list[str] = []  # every rendered prompt, in order
        self._history: dict[int, list[int]] = {}  # KV slot -> tokens at positions 0..
        self._plan: dict[int, tuple[int, list[int]]] = {}  # slot -> (prompt length, reply ids + EOG)

    def new_kv_cache(self, max_len: int, n_slots: int = 1, dtype: torch.dtype | None = None,
                     n_blocks: int | None = None) -> KVCache:
        return KVCache(1, 1, 1, max_len, n_slots, dtype or torch.float32, self.device, n_blocks=n_blocks)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, kv: KVCache, seqs: list[SeqSpan] | None = None,
                logit_rows: torch.Tensor | None = None) -> torch.Tensor:
        seqs = seqs or [SeqSpan(0, 0, len(tokens))]
        for span in seqs:
            if int(positions[span.start]) == 0:  # a new prompt in this slot
                self._history[span.slot], self._plan[span.slot] = [], None
            history = self._history[span.slot]
            for r in range(span.start, span.end):
                del history[int(positions[r]):]
                history.append(int(tokens[r]))
        rows = range(len(tokens)) if logit_rows is None else logit_rows.tolist()
        logits = torch.full((len(rows), self.tokenizer.vocab_size), -30.0)
        for i, r in enumerate(rows):
            slot = next(s.slot for s in seqs if s.start <= r < s.end)
            logits[i, self._next(slot, self._history[slot][:int(positions[r]) + 1])] = 30.0
        return logits

    def _next(self, slot: int, history: list[int]) -> int:
        if self._plan[slot] is None:
            prompt = self.tokenizer.detokenize(history)
            self.prompts.append(prompt)
            reply = self.tokenizer.tokenize(self.script(prompt), parse_special=True)
            self._plan[slot] = (len(history), reply + [self._eog()])
        start, reply = self._plan[slot]
        return reply[min(len(history) - start, len(reply) - 1)]

    def _eog(self) -> int:
        tok = self.tokenizer
        for text in ("<|return|>", "<|eot_id|>", "<|im_end|>"):
            if (i := tok.token_id(text)) is not None and i in tok.eog_ids:
                return i
        return tok.eos_id


def harmony_tokenizer() -> Tokenizer:
    """GPT-2's vocabulary plus the harmony markers (o200k_harmony is not available here)."""
    with open_gguf(VOCAB / "ggml-vocab-gpt-2.gguf") as f:
        meta = dict(f.metadata)
    names = list(HARMONY_TOKENS)
    meta["tokenizer.ggml.tokens"] = list(meta["tokenizer.ggml.tokens"]) + names
    meta["tokenizer.ggml.token_type"] = list(meta["tokenizer.ggml.token_type"]) + list(HARMONY_TOKENS.values())
    vocab = read_vocab(meta)
    ids = {t: vocab.tokens.index(t) for t in ("<|return|>", "<|call|>")}
    vocab = dataclasses.replace(vocab, eog_ids=frozenset(vocab.eog_ids | set(ids.values())),
                                chat_template=(TEMPLATES / "openai-gpt-oss-120b.jinja").read_text())
    return Tokenizer.from_vocab(vocab)


def chat_tokenizer(fmt: str) -> tuple[Tokenizer, str, Path]:
    """(tokenizer with its chat template, architecture, a GGUF file to report) for a chat format."""
    from worker_orcd.packaged import default_model_path

    if fmt == "harmony":
        return harmony_tokenizer(), "gpt-oss", VOCAB / "ggml-vocab-gpt-2.gguf"
    if fmt == "generic":
        return load_tokenizer(default_model_path()), "llama", default_model_path()
    file, template, arch = {"hermes": ("ggml-vocab-qwen2.gguf", "Qwen-Qwen2.5-7B-Instruct.jinja", "qwen2"),
                            "llama3": ("ggml-vocab-llama-bpe.gguf", "meta-llama-Llama-3.1-8B-Instruct.jinja",
                                       "llama")}[fmt]
    tok = load_tokenizer(VOCAB / file)
    tok.chat_template = (TEMPLATES / template).read_text()
    return tok, arch, VOCAB / file


def scripted_model(fmt: str, script: Callable[[str], str], ctx: int = 8192) -> SimpleNamespace:
    """What `Worker` takes (as `worker_orcd.load` returns): net, tokenizer, config, path, device."""
    tok, arch, path = chat_tokenizer(fmt)
    net = ScriptedNet(tok, script)
    config = SimpleNamespace(architecture=arch, context_length=ctx, vocab_size=tok.vocab_size)
    return SimpleNamespace(net=net, tokenizer=tok, config=config, path=path, device=net.device)
