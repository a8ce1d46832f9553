"""DRAM budgets: what a user may write for one, the default, and the sizes the planner
(`planner.py`) weighs: a neuron decoded and in flight, decoding's working memory."""

import math
import os
import re
import sys
from pathlib import Path
from typing import Callable, List, Optional, Tuple, Union

import mlx.core as mx

from .errors import FlashError
from .store.format import FLOAT_DTYPES, Component

# Resident memory stays within the budget plus this documented constant: the Python
# interpreter, MLX and numpy libraries and allocator slack, which no plan controls.
SLACK = 160 << 20
# What decoding adds to a process beyond its arrays: the model's Python objects, the
# reader's threads, library code paged in by the first token (measured ~10 MiB on
# Qwen2.5-Coder-0.5B after the tokenizer's load, allocator trimmed)
RUNTIME = 16 << 20


def float_parts(components: List[Component]) -> List[Tuple[Component, int]]:
    """Each float part of one neuron's components (values, or a quantization's
    scales and biases), with its stored bytes: the parts decoding converts (packed
    words and the float modes' uint8 scales are kept as they are)."""
    return [
        (c, size)
        for c in components
        for part, size in c.parts
        if part != "packed" and c.encoding.dtype != "uint8"
    ]


def _converted(components: List[Component], dtype: mx.Dtype, every: bool) -> int:
    """The float parts in `dtype` (with `every`, also those already stored in it)."""
    return sum(
        size // c.encoding.itemsize * dtype.size
        for c, size in float_parts(components)
        if every or FLOAT_DTYPES[c.encoding.dtype] != dtype
    )


def decoded_bytes(components: List[Component], dtype: mx.Dtype) -> int:
    """Bytes of one neuron's components once decoded (packed words and the float
    modes' uint8 scales kept, floats in the compute dtype)."""
    stored = sum(c.nbytes for c in components)
    floats = sum(size for _, size in float_parts(components))
    return stored - floats + _converted(components, dtype, every=True)


def in_flight_bytes(components: List[Component], dtype: mx.Dtype) -> int:
    """What one neuron read for a token takes on its way to the product, beside the
    staging buffer: its bundle bytes copied out of the read rows (numpy, contiguous),
    their float parts copied into MLX as stored, and the decoded result (measured on
    Qwen2.5-Coder-1.5B: without the first two, RSS went 27 MiB past the plan and a
    limit of budget + idle killed it)."""
    stored = sum(c.nbytes for c in components)
    floats = sum(size for _, size in float_parts(components))
    return stored + floats + decoded_bytes(components, dtype)


def pool_bytes(components: List[Component], dtype: mx.Dtype) -> int:
    """What one neuron streamed past the caches takes (`neuron_cache.Slots` with
    ``convert=False``): its bundle bytes as stored, and the float parts MLX converts
    to the compute dtype while the layer computes."""
    stored = sum(c.nbytes for c in components)
    return stored + _converted(components, dtype, every=False)


def staged_bytes(components: List[Component], dtype: mx.Dtype) -> int:
    """What one neuron computed where it was read (a planar store's streamed runs,
    `FlashFFN._staged`) takes beside the staging buffer: the float parts MLX
    converts to the compute dtype while the layer computes."""
    return _converted(components, dtype, every=False)


def working_bytes(config: dict, hidden: int, kv_cache: int, dtype: mx.Dtype) -> int:
    """MLX memory that decoding needs beside the weights: the KV cache for the
    context the plan holds (`kv_cache` bytes, measured: `kv_cache.kv_cache_bytes`),
    and one step's logits (with their log-softmax) and activations."""
    step = 2 * config.get("vocab_size", 0) + 8 * hidden
    return kv_cache + step * dtype.size


# Prompts are processed in steps of at most this many tokens (mlx-lm's default) ...
MAX_PREFILL = 2048
# ... fewer (halving, down to MIN_PREFILL) while one step's activations would take
# more than this share of the DRAM budget
PREFILL_SHARE = 0.125
MIN_PREFILL = 16
# ... and larger than MIN_PREFILL only while it costs decoding at most this share
# more bytes read per token (what the budget holds is for decoding first)
PREFILL_COST = 0.01


def prefill_bytes(
    config: dict,
    hidden: int,
    intermediate: int,
    step: int,
    context: int,
    dtype: mx.Dtype,
) -> int:
    """MLX memory one prefill step of `step` tokens holds at its peak, with `context`
    tokens in the KV cache: per token 6 x the FFN width + 8 x the hidden size + 2 x
    heads x context (attention scores and their softmax) in the compute dtype, and
    1 MiB. Measured peaks less the KV cache's own growth (2026-12-01, a fresh cache,
    steps of 16-1024 tokens): SmolLM2-135M 56-82 KiB per token + 0.5 MiB, this
    bounds it; Qwen2.5-Coder-0.5B 114-148 KiB per token, this is 1.5x. The step's
    logits are not in it: mlx-lm's prompt steps never evaluate them (a streamed head
    leaves them a lazy graph too, `StreamedHead`); a caller who does holds
    vocabulary x step more."""
    heads = config.get("num_attention_heads", 0)
    per_token = 6 * intermediate + 8 * hidden + 2 * heads * context
    return step * per_token * dtype.size + (1 << 20)


