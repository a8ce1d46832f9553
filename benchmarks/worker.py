"""One benchmark run in this process: load an engine, decode greedily with EOS ignored,
and print one JSON line of measurements. Every harness in benchmarks/ runs each
configuration as `python benchmarks/worker.py SPEC_JSON` in a fresh process.

SPEC: {"engine": "flash" | "mlx_lm" | "llama_cpp" | "idle_mlx" | "idle_llama_cpp",
       "path": store, mlx-lm dir or GGUF (idle: a store or a GGUF, for the tokenizer),
       "options": mlx_flash.load keywords,
       "dtype": "float32" (mlx-lm; default: the model's own), "tokens": N,
       "max_seconds": stop decoding after this long (at least 1 decode token),
       "threads": llama.cpp threads, "repack": llama.cpp's CPU weight repacking
       (`use_extra_bufts`; default true, as llama.cpp's)}

Measured: load time, first-token time (prefill + first token), decode latency per token
(median, p90), bytes this process read from the block device per decode token
(/proc/self/io: direct reads, buffered reads and mmap page faults alike), peak RSS, the
RSS after imports, and for mlx_flash the per-phase split from `model.flash_stats`; for
llama.cpp the RSS after load (anonymous and file-backed apart), the repacking setting
read back from the loaded model's params, and its buffers by type from its log
(a `CPU_REPACK` model buffer is the repacked copy).
"""

import contextlib
import copy
import json
import re
import resource
import statistics
import sys
import time
from pathlib import Path

PROMPT = "Write a short story about a robot who learns to paint."


