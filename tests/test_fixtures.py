"""The GGUF test-fixture writer: files open with both readers, carry llama.cpp's metadata, and hold the HF
weights under llama.cpp's layout (checked here against transforms written out by hand, not the writer's)."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from tests.fixtures.hf_to_gguf import ARCHS, make_tiny_model, roundtrip_quantized, write_gguf
from worker_orcd.gguf import open_gguf

COMMON_KEYS = (
    "general.architecture", "general.file_type", "general.quantization_version",
    "tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type",
    "tokenizer.ggml.merges", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
    "tokenizer.ggml.add_bos_token",
)
ARCH_KEYS = {
    "llama": ("context_length", "embedding_length", "block_count", "feed_forward_length", "vocab_size",
              "attention.head_count", "attention.head_count_kv", "attention.layer_norm_rms_epsilon",
              "attention.key_length", "attention.value_length", "rope.freq_base", "rope.dimension_count"),
    "qwen2": ("context_length", "embedding_length", "block_count", "feed_forward_length",
              "attention.head_count", "attention.head_count_kv", "attention.layer_norm_rms_epsilon",
              "rope.freq_base"),
    "phi3": ("context_length", "embedding_length", "block_count", "feed_forward_length",
             "attention.head_count", "attention.head_count_kv", "attention.layer_norm_rms_epsilon",
             "rope.freq_base", "rope.dimension_count", "rope.scaling.original_context_length",
             "attention.sliding_window"),
    "gpt2": ("context_length", "embedding_length", "block_count", "feed_forward_length",
             "attention.head_count", "attention.layer_norm_epsilon"),
    "gemma3": ("context_length", "embedding_length", "block_count", "feed_forward_length",
               "attention.head_count", "attention.head_count_kv", "attention.layer_norm_rms_epsilon",
               "attention.key_length", "attention.value_length", "rope.freq_base", "attention.sliding_window"),
    "gpt-oss": ("context_length", "embedding_length", "block_count", "feed_forward_length",
                "attention.head_count", "attention.head_count_kv", "attention.layer_norm_rms_epsilon",
                "attention.key_length", "attention.value_length", "attention.sliding_window", "rope.freq_base",
                "expert_count", "expert_used_count", "expert_feed_forward_length", "rope.scaling.type",
                "rope.scaling.factor", "rope.scaling.original_context_length",
                "rope.scaling.yarn_beta_fast", "rope.scaling.yarn_beta_slow"),
}
ROPE_THETA = {"llama": 500000.0, "qwen2": 1000000.0, "phi3": 25000.0, "gemma3": 200000.0, "gpt-oss": 20000.0}


@pytest.fixture(scope="module")
def models():
    return {arch: make_tiny_model(arch, seed=1) for arch in ARCHS}


def _hf(model) -> dict[str, np.ndarray]:
    return {n: p.detach().numpy() for n, p in model.named_parameters()}


def _llama_unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    # rows of each head come as interleaved (x0, y0, x1, y1, ...); HF wants (x0, x1, ..., y0, y1, ...)
    d = w.shape[0] // n_head
    return w.reshape(n_head, d // 2, 2, *w.shape[1:]).transpose(0, 2, 1, *range(3, w.ndim + 2)).reshape(w.shape)


def expected_tensors(arch: str, model) -> dict[str, np.ndarray]:
    """GGUF name -> float32 data as llama.cpp's converter writes it, spelled out per architecture."""
    hf, cfg, out = _hf(model), model.config, {}
    if arch == "gpt2":
        out["token_embd.weight"] = hf["transformer.wte.weight"]
        out["position_embd.weight"] = hf["transformer.wpe.weight"]
        out["output_norm.weight"] = hf["transformer.ln_f.weight"]
        out["output_norm.bias"] = hf["transformer.ln_f.bias"]
        for i in range(cfg.n_layer):
            h = f"transformer.h.{i}."
            for src, dst in (("ln_1", "attn_norm"), ("ln_2", "ffn_norm")):
                out[f"blk.{i}.{dst}.weight"] = hf[h + src + ".weight"]
                out[f"blk.{i}.{dst}.bias"] = hf[h + src + ".bias"]
            for src, dst in (("attn.c_attn", "attn_qkv"), ("attn.c_proj", "attn_output"),
                             ("mlp.c_fc", "ffn_up"), ("mlp.c_proj", "ffn_down")):
                out[f"blk.{i}.{dst}.weight"] = hf[h + src + ".weight"].T
                out[f"blk.{i}.{dst}.bias"] = hf[h + src + ".bias"]
        return out

    out["token_embd.weight"] = hf["model.embed_tokens.weight"]
    norm_shift = np.float32(1.0) if arch == "gemma3" else np.float32(0.0)
    out["output_norm.weight"] = hf["model.norm.weight"] + norm_shift
    if not cfg.tie_word_embeddings:
        out["output.weight"] = hf["lm_head.weight"]
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "self_attn.qkv_proj": "attn_qkv",
             "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
             "mlp.gate_up_proj": "ffn_up",  # phi3: fused [gate; up], llama.cpp splits it in the graph
             "mlp.router": "ffn_gate_inp", "input_layernorm": "attn_norm",
             "post_attention_layernorm": {"gemma3": "post_attention_norm",
                                          "gpt-oss": "post_attention_norm"}.get(arch, "ffn_norm"),
             "pre_feedforward_layernorm": "ffn_norm", "post_feedforward_layernorm": "post_ffw_norm"}
    for i in range(cfg.num_hidden_layers):
        pre = f"model.layers.{i}."
        for n, data in hf.items():
            if not n.startswith(pre) or ".experts." in n:
                continue
            rest = n[len(pre):]
            if rest == "self_attn.sinks":
                out[f"blk.{i}.attn_sinks.weight"] = data
                continue
            module, kind = rest.rsplit(".", 1)
            if arch == "llama" and module in ("self_attn.q_proj", "self_attn.k_proj"):
                n_head = cfg.num_attention_heads if module.endswith("q_proj") else cfg.num_key_value_heads
                # the file holds P(w) with unpermute(P(w)) == w; build P by inverting unpermute numerically
                idx = _llama_unpermute(np.arange(data.shape[0]), n_head)
                permuted = np.empty_like(data)
                permuted[idx] = data
                data = permuted
            if "norm" in module:
                data = data + norm_shift
            out[f"blk.{i}.{names[module]}.{kind}"] = data
        if arch == "gpt-oss":
            e = pre + "mlp.experts."
            gate_up = hf[e + "gate_up_proj"].transpose(0, 2, 1)  # [E, 2I, hidden]
            out[f"blk.{i}.ffn_gate_exps.weight"] = gate_up[:, 0::2]
            out[f"blk.{i}.ffn_up_exps.weight"] = gate_up[:, 1::2]
            out[f"blk.{i}.ffn_gate_exps.bias"] = hf[e + "gate_up_proj_bias"][:, 0::2]
            out[f"blk.{i}.ffn_up_exps.bias"] = hf[e + "gate_up_proj_bias"][:, 1::2]
            out[f"blk.{i}.ffn_down_exps.weight"] = hf[e + "down_proj"].transpose(0, 2, 1)
            out[f"blk.{i}.ffn_down_exps.bias"] = hf[e + "down_proj_bias"]
    return out


