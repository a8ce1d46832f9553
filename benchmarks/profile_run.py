"""Where a decoding run's time goes: one worker run (benchmarks/worker.py) under py-spy,
summarised by function (self and total time) from its collapsed stacks.

    python benchmarks/profile_run.py STORE [--options '{"selector": "lowrank", ...}']
        [--tokens 64] [--out benchmarks/results/profile-NAME]

Writes OUT.txt (collapsed stacks, for flame-graph tools) and OUT.md (the top
functions). py-spy samples the Python stacks and, with --native, the C++ frames of
MLX, so time inside MLX kernels and the host syncs is attributed to its caller.
"""

import argparse
import collections
import json
import subprocess
import sys
from pathlib import Path

WORKER = str(Path(__file__).parent / "worker.py")


def _short(frame: str, line: bool = False) -> str:
    """'fn (path/to/file.py:12)' -> 'fn (file.py)' (or 'fn (file.py:12)')."""
    name, _, where = frame.partition(" (")
    if not where:
        return name
    file, _, num = where.rstrip(")").partition(":")
    return f"{name} ({Path(file).name}{':' + num if line and num else ''})"


def summarize(collapsed: str, top: int = 20) -> str:
    """The decoding loop's main-thread samples: total time per function and self time
    per source line (where the main thread waits: a host sync shows as the line that
    converts an MLX array); the reader threads' samples apart."""
    self_t, total_t = collections.Counter(), collections.Counter()
    n = readers = other = 0
    for line in collapsed.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        frames, c = stack.split(";"), int(count)
        if frames[0].startswith("Thread._bootstrap"):
            readers += c
            continue
        if not any(f.startswith("decode (worker.py") for f in frames):
            other += c  # imports, load
            continue
        n += c
        self_t[_short(frames[-1], line=True)] += c
        for f in {_short(f) for f in frames}:
            total_t[f] += c
    rows = [
        f"Main thread while decoding: {n} samples (load and imports: {other}; reader "
        f"threads, busy in reads: {readers}).",
        "",
        "| function | total |",
        "|---|---|",
    ]
    rows += [f"| `{f}` | {c / n:.1%} |" for f, c in total_t.most_common(top)]
    rows += ["", "Self time by line:", "", "| line | self |", "|---|---|"]
    rows += [f"| `{f}` | {c / n:.1%} |" for f, c in self_t.most_common(top)]
    return "\n".join(rows) + "\n"


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("store")
    p.add_argument("--options", default="{}", help="mlx_flash.load keywords, JSON")
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--rate", type=int, default=250)
    p.add_argument("--native", action="store_true", help="Sample C++ frames too")
    p.add_argument("--out", default="benchmarks/results/profile")
    args = p.parse_args()
    spec = {
        "engine": "flash",
        "path": args.store,
        "options": json.loads(args.options),
        "tokens": args.tokens,
    }
    out = Path(args.out)
    cmd = ["py-spy", "record", "--rate", str(args.rate), "--format", "raw"]
    cmd += ["--native"] if args.native else []
    cmd += ["-o", f"{out}.txt", "--", sys.executable, WORKER, json.dumps(spec)]
    run = subprocess.run(cmd, capture_output=True, text=True, check=True)
    # py-spy talks too
    lines = [x for x in run.stdout.splitlines() if x.startswith("{")]
    result = json.loads(lines[-1])
    head = (
        f"### Profile: {args.store}, {json.dumps(spec['options'])}, {args.tokens} "
        f"tokens\n\n{result['ms_per_token']:.1f} ms/token; per token: "
        + ", ".join(
            f"{k[:-3]} {v:.1f} ms"
            for k, v in result.items()
            if k.endswith("_ms") and k != "p90_ms"
        )
        + " (the run includes load and prefill; py-spy sampling at "
        f"{args.rate} Hz)\n\n"
    )
    text = head + summarize(Path(f"{out}.txt").read_text())
    Path(f"{out}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
