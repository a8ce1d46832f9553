"""What a GGUF's Q6_K LM head costs in each MLX encoding: bytes and perplexity.

    python benchmarks/head_precision.py --model qwen1.5b [--store q4-split]
        [--tokens 512] [--skip 200000]

The store's own model gives the final hidden states of held-out WikiText-2 tokens (one
sequence); the head is the GGUF's `output.weight` dequantized by the `gguf` package,
then rounded to float16 (the store's encoding before `--dense-format`) and
re-quantized with `mx.quantize` at each affine setting. Reports each encoding's bytes,
largest relative weight error, perplexity and how often its argmax agrees with
float16's. The head's rows are scored in chunks, so the float32 head is the only large
array held.
"""

import argparse
import math
import os
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from models import bench_cache, model_gguf  # noqa: E402

from mlx_flash import load  # noqa: E402
from mlx_flash.layerwise import text_tokens  # noqa: E402

WIKITEXT = (
    Path(__file__).resolve().parents[2] / "shared/data/corpora/wikitext2-test.txt"
)
ENCODINGS = [(8, 32), (6, 32), (6, 64), (5, 32), (4, 32)]  # (bits, group size)


def gguf_head(path: Path) -> np.ndarray:
    from gguf import GGUFReader
    from gguf.quants import dequantize

    t = next(t for t in GGUFReader(path).tensors if t.name == "output.weight")
    return dequantize(t.data, t.tensor_type).astype(np.float16), t.tensor_type.name


def perplexity(h: mx.array, w: mx.array, targets: mx.array) -> tuple:
    logits = h @ w.astype(mx.float32).T
    lp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    nll = -mx.take_along_axis(lp, targets[:, None], axis=-1).mean()
    return math.exp(nll.item()), mx.argmax(logits, axis=-1)


def main():
    from mlx_flash.blas import prefer_fast_blas

    prefer_fast_blas()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--store", default="q4-split")
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--skip", type=int, default=200000)
    args = parser.parse_args()
    head, kind = gguf_head(model_gguf(args.model))
    model, tokenizer = load(
        str(bench_cache() / args.model / args.store), progress=False
    )
    ids = text_tokens(
        tokenizer, WIKITEXT.read_text(), args.tokens + 1, args.tokens + 1, args.skip
    ).reshape(-1)
    h = model.model(mx.array(ids[:-1])[None])[0].astype(mx.float32)
    targets = mx.array(ids[1:])
    mx.eval(h)
    w16 = mx.array(head)
    base, argmax = perplexity(h, w16, targets)
    print(
        f"{args.model}: its {kind} head {head.shape}, {args.tokens} held-out tokens "
        f"after {args.skip}; load average {os.getloadavg()[0]:.1f}\n"
    )
    print(
        "| head encoding | MB | max rel. error | perplexity | vs float16 "
        "| argmax agrees |"
    )
    print("|---|---|---|---|---|---|")
    print(f"| float16 | {w16.nbytes / 1e6:.1f} | – | {base:.3f} | – | – |")
    for bits, group in ENCODINGS:
        parts = mx.quantize(w16, group_size=group, bits=bits)
        back = mx.dequantize(*parts, group_size=group, bits=bits)
        error = (mx.abs(back - w16).max() / mx.abs(w16).max()).item()
        ppl, top = perplexity(h, back, targets)
        agree = (top == argmax).astype(mx.float32).mean().item()
        mb = sum(p.nbytes for p in parts) / 1e6
        print(
            f"| affine q{bits} g{group} | {mb:.1f} | {error:.4f} | {ppl:.3f} | "
            f"{ppl / base - 1:+.2%} | {agree:.1%} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
