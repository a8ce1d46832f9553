"""The benchmark's results as markdown and a chart (benchmarks/run.py writes them, or
redraws them from a results JSON with --render).

Per model, `bench-<model>.md` opens with a summary (one column per budget, llama.cpp
under a limit as the better of its repack on/off rows) and then gives every row of every
budget in detail; `bench-summary.md` puts several models side by side; `bench-<model>.
png` needs matplotlib (the `bench` extra) and is skipped with a note without it.
"""

import itertools
import json
import math
import statistics
from pathlib import Path

import race

MiB = race.MiB


def fmt(v, f="{:.1f}"):
    return "–" if v is None else f.format(v)


def status_word(status: str) -> str:
    """A row's status in one word: ok, refused (the DRAM plan does not fit the
    budget), OOM-killed, timeout or failed."""
    if status.startswith("ok"):
        return "ok"
    if status.startswith("failed") and ("too small" in status or "more than" in status):
        return "refused"
    return status.split(" (")[0].split(":")[0]


def busy_mark(row: dict) -> str:
    """'' or ' †' where a round of this row ran on a busy machine."""
    return " †" if row.get("busy_rounds") else ""


def others_text(row: dict) -> str:
    """Others' cores before / during the row's runs (medians), busy rounds named."""
    before, during = row.get("others_cores_before"), row.get("others_cores_during")
    if before is None and during is None:
        return "–"
    text = f"{fmt(before)} / {fmt(during)}"
    rounds = row.get("busy_rounds")
    return text + (f" **busy** (round {', '.join(map(str, rounds))})" if rounds else "")


def cell(row: dict | None) -> str:
    """A summary cell: ms per token (disk MB per token), or why there is none."""
    if row is None:
        return "–"
    word = status_word(row["status"])
    if word != "ok":
        return word
    text = f"{row['ms_per_token']:.0f} ({row.get('disk_mb_per_token', 0):.0f})"
    return text + busy_mark(row)


def new_rules(result: dict) -> bool:
    """Whether `result` was measured under one limit for every engine (issue #14);
    earlier results gave each engine the budget plus its own idle footprint."""
    return "allowance_bytes" in result


def limits_words(result: dict, b: dict) -> str:
    """The memory limit(s) of one budget, as its table header says them."""
    if new_rules(result):
        return race.limit_words(b["budget_bytes"], result["allowance_bytes"])
    extra = result.get("headroom_bytes", 0)
    limits = ", ".join(
        f"{k} {(b['budget_bytes'] + v + extra) / MiB:.0f} MiB"
        for k, v in result["idle_footprint_bytes"].items()
    )
    what = "budget + each engine's own idle footprint" + (
        f" + {extra / MiB:.0f} MiB headroom" if extra else ""
    )
    return f"memory limits ({what}; before issue #14): {limits}"


def budget_short(result: dict, b: dict) -> str:
    """One budget of a summary's header: its share, bytes and memory limit(s)."""
    text = f"{b['fraction']:.0%} = {b['budget_bytes'] / MiB:.0f} MiB"
    if new_rules(result):
        allowance = result["allowance_bytes"]
        limit = race.memory_limit(b["budget_bytes"], allowance)
        planned = b.get("flash_budget_bytes")
        flash = "" if planned is None else f"; mlx_flash plans {planned / MiB:.0f} MiB"
        return (
            f"{text}, limit {limit / MiB:.0f} MiB for every engine (+ "
            f"{allowance / MiB:.0f} MiB allowance){flash}"
        )
    extra = result.get("headroom_bytes", 0)
    limits = " / ".join(
        f"{k} {(b['budget_bytes'] + v + extra) / MiB:.0f}"
        for k, v in result["idle_footprint_bytes"].items()
    )
    return f"{text}, limits {limits} MiB (each engine's own idle footprint added)"


def summary_rows(rows: list[dict]) -> list[tuple[str, dict]]:
    """(name, row) in table order, llama.cpp's limited rows merged into the one that
    stands for it (`race.better_llama`), named by its repack setting."""
    best = race.better_llama(rows)
    out = []
    for r in rows:
        if race.llama_limited(r["config"]) is None:
            out.append((r["config"], r))
        elif r is best:
            out.append((race.LLAMA_LIMIT, r))
    return out


