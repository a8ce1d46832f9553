"""Tiny OPT checkpoints in Hugging Face's layout and an independent numpy forward.

``numpy_opt_logits`` follows transformers' ``modeling_opt.OPTForCausalLM`` (eager
attention, no padding, no cache) and was checked once against transformers 5.24.0 +
torch 2.13.0 on checkpoints written by ``write_tiny_opt``.
"""

import json
import math
from pathlib import Path
from typing import Sequence, Union

import numpy as np
from safetensors.numpy import load_file, save_file

# What transformers 5.24.0's OPTConfig.to_dict() writes, shrunk to a tiny model.
TINY_CONFIG = {
    "_remove_final_layer_norm": False,
    "activation_function": "relu",
    "architectures": ["OPTForCausalLM"],
    "attention_dropout": 0.0,
    "bos_token_id": 2,
    "do_layer_norm_before": True,
    "dropout": 0.1,
    "dtype": "float32",
    "enable_bias": True,
    "eos_token_id": 2,
    "ffn_dim": 256,
    "hidden_size": 64,
    "init_std": 0.02,
    "layer_norm_elementwise_affine": True,
    "layerdrop": 0.0,
    "max_position_embeddings": 64,
    "model_type": "opt",
    "num_attention_heads": 4,
    "num_hidden_layers": 2,
    "pad_token_id": 1,
    "tie_word_embeddings": True,
    "transformers_version": "5.24.0",
    "use_cache": True,
    "vocab_size": 128,
    "word_embed_proj_dim": 64,
}

POSITION_OFFSET = 2


def write_tiny_opt(
    path: Union[str, Path],
    *,
    seed: int = 0,
    dtype: str = "float32",
    key_prefix: str = "model.",
    **overrides,
) -> dict:
    """Write a random OPT checkpoint directory as ``save_pretrained`` lays it out.

    Like transformers, a tied ``lm_head.weight`` is not saved and
    ``word_embed_proj_dim`` defaults to ``hidden_size``. Weights are larger than OPT's
    init so that logits are well separated; small token embeddings keep a tied head from
    just repeating the last token.

    Args:
        path: directory to create.
        seed: numpy seed for the weights.
        dtype: ``"float32"`` or ``"float16"``.
        key_prefix: ``"model."`` as transformers saves; ``""`` gives the ``decoder.*``
            keys of the original facebook/opt-* checkpoints.
        **overrides: OPTConfig fields, e.g. ``do_layer_norm_before=False``.

    Returns:
        The config dict written to ``config.json``.
    """
    unknown = set(overrides) - set(TINY_CONFIG)
    if unknown:
        raise ValueError(f"not OPTConfig fields: {sorted(unknown)}")
    config = {**TINY_CONFIG, **overrides, "dtype": dtype}
    if "word_embed_proj_dim" not in overrides:
        config["word_embed_proj_dim"] = config["hidden_size"]

    rng = np.random.default_rng(seed)
    dim, ffn, embed_dim = (
        config["hidden_size"],
        config["ffn_dim"],
        config["word_embed_proj_dim"],
    )
    bias, affine = config["enable_bias"], config["layer_norm_elementwise_affine"]
    w = {}

    def linear(name, n_in, n_out, with_bias=bias):
        w[f"{name}.weight"] = rng.normal(0, n_in**-0.5, (n_out, n_in))
        if with_bias:
            w[f"{name}.bias"] = rng.normal(0, 0.1, (n_out,))

    def layer_norm(name):
        if affine:
            w[f"{name}.weight"] = 1 + rng.normal(0, 0.1, (dim,))
            w[f"{name}.bias"] = rng.normal(0, 0.1, (dim,))

    d = "decoder"
    w[f"{d}.embed_tokens.weight"] = rng.normal(
        0, 0.3, (config["vocab_size"], embed_dim)
    )
    w[f"{d}.embed_positions.weight"] = rng.normal(
        0, 0.5, (config["max_position_embeddings"] + POSITION_OFFSET, dim)
    )
    if embed_dim != dim:
        linear(f"{d}.project_in", embed_dim, dim, with_bias=False)
        linear(f"{d}.project_out", dim, embed_dim, with_bias=False)
    if config["do_layer_norm_before"] and not config["_remove_final_layer_norm"]:
        layer_norm(f"{d}.final_layer_norm")
    for i in range(config["num_hidden_layers"]):
        p = f"{d}.layers.{i}"
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            linear(f"{p}.self_attn.{proj}", dim, dim)
        layer_norm(f"{p}.self_attn_layer_norm")
        linear(f"{p}.fc1", dim, ffn)
        linear(f"{p}.fc2", ffn, dim)
        layer_norm(f"{p}.final_layer_norm")

    tensors = {key_prefix + k: v.astype(dtype) for k, v in w.items()}
    if not config["tie_word_embeddings"]:
        tensors["lm_head.weight"] = rng.normal(
            0, embed_dim**-0.5, (config["vocab_size"], embed_dim)
        ).astype(dtype)

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    return config


