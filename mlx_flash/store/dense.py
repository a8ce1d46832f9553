"""A plain mlx-lm directory holding exactly the values a store computes with.

The exactness reference for a store (re-laying a quantized `down` per neuron changes
its values, so the source checkpoint is not the reference), and the baseline that
benchmarks run through mlx-lm. Row projections stay in the store's encoding where
mlx-lm's `QuantizedLinear` can express it (the same bits, group and mode along the
same axis); the output projection, quantized per neuron in the store (along the axis
mlx-lm's layout cannot group), is written dequantized, in float32.
"""

import json
import shutil
from pathlib import Path
from typing import Union

import mlx.core as mx

from .aligned_safetensors import without_pads
from .archs import ffn_arch
from .format import DENSE_NAME, dequantize
from .sources import TOKENIZER_FILES
from .store import BundleStore


def export_dense(
    store_path: Union[str, Path], out: Union[str, Path], keep_quantized: bool = True
) -> Path:
    """Write the mlx-lm directory `out` (which must exist and be empty, or not exist)
    from the store at `store_path`: its dense part, its FFN and its config.
    `keep_quantized=False` writes every FFN matrix dequantized (float32), for
    readers without MLX's quantized layouts."""
    store_path, out = Path(store_path), Path(out)
    store = BundleStore(store_path)
    config = json.loads((store_path / "config.json").read_text())
    arch, m = ffn_arch(config, store_path), store.manifest
    weights = without_pads(mx.load(str(store_path / DENSE_NAME)))
    modes = set()
    try:
        for i, entry in enumerate(m.layers):
            stored = store.read_layer(i, mx.float32)
            for name, c in entry.components.items():
                w, key = stored[name], arch.name(i, name.removesuffix(".bias"))
                if name.endswith(".bias"):
                    weights[key + ".bias"] = w.reshape(-1)
                elif name == m.column:
                    weights[key + ".weight"] = dequantize(w, c.length).T
                elif c.encoding.quantized and keep_quantized:
                    parts = ("weight", "scales", "biases")
                    weights.update({f"{key}.{p}": a for p, a in zip(parts, w)})
                    modes.add((c.encoding.mode, c.encoding.bits, c.encoding.group_size))
                else:
                    weights[key + ".weight"] = dequantize(w, c.length)
            mx.eval(weights)
    finally:
        store.close()
    if modes and not isinstance(config.get("quantization"), dict):
        # mlx-lm infers each module's own bits, group and mode from its shapes
        mode, bits, group = sorted(modes)[0]
        config["quantization"] = {"group_size": group, "bits": bits, "mode": mode}
    out.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(out / DENSE_NAME), weights, metadata={"format": "mlx"})
    (out / "config.json").write_text(json.dumps(config, indent=2))
    for name in TOKENIZER_FILES:
        if (store_path / name).is_file():
            shutil.copy(store_path / name, out / name)
    return out
