"""Tiny random checkpoints in the exact Hugging Face layouts, for offline tests."""

import json
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten, tree_map

from mlx_flash.utils import get_classes

WORDS = "the a cat dog sat on mat ran far and then it was big small red blue".split()

BASE = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-5,
    "vocab_size": 64,
    "max_position_embeddings": 256,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "torch_dtype": "float32",
}

CONFIGS = {
    "llama": {"architectures": ["LlamaForCausalLM"], "hidden_act": "silu"},
    "mistral": {
        "architectures": ["MistralForCausalLM"],
        "hidden_act": "silu",
        "head_dim": 16,
    },
    "qwen2": {
        "architectures": ["Qwen2ForCausalLM"],
        "hidden_act": "silu",
        "tie_word_embeddings": True,
    },
    "qwen3": {
        "architectures": ["Qwen3ForCausalLM"],
        "hidden_act": "silu",
        "head_dim": 16,
    },
    "gemma3_text": {
        "architectures": ["Gemma3ForCausalLM"],
        "hidden_activation": "gelu_pytorch_tanh",
        "head_dim": 16,
        "query_pre_attn_scalar": 16,
        "sliding_window": 8,
        "sliding_window_pattern": 2,
        "rope_local_base_freq": 10000.0,
        "tie_word_embeddings": True,
    },
}


def write_tokenizer(path: Path, vocab_size: int = 64) -> None:
    """A word-level fast tokenizer with <unk>, <s>, </s> and a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for w in WORDS:
        vocab.setdefault(w, len(vocab))
    while len(vocab) < vocab_size:
        vocab[f"w{len(vocab)}"] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##")
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": "<s>",
                "eos_token": "</s>",
                "unk_token": "<unk>",
                "chat_template": (
                    "{% for m in messages %}{{ m['content'] }} {% endfor %}"
                ),
            }
        )
    )


def write_tiny(
    path: Path, model_type: str = "llama", dtype=mx.float32, seed: int = 0, **overrides
) -> dict:
    """Write config.json, model.safetensors and a tokenizer for a random tiny model."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = {**BASE, "model_type": model_type, **CONFIGS[model_type], **overrides}
    model_class, args_class = get_classes(config)
    model = model_class(args_class.from_dict(config))
    mx.random.seed(seed)
    params = tree_map(lambda p: mx.random.normal(p.shape) * 0.3, model.parameters())
    model.update(params)
    weights = dict(tree_flatten(model.parameters()))
    if (
        model_type == "gemma3_text"
    ):  # it scales embeddings by sqrt(hidden): keep them from drowning the layers
        weights["model.embed_tokens.weight"] *= 4 / config["hidden_size"]
    if config.get("tie_word_embeddings"):
        weights.pop("lm_head.weight", None)
    weights = {k: v.astype(dtype) for k, v in weights.items()}
    mx.save_safetensors(
        str(path / "model.safetensors"), weights, metadata={"format": "pt"}
    )
    (path / "config.json").write_text(json.dumps(config, indent=2))
    write_tokenizer(path, config["vocab_size"])
    return config
