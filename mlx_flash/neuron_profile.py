"""`python -m mlx_flash.neuron_profile STORE --text FILE`: measure how often each FFN
neuron is selected on a calibration text, and save the profile in the store.

The text runs through the model one layer at a time (`layerwise`, as for the
predictors): DRAM holds one layer's FFN and the text's hidden states. Each token
selects its neurons as the oracle does — gated models the top `--fraction` by
|act(gate) * up|, ReLU models activation > 0 — and every selection is counted token
by token (`hot_set.LayerCounts`), never as a union over a chunk. The hot part of a
neuron cache pins the most frequently selected (`hot_set`, `neuron_cache.SlotMap`).
Stored as ``neuron_profile.safetensors`` + ``neuron_profile.json`` (docs/FORMAT.md §14).
"""

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

import mlx.core as mx
import numpy as np
from tqdm import tqdm

from .blas import run_offline
from .errors import FlashError
from .hot_set import FrequencyCounter, LayerCounts
from .layerwise import Lane, for_many_tokens, read_text, run_layers, text_tokens
from .predictor import target_error, top_fraction_targets
from .sidecar import sha256_file, write_sidecar
from .store.manifest import Manifest
from .store.safety import check_safetensors, read_json_object

WEIGHTS_NAME, MANIFEST_NAME = "neuron_profile.safetensors", "neuron_profile.json"
MAGIC, VERSION = "MLXFLASH-NEURON-PROFILE", 1
_FIX = "measure it again: python -m mlx_flash.neuron_profile STORE --text FILE"


@dataclass
class NeuronProfile:
    """Every layer's selection counts and what they were measured on."""

    layers: List[LayerCounts]
    target: Dict[str, object]  # {"kind": "top", "fraction": f} or {"kind": "relu"}
    text: Dict[str, object]  # {"name", "sha256", "tokens", "skip", "seq_len"}

    def hot_ids(self, layer: int, k: int) -> np.ndarray:
        """The layer's `k` most frequently selected neurons, most frequent first."""
        return self.layers[layer].hot_ids(k)


def store_identity(manifest: Manifest) -> Dict[str, object]:
    """What ties a profile to one store: its shape, its byte layout (the
    ``ffn.bundles`` header's digest) and its content (the block checksums' digest,
    when the store has them: another model of the same shape differs there)."""
    sums = manifest.extension("checksums")
    return {
        "architecture": manifest.architecture,
        "layers": len(manifest.layers),
        "neurons": [layer.neurons for layer in manifest.layers],
        "layout_digest": manifest.layout_digest().hex(),
        "checksums_digest": None if sums is None else sums.meta.get("digest"),
    }


def selection_mask(a: mx.array, gated: bool, fraction: float) -> mx.array:
    """Each token's selected neurons, as the oracle picks them: (N, n) bool."""
    return top_fraction_targets(mx.abs(a), fraction) if gated else a > 0


def measure(
    model, tokens: mx.array, fraction: float, progress=None
) -> List[LayerCounts]:
    """Every layer's counts over `tokens` (S, L), one layer at a time; the model's
    FFNs stay dense, so each layer sees the true model's inputs."""
    m = model.flash_store.manifest
    gated, L = len(m.rows) == 2, tokens.shape[1]
    counter = FrequencyCounter([layer.neurons for layer in m.layers])

    def count(layer, x, a, pre, w):
        mask = np.array(selection_mask(a, gated, fraction))
        counter.update_sequences(layer, mask.reshape(-1, L, mask.shape[-1]))
        return None

    run_layers(model, tokens, [Lane(count)], progress=progress)
    return counter.layers


def save_profile(store: Path, manifest: Manifest, profile: NeuronProfile) -> None:
    """Write both files under temporary names and rename them into place; the
    manifest, renamed last, names the weights' SHA-256 and the store's identity."""
    store, first = Path(store), profile.layers[0]
    if any((c.tokens, c.pairs) != (first.tokens, first.pairs) for c in profile.layers):
        raise ValueError("every layer's counts must cover the same tokens")
    tensors = {}
    for i, c in enumerate(profile.layers):
        tensors[f"layers.{i}.selected"] = mx.array(c.selected.astype(np.int32))
        tensors[f"layers.{i}.repeated"] = mx.array(c.repeated.astype(np.int32))
    write_sidecar(
        store,
        WEIGHTS_NAME,
        MANIFEST_NAME,
        tensors,
        {
            "magic": MAGIC,
            "version": VERSION,
            "target": profile.target,
            "text": {**profile.text, "tokens": first.tokens},
            "pairs": first.pairs,
            "store": store_identity(manifest),
        },
    )


def has_profile(store: Path) -> bool:
    return (Path(store) / MANIFEST_NAME).is_file()


