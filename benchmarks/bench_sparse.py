"""The sparse-inference table (issue #3): SmolLM2-135M, 4-bit and fp16 bundles; naive,
`gate` selection at 50% / 25% with and without windowing and bundling; mlx-lm dense in
the same run. Each configuration runs in its own process; EOS ignored; decode only
(prefill excluded from per-token numbers); peak RSS from getrusage.

    python benchmarks/bench_sparse.py [--tokens 128] [--rounds 1] [--out benchmarks/results]
        [--predictors STORE]   # copy trained predictors (train_predictors) for `lowrank`
        [--only NAME,...]
"""

import argparse
import json
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROMPT = "Write a short story about a robot who learns to paint."
# name: (store, load options)
CONFIGS = {
    "mlx-lm dense (fp32)": ("dense", None),
    "q4 naive (all)": ("q4-bundled", {}),
    "q4 gate 50%": ("q4-gate", {"selector": "gate", "fraction": 0.5}),
    "q4 gate 50% + window 4": (
        "q4-gate",
        {"selector": "gate", "fraction": 0.5, "window": 4},
    ),
    "q4 gate 50%, no bundling": ("q4-split", {"selector": "gate", "fraction": 0.5}),
    "q4 gate 25%": ("q4-gate", {"selector": "gate", "fraction": 0.25}),
    "q4 gate 25% + window 4": (
        "q4-gate",
        {"selector": "gate", "fraction": 0.25, "window": 4},
    ),
    "q4 gate 25%, no bundling": ("q4-split", {"selector": "gate", "fraction": 0.25}),
    "q4 gate 50%, budget 0.9": (
        "q4-gate", {"selector": "gate", "fraction": 0.5, "dram_budget": 0.9}
    ),
    "q4 gate 25%, budget 0.9": (
        "q4-gate", {"selector": "gate", "fraction": 0.25, "dram_budget": 0.9}
    ),
    "q4 gate 50%, budget 0.75": (
        "q4-gate", {"selector": "gate", "fraction": 0.5, "dram_budget": 0.75}
    ),
    "q4 gate 25%, budget 0.75": (
        "q4-gate", {"selector": "gate", "fraction": 0.25, "dram_budget": 0.75}
    ),
    "q4 lowrank recall 0.9": ("q4-bundled", {"selector": "lowrank", "recall": 0.9}),
    "q4 lowrank recall 0.9 + window 4": (
        "q4-bundled", {"selector": "lowrank", "recall": 0.9, "window": 4}
    ),
    "q4 lowrank recall 0.9, budget 0.75": (
        "q4-bundled", {"selector": "lowrank", "recall": 0.9, "dram_budget": 0.75}
    ),
    "fp16 naive (all)": ("fp16-bundled", {}),
    "fp16 gate 50%": ("fp16-gate", {"selector": "gate", "fraction": 0.5}),
    "fp16 gate 50% + window 4": (
        "fp16-gate", {"selector": "gate", "fraction": 0.5, "window": 4}
    ),
    "fp16 gate 50%, no bundling": ("fp16-split", {"selector": "gate", "fraction": 0.5}),
    "fp16 gate 25%": ("fp16-gate", {"selector": "gate", "fraction": 0.25}),
    "fp16 gate 25% + window 4": (
        "fp16-gate",
        {"selector": "gate", "fraction": 0.25, "window": 4},
    ),
    "fp16 gate 25%, no bundling": (
        "fp16-split", {"selector": "gate", "fraction": 0.25}
    ),
}
STORES = {  # name: convert options
    "q4-bundled": {"ffn_format": "q4", "group_size": 32},
    "q4-gate": {"ffn_format": "q4", "group_size": 32, "layout": "gate"},
    "q4-split": {"ffn_format": "q4", "group_size": 32, "layout": "split"},
    "fp16-bundled": {"ffn_format": "float16"},
    "fp16-gate": {"ffn_format": "float16", "layout": "gate"},
    "fp16-split": {"ffn_format": "float16", "layout": "split"},
}


