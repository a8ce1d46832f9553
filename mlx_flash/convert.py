"""`convert` and `python -m mlx_flash.convert`: a model -> a flash bundle store.

Both take `mlx_lm.convert`'s arguments (``hf_path``, ``mlx_path``, ``quantize``,
``q_bits``, ``q_group_size``, ``q_mode``, ``dtype``, ``dequantize``,
``quant_predicate``, ...) as well as the store's own (``ffn_format``, ``layout``, ...).
"""

import argparse
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Union

import mlx.nn as nn
from mlx_lm.convert import MODEL_CONVERSION_DTYPES, QUANT_RECIPES

from .errors import FlashError, exit_on_error
from .store import writer
from .store.format import FFN_FORMATS
from .store.quantize import (
    DENSE_FORMATS,
    QUANT_MODES,
    check_predicate,
    quant_settings,
)

MLX_PATH = "mlx_model"  # mlx-lm's default output directory
QuantPredicate = Union[str, Callable[[str, nn.Module], Union[bool, dict]], None]


def convert(
    hf_path: Union[str, Path, None] = None,
    mlx_path: Union[str, Path] = MLX_PATH,
    quantize: bool = False,
    q_group_size: Optional[int] = None,
    q_bits: Optional[int] = None,
    q_mode: str = "affine",
    dtype: Optional[str] = None,
    upload_repo: Optional[str] = None,
    revision: Optional[str] = None,
    dequantize: bool = False,
    quant_predicate: QuantPredicate = None,
    trust_remote_code: bool = False,
    *,
    source: Union[str, Path, None] = None,
    out: Union[str, Path, None] = None,
    ffn_format: str = "auto",
    down_format: str = "auto",
    group_size: Optional[int] = None,
    layout: str = "planar",
    column_format: str = "auto",
    dense_format: str = "auto",
    dense_out: Union[str, Path, None] = None,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Convert a model into a flash bundle store, taking `mlx_lm.convert`'s arguments.

    Args:
        hf_path: a Hugging Face or MLX model directory, a hub id or a .gguf file
            (``source`` is the same).
        mlx_path: the store directory to create (``out`` is the same).
        quantize: quantize the float model as mlx-lm does, with ``q_group_size``,
            ``q_bits``, ``q_mode`` (affine, mxfp4, mxfp8, nvfp4) and
            ``quant_predicate`` (a recipe, ``mixed_3_6`` ..., or a callable).
        dtype: float16, bfloat16 or float32: the type of the parameters that are
            not quantized (mlx-lm's meaning).
        upload_repo: refused: the store stays local (upload it yourself).
        revision: hub revision, for a hub id.
        dequantize: turn a quantized model into a float one (FFN and dense part).
        trust_remote_code: accepted for mlx-lm's sake; conversion never runs a
            model's own code.
        ffn_format, down_format, group_size, layout, column_format, dense_format,
        dense_out, overwrite, progress:
            the store's own options (see `mlx_flash.store.writer.convert`).

    Returns:
        The store path.
    """
    del trust_remote_code  # no model code runs: nothing to trust
    arguments = store_arguments(
        hf_path=hf_path,
        source=source,
        mlx_path=mlx_path,
        out=out,
        quantize=quantize,
        q_group_size=q_group_size,
        q_bits=q_bits,
        q_mode=q_mode,
        dtype=dtype,
        upload_repo=upload_repo,
        dequantize=dequantize,
        quant_predicate=quant_predicate,
    )
    return writer.convert(
        **arguments,
        ffn_format=ffn_format,
        down_format=down_format,
        group_size=group_size,
        layout=layout,
        column_format=column_format,
        dense_format=dense_format,
        dense_out=dense_out,
        overwrite=overwrite,
        revision=revision,
        progress=progress,
    )


def store_arguments(
    hf_path: Union[str, Path, None],
    source: Union[str, Path, None],
    mlx_path: Union[str, Path, None],
    out: Union[str, Path, None],
    quantize: bool,
    q_group_size: Optional[int],
    q_bits: Optional[int],
    q_mode: str,
    dtype: Optional[str],
    upload_repo: Optional[str],
    dequantize: bool,
    quant_predicate: QuantPredicate,
) -> Dict[str, Any]:
    """mlx-lm's arguments as the store writer's: ``source``, ``out`` and, when they
    apply, ``dtype``, ``quantization`` and ``dequantize``. Every value is checked
    here, before a source is read or downloaded."""
    if upload_repo is not None:
        raise FlashError(
            f"uploading to the hub ({upload_repo}) is not done here",
            fix="convert, then upload the store directory yourself "
            f"(hf upload {upload_repo} OUT)",
        )
    if quantize and dequantize:
        raise FlashError(
            "choose either quantize or dequantize, not both", fix="drop one of them"
        )
    if dtype is not None and dtype not in MODEL_CONVERSION_DTYPES:
        raise FlashError(
            f"unknown dtype {dtype!r}", fix="use " + ", ".join(MODEL_CONVERSION_DTYPES)
        )
    arguments = {
        "source": _one_of("hf_path", hf_path, "source", source, None),
        "out": _one_of("mlx_path", mlx_path, "out", out, MLX_PATH),
    }
    if dtype is not None:
        arguments["dtype"] = dtype
    if quantize:
        quant_settings(q_bits, q_group_size, q_mode)
        check_predicate(quant_predicate, q_mode)
        arguments["quantization"] = {
            "bits": q_bits,
            "group_size": q_group_size,
            "mode": q_mode,
            "predicate": quant_predicate,
        }
    if dequantize:
        arguments["dequantize"] = True
    return arguments


def _one_of(name: str, value: Any, alias: str, other: Any, default: Any) -> Any:
    """One value given under two names (mlx-lm's and ours): either, or refused."""
    if other is None:
        if value is None:
            raise FlashError(f"give {name} (or {alias}): the model to convert")
        return value
    if value is None or value == default or str(value) == str(other):
        return other
    raise FlashError(
        f"{name}={str(value)!r} and {alias}={str(other)!r} disagree",
        fix="give one of them",
    )


def setup_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Convert a model into an mlx_flash bundle store (FFN on the SSD). "
        "Takes mlx_lm.convert's flags as well."
    )
    parser.add_argument(
        "source",
        nargs="?",
        help="Hugging Face or MLX model directory, hub id (owner/name), or .gguf file",
    )
    parser.add_argument(
        "--hf-path", "--model", help="Same as SOURCE (mlx_lm.convert's name)"
    )
    parser.add_argument(
        "-o",
        "--out",
        "--mlx-path",
        dest="out",
        default="flash_model",
        help="The store directory to create (default: flash_model)",
    )
    parser.add_argument(
        "--ffn-format",
        choices=FFN_FORMATS,
        default="auto",
        help="Encoding of gate/up/fc1 rows in bundles (auto: the source's own, "
        "quantized sources kept as they are)",
    )
    parser.add_argument(
        "--down-format",
        choices=FFN_FORMATS,
        default="auto",
        help="Encoding of down/fc2 columns (auto: as --ffn-format; q6 for quantized "
        "sources, whose columns must be re-quantized per neuron: +0.05%% perplexity "
        "against q8 on Qwen2.5-Coder-0.5B)",
    )
    parser.add_argument(
        "--group-size",
        type=int,
        choices=[32, 64, 128],
        default=None,
        help="Quantization group size for --ffn-format/--down-format qN (default 64; "
        "32 for quantized sources)",
    )
    parser.add_argument(
        "--layout",
        choices=writer.LAYOUTS,
        default="planar",
        help="planar (the default: each component's packed words, scales and biases "
        "apart, so the exact default computes streamed layers where they were read), "
        "bundled (one read per neuron: the paper's bundling, for --selector lowrank, "
        "oracle or shadow), split (no bundling: the ablation), gate (gate rows apart, "
        "for --selector gate) or columns (planar, and gate/up also by input channel, "
        "planar too, for --selector input)",
    )
    parser.add_argument(
        "--column-format",
        choices=FFN_FORMATS,
        default="auto",
        help="--layout columns: encoding of the gate/up columns by input channel "
        "(auto: a float model's own; quantized rows' bits + 1, re-quantized along the "
        "neuron axis: at the rows' bits the columns lose quality)",
    )
    parser.add_argument(
        "--dense-format",
        choices=DENSE_FORMATS,
        default="auto",
        help="A GGUF's dense tensors (attention, embedding, head) of a type with no "
        "exact MLX form: auto re-quantizes Q6_K to affine 6-bit, group 32 (within "
        "0.1%% perplexity of float16 at under half its bytes) and keeps the rest "
        "(Q2_K, Q3_K, IQ*) as float16; float keeps all as float16; q4-q8 "
        "re-quantize all",
    )
    parser.add_argument(
        "--dense-out",
        default=None,
        help="Also write a plain mlx-lm directory of the same weights",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="Replace existing output"
    )
    parser.add_argument("--revision", default=None, help="Hub revision for a hub id")
    parser.add_argument("--quiet", action="store_true", help="No progress bar")
    add_mlx_lm_args(parser.add_argument_group("mlx_lm.convert's options"))
    return parser


def add_mlx_lm_args(group) -> None:
    """mlx_lm.convert's flags beyond the paths, with its names and defaults."""
    group.add_argument(
        "-q",
        "--quantize",
        action="store_true",
        help="Quantize the float model first, as mlx_lm.convert -q does",
    )
    group.add_argument(
        "--q-group-size",
        type=int,
        default=None,
        help="Group size for -q (affine: 32, 64 or 128; default 64)",
    )
    group.add_argument(
        "--q-bits",
        type=int,
        default=None,
        help="Bits per weight for -q (affine: 1-6 or 8; default 4)",
    )
    group.add_argument(
        "--q-mode",
        choices=QUANT_MODES,
        default="affine",
        help="The quantization mode for -q (mxfp4, mxfp8, nvfp4 fix bits and group)",
    )
    group.add_argument(
        "--quant-predicate",
        choices=QUANT_RECIPES,
        default=None,
        help="Mixed-bit quantization recipe for -q",
    )
    group.add_argument(
        "--dtype",
        choices=MODEL_CONVERSION_DTYPES,
        default=None,
        help="Type of the parameters that are not quantized (default: the model's "
        "own; with -q, config.json's torch_dtype, as mlx_lm.convert)",
    )
    group.add_argument(
        "--upload-repo",
        default=None,
        help="Refused: upload the store yourself (hf upload REPO OUT)",
    )
    group.add_argument(
        "-d",
        "--dequantize",
        action="store_true",
        help="Dequantize a quantized model: float FFN and dense part",
    )
    group.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="Accepted for mlx_lm.convert's sake: conversion never runs model code",
    )


def main(argv=None) -> None:
    parser = setup_arg_parser()
    args = parser.parse_args(argv)
    if args.source and args.hf_path and args.source != args.hf_path:
        parser.error("give SOURCE or --hf-path, not both")
    source = args.source or args.hf_path
    if source is None:
        parser.error("give a SOURCE (or --hf-path)")
    with exit_on_error():
        out = convert(
            source,
            quantize=args.quantize,
            q_group_size=args.q_group_size,
            q_bits=args.q_bits,
            q_mode=args.q_mode,
            dtype=args.dtype,
            upload_repo=args.upload_repo,
            revision=args.revision,
            dequantize=args.dequantize,
            quant_predicate=args.quant_predicate,
            trust_remote_code=args.trust_remote_code,
            out=args.out,
            ffn_format=args.ffn_format,
            down_format=args.down_format,
            group_size=args.group_size,
            layout=args.layout,
            column_format=args.column_format,
            dense_format=args.dense_format,
            dense_out=args.dense_out,
            overwrite=args.overwrite,
            progress=not args.quiet,
        )
    print(f"[mlx_flash] wrote {out}")


if __name__ == "__main__":
    main()
