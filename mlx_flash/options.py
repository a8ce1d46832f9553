"""The flash options, named once: read by the command line, `load` and the DRAM plan.

`FlashOptions` is to mlx_flash what `ModelArgs` is to an mlx-lm model: one dataclass
with the defaults, the checks and the help text, from which `add_flash_args` builds
the argument group every command shares (generate, chat, server) and `from_args` reads
it back. `load(path, selector="gate", ...)` builds one from its keyword arguments.
"""

import argparse
import math
import numbers
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Optional, Union

from .budget import (
    BUDGET_FORMS,
    MAX_PREFILL,
    MIN_PREFILL,
    PREFILL_COST,
    PREFILL_SHARE,
    parse_budget,
)
from .errors import FlashError
from .kv_cache import DEFAULT_CONTEXT, KV_SHARE, MIN_CONTEXT
from .selectors import SELECTORS, SHADOW_BITS
from .store.reader import READERS as _READER_CLASSES

READERS = tuple(_READER_CLASSES)
COMPUTE_DTYPES = ("float32", "float16", "bfloat16")
DEFAULT_FRACTION = 0.5  # gated models have no exact zeros: the top half by |activation|
DEFAULT_SPARSITY = 0.3  # input: 30% of the FFN bytes left unused per token
DEFAULT_RECALL = 0.9  # lowrank: each layer's threshold calibrated for this recall
DEFAULT_THREADS = 4  # reads in flight without a probe (`python -m mlx_flash.probe`)
# Reading unneeded neurons is cheaper than another request up to about this many bytes
# (SmolLM2, gate 25%, window 4 on this machine's virtio disk: io 74 ms/token with no
# gap, 31 ms with 23 KiB); the probe tunes it per disk.
DEFAULT_GAP_BYTES = 24 << 10


def _number(kind: type, rule: str, example: str, ok: Callable) -> dict:
    return {"kind": kind, "rule": rule, "example": example, "ok": ok}


def _option(help: str, default: Any = None, **check) -> Any:
    return field(default=default, metadata={"help": help, **check})


