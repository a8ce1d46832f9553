"""The foundation benchmark: mlx_flash's naive path (every neuron read every token)
against mlx-lm holding the same model in DRAM, on SmolLM2-135M.

Each configuration runs in its own process, in turn (A B C A B C ...), several rounds;
medians are reported. EOS is ignored (generate_step runs to max tokens).

    python benchmarks/bench_naive.py [--rounds 3] [--tokens 64]
        [--out benchmarks/results]
"""

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CONFIGS = {
    # name: (engine, convert options)
    "mlx-lm dense (fp32)": ("mlx_lm", None),  # engine, mlx_flash.convert options
    "flash naive, q4 rows + q8 down (auto)": ("flash", {}),
    "flash naive, q4 all": ("flash", {"ffn_format": "q4", "group_size": 32}),
    "flash naive, fp16": ("flash", {"ffn_format": "float16"}),
}
WORKER = str(Path(__file__).parent / "worker.py")  # shared with run.py (issue #6)


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args()

    from mlx_flash import convert
    from mlx_flash.default_model import default_model_path

    gguf = default_model_path()
    work = Path(tempfile.mkdtemp(prefix="bench_naive-"))
    paths, conversions = {}, {}
    for name, (engine, options) in CONFIGS.items():
        if engine == "mlx_lm":
            continue
        tic = time.perf_counter()
        dense = work / "dense" if not paths else None
        store = convert(
            gguf,
            work / f"store{len(paths)}",
            dense_out=dense,
            progress=False,
            **options,
        )
        conversions[name] = {
            "seconds": time.perf_counter() - tic,
            "store_mb": sum(f.stat().st_size for f in store.iterdir()) / 1e6,
            "bundles_mb": (store / "ffn.bundles").stat().st_size / 1e6,
        }
        paths[name] = str(store)
    paths["mlx-lm dense (fp32)"] = str(work / "dense")

    runs = {name: [] for name in CONFIGS}
    for r in range(args.rounds):
        for name, (engine, _) in CONFIGS.items():
            spec = {"engine": engine, "path": paths[name], "tokens": args.tokens}
            # the paper's baseline, not the default
            flash = {"options": {"naive": True}}
            spec.update(flash if engine == "flash" else {"dtype": "float32"})
            cmd = [sys.executable, WORKER, json.dumps(spec)]
            res = subprocess.run(cmd, capture_output=True, text=True, check=True)
            runs[name].append(json.loads(res.stdout.strip().splitlines()[-1]))
            print(
                f"round {r} {name}: {runs[name][-1]['ms_per_token']:.1f} ms/token",
                flush=True,
            )

    rows = []
    base = statistics.median(x["ms_per_token"] for x in runs["mlx-lm dense (fp32)"])
    for name, rs in runs.items():

        def med(k, rs=rs):
            return statistics.median(x[k] for x in rs) if k in rs[0] else None

        ms = med("ms_per_token")
        rows.append(
            {
                "config": name,
                "ms_per_token": ms,
                "tokens_per_s": 1e3 / ms,
                "vs_mlx_lm": base / ms,
                "mb_read_per_token": med("store_mb_per_token") or 0,
                "read_ms_per_token": med("io_ms") or 0,
                "load_s": med("load_s"),
                "first_token_s": med("first_token_s"),
                **{f"convert_{k}": v for k, v in conversions.get(name, {}).items()},
            }
        )
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": platform.platform(),
        "processor": platform.processor(),
        "rounds": args.rounds,
        "tokens": args.tokens,
        "model": str(gguf),
        "rows": rows,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "naive.json").write_text(json.dumps(result, indent=1))
    table = [
        "| config | ms/token | tok/s | × mlx-lm | MB read/token | read ms/token "
        "| convert s | store MB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        table.append(
            f"| {r['config']} | {r['ms_per_token']:.1f} | {r['tokens_per_s']:.1f} | "
            f"{r['vs_mlx_lm']:.2f} | {r['mb_read_per_token']:.1f} | "
            f"{r['read_ms_per_token']:.1f} | "
            f"{r.get('convert_seconds', 0):.1f} | {r.get('convert_store_mb', 0):.0f} |"
        )
    (out / "naive.md").write_text("\n".join(table) + "\n")
    print("\n".join(table))


if __name__ == "__main__":
    main()
