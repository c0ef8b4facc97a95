"""Chat output splitting: harmony channels (GPT-OSS) into reasoning and content; plain models pass through."""

from __future__ import annotations

from types import SimpleNamespace

from worker_orcd.server.chat import HARMONY_SPECIALS, ChatOutput

SPECIAL_IDS = {name: 1000 + i for i, name in enumerate(HARMONY_SPECIALS)}


class HarmonyVocab:
    """Specials are single ids; any other text is one id per word."""

    def __init__(self):
        self.words: dict[int, str] = {}

    def tokenize(self, text: str, add_special: bool = False, parse_special: bool = False) -> list[int]:
        if parse_special and text in SPECIAL_IDS:
            return [SPECIAL_IDS[text]]
        ids = []
        for w in text.split(" "):
            self.words[len(self.words)] = w
            ids.append(len(self.words) - 1)
        return ids


def run(arch: str, pieces: list[str]) -> tuple[list[tuple[str, str]], tuple[str | None, str]]:
    tok = HarmonyVocab()
    out = ChatOutput(SimpleNamespace(architecture=arch, tokenizer=tok))
    deltas = []
    for p in pieces:
        token = SPECIAL_IDS.get(p, -1)
        deltas.append(out.push(token, "" if token >= 0 else p))
    return deltas, out.result()


def test_harmony_analysis_is_reasoning_final_is_content():
    pieces = ["<|channel|>", "analysis", "<|message|>", "The user", " greets.", "<|end|>",
              "<|start|>", "assistant", "<|channel|>", "final", "<|message|>", "Hello", "!", "<|return|>"]
    deltas, (reasoning, content) = run("gpt-oss", pieces)
    assert reasoning == "The user greets." and content == "Hello!"
    assert "".join(r for r, _ in deltas) == reasoning and "".join(c for _, c in deltas) == content


def test_harmony_header_text_never_leaks():
    pieces = ["<|channel|>", "commentary to=functions.get", "<|message|>", "{}", "<|call|>"]
    _, (reasoning, content) = run("gpt-oss", pieces)
    assert reasoning == "" and content == "{}"


def test_plain_model_is_all_content():
    deltas, (reasoning, content) = run("llama", ["Hi", " there"])
    assert reasoning is None and content == "Hi there" and deltas == [("", "Hi"), ("", " there")]