@dataclass(frozen=True)
class FlashOptions:
    """How a flash model selects, caches and reads its neurons.

    Every field is checked when the options are made: a bad value is one
    `FlashError` naming the option and the accepted values.
    """

    selector: str = _option(
        "How each token's neurons are chosen: all (every neuron; exact), oracle (true "
        "top activations, a reference), gate (resident gate rows; needs a store "
        "converted with --layout gate) or lowrank (learned predictors; see "
        "mlx_flash.train_predictors) or input (the FFN input's smallest channels, "
        "then the smallest activations, left out by calibrated thresholds: the fast "
        "mode for gated models; needs a store converted with --layout columns and "
        "calibrated with mlx_flash.calibrate; see --sparsity) or shadow (a "
        "--shadow-bits copy of the gate and up rows held in DRAM scores every "
        "neuron; the top --fraction are read and computed exactly)",
        "all",
        choices=SELECTORS,
    )
    shadow_bits: int = _option(
        "shadow: the bits of its resident copy of gate and up (2, 3 or 4; group "
        "size 32, float32 scales: 0.5, 0.625 or 0.75 bytes per weight)",
        3,
        number=_number(int, "2, 3 or 4", "3", lambda v: v in SHADOW_BITS),
    )
    sparsity: Optional[float] = _option(
        "input: the share of FFN bytes per token left unused, one the store was "
        f"calibrated for (default {DEFAULT_SPARSITY}); lowrank: the share of "
        "neurons left unused, each layer's recall allocated by its measured error "
        "(default: one --recall for every layer)",
        number=_number(float, "a share in [0, 1)", "0.3", lambda v: 0 <= v < 1),
    )
    fraction: Optional[float] = _option(
        f"Share of FFN neurons used per token (gated models; default "
        f"{DEFAULT_FRACTION}; lowrank: the top share by predicted logit)",
        number=_number(float, "a share in (0, 1]", "0.5", lambda v: 0 < v <= 1),
    )
    threshold: Optional[float] = _option(
        "Select |activation| > this (lowrank: predicted logit > this)",
        number=_number(float, "a finite number", "0.1", math.isfinite),
    )
    recall: Optional[float] = _option(
        "lowrank: each layer's threshold calibrated for this recall (0.5, 0.8, 0.85, "
        f"0.9, 0.95, 0.98, 0.99; default {DEFAULT_RECALL})",
        number=_number(float, "a share in (0, 1)", "0.9", lambda v: 0 < v < 1),
    )
    window: Optional[int] = _option(
        "Keep exactly the neurons of the last K tokens (the paper's windowing); "
        "default: as many recent neurons as the cache holds",
        number=_number(
            int, "a whole number of tokens, at least 1", "4", lambda v: v >= 1
        ),
    )
    dram_budget: Union[str, int, float, None] = _option(
        "DRAM for the model: bytes with a unit (8GiB, 500MB, 1.5G: powers of 1024), a "
        "byte count (123456), a fraction in (0, 1] of the store's size on disk (0.5: "
        "half of it), or a percentage of that size (125%%). Default: 75%% of the "
        "memory available at load (within the cgroup's limit on Linux, Metal's "
        "recommended working set on macOS). What does not fit streams from the SSD "
        "every token (attention, the LM head, FFN neurons: the planner keeps "
        "resident what saves the most reads per byte). Any budget at or above the "
        "model's floor runs: the KV cache of --max-kv-size tokens, decoding's "
        "working memory and 16 tokens of prefill, the readers' buffers, one "
        "streamed unit in flight (a "
        "layer's FFN or attention, a chunk of the LM head), the tensors too small to "
        "stream, the selector's state and a 16 MiB runtime allowance; a smaller one "
        "is refused with the floor in MiB. The process itself (Python, MLX, the "
        "tokenizer) takes about 160 MiB more, outside the budget",
        budget=True,
    )
    gap: Optional[int] = _option(
        "Read up to N unneeded neurons to merge reads (default: the probe's gap, else "
        f"~{DEFAULT_GAP_BYTES >> 10} KiB worth)",
        number=_number(
            int, "a whole number of neurons, at least 0", "8", lambda v: v >= 0
        ),
    )
    reader: str = _option(
        "direct: preadv bypassing the page cache (default); mmap: the OS pages it",
        "direct",
        choices=READERS,
    )
    threads: Optional[int] = _option(
        "Parallel reads in flight (default: from `python -m mlx_flash.probe`, else "
        f"{DEFAULT_THREADS}; the computation's cores: --compute-threads)",
        number=_number(int, "a whole number, at least 1", "4", lambda v: v >= 1),
    )
    compute_threads: Optional[int] = _option(
        "CPU cores for the computation: each large quantized matrix product is split "
        "into this many row blocks evaluated side by side (MLX's CPU backend runs "
        "one op on one core); default: every core the process may use on the CPU, "
        "1 on a GPU; process-wide, like MLX's default device",
        number=_number(int, "a whole number, at least 1", "2", lambda v: v >= 1),
    )
    verify: bool = _option(
        "Check every checksum of the store before generating (reads it all)", False
    )
    max_kv_size: Optional[int] = _option(
        "Tokens of context the DRAM plan holds: the KV cache is allocated once for "
        "them and rotates past them (keeping the first 4), as in mlx-lm; default: "
        f"{DEFAULT_CONTEXT} tokens, or fewer (halving, down to {MIN_CONTEXT}) where "
        f"their KV cache would take more than {KV_SHARE * 100:.0f}%% of the DRAM "
        "budget; "
        "refused past that",
        number=_number(
            int, "a whole number of tokens, at least 1", "4096", lambda v: v >= 1
        ),
    )
    prompt_caches: int = _option(
        "KV caches of earlier requests kept beside the live one, each of the plan's "
        "whole context, counted in the DRAM plan (a server's prompt cache; "
        "mlx_flash.server takes it from --prompt-cache-size)",
        0,
        number=_number(
            int, "a whole number of caches, at least 0", "1", lambda v: v >= 0
        ),
    )
    prefill_step_size: int = _option(
        f"Prompt tokens processed at a time, at most (default {MAX_PREFILL}, as in "
        "mlx-lm); the DRAM plan holds one step's activations: "
        f"{MIN_PREFILL} tokens, doubled while that costs decoding at most "
        f"{PREFILL_COST * 100:g}%% more bytes read per token and takes at most "
        f"{PREFILL_SHARE * 100:.1f}%% of the budget",
        MAX_PREFILL,
        number=_number(
            int, "a whole number of tokens, at least 1", "512", lambda v: v >= 1
        ),
    )
    naive: bool = _option(
        "Stream every layer's FFN whole every token, with no neuron caches: the "
        "paper's naive baseline (a budget still decides what else is resident; "
        "default: the exact `all` selection with as much of the FFN cached as the "
        "budget holds)",
        False,
    )
    no_read_ahead: bool = _option(
        "Do not read the next layer's FFN bytes while this layer computes (all and "
        "naive read ahead by default, into a second staging buffer the DRAM plan "
        "counts; the other selectors decide on the token and never do; streamed "
        "attention and LM head chunks are read ahead whatever this says)",
        False,
    )
    stream_piece: Union[str, int, float, None] = _option(
        "Stream a layer computed where it is read (a planar store with all or "
        "--naive) in pieces of at most this much (bytes with a unit: 8MiB; or a "
        "fraction of the largest layer: 0.25), so that its two staging buffers hold "
        "a piece each, not a layer, and the caches the rest; each piece is read "
        "while the one before it computes, and evaluated in the background. "
        "Default: whole layers (measured on a 2-core CPU, Qwen2.5-Coder-1.5B at 50%% "
        "of its file: 8 MiB pieces read 6%% fewer bytes per token and took 5%% "
        "longer)",
        budget=True,
    )
    compute_dtype: Optional[str] = _option(
        "Dtype of the computation (default: float32 on CPU, the model's on GPU)",
        choices=COMPUTE_DTYPES,
    )

    def __post_init__(self):
        for f in fields(self):
            check(f.name, getattr(self, f.name))
        if self.naive and (self.selector != "all" or self.window is not None):
            raise FlashError(
                "naive streams every neuron of every layer each token: it takes no "
                "selector or window",
                fix="drop --naive, or --selector/--window",
            )
        if self.selector == "lowrank" and self.sparsity is not None:
            if (self.recall, self.threshold) != (None, None):
                raise FlashError(
                    "lowrank's --sparsity allocates each layer's recall: it takes no "
                    "--recall or --threshold",
                    fix="give one of --sparsity, --recall or --threshold",
                )

    def sparsity_for(self) -> Optional[float]:
        """The input selector's calibrated share, lowrank's allocated one (None:
        one recall), None for the other selectors."""
        if self.selector == "lowrank":
            return self.sparsity
        if self.selector != "input":
            return None
        return DEFAULT_SPARSITY if self.sparsity is None else self.sparsity

    def fraction_for(self, gated: bool) -> Optional[float]:
        """The share of neurons to select: as given, else the default for a gated
        model when no threshold (or, for lowrank, no recall) decides instead."""
        if self.fraction is not None or self.threshold is not None:
            return self.fraction
        if self.selector == "lowrank":
            return None  # a calibrated recall decides
        return DEFAULT_FRACTION if gated else None

    def recall_for(self) -> Optional[float]:
        """lowrank's calibrated recall: as given, else the default unless a fraction
        or a threshold is asked for instead."""
        if self.selector != "lowrank" or self.recall is not None:
            return self.recall
        chosen = (self.fraction, self.threshold, self.sparsity) != (None,) * 3
        return None if chosen else DEFAULT_RECALL

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "FlashOptions":
        return cls(**{f.name: getattr(args, f.name) for f in fields(cls)})