def rss_mb() -> float:
    """Resident memory now (Linux /proc; ru_maxrss elsewhere, a peak)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize() / 2**20
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker(path: str, options, tokens: int) -> dict:
    import mlx.core as mx
    import mlx_lm  # noqa: F401  (imports counted in the idle footprint)
    from mlx_lm.generate import generate_step

    import mlx_flash  # noqa: F401

    idle_mb = rss_mb()
    if options is None:
        import mlx_lm

        model, tokenizer = mlx_lm.load(path)
        model.set_dtype(mx.float32)
    else:
        import mlx_flash

        model, tokenizer = mlx_flash.load(path, progress=False, **options)
    prompt = mx.array(tokenizer.encode(PROMPT))
    times, tic, snap, peak_mb = [], time.perf_counter(), None, rss_mb()
    for i, _ in enumerate(
        generate_step(
            prompt, model, max_tokens=tokens, sampler=lambda x: mx.argmax(x, -1)
        )
    ):
        times.append(time.perf_counter() - tic)
        peak_mb = max(peak_mb, rss_mb())
        if i == 0 and options is not None:  # the prefill is done: start counting
            s, r = model.flash_stats, model.flash_store.reader.stats
            snap = (
                dict(s.seconds),
                s.tokens,
                s.selected,
                s.loaded,
                s.hits,
                r.bytes,
                r.reads,
            )
        tic = time.perf_counter()
    out = {
        "ms_per_token": 1e3 * statistics.median(times[1:]),
        "p90_ms": 1e3 * statistics.quantiles(times[1:], n=10)[-1],
        "peak_rss_mb": peak_mb,
        "idle_rss_mb": idle_mb,
    }
    if options is not None:
        s, r = model.flash_stats, model.flash_store.reader.stats
        n = s.tokens - snap[1]
        out.update(
            {
                f"{k}_ms": 1e3 * (v - snap[0][k]) / n
                for k, v in s.seconds.items()
                if k != "prefill"
            },
            mb_per_token=(r.bytes - snap[5]) / n / 1e6,
            reads_per_token=(r.reads - snap[6]) / n,
            selected_per_token=(s.selected - snap[2]) / n,
            hit_rate=(s.hits - snap[4]) / max(1, s.selected - snap[2]),
            plan_mb=model.flash_plan.total / 2**20,
            budget_mb=(model.flash_plan.budget or 0) / 2**20,
        )
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--predictors", default=None, help="A store with predictors")
    p.add_argument("--only", default=None, help="Comma-separated config names")
    p.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        path, options, tokens = args.worker
        print(json.dumps(worker(path, json.loads(options), int(tokens))))
        return

    from mlx_flash import convert
    from mlx_flash.default_model import default_model_path

    work = Path(tempfile.mkdtemp(prefix="bench_sparse-"))
    paths = {"dense": str(work / "dense")}
    for i, (name, options) in enumerate(STORES.items()):
        dense = work / "dense" if i == 0 else None
        paths[name] = str(
            convert(
                default_model_path(),
                work / name,
                dense_out=dense,
                progress=False,
                **options,
            )
        )
    if args.predictors:
        for f in ("predictors.json", "predictors.safetensors"):
            shutil.copy(Path(args.predictors) / f, paths["q4-bundled"])
    wanted = args.only.split(",") if args.only else list(CONFIGS)
    if not args.predictors:
        wanted = [w for w in wanted if "lowrank" not in w]
    runs = {name: [] for name in CONFIGS if name in wanted}
    for r in range(args.rounds):
        for name, (store, options) in CONFIGS.items():
            if name not in runs:
                continue
            cmd = [
                sys.executable,
                __file__,
                "--worker",
                paths[store],
                json.dumps(options),
                str(args.tokens),
            ]
            res = subprocess.run(cmd, capture_output=True, text=True)
            if res.returncode:
                print(f"{name} failed: {res.stderr.strip().splitlines()[-1]}", flush=True)
                runs.pop(name)
                continue
            runs[name].append(json.loads(res.stdout.strip().splitlines()[-1]))
            print(f"round {r} {name}: {runs[name][-1]}", flush=True)
    rows = []
    for name, rs in runs.items():
        row = {"config": name}
        for key in rs[0]:
            row[key] = statistics.median(x[key] for x in rs)
        rows.append(row)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "tokens": args.tokens,
        "rounds": args.rounds,
    }
    (out / "sparse.json").write_text(json.dumps({**meta, "rows": rows}, indent=1))
    table = [
        "| config | ms/token | select | io | memory | compute | MB read/token | reads/token | neurons/token | hit rate | plan MiB | RSS peak − idle MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        g = lambda k, f="{:.1f}": f.format(r[k]) if k in r else "–"  # noqa: E731
        table.append(
            f"| {r['config']} | {r['ms_per_token']:.1f} | {g('select_ms')} | {g('io_ms')} | {g('memory_ms')} | "
            f"{g('compute_ms')} | {g('mb_per_token', '{:.2f}')} | {g('reads_per_token', '{:.0f}')} | "
            f"{g('selected_per_token', '{:.0f}')} | {g('hit_rate', '{:.1%}')} | {g('plan_mb')} | "
            f"{r['peak_rss_mb'] - r['idle_rss_mb']:.0f} |"
        )
    (out / "sparse.md").write_text("\n".join(table) + "\n")
    print("\n".join(table))


if __name__ == "__main__":
    main()
