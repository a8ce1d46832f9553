"""Per-token accounting: where each millisecond and byte of the FFN goes."""

import time
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from typing import Dict


@dataclass
class FlashStats:
    """Totals since load (or `reset`); `tokens` counts decode steps.

    Decode phases (paper Table 3): ``select`` the selector (a predictor or the
    resident gate rows) up to its decision (its host sync also evaluates the
    attention before it), ``io`` reading missing bundles, ``memory``
    cache bookkeeping and copies into slots, ``compute`` everything else of the token —
    the FFN math and the attention evaluated with it (the naive path's decoding of
    whole layers too).
    ``prefill`` is the time of multi-token calls (dense streamed passes).
    """

    tokens: int = 0
    bytes: int = 0  # read from the store while decoding
    reads: int = 0
    syncs: int = 0  # the selections' host syncs
    evals: int = 0  # mx.eval calls of ours (a layer's FFN, a streamed unit)
    selected: int = 0
    loaded: int = 0
    hits: int = 0
    channels: int = 0  # the `input` selector's kept input channels (their columns)
    channels_loaded: int = 0
    channel_hits: int = 0
    dense_layers: int = 0  # layer calls that streamed the whole layer (prefill, `all`)
    seconds: Dict[str, float] = field(
        default_factory=lambda: {
            "select": 0.0,
            "io": 0.0,
            "memory": 0.0,
            "compute": 0.0,
            "prefill": 0.0,
        }
    )

    @contextmanager
    def timed(self, phase: str):
        tic = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] += time.perf_counter() - tic

    def since(self, before: "FlashStats") -> "FlashStats":
        """What was counted since `before`, a copy taken earlier (e.g. one turn)."""
        delta = FlashStats(
            **{
                f.name: getattr(self, f.name) - getattr(before, f.name)
                for f in fields(FlashStats)
                if f.name != "seconds"
            }
        )
        delta.seconds = {
            k: v - before.seconds.get(k, 0.0) for k, v in self.seconds.items()
        }
        return delta

    def reset(self) -> None:
        self.__init__()

    def summary(self) -> str:
        n = max(self.tokens, 1)
        ms = {k: 1e3 * v / n for k, v in self.seconds.items()}
        hit = self.hits / self.selected if self.selected else 0.0
        return (
            f"[mlx_flash] per token: select {ms['select']:.1f} ms, "
            f"io {ms['io']:.1f} ms, "
            f"memory {ms['memory']:.1f} ms, "
            f"compute {ms['compute']:.1f} ms; "
            f"{self.bytes / n / 1e6:.2f} MB in {self.reads / n:.0f} reads, "
            f"neurons selected {self.selected / n:.0f}, loaded {self.loaded / n:.0f}, "
            f"cache hit rate {hit:.1%}, "
            + (
                f"channels kept {self.channels / n:.0f} (column cache hit rate "
                f"{self.channel_hits / max(self.channels, 1):.1%}), "
                if self.channels
                else ""
            )
            + f"host syncs {self.syncs / n:.0f}, evaluations "
            f"{self.evals / n:.0f}; "
            f"{self.tokens} tokens; prefill {self.seconds['prefill']:.2f} s, "
            f"{self.dense_layers} dense layer passes"
        )