def check(name: str, value: Any) -> None:
    """FlashError unless `value` is acceptable for the option `name` (None is)."""
    meta = FlashOptions.__dataclass_fields__[name].metadata
    if value is None:
        return
    if "choices" in meta and value not in meta["choices"]:
        raise FlashError(
            f"unknown {name} {value!r}", fix="use " + ", ".join(meta["choices"])
        )
    if meta.get("budget"):
        parse_budget(value, 1)
    if "number" in meta:
        n = meta["number"]
        kind = numbers.Integral if n["kind"] is int else numbers.Real
        if isinstance(value, bool) or not isinstance(value, kind) or not n["ok"](value):
            raise FlashError(
                f"{name} must be {n['rule']}, not {value!r}",
                fix=f"give {n['rule']}, e.g. {name}={n['example']} "
                f"(--{name.replace('_', '-')} {n['example']})",
            )


def add_flash_args(parser: argparse.ArgumentParser):
    """Add the flash options, one argument group, to an mlx-lm parser; every value is
    checked as it is read (a bad one: exit status 2 and one line)."""
    group = parser.add_argument_group("mlx_flash")
    defaults = FlashOptions()
    for f in fields(FlashOptions):
        flag, meta = "--" + f.name.replace("_", "-"), f.metadata
        if flag in parser._option_string_actions:  # mlx-lm's own (--max-kv-size):
            parser._option_string_actions[flag].help = meta["help"]  # what it plans
            continue
        if f.type is bool or f.default is False:
            group.add_argument(flag, action="store_true", help=meta["help"])
            continue
        kwargs = {"default": getattr(defaults, f.name), "help": meta["help"]}
        if "choices" in meta:
            kwargs["choices"] = meta["choices"]
        else:
            kwargs["type"] = _flag_type(f.name)
        group.add_argument(flag, **kwargs)
    group.add_argument(
        "--stats", action="store_true", help="Print per-token I/O, memory and compute"
    )
    return group


def _flag_type(name: str) -> Callable[[str], Any]:
    """An argparse `type` for the option `name`: its value, or one clear error."""
    meta = FlashOptions.__dataclass_fields__[name].metadata

    def parse(text: str):
        if meta.get("budget"):
            try:
                parse_budget(text, 1)
            except FlashError:
                raise argparse.ArgumentTypeError(
                    f"cannot read {text!r}: give {BUDGET_FORMS}"
                ) from None
            return text
        rule = meta["number"]["rule"]
        try:
            value = meta["number"]["kind"](text)
            check(name, value)
        except (ValueError, FlashError):
            raise argparse.ArgumentTypeError(f"must be {rule}, not {text!r}") from None
        return value

    parse.__name__ = name
    return parse
