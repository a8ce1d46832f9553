"""Issue #15's per-layer predictor table: each layer's rank and held-out recall,
precision and share selected, from the predictors' own manifests (measured on the
held-out tenth of their training text), before and after.

    python benchmarks/predictor_table.py AFTER_STORE [--before BEFORE_STORE]
        [--recall 0.9] [--out benchmarks/results/predictors-qwen0.5b.md]

The manifests say what each set was trained on (tokens, target); recall and
precision are against each set's own target, so two sets with different targets
compare by the share they select and, where measured, the FFN output error at it
(the before set's interpolated to the after set's share). Each set's held-out tokens
are the last tenth of its own training text, so with different token counts the
errors are of different tokens: a rough comparison (the frontier's perplexities are
on one text). An interrupted run's saved layers can stand in for a set.
"""

import argparse
import itertools
import json
import math
from pathlib import Path

import numpy as np


def manifest(store: Path) -> dict:
    """The store's predictor manifest, or an interrupted run's layers so far (the
    per-layer files `train_predictors` saves as it goes)."""
    store = Path(store)
    if (store / "predictors.json").exists():
        return json.loads((store / "predictors.json").read_text())
    partial = store / "predictors.partial"
    run = json.loads((partial / "run.json").read_text())
    layers = [json.loads(p.read_text()) for p in sorted(partial.glob("layer-*.json"))]
    name = (
        f"a text of sha256 {run['text_sha256'][:12]}…, layers 0-{len(layers) - 1} only"
    )
    return {
        "text": {"name": name, "tokens": run["tokens"]},
        "target": run["target"],
        "layers": layers,
    }


def describe(m: dict) -> str:
    target = m["target"]
    rule = ", ".join(f"{k} {v}" for k, v in target.items() if k != "kind")
    return (
        f"{m['text'].get('tokens', '?')} tokens of {m['text'].get('name', '?')}, "
        f"target {target['kind']} {rule}".rstrip()
    )


def cells(layer: dict, key: str) -> list:
    error = layer.get("error", {}).get(key)
    return [
        str(layer["rank"]),
        f"{layer['recall'][key]:.2f}",
        f"{layer['precision'][key]:.1%}",
        f"{layer['selected'][key]:.1%}",
        "" if error is None else f"{error:.4f}",
    ]


def error_at(layer: dict, share: float) -> float:
    """The layer's FFN error at `share` selected, interpolated over its recalls (the
    fair comparison of two sets with different targets: equal bytes)."""
    points = sorted(
        (layer["selected"][k], layer["error"][k]) for k in layer.get("error", {})
    )
    if not points:
        return math.nan
    return float(np.interp(share, [p[0] for p in points], [p[1] for p in points]))


def table(after: dict, before: dict = None, recall: float = 0.9) -> str:
    key = f"{recall:g}"
    columns = ["rank", "recall", "precision", "selected", "FFN error"]
    head = ["layer"] + [f"after: {c}" for c in columns]
    if before:
        head += [f"before: {c}" for c in columns] + [
            "before: FFN error at after's share"
        ]
    head += ["ranks tried (selected)", "FFN/block output"]
    lines = [
        f"At recall {key} on each set's held-out tokens. After: {describe(after)}."
        + (f" Before: {describe(before)}." if before else ""),
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    rows = itertools.zip_longest(after["layers"], before["layers"] if before else [])
    for i, (a, b) in enumerate(rows):
        if a is None:
            break
        row = [str(i)] + cells(a, key)
        if before:
            row += cells(b, key) if b else [""] * len(columns)
            row += [f"{error_at(b, a['selected'][key]):.4f}" if b else ""]
        tried = ", ".join(f"{r}: {s:.1%}" for r, s in a.get("ranks", {}).items())
        share = a.get("output_share", 0.0)
        row += [tried, f"{share:.3f}" if share else ""]
        lines.append("| " + " | ".join(row) + " |")
    mean = lambda layers, k: sum(l[k][key] for l in layers) / len(layers)  # noqa: E731
    lines += [
        "",
        f"Mean selected at recall {key}: after {mean(after['layers'], 'selected'):.1%}",
    ]
    if before:
        both = len(before["layers"])
        if both < len(after["layers"]):
            lines[-1] += (
                f"; over layers 0-{both - 1}, which both have: after "
                f"{mean(after['layers'][:both], 'selected'):.1%}"
            )
        lines[-1] += f", before {mean(before['layers'], 'selected'):.1%}"
        errors = [
            (a["error"][key], error_at(b, a["selected"][key]))
            for a, b in zip(after["layers"], before["layers"])
            if "error" in a and "error" in b
        ]
        if errors:
            lines[-1] += (
                "; mean FFN error at the after's share: after "
                f"{np.mean([e[0] for e in errors]):.4f}, before "
                f"{np.mean([e[1] for e in errors]):.4f}"
            )
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("after", help="A store with trained predictors")
    parser.add_argument("--before", help="A store with the predictors to compare")
    parser.add_argument("--recall", type=float, default=0.9)
    parser.add_argument("--out", help="Write the Markdown table here too")
    args = parser.parse_args()
    text = table(
        manifest(args.after),
        manifest(args.before) if args.before else None,
        args.recall,
    )
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
