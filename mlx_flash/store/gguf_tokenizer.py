"""Hugging Face tokenizer files from a GGUF's ``tokenizer.ggml.*`` metadata.

The vocabulary, merges and special tokens become a fast ``tokenizer.json`` through
transformers' own GGUF converters (pure ``tokenizers``, no torch); BOS/EOS adding is
written into its post-processor, so any loader of ``tokenizer.json`` behaves the same.
"""

import json
from typing import Dict, List, Optional

from tokenizers import Tokenizer, pre_tokenizers, processors

from ..errors import FlashError

_SPECIAL = {
    "bos_token": "bos_token_id",
    "eos_token": "eos_token_id",
    "unk_token": "unknown_token_id",
    "pad_token": "padding_token_id",
}


def _converter():
    try:
        from transformers.integrations.gguf.gguf_tokenizer_mapping import (
            GGUF_TOKENIZER_MAPPING,
            convert_gguf_tokenizer,
        )
    except ImportError:  # transformers 4.x kept them here
        from transformers.integrations.ggml import (
            GGUF_TOKENIZER_MAPPING,
            convert_gguf_tokenizer,
        )
    return GGUF_TOKENIZER_MAPPING["tokenizer"], convert_gguf_tokenizer


def _flag(meta: dict, key: str) -> bool:
    # llama.cpp adds BOS to a sentencepiece ("llama") vocabulary that does not say
    default = key == "add_bos_token" and meta.get("tokenizer.ggml.model") == "llama"
    return bool(meta.get(f"tokenizer.ggml.{key}", default))


def _token(meta: dict, key: str) -> Optional[str]:
    tokens = meta["tokenizer.ggml.tokens"]
    index = meta.get(f"tokenizer.ggml.{key}")
    return tokens[index] if index is not None and 0 <= index < len(tokens) else None


def post_processor(meta: dict) -> processors.TemplateProcessing:
    """The template that adds BOS/EOS as the GGUF's ``add_bos_token`` flags say."""
    bos = _token(meta, "bos_token_id") if _flag(meta, "add_bos_token") else None
    eos = _token(meta, "eos_token_id") if _flag(meta, "add_eos_token") else None
    head, tail = [bos] if bos else [], [eos] if eos else []
    special = [(t, meta["tokenizer.ggml.tokens"].index(t)) for t in {*head, *tail}]
    return processors.TemplateProcessing(
        single=head + ["$A"] + tail,
        pair=head + ["$A"] + tail + head + ["$B:1"] + tail,
        special_tokens=special,
    )


def build_tokenizer(meta: dict) -> Tokenizer:
    """A fast tokenizer from GGUF metadata.

    Args:
        meta: the GGUF metadata, with ``tokenizer.ggml.*`` keys.

    Returns:
        The ``tokenizers.Tokenizer``.
    """
    if "tokenizer.ggml.tokens" not in meta:
        raise FlashError(
            "the GGUF holds no tokenizer (no tokenizer.ggml.tokens)",
            fix="use a GGUF written by llama.cpp's convert_hf_to_gguf.py",
        )
    mapping, convert = _converter()
    spec = {
        v: meta[f"tokenizer.{k}"]
        for k, v in mapping.items()
        if f"tokenizer.{k}" in meta
    }
    try:
        tokenizer, _ = convert(meta["general.architecture"], spec)
    except (ValueError, KeyError) as e:
        raise FlashError(f"cannot build the GGUF's tokenizer: {e}") from e
    if meta.get("tokenizer.ggml.pre") == "smollm":  # llama.cpp splits digits singly
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), tokenizer.pre_tokenizer]
        )
    tokenizer.post_processor = post_processor(meta)
    return tokenizer


def eos_token_ids(meta: dict) -> List[int]:
    """The ids that end generation: EOS, and end-of-turn where the file names one."""
    keys = ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id")
    return list(dict.fromkeys(meta[k] for k in keys if k in meta))


def tokenizer_files(meta: dict) -> Dict[str, str]:
    """The tokenizer and generation files a Hugging Face model directory holds.

    Args:
        meta: the GGUF metadata.

    Returns:
        File name to text: ``tokenizer.json``, ``tokenizer_config.json``,
        ``special_tokens_map.json`` and ``generation_config.json``.
    """
    tokenizer = build_tokenizer(meta)
    special = {name: _token(meta, key) for name, key in _SPECIAL.items()}
    special = {k: v for k, v in special.items() if v is not None}
    arch = meta["general.architecture"]
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": _flag(meta, "add_bos_token"),
        "add_eos_token": _flag(meta, "add_eos_token"),
        "clean_up_tokenization_spaces": False,
        "model_max_length": meta.get(f"{arch}.context_length", 4096),
        **special,
    }
    if "tokenizer.chat_template" in meta:
        config["chat_template"] = meta["tokenizer.chat_template"]
    eos = eos_token_ids(meta)
    generation = {
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": eos[0] if len(eos) == 1 else eos or None,
        "pad_token_id": meta.get("tokenizer.ggml.padding_token_id"),
    }
    generation = {k: v for k, v in generation.items() if v is not None}
    return {
        "tokenizer.json": tokenizer.to_str(),
        "tokenizer_config.json": json.dumps(config, indent=2, ensure_ascii=False),
        "special_tokens_map.json": json.dumps(special, indent=2, ensure_ascii=False),
        "generation_config.json": json.dumps(generation, indent=2),
    }
