"""Issue #15's frontier: perplexity against FFN bytes touched and read, per method.

For one model's store (converted with ``--layout columns`` and calibrated with
``python -m mlx_flash.calibrate``), every method runs over the same held-out text
layer by layer (`mlx_flash.evaluate`'s lanes): dense, the output oracle (top share by
|act(gate)·up|, gate/up read whole), TEAL-like uniform input sparsity (per token), and
the runtime `input` selector at each calibrated sparsity (its thresholds, gate/up from
the stored columns). For the `input` rows the bytes *read* per token are those of a
trace-driven replay of the caches the DRAM planner gives at the budget
(`cache_simulator.Replay`, the runtime's own admission and reads); the reference rows
(oracle, uniform) are not runtime methods: their bytes read are their bytes touched
(no cache). Then real decoding at two sparsities, under the same plan, over the first
tokens of the same text, checks the replay (the issue asks for agreement within 10%),
and gives the selector's ms per token and the decode speed.

    python benchmarks/frontier.py --model qwen0.5b [--store q4-columns] [--budget 0.5]
        [--tokens 2048] [--skip 200000] [--sparsity 0.2,0.25,0.3,0.35,0.4,0.5]
        [--check 0.25,0.4] [--code] [--out benchmarks/results]

Writes frontier-<model>.json, .md and .png (perplexity vs MB read per token; the
oracle as the ceiling, naive — the whole FFN every token, dense quality — as the floor).
"""

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from models import bench_cache, model_gguf  # noqa: E402

from mlx_flash import load  # noqa: E402
from mlx_flash.cache_simulator import input_replays, neuron_replays  # noqa: E402
from mlx_flash.errors import FlashError  # noqa: E402
from mlx_flash.evaluate import (  # noqa: E402
    _hook,
    calibrated_config,
    configurations,
    predicted_config,
    shadow_config,
)
from mlx_flash.input_sparse import load_calibration  # noqa: E402
from mlx_flash.layerwise import (  # noqa: E402
    Lane,
    for_many_tokens,
    run_layers,
    text_tokens,
    token_nll,
)
from mlx_flash.predictor import (  # noqa: E402
    PREDICTOR_BITS,
    load_predictors,
    targets_for,
)
from mlx_flash.selectors import Shadow  # noqa: E402
from mlx_flash.sparse_ffn import ACTIVATIONS  # noqa: E402

WIKITEXT = (
    Path(__file__).resolve().parents[2] / "shared/data/corpora/wikitext2-test.txt"
)


def code_text(out: Path) -> Path:
    """The Python sources of the installed mlx-lm (pinned by pyproject), as one text:
    a code text fixed once for the coder models."""
    import mlx_lm

    root = Path(mlx_lm.__file__).parent
    files = sorted(root.rglob("*.py"))
    path = out / f"mlx-lm-{mlx_lm.__version__}-sources.txt"
    if not path.exists():
        path.write_text("".join(f.read_text() for f in files))
    return path


def planned(store_path: Path, budget: int, **options):
    """A runtime selector's plan at `budget`: its per-layer `Replay`s (for `input`
    a (channels, neurons) pair) and cache bytes, or the refusal's message when the
    budget cannot hold it."""
    try:
        model, _ = load(str(store_path), dram_budget=budget, **options)
    except FlashError as e:
        return None, str(e).splitlines()[0]
    replays = (input_replays if options["selector"] == "input" else neuron_replays)(
        model
    )
    caches = model.flash_plan.caches
    del model
    return replays, caches