def summary(results: list[dict]) -> str:
    """One table of every model and budget: rows are configurations, cells
    `ms/token (disk MB/token)`; llama.cpp under a limit is the better of repack
    on/off, labelled."""
    columns = [(res, b) for res in results for b in res["budgets"]]
    names, cells, repacks = [], {}, {}
    for i, (res, b) in enumerate(columns):
        for name, row in summary_rows(b["rows"]):
            if name not in names:
                names.append(name)
            cells[name, i] = row
            if name == race.LLAMA_LIMIT and row["status"].startswith("ok"):
                repacks[i] = race.llama_limited(row["config"])
    chosen = set(repacks.values())  # one setting in every column: name it once
    one = chosen.pop() if len(chosen) == 1 else None
    head = ["config"] + [f"{res['model']} {b['fraction']:.0%}" for res, b in columns]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for name in names:
        label = name
        if name == race.LLAMA_LIMIT:
            label += (
                f" ({race.REPACK[one]})"
                if one is not None
                else " (the better of repack on/off)"
            )
        row = [label]
        for i in range(len(columns)):
            text = cell(cells.get((name, i)))
            if name == race.LLAMA_LIMIT and one is None and i in repacks:
                text += f" [{race.REPACK[repacks[i]].split()[1]}]"
            row.append(text)
        lines.append("| " + " | ".join(row) + " |")
    words = [
        f"- {res['model']}, {res['file_bytes'] / 1e6:.0f} MB GGUF file: "
        + "; ".join(budget_short(res, b) for b in res["budgets"])
        for res in results
    ]
    return (
        "Cells: ms per token (MB read from the disk per token); refused: the DRAM "
        "plan does not fit the budget; † a round ran on a busy machine (see each "
        "model's table). Budgets: fractions of the GGUF file, passed to mlx_flash as "
        "bytes (mlx_flash's `--dram-budget 0.5` means half of the store instead; "
        "since 2026-12-08 mlx_flash gets the limit less its measured idle "
        "footprint, stated per budget). "
        "llama.cpp under a limit: the faster of its repack on/off rows that completed "
        "(both are in each model's table).\n\n"
        + "\n".join(words)
        + "\n\n"
        + "\n".join(lines)
        + "\n"
    )


def header(result: dict) -> str:
    """What was measured, on what, and under which rules."""
    m = result["machine"]
    label = " — " + result["label"] if result["label"] else ""
    idle = ", ".join(
        f"{k} {v / MiB:.0f} MiB" for k, v in result["idle_footprint_bytes"].items()
    )
    head = (
        f"### {result['model']}{label}\n\n"
        f"{m['date']}; {m['cpu']}, {m['cpus']} CPUs, {m['memory_gib']:.0f} GiB, "
        f"{m['platform']}; MLX {m['mlx']} ({m['mlx_backend']}), BLAS: {m['blas']}; "
        f"llama-cpp-python {m['llama_cpp_python']}; {result['rounds']} round(s) × "
        f"{result['tokens']} tokens, greedy, EOS ignored, medians. Budgets are "
        "fractions of the GGUF file, passed to mlx_flash as bytes (mlx_flash's "
        "`--dram-budget 0.5` would mean half of the store's size on disk)"
        + (
            ": the limit less mlx_flash's idle footprint measured in this run (it "
            "plans its own memory; llama.cpp's page cache takes what is free). "
            if any("flash_budget_bytes" in b for b in result["budgets"])
            else ". "
        )
    )
    if not new_rules(result):
        return head + (
            f"Idle footprints {idle} (RSS of a process that imports the engine and "
            "loads the model's tokenizer); each engine's memory limit was the budget "
            "plus its own (the rule before issue #14).\n"
        )
    allowance = result["allowance_bytes"]
    over = race.over_allowance(result["idle_footprint_bytes"], allowance)
    cores = result.get("cores") or m["cpus"]
    share = result.get("busy_share", race.BUSY_SHARE)
    return head + (
        f"**Every engine's memory limit = budget + {allowance / MiB:.0f} MiB runtime "
        "allowance** (the same for all). Idle footprints, information only: "
        f"{idle} (RSS of a process that imports the engine and loads the model's "
        "tokenizer)"
        + "".join(
            f"; **{k}'s exceeds the allowance by {v / MiB:.0f} MiB: its weights get "
            "that much less than the budget**"
            for k, v in over.items()
        )
        + f". A run is **busy** when processes other than the benchmark used more "
        f"than {share} × {cores} cores = {race.busy_threshold(cores, share):.1f} "
        "cores (/proc/stat's busy time less the benchmark's own CPU time) in the "
        "minute before it started or while it ran; the 1-minute load average at each "
        "start is recorded beside it (it counts the benchmark's own threads, I/O "
        "waits included).\n"
    )