def _read(path) -> dict[str, tuple[gguf.GGMLQuantizationType, np.ndarray]]:
    r = gguf.GGUFReader(path)
    return {t.name: (t.tensor_type, gguf.quants.dequantize(t.data, t.tensor_type)) for t in r.tensors}


@pytest.mark.parametrize("ggml_type", ["F32", "Q8_0"])
@pytest.mark.parametrize("arch", ARCHS)
def test_file_opens_with_both_readers_and_has_metadata(models, arch, ggml_type, tmp_path):
    model = models[arch]
    path = write_gguf(model, tmp_path / f"{arch}.gguf", ggml_type)
    reader = gguf.GGUFReader(path)
    with open_gguf(path) as f:
        assert f.architecture == arch
        for key in COMMON_KEYS + tuple(f"{arch}.{k}" for k in ARCH_KEYS[arch]):
            assert f.get(key) is not None, f"{arch} {ggml_type}: missing {key}"
        assert f.get("general.file_type") == (0 if ggml_type == "F32" else 7)
        assert f.get("tokenizer.ggml.model") == "gpt2"
        assert len(f.get("tokenizer.ggml.tokens")) == model.config.vocab_size
        assert f.get("tokenizer.ggml.add_bos_token") is False
        if arch in ROPE_THETA:
            assert f.arch_get("rope.freq_base") == ROPE_THETA[arch]
        assert f.arch_get("block_count") == model.config.num_hidden_layers
        assert {n: (t.ggml_type, t.shape) for n, t in f.tensors.items()} == {
            t.name: (t.tensor_type, tuple(int(x) for x in reversed(t.shape))) for t in reader.tensors}


@pytest.mark.parametrize("ggml_type", ["F32", "Q8_0"])
@pytest.mark.parametrize("arch", ARCHS)
def test_tensors_are_hf_weights_in_llama_cpp_layout(models, arch, ggml_type, tmp_path):
    model = models[arch]
    path = write_gguf(model, tmp_path / f"{arch}.gguf", ggml_type)
    got = _read(path)
    want = expected_tensors(arch, model)
    assert sorted(got) == sorted(want)
    for name, ref in want.items():
        qtype, data = got[name]
        assert data.shape == ref.shape, name
        if qtype == gguf.GGMLQuantizationType.F32:
            np.testing.assert_array_equal(data, ref, err_msg=name)
        else:
            assert qtype == gguf.GGMLQuantizationType.Q8_0 and ref.ndim >= 2 and name.endswith(".weight"), name
            ref_q = gguf.quants.dequantize(gguf.quants.quantize(ref, qtype), qtype)
            np.testing.assert_array_equal(data, ref_q, err_msg=name)
            assert np.abs(data - ref).max() <= np.abs(ref).max() / 127 + 1e-7, name


