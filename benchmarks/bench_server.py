"""Tokens/s through `python -m mlx_flash.server` against `python -m mlx_flash.generate`
on the same store (SmolLM2-135M by default), and a burst of concurrent requests.

- generate: the command, in its own process per round; its "Generation: ...
  tokens-per-sec" (mlx-lm's count: decode only).
- server: one server process; each round one streamed and one non-streamed request with
  the same chat prompt, greedy, the same max tokens, through the `openai` client.
  Decode tokens/s is measured at the client, from the first streamed token to the
  last; end to end is request to last byte. The server's prompt cache serves repeated
  prompts' prefill.
- burst: 20 clients, the i-th starting `--stagger` s after the (i-1)-th; the time
  of each to its reply, and the order in which they completed.
- the tests' burst of 20 (tiny random model): its timings line.

Greedy with EOS allowed in both (so both stop at the same token): the counts are
reported and compared.

    python benchmarks/bench_server.py [--rounds 3] [--tokens 128] [--out DIR]
"""

import argparse
import itertools
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

PROMPT = "Write a short story about a robot who learns to paint."


def run_generate(store: str, tokens: int) -> dict:
    command = [sys.executable, "-m", "mlx_flash.generate", "--model", store]
    command += ["--prompt", PROMPT, "--max-tokens", str(tokens), "--temp", "0"]
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    n, tps = re.search(
        r"Generation: (\d+) tokens, ([\d.]+) tokens-per-sec", out
    ).groups()
    return {"tokens": int(n), "decode_tps": float(tps)}


def start_server(store: str):
    command = [
        sys.executable,
        "-m",
        "mlx_flash.server",
        "--model",
        store,
        "--port",
        "0",
    ]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    for line in process.stderr:
        if "serving" in line:
            url = line.split(" on ")[1].split(",")[0]
            threading.Thread(target=process.stderr.read, daemon=True).start()
            return process, url
    raise RuntimeError("the server did not start")


def ask(client, tokens: int, stream: bool, content: str = PROMPT) -> dict:
    messages = [{"role": "user", "content": content}]
    tic = time.perf_counter()
    if not stream:
        r = client.chat.completions.create(
            model="default_model", messages=messages, max_tokens=tokens, temperature=0
        )
        seconds = time.perf_counter() - tic
        n = r.usage.completion_tokens
        return {"tokens": n, "end_to_end_s": seconds, "end_to_end_tps": n / seconds}
    times = []
    for chunk in client.chat.completions.create(
        model="default_model",
        messages=messages,
        max_tokens=tokens,
        temperature=0,
        stream=True,
    ):
        if chunk.choices and chunk.choices[0].delta.content:
            times.append(time.perf_counter())
    seconds = time.perf_counter() - tic
    return {
        "tokens": len(times),  # chunks with text: one per token
        "first_token_s": times[0] - tic,
        "decode_tps": (len(times) - 1) / (times[-1] - times[0]),
        "end_to_end_s": seconds,
    }


def burst(client, n: int, stagger: float, tokens: int) -> dict:
    done = {}

    def one(i):
        time.sleep(stagger * i)
        tic = time.perf_counter()
        r = client.chat.completions.create(
            model="default_model",
            messages=[{"role": "user", "content": f"{PROMPT} ({i})"}],
            max_tokens=tokens,
            temperature=0,
        )
        done[i] = (tic, time.perf_counter(), r.usage.completion_tokens)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    tic = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - tic
    latency = [done[i][1] - done[i][0] for i in range(n)]
    order = sorted(done, key=lambda i: done[i][1])  # the server serves one at a time
    return {
        "completed": len(done),
        "completion_order": order,
        "out_of_send_order": sum(a > b for a, b in itertools.pairwise(order)),
        "wall_s": wall,
        "tokens_per_s": sum(d[2] for d in done.values()) / wall,
        "latency_min_s": min(latency),
        "latency_median_s": statistics.median(latency),
        "latency_max_s": max(latency),
    }


