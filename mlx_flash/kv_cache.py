"""The KV cache a flash model makes: bounded by the context the plan holds.

mlx-lm's `KVCache` grows without end, 256 tokens at a time, and every growth copies the
cache (old and new side by side): neither fits a DRAM budget. A flash model's own
`make_cache` therefore allocates each layer's cache once, for the whole context the
plan allows (`--max-kv-size`, default `DEFAULT_CONTEXT`), and says what happens past
it: with `--max-kv-size` the cache rotates, keeping the first 4 tokens, as mlx-lm's
`--max-kv-size` does; without it, a context longer than the default is refused with a
`FlashError` naming the flag, never a silent overrun. A layer's own bounded cache
(Gemma's sliding window) stays as the model makes it, allocated once as well.

The plan's KV bytes are measured from these cache objects after one token through the
attention (the FFN left out), not derived from head counts, so sliding-window or
other cache shapes come out right.
"""

import contextlib
from typing import Iterator, List, Optional

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.cache import KVCache, RotatingKVCache

from .errors import FlashError

DEFAULT_CONTEXT = 2048  # tokens the plan holds when --max-kv-size is not given
# ... unless their KV cache would take more than this share of the DRAM budget: then
# the largest of 1024, 512, 256 tokens that does (at least MIN_CONTEXT)
KV_SHARE = 0.25
MIN_CONTEXT = 256


class LimitedKVCache(KVCache):
    """`KVCache` allocated once for `limit` tokens, refusing to grow past them."""

    def __init__(self, limit: int):
        super().__init__()
        self.limit = self.step = limit  # one allocation: no growth, no copy

    def update_and_fetch(self, keys, values):
        if self.offset + keys.shape[2] > self.limit:
            raise FlashError(
                f"the context reached {self.offset + keys.shape[2]} tokens; the DRAM "
                f"plan holds the KV cache of {self.limit}",
                fix="pass --max-kv-size N (max_kv_size=N): a larger context the plan "
                "holds, kept as a rotating cache past N tokens as in mlx-lm",
            )
        return super().update_and_fetch(keys, values)


def bounded_caches(
    model: nn.Module,
    base: List,
    max_kv_size: Optional[int],
    context: int = DEFAULT_CONTEXT,
) -> List:
    """`base` (the model's own caches) with every unbounded `KVCache` replaced by one
    bounded by the plan's context (`max_kv_size`, rotating; else `context`, refused
    past it), and every cache allocated once."""
    out = []
    for c in base:
        if type(c) is KVCache:
            if max_kv_size is None:
                c = LimitedKVCache(context)
            else:
                c = RotatingKVCache(max_size=max_kv_size, keep=4)
        if isinstance(c, RotatingKVCache):
            c.step = c.max_size  # allocated once, whole
        out.append(c)
    return out


def context_tokens(cache) -> int:
    """How many tokens' keys and values `cache` holds at most."""
    if isinstance(cache, RotatingKVCache):
        return cache.max_size
    return cache.limit if isinstance(cache, LimitedKVCache) else DEFAULT_CONTEXT


class _NoFFN(nn.Module):
    def __call__(self, x):
        return mx.zeros_like(x)


@contextlib.contextmanager
def _without_ffn(model: nn.Module) -> Iterator[None]:
    saved = [layer.mlp for layer in model.layers]
    try:
        for layer in model.layers:
            layer.mlp = _NoFFN()
        yield
    finally:
        for layer, mlp in zip(model.layers, saved):
            layer.mlp = mlp


def default_context(model: nn.Module, budget: Optional[int]) -> int:
    """The context the plan holds when none is given: `DEFAULT_CONTEXT` tokens, or
    fewer (halving, down to `MIN_CONTEXT`) while their KV cache would take more than
    `KV_SHARE` of the budget."""
    context = DEFAULT_CONTEXT
    while (
        budget is not None
        and context > MIN_CONTEXT
        and kv_cache_bytes(model, context) > KV_SHARE * budget
    ):
        context //= 2
    return context


def kv_cache_bytes(model: nn.Module, context: Optional[int] = None) -> int:
    """Bytes of the KV caches `model.make_cache()` makes, once allocated: one token
    through the attention allocates them whole. The graph is built, never evaluated:
    the shapes say the bytes, and no weight is read (the plan has not yet decided
    which are resident)."""
    caches = model.make_cache(context)
    with _without_ffn(model):
        model(mx.array([[0]]), cache=caches)
    total = sum(c.nbytes for c in caches)
    del caches
    return total
