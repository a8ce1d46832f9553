"""Issue #15's per-layer predictor table: each layer's rank and held-out recall,
precision and share selected, from the predictors' own manifests (measured on the
held-out tenth of their training text), before and after.

    python benchmarks/predictor_table.py AFTER_STORE [--before BEFORE_STORE]
        [--recall 0.9] [--out benchmarks/results/predictors-qwen0.5b.md]

The manifests say what each set was trained on (tokens, target); recall and
precision are against each set's own target, so two sets with different targets
compare by the share they select and, where measured, the FFN output error at it.
"""

import argparse
import json
from pathlib import Path


def manifest(store: Path) -> dict:
    return json.loads((Path(store) / "predictors.json").read_text())


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


def table(after: dict, before: dict = None, recall: float = 0.9) -> str:
    key = f"{recall:g}"
    columns = ["rank", "recall", "precision", "selected", "FFN error"]
    head = ["layer"] + [f"after: {c}" for c in columns]
    if before:
        head += [f"before: {c}" for c in columns]
    head += ["ranks tried (selected)", "FFN/block output"]
    lines = [
        f"At recall {key} on each set's held-out tokens. After: {describe(after)}."
        + (f" Before: {describe(before)}." if before else ""),
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    rows = zip(after["layers"], before["layers"] if before else [None] * 10**4)
    for i, (a, b) in enumerate(rows):
        row = [str(i)] + cells(a, key) + (cells(b, key) if before else [])
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
        lines[-1] += f", before {mean(before['layers'], 'selected'):.1%}"
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
