"""mlx-lm's `convert -q`, `--dtype` and `-d` on a Source: quantize, cast, dequantize.

Quantizing builds the mlx-lm model of the source's config (ours for OPT) and lets
mlx-lm's own `quantize_model` do the work, so the tensors equal `mlx_lm.convert`'s bit
for bit; the weights come back under the source's names. Every tensor a step changes
gets an inexact `Origin` that names the step.
"""

import contextlib
import io
from dataclasses import replace
from typing import Callable, Dict, Optional, Tuple, Union

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm.convert import (
    MODEL_CONVERSION_DTYPES,
    QUANT_RECIPES,
    mixed_quant_predicate_builder,
)
from mlx_lm.utils import infer_quant_config, quantize_model

from ..errors import FlashError
from .archs import ffn_arch
from .encoding import AFFINE_BITS, FLOAT_MODES, Origin
from .sources import Source

QUANT_MODES = ("affine",) + tuple(FLOAT_MODES)
AFFINE_GROUPS = (32, 64, 128)
AFFINE_DEFAULTS = (4, 64)  # bits, group size: mlx-lm's
_QUANT_PARTS = ("weight", "scales", "biases", "global_scale")
# GGUF types with no exact MLX form, re-quantized by default (`requantize_dense`):
# Qwen2.5-Coder-1.5B's Q6_K head at affine 6-bit g32 is 204 MB against 467 as
# float16, at +0.05% perplexity (512 WikiText-2 tokens; 8-bit: +0.09%, 4-bit: +3.2%)
REQUANTIZED = {"Q6_K": 6}
DENSE_FORMATS = ("auto", "float") + tuple(f"q{b}" for b in (4, 5, 6, 8))
DENSE_GROUP = 32
Predicate = Union[str, Callable[[str, nn.Module], Union[bool, dict]], None]


def quant_settings(
    bits: Optional[int], group_size: Optional[int], mode: str = "affine"
) -> Tuple[int, int]:
    """The (bits, group size) mlx-lm quantizes with, its defaults filled in.

    Raises:
        FlashError: for a mode, bit width or group size MLX does not compute with.
    """
    if mode not in QUANT_MODES:
        raise FlashError(
            f"unknown quantization mode {mode!r}", fix="use " + ", ".join(QUANT_MODES)
        )
    if mode != "affine":
        fixed = FLOAT_MODES[mode]
        if (bits or fixed[0], group_size or fixed[1]) != fixed:
            raise FlashError(
                f"{mode} quantizes {fixed[0]} bits in groups of {fixed[1]}, not "
                f"{bits or fixed[0]} bits in groups of {group_size or fixed[1]}",
                fix=f"drop q_bits and q_group_size (--q-bits, --q-group-size): {mode}"
                " fixes both",
            )
        return fixed
    bits, group_size = bits or AFFINE_DEFAULTS[0], group_size or AFFINE_DEFAULTS[1]
    if bits not in AFFINE_BITS or group_size not in AFFINE_GROUPS:
        raise FlashError(
            f"unsupported affine quantization: {bits} bits in groups of {group_size}",
            fix="use q_bits (--q-bits) "
            + ", ".join(map(str, AFFINE_BITS))
            + " and q_group_size (--q-group-size) "
            + ", ".join(map(str, AFFINE_GROUPS)),
        )
    return bits, group_size


def check_predicate(predicate: Predicate, mode: str) -> None:
    """FlashError unless `predicate` is None, a callable or a recipe for `mode`."""
    if predicate is None or callable(predicate):
        return
    if predicate not in QUANT_RECIPES:
        raise FlashError(
            f"unknown quantization recipe {predicate!r}",
            fix="use " + ", ".join(QUANT_RECIPES) + ", or a callable (path, module)",
        )
    if mode != "affine":
        raise FlashError(
            f"the recipe {predicate} mixes affine bit widths: it cannot use {mode}",
            fix="drop q_mode, or the recipe",
        )


def is_quantized(src: Source) -> bool:
    return "quantization" in src.config or any(
        k.endswith(".scales") for k in src.weights
    )


