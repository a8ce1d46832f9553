"""What re-quantizing costs: perplexity of stores against the GGUF's own weights.

A GGUF's ffn_down is quantized along the neuron axis, so a neuron's down column must be
re-quantized (or kept in float) to be bundled. This measures the drift each choice
causes, on WikiText-2 test text (../shared/data), with mlx-lm on the dense directory as
reference. `--model` takes any GGUF (default: the embedded SmolLM2); `--stores` picks
the stores by name (default: the SmolLM2 set), e.g. the benchmark's q4 rows with each
width of down:

    python benchmarks/drift.py [--model FILE.gguf] [--tokens 4096]
        [--stores "q4 rows, q8 down;q4 rows, q6 down"]
"""

import argparse
import json
import math
import tempfile
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

STORES = {
    "auto: q4 rows as GGUF, q8 down": {},
    "q4 rows as GGUF, fp16 down": {"down_format": "float16"},
    "all q4 (down re-quantized to 4 bits)": {"ffn_format": "q4", "group_size": 32},
    "all fp16": {"ffn_format": "float16"},
}
# the benchmark's q4 stores (rows affine 4-bit, group 32) with each width of down
for bits in (8, 6, 5, 4):
    STORES[f"q4 rows, q{bits} down"] = {
        "ffn_format": "q4",
        "down_format": f"q{bits}",
        "group_size": 32,
    }
DEFAULT = list(STORES)[:4]


def perplexity(model, tokens, chunk=256):
    nll, count = 0.0, 0
    for i in range(0, len(tokens) - 1, chunk):
        x = mx.array(tokens[i : i + chunk + 1])[None]
        logits = model(x[:, :-1]).astype(mx.float32)
        loss = nn.losses.cross_entropy(logits, x[:, 1:], reduction="sum")
        nll, count = nll + float(loss), count + x.shape[1] - 1
    return math.exp(nll / count)


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default=None, help="a GGUF file (default: SmolLM2)")
    p.add_argument("--stores", default=";".join(DEFAULT), help="names, ';'-separated")
    p.add_argument("--text", default="../shared/data/corpora/wikitext2-test.txt")
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--tag", default="", help="suffix of the result file's name")
    args = p.parse_args()
    from mlx_flash.blas import prefer_fast_blas

    prefer_fast_blas()  # mlx-lm's float reference: minutes, not an hour

    import mlx_lm

    import mlx_flash
    from mlx_flash.default_model import default_model_path

    gguf = args.model or default_model_path()
    work = Path(tempfile.mkdtemp(prefix="drift-"))
    dense_dir = work / "dense"
    text = Path(args.text).read_text()[: args.tokens * 8]
    results = {}
    for i, name in enumerate(args.stores.split(";")):
        store = mlx_flash.convert(
            gguf,
            work / f"s{i}",
            dense_out=None if i else dense_dir,
            progress=False,
            **STORES[name],
        )
        model, tokenizer = mlx_flash.load(str(store))
        tokens = tokenizer.encode(text)[: args.tokens]
        results[name] = perplexity(model, tokens)
        size = sum(f.stat().st_size for f in Path(store).iterdir())
        results[name + ", store MB"] = size / 1e6
        print(f"{name}: ppl {results[name]:.3f}, store {size / 1e6:.0f} MB", flush=True)
        del model
    dense, _ = mlx_lm.load(str(dense_dir))
    dense.set_dtype(mx.float32)
    reference = "mlx-lm dense (the GGUF's weights)"
    results[reference] = perplexity(dense, tokens)
    print(f"dense: ppl {results[reference]:.3f}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    record = {"model": str(gguf), "tokens": len(tokens), "ppl": results}
    (out / f"drift{args.tag}.json").write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