def table(result: dict) -> str:
    """Every row of every budget, all columns."""
    lines = []
    for b in result["budgets"]:
        planned = b.get("flash_budget_bytes")  # (results before 2026-12-08: none)
        budget = race.budget_words(b["fraction"], result["file_bytes"], planned)
        lines += [
            (f"\n#### {result['model']}, {budget}; {limits_words(result, b)}\n"),
            (
                "| config | status | ms/token | p90 | × naive | × mlx-lm fp32 | select "
                "| io | memory | compute | disk MB/token | store MB/token "
                "| plan MB/token | read GB/s "
                "| hit rate | cgroup peak MiB | load s | first token s "
                "| others' cores before / during |"
            ),
            "|---" * 19 + "|",
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
                status = status_word(status)
            peak = r["peak_bytes"] / MiB if "peak_bytes" in r else None
            lines.append(
                f"| {r['config']} | {status} | {fmt(ms)} | {fmt(r.get('p90_ms'))} | "
                f"{fmt(base / ms if base and ms else None, '{:.2f}')} | "
                f"{fmt(floor / ms if floor and ms else None, '{:.2f}')} | "
                f"{fmt(r.get('select_ms'))} | {fmt(io)} | "
                f"{fmt(r.get('memory_ms'))} | {fmt(r.get('compute_ms'))} | "
                f"{fmt(r.get('disk_mb_per_token'), '{:.2f}')} | "
                f"{fmt(r.get('store_mb_per_token'), '{:.2f}')} | "
                f"{fmt(r.get('expected_mb_per_token'), '{:.2f}')} | "
                f"{fmt(r['store_mb_per_token'] / io if io else None, '{:.2f}')} | "
                f"{fmt(r.get('hit_rate'), '{:.0%}')} | {fmt(peak, '{:.0f}')} | "
                f"{fmt(r.get('load_s'), '{:.2f}')} | "
                f"{fmt(r.get('first_token_s'), '{:.2f}')} | {others_text(r)} |"
            )
        lines += llama_notes(b["rows"])
        plans = [r for r in b["rows"] if isinstance(r.get("plan"), dict)]
        if plans:
            lines += ["", "mlx_flash's plans, as printed at load:"]
            lines += [f"- {r['config']}: {r['plan']['describe']}" for r in plans]
        if notes:
            lines += ["", *notes]
        lines += probe_notes(b["probes"])
        lines += targets(b["rows"], b["probes"])
    return "\n".join(lines) + "\n"


def llama_notes(rows: list[dict]) -> list[str]:
    """What llama.cpp loaded, per row: its buffers by type and the anonymous RSS
    after load (repacking copies weights into anonymous memory)."""
    out = []
    for r in rows:
        buffers = r.get("buffers_mib")
        if r["engine"] != "llama_cpp" or not buffers:
            continue
        listed = ", ".join(f"{k} {v:.0f}" for k, v in buffers.items())
        out.append(
            f"- {r['config']}: repacking {'on' if r.get('repack') else 'off'} (read "
            f"back from the loaded model); buffers (MiB) {listed}; RSS after load "
            f"{fmt(r.get('loaded_rss_mb'), '{:.0f}')} MiB, of it anonymous "
            f"{fmt(r.get('rssanon_mb'), '{:.0f}')}"
        )
    return ["", "llama.cpp, from its load log:", *out] if out else []


def probe_notes(probes: list) -> list[str]:
    flagged = [p["round"] for p in probes if p["drifted"]]
    busy = [p["round"] for p in probes if p.get("busy")]
    text = "; ".join(
        f"round {p['round']}: 64 KiB×16 {fmt(p['before']['gbps_64k'], '{:.2f}')}→"
        f"{fmt(p['after']['gbps_64k'], '{:.2f}')} GB/s, 4 KiB×16 "
        f"{fmt(p['before']['gbps_4k'], '{:.3f}')}→"
        f"{fmt(p['after']['gbps_4k'], '{:.3f}')} GB/s, load average "
        f"{p['before']['load']:.1f}→{p['after']['load']:.1f}"
        for p in probes
    )
    return [
        f"\nDisk probe before→after each round: {text}."
        + (f" **Disk speed moved >30% in round(s) {flagged}.**" if flagged else "")
        + (f" **Busy machine in round(s) {busy}.**" if busy else "")
    ]


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
            for (c0, g0), (c1, g1) in itertools.pairwise(curve):
                if math.log(c0) <= x <= math.log(c1):
                    t = (x - math.log(c0)) / (math.log(c1) - math.log(c0))
                    values.append(g0 + t * (g1 - g0))
                    break
    return statistics.median(values) if values else None


def targets(rows: list[dict], probes: list) -> list:
    """Where the full method stands against the issue's targets (4-bit rows)."""
    ok = {r["config"]: r for r in rows if r["status"].startswith("ok")}
    full = ok.get("q4 +bundling") or ok.get("q4 gate 50% + window + bundling")
    if not full:
        return ["", "Targets: no full-method row ran (q4 +bundling or gate)."]
    ms = full["ms_per_token"]
    out = ["", f"Targets, full method = {full['config']} ({ms:.1f} ms/token):"]
    llama = race.better_llama(rows)
    if llama is not None and not llama["status"].startswith("ok"):
        llama = None

    def line(what, r, name, ratio, goal):
        if r is None:
            out.append(f"- {what}: {name} did not run or failed")
            return
        out.append(f"- {what}: {ratio(r):.2f} (target {goal})")

    line(
        "× faster than naive",
        ok.get("q4 naive"),
        "q4 naive",
        lambda r: r["ms_per_token"] / ms,
        "≥ 5",
    )
    line(
        "speed vs mlx-lm fp32 whole model in DRAM",
        ok.get("mlx-lm fp32, no limit"),
        "mlx-lm fp32, no limit",
        lambda r: r["ms_per_token"] / ms,
        "≥ 0.8",
    )
    against = llama["config"] if llama else race.LLAMA_LIMIT
    line(
        f"× faster than {against} (the better of repack on/off)",
        llama,
        race.LLAMA_LIMIT,
        lambda r: r["ms_per_token"] / ms,
        "> 1",
    )
    line(
        f"× fewer disk bytes per token than {against}",
        llama,
        race.LLAMA_LIMIT,
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
            + ("" if r["status"] == "ok" else f" [{status_word(r['status'])}]")
            + busy_mark(r)
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
        ax_ms.set_title(
            f"{result['model']}, budget {b['fraction']:.0%} of the GGUF file"
        )
        ax_mb.barh(names, [r.get("disk_mb_per_token", 0) for r in rows], color=colors)
        ax_mb.set_xlim(left=0)
        ax_mb.set_xlabel("MB read from the disk per token")
        ax_mb.set_yticklabels([])
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def mend(result: dict) -> dict:
    """Results files from before error_of kept a traceback line in a status."""
    for b in result["budgets"]:
        for row in b["rows"]:
            if (
                row["status"].startswith("failed: raise ")
                and "Error: " in row["status"]
            ):
                kind, why = row["status"].split("Error: ", 1)
                row["status"] = f"failed: {kind.split('.')[-1]}Error: {why}"
    return result


def write(result: dict, stem: Path) -> None:
    """The results JSON, the markdown tables, then the PNG chart, next to each other;
    without matplotlib the chart is skipped with a one-line note."""
    mend(result)
    Path(f"{stem}.json").write_text(json.dumps(result, indent=1))
    text = header(result) + "\n" + summary([result]) + table(result)
    Path(f"{stem}.md").write_text(text)
    print(text, flush=True)
    try:
        chart(result, Path(f"{stem}.png"))
    except ImportError:
        print(
            f"[bench] no {stem.name}.png: matplotlib is not installed "
            "(pip install -e '.[bench]')",
            flush=True,
        )


def write_summary(results: list[dict], path: Path) -> None:
    """Several models' summaries side by side in one markdown file."""
    text = "### Summary: " + ", ".join(r["model"] for r in results) + "\n\n"
    text += summary([mend(r) for r in results])
    path.write_text(text)
    print(text, flush=True)
