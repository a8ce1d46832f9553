"""`python -m mlx_flash.convert`: a model -> a flash bundle store."""

import argparse

from .errors import exit_on_error
from .store.convert import LAYOUTS, convert

FORMATS = ["auto", "float16", "bfloat16", "float32", "q4", "q8"]


def setup_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Convert a model into an mlx_flash bundle store (FFN on the SSD)."
    )
    parser.add_argument(
        "source",
        nargs="?",
        help="Hugging Face or MLX model directory, hub id (org/name), or .gguf file",
    )
    parser.add_argument("--hf-path", help="Same as SOURCE (mlx_lm.convert's name)")
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
        choices=FORMATS,
        default="auto",
        help="Encoding of gate/up/fc1 rows in bundles (auto: the source's own, "
        "quantized sources kept as they are)",
    )
    parser.add_argument(
        "--down-format",
        choices=FORMATS,
        default="auto",
        help="Encoding of down/fc2 columns (auto: as --ffn-format; q8 for quantized "
        "sources, whose columns must be re-quantized per neuron)",
    )
    parser.add_argument(
        "--group-size",
        type=int,
        choices=[32, 64, 128],
        default=None,
        help="Quantization group size for q4/q8 (default 64; 32 for quantized sources)",
    )
    parser.add_argument(
        "--layout",
        choices=LAYOUTS,
        default="bundled",
        help="bundled (one read per neuron), split (no bundling: the ablation) or gate (gate rows apart, for --selector gate)",
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
    return parser


def main(argv=None) -> None:
    args = setup_arg_parser().parse_args(argv)
    source = args.source or args.hf_path
    if source is None:
        setup_arg_parser().error("give a SOURCE (or --hf-path)")
    with exit_on_error():
        out = convert(
            source,
            args.out,
            ffn_format=args.ffn_format,
            down_format=args.down_format,
            group_size=args.group_size,
            layout=args.layout,
            dense_out=args.dense_out,
            overwrite=args.overwrite,
            revision=args.revision,
            progress=not args.quiet,
        )
    print(f"[mlx_flash] wrote {out}")


if __name__ == "__main__":
    main()
