"""Read a GGUF file into Hugging Face form for MLX: config, weights and tokenizer.

Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K and Q5_K tensors map exactly onto MLX's affine
layout (``weight``/``scales``/``biases``, group size 32, 4, 5 or 8 bits), so that
``mlx_lm.utils.load_model`` builds ``QuantizedLinear`` and ``QuantizedEmbedding`` from
them. Other types (Q6_K's 16-wide groups, Q2_K, Q3_K, IQ*, TQ*) have no exact affine
form: the `gguf` package dequantizes them and they are stored as floats (float16 by
default). Each tensor's `Origin` says which happened.
"""

import math
import mmap
import re
import struct
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional, Tuple, Union

import mlx.core as mx
import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from ..errors import FlashError
from .gguf_quants import (
    EXACT_BITS,
    FLOAT_DTYPES,
    affine_dtype,
    dequantize_rows,
    pack_codes,
    unpack,
)
from .gguf_tokenizer import eos_token_ids, tokenizer_files
from .sources import Origin

SUPPORTED_ARCHS = ("llama", "qwen2", "qwen3", "gemma3")
GROUP_SIZE = 32

_MAGIC = b"GGUF"
_VERSIONS = (2, 3)
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?"}
_SCALARS.update({10: "<Q", 11: "<q", 12: "<d"})
_STRING, _ARRAY = 8, 9

Q = GGMLQuantizationType
_FLOATS = {Q.F32: np.float32, Q.F16: np.float16, Q.BF16: np.uint16}
_PARTS = ("weight", "scales", "biases")  # MLX's affine quantized layout

