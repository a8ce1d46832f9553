"""Issue #6: mlx_flash's ablation (paper Tables 2/3), mlx-lm and llama.cpp on the same
model, the same machine and the same DRAM limit, in one command.

Every configuration runs in its own process (benchmarks/worker.py), in turn
(A B C A B C ...), inside a cgroup v1 memory limit (benchmarks/limit.py: page cache
counted, caches dropped before each run). Budgets are fractions of the GGUF file,
passed to mlx_flash as bytes. The memory limit at a budget is the same for every engine
(issue #14): the budget plus one runtime allowance (race.RUNTIME_ALLOWANCE, 200 MiB;
--allowance); each engine's idle footprint is measured first and reported, not added.
llama.cpp runs under the limit with its CPU weight repacking on and off. A short disk
probe runs before and after each round; a round where the disk moved by more than 30%
is flagged, and so is a run started on (or running on) a busy machine. Medians over
rounds; a configuration slower than 10 s/token runs one round only.

    python benchmarks/run.py [--models smollm2,qwen0.5b,qwen1.5b] [--rounds 3]
        [--tokens N] [--budgets 0.5,0.75] [--formats q4,fp16] [--predictors DIR]
        [--only "SUBSTR;SUBSTR"] [--allowance MIB] [--quick] [--out benchmarks/results]
    python benchmarks/run.py --render benchmarks/results/bench-*.json
"""

import argparse
import importlib
import importlib.util
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import limit
import race
import report
from models import MODELS, STORES, bench_cache, model_gguf, prepare

WORKER = str(Path(__file__).parent / "worker.py")
OPENBLAS = "/usr/lib/x86_64-linux-gnu/libopenblas.so.0"
SLOW_MS = 10_000  # baselines slower than this get one round
DRIFT = 0.30
LOWRANK = {"selector": "lowrank", "recall": 0.9}
# the input selector's rows: (store, calibrated sparsity), each store calibrated once
INPUT = [("columns", 0.3), ("columns", 0.4)]