def _layer_norm(x, w, name, affine, eps=1e-5):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    y = (x - mean) / np.sqrt(var + eps)
    return y * w[f"{name}.weight"] + w[f"{name}.bias"] if affine else y


def _linear(x, w, name):
    y = x @ w[f"{name}.weight"].T
    return y + w[f"{name}.bias"] if f"{name}.bias" in w else y


def _gelu_tanh(x):
    return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


_ACT2FN = {
    "relu": lambda x: np.maximum(x, 0),
    "gelu": lambda x: 0.5 * x * (1 + np.vectorize(math.erf)(x / math.sqrt(2))),
    "gelu_new": _gelu_tanh,
    "gelu_fast": _gelu_tanh,
    "gelu_pytorch_tanh": _gelu_tanh,
    "quick_gelu": lambda x: x / (1 + np.exp(-1.702 * x)),
    "silu": lambda x: x / (1 + np.exp(-x)),
    "swish": lambda x: x / (1 + np.exp(-x)),
}


def numpy_opt_logits(path: Union[str, Path], token_ids: Sequence[int]) -> np.ndarray:
    """Logits of ``OPTForCausalLM`` for one unpadded sequence, computed in float64.

    Args:
        path: a checkpoint directory (config.json + model.safetensors).
        token_ids: the sequence, shape ``(L,)``.

    Returns:
        Logits of shape ``(L, vocab_size)``, float64.
    """
    path = Path(path)
    config = json.loads((path / "config.json").read_text())
    raw = load_file(str(path / "model.safetensors"))
    w = {k.removeprefix("model."): v.astype(np.float64) for k, v in raw.items()}
    affine = config["layer_norm_elementwise_affine"]
    pre_ln = config["do_layer_norm_before"]
    act = _ACT2FN[config["activation_function"]]
    n_heads = config["num_attention_heads"]

    ids = np.asarray(token_ids, dtype=np.int64)
    L = len(ids)
    x = w["decoder.embed_tokens.weight"][ids]  # (L, embed_dim)
    if "decoder.project_in.weight" in w:
        x = _linear(x, w, "decoder.project_in")
    x = x + w["decoder.embed_positions.weight"][np.arange(L) + POSITION_OFFSET]
    D = x.shape[-1]
    head_dim = D // n_heads
    causal = np.tril(np.ones((L, L), dtype=bool))

    for i in range(config["num_hidden_layers"]):
        p = f"decoder.layers.{i}"
        h = _layer_norm(x, w, f"{p}.self_attn_layer_norm", affine) if pre_ln else x
        q = _linear(h, w, f"{p}.self_attn.q_proj") * head_dim**-0.5
        k = _linear(h, w, f"{p}.self_attn.k_proj")
        v = _linear(h, w, f"{p}.self_attn.v_proj")
        q, k, v = (
            t.reshape(L, n_heads, head_dim).transpose(1, 0, 2) for t in (q, k, v)
        )
        scores = np.where(causal, q @ k.transpose(0, 2, 1), -np.inf)  # (H, L, L)
        scores = np.exp(scores - scores.max(-1, keepdims=True))
        probs = scores / scores.sum(-1, keepdims=True)
        attn = (probs @ v).transpose(1, 0, 2).reshape(L, D)
        x = x + _linear(attn, w, f"{p}.self_attn.out_proj")
        if not pre_ln:
            x = _layer_norm(x, w, f"{p}.self_attn_layer_norm", affine)

        h = _layer_norm(x, w, f"{p}.final_layer_norm", affine) if pre_ln else x
        h = _linear(act(_linear(h, w, f"{p}.fc1")), w, f"{p}.fc2")
        x = x + h
        if not pre_ln:
            x = _layer_norm(x, w, f"{p}.final_layer_norm", affine)

    if pre_ln and not config.get("_remove_final_layer_norm", False):
        x = _layer_norm(x, w, "decoder.final_layer_norm", affine)
    if "decoder.project_out.weight" in w:
        x = _linear(x, w, "decoder.project_out")
    if config.get("tie_word_embeddings", True):
        return x @ w["decoder.embed_tokens.weight"].T
    return x @ w["lm_head.weight"].T