def load_profile(store: Path, manifest: Manifest) -> NeuronProfile:
    """Read and check the store's neuron profile against the store it must describe.

    Refused with a `FlashError` naming the file and the fix: missing, damaged (the
    counts' SHA-256), malformed (fields, shapes, counts that cannot be), or measured
    on another model or store (`store_identity`).
    """
    store = Path(store)
    path, weights_path = store / MANIFEST_NAME, store / WEIGHTS_NAME
    if not path.is_file() or not weights_path.is_file():
        raise FlashError("the store has no neuron profile", store, _FIX)
    m = read_json_object(path, _FIX)
    if m.get("magic") != MAGIC or m.get("version") != VERSION:
        raise FlashError("not a neuron profile of this version", path, _FIX)
    why = _manifest_error(m)
    if why:
        raise FlashError(f"the neuron profile is malformed: {why}", path, _FIX)
    identity = store_identity(manifest)
    for key, ours in identity.items():
        if m["store"].get(key) != ours:
            raise FlashError(
                f"the neuron profile was measured on another store or model ({key} "
                f"{m['store'].get(key)!r}, this store's {ours!r})",
                path,
                _FIX,
            )
    if m["weights_sha256"] != sha256_file(weights_path):
        raise FlashError(
            "the profile's counts do not match its manifest", weights_path, _FIX
        )
    check_safetensors(weights_path, _FIX)
    flat = mx.load(str(weights_path))
    tokens, pairs, layers = m["text"]["tokens"], m["pairs"], []
    for i, n in enumerate(identity["neurons"]):
        got = [flat.get(f"layers.{i}.{k}") for k in ("selected", "repeated")]
        if any(a is None or tuple(a.shape) != (n,) or a.dtype != mx.int32 for a in got):
            raise FlashError(
                f"layer {i}: expected int32 selected and repeated counts of {n}",
                weights_path,
                _FIX,
            )
        selected, repeated = (np.array(a).astype(np.int64) for a in got)
        if not (
            (selected >= 0).all()
            and (selected <= tokens).all()
            and (repeated >= 0).all()
            and (repeated <= np.minimum(selected, pairs)).all()
        ):
            raise FlashError(f"layer {i}: counts out of range", weights_path, _FIX)
        layers.append(LayerCounts(selected, repeated, tokens, pairs))
    return NeuronProfile(layers, m["target"], m["text"])


def _manifest_error(m: dict) -> str:
    """What is wrong with the fields of a profile manifest, or ""."""
    if not isinstance(m.get("weights_sha256"), str):
        return "weights_sha256 must be a string"
    for key in ("target", "text", "store"):
        if not isinstance(m.get(key), dict):
            return f"{key} must be an object"
    tokens, pairs = m["text"].get("tokens"), m.get("pairs")
    for key, v in (("text.tokens", tokens), ("pairs", pairs)):
        if type(v) is not int or v < 0:
            return f"{key} must be a non-negative integer"
    if pairs > tokens:
        return "more token pairs than tokens"
    return target_error(m["target"])


def setup_arg_parser():
    parser = argparse.ArgumentParser(
        description="Measure how often each FFN neuron is selected on a calibration "
        "text and save the profile in the store (the neuron cache's hot set)"
    )
    parser.add_argument("model", help="A flash store (or a source converted once)")
    parser.add_argument("--text", required=True, help="A UTF-8 calibration text")
    parser.add_argument("--tokens", type=int, default=16384, help="Tokens to count")
    parser.add_argument("--skip", type=int, default=0, help="Text tokens to skip first")
    parser.add_argument("--seq-len", type=int, default=256, help="Tokens per sequence")
    parser.add_argument(
        "--fraction",
        type=float,
        default=0.5,
        help="Gated models: each token selects its top share of neurons by "
        "|act(gate) * up| (ReLU models: activation > 0)",
    )
    parser.add_argument(
        "--no-progress", dest="progress", action="store_false", help="No progress"
    )
    return parser


def profile(args) -> NeuronProfile:
    from .utils import load  # load's setup may itself read a store's profile

    if not 0 < args.fraction <= 1:
        raise FlashError(f"--fraction {args.fraction} must be in (0, 1]")
    text_path = Path(args.text)
    text, text_sha256 = read_text(text_path, "the calibration text")
    model, tokenizer = load(args.model, progress=False)
    for_many_tokens(model)
    store, m = model.flash_store, model.flash_store.manifest
    tokens = text_tokens(tokenizer, text, args.tokens, args.seq_len, args.skip)
    gated = len(m.rows) == 2
    target = {"kind": "top", "fraction": args.fraction} if gated else {"kind": "relu"}
    print(
        f"[mlx_flash] counting the selections of {len(m.layers)} layers over "
        f"{tokens.size} tokens of {text_path.name} (selection: {target})",
        flush=True,
    )
    with tqdm(total=len(m.layers), desc="layers", disable=not args.progress) as bar:
        counts = measure(model, tokens, args.fraction, lambda i: bar.update(1))
    result = NeuronProfile(
        counts,
        target,
        {
            "name": text_path.name,
            "sha256": text_sha256,
            "tokens": int(tokens.size),
            "skip": args.skip,
            "seq_len": int(tokens.shape[1]),
        },
    )
    save_profile(store.path, m, result)
    top = np.mean([c.frequency()[c.hot_ids(c.neurons // 10)].mean() for c in counts])
    print(
        f"[mlx_flash] saved the neuron profile into {store.path}: the 10% most "
        f"frequent neurons of a layer are selected by {top:.0%} of tokens on average"
    )
    return result


def main(argv: Optional[List[str]] = None):
    run_offline(setup_arg_parser(), profile, argv)


if __name__ == "__main__":
    main()
