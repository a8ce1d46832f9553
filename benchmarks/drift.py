"""What re-quantizing costs: perplexity of SmolLM2 stores against the GGUF's own
weights.

A GGUF's ffn_down is quantized along the neuron axis, so a neuron's down column must be
re-quantized (or kept in float) to be bundled. This measures the drift each choice
causes, on WikiText-2 test text (../shared/data), with mlx-lm on the dense directory as
reference.

    python benchmarks/drift.py [--text ../shared/data/corpora/wikitext2-test.txt]
        [--tokens 4096]
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
    p.add_argument("--text", default="../shared/data/corpora/wikitext2-test.txt")
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args()

    import mlx_lm

    import mlx_flash
    from mlx_flash.default_model import default_model_path

    gguf, work = default_model_path(), Path(tempfile.mkdtemp(prefix="drift-"))
    dense_dir = work / "dense"
    text = Path(args.text).read_text()[: args.tokens * 8]
    results = {}
    for i, (name, options) in enumerate(STORES.items()):
        store = mlx_flash.convert(
            gguf,
            work / f"s{i}",
            dense_out=None if i else dense_dir,
            progress=False,
            **options,
        )
        model, tokenizer = mlx_flash.load(str(store))
        tokens = tokenizer.encode(text)[: args.tokens]
        results[name] = perplexity(model, tokens)
        print(f"{name}: ppl {results[name]:.3f}", flush=True)
    dense, _ = mlx_lm.load(str(dense_dir))
    dense.set_dtype(mx.float32)
    results["mlx-lm dense (the GGUF's weights)"] = perplexity(dense, tokens)
    print(
        f"dense: ppl {results['mlx-lm dense (the GGUF' + chr(39) + 's weights)']:.3f}"
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "drift.json").write_text(
        json.dumps({"tokens": len(tokens), "ppl": results}, indent=1)
    )


if __name__ == "__main__":
    main()