def concurrency_test() -> str:
    """The timings line that the tests' burst of 20 prints (the tiny model)."""
    test = "tests/test_server.py"
    command = [sys.executable, "-m", "pytest", "-q", "-s", "-k", "burst", test]
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    return next(line for line in out.splitlines() if line.startswith("20 requests"))


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", help="a store or source (default: SmolLM2-135M)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--burst", type=int, default=20)
    p.add_argument("--burst-tokens", type=int, default=16)
    p.add_argument("--stagger", type=float, default=0.05)
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args()

    import openai

    from mlx_flash import convert
    from mlx_flash.default_model import default_model_path

    load = os.getloadavg()[0]
    source = args.model or default_model_path()
    store = convert(source, Path(tempfile.mkdtemp()) / "store", progress=False)
    process, url = start_server(str(store))
    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
    runs = {"generate": [], "server, streamed": [], "server, not streamed": []}
    try:
        ask(client, 8, stream=True)  # warm-up
        for r in range(args.rounds):
            runs["generate"].append(run_generate(str(store), args.tokens))
            runs["server, streamed"].append(ask(client, args.tokens, stream=True))
            runs["server, not streamed"].append(ask(client, args.tokens, stream=False))
            print(f"round {r}: " + json.dumps({k: v[-1] for k, v in runs.items()}))
        bursts = burst(client, args.burst, args.stagger, args.burst_tokens)
        print(json.dumps(bursts))
    finally:
        process.send_signal(signal.SIGINT)
        process.wait()

    def med(name, key):
        values = [x[key] for x in runs[name] if key in x]
        return statistics.median(values) if values else None

    result = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": platform.platform(),
        "processor": platform.processor(),
        "model": str(source),
        "load": (load, os.getloadavg()[0]),
        "rounds": args.rounds,
        "max_tokens": args.tokens,
        "medians": {name: {k: med(name, k) for k in runs[name][0]} for name in runs},
        "runs": runs,
        "burst": bursts,
    }
    test = concurrency_test()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "server.md").write_text(report(result, args, test))
    print(report(result, args, test))


def report(result: dict, args, test: str) -> str:
    m, b = result["medians"], result["burst"]
    head = (
        f"`python benchmarks/bench_server.py` ({result['date']}, {result['machine']}, "
        f"{result['processor'] or 'CPU'} x {os.cpu_count()}); model "
        f"`{Path(result['model']).name}`, naive flash path (`--selector all`), "
        f"greedy, max {args.tokens} tokens, medians of {args.rounds} rounds; load "
        f"average {result['load'][0]:.1f} before, {result['load'][1]:.1f} after."
    )
    rows = [
        "| path | tokens | decode tok/s | end to end s | first token s |",
        "|---|---|---|---|---|",
    ]
    for name, x in m.items():
        cells = [x.get(k) for k in ("decode_tps", "end_to_end_s", "first_token_s")]
        cells = ["" if c is None else f"{c:.2f}" for c in cells]
        rows.append(f"| {name} | {x['tokens']:.0f} | " + " | ".join(cells) + " |")
    burst = (
        f"Burst of {args.burst} chat requests ({args.burst_tokens} tokens each, one "
        f"every {args.stagger * 1e3:.0f} ms) on the same server: {b['completed']} "
        f"completed, in the order {' '.join(map(str, b['completion_order']))} "
        f"({b['out_of_send_order']} out of the order sent: the server serves in "
        f"order of arrival, a client thread may be late); {b['wall_s']:.1f} s wall, "
        f"{b['tokens_per_s']:.1f} tok/s overall; latency min "
        f"{b['latency_min_s']:.1f} s, median {b['latency_median_s']:.1f} s, max "
        f"{b['latency_max_s']:.1f} s."
    )
    runs = result["runs"]
    pairs = zip(runs["generate"], runs["server, streamed"])
    rounds = "Decode tok/s per round, generate / server streamed: " + ", ".join(
        f"{g['decode_tps']:.2f} / {r['decode_tps']:.2f}" for g, r in pairs
    )
    tiny = f"The tests' burst (tiny random llama, `tests/test_server.py`): {test}"
    notes = (
        "Decode tok/s: generate's is mlx-lm's own count; the server's is measured at "
        "the client (first streamed token to last), so it includes the HTTP, JSON "
        "and thread hand-off per token. A load average above the CPU count means "
        "other processes shared the CPUs: compare within a round."
    )
    title = "# mlx_flash.server against mlx_flash.generate"
    parts = [title, head, "\n".join(rows), rounds + ".", notes, burst, tiny]
    return "\n\n".join(parts) + "\n"


if __name__ == "__main__":
    main()
