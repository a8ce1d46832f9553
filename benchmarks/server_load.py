"""Issue #16: `mlx_flash.server` under sustained mixed load on loopback.

`--clients` clients (default 8) for `--seconds` (default 300), each drawing one
request after another: non-streamed and streamed completions with short and long
prompts (chat and plain), clients that go away mid-stream or before their turn,
and malformed requests (bad JSON, wrong types, unknown fields' values). Checked:
every accepted request completes with its tokens or, when its client left, is
cancelled (the server's own record of what it served); malformed ones get a 4xx
with an OpenAI error body, never a 5xx; a greedy reference request with the exact
`all` selector returns `mlx_flash.generate`'s text each time it is drawn; the
server's RSS, open fds and threads, sampled every second, do not grow.

    python benchmarks/server_load.py [--seconds 300] [--clients 8]
        [--dram-budget 0.75] [--out benchmarks/results]

The server runs in its own process (SmolLM2-135M, the default model); writes
server-load.json and server-load.md. `run_load` is also the test suite's short
version (tests/test_server_load.py, a tiny model served in-process).
"""

import argparse
import http.client
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional

WIKITEXT = (
    Path(__file__).resolve().parents[2] / "shared/data/corpora/wikitext2-test.txt"
)
REFERENCE = "The capital of France is"
KINDS = ("complete", "chat", "stream", "long", "leave_stream", "leave_queue", "bad")
BAD_BODIES = [
    b"{not json",
    b'{"prompt": 5, "max_tokens": 4}',
    b'{"prompt": "x", "max_tokens": -3}',
    b'{"messages": "not a list", "max_tokens": 4}',
    b'{"prompt": "x", "temperature": "hot"}',
    b"[]",
]


@dataclass
class Report:
    """What the clients saw, by kind of request."""

    sent: Dict[str, int] = field(default_factory=dict)
    ok: Dict[str, int] = field(default_factory=dict)
    errors: Dict[str, int] = field(default_factory=dict)  # "kind: what" -> count
    latency: Dict[str, List[float]] = field(default_factory=dict)
    reference_mismatches: int = 0
    samples: List[dict] = field(default_factory=list)  # the server's RSS, fds, threads
    after: dict = field(default_factory=dict)  # the same, once every request is done
    lock: threading.Lock = field(default_factory=threading.Lock)

    def count(self, table: Dict[str, int], key: str) -> None:
        with self.lock:
            table[key] = table.get(key, 0) + 1

    def summary(self) -> dict:
        lat = {
            k: {
                "n": len(v),
                "p50_s": statistics.median(v),
                "p90_s": quantile(v, 0.9),
                "p99_s": quantile(v, 0.99),
            }
            for k, v in self.latency.items()
            if v
        }
        return {
            "sent": self.sent,
            "ok": self.ok,
            "errors": self.errors,
            "latency": lat,
            "reference_mismatches": self.reference_mismatches,
            "samples": self.samples,
            "after": self.after,
        }


def quantile(values: List[float], q: float) -> float:
    v = sorted(values)
    return v[min(len(v) - 1, int(q * len(v)))]


def post(port: int, path: str, body: bytes, timeout: float = 600):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
    return conn, conn.getresponse()