def configs(formats, budget: int):
    """[(name, engine, store, options, limited)] in the order they take turns. The
    mlx_flash rows follow the paper's ablation; each adds one thing to the row above."""
    rows = [
        ("mlx-lm, model dtype, no limit", "mlx_lm", "dense", {}, False),
        ("mlx-lm fp32, no limit", "mlx_lm", "dense", {"dtype": "float32"}, False),
        ("mlx-lm fp32, limit", "mlx_lm", "dense", {"dtype": "float32"}, True),
        # llama.cpp's default repacks weights for its CPU kernels (anonymous copies)
        ("llama.cpp mmap, no limit", "llama_cpp", "gguf", {}, False),
        (f"{race.LLAMA_LIMIT} (repack on)", "llama_cpp", "gguf", {}, True),
        (
            f"{race.LLAMA_LIMIT} (repack off)",
            "llama_cpp",
            "gguf",
            {"repack": False},
            True,
        ),
    ]
    for f in formats:
        b = {"dram_budget": budget}
        rows += [
            (f"{f} naive", "flash", f"{f}-split", {**b, "naive": True}, True),
            (f"{f} hybrid", "flash", f"{f}-split", {**b, "hybrid": True}, True),
            # the same two on a planar store: no copy of the bytes read
            (f"{f} naive, planar", "flash", f"{f}-planar", {**b, "naive": True}, True),
            (
                f"{f} hybrid, planar",
                "flash",
                f"{f}-planar",
                {**b, "hybrid": True},
                True,
            ),
            (
                f"{f} hybrid, one core",
                "flash",
                f"{f}-split",
                {**b, "hybrid": True, "compute_threads": 1},
                True,
            ),
            (
                f"{f} hybrid, no read-ahead",
                "flash",
                f"{f}-split",
                {**b, "hybrid": True, "no_read_ahead": True},
                True,
            ),
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
        rows += [
            (
                f"{f} input {s:g} ({store})",
                "flash",
                f"{f}-{store}",
                {"selector": "input", "sparsity": s, **b},
                True,
            )
            for store, s in INPUT
        ]
    return rows


def selected(rows: list, only: str | None) -> list:
    """The configurations whose names contain one of `only`'s ;-separated parts."""
    return [c for c in rows if not only or any(s in c[0] for s in only.split(";"))]


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
    """One row from a configuration's runs: medians of the numbers over the rounds
    that completed, the last one's text and buffers, the rounds that ran busy."""
    ok = [r for r in runs if r.get("status") == "ok"]
    busy = [r["round"] for r in runs if r.get("busy")]
    if not ok:
        last = runs[-1]
        keep = (
            "peak_bytes",
            "limit_bytes",
            "others_cores_before",
            "others_cores_during",
            "load_1m",
        )
        return {
            "status": last["status"],
            "rounds": len(runs),
            "busy_rounds": busy,
            **{k: last[k] for k in keep if k in last},
        }
    row = {
        "status": "ok" if len(ok) == len(runs) else f"ok {len(ok)}/{len(runs)}",
        "rounds": len(ok),
        "busy_rounds": busy,
        "text": ok[-1].get("text", ""),
    }
    for key, value in ok[0].items():
        if key in ("round", "busy"):
            continue
        if isinstance(value, bool):
            row[key] = value
        elif isinstance(value, (int, float)):
            row[key] = statistics.median(r[key] for r in ok if r.get(key) is not None)
        elif isinstance(value, dict):
            row[key] = ok[-1][key]
    return row


def idle_footprints(paths: dict, env, engines: set) -> tuple[dict, dict]:
    """Per engine family in `engines` ("mlx", "llama_cpp"): the RSS of a process that
    imports the engine and loads the model's tokenizer, and that process's peak (the
    cgroup's, which also counts the page cache of every file read meanwhile,
    reclaimable). Information: the memory limit does not depend on them."""
    mlx_dir = paths.get("dense") or next(
        (p for k, p in paths.items() if k in STORES), None
    )
    idle, idle_peak = {}, {}
    for key, path in (("mlx", mlx_dir), ("llama_cpp", paths["gguf"])):
        if key not in engines or path is None:
            continue
        engine = f"idle_{key}"
        r = one_run({"engine": engine, "path": path}, None, env, 120)
        if r["status"] != "ok":
            raise SystemExit(f"{engine}: {r['status']}")
        idle[key] = int(r["idle_rss_mb"] * 2**20)
        # (macOS: no cgroup; the process's own peak)
        idle_peak[key] = r["peak_bytes"] or int(r["peak_rss_mb"] * 2**20)
        print(
            f"[bench] idle footprint {engine}: RSS {r['idle_rss_mb']:.0f} MiB "
            f"({r['imported_rss_mb']:.0f} after imports, the rest the tokenizer), "
            f"peak {idle_peak[key] / 2**20:.0f} MiB",
            flush=True,
        )
    return idle, idle_peak


def spec_for(engine, path, options, limited, budget, tokens, args) -> dict:
    spec = {
        "engine": engine,
        "path": path,
        "tokens": tokens,
        "max_seconds": args.max_seconds,
    }
    if engine == "flash":
        spec["options"] = options  # every flash row has the budget (naive too)
    else:
        spec.update(options)
    return spec


def run_budget(
    name, fraction, file_bytes, paths, first, args, env, meter, idle
) -> dict:
    """Every configuration at one budget, round-robin for `args.rounds` rounds, under
    one memory limit for every engine (mlx_flash planning all of it but its measured
    `idle` footprint)."""
    budget = race.budget_bytes(fraction, file_bytes)
    allowance = args.allowance * 2**20
    lim = race.memory_limit(budget, allowance)
    planned = race.planned_budget(lim, idle, allowance)
    tokens = args.tokens or MODELS[name][2]
    rows = selected(configs(args.formats, planned), args.only)
    if "predictors" not in paths:
        rows = [c for c in rows if c[3].get("selector") != "lowrank"]
    if first:  # rows without a limit do not depend on the budget: measured once
        rows = [c for c in rows if c[4]]
    if importlib.util.find_spec("llama_cpp") is None:
        rows = [c for c in rows if c[1] != "llama_cpp"]
    runs = {c[0]: [] for c in rows}
    probes = []
    for rnd in range(args.rounds):
        before = probe()
        for cname, engine, store, options, limited in rows:
            done = runs[cname]
            if (
                rnd
                and done
                and (
                    done[0].get("ms_per_token", 0) > SLOW_MS
                    or done[0]["status"] != "ok"
                )
            ):
                continue  # slow, killed or refused: one round tells
            spec = spec_for(
                engine, paths[store], options, limited, budget, tokens, args
            )
            started = meter.start()
            r = one_run(spec, lim if limited else None, env, args.timeout)
            r.update(meter.end(started, os.cpu_count() or 1), round=rnd)
            done.append(r)
            ms = r.get("ms_per_token")
            print(
                f"[bench] {name} budget {fraction:.2f} round {rnd} {cname}: "
                f"{r['status']}"
                + (
                    f", {ms:.1f} ms/token, disk {r['disk_mb_per_token']:.1f} MB/token"
                    if ms
                    else ""
                )
                + (
                    f" [busy: others used {fmt_cores(r['others_cores_before'])} cores "
                    f"before, {fmt_cores(r['others_cores_during'])} during]"
                    if r["busy"]
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
                "busy": any(
                    r.get("busy")
                    for rs in runs.values()
                    for r in rs
                    if r["round"] == rnd
                ),
            }
        )
    rowsum = (
        [
            dict(r, measured_with=first["fraction"])
            for r in first["rows"]
            if not r["limited"]
        ]
        if first
        else []
    )
    for cname, engine, store, options, limited in rows:
        s = summarize(runs[cname])
        s.update(
            config=cname, engine=engine, store=store, options=options, limited=limited
        )
        rowsum.append(s)
    return {
        "fraction": fraction,
        "budget_bytes": budget,
        "limit_bytes": lim,
        "flash_budget_bytes": planned,
        "probes": probes,
        "rows": rowsum,
        "runs": runs,
    }


def fmt_cores(v) -> str:
    return "–" if v is None else f"{v:.1f}"


def run_model(name, args, env) -> dict:
    gguf = model_gguf(name)
    file_bytes = gguf.stat().st_size
    fractions = (
        [float(b) for b in args.budgets.split(",")] if args.budgets else MODELS[name][1]
    )
    if args.quick and not args.budgets:
        fractions = fractions[:1]
    rows = selected(configs(args.formats, 0), args.only)
    if importlib.util.find_spec("llama_cpp") is None:
        rows = [c for c in rows if c[1] != "llama_cpp"]
    paths = prepare(name, args.formats, args.predictors, {c[2] for c in rows})
    meter = race.CpuMeter()
    engines = {"llama_cpp" if c[1] == "llama_cpp" else "mlx" for c in rows}
    idle, idle_peak = idle_footprints(paths, env, engines)
    allowance = args.allowance * 2**20
    for engine, over in race.over_allowance(idle, allowance).items():
        print(
            f"[bench] {engine}'s idle footprint exceeds the {args.allowance} MiB "
            f"runtime allowance by {over / 2**20:.0f} MiB: its weights get that much "
            "less than the budget",
            flush=True,
        )
    result = {
        "allowance_bytes": allowance,
        "busy_share": race.BUSY_SHARE,
        "cores": os.cpu_count(),
        "model": name,
        "gguf": str(gguf),
        "file_bytes": file_bytes,
        "idle_footprint_bytes": idle,
        "idle_cgroup_peak_bytes": idle_peak,
        "budgets": [],
    }
    for fraction in fractions:
        first = result["budgets"][0] if result["budgets"] else None
        result["budgets"].append(
            run_budget(
                name,
                fraction,
                file_bytes,
                paths,
                first,
                args,
                env,
                meter,
                idle.get("mlx"),
            )
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
        "--budgets",
        default=None,
        help=(
            "DRAM budgets as fractions of the source GGUF file, comma-separated "
            "(default per model: smollm2 0.75,1.25; the Qwens 0.5,0.75). Each is "
            "turned into bytes (fraction × the GGUF file's size) and passed to "
            "mlx_flash as dram_budget=BYTES: not as a fraction, which mlx_flash's own "
            "--dram-budget 0.5 reads as half of the store's size on disk"
        ),
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
        help="One round, 16 tokens (unless --tokens), q4 only, each model's first "
        "budget",
    )
    p.add_argument(
        "--label", default="", help="Said above the table (e.g. 'smoke run')"
    )
    p.add_argument(
        "--allowance",
        type=int,
        default=race.RUNTIME_ALLOWANCE // race.MiB,
        help=(
            "MiB of runtime allowance: every engine's memory limit is the budget plus "
            "this, the same for all (default %(default)s: the largest idle footprint "
            "measured, MLX with the Qwen tokenizer, 195 MiB)"
        ),
    )
    p.add_argument("--tag", default="", help="Suffix of the output files")
    p.add_argument(
        "--render",
        nargs="+",
        default=None,
        metavar="JSON",
        help="Only redraw the tables and charts of results JSONs (several: also "
        "bench-summary.md beside the first)",
    )
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args()
    tag = "-" + args.tag if args.tag else ""
    if args.render:
        paths = [Path(p) for p in args.render]
        results = [json.loads(p.read_text()) for p in paths]
        for path, result in zip(paths, results):
            report.write(result, path.with_name(path.name.removesuffix(".json")))
        if len(results) > 1:
            report.write_summary(results, paths[0].with_name(f"bench-summary{tag}.md"))
        return
    if args.quick:
        args.rounds, args.tokens, args.formats = 1, args.tokens or 16, "q4"
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
    results = []
    for name in args.models.split(","):
        result = {
            "machine": machine(args.blas),
            "label": args.label,
            "rounds": args.rounds,
            "tokens": args.tokens or MODELS[name][2],
            **run_model(name, args, env),
        }
        report.write(result, out / f"bench-{name}{tag}")
        results.append(result)
    if len(results) > 1:
        report.write_summary(results, out / f"bench-summary{tag}.md")


if __name__ == "__main__":
    main()