def lanes_for(args, model, m, budget, with_replay: bool):
    activation = ACTIVATIONS[m.activation]
    configs = configurations(
        activation,
        True,
        args.fractions,
        [],
        None,
        m.rows,
        [],
        args.uniform,
    )
    configs = [c for c in configs if not c.name.startswith("gate")]
    replayed, path = {}, model.flash_store.path

    def add(make, **options):  # a runtime selector, replayed at its own plan
        replays, caches = (None, 0)
        if with_replay:  # caches: the plan's bytes, or why it was refused
            replays, caches = planned(path, budget, **options)
        config = make(replays)
        configs.append(config)
        if with_replay:
            replayed[config.name] = (config.mask, caches)

    for s in args.sparsity:
        calibration = load_calibration(path, s, len(m.layers))
        add(
            lambda rp, n=f"input {s:g}", c=calibration: calibrated_config(
                n, activation, model.flash_store, c, rp
            ),
            selector="input",
            sparsity=s,
        )

    ps = None
    if args.lowrank or args.recalls:
        neurons = [layer.neurons for layer in m.layers]
        ps = load_predictors(path, m.hidden_size, neurons, bits=PREDICTOR_BITS)
    for r in args.recalls:
        cuts = [ps.threshold(i, r) for i in range(len(m.layers))]
        name = f"lowrank recall {r:g}"
        add(
            lambda rp, n=name, c=cuts: predicted_config(n, ps, c, rp),
            selector="lowrank",
            recall=r,
        )
    for s in args.lowrank:
        cuts = ps.allocated(s)
        add(
            lambda rp, n=f"lowrank {s:g}", c=cuts: predicted_config(n, ps, c, rp),
            selector="lowrank",
            sparsity=s,
        )
        for d in args.combined:  # not a runtime method yet: touched = read
            name = f"lowrank {s:g} + down top {d:g}"
            configs.append(predicted_config(name, ps, cuts, down=d))
    for bits in args.shadow:
        shadow = Shadow(activation, bits)
        for f in args.shadow_fractions:
            name = f"shadow {bits}-bit top {f:g}"
            add(
                lambda rp, n=name, sh=shadow, f=f: shadow_config(n, sh, m.rows, f, rp),
                selector="shadow",
                shadow_bits=bits,
                fraction=f,
            )
    return configs, replayed


def perplexities(args, model, tokenizer, text: Path, budget: int, with_replay: bool):
    m = model.flash_store.manifest
    tokens = text_tokens(
        tokenizer, text.read_text(), args.tokens, args.seq_len, args.skip
    )
    configs, replayed = lanes_for(args, model, m, budget, with_replay)
    targets = targets_for({"kind": "relu"})
    for c in configs:
        c.lane = Lane(_hook(c, targets))
    run_layers(model, tokens, [c.lane for c in configs])
    for c in configs:
        nll = [
            token_nll(model, tokens[s : s + 8], c.lane.h[s : s + 8])
            for s in range(0, tokens.shape[0], 8)
        ]
        c.nll = mx.concatenate(nll).mean().item()
    return configs, replayed, tokens


def decode_check(store_path, sparsity, budget, tokens, first, count):
    """Real decoding of the text's first tokens (teacher-forced, one at a time)
    under the plan: MB read and ms per token over tokens [first, first + count)."""
    model, _ = load(
        str(store_path), selector="input", sparsity=sparsity, dram_budget=budget
    )
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    ids = np.array(tokens[0]).tolist()[: first + count]
    stats, ffn = model.flash_stats, model.flash_store.reader.stats
    for k, t in enumerate(ids):
        if k == first:
            stats.reset()
            ffn_before, tic = ffn.bytes, time.perf_counter()
        mx.eval(model(mx.array([[t]]), cache=cache))
    seconds = time.perf_counter() - tic
    n = max(stats.tokens, 1)
    return {
        "sparsity": sparsity,
        "tokens": stats.tokens,
        # the FFN's reads (the store's reader; the replay's), and everything read
        # (with the attention and LM head the plan streams)
        "mb_per_token": (ffn.bytes - ffn_before) / n / 1e6,
        "all_mb_per_token": stats.bytes / n / 1e6,
        "ms_per_token": 1e3 * seconds / n,
        "select_ms_per_token": 1e3 * stats.seconds["select"] / n,
        "channel_hit_rate": stats.channel_hits / max(stats.channels, 1),
        "neuron_hit_rate": stats.hits / max(stats.selected, 1),
        "plan": model.flash_plan.describe(),
    }


