"""Run a flash model over a whole text one layer at a time.

Training predictors and measuring perplexity both need every token's FFN input and
activations, layer after layer. Running the text layer by layer keeps one layer's FFN
in DRAM (read from the store once) and the hidden states of the text (tokens x D),
instead of the whole model or every layer's activations at once.

The text is cut into independent sequences of `seq_len` tokens (each with a causal
mask, no KV cache): `h` is (S, L, D). Several variants ("lanes") of the same text can
advance together, each with its own FFN policy, sharing each layer's read.
"""

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .errors import FlashError
from .store.format import Weight, dequantize

# (layer, x (N, D), activation (N, n_ff), pre (N, n_ff) of the first row, the layer's
# float weights) -> a mask to multiply the activation by (N, n_ff), or None: every
# neuron.
FFNHook = Callable[
    [int, mx.array, mx.array, mx.array, Dict[str, mx.array]], Optional[mx.array]
]


class _Captured(Exception):
    def __init__(self, h: mx.array):
        self.h = h


class _Tap:
    """Stands in for a transformer block: returns `fn(h)`; the model may still read
    the block's attributes (e.g. llama's `use_sliding`)."""

    def __init__(self, fn, block: nn.Module):
        self.fn, self.block = fn, block

    def __call__(self, h, mask=None, cache=None):
        return self.fn(h)

    def __getattr__(self, name):
        return getattr(self.block, name)


def _raise(h):
    raise _Captured(h)


def _block_list(model: nn.Module) -> list:
    """The list the model iterates. `model.layers` may be a fresh slice of it (mlx-lm's
    pipeline models, e.g. qwen2), so taps go into the owner's own list."""
    blocks = model.layers
    inner = getattr(model, "model", None)
    for owner in (inner, getattr(inner, "decoder", None)):
        own = getattr(owner, "layers", None)
        if isinstance(own, list) and len(own) == len(blocks):
            if all(a is b for a, b in zip(own, blocks)):
                return own
    return blocks


def _with_taps(model: nn.Module, fns: List[Callable], run: Callable):
    layers = _block_list(model)  # the inner model's own list: replaced, restored
    saved = list(layers)
    try:
        layers[:] = [_Tap(fn, block) for fn, block in zip(fns, saved)]
        return run()
    finally:
        layers[:] = saved


def embed(model: nn.Module, tokens: mx.array) -> mx.array:
    """The hidden states entering the first block: (S, L) ids -> (S, L, D)."""
    try:
        _with_taps(model, [_raise] * len(model.layers), lambda: model(tokens))
    except _Captured as c:
        return c.h
    raise FlashError("the model never reached its first layer")


def head(model: nn.Module, tokens: mx.array, h: mx.array) -> mx.array:
    """Logits from the hidden states leaving the last block (final norm, LM head)."""
    fns = [lambda x: x] * (len(model.layers) - 1) + [lambda x: h]
    return _with_taps(model, fns, lambda: model(tokens))


def token_nll(model: nn.Module, tokens: mx.array, h: mx.array) -> mx.array:
    """Negative log-likelihood of each next token: (S, L - 1)."""
    logits = head(model, tokens, h)[:, :-1].astype(mx.float32)
    return nn.losses.cross_entropy(logits, tokens[:, 1:], reduction="none")


class _HookedFFN(nn.Module):
    """A layer's FFN from float weights read once, with `hook` deciding a mask."""

    def __init__(self, ffn, layer: int, weights: Dict[str, mx.array], hook: FFNHook):
        super().__init__()
        self.ffn, self.layer, self.weights, self.hook = ffn, layer, weights, hook

    def __call__(self, x: mx.array) -> mx.array:
        S, L, D = x.shape
        ffn, w = self.ffn, self.weights
        x2 = x.reshape(S * L, D)
        h = [x2 @ w[name].T + self.bias(name) for name in ffn.rows]
        a = ffn.activate(h)  # (N, n_ff)
        mask = self.hook(self.layer, x2, a, h[0], w)
        if isinstance(mask, tuple):  # (mask, the activations it computed instead)
            mask, a = mask
        if mask is not None:
            a = a * mask
        return ffn.with_bias(a @ w[ffn.column]).reshape(S, L, -1)

    def bias(self, name: str):
        b = self.weights.get(name + ".bias")  # (n, 1): one per neuron, in its bundle
        return 0 if b is None else b.reshape(-1)