def prefill_step(
    budget: Optional[int], activations: Callable[[int], int], most: int = MAX_PREFILL
) -> int:
    """The largest prefill step the budget allows: `most` tokens, or fewer (halving,
    down to `MIN_PREFILL`) while one step's `activations(step)` bytes would take more
    than `PREFILL_SHARE` of it (the plan then takes the largest step up to this one
    that costs decoding at most `PREFILL_COST`: `flash_setup.setup`)."""
    step = most
    while (
        budget is not None
        and step > MIN_PREFILL
        and activations(step) > PREFILL_SHARE * budget
    ):
        step //= 2
    return step


BUDGET_FORMS = (
    "bytes with a unit (8GiB, 500MB, 1.5G; powers of 1024, as RAM is sized), a byte "
    "count (123456), a fraction of the store's size on disk in (0, 1] (0.5), or a "
    "percentage of that size (125%)"
)
_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
_BUDGET = re.compile(
    r"(?P<number>[0-9]*\.?[0-9]+)\s*(?:(?P<percent>%)|(?P<unit>(?:[KMGT]I?)?)(?P<b>B?))"
)


# Without --dram-budget the plan takes this share of the memory actually available at
# load (the rest stays for the process's own overhead and everything else running)
DEFAULT_BUDGET_SHARE = 0.75


def available_memory() -> Optional[int]:
    """Bytes this process can still use: on Linux the smaller of MemAvailable and
    what its cgroup's limit leaves (v2 or v1); on macOS Metal's recommended working
    set; None where neither can be read."""
    if sys.platform == "darwin":
        try:
            return int(mx.metal.device_info()["max_recommended_working_set_size"])
        except (AttributeError, KeyError, RuntimeError, TypeError):
            return None
    found = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    for limit, usage in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
        (
            "/sys/fs/cgroup/memory/memory.limit_in_bytes",
            "/sys/fs/cgroup/memory/memory.usage_in_bytes",
        ),
    ):
        try:
            cap = Path(limit).read_text().strip()
            if cap != "max" and int(cap) < 1 << 60:  # v1 says "no limit" with 2^63
                found.append(int(cap) - int(Path(usage).read_text()))
                break
        except (OSError, ValueError):
            continue
    return max(0, min(found)) if found else None


def resident_bytes() -> Optional[int]:
    """This process's resident memory now (Linux: /proc/self/statm); None elsewhere."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return pages * os.sysconf("SC_PAGE_SIZE")


def default_budget() -> Optional[int]:
    """The DRAM budget when none is given: `DEFAULT_BUDGET_SHARE` of the memory
    available (None, no budget, where it cannot be known)."""
    available = available_memory()
    return None if available is None else int(available * DEFAULT_BUDGET_SHARE)


def parse_budget(text: Union[str, int, float, None], store_bytes: int) -> Optional[int]:
    """A DRAM budget in bytes, from what a user may write.

    Args:
        text: ``None`` (no budget); bytes with a unit (``"8GiB"``, ``"500MB"``,
            ``"1.5G"``, ``"4096B"``: K, M, G and T are powers of 1024); an integer
            byte count (``123456``); a fraction of the store's size on disk in (0, 1]
            (``0.5``, ``"0.5"``; 1 is the whole store); or a percentage of that size
            (``"125%"``).
        store_bytes: the store's size on disk, which fractions and percentages scale.

    Returns:
        The budget in bytes, or ``None``.

    Raises:
        FlashError: for anything else (``2.5``, zero, negative, ``nan``, ``inf``).
    """
    if text is None:
        return None
    read = _read_budget(text)
    if read is None:
        raise FlashError(
            f"cannot read the DRAM budget {text!r}", fix=f"give {BUDGET_FORMS}"
        )
    value, share = read
    return max(1, int(value * store_bytes)) if share else int(value)


def _read_budget(text: Union[str, int, float]) -> Optional[Tuple[float, bool]]:
    """(bytes, False) or (share of the store, True); None when `text` is no budget."""
    if isinstance(text, bool) or not isinstance(text, (str, int, float)):
        return None
    if isinstance(text, int):
        number, integer, suffix = float(text), True, ""
    elif isinstance(text, float):
        number, integer, suffix = text, False, ""
    else:
        m = _BUDGET.fullmatch(text.strip().upper())
        if m is None:
            return None
        number, integer = float(m["number"]), m["number"].isdigit()
        suffix = "%" if m["percent"] else m["unit"] + m["b"]
    if not 0 < number < math.inf:
        return None
    if suffix == "%":
        return number / 100, True
    if suffix:  # a unit, or a plain B
        return number * _UNITS[suffix[:1].replace("B", "")], False
    if integer and number > 1:  # a byte count
        return number, False
    return (number, True) if number <= 1 else None