def run_load(
    port: int,
    seconds: float,
    clients: int,
    reference: str,
    sample: Callable[[], dict],
    seed: int = 0,
    long_text: str = "",
    no_eos: Optional[dict] = None,
    long_words: int = 300,
) -> Report:
    """Drive the server on `port` with `clients` threads for `seconds`; `sample()`
    is called every second for the server's RSS, fds and threads; `reference` is
    the text `mlx_flash.generate` gives for `REFERENCE`, 8 greedy tokens; long
    prompts take `long_words` words of `long_text`."""
    report, deadline = Report(), time.monotonic() + seconds
    bias = {"logit_bias": no_eos} if no_eos else {}
    words = (long_text or "the cat sat on the mat " * 200).split()

    def body(**fields) -> bytes:
        return json.dumps({"temperature": 0, **bias, **fields}).encode()

    def send(data: bytes) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", port), timeout=600)
        head = f"POST /v1/completions HTTP/1.1\r\nContent-Length: {len(data)}\r\n"
        sock.sendall(head.encode() + b"\r\n" + data)
        return sock

    def one(kind: str, rng: random.Random) -> None:
        tic = time.monotonic()
        if kind == "bad":
            conn, r = post(port, "/v1/completions", rng.choice(BAD_BODIES))
            payload = json.loads(r.read() or b"{}")
            conn.close()
            if 400 <= r.status < 500 and "error" in payload:
                report.count(report.ok, kind)
            else:
                report.count(report.errors, f"bad: status {r.status}")
            return
        if kind in ("complete", "long"):
            start = rng.randrange(0, max(1, len(words) - 400))
            prompt = (
                REFERENCE
                if kind == "complete" and rng.random() < 0.3
                else " ".join(
                    words[start : start + (long_words if kind == "long" else 8)]
                )
            )
            n = 8 if prompt == REFERENCE else rng.randint(4, 24)
            conn, r = post(port, "/v1/completions", body(prompt=prompt, max_tokens=n))
            payload = json.loads(r.read())
            conn.close()
            if r.status != 200:
                report.count(report.errors, f"{kind}: status {r.status}")
                return
            if payload["usage"]["completion_tokens"] < 1:
                report.count(report.errors, f"{kind}: no tokens")
                return
            if prompt == REFERENCE and payload["choices"][0]["text"] != reference:
                with report.lock:
                    report.reference_mismatches += 1
        elif kind == "chat":
            messages = [{"role": "user", "content": " ".join(words[:12])}]
            conn, r = post(
                port, "/v1/chat/completions", body(messages=messages, max_tokens=12)
            )
            payload = json.loads(r.read())
            conn.close()
            if r.status != 200 or not payload["choices"][0]["message"]["content"]:
                report.count(report.errors, f"chat: status {r.status}")
                return
        elif kind in ("stream", "leave_stream"):
            data = body(prompt=" ".join(words[:10]), max_tokens=20, stream=True)
            sock = send(data)
            lines, events, status = sock.makefile("rb"), 0, None
            while True:
                line = lines.readline()
                if not line:
                    break
                if status is None:
                    status = int(line.split()[1])
                if line.startswith(b"data: "):
                    if line.strip() == b"data: [DONE]":
                        break
                    events += 1
                    if kind == "leave_stream" and events >= rng.randint(1, 3):
                        break  # gone mid-stream
            lines.close()
            sock.close()
            if status != 200 or events < 1:
                report.count(report.errors, f"{kind}: status {status}, {events}")
                return
        elif kind == "leave_queue":  # sends, then goes away before any answer
            sock = send(body(prompt=" ".join(words[:6]), max_tokens=30))
            time.sleep(rng.random() * 0.05)
            sock.close()
        with report.lock:
            report.latency.setdefault(kind, []).append(time.monotonic() - tic)
        report.count(report.ok, kind)

    def client(i: int) -> None:
        rng = random.Random(seed * 1000 + i)
        while time.monotonic() < deadline:
            kind = rng.choice(KINDS)
            report.count(report.sent, kind)
            try:
                one(kind, rng)
            except Exception as e:  # noqa: BLE001 (counted: the report says what)
                report.count(report.errors, f"{kind}: {type(e).__name__}")

    def sampler() -> None:
        t0 = time.monotonic()
        while time.monotonic() < deadline:
            report.samples.append({"t": time.monotonic() - t0, **sample()})
            time.sleep(1.0)
        report.samples.append({"t": time.monotonic() - t0, **sample()})

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    threads.append(threading.Thread(target=sampler))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    time.sleep(2.0)  # every request answered: the connections' threads have ended
    report.after = sample()
    return report


def process_sample(pid: int) -> dict:
    """A process's RSS (MiB), open fds and threads, from /proc."""
    status = Path(f"/proc/{pid}/status").read_text().splitlines()
    get = lambda key: int(next(l for l in status if l.startswith(key)).split()[1])  # noqa: E731
    return {
        "rss_mb": get("VmRSS:") / 1024,
        "fds": len(os.listdir(f"/proc/{pid}/fd")),
        "threads": get("Threads:"),
    }


def bound(plan: str) -> Optional[float]:
    """Budget + the process's own memory measured at load, from the server's plan
    line ("DRAM plan (budget B MiB) ... measured at load: process P MiB + tokenizer
    T MiB"), in MiB."""
    import re

    budget = re.search(r"budget ([\d.]+) MiB", plan)
    outside = re.search(r"process ([\d.]+) MiB \+ tokenizer (-?[\d.]+) MiB", plan)
    if not budget or not outside:
        return None
    return float(budget[1]) + float(outside[1]) + float(outside[2])