def float_weights(weights: Dict[str, Weight], dims: int) -> Dict[str, mx.array]:
    """Quantized components dequantized: many tokens at once are a GEMM, which MLX's
    CPU backend runs far faster in float32 than through `quantized_matmul`."""
    return {k: dequantize(w, dims) for k, w in weights.items()}


def for_many_tokens(model: nn.Module) -> nn.Module:
    """The dense part dequantized on the CPU backend (the reason as in
    `float_weights`; costs float32 DRAM for it); untouched on a GPU."""
    if mx.default_device() == mx.cpu:
        from mlx_lm.utils import dequantize_model

        dequantize_model(model)
    return model


@dataclass
class Lane:
    """One variant of the text advancing through the layers."""

    hook: Optional[FFNHook]
    h: Optional[mx.array] = None


def run_layers(
    model: nn.Module,
    tokens: mx.array,
    lanes: List[Lane],
    batch: int = 8,
    progress: Optional[Callable[[int], None]] = None,
) -> None:
    """Advance every lane's hidden states through all blocks, in place.

    Args:
        model: a model loaded by `mlx_flash.load` (its FFNs are `FlashFFN`s).
        tokens: (S, L) token ids; each row an independent sequence.
        lanes: their `h` starts at the embeddings when None.
        batch: sequences per block call.
        progress: called with each finished layer's index.
    """
    window = getattr(getattr(model, "args", None), "sliding_window", None)
    if window and tokens.shape[1] > window:  # "causal" would see past the window
        raise FlashError(
            f"sequences of {tokens.shape[1]} tokens exceed the model's sliding window "
            f"({window})",
            fix=f"use --seq-len {window} or less",
        )
    h0 = None
    for lane in lanes:
        if lane.h is None:
            h0 = embed(model, tokens) if h0 is None else h0
            lane.h = h0
    store, dtype = model.flash_store, lanes[0].h.dtype
    for i, block in enumerate(model.layers):
        ffn = block.mlp
        weights = float_weights(store.read_layer(i, dtype), store.manifest.hidden_size)
        try:
            for lane in lanes:
                block.mlp = _HookedFFN(ffn, i, weights, lane.hook or _dense)
                parts = []
                for s in range(0, tokens.shape[0], batch):
                    out = block(lane.h[s : s + batch], "causal", None)
                    mx.eval(out)
                    parts.append(out)
                lane.h = mx.concatenate(parts)
        finally:
            block.mlp = ffn
        del weights
        if progress:
            progress(i)


def _dense(layer, x, a, pre, w):
    return None


def read_text(path: Path, what: str) -> Tuple[str, str]:
    """A UTF-8 text file and its SHA-256 (what a sidecar records it was made from);
    `what` names it in the errors ("the training text")."""
    path = Path(path)
    if not path.is_file():
        raise FlashError(f"{what} does not exist", path)
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8"), hashlib.sha256(raw).hexdigest()
    except UnicodeDecodeError:
        raise FlashError(f"{what} is not UTF-8", path) from None


def text_tokens(
    tokenizer, text: str, count: int, seq_len: int, skip: int = 0
) -> mx.array:
    """The tokens `skip` .. `skip + count` of `text`, as (S, seq_len) sequences."""
    ids, block = [], []
    for line in text.splitlines(keepends=True) + [None]:  # encode only what is needed
        if line is not None:
            block.append(line)
        if line is None or sum(map(len, block)) > 16384:  # < the tokenizer's limit
            ids += tokenizer.encode("".join(block), add_special_tokens=False)
            block = []
            if len(ids) >= skip + count:
                break
    ids = np.array(ids[skip : skip + count], np.int64)
    rows = len(ids) // seq_len
    if rows == 0:
        raise FlashError(
            f"the text has {len(ids)} tokens after skipping {skip}: fewer than one "
            f"sequence of {seq_len}",
            fix="give a longer text, a smaller --skip or a smaller --seq-len",
        )
    return mx.array(ids[: rows * seq_len].reshape(rows, seq_len).astype(np.int32))
