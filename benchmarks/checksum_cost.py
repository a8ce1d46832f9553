"""Issue #16: what checking every block's checksum on first use costs per token.

    python benchmarks/checksum_cost.py --model qwen0.5b [--store q4-split]
        [--budget 0.5] [--tokens 24] [--naive] [--selector input --sparsity 0.3]

Decodes the same teacher-forced tokens under the plan in one process: once with the
checks (the first pass hashes), then twice more with and twice without them,
interleaved (the same model, its checkers detached), and times the checkers
themselves (`BlockChecker.check` / `check_file`, wrapped): the first tokens hash
every block they bring (xxh3-64, the `xxhash` package), later ones only look up
the flags. Reports ms per token with and without, the checkers' own ms per token
(first token and the rest), and the blocks hashed. The load's own check of the
resident tensors is timed apart.
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from models import bench_cache, model_gguf  # noqa: E402

from mlx_flash import load  # noqa: E402
from mlx_flash.store.checksums import BlockChecker  # noqa: E402

WIKITEXT = (
    Path(__file__).resolve().parents[2] / "shared/data/corpora/wikitext2-test.txt"
)


class Timed:
    """Seconds spent inside the checkers (every instance), by phase."""

    def __init__(self):
        self.seconds, self.phase = {}, "load"
        for name in ("check", "check_file"):
            real = getattr(BlockChecker, name)

            def timed(checker, *a, _real=real, **k):
                tic = time.perf_counter()
                try:
                    return _real(checker, *a, **k)
                finally:
                    dt = time.perf_counter() - tic
                    self.seconds[self.phase] = self.seconds.get(self.phase, 0.0) + dt

            setattr(BlockChecker, name, timed)


def attach(model, on: bool) -> None:
    """The model's readers and disk table with their checkers (on) or without."""
    checker = model.flash_store.checkers.get
    model.flash_store.reader.checker = checker("ffn.bundles") if on else None
    if model.flash_stream is not None:
        for reader in model.flash_stream.readers:
            reader.checker = checker("model.safetensors") if on else None
    for m in model.modules():
        if hasattr(m, "_checker"):
            m._checker = checker("model.safetensors") if on else None


def decode(model, ids, timer, phase):
    from mlx_lm.models.cache import make_prompt_cache

    cache, times = make_prompt_cache(model), []
    for k, t in enumerate(ids):
        timer.phase = f"{phase} first" if k == 0 else phase
        tic = time.perf_counter()
        mx.eval(model(mx.array([[t]]), cache=cache))
        times.append(time.perf_counter() - tic)
    return times


def main():
    from mlx_flash.blas import prefer_fast_blas

    prefer_fast_blas()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="qwen0.5b")
    parser.add_argument("--store", default="q4-split")
    parser.add_argument("--budget", type=float, default=0.5, help="of the GGUF file")
    parser.add_argument("--tokens", type=int, default=24)
    parser.add_argument("--selector", default="all")
    parser.add_argument("--sparsity", type=float, default=None)
    parser.add_argument("--naive", action="store_true")
    parser.add_argument("--out", default=None, help="Append the JSON result here")
    args = parser.parse_args()
    store = bench_cache() / args.model / args.store
    budget = int(args.budget * model_gguf(args.model).stat().st_size)
    timer = Timed()
    options = {"selector": args.selector, "naive": args.naive}
    if args.sparsity is not None:
        options["sparsity"] = args.sparsity
    tic = time.perf_counter()
    model, tokenizer = load(str(store), dram_budget=budget, **options)
    load_s = time.perf_counter() - tic
    ids = tokenizer.encode(WIKITEXT.read_text()[:20000])[: args.tokens]
    load_avg = os.getloadavg()
    on = decode(model, ids, timer, "on")
    blocks = sum(c.blocks for c in model.flash_store.checkers.values())
    on_again, off = [], []  # every block checked by now: interleaved passes
    for _ in range(2):
        attach(model, False)
        off += decode(model, ids, timer, "off")
        attach(model, True)
        on_again += decode(model, ids, timer, "steady")
    s, n = timer.seconds, len(ids)
    result = {
        "model": args.model,
        "store": args.store,
        "options": options,
        "budget_bytes": budget,
        "tokens": n,
        "load_average": load_avg,
        "load_seconds": load_s,
        "load_check_ms": 1e3 * s.get("load", 0.0),
        "first_token_check_ms": 1e3 * s.get("on first", 0.0),
        "first_pass_check_ms_per_token": 1e3 * (s.get("on", 0.0)) / max(n - 1, 1),
        "steady_check_ms_per_token": 1e3
        * (s.get("steady", 0.0) + s.get("steady first", 0.0))
        / (2 * n),
        "blocks_hashed": blocks,
        "ms_per_token_first_pass": 1e3 * float(np.median(on[1:])),
        "ms_per_token_steady_checks_on": 1e3 * float(np.median(on_again)),
        "ms_per_token_checks_off": 1e3 * float(np.median(off)),
    }
    result["steady_share"] = (
        result["steady_check_ms_per_token"] / result["ms_per_token_steady_checks_on"]
    )
    print(json.dumps(result, indent=1))
    if args.out:
        with open(args.out, "a") as f:
            f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
