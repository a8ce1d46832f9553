"""Issue #16: a long conversation under a byte budget, its resident memory measured.

SmolLM2-135M (the default model, converted as the README's first command does)
loaded with a rotating context (`--max-kv-size`, default 1024 tokens: its float32
KV cache is ~45 KiB per token, 45 MiB at 1024) and a byte budget of the plan's
floor for that context plus `--extra` MiB of neuron caches. Chat-like turns — a
user message of WikiText-2 text (~60 tokens), then a greedy reply of `--reply`
tokens — go through one prompt cache, as `mlx_flash.chat` holds them, for
`--tokens` tokens in all, several times the context (past it the cache rotates,
keeping the first 4 tokens, as in mlx-lm). Every `--every` tokens: RSS
(/proc/self/status), the peak RSS since the conversation began (VmHWM, reset after
the loads), MLX's active memory, the KV
cache's tokens. The bound: the budget plus the process's own memory measured at
load beside the plan (interpreter, MLX, tokenizer: `model.flash_plan.outside`).

    python benchmarks/long_chat.py [--tokens 3000] [--max-kv-size 1024]
        [--extra 8] [--reply 120] [--every 100] [--out benchmarks/results]

Writes long-chat.json and long-chat.md.
"""

import argparse
import json
import os
import time
from pathlib import Path

WIKITEXT = (
    Path(__file__).resolve().parents[2] / "shared/data/corpora/wikitext2-test.txt"
)


def status_mb(key: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak_rss() -> None:
    """Linux: VmHWM back to the current RSS (writing 5 to clear_refs)."""
    import gc

    gc.collect()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=3000)
    p.add_argument("--max-kv-size", type=int, default=1024)
    p.add_argument("--extra", type=float, default=8.0, help="MiB above the floor")
    p.add_argument("--reply", type=int, default=120)
    p.add_argument("--every", type=int, default=100)
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args()

    import mlx.core as mx
    from mlx_lm.generate import generate_step
    from mlx_lm.models.cache import make_prompt_cache

    from mlx_flash import load
    from mlx_flash.default_model import DEFAULT_MODEL, default_model_path

    source = default_model_path()
    free, _ = load(str(source), max_kv_size=args.max_kv_size, progress=False)
    floor = free.flash_plan.floor
    del free
    budget = floor + int(args.extra * 2**20)
    model, tokenizer = load(
        str(source), max_kv_size=args.max_kv_size, dram_budget=budget, progress=False
    )
    plan = model.flash_plan
    outside = sum(plan.outside.values())
    reset_peak_rss()  # the conversation's peak, not the conversion's or the loads'

    words = WIKITEXT.read_text().split()
    cache, samples, done, turn = make_prompt_cache(model), [], 0, 0
    tic = time.perf_counter()
    while done < args.tokens:
        text = " ".join(words[turn * 45 : turn * 45 + 45])
        message = mx.array(tokenizer.encode(f"User: {text}\nAssistant:"))
        turn += 1
        done += message.size
        for token, _ in generate_step(
            message,
            model,
            max_tokens=min(args.reply, max(1, args.tokens - done)),
            sampler=lambda x: mx.argmax(x, -1),
            prompt_cache=cache,
        ):
            done += 1
            if done % args.every == 0 or done >= args.tokens:
                samples.append(
                    {
                        "tokens": done,
                        "turn": turn,
                        "rss_mb": status_mb("VmRSS"),
                        "peak_rss_mb": status_mb("VmHWM"),
                        "mlx_active_mb": mx.get_active_memory() / 2**20,
                        "mlx_peak_mb": mx.get_peak_memory() / 2**20,
                        "kv_tokens": max(c.keys.shape[2] for c in cache),
                        "seconds": time.perf_counter() - tic,
                    }
                )
    bound = (budget + outside) / 2**20
    peak = max(s["peak_rss_mb"] for s in samples)
    first = next(s for s in samples if s["tokens"] >= args.max_kv_size)
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "model": DEFAULT_MODEL,
        "load_average": os.getloadavg(),
        "max_kv_size": args.max_kv_size,
        "budget_mib": budget / 2**20,
        "plan_total_mib": plan.total / 2**20,
        "outside_mib": outside / 2**20,
        "bound_mib": bound,
        "peak_rss_mib": peak,
        "within_bound": peak <= bound,
        "rss_growth_mib_after_context": samples[-1]["rss_mb"] - first["rss_mb"],
        "tokens": done,
        "turns": turn,
        "kv_tokens_max": max(s["kv_tokens"] for s in samples),
        "samples": samples,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "long-chat.json").write_text(json.dumps(result, indent=1))
    (out / "long-chat.md").write_text(markdown(result))
    print(markdown(result))


def markdown(r) -> str:
    lines = [
        f"Long conversation ({r['date']}, load average {r['load_average'][0]:.1f}; "
        f"{r['model']}; rotating context of {r['max_kv_size']} tokens; byte budget "
        f"{r['budget_mib']:.1f} MiB = the floor + caches; {r['turns']} turns, "
        f"{r['tokens']} tokens). Peak RSS {r['peak_rss_mib']:.1f} MiB against the "
        f"bound {r['bound_mib']:.1f} MiB (budget + {r['outside_mib']:.1f} MiB of "
        f"process and tokenizer measured at load): "
        f"{'within' if r['within_bound'] else 'OVER'}; RSS moved "
        f"{r['rss_growth_mib_after_context']:+.1f} MiB from the first full context "
        f"to the end; the KV cache held at most {r['kv_tokens_max']} tokens.",
        "",
        "| tokens | turn | RSS MiB | peak RSS MiB | MLX active MiB | KV tokens | s |",
        "|---|---|---|---|---|---|---|",
    ]
    for s in r["samples"]:
        lines.append(
            f"| {s['tokens']} | {s['turn']} | {s['rss_mb']:.1f} | "
            f"{s['peak_rss_mb']:.1f} | {s['mlx_active_mb']:.1f} | {s['kv_tokens']} | "
            f"{s['seconds']:.0f} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