def main():
    from mlx_flash.blas import prefer_fast_blas

    prefer_fast_blas()  # whole texts through the model: ~40x faster with OpenBLAS
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--store", default="q4-columns")
    parser.add_argument("--budget", type=float, default=0.5, help="of the GGUF file")
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--skip", type=int, default=200000)
    floats = lambda t: [float(v) for v in t.split(",") if v]  # noqa: E731
    parser.add_argument(
        "--sparsity", type=floats, default=[0.2, 0.25, 0.3, 0.35, 0.4, 0.5]
    )
    parser.add_argument("--fractions", type=floats, default=[0.5, 0.6, 0.7])
    parser.add_argument("--uniform", type=floats, default=[0.2, 0.25])
    parser.add_argument(
        "--lowrank",
        type=floats,
        default=[],
        help="lowrank --sparsity lanes (each layer's recall allocated; the store's "
        "predictors)",
    )
    parser.add_argument("--recalls", type=floats, default=[], help="lowrank --recall")
    parser.add_argument(
        "--combined",
        type=floats,
        default=[],
        help="per --lowrank share, the predicted neurons' exact |a| keeps this top "
        "share of the layer for down (touched = read: no runtime yet)",
    )
    ints = lambda t: [int(v) for v in t.split(",") if v]  # noqa: E731
    parser.add_argument("--shadow", type=ints, default=[], help="shadow bits")
    parser.add_argument("--shadow-fractions", type=floats, default=[0.5, 0.6])
    parser.add_argument("--check", type=floats, default=[0.25, 0.4])
    parser.add_argument("--check-tokens", type=int, default=48)
    parser.add_argument("--code", action="store_true", help="Also a code text")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    parser.add_argument(
        "--recheck", default=None, help="A frontier JSON: only decoding's checks again"
    )
    parser.add_argument(
        "--into",
        default=None,
        help="A frontier JSON of the same model, store, text and budget: this run's "
        "rows are added to it (a method's row replaced), then it is saved again",
    )
    args = parser.parse_args()
    if args.recheck:
        return recheck(Path(args.recheck), args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    store_path = bench_cache() / args.model / args.store
    budget = int(args.budget * model_gguf(args.model).stat().st_size)
    load_avg = os.getloadavg()
    model, tokenizer = load(str(store_path), progress=False)
    for_many_tokens(model)
    m = model.flash_store.manifest
    naive_mb = sum(layer.whole_read() for layer in m.layers) / 1e6
    texts = {"wikitext": WIKITEXT}
    if args.code:
        texts["code"] = code_text(out)
    rows, checks = {}, []
    for name, text in texts.items():
        configs, replayed, tokens = perplexities(
            args, model, tokenizer, text, budget, name == "wikitext"
        )
        dense = math.exp(configs[0].nll)
        for c in configs:
            used = c.per_layer(0, 1)
            touched = c.touched(float(np.mean(used)) if used else 1.0)
            row = rows.setdefault(c.name, {"method": c.name})
            row[f"ppl_{name}"] = math.exp(c.nll)
            row[f"delta_{name}"] = math.exp(c.nll) / dense - 1
            if name == "wikitext":
                row["touched"] = touched
                row["mb_touched"] = touched * naive_mb
                row["mb_read"] = touched * naive_mb
                if c.name in replayed:
                    select, caches = replayed[c.name]
                    if isinstance(caches, str):  # the budget cannot hold it
                        row["refused"] = caches
                    else:
                        row["mb_read"] = float(np.mean(select.reads.read)) / 1e6
                        row["caches_mib"] = caches / 2**20
                        row["read_by_token"] = select.reads.read
        if name == "wikitext":
            first = 16
            for s in args.check:
                check = decode_check(
                    store_path, s, budget, tokens, first, args.check_tokens
                )
                read = rows[f"input {s:g}"]["read_by_token"][
                    first : first + check["tokens"]
                ]
                check["simulated_mb_per_token"] = float(np.mean(read)) / 1e6
                check["ratio"] = check["mb_per_token"] / check["simulated_mb_per_token"]
                checks.append(check)
    for row in rows.values():
        row.pop("read_by_token", None)
    result = {
        "model": args.model,
        "store": str(store_path),
        "budget_bytes": budget,
        "budget_fraction": args.budget,
        "naive_mb": naive_mb,
        "tokens": args.tokens,
        "skip": args.skip,
        "load_average": load_avg,
        "rows": list(rows.values()),
        "decode_checks": checks,
    }
    save(merged(Path(args.into), result) if args.into else result, out)


def merged(path: Path, new: dict) -> dict:
    """The frontier at `path` with `new`'s rows added (its own dense row kept) and
    its decode checks appended; refused unless both measured the same thing."""
    old = json.loads(path.read_text())
    same = ("model", "store", "budget_bytes", "tokens", "skip")
    differ = [k for k in same if old[k] != new[k]]
    dense = [
        next((r["ppl_wikitext"] for r in f["rows"] if r["method"] == "dense"), None)
        for f in (old, new)
    ]
    if None not in dense and abs(dense[0] / dense[1] - 1) > 1e-4:
        differ.append(f"the dense perplexity ({dense[0]:.4f} vs {dense[1]:.4f})")
    if differ:
        raise SystemExit(f"{path}: {', '.join(differ)} differ from this run's")
    rows = {r["method"]: r for r in old["rows"]}
    rows.update({r["method"]: r for r in new["rows"] if r["method"] != "dense"})
    added = [r["method"] for r in new["rows"] if r["method"] != "dense"]
    runs = old.get("added", []) + [
        {"methods": added, "load_average": new["load_average"]}
    ]
    checks = old["decode_checks"] + new["decode_checks"]
    return {**old, "rows": list(rows.values()), "decode_checks": checks, "added": runs}


def save(result, out: Path) -> None:
    stem = f"frontier-{result['model']}"
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1))
    (out / f"{stem}.md").write_text(render(result))
    print(render(result))
    plot(result, out / f"{stem}.png")