_BLOCK_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_QK_NORMS = {"attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm"}
_GEMMA3_NORMS = {
    "ffn_norm": "pre_feedforward_layernorm",
    "post_attention_norm": "post_attention_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
_ARCH_BLOCK_NAMES = {
    "llama": _BLOCK_NAMES,
    "qwen2": _BLOCK_NAMES,
    "qwen3": {**_BLOCK_NAMES, **_QK_NORMS},
    "gemma3": {**_BLOCK_NAMES, **_QK_NORMS, **_GEMMA3_NORMS},
}
_TOP_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_REQUIRED = ("block_count", "embedding_length", "feed_forward_length")
_REQUIRED += ("attention.head_count",)
_HF_TYPES = {
    "llama": ("llama", "LlamaForCausalLM"),
    "qwen2": ("qwen2", "Qwen2ForCausalLM"),
    "qwen3": ("qwen3", "Qwen3ForCausalLM"),
    "gemma3": ("gemma3_text", "Gemma3ForCausalLM"),
}


@dataclass
class GGUFModel:
    """A GGUF checkpoint in Hugging Face form.

    Attributes:
        config: the ``config.json`` dict.
        weights: Hugging Face tensor names to arrays, quantized ones in MLX's
            affine layout.
        tokenizer_files: file name to text, e.g. ``"tokenizer.json"``.
        origins: each tensor's GGML type and whether its values are the file's own,
            keyed by Hugging Face name without ``.weight``
            (``"model.layers.0.mlp.gate_proj"``, ``"model.norm"``,
            ``"model.layers.0.self_attn.q_proj.bias"``).
    """

    config: dict
    weights: Dict[str, mx.array]
    tokenizer_files: Dict[str, str]
    origins: Dict[str, Origin] = field(default_factory=dict)


class TensorInfo(NamedTuple):
    """Where one tensor's bytes lie in a GGUF file, and how they are stored."""

    name: str
    shape: Tuple[int, ...]  # numpy order: the row length is last
    qtype: GGMLQuantizationType
    offset: int  # from the start of the file
    nbytes: int


class _Cursor:
    """Reads little-endian GGUF values from a buffer, front to back."""

    def __init__(self, buf, pos: int = 0):
        self.buf, self.pos = buf, pos

    def scalar(self, fmt: str):
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        n = self.scalar("<Q")
        if n > len(self.buf) - self.pos:
            raise ValueError(f"a string of {n} bytes runs past the end")
        self.pos += n
        return bytes(self.buf[self.pos - n : self.pos]).decode("utf-8", "replace")

    def value(self, vtype: int):
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            item_type, n = self.scalar("<I"), self.scalar("<Q")
            if n > len(self.buf) - self.pos:  # every item takes at least a byte
                raise ValueError(f"an array of {n} items runs past the end")
            if item_type in _SCALARS and item_type != 7:
                dtype = np.dtype(_SCALARS[item_type])
                items = np.frombuffer(self.buf, dtype, n, self.pos)
                self.pos += n * dtype.itemsize
                return items.tolist()
            return [self.value(item_type) for _ in range(n)]
        if vtype not in _SCALARS:
            raise ValueError(f"unknown metadata value type {vtype}")
        value = self.scalar(_SCALARS[vtype])
        if vtype == 6:  # 1e-05, not 9.999999747378752e-06
            value = float(str(np.float32(value)))
        return value


def read_header(buf, path: Path) -> Tuple[dict, List[TensorInfo]]:
    """Parse a GGUF header: its metadata and where each tensor lies.

    Args:
        buf: the whole file as a buffer (e.g. an ``mmap``).
        path: the file, for error messages.

    Returns:
        The metadata dict and the tensors in file order.
    """
    if bytes(buf[:4]) != _MAGIC:
        raise FlashError("not a GGUF file (bad magic)", path=path)
    try:
        cur = _Cursor(buf, 4)
        version = cur.scalar("<I")
        if version not in _VERSIONS:
            raise FlashError(f"unsupported GGUF version {version}", path=path)
        n_tensors, n_kv = cur.scalar("<Q"), cur.scalar("<Q")
        if max(n_tensors, n_kv) > len(buf) // 8:  # each takes more than 8 bytes
            raise ValueError(f"{n_tensors} tensors and {n_kv} keys cannot fit")
        meta = {}
        for _ in range(n_kv):
            key = cur.string()
            meta[key] = cur.value(cur.scalar("<I"))
        raw = []
        for _ in range(n_tensors):
            name = cur.string()
            n_dims = cur.scalar("<I")
            if n_dims > 4:  # GGML_MAX_DIMS
                raise ValueError(f"tensor {name!r} has {n_dims} dimensions")
            dims = [cur.scalar("<Q") for _ in range(n_dims)]
            qtype, offset = cur.scalar("<I"), cur.scalar("<Q")
            raw.append((name, tuple(reversed(dims)), qtype, offset))
        align = meta.get("general.alignment", 32)
        if type(align) is not int or align <= 0 or align & (align - 1):
            raise ValueError(f"general.alignment {align!r} is not a power of two")
        start = -(-cur.pos // align) * align  # the data section is aligned
        tensors = [_tensor_info(n, s, t, start + o) for n, s, t, o in raw]
    except (struct.error, ValueError, KeyError, RecursionError) as e:
        raise FlashError(f"corrupt GGUF header: {e}", path=path) from None
    if any(t.offset + t.nbytes > len(buf) for t in tensors):
        raise FlashError("truncated GGUF: tensor data runs past the end", path=path)
    return meta, tensors


def _tensor_info(name: str, shape: tuple, qtype: int, offset: int) -> TensorInfo:
    qtype = GGMLQuantizationType(qtype)
    block, block_bytes = GGML_QUANT_SIZES[qtype]
    row = shape[-1] if shape else 1
    if row % block:  # ggml quantizes rows, a whole number of blocks each
        raise ValueError(f"{name}: rows of {row} values are not whole blocks")
    return TensorInfo(
        name, shape, qtype, offset, math.prod(shape) // block * block_bytes
    )


def hf_name(name: str, arch: str) -> str:
    """Map a GGUF tensor name to its Hugging Face name.

    ``"blk.0.ffn_gate.weight"`` becomes ``"model.layers.0.mlp.gate_proj.weight"``; the
    ``.scales``/``.biases`` of a quantized tensor follow the same rule.

    Args:
        name: the GGUF name.
        arch: the GGUF ``general.architecture``.

    Returns:
        The Hugging Face name.
    """
    base, _, suffix = name.rpartition(".")
    if base in _TOP_NAMES:
        return f"{_TOP_NAMES[base]}.{suffix}"
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)", base)
    module = m and _ARCH_BLOCK_NAMES[arch].get(m.group(2))
    if not module or suffix not in ("weight", "bias", "scales", "biases"):
        raise FlashError(
            f"unknown tensor {name!r} for architecture {arch!r}",
            fix="this GGUF holds weights mlx_flash cannot place; convert from HF",
        )
    return f"model.layers.{m.group(1)}.{module}.{suffix}"


def _convert(
    info: TensorInfo, buf, float_dtype: str
) -> Tuple[Dict[str, mx.array], Origin]:
    """One GGUF tensor as MLX arrays keyed by suffix (weight, scales, biases), and
    where its values came from."""
    raw = np.frombuffer(buf, np.uint8, info.nbytes, info.offset)
    kind = info.qtype.name
    if info.qtype in _FLOATS:
        w = mx.array(raw.view(_FLOATS[info.qtype]).reshape(info.shape))
        w = w.view(mx.bfloat16) if info.qtype == Q.BF16 else w
        return {"weight": w}, Origin(kind)
    rows = raw.reshape(-1, info.nbytes // math.prod(info.shape[:-1]))
    if info.qtype in EXACT_BITS and len(info.shape) == 2:
        blocks = rows.reshape(rows.shape[0], -1, GGML_QUANT_SIZES[info.qtype][1])
        codes, scales, biases = unpack(blocks, info.qtype)
        dtype = affine_dtype(scales, biases)
        packed = pack_codes(codes, EXACT_BITS[info.qtype])
        arrays = packed, scales.astype(dtype), biases.astype(dtype)
        return dict(zip(_PARTS, map(mx.array, arrays), strict=True)), Origin(kind)
    try:
        w, exact = dequantize_rows(rows, info.qtype, float_dtype)
    except (NotImplementedError, KeyError, ValueError) as e:
        raise FlashError(
            f"tensor {info.name!r} has unsupported type {kind}",
            fix="use a GGUF of a type the gguf package can dequantize (Q4_0, Q5_0, "
            "Q8_0, K-quants, IQ types, ...), or F16/F32",
        ) from e
    w = mx.array(w.reshape(info.shape))
    if float_dtype == "bfloat16":
        w = w.view(mx.bfloat16)
    rounded = "" if exact else " and rounded"
    return {"weight": w}, Origin(
        kind, exact, f"{kind} dequantized{rounded} to {float_dtype}"
    )


def _read_tensors(
    buf, tensors: List[TensorInfo], float_dtype: str
) -> Tuple[Dict[str, mx.array], Dict[str, Origin]]:
    """All tensors under GGUF names, ``.scales``/``.biases`` beside quantized ones,
    and each tensor's origin under its GGUF name."""
    out, origins = {}, {}
    for t in tensors:
        base = t.name.removesuffix(".weight")
        arrays, origins[t.name] = _convert(t, buf, float_dtype)
        for suffix, a in arrays.items():
            out[t.name if suffix == "weight" else f"{base}.{suffix}"] = a
    return out, origins


def quant_layout(weights: Dict[str, mx.array]) -> Dict[str, int]:
    """The bit width of each quantized module (from the packed shapes), by name."""
    layout = {}
    for k, scales in weights.items():
        if k.endswith(".scales"):
            module, cols = k.removesuffix(".scales"), scales.shape[-1] * GROUP_SIZE
            layout[module] = weights[f"{module}.weight"].shape[-1] * 32 // cols
    return layout


def quantization_config(weights: Dict[str, mx.array]) -> Optional[dict]:
    """mlx-lm's ``config["quantization"]`` for these weights, or None if none is
    quantized: the most common bit width, and an entry for each module of another.

    Modules without ``.scales`` (float tensors) need no entry: mlx-lm's
    ``load_model`` quantizes only modules whose ``.scales`` it finds.
    """
    layout = quant_layout(weights)
    if not layout:
        return None

    def params(bits: int) -> dict:
        return {"group_size": GROUP_SIZE, "bits": bits, "mode": "affine"}

    common = Counter(layout.values()).most_common(1)[0][0]
    quantization = params(common)
    quantization.update({m: params(b) for m, b in layout.items() if b != common})
    return quantization


def build_config(meta: dict, weights: Dict[str, mx.array]) -> dict:
    """A Hugging Face ``config.json`` dict from GGUF metadata and the mapped weights.

    Args:
        meta: the GGUF metadata.
        weights: the weights under their Hugging Face names.

    Returns:
        The config, with no ``None`` values.
    """
    arch = meta["general.architecture"]
    get = lambda key, default=None: meta.get(f"{arch}.{key}", default)  # noqa: E731
    missing = [f"{arch}.{k}" for k in _REQUIRED if get(k) is None]
    wrong = [
        f"{arch}.{k}"
        for k in _REQUIRED
        if get(k) is not None and not (type(get(k)) is int and get(k) > 0)
    ]
    if wrong:
        raise FlashError(f"the GGUF's {', '.join(wrong)} must be positive integers")
    if "model.embed_tokens.weight" not in weights:
        missing.append("token_embd.weight")
    if missing:
        raise FlashError(f"the GGUF lacks {', '.join(missing)}")
    model_type, architecture = _HF_TYPES[arch]
    heads = get("attention.head_count")
    hidden = get("embedding_length")
    eos = eos_token_ids(meta)
    config = {
        "model_type": model_type,
        "architectures": [architecture],
        "hidden_size": hidden,
        "num_hidden_layers": get("block_count"),
        "intermediate_size": get("feed_forward_length"),
        "num_attention_heads": heads,
        "num_key_value_heads": get("attention.head_count_kv", heads),
        "head_dim": get("attention.key_length", hidden // heads),
        "rms_norm_eps": get("attention.layer_norm_rms_epsilon", 1e-6),
        "rope_theta": get("rope.freq_base", 10000.0 if arch == "llama" else 1e6),
        "max_position_embeddings": get("context_length", 4096),
        "vocab_size": weights["model.embed_tokens.weight"].shape[0],
        "tie_word_embeddings": "lm_head.weight" not in weights,
        "rope_traditional": arch == "llama",  # GGUF llama Q/K are pair-interleaved
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": eos[0] if len(eos) == 1 else eos or None,
    }
    if arch == "gemma3":
        config.update(
            sliding_window=get("attention.sliding_window", 512),
            sliding_window_pattern=6,  # llama.cpp hard-codes it for gemma3
            rope_local_base_freq=get("rope.freq_base_swa", 10000.0),
            # llama.cpp: only Gemma-3-27B (62 layers) scales by hidden / heads
            query_pre_attn_scalar=hidden // heads
            if config["num_hidden_layers"] == 62
            else config["head_dim"],
            hidden_activation="gelu_pytorch_tanh",
        )
    else:
        config["hidden_act"] = "silu"
    if get("rope.scaling.type") in ("linear", "yarn"):
        config["rope_scaling"] = {
            "type": get("rope.scaling.type"),
            "factor": get("rope.scaling.factor", 1.0),
            "original_max_position_embeddings": get(
                "rope.scaling.original_context_length",
                config["max_position_embeddings"],
            ),
        }
    config["quantization"] = quantization_config(weights)
    return {k: v for k, v in config.items() if v is not None}


def to_hf(weights: Dict[str, mx.array], arch: str) -> Dict[str, mx.array]:
    """Rename GGUF tensors to Hugging Face names; undo Gemma's stored ``1 + w``.

    Args:
        weights: the tensors under their GGUF names.
        arch: the GGUF ``general.architecture``.

    Returns:
        The tensors under their Hugging Face names.
    """
    out = {hf_name(k, arch): v for k, v in weights.items()}
    if arch == "gemma3":  # every gemma3_text RMSNorm multiplies by (1 + weight)
        for k in [k for k in out if k.endswith("norm.weight")]:
            out[k] = out[k].astype(mx.float32) - 1.0
    return out


def read_gguf(path: Union[str, Path], float_dtype: str = "float16") -> GGUFModel:
    """Read a GGUF file into a Hugging Face config, MLX weights and tokenizer files.

    Tensors of the types in `gguf_quants.EXACT_BITS` become MLX affine triples, bit
    for bit; F32/F16/BF16 tensors stay as they are; any other type is dequantized by
    the `gguf` package and stored in `float_dtype`.

    Args:
        path: the ``.gguf`` file.
        float_dtype: ``"float16"``, ``"bfloat16"`` or ``"float32"`` (the `gguf`
            package's values bit for bit) for the types with no exact affine form.

    Returns:
        The model as a :class:`GGUFModel`, with each tensor's `Origin`.

    Raises:
        FlashError: if the file is missing, corrupt, of an unsupported architecture
            or holds an unsupported tensor type or name.
    """
    if float_dtype not in FLOAT_DTYPES:
        raise FlashError(
            f"unknown float dtype {float_dtype!r} for the GGUF types without an "
            "exact MLX form",
            fix="use " + ", ".join(FLOAT_DTYPES),
        )
    path = Path(path)
    if not path.is_file():
        raise FlashError("no such GGUF file", path=path)
    if path.stat().st_size < 24:
        raise FlashError("not a GGUF file (too short)", path=path)
    with open(path, "rb") as f:
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    meta, tensors = read_header(buf, path)
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_ARCHS:
        raise FlashError(
            f"unsupported architecture {arch!r}",
            fix=f"use a GGUF of one of: {', '.join(SUPPORTED_ARCHS)}",
            path=path,
        )
    try:
        weights, origins = _read_tensors(buf, tensors, float_dtype)
        weights = to_hf(weights, arch)
        origins = {
            hf_name(k, arch).removesuffix(".weight"): o for k, o in origins.items()
        }
        config = build_config(meta, weights)
        files = tokenizer_files(meta)
    except FlashError as e:
        raise FlashError(e.message, path=path, fix=e.fix) from e
    except (ValueError, TypeError, KeyError, IndexError, ZeroDivisionError) as e:
        raise FlashError(  # metadata of the wrong type, tensors of impossible shapes
            f"corrupt GGUF ({type(e).__name__}: {e})", path, _REDOWNLOAD
        ) from None
    return GGUFModel(config, weights, files, origins)


_REDOWNLOAD = "download the GGUF file again (an incomplete download?)"