def rss_mb() -> float:
    """Resident memory now (Linux /proc; ru_maxrss elsewhere, a peak)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize() / 2**20
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def disk_read_bytes() -> int:
    """Bytes this process (all its threads) caused to be read from a block device."""
    try:
        for line in Path("/proc/self/io").read_text().splitlines():
            if line.startswith("read_bytes:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def decode(tokens_iter, tokens: int, max_seconds: float, on_first=None):
    """Per-token wall times of an iterator of generated tokens; the first includes the
    prefill. Returns (times, bytes read after the first token, generated ids)."""
    times, ids, tic, start, read0 = [], [], time.perf_counter(), None, 0
    for i, tok in enumerate(tokens_iter):
        times.append(time.perf_counter() - tic)
        ids.append(int(tok))
        if i == 0:
            if on_first:
                on_first()
            start, read0 = time.perf_counter(), disk_read_bytes()
        elif len(times) >= tokens or (  # a thrashing run stops after one decode token
            len(times) >= 2 and time.perf_counter() - start > max_seconds
        ):
            break
        tic = time.perf_counter()
    return times, disk_read_bytes() - read0, ids


def latency(times) -> dict:
    steps = times[1:]
    return {
        "first_token_s": times[0],
        "decode_tokens": len(steps),
        "ms_per_token": 1e3 * statistics.median(steps),
        "p90_ms": 1e3
        * (statistics.quantiles(steps, n=10)[-1] if len(steps) > 1 else steps[0]),
        "tokens_per_s": 1 / statistics.median(steps),
    }


def context(spec: dict) -> int:
    """Tokens of context every engine is given (llama.cpp's n_ctx, mlx_flash's
    --max-kv-size): the prompt and the decoded tokens fit twice over."""
    return max(256, 2 * spec["tokens"])


def mlx_worker(spec: dict) -> dict:
    import mlx.core as mx
    import mlx_lm
    from mlx_lm.generate import generate_step

    import mlx_flash

    idle = rss_mb()
    tic = time.perf_counter()
    options = spec.get("options")
    if spec["engine"] == "mlx_lm":
        model, tokenizer = mlx_lm.load(spec["path"])
        if spec.get("dtype"):
            model.set_dtype(getattr(mx, spec["dtype"]))
    else:
        options = dict(options or {})
        # the paper's hybrid is `all` under a budget: the runtime caches what fits
        hybrid = options.pop("hybrid", False)
        # the context llama.cpp gets (n_ctx below): the plan holds its KV cache
        options.setdefault("max_kv_size", context(spec))
        model, tokenizer = mlx_flash.load(spec["path"], progress=False, **options)
    mx.eval(model.parameters())
    load_s = time.perf_counter() - tic
    loaded, load_peak = rss_mb(), peak_rss_mb()  # where the memory beyond a plan goes
    prompt = mx.array(tokenizer.encode(PROMPT))
    snap = {}

    def on_first():  # the prefill is done: count decoding only
        snap["prefill_peak"] = peak_rss_mb()
        if spec["engine"] == "flash":
            snap["stats"] = copy.deepcopy(model.flash_stats)

    steps = generate_step(
        prompt, model, max_tokens=spec["tokens"], sampler=lambda x: mx.argmax(x, -1)
    )
    times, read, ids = decode(
        (t for t, _ in steps), spec["tokens"], spec.get("max_seconds", 1e9), on_first
    )
    out = {
        "load_s": load_s,
        **latency(times),
        "disk_mb_per_token": read / max(1, len(times) - 1) / 1e6,
        "peak_rss_mb": peak_rss_mb(),
        "idle_rss_mb": idle,
        "loaded_rss_mb": loaded,
        "load_peak_rss_mb": load_peak,
        "prefill_peak_rss_mb": snap["prefill_peak"],
        "end_rss_mb": rss_mb(),
        "mlx_peak_mb": mx.get_peak_memory() / 2**20,
        "mlx_cache_mb": mx.get_cache_memory() / 2**20,
        "text": tokenizer.decode(ids)[:80],
        "dtype": str(compute_dtype(model)).removeprefix("mlx.core."),
    }
    if spec["engine"] == "flash":
        s = model.flash_stats.since(snap["stats"])  # decoding only
        n = max(1, s.tokens)
        out.update(
            {f"{k}_ms": 1e3 * v / n for k, v in s.seconds.items() if k != "prefill"},
            store_mb_per_token=s.bytes / n / 1e6,
            expected_mb_per_token=(
                None
                if model.flash_plan.expected_bytes is None
                else model.flash_plan.expected_bytes / 1e6
            ),
            reads_per_token=s.reads / n,
            selected_per_token=s.selected / n,
            hit_rate=s.hits / max(1, s.selected),
            plan_mb=model.flash_plan.total / 2**20,
            plan={"describe": model.flash_plan.describe()},
            budget_mb=(model.flash_plan.budget or 0) / 2**20,
            capacity=model.flash_plan.capacity,
            hybrid=hybrid,
        )
    return out


def compute_dtype(model):
    import mlx.core as mx
    from mlx import nn

    params = nn.utils.tree_flatten(model.parameters())
    return next(p.dtype for _, p in params if mx.issubdtype(p.dtype, mx.floating))


BUFFER = re.compile(r"(\S+) (model|KV|compute) buffer size\s*=\s*([\d.]+) MiB")


def rss_parts_mb() -> dict:
    """Anonymous and file-backed resident memory now (Linux /proc/self/status): a
    repacked weight is an anonymous copy, a mmapped one a file page."""
    parts = {}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(("RssAnon:", "RssFile:")):
                key, kib = line.split()[:2]
                parts[key.removesuffix(":").lower() + "_mb"] = int(kib) / 1024
    except OSError:
        pass
    return parts


@contextlib.contextmanager
def model_params(**fields):
    """Set fields of llama.cpp's `llama_model_params` that `Llama()` takes no keyword
    for (`use_extra_bufts`, CPU weight repacking, in 0.3.36): `Llama.__init__` starts
    from `llama_cpp.llama_model_default_params()`, so the defaults it gets carry them
    while one model is constructed."""
    import llama_cpp.llama_cpp as lib

    default = lib.llama_model_default_params

    def patched():
        params = default()
        for key, value in fields.items():
            setattr(params, key, value)
        return params

    lib.llama_model_default_params = patched
    try:
        yield
    finally:
        lib.llama_model_default_params = default


@contextlib.contextmanager
def llama_log(lines: list):
    """llama.cpp's log lines (every level) appended to `lines`, printed nowhere."""
    import llama_cpp
    from llama_cpp import _logger

    @llama_cpp.llama_log_callback
    def keep(level, text, user_data):
        lines.append(text.decode("utf-8", errors="replace"))

    llama_cpp.llama_log_set(keep, None)
    try:
        yield
    finally:
        llama_cpp.llama_log_set(_logger.llama_log_callback, None)


