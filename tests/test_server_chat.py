"""Chat output splitting: GPT-OSS harmony channels into reasoning and content; plain models pass through."""

from __future__ import annotations

from types import SimpleNamespace

from worker_orcd.server.chat import ChatOutput


def run(arch: str, pieces: list[str]) -> tuple[list[tuple[str, str]], tuple[str | None, str]]:
    out = ChatOutput(SimpleNamespace(architecture=arch))
    deltas = [out.push(p) for p in pieces] + [out.finish()]
    return deltas, out.result()


def test_harmony_analysis_is_reasoning_final_is_content():
    # the prompt ends in <|start|>assistant; the final <|return|> is an end-of-generation token, never text
    pieces = ["<|channel|>", "analysis", "<|message|>", "The user", " greets.", "<|end|>",
              "<|start|>", "assistant", "<|channel|>", "final", "<|message|>", "Hello", "!"]
    deltas, (reasoning, content) = run("gpt-oss", pieces)
    assert reasoning == "The user greets." and content == "Hello!"
    assert "".join(r for r, _ in deltas) == reasoning and "".join(c for _, c in deltas) == content


def test_harmony_tool_call_is_neither():
    pieces = ["<|channel|>", "commentary to=functions.get", " <|constrain|>json", "<|message|>", "{}", "<|call|>"]
    _, (reasoning, content) = run("gpt-oss", pieces)
    assert reasoning == "" and content == ""


def test_plain_model_is_all_content():
    deltas, (reasoning, content) = run("llama", ["Hi", " there"])
    assert reasoning is None and content == "Hi there" and deltas[:2] == [("", "Hi"), ("", " there")]
