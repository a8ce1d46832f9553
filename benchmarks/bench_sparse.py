"""The sparse-inference table (issue #3): SmolLM2-135M, 4-bit and fp16 bundles; naive,
`gate` selection at 50% / 25% with and without windowing and bundling; mlx-lm dense in
the same run. Each configuration runs in its own process; EOS ignored; decode only
(prefill excluded from per-token numbers); peak RSS from getrusage. The worker is
benchmarks/worker.py, shared with run.py (issue #6: the same table under a memory limit,
with mlx-lm and llama.cpp).

    python benchmarks/bench_sparse.py [--tokens 128] [--rounds 1]
        [--out benchmarks/results]
        [--predictors STORE]  # copy trained predictors (train_predictors) for `lowrank`
        [--only "NAME;NAME"]
"""

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from run import STORES  # noqa: E402  (the same six stores as the full table)

WORKER = str(Path(__file__).parent / "worker.py")
# name: (store, load options)
CONFIGS = {
    "mlx-lm dense (fp32)": ("dense", None),
    "q4 naive (all)": ("q4-bundled", {"naive": True}),
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
        "q4-gate",
        {"selector": "gate", "fraction": 0.5, "dram_budget": 0.9},
    ),
    "q4 gate 25%, budget 0.9": (
        "q4-gate",
        {"selector": "gate", "fraction": 0.25, "dram_budget": 0.9},
    ),
    "q4 gate 50%, budget 0.75": (
        "q4-gate",
        {"selector": "gate", "fraction": 0.5, "dram_budget": 0.75},
    ),
    "q4 gate 25%, budget 0.75": (
        "q4-gate",
        {"selector": "gate", "fraction": 0.25, "dram_budget": 0.75},
    ),
    "q4 lowrank recall 0.9": ("q4-bundled", {"selector": "lowrank", "recall": 0.9}),
    "q4 lowrank recall 0.9 + window 4": (
        "q4-bundled",
        {"selector": "lowrank", "recall": 0.9, "window": 4},
    ),
    "q4 lowrank recall 0.9, budget 0.75": (
        "q4-bundled",
        {"selector": "lowrank", "recall": 0.9, "dram_budget": 0.75},
    ),
    "fp16 naive (all)": ("fp16-bundled", {"naive": True}),
    "fp16 gate 50%": ("fp16-gate", {"selector": "gate", "fraction": 0.5}),
    "fp16 gate 50% + window 4": (
        "fp16-gate",
        {"selector": "gate", "fraction": 0.5, "window": 4},
    ),
    "fp16 gate 50%, no bundling": ("fp16-split", {"selector": "gate", "fraction": 0.5}),
    "fp16 gate 25%": ("fp16-gate", {"selector": "gate", "fraction": 0.25}),
    "fp16 gate 25% + window 4": (
        "fp16-gate",
        {"selector": "gate", "fraction": 0.25, "window": 4},
    ),
    "fp16 gate 25%, no bundling": (
        "fp16-split",
        {"selector": "gate", "fraction": 0.25},
    ),
}


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--predictors", default=None, help="A store with predictors")
    p.add_argument("--only", default=None, help="Config names separated by ;")
    args = p.parse_args()

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
    wanted = args.only.split(";") if args.only else list(CONFIGS)
    if not args.predictors:
        wanted = [w for w in wanted if "lowrank" not in w]
    runs = {name: [] for name in CONFIGS if name in wanted}
    for r in range(args.rounds):
        for name, (store, options) in CONFIGS.items():
            if name not in runs:
                continue
            engine = "flash" if options is not None else "mlx_lm"
            spec = {"engine": engine, "path": paths[store], "tokens": args.tokens}
            spec.update(
                {"options": options} if options is not None else {"dtype": "float32"}
            )
            cmd = [sys.executable, WORKER, json.dumps(spec)]
            res = subprocess.run(cmd, check=False, capture_output=True, text=True)
            if res.returncode:
                print(
                    f"{name} failed: {res.stderr.strip().splitlines()[-1]}", flush=True
                )
                runs.pop(name)
                continue
            runs[name].append(json.loads(res.stdout.strip().splitlines()[-1]))
            print(f"round {r} {name}: {runs[name][-1]}", flush=True)
    rows = []
    for name, rs in runs.items():
        row = {"config": name}
        for key, value in rs[0].items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
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
        "| config | ms/token | select | io | memory | compute | MB read/token "
        "| reads/token | neurons/token | hit rate | plan MiB | RSS peak − idle MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        g = lambda k, f="{:.1f}", r=r: f.format(r[k]) if k in r else "–"
        table.append(
            f"| {r['config']} | {r['ms_per_token']:.1f} | {g('select_ms')} | "
            f"{g('io_ms')} | {g('memory_ms')} | "
            f"{g('compute_ms')} | {g('store_mb_per_token', '{:.2f}')} | "
            f"{g('reads_per_token', '{:.0f}')} | "
            f"{g('selected_per_token', '{:.0f}')} | {g('hit_rate', '{:.1%}')} | "
            f"{g('plan_mb')} | "
            f"{r['peak_rss_mb'] - r['idle_rss_mb']:.0f} |"
        )
    (out / "sparse.md").write_text("\n".join(table) + "\n")
    print("\n".join(table))


if __name__ == "__main__":
    main()