def buffers_mib(lines: list) -> dict:
    """{"model CPU_REPACK": MiB, "KV CPU": MiB, ...} from llama.cpp's load log."""
    out = {}
    for m in BUFFER.finditer("".join(lines)):
        key = f"{m[2]} {m[1]}"
        out[key] = out.get(key, 0.0) + float(m[3])
    return out


def llama_worker(spec: dict) -> dict:
    from llama_cpp import Llama

    idle = rss_mb()
    tic = time.perf_counter()
    threads = spec.get("threads", 2)
    repack = spec.get("repack", True)  # llama.cpp's default: on
    log = []
    with llama_log(log), model_params(use_extra_bufts=repack):
        llm = Llama(
            model_path=spec["path"],
            n_threads=threads,
            n_threads_batch=threads,
            n_ctx=context(spec),
            # the default 512-token micro-batch reserves ~100 MB of logits/compute
            # buffer (49k vocabulary); our prompts are short, so 64 keeps it fair
            n_batch=64,
            n_ubatch=64,
            use_mmap=True,
            n_gpu_layers=0,
            verbose=False,
        )
    load_s = time.perf_counter() - tic
    if bool(llm.model_params.use_extra_bufts) != repack:  # a row must be what it says
        raise SystemExit(f"llama-cpp-python did not take use_extra_bufts={repack}")
    loaded = {"loaded_rss_mb": rss_mb(), **rss_parts_mb()}
    prompt = llm.tokenize(PROMPT.encode(), add_bos=True)
    steps = llm.generate(prompt, temp=0.0, top_k=1, repeat_penalty=1.0, reset=True)
    times, read, ids = decode(steps, spec["tokens"], spec.get("max_seconds", 1e9))
    return {
        "load_s": load_s,
        **latency(times),
        "disk_mb_per_token": read / max(1, len(times) - 1) / 1e6,
        "peak_rss_mb": peak_rss_mb(),
        "idle_rss_mb": idle,
        **loaded,
        "text": llm.detokenize(ids).decode(errors="replace")[:80],
        "threads": threads,
        # read back from the params the model was loaded with
        "repack": bool(llm.model_params.use_extra_bufts),
        "buffers_mib": buffers_mib(log),
    }


def idle_worker(spec: dict) -> dict:
    """The engine imported and the model's tokenizer loaded: everything but weights
    (the budget is a budget for weights, as the paper's "half the model in DRAM")."""
    if spec["engine"] == "idle_mlx":
        import mlx.core as mx  # noqa: F401
        import mlx_lm  # noqa: F401
        from mlx_lm.generate import generate_step  # noqa: F401
        from mlx_lm.utils import load_tokenizer

        import mlx_flash  # noqa: F401
        from mlx_flash.utils import drop_build_tables, release_memory

        imported = rss_mb()
        tokenizer = load_tokenizer(Path(spec["path"]))  # kept alive
        drop_build_tables(tokenizer)  # as mlx_flash.load does after its tokenizer
        release_memory()
    else:
        from llama_cpp import Llama

        imported = rss_mb()
        vocab = Llama(model_path=spec["path"], vocab_only=True, verbose=False)  # noqa: F841
    return {
        "imported_rss_mb": imported,
        "idle_rss_mb": rss_mb(),
        "peak_rss_mb": peak_rss_mb(),
    }


def run(spec: dict) -> dict:
    if spec["engine"].startswith("idle"):
        return idle_worker(spec)
    if spec["engine"] == "llama_cpp":
        return llama_worker(spec)
    return mlx_worker(spec)


if __name__ == "__main__":
    print(json.dumps(run(json.loads(sys.argv[1]))), flush=True)