def test_llama_unpermuted_q_k_rows_are_hf_projections(models, tmp_path):
    model = models["llama"]
    got = _read(write_gguf(model, tmp_path / "llama.gguf"))
    cfg = model.config
    for i in range(cfg.num_hidden_layers):
        attn = model.model.layers[i].self_attn
        q = _llama_unpermute(got[f"blk.{i}.attn_q.weight"][1], cfg.num_attention_heads)
        k = _llama_unpermute(got[f"blk.{i}.attn_k.weight"][1], cfg.num_key_value_heads)
        np.testing.assert_array_equal(q, attn.q_proj.weight.detach().numpy())
        np.testing.assert_array_equal(k, attn.k_proj.weight.detach().numpy())
        assert not np.array_equal(got[f"blk.{i}.attn_q.weight"][1], attn.q_proj.weight.detach().numpy())


def test_llama_mha_override(tmp_path):
    model = make_tiny_model("llama", num_key_value_heads=4)
    with open_gguf(write_gguf(model, tmp_path / "mha.gguf")) as f:
        assert f.arch_get("attention.head_count_kv") == f.arch_get("attention.head_count") == 4
        assert f.tensors["blk.0.attn_k.weight"].shape == (64, 64)


@pytest.mark.parametrize("arch", ["llama", "gpt-oss"])
def test_roundtrip_quantized_holds_the_files_weights(models, arch, tmp_path):
    model = models[arch]
    rt = roundtrip_quantized(model, "Q8_0")
    got = _read(write_gguf(model, tmp_path / f"{arch}.gguf", "Q8_0"))
    for name, ref in expected_tensors(arch, rt).items():
        np.testing.assert_array_equal(got[name][1], ref, err_msg=name)
    ids = torch.arange(0, model.config.vocab_size, 37).unsqueeze(0)
    with torch.no_grad():
        a, b = model(ids).logits.flatten(), rt(ids).logits.flatten()
    assert not torch.equal(a, b)
    assert torch.nn.functional.cosine_similarity(a, b, dim=0) > 0.99


def test_gpt_oss_mxfp4_experts_only(models, tmp_path):
    model = models["gpt-oss"]
    got = _read(write_gguf(model, tmp_path / "mxfp4.gguf", "MXFP4"))
    mxfp4 = {n for n, (t, _) in got.items() if t == gguf.GGMLQuantizationType.MXFP4}
    assert mxfp4 == {f"blk.{i}.ffn_{p}_exps.weight" for i in range(2) for p in ("gate", "up", "down")}
    assert gguf.GGUFReader(tmp_path / "mxfp4.gguf").fields["general.file_type"].contents() == 38
    assert all(t == gguf.GGMLQuantizationType.F32 for n, (t, _) in got.items() if n not in mxfp4)
    rt = roundtrip_quantized(model, "MXFP4")
    for name, ref in expected_tensors("gpt-oss", rt).items():
        np.testing.assert_array_equal(got[name][1], ref, err_msg=name)


def test_rows_not_a_whole_block_fall_back_to_f16(tmp_path):
    model = make_tiny_model("llama", intermediate_size=80)
    got = _read(write_gguf(model, tmp_path / "fallback.gguf", "Q4_0"))
    assert got["blk.0.ffn_down.weight"][0] == gguf.GGMLQuantizationType.F16  # rows of 80
    assert got["blk.0.ffn_up.weight"][0] == gguf.GGMLQuantizationType.Q4_0  # rows of 64
    assert got["blk.0.attn_norm.weight"][0] == gguf.GGMLQuantizationType.F32


@pytest.mark.parametrize("ggml_type", ["F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1"])
def test_other_types_roundtrip(models, ggml_type, tmp_path):
    model = models["qwen2"]
    got = _read(write_gguf(model, tmp_path / "q.gguf", ggml_type))
    assert got["blk.0.attn_q.weight"][0].name == ggml_type
    assert got["blk.0.attn_q.bias"][0] == gguf.GGMLQuantizationType.F32
    for name, ref in expected_tensors("qwen2", roundtrip_quantized(model, ggml_type)).items():
        np.testing.assert_array_equal(got[name][1], ref, err_msg=name)


@pytest.mark.parametrize("vocab_size", [320, 512])
def test_toy_vocab_is_a_consistent_byte_level_bpe(vocab_size):
    import tokenizers

    from tests.fixtures.toy_vocab import bytes_to_unicode, toy_vocab

    v = toy_vocab(vocab_size)
    assert v.size == vocab_size and len(set(v.tokens)) == vocab_size
    assert list(v.tokens[:256]) == [bytes_to_unicode()[b] for b in range(256)]
    known = set(v.tokens)
    for merge in v.merges:
        a, b = merge.split(" ")
        assert a in known and b in known and a + b in known, merge
    assert v.tokens[v.eos_id] == "<|endoftext|>" and v.token_types[v.eos_id] == 3
    bpe = tokenizers.Tokenizer(tokenizers.models.BPE({t: i for i, t in enumerate(v.tokens)},
                                                     [tuple(m.split(" ")) for m in v.merges]))
    bpe.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = tokenizers.decoders.ByteLevel()
    text = "The quick brown fox, 123 times: déjà vu ✓"
    ids = bpe.encode(text).ids
    assert len(ids) < len(text.encode()) and bpe.decode(ids) == text
