import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx_lm.generate import generate_step
from mlx_lm.models.cache import BatchKVCache, make_prompt_cache
from mlx_lm.utils import load_model
from opt_reference import numpy_opt_logits, write_tiny_opt

from mlx_flash.errors import FlashError
from mlx_flash.models import opt

VARIANTS = {
    "pre_ln": {},
    "post_ln": {"do_layer_norm_before": False, "word_embed_proj_dim": 32},
    "gelu_new_no_bias": {
        "activation_function": "gelu_new",
        "enable_bias": False,
        "layer_norm_elementwise_affine": False,
    },
    "gelu_untied": {"activation_function": "gelu", "tie_word_embeddings": False},
    "no_final_norm": {"_remove_final_layer_norm": True},
}

PROMPT = [2, 17, 93, 5, 41, 120, 8, 66, 3, 77, 29, 101]


def load(path):
    model, _ = load_model(
        path, get_model_classes=lambda config: (opt.Model, opt.ModelArgs)
    )
    return model


@pytest.fixture(scope="module", params=list(VARIANTS))
def checkpoint(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    write_tiny_opt(path, **VARIANTS[request.param])
    return path


def test_logits_match_reference(checkpoint):
    logits = load(checkpoint)(mx.array([PROMPT]))[0]
    expected = numpy_opt_logits(checkpoint, PROMPT)
    np.testing.assert_allclose(np.array(logits), expected, atol=1e-4, rtol=1e-5)


def test_incremental_decoding_matches_full_forward(checkpoint):
    model = load(checkpoint)
    full = model(mx.array([PROMPT]))[0]

    cache = make_prompt_cache(model)
    model(mx.array([PROMPT[:5]]), cache=cache)
    for i in range(5, len(PROMPT)):
        logits = model(mx.array([[PROMPT[i]]]), cache=cache)[0, -1]
        np.testing.assert_allclose(np.array(logits), np.array(full[i]), atol=1e-4)
    assert cache[0].offset == len(PROMPT)


@pytest.mark.parametrize("variant", ["pre_ln", "post_ln"])
def test_greedy_generate_step_matches_reference(variant, tmp_path):
    write_tiny_opt(tmp_path, seed=1, **VARIANTS[variant])
    model = load(tmp_path)

    steps = generate_step(mx.array(PROMPT[:4]), model, max_tokens=16)
    generated = [int(token) for token, _ in steps]

    tokens = PROMPT[:4]
    for _ in range(16):
        tokens.append(int(numpy_opt_logits(tmp_path, tokens)[-1].argmax()))
    assert generated == tokens[4:]
    assert len(set(generated)) > 4, "a degenerate checkpoint would test little"


def test_checkpoint_without_model_prefix_loads(tmp_path):
    write_tiny_opt(tmp_path, key_prefix="")
    logits = load(tmp_path)(mx.array([PROMPT]))[0]
    expected = numpy_opt_logits(tmp_path, PROMPT)
    np.testing.assert_allclose(np.array(logits), expected, atol=1e-4, rtol=1e-5)


def test_float16_checkpoint(tmp_path):
    write_tiny_opt(tmp_path, dtype="float16")
    model = load(tmp_path)
    assert model.layers[0].mlp.fc1.weight.dtype == mx.float16
    logits = model(mx.array([PROMPT]))[0]
    expected = numpy_opt_logits(tmp_path, PROMPT)
    assert logits.dtype == mx.float16
    np.testing.assert_allclose(np.array(logits), expected, atol=0.05)


def test_left_padded_batch_matches_single_sequences(tmp_path):
    write_tiny_opt(tmp_path)
    model = load(tmp_path)
    short = PROMPT[:7]
    cache = [BatchKVCache(left_padding=[0, 5]) for _ in model.layers]
    logits = model(mx.array([PROMPT, [1] * 5 + short]), cache=cache)
    np.testing.assert_allclose(
        np.array(logits[1, 5:]), numpy_opt_logits(tmp_path, short), atol=1e-4
    )

    logits = model(mx.array([[3], [3]]), cache=cache)[:, -1]
    for row, ids in zip(logits, [PROMPT + [3], short + [3]]):
        expected = numpy_opt_logits(tmp_path, ids)[-1]
        np.testing.assert_allclose(np.array(row), expected, atol=1e-4)


def test_mlp_is_one_swappable_module(tmp_path):
    write_tiny_opt(tmp_path)
    model = load(tmp_path)
    mlp = model.layers[1].mlp
    assert isinstance(mlp, opt.MLP)
    assert set(mlp.children()) == {"fc1", "fc2"}
    assert mlp.fc1.weight.shape == (256, 64) and "bias" in mlp.fc2

    x = mx.array([PROMPT])
    expected = model(x)
    # A replacement FFN that computes the same thing gives the same logits.
    original = model.layers[1].mlp
    model.layers[1].mlp = nn.Sequential(original.fc1, nn.ReLU(), original.fc2)
    assert mx.allclose(model(x), expected, atol=1e-5)


def test_sanitize_maps_hf_names_and_is_idempotent(tmp_path):
    write_tiny_opt(tmp_path)
    model = load(tmp_path)
    w = mx.zeros((2,))
    weights = {
        "decoder.layers.3.fc1.weight": w,
        "model.decoder.layers.0.fc2.bias": w,
        "model.decoder.layers.0.self_attn.q_proj.weight": w,
        "lm_head.weight": w,
    }
    sanitized = model.sanitize(weights)
    assert set(sanitized) == {
        "model.decoder.layers.3.mlp.fc1.weight",
        "model.decoder.layers.0.mlp.fc2.bias",
        "model.decoder.layers.0.self_attn.q_proj.weight",
    }
    assert model.sanitize(sanitized) == sanitized


def test_quantized_model_runs_and_stays_close(tmp_path):
    write_tiny_opt(tmp_path)
    model = load(tmp_path)
    x = mx.array([PROMPT])
    dense = model(x)
    nn.quantize(model, group_size=32, bits=8)
    assert isinstance(model.layers[0].mlp.fc1, nn.QuantizedLinear)
    assert isinstance(model.model.decoder.embed_tokens, nn.QuantizedEmbedding)
    quantized = model(x)
    assert mx.abs(quantized - dense).max().item() < 0.05 * mx.abs(dense).max().item()
    assert (quantized.argmax(-1) == dense.argmax(-1)).all().item()


def test_model_args_from_hf_config():
    config = {
        "model_type": "opt",
        "vocab_size": 50272,
        "hidden_size": 1024,
        "num_hidden_layers": 24,
        "ffn_dim": 4096,
        "num_attention_heads": 16,
        "word_embed_proj_dim": None,
        "dropout": 0.1,
        "torch_dtype": "float16",
    }
    args = opt.ModelArgs.from_dict(config)
    assert args.word_embed_proj_dim == 1024
    assert args.tie_word_embeddings and args.do_layer_norm_before
    with pytest.raises(FlashError, match="activation_function"):
        opt.ModelArgs.from_dict({**config, "activation_function": "tanh"})