def quantize_source(
    src: Source,
    bits: Optional[int] = None,
    group_size: Optional[int] = None,
    mode: str = "affine",
    predicate: Predicate = None,
) -> Source:
    """Quantize a float source exactly as `mlx_lm.convert(quantize=True)` would.

    Like mlx-lm, the float weights are first cast to the config's ``torch_dtype``
    (when it is float16, bfloat16 or float32); `cast_source` before this sets it.

    Args:
        src: a source with float weights.
        bits, group_size, mode: mlx-lm's ``q_bits``, ``q_group_size`` and ``q_mode``
            (defaults: 4 bits in groups of 64 for affine; fixed for the float modes).
        predicate: mlx-lm's ``quant_predicate``: a recipe name (``mixed_3_6``, ...)
            or a callable ``(path, module) -> bool | dict`` on mlx-lm module paths.

    Returns:
        The source, its quantized weights under the source's names, its config with
        mlx-lm's ``quantization`` entry, and an inexact Origin for each quantized
        tensor.
    """
    bits, group_size = quant_settings(bits, group_size, mode)
    check_predicate(predicate, mode)
    ffn_arch(src.config, src.path)  # an architecture we cannot store: refused first
    if is_quantized(src):
        raise FlashError(
            "cannot quantize an already quantized model",
            src.path,
            "quantize the float model, or convert this one as it is (its "
            "quantization is kept)",
        )
    src = _cast(src, default_dtype(src.config), "the config's torch_dtype")
    model, _, names = build_model(src)
    if isinstance(predicate, str):
        try:
            predicate = mixed_quant_predicate_builder(predicate, model, group_size)
        except ValueError as e:  # no down_proj to give more bits (OPT)
            raise FlashError(
                f"the recipe does not apply to {src.config['model_type']} ({e})",
                src.path,
                "quantize with q_bits instead",
            ) from None
    with contextlib.redirect_stdout(io.StringIO()):  # its bits-per-weight line
        model, config = quantize_model(
            model, src.config, group_size, bits, mode=mode, quant_predicate=predicate
        )
    weights = {source_name(k, names): v for k, v in tree_flatten(model.parameters())}
    origins = dict(src.origins)
    for path, module in model.named_modules():
        if isinstance(module, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
            base = source_name(path + ".weight", names).removesuffix(".weight")
            dtype = _dtype_name(src.weights[base + ".weight"].dtype)
            params = dict(bits=module.bits, group_size=module.group_size)
            note = f"{dtype} quantized to {quant_label(params, module.mode)} (asked)"
            origins[base] = _lossy(origins.get(base), dtype, note)
    return replace(src, kind="mlx", config=config, weights=weights, origins=origins)


def check_dense_format(fmt: str) -> None:
    if fmt not in DENSE_FORMATS:
        raise FlashError(
            f"unknown dense format {fmt!r}", fix="use " + ", ".join(DENSE_FORMATS)
        )


def requantize_dense(src: Source, fmt: str = "auto") -> Source:
    """The dense tensors that a GGUF held in a type with no exact MLX form (read as
    floats: Q6_K, Q2_K, Q3_K, IQ*), quantized again to MLX affine, group 32, so that
    the store is about the file's size rather than float16's.

    `fmt`: ``auto`` re-quantizes the types of `REQUANTIZED` at their bits and keeps the
    others as floats; ``qN``, every such tensor at N bits; ``float``, none (the
    dequantized floats). FFN tensors are left alone: the store encodes them itself,
    from the floats. Each changed tensor's origin names the step and its largest
    |Δw|; the config's ``quantization`` gets an entry per module.
    """
    check_dense_format(fmt)
    arch = ffn_arch(src.config, src.path)
    ffn = set(arch.rows) | {arch.column}
    weights, origins = dict(src.weights), dict(src.origins)
    quantization = dict(src.config.get("quantization") or {})
    for base, origin in src.origins.items():
        w = weights.get(base + ".weight")
        bits = REQUANTIZED.get(origin.kind) if fmt == "auto" else None
        if fmt.startswith("q") and not origin.floats:
            bits = int(fmt[1:])
        if (
            not bits
            or w is None
            or base + ".scales" in weights
            or base.rsplit(".", 1)[-1] in ffn
            or w.ndim != 2
            or w.shape[-1] % DENSE_GROUP
        ):
            continue
        packed, scales, biases = mx.quantize(w, group_size=DENSE_GROUP, bits=bits)
        back = mx.dequantize(packed, scales, biases, group_size=DENSE_GROUP, bits=bits)
        error = mx.abs(back.astype(mx.float32) - w.astype(mx.float32)).max().item()
        weights.update(
            {
                base + ".weight": packed,
                base + ".scales": scales,
                base + ".biases": biases,
            }
        )
        params = {"group_size": DENSE_GROUP, "bits": bits, "mode": "affine"}
        quantization.setdefault("group_size", DENSE_GROUP)
        quantization.setdefault("bits", bits)
        quantization.setdefault("mode", "affine")
        quantization[base] = params
        note = f"re-quantized to {quant_label(params)} (no exact MLX form)"
        origins[base] = _lossy(origin, origin.kind, note)._replace(
            error=error if origin.exact else None  # then Δw covers every step
        )
    if quantization == dict(src.config.get("quantization") or {}):
        return src
    config = {**src.config, "quantization": quantization}
    return replace(src, config=config, weights=weights, origins=origins)


def cast_source(src: Source, dtype: str) -> Source:
    """Cast the float tensors to `dtype`, as mlx-lm's ``convert(dtype=...)`` does.

    ``dtype`` is the type of the parameters that are not quantized (and of the
    scales and biases of those that are). Casts to a narrower type are marked
    inexact in the origins; the config's ``torch_dtype`` becomes `dtype`.
    """
    return _cast(src, dtype, "asked")


def dequantize_source(src: Source, dtype: Optional[str] = None) -> Source:
    """Turn quantized weights into float ones, as mlx-lm's ``convert(dequantize=True)``.

    Args:
        src: a source; its quantized triples are dequantized with the bits, group
            size and mode of its config (per layer where it says so, else as mlx-lm
            infers them from the shapes).
        dtype: the dtype of every float tensor of the result. Default: mlx-lm's,
            which casts the float tensors (scales included) to the config's
            ``torch_dtype`` and dequantizes to the scales' dtype (bfloat16 for the
            float modes, whose scales are bytes).

    Returns:
        The source without quantized tensors or a ``quantization`` config entry.
    """
    ffn_arch(src.config, src.path)
    if dtype is not None:
        src = cast_source(src, dtype)  # the scales first, as mlx-lm does
    else:
        src = _cast(src, default_dtype(src.config), "the config's torch_dtype")
    model, sanitized, names = build_model(src, load=False)
    quantization = src.config.get("quantization") or {}
    weights, origins = dict(src.weights), dict(src.origins)
    for path, module in model.named_modules():
        if f"{path}.scales" not in sanitized:
            continue
        params = quantization.get(path)
        if not isinstance(params, dict):
            params = infer_quant_config(path, module, sanitized)
        base = source_name(path + ".weight", names).removesuffix(".weight")
        parts = [weights.pop(f"{base}.{p}", None) for p in _QUANT_PARTS]
        w = mx.dequantize(
            *parts[:3],
            params["group_size"],
            params["bits"],
            params.get("mode", "affine"),
            global_scale=parts[3],
            dtype=getattr(mx, dtype) if dtype else None,
        )
        weights[base + ".weight"] = w
        label = quant_label(params)
        note = f"{label} dequantized to {_dtype_name(w.dtype)} (asked)"
        origins[base] = _lossy(origins.get(base), label, note)
    config = dict(src.config)
    config.pop("quantization", None)
    config.pop("quantization_config", None)
    return replace(src, kind="hf", config=config, weights=weights, origins=origins)


def default_dtype(config: dict) -> Optional[str]:
    """The dtype mlx-lm's convert casts to when none is given: the config's."""
    dtype = config.get("torch_dtype")
    if dtype is None:
        dtype = (config.get("text_config") or {}).get("dtype")
    return dtype if dtype in MODEL_CONVERSION_DTYPES else None


def quant_label(params: dict, mode: Optional[str] = None) -> str:
    """``affine q4 g64``, ``mxfp4 g32``: the names origins and manifests use."""
    mode = mode or params.get("mode", "affine")
    if mode == "affine":
        return f"affine q{params['bits']} g{params['group_size']}"
    return f"{mode} g{params['group_size']}"


def build_model(
    src: Source, load: bool = True
) -> Tuple[nn.Module, Dict[str, mx.array], Dict[str, str]]:
    """The mlx-lm model of `src.config` (its weights loaded, unless not `load`), the
    weights under its names, and each one's source name (model name -> source name).
    """
    from ..utils import get_classes  # here: utils imports the store writer

    try:
        model_class, args_class = get_classes(src.config)
        model = model_class(args_class.from_dict(src.config))
    except (ValueError, TypeError, KeyError) as e:
        raise FlashError(
            f"cannot build the {src.config.get('model_type')} model of this config "
            f"({type(e).__name__}: {e})",
            src.path,
            "use the model's original config.json",
        ) from None
    weights = model_weights(model, src.weights)
    names = _source_names(src.weights, weights)
    if load:
        try:
            model.load_weights(list(weights.items()), strict=True)
        except ValueError as e:
            raise FlashError(
                f"the weights do not fit the config ({e})",
                src.path,
                "use the model's original config.json and weights",
            ) from None
    return model, weights, names


def model_weights(
    model: nn.Module, weights: Dict[str, mx.array]
) -> Dict[str, mx.array]:
    """`weights` under the model's names: its `sanitize`, as mlx-lm's loader calls."""
    weights = dict(weights)
    return model.sanitize(weights) if hasattr(model, "sanitize") else weights


def source_name(key: str, names: Dict[str, str]) -> str:
    """The source's name of the model's tensor `key` (``.scales``/``.biases`` go
    beside their ``.weight``)."""
    if key in names:
        return names[key]
    base, _, part = key.rpartition(".")
    weight = names.get(base + ".weight", "")
    return weight.removesuffix("weight") + part if weight.endswith(".weight") else key


def _source_names(
    source: Dict[str, mx.array], model: Dict[str, mx.array]
) -> Dict[str, str]:
    """Model name -> source name, by array identity: sanitize renames (OPT's
    ``layers.0.fc1`` -> ``layers.0.mlp.fc1``) without copying."""
    by_id = {id(v): k for k, v in source.items()}
    return {k: by_id.get(id(v), k) for k, v in model.items()}


def _cast(src: Source, dtype: Optional[str], why: str) -> Source:
    if dtype is None:
        return src
    if dtype not in MODEL_CONVERSION_DTYPES:
        raise FlashError(
            f"unknown dtype {dtype!r}", fix="use " + ", ".join(MODEL_CONVERSION_DTYPES)
        )
    target = getattr(mx, dtype)
    weights, origins = dict(src.weights), dict(src.origins)
    for k, v in src.weights.items():
        if not mx.issubdtype(v.dtype, mx.floating) or v.dtype == target:
            continue
        weights[k] = v.astype(target)
        if target != mx.float32:  # every float type widens exactly to float32
            base, part = k.rsplit(".", 1) if "." in k else (k, "")
            what = "" if part in ("weight", "bias") else f"{part} "
            note = f"{what}{_dtype_name(v.dtype)} cast to {dtype} ({why})"
            origins[base] = _lossy(origins.get(base), _dtype_name(v.dtype), note)
    config = {**src.config, "torch_dtype": dtype}
    if "dtype" in config:  # transformers 5's name for it
        config["dtype"] = dtype
    return replace(src, config=config, weights=weights, origins=origins)


def _lossy(origin: Optional[Origin], kind: str, note: str) -> Origin:
    """`origin` (or a new one of `kind`) marked inexact, `note` added to its notes;
    a measured error no longer covers every step, so it is dropped."""
    if origin is None:
        return Origin(kind, False, note)
    notes = "; ".join(n for n in (origin.note, note) if n)
    return origin._replace(exact=False, note=notes, error=None)  # error: of one step


def _dtype_name(dtype: mx.Dtype) -> str:
    return str(dtype).removeprefix("mlx.core.")