def recheck(path: Path, args) -> None:
    """Decoding's checks again, against the replay's figures a run saved."""
    result = json.loads(path.read_text())
    store_path, budget = Path(result["store"]), result["budget_bytes"]
    model, tokenizer = load(str(store_path), progress=False)
    tokens = text_tokens(
        tokenizer, WIKITEXT.read_text(), result["tokens"], args.seq_len, result["skip"]
    )
    del model
    checks = []
    for old in result["decode_checks"]:
        check = decode_check(
            store_path, old["sparsity"], budget, tokens, 16, old["tokens"]
        )
        check["simulated_mb_per_token"] = old["simulated_mb_per_token"]
        check["ratio"] = check["mb_per_token"] / check["simulated_mb_per_token"]
        checks.append(check)
    result["decode_checks"] = checks
    result["recheck_load_average"] = os.getloadavg()
    save(result, path.parent)


def render(r) -> str:
    code = any("ppl_code" in row for row in r["rows"])
    head = "| method | ppl WikiText-2 | vs dense |" + (
        " ppl code | vs dense |" if code else ""
    )
    head += " FFN touched | MB touched/token | MB read/token at the plan |"
    lines = [
        f"Frontier of {r['model']} ({Path(r['store']).name}; {r['tokens']} held-out "
        f"tokens after {r['skip']}; budget {r['budget_fraction']:g} of the GGUF file = "
        f"{r['budget_bytes'] / 2**20:.0f} MiB; naive reads {r['naive_mb']:.1f} "
        "MB/token; "
        f"load average {r['load_average'][0]:.1f}"
        + "".join(
            f"; added later: {', '.join(a['methods'])} at load average "
            f"{a['load_average'][0]:.1f}"
            for a in r.get("added", [])
        )
        + "):",
        "",
        head,
        "|" + "---|" * (head.count("|") - 1),
    ]
    for row in r["rows"]:
        cells = [
            row["method"],
            f"{row['ppl_wikitext']:.2f}",
            f"{row['delta_wikitext']:+.1%}",
        ]
        if code:
            cells += (
                [f"{row['ppl_code']:.3f}", f"{row['delta_code']:+.1%}"]
                if "ppl_code" in row
                else ["–", "–"]  # a row added later, without the code text
            )
        read = f"{row['mb_read']:.1f}" + (
            f" (caches {row['caches_mib']:.0f} MiB)"
            if "caches_mib" in row
            else " (no cache)"
        )
        if "refused" in row:
            read = f"refused at this budget ({row['refused']})"
        cells += [f"{row['touched']:.1%}", f"{row['mb_touched']:.1f}", read]
        lines.append("| " + " | ".join(cells) + " |")
    if r["decode_checks"]:
        lines += [
            "",
            "Decoding the same text under the plan (teacher-forced), against the "
            "replay:",
            "",
            "| input sparsity | tokens | FFN MB read/token measured | simulated "
            "| ratio "
            "| all MB read/token | ms/token | select ms/token | column / neuron hits |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for c in r["decode_checks"]:
            lines.append(
                f"| {c['sparsity']:g} | {c['tokens']} | {c['mb_per_token']:.2f} | "
                f"{c['simulated_mb_per_token']:.2f} | {c['ratio']:.3f} | "
                f"{c.get('all_mb_per_token', math.nan):.1f} | "
                f"{c['ms_per_token']:.0f} | {c['select_ms_per_token']:.1f} | "
                f"{c['channel_hit_rate']:.1%} / {c['neuron_hit_rate']:.1%} |"
            )
    return "\n".join(lines) + "\n"


def plot(r, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("[frontier] no matplotlib: no PNG (pip install matplotlib)")
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    families = {
        "oracle": "oracle top share (ceiling; reads gate/up whole, no cache)",
        "input TEAL": "uniform input, TEAL (touched, no cache)",
        "input WINA": "uniform input, WINA (touched, no cache)",
    }
    for prefix, label in families.items():
        pts = [
            (row["mb_read"], row["ppl_wikitext"])
            for row in r["rows"]
            if row["method"].startswith(prefix)
        ]
        if pts:
            xs, ys = zip(*sorted(pts))
            ax.plot(xs, ys, "o-", label=label)
    combined = [row for row in r["rows"] if "+ down" in row["method"]]
    if combined:
        xs, ys = zip(*sorted((row["mb_read"], row["ppl_wikitext"]) for row in combined))
        ax.plot(xs, ys, "d:", label="lowrank + exact |a| for down (touched, no cache)")
    ours = [row for row in r["rows"] if "caches_mib" in row]
    runtime = {  # each setting has its own plan: points, not a curve
        "input": ("o", "tab:red", "input selector"),
        "lowrank": ("^", "tab:purple", "lowrank predictor"),
        "shadow": ("v", "tab:brown", "shadow"),
    }
    for family, (marker, color, label) in runtime.items():
        rows = [row for row in ours if row["method"].split()[0] == family]
        if not rows:
            continue
        ax.plot(
            [row["mb_touched"] for row in rows],
            [row["ppl_wikitext"] for row in rows],
            "x",
            color=color,
            alpha=0.5,
            label=f"{label}, touched (no cache)",
        )
        ax.plot(
            [row["mb_read"] for row in rows],
            [row["ppl_wikitext"] for row in rows],
            marker,
            color=color,
            label=f"{label}, read at the plan (replayed)",
        )
        for row in rows:
            ax.annotate(
                " ".join(row["method"].split()[1:]),
                (row["mb_read"], row["ppl_wikitext"]),
                textcoords="offset points",
                xytext=(4, 2),
                fontsize=6,
            )
    dense = next(row for row in r["rows"] if row["method"] == "dense")
    ax.plot(
        [r["naive_mb"]], [dense["ppl_wikitext"]], "ks", label="naive (whole FFN; dense)"
    )
    ax.set_xlabel("FFN MB read per token")
    ax.set_ylabel("perplexity (WikiText-2)")
    ax.set_title(
        f"{r['model']}: quality vs bytes at {r['budget_fraction']:g} of the file"
    )
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