def growth(samples: List[dict], key: str) -> float:
    """The change of `key` from the end of the first tenth to the end."""
    start = samples[max(1, len(samples) // 10)][key]
    return samples[-1][key] - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=300)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--dram-budget", default="0.75")
    parser.add_argument(
        "--max-kv-size",
        default="512",
        help="The server's rotating context (the long prompts need more than the "
        "256 tokens a 0.75 budget's plan would hold otherwise)",
    )
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    from mlx_flash import generate, load
    from mlx_flash.default_model import DEFAULT_MODEL, default_model_path

    source = str(default_model_path())
    model, tokenizer = load(
        source,
        dram_budget=args.dram_budget,
        max_kv_size=int(args.max_kv_size),
        prompt_caches=1,  # as the server's plan (--prompt-cache-size 1)
        progress=False,
    )
    reference = generate(model, tokenizer, REFERENCE, max_tokens=8)
    del model
    command = [sys.executable, "-m", "mlx_flash.server", "--model", source]
    command += ["--port", "0", "--dram-budget", args.dram_budget]
    command += ["--max-kv-size", args.max_kv_size]
    server = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    port, plan = None, ""
    for line in server.stdout:
        if "DRAM plan" in line:
            plan = line.strip()
        if "serving" in line:
            port = int(line.split(" on ")[1].split(",")[0].rsplit(":", 1)[1])
            threading.Thread(target=server.stdout.read, daemon=True).start()
            break
    if port is None:
        raise SystemExit("the server did not start")
    try:
        load_avg = os.getloadavg()
        report = run_load(
            port,
            args.seconds,
            args.clients,
            reference,
            lambda: process_sample(server.pid),
            long_text=WIKITEXT.read_text()[:20000],
        )
    finally:
        server.terminate()
        server.wait(30)
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "model": DEFAULT_MODEL,
        "dram_budget": args.dram_budget,
        "max_kv_size": args.max_kv_size,
        "plan": plan,
        "bound_mib": bound(plan),
        "clients": args.clients,
        "seconds": args.seconds,
        "load_average": load_avg,
        **report.summary(),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "server-load.json").write_text(json.dumps(result, indent=1))
    (out / "server-load.md").write_text(markdown(result))
    print(markdown(result))


def markdown(r) -> str:
    s = r["samples"]
    lines = [
        f"Server under load ({r['date']}, load average {r['load_average'][0]:.1f}; "
        f"{r['model']}, --dram-budget {r['dram_budget']} --max-kv-size "
        f"{r['max_kv_size']}; {r['clients']} clients for "
        f"{r['seconds']:.0f} s on loopback): {sum(r['sent'].values())} requests sent, "
        f"{sum(r['ok'].values())} as expected, {sum(r['errors'].values())} errors; "
        f"the greedy reference differed {r['reference_mismatches']} times. Server RSS "
        f"{s[0]['rss_mb']:.0f} -> {s[-1]['rss_mb']:.0f} MiB (max "
        f"{max(x['rss_mb'] for x in s):.0f}; {growth(s, 'rss_mb'):+.1f} "
        "after the first "
        f"tenth), fds {s[0]['fds']} -> {s[-1]['fds']} (max {max(x['fds'] for x in s)})"
        + (
            f"; the bound (budget + the process's memory measured at load) "
            f"{r['bound_mib']:.0f} MiB: "
            + ("within" if max(x["rss_mb"] for x in s) <= r["bound_mib"] else "OVER")
            if r.get("bound_mib")
            else ""
        )
        + f", threads {s[0]['threads']} -> {s[-1]['threads']} (a thread per open "
        f"connection); once every request was answered: RSS {r['after']['rss_mb']:.0f} "
        f"MiB, fds {r['after']['fds']}, threads {r['after']['threads']}.",
        "",
        "| kind | sent | as expected | p50 s | p90 s | p99 s |",
        "|---|---|---|---|---|---|",
    ]
    for kind in KINDS:
        lat = r["latency"].get(kind, {})
        cells = [
            f"{lat[k]:.2f}" if k in lat else "" for k in ("p50_s", "p90_s", "p99_s")
        ]
        lines.append(
            f"| {kind} | {r['sent'].get(kind, 0)} | {r['ok'].get(kind, 0)} | "
            + " | ".join(cells)
            + " |"
        )
    if r["errors"]:
        lines += [
            "",
            "Errors: " + ", ".join(f"{k} ×{v}" for k, v in r["errors"].items()),
        ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
